//! One test per rule of the scheduler, on hand-built views.

use std::collections::BTreeMap;

use kiln_api::cluster::{Capacity, DriverKind, NodeName, NodeStatus};
use kiln_api::sandbox::{
    DriverPreference, Origin, Resources, SandboxId, SandboxSpec, StartPreference,
};
use kiln_store::query::{ClusterView, NodeView};

use super::*;

pub(super) fn name(s: &str) -> NodeName {
    NodeName::new(s).expect("test node names are DNS labels")
}

pub(super) fn id(n: u64) -> SandboxId {
    SandboxId::from_random(n.to_be_bytes())
}

/// A ready, uncordoned QEMU/TCG node with nothing allocated.
pub(super) fn node(n: &str, cpus: u32, memory_mib: u64, disk_mib: u64) -> NodeView {
    NodeView {
        name: name(n),
        driver: DriverKind::QemuTcg,
        labels: BTreeMap::new(),
        capacity: Capacity {
            cpus,
            memory_mib,
            disk_mib,
        },
        allocated: Capacity::default(),
        schedulable: true,
        status: NodeStatus::Ready,
        images: vec![],
        templates: vec![],
        pools: vec![],
    }
}

pub(super) fn res(cpus: u32, memory_mib: u32, disk_mib: u32) -> Resources {
    Resources {
        cpus,
        memory_mib,
        disk_mib,
    }
}

pub(super) fn spec(image: &str, r: Resources) -> SandboxSpec {
    let mut s = SandboxSpec::for_image(image);
    s.resources = r;
    s
}

pub(super) fn pending(n: u64, s: SandboxSpec) -> Pending {
    Pending {
        id: id(n),
        generation: n + 100,
        spec: s,
        group: None,
    }
}

pub(super) fn view(nodes: Vec<NodeView>) -> ClusterView {
    ClusterView {
        nodes,
        pending: vec![],
    }
}

fn small(n: u64) -> Pending {
    pending(n, spec("alpine", res(1, 256, 1024)))
}

fn placed_on(d: &Decision) -> &str {
    match &d.outcome {
        Outcome::Placed { node, .. } => node.as_str(),
        Outcome::Unschedulable { reason } => panic!("not placed: {reason}"),
    }
}

fn reason(d: &Decision) -> &Unschedulable {
    match &d.outcome {
        Outcome::Unschedulable { reason } => reason,
        Outcome::Placed { node, .. } => panic!("placed on {node}"),
    }
}

#[test]
fn one_decision_per_pending_in_order_with_generation() {
    let v = view(vec![node("a", 4, 4096, 10_000)]);
    let p = vec![small(3), small(1), small(2)];
    let d = place(&v, &p, Policy::BinPack);
    assert_eq!(d.len(), 3);
    for (d, p) in d.iter().zip(&p) {
        assert_eq!(d.id, p.id);
        assert_eq!(d.generation, p.generation);
        assert_eq!(placed_on(d), "a");
    }
    assert!(place(&v, &[], Policy::Spread).is_empty());
}

#[test]
fn no_nodes() {
    let d = place(&view(vec![]), &[small(1)], Policy::BinPack);
    assert_eq!(reason(&d[0]), &Unschedulable::NoNodes);
    assert_eq!(reason(&d[0]).to_string(), "no nodes are registered");
}

#[test]
fn cordoned_and_unready_nodes_take_nothing() {
    let mut a = node("a", 8, 8192, 10_000);
    a.schedulable = false; // cordoned
    let mut b = node("b", 8, 8192, 10_000);
    b.schedulable = false;
    let d = place(
        &view(vec![a.clone(), b.clone()]),
        &[small(1)],
        Policy::BinPack,
    );
    assert_eq!(reason(&d[0]).to_string(), "all nodes cordoned");
    assert_eq!(reason(&d[0]).code(), "none_schedulable");

    b.status = NodeStatus::Unreachable;
    let mut c = node("c", 8, 8192, 10_000);
    c.status = NodeStatus::Draining;
    c.schedulable = false;
    let d = place(&view(vec![a.clone(), b, c]), &[small(1)], Policy::BinPack);
    assert_eq!(
        reason(&d[0]).to_string(),
        "no node takes new sandboxes (a: cordoned, b: unreachable, c: draining)"
    );

    // A schedulable node among them gets it, even if it is the smallest.
    let d = place(
        &view(vec![a, node("z", 1, 256, 1024)]),
        &[small(1)],
        Policy::Spread,
    );
    assert_eq!(placed_on(&d[0]), "z");
}

