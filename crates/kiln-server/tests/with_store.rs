//! The scheduler against kiln-store's real state machine (`apply`, stepped
//! without Raft): the view comes from `query::cluster_view`, every
//! decision becomes a `place_sandbox` command, and `apply`, which checks
//! capacity and cordons on its own, accepts all of them. A decision made
//! on a stale view is refused by `apply` and placed elsewhere on the next
//! round.

use std::collections::{BTreeMap, BTreeSet};

use kiln_api::cluster::{Capacity, DriverKind, NodeName, Quotas, TenantName};
use kiln_api::sandbox::{Resources, SandboxId, SandboxSpec};
use kiln_server::scheduler::{Because, Outcome, Pending, Policy, place};
use kiln_store::query::cluster_view;
use kiln_store::{ApplyMeta, Command, Rejection, Response, State, apply};

struct Sm {
    st: State,
    index: u64,
}

impl Sm {
    fn step(&mut self, c: Command) -> Response {
        self.index += 1;
        let meta = ApplyMeta {
            index: self.index,
            term: 1,
        };
        apply(&mut self.st, &c, meta)
    }
    fn ok(&mut self, c: Command) {
        let r = self.step(c.clone());
        assert!(!r.is_rejected(), "{c:?} was rejected: {r:?}");
    }
}

fn n(s: &str) -> NodeName {
    NodeName::new(s).expect("node name")
}

fn register(name: &str, cpus: u32, images: &[&str]) -> Command {
    Command::RegisterNode {
        name: n(name),
        address: format!("{name}:7000"),
        capacity: Capacity {
            cpus,
            memory_mib: 8192,
            disk_mib: 100_000,
        },
        driver: DriverKind::QemuTcg,
        labels: BTreeMap::new(),
        images: images
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        now_ms: 1000,
    }
}

fn sandbox(i: u64, image: &str, cpus: u32) -> Command {
    let mut spec = SandboxSpec::for_image(image);
    spec.resources = Resources {
        cpus,
        memory_mib: 256,
        disk_mib: 1024,
    };
    Command::CreateSandbox {
        id: SandboxId::from_random(i.to_be_bytes()),
        tenant: TenantName::new("acme").expect("tenant name"),
        spec,
        idempotency_key: None,
        node: None,
        now_ms: 2000,
    }
}

fn cluster() -> Sm {
    let mut sm = Sm {
        st: State::default(),
        index: 0,
    };
    sm.ok(Command::CreateTenant {
        name: TenantName::new("acme").expect("tenant name"),
        quotas: Quotas {
            sandboxes: 1000,
            cpus: 1000,
            memory_mib: 1 << 30,
        },
        now_ms: 1,
    });
    sm.ok(register("a", 4, &[]));
    sm.ok(register("b", 4, &["python"]));
    sm.ok(register("c", 16, &[]));
    sm.ok(Command::CordonNode {
        name: n("c"),
        cordoned: true,
    });
    sm
}

/// One scheduling round as the leader runs it: view, place, propose.
fn round(sm: &mut Sm, policy: Policy) -> Vec<kiln_server::Decision> {
    let view = cluster_view(&sm.st);
    let decisions = place(&view, &Pending::from_view(&view), policy);
    for d in &decisions {
        if let Some(node) = d.node() {
            sm.ok(Command::PlaceSandbox {
                id: d.id.clone(),
                node: node.clone(),
                expected_generation: d.generation,
            });
        }
    }
    decisions
}

#[test]
fn apply_accepts_every_decision_and_the_rest_stay_pending() {
    let mut sm = cluster();
    // 10 one-vCPU sandboxes, two of them for the image b has cached.
    for i in 0..10 {
        let image = if i % 5 == 0 { "python" } else { "alpine" };
        sm.ok(sandbox(i, image, 1));
    }
    let d = round(&mut sm, Policy::Spread);
    assert_eq!(d.len(), 10);
    // a and b have 4 vCPUs each; c is cordoned: 8 placed, 2 left.
    let placed: Vec<_> = d.iter().filter_map(|d| d.node()).collect();
    assert_eq!(placed.len(), 8);
    assert!(placed.iter().all(|n| n.as_str() != "c"));
    for d in &d {
        match &d.outcome {
            Outcome::Placed { node, because } if *because == Because::ImageCached => {
                assert_eq!(node.as_str(), "b")
            }
            Outcome::Placed { .. } => {}
            Outcome::Unschedulable { reason } => assert_eq!(
                reason.to_string(),
                "no node has 1 vCPU free (largest free: 0 on node a)"
            ),
        }
    }
    let view = cluster_view(&sm.st);
    assert_eq!(view.pending.len(), 2);
    for node in &view.nodes {
        assert!(node.allocated.cpus <= node.capacity.cpus);
    }

    // Uncordoning c lets the next round place the rest there.
    sm.ok(Command::CordonNode {
        name: n("c"),
        cordoned: false,
    });
    let d = round(&mut sm, Policy::Spread);
    assert_eq!(d.len(), 2);
    assert!(
        d.iter()
            .all(|d| d.node().map(NodeName::as_str) == Some("c"))
    );
    assert!(cluster_view(&sm.st).pending.is_empty());
}

#[test]
fn a_decision_on_a_stale_view_is_refused_and_placed_again() {
    let mut sm = cluster();
    sm.ok(sandbox(1, "alpine", 4));
    let stale = cluster_view(&sm.st);
    let d = place(&stale, &Pending::from_view(&stale), Policy::BinPack);
    assert_eq!(d[0].node().map(NodeName::as_str), Some("a"));

    // Meanwhile another sandbox is created directly on a and fills it.
    let mut other = sandbox(2, "alpine", 4);
    if let Command::CreateSandbox { node, .. } = &mut other {
        *node = Some(n("a"));
    }
    sm.ok(other);

    let r = sm.step(Command::PlaceSandbox {
        id: d[0].id.clone(),
        node: n("a"),
        expected_generation: d[0].generation,
    });
    assert!(
        matches!(r, Response::Rejected(Rejection::Conflict { .. })),
        "{r:?}"
    );
    let d = round(&mut sm, Policy::BinPack);
    assert_eq!(d[0].node().map(NodeName::as_str), Some("b"));
}
