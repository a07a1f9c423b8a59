//! `kiln images …` and the image step of `kiln run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_image::{Image, ImageRef, ImageStore, Progress, PullOptions, PullPhase};
use kiln_node::compose::ImageDefaults;
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
        ImagesCommand::Rm { images: names } => {
            let images = open(store)?;
            let mut code = 0;
            for n in names {
                match images.remove(&n) {
                    Ok(removed) => {
                        for r in removed {
                            println!("removed {r}");
                        }
                    }
                    Err(e) => {
                        eprintln!("kiln: cannot remove {n}: {e}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        ImagesCommand::Prune => {
            let images = open(store)?;
            let report = images.prune().context("cannot prune the image cache")?;
            for i in &report.images {
                println!("removed {i}");
            }
            println!(
                "{} image(s), {} temporary dir(s), {} reclaimed",
                report.images.len(),
                report.temp_dirs,
                human_size(report.bytes)
            );
            Ok(0)
        }
    }
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
