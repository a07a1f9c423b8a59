//! Portable sandbox types: what a client asks for ([`SandboxSpec`]), where a
//! sandbox comes from ([`Origin`]) and where it is in its life
//! ([`SandboxState`]).
//!
//! Invariants:
//! - A [`SandboxSpec`] names an image by reference, never a host-local path:
//!   it is the same on every node, so the scheduler can place it anywhere and
//!   the Raft state machine can replicate it. The node resolves it (pull,
//!   base disk, ENTRYPOINT/CMD) when it runs the sandbox.
//! - [`SandboxSpec::validate`] checks everything that can be checked without
//!   a host: sizes, limits and names. A spec that passes it is safe to store
//!   and to send to a node; node capacity is checked by the scheduler.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The most a sandbox's argument vector plus environment may take, in bytes
/// (each string plus its NUL), as Linux's default `ARG_MAX` (2 MiB).
pub const MAX_ARGS_ENV_BYTES: usize = 2 * 1024 * 1024;
/// Bounds on resources a spec may ask for (a node may offer less).
pub const MAX_CPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
pub const MIN_DISK_MIB: u32 = 16;
pub const MAX_DISK_MIB: u32 = 1024 * 1024;
/// The smallest output log a sandbox may ask for, bytes.
pub const MIN_LOG_LIMIT: u64 = 64 * 1024;
/// The most labels a sandbox may carry, and their key/value lengths.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 256;

/// A sandbox ID: 16 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxId(String);

impl SandboxId {
    /// A fresh random ID from the given 8 random bytes.
    pub fn from_random(bytes: [u8; 8]) -> SandboxId {
        SandboxId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` has the form of a sandbox ID.
    pub fn is_valid(s: &str) -> bool {
        s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl TryFrom<String> for SandboxId {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        if SandboxId::is_valid(&s) {
            Ok(SandboxId(s))
        } else {
            Err(SpecError::BadId(s))
        }
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CPU, memory and disk of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resources {
    pub cpus: u32,
    pub memory_mib: u32,
    /// Size of the writable disk.
    pub disk_mib: u32,
}

impl Resources {
    /// Checks each within its bounds.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(SpecError::Cpus { cpus: self.cpus });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Memory {
                mib: self.memory_mib,
            });
        }
        if !(MIN_DISK_MIB..=MAX_DISK_MIB).contains(&self.disk_mib) {
            return Err(SpecError::Disk { mib: self.disk_mib });
        }
        Ok(())
    }
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
        }
    }
}

/// What happens to a sandbox whose node is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RestartPolicy {
    /// It is reported lost (the default: its processes are gone).
    #[default]
    Never,
    /// It is created again, from its spec, on another node.
    OnNodeFailure,
}

/// Which VMM a sandbox asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DriverPreference {
    /// The node's best: Firecracker on hardware KVM, else QEMU.
    #[default]
    Auto,
    Qemu,
    Firecracker,
}

impl fmt::Display for DriverPreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverPreference::Auto => "auto",
            DriverPreference::Qemu => "qemu",
            DriverPreference::Firecracker => "firecracker",
        })
    }
}

/// Whether a run may start from a template or pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StartPreference {
    /// From a warm pool, else a template, else a boot.
    #[default]
    Warm,
    /// Always boot.
    Cold,
}

/// Where a sandbox's VM comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Origin {
    /// A new VM from the image (booted, or warm-started from a template or
    /// pool of the same image and resources: the node's choice).
    Image,
    /// A restore of a snapshot: processes continue where they were.
    Snapshot { snapshot: String },
}

/// Allow or deny, for a network policy rule or default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// One rule, `CIDR|DOMAIN[:PROTO[:PORT[-PORT]]]`, parsed and checked by
/// the node (`kiln_net::Rule`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRule {
    pub action: PolicyAction,
    pub rule: String,
}

/// A sandbox's network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum NetworkSpec {
    /// No network device at all.
    #[default]
    None,
    /// A network device on the node's bridge, NAT to the outside, the
    /// policy enforced on the host: `rules` in order, then `policy`'s
    /// rules (a preset: `internet-only` (the default) or `none`), then
    /// `policy_default` (else the preset's default).
    Default {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_default: Option<PolicyAction>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rules: Vec<PolicyRule>,
        /// Published ports, `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`
        /// (checked by the node before anything is created).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        publish: Vec<String>,
    },
}

/// Most rules a policy may carry, and the longest rule.
pub const MAX_POLICY_RULES: usize = 1024;
pub const MAX_RULE_LEN: usize = 300;

/// Everything a client says about a sandbox it wants. Host-independent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxSpec {
    /// Image reference (`registry/repo:tag`, `…@sha256:…`, `oci:DIR[:TAG]`,
    /// `docker-archive:FILE`).
    pub image: String,
    /// Replaces the image's ENTRYPOINT when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `K=V`, added to (and overriding) the image's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `name`, `uid`, `uid:gid` or `name:group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Keep the main process's stdin open for attach.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub resources: Resources,
    /// Seconds the main process may run (paused time excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Remove everything once the main process has ended and its status was
    /// collected.
    #[serde(default)]
    pub auto_remove: bool,
    #[serde(default)]
    pub driver: DriverPreference,
    #[serde(default)]
    pub start: StartPreference,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_origin")]
    pub origin: Origin,
    /// Bytes of output the node keeps (the newest); `None`: its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "is_no_network")]
    pub network: NetworkSpec,
    /// When the node contacts the image's registry (`missing`: only when
    /// it has no copy, like `docker run`).
    #[serde(default, skip_serializing_if = "ImagePull::is_missing")]
    pub pull: ImagePull,
}

/// When a node contacts the registry for a sandbox's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ImagePull {
    /// Use the node's cached copy when it has one.
    #[default]
    Missing,
    /// Resolve the reference again (a moved tag is noticed).
    Always,
    /// Never contact a registry; fail when the node has no copy.
    Never,
}

