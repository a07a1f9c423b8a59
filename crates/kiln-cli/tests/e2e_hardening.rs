//! Hostile guests and interrupted commands (issue 13), each class through
//! the `kiln` binary on real microVMs; the guest-side attacks run as root
//! inside the guest, as a hostile workload would. Each test reuses one
//! sandbox for the checks of its story.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};

fn detach(k: &Kiln, args: &[&str]) -> String {
    let mut a = vec!["run", "-d"];
    a.extend_from_slice(args);
    let out = k.run(&a);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn record(k: &Kiln, id: &str) -> serde_json::Value {
    let p = k.state_dir().join("sandboxes").join(id).join("record.json");
    serde_json::from_slice(&std::fs::read(&p).expect("record")).expect("record json")
}

/// Waits for `child` at most `limit`; kills it if it is still running.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

fn guest_ls(k: &Kiln, id: &str, dir: &str) -> String {
    let out = k.run(&["exec", id, "--", "ls", "-a", dir]);
    assert_eq!(code(&out), 0, "ls: {}", stderr(&out));
    stdout(&out)
}

fn guest_sha(k: &Kiln, id: &str, path: &str) -> String {
    let out = k.run(&["exec", id, "--", "sha256sum", path]);
    assert_eq!(code(&out), 0, "sha256sum: {}", stderr(&out));
    stdout(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn local_sha(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(p).expect("read")))
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".kiln-cp-"))
        })
        .collect()
}

