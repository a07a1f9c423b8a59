//! The scheduler: which node each pending sandbox goes to, as a pure
//! function of the cluster.
//!
//! [`place`]`(&ClusterView, &[Pending], Policy) -> Vec<Decision>` does no
//! I/O, reads no clock and draws no random number: the same input gives
//! the same decisions, on any server. The leader calls it on
//! `kiln_store::query::cluster_view` and proposes one `place_sandbox`
//! (with the decision's `generation` as `expected_generation`) per placed
//! sandbox; `apply` checks capacity again, so a decision made on a stale
//! view is refused with `Conflict` and the sandbox is simply placed again
//! on the next round.
//!
//! Invariants (each one a property test in `scheduler/proptests.rs`):
//! - Every pending sandbox gets exactly one [`Decision`], in input order.
//! - A node receives only what fits: its capacity minus what is allocated
//!   on it minus what earlier decisions of the same call gave it, on CPU,
//!   memory and disk alike.
//! - Only schedulable nodes (ready and not cordoned) receive sandboxes.
//! - A sandbox asking for `firecracker` goes only to a Firecracker node, one
//!   asking for `qemu` only to a QEMU node (KVM or TCG), `auto` anywhere.
//! - Among the nodes that fit, the first that holds, in this order: a warm
//!   pool of the same image and resources with ready members not already
//!   handed out in this call; a ready template of the same image and
//!   resources; the image cached. Pools and templates count only for a
//!   sandbox started from its image with `start: warm`; the image cache
//!   counts for every sandbox. Within one of these tiers, the [`Policy`]
//!   decides; remaining ties go to the node whose name sorts first.
//! - A group (sandboxes sharing [`Pending::group`]) lands on one node or
//!   not at all: its members are placed together, at the position of the
//!   first member, as one demand (the sum of their resources) that must
//!   satisfy every member's driver preference; a node's preference tier
//!   for the group is the best it offers any member.
//! - A sandbox that cannot be placed gets an [`Unschedulable`] reason that
//!   names the limit a user can act on ("no node has 4 vCPUs free (largest
//!   free: 2 on node b)", "all nodes cordoned"), and a stable machine code
//!   ([`Unschedulable::code`]).
//!
//! Cost: O(pending × nodes); 10,000 pending sandboxes on 200 nodes take
//! 55 ms in a release build.
//!
//! Pending sandboxes are placed in the order given (`cluster_view` gives
//! them in ID order). Node label selectors are not here because
//! `SandboxSpec` has no selector field yet; when it gets one, it is one
//! more filter beside the driver filter in `candidates`. Snapshot
//! restores are placed like any sandbox; once snapshot copies are part of
//! the view, "holds a copy of the snapshot" becomes the first tier for
//! them.

use std::collections::BTreeMap;
use std::fmt;

use kiln_api::cluster::{DriverKind, NodeName, NodeStatus};
use kiln_api::sandbox::{
    DriverPreference, Origin, Resources, SandboxId, SandboxSpec, StartPreference,
};
use kiln_store::query::{ClusterView, NodeView};
use serde::{Deserialize, Serialize};

/// One sandbox waiting for a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub id: SandboxId,
    /// The sandbox's generation when the view was taken: the
    /// `expected_generation` of the `place_sandbox` that follows.
    pub generation: u64,
    pub spec: SandboxSpec,
    /// The (scoped) name of the group it must share a node with, if any.
    pub group: Option<String>,
}

impl Pending {
    /// The pending sandboxes of a view, in its order.
    ///
    /// `ClusterView` does not carry sandbox groups yet (nothing creates
    /// them), so these have no group; when groups arrive, the view carries
    /// the group and this fills it in.
    pub fn from_view(view: &ClusterView) -> Vec<Pending> {
        view.pending
            .iter()
            .map(|(id, generation, spec)| Pending {
                id: id.clone(),
                generation: *generation,
                spec: spec.clone(),
                group: None,
            })
            .collect()
    }
}

