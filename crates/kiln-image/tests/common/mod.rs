//! Shared helpers for kiln-image component tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use kiln_image::{Image, ImageRef, ImageStore, NoProgress, PullImageError, PullOptions};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kiln_image=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::Builder::new()
        .prefix("kiln-image-test.")
        .tempdir()
        .expect("tempdir");
    let store = ImageStore::open(dir.path()).expect("open store");
    (dir, store)
}

pub async fn pull(store: &ImageStore, reference: &str) -> Result<Image, PullImageError> {
    let r = ImageRef::parse(reference).expect("valid reference");
    store.pull(&r, &PullOptions::default(), &NoProgress).await
}

/// `debugfs -R CMD DISK` output.
pub fn debugfs(disk: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(disk)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts the cache holds no image, no reference and no work dir.
pub fn assert_cache_empty(store: &ImageStore) {
    assert!(
        store.list().expect("list").is_empty(),
        "cache lists an image"
    );
    for sub in ["sha256", "refs", "tmp"] {
        let n = std::fs::read_dir(store.root().join(sub))
            .expect("read cache dir")
            .count();
        assert_eq!(n, 0, "images/{sub} is not empty");
    }
}
