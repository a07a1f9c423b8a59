//! Pulls from a real registry, OCI layouts and docker archives; the base disk is checked
//! with debugfs.

mod common;

use std::time::Instant;

use common::{debugfs, pull, store};
use kiln_image::PullImageError;
use kiln_testkit::{Registry, images};

#[tokio::test]
async fn busybox_from_oci_layout_then_cache_hit() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::busybox()?;
    let (_d, store) = store();
    let t = Instant::now();
    let img = pull(&store, &layout.image_ref()).await?;
    let first = t.elapsed();
    assert!(img.built);
    assert_eq!(img.config.cmd, vec!["sh"]);
    assert!(img.config.env.iter().any(|e| e.starts_with("PATH=")));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&img.disk)?.permissions().mode() & 0o777,
        0o444
    );
    assert_eq!(img.manifest_digest, layout.manifest_digest()?);
    let ls = debugfs(&img.disk, "ls -l /bin");
    assert!(ls.contains("busybox"), "{ls}");
    assert!(ls.contains(" sh"), "{ls}");
    let passwd = debugfs(&img.disk, "cat /etc/passwd");
    assert!(passwd.contains("app:x:1000:1000"), "{passwd}");
    let stat = debugfs(&img.disk, "stat /home/app");
    assert!(stat.contains("User:  1000"), "{stat}");

    let t = Instant::now();
    let again = pull(&store, &layout.image_ref()).await?;
    let hit = t.elapsed();
    assert!(!again.built);
    assert_eq!(again.disk, img.disk);
    eprintln!(
        "busybox (oci layout): pull+convert {:.0} ms, cache hit {:.1} ms, disk {} bytes",
        first.as_secs_f64() * 1e3,
        hit.as_secs_f64() * 1e3,
        img.size
    );
    assert!(hit.as_millis() < 500);
    Ok(())
}

#[tokio::test]
async fn registry_by_tag_and_by_digest_unknown_and_unreachable() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::busybox()?;
    let registry = Registry::start().await?;
    registry.push_layout(&layout, "busybox", "1.35").await?;
    let (_d, store) = store();

    let t = Instant::now();
    let img = pull(&store, &registry.reference("busybox", "1.35")).await?;
    let first = t.elapsed();
    assert!(img.built);
    assert_eq!(img.config.cmd, vec!["sh"]);
    assert!(debugfs(&img.disk, "ls -l /bin").contains("busybox"));

    let t = Instant::now();
    let by_digest = pull(
        &store,
        &format!("{}/busybox@{}", registry.host(), img.manifest_digest),
    )
    .await?;
    let hit = t.elapsed();
    assert!(!by_digest.built, "same digest must be a cache hit");
    assert_eq!(by_digest.disk, img.disk);
    eprintln!(
        "busybox (registry): pull+convert {:.0} ms, cache hit by digest {:.1} ms",
        first.as_secs_f64() * 1e3,
        hit.as_secs_f64() * 1e3
    );

    // Docker v2 schema 2 manifest and media types.
    registry
        .push_layout_docker(&layout, "docker/busybox", "v2")
        .await?;
    let docker = pull(&store, &registry.reference("docker/busybox", "v2")).await?;
    assert!(
        docker.built,
        "a different manifest digest builds its own disk"
    );
    assert_ne!(docker.manifest_digest, img.manifest_digest);
    assert_eq!(docker.config.cmd, vec!["sh"]);
    assert!(debugfs(&docker.disk, "ls -l /bin").contains("busybox"));

    // A fresh store pulling by digest builds from the registry.
    let (_d2, store2) = common::store();
    let img2 = pull(
        &store2,
        &format!("{}/busybox@{}", registry.host(), img.manifest_digest),
    )
    .await?;
    assert!(img2.built);
    assert_eq!(img2.manifest_digest, img.manifest_digest);

    // A wrong pinned digest is refused.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = pull(&store2, &format!("{}/busybox@{wrong}", registry.host()))
        .await
        .expect_err("unknown digest");
    assert!(matches!(err, PullImageError::NotFound { .. }), "{err:#}");

    let err = pull(&store, &registry.reference("busybox", "nope"))
        .await
        .expect_err("unknown tag");
    assert_eq!(
        err.to_string(),
        format!(
            "registry {} has no manifest for busybox:nope",
            registry.host()
        )
    );
    let err = pull(&store, &registry.reference("nothing/here", "latest"))
        .await
        .expect_err("unknown repo");
    assert!(matches!(err, PullImageError::NotFound { .. }), "{err:#}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let err = pull(&store, &format!("127.0.0.1:{port}/busybox:latest"))
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, PullImageError::Unreachable { .. }), "{err:#}");
    assert_eq!(
        err.to_string(),
        format!("registry 127.0.0.1:{port} is unreachable")
    );
    Ok(())
}