/// How to choose among nodes that fit equally well.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The node that is most allocated after placing: fills nodes one by
    /// one and keeps others empty (for scale-down, big sandboxes).
    #[default]
    BinPack,
    /// The node that is least allocated after placing: spreads load and
    /// the blast radius of a lost node.
    Spread,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::BinPack => "bin-pack",
            Policy::Spread => "spread",
        })
    }
}

/// What happened to one pending sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: SandboxId,
    pub generation: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Placed { node: NodeName, because: Because },
    Unschedulable { reason: Unschedulable },
}

impl Decision {
    /// The node it was placed on, if it was.
    pub fn node(&self) -> Option<&NodeName> {
        match &self.outcome {
            Outcome::Placed { node, .. } => Some(node),
            Outcome::Unschedulable { .. } => None,
        }
    }
}

/// Why a sandbox went to the node it went to (best first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Because {
    /// The node has a warm pool of its image and resources with a ready
    /// member for it.
    WarmPool,
    /// The node has a ready template of its image and resources.
    Template,
    /// The node has its image cached.
    ImageCached,
    /// Nothing on any fitting node helps; the policy chose.
    Policy,
}

impl fmt::Display for Because {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Because::WarmPool => "a warm pool of its image has a ready member there",
            Because::Template => "a template of its image is ready there",
            Because::ImageCached => "its image is cached there",
            Because::Policy => "the placement policy chose it",
        })
    }
}

/// A resource a node can run out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Cpus,
    Memory,
    Disk,
}

impl Resource {
    const ALL: [Resource; 3] = [Resource::Cpus, Resource::Memory, Resource::Disk];

    fn amount(self, n: u64) -> String {
        match self {
            Resource::Cpus if n == 1 => "1 vCPU".to_string(),
            Resource::Cpus => format!("{n} vCPUs"),
            Resource::Memory => format!("{n} MiB of memory"),
            Resource::Disk => format!("{n} MiB of disk"),
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Cpus => "vCPUs",
            Resource::Memory => "memory",
            Resource::Disk => "disk",
        })
    }
}

/// Why a node takes no new sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unavailable {
    Cordoned,
    Unreachable,
    Draining,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unavailable::Cordoned => "cordoned",
            Unavailable::Unreachable => "unreachable",
            Unavailable::Draining => "draining",
        })
    }
}

/// CPU, memory and disk wanted (or free), widened so sums cannot
/// overflow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Demand {
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl Demand {
    fn of(r: &Resources) -> Demand {
        Demand {
            cpus: u64::from(r.cpus),
            memory_mib: u64::from(r.memory_mib),
            disk_mib: u64::from(r.disk_mib),
        }
    }

    fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Cpus => self.cpus,
            Resource::Memory => self.memory_mib,
            Resource::Disk => self.disk_mib,
        }
    }

    fn plus(self, o: Demand) -> Demand {
        Demand {
            cpus: self.cpus.saturating_add(o.cpus),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_mib: self.disk_mib.saturating_add(o.disk_mib),
        }
    }

    fn minus(self, o: Demand) -> Demand {
        Demand {
            cpus: self.cpus.saturating_sub(o.cpus),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            disk_mib: self.disk_mib.saturating_sub(o.disk_mib),
        }
    }

    fn covers(&self, o: &Demand) -> bool {
        Resource::ALL.iter().all(|&r| self.get(r) >= o.get(r))
    }
}

impl fmt::Display for Demand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} and {}",
            Resource::Cpus.amount(self.cpus),
            Resource::Memory.amount(self.memory_mib),
            Resource::Disk.amount(self.disk_mib)
        )
    }
}

