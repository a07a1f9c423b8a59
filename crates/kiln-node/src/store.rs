//! Sandbox records in the state directory.
//!
//! Each sandbox has a directory `<state>/sandboxes/<id>/` holding
//! `record.json` (written atomically: temp file, fsync, rename), its logs,
//! its writable disk and the sockets of its VMM and supervisor. Whatever a
//! `kiln` process acknowledged to its user is in a record before it says so.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::paths::Dirs;

/// What a user asked for when creating a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The image reference as the user gave it.
    pub image: String,
    /// Manifest digest of the image.
    pub image_digest: String,
    /// The image's read-only ext4 disk.
    pub image_disk: PathBuf,
    /// The command (after applying ENTRYPOINT/CMD).
    pub argv: Vec<String>,
    /// The whole environment, `K=V`.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    /// Keep the main process's stdin open for attach.
    pub stdin: bool,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Size of the writable disk.
    pub disk_mib: u32,
    /// Seconds the main process may run; `None` = no limit.
    pub timeout_secs: Option<u64>,
    /// `auto`, `qemu` or `firecracker`.
    pub driver: String,
    /// Remove everything once the main process has exited and its status
    /// was collected.
    pub auto_remove: bool,
    /// Bytes of output `output.log` keeps (the newest); `None`: the node's
    /// default (`KILN_LOG_LIMIT`, else 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_limit: Option<u64>,
    /// Its network (tap, address, MAC), attached by the node before the
    /// supervisor starts; `None`: no network device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<kiln_net::Attachment>,
}

/// Where a sandbox is in its life: the portable type (one definition for
/// the node, the control plane and the API).
pub use kiln_api::sandbox::SandboxState;

/// Everything Kiln knows about one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub created_at: u64,
    pub spec: SandboxSpec,
    pub state: SandboxState,
    /// The supervisor process (`kiln shim`), while it runs (with
    /// `shim_start`: `shim()`).
    pub shim_pid: Option<u32>,
    /// The supervisor's start time (field 22 of `/proc/PID/stat`), so that
    /// a process that reused its pid is not taken for it. `None` in records
    /// written before it existed (then the pid alone counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shim_start: Option<u64>,
    /// The VMM, as its driver recorded it.
    pub vm: Option<serde_json::Value>,
    /// Which driver runs it and why.
    #[serde(default)]
    pub driver: Option<String>,
    /// The snapshot it was restored from (`kiln restore`, `kiln fork`):
    /// its supervisor restores that snapshot instead of booting.
    #[serde(default)]
    pub restored_from: Option<String>,
    /// The template it was warm-started from (`kiln run`): its supervisor
    /// restores that template and then starts the main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Set while the sandbox belongs to the warm pool of this template
    /// (`kiln template create --pool`); cleared once a run claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The process that created the record: while the sandbox is
    /// `Creating` and has no supervisor yet, it counts as alive as long as
    /// this process does (its template and image must not go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<ProcessIdentity>,
}

impl SandboxRecord {
    /// The supervisor, as recorded.
    pub fn shim(&self) -> Option<ProcessIdentity> {
        Some(ProcessIdentity {
            pid: self.shim_pid?,
            start_time: self.shim_start?,
        })
    }

    /// Records `shim` as the supervisor (`None`: it has ended).
    pub fn set_shim(&mut self, shim: Option<ProcessIdentity>) {
        self.shim_pid = shim.map(|s| s.pid);
        self.shim_start = shim.map(|s| s.start_time);
    }

    /// Whether the recorded supervisor still runs (not a later process
    /// with its pid).
    pub fn shim_alive(&self) -> bool {
        match (self.shim(), self.shim_pid) {
            (Some(s), _) => s.alive(),
            (None, Some(pid)) => process_alive(pid),
            (None, None) => false,
        }
    }
}

