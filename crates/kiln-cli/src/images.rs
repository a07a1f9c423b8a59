//! `kiln images …`, and the progress bars of a pull. What may be removed
//! is the node's decision (`kiln_node::node`); this prints it.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_image::{Progress, PullPhase};
use kiln_node::node::{Node, PulledImage, RemoveVerdict, decide_image_removal};

use crate::ImagesCommand;

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

impl From<PullPolicy> for kiln_api::sandbox::ImagePull {
    fn from(p: PullPolicy) -> Self {
        match p {
            PullPolicy::Missing => kiln_api::sandbox::ImagePull::Missing,
            PullPolicy::Always => kiln_api::sandbox::ImagePull::Always,
            PullPolicy::Never => kiln_api::sandbox::ImagePull::Never,
        }
    }
}

impl From<PullPolicy> for kiln_node::node::PullPolicy {
    fn from(p: PullPolicy) -> Self {
        match p {
            PullPolicy::Missing => kiln_node::node::PullPolicy::Missing,
            PullPolicy::Always => kiln_node::node::PullPolicy::Always,
            PullPolicy::Never => kiln_node::node::PullPolicy::Never,
        }
    }
}

/// Makes `reference` available as a base disk, following `policy`, with
/// progress bars on a terminal.
pub async fn pull(
    node: &Node,
    reference: &str,
    insecure: &[String],
    verbose: bool,
    policy: PullPolicy,
) -> Result<PulledImage> {
    let progress = Bars::new(verbose || std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let pulled = node
        .pull(reference, insecure, policy.into(), &progress)
        .await;
    progress.done();
    let (img, cached) = pulled?;
    if verbose && cached {
        eprintln!("kiln: using cached image {} ({})", reference, img.digest);
    }
    Ok(img)
}

pub async fn dispatch(node: &Node, cmd: ImagesCommand) -> Result<i32> {
    match cmd {
        ImagesCommand::Pull { image, insecure } => {
            let img = pull(node, &image, &insecure, false, PullPolicy::Always).await?;
            println!("{}", img.digest);
            Ok(0)
        }
        ImagesCommand::Ls { quiet } => {
            let list = node.images()?.list()?;
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
        ImagesCommand::Rm {
            images: names,
            force,
        } => {
            let mut code = 0;
            for name in &names {
                // Automatic templates are a cache: they go with the image.
                if let Ok((plan, _)) = node.image_removal(name)
                    && plan.deletes_image
                {
                    for t in node.evict_automatic_of_image(&plan.digest).await {
                        println!("evicted automatic template {t}");
                    }
                }
                if let Err(e) = rm_one(node, name, force) {
                    eprintln!("kiln: cannot remove {name}: {e:#}");
                    code = 125;
                }
            }
            Ok(code)
        }
        ImagesCommand::Prune => prune(node),
    }
}

/// `kiln images rm [-f] NAME`: like `docker rmi` (see
/// `kiln_node::node::decide_image_removal` for what `force` may override).
fn rm_one(node: &Node, name: &str, force: bool) -> Result<()> {
    let (plan, users) = node.image_removal(name)?;
    let images = node.images()?;
    match decide_image_removal(&plan, &users, force) {
        RemoveVerdict::Remove => {
            let removed = images.remove(name)?;
            for r in &plan.references {
                println!("untagged {r}");
            }
            for d in removed {
                println!("removed {d}");
            }
            Ok(())
        }
        RemoveVerdict::Untag { kept_for } => {
            for r in images.untag(name)? {
                println!("untagged {r}");
            }
            println!("kept {} (used by {kept_for})", plan.digest);
            Ok(())
        }
        RemoveVerdict::Refuse(why) => bail!("{why}"),
    }
}

/// `kiln images prune`: stale temporaries, and images no reference names
/// unless something uses them.
fn prune(node: &Node) -> Result<i32> {
    let (report, in_use) = node.prune_images()?;
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
pub struct Bars {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new(enabled: bool) -> Bars {
        Bars {
            enabled,
            bar: Mutex::new(None),
        }
    }

    pub fn done(&self) {
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