/// Why a sandbox (or group) could not be placed: what a user is told, with
/// a stable machine code ([`Unschedulable::code`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Unschedulable {
    /// The cluster has no nodes.
    NoNodes,
    /// Every node is cordoned, unreachable or draining.
    NoneSchedulable { nodes: Vec<(NodeName, Unavailable)> },
    /// No schedulable node runs the VMM the sandbox asks for.
    NoDriver {
        wanted: DriverPreference,
        offered: Vec<(NodeName, DriverKind)>,
    },
    /// Members of a group ask for different VMMs; one node runs one.
    ConflictingDrivers { wanted: Vec<DriverPreference> },
    /// No node has this much of one resource free.
    Insufficient {
        resource: Resource,
        requested: u64,
        largest_free: u64,
        on: NodeName,
    },
    /// Each resource is free somewhere, but no node has all of them.
    NoSingleNodeFits {
        requested: Demand,
        /// The first resource each candidate node is short of.
        short: Vec<(NodeName, Resource)>,
    },
    /// The group this sandbox belongs to cannot be placed on one node.
    Group {
        group: String,
        members: usize,
        reason: Box<Unschedulable>,
    },
}

impl Unschedulable {
    /// A stable, machine-readable code for API errors and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Unschedulable::NoNodes => "no_nodes",
            Unschedulable::NoneSchedulable { .. } => "none_schedulable",
            Unschedulable::NoDriver { .. } => "no_driver",
            Unschedulable::ConflictingDrivers { .. } => "conflicting_drivers",
            Unschedulable::Insufficient { .. } => "insufficient",
            Unschedulable::NoSingleNodeFits { .. } => "no_single_node_fits",
            Unschedulable::Group { .. } => "group",
        }
    }
}

fn driver_name(d: DriverKind) -> &'static str {
    match d {
        DriverKind::Firecracker => "firecracker",
        DriverKind::QemuKvm => "qemu-kvm",
        DriverKind::QemuTcg => "qemu-tcg",
    }
}

fn list<T>(items: &[(NodeName, T)], f: impl Fn(&T) -> String) -> String {
    items
        .iter()
        .map(|(n, t)| format!("{n}: {}", f(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unschedulable::NoNodes => f.write_str("no nodes are registered"),
            Unschedulable::NoneSchedulable { nodes } => {
                if nodes.iter().all(|(_, u)| *u == Unavailable::Cordoned) {
                    f.write_str("all nodes cordoned")
                } else {
                    write!(
                        f,
                        "no node takes new sandboxes ({})",
                        list(nodes, |u| u.to_string())
                    )
                }
            }
            Unschedulable::NoDriver { wanted, offered } => write!(
                f,
                "no schedulable node runs {wanted} ({})",
                list(offered, |d| driver_name(*d).to_string())
            ),
            Unschedulable::ConflictingDrivers { wanted } => {
                let w: Vec<String> = wanted.iter().map(|d| d.to_string()).collect();
                write!(
                    f,
                    "its sandboxes ask for {}: no node runs both",
                    w.join(" and ")
                )
            }
            Unschedulable::Insufficient {
                resource,
                requested,
                largest_free,
                on,
            } => write!(
                f,
                "no node has {} free (largest free: {} on node {on})",
                resource.amount(*requested),
                match resource {
                    Resource::Cpus => largest_free.to_string(),
                    _ => format!("{largest_free} MiB"),
                }
            ),
            Unschedulable::NoSingleNodeFits { requested, short } => write!(
                f,
                "no node has {requested} free at once ({})",
                list(short, |r| format!("short of {r}"))
            ),
            Unschedulable::Group {
                group,
                members,
                reason,
            } => write!(
                f,
                "group {group} ({members} sandboxes, placed together on one node): {reason}"
            ),
        }
    }
}

impl std::error::Error for Unschedulable {}

/// A node as this call sees it: the view plus what earlier decisions took.
struct Slot<'a> {
    view: &'a NodeView,
    capacity: Demand,
    /// Allocated before this call plus taken by it.
    used: Demand,
    /// Ready pool members left per entry of `view.pools`.
    pool_left: Vec<u32>,
}