#[tokio::test]
async fn docker_archive_input() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::busybox()?;
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("busybox.tar");
    layout.to_docker_archive(&archive, "busybox:1.35")?;
    let (_d, store) = store();
    let img = pull(&store, &format!("docker-archive:{}", archive.display())).await?;
    assert!(img.built);
    assert_eq!(img.config.cmd, vec!["sh"]);
    assert!(debugfs(&img.disk, "ls -l /bin").contains("busybox"));
    let again = pull(&store, &format!("docker-archive:{}", archive.display())).await?;
    assert!(!again.built);
    assert_eq!(again.manifest_digest, img.manifest_digest);
    Ok(())
}

#[tokio::test]
async fn concurrent_pulls_build_once() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::busybox()?;
    let registry = Registry::start().await?;
    registry.push_layout(&layout, "busybox", "latest").await?;
    let dir = tempfile::tempdir()?;
    // Two stores on one cache dir: separate lock file descriptions, like two processes.
    let a = kiln_image::ImageStore::open(dir.path())?;
    let b = kiln_image::ImageStore::open(dir.path())?;
    let r = registry.reference("busybox", "latest");
    let (x, y) = tokio::join!(pull(&a, &r), pull(&b, &r));
    let (x, y) = (x?, y?);
    assert_eq!(x.disk, y.disk);
    assert_eq!(
        [x.built, y.built].iter().filter(|b| **b).count(),
        1,
        "exactly one pull builds"
    );
    assert_eq!(a.list()?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn list_remove_prune() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::multilayer()?;
    let (_d, store) = store();
    let img = pull(&store, &layout.image_ref()).await?;
    let listed = store.list()?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest_digest, img.manifest_digest);
    // Leave a stale work dir, as a killed pull would.
    std::fs::create_dir(
        store
            .root()
            .join("tmp")
            .join(format!("{}.stale", &img.manifest_digest[7..])),
    )?;
    let report = store.prune()?;
    assert_eq!(report.temp_dirs, 1);
    assert!(report.images.is_empty(), "referenced image kept");
    let removed = store.remove(&layout.image_ref())?;
    assert_eq!(removed, vec![img.manifest_digest.clone()]);
    assert!(!img.disk.exists());
    common::assert_cache_empty(&store);
    assert!(matches!(
        store.remove(&layout.image_ref()),
        Err(kiln_image::RemoveImageError::NotFound(_))
    ));
    Ok(())
}