impl ImagePull {
    pub fn is_missing(&self) -> bool {
        *self == ImagePull::Missing
    }
}

fn is_no_network(n: &NetworkSpec) -> bool {
    *n == NetworkSpec::None
}

fn default_origin() -> Origin {
    Origin::Image
}

impl SandboxSpec {
    /// A spec that runs `image` with its own ENTRYPOINT/CMD and defaults.
    pub fn for_image(image: impl Into<String>) -> SandboxSpec {
        SandboxSpec {
            image: image.into(),
            entrypoint: None,
            cmd: vec![],
            env: vec![],
            workdir: None,
            user: None,
            tty: false,
            stdin: false,
            resources: Resources::default(),
            timeout_secs: None,
            auto_remove: false,
            driver: DriverPreference::Auto,
            start: StartPreference::Warm,
            restart: RestartPolicy::Never,
            labels: BTreeMap::new(),
            origin: Origin::Image,
            log_limit: None,
            network: NetworkSpec::None,
            pull: ImagePull::Missing,
        }
    }

    /// Checks what can be checked without a host. Every error names the
    /// field and the limit.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.image.is_empty() || self.image.len() > 4096 || has_control(&self.image) {
            return Err(SpecError::Image);
        }
        self.resources.validate()?;
        if self.timeout_secs == Some(0) {
            return Err(SpecError::Timeout);
        }
        if self.log_limit.is_some_and(|l| l < MIN_LOG_LIMIT) {
            return Err(SpecError::LogLimit);
        }
        if let NetworkSpec::Default { policy, rules, .. } = &self.network {
            if rules.len() > MAX_POLICY_RULES {
                return Err(SpecError::Network(format!(
                    "{} rules, at most {MAX_POLICY_RULES}",
                    rules.len()
                )));
            }
            for text in rules.iter().map(|r| &r.rule).chain(policy.iter()) {
                if text.is_empty() || text.len() > MAX_RULE_LEN || has_control(text) {
                    return Err(SpecError::Network(format!(
                        "{:?} is not a rule or preset",
                        truncate(text)
                    )));
                }
            }
        }
        for e in &self.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains('\0') => {}
                _ => return Err(SpecError::Env(truncate(e))),
            }
            if e.contains('\0') {
                return Err(SpecError::Env(truncate(e)));
            }
        }
        let args = self
            .entrypoint
            .iter()
            .flatten()
            .chain(self.cmd.iter())
            .chain(self.env.iter());
        let mut total = 0usize;
        for a in args {
            if a.contains('\0') {
                return Err(SpecError::Nul);
            }
            total = total.saturating_add(a.len() + 1);
        }
        if total > MAX_ARGS_ENV_BYTES {
            return Err(SpecError::ArgsTooLarge { bytes: total });
        }
        if let Some(w) = &self.workdir
            && (!w.starts_with('/') || w.contains('\0'))
        {
            return Err(SpecError::Workdir(truncate(w)));
        }
        if let Some(u) = &self.user
            && (u.is_empty() || u.len() > 256 || has_control(u) || !ids_in_range(u))
        {
            return Err(SpecError::User(truncate(u)));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(SpecError::Labels(format!(
                "{} labels, at most {MAX_LABELS}",
                self.labels.len()
            )));
        }
        for (k, v) in &self.labels {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_LABEL_KEY
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
            if !key_ok {
                return Err(SpecError::Labels(format!(
                    "key {:?} must be 1-{MAX_LABEL_KEY} characters of [A-Za-z0-9._/-]",
                    truncate(k)
                )));
            }
            if v.len() > MAX_LABEL_VALUE || has_control(v) {
                return Err(SpecError::Labels(format!(
                    "value of {k:?} must be at most {MAX_LABEL_VALUE} printable characters"
                )));
            }
        }
        if let Origin::Snapshot { snapshot } = &self.origin
            && !valid_name(snapshot)
        {
            return Err(SpecError::Name(truncate(snapshot)));
        }
        Ok(())
    }
}