impl Slot<'_> {
    fn free(&self) -> Demand {
        self.capacity.minus(self.used)
    }

    fn unavailable(&self) -> Option<Unavailable> {
        match self.view.status {
            NodeStatus::Unreachable => Some(Unavailable::Unreachable),
            NodeStatus::Draining => Some(Unavailable::Draining),
            NodeStatus::Ready if !self.view.schedulable => Some(Unavailable::Cordoned),
            NodeStatus::Ready => None,
        }
    }

    /// The sum over CPU, memory and disk of the fraction (in millionths)
    /// that would be allocated after adding `d`.
    fn fullness_after(&self, d: &Demand) -> u64 {
        Resource::ALL
            .iter()
            .map(|&r| {
                let cap = self.capacity.get(r);
                let used = self.used.get(r).saturating_add(d.get(r));
                if cap == 0 {
                    1_000_000
                } else {
                    // At most 1e6 * 2^64 / 1: u128 cannot overflow.
                    let ppm = u128::from(used) * 1_000_000 / u128::from(cap);
                    u64::try_from(ppm.min(1_000_000)).unwrap_or(1_000_000)
                }
            })
            .sum()
    }

    fn pool_index(&self, spec: &SandboxSpec) -> Option<usize> {
        self.view
            .pools
            .iter()
            .zip(&self.pool_left)
            .position(|((image, res, _), left)| {
                *left > 0 && *image == spec.image && *res == spec.resources
            })
    }

    /// How well this node suits `spec` now (lower is better).
    fn tier(&self, spec: &SandboxSpec) -> Because {
        let warm = spec.origin == Origin::Image && spec.start == StartPreference::Warm;
        if warm && self.pool_index(spec).is_some() {
            Because::WarmPool
        } else if warm
            && self
                .view
                .templates
                .iter()
                .any(|(image, res)| *image == spec.image && *res == spec.resources)
        {
            Because::Template
        } else if self.view.images.contains(&spec.image) {
            Because::ImageCached
        } else {
            Because::Policy
        }
    }
}

fn driver_fits(wanted: DriverPreference, has: DriverKind) -> bool {
    match wanted {
        DriverPreference::Auto => true,
        DriverPreference::Firecracker => has == DriverKind::Firecracker,
        DriverPreference::Qemu => matches!(has, DriverKind::QemuKvm | DriverKind::QemuTcg),
    }
}

/// Places `pending` on the nodes of `view`; one decision per pending
/// sandbox, in the same order. Pure and deterministic.
pub fn place(view: &ClusterView, pending: &[Pending], policy: Policy) -> Vec<Decision> {
    let mut slots: Vec<Slot<'_>> = view
        .nodes
        .iter()
        .map(|n| Slot {
            view: n,
            capacity: Demand {
                cpus: u64::from(n.capacity.cpus),
                memory_mib: n.capacity.memory_mib,
                disk_mib: n.capacity.disk_mib,
            },
            used: Demand {
                cpus: u64::from(n.allocated.cpus),
                memory_mib: n.allocated.memory_mib,
                disk_mib: n.allocated.disk_mib,
            },
            pool_left: n.pools.iter().map(|p| p.2).collect(),
        })
        .collect();
    // Ties go to the first name whatever order the view lists nodes in.
    slots.sort_by(|a, b| a.view.name.cmp(&b.view.name));

    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in pending.iter().enumerate() {
        if let Some(g) = &p.group {
            groups.entry(g.as_str()).or_default().push(i);
        }
    }

    let mut outcomes: Vec<Option<Outcome>> = vec![None; pending.len()];
    for i in 0..pending.len() {
        if outcomes[i].is_some() {
            continue;
        }
        let members: Vec<usize> = match &pending[i].group {
            Some(g) => groups.get(g.as_str()).cloned().unwrap_or_else(|| vec![i]),
            None => vec![i],
        };
        let specs: Vec<&SandboxSpec> = members.iter().map(|&j| &pending[j].spec).collect();
        match choose(&slots, &specs, policy) {
            Ok(k) => {
                let slot = &mut slots[k];
                for &j in &members {
                    let spec = &pending[j].spec;
                    let because = slot.tier(spec);
                    if because == Because::WarmPool
                        && let Some(p) = slot.pool_index(spec)
                    {
                        slot.pool_left[p] -= 1;
                    }
                    slot.used = slot.used.plus(Demand::of(&spec.resources));
                    outcomes[j] = Some(Outcome::Placed {
                        node: slot.view.name.clone(),
                        because,
                    });
                }
            }
            Err(reason) => {
                let reason = match &pending[i].group {
                    Some(g) => Unschedulable::Group {
                        group: g.clone(),
                        members: members.len(),
                        reason: Box::new(reason),
                    },
                    None => reason,
                };
                for &j in &members {
                    outcomes[j] = Some(Outcome::Unschedulable {
                        reason: reason.clone(),
                    });
                }
            }
        }
    }

    pending
        .iter()
        .zip(outcomes)
        .map(|(p, o)| Decision {
            id: p.id.clone(),
            generation: p.generation,
            outcome: o.expect("the loop gives every pending sandbox an outcome"),
        })
        .collect()
}