/// Reading or writing the state directory failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no sandbox matches {0:?}")]
    NotFound(String),
    #[error("{prefix:?} matches several sandboxes: {matches:?}")]
    Ambiguous {
        prefix: String,
        matches: Vec<String>,
    },
    #[error("sandbox {0} already exists on this node")]
    Exists(String),
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("record {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new random sandbox ID: 16 lower-case hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sandboxes of one state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dirs: Dirs,
}

impl Store {
    pub fn new(dirs: Dirs) -> Store {
        Store { dirs }
    }

    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.dirs.sandbox(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("record.json")
    }

    /// Creates a sandbox directory and its first record.
    pub fn create(&self, spec: SandboxSpec) -> Result<SandboxRecord, StoreError> {
        self.create_with_id(new_id(), spec)
    }

    /// [`Store::create`] with a given ID (the control plane's): refused
    /// with [`StoreError::Exists`] when a sandbox of that ID exists, so one
    /// ID never gets two records (or two VMs).
    pub fn create_with_id(
        &self,
        id: String,
        spec: SandboxSpec,
    ) -> Result<SandboxRecord, StoreError> {
        if !valid_id(&id) {
            return Err(StoreError::NotFound(id));
        }
        let dir = self.dir(&id);
        let parent = self.dirs.sandboxes();
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(id));
            }
            Err(e) => return Err(io(&dir)(e)),
        }
        let rec = SandboxRecord {
            id,
            created_at: now_secs(),
            spec,
            state: SandboxState::Creating,
            shim_pid: None,
            shim_start: None,
            vm: None,
            driver: None,
            restored_from: None,
            template: None,
            pool: None,
            creator: Some(ProcessIdentity::current()),
        };
        self.save(&rec)?;
        Ok(rec)
    }

    /// Writes a record atomically.
    pub fn save(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let path = self.record_path(&rec.id);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(rec).expect("records always serialize");
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(())
    }

    pub fn load(&self, id: &str) -> Result<SandboxRecord, StoreError> {
        let path = self.record_path(id);
        let body = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound(id.to_string())
            } else {
                StoreError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        serde_json::from_slice(&body).map_err(|source| StoreError::Corrupt { path, source })
    }

    /// All sandbox IDs, in creation order.
    pub fn ids(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.dirs.sandboxes();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(StoreError::Io {
                    path: dir,
                    source: e,
                });
            }
        };
        let mut ids = vec![];
        for e in rd {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if valid_id(&name) && e.path().join("record.json").is_file() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// All records (unreadable ones are skipped with a warning).
    pub fn list(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut out = vec![];
        for id in self.ids()? {
            match self.load(&id) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "skipping unreadable sandbox record")
                }
            }
        }
        out.sort_by_key(|r| r.created_at);
        Ok(out)
    }

    /// Resolves a full ID or a unique prefix of one.
    pub fn resolve(&self, prefix: &str) -> Result<String, StoreError> {
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NotFound(prefix.to_string()));
        }
        let matches: Vec<String> = self
            .ids()?
            .into_iter()
            .filter(|id| id.starts_with(prefix))
            .collect();
        match matches.len() {
            0 => Err(StoreError::NotFound(prefix.to_string())),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ if matches.iter().any(|m| m == prefix) => Ok(prefix.to_string()),
            _ => Err(StoreError::Ambiguous {
                prefix: prefix.to_string(),
                matches,
            }),
        }
    }

    /// Deletes a sandbox directory and everything in it.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io {
                path: dir,
                source: e,
            }),
        }
    }
}

/// Whether process `pid` runs (exists and is not a zombie nobody reaped):
/// supervisors, `kiln` commands holding something.
pub fn process_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// A process named by pid and start time, so that a reused pid is never
/// mistaken for it: the owner of a temporary (staging directory, hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start_time: u64,
}

impl ProcessIdentity {
    /// This process.
    pub fn current() -> ProcessIdentity {
        let pid = std::process::id();
        ProcessIdentity {
            pid,
            start_time: proc_stat(pid).map(|(_, t)| t).unwrap_or(0),
        }
    }