/// What a removal would do is known before anything is removed; untagging
/// keeps the image; pruning keeps unnamed images the caller uses.
#[tokio::test]
async fn removal_untag_and_prune_keeping() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::busybox()?;
    let (_d, store) = store();
    let tagged = layout.image_ref();
    let untagged = format!("oci:{}", layout.dir.display());
    let img = pull(&store, &tagged).await?;
    assert_eq!(
        pull(&store, &untagged).await?.manifest_digest,
        img.manifest_digest
    );
    let digest = img.manifest_digest.clone();
    assert_eq!(store.disk_path(&digest), img.disk);

    // Two references: removing one would leave the image.
    let one = store.removal(&tagged)?;
    assert_eq!(one.digest, digest);
    assert_eq!(one.disk, img.disk);
    assert_eq!(one.references.len(), 1);
    assert!(!one.deletes_image);
    let all = store.removal(&digest)?;
    assert_eq!(all.references.len(), 2);
    assert!(all.deletes_image);
    assert!(img.disk.exists(), "removal() removes nothing");
    let zero = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(
        store.removal(&zero),
        Err(kiln_image::RemoveImageError::NotFound(_))
    ));
    assert!(matches!(
        store.untag(&zero),
        Err(kiln_image::RemoveImageError::NotFound(_))
    ));

    // Untag both: the image stays, listed under its digest.
    assert_eq!(store.untag(&tagged)?, one.references);
    assert!(store.removal(&untagged)?.deletes_image, "now the last name");
    assert_eq!(store.untag(&untagged)?.len(), 1);
    assert!(img.disk.exists());
    let listed = store.list()?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reference, digest);
    assert!(matches!(
        store.untag(&tagged),
        Err(kiln_image::RemoveImageError::NotFound(_))
    ));

    // In use: kept by prune; then pruned.
    let report = store.prune_keeping(|d| d == digest)?;
    assert!(report.images.is_empty(), "{report:?}");
    assert_eq!(report.kept, vec![digest.clone()]);
    assert!(img.disk.exists());
    let report = store.prune()?;
    assert_eq!(report.images, vec![digest]);
    common::assert_cache_empty(&store);
    Ok(())
}

#[tokio::test]
async fn python_from_registry() -> anyhow::Result<()> {
    common::init_tracing();
    let t = Instant::now();
    let layout = images::python()?;
    eprintln!(
        "python test image ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let registry = Registry::start().await?;
    registry.push_layout(&layout, "python", "3").await?;
    let (_d, store) = store();
    let t = Instant::now();
    let img = pull(&store, &registry.reference("python", "3")).await?;
    let first = t.elapsed();
    assert_eq!(img.config.cmd, vec!["python3"]);
    let ls = debugfs(&img.disk, "ls -l /usr/bin");
    assert!(ls.contains("python3"), "python3 missing from /usr/bin");
    let root = debugfs(&img.disk, "ls -l /");
    assert!(
        root.contains("bin -> usr/bin") || root.contains("bin"),
        "{root}"
    );
    let t = Instant::now();
    let again = pull(&store, &registry.reference("python", "3")).await?;
    let hit = t.elapsed();
    assert!(!again.built);
    eprintln!(
        "python (registry): pull+convert {:.0} ms, cache hit {:.1} ms, disk {} MiB",
        first.as_secs_f64() * 1e3,
        hit.as_secs_f64() * 1e3,
        img.size >> 20
    );
    Ok(())
}

#[tokio::test]
async fn multi_platform_index_selects_linux_amd64() -> anyhow::Result<()> {
    common::init_tracing();
    let busybox = images::busybox()?;
    let registry = Registry::start().await?;
    let dir = tempfile::tempdir()?;
    let other = images::unique_small(&dir.path().join("other"), "arm64")?;
    let amd64 = registry.push_raw(&busybox, "multi", "amd64").await?;
    let arm64 = registry.push_raw(&other, "multi", "arm64").await?;
    let size = |l: &images::OciLayout| l.manifest().map(|(_, b)| b.len());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64,
             "size": size(&other)?, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64,
             "size": size(&busybox)?, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    });
    registry
        .put_manifest(
            "multi",
            "latest",
            "application/vnd.oci.image.index.v1+json",
            serde_json::to_vec(&index)?,
        )
        .await?;
    let (_d, store) = store();
    let img = pull(&store, &registry.reference("multi", "latest")).await?;
    assert_eq!(img.manifest_digest, amd64);
    assert_eq!(img.config.cmd, vec!["sh"]);

    let opts = kiln_image::PullOptions {
        platform: kiln_image::Platform {
            os: "linux".into(),
            architecture: "s390x".into(),
            variant: None,
        },
        ..Default::default()
    };
    let r = kiln_image::ImageRef::parse(&registry.reference("multi", "latest"))?;
    let err = store
        .pull(&r, &opts, &kiln_image::NoProgress)
        .await
        .expect_err("no such platform");
    assert!(matches!(err, PullImageError::NoPlatform { .. }), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn cancelled_pull_leaves_no_entry() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::python()?;
    let (d, store) = store();
    let r = kiln_image::ImageRef::parse(&layout.image_ref())?;
    let opts = kiln_image::PullOptions::default();
    // Stop the pull midway, as Ctrl-C would.
    let res = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        store.pull(&r, &opts, &kiln_image::NoProgress),
    )
    .await;
    assert!(res.is_err(), "pull should still be running after 300 ms");
    assert!(store.list()?.is_empty());
    assert_eq!(std::fs::read_dir(store.root().join("sha256"))?.count(), 0);
    // The blocking worker stops at its next entry; a reopen/prune removes what is left.
    let mut left = usize::MAX;
    for _ in 0..40 {
        let store = kiln_image::ImageStore::open(d.path())?;
        store.prune()?;
        left = std::fs::read_dir(store.root().join("tmp"))?.count();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "work dir left behind");
    let img = pull(&store, &layout.image_ref()).await?;
    assert!(img.built);
    Ok(())
}

