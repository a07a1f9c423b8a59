//! `kiln images …` and the image step of `kiln run`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_image::{Image, ImageRef, ImageStore, Progress, PullOptions, PullPhase, Removal};
use kiln_node::compose::ImageDefaults;
use kiln_node::snapshot::{Manifest, SnapshotStore};
use kiln_node::store::Store;

use crate::ImagesCommand;

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub digest: String,
    pub disk: PathBuf,
    pub defaults: ImageDefaults,
}

/// When `kiln run` contacts the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Use the cached image when there is one (like `docker run`).
    Missing,
    /// Always resolve the reference again (a moved tag is noticed).
    Always,
    /// Never contact a registry; fail when the image is not cached.
    Never,
}

fn open(store: &Store) -> Result<ImageStore> {
    ImageStore::open(store.dirs().images()).context("cannot open the image cache")
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

/// Makes `reference` available as a base disk, following `policy`.
pub async fn pull(
    store: &Store,
    reference: &str,
    insecure: &[String],
    verbose: bool,
    policy: PullPolicy,
) -> Result<PulledImage> {
    let r =
        ImageRef::parse(reference).with_context(|| format!("bad image reference {reference:?}"))?;
    let images = open(store)?;
    // Local sources (layout directories, archives) are always read again:
    // that costs a file read, and they change under the same name.
    let remote = matches!(r, ImageRef::Registry(_));
    if remote && policy != PullPolicy::Always {
        if let Some(img) = images.get(&r).context("cannot read the image cache")? {
            if verbose {
                eprintln!(
                    "kiln: using cached image {} ({})",
                    reference, img.manifest_digest
                );
            }
            return Ok(to_pulled(img));
        }
        if policy == PullPolicy::Never {
            bail!("image {reference} is not cached and --pull never forbids pulling it");
        }
    }
    let opts = PullOptions {
        insecure_registries: insecure.to_vec(),
        ..PullOptions::default()
    };
    let progress = Bars::new(verbose || std::io::stderr().is_terminal());
    let img = images
        .pull(&r, &opts, &progress)
        .await
        .with_context(|| format!("cannot pull {reference}"))?;
    progress.done();
    Ok(to_pulled(img))
}

pub async fn dispatch(store: &Store, cmd: ImagesCommand) -> Result<i32> {
    match cmd {
        ImagesCommand::Pull { image, insecure } => {
            let img = pull(store, &image, &insecure, false, PullPolicy::Always).await?;
            println!("{}", img.digest);
            Ok(0)
        }
        ImagesCommand::Ls { quiet } => {
            let images = open(store)?;
            let list = images.list().context("cannot list the image cache")?;
            if quiet {
                for i in list {
                    println!("{}", i.manifest_digest);
                }
                return Ok(0);
            }
            println!("{:<48} {:<19} {:>10}", "REFERENCE", "DIGEST", "DISK");
            for i in list {
                let short = i.manifest_digest.trim_start_matches("sha256:");
                println!(
                    "{:<48} sha256:{:<12} {:>10}",
                    i.reference,
                    &short[..short.len().min(12)],
                    human_size(i.size)
                );
            }
            Ok(0)
        }
        // `-f/--force` needs a `force: bool` field on `ImagesCommand::Rm`
        // (main.rs); until it has one, `kiln images rm` never forces.
        ImagesCommand::Rm {
            images: names,
            force,
        } => rm(store, &names, force),
        ImagesCommand::Prune => prune(store),
    }
}

/// `kiln images rm [-f] NAME...`: like `docker rmi`. A name is a reference
/// or a `sha256:` digest. Removing a reference that another reference to
/// the same image still names only untags, always. Deleting the image
/// itself (its base disk) is refused, with one line naming who uses it,
/// while anything does (see [`decide`] for what `force` may override).
/// Every name is tried; exit code 125 if any could not be removed.
fn rm(store: &Store, names: &[String], force: bool) -> Result<i32> {
    let images = open(store)?;
    let mut code = 0;
    for name in names {
        if let Err(e) = rm_one(store, &images, name, force) {
            eprintln!("kiln: cannot remove {name}: {e:#}");
            code = 125;
        }
    }
    Ok(code)
}

fn rm_one(store: &Store, images: &ImageStore, name: &str, force: bool) -> Result<()> {
    let plan = images.removal(name)?;
    let users = if plan.deletes_image {
        Usage::scan(store, images)?.of(&plan.digest, &plan.disk)
    } else {
        Users::default()
    };
    match decide(&plan, &users, force) {
        Verdict::Remove => {
            let removed = images.remove(name)?;
            for r in &plan.references {
                println!("untagged {r}");
            }
            for d in removed {
                println!("removed {d}");
            }
            Ok(())
        }
        Verdict::Untag { kept_for } => {
            for r in images.untag(name)? {
                println!("untagged {r}");
            }
            println!("kept {} (used by {kept_for})", plan.digest);
            Ok(())
        }
        Verdict::Refuse(why) => bail!("{why}"),
    }
}

/// What `kiln images rm` does with one name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
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
fn decide(plan: &Removal, users: &Users, force: bool) -> Verdict {
    if !plan.deletes_image || users.is_empty() {
        return Verdict::Remove;
    }
    let image = short_digest(&plan.digest);
    if !users.live.is_empty() || !users.processes.is_empty() {
        let hint = match users.live.as_slice() {
            [] => "wait for it to end".to_string(),
            [(id, _)] => format!("remove the sandbox first (kiln rm -f {id})"),
            [(id, _), ..] => format!("remove the sandboxes first (kiln rm -f {id} ...)"),
        };
        return Verdict::Refuse(format!(
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
        return Verdict::Refuse(format!(
            "image {image} is in use by {}; remove them first ({}) or use -f",
            users.describe(),
            commands.join(", ")
        ));
    }
    if users.snapshots.is_empty() && users.templates.is_empty() {
        return Verdict::Remove;
    }
    let keepers = Users {
        snapshots: users.snapshots.clone(),
        templates: users.templates.clone(),
        ..Users::default()
    };
    Verdict::Untag {
        kept_for: keepers.describe(),
    }
}

/// Who uses one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Users {
    /// Sandboxes whose VM may run: (ID, state).
    live: Vec<(String, String)>,
    /// Other processes holding the base disk open: (pid, name).
    processes: Vec<(u32, String)>,
    /// Sandbox IDs that have ended (kept until `kiln rm`).
    ended: Vec<String>,
    snapshots: Vec<String>,
    templates: Vec<String>,
}

impl Users {
    fn is_empty(&self) -> bool {
        self.live.is_empty()
            && self.processes.is_empty()
            && self.ended.is_empty()
            && self.snapshots.is_empty()
            && self.templates.is_empty()
    }

    /// One line: "sandbox ID (running), ended sandbox ID, snapshot NAME, …";
    /// at most 6 named, then how many more.
    fn describe(&self) -> String {
        let mut all: Vec<String> = vec![];
        all.extend(
            self.live
                .iter()
                .map(|(id, state)| format!("sandbox {id} ({state})")),
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
    /// (record, VM may run, recorded VMM pid).
    sandboxes: Vec<(kiln_node::store::SandboxRecord, bool, Option<u32>)>,
    snapshots: Vec<Manifest>,
    templates: Vec<Manifest>,
    /// Base disks of the cache held open by a process: path → (pid, name).
    open: HashMap<PathBuf, Vec<(u32, String)>>,
}

impl Usage {
    /// Reads the sandboxes, snapshots and templates of the state directory
    /// and the open files of every process we may look at. Any state that
    /// cannot be read fails the scan: an image is not removed on a guess.
    fn scan(store: &Store, images: &ImageStore) -> Result<Usage> {
        let mut sandboxes = vec![];
        for rec in store.list().context("cannot list the sandboxes")? {
            let rec = crate::commands::refresh(store, rec);
            let vm_pid = rec
                .vm
                .as_ref()
                .and_then(|v| v.get("pid"))
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u32::try_from(p).ok());
            let vm_alive = vm_pid.is_some_and(process_alive);
            let live = !rec.state.is_finished() || vm_alive;
            sandboxes.push((rec, live, vm_pid));
        }
        let manifests = |s: SnapshotStore, what: &str| -> Result<Vec<Manifest>> {
            Ok(s.list()
                .with_context(|| format!("cannot list the {what}"))?
                .into_iter()
                .map(|e| e.manifest)
                .collect())
        };
        Ok(Usage {
            sandboxes,
            snapshots: manifests(SnapshotStore::new(store.dirs()), "snapshots")?,
            templates: manifests(kiln_node::template::store(store.dirs()), "templates")?,
            open: open_files_under(&images.root().join("sha256")),
        })
    }

    /// Who uses the image `digest` whose base disk is `disk` (a record
    /// naming either counts).
    fn of(&self, digest: &str, disk: &Path) -> Users {
        let mut users = Users::default();
        let mut vmm_pids = vec![];
        for (rec, live, vm_pid) in &self.sandboxes {
            if rec.spec.image_digest != digest && rec.spec.image_disk != disk {
                continue;
            }
            if *live {
                let state = if rec.state.is_finished() {
                    format!("{}, its VMM still runs", rec.state.label())
                } else {
                    rec.state.label()
                };
                users.live.push((rec.id.clone(), state));
                vmm_pids.extend(*vm_pid);
            } else {
                users.ended.push(rec.id.clone());
            }
        }
        let uses = |m: &&Manifest| m.image_digest == digest || m.image_disk == disk;
        users.snapshots = self
            .snapshots
            .iter()
            .filter(uses)
            .map(|m| m.name.clone())
            .collect();
        users.templates = self
            .templates
            .iter()
            .filter(uses)
            .map(|m| m.name.clone())
            .collect();
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

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    })
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

/// `kiln images prune`: stale temporaries, and images no reference names
/// unless something uses them (anything that refuses `images rm` without
/// `-f` keeps an image here too).
fn prune(store: &Store) -> Result<i32> {
    let images = open(store)?;
    let usage = Usage::scan(store, &images)?;
    let mut in_use: HashMap<String, Users> = HashMap::new();
    let report = images
        .prune_keeping(|digest| {
            let users = usage.of(digest, &images.disk_path(digest));
            let used = !users.is_empty();
            if used {
                in_use.insert(digest.to_string(), users);
            }
            used
        })
        .context("cannot prune the image cache")?;
    for i in &report.images {
        println!("removed {i}");
    }
    for d in &report.kept {
        if let Some(users) = in_use.get(d) {
            println!("kept {d} (used by {})", users.describe());
        }
    }
    println!(
        "{} image(s), {} temporary dir(s), {} reclaimed",
        report.images.len(),
        report.temp_dirs,
        human_size(report.bytes)
    );
    Ok(0)
}

fn short_digest(digest: &str) -> String {
    format!("sha256:{}", short(digest))
}

pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// indicatif bars for a pull; silent when not on a terminal.
struct Bars {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new(enabled: bool) -> Bars {
        Bars {
            enabled,
            bar: Mutex::new(None),
        }
    }

    fn done(&self) {
        if let Ok(mut g) = self.bar.lock()
            && let Some(b) = g.take()
        {
            b.finish_and_clear();
        }
    }
}

fn short(digest: &str) -> &str {
    let h = digest.trim_start_matches("sha256:");
    &h[..h.len().min(12)]
}

impl Progress for Bars {
    fn start(&self, phase: &PullPhase, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let msg = match phase {
            PullPhase::Resolve => "resolving".to_string(),
            PullPhase::Download { digest } => format!("downloading {}", short(digest)),
            PullPhase::Unpack { digest } => format!("unpacking {}", short(digest)),
            PullPhase::BuildDisk => "building disk".to_string(),
        };
        let bar = match total {
            Some(t) => {
                let b = ProgressBar::new(t);
                if let Ok(style) = ProgressStyle::with_template(
                    "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                ) {
                    b.set_style(style.progress_chars("=> "));
                }
                b
            }
            None => {
                let b = ProgressBar::new_spinner();
                b.enable_steady_tick(Duration::from_millis(120));
                b
            }
        };
        bar.set_message(msg);
        if let Ok(mut g) = self.bar.lock()
            && let Some(old) = g.replace(bar)
        {
            old.finish_and_clear();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(g) = self.bar.lock()
            && let Some(b) = g.as_ref()
        {
            b.inc(bytes);
        }
    }

    fn finish(&self, _phase: &PullPhase) {
        if let Ok(mut g) = self.bar.lock()
            && let Some(b) = g.take()
        {
            b.finish_and_clear();
        }
    }
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

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refuse(why) => {
                assert_eq!(why.lines().count(), 1, "{why}");
                why
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn unused_images_and_other_references_go() {
        assert_eq!(
            decide(&plan(true), &Users::default(), false),
            Verdict::Remove
        );
        // Another reference keeps the image: untagging is always allowed.
        let running = Users {
            live: vec![("a1".into(), "running".into())],
            ..Users::default()
        };
        assert_eq!(decide(&plan(false), &running, false), Verdict::Remove);
    }

    #[test]
    fn a_running_vm_refuses_even_with_force() {
        let running = Users {
            live: vec![("a1b2".into(), "running".into())],
            snapshots: vec!["s1".into()],
            ..Users::default()
        };
        for force in [false, true] {
            let why = refused(decide(&plan(true), &running, force));
            assert!(why.contains("sandbox a1b2 (running)"), "{why}");
            assert!(why.contains("snapshot s1"), "{why}");
            assert!(why.contains("kiln rm -f a1b2"), "{why}");
            assert!(why.contains("sha256:abababababab"), "{why}");
        }
        let booting = Users {
            processes: vec![(42, "qemu-system-x86".into())],
            ..Users::default()
        };
        let why = refused(decide(&plan(true), &booting, true));
        assert!(why.contains("process 42 (qemu-system-x86)"), "{why}");
    }

    #[test]
    fn force_removes_past_ended_sandboxes_and_untags_past_snapshots() {
        let ended = Users {
            ended: vec!["c3".into()],
            ..Users::default()
        };
        let why = refused(decide(&plan(true), &ended, false));
        assert!(why.contains("ended sandbox c3"), "{why}");
        assert!(why.contains("-f"), "{why}");
        assert_eq!(decide(&plan(true), &ended, true), Verdict::Remove);

        let kept = Users {
            ended: vec!["c3".into()],
            snapshots: vec!["s1".into()],
            templates: vec!["tpl-1".into()],
            ..Users::default()
        };
        let why = refused(decide(&plan(true), &kept, false));
        assert!(
            why.contains("snapshot s1") && why.contains("template tpl-1"),
            "{why}"
        );
        assert_eq!(
            decide(&plan(true), &kept, true),
            Verdict::Untag {
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
        let many = Users {
            ended: (0..10).map(|i| format!("e{i}")).collect(),
            ..Users::default()
        };
        let d = many.describe();
        assert!(d.starts_with("ended sandbox e0, "), "{d}");
        assert!(d.ends_with("ended sandbox e5, 4 more"), "{d}");
    }
}
