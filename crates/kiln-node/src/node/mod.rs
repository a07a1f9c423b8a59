//! The node service: everything one host does with sandboxes, as one set of
//! operations that every front door (the `kiln` CLI today; `kiln node`,
//! the REST API and the E2B gateway next) calls. No front door holds
//! sandbox logic of its own.
//!
//! Invariants:
//! - A sandbox is a record in the state directory (`store`) plus, while it
//!   runs, one supervisor process (`kiln shim ID`, spawned detached by
//!   [`Node::spawn_supervisor`]) that owns its VMM. The supervisor outlives
//!   whatever started it, so a node process may die and be restarted
//!   without touching running sandboxes.
//! - One liveness rule: a process is identified by its pid and start time
//!   ([`crate::store::ProcessIdentity`]: supervisors, template creators,
//!   fork holds, staging and work directories), so a reused pid never makes
//!   a dead owner look alive; it is alive while `/proc/PID` exists with that
//!   start time and is not a zombie. (Records written before the start time
//!   was recorded fall back to the pid alone.)
//! - Cleanup is level-triggered: [`Node::reconcile`] observes records,
//!   pools, holds and processes, and repairs what a killed process left
//!   (orphaned VMs, dead pool members, holds of dead forks, template VMs of
//!   dead creators, staging directories of dead snapshotters). Commands call
//!   it where they must see a clean state; it is idempotent.
//! - The run path is warm → pool → cold ([`Node::run`]): a pool member if
//!   the image's template has one ready, else a restore of the template,
//!   else a boot; each step that fails falls back to the next and says why.

mod images;
mod lifecycle;
mod pools;
mod reconcile;
mod run;
mod snapshots;
mod templates;

use std::path::PathBuf;

pub use images::{ImageOpError, ImageUsers, PullPolicy, PulledImage, RemoveVerdict};
pub use images::{decide as decide_image_removal, short_digest};
pub use lifecycle::{ExecSpec, SandboxOpError, SupervisorError};
pub use pools::{Filled, PoolError};
pub use reconcile::Reconciled;
pub use run::{RunError, RunRequest, StartPath, Started, start_phases};
pub use snapshots::{FORK_HOLD, ForkOutcome, MAX_FORKS, Restored, SnapshotOpError};
pub use templates::{
    TemplateCreated, TemplateEntry, TemplateOpError, TemplateRequest, TemplateStatus,
};

use crate::paths::Dirs;
use crate::snapshot::SnapshotStore;
use crate::store::Store;

/// How a node behaves (defaults in code; `from_env` reads the overrides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// After a cold start, make the image's template in the background so
    /// the next run of it starts warm (`KILN_AUTO_TEMPLATES=0` turns it
    /// off). Default on.
    pub auto_templates: bool,
    /// Disk the automatic templates may take together, MiB
    /// (`KILN_TEMPLATE_BUDGET_MIB`); the least recently used ones not in
    /// use are evicted past it. Default 8192.
    pub template_budget_mib: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            auto_templates: true,
            template_budget_mib: 8192,
        }
    }
}

impl NodeConfig {
    /// The defaults, with `KILN_AUTO_TEMPLATES` and
    /// `KILN_TEMPLATE_BUDGET_MIB` applied (an unparsable value is ignored
    /// with a warning).
    pub fn from_env() -> NodeConfig {
        let mut c = NodeConfig::default();
        if let Ok(v) = std::env::var("KILN_AUTO_TEMPLATES") {
            match v.trim() {
                "0" | "false" | "off" | "no" => c.auto_templates = false,
                "1" | "true" | "on" | "yes" => c.auto_templates = true,
                other => tracing::warn!(value = other, "KILN_AUTO_TEMPLATES: expected on or off"),
            }
        }
        if let Ok(v) = std::env::var("KILN_TEMPLATE_BUDGET_MIB") {
            match v.trim().parse() {
                Ok(n) => c.template_budget_mib = n,
                Err(_) => tracing::warn!(value = %v, "KILN_TEMPLATE_BUDGET_MIB: expected MiB"),
            }
        }
        c
    }
}

/// One host's sandbox service.
#[derive(Debug, Clone)]
pub struct Node {
    store: Store,
    /// The `kiln` executable whose `shim` subcommand supervises a sandbox.
    supervisor_exe: PathBuf,
    config: NodeConfig,
}