#[test]
fn a_node_marked_schedulable_but_not_ready_is_still_skipped() {
    let mut a = node("a", 8, 8192, 10_000);
    a.status = NodeStatus::Unreachable; // inconsistent view: defend anyway
    let d = place(&view(vec![a]), &[small(1)], Policy::BinPack);
    assert_eq!(reason(&d[0]).code(), "none_schedulable");
}

#[test]
fn fit_counts_allocation_and_earlier_decisions() {
    let mut a = node("a", 4, 4096, 10_000);
    a.allocated = Capacity {
        cpus: 2,
        memory_mib: 512,
        disk_mib: 0,
    };
    // 2 vCPUs free: two 1-vCPU sandboxes fit, the third does not.
    let d = place(
        &view(vec![a]),
        &[small(1), small(2), small(3)],
        Policy::BinPack,
    );
    assert_eq!(placed_on(&d[0]), "a");
    assert_eq!(placed_on(&d[1]), "a");
    assert_eq!(
        reason(&d[2]).to_string(),
        "no node has 1 vCPU free (largest free: 0 on node a)"
    );
}

#[test]
fn insufficient_names_the_resource_and_the_largest_free() {
    let v = view(vec![
        node("a", 1, 8192, 10_000),
        node("b", 2, 8192, 10_000),
        node("c", 2, 8192, 10_000),
    ]);
    let d = place(
        &v,
        &[pending(1, spec("x", res(4, 256, 100)))],
        Policy::BinPack,
    );
    assert_eq!(
        reason(&d[0]).to_string(),
        "no node has 4 vCPUs free (largest free: 2 on node b)"
    );
    let d = place(
        &v,
        &[pending(1, spec("x", res(1, 9000, 100)))],
        Policy::BinPack,
    );
    assert_eq!(
        reason(&d[0]).to_string(),
        "no node has 9000 MiB of memory free (largest free: 8192 MiB on node a)"
    );
    let d = place(
        &v,
        &[pending(1, spec("x", res(1, 256, 20_000)))],
        Policy::BinPack,
    );
    assert_eq!(
        reason(&d[0]).to_string(),
        "no node has 20000 MiB of disk free (largest free: 10000 MiB on node a)"
    );
    assert!(matches!(
        reason(&d[0]),
        Unschedulable::Insufficient {
            resource: Resource::Disk,
            requested: 20_000,
            largest_free: 10_000,
            ..
        }
    ));
}

#[test]
fn no_single_node_has_everything() {
    let v = view(vec![node("a", 4, 512, 10_000), node("b", 1, 8192, 10_000)]);
    let d = place(
        &v,
        &[pending(1, spec("x", res(2, 1024, 100)))],
        Policy::BinPack,
    );
    assert_eq!(
        reason(&d[0]).to_string(),
        "no node has 2 vCPUs, 1024 MiB of memory and 100 MiB of disk free at once \
         (a: short of memory, b: short of vCPUs)"
    );
    assert_eq!(reason(&d[0]).code(), "no_single_node_fits");
}

#[test]
fn capacity_shrunk_below_allocation_is_full_not_a_panic() {
    let mut a = node("a", 2, 1024, 1024);
    a.allocated = Capacity {
        cpus: 5,
        memory_mib: 4096,
        disk_mib: 9999,
    };
    let d = place(&view(vec![a]), &[small(1)], Policy::Spread);
    assert_eq!(reason(&d[0]).code(), "insufficient");
    // A sandbox needing nothing still fits anywhere schedulable.
    let mut a = node("a", 0, 0, 0);
    a.allocated.cpus = 3;
    let d = place(
        &view(vec![a]),
        &[pending(1, spec("x", res(0, 0, 0)))],
        Policy::BinPack,
    );
    assert_eq!(placed_on(&d[0]), "a");
}

#[test]
fn driver_preference() {
    let mut fc = node("fc", 4, 4096, 10_000);
    fc.driver = DriverKind::Firecracker;
    let mut kvm = node("kvm", 4, 4096, 10_000);
    kvm.driver = DriverKind::QemuKvm;
    let tcg = node("tcg", 4, 4096, 10_000);
    let v = view(vec![fc.clone(), kvm.clone(), tcg.clone()]);
    let with = |d: DriverPreference| {
        let mut s = spec("x", res(1, 256, 100));
        s.driver = d;
        pending(1, s)
    };
    let d = place(&v, &[with(DriverPreference::Firecracker)], Policy::BinPack);
    assert_eq!(placed_on(&d[0]), "fc");
    // QEMU: either QEMU node, never Firecracker, even though "fc" sorts first.
    let d = place(&v, &[with(DriverPreference::Qemu)], Policy::BinPack);
    assert_eq!(placed_on(&d[0]), "kvm");
    let d = place(
        &view(vec![fc.clone(), tcg]),
        &[with(DriverPreference::Qemu)],
        Policy::BinPack,
    );
    assert_eq!(placed_on(&d[0]), "tcg");
    let d = place(&v, &[with(DriverPreference::Auto)], Policy::BinPack);
    assert_eq!(placed_on(&d[0]), "fc");

    let d = place(
        &view(vec![kvm]),
        &[with(DriverPreference::Firecracker)],
        Policy::BinPack,
    );
    assert_eq!(
        reason(&d[0]).to_string(),
        "no schedulable node runs firecracker (kvm: qemu-kvm)"
    );
    let d = place(
        &view(vec![fc]),
        &[with(DriverPreference::Qemu)],
        Policy::BinPack,
    );
    assert_eq!(reason(&d[0]).code(), "no_driver");
}

