//! Placing a restore: a snapshot lives on the nodes that hold a copy, so
//! "holds a copy" is a hard constraint (the other rules of [`super::place`]
//! apply among those nodes). Pure, like `place`. Cross-node restore (a copy
//! streamed to another node first) will widen `holders` here, nothing else.

use std::collections::BTreeSet;

use kiln_api::cluster::NodeName;
use kiln_store::query::ClusterView;

use super::{Outcome, Pending, Policy, Unschedulable, place};

/// Why a restore was not placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreRefusal {
    /// No registered node holds a copy of the snapshot.
    NoHolder,
    /// Nodes hold it, but none of them can take the sandbox now.
    Unschedulable(Unschedulable),
}

impl RestoreRefusal {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            RestoreRefusal::NoHolder => "no_snapshot_holder",
            RestoreRefusal::Unschedulable(u) => u.code(),
        }
    }
}

/// The node that restores `pending` (whose spec has the snapshot's image
/// and resources): one of `holders`, chosen by [`place`] among them.
pub fn place_restore(
    view: &ClusterView,
    pending: &Pending,
    holders: &BTreeSet<NodeName>,
    policy: Policy,
) -> Result<NodeName, RestoreRefusal> {
    let nodes: Vec<_> = view
        .nodes
        .iter()
        .filter(|n| holders.contains(&n.name))
        .cloned()
        .collect();
    if nodes.is_empty() {
        return Err(RestoreRefusal::NoHolder);
    }
    let restricted = ClusterView {
        nodes,
        pending: vec![],
    };
    match place(&restricted, std::slice::from_ref(pending), policy)
        .into_iter()
        .next()
        .map(|d| d.outcome)
    {
        Some(Outcome::Placed { node, .. }) => Ok(node),
        Some(Outcome::Unschedulable { reason }) => Err(RestoreRefusal::Unschedulable(reason)),
        None => Err(RestoreRefusal::Unschedulable(Unschedulable::NoNodes)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{name, node, pending, res, spec, view};
    use super::*;

    fn holders(names: &[&str]) -> BTreeSet<NodeName> {
        names.iter().map(|n| name(n)).collect()
    }

    #[test]
    fn a_restore_goes_only_to_a_node_holding_the_snapshot() {
        // `a` sorts first, is emptier and would win any tie: it holds no copy.
        let v = view(vec![
            node("a", 16, 65536, 100_000),
            node("b", 2, 1024, 10_000),
        ]);
        let p = pending(1, spec("img", res(1, 256, 1024)));
        assert_eq!(
            place_restore(&v, &p, &holders(&["b"]), Policy::Spread),
            Ok(name("b"))
        );
        assert_eq!(
            place_restore(&v, &p, &holders(&["b"]), Policy::BinPack),
            Ok(name("b"))
        );
    }

    #[test]
    fn no_holder_is_its_own_refusal_even_when_other_nodes_fit() {
        let v = view(vec![node("a", 16, 65536, 100_000)]);
        let p = pending(1, spec("img", res(1, 256, 1024)));
        let r = place_restore(&v, &p, &holders(&[]), Policy::default());
        assert_eq!(r, Err(RestoreRefusal::NoHolder));
        assert_eq!(r.unwrap_err().code(), "no_snapshot_holder");
        // A holder that is not (or no longer) a registered node.
        let r = place_restore(&v, &p, &holders(&["gone"]), Policy::default());
        assert_eq!(r, Err(RestoreRefusal::NoHolder));
    }

    #[test]
    fn a_holder_without_room_is_unschedulable_not_moved_elsewhere() {
        let v = view(vec![
            node("a", 16, 65536, 100_000),
            node("b", 1, 128, 10_000),
        ]);
        let p = pending(1, spec("img", res(1, 256, 1024)));
        let r = place_restore(&v, &p, &holders(&["b"]), Policy::default());
        match r {
            Err(RestoreRefusal::Unschedulable(u)) => assert_eq!(u.code(), "insufficient"),
            other => panic!("expected unschedulable, got {other:?}"),
        }
    }

    #[test]
    fn a_cordoned_holder_takes_no_restore() {
        let mut b = node("b", 4, 4096, 10_000);
        b.schedulable = false;
        let v = view(vec![node("a", 4, 4096, 10_000), b]);
        let p = pending(1, spec("img", res(1, 256, 1024)));
        let r = place_restore(&v, &p, &holders(&["b"]), Policy::default());
        assert!(matches!(r, Err(RestoreRefusal::Unschedulable(_))), "{r:?}");
    }
}
