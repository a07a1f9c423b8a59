//! Images on the node: pulls (cached by manifest digest) and the question
//! whether an image of the cache may be removed, asked of every sandbox,
//! snapshot, template and process of the node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_image::{
    Image, ImageRef, ImageStore, ListImagesError, OpenStoreError, ParseImageRefError, Progress,
    PruneImagesError, PruneReport, PullImageError, PullOptions, Removal, RemoveImageError,
};

use super::Node;
use crate::compose::ImageDefaults;
use crate::snapshot::{ListSnapshotsError, Manifest, SnapshotStore};
use crate::store::StoreError;

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub digest: String,
    pub disk: PathBuf,
    pub defaults: ImageDefaults,
}

/// When a run contacts the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Use the cached image when there is one (like `docker run`).
    #[default]
    Missing,
    /// Always resolve the reference again (a moved tag is noticed).
    Always,
    /// Never contact a registry; fail when the image is not cached.
    Never,
}

impl From<kiln_api::sandbox::ImagePull> for PullPolicy {
    fn from(p: kiln_api::sandbox::ImagePull) -> Self {
        match p {
            kiln_api::sandbox::ImagePull::Missing => PullPolicy::Missing,
            kiln_api::sandbox::ImagePull::Always => PullPolicy::Always,
            kiln_api::sandbox::ImagePull::Never => PullPolicy::Never,
        }
    }
}

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageOpError {
    /// (The parse error names the reference itself.)
    #[error(transparent)]
    Reference(#[from] ParseImageRefError),
    #[error("cannot open the image cache")]
    Open(#[source] OpenStoreError),
    #[error("cannot read the image cache")]
    Read(#[source] ListImagesError),
    #[error("image {0} is not cached and --pull never forbids pulling it")]
    NotCached(String),
    #[error("cannot pull {reference}")]
    Pull {
        reference: String,
        #[source]
        source: Box<PullImageError>,
    },
    #[error(transparent)]
    Remove(#[from] RemoveImageError),
    #[error("cannot prune the image cache")]
    Prune(#[source] PruneImagesError),
    #[error("cannot list the sandboxes")]
    Sandboxes(#[source] StoreError),
    #[error("cannot list the {what}")]
    Snapshots {
        what: &'static str,
        #[source]
        source: ListSnapshotsError,
    },
}

fn to_pulled(img: Image) -> PulledImage {
    let c = img.config;
    let non_empty = |s: String| if s.is_empty() { None } else { Some(s) };
    PulledImage {
        digest: img.manifest_digest,
        disk: img.disk,
        defaults: ImageDefaults {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env,
            working_dir: non_empty(c.working_dir),
            user: non_empty(c.user),
        },
    }
}

impl Node {
    /// The node's image cache.
    pub fn images(&self) -> Result<ImageStore, ImageOpError> {
        ImageStore::open(self.dirs().images()).map_err(ImageOpError::Open)
    }

    /// Makes `reference` available as a base disk, following `policy`.
    /// `Ok((image, cached))`: `cached` when no registry was contacted.
    pub async fn pull(
        &self,
        reference: &str,
        insecure: &[String],
        policy: PullPolicy,
        progress: &dyn Progress,
    ) -> Result<(PulledImage, bool), ImageOpError> {
        let r = ImageRef::parse(reference)?;
        let images = self.images()?;
        // Local sources (layout directories, archives) are always read
        // again: that costs a file read, and they change under the same name.
        let remote = matches!(r, ImageRef::Registry(_));
        if remote && policy != PullPolicy::Always {
            if let Some(img) = images.get(&r).map_err(ImageOpError::Read)? {
                return Ok((to_pulled(img), true));
            }
            if policy == PullPolicy::Never {
                return Err(ImageOpError::NotCached(reference.to_string()));
            }
        }
        let opts = PullOptions {
            insecure_registries: insecure.to_vec(),
            ..PullOptions::default()
        };
        let img = images
            .pull(&r, &opts, progress)
            .await
            .map_err(|source| ImageOpError::Pull {
                reference: reference.to_string(),
                source: Box::new(source),
            })?;
        Ok((to_pulled(img), false))
    }

    /// What removing image `name` (a reference or a `sha256:` digest)
    /// would do, and who uses what it would delete.
    pub fn image_removal(&self, name: &str) -> Result<(Removal, ImageUsers), ImageOpError> {
        let images = self.images()?;
        let plan = images.removal(name)?;
        let users = if plan.deletes_image {
            Usage::scan(self, &images)?.of(&plan.digest, &plan.disk)
        } else {
            ImageUsers::default()
        };
        Ok((plan, users))
    }

    /// `images prune`: stale temporaries, and images no reference names
    /// unless something uses them. The report, and who keeps each kept image.
    pub fn prune_images(&self) -> Result<(PruneReport, HashMap<String, ImageUsers>), ImageOpError> {
        let images = self.images()?;
        let usage = Usage::scan(self, &images)?;
        let mut in_use: HashMap<String, ImageUsers> = HashMap::new();
        let report = images
            .prune_keeping(|digest| {
                let users = usage.of(digest, &images.disk_path(digest));
                let used = !users.is_empty();
                if used {
                    in_use.insert(digest.to_string(), users);
                }
                used
            })
            .map_err(ImageOpError::Prune)?;
        Ok((report, in_use))
    }
}

/// What `kiln images rm` does with one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveVerdict {
    /// Remove as asked: the reference(s), and the image if it was the last.
    Remove,
    /// Remove the reference(s) only; the image stays (listed by digest) for
    /// the snapshots and templates named here, and `prune` keeps it.
    Untag { kept_for: String },
    /// Remove nothing; the one-line reason.
    Refuse(String),
}

/// Whether an image may go, given who uses it.
///
/// - A VM that may be running from the disk (a sandbox not ended, a
///   sandbox whose VMM is still recorded and alive, any process holding the
///   disk open, e.g. `kiln template create` booting) refuses the removal,
///   **even with `force`**: the disk is never pulled from under a running
///   VM (docker's "cannot be forced" for running containers).
/// - Otherwise, without `force`, any user refuses it: ended sandboxes
///   (until `kiln rm`), snapshots and templates (they restore onto this
///   disk; a restore would fail without it).
/// - With `force` and only ended sandboxes: removed. An ended sandbox never
///   boots again (its record, log and writable disk stay for `kiln logs`
///   and `kiln rm`), so nothing needs the disk.
/// - With `force` and snapshots or templates: untagged only. The disk stays
///   so that they remain restorable, and `images prune` keeps it while they
///   exist; removing them and pruning reclaims it.
pub fn decide(plan: &Removal, users: &ImageUsers, force: bool) -> RemoveVerdict {
    if !plan.deletes_image || users.is_empty() {
        return RemoveVerdict::Remove;
    }
    let image = short_digest(&plan.digest);
    if !users.live.is_empty() || !users.processes.is_empty() {
        // A sandbox of another state directory is removed from there.
        let env = |dir: &Option<PathBuf>| {
            dir.as_ref()
                .map(|d| format!("KILN_STATE_DIR={} ", d.display()))
                .unwrap_or_default()
        };
        let hint = match users.live.as_slice() {
            [] => "wait for it to end".to_string(),
            [(id, _, dir)] => format!("remove the sandbox first ({}kiln rm -f {id})", env(dir)),
            [(id, _, dir), ..] => format!(
                "remove the sandboxes first ({}kiln rm -f {id} ...)",
                env(dir)
            ),
        };
        return RemoveVerdict::Refuse(format!(
            "image {image} is in use by {}; {hint}; -f cannot remove an image a VM runs from",
            users.describe()
        ));
    }
    if !force {
        let mut commands = vec![];
        if !users.ended.is_empty() {
            commands.push("kiln rm");
        }
        if !users.snapshots.is_empty() {
            commands.push("kiln snapshot rm");
        }
        if !users.templates.is_empty() {
            commands.push("kiln template rm");
        }
        let there = if users.elsewhere {
            ", with KILN_STATE_DIR set to the state directory named"
        } else {
            ""
        };
        return RemoveVerdict::Refuse(format!(
            "image {image} is in use by {}; remove them first ({}{there}) or use -f",
            users.describe(),
            commands.join(", ")
        ));
    }
    if users.snapshots.is_empty() && users.templates.is_empty() {
        return RemoveVerdict::Remove;
    }
    let keepers = ImageUsers {
        snapshots: users.snapshots.clone(),
        templates: users.templates.clone(),
        ..ImageUsers::default()
    };
    RemoveVerdict::Untag {
        kept_for: keepers.describe(),
    }
}

/// Who uses one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageUsers {
    /// Sandboxes whose VM may run: (ID, state, state directory if not
    /// this one).
    live: Vec<(String, String, Option<PathBuf>)>,
    /// Other processes holding the base disk open: (pid, name).
    processes: Vec<(u32, String)>,
    /// Sandbox IDs that have ended (kept until `kiln rm`).
    ended: Vec<String>,
    snapshots: Vec<String>,
    templates: Vec<String>,
    /// Some of them belong to another state directory sharing the cache
    /// (each is named with it).
    elsewhere: bool,
}

impl ImageUsers {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
            && self.processes.is_empty()
            && self.ended.is_empty()
            && self.snapshots.is_empty()
            && self.templates.is_empty()
    }

    /// One line: "sandbox ID (running), ended sandbox ID, snapshot NAME, …";
    /// at most 6 named, then how many more.
    pub fn describe(&self) -> String {
        let mut all: Vec<String> = vec![];
        all.extend(
            self.live
                .iter()
                .map(|(id, state, _)| format!("sandbox {id} ({state})")),
        );
        all.extend(
            self.processes
                .iter()
                .map(|(pid, name)| format!("process {pid} ({name})")),
        );
        all.extend(self.ended.iter().map(|id| format!("ended sandbox {id}")));
        all.extend(self.snapshots.iter().map(|n| format!("snapshot {n}")));
        all.extend(self.templates.iter().map(|n| format!("template {n}")));
        const SHOWN: usize = 6;
        if all.len() > SHOWN {
            let more = all.len() - SHOWN;
            all.truncate(SHOWN);
            all.push(format!("{more} more"));
        }
        all.join(", ")
    }
}

/// Everything in the state directory (and every process) that may use an
/// image of the cache, read once.
struct Usage {
    /// (record, VM may run, recorded VMM pid, its state directory if not
    /// this node's).
    sandboxes: Vec<(
        crate::store::SandboxRecord,
        bool,
        Option<u32>,
        Option<PathBuf>,
    )>,
    /// With their state directory if not this node's.
    snapshots: Vec<(Manifest, Option<PathBuf>)>,
    templates: Vec<(Manifest, Option<PathBuf>)>,
    /// Base disks of the cache held open by a process: path → (pid, name).
    open: HashMap<PathBuf, Vec<(u32, String)>>,
}

impl Usage {
    /// Reads the sandboxes, snapshots and templates of the state directory
    /// and the open files of every process we may look at. Any state that
    /// cannot be read fails the scan: an image is not removed on a guess.
    fn scan(node: &Node, images: &ImageStore) -> Result<Usage, ImageOpError> {
        let mut usage = Usage {
            sandboxes: vec![],
            snapshots: vec![],
            templates: vec![],
            open: open_files_under(&images.root().join("sha256")),
        };
        // Every state directory that shares this cache: an image one of
        // them needs must not be removed from another.
        for state in node.state_dirs_sharing_cache() {
            let origin = (state != node.dirs().state).then(|| state.clone());
            let other = Node {
                store: crate::store::Store::new(crate::paths::Dirs::new(
                    state,
                    node.dirs().cache.clone(),
                )),
                supervisor_exe: node.supervisor_exe.clone(),
                config: node.config.clone(),
            };
            usage.add(&other, origin)?;
        }
        Ok(usage)
    }

    fn add(&mut self, node: &Node, origin: Option<PathBuf>) -> Result<(), ImageOpError> {
        for rec in node.store.list().map_err(ImageOpError::Sandboxes)? {
            let rec = node.refresh(rec);
            let vm_pid = rec
                .vm
                .as_ref()
                .and_then(|v| v.get("pid"))
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u32::try_from(p).ok());
            let vm_alive = vm_pid.is_some_and(crate::store::process_alive);
            let live = !rec.state.is_finished() || vm_alive;
            self.sandboxes.push((rec, live, vm_pid, origin.clone()));
        }
        let manifests = |s: SnapshotStore,
                         what: &'static str|
         -> Result<Vec<(Manifest, Option<PathBuf>)>, ImageOpError> {
            Ok(s.list()
                .map_err(|source| ImageOpError::Snapshots { what, source })?
                .into_iter()
                .map(|e| (e.manifest, origin.clone()))
                .collect())
        };
        self.snapshots
            .extend(manifests(node.snapshots(), "snapshots")?);
        self.templates
            .extend(manifests(node.templates(), "templates")?);
        Ok(())
    }

    /// Who uses the image `digest` whose base disk is `disk` (a record
    /// naming either counts).
    fn of(&self, digest: &str, disk: &Path) -> ImageUsers {
        let mut users = ImageUsers::default();
        let mut vmm_pids = vec![];
        // Users of another state directory are named with it.
        let tag = |o: &Option<PathBuf>| {
            o.as_ref()
                .map(|d| format!(" of state directory {}", d.display()))
                .unwrap_or_default()
        };
        for (rec, live, vm_pid, origin) in &self.sandboxes {
            if rec.spec.image_digest != digest && rec.spec.image_disk != disk {
                continue;
            }
            users.elsewhere |= origin.is_some();
            if *live {
                let state = if rec.state.is_finished() {
                    format!("{}, its VMM still runs", rec.state.label())
                } else {
                    rec.state.label()
                };
                let state = format!("{state}{}", tag(origin));
                users.live.push((rec.id.clone(), state, origin.clone()));
                vmm_pids.extend(*vm_pid);
            } else {
                users.ended.push(format!("{}{}", rec.id, tag(origin)));
            }
        }
        let uses = |(m, _): &&(Manifest, Option<PathBuf>)| {
            m.image_digest == digest || m.image_disk == disk
        };
        for (m, origin) in self.snapshots.iter().filter(uses) {
            users.elsewhere |= origin.is_some();
            users.snapshots.push(format!("{}{}", m.name, tag(origin)));
        }
        for (m, origin) in self.templates.iter().filter(uses) {
            users.elsewhere |= origin.is_some();
            users.templates.push(format!("{}{}", m.name, tag(origin)));
        }
        let disk = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
        users.processes = self
            .open
            .get(&disk)
            .into_iter()
            .flatten()
            .filter(|(pid, _)| !vmm_pids.contains(pid))
            .cloned()
            .collect();
        users
    }
}

/// Files under `dir` that processes hold open (`/proc/PID/fd`; processes we
/// may not look into are skipped): path → (pid, command name).
fn open_files_under(dir: &Path) -> HashMap<PathBuf, Vec<(u32, String)>> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let me = std::process::id();
    let mut out: HashMap<PathBuf, Vec<(u32, String)>> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut held: Vec<PathBuf> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|t| t.starts_with(&dir))
            .collect();
        held.sort();
        held.dedup();
        if held.is_empty() {
            continue;
        }
        let name = std::fs::read_to_string(p.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        for path in held {
            out.entry(path).or_default().push((pid, name.clone()));
        }
    }
    out
}

