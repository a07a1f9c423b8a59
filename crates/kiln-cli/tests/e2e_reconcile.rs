//! What killed processes leave behind is repaired by the node's reconciler,
//! and state shared between state directories is respected, on real
//! microVMs: a `kiln snapshot` killed while it stages leaves no staging
//! directory once any command has looked; `kiln images rm` in one state
//! directory refuses an image that a snapshot of another state directory
//! on the same cache needs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};

fn ok_in(k: &Kiln, state: Option<&Path>, args: &[&str]) -> String {
    let mut c = k.cmd();
    if let Some(s) = state {
        c.env("KILN_STATE_DIR", s);
    }
    let out = c.args(args).output().expect("kiln runs");
    assert_eq!(
        code(&out),
        0,
        "kiln {args:?} failed: {}",
        stderr(&out).trim()
    );
    stdout(&out)
}

fn staging_dirs(state: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for store in ["snapshots", "templates"] {
        for e in std::fs::read_dir(state.join(store))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".staging-") {
                out.push(e.path());
            }
        }
    }
    out
}

/// `kill -9` of `kiln snapshot` while the supervisor writes its staging
/// directory: the sandbox goes on, and the next `kiln ps` removes the
/// orphaned staging directory (it carries its owner's identity); a later
/// snapshot of the same sandbox works.
#[test]
fn a_killed_snapshot_leaves_no_staging_directory() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let id = ok_in(
        &k,
        None,
        &[
            "run",
            "-d",
            "--memory",
            "512",
            &bb,
            "--",
            "sh",
            "-c",
            // Dirty memory so the snapshot takes a while to write.
            "dd if=/dev/urandom of=/dev/shm/x bs=1M count=200 2>/dev/null; echo up; sleep 600",
        ],
    )
    .trim()
    .to_string();
    let t0 = Instant::now();
    while !ok_in(&k, None, &["logs", &id]).contains("up") {
        assert!(t0.elapsed() < Duration::from_secs(120), "never up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut killed = 0;
    for attempt in 0..5 {
        let mut snap = k
            .cmd()
            .args(["snapshot", &id, "--name", &format!("s{attempt}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kiln snapshot runs");
        // Wait until it stages, then kill it.
        let t0 = Instant::now();
        while staging_dirs(k.state_dir()).is_empty() && t0.elapsed() < Duration::from_secs(30) {
            if snap.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let staged = !staging_dirs(k.state_dir()).is_empty();
        let _ = snap.kill();
        let _ = snap.wait();
        if staged {
            killed += 1;
            break;
        }
    }
    assert_eq!(killed, 1, "no snapshot was caught while staging");
    // The supervisor may still be writing into it; wait for it to answer
    // again (the sandbox goes on either way).
    let t0 = Instant::now();
    loop {
        let out = k.run(&["exec", &id, "--", "echo", "alive"]);
        if code(&out) == 0 {
            assert_eq!(stdout(&out).trim(), "alive");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "exec after the killed snapshot: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Level-triggered: any command that reconciles removes it (the
    // supervisor may still be hashing into it for a moment, so look again
    // until it is gone, within a bound).
    let t0 = Instant::now();
    loop {
        ok_in(&k, None, &["ps"]);
        if staging_dirs(k.state_dir()).is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "left behind: {:?}",
            staging_dirs(k.state_dir())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The sandbox still snapshots and restores.
    let name = ok_in(&k, None, &["snapshot", &id, "--name", "after"])
        .trim()
        .to_string();
    assert_eq!(name, "after");
    let restored = ok_in(&k, None, &["restore", "-d", "after"])
        .trim()
        .to_string();
    assert_eq!(
        ok_in(&k, None, &["exec", &restored, "--", "cat", "/proc/loadavg"])
            .split_whitespace()
            .count(),
        5
    );
    ok_in(&k, None, &["rm", "-f", &restored, &id]);
    ok_in(&k, None, &["snapshot", "rm", "after"]);
    k.assert_clean();
}

/// Two state directories on one image cache: a snapshot in the second
/// keeps the image from `kiln images rm` (and `prune`) in the first; once
/// the snapshot is gone the image can be removed.
#[test]
fn images_rm_sees_users_in_other_state_dirs() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let other = tempfile::Builder::new()
        .prefix("kiln-e2e-other-")
        .tempdir_in("/tmp")
        .expect("second state dir");
    let b = Some(other.path());
    let id = ok_in(&k, b, &["run", "-d", &bb, "--", "sleep", "600"])
        .trim()
        .to_string();
    ok_in(&k, b, &["snapshot", &id, "--name", "keep"]);
    ok_in(&k, b, &["rm", "-f", &id]);
    // The first state directory has never used the image itself.
    let out = k.run(&["images", "rm", &bb]);
    assert_eq!(code(&out), 125, "stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("snapshot keep"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // -f only untags: the other directory's snapshot still restores.
    ok_in(&k, None, &["images", "rm", "-f", &bb]);
    ok_in(&k, None, &["images", "prune"]);
    let restored = ok_in(&k, b, &["restore", "-d", "keep"]).trim().to_string();
    assert_eq!(
        ok_in(&k, b, &["exec", &restored, "--", "echo", "hi"]).trim(),
        "hi"
    );
    ok_in(&k, b, &["rm", "-f", &restored]);
    ok_in(&k, b, &["snapshot", "rm", "keep"]);
    // Nothing uses it any more: prune removes the untagged image.
    let pruned = ok_in(&k, None, &["images", "prune"]);
    assert!(pruned.contains("removed sha256:"), "{pruned}");
    k.assert_clean();
}