/// Names of snapshots and templates: 1-128 characters of `[A-Za-z0-9._-]`,
/// not starting with `.` or `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Numeric parts of `user[:group]` must be valid ids: below 2^32 - 1
/// (`(uid_t)-1` means "no change" to the kernel).
fn ids_in_range(user: &str) -> bool {
    user.split(':').all(|part| {
        !part.bytes().all(|b| b.is_ascii_digit())
            || part.parse::<u64>().is_ok_and(|n| n < u64::from(u32::MAX))
    })
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn truncate(s: &str) -> String {
    let mut out: String = s.chars().take(64).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// A spec that cannot be run anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0:?} is not a sandbox ID (16 lower-case hex digits)")]
    BadId(String),
    #[error("image: a reference of 1-4096 printable characters is required")]
    Image,
    #[error("cpus: {cpus} is outside 1-{MAX_CPUS}")]
    Cpus { cpus: u32 },
    #[error("memory: {mib} MiB is outside {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} MiB")]
    Memory { mib: u32 },
    #[error("disk: {mib} MiB is outside {MIN_DISK_MIB}-{MAX_DISK_MIB} MiB")]
    Disk { mib: u32 },
    #[error("timeout: must be at least 1 second")]
    Timeout,
    #[error("log limit: must be at least {MIN_LOG_LIMIT} bytes")]
    LogLimit,
    #[error("network: {0}")]
    Network(String),
    #[error("env: {0:?} is not of the form KEY=VALUE")]
    Env(String),
    #[error("command and environment: a NUL byte cannot be passed to a process")]
    Nul,
    #[error(
        "command and environment take {bytes} bytes, more than Linux accepts ({MAX_ARGS_ENV_BYTES})"
    )]
    ArgsTooLarge { bytes: usize },
    #[error("workdir: {0:?} is not an absolute path")]
    Workdir(String),
    #[error("user: {0:?} is not a user name or uid[:gid]")]
    User(String),
    #[error("labels: {0}")]
    Labels(String),
    #[error("{0:?} is not a valid name (1-128 characters of A-Z a-z 0-9 . _ -)")]
    Name(String),
}