/// The short form of a digest: `sha256:` and 12 hex digits.
pub fn short_digest(digest: &str) -> String {
    let h = digest.trim_start_matches("sha256:");
    format!("sha256:{}", &h[..h.len().min(12)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(deletes_image: bool) -> Removal {
        Removal {
            digest: format!("sha256:{}", "ab".repeat(32)),
            disk: "/cache/images/sha256/ab/disk.ext4".into(),
            references: vec!["busybox:1".into()],
            deletes_image,
        }
    }

    fn refused(v: RemoveVerdict) -> String {
        match v {
            RemoveVerdict::Refuse(why) => {
                assert_eq!(why.lines().count(), 1, "{why}");
                why
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn unused_images_and_other_references_go() {
        assert_eq!(
            decide(&plan(true), &ImageUsers::default(), false),
            RemoveVerdict::Remove
        );
        // Another reference keeps the image: untagging is always allowed.
        let running = ImageUsers {
            live: vec![("a1".into(), "running".into(), None)],
            ..ImageUsers::default()
        };
        assert_eq!(decide(&plan(false), &running, false), RemoveVerdict::Remove);
    }

    #[test]
    fn users_of_another_state_directory_are_named_with_it() {
        let other = ImageUsers {
            live: vec![(
                "a1".into(),
                "running of state directory /b".into(),
                Some("/b".into()),
            )],
            ..ImageUsers::default()
        };
        let why = refused(decide(&plan(true), &other, true));
        assert!(why.contains("(KILN_STATE_DIR=/b kiln rm -f a1)"), "{why}");
        let snap = ImageUsers {
            snapshots: vec!["keep of state directory /b".into()],
            elsewhere: true,
            ..ImageUsers::default()
        };
        let why = refused(decide(&plan(true), &snap, false));
        assert!(why.contains("snapshot keep of state directory /b"), "{why}");
        assert!(why.contains("KILN_STATE_DIR"), "{why}");
    }

    #[test]
    fn a_running_vm_refuses_even_with_force() {
        let running = ImageUsers {
            live: vec![("a1b2".into(), "running".into(), None)],
            snapshots: vec!["s1".into()],
            ..ImageUsers::default()
        };
        for force in [false, true] {
            let why = refused(decide(&plan(true), &running, force));
            assert!(why.contains("sandbox a1b2 (running)"), "{why}");
            assert!(why.contains("snapshot s1"), "{why}");
            assert!(why.contains("kiln rm -f a1b2"), "{why}");
            assert!(why.contains("sha256:abababababab"), "{why}");
        }
        let booting = ImageUsers {
            processes: vec![(42, "qemu-system-x86".into())],
            ..ImageUsers::default()
        };
        let why = refused(decide(&plan(true), &booting, true));
        assert!(why.contains("process 42 (qemu-system-x86)"), "{why}");
    }

    #[test]
    fn force_removes_past_ended_sandboxes_and_untags_past_snapshots() {
        let ended = ImageUsers {
            ended: vec!["c3".into()],
            ..ImageUsers::default()
        };
        let why = refused(decide(&plan(true), &ended, false));
        assert!(why.contains("ended sandbox c3"), "{why}");
        assert!(why.contains("-f"), "{why}");
        assert_eq!(decide(&plan(true), &ended, true), RemoveVerdict::Remove);

        let kept = ImageUsers {
            ended: vec!["c3".into()],
            snapshots: vec!["s1".into()],
            templates: vec!["tpl-1".into()],
            ..ImageUsers::default()
        };
        let why = refused(decide(&plan(true), &kept, false));
        assert!(
            why.contains("snapshot s1") && why.contains("template tpl-1"),
            "{why}"
        );
        assert_eq!(
            decide(&plan(true), &kept, true),
            RemoveVerdict::Untag {
                kept_for: "snapshot s1, template tpl-1".into()
            }
        );
    }

    #[test]
    fn processes_holding_a_disk_are_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let disk = dir.path().join("sha256/ab/disk.ext4");
        std::fs::create_dir_all(disk.parent().expect("parent")).expect("mkdir");
        std::fs::write(&disk, b"disk").expect("write");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(&disk).expect("open"))
            .spawn()
            .expect("sleep runs");
        let open = open_files_under(dir.path());
        let _ = child.kill();
        let _ = child.wait();
        let canon = std::fs::canonicalize(&disk).expect("canonical");
        let holders = open.get(&canon).cloned().unwrap_or_default();
        assert_eq!(holders, vec![(child.id(), "sleep".to_string())], "{open:?}");
        assert!(open_files_under(&dir.path().join("sha256/none")).is_empty());
    }

    #[test]
    fn many_users_are_summed_up() {
        let many = ImageUsers {
            ended: (0..10).map(|i| format!("e{i}")).collect(),
            ..ImageUsers::default()
        };
        let d = many.describe();
        assert!(d.starts_with("ended sandbox e0, "), "{d}");
        assert!(d.ends_with("ended sandbox e5, 4 more"), "{d}");
    }
}
