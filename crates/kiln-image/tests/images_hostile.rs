//! Hostile images, from OCI layouts and from a real registry: each is refused with its
//! specific error, nothing lands outside the image root, and no cache entry is left.

mod common;

use std::path::Path;

use common::{assert_cache_empty, debugfs, pull, store};
use kiln_image::{PullImageError, UnpackLayerError};
use kiln_testkit::Registry;
use kiln_testkit::images::{self, Hostile};

/// Checks the error for one hostile kind; `None` means the pull must succeed.
fn check(kind: Hostile, result: &Result<kiln_image::Image, PullImageError>) {
    use PullImageError as P;
    use UnpackLayerError as U;
    let ok = match (kind, result) {
        (Hostile::PathTraversal, Err(P::Unpack(U::Escape { entry, .. }))) => {
            entry.starts_with("../../")
        }
        (Hostile::AbsolutePath, Err(P::Unpack(U::AbsolutePath { .. }))) => true,
        (Hostile::SymlinkEscapeRelative, Err(P::Unpack(U::SymlinkEscape { symlink, .. }))) => {
            symlink == "up"
        }
        (Hostile::SymlinkEscapeAbsolute, Ok(_)) => true,
        (Hostile::HardlinkEscape, Err(P::Unpack(U::BadHardlink { .. }))) => true,
        (Hostile::HardlinkViaSymlink, Err(P::Unpack(U::BadHardlink { .. }))) => true,
        (Hostile::TruncatedLayer, Err(P::Unpack(U::Corrupt { .. }))) => true,
        (Hostile::WrongLayerDigest, Err(P::BlobDigest { kind: "layer", .. })) => true,
        (Hostile::WrongLayerSize, Err(P::BlobSize { kind: "layer", .. })) => true,
        (Hostile::MalformedManifest, Err(P::MalformedManifest { .. })) => true,
        (Hostile::HugeDeclaredSize, Err(P::TooLarge { kind: "layer", .. })) => true,
        (Hostile::HugeEntry, Err(P::Unpack(U::EntryTooLarge { size, .. }))) => *size == 1 << 40,
        _ => false,
    };
    match result {
        Ok(_) => assert!(ok, "{kind:?}: pull succeeded"),
        Err(e) => assert!(ok, "{kind:?}: unexpected error: {e:#} ({e:?})"),
    }
}

fn assert_sentinel_untouched(sentinel: &Path) {
    let n = std::fs::read_dir(sentinel).expect("sentinel").count();
    assert_eq!(
        n,
        0,
        "something was written into the sentinel dir {}",
        sentinel.display()
    );
    assert!(!Path::new("/kiln-escape").exists());
}

#[tokio::test]
async fn hostile_layouts_are_refused() -> anyhow::Result<()> {
    common::init_tracing();
    let sentinel = tempfile::Builder::new()
        .prefix("kiln-sentinel.")
        .tempdir()?;
    for &kind in Hostile::ALL {
        let dir = tempfile::tempdir()?;
        let layout = images::hostile(kind, &dir.path().join("layout"), sentinel.path())?;
        let (_c, store) = store();
        let result = pull(&store, &layout.image_ref()).await;
        if let Err(e) = &result {
            eprintln!("{kind:?}: {e:#}");
        }
        check(kind, &result);
        assert_sentinel_untouched(sentinel.path());
        match result {
            Ok(img) => {
                // Contained: the write landed inside the image, at the sentinel's path.
                let inner = format!("{}/pwned", sentinel.path().display());
                let stat = debugfs(&img.disk, &format!("stat {inner}"));
                assert!(stat.contains("Type: regular"), "{kind:?}: {stat}");
            }
            Err(_) => assert_cache_empty(&store),
        }
    }
    Ok(())
}

#[test]
fn error_messages_name_the_entry() -> anyhow::Result<()> {
    let sentinel = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let layout = images::hostile(
        Hostile::PathTraversal,
        &dir.path().join("l"),
        sentinel.path(),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let (_c, store) = store();
    let err = rt
        .block_on(pull(&store, &layout.image_ref()))
        .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.starts_with("layer sha256:")
            && msg
                .ends_with("entry \"../../../../../../../../kiln-escape\" escapes the image root"),
        "{msg}"
    );
    let layout = images::hostile(
        Hostile::WrongLayerSize,
        &dir.path().join("s"),
        sentinel.path(),
    )?;
    let msg = rt
        .block_on(pull(&store, &layout.image_ref()))
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("bytes, the manifest says"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn hostile_images_from_a_registry_are_refused() -> anyhow::Result<()> {
    common::init_tracing();
    let registry = Registry::start().await?;
    let sentinel = tempfile::Builder::new()
        .prefix("kiln-sentinel.")
        .tempdir()?;
    // Content-level attacks reach the client through a real registry (raw HTTP pushes).
    for &kind in &[
        Hostile::PathTraversal,
        Hostile::AbsolutePath,
        Hostile::SymlinkEscapeRelative,
        Hostile::HardlinkEscape,
        Hostile::HardlinkViaSymlink,
        Hostile::TruncatedLayer,
        Hostile::HugeEntry,
    ] {
        let dir = tempfile::tempdir()?;
        let layout = images::hostile(kind, &dir.path().join("layout"), sentinel.path())?;
        let name = format!("hostile/{}", format!("{kind:?}").to_lowercase());
        registry.push_raw(&layout, &name, "latest").await?;
        let (_c, store) = store();
        let result = pull(&store, &registry.reference(&name, "latest")).await;
        check(kind, &result);
        assert_sentinel_untouched(sentinel.path());
        assert_cache_empty(&store);
    }
    Ok(())
}

#[tokio::test]
async fn registry_serving_a_corrupted_blob_is_refused() -> anyhow::Result<()> {
    common::init_tracing();
    let registry = Registry::start().await?;
    let dir = tempfile::tempdir()?;
    let seed = format!("corrupt-{}", std::process::id());
    let layout = images::unique_small(&dir.path().join("layout"), &seed)?;
    registry.push_raw(&layout, "corrupt", "latest").await?;
    let (_, manifest) = layout.manifest()?;
    let v: serde_json::Value = serde_json::from_slice(&manifest)?;
    let layer = v["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let mut bytes = std::fs::read(layout.blob_path(&layer))?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    // Same size, different content, behind the registry's back.
    registry.corrupt_blob(&layer, &bytes)?;
    let (_c, store) = store();
    let err = pull(&store, &registry.reference("corrupt", "latest"))
        .await
        .expect_err("corrupt blob");
    assert!(
        matches!(&err, PullImageError::BlobDigest { kind: "layer", expected, .. } if *expected == layer),
        "{err:#}"
    );
    assert_cache_empty(&store);
    // The manifest's declared size being wrong is refused too (the registry accepts it).
    let dir2 = tempfile::tempdir()?;
    let sentinel = tempfile::tempdir()?;
    let layout = images::hostile(
        Hostile::WrongLayerSize,
        &dir2.path().join("l"),
        sentinel.path(),
    )?;
    match registry.push_raw(&layout, "badsize", "latest").await {
        Ok(_) => {
            let err = pull(&store, &registry.reference("badsize", "latest"))
                .await
                .expect_err("bad size");
            assert!(matches!(err, PullImageError::BlobSize { .. }), "{err:#}");
            assert_cache_empty(&store);
        }
        Err(e) => eprintln!("registry refused a manifest with a wrong layer size: {e:#}"),
    }
    Ok(())
}
