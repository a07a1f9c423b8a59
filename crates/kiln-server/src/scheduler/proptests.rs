//! Property tests: the scheduler's invariants on random clusters, checked
//! against an independent replay of its decisions.

// [cpus, memory, disk] arrays side by side read best by index.
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeMap;

use kiln_api::cluster::{Capacity, DriverKind, NodeStatus};
use kiln_api::sandbox::{DriverPreference, Origin, Resources, SandboxSpec, StartPreference};
use kiln_store::query::{ClusterView, NodeView};
use proptest::prelude::*;

use super::tests::{id, name, node, res, spec, view};
use super::*;

const IMAGES: [&str; 3] = ["alpine", "debian", "python"];

fn resources() -> impl Strategy<Value = Resources> {
    prop_oneof![
        Just(res(1, 256, 1024)),
        Just(res(2, 512, 2048)),
        Just(res(4, 1024, 1024)),
        Just(res(0, 0, 0)),
        (0u32..8, 0u32..4096, 0u32..4096).prop_map(|(c, m, d)| res(c, m, d)),
    ]
}

fn image() -> impl Strategy<Value = String> {
    prop::sample::select(&IMAGES[..]).prop_map(String::from)
}

fn driver_kind() -> impl Strategy<Value = DriverKind> {
    prop::sample::select(
        &[
            DriverKind::Firecracker,
            DriverKind::QemuKvm,
            DriverKind::QemuTcg,
        ][..],
    )
}

fn node_view(i: usize) -> impl Strategy<Value = NodeView> {
    (
        (
            prop::char::range('a', 'e'),
            driver_kind(),
            0u32..16,
            0u64..16_384,
            0u64..20_000,
        ),
        (0u32..18, 0u64..18_000, 0u64..22_000),
        (
            prop::bool::weighted(0.8),
            prop::sample::select(
                &[
                    NodeStatus::Ready,
                    NodeStatus::Ready,
                    NodeStatus::Ready,
                    NodeStatus::Unreachable,
                    NodeStatus::Draining,
                ][..],
            ),
        ),
        prop::collection::vec(image(), 0..3),
        prop::collection::vec((image(), resources()), 0..3),
        prop::collection::vec((image(), resources(), 0u32..3), 0..3),
    )
        .prop_map(
            move |(
                (c, driver, cpus, mem, disk),
                (ac, am, ad),
                (sched, status),
                images,
                templates,
                pools,
            )| {
                // Unique names in an order unrelated to the index.
                let mut n = node(&format!("{c}{i}"), cpus, mem, disk);
                n.driver = driver;
                n.allocated = Capacity {
                    cpus: ac.min(cpus + 2),
                    memory_mib: am.min(mem + 1024),
                    disk_mib: ad.min(disk + 1024),
                };
                // As `cluster_view` computes it.
                n.schedulable = sched && status == NodeStatus::Ready;
                n.status = status;
                n.images = images;
                n.templates = templates;
                n.pools = pools;
                n
            },
        )
}

fn nodes() -> impl Strategy<Value = Vec<NodeView>> {
    (0usize..7).prop_flat_map(|n| (0..n).map(node_view).collect::<Vec<_>>())
}

fn sandbox_spec() -> impl Strategy<Value = SandboxSpec> {
    (
        image(),
        resources(),
        prop::sample::select(
            &[
                DriverPreference::Auto,
                DriverPreference::Auto,
                DriverPreference::Qemu,
                DriverPreference::Firecracker,
            ][..],
        ),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(img, r, driver, warm, from_image)| {
            let mut s = spec(&img, r);
            s.driver = driver;
            s.start = if warm {
                StartPreference::Warm
            } else {
                StartPreference::Cold
            };
            if !from_image {
                s.origin = Origin::Snapshot {
                    snapshot: "snap".into(),
                };
            }
            s
        })
}

fn pendings(groups: bool) -> impl Strategy<Value = Vec<Pending>> {
    let group = if groups {
        prop::sample::select(&[None, None, Some("g1"), Some("g2")][..]).boxed()
    } else {
        Just(None).boxed()
    };
    prop::collection::vec((sandbox_spec(), group), 0..24).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (spec, g))| Pending {
                id: id(i as u64),
                generation: i as u64 * 3,
                spec,
                group: g.map(String::from),
            })
            .collect()
    })
}

fn cap(n: &NodeView) -> [u64; 3] {
    [
        u64::from(n.capacity.cpus),
        n.capacity.memory_mib,
        n.capacity.disk_mib,
    ]
}

fn used0(n: &NodeView) -> [u64; 3] {
    [
        u64::from(n.allocated.cpus),
        n.allocated.memory_mib,
        n.allocated.disk_mib,
    ]
}

fn want(r: &Resources) -> [u64; 3] {
    [
        u64::from(r.cpus),
        u64::from(r.memory_mib),
        u64::from(r.disk_mib),
    ]
}

