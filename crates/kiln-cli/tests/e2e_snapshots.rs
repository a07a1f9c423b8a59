//! Snapshots, restore and fork on real microVMs: `kiln snapshot`,
//! `kiln snapshot ls|rm`, `kiln restore`, `kiln fork`, and snapshots that
//! must be refused. Every `kiln` command is a separate process, so each
//! restore runs in a `kiln` that did not take the snapshot.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Kiln, assert_one_line_error, busybox, code, stderr, stdout};

/// The kernel and initramfs as resolved now: a snapshot is refused under
/// any other, and the shared cache's `current` links move when someone
/// rebuilds them, so each test pins what it started with.
fn pin_guest(k: &Kiln) -> Vec<(&'static str, std::path::PathBuf)> {
    let cache = k.cache_dir();
    let canon = |p: std::path::PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    vec![
        ("KILN_KERNEL", canon(cache.join("kernel/current/bzImage"))),
        (
            "KILN_INITRAMFS",
            canon(cache.join("initramfs/current/initramfs.img")),
        ),
    ]
}

/// `kiln ARGS` with the pinned guest artifacts.
fn run(k: &Kiln, args: &[&str]) -> std::process::Output {
    thread_local! {
        static PIN: std::cell::RefCell<Vec<(&'static str, std::path::PathBuf)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let pin = PIN.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_empty() {
            *p = pin_guest(k);
        }
        p.clone()
    });
    let mut c = k.cmd();
    c.envs(pin);
    let out = c.args(args).output().expect("kiln runs");
    tracing::info!(
        ?args,
        code = ?out.status.code(),
        stderr = %String::from_utf8_lossy(&out.stderr),
        "kiln finished"
    );
    out
}

fn detach(k: &Kiln, args: &[&str]) -> String {
    let mut a = vec!["run", "-d"];
    a.extend_from_slice(args);
    let out = run(k, &a);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "id: {id:?}"
    );
    id
}

