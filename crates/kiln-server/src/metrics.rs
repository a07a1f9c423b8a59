//! The server's Prometheus metrics (text exposition at `/metrics`).
//! Filled in by the API (create latency), the leader loop (scheduler
//! decisions) and from the replica's Raft status and applied state.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kiln_store::RaftNode;

/// Upper bounds (seconds) of the create-latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Inner {
    decisions: BTreeMap<String, u64>,
    create_counts: [u64; BUCKETS.len()],
    create_sum: f64,
    create_total: u64,
    term: u64,
    last_log: u64,
    committed: Option<u64>,
    applied: u64,
    leader: bool,
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }

    /// One scheduler decision (`placed` or an unschedulable code).
    pub fn scheduled(&self, outcome: &str) {
        self.with(|m| *m.decisions.entry(outcome.to_owned()).or_default() += 1);
    }

    /// One committed create, end to end through the API.
    pub fn create_latency(&self, secs: f64) {
        self.with(|m| {
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    m.create_counts[i] += 1;
                }
            }
            m.create_sum += secs;
            m.create_total += 1;
        });
    }

    pub fn observe_raft(&self, raft: &RaftNode) {
        let s = raft.status();
        let applied = raft.applied_index().unwrap_or(0);
        self.with(|m| {
            m.term = s.term;
            m.last_log = s.last_log_index.unwrap_or(0);
            m.committed = s.committed_index;
            m.applied = applied;
            m.leader = s.role == kiln_store::RaftRole::Leader;
        });
    }

    /// The exposition text; `by_state` is (state label, count) of the
    /// sandboxes in this replica's applied state.
    pub fn render(&self, raft: &RaftNode, by_state: &BTreeMap<String, u64>) -> String {
        use std::fmt::Write;
        self.observe_raft(raft);
        self.with(|m| {
            let mut o = String::new();
            let _ = writeln!(o, "# HELP kiln_sandboxes Sandboxes by observed state (this replica's applied state).");
            let _ = writeln!(o, "# TYPE kiln_sandboxes gauge");
            for (k, v) in by_state {
                let _ = writeln!(o, "kiln_sandboxes{{state=\"{k}\"}} {v}");
            }
            let _ = writeln!(o, "# HELP kiln_create_seconds Sandbox creates through the API, until committed.");
            let _ = writeln!(o, "# TYPE kiln_create_seconds histogram");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(o, "kiln_create_seconds_bucket{{le=\"{b}\"}} {}", m.create_counts[i]);
            }
            let _ = writeln!(o, "kiln_create_seconds_bucket{{le=\"+Inf\"}} {}", m.create_total);
            let _ = writeln!(o, "kiln_create_seconds_sum {}", m.create_sum);
            let _ = writeln!(o, "kiln_create_seconds_count {}", m.create_total);
            let _ = writeln!(o, "# HELP kiln_scheduler_decisions_total Scheduler decisions by outcome.");
            let _ = writeln!(o, "# TYPE kiln_scheduler_decisions_total counter");
            for (k, v) in &m.decisions {
                let _ = writeln!(o, "kiln_scheduler_decisions_total{{outcome=\"{k}\"}} {v}");
            }
            let _ = writeln!(o, "# TYPE kiln_raft_term gauge\nkiln_raft_term {}", m.term);
            let _ = writeln!(o, "# TYPE kiln_raft_is_leader gauge\nkiln_raft_is_leader {}", u8::from(m.leader));
            let _ = writeln!(o, "# TYPE kiln_raft_last_log_index gauge\nkiln_raft_last_log_index {}", m.last_log);
            if let Some(c) = m.committed {
                let _ = writeln!(o, "# TYPE kiln_raft_commit_index gauge\nkiln_raft_commit_index {c}");
            }
            let _ = writeln!(o, "# TYPE kiln_raft_applied_index gauge\nkiln_raft_applied_index {}", m.applied);
            let _ = writeln!(
                o,
                "# HELP kiln_raft_apply_lag Log entries this replica holds but has not applied.\n# TYPE kiln_raft_apply_lag gauge\nkiln_raft_apply_lag {}",
                m.last_log.saturating_sub(m.applied)
            );
            o
        })
    }
}