/// Where a sandbox is in its life, as observed by the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SandboxState {
    /// Accepted, not yet running (placing, pulling, booting).
    Creating,
    /// A warm-pool member: restored from its template, paused, waiting to
    /// be claimed (no main process yet).
    Pooled,
    /// The main process runs.
    Running { main_pid: u32 },
    /// The VM is paused.
    Paused { main_pid: u32 },
    /// The main process ended; the VM is gone.
    Exited {
        exit_code: i32,
        signal: Option<i32>,
        finished_at: u64,
        /// The main process was killed because its timeout ran out.
        #[serde(default)]
        timed_out: bool,
    },
    /// The sandbox could not start, or its VM died, or its node was lost.
    Failed { error: String, exit_code: i32 },
}

impl SandboxState {
    /// The exit code of a sandbox that has ended.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            SandboxState::Exited { exit_code, .. } | SandboxState::Failed { exit_code, .. } => {
                Some(*exit_code)
            }
            _ => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            SandboxState::Exited { .. } | SandboxState::Failed { .. }
        )
    }

    /// Short human label for `kiln ps`.
    pub fn label(&self) -> String {
        match self {
            SandboxState::Creating => "creating".into(),
            SandboxState::Pooled => "pooled".into(),
            SandboxState::Running { .. } => "running".into(),
            SandboxState::Paused { .. } => "paused".into(),
            SandboxState::Exited { exit_code, .. } => format!("exited ({exit_code})"),
            SandboxState::Failed { exit_code, .. } => format!("failed ({exit_code})"),
        }
    }
}

/// How a sandbox's start went, as its node reports it once (what `kiln
/// run -v` prints, by either route).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartReport {
    pub path: StartKind,
    /// The template it was started from (`pool`, `template`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// One line each: the image, warm or why cold, fallbacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Each phase's own duration, in order (`resolve`, `prepare`, `VMM
    /// spawn`, `boot` or `restore`, `configure`, `exec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<StartPhase>,
    /// Milliseconds from the node taking the start on to the main process
    /// running.
    pub ready_ms: u64,
}

/// How a sandbox was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StartKind {
    /// A warm-pool member of a template was claimed.
    Pool,
    /// A template was restored.
    Template,
    /// The VM was booted.
    Cold,
    /// A snapshot was restored (`restore`, `fork`).
    Restore,
}

impl StartKind {
    /// `warm (pool)`, `cold`, …: as `kiln run -v` says it.
    pub fn describe(self) -> &'static str {
        match self {
            StartKind::Pool => "warm (pool)",
            StartKind::Template => "warm (template)",
            StartKind::Cold => "cold",
            StartKind::Restore => "restore",
        }
    }
}

/// One phase of a start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartPhase {
    pub name: String,
    pub ms: u64,
}

/// Bounds of a [`StartReport`] (it comes from a node: never trusted).
pub const MAX_START_NOTES: usize = 16;
pub const MAX_START_NOTE: usize = 512;
pub const MAX_START_PHASES: usize = 16;
pub const MAX_START_PHASE_NAME: usize = 32;
pub const MAX_START_TEMPLATE: usize = 256;