/// Class 1: a guest printing without end cannot fill the host's disk; the
/// log keeps the newest output and `kiln logs` says what it dropped.
#[test]
fn output_log_is_bounded() {
    let k = Kiln::new();
    // 12 MiB of output against a 1 MiB limit, then a last line.
    let id = detach(
        &k,
        &[
            "--log-limit",
            "1M",
            &busybox(),
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero bs=64k count=192 2>/dev/null | tr '\\0' x; echo; echo THE-END",
        ],
    );
    let out = k.run(&["wait", &id]);
    assert_eq!(code(&out), 0, "wait: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "0");
    let dir = k.state_dir().join("sandboxes").join(&id);
    let on_disk: u64 = ["output.log", "output.log.1"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
        .sum();
    assert!(
        on_disk <= (1 << 20) + (64 << 10),
        "the log holds {on_disk} bytes"
    );
    let out = k.run(&["logs", &id]);
    assert_eq!(code(&out), 0, "logs: {}", stderr(&out));
    assert!(
        stdout(&out).ends_with("THE-END\n"),
        "the newest output is kept"
    );
    let note = stderr(&out);
    assert!(
        note.contains("bytes of earlier output were dropped"),
        "logs said: {note}"
    );
    let dropped: u64 = note
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a byte count");
    let total = 192 * 65536 + "\nTHE-END\n".len() as u64;
    assert_eq!(
        dropped + stdout(&out).len() as u64,
        total,
        "dropped + kept = written"
    );
    k.assert_clean();
}

/// Classes 2 and 3 (and the supervisor-gone message of 9): copies into and
/// out of a sandbox are atomic and can be cancelled; a killed copy leaves
/// nothing that the next `kiln cp` does not remove.
#[test]
fn copies_are_atomic_and_cancellable() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let host = tempfile::tempdir().expect("tmp");
    let old = host.path().join("old.bin");
    std::fs::write(&old, b"the old content\n").expect("write");
    let out = k.run(&["cp", old.to_str().unwrap(), &format!("{id}:/data.bin")]);
    assert_eq!(code(&out), 0, "cp: {}", stderr(&out));
    let old_sha = local_sha(&old);
    // A big new version, interrupted by Ctrl-C and by SIGKILL.
    let big = host.path().join("big.bin");
    {
        // Real data (a sparse file would travel as holes, in no time).
        let block: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let mut data = Vec::with_capacity(96 << 20);
        for i in 0..96u8 {
            data.extend(block.iter().map(|b| b ^ i));
        }
        std::fs::write(&big, &data).expect("write");
    }
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let mut child = k
            .cmd()
            .args(["cp", big.to_str().unwrap(), &format!("{id}:/data.bin")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln cp");
        // Interrupt once the guest is writing the new file.
        let t = Instant::now();
        loop {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the copy never started"
            );
            if guest_ls(&k, &id, "/").contains(".kiln-cp-") {
                break;
            }
        }
        signal(&child, sig);
        let st = wait_bounded(&mut child, Duration::from_secs(30)).expect("cp ends");
        if sig == nix::sys::signal::Signal::SIGINT {
            assert_eq!(st.code(), Some(130), "Ctrl-C ends kiln cp with 130");
        }
        // The old file is untouched and, once the guest noticed, no
        // temporary is left.
        let t = Instant::now();
        while guest_ls(&k, &id, "/").contains(".kiln-cp-") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "a temporary stayed in the guest"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(guest_sha(&k, &id, "/data.bin"), old_sha, "after {sig:?}");
    }
    // A complete copy replaces it.
    let out = k.run(&["cp", big.to_str().unwrap(), &format!("{id}:/data.bin")]);
    assert_eq!(code(&out), 0, "cp: {}", stderr(&out));
    assert_eq!(guest_sha(&k, &id, "/data.bin"), local_sha(&big));

    // Copy-out: Ctrl-C leaves nothing; SIGKILL leaves a temporary that the
    // next `kiln cp` into that directory removes.
    let dest = host.path().join("out");
    std::fs::create_dir(&dest).expect("mkdir");
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let mut child = k
            .cmd()
            .args(["cp", &format!("{id}:/data.bin"), dest.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln cp");
        let t = Instant::now();
        while temporaries(&dest).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the copy never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        signal(&child, sig);
        let st = wait_bounded(&mut child, Duration::from_secs(30)).expect("cp ends");
        if sig == nix::sys::signal::Signal::SIGINT {
            assert_eq!(st.code(), Some(130), "Ctrl-C ends kiln cp with 130");
            assert!(temporaries(&dest).is_empty(), "{:?}", temporaries(&dest));
        } else {
            assert_eq!(
                temporaries(&dest).len(),
                1,
                "SIGKILL leaves the partial copy"
            );
        }
        assert!(
            !dest.join("data.bin").exists(),
            "no partial file under the final name"
        );
    }
    std::thread::sleep(Duration::from_millis(2100));
    let out = k.run(&["cp", &format!("{id}:/etc/hostname"), dest.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "cp: {}", stderr(&out));
    assert!(
        temporaries(&dest).is_empty(),
        "the killed copy's leftover was reaped"
    );

    // The supervisor killed: cp says so instead of "Broken pipe".
    let shim = record(&k, &id)["shim_pid"].as_i64().expect("shim pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill shim");
    std::thread::sleep(Duration::from_millis(300));
    let out = k.run(&["cp", old.to_str().unwrap(), &format!("{id}:/again.bin")]);
    assert_ne!(code(&out), 0);
    let err = stderr(&out);
    assert!(!err.contains("Broken pipe"), "{err}");
    assert!(
        err.contains("supervisor") || err.contains("not running"),
        "{err}"
    );
}

/// Builds the hostile guest tool (static, so it runs in any image).
fn guest_tool(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/guest_tool.c");
    let out = dir.join("guest_tool");
    let st = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs (build-essential)");
    assert!(st.success(), "cannot build {}", src.display());
    out
}

/// A ustar header for a member that sits below the file `cmdline` and
/// whose directory name is terminal escape sequences.
fn lying_header() -> Vec<u8> {
    let mut h = [0u8; 512];
    let name = b"cmdline/\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\nforged line/f";
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(b"00000000000\0");
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let ck = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(ck.as_bytes());
    h.to_vec()
}

/// Classes 5 and 9 (forged frames): guest bytes never reach the terminal
/// raw, and frames forged by a root workload fail only their stream.
#[test]
fn hostile_guest_cannot_end_the_sandbox_or_the_terminal() {
    let k = Kiln::new();
    let id = detach(
        &k,
        &[
            &busybox(),
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done",
        ],
    );
    let tools = tempfile::tempdir().expect("tmp");
    guest_tool(tools.path());
    // Forged Data frames on channel 9 for every stream id the host may use.
    let mut frames = Vec::new();
    for stream in 1..=64u32 {
        let h =
            kiln_api::proto::encode_header(kiln_api::proto::Kind::Data, stream, 2).expect("header");
        frames.extend_from_slice(&h);
        frames.extend_from_slice(&[9, b'A']);
    }
    std::fs::write(tools.path().join("frames"), &frames).expect("frames");
    std::fs::write(tools.path().join("header"), lying_header()).expect("header");
    for f in ["guest_tool", "frames", "header"] {
        let out = k.run(&[
            "cp",
            tools.path().join(f).to_str().unwrap(),
            &format!("{id}:/"),
        ]);
        assert_eq!(code(&out), 0, "cp {f}: {}", stderr(&out));
    }
    let ticks = |k: &Kiln| stdout(&k.run(&["logs", &id])).matches("tick").count();
    let before = ticks(&k);
    // The exec stream carrying the tool is among those it breaks.
    let out = k.run(&["exec", &id, "--", "/guest_tool", "forge", "/frames"]);
    tracing::info!(stderr = %stderr(&out), "forger finished");
    std::thread::sleep(Duration::from_secs(3));
    let out = k.run(&["exec", &id, "--", "echo", "alive"]);
    assert_eq!(
        stdout(&out),
        "alive\n",
        "exec after forged frames: {}",
        stderr(&out)
    );
    let ps = stdout(&k.run(&["ps"]));
    assert!(ps.contains(&id) && ps.contains("running"), "ps: {ps}");
    assert!(
        ticks(&k) > before + 1,
        "the main process's output is still logged"
    );

    // A file whose tar header says it is empty but that holds a second,
    // lying header naming escape sequences.
    let pad = "x".repeat(1200);
    let out = k.run(&[
        "exec",
        "-d",
        &id,
        "--",
        "/guest_tool",
        "cmdline",
        "/header",
        &pad,
    ]);
    assert_eq!(code(&out), 0, "exec -d: {}", stderr(&out));
    let pid = stdout(&out).trim().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let dest = tempfile::tempdir().expect("tmp");
    let out = k.run(&[
        "cp",
        &format!("{id}:/proc/{pid}/cmdline"),
        dest.path().to_str().unwrap(),
    ]);
    assert_ne!(code(&out), 0, "the lying archive is refused");
    let err = stderr(&out);
    assert!(
        !out.stderr.contains(&0x1b),
        "raw escape sequences printed: {err:?}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains("the sandbox sent a malformed archive"),
        "{err}"
    );
    assert!(temporaries(dest.path()).is_empty());

    let out = k.run(&["stop", "-t", "1", &id]);
    assert_eq!(code(&out), 0, "stop: {}", stderr(&out));
    let rec = record(&k, &id);
    assert_eq!(rec["state"]["state"], "exited", "record: {rec}");
    k.assert_clean();
}

/// Class 6: commands and environments up to what Linux takes, and clear
/// refusals (about the input, not the guest) beyond.
#[test]
fn large_commands_and_environments() {
    let k = Kiln::new();
    let big_env = format!("X={}", "e".repeat(100_000));
    let out = k.run(&[
        "run",
        "--rm",
        "-e",
        &big_env,
        &busybox(),
        "--",
        "sh",
        "-c",
        "echo ${#X}",
    ]);
    assert_eq!(code(&out), 0, "run: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "100000");

    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let arg = "a".repeat(100_000);
    let out = k.run(&[
        "exec",
        "-e",
        &big_env,
        &id,
        "--",
        "sh",
        "-c",
        "echo ${#X} ${#1}",
        "sh",
        &arg,
    ]);
    assert_eq!(code(&out), 0, "exec: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "100000 100000");
    // 1.5 MiB in 15 arguments: below ARG_MAX.
    let mut args = vec!["exec", &id, "--", "sh", "-c", "echo $#", "sh"];
    let chunk = "b".repeat(100_000);
    args.extend(std::iter::repeat_n(chunk.as_str(), 15));
    let out = k.run(&args);
    assert_eq!(code(&out), 0, "exec: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "15");
    // One variable over MAX_ARG_STRLEN, and 2.5 MiB in total (through
    // --env-file: the host's own execve of `kiln` has the same limits).
    let files = tempfile::tempdir().expect("tmp");
    let one = files.path().join("one.env");
    std::fs::write(&one, format!("HUGE={}\n", "c".repeat(200_000))).expect("env file");
    let out = k.run(&[
        "exec",
        "--env-file",
        one.to_str().unwrap(),
        &id,
        "--",
        "true",
    ]);
    common::assert_one_line_error(&out, "Linux allows at most");
    assert!(!stderr(&out).contains("guest"), "{}", stderr(&out));
    let many = files.path().join("many.env");
    let text: String = (0..25).map(|i| format!("V{i}={chunk}\n")).collect();
    std::fs::write(&many, text).expect("env file");
    let out = k.run(&[
        "exec",
        "--env-file",
        many.to_str().unwrap(),
        &id,
        "--",
        "true",
    ]);
    common::assert_one_line_error(&out, "ARG_MAX");
    assert!(!stderr(&out).contains("guest"), "{}", stderr(&out));
    let out = k.run(&["exec", &id, "--", "echo", "still", "fine"]);
    assert_eq!(stdout(&out), "still fine\n");
}

/// Class 9: `exec` has a deadline when the guest cannot answer, and
/// `kiln ps | head -1` ends quietly.
#[test]
fn exec_deadline_and_closed_stdout() {
    let k = Kiln::new();
    let id = detach(&k, &[&busybox(), "--", "sleep", "3600"]);
    let vmm = record(&k, &id)["vm"]["pid"].as_i64().expect("vm pid") as i32;
    // The VMM stopped from outside: the guest answers nothing.
    let vmm = nix::unistd::Pid::from_raw(vmm);
    nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGSTOP).expect("stop vmm");
    let t = Instant::now();
    let mut child = k
        .cmd()
        .args(["exec", "--start-timeout", "3", &id, "--", "true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln exec");
    let st = wait_bounded(&mut child, Duration::from_secs(30));
    let took = t.elapsed();
    nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGCONT).expect("cont vmm");
    let st = st.expect("kiln exec gave up by itself");
    let out = child.wait_with_output().expect("output");
    assert_ne!(st.code(), Some(0));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(stderr(&out).contains("too busy"), "{}", stderr(&out));
    let out = k.run(&["exec", &id, "--", "echo", "back"]);
    assert_eq!(stdout(&out), "back\n", "{}", stderr(&out));

    // stdout is a pipe nobody reads any more.
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    let out = k
        .cmd()
        .arg("ps")
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .expect("kiln ps");
    assert_eq!(stderr(&out), "", "kiln ps into a closed pipe is quiet");
    assert_eq!(code(&out), 141);
}

/// A pool member that took a run's claim belongs to that run, however
/// long it then takes to start the command (here its supervisor is
/// stopped for longer than the claim's 20 s deadline): the run waits for
/// it and never starts the command elsewhere too. (It used to give up
/// after 20 s, kill the member and restore the template: the command
/// could run twice.)
#[test]
fn a_claimed_pool_member_is_waited_for_not_run_around() {
    let k = Kiln::new();
    let bb = busybox();
    let out = k.run(&["template", "create", "--pool", "1", &bb]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let name = stdout(&out)
        .split_whitespace()
        .find(|w| w.starts_with("tpl-"))
        .expect("template name")
        .to_string();
    let ready = k.state_dir().join("pools").join(&name).join("ready");
    let member = std::fs::read_dir(&ready)
        .expect("pool dir")
        .flatten()
        .next()
        .expect("a pool member")
        .file_name()
        .to_string_lossy()
        .into_owned();
    let shim = record(&k, &member)["shim_pid"].as_i64().expect("shim pid") as i32;
    let run = k
        .cmd()
        .args(["run", "--rm", "-v", &bb, "--", "echo", "once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln run");
    // The member's record stops naming the pool once it took the claim.
    let t0 = Instant::now();
    while record(&k, &member).get("pool").is_some() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never claimed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stop = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), sig);
    stop(nix::sys::signal::Signal::SIGSTOP).expect("stop the supervisor");
    std::thread::sleep(Duration::from_secs(25));
    stop(nix::sys::signal::Signal::SIGCONT).expect("continue the supervisor");
    let out = run.wait_with_output().expect("kiln run ends");
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "once\n");
    assert!(
        stderr(&out).contains(&format!("warm start from the pool of template {name}")),
        "stderr: {}",
        stderr(&out)
    );
    // Nothing else was started or left failed.
    let ps = k.run(&["ps", "-a", "-q"]);
    assert_eq!(stdout(&ps).trim(), "", "ps -a: {}", stdout(&ps));
    let out = k.run(&["template", "rm", &name]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    k.assert_clean();
}

/// `kiln bench api` prints its table and where it wrote the JSON, and
/// nothing of the Raft library's expected election and teardown warnings.
#[test]
fn bench_api_output_is_only_its_table() {
    let k = Kiln::new();
    let dir = tempfile::tempdir().expect("tmp");
    let json = dir.path().join("api.json");
    for _ in 0..3 {
        let out = k.run(&[
            "bench",
            "api",
            "--creates",
            "300",
            "--concurrency",
            "16",
            "--json",
            json.to_str().expect("utf-8"),
        ]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        let table = stdout(&out);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.starts_with("REPLICAS"), "{table}");
        assert_eq!(
            stderr(&out).trim(),
            format!("wrote {}", json.display()),
            "stdout: {table}"
        );
    }
    k.assert_clean();
}