/// The `count N` lines of a sandbox's output so far.
fn counts(k: &Kiln, id: &str) -> Vec<u64> {
    let out = run(k, &["logs", id]);
    stdout(&out)
        .lines()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Waits until the sandbox has printed a count of at least `n`; returns
/// the counts.
fn wait_count(k: &Kiln, id: &str, n: u64) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let c = counts(k, id);
        if c.last().is_some_and(|&l| l >= n) {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "sandbox {id} did not reach count {n}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_consecutive(c: &[u64]) {
    for w in c.windows(2) {
        assert_eq!(w[1], w[0] + 1, "counts are not consecutive: {c:?}");
    }
}

fn exec(k: &Kiln, id: &str, script: &str) -> String {
    let out = run(k, &["exec", id, "--", "sh", "-c", script]);
    assert_eq!(code(&out), 0, "exec {script:?}: {}", stderr(&out));
    stdout(&out)
}

fn snapshot_names(k: &Kiln) -> Vec<String> {
    let out = run(k, &["snapshot", "ls", "-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    stdout(&out).lines().map(str::to_string).collect()
}

fn snapshots_dir(k: &Kiln) -> std::path::PathBuf {
    k.state_dir().join("snapshots")
}

/// What a restore of a snapshot that does not exist says: the node's
/// words, or the server's (its 404 for any object).
fn missing_snapshot() -> &'static str {
    if common::through_up() {
        "does not exist"
    } else {
        "no snapshot named"
    }
}

/// Where the node keeps snapshot `name`: through the API a tenant's
/// snapshot is `TENANT.NAME` on the node (`kiln up`'s tenant: `default`).
fn snapshot_dir(k: &Kiln, name: &str) -> std::path::PathBuf {
    if common::through_up() {
        snapshots_dir(k).join(format!("default.{name}"))
    } else {
        snapshots_dir(k).join(name)
    }
}

/// A counter that prints `count N` and stores N in /tmp/count every 0.2 s,
/// `limit` times, then exits 7.
fn counter(limit: u64) -> String {
    format!(
        "i=0; while [ $i -lt {limit} ]; do i=$((i+1)); echo $i > /tmp/count; echo \"count $i\"; sleep 0.2; done; exit 7"
    )
}

#[test]
fn snapshot_then_restore_continues_the_counter_and_keeps_files() {
    let k = Kiln::new();
    let img = busybox();
    tracing::info!("phase: a counting sandbox with a file written before the snapshot");
    let src = detach(&k, &[&img, "--", "sh", "-c", &counter(40)]);
    exec(&k, &src, "echo before-snapshot > /root/kept.txt");
    let src_host = exec(&k, &src, "hostname");
    let before = wait_count(&k, &src, 3);

    tracing::info!("phase: snapshot a running sandbox");
    let t0 = Instant::now();
    let out = run(&k, &["snapshot", &src, "--name", "counter"]);
    let snap_time = t0.elapsed();
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "counter");
    let dir = snapshot_dir(&k, "counter");
    let size: u64 = walk_blocks(&dir);
    tracing::info!(
        snapshot_ms = snap_time.as_millis() as u64,
        on_disk_mib = size >> 20,
        "snapshot taken"
    );
    eprintln!(
        "MEASURE snapshot: kiln snapshot took {} ms, {} MiB on disk",
        snap_time.as_millis(),
        size >> 20
    );
    assert!(dir.join("manifest.json").is_file());
    assert!(dir.join("rw.ext4").is_file());
    // The same name twice is refused.
    let out = run(&k, &["snapshot", &src, "--name", "counter"]);
    assert_one_line_error(&out, "already exists");

    tracing::info!("phase: the source goes on counting after the snapshot");
    let last = *before.last().expect("counts");
    let after = wait_count(&k, &src, last + 3);
    assert_consecutive(&after);
    let ps = stdout(&run(&k, &["ps"]));
    assert!(ps.contains(&src) && ps.contains("running"), "ps: {ps}");
    assert_eq!(snapshot_names(&k), vec!["counter".to_string()]);

    tracing::info!("phase: remove the source, restore in the background");
    let at_rm = *counts(&k, &src).last().expect("counts");
    let out = run(&k, &["rm", "-f", &src]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let t0 = Instant::now();
    let out = run(&k, &["restore", "-d", "counter"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let r1 = stdout(&out).trim().to_string();
    assert_ne!(r1, src);
    let c = wait_count(&k, &r1, 1);
    eprintln!(
        "MEASURE restore: kiln restore -d → first count in its log {} ms",
        t0.elapsed().as_millis()
    );
    let first = c[0];
    assert!(
        first > last && first <= at_rm + 1,
        "the restored counter starts at {first}; the snapshot was taken after {last}, the source was removed at {at_rm}"
    );
    let c = wait_count(&k, &r1, first + 3);
    assert_consecutive(&c);
    // Files written before the snapshot are there; the counter file moves on.
    assert_eq!(exec(&k, &r1, "cat /root/kept.txt"), "before-snapshot\n");
    let n: u64 = exec(&k, &r1, "cat /tmp/count")
        .trim()
        .parse()
        .expect("a count");
    assert!(n >= first, "/tmp/count = {n}, first restored count {first}");
    // A new identity: the hostname is the new sandbox's.
    let host = exec(&k, &r1, "hostname");
    assert_ne!(host, src_host);
    assert_eq!(host.trim(), &r1[..12]);

    tracing::info!("phase: a snapshot in use cannot be removed");
    let out = run(&k, &["snapshot", "rm", "counter"]);
    assert_one_line_error(&out, "in use");

    tracing::info!("phase: a second restore, in the foreground, runs to the end");
    let t0 = Instant::now();
    let mut child = k
        .cmd()
        .envs(pin_guest(&k))
        .args(["restore", "counter"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln restore runs");
    let first_byte = {
        use std::io::Read;
        let mut so = child.stdout.take().expect("piped");
        let mut b = [0u8; 1];
        so.read_exact(&mut b).expect("first output byte");
        let ms = t0.elapsed().as_millis();
        let mut rest = Vec::new();
        so.read_to_end(&mut rest).expect("read output");
        let mut all = b.to_vec();
        all.extend(rest);
        (ms, String::from_utf8_lossy(&all).into_owned())
    };
    let status = child.wait().expect("kiln restore ends");
    eprintln!(
        "MEASURE restore: kiln restore (foreground) spawn → first output byte {} ms",
        first_byte.0
    );
    assert_eq!(status.code(), Some(7), "output: {}", first_byte.1);
    let fg: Vec<u64> = first_byte
        .1
        .lines()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(!fg.is_empty(), "output: {}", first_byte.1);
    assert!(fg[0] > last, "foreground restore starts at {}", fg[0]);
    assert_eq!(*fg.last().expect("counts"), 40);
    assert_consecutive(&fg);
    // The foreground sandbox ended and is recorded as exited.
    let ps = stdout(&run(&k, &["ps", "-a"]));
    assert!(ps.contains("exited (7)"), "ps -a: {ps}");

    tracing::info!("phase: clean up; the snapshot can go once nothing uses it");
    let out = run(&k, &["rm", "-f", &r1]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&k, &["snapshot", "rm", "counter"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(snapshot_names(&k).is_empty());
    assert!(!dir.exists());
    k.assert_clean();
}

#[test]
fn fork_gives_independent_sandboxes() {
    let k = Kiln::new();
    let img = busybox();
    tracing::info!("phase: a counting sandbox, paused");
    let src = detach(
        &k,
        &[
            &img,
            "--",
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo \"count $i\"; sleep 0.2; done",
        ],
    );
    exec(&k, &src, "echo shared > /root/shared.txt");
    wait_count(&k, &src, 3);
    let out = run(&k, &["pause", &src]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // A line already on its way to the supervisor may still land.
    std::thread::sleep(Duration::from_millis(500));
    let at_pause = *counts(&k, &src).last().expect("counts");

    tracing::info!("phase: fork the paused sandbox three times");
    let t0 = Instant::now();
    let out = run(&k, &["fork", &src, "-n", "3"]);
    let fork_time = t0.elapsed();
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let forks: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(forks.len(), 3, "stdout: {}", stdout(&out));
    eprintln!(
        "MEASURE fork: kiln fork -n 3 of a paused sandbox {} ms",
        fork_time.as_millis()
    );
    // The source stays paused and did not move on.
    let ps = stdout(&run(&k, &["ps"]));
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&src) && l.contains("paused")),
        "ps: {ps}"
    );
    assert_eq!(*counts(&k, &src).last().expect("counts"), at_pause);

    tracing::info!("phase: each fork continues the counter and diverges");
    let mut randoms = vec![];
    for f in &forks {
        assert!(f != &src);
        let c = wait_count(&k, f, at_pause + 2);
        // The guest's own copy of the counter continues. (A line the guest
        // had already queued for the source's supervisor when it was
        // snapshotted is not sent again, hence at most one gap.)
        assert!(
            c[0] > at_pause && c[0] <= at_pause + 2,
            "fork {f} counts {c:?}, the source was paused at {at_pause}"
        );
        assert_consecutive(&c);
        assert_eq!(exec(&k, f, "cat /root/shared.txt"), "shared\n");
        exec(&k, f, &format!("echo {f} > /root/mine-{f}"));
        randoms.push(exec(&k, f, "head -c 16 /dev/urandom | od -x | head -1"));
    }
    for f in &forks {
        let listing = exec(&k, f, "ls /root");
        for other in forks.iter().filter(|o| *o != f) {
            assert!(
                !listing.contains(&format!("mine-{other}")),
                "fork {f} sees the file of {other}: {listing}"
            );
        }
        assert!(listing.contains(&format!("mine-{f}")), "{listing}");
    }
    let mut uniq = randoms.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(
        uniq.len(),
        randoms.len(),
        "forks drew the same random bytes: {randoms:?}"
    );
    // Memory too: a shell variable set in one fork's main process is not
    // visible elsewhere, but a file proves it more simply; hostnames differ.
    let hosts: Vec<String> = forks.iter().map(|f| exec(&k, f, "hostname")).collect();
    for (f, h) in forks.iter().zip(&hosts) {
        assert_eq!(h.trim(), &f[..12]);
    }

    tracing::info!("phase: the source resumes on its own");
    let out = run(&k, &["resume", &src]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let c = wait_count(&k, &src, at_pause + 2);
    assert_consecutive(&c);
    assert!(
        !exec(&k, &src, "ls /root").contains("mine-"),
        "the source sees a fork's file"
    );

    tracing::info!("phase: fork a running sandbox");
    let out = run(&k, &["fork", &src, "-n", "1"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let running_fork = stdout(&out).trim().to_string();
    let c = wait_count(&k, &running_fork, 1);
    assert!(c[0] > at_pause, "{c:?}");

    tracing::info!("phase: the fork snapshot lives as long as a fork uses it");
    let fork_snaps: Vec<String> = snapshot_names(&k);
    assert_eq!(fork_snaps.len(), 2, "{fork_snaps:?}");
    assert!(fork_snaps.iter().all(|n| n.starts_with("fork-")));
    for f in &forks[..2] {
        assert_eq!(code(&run(&k, &["rm", "-f", f])), 0);
    }
    assert_eq!(
        snapshot_names(&k).len(),
        2,
        "removed while a fork still runs"
    );
    // A `kiln fork` killed while holding the snapshots left its hold
    // behind: it must not keep them forever.
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let dead = gone.id();
    gone.wait().expect("wait");
    for n in &fork_snaps {
        std::fs::write(
            snapshot_dir(&k, n)
                .join("users")
                .join(format!("fork-{dead}")),
            b"",
        )
        .expect("plant a dead holder");
    }
    // Stopped (not removed): the supervisor's cleanup releases it.
    let out = run(&k, &["stop", "-t", "1", &forks[2]]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&k, &["rm", "-f", &running_fork]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(snapshot_names(&k).is_empty(), "{:?}", snapshot_names(&k));
    let leftovers: Vec<_> = std::fs::read_dir(snapshots_dir(&k))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(code(&run(&k, &["rm", "-f", &src])), 0);
    k.assert_clean();
}

#[test]
fn bad_snapshots_are_refused_before_anything_starts() {
    let k = Kiln::new();
    let img = busybox();
    let src = detach(&k, &[&img, "--", "sh", "-c", "exec sleep 3600"]);
    // Each bad one starts as a real snapshot (known to the server on route
    // `up`), then its files are damaged on the node behind Kiln's back.
    let take = |name: &str| {
        let out = run(&k, &["snapshot", &src, "--name", name]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        snapshot_dir(&k, name)
    };
    take("good");
    let copy = |name: &str| take(name);
    let edit_manifest = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("manifest.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).expect("manifest")).expect("json");
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
    };

    // A corrupted memory file (same size, one region overwritten).
    let d = copy("bad-memory");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("vmm/memory"))
            .expect("memory");
        f.seek(SeekFrom::Start(2 << 20)).expect("seek");
        f.write_all(&[0xAA; 64]).expect("write");
    }
    // A truncated writable disk.
    let d = copy("bad-disk");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("rw.ext4"))
        .expect("rw");
    let len = f.metadata().expect("meta").len();
    f.set_len(len / 2).expect("truncate");
    // Taken with another kernel.
    let d = copy("bad-kernel");
    edit_manifest(&d, &|v| {
        v["guest"]["kernel_sha256"] = "00".repeat(32).into()
    });
    // Another driver version.
    let d = copy("bad-driver");
    edit_manifest(&d, &|v| v["driver"]["version"] = "9.9.9".into());
    // The image disk is gone.
    let d = copy("bad-image");
    edit_manifest(&d, &|v| v["image_disk"] = "/nonexistent/disk.ext4".into());
    // A missing file.
    let d = copy("bad-missing");
    std::fs::remove_file(d.join("vmm/state")).expect("rm state");
    assert_eq!(code(&run(&k, &["rm", "-f", &src])), 0);

    for (name, needle) in [
        ("bad-memory", "vmm/memory is corrupted"),
        (
            "bad-disk",
            "rw.ext4 is 2147483648 bytes, the manifest says 4294967296 (truncated?)",
        ),
        ("bad-kernel", "was taken with another kernel"),
        ("bad-driver", "was taken with qemu 9.9.9"),
        ("bad-image", "needs the image disk /nonexistent/disk.ext4"),
        ("bad-missing", "vmm/state is missing"),
        ("no-such-snapshot", missing_snapshot()),
    ] {
        for args in [&["restore", name][..], &["restore", "-d", name][..]] {
            let out = run(&k, args);
            assert_one_line_error(&out, needle);
            // Named as the user named it (through the API the node keeps
            // it as `TENANT.NAME`).
            assert!(
                !stderr(&out).contains(&format!("default.{name}")),
                "{args:?}: the node's name of the snapshot: {}",
                stderr(&out)
            );
        }
        let ps = stdout(&run(&k, &["ps", "-a", "-q"]));
        assert!(ps.trim().is_empty(), "{name}: a sandbox was created: {ps}");
        assert!(
            std::fs::read_dir(snapshot_dir(&k, name).join("users"))
                .map_or(true, |mut d| d.next().is_none()),
            "{name}: a user was registered"
        );
    }
    // Bad names never reach the file system.
    let out = run(&k, &["restore", "../good"]);
    let refused = if common::through_up() {
        "snapshot name \"../good\": use 1-128 characters"
    } else {
        "no snapshot named"
    };
    assert_one_line_error(&out, refused);
    // The good one still restores.
    let out = run(&k, &["restore", "-d", "good"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let r = stdout(&out).trim().to_string();
    assert_eq!(exec(&k, &r, "echo alive"), "alive\n");
    assert_eq!(code(&run(&k, &["rm", "-f", &r])), 0);
    k.assert_clean();
}

/// Bytes allocated under `dir`.
fn walk_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() {
            walk_blocks(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

#[test]
fn a_fork_that_partly_fails_returns_the_others() {
    let k = Kiln::new();
    let img = busybox();
    // A real QEMU behind a wrapper that refuses the second restore it is
    // asked for: one fork fails for a reason Kiln cannot prevent.
    let dir = tempfile::tempdir().expect("tempdir");
    let real = std::env::split_paths(&std::env::var_os("PATH").expect("PATH"))
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .expect("qemu-system-x86_64 on PATH");
    let wrapper = dir.path().join("qemu-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             case \" $* \" in *\" -incoming \"*)\n\
               n=1; while ! mkdir \"{d}/restore.$n\" 2>/dev/null; do n=$((n+1)); done\n\
               if [ \"$n\" = 2 ]; then echo 'injected restore failure' >&2; exit 1; fi;;\n\
             esac\n\
             exec {real} \"$@\"\n",
            d = dir.path().display(),
            real = real.display()
        ),
    )
    .expect("write wrapper");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let on_node = k.node_env("KILN_QEMU_BIN", &wrapper);
    let src = detach(
        &k,
        &[
            &img,
            "--",
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo \"count $i\"; sleep 0.2; done",
        ],
    );
    wait_count(&k, &src, 2);
    let mut c = k.cmd();
    c.envs(pin_guest(&k));
    if !on_node {
        c.env("KILN_QEMU_BIN", &wrapper);
    }
    let out = c
        .args(["fork", &src, "-n", "3"])
        .output()
        .expect("kiln runs");
    assert_eq!(code(&out), 1, "stderr: {}", stderr(&out));
    let forks: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(forks.len(), 2, "stdout: {}", stdout(&out));
    let err = stderr(&out);
    eprintln!("kiln fork said: {err}");
    let failures: Vec<&str> = err.lines().filter(|l| l.contains("of 3 failed")).collect();
    assert_eq!(failures.len(), 1, "stderr: {err}");
    for f in &forks {
        assert!(f != &src);
        wait_count(&k, f, 1);
        assert_eq!(exec(&k, f, "echo alive"), "alive\n");
    }
    // The failed one is not a sandbox: only the source and the two forks.
    let mut ids: Vec<String> = stdout(&run(&k, &["ps", "-a", "-q"]))
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    let mut want = vec![src.clone(), forks[0].clone(), forks[1].clone()];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(snapshot_names(&k).len(), 1, "the fork snapshot");
    for id in forks.iter().chain([&src]) {
        let out = run(&k, &["rm", "-f", id]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    assert!(snapshot_names(&k).is_empty(), "{:?}", snapshot_names(&k));
    k.assert_clean();
}