impl StartReport {
    /// Refuses a report beyond the bounds above, or with control
    /// characters in its text (printed on users' terminals).
    pub fn validate(&self) -> Result<(), String> {
        let printable = |s: &str| !s.chars().any(crate::text::is_unprintable);
        if self.notes.len() > MAX_START_NOTES {
            return Err(format!("notes: at most {MAX_START_NOTES}"));
        }
        if let Some(n) = self
            .notes
            .iter()
            .find(|n| n.len() > MAX_START_NOTE || !printable(n))
        {
            return Err(format!(
                "notes: {:?}: at most {MAX_START_NOTE} bytes, no control characters",
                n.chars().take(40).collect::<String>()
            ));
        }
        if self.phases.len() > MAX_START_PHASES {
            return Err(format!("phases: at most {MAX_START_PHASES}"));
        }
        if self.phases.iter().any(|p| {
            p.name.is_empty() || p.name.len() > MAX_START_PHASE_NAME || !printable(&p.name)
        }) {
            return Err(format!(
                "phases: names of 1 to {MAX_START_PHASE_NAME} bytes, no control characters"
            ));
        }
        if let Some(t) = &self.template
            && (t.len() > MAX_START_TEMPLATE || !printable(t))
        {
            return Err(format!(
                "template: at most {MAX_START_TEMPLATE} bytes, no control characters"
            ));
        }
        Ok(())
    }

    /// This report cut to the bounds [`StartReport::validate`] checks: at
    /// most [`MAX_START_NOTES`] notes (the last says how many were left
    /// out), each made printable and cut to [`MAX_START_NOTE`] bytes;
    /// phases beyond the bound dropped, names cut; a template name out of
    /// bounds dropped. What a node sends (a refused report would leave
    /// the sandbox's observed state behind).
    pub fn bounded(mut self) -> StartReport {
        use crate::text::bounded;
        if self.notes.len() > MAX_START_NOTES {
            let left = self.notes.len() - (MAX_START_NOTES - 1);
            self.notes.truncate(MAX_START_NOTES - 1);
            self.notes.push(format!("({left} more notes left out)"));
        }
        for n in &mut self.notes {
            *n = bounded(n, MAX_START_NOTE);
        }
        self.phases.truncate(MAX_START_PHASES);
        for p in &mut self.phases {
            p.name = bounded(&p.name, MAX_START_PHASE_NAME);
            if p.name.is_empty() {
                p.name = "?".into();
            }
        }
        if self.template.as_deref().is_some_and(|t| {
            t.len() > MAX_START_TEMPLATE || t.chars().any(crate::text::is_unprintable)
        }) {
            self.template = None;
        }
        self
    }

    /// `resolve 2 ms, prepare 9 ms, …` (empty without phases).
    pub fn phase_line(&self) -> String {
        self.phases
            .iter()
            .map(|p| format!("{} {} ms", p.name, p.ms))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a node's notes say (a long image reference, many
        /// templates, a guest's bytes), the report it sends is valid.
        #[test]
        fn a_bounded_start_report_is_always_valid(
            notes in proptest::collection::vec(".{0,700}", 0..40),
            phases in proptest::collection::vec((".{0,50}", 0u64..10), 0..30),
            template in proptest::option::of(".{0,300}"),
        ) {
            let r = StartReport {
                path: StartKind::Cold,
                template,
                notes,
                phases: phases.into_iter().map(|(name, ms)| StartPhase { name, ms }).collect(),
                ready_ms: 1,
            }
            .bounded();
            proptest::prop_assert!(r.validate().is_ok(), "{:?}: {:?}", r.validate(), r);
        }
    }

    #[test]
    fn a_long_note_is_cut_not_refused() {
        let r = StartReport {
            path: StartKind::Cold,
            template: Some("tpl-1".into()),
            notes: vec![format!("cold boot: {}\u{202e}", "é".repeat(600)); 20],
            phases: vec![],
            ready_ms: 1,
        }
        .bounded();
        r.validate().expect("valid");
        assert_eq!(r.notes.len(), MAX_START_NOTES);
        assert!(r.notes[0].starts_with("cold boot: éé") && r.notes[0].ends_with('…'));
        assert_eq!(r.notes[MAX_START_NOTES - 1], "(5 more notes left out)");
        assert_eq!(r.template.as_deref(), Some("tpl-1"));
    }