    /// `PID.START`: how a temporary's name carries its owner (so no moment
    /// exists at which it has none).
    pub fn suffix(&self) -> String {
        format!("{}.{}", self.pid, self.start_time)
    }

    /// The owner at the end of a temporary's name (`….PID.START`).
    pub fn from_suffix(name: &str) -> Option<ProcessIdentity> {
        let mut parts = name.rsplitn(3, '.');
        let start_time = parts.next()?.parse().ok()?;
        let pid = parts.next()?.parse().ok()?;
        parts.next()?;
        Some(ProcessIdentity { pid, start_time })
    }

    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, t)) if t == self.start_time && state != 'Z' && state != 'X')
    }
}

/// State and start time of process `pid`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain
    // anything: count fields from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// Whether `s` has the form of a sandbox ID (16 lowercase hex digits).
pub fn valid_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            image: "busybox".into(),
            image_digest: "sha256:00".into(),
            image_disk: "/nonexistent".into(),
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            user: None,
            tty: false,
            stdin: false,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            timeout_secs: None,
            driver: "auto".into(),
            auto_remove: false,
            log_limit: None,
            network: None,
        }
    }

    #[test]
    fn create_load_resolve_remove() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(Dirs::new(t.path().join("state"), t.path().join("cache")));
        let a = store.create(spec()).unwrap();
        let b = store.create(spec()).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        assert_eq!(store.resolve(&a.id).unwrap(), a.id);
        assert_eq!(store.resolve(&b.id[..10]).unwrap(), b.id);
        assert!(matches!(store.resolve("zz"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            store.resolve("../x"),
            Err(StoreError::NotFound(_))
        ));
        let mut a2 = store.load(&a.id).unwrap();
        a2.state = SandboxState::Running { main_pid: 7 };
        store.save(&a2).unwrap();
        assert_eq!(
            store.load(&a.id).unwrap().state,
            SandboxState::Running { main_pid: 7 }
        );
        store.remove(&a.id).unwrap();
        assert!(matches!(store.load(&a.id), Err(StoreError::NotFound(_))));
        assert_eq!(store.ids().unwrap(), vec![b.id.clone()]);
    }

    #[test]
    fn process_identity_tells_a_reused_pid_apart() {
        let me = ProcessIdentity::current();
        assert!(me.alive());
        assert!(
            !ProcessIdentity {
                start_time: me.start_time + 1,
                ..me
            }
            .alive()
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    /// The supervisor is recorded with its start time: a process that
    /// reused its pid does not keep the sandbox "running"; records without
    /// it still load and use the pid.
    #[test]
    fn a_supervisor_is_told_from_a_reused_pid() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(Dirs::new(t.path().join("state"), t.path().join("cache")));
        let mut r = store.create(spec()).unwrap();
        assert!(!r.shim_alive());
        let me = ProcessIdentity::current();
        r.set_shim(Some(me));
        store.save(&r).unwrap();
        let loaded = store.load(&r.id).unwrap();
        assert_eq!(loaded.shim(), Some(me));
        assert!(loaded.shim_alive());
        r.set_shim(Some(ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        }));
        assert!(!r.shim_alive(), "a reused pid counts as the supervisor");
        // A record from before `shim_start`.
        let mut v = serde_json::to_value(&loaded).unwrap();
        v.as_object_mut().unwrap().remove("shim_start");
        let old: SandboxRecord = serde_json::from_value(v).unwrap();
        assert_eq!((old.shim_pid, old.shim()), (Some(me.pid), None));
        assert!(old.shim_alive());
        r.set_shim(None);
        assert_eq!((r.shim_pid, r.shim_start), (None, None));
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_panic() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(Dirs::new(t.path().join("state"), t.path().join("cache")));
        let a = store.create(spec()).unwrap();
        fs::write(store.dir(&a.id).join("record.json"), b"{garbage").unwrap();
        assert!(matches!(store.load(&a.id), Err(StoreError::Corrupt { .. })));
        assert!(store.list().unwrap().is_empty());
    }
}
