//! What the daemon acts on: the node service with real microVMs, or the
//! dry-run node (`kiln node --dry-run`), which records sandboxes as running
//! without booting anything and otherwise behaves (and reports) alike.
//!
//! Ownership markers: `<state>/node/owned/<id>.json` names each sandbox the
//! daemon created or adopted for the server, with the generation it
//! converged to and, for one that has no record (it could not be created,
//! or was removed on the server's request), its final state. A marker is
//! written before the sandbox is created, so a daemon killed at any point
//! finds every sandbox it started after a restart. Sandboxes without a
//! marker (`kiln run` in the same state directory) are not the daemon's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_api::sandbox::{SandboxId, SandboxSpec, SandboxState, StartReport};
use serde::{Deserialize, Serialize};

use crate::node::{Node, RunRequest};
use crate::store::now_secs;

/// The daemon's note on one sandbox it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    /// The generation it converged to (0: none yet).
    pub converged: u64,
    /// Its final state when it has no record (never created, or removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<SandboxState>,
    /// The network (and so the policy) it was created with or last had
    /// applied by the daemon (`None`: unknown, e.g. adopted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<kiln_api::sandbox::NetworkSpec>,
    /// How its start went (reported to the server with its state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<kiln_api::sandbox::StartReport>,
}

/// Node template → the name `tenant` knows it by: its own server template
/// made as that node template, else a shared one (made with an admin
/// token). Another tenant's name for the same node template is never
/// shown (several server templates may share one node template).
fn template_names(node: &Node, tenant: &kiln_api::cluster::TenantName) -> BTreeMap<String, String> {
    names_for(&super::templates::load_made(node), tenant)
}

/// [`template_names`] of the daemon's map `made` (pure).
fn names_for(
    made: &BTreeMap<String, super::templates::Made>,
    tenant: &kiln_api::cluster::TenantName,
) -> BTreeMap<String, String> {
    let own = format!("{tenant}/");
    let mut names = BTreeMap::new();
    // Shared ones first, so the tenant's own name wins.
    for (key, m) in made
        .iter()
        .filter(|(k, _)| !k.contains('/') && !super::templates::is_retired(k))
    {
        names.insert(m.local.clone(), key.clone());
    }
    for (key, m) in made {
        if let Some(name) = key.strip_prefix(&own) {
            names.insert(m.local.clone(), name.to_owned());
        }
    }
    names
}