    #[test]
    fn a_start_report_is_bounded_and_printable() {
        let mut r = StartReport {
            path: StartKind::Pool,
            template: Some("tpl-1".into()),
            notes: vec!["image busybox".into()],
            phases: vec![StartPhase {
                name: "resolve".into(),
                ms: 2,
            }],
            ready_ms: 40,
        };
        r.validate().expect("valid");
        assert_eq!(r.phase_line(), "resolve 2 ms");
        let j = serde_json::to_string(&r).expect("serializes");
        assert_eq!(serde_json::from_str::<StartReport>(&j).expect("parses"), r);
        r.notes.push("\u{1b}[2Jgone".into());
        assert!(r.validate().is_err(), "escape sequences refused");
        r.notes.pop();
        r.notes = vec!["x".into(); MAX_START_NOTES + 1];
        assert!(r.validate().is_err());
        r.notes.clear();
        r.phases[0].name = String::new();
        assert!(r.validate().is_err());
        assert!(
            serde_json::from_str::<StartReport>(r#"{"path":"cold","ready_ms":1,"x":1}"#).is_err()
        );
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let s = SandboxSpec::for_image("busybox");
        s.validate().expect("defaults are valid");
        let j = serde_json::to_string(&s).expect("serializes");
        let back: SandboxSpec = serde_json::from_str(&j).expect("parses");
        assert_eq!(back, s);
        let minimal: SandboxSpec = serde_json::from_str(r#"{"image":"busybox"}"#).expect("minimal");
        assert_eq!(minimal, s);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"image":"x","imgae":"y"}"#).is_err());
    }

    #[test]
    fn every_limit_names_its_field() {
        let mut s = SandboxSpec::for_image("busybox");
        s.resources.memory_mib = 999_999_999;
        assert!(s.validate().unwrap_err().to_string().starts_with("memory:"));
        let mut s = SandboxSpec::for_image("busybox");
        s.resources.disk_mib = 99_999_999;
        assert!(s.validate().unwrap_err().to_string().starts_with("disk:"));
        let mut s = SandboxSpec::for_image("busybox");
        s.resources.cpus = 0;
        assert!(s.validate().unwrap_err().to_string().starts_with("cpus:"));
        let mut s = SandboxSpec::for_image("busybox");
        s.env = vec!["NOEQUALS".into()];
        assert!(s.validate().unwrap_err().to_string().starts_with("env:"));
        let mut s = SandboxSpec::for_image("busybox");
        s.cmd = vec!["x".repeat(MAX_ARGS_ENV_BYTES)];
        assert!(matches!(s.validate(), Err(SpecError::ArgsTooLarge { .. })));
        let mut s = SandboxSpec::for_image("busybox");
        s.cmd = vec!["x".repeat(100 * 1024)];
        s.validate().expect("100 KiB of arguments is fine");
        let mut s = SandboxSpec::for_image("busybox");
        s.user = Some("4294967295".into());
        assert!(s.validate().unwrap_err().to_string().starts_with("user:"));
        s.user = Some("1000:4294967296".into());
        assert!(s.validate().is_err());
        s.user = Some("1000:1000".into());
        s.validate().expect("ordinary ids");
        let mut s = SandboxSpec::for_image("busybox");
        s.labels.insert("bad key".into(), "v".into());
        assert!(s.validate().unwrap_err().to_string().starts_with("labels:"));
        let mut s = SandboxSpec::for_image("busybox");
        s.origin = Origin::Snapshot {
            snapshot: "../x".into(),
        };
        assert!(matches!(s.validate(), Err(SpecError::Name(_))));
    }

    #[test]
    fn ids_are_checked_when_parsed() {
        let id = SandboxId::from_random([1, 2, 3, 4, 5, 6, 7, 0xff]);
        assert_eq!(id.as_str(), "01020304050607ff");
        let j = serde_json::to_string(&id).expect("serializes");
        assert_eq!(serde_json::from_str::<SandboxId>(&j).expect("parses"), id);
        assert!(serde_json::from_str::<SandboxId>("\"../../etc\"").is_err());
    }
}