impl Node {
    /// The node over `dirs`; supervisors are started from this executable.
    /// Makes the state directory private (it may predate Kiln's umask).
    pub fn open(dirs: Dirs) -> Node {
        let state = &dirs.state;
        if std::fs::create_dir_all(state).is_ok() {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            // Never a shared directory (sticky bit, e.g. /tmp) or one of
            // another user: those are not Kiln's to lock down.
            let ours = std::fs::metadata(state)
                .is_ok_and(|m| m.mode() & 0o1000 == 0 && m.uid() == nix::unistd::getuid().as_raw());
            let set = if ours {
                std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
            } else {
                tracing::warn!(dir = %state.display(), "the state directory is shared or not ours: left as it is");
                Ok(())
            };
            if let Err(e) = set {
                tracing::warn!(error = %e, dir = %state.display(), "cannot make the state directory private");
            }
        }
        register_state_dir(&dirs);
        Node {
            store: Store::new(dirs),
            supervisor_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kiln")),
            config: NodeConfig::from_env(),
        }
    }

    pub fn with_config(mut self, config: NodeConfig) -> Node {
        self.config = config;
        self
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The state directories that use this node's cache (this one first):
    /// each registers itself in `<cache>/state-dirs/` when opened; those
    /// that no longer exist are dropped from the list.
    pub fn state_dirs_sharing_cache(&self) -> Vec<PathBuf> {
        let own = self.dirs().state.clone();
        let own_canonical = std::fs::canonicalize(&own).unwrap_or_else(|_| own.clone());
        let mut out = vec![own.clone()];
        let reg = self.dirs().cache.join(STATE_DIRS);
        let Ok(rd) = std::fs::read_dir(&reg) else {
            return out;
        };
        for e in rd.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let dir = PathBuf::from(text.trim_end_matches('\n'));
            if dir == own || dir == own_canonical || out.contains(&dir) {
                continue;
            }
            if dir.is_dir() {
                out.push(dir);
            } else {
                let _ = std::fs::remove_file(e.path());
            }
        }
        out
    }