/// An action on a sandbox failed (logged; the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Run(#[from] crate::node::RunError),
    #[error(transparent)]
    Op(#[from] crate::node::SandboxOpError),
    #[error("cannot write the ownership marker {path}")]
    Marker {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {0} is not on this node")]
    Missing(String),
    #[error(transparent)]
    Policy(#[from] crate::node::PolicyOpError),
    #[error(transparent)]
    Snapshot(#[from] crate::node::SnapshotOpError),
    /// A restore failed; the message names the snapshot as its tenant
    /// knows it (not the node's `TENANT.NAME`).
    #[error("{0}")]
    Restore(String),
}

/// A sandbox's final state when it was stopped before it ever started.
pub fn never_started(why: &str) -> SandboxState {
    SandboxState::Failed {
        error: format!("{why} before it started"),
        exit_code: 255,
    }
}

/// Real microVMs (the node service) or the dry-run node.
#[derive(Debug, Clone)]
pub enum Backend {
    Real(RealBackend),
    DryRun(DryRun),
}

#[derive(Debug, Clone)]
pub struct RealBackend {
    pub node: Node,
    pub insecure_registries: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL for desired `stopped`.
    pub stop_grace: u64,
}

/// The dry-run node's sandboxes: in memory, gone with the process (after a
/// restart they are created again, as records of nothing).
#[derive(Debug, Clone, Default)]
pub struct DryRun {
    inner: Arc<Mutex<DryState>>,
}

#[derive(Debug, Default)]
struct DryState {
    records: BTreeMap<SandboxId, SandboxState>,
    markers: BTreeMap<SandboxId, Marker>,
}

fn dry_exit(signal: i32) -> SandboxState {
    SandboxState::Exited {
        exit_code: 128 + signal,
        signal: Some(signal),
        finished_at: now_secs(),
        timed_out: false,
    }
}

impl DryRun {
    fn lock(&self) -> std::sync::MutexGuard<'_, DryState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend {
    /// The sandboxes on the node (pool members excluded) with their
    /// current state, and the daemon's markers.
    pub async fn observe(
        &self,
    ) -> (
        BTreeMap<SandboxId, SandboxState>,
        BTreeMap<SandboxId, Marker>,
    ) {
        match self {
            Backend::DryRun(d) => {
                let s = d.lock();
                (s.records.clone(), s.markers.clone())
            }
            Backend::Real(r) => {
                let node = r.node.clone();
                let (records, markers, orphans) = tokio::task::spawn_blocking(move || {
                    let mut records = BTreeMap::new();
                    let mut orphans = false;
                    match node.store().list() {
                        Ok(list) => {
                            for rec in list.into_iter().filter(|r| r.pool.is_none()) {
                                // A VM whose supervisor died: nobody serves
                                // it until the reconciler reaps it.
                                orphans |= rec.vm.is_some() && !rec.shim_alive();
                                let rec = node.refresh(rec);
                                if let Ok(id) = SandboxId::try_from(rec.id.clone()) {
                                    records.insert(id, rec.state);
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot list the node's sandboxes"),
                    }
                    (records, read_markers(&markers_dir(&node)), orphans)
                })
                .await
                .unwrap_or_default();
                if orphans {
                    // At once, not at the next periodic pass: the VMM holds
                    // memory and its supervisor will never release it.
                    self.reconcile().await;
                }
                (records, markers)
            }
        }
    }

    /// Records `marker` for `id` (atomically, before acting on it).
    pub fn set_marker(&self, id: &SandboxId, marker: &Marker) -> Result<(), BackendError> {
        match self {
            Backend::DryRun(d) => {
                d.lock().markers.insert(id.clone(), marker.clone());
                Ok(())
            }
            Backend::Real(r) => {
                let dir = markers_dir(&r.node);
                let path = dir.join(format!("{id}.json"));
                let tmp = dir.join(format!(".{id}.json.tmp"));
                let body = serde_json::to_vec(marker).expect("markers always serialize");
                let err = |source| BackendError::Marker {
                    path: path.clone(),
                    source,
                };
                std::fs::create_dir_all(&dir).map_err(err)?;
                write_synced(&tmp, &body).map_err(err)?;
                std::fs::rename(&tmp, &path).map_err(err)
            }
        }
    }

    pub fn marker(&self, id: &SandboxId) -> Option<Marker> {
        match self {
            Backend::DryRun(d) => d.lock().markers.get(id).cloned(),
            Backend::Real(r) => {
                let path = markers_dir(&r.node).join(format!("{id}.json"));
                let body = std::fs::read(path).ok()?;
                serde_json::from_slice(&body).ok()
            }
        }
    }

    pub fn drop_marker(&self, id: &SandboxId) {
        match self {
            Backend::DryRun(d) => {
                d.lock().markers.remove(id);
            }
            Backend::Real(r) => {
                let path = markers_dir(&r.node).join(format!("{id}.json"));
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(error = %e, path = %path.display(), "cannot remove the ownership marker");
                }
            }
        }
    }

    /// Whether sandbox `id` has a record on the node.
    pub fn has_record(&self, id: &SandboxId) -> bool {
        match self {
            Backend::DryRun(d) => d.lock().records.contains_key(id),
            Backend::Real(r) => r
                .node
                .store()
                .dir(id.as_str())
                .join("record.json")
                .is_file(),
        }
    }

    /// Starts sandbox `id` from `spec` (the caller wrote its marker); how
    /// the start went (`None` in dry-run mode, which starts nothing).
    pub async fn create(
        &self,
        id: &SandboxId,
        tenant: &kiln_api::cluster::TenantName,
        spec: &SandboxSpec,
    ) -> Result<Option<StartReport>, BackendError> {
        match self {
            Backend::DryRun(d) => {
                let mut s = d.lock();
                if s.records.contains_key(id) {
                    return Err(BackendError::Run(crate::node::RunError::Store(
                        crate::store::StoreError::Exists(id.to_string()),
                    )));
                }
                s.records
                    .insert(id.clone(), SandboxState::Running { main_pid: 1 });
                Ok(None)
            }
            Backend::Real(r) => {
                let t0 = std::time::Instant::now();
                let template_names = template_names(&r.node, tenant);
                let req = RunRequest {
                    spec: spec.clone(),
                    pull: spec.pull.into(),
                    insecure_registries: r.insecure_registries.clone(),
                    id: Some(id.to_string()),
                    template_names,
                };
                let started = r.node.run(&req, &kiln_image::NoProgress).await?;
                tracing::info!(sandbox = %id, path = ?started.path, notes = ?started.notes, "started");
                if !started.ready.ok {
                    tracing::warn!(sandbox = %id, error = ?started.ready.error, "the sandbox did not start");
                }
                let mut report = started.report(t0.elapsed().as_millis() as u64);
                // The tenant's name of the node template (the notes have
                // it already).
                if let Some(t) = &mut report.template
                    && let Some(shown) = req.template_names.get(t)
                {
                    t.clone_from(shown);
                }
                Ok(Some(report))
            }
        }
    }

    /// Starts sandbox `id` as a restore of `tenant`'s snapshot `name` (on
    /// this node: `kiln_api::rest::node_snapshot_name`), the caller wrote
    /// its marker. An ID that exists already is `Run(Store(Exists))`, as
    /// for [`Backend::create`].
    pub async fn restore(
        &self,
        id: &SandboxId,
        tenant: &kiln_api::cluster::TenantName,
        name: &str,
    ) -> Result<Option<StartReport>, BackendError> {
        let local = kiln_api::rest::node_snapshot_name(tenant, name).ok_or_else(|| {
            BackendError::Missing(format!("snapshot {name:?}: the name is too long"))
        })?;
        match self {
            Backend::DryRun(d) => {
                let mut s = d.lock();
                if s.records.contains_key(id) {
                    return Err(BackendError::Run(crate::node::RunError::Store(
                        crate::store::StoreError::Exists(id.to_string()),
                    )));
                }
                s.records
                    .insert(id.clone(), SandboxState::Running { main_pid: 1 });
                Ok(None)
            }
            Backend::Real(r) => {
                let t0 = std::time::Instant::now();
                match r.node.restore_as(&local, Some(id.to_string())).await {
                    Ok(restored) => {
                        if !restored.ready.ok {
                            tracing::warn!(sandbox = %id, error = ?restored.ready.error, "the restored sandbox did not start");
                        }
                        let ready_ms = t0.elapsed().as_millis() as u64;
                        let mut phases = crate::node::start_phases(
                            0,
                            restored.prepared_ms,
                            ready_ms,
                            restored.ready.timings,
                            true,
                        );
                        // A restore resolves no image.
                        phases.remove(0);
                        Ok(Some(StartReport {
                            path: kiln_api::sandbox::StartKind::Restore,
                            template: None,
                            notes: vec![format!("restored from snapshot {name}")],
                            phases,
                            ready_ms,
                        }))
                    }
                    Err(crate::node::SnapshotOpError::Store(
                        e @ crate::store::StoreError::Exists(_),
                    )) => Err(BackendError::Run(crate::node::RunError::Store(e))),
                    Err(e) => Err(BackendError::Restore(
                        e.to_string()
                            .replace(&format!("snapshot {local}"), &format!("snapshot {name}")),
                    )),
                }
            }
        }
    }

    /// Enforces `net`'s policy on running sandbox `id` live, through the
    /// node service path of `kiln policy set` (maps rewritten in place).
    pub async fn update_policy(
        &self,
        id: &SandboxId,
        net: &kiln_api::sandbox::NetworkSpec,
    ) -> Result<(), BackendError> {
        match self {
            Backend::DryRun(d) => {
                if !d.lock().records.contains_key(id) {
                    return Err(BackendError::Missing(id.to_string()));
                }
                Ok(())
            }
            Backend::Real(r) => {
                let (node, id, net) = (r.node.clone(), id.to_string(), net.clone());
                tokio::task::spawn_blocking(move || node.set_policy(&id, &net).map(|_| ()))
                    .await
                    .map_err(|e| BackendError::Missing(format!("policy update task: {e}")))??;
                Ok(())
            }
        }
    }

    /// Keeps the cluster's other nodes' addresses protected on this node
    /// (`kiln_net::protect::CLUSTER_FILE`) and, when they changed,
    /// recompiles the running sandboxes' policies against them.
    pub async fn protect_cluster(&self, addrs: &[std::net::Ipv4Addr]) {
        let Backend::Real(r) = self else {
            return;
        };
        let ranges: Vec<kiln_net::protect::Ipv4Net> = addrs
            .iter()
            .map(|a| kiln_net::protect::Ipv4Net::from(*a))
            .collect();
        let node = r.node.clone();
        let done = tokio::task::spawn_blocking(move || {
            let net_dir = node.dirs().state.join("net");
            match kiln_net::protect::write_cluster_file(&net_dir, &ranges) {
                Ok(true) => {
                    let n = node.refresh_protected();
                    tracing::info!(
                        nodes = ranges.len(),
                        refreshed = n,
                        "other nodes' addresses protected"
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot protect the other nodes' addresses"),
            }
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "protecting the other nodes' addresses failed");
        }
    }

    pub async fn pause(&self, id: &SandboxId) -> Result<(), BackendError> {
        self.simple(id, true).await
    }

    pub async fn resume(&self, id: &SandboxId) -> Result<(), BackendError> {
        self.simple(id, false).await
    }

    async fn simple(&self, id: &SandboxId, pause: bool) -> Result<(), BackendError> {
        match self {
            Backend::DryRun(d) => {
                let mut s = d.lock();
                let st = s
                    .records
                    .get_mut(id)
                    .ok_or_else(|| BackendError::Missing(id.to_string()))?;
                *st = match (pause, &*st) {
                    (true, SandboxState::Running { main_pid }) => SandboxState::Paused {
                        main_pid: *main_pid,
                    },
                    (false, SandboxState::Paused { main_pid }) => SandboxState::Running {
                        main_pid: *main_pid,
                    },
                    (_, other) => other.clone(),
                };
                Ok(())
            }
            Backend::Real(r) => {
                if pause {
                    r.node.pause(id.as_str()).await?;
                } else {
                    r.node.resume(id.as_str()).await?;
                }
                Ok(())
            }
        }
    }

    /// Stops sandbox `id` (`grace` seconds from SIGTERM to SIGKILL); its
    /// record stays.
    pub async fn stop(&self, id: &SandboxId, grace: Option<u64>) -> Result<(), BackendError> {
        match self {
            Backend::DryRun(d) => {
                let mut s = d.lock();
                if let Some(st) = s.records.get_mut(id)
                    && !st.is_finished()
                {
                    *st = dry_exit(15);
                }
                Ok(())
            }
            Backend::Real(r) => {
                let grace = grace.unwrap_or(r.stop_grace);
                if let Ok(rec) = r.node.get(id.as_str())
                    && matches!(rec.state, SandboxState::Paused { .. })
                {
                    r.node.resume(id.as_str()).await?;
                }
                r.node.stop(id.as_str(), grace).await?;
                Ok(())
            }
        }
    }

    /// Stops (at once) and removes sandbox `id`; its final state (`None`:
    /// there was none).
    pub async fn remove(&self, id: &SandboxId) -> Result<Option<SandboxState>, BackendError> {
        match self {
            Backend::DryRun(d) => {
                let mut s = d.lock();
                Ok(s.records
                    .remove(id)
                    .map(|st| if st.is_finished() { st } else { dry_exit(9) }))
            }
            Backend::Real(r) => {
                let rec = match r.node.get(id.as_str()) {
                    Ok(rec) => rec,
                    Err(crate::node::SandboxOpError::Store(
                        crate::store::StoreError::NotFound(_),
                    )) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                };
                let mut last = rec.state.clone();
                if !rec.state.is_finished() && !matches!(rec.state, SandboxState::Creating) {
                    match self.stop(id, Some(0)).await {
                        Ok(()) => {
                            if let Ok(rec) = r.node.get(id.as_str()) {
                                last = rec.state;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(sandbox = %id, error = %e, "stop before removal failed; killing")
                        }
                    }
                }
                r.node.remove(id.as_str(), true).await?;
                if !last.is_finished() {
                    last = SandboxState::Exited {
                        exit_code: 137,
                        signal: Some(9),
                        finished_at: now_secs(),
                        timed_out: false,
                    };
                }
                Ok(Some(last))
            }
        }
    }

    /// Waits until sandbox `id` has ended (returns at once if it is not
    /// there); for the real node, through its supervisor.
    pub async fn wait_exit(&self, id: &SandboxId) {
        if let Backend::Real(r) = self
            && let Err(e) = r.node.wait(id.as_str()).await
        {
            tracing::debug!(sandbox = %id, error = %e, "wait ended");
        }
    }

    /// One pass of the node's own reconciler (real node only).
    pub async fn reconcile(&self) {
        if let Backend::Real(r) = self {
            let done = r.node.reconcile().await;
            if done.orphans > 0 || done.staging > 0 {
                tracing::info!(
                    orphans = done.orphans,
                    staging = done.staging,
                    "reconciled the node"
                );
            }
        }
    }

    pub fn is_dry_run(&self) -> bool {
        matches!(self, Backend::DryRun(_))
    }
}

fn markers_dir(node: &Node) -> PathBuf {
    node.dirs().state.join("node").join("owned")
}

fn read_markers(dir: &std::path::Path) -> BTreeMap<SandboxId, Marker> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let Ok(id) = SandboxId::try_from(stem.to_string()) else {
            continue;
        };
        match std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
        {
            Some(m) => {
                out.insert(id, m);
            }
            None => {
                // A torn write cannot happen (rename); an unreadable marker
                // still says the sandbox is ours.
                tracing::warn!(sandbox = %id, "unreadable ownership marker; keeping ownership");
                out.insert(id, Marker::default());
            }
        }
    }
    out
}

pub(crate) fn write_synced(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_sees_its_own_names_of_node_templates_never_anothers() {
        let made = |local: &str| super::super::templates::Made {
            local: local.into(),
            image: "busybox".into(),
            resources: Default::default(),
        };
        let map: BTreeMap<String, _> = [
            ("shared", made("tpl-1")),
            ("acme/mine", made("tpl-1")),
            ("other/theirs", made("tpl-2")),
            ("acme/x", made("tpl-3")),
            ("common", made("tpl-4")),
            ("retired:tpl-5", made("tpl-5")),
        ]
        .into_iter()
        .map(|(k, m)| (k.to_owned(), m))
        .collect();
        let acme = kiln_api::cluster::TenantName::new("acme").expect("name");
        let names = names_for(&map, &acme);
        assert_eq!(names.get("tpl-1").map(String::as_str), Some("mine"));
        assert_eq!(names.get("tpl-3").map(String::as_str), Some("x"));
        assert_eq!(names.get("tpl-4").map(String::as_str), Some("common"));
        assert!(
            !names.contains_key("tpl-2"),
            "another tenant's name: {names:?}"
        );
        assert!(
            !names.contains_key("tpl-5"),
            "a replaced build is nobody's: {names:?}"
        );
    }
}