#[tokio::test]
async fn basic_auth_from_docker_config() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::busybox()?;
    let registry = Registry::start_with_auth("kiln", "s3cret").await?;
    registry
        .push_layout_as(&layout, "private/busybox", "1", Some("kiln:s3cret"))
        .await?;
    let dir = tempfile::tempdir()?;
    let r = kiln_image::ImageRef::parse(&registry.reference("private/busybox", "1"))?;
    let (_d, store) = store();

    let empty = dir.path().join("none.json");
    std::fs::write(&empty, "{}")?;
    let anonymous = kiln_image::PullOptions {
        docker_config: Some(empty),
        ..Default::default()
    };
    let err = store
        .pull(&r, &anonymous, &kiln_image::NoProgress)
        .await
        .expect_err("needs credentials");
    assert!(
        matches!(err, PullImageError::Unauthorized { .. }),
        "{err:#} {err:?}"
    );

    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "auths": {registry.host(): {"auth": "a2lsbjpzM2NyZXQ="}}
        }))?,
    )?;
    let with_creds = kiln_image::PullOptions {
        docker_config: Some(config),
        ..Default::default()
    };
    let img = store.pull(&r, &with_creds, &kiln_image::NoProgress).await?;
    assert!(img.built);
    assert_eq!(img.config.cmd, vec!["sh"]);
    Ok(())
}

#[derive(Default)]
struct Counting {
    events: std::sync::Mutex<Vec<String>>,
    bytes: std::sync::atomic::AtomicU64,
}

impl kiln_image::Progress for Counting {
    fn start(&self, phase: &kiln_image::PullPhase, total: Option<u64>) {
        let mut e = self.events.lock().expect("lock");
        e.push(format!("start {phase:?} {total:?}"));
    }
    fn advance(&self, bytes: u64) {
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
    fn finish(&self, phase: &kiln_image::PullPhase) {
        let mut e = self.events.lock().expect("lock");
        e.push(format!("finish {phase:?}"));
    }
}

#[tokio::test]
async fn progress_reports_phases_and_bytes() -> anyhow::Result<()> {
    common::init_tracing();
    let layout = images::multilayer()?;
    let registry = Registry::start().await?;
    registry.push_raw(&layout, "multi", "v1").await?;
    let (_d, store) = store();
    let progress = Counting::default();
    let r = kiln_image::ImageRef::parse(&registry.reference("multi", "v1"))?;
    let img = store
        .pull(&r, &kiln_image::PullOptions::default(), &progress)
        .await?;
    let (_, manifest) = layout.manifest()?;
    let v: serde_json::Value = serde_json::from_slice(&manifest)?;
    let total: u64 = v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum::<u64>()
        + v["config"]["size"].as_u64().expect("size");
    assert_eq!(
        progress.bytes.load(std::sync::atomic::Ordering::Relaxed),
        total
    );
    let events = progress.events.lock().expect("lock").clone();
    assert_eq!(
        events.first().map(String::as_str),
        Some("start Resolve None")
    );
    assert_eq!(events.last().map(String::as_str), Some("finish BuildDisk"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("start Download"))
            .count(),
        img.layers.len()
    );
    Ok(())
}