    /// Supervisors are started as `EXE shim ID` (tests point this at the
    /// `kiln` binary).
    pub fn with_supervisor_exe(mut self, exe: PathBuf) -> Node {
        self.supervisor_exe = exe;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn dirs(&self) -> &Dirs {
        self.store.dirs()
    }

    pub fn snapshots(&self) -> SnapshotStore {
        SnapshotStore::new(self.dirs())
    }

    pub fn templates(&self) -> SnapshotStore {
        crate::template::store(self.dirs())
    }
}

/// The node's network configuration: IPAM and saved policies under
/// `<state>/net`, guests resolving through the node's resolver (see
/// [`crate::dns`]), and the infrastructure ranges (`KILN_PROTECTED_CIDRS`
/// and what `kiln node` wrote at start: its flags and its servers'
/// addresses). An invalid `KILN_PROTECTED_CIDRS` fails here, before
/// anything is made.
fn net_config(dirs: &Dirs) -> Result<kiln_net::NetConfig, kiln_net::OpenNetworkError> {
    let net_dir = dirs.state.join("net");
    let mut cfg = kiln_net::NetConfig::new(&net_dir);
    cfg.resolver = true;
    cfg.protected = kiln_net::protect::configured(&net_dir)?;
    Ok(cfg)
}

/// The node's sandbox network (bridge, NAT, IPAM under `<state>/net`),
/// set up idempotently.
pub fn open_network(dirs: &Dirs) -> Result<kiln_net::Network, kiln_net::OpenNetworkError> {
    kiln_net::Network::open(net_config(dirs)?)
}

/// [`open_network`]'s configuration as a [`kiln_net::Network::view`]:
/// per-sandbox maps and files only, nothing set up on the host.
pub fn open_network_view(dirs: &Dirs) -> Result<kiln_net::Network, kiln_net::OpenNetworkError> {
    kiln_net::Network::view(net_config(dirs)?)
}

/// [`open_network`]'s configuration for cleanup only
/// ([`kiln_net::Network::for_cleanup`]): releasing a sandbox or
/// reconciling never creates the bridge or the NAT rules again.
pub fn open_network_cleanup(dirs: &Dirs) -> Result<kiln_net::Network, kiln_net::OpenNetworkError> {
    kiln_net::Network::for_cleanup(net_config(dirs)?)
}

/// Detaches sandbox `id` from the network if it has ever been on it (tap,
/// lease, policy program); idempotent; errors are logged.
pub fn release_network(dirs: &Dirs, id: &str) {
    let net_dir = dirs.state.join("net");
    if !net_dir.is_dir() {
        return;
    }
    match open_network_cleanup(dirs) {
        Ok(net) => {
            if let Err(e) = net.detach(id) {
                tracing::warn!(sandbox = %id, error = %e, "cannot release the sandbox's network");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot open the sandbox network"),
    }
}

/// Where state directories register as users of a cache.
const STATE_DIRS: &str = "state-dirs";

/// Records `dirs.state` as a user of `dirs.cache` (idempotent; atomic).
fn register_state_dir(dirs: &Dirs) {
    use sha2::{Digest, Sha256};
    let state = std::fs::canonicalize(&dirs.state).unwrap_or_else(|_| dirs.state.clone());
    let key = hex_prefix(&Sha256::digest(state.as_os_str().as_encoded_bytes()));
    let reg = dirs.cache.join(STATE_DIRS);
    let path = reg.join(&key);
    if path.is_file() {
        return;
    }
    let tmp = reg.join(format!(".{key}.{}", std::process::id()));
    let written = std::fs::create_dir_all(&reg)
        .and_then(|()| std::fs::write(&tmp, format!("{}\n", state.display())))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(error = %e, cache = %dirs.cache.display(), "cannot register the state directory with the cache");
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A sandbox's network policy could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyOpError {
    #[error(transparent)]
    Sandbox(#[from] SandboxOpError),
    #[error("sandbox {0} has no network (it was started with --net none)")]
    NoNetwork(String),
    #[error("sandbox {0} has ended: its network is gone")]
    Ended(String),
    #[error("network policy: {0}")]
    Policy(#[from] kiln_net::policy::LoadPolicyError),
    #[error("cannot open the sandbox network")]
    Open(#[from] kiln_net::OpenNetworkError),
    #[error(transparent)]
    Update(#[from] kiln_net::UpdatePolicyError),
}

impl Node {
    /// The policy of sandbox `prefix` and its counters.
    pub fn policy(
        &self,
        prefix: &str,
    ) -> Result<(String, kiln_net::Policy, kiln_net::Counters), PolicyOpError> {
        let rec = self.networked(prefix)?;
        let (policy, counters) = open_network(self.dirs())?.policy(&rec)?;
        Ok((rec, policy, counters))
    }

    /// Sandbox `prefix`'s drop events (the policy program's ring buffer
    /// drained into its bounded events file; see `kiln_net::events`).
    pub fn drop_events(
        &self,
        prefix: &str,
    ) -> Result<(String, Vec<kiln_net::events::DropEvent>), PolicyOpError> {
        let rec = self.networked(prefix)?;
        let events = open_network(self.dirs())?.drop_events(&rec)?;
        Ok((rec, events))
    }

    /// Replaces sandbox `prefix`'s policy live (maps rewritten in place,
    /// nothing reloaded); a policy that does not parse changes nothing.
    pub fn set_policy(
        &self,
        prefix: &str,
        net: &kiln_api::sandbox::NetworkSpec,
    ) -> Result<String, PolicyOpError> {
        let id = self.networked(prefix)?;
        let Some(policy) = run::policy_of(net)? else {
            return Err(PolicyOpError::NoNetwork(id));
        };
        open_network(self.dirs())?.update_policy(&id, &policy)?;
        Ok(id)
    }

    /// Recompiles the policy of every running networked sandbox (warm-pool
    /// members too) against the protected ranges in force now, after they
    /// changed (the node daemon learnt of another node); the rules stay
    /// the same. Returns how many were refreshed; failures are logged.
    pub fn refresh_protected(&self) -> usize {
        let Ok(records) = self.store().list() else {
            return 0;
        };
        let net = match open_network_view(self.dirs()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the sandbox network");
                return 0;
            }
        };
        let mut done = 0;
        for rec in records {
            if rec.spec.network.is_none() || rec.state.is_finished() {
                continue;
            }
            match net.recompile(&rec.id) {
                Ok(()) => done += 1,
                Err(e) => {
                    tracing::warn!(sandbox = %rec.id, error = %e, "cannot refresh its protected ranges")
                }
            }
        }
        done
    }

    fn networked(&self, prefix: &str) -> Result<String, PolicyOpError> {
        let rec = self.get(prefix)?;
        if rec.spec.network.is_none() {
            return Err(PolicyOpError::NoNetwork(rec.id));
        }
        if rec.state.is_finished() {
            return Err(PolicyOpError::Ended(rec.id));
        }
        Ok(rec.id)
    }
}

/// The hostname of sandbox `id`: its first 12 hex digits.
pub fn hostname_of(id: &str) -> String {
    id.chars().take(12).collect()
}
