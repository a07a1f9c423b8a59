//! Snapshots, restores and forks on the node.
//!
//! The supervisor of the source sandbox writes a snapshot into a staging
//! directory of the snapshot store (`crate::snapshot`, owned by this
//! process until published, reaped by the reconciler if it dies); this
//! module publishes it under its name. A restore checks the snapshot
//! completely (manifest, guest artifacts, driver, image disk, every file's
//! size and digest) before it creates anything, then starts a supervisor in
//! restore mode, which loads the snapshot and re-attaches to the main
//! process.

use std::time::{Duration, Instant};

use kiln_vmm::{DriverChoice, DriverKind};

use super::{Node, SandboxOpError, SupervisorError};
use crate::ctl::{CtlConn, CtlRequest, CtlResponse};
use crate::paths::GuestArtifacts;
use crate::shim::ReadyLine;
use crate::snapshot::{self, Manifest};
use crate::store::{SandboxRecord, SandboxState, StoreError};

/// Most forks one request may make.
pub const MAX_FORKS: u32 = 64;

/// How long a fork snapshot taken for the control plane is held for forks
/// that have not been restored from it yet.
pub const FORK_HOLD: Duration = Duration::from_secs(600);

/// A snapshot, restore or fork failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotOpError {
    #[error(transparent)]
    Sandbox(#[from] SandboxOpError),
    #[error(transparent)]
    Create(#[from] snapshot::CreateSnapshotError),
    #[error(transparent)]
    Verify(#[from] snapshot::VerifySnapshotError),
    #[error(transparent)]
    Remove(#[from] snapshot::RemoveSnapshotError),
    #[error(transparent)]
    List(#[from] snapshot::ListSnapshotsError),
    #[error("cannot snapshot sandbox {id}: {message}")]
    Refused { id: String, message: String },
    #[error(transparent)]
    Artifacts(#[from] crate::paths::MissingArtifact),
    #[error(transparent)]
    Driver(#[from] crate::vm::StartSandboxVmError),
    #[error("cannot hash the guest artifacts")]
    Hash(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot register a user of snapshot {name}")]
    Register {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hold the fork snapshot")]
    Hold(#[source] std::io::Error),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("-n {0} is out of range (1 to {MAX_FORKS})")]
    ForkCount(u32),
    #[error("cannot open the sandbox network")]
    OpenNetwork(#[from] kiln_net::OpenNetworkError),
    #[error("cannot attach the restored sandbox to the network")]
    Attach(#[from] kiln_net::AttachError),
    #[error("a fork task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// What a fork made: the IDs of the forks that run, in order, and for each
/// one that failed its number (from 1) and why.
#[derive(Debug, Clone, Default)]
pub struct ForkOutcome {
    pub source: String,
    pub ids: Vec<String>,
    pub failed: Vec<(u32, String)>,
}

/// A restored sandbox whose supervisor reported.
#[derive(Debug, Clone)]
pub struct Restored {
    pub record: SandboxRecord,
    pub ready: ReadyLine,
    pub shim_pid: u32,
    /// Milliseconds from the call to the supervisor being spawned (the
    /// snapshot verified, the record and network made).
    pub prepared_ms: u64,
}

impl Node {
    /// Snapshots sandbox `prefix` as `name` (default `snap-…`); its full ID
    /// and the snapshot's name.
    pub async fn snapshot(
        &self,
        prefix: &str,
        name: Option<String>,
    ) -> Result<(String, String), SnapshotOpError> {
        self.take_snapshot(prefix, name, false).await
    }

    async fn take_snapshot(
        &self,
        prefix: &str,
        name: Option<String>,
        ephemeral: bool,
    ) -> Result<(String, String), SnapshotOpError> {
        let (id, sock) = self.running_socket(prefix)?;
        let snapshots = self.snapshots();
        let name =
            name.unwrap_or_else(|| snapshot::new_name(if ephemeral { "fork" } else { "snap" }));
        let staging = snapshots.staging(&name)?;
        let result = async {
            let req = CtlRequest::Snapshot {
                dest: staging.clone(),
                name: name.clone(),
                ephemeral,
            };
            let (_conn, resp) = CtlConn::open(&sock, &req)
                .await
                .map_err(SandboxOpError::from)?;
            match resp {
                CtlResponse::Ok => {}
                CtlResponse::Error { message, .. } => {
                    return Err(SnapshotOpError::Refused {
                        id: id.clone(),
                        message,
                    });
                }
                other => {
                    return Err(SandboxOpError::Unexpected {
                        id: id.clone(),
                        answer: format!("{other:?}"),
                    }
                    .into());
                }
            }
            snapshots.publish(&staging, &name)?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            snapshots.remove_staging(&staging);
            return Err(e);
        }
        Ok((id, name))
    }

    /// Snapshots sandbox `prefix` as `name` for the control plane; its
    /// size on disk. An `ephemeral` one (a fork's) is held by this process
    /// until each of `hold_for` registered as its user (was restored from
    /// it) or [`FORK_HOLD`] passed, then goes with its last user.
    pub async fn snapshot_for_server(
        &self,
        prefix: &str,
        name: &str,
        ephemeral: bool,
        hold_for: Vec<String>,
    ) -> Result<u64, SnapshotOpError> {
        let (_, name) = self
            .take_snapshot(prefix, Some(name.to_owned()), ephemeral)
            .await?;
        let snapshots = self.snapshots();
        if ephemeral {
            let holder = snapshot::holder_name(crate::store::ProcessIdentity::current());
            if let Err(e) = snapshots.add_user(&name, &holder) {
                let _ = snapshots.remove(&name, |_| false);
                return Err(SnapshotOpError::Hold(e));
            }
            let held = snapshots.clone();
            let n = name.clone();
            tokio::spawn(async move {
                // Each fork registers when restored and leaves when it
                // ends, possibly before this looks again: the restores are
                // also marked in `restored/` (kept with the snapshot), and
                // "seen once" counts, not "all there at once" (which held
                // the snapshot for the whole FORK_HOLD).
                let deadline = Instant::now() + FORK_HOLD;
                let mut seen = std::collections::BTreeSet::new();
                while Instant::now() < deadline {
                    let users = held.restored(&n);
                    seen.extend(hold_for.iter().filter(|id| users.contains(id)).cloned());
                    if seen.len()
                        == hold_for
                            .iter()
                            .collect::<std::collections::BTreeSet<_>>()
                            .len()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                held.release_user(&n, &holder);
            });
        }
        Ok(snapshot::disk_usage(&snapshots.dir(&name)))
    }

    /// Every snapshot (holds of dead forks dropped first).
    pub fn list_snapshots(&self) -> Result<Vec<snapshot::SnapshotEntry>, SnapshotOpError> {
        let snapshots = self.snapshots();
        snapshots.release_dead_holders();
        Ok(snapshots.list()?)
    }

    /// Removes snapshot `name`; refused while sandboxes restored from it
    /// run.
    pub fn remove_snapshot(&self, name: &str) -> Result<(), SnapshotOpError> {
        Ok(self.snapshots().remove(name, |user| self.alive(user))?)
    }

    /// Checks snapshot `name` completely against this host (`contents`:
    /// also every file's digest). Nothing is created.
    pub fn verify_snapshot(&self, name: &str, contents: bool) -> Result<Manifest, SnapshotOpError> {
        let snapshots = self.snapshots();
        let m = snapshots.manifest(name)?;
        let artifacts = GuestArtifacts::locate(self.dirs())?;
        let choice = match m.driver.kind {
            DriverKind::Qemu => DriverChoice::Qemu,
            DriverKind::Firecracker => DriverChoice::Firecracker,
        };
        let (driver, _) = crate::vm::driver_for(choice)?;
        let guest =
            snapshot::guest_digests(&artifacts, driver.kind()).map_err(SnapshotOpError::Hash)?;
        let t0 = Instant::now();
        let m = snapshots.verify(name, &guest, driver.info(), contents)?;
        tracing::info!(
            snapshot = name,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "snapshot verified"
        );
        Ok(m)
    }

    /// Creates the record of a sandbox restored from `m` and registers it
    /// as a user of the snapshot. When the snapshot's sandbox had a network,
    /// the new one gets its own (tap, lease, MAC, policy program) with
    /// `policy`, else the policy the snapshot's sandbox was attached with;
    /// the guest takes the new address and MAC from the identity push after
    /// the restore (docs/networking.md, "Restores, forks and warm starts").
    fn create_restored(
        &self,
        m: &Manifest,
        policy: Option<&kiln_net::Policy>,
        id: Option<String>,
    ) -> Result<SandboxRecord, SnapshotOpError> {
        let mut spec = m.spec.clone();
        spec.auto_remove = false;
        let parent_net = spec.network.take();
        let mut rec = match id {
            Some(id) => self.store.create_with_id(id, spec)?,
            None => self.store.create(spec)?,
        };
        rec.restored_from = Some(m.name.clone());
        if let Some(parent) = parent_net {
            let policy = policy
                .cloned()
                .or(parent.policy)
                .unwrap_or_else(|| kiln_net::Preset::InternetOnly.policy());
            let attached = super::open_network(self.dirs())
                .map_err(SnapshotOpError::from)
                .and_then(|net| {
                    net.attach(&rec.id, kiln_net::Endpoint::Tap, &policy)
                        .map_err(SnapshotOpError::from)
                });
            match attached {
                Ok(a) => rec.spec.network = Some(a),
                Err(e) => {
                    super::release_network(self.dirs(), &rec.id);
                    let _ = self.store.remove(&rec.id);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.store.save(&rec) {
            super::release_network(self.dirs(), &rec.id);
            let _ = self.store.remove(&rec.id);
            return Err(e.into());
        }
        if let Err(source) = self.snapshots().add_user(&m.name, &rec.id) {
            super::release_network(self.dirs(), &rec.id);
            let _ = self.store.remove(&rec.id);
            return Err(SnapshotOpError::Register {
                name: m.name.clone(),
                source,
            });
        }
        if m.ephemeral {
            // For the hold of a fork (`snapshot_for_server`): a fork may
            // end before the hold looks at `users/` again.
            self.snapshots().mark_restored(&m.name, &rec.id);
        }
        Ok(rec)
    }

    /// A new sandbox from snapshot `name`, checked completely first;
    /// returns once its supervisor reported.
    pub async fn restore(&self, name: &str) -> Result<Restored, SnapshotOpError> {
        self.restore_as(name, None).await
    }

    /// [`Node::restore`] with the sandbox ID the control plane chose
    /// (`None`: a fresh one); refused when a sandbox of that ID exists.
    pub async fn restore_as(
        &self,
        name: &str,
        id: Option<String>,
    ) -> Result<Restored, SnapshotOpError> {
        let t0 = Instant::now();
        let m = self.verify_snapshot(name, true)?;
        let record = self.create_restored(&m, None, id)?;
        let prepared_ms = t0.elapsed().as_millis() as u64;
        let (ready, shim_pid) = match self.spawn_supervisor(&record).await {
            Ok(r) => r,
            Err(e) => {
                self.snapshots().release_user(name, &record.id);
                super::release_network(self.dirs(), &record.id);
                return Err(e.into());
            }
        };
        Ok(Restored {
            record,
            ready,
            shim_pid,
            prepared_ms,
        })
    }

    /// `n` independent copies of sandbox `prefix`: one snapshot, `n`
    /// concurrent restores. The snapshot is ephemeral: the restored VMs map
    /// its memory, so it stays until the last fork's supervisor releases it
    /// (see `crate::snapshot`); this process holds it meanwhile. Forks that
    /// fail are removed and reported; the others run.
    pub async fn fork(&self, prefix: &str, n: u32) -> Result<ForkOutcome, SnapshotOpError> {
        if n == 0 || n > MAX_FORKS {
            return Err(SnapshotOpError::ForkCount(n));
        }
        let t0 = Instant::now();
        let (id, name) = self.take_snapshot(prefix, None, true).await?;
        // Forks take the source's policy as it is now (`kiln policy set`
        // may have changed it since the run).
        let live_policy = match self.store.load(&id)?.spec.network {
            Some(_) => super::open_network_view(self.dirs())
                .ok()
                .and_then(|net| net.policy(&id).ok())
                .map(|(p, _)| p),
            None => None,
        };
        let snapshots = self.snapshots();
        let holder = snapshot::holder_name(crate::store::ProcessIdentity::current());
        if let Err(e) = snapshots.add_user(&name, &holder) {
            // Nobody else uses it yet: removing it is safe.
            let _ = snapshots.remove(&name, |_| false);
            return Err(SnapshotOpError::Hold(e));
        }
        tracing::info!(sandbox = %id, snapshot = %name, elapsed_ms = t0.elapsed().as_millis() as u64, "fork snapshot taken");
        let result = async {
            let m = self.verify_snapshot(&name, false)?;
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let rec = self.create_restored(&m, live_policy.as_ref(), None)?;
                let node = self.clone();
                tasks.spawn(async move {
                    let r = node.spawn_supervisor(&rec).await;
                    (i, rec, r)
                });
            }
            let mut done = vec![];
            while let Some(j) = tasks.join_next().await {
                done.push(j.map_err(SnapshotOpError::Task)?);
            }
            done.sort_by_key(|(i, _, _)| *i);
            Ok::<_, SnapshotOpError>(done)
        }
        .await;
        let done = match result {
            Ok(d) => d,
            Err(e) => {
                snapshots.release_user(&name, &holder);
                return Err(e);
            }
        };
        let mut out = ForkOutcome {
            source: id.clone(),
            ..ForkOutcome::default()
        };
        for (i, rec, r) in done {
            let error = match r {
                Ok((ready, _)) if ready.ok => {
                    out.ids.push(rec.id);
                    continue;
                }
                Ok((ready, shim_pid)) => {
                    // Never shown to the user as a sandbox: remove it.
                    let _ = self
                        .wait_supervisor_gone(&rec.id, Duration::from_secs(30), Some(shim_pid))
                        .await;
                    ready
                        .error
                        .unwrap_or_else(|| "the sandbox failed to start".into())
                }
                Err(e) => {
                    snapshots.release_user(&name, &rec.id);
                    super::release_network(self.dirs(), &rec.id);
                    crate::error_chain(&e)
                }
            };
            if let Ok(r) = self.store.load(&rec.id)
                && !matches!(
                    r.state,
                    SandboxState::Running { .. } | SandboxState::Paused { .. }
                )
            {
                let _ = self.store.remove(&rec.id);
            }
            out.failed.push((i + 1, error));
        }
        snapshots.release_user(&name, &holder);
        tracing::info!(sandbox = %id, forks = n, failed = out.failed.len(), elapsed_ms = t0.elapsed().as_millis() as u64, "fork done");
        Ok(out)
    }
}
