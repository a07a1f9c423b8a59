//! `kiln run` end to end on real microVMs (QEMU/TCG on the CI machines):
//! what a user types, and what they must see.

mod common;

use common::{Kiln, busybox, code, stderr, stdout};
use sha2::{Digest, Sha256};

#[test]
fn hello_world() {
    let k = Kiln::new();
    let img = busybox();
    let out = k.run(&["run", &img, "--", "echo", "hello from a microVM"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hello from a microVM\n");
    k.assert_clean();
}

#[test]
fn exit_codes_and_signals() {
    let k = Kiln::new();
    let img = busybox();
    let out = k.run(&["run", &img, "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "stderr: {}", stderr(&out));
    // Killed by a signal: 128 + N, as a shell reports it.
    let out = k.run(&["run", &img, "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(code(&out), 137, "stderr: {}", stderr(&out));
    let out = k.run(&["run", &img, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&out), 143, "stderr: {}", stderr(&out));
    // The image's default command (sh) with no stdin ends at once.
    let out = k.run(&["run", &img]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    k.assert_clean();
}

#[test]
fn stderr_is_kept_apart_from_stdout() {
    let k = Kiln::new();
    let out = k.run(&[
        "run",
        &busybox(),
        "--",
        "sh",
        "-c",
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2",
    ]);
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out), "out1\nout2\n");
    assert_eq!(stderr(&out), "err1\nerr2\n");
    k.assert_clean();
}

#[test]
fn twenty_mib_of_output_arrive_byte_identical() {
    let k = Kiln::new();
    // Deterministic but not trivially compressible: the guest hashes
    // nothing, the host checks every byte.
    let script = "i=0; while [ $i -lt 20 ]; do head -c 1048576 /dev/zero | tr '\\0' \"$(printf \\\\$(printf %03o $((65 + i))))\"; i=$((i+1)); done";
    let out = k.run(&["run", &busybox(), "--", "sh", "-c", script]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(out.stdout.len(), 20 << 20);
    let mut expected = Vec::with_capacity(20 << 20);
    for i in 0..20u8 {
        expected.extend(std::iter::repeat_n(b'A' + i, 1 << 20));
    }
    assert!(
        out.stdout == expected,
        "output differs from what the guest wrote"
    );
    k.assert_clean();
}

#[test]
fn random_output_matches_the_guests_own_checksum() {
    let k = Kiln::new();
    // 20 MiB of random bytes to stdout, their sha256 to stderr.
    let out = k.run(&[
        "run",
        &busybox(),
        "--",
        "sh",
        "-c",
        "head -c 20971520 /dev/urandom > /tmp/r; cat /tmp/r; sha256sum /tmp/r >&2",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let host = hex::encode(Sha256::digest(&out.stdout));
    let guest = stderr(&out);
    assert!(
        guest.starts_with(&host),
        "host sha {host}, guest said {guest}"
    );
    k.assert_clean();
}

#[test]
fn stdin_is_forwarded_with_dash_i() {
    let k = Kiln::new();
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let out = k.run_with_stdin(&["run", "-i", &busybox(), "--", "sha256sum"], &input);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let want = hex::encode(Sha256::digest(&input));
    assert_eq!(stdout(&out), format!("{want}  -\n"));
    // Without -i the process sees an empty stdin.
    let out = k.run_with_stdin(&["run", &busybox(), "--", "wc", "-c"], b"ignored");
    assert_eq!(stdout(&out).trim(), "0");
    k.assert_clean();
}

#[test]
fn env_workdir_user_and_entrypoint_follow_docker_run() {
    let k = Kiln::new();
    let img = busybox();
    let env_file = k.state_dir().join("vars.env");
    std::fs::write(
        &env_file,
        "# comment\nFROM_FILE=file value\nOVER=from-file\n",
    )
    .expect("env file");
    // Image env (PATH) is kept, -e adds and overrides, --env-file too, -e wins over the file.
    let out = k.run(&[
        "run",
        "-e",
        "GREETING=hi there",
        "-e",
        "OVER=from-flag",
        "--env-file",
        env_file.to_str().expect("utf-8"),
        &img,
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|$FROM_FILE|$OVER|$PATH|$HOME|$(hostname)|$HOSTNAME\"",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let line = stdout(&out);
    let f: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(f[0], "hi there");
    assert_eq!(f[1], "file value");
    assert_eq!(f[2], "from-flag");
    assert_eq!(
        f[3],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(f[4], "/root");
    assert!(
        !f[5].is_empty() && f[5] == f[6],
        "hostname {} vs HOSTNAME {}",
        f[5],
        f[6]
    );

    // -w: the directory is created when missing, like docker.
    let out = k.run(&["run", "-w", "/work/dir", &img, "--", "pwd"]);
    assert_eq!(stdout(&out), "/work/dir\n", "stderr: {}", stderr(&out));

    // -u as a name (from the image's /etc/passwd), a uid, and uid:gid.
    let out = k.run(&[
        "run",
        "-u",
        "app",
        &img,
        "--",
        "sh",
        "-c",
        "id -u; id -g; echo $HOME",
    ]);
    assert_eq!(
        stdout(&out),
        "1000\n1000\n/home/app\n",
        "stderr: {}",
        stderr(&out)
    );
    let out = k.run(&["run", "-u", "4242", &img, "--", "sh", "-c", "id -u; id -g"]);
    assert_eq!(stdout(&out), "4242\n0\n", "stderr: {}", stderr(&out));
    let out = k.run(&[
        "run",
        "-u",
        "1000:65534",
        &img,
        "--",
        "sh",
        "-c",
        "id -u; id -g",
    ]);
    assert_eq!(stdout(&out), "1000\n65534\n", "stderr: {}", stderr(&out));
    let out = k.run(&["run", "-u", "nosuchuser", &img, "--", "true"]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("nosuchuser"),
        "stderr: {}",
        stderr(&out)
    );

    // --entrypoint replaces the image's entrypoint; the args follow it.
    let out = k.run(&["run", "--entrypoint", "echo", &img, "--", "a", "b"]);
    assert_eq!(stdout(&out), "a b\n", "stderr: {}", stderr(&out));
    k.assert_clean();
}

#[test]
fn image_entrypoint_cmd_env_workdir_user() {
    use kiln_testkit::images::{Comp, LayoutWriter, Tar};
    let k = Kiln::new();
    // An image with its own ENTRYPOINT, CMD, Env, WorkingDir and User, on
    // top of the busybox layer.
    let dir = tempfile::tempdir().expect("tmp");
    let bb = kiln_testkit::images::busybox().expect("busybox");
    let mut w = LayoutWriter::new(&dir.path().join("layout")).expect("layout");
    w.copy_layers(&bb).expect("busybox layers");
    w.layer(
        &Tar::new()
            .dir("srv/", 0o755)
            .dir_owned("srv/app/", 0o755, 1000)
            .file(
                "srv/app/entry.sh",
                0o755,
                b"#!/bin/sh\necho \"entry: $*\"; echo \"cwd=$(pwd) uid=$(id -u) MODE=$MODE\"\n",
            )
            .bytes(),
        Comp::Gzip,
    )
    .expect("layer");
    let layout = w
        .finish(
            serde_json::json!({
                "Entrypoint": ["/srv/app/entry.sh"],
                "Cmd": ["default", "args"],
                "Env": ["PATH=/bin", "MODE=image"],
                "WorkingDir": "/srv/app",
                "User": "app"
            }),
            "v1",
        )
        .expect("finish");
    let img = layout.image_ref();
    let out = k.run(&["run", &img]);
    assert_eq!(
        stdout(&out),
        "entry: default args\ncwd=/srv/app uid=1000 MODE=image\n",
        "stderr: {}",
        stderr(&out)
    );
    // Args after `--` replace CMD but keep ENTRYPOINT; -e overrides Env; -u and -w override.
    let out = k.run(&[
        "run",
        "-e",
        "MODE=flag",
        "-u",
        "0",
        "-w",
        "/",
        &img,
        "--",
        "x",
        "y",
    ]);
    assert_eq!(
        stdout(&out),
        "entry: x y\ncwd=/ uid=0 MODE=flag\n",
        "stderr: {}",
        stderr(&out)
    );
    k.assert_clean();
}

#[test]
fn missing_command_fails_clearly() {
    let k = Kiln::new();
    let out = k.run(&["run", &busybox(), "--", "/no/such/program", "arg"]);
    assert_eq!(code(&out), 127, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("/no/such/program"), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // Not executable: 126.
    let out = k.run(&["run", &busybox(), "--", "/etc/passwd"]);
    assert_eq!(code(&out), 126, "stderr: {}", stderr(&out));
    k.assert_clean();
}

#[test]
fn bad_resources_are_refused_before_booting() {
    let k = Kiln::new();
    let out = k.run(&["run", "--memory", "1", &busybox(), "--", "true"]);
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert!(err.contains("--memory 1"), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let out = k.run(&["run", "--cpus", "0", &busybox(), "--", "true"]);
    assert_eq!(code(&out), 125);
    let out = k.run(&["run", "--timeout", "0", &busybox(), "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("--timeout 0"),
        "stderr: {}",
        stderr(&out)
    );
    let out = k.run(&["run", "--driver", "bochs", &busybox(), "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("bochs"), "stderr: {}", stderr(&out));
    k.assert_clean();
}

#[test]
fn timeout_kills_the_command() {
    let k = Kiln::new();
    let t0 = std::time::Instant::now();
    let out = k.run(&["run", "--timeout", "2", &busybox(), "--", "sleep", "600"]);
    assert_eq!(code(&out), 137, "stderr: {}", stderr(&out));
    assert!(t0.elapsed().as_secs() < 60);
    assert!(stderr(&out).contains("timeout"), "stderr: {}", stderr(&out));
    k.assert_clean();
}

#[test]
fn files_written_stay_inside_the_sandbox() {
    let k = Kiln::new();
    let img = busybox();
    let out = k.run(&[
        "run",
        &img,
        "--",
        "sh",
        "-c",
        "echo x > /etc/written && cat /etc/written",
    ]);
    assert_eq!(stdout(&out), "x\n", "stderr: {}", stderr(&out));
    // A new sandbox of the same image does not see it.
    let out = k.run(&[
        "run",
        &img,
        "--",
        "sh",
        "-c",
        "test -e /etc/written && echo leaked || echo clean",
    ]);
    assert_eq!(stdout(&out), "clean\n");
    k.assert_clean();
}

#[test]
fn tty_gives_the_process_a_terminal() {
    let k = Kiln::new();
    let img = busybox();
    let out = k.run(&[
        "run",
        "-t",
        &img,
        "--",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; stty size",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let text = stdout(&out).replace('\r', "");
    assert!(text.starts_with("is-a-tty\n"), "{text:?}");
    // Without -t: pipes.
    let out = k.run(&[
        "run",
        &img,
        "--",
        "sh",
        "-c",
        "test -t 1 && echo tty || echo pipe",
    ]);
    assert_eq!(stdout(&out), "pipe\n");
    k.assert_clean();
}

#[test]
fn info_says_which_driver_and_why() {
    let k = Kiln::new();
    let out = k.run(&["info", "--json"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["driver"]["kind"], "qemu", "{v:#}");
    // This machine's /dev/kvm is a software KVM (kvm_pvm): TCG, and the
    // reason says so.
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        assert_eq!(v["driver"]["accel"], "tcg", "{v:#}");
        assert!(
            v["driver"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("kvm_pvm"),
            "{v:#}"
        );
    }
    assert!(
        v["driver"]["version"]
            .as_str()
            .unwrap_or("")
            .contains("QEMU emulator version 10"),
        "{v:#}"
    );
    assert!(std::path::Path::new(v["kernel"]["path"].as_str().expect("kernel path")).is_file());
    assert!(
        std::path::Path::new(v["initramfs"]["path"].as_str().expect("initramfs path")).is_file()
    );
    assert_eq!(v["state_dir"].as_str(), k.state_dir().to_str());
    let text = k.run(&["info"]);
    assert!(stdout(&text).contains("Why:"), "{}", stdout(&text));
}

/// A `kiln run --rm` whose command ends before the command itself gets to
/// attach (a loaded host: here the `kiln` process is stopped with SIGSTOP
/// as soon as its sandbox exists) still prints the output and exits with
/// the command's code: the supervisor keeps a `--rm` sandbox nobody has
/// attached to for a while after its VM is gone. It used to remove the
/// sandbox with its output log at once: the run printed nothing and
/// exited 0, or failed with 125.
#[test]
fn a_late_attaching_run_rm_still_gets_its_output_and_exit_code() {
    let k = Kiln::new();
    let bb = busybox();
    let child = k
        .cmd()
        .args([
            "run",
            "--rm",
            &bb,
            "--",
            "sh",
            "-c",
            "echo late-but-here; exit 7",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln run starts");
    let pid = child.id().to_string();
    // Stop the CLI once its sandbox has a supervisor (recorded in the
    // record), before it has read the ready line and attached.
    let sandboxes = k.state_dir().join("sandboxes");
    let t0 = std::time::Instant::now();
    loop {
        let started = std::fs::read_dir(&sandboxes)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("record.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|r| r["shim_pid"].is_u64())
            });
        if started {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "the sandbox never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    assert!(stop.success());
    // Long enough for the command to end and the VM to be killed.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("kill -CONT");
    assert!(cont.success());
    let out = child.wait_with_output().expect("kiln run ends");
    assert_eq!(
        stdout(&out).trim(),
        "late-but-here",
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(code(&out), 7, "stderr: {}", stderr(&out));
    k.assert_clean();
}

/// `kiln rm -f` of a detached `--rm` sandbox does not wait out the grace a
/// `--rm` sandbox gives a late-attaching run: ending it is collecting it.
#[test]
fn rm_f_of_a_detached_rm_sandbox_is_prompt() {
    let k = Kiln::new();
    let bb = busybox();
    let out = k.run(&["run", "-d", "--rm", &bb, "--", "sleep", "600"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let t0 = std::time::Instant::now();
    let out = k.run(&["rm", "-f", &id]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(8),
        "rm -f took {:?}",
        t0.elapsed()
    );
    assert!(!k.state_dir().join("sandboxes").join(&id).exists());
    k.assert_clean();
}
