//! Templates on the node: the warm-start lookup a run does, creating,
//! listing and removing templates (with their pools). The templates
//! themselves are `crate::template`.

use kiln_api::sandbox::Resources;
use kiln_image::Progress;

use super::{ImageOpError, Node, PoolError, PullPolicy};
use crate::paths::GuestArtifacts;
use crate::snapshot::{self, GuestDigests, Manifest, VerifySnapshotError};
use crate::store::SandboxSpec;
use crate::template::{self, CreateTemplateError, Created, TemplateParams};

/// What `template create` asks for.
#[derive(Debug, Clone)]
pub struct TemplateRequest {
    pub image: String,
    pub resources: Resources,
    /// `auto`, `qemu` or `firecracker`.
    pub driver: String,
    pub insecure_registries: Vec<String>,
    pub pull: PullPolicy,
    /// Size the template's warm pool to this (0 removes it).
    pub pool: Option<u32>,
    /// Made by the node after a cold start (evicted least-recently-used
    /// past the budget) rather than by a user. A user's create of an
    /// automatic template adopts it.
    pub automatic: bool,
    /// Wait (a few seconds at most) for a spare CPU before booting.
    pub when_idle: bool,
    /// A template for `--net default` runs (its VM has a network device).
    pub network: bool,
}

/// What `template create` did.
#[derive(Debug, Clone)]
pub struct TemplateCreated {
    pub created: Created,
    /// Pools of stale templates emptied: (template, members removed).
    pub stale_pools: Vec<(String, u32)>,
    /// What sizing the pool did.
    pub pool: Option<super::Filled>,
}

/// Whether a template can be used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateStatus {
    Ready,
    /// Its inputs changed (kernel, initramfs, driver, image, CPU).
    Stale(String),
    /// Damaged or incomplete.
    Unusable(String),
    /// This host has no guest artifacts or driver to check it against.
    Unknown,
}

/// One template as `template ls` shows it.
#[derive(Debug, Clone)]
pub struct TemplateEntry {
    pub manifest: Manifest,
    pub disk_usage: u64,
    /// Sandboxes started from it (pool members not counted).
    pub in_use: usize,
    /// `(ready, size)` of its pool, if it has one.
    pub pool: Option<(usize, u32)>,
    pub status: TemplateStatus,
    /// Made automatically after a cold start.
    pub automatic: bool,
}

