//! The reconciler: one level-triggered pass that observes what is on the
//! node (records, supervisors, VMMs, pools, holds, work and staging
//! directories) and repairs what killed processes left behind. Idempotent;
//! safe to run from any process at any time, concurrently with commands.

use std::time::Duration;

use super::Node;
use crate::store::now_secs;

/// How long a pool member's record may exist without a supervisor before it
/// counts as abandoned (the filler writes the record first).
const POOL_MEMBER_GRACE_SECS: u64 = 60;
/// How old a staging directory whose owner cannot be told must be before it
/// counts as abandoned.
const STAGING_GRACE: Duration = Duration::from_secs(3600);

/// What one pass repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Sandboxes whose supervisor was gone (VM killed, record failed or,
    /// for pool members, removed).
    pub orphans: u32,
    /// Staging directories of dead snapshotters removed.
    pub staging: u32,
}

impl Node {
    /// One reconcile pass (see the module doc).
    pub async fn reconcile(&self) -> Reconciled {
        let mut done = Reconciled::default();
        if let Ok(records) = self.store.list() {
            for r in records {
                let dead_shim = r.shim_pid.is_some() && !r.shim_alive();
                let orphan = if r.pool.is_some() {
                    let never_started = r.shim_pid.is_none()
                        && now_secs().saturating_sub(r.created_at) > POOL_MEMBER_GRACE_SECS;
                    dead_shim || never_started
                } else {
                    r.vm.is_some() && !r.shim_alive()
                };
                if orphan {
                    self.reap_orphan(&r.id).await;
                    done.orphans += 1;
                }
            }
        }
        // Holds of `kiln fork` processes that were killed, VMs of killed
        // `template create`s, and staging directories of killed snapshots.
        self.snapshots().release_dead_holders();
        crate::template::reap_abandoned(self.dirs()).await;
        // Taps, leases and policy programs of sandboxes whose VM is gone
        // (a supervisor killed before it released them).
        if self.dirs().state.join("net").is_dir()
            && let Ok(records) = self.store.list()
        {
            let live: std::collections::BTreeSet<String> = records
                .into_iter()
                .filter(|r| !self.refresh(r.clone()).state.is_finished())
                .map(|r| r.id)
                .collect();
            match super::open_network_cleanup(self.dirs()) {
                Ok(net) => {
                    if let Err(e) = net.reconcile(&live) {
                        tracing::warn!(error = %e, "cannot reconcile the sandbox network");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot open the sandbox network"),
            }
        }
        done.staging += self.snapshots().reap_staging(STAGING_GRACE);
        done.staging += self.templates().reap_staging(STAGING_GRACE);
        done
    }
}
