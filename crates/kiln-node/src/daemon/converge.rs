//! The daemon's decisions: a pure function of (what the server wants, what
//! the node has, what is in flight) to actions. No I/O, no clock: the
//! executor in `super` observes, calls [`decide`], acts, and observes again
//! (level-triggered: on every desired-state update, every finished action,
//! every sandbox exit and periodically).
//!
//! Invariants (property-tested below):
//! - `Create` only for an ID with nothing local at all: never a second VM
//!   for one ID (a local sandbox with an assigned ID is adopted instead).
//! - A local sandbox that this node neither owns (created or adopted for
//!   the server) nor is assigned is never named by an action: `kiln run`
//!   sandboxes in the same state directory are not the daemon's.
//! - An ID with an action in flight gets no other action.
//! - A sandbox acts on an assignment only while the assignment's
//!   generation is newer than the one it converged to; once its local
//!   state satisfies the desired state it is `Converged` at that generation.
//! - An owned sandbox no longer assigned here is fenced (stopped, removed,
//!   forgotten): the server has rescheduled or forgotten it.
//! - A sandbox that runs (or is paused) as desired but enforces another
//!   network policy than its assignment's gets `UpdatePolicy` (maps
//!   rewritten in place, never a restart), and is `Converged` only once
//!   the policy matches.

use std::collections::{BTreeMap, BTreeSet};

use kiln_api::cluster::{Assignment, DesiredState};
use kiln_api::sandbox::{SandboxId, SandboxState};

/// What the node has of one sandbox, reduced to what decisions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Owned, nothing local yet (or a create was interrupted before its
    /// record existed).
    Absent,
    /// Its record exists; its supervisor has not reported yet.
    Creating,
    Running,
    Paused,
    /// Ended (exited, failed, stopped, or could not be created).
    Finished,
}

impl Observed {
    /// The reduced form of a record's state.
    pub fn of(state: &SandboxState) -> Observed {
        match state {
            SandboxState::Creating | SandboxState::Pooled => Observed::Creating,
            SandboxState::Running { .. } => Observed::Running,
            SandboxState::Paused { .. } => Observed::Paused,
            SandboxState::Exited { .. } | SandboxState::Failed { .. } => Observed::Finished,
        }
    }
}

/// One local sandbox (or ownership marker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub observed: Observed,
    /// The generation it converged to (0: none yet).
    pub converged: u64,
    /// Created or adopted by this daemon for the server.
    pub owned: bool,
    /// Its network policy is not the assignment's (the daemon last applied
    /// another one, or does not know which one it enforces).
    pub policy_stale: bool,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a new sandbox with this ID (nothing local has it).
    Create {
        id: SandboxId,
        generation: u64,
    },
    /// A local sandbox already has the assigned ID (a restart, or a marker
    /// that was lost): take it over as it is, start nothing.
    Adopt {
        id: SandboxId,
    },
    Pause {
        id: SandboxId,
    },
    Resume {
        id: SandboxId,
    },
    /// Stop the main process; the record stays (desired `stopped`).
    Stop {
        id: SandboxId,
    },
    /// Stop if needed, remove everything, and record `generation` as
    /// converged with the final state (desired `deleted`).
    Remove {
        id: SandboxId,
        generation: u64,
    },
    /// The local state already satisfies the desired one.
    Converged {
        id: SandboxId,
        generation: u64,
    },
    /// Owned but no longer assigned here: stop, remove, forget.
    Fence {
        id: SandboxId,
    },
    /// Enforce the assignment's network policy live (what `kiln policy
    /// set` does), then record `generation` as converged.
    UpdatePolicy {
        id: SandboxId,
        generation: u64,
    },
}

impl Action {
    pub fn id(&self) -> &SandboxId {
        match self {
            Action::Create { id, .. }
            | Action::Adopt { id }
            | Action::Pause { id }
            | Action::Resume { id }
            | Action::Stop { id }
            | Action::Remove { id, .. }
            | Action::Converged { id, .. }
            | Action::UpdatePolicy { id, .. }
            | Action::Fence { id } => id,
        }
    }
}

