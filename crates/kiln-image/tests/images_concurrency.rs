//! Two processes pulling one image build it once (flock per manifest digest).

mod common;

use std::process::{Command, Stdio};

use kiln_testkit::images;

const CHILD_ENV: &str = "KILN_IMAGE_TEST_CHILD_CACHE";

/// Runs only as a child of `two_processes_build_once`: pulls and prints whether it built.
#[tokio::test]
async fn child_pull() -> anyhow::Result<()> {
    let Some(cache) = std::env::var_os(CHILD_ENV) else {
        return Ok(());
    };
    let layout = images::python()?;
    let store = kiln_image::ImageStore::open(&cache)?;
    let img = common::pull(&store, &layout.image_ref()).await?;
    println!("KILN-BUILT={}", img.built);
    Ok(())
}

#[test]
fn two_processes_build_once() -> anyhow::Result<()> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return Ok(());
    }
    images::python()?; // built (or cached) before the race
    let cache = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "child_pull", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, cache.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut built = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        built.push(text.contains("KILN-BUILT=true"));
        assert!(text.contains("KILN-BUILT="), "{text}");
    }
    assert_eq!(built.iter().filter(|b| **b).count(), 1, "{built:?}");
    let store = kiln_image::ImageStore::open(cache.path())?;
    assert_eq!(store.list()?.len(), 1);
    Ok(())
}