fn can_take(n: &NodeView) -> bool {
    n.schedulable && n.status == NodeStatus::Ready
}

fn driver_ok(p: DriverPreference, d: DriverKind) -> bool {
    match p {
        DriverPreference::Auto => true,
        DriverPreference::Firecracker => d == DriverKind::Firecracker,
        DriverPreference::Qemu => d != DriverKind::Firecracker,
    }
}

/// The independent oracle's view of the tier of `n` for `s`.
fn tier(n: &NodeView, pool_left: &[u32], s: &SandboxSpec) -> Because {
    let warm = s.start == StartPreference::Warm && s.origin == Origin::Image;
    let pool = n
        .pools
        .iter()
        .zip(pool_left)
        .any(|((i, r, _), left)| *left > 0 && *i == s.image && *r == s.resources);
    if warm && pool {
        Because::WarmPool
    } else if warm
        && n.templates
            .iter()
            .any(|(i, r)| *i == s.image && *r == s.resources)
    {
        Because::Template
    } else if n.images.contains(&s.image) {
        Because::ImageCached
    } else {
        Because::Policy
    }
}

/// Mean allocated fraction after adding `w`, as a float (the scheduler
/// uses integer millionths; the two agree within 1e-5).
fn fullness(c: [u64; 3], u: [u64; 3], w: [u64; 3]) -> f64 {
    (0..3)
        .map(|i| {
            if c[i] == 0 {
                1.0
            } else {
                ((u[i] + w[i]) as f64 / c[i] as f64).min(1.0)
            }
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// With groups: one decision each, in order; never over capacity;
    /// never a cordoned or unready node; drivers respected; a group on one
    /// node or none; deterministic and independent of the view's order.
    #[test]
    fn invariants_hold(nodes in nodes(), pending in pendings(true), spread in any::<bool>()) {
        let policy = if spread { Policy::Spread } else { Policy::BinPack };
        let v = view(nodes);
        let d = place(&v, &pending, policy);

        prop_assert_eq!(d.len(), pending.len());
        let by_name: BTreeMap<&str, &NodeView> = v.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut taken: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
        let mut group_node: BTreeMap<&str, Option<&str>> = BTreeMap::new();
        for (d, p) in d.iter().zip(&pending) {
            prop_assert_eq!(&d.id, &p.id);
            prop_assert_eq!(d.generation, p.generation);
            let on = d.node().map(|n| n.as_str());
            if let Some(on) = on {
                let n = by_name.get(on).copied();
                prop_assert!(n.is_some(), "placed on unknown node {}", on);
                let n = n.expect("checked");
                prop_assert!(can_take(n), "placed on {} which takes nothing", on);
                prop_assert!(driver_ok(p.spec.driver, n.driver));
                let t = taken.entry(on).or_default();
                for (t, w) in t.iter_mut().zip(want(&p.spec.resources)) {
                    *t += w;
                }
            }
            if let Some(g) = &p.group {
                let first = *group_node.entry(g.as_str()).or_insert(on);
                prop_assert_eq!(first, on, "group {} split", g);
            }
        }
        for (on, t) in &taken {
            let n = by_name[on];
            for i in 0..3 {
                prop_assert!(
                    t[i] <= cap(n)[i].saturating_sub(used0(n)[i]),
                    "node {} over capacity on resource {}", on, i
                );
            }
        }

        prop_assert_eq!(&place(&v, &pending, policy), &d);
        let mut rev = v.clone();
        rev.nodes.reverse();
        prop_assert_eq!(&place(&rev, &pending, policy), &d);
    }

    /// Without groups, a replay that knows nothing of the scheduler's
    /// internals agrees with every decision: unschedulable exactly when no
    /// node fits; placed on a node that fits, of the best preference tier
    /// among those that fit, and the fullest (bin-pack) or emptiest
    /// (spread) of that tier; the reported reason is that tier.
    #[test]
    fn decisions_match_a_replay(nodes in nodes(), pending in pendings(false), spread in any::<bool>()) {
        let policy = if spread { Policy::Spread } else { Policy::BinPack };
        let v = view(nodes);
        let d = place(&v, &pending, policy);
        let mut used: Vec<[u64; 3]> = v.nodes.iter().map(used0).collect();
        let mut left: Vec<Vec<u32>> = v.nodes.iter().map(|n| n.pools.iter().map(|p| p.2).collect()).collect();

        for (d, p) in d.iter().zip(&pending) {
            let w = want(&p.spec.resources);
            let fits: Vec<usize> = (0..v.nodes.len())
                .filter(|&k| {
                    let n = &v.nodes[k];
                    can_take(n)
                        && driver_ok(p.spec.driver, n.driver)
                        && (0..3).all(|i| cap(n)[i].saturating_sub(used[k][i]) >= w[i])
                })
                .collect();
            match &d.outcome {
                Outcome::Unschedulable { reason } => {
                    prop_assert!(fits.is_empty(), "unschedulable ({}) but {} nodes fit", reason, fits.len());
                }
                Outcome::Placed { node, because } => {
                    let k = v.nodes.iter().position(|n| n.name == *node).expect("placed on a known node");
                    prop_assert!(fits.contains(&k));
                    let best = fits.iter().map(|&j| tier(&v.nodes[j], &left[j], &p.spec)).min().expect("fits is not empty");
                    let mine = tier(&v.nodes[k], &left[k], &p.spec);
                    prop_assert_eq!(mine, best, "a fitting node has a better preference");
                    prop_assert_eq!(*because, mine);
                    let f = fullness(cap(&v.nodes[k]), used[k], w);
                    for &j in &fits {
                        if tier(&v.nodes[j], &left[j], &p.spec) != best {
                            continue;
                        }
                        let g = fullness(cap(&v.nodes[j]), used[j], w);
                        match policy {
                            Policy::BinPack => prop_assert!(f >= g - 1e-5, "bin-pack chose {} over a fuller node", node),
                            Policy::Spread => prop_assert!(f <= g + 1e-5, "spread chose {} over an emptier node", node),
                        }
                    }
                    if *because == Because::WarmPool {
                        let s = &p.spec;
                        let slot = v.nodes[k].pools.iter().zip(&left[k])
                            .position(|((i, r, _), l)| *l > 0 && *i == s.image && *r == s.resources)
                            .expect("tier says a pool member is left");
                        left[k][slot] -= 1;
                    }
                    for i in 0..3 {
                        used[k][i] += w[i];
                    }
                }
            }
        }
    }

    /// A node with a warm pool, template or cached image that fits wins
    /// over any number of plain nodes, under either policy.
    #[test]
    fn a_fitting_preferred_node_wins(
        plain in 1usize..5,
        which in 0usize..3,
        at in 0usize..5,
        spread in any::<bool>(),
    ) {
        let r = res(1, 256, 1024);
        let mut nodes: Vec<NodeView> = (0..plain).map(|i| node(&format!("n{i}"), 16, 16_384, 20_000)).collect();
        let mut pref = node("m", 2, 1024, 2048);
        pref.allocated = Capacity { cpus: 1, memory_mib: 256, disk_mib: 0 };
        let want = match which {
            0 => { pref.pools = vec![("alpine".into(), r, 1)]; Because::WarmPool }
            1 => { pref.templates = vec![("alpine".into(), r)]; Because::Template }
            _ => { pref.images = vec!["alpine".into()]; Because::ImageCached }
        };
        nodes.insert(at.min(nodes.len()), pref);
        let policy = if spread { Policy::Spread } else { Policy::BinPack };
        let d = place(&view(nodes), &[Pending { id: id(1), generation: 1, spec: spec("alpine", r), group: None }], policy);
        prop_assert_eq!(&d[0].outcome, &Outcome::Placed { node: name("m"), because: want });
    }

    /// N equal sandboxes on M equal empty nodes that hold K each: spread
    /// evens them out (counts differ by at most one), bin-pack fills
    /// nodes in name order; whatever does not fit is unschedulable.
    #[test]
    fn spread_evens_out_bin_pack_fills(m in 1usize..6, k in 1u32..5, n in 0usize..30) {
        let v = ClusterView {
            nodes: (0..m).map(|i| node(&format!("n{i}"), 2 * k, 512 * u64::from(k), 1024 * u64::from(k))).collect(),
            pending: vec![],
        };
        let p: Vec<Pending> = (0..n as u64).map(|i| Pending { id: id(i), generation: 0, spec: spec("x", res(2, 512, 1024)), group: None }).collect();
        let room = m * k as usize;
        for policy in [Policy::Spread, Policy::BinPack] {
            let d = place(&v, &p, policy);
            let mut count = vec![0usize; m];
            for (i, d) in d.iter().enumerate() {
                match d.node() {
                    Some(nm) => {
                        prop_assert!(i < room, "sandbox {} placed beyond the room", i);
                        count[nm.as_str()[1..].parse::<usize>().expect("n<i>")] += 1;
                    }
                    None => prop_assert!(i >= room, "sandbox {} not placed with room left", i),
                }
            }
            let placed = n.min(room);
            match policy {
                Policy::Spread => {
                    let (lo, hi) = (count.iter().min().copied(), count.iter().max().copied());
                    prop_assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "uneven spread {:?}", count);
                }
                Policy::BinPack => {
                    let expect: Vec<usize> = (0..m).map(|i| placed.saturating_sub(i * k as usize).min(k as usize)).collect();
                    prop_assert_eq!(count, expect);
                }
            }
        }
    }
}