/// A template operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateOpError {
    #[error("--pool {0} is too large: at most {max}", max = crate::pool::MAX_SIZE)]
    PoolTooLarge(u32),
    #[error(transparent)]
    Spec(#[from] kiln_api::sandbox::SpecError),
    #[error(transparent)]
    Image(#[from] ImageOpError),
    #[error(transparent)]
    Create(#[from] CreateTemplateError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Name(#[from] snapshot::CreateSnapshotError),
    #[error(
        "invalid template name {0:?}: use 1-128 characters of [A-Za-z0-9._-], not starting with . or -"
    )]
    InvalidName(String),
    #[error("no template named {0:?}")]
    NotFound(String),
    #[error(
        "template {name} is in use by sandboxes started from it: {}; remove them first",
        users.join(", ")
    )]
    InUse { name: String, users: Vec<String> },
    #[error("cannot empty the pool of template {name}")]
    Drain {
        name: String,
        #[source]
        source: Box<PoolError>,
    },
    #[error(transparent)]
    Remove(#[from] snapshot::RemoveSnapshotError),
    #[error(transparent)]
    List(#[from] snapshot::ListSnapshotsError),
    #[error("another automatic template is being made")]
    Busy,
    #[error("{0}")]
    Capacity(String),
    #[error("cannot lock the template store")]
    Lock(#[source] std::io::Error),
}

/// Marks an automatic template (a file in its directory, outside its
/// manifest: adopting or evicting it changes nothing that is checked).
const AUTOMATIC: &str = "automatic";
/// Held while an automatic template is made: one at a time per node.
const AUTO_LOCK: &str = ".auto.lock";

impl Node {
    /// Why template `name` no longer fits this node as it is now (made
    /// with another guest kernel or initramfs, another driver, or its
    /// files changed size), or `None` when it does (or this cannot be told:
    /// no guest artifacts to compare with). Manifests and sizes only: no
    /// file is hashed.
    pub fn template_stale(&self, name: &str) -> Option<String> {
        let artifacts = GuestArtifacts::locate(self.dirs()).ok()?;
        let choice = crate::vm::parse_driver("auto").ok()?;
        let (drv, _) = crate::vm::driver_for(choice).ok()?;
        let guest = snapshot::guest_digests(&artifacts, drv.kind()).ok()?;
        self.templates()
            .verify(name, &guest, drv.info(), false)
            .err()
            .map(|e| e.to_string())
    }

    /// The template for `spec` (checked like a snapshot before a restore),
    /// with a network device when `network`: its name, or why a run boots
    /// cold.
    pub fn find_template(&self, spec: &SandboxSpec, network: bool) -> Result<String, String> {
        let templates = self.templates();
        if !templates.root().is_dir() {
            return Err(format!(
                "no template for {} (kiln template create)",
                spec.image
            ));
        }
        let artifacts = GuestArtifacts::locate(self.dirs()).map_err(|e| e.to_string())?;
        let choice = crate::vm::parse_driver(&spec.driver).map_err(|e| e.to_string())?;
        let (drv, _) = crate::vm::driver_for(choice).map_err(|e| crate::error_chain(&e))?;
        let guest = snapshot::guest_digests(&artifacts, drv.kind())
            .map_err(|e| format!("cannot hash the guest artifacts: {e}"))?;
        let p = TemplateParams {
            image: spec.image.clone(),
            image_digest: spec.image_digest.clone(),
            image_disk: spec.image_disk.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            network,
        };
        let m = template::find(&templates, &p, &guest, drv.info()).map_err(|e| e.0)?;
        if m.image_disk != spec.image_disk {
            return Err(format!(
                "template {} uses the image disk {}, this run {}",
                m.name,
                m.image_disk.display(),
                spec.image_disk.display()
            ));
        }
        Ok(m.name)
    }

    /// Registers sandbox `id` as a user of template `name` (found by
    /// `find_template`): its name, or why the sandbox boots cold.
    pub(crate) fn use_template(&self, name: &str, id: &str) -> Result<String, String> {
        let templates = self.templates();
        // Shared: a `template rm` cannot slip between the check and the
        // registration.
        let _lock = template::lock(&templates, false)
            .map_err(|e| format!("cannot lock the template store: {e}"))?;
        if !templates.exists(name) {
            return Err(format!("template {name} was removed"));
        }
        templates
            .add_user(name, id)
            .map_err(|e| format!("cannot register as a user of template {name}: {e}"))?;
        Ok(name.to_string())
    }

    /// Creates (or keeps, if valid) the template for `req`, empties the
    /// pools of stale templates, and sizes its pool.
    pub async fn create_template(
        &self,
        req: &TemplateRequest,
        progress: &dyn Progress,
    ) -> Result<TemplateCreated, TemplateOpError> {
        if let Some(k) = req.pool.filter(|k| *k > crate::pool::MAX_SIZE) {
            return Err(TemplateOpError::PoolTooLarge(k));
        }
        let mut check = kiln_api::sandbox::SandboxSpec::for_image(req.image.clone());
        check.resources = req.resources;
        check.validate()?;
        self.check_capacity(&req.resources)
            .map_err(|e| TemplateOpError::Capacity(e.to_string()))?;
        let (img, _) = self
            .pull(&req.image, &req.insecure_registries, req.pull, progress)
            .await?;
        let p = TemplateParams {
            image: req.image.clone(),
            image_digest: img.digest,
            image_disk: img.disk,
            cpus: req.resources.cpus,
            memory_mib: req.resources.memory_mib,
            disk_mib: req.resources.disk_mib,
            network: req.network,
        };
        // One automatic template at a time (they are made in the
        // background, on spare CPU): a second request gives way.
        let _auto_lock = if req.automatic {
            Some(self.auto_lock()?)
        } else {
            None
        };
        if req.when_idle {
            super::pools::wait_for_spare_cpu(std::time::Duration::from_secs(5)).await;
        }
        let alive = |id: &str| self.alive(id);
        let mut created = template::create(self.dirs(), &p, &req.driver, alive).await;
        // A template that must be replaced (damaged) whose only users are
        // its own pool members: empty the pool and try again.
        if let Err(CreateTemplateError::Remove(snapshot::RemoveSnapshotError::InUse {
            name,
            users,
        })) = &created
            && users
                .iter()
                .all(|id| self.store.load(id).is_ok_and(|r| r.pool.is_some()))
        {
            let name = name.clone();
            self.drain_pool(&name).await?;
            created = template::create(self.dirs(), &p, &req.driver, alive).await;
        }
        let created = created?;
        let name = created.manifest.name.clone();
        let marker = self.templates().dir(&name).join(AUTOMATIC);
        if !req.automatic {
            // A user asked for it: it is theirs now, never evicted.
            let _ = std::fs::remove_file(&marker);
        } else if !created.existed
            && let Err(e) = std::fs::write(&marker, b"")
        {
            tracing::warn!(template = %name, error = %e, "cannot mark the template automatic");
        }
        if req.automatic {
            self.evict_automatic(&name).await;
        }
        let stale_pools = self.drain_stale_pools(&name).await;
        let pool = match req.pool {
            Some(k) => Some(self.size_pool(&name, k).await?),
            None => None,
        };
        Ok(TemplateCreated {
            created,
            stale_pools,
            pool,
        })
    }

    /// Removes template `name` and its pool; refused while sandboxes
    /// started from it run.
    pub async fn remove_template(&self, name: &str) -> Result<(), TemplateOpError> {
        if snapshot::validate_name(name).is_err() {
            return Err(TemplateOpError::InvalidName(name.to_string()));
        }
        if !self.templates().exists(name) {
            return Err(TemplateOpError::NotFound(name.to_string()));
        }
        // Refused before its pool is touched while runs use it.
        let busy: Vec<String> = self
            .templates()
            .users(name)
            .into_iter()
            .filter(|id| self.store.load(id).is_ok_and(|r| r.pool.is_none()) && self.alive(id))
            .collect();
        if !busy.is_empty() {
            return Err(TemplateOpError::InUse {
                name: name.to_string(),
                users: busy,
            });
        }
        self.drain_pool(name)
            .await
            .map_err(|source| TemplateOpError::Drain {
                name: name.to_string(),
                source: Box::new(source),
            })?;
        template::remove(self.dirs(), name, |id| self.alive(id)).map_err(|e| match e {
            snapshot::RemoveSnapshotError::NotFound(n) => TemplateOpError::NotFound(n),
            snapshot::RemoveSnapshotError::InUse { name, users } => {
                TemplateOpError::InUse { name, users }
            }
            e => TemplateOpError::Remove(e),
        })?;
        Ok(())
    }

    /// The automatic templates (made after cold starts), as the node
    /// daemon reports them: cheap (manifests and sizes; no digests
    /// checked). Unreadable ones are left out.
    pub fn automatic_templates(&self) -> Vec<kiln_api::templates::NodeTemplate> {
        let templates = self.templates();
        let mut out: Vec<_> = templates
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let m = e.manifest;
                let dir = templates.dir(&m.name);
                let t = m.template.as_ref()?;
                if !dir.join(AUTOMATIC).is_file() {
                    return None;
                }
                Some(kiln_api::templates::NodeTemplate {
                    name: m.name.clone(),
                    node: None,
                    image: m.spec.image.clone(),
                    resources: kiln_api::sandbox::Resources {
                        cpus: m.cpus,
                        memory_mib: m.memory_mib,
                        disk_mib: t.disk_mib,
                    },
                    size_bytes: snapshot::disk_usage(&dir),
                    created_at_ms: m.created_at.saturating_mul(1000),
                })
            })
            .filter(|t| t.validate().is_ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.truncate(kiln_api::templates::MAX_NODE_TEMPLATES);
        out
    }

    /// Every template, with whether it can still be used here (checked like
    /// a run would: every file's digest, remembered while unchanged).
    pub async fn list_templates(&self) -> Result<Vec<TemplateEntry>, TemplateOpError> {
        template::reap_abandoned(self.dirs()).await;
        let templates = self.templates();
        let here = self.this_host();
        let mut out = vec![];
        for e in templates.list()? {
            let m = e.manifest;
            if m.template.is_none() {
                continue;
            }
            let status = match &here {
                None => TemplateStatus::Unknown,
                Some((g, d)) => match templates.verify(&m.name, g, d, true) {
                    Ok(_) => TemplateStatus::Ready,
                    Err(err) if template::is_stale(&err) => TemplateStatus::Stale(err.to_string()),
                    Err(err) => TemplateStatus::Unusable(err.to_string()),
                },
            };
            out.push(TemplateEntry {
                disk_usage: snapshot::disk_usage(&templates.dir(&m.name)),
                in_use: e
                    .users
                    .iter()
                    .filter(|id| !self.store.load(id).is_ok_and(|r| r.pool.is_some()))
                    .count(),
                pool: self.pool_status(&m.name),
                status,
                automatic: templates.dir(&m.name).join(AUTOMATIC).is_file(),
                manifest: m,
            });
        }
        Ok(out)
    }

    /// Starts `kiln template create --auto --when-idle` for `spec`'s image
    /// and resources, detached (it outlives this process, in its own
    /// process group, logging to `templates/.auto.log`).
    pub fn create_template_in_background(&self, spec: &kiln_api::sandbox::SandboxSpec) {
        let root = self.templates().root().to_path_buf();
        let spawned = (|| -> std::io::Result<()> {
            use std::os::unix::process::CommandExt;
            std::fs::create_dir_all(&root)?;
            let path = root.join(".auto.log");
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20) {
                let _ = std::fs::remove_file(&path);
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            let r = spec.resources;
            std::process::Command::new(&self.supervisor_exe)
                .env(crate::NODE_LOCAL_ENV, "1")
                .args([
                    "template",
                    "create",
                    "--auto",
                    "--when-idle",
                    "--pull",
                    "never",
                ])
                .args(["--cpus", &r.cpus.to_string()])
                .args(["--memory", &r.memory_mib.to_string()])
                .args(["--disk", &r.disk_mib.to_string()])
                .args(["--driver", &spec.driver.to_string()])
                .args(match spec.network {
                    kiln_api::sandbox::NetworkSpec::None => ["--net", "none"],
                    kiln_api::sandbox::NetworkSpec::Default { .. } => ["--net", "default"],
                })
                .arg(&spec.image)
                .env("KILN_STATE_DIR", &self.dirs().state)
                .env("KILN_CACHE_DIR", &self.dirs().cache)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::from(log))
                .process_group(0)
                .spawn()
                .map(drop)
        })();
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start making the template in the background");
        }
    }

    fn auto_lock(&self) -> Result<std::fs::File, TemplateOpError> {
        let root = self.templates().root().to_path_buf();
        std::fs::create_dir_all(&root).map_err(TemplateOpError::Lock)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(AUTO_LOCK))
            .map_err(TemplateOpError::Lock)?;
        // Held (the lock lives with the open file) until the caller drops it.
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(TemplateOpError::Busy),
            Err(std::fs::TryLockError::Error(e)) => Err(TemplateOpError::Lock(e)),
        }
    }

    /// Removes the idle automatic templates (no sandbox uses them, no
    /// pool) made from the image with manifest digest `digest`: they are
    /// a cache, and must not keep a user's `images rm` from working.
    pub async fn evict_automatic_of_image(&self, digest: &str) -> Vec<String> {
        let templates = self.templates();
        let Ok(entries) = templates.list() else {
            return vec![];
        };
        let mut evicted = vec![];
        for e in entries {
            let name = e.manifest.name.clone();
            if e.manifest.image_digest != digest
                || !templates.dir(&name).join(AUTOMATIC).is_file()
                || e.users.iter().any(|id| self.alive(id))
                || self.pool_status(&name).is_some()
            {
                continue;
            }
            match self.remove_template(&name).await {
                Ok(()) => evicted.push(name),
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "cannot evict an automatic template")
                }
            }
        }
        evicted
    }

    /// Evicts automatic templates, least recently used first, until they
    /// fit the budget together; never `keep`, one in use or one with a
    /// pool. What it evicted.
    pub async fn evict_automatic(&self, keep: &str) -> Vec<String> {
        let templates = self.templates();
        let Ok(entries) = templates.list() else {
            return vec![];
        };
        let mut auto: Vec<(std::time::SystemTime, String, u64)> = vec![];
        let mut total = 0u64;
        for e in entries {
            let name = e.manifest.name.clone();
            let dir = templates.dir(&name);
            if !dir.join(AUTOMATIC).is_file() {
                continue;
            }
            let size = snapshot::disk_usage(&dir);
            total += size;
            let busy = e.users.iter().any(|id| self.alive(id)) || self.pool_status(&name).is_some();
            if name == keep || busy {
                continue;
            }
            // Last used: when a run last registered in (or left) `users/`.
            let used = std::fs::metadata(dir.join("users"))
                .and_then(|m| m.modified())
                .or_else(|_| std::fs::metadata(&dir).and_then(|m| m.modified()))
                .unwrap_or(std::time::UNIX_EPOCH);
            auto.push((used, name, size));
        }
        auto.sort();
        let budget = self.config.template_budget_mib.saturating_mul(1 << 20);
        let mut evicted = vec![];
        for (_, name, size) in auto {
            if total <= budget {
                break;
            }
            match self.remove_template(&name).await {
                Ok(()) => {
                    tracing::info!(template = %name, "evicted an automatic template (over the budget)");
                    total = total.saturating_sub(size);
                    evicted.push(name);
                }
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "cannot evict an automatic template")
                }
            }
        }
        evicted
    }

    /// Empties the pools of templates that can no longer be used here
    /// (their kernel, initramfs, kiln-init, driver or image changed): no
    /// run would take their members, which would otherwise stay paused
    /// until `template rm`. `keep` is the template just created.
    async fn drain_stale_pools(&self, keep: &str) -> Vec<(String, u32)> {
        let templates = self.templates();
        let mut drained = vec![];
        let Some((guest, driver)) = self.this_host() else {
            return drained;
        };
        for pool in crate::pool::Pool::all(self.dirs()) {
            let name = pool.template().to_string();
            if name == keep {
                continue;
            }
            let stale = match templates.verify(&name, &guest, &driver, false) {
                Ok(_) => false,
                Err(VerifySnapshotError::NotFound(_)) => true,
                Err(e) => template::is_stale(&e),
            };
            if stale {
                match self.drain_pool(&name).await {
                    Ok(n) if n > 0 => drained.push((name, n)),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(template = %name, error = %e, "cannot empty a stale pool")
                    }
                }
            }
        }
        drained
    }

    /// What templates are checked against here: the guest artifacts'
    /// digests and the default driver (`None` if either is missing).
    fn this_host(&self) -> Option<(GuestDigests, kiln_vmm::DriverInfo)> {
        let a = GuestArtifacts::locate(self.dirs()).ok()?;
        let (drv, _) = crate::vm::driver_for(kiln_vmm::DriverChoice::Auto).ok()?;
        let g = snapshot::guest_digests(&a, drv.kind()).ok()?;
        Some((g, drv.info().clone()))
    }
}
