//! Who uses a snapshot: `users/` (restored sandboxes that still run,
//! holds of forks), `restored/` (every restore of an ephemeral snapshot),
//! and removal, ordered against registrations by an `flock` on the store.

use std::fs;

use super::*;

impl SnapshotStore {
    /// Sandboxes registered as restored from `name`.
    pub fn users(&self, name: &str) -> Vec<String> {
        let mut users: Vec<String> = fs::read_dir(self.dir(name).join("users"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        users.sort();
        users
    }

    /// Registers `user` (a sandbox ID, or a temporary holder) as mapping
    /// snapshot `name`.
    /// Fails (NotFound) once the snapshot is gone or being removed: a
    /// registration and a removal are ordered by the store's lock.
    pub fn add_user(&self, name: &str, user: &str) -> std::io::Result<()> {
        let _lock = self.users_lock()?;
        if !self.exists(name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no snapshot named {name:?}"),
            ));
        }
        let dir = self.dir(name).join("users");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(user), b"")
    }

    /// Orders user registrations against removals in this store: an
    /// `flock` on the store's directory itself (no file of its own; not
    /// `templates/.lock`, which callers hold around both).
    fn users_lock(&self) -> std::io::Result<nix::fcntl::Flock<fs::File>> {
        fs::create_dir_all(&self.root)?;
        let f = fs::File::open(&self.root)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
    }

    /// Records that sandbox `id` was restored from ephemeral snapshot
    /// `name` (`restored/<id>`, gone with the snapshot); best effort.
    pub fn mark_restored(&self, name: &str, id: &str) {
        // `create_dir`, not `create_dir_all`: never recreates a snapshot
        // directory removed meanwhile.
        let dir = self.dir(name).join("restored");
        let made = match fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        };
        if let Err(e) = made.and_then(|()| fs::write(dir.join(id), b"")) {
            tracing::warn!(snapshot = name, sandbox = id, error = %e, "cannot mark a restore");
        }
    }

    /// The sandboxes ever restored from ephemeral snapshot `name` (see
    /// [`SnapshotStore::mark_restored`]), with those registered now.
    pub fn restored(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.dir(name).join("restored"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.extend(self.users(name));
        out
    }

    /// Drops `user`'s registration. An ephemeral snapshot whose last user
    /// this was is removed. Idempotent; errors are logged.
    pub fn release_user(&self, name: &str, user: &str) {
        if validate_name(name).is_err() {
            return;
        }
        let dir = self.dir(name);
        let users = dir.join("users");
        let _ = fs::remove_file(users.join(user));
        let ephemeral = self.manifest(name).map(|m| m.ephemeral).unwrap_or(false);
        if !ephemeral {
            return;
        }
        // A `kiln fork` killed while it held the snapshot never released it.
        for u in self.users(name) {
            if holder_is_dead(&u) {
                let _ = fs::remove_file(users.join(&u));
            }
        }
        // Atomic: succeeds only on an empty directory, and for one caller.
        if fs::remove_dir(&users).is_ok()
            && let Err(e) = fs::remove_dir_all(&dir)
        {
            tracing::warn!(snapshot = name, error = %e, "cannot remove the fork snapshot");
        }
    }

    /// Drops the holds of `kiln fork` processes that died while holding a
    /// snapshot (removing ephemeral snapshots nobody else uses any more).
    pub fn release_dead_holders(&self) {
        let Ok(entries) = self.list() else { return };
        for e in entries {
            for dead in e.users.iter().filter(|u| holder_is_dead(u)) {
                self.release_user(&e.manifest.name, dead);
            }
        }
    }

    /// Removes snapshot `name`. Users for which `alive` is false (their
    /// sandbox ended or is gone) are dropped first; live ones make it fail.
    /// A process's hold (`holder_name`: a `kiln fork` restoring from it)
    /// counts as a user while that process lives, whatever `alive` says.
    pub fn remove(
        &self,
        name: &str,
        alive: impl Fn(&str) -> bool,
    ) -> Result<(), RemoveSnapshotError> {
        let dir = self.dir(name);
        let io = |source| RemoveSnapshotError::Io {
            path: dir.clone(),
            source,
        };
        // Checked and moved aside under the registrations' lock: a restore
        // either registered first (in use) or finds it gone, never half.
        let doomed = {
            let _lock = self.users_lock().map_err(io)?;
            if !self.exists(name) {
                return Err(RemoveSnapshotError::NotFound(name.to_string()));
            }
            let live: Vec<String> = self
                .users(name)
                .into_iter()
                .filter(|u| is_process_hold(u) && !holder_is_dead(u) || alive(u))
                .collect();
            if !live.is_empty() {
                return Err(RemoveSnapshotError::InUse {
                    name: name.to_string(),
                    users: live,
                });
            }
            let doomed = self
                .root
                .join(format!(".removing-{name}.{}", std::process::id()));
            fs::rename(&dir, &doomed).map_err(io)?;
            doomed
        };
        fs::remove_dir_all(&doomed).map_err(io)?;
        self.sweep_removing();
        Ok(())
    }

    /// Removes what interrupted removals left (`.removing-*`, whose
    /// removers died); best effort.
    fn sweep_removing(&self) {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix(".removing-") else {
                continue;
            };
            let pid = rest
                .rsplit_once('.')
                .and_then(|(_, p)| p.parse::<i32>().ok());
            let remover_alive = pid.is_some_and(|p| {
                p as u32 != std::process::id()
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
            });
            if !remover_alive {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
