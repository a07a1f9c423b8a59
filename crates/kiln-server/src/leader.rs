//! The leader's reconcile loop: every `reconcile_ms`, on the replica that
//! leads (and only there), propose `ExpireNodes` (nodes silent past the
//! grace period become unreachable; their sandboxes fail or, with
//! `restart: on-node-failure`, wait for a node again) and place the
//! pending sandboxes of `cluster_view` with `PlaceSandbox {
//! expected_generation }`. Both are safe on a stale view: `apply`
//! re-checks capacity, cordons and generations, so a lost race costs a
//! retry on the next round, never an overcommit.

use std::sync::Arc;
use std::time::Duration;

use kiln_store::{Command, RaftRole, Response, query};
use tokio::sync::watch;

use crate::scheduler::{self, Outcome, Pending, Policy};
use crate::server::{Shared, now_ms};

pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(shared.cfg.reconcile_ms.max(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        shared.metrics.observe_raft(&shared.raft);
        if shared.raft.status().role != RaftRole::Leader {
            continue;
        }
        round(&shared).await;
    }
}

/// One reconcile round (leader only).
pub async fn round(shared: &Shared) {
    match shared
        .raft
        .write(Command::ExpireNodes {
            now_ms: now_ms(),
            grace_ms: shared.cfg.grace_ms,
        })
        .await
    {
        Ok(Response::NodesExpired {
            nodes,
            lost,
            unassigned,
        }) if !nodes.is_empty() => {
            tracing::warn!(
                ?nodes,
                lost = lost.len(),
                unassigned = unassigned.len(),
                "nodes expired"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "expire_nodes not proposed");
            return;
        }
    }
    forget_deleted(shared).await;
    let view = shared.raft.read_local(query::cluster_view);
    if view.pending.is_empty() {
        return;
    }
    let pending = Pending::from_view(&view);
    let decisions = scheduler::place(&view, &pending, Policy::default());
    let writes = decisions.into_iter().filter_map(|d| match d.outcome {
        Outcome::Placed { node, .. } => {
            shared.metrics.scheduled("placed");
            Some(Command::PlaceSandbox {
                id: d.id,
                node,
                expected_generation: d.generation,
            })
        }
        Outcome::Unschedulable { reason } => {
            shared.metrics.scheduled(reason.code());
            None
        }
    });
    let results =
        futures::future::join_all(writes.map(|c| async { shared.raft.write(c).await })).await;
    for r in results {
        match r {
            Ok(Response::Rejected(rej)) => tracing::debug!(%rej, "placement refused; next round"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "placement not proposed"),
        }
    }
}

/// Drops the records of deleted sandboxes the node has let go of: it
/// reported a finished state at the deleting generation, or the sandbox
/// has no node, or its node is unreachable or gone.
async fn forget_deleted(shared: &Shared) {
    use kiln_api::cluster::{DesiredState, NodeStatus};
    let ids: Vec<_> = shared.raft.read_local(|s| {
        s.sandboxes
            .values()
            .filter(|r| r.desired == DesiredState::Deleted)
            .filter(|r| {
                let node_gone = r.node.as_ref().is_none_or(|n| {
                    s.nodes
                        .get(n)
                        .is_none_or(|n| n.status == NodeStatus::Unreachable)
                });
                node_gone || (r.observed.is_finished() && r.observed_generation >= r.generation)
            })
            .map(|r| r.id.clone())
            .take(1000)
            .collect()
    });
    let writes = ids
        .into_iter()
        .map(|id| shared.raft.write(Command::ForgetSandbox { id }));
    for r in futures::future::join_all(writes).await {
        if let Ok(Response::Rejected(rej)) = r {
            tracing::debug!(%rej, "forget_sandbox refused");
        }
    }
}
