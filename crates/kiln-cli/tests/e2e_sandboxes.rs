//! Kept sandboxes: `run -d`, `ps`, `exec`, `cp`, `logs`, `stop`, `rm`,
//! `wait`, `pause`/`resume`, each `kiln` command a separate process.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};
use sha2::{Digest, Sha256};

fn detach(k: &Kiln, args: &[&str]) -> String {
    let mut a = vec!["run", "-d"];
    a.extend_from_slice(args);
    let out = k.run(&a);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "id: {id:?}"
    );
    id
}

#[test]
fn detached_sandbox_exec_logs_stop_rm() {
    let k = Kiln::new();
    let id = detach(
        &k,
        &[
            &busybox(),
            "--",
            "sh",
            "-c",
            "echo started; echo to-stderr >&2; exec sleep 3600",
        ],
    );

    // Guest RAM, disks, env and output are private to the user running Kiln.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(k.state_dir()), 0o700);
        let sandbox = k.state_dir().join("sandboxes").join(&id);
        for f in ["rw.ext4", "output.log", "vm/memory"] {
            let m = mode(&sandbox.join(f));
            assert_eq!(m & 0o077, 0, "{f} has mode {m:o}");
        }
    }
    // `kiln run -d` has exited; the sandbox lives on and another process sees it.
    let out = k.run(&["ps"]);
    assert!(stdout(&out).contains(&id), "ps: {}", stdout(&out));
    assert!(stdout(&out).contains("running"), "ps: {}", stdout(&out));

    // exec: stdout, stderr, exit code, env and workdir of the sandbox.
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo in $(pwd); echo oops >&2; exit 7",
    ]);
    assert_eq!(code(&out), 7);
    assert_eq!(stdout(&out), "in /\n");
    assert_eq!(stderr(&out), "oops\n");
    let out = k.run(&[
        "exec",
        "-e",
        "X=1",
        "-w",
        "/tmp",
        "-u",
        "app",
        &id,
        "--",
        "sh",
        "-c",
        "echo $X $(pwd) $(id -u)",
    ]);
    assert_eq!(stdout(&out), "1 /tmp 1000\n", "stderr: {}", stderr(&out));
    // exec with stdin.
    let out = k.run_with_stdin(&["exec", "-i", &id, "--", "tr", "a-z", "A-Z"], b"shout\n");
    assert_eq!(stdout(&out), "SHOUT\n", "stderr: {}", stderr(&out));
    // Files written by exec persist for later execs.
    k.run(&["exec", &id, "--", "sh", "-c", "echo kept > /root/state"]);
    let out = k.run(&["exec", &id, "--", "cat", "/root/state"]);
    assert_eq!(stdout(&out), "kept\n");
    // A short ID prefix works.
    let out = k.run(&["exec", &id[..6], "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    // exec of a missing program.
    let out = k.run(&["exec", &id, "--", "/nope"]);
    assert_eq!(code(&out), 127, "stderr: {}", stderr(&out));

    // logs replay the main process's output, streams kept apart.
    let out = k.run(&["logs", &id]);
    assert_eq!(stdout(&out), "started\n");
    assert_eq!(stderr(&out), "to-stderr\n");

    // rm refuses a running sandbox without -f.
    let out = k.run(&["rm", &id]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("running"), "{}", stderr(&out));

    // stop: SIGTERM (sleep dies of it) → 143.
    let out = k.run(&["stop", "-t", "5", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&["wait", &id]);
    assert_eq!(stdout(&out).trim(), "143");
    let out = k.run(&["ps"]);
    assert!(
        !stdout(&out).contains(&id),
        "stopped sandbox listed without -a"
    );
    let out = k.run(&["ps", "-a"]);
    assert!(stdout(&out).contains(&id));
    k.assert_clean();
    let out = k.run(&["exec", &id, "--", "true"]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));

    let out = k.run(&["rm", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        k.all_state_files().is_empty(),
        "left: {:?}",
        k.all_state_files()
    );
    let out = k.run(&["ps", "-a", "-q"]);
    assert_eq!(stdout(&out), "");
}

#[test]
fn wait_logs_follow_and_rm_force() {
    let k = Kiln::new();
    let id = detach(
        &k,
        &[
            &busybox(),
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do echo line$i; sleep 0.3; done; exit 4",
        ],
    );
    let out = k.run(&["logs", "-f", &id]);
    assert_eq!(
        stdout(&out),
        "line1\nline2\nline3\n",
        "stderr: {}",
        stderr(&out)
    );
    let out = k.run(&["wait", &id]);
    assert_eq!(stdout(&out).trim(), "4");
    k.assert_clean();

    let id2 = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let out = k.run(&["rm", "-f", &id2]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    k.assert_clean();
    let out = k.run(&["rm", "-f", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        k.all_state_files().is_empty(),
        "left: {:?}",
        k.all_state_files()
    );
    let out = k.run(&["rm", "no-such-sandbox"]);
    assert_ne!(code(&out), 0);
}

#[test]
fn run_rm_leaves_nothing() {
    let k = Kiln::new();
    let out = k.run(&["run", "--rm", &busybox(), "--", "echo", "gone"]);
    assert_eq!(stdout(&out), "gone\n", "stderr: {}", stderr(&out));
    k.assert_clean();
    assert!(
        k.all_state_files().is_empty(),
        "left: {:?}",
        k.all_state_files()
    );
}

#[test]
fn pause_and_resume() {
    let k = Kiln::new();
    let id = detach(
        &k,
        &[
            &busybox(),
            "--",
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let out = k.run(&["pause", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&["ps"]);
    assert!(stdout(&out).contains("paused"), "ps: {}", stdout(&out));
    // While paused, the guest makes no progress; exec cannot reach it, so
    // check by reading the counter after resuming at once.
    std::thread::sleep(Duration::from_secs(2));
    let out = k.run(&["resume", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let a: u64 = stdout(&k.run(&["exec", &id, "--", "cat", "/tmp/n"]))
        .trim()
        .parse()
        .expect("counter");
    std::thread::sleep(Duration::from_secs(1));
    let b: u64 = stdout(&k.run(&["exec", &id, "--", "cat", "/tmp/n"]))
        .trim()
        .parse()
        .expect("counter");
    assert!(b > a, "counter did not move after resume: {a} then {b}");
    // 20 cycles lose no file.
    k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 20); do echo $i > /root/f$i; done",
    ]);
    for _ in 0..20 {
        assert_eq!(code(&k.run(&["pause", &id])), 0);
        assert_eq!(code(&k.run(&["resume", &id])), 0);
    }
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /root/f* | sort -n | tr '\\n' ' '",
    ]);
    let want: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
    assert_eq!(stdout(&out).trim(), want.join(" "));
    k.run(&["rm", "-f", &id]);
    k.assert_clean();
}

#[test]
fn timeout_excludes_paused_time() {
    let k = Kiln::new();
    let id = detach(&k, &["--timeout", "4", &busybox(), "--", "sleep", "600"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(code(&k.run(&["pause", &id])), 0);
    std::thread::sleep(Duration::from_secs(5));
    let out = k.run(&["ps"]);
    assert!(
        stdout(&out).contains("paused"),
        "timed out while paused: {}",
        stdout(&out)
    );
    assert_eq!(code(&k.run(&["resume", &id])), 0);
    let t = Instant::now();
    let out = k.run(&["wait", &id]);
    assert_eq!(stdout(&out).trim(), "137");
    assert!(t.elapsed() >= Duration::from_secs(1), "killed too early");
    k.assert_clean();
}

/// `kiln cp` streams: a file larger than the guest's RAM goes in and out
/// intact. `KILN_E2E_CP_MIB` sets the size (default 2048, as the issue asks).
#[test]
fn cp_large_file_both_ways() {
    let mib: u64 = std::env::var("KILN_E2E_CP_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let k = Kiln::new();
    let disk = (mib * 2 + 512).to_string();
    let id = detach(
        &k,
        &[
            "--memory",
            "256",
            "--disk",
            &disk,
            &busybox(),
            "--",
            "sleep",
            "3600",
        ],
    );
    let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let src = dir.path().join("big.bin");
    // Pseudo-random content, written and hashed as a stream.
    let mut hasher = Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for c in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            hasher.update(&block);
            f.write_all(&block).expect("write");
        }
        f.flush().expect("flush");
    }
    let want = hex::encode(hasher.finalize());
    let t = Instant::now();
    let out = k.run(&["cp", src.to_str().expect("utf-8"), &format!("{id}:/root/")]);
    assert_eq!(code(&out), 0, "cp in: {}", stderr(&out));
    tracing::info!(secs = t.elapsed().as_secs_f64(), mib, "copied in");
    let out = k.run(&["exec", &id, "--", "sha256sum", "/root/big.bin"]);
    assert_eq!(
        stdout(&out),
        format!("{want}  /root/big.bin\n"),
        "stderr: {}",
        stderr(&out)
    );
    let back = dir.path().join("back.bin");
    let t = Instant::now();
    let out = k.run(&[
        "cp",
        &format!("{id}:/root/big.bin"),
        back.to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&out), 0, "cp out: {}", stderr(&out));
    tracing::info!(secs = t.elapsed().as_secs_f64(), mib, "copied out");
    let mut f = std::fs::File::open(&back).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    assert_eq!(hex::encode(h.finalize()), want);
    k.run(&["rm", "-f", &id]);
    k.assert_clean();
}

#[test]
fn cp_directories_and_errors() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let dir = tempfile::tempdir().expect("tmp");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("a.txt"), "A").expect("write");
    std::fs::write(tree.join("sub/b.txt"), "B").expect("write");
    // Into an existing directory (trailing slash): keeps the name.
    let out = k.run(&["cp", tree.to_str().expect("utf-8"), &format!("{id}:/tmp/")]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /tmp/tree/a.txt /tmp/tree/sub/b.txt",
    ]);
    assert_eq!(stdout(&out), "AB");
    // Into an existing directory without the slash: the same, like docker cp.
    let file = tree.join("a.txt");
    let out = k.run(&["cp", file.to_str().expect("utf-8"), &format!("{id}:/tmp")]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "test -d /tmp && cat /tmp/a.txt",
    ]);
    assert_eq!(stdout(&out), "A", "stderr: {}", stderr(&out));
    // Out of the sandbox into an existing local directory: keeps the name.
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).expect("mkdir");
    let out = k.run(&[
        "cp",
        &format!("{id}:/tmp/tree"),
        existing.to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(existing.join("tree/a.txt")).expect("copied"),
        "A"
    );
    // Again, onto the now non-empty copy: merged, like docker cp.
    std::fs::write(existing.join("tree/local-only"), "L").expect("write");
    let out = k.run(&[
        "cp",
        &format!("{id}:/tmp/tree"),
        existing.to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(existing.join("tree/sub/b.txt")).expect("merged"),
        "B"
    );
    assert_eq!(
        std::fs::read_to_string(existing.join("tree/local-only")).expect("kept"),
        "L"
    );
    // To a new name.
    let out = k.run(&["cp", tree.to_str().expect("utf-8"), &format!("{id}:/srv")]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /srv/a.txt /srv/sub/b.txt",
    ]);
    assert_eq!(stdout(&out), "AB");
    // Into a directory that does not exist: refused, like docker cp.
    let out = k.run(&[
        "cp",
        tree.to_str().expect("utf-8"),
        &format!("{id}:/nowhere/"),
    ]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("/nowhere/"), "{}", stderr(&out));
    let back = dir.path().join("back");
    let out = k.run(&[
        "cp",
        &format!("{id}:/tmp/tree"),
        back.to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(back.join("sub/b.txt")).expect("copied back"),
        "B"
    );
    // Missing source in the guest: a clear error, nothing created.
    let nothing = dir.path().join("nothing");
    let out = k.run(&[
        "cp",
        &format!("{id}:/no/such/file"),
        nothing.to_str().expect("utf-8"),
    ]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("/no/such/file"), "{}", stderr(&out));
    assert!(!nothing.exists());
    k.run(&["rm", "-f", &id]);
    k.assert_clean();
}

#[test]
fn exec_reattach_gets_output_produced_while_detached() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let out = k.run(&[
        "exec",
        "-d",
        &id,
        "--",
        "sh",
        "-c",
        "echo one; sleep 2; echo two; exit 5",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let pid = stdout(&out).trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "pid: {pid:?}");
    std::thread::sleep(Duration::from_secs(3));
    let out = k.run(&["exec", "--attach", &pid, &id]);
    assert_eq!(stdout(&out), "one\ntwo\n", "stderr: {}", stderr(&out));
    assert_eq!(code(&out), 5);
    k.run(&["rm", "-f", &id]);
    k.assert_clean();
}

#[test]
fn exec_d_i_keeps_stdin_for_a_later_attach() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let out = k.run(&[
        "exec",
        "-d",
        "-i",
        &id,
        "--",
        "sh",
        "-c",
        "read l; echo got $l",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let pid = stdout(&out).trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "pid: {pid:?}");
    let out = k.run_with_stdin(&["exec", "--attach", &pid, "-i", &id], b"hello\n");
    assert_eq!(stdout(&out), "got hello\n", "stderr: {}", stderr(&out));
    assert_eq!(code(&out), 0);
    k.run(&["rm", "-f", &id]);
    k.assert_clean();
}

#[test]
fn ctrl_c_is_forwarded_to_the_process() {
    let k = Kiln::new();
    let mut child = k
        .cmd()
        .args([
            "run",
            &busybox(),
            "--",
            "sh",
            "-c",
            "trap 'echo got INT; exit 9' INT; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).expect("ready");
    assert_eq!(&buf, b"ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("signal");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("rest");
    let status = child.wait().expect("wait");
    assert_eq!(rest, "got INT\n");
    assert_eq!(status.code(), Some(9));
    k.assert_clean();
}

#[test]
fn second_ctrl_c_tears_the_sandbox_down() {
    let k = Kiln::new();
    let mut child = k
        .cmd()
        .args([
            "run",
            &busybox(),
            "--",
            "sh",
            "-c",
            "trap '' INT; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).expect("ready");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("signal");
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("signal");
    let status = child.wait().expect("wait");
    // The process was killed: kiln exits with its status, 128 + SIGKILL.
    assert_eq!(status.code(), Some(137));
    // The supervisor finishes its teardown within moments.
    let t = Instant::now();
    while !(k.leftover_processes().is_empty() && k.leftover_files().is_empty())
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    k.assert_clean();
    let out = k.run(&["ps", "-a"]);
    assert!(
        stdout(&out).contains("exited (137)"),
        "ps: {}",
        stdout(&out)
    );
}

/// A guest whose kernel hangs (panic with no reboot) answers nothing: the
/// timeout, `stop` and `rm -f` must still end the sandbox, by killing the VMM.
#[test]
fn a_hung_guest_cannot_outlive_stop_timeout_or_rm() {
    let k = Kiln::new();
    let hang = "echo 0 > /proc/sys/kernel/panic; echo 1 > /proc/sys/vm/panic_on_oom; \
                mkdir -p /t; mount -t tmpfs -o size=1G none /t; echo filling; dd if=/dev/zero of=/t/f bs=1M 2>/dev/null";
    // --timeout on a hung guest.
    let t = Instant::now();
    let out = k.run(&[
        "run",
        "--memory",
        "64",
        "--timeout",
        "8",
        &busybox(),
        "--",
        "sh",
        "-c",
        hang,
    ]);
    assert_eq!(code(&out), 137, "stderr: {}", stderr(&out));
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t.elapsed()
    );
    k.assert_clean();
    // stop and rm -f on a hung guest.
    for cmd in [&["stop", "-t", "2"][..], &["rm", "-f"][..]] {
        let id = detach(&k, &["--memory", "64", &busybox(), "--", "sh", "-c", hang]);
        std::thread::sleep(Duration::from_secs(6));
        let t = Instant::now();
        let mut args = cmd.to_vec();
        args.push(&id);
        let out = k.run(&args);
        assert_eq!(code(&out), 0, "{cmd:?}: {}", stderr(&out));
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{cmd:?} took {:?}",
            t.elapsed()
        );
        k.assert_clean();
        k.run(&["rm", "-f", &id]);
    }
}

/// `stop -t N` (on every route: through the API it travels in the stop
/// request to the node): SIGTERM first, SIGKILL N seconds later, not after
/// the default 10 s.
#[test]
fn stop_t_is_the_grace_time_before_sigkill() {
    let k = Kiln::new();
    let ignores = "trap 'echo got TERM' TERM; echo up; while :; do sleep 1; done";
    let id = detach(&k, &[&busybox(), "--", "sh", "-c", ignores]);
    let t0 = Instant::now();
    while !stdout(&k.run(&["logs", &id])).contains("up") {
        assert!(t0.elapsed() < Duration::from_secs(60), "never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    let out = k.run(&["stop", "-t", "1", &id]);
    let took = t.elapsed();
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&k.run(&["wait", &id])).trim(), "137");
    assert!(
        stdout(&k.run(&["logs", &id])).contains("got TERM"),
        "no SIGTERM before the SIGKILL"
    );
    // The default grace is 10 s: a stop that took that long ignored -t.
    assert!(took < Duration::from_secs(9), "stop -t 1 took {took:?}");
    eprintln!("MEASURE stop -t 1 of a TERM-ignoring sandbox: {took:?}");
    k.run(&["rm", &id]);
    k.assert_clean();
}

#[test]
fn stop_exec_and_cp_on_a_paused_sandbox() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    assert_eq!(code(&k.run(&["pause", &id])), 0);
    let out = k.run(&["exec", &id, "--", "touch", "/ghost"]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("paused"), "{}", stderr(&out));
    let out = k.run(&["cp", "/etc/hostname", &format!("{id}:/tmp/")]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("paused"), "{}", stderr(&out));
    // The refused exec never runs later.
    assert_eq!(code(&k.run(&["resume", &id])), 0);
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "test -e /ghost && echo ran || echo never",
    ]);
    assert_eq!(stdout(&out), "never\n");
    // stop on a paused sandbox resumes it and stops it.
    assert_eq!(code(&k.run(&["pause", &id])), 0);
    let t = Instant::now();
    let out = k.run(&["stop", "-t", "5", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(stdout(&k.run(&["wait", &id])).trim(), "143");
    k.assert_clean();
}

#[test]
fn a_vm_whose_supervisor_died_is_reaped() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            k.state_dir()
                .join("sandboxes")
                .join(&id)
                .join("record.json"),
        )
        .expect("record"),
    )
    .expect("json");
    let shim = rec["shim_pid"].as_i64().expect("shim pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    std::thread::sleep(Duration::from_millis(300));
    // The VMM is still there, with nobody serving it, until a kiln command
    // looks (through `kiln up`, its node daemon looks on its own at once).
    if !common::through_up() {
        assert!(!k.leftover_processes().is_empty());
    }
    let out = k.run(&["ps", "-a"]);
    assert!(
        stdout(&out).contains("failed (255)"),
        "ps: {}",
        stdout(&out)
    );
    k.assert_clean();
    let out = k.run(&["stop", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&["rm", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        k.all_state_files().is_empty(),
        "left: {:?}",
        k.all_state_files()
    );
}