#[test]
fn prefers_warm_pool_then_template_then_image_then_policy() {
    let r = res(1, 256, 1024);
    let mut pool = node("d-pool", 4, 4096, 10_000);
    pool.pools = vec![("alpine".into(), r, 1)];
    let mut tmpl = node("c-tmpl", 4, 4096, 10_000);
    tmpl.templates = vec![("alpine".into(), r)];
    let mut img = node("b-img", 4, 4096, 10_000);
    img.images = vec!["alpine".into()];
    let plain = node("a-plain", 4, 4096, 10_000);
    let v = view(vec![plain.clone(), img.clone(), tmpl.clone(), pool.clone()]);

    // The pool has one ready member: the first sandbox takes it, the
    // second goes to the template, both from one call.
    let d = place(&v, &[small(1), small(2)], Policy::Spread);
    assert_eq!(placed_on(&d[0]), "d-pool");
    assert!(matches!(
        d[0].outcome,
        Outcome::Placed {
            because: Because::WarmPool,
            ..
        }
    ));
    assert_eq!(placed_on(&d[1]), "c-tmpl");
    assert!(matches!(
        d[1].outcome,
        Outcome::Placed {
            because: Because::Template,
            ..
        }
    ));

    let d = place(
        &view(vec![plain.clone(), img.clone()]),
        &[small(1)],
        Policy::Spread,
    );
    assert_eq!(placed_on(&d[0]), "b-img");
    assert!(matches!(
        d[0].outcome,
        Outcome::Placed {
            because: Because::ImageCached,
            ..
        }
    ));

    // A pool of other resources, or with no ready member, does not count.
    let mut other = pool.clone();
    other.pools = vec![
        ("alpine".into(), res(2, 256, 1024), 3),
        ("alpine".into(), r, 0),
    ];
    let d = place(&view(vec![img.clone(), other]), &[small(1)], Policy::Spread);
    assert_eq!(placed_on(&d[0]), "b-img");

    // Cold starts and restores gain nothing from pools or templates.
    let mut cold = spec("alpine", r);
    cold.start = StartPreference::Cold;
    let mut restore = spec("alpine", r);
    restore.origin = Origin::Snapshot {
        snapshot: "s".into(),
    };
    let d = place(&v, &[pending(1, cold), pending(2, restore)], Policy::Spread);
    assert_eq!(placed_on(&d[0]), "b-img");
    assert_eq!(placed_on(&d[1]), "b-img");

    // A preferred node that does not fit is passed over.
    let mut full_pool = pool;
    full_pool.allocated.cpus = 4;
    let d = place(&view(vec![plain, full_pool]), &[small(1)], Policy::Spread);
    assert_eq!(placed_on(&d[0]), "a-plain");
    assert!(matches!(
        d[0].outcome,
        Outcome::Placed {
            because: Because::Policy,
            ..
        }
    ));
}

#[test]
fn bin_pack_fills_the_fullest_node_spread_the_emptiest() {
    let mut a = node("a", 8, 8192, 10_000);
    a.allocated = Capacity {
        cpus: 2,
        memory_mib: 2048,
        disk_mib: 2048,
    };
    let mut b = node("b", 8, 8192, 10_000);
    b.allocated = Capacity {
        cpus: 6,
        memory_mib: 6144,
        disk_mib: 6144,
    };
    let c = node("c", 8, 8192, 10_000);
    let v = view(vec![a, b, c]);
    let d = place(&v, &[small(1)], Policy::BinPack);
    assert_eq!(placed_on(&d[0]), "b");
    let d = place(&v, &[small(1)], Policy::Spread);
    assert_eq!(placed_on(&d[0]), "c");

    // Four sandboxes on two empty nodes: spread alternates, bin-pack
    // fills "x" first (ties by name).
    let v = view(vec![node("y", 4, 4096, 10_000), node("x", 4, 4096, 10_000)]);
    let p: Vec<Pending> = (0..4).map(small).collect();
    let d = place(&v, &p, Policy::Spread);
    let spread: Vec<&str> = d.iter().map(placed_on).collect();
    assert_eq!(spread, ["x", "y", "x", "y"]);
    let d = place(&v, &p, Policy::BinPack);
    assert!(d.iter().all(|d| placed_on(d) == "x"));
}