/// The index of the best slot for `specs` together, or why there is none.
fn choose(
    slots: &[Slot<'_>],
    specs: &[&SandboxSpec],
    policy: Policy,
) -> Result<usize, Unschedulable> {
    if slots.is_empty() {
        return Err(Unschedulable::NoNodes);
    }
    let schedulable: Vec<usize> = (0..slots.len())
        .filter(|&k| slots[k].unavailable().is_none())
        .collect();
    if schedulable.is_empty() {
        return Err(Unschedulable::NoneSchedulable {
            nodes: slots
                .iter()
                .filter_map(|s| Some((s.view.name.clone(), s.unavailable()?)))
                .collect(),
        });
    }

    let mut wanted = DriverPreference::Auto;
    for s in specs {
        match (wanted, s.driver) {
            (_, DriverPreference::Auto) => {}
            (DriverPreference::Auto, d) => wanted = d,
            (w, d) if w == d => {}
            (w, d) => return Err(Unschedulable::ConflictingDrivers { wanted: vec![w, d] }),
        }
    }
    let candidates: Vec<usize> = schedulable
        .iter()
        .copied()
        .filter(|&k| driver_fits(wanted, slots[k].view.driver))
        .collect();
    if candidates.is_empty() {
        return Err(Unschedulable::NoDriver {
            wanted,
            offered: schedulable
                .iter()
                .map(|&k| (slots[k].view.name.clone(), slots[k].view.driver))
                .collect(),
        });
    }

    let demand = specs
        .iter()
        .fold(Demand::default(), |d, s| d.plus(Demand::of(&s.resources)));
    let best = candidates
        .iter()
        .copied()
        .filter(|&k| slots[k].free().covers(&demand))
        .min_by_key(|&k| {
            let slot = &slots[k];
            let tier = specs
                .iter()
                .map(|s| slot.tier(s))
                .min()
                .unwrap_or(Because::Policy);
            let full = slot.fullness_after(&demand);
            let by_policy = match policy {
                Policy::BinPack => u64::MAX - full,
                Policy::Spread => full,
            };
            // Slots are sorted by name: `k` breaks the remaining ties.
            (tier, by_policy, k)
        });
    best.ok_or_else(|| shortage(slots, &candidates, &demand))
}

/// The most precise reason why no candidate has `demand` free.
fn shortage(slots: &[Slot<'_>], candidates: &[usize], demand: &Demand) -> Unschedulable {
    for r in Resource::ALL {
        let want = demand.get(r);
        // Candidates are in name order: the first of equals is kept.
        let mut largest: Option<(u64, usize)> = None;
        for &k in candidates {
            let free = slots[k].free().get(r);
            if largest.is_none_or(|(l, _)| free > l) {
                largest = Some((free, k));
            }
        }
        if let Some((free, k)) = largest
            && free < want
        {
            return Unschedulable::Insufficient {
                resource: r,
                requested: want,
                largest_free: free,
                on: slots[k].view.name.clone(),
            };
        }
    }
    Unschedulable::NoSingleNodeFits {
        requested: *demand,
        short: candidates
            .iter()
            .filter_map(|&k| {
                let free = slots[k].free();
                let r = Resource::ALL
                    .into_iter()
                    .find(|&r| free.get(r) < demand.get(r))?;
                Some((slots[k].view.name.clone(), r))
            })
            .collect(),
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

mod restore;
pub use restore::{RestoreRefusal, place_restore};