/// The actions that move `local` towards `desired` (see the module doc).
/// `desired`: the node's assignments (duplicated IDs: the first counts).
pub fn decide(
    desired: &[Assignment],
    local: &BTreeMap<SandboxId, Local>,
    busy: &BTreeSet<SandboxId>,
) -> Vec<Action> {
    let mut out = vec![];
    let mut assigned = BTreeSet::new();
    for a in desired {
        if !assigned.insert(a.id.clone()) || busy.contains(&a.id) {
            continue;
        }
        let id = a.id.clone();
        let generation = a.generation;
        let l = match local.get(&a.id) {
            None => {
                match a.desired {
                    DesiredState::Running | DesiredState::Paused => {
                        out.push(Action::Create { id, generation })
                    }
                    // Nothing to stop or remove; the executor records
                    // ownership so that it can report.
                    DesiredState::Stopped | DesiredState::Deleted => out.push(Action::Adopt { id }),
                }
                continue;
            }
            Some(l) => l,
        };
        if !l.owned {
            out.push(Action::Adopt { id });
            continue;
        }
        if l.converged >= generation {
            continue;
        }
        use DesiredState as D;
        use Observed as O;
        let act = match (a.desired, l.observed) {
            (_, O::Creating) => None,
            (D::Running | D::Paused, O::Absent) => Some(Action::Create { id, generation }),
            (D::Running, O::Paused) => Some(Action::Resume { id }),
            (D::Paused, O::Running) => Some(Action::Pause { id }),
            (D::Stopped, O::Running | O::Paused) => Some(Action::Stop { id }),
            (D::Deleted, O::Running | O::Paused | O::Finished) => {
                Some(Action::Remove { id, generation })
            }
            (D::Running, O::Running) | (D::Paused, O::Paused) if l.policy_stale => {
                Some(Action::UpdatePolicy { id, generation })
            }
            (D::Running, O::Running | O::Finished)
            | (D::Paused, O::Paused | O::Finished)
            | (D::Stopped, O::Finished | O::Absent)
            | (D::Deleted, O::Absent) => Some(Action::Converged { id, generation }),
        };
        out.extend(act);
    }
    for (id, l) in local {
        if l.owned && !assigned.contains(id) && !busy.contains(id) {
            out.push(Action::Fence { id: id.clone() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::cluster::TenantName;
    use kiln_api::sandbox::SandboxSpec;
    use proptest::prelude::*;

    fn id(n: u8) -> SandboxId {
        SandboxId::from_random([0, 0, 0, 0, 0, 0, 0, n])
    }

    fn assignment(n: u8, desired: DesiredState, generation: u64) -> Assignment {
        Assignment {
            id: id(n),
            tenant: TenantName::new("t").expect("valid"),
            spec: SandboxSpec::for_image("busybox"),
            desired,
            generation,
            observed_generation: 0,
            stop_grace_secs: None,
        }
    }

    fn owned(observed: Observed, converged: u64) -> Local {
        Local {
            observed,
            converged,
            owned: true,
            policy_stale: false,
        }
    }

    #[test]
    fn a_new_assignment_is_created_and_an_existing_one_adopted() {
        let d = [assignment(1, DesiredState::Running, 1)];
        let none = BTreeMap::new();
        let busy = BTreeSet::new();
        assert_eq!(
            decide(&d, &none, &busy),
            [Action::Create {
                id: id(1),
                generation: 1
            }]
        );
        // After a restart whose marker was lost: the running VM is adopted.
        let mut l = BTreeMap::new();
        l.insert(
            id(1),
            Local {
                observed: Observed::Running,
                converged: 0,
                owned: false,
                policy_stale: false,
            },
        );
        assert_eq!(decide(&d, &l, &busy), [Action::Adopt { id: id(1) }]);
        // Owned and running: converged, then nothing.
        l.insert(id(1), owned(Observed::Running, 0));
        assert_eq!(
            decide(&d, &l, &busy),
            [Action::Converged {
                id: id(1),
                generation: 1
            }]
        );
        l.insert(id(1), owned(Observed::Running, 1));
        assert!(decide(&d, &l, &busy).is_empty());
    }

    #[test]
    fn a_policy_change_is_applied_live_then_converged() {
        let d = [assignment(1, DesiredState::Running, 4)];
        let busy = BTreeSet::new();
        let mut l = BTreeMap::new();
        let mut stale = owned(Observed::Running, 3);
        stale.policy_stale = true;
        l.insert(id(1), stale);
        assert_eq!(
            decide(&d, &l, &busy),
            [Action::UpdatePolicy {
                id: id(1),
                generation: 4
            }]
        );
        // Paused as desired: updated as well (the maps do not need the VM).
        let dp = [assignment(1, DesiredState::Paused, 4)];
        let mut paused = stale;
        paused.observed = Observed::Paused;
        l.insert(id(1), paused);
        assert_eq!(
            decide(&dp, &l, &busy),
            [Action::UpdatePolicy {
                id: id(1),
                generation: 4
            }]
        );
        // Desired paused while running: pause first, the policy after.
        l.insert(id(1), stale);
        assert_eq!(decide(&dp, &l, &busy), [Action::Pause { id: id(1) }]);
        // Being deleted: removed, no policy update.
        let dd = [assignment(1, DesiredState::Deleted, 4)];
        assert_eq!(
            decide(&dd, &l, &busy),
            [Action::Remove {
                id: id(1),
                generation: 4
            }]
        );
        // Busy (an update in flight): nothing more.
        let b: BTreeSet<_> = [id(1)].into();
        assert!(decide(&d, &l, &b).is_empty());
        // Once it matches: converged.
        l.insert(id(1), owned(Observed::Running, 3));
        assert_eq!(
            decide(&d, &l, &busy),
            [Action::Converged {
                id: id(1),
                generation: 4
            }]
        );
    }

    #[test]
    fn an_exit_of_its_own_is_not_restarted() {
        let d = [assignment(1, DesiredState::Running, 3)];
        let mut l = BTreeMap::new();
        l.insert(id(1), owned(Observed::Finished, 3));
        assert!(decide(&d, &l, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn unassigned_owned_sandboxes_are_fenced_and_others_left_alone() {
        let mut l = BTreeMap::new();
        l.insert(id(1), owned(Observed::Running, 2));
        l.insert(
            id(2),
            Local {
                observed: Observed::Running,
                converged: 0,
                owned: false,
                policy_stale: false,
            },
        );
        assert_eq!(
            decide(&[], &l, &BTreeSet::new()),
            [Action::Fence { id: id(1) }]
        );
        let busy: BTreeSet<_> = [id(1)].into();
        assert!(decide(&[], &l, &busy).is_empty());
    }

    /// A model of the executor: what each action does to the node.
    fn step(
        d: &[Assignment],
        local: &mut BTreeMap<SandboxId, Local>,
        vms: &mut BTreeMap<SandboxId, u32>,
        actions: &[Action],
    ) {
        for a in actions {
            let gen_of = |id: &SandboxId| {
                d.iter()
                    .find(|x| &x.id == id)
                    .map(|x| x.generation)
                    .unwrap_or(0)
            };
            match a {
                Action::Create { id, .. } => {
                    *vms.entry(id.clone()).or_default() += 1;
                    // A new VM starts with its assignment's policy.
                    let converged = local.get(id).map_or(0, |l| l.converged);
                    local.insert(id.clone(), owned(Observed::Running, converged));
                }
                Action::Adopt { id } => {
                    let l = local.entry(id.clone()).or_insert(Local {
                        observed: Observed::Absent,
                        converged: 0,
                        owned: true,
                        policy_stale: false,
                    });
                    l.owned = true;
                }
                Action::Pause { id } => {
                    local.get_mut(id).expect("local").observed = Observed::Paused
                }
                Action::Resume { id } => {
                    local.get_mut(id).expect("local").observed = Observed::Running
                }
                Action::Stop { id } => {
                    local.get_mut(id).expect("local").observed = Observed::Finished;
                    vms.remove(id);
                }
                Action::Remove { id, generation } => {
                    assert_eq!(*generation, gen_of(id));
                    let l = local.get_mut(id).expect("local");
                    l.observed = Observed::Finished;
                    l.converged = *generation;
                    vms.remove(id);
                }
                Action::Converged { id, generation } => {
                    local.get_mut(id).expect("local").converged = *generation
                }
                Action::Fence { id } => {
                    local.remove(id);
                    vms.remove(id);
                }
                Action::UpdatePolicy { id, generation } => {
                    assert_eq!(*generation, gen_of(id));
                    let l = local.get_mut(id).expect("local");
                    assert!(matches!(l.observed, Observed::Running | Observed::Paused));
                    l.policy_stale = false;
                    l.converged = *generation;
                }
            }
        }
    }

    fn any_desired() -> impl Strategy<Value = DesiredState> {
        prop_oneof![
            Just(DesiredState::Running),
            Just(DesiredState::Paused),
            Just(DesiredState::Stopped),
            Just(DesiredState::Deleted),
        ]
    }

    fn any_observed() -> impl Strategy<Value = Observed> {
        prop_oneof![
            Just(Observed::Absent),
            Just(Observed::Running),
            Just(Observed::Paused),
            Just(Observed::Finished),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn decisions_are_safe_and_converge(
            desired in proptest::collection::vec((0u8..12, any_desired(), 1u64..5), 0..12),
            local in proptest::collection::vec((0u8..12, any_observed(), 0u64..5, any::<bool>(), any::<bool>()), 0..12),
            busy in proptest::collection::btree_set(0u8..12, 0..3),
        ) {
            let d: Vec<Assignment> = desired.iter().map(|&(n, s, g)| assignment(n, s, g)).collect();
            let mut l: BTreeMap<SandboxId, Local> = local
                .iter()
                .map(|&(n, o, c, own, stale)| {
                    let o = if !own && o == Observed::Absent { Observed::Running } else { o };
                    (id(n), Local { observed: o, converged: c, owned: own, policy_stale: stale })
                })
                .collect();
            let busy: BTreeSet<SandboxId> = busy.into_iter().map(id).collect();
            let assigned: BTreeSet<SandboxId> = d.iter().map(|a| a.id.clone()).collect();
            let foreign: BTreeSet<SandboxId> = l
                .iter()
                .filter(|(i, x)| !x.owned && !assigned.contains(*i))
                .map(|(i, _)| i.clone())
                .collect();
            // Every VM that exists now counts once.
            let mut vms: BTreeMap<SandboxId, u32> = l
                .iter()
                .filter(|(_, x)| matches!(x.observed, Observed::Running | Observed::Paused))
                .map(|(i, _)| (i.clone(), 1))
                .collect();
            let initial = l.clone();
            let mut rounds = 0;
            loop {
                let actions = decide(&d, &l, &busy);
                let mut seen = BTreeSet::new();
                for a in &actions {
                    prop_assert!(seen.insert(a.id().clone()), "two actions for one ID: {actions:?}");
                    prop_assert!(!busy.contains(a.id()), "an action on a busy ID: {a:?}");
                    prop_assert!(!foreign.contains(a.id()), "touched a sandbox it does not own: {a:?}");
                    if let Action::UpdatePolicy { id, .. } = a {
                        let x = l.get(id).map(|x| x.observed);
                        prop_assert!(
                            matches!(x, Some(Observed::Running | Observed::Paused)),
                            "a policy update of a sandbox that does not run: {a:?}"
                        );
                    }
                    if let Action::Create { id, .. } = a {
                        let existing = l.get(id).map(|x| x.observed);
                        prop_assert!(
                            matches!(existing, None | Some(Observed::Absent)),
                            "create over an existing sandbox: {a:?}"
                        );
                    }
                }
                if actions.is_empty() {
                    break;
                }
                step(&d, &mut l, &mut vms, &actions);
                prop_assert!(vms.values().all(|&n| n <= 1), "two VMs for one ID: {vms:?}");
                rounds += 1;
                prop_assert!(rounds <= 4, "no fixpoint after 4 rounds");
            }
            // At the fixpoint: foreign sandboxes are untouched, no owned
            // sandbox is left that is not assigned (unless busy), and every
            // assignment that is not busy is converged or satisfied.
            for f in &foreign {
                prop_assert!(l.get(f).is_some_and(|x| !x.owned));
            }
            for (i, x) in &l {
                prop_assert!(!x.owned || assigned.contains(i) || busy.contains(i));
            }
            let mut first = BTreeSet::new();
            for a in d.iter().filter(|a| first.insert(a.id.clone())) {
                if busy.contains(&a.id) {
                    continue;
                }
                let x = l.get(&a.id).expect("every assignment is local at the fixpoint");
                prop_assert!(x.owned);
                prop_assert!(x.converged >= a.generation || x.observed == Observed::Creating);
                // Converged to a newer generation means its policy too.
                let runs_as_desired = matches!(
                    (a.desired, x.observed),
                    (DesiredState::Running, Observed::Running) | (DesiredState::Paused, Observed::Paused)
                );
                let was_behind = initial.get(&a.id).is_none_or(|x| x.converged < a.generation);
                prop_assert!(!(runs_as_desired && was_behind && x.policy_stale), "converged with a stale policy: {x:?}");
            }
        }
    }
}