#[test]
fn ties_go_to_the_first_name_whatever_the_view_order() {
    let p = [small(1)];
    let v1 = view(vec![node("b", 4, 4096, 10_000), node("a", 4, 4096, 10_000)]);
    let v2 = view(vec![node("a", 4, 4096, 10_000), node("b", 4, 4096, 10_000)]);
    for policy in [Policy::BinPack, Policy::Spread] {
        assert_eq!(placed_on(&place(&v1, &p, policy)[0]), "a");
        assert_eq!(place(&v1, &p, policy), place(&v2, &p, policy));
    }
}

#[test]
fn a_group_lands_on_one_node_or_none() {
    let v = view(vec![node("a", 2, 4096, 10_000), node("b", 3, 4096, 10_000)]);
    let member = |n: u64, g: &str| Pending {
        group: Some(g.into()),
        ..small(n)
    };
    // Three 1-vCPU members: only b has 3 vCPUs. An ungrouped sandbox
    // between them is placed after the group (which sits at its first
    // member's position) and so goes to a.
    let p = vec![member(1, "g"), small(2), member(3, "g"), member(4, "g")];
    let d = place(&v, &p, Policy::BinPack);
    assert_eq!(placed_on(&d[0]), "b");
    assert_eq!(placed_on(&d[2]), "b");
    assert_eq!(placed_on(&d[3]), "b");
    assert_eq!(placed_on(&d[1]), "a");

    // Four members need 4 vCPUs together: none is placed, each is told why.
    let p: Vec<Pending> = (1..=4).map(|n| member(n, "big")).collect();
    let d = place(&v, &p, Policy::BinPack);
    for d in &d {
        assert_eq!(
            reason(d).to_string(),
            "group big (4 sandboxes, placed together on one node): \
             no node has 4 vCPUs free (largest free: 3 on node b)"
        );
    }
}

#[test]
fn a_group_must_agree_on_a_driver() {
    let mut fc = node("fc", 8, 8192, 10_000);
    fc.driver = DriverKind::Firecracker;
    let v = view(vec![fc, node("q", 8, 8192, 10_000)]);
    let mut a = spec("x", res(1, 256, 100));
    a.driver = DriverPreference::Firecracker;
    let mut b = a.clone();
    b.driver = DriverPreference::Qemu;
    let c = spec("x", res(1, 256, 100)); // auto: goes where the others go
    let mk = |n, s| Pending {
        group: Some("g".into()),
        ..pending(n, s)
    };
    let d = place(&v, &[mk(1, a.clone()), mk(2, c.clone())], Policy::Spread);
    assert_eq!(placed_on(&d[0]), "fc");
    assert_eq!(placed_on(&d[1]), "fc");
    let d = place(&v, &[mk(1, a), mk(2, c), mk(3, b)], Policy::Spread);
    assert_eq!(
        reason(&d[0]).to_string(),
        "group g (3 sandboxes, placed together on one node): \
         its sandboxes ask for firecracker and qemu: no node runs both"
    );
}

#[test]
fn from_view_keeps_order_and_generations() {
    let mut v = view(vec![node("a", 1, 256, 1024)]);
    v.pending = vec![
        (id(2), 7, spec("x", res(1, 256, 1024))),
        (id(1), 9, spec("y", res(1, 256, 1024))),
    ];
    let p = Pending::from_view(&v);
    assert_eq!(p.len(), 2);
    assert_eq!((p[0].id.clone(), p[0].generation), (id(2), 7));
    assert_eq!(p[1].spec.image, "y");
    let d = place(&v, &p, Policy::BinPack);
    assert_eq!(placed_on(&d[0]), "a");
    assert_eq!(reason(&d[1]).code(), "insufficient");
}

#[test]
fn decisions_serialize_with_a_code() {
    let d = place(&view(vec![]), &[small(1)], Policy::BinPack);
    let j = serde_json::to_value(&d[0]).expect("serializable");
    assert_eq!(j["outcome"], "unschedulable");
    assert_eq!(j["reason"]["code"], "no_nodes");
    let d = place(
        &view(vec![node("a", 1, 256, 1024)]),
        &[small(1)],
        Policy::BinPack,
    );
    let j = serde_json::to_value(&d[0]).expect("serializable");
    assert_eq!(j["outcome"], "placed");
    assert_eq!(j["node"], "a");
    assert_eq!(j["because"], "policy");
}
