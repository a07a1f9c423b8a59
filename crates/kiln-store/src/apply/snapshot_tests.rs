//! Snapshots stepped directly: holders, and deletion refused while
//! restored sandboxes use a snapshot.

use kiln_api::cluster::{Capacity, DesiredState, DriverKind, NodeName, Quotas, TenantName};
use kiln_api::sandbox::{Origin, SandboxId, SandboxSpec, SandboxState};

use super::apply;
use crate::command::{ApplyMeta, Command, Rejection, Response};
use crate::state::{State, scoped};

struct Sm {
    st: State,
    index: u64,
}

impl Sm {
    fn step(&mut self, c: Command) -> Response {
        self.index += 1;
        apply(
            &mut self.st,
            &c,
            ApplyMeta {
                index: self.index,
                term: 1,
            },
        )
    }
    fn ok(&mut self, c: Command) {
        let r = self.step(c.clone());
        assert!(!r.is_rejected(), "{c:?} was rejected: {r:?}");
    }
    fn rejected(&mut self, c: Command) -> Rejection {
        let before = self.st.clone();
        match self.step(c) {
            Response::Rejected(r) => {
                assert_eq!(self.st, before, "a rejected command changed the state");
                r
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
}

fn t(s: &str) -> TenantName {
    TenantName::new(s).expect("tenant name")
}
fn n(s: &str) -> NodeName {
    NodeName::new(s).expect("node name")
}
fn sid(i: u64) -> SandboxId {
    SandboxId::from_random(i.to_be_bytes())
}

fn create(id: u64, tenant: &str, origin: Origin) -> Command {
    let mut spec = SandboxSpec::for_image("busybox");
    spec.origin = origin;
    Command::CreateSandbox {
        id: sid(id),
        tenant: t(tenant),
        spec,
        idempotency_key: None,
        node: Some(n("n1")),
        now_ms: 10,
    }
}

fn setup() -> Sm {
    let mut sm = Sm {
        st: State::default(),
        index: 0,
    };
    for name in ["a", "b"] {
        sm.ok(Command::CreateTenant {
            name: t(name),
            quotas: Quotas::default(),
            now_ms: 1,
        });
    }
    sm.ok(Command::RegisterNode {
        name: n("n1"),
        address: "n1:7000".into(),
        capacity: Capacity {
            cpus: 64,
            memory_mib: 65536,
            disk_mib: 100_000,
        },
        driver: DriverKind::QemuTcg,
        labels: Default::default(),
        images: Default::default(),
        now_ms: 1,
    });
    sm.ok(create(1, "a", Origin::Image));
    sm.ok(Command::PutSnapshot {
        tenant: t("a"),
        name: "s1".into(),
        source: sid(1),
        now_ms: 20,
        ephemeral: false,
    });
    sm
}

#[test]
fn a_snapshot_records_its_holders() {
    let mut sm = setup();
    sm.ok(Command::ReportSnapshot {
        node: n("n1"),
        tenant: t("a"),
        name: "s1".into(),
        held: true,
        size_bytes: 4096,
    });
    let rec = &sm.st.snapshots[&scoped(Some(&t("a")), "s1")];
    assert_eq!(rec.holders[&n("n1")].size_bytes, 4096);
    assert_eq!(rec.source, Some(sid(1)));
    // Another tenant's name space is separate: b cannot report a's.
    assert!(matches!(
        sm.rejected(Command::ReportSnapshot {
            node: n("n1"),
            tenant: t("b"),
            name: "s1".into(),
            held: true,
            size_bytes: 1,
        }),
        Rejection::NotFound { .. }
    ));
    sm.ok(Command::ReportSnapshot {
        node: n("n1"),
        tenant: t("a"),
        name: "s1".into(),
        held: false,
        size_bytes: 0,
    });
    assert!(
        sm.st.snapshots[&scoped(Some(&t("a")), "s1")]
            .holders
            .is_empty()
    );
}

#[test]
fn deleting_a_snapshot_is_refused_while_restored_sandboxes_use_it() {
    let mut sm = setup();
    let restore = || Origin::Snapshot {
        snapshot: "s1".into(),
    };
    sm.ok(create(2, "a", restore()));
    // Tenant b cannot restore a's `s1`: to b it does not exist.
    assert!(matches!(
        sm.rejected(create(3, "b", restore())),
        Rejection::NotFound { .. }
    ));
    let del = Command::DeleteSnapshot {
        tenant: t("a"),
        name: "s1".into(),
    };
    match sm.rejected(del.clone()) {
        Rejection::Conflict { message } => assert!(message.contains(sid(2).as_str()), "{message}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A finished user no longer holds it.
    sm.ok(Command::ReportSandbox {
        node: n("n1"),
        id: sid(2),
        generation: 1,
        state: SandboxState::Exited {
            exit_code: 0,
            signal: None,
            finished_at: 1,
            timed_out: false,
        },
        now_ms: 30,
        start: None,
    });
    sm.ok(create(4, "a", restore()));
    assert!(matches!(
        sm.rejected(del.clone()),
        Rejection::Conflict { .. }
    ));
    // A deleted one neither.
    sm.ok(Command::SetDesired {
        tenant: Some(t("a")),
        id: sid(4),
        desired: DesiredState::Deleted,
        stop_grace_secs: None,
    });
    sm.ok(del.clone());
    assert!(sm.st.snapshots.is_empty());
    assert!(matches!(sm.rejected(del), Rejection::NotFound { .. }));
}

#[test]
fn a_fork_snapshot_is_forgotten_with_its_last_sandbox() {
    let mut sm = setup();
    sm.ok(Command::PutSnapshot {
        tenant: t("a"),
        name: "fork-1".into(),
        source: sid(1),
        now_ms: 30,
        ephemeral: true,
    });
    let fork = || Origin::Snapshot {
        snapshot: "fork-1".into(),
    };
    sm.ok(create(5, "a", fork()));
    sm.ok(create(6, "a", fork()));
    // A restore of the named snapshot is not a user of the fork's.
    sm.ok(create(
        7,
        "a",
        Origin::Snapshot {
            snapshot: "s1".into(),
        },
    ));
    let key = scoped(Some(&t("a")), "fork-1");
    for (i, id) in [5u64, 6].into_iter().enumerate() {
        sm.ok(Command::SetDesired {
            tenant: Some(t("a")),
            id: sid(id),
            desired: DesiredState::Deleted,
            stop_grace_secs: None,
        });
        sm.ok(Command::ReportSandbox {
            node: n("n1"),
            id: sid(id),
            generation: 2,
            state: SandboxState::Exited {
                exit_code: 137,
                signal: Some(9),
                finished_at: 1,
                timed_out: false,
            },
            now_ms: 40,
            start: None,
        });
        sm.ok(Command::ForgetSandbox { id: sid(id) });
        assert_eq!(
            sm.st.snapshots.contains_key(&key),
            i == 0,
            "after forgetting {id}"
        );
    }
    // A named snapshot stays when its last restore is forgotten.
    sm.ok(Command::SetDesired {
        tenant: Some(t("a")),
        id: sid(7),
        desired: DesiredState::Deleted,
        stop_grace_secs: None,
    });
    sm.ok(Command::ReportSandbox {
        node: n("n1"),
        id: sid(7),
        generation: 2,
        state: SandboxState::Exited {
            exit_code: 137,
            signal: Some(9),
            finished_at: 1,
            timed_out: false,
        },
        now_ms: 40,
        start: None,
    });
    sm.ok(Command::ForgetSandbox { id: sid(7) });
    assert!(sm.st.snapshots.contains_key(&scoped(Some(&t("a")), "s1")));
}
