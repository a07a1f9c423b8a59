//! End to end on a real microVM: QEMU microvm (TCG here) boots the Kiln
//! kernel with the kiln-init initramfs over a busybox root disk, and the
//! host talks to kiln-init through `kiln_node::agent` on the virtio-serial
//! socket. One linear story (one boot is expensive under TCG).
//!
//! Needs: `qemu-system-x86_64`, `/usr/share/qemu/qboot.rom`, the kernel from
//! `scripts/build-kernel.sh`, Debian's busybox-static at `/bin/busybox`,
//! `mkfs.ext4`, `cpio`, `tar`, `sha256sum`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_api::proto::{Configure, ExecRequest, ExitStatus};
use kiln_node::agent::{AgentClient, ExecError, Output};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// A booted VM; killed and its files removed on drop, even on failure.
struct Vm {
    dir: PathBuf,
    qemu: Option<Child>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        if std::thread::panicking() {
            let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
            eprintln!("---- guest console ----\n{console}\n-----------------------");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sha256_file(p: &Path) -> String {
    sh(Command::new("sha256sum").arg(p))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sha256_bytes(b: &[u8]) -> String {
    let t = std::env::temp_dir().join(format!("kiln-sha-{}", std::process::id()));
    std::fs::write(&t, b).unwrap();
    let h = sha256_file(&t);
    let _ = std::fs::remove_file(&t);
    h
}

fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "etc",
        "home/alice",
        "tmp",
        "proc",
        "sys",
        "dev",
        "run",
        "root",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("Debian busybox-static at /bin/busybox");
    let list = sh(Command::new("/bin/busybox").arg("--list"));
    for applet in list.lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nalice:x:1000:\nstaff:x:50:alice\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/hosts"), "127.0.0.1\tlocalhost\n").unwrap();
    let img = dir.join("root.ext4");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("64M"));
    img
}

/// Boots a VM; `with_disks: false` boots without `kiln.root` (kiln-init
/// stays in the initramfs).
async fn boot(with_disks: bool) -> (Vm, PathBuf, Instant) {
    let repo = repo_root();
    let kernel = dirs_home().join(".cache/kiln/kernel/current/bzImage");
    assert!(
        kernel.exists(),
        "kernel missing at {}: run scripts/build-kernel.sh",
        kernel.display()
    );
    let initramfs_dir = sh(&mut Command::new(repo.join("scripts/build-initramfs.sh")));
    let initramfs = PathBuf::from(initramfs_dir.trim()).join("initramfs.img");
    let dir = std::env::temp_dir().join(format!(
        "kiln-agent-vm-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vm = Vm {
        dir: dir.clone(),
        qemu: None,
    };
    let sock = dir.join("agent.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off,rtc=on",
        "-accel",
        "tcg",
        "-bios",
        "/usr/share/qemu/qboot.rom",
    ])
    .args([
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", dir.join("console.log").display()))
    .arg("-kernel")
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initramfs)
    .arg("-append");
    if with_disks {
        let root = build_rootfs(&dir);
        let rw = dir.join("rw.ext4");
        std::fs::File::create(&rw)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&rw));
        cmd.arg("console=ttyS0 reboot=t panic=-1 quiet kiln.root=/dev/vda kiln.rw=/dev/vdb kiln.channel=serial")
            .arg("-drive")
            .arg(format!("id=d0,file={},format=raw,if=none,read-only=on", root.display()))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .arg("-drive")
            .arg(format!("id=d1,file={},format=raw,if=none", rw.display()))
            .args(["-device", "virtio-blk-device,drive=d1"]);
    } else {
        cmd.arg("console=ttyS0 reboot=t panic=-1 quiet kiln.channel=serial");
    }
    cmd.args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-device", "virtserialport,chardev=agent,name=kiln.agent"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let qemu = cmd.spawn().expect("spawning qemu-system-x86_64");
    vm.qemu = Some(qemu);
    (vm, sock, started)
}

fn dirs_home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME"))
}

async fn connect(sock: &Path) -> (AgentClient, kiln_api::proto::HelloAck) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(sock).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("connecting to {}: {e}", sock.display()),
        }
    };
    AgentClient::connect(stream, Duration::from_secs(60))
        .await
        .expect("agent handshake")
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into()],
        cwd: None,
        user: None,
        tty: false,
        rows: None,
        cols: None,
        stdin: false,
        main: false,
        detached: false,
    }
}

async fn run(c: &AgentClient, r: ExecRequest) -> (String, String, ExitStatus) {
    let p = c.exec(r).await.expect("exec");
    let (o, e, s) = p.wait_with_output().await.expect("output");
    (
        String::from_utf8_lossy(&o).into_owned(),
        String::from_utf8_lossy(&e).into_owned(),
        s,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_end_to_end_on_qemu() {
    tokio::time::timeout(Duration::from_secs(600), story())
        .await
        .expect("the story finishes within 10 min");
}

/// Without `kiln.root`, kiln-init serves from the initramfs: a binary copied
/// in runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_initramfs_without_root_disk() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let (mut vm, sock, _) = boot(false).await;
        let (client, _) = connect(&sock).await;
        let e = client
            .exec(req(&["sh", "-c", "true"]))
            .await
            .err()
            .expect("no shell in the initramfs");
        assert!(matches!(e, ExecError::NotFound(_)), "{e:?}");
        let staging = vm.dir.join("bb");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::copy("/bin/busybox", staging.join("busybox")).unwrap();
        sh(Command::new("tar")
            .arg("-C")
            .arg(&staging)
            .args(["-cf", "bb.tar", "busybox"])
            .current_dir(&vm.dir));
        let bytes = std::fs::read(vm.dir.join("bb.tar")).unwrap();
        client
            .copy_in("/tmp", &bytes[..])
            .await
            .expect("copy_in into the initramfs");
        let (out, _, st) = run(
            &client,
            req(&[
                "/tmp/busybox",
                "sh",
                "-c",
                "echo in-initramfs; cat /proc/1/cmdline",
            ]),
        )
        .await;
        assert_eq!(st.code, Some(0));
        assert!(out.starts_with("in-initramfs\n/init"), "{out:?}");
        client.shutdown().await.unwrap();
        let mut q = vm.qemu.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while q.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "QEMU still running after Shutdown"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("finishes within 5 min");
}

async fn story() {
    let (mut vm, sock, spawned) = boot(true).await;
    let (client, ack) = connect(&sock).await;
    let ready = spawned.elapsed();
    eprintln!(
        "phase boot: HelloAck {:.0} ms after QEMU spawn ({})",
        ready.as_secs_f64() * 1000.0,
        ack.agent
    );
    assert!(ack.main.is_none());
    client.ping().await.unwrap();

    eprintln!("phase configure");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    client
        .configure(Configure {
            sandbox_id: "sb-test".into(),
            hostname: "kiln-test".into(),
            entropy: base64::engine::general_purpose::STANDARD.encode([7u8; 64]),
            time_unix_ns: now.as_nanos() as u64,
            network: None,
        })
        .await
        .unwrap();
    let (out, _, _) = run(&client, req(&["sh", "-c", "hostname; date +%Y"])).await;
    let year = sh(Command::new("date").arg("+%Y"));
    assert_eq!(out, format!("kiln-test\n{year}"));

    eprintln!("phase hello/stderr/exit codes");
    let (out, err, st) = run(&client, req(&["echo", "hello world"])).await;
    assert_eq!(
        (out.as_str(), err.as_str(), st.code),
        ("hello world\n", "", Some(0))
    );
    let (out, err, st) = run(
        &client,
        req(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(
        (out.as_str(), err.as_str(), st.shell_code()),
        ("out\n", "err\n", 3)
    );
    let (_, _, st) = run(&client, req(&["sh", "-c", "kill -9 $$"])).await;
    assert_eq!((st.signal, st.shell_code()), (Some(9), 137));
    let p = client.exec(req(&["sleep", "100"])).await.unwrap();
    client.signal(p.pid(), 15).await.unwrap();
    let (_, _, st) = p.wait_with_output().await.unwrap();
    assert_eq!(st.shell_code(), 143);

    eprintln!("phase env/cwd/user");
    let mut r = req(&[
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; id -g; id -G; echo ${HOME:-unset}",
    ]);
    r.env.push("FOO=bar baz".into());
    r.cwd = Some("/work/new/dir".into());
    r.user = Some("alice".into());
    let (out, err, st) = run(&client, r).await;
    assert_eq!(st.code, Some(0), "{err}");
    assert_eq!(
        out,
        "bar baz\n/work/new/dir\n1000\n1000\n1000 50\n/home/alice\n"
    );
    let mut r = req(&["id", "-u"]);
    r.user = Some("4242:50".into());
    assert_eq!(run(&client, r).await.0, "4242\n");

    eprintln!("phase not found");
    let e = client
        .exec(req(&["nosuch"]))
        .await
        .err()
        .expect("nosuch fails");
    assert!(matches!(e, ExecError::NotFound(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "exec: \"nosuch\": executable file not found in $PATH"
    );
    assert_eq!(e.shell_code(), Some(127));
    let e = client
        .exec(req(&["/etc/passwd"]))
        .await
        .err()
        .expect("not executable");
    assert_eq!(e.shell_code(), Some(126), "{e:?}");

    eprintln!("phase stdin");
    let mut r = req(&["cat"]);
    r.stdin = true;
    let mut p = client.exec(r).await.unwrap();
    let mut stdin = p.take_stdin().unwrap();
    stdin.write(b"piped through cat\n").await.unwrap();
    stdin.close().await.unwrap();
    let (out, _, st) = p.wait_with_output().await.unwrap();
    assert_eq!(
        (out.as_slice(), st.code),
        (&b"piped through cat\n"[..], Some(0))
    );

    eprintln!("phase tty");
    let mut r = req(&["sh", "-c", "tty; stty size; echo err >&2"]);
    r.tty = true;
    r.rows = Some(30);
    r.cols = Some(100);
    let (out, err, st) = run(&client, r).await;
    assert_eq!(st.code, Some(0));
    assert!(
        out.contains("/dev/pts/") && out.contains("30 100") && out.contains("err"),
        "{out:?}"
    );
    assert_eq!(err, "");

    eprintln!("phase 20 MiB output, slow consumer");
    let (out, err, st) = run(
        &client,
        req(&[
            "sh",
            "-c",
            "head -c 20971520 /dev/urandom > /tmp/big && sha256sum /tmp/big",
        ]),
    )
    .await;
    assert_eq!(st.code, Some(0), "{err}");
    let guest_hash = out.split_whitespace().next().unwrap().to_string();
    let t0 = Instant::now();
    let mut p = client
        .exec(req(&["sh", "-c", "cat /tmp/big; echo stderr-only >&2"]))
        .await
        .unwrap();
    let (mut data, mut errs) = (Vec::with_capacity(21 << 20), Vec::new());
    let mut items = 0u32;
    let status = loop {
        match p.recv().await.unwrap().unwrap() {
            Output::Stdout(b) => data.extend_from_slice(&b),
            Output::Stderr(b) => errs.extend_from_slice(&b),
            Output::Exit(s) => break s,
        }
        items += 1;
        if items.is_multiple_of(8) {
            // A deliberately slow consumer: the guest must wait for credit.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let took = t0.elapsed();
    assert_eq!(status.code, Some(0));
    assert_eq!(data.len(), 20 << 20);
    assert_eq!(sha256_bytes(&data), guest_hash);
    assert_eq!(errs, b"stderr-only\n");
    eprintln!(
        "phase 20 MiB: {:.2} s ({:.1} MiB/s, {items} items)",
        took.as_secs_f64(),
        20.0 / took.as_secs_f64()
    );
    drop(data);
    let t0 = Instant::now();
    let (out, _, st) = {
        let p = client.exec(req(&["cat", "/tmp/big"])).await.unwrap();
        p.wait_with_output().await.unwrap()
    };
    assert_eq!((out.len(), st.code), (20 << 20, Some(0)));
    eprintln!(
        "phase 20 MiB, fast consumer: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    drop(out);

    eprintln!("phase stdout and stderr concurrently, never mixed");
    let (out, _, _) = run(
        &client,
        req(&["sh", "-c", "head -c 5242880 /tmp/big | sha256sum"]),
    )
    .await;
    let want = out.split_whitespace().next().unwrap().to_string();
    let p = client
        .exec(req(&[
            "sh",
            "-c",
            "head -c 5242880 /tmp/big >&2 & head -c 5242880 /tmp/big; wait",
        ]))
        .await
        .unwrap();
    let (out, err, st) = p.wait_with_output().await.unwrap();
    assert_eq!((out.len(), err.len(), st.code), (5 << 20, 5 << 20, Some(0)));
    assert_eq!(sha256_bytes(&out), want);
    assert_eq!(sha256_bytes(&err), want);

    eprintln!("phase copy_in/copy_out 50 MiB");
    let host_dir = vm.dir.join("copy");
    std::fs::create_dir_all(&host_dir).unwrap();
    let big = host_dir.join("big.bin");
    sh(Command::new("head")
        .args(["-c", "52428800", "/dev/urandom"])
        .stdout(std::fs::File::create(&big).unwrap()));
    let host_hash = sha256_file(&big);
    let mut tar = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(&host_dir)
        .args(["-cf", "-", "big.bin"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let (out, _, _) = run(&client, req(&["mkdir", "-p", "/data"])).await;
    assert_eq!(out, "");
    client
        .copy_in("/data", tar.stdout.take().unwrap())
        .await
        .expect("copy_in");
    assert!(tar.wait().await.unwrap().success());
    let copy_in_took = t0.elapsed();
    let (out, _, _) = run(&client, req(&["sha256sum", "/data/big.bin"])).await;
    assert_eq!(out.split_whitespace().next(), Some(host_hash.as_str()));
    let back = vm.dir.join("back");
    std::fs::create_dir_all(&back).unwrap();
    let t0 = Instant::now();
    let mut reader = client.copy_out("/data/big.bin").await.expect("copy_out");
    let mut untar = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(&back)
        .args(["-xf", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = untar.stdin.take().unwrap();
    tokio::io::copy(&mut reader, &mut stdin)
        .await
        .expect("copy_out stream");
    stdin.shutdown().await.unwrap();
    drop(stdin);
    assert!(untar.wait().await.unwrap().success());
    let copy_out_took = t0.elapsed();
    assert_eq!(sha256_file(&back.join("big.bin")), host_hash);
    eprintln!(
        "phase copy 50 MiB: in {:.2} s, out {:.2} s",
        copy_in_took.as_secs_f64(),
        copy_out_took.as_secs_f64()
    );
    // A directory comes out as a tree.
    let mut reader = client
        .copy_out("/home")
        .await
        .expect("copy_out of a directory");
    let mut tarball = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut tarball)
        .await
        .unwrap();
    std::fs::write(vm.dir.join("home.tar"), &tarball).unwrap();
    let listing = sh(Command::new("tar").arg("-tf").arg(vm.dir.join("home.tar")));
    assert!(
        listing
            .lines()
            .any(|l| l.trim_end_matches('/') == "home/alice"),
        "{listing}"
    );
    assert!(client.copy_out("/no/such").await.is_err());
    // A hostile archive cannot write outside the destination.
    for (name, kind, link) in [
        ("../escape", b'0', ""),
        ("up", b'2', "../.."),
        ("abs", b'2', "/etc"),
    ] {
        let evil = tar_entry(name, kind, link, b"pwned");
        let r = client.copy_in("/data", &evil[..]).await;
        let msg = r.expect_err("a hostile member is refused").to_string();
        assert!(
            msg.contains("unsafe path") || msg.contains("escapes the destination"),
            "{name}: {msg}"
        );
    }
    let (out, _, _) = run(
        &client,
        req(&["sh", "-c", "ls /escape /data/up /data/abs 2>&1 | wc -l"]),
    )
    .await;
    assert_eq!(out.trim(), "3", "error lines for three missing files");
    let (out, _, _) = run(&client, req(&["ls", "/escape"])).await;
    assert_eq!(out, "");
    let bad = client.copy_in("/data/big.bin", &b"not a tar"[..]).await;
    assert!(bad.is_err());

    eprintln!("phase processes");
    let sleeper = client.exec(req(&["sleep", "30"])).await.unwrap();
    let list = client.processes().await.unwrap();
    assert!(
        list.iter()
            .any(|p| p.pid == sleeper.pid() && p.exit.is_none()),
        "{list:?}"
    );
    client.signal(sleeper.pid(), 9).await.unwrap();
    drop(sleeper);

    eprintln!("phase detach and re-attach");
    let mut p = client
        .exec(req(&[
            "sh",
            "-c",
            "echo before; sleep 2; echo after; echo more >&2; exit 7",
        ]))
        .await
        .unwrap();
    let pid = p.pid();
    assert_eq!(
        p.recv().await.unwrap().unwrap(),
        Output::Stdout("before\n".into())
    );
    drop(p);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, _) = connect(&sock).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // output produced while detached
    let p = client.attach(pid, false).await.expect("attach");
    let (out, err, st) = p.wait_with_output().await.unwrap();
    assert_eq!(
        (out.as_slice(), err.as_slice(), st.code),
        (&b"after\n"[..], &b"more\n"[..], Some(7))
    );

    eprintln!("phase detached output beyond the 8 MiB bound is held back, not lost");
    let (out, _, _) = run(
        &client,
        req(&["sh", "-c", "head -c 12582912 /tmp/big | sha256sum"]),
    )
    .await;
    let want = out.split_whitespace().next().unwrap().to_string();
    let p = client
        .exec(req(&[
            "sh",
            "-c",
            "sleep 1; head -c 12582912 /tmp/big; echo done >&2",
        ]))
        .await
        .unwrap();
    let pid = p.pid();
    drop(p);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, _) = connect(&sock).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let list = client.processes().await.unwrap();
    let info = list
        .iter()
        .find(|p| p.pid == pid)
        .expect("writer still known");
    assert!(
        info.exit.is_none(),
        "the writer must be blocked on its pipe, not finished: {info:?}"
    );
    let p = client.attach(pid, false).await.expect("attach");
    let (out, err, st) = p.wait_with_output().await.unwrap();
    assert_eq!(
        (out.len(), err.as_slice(), st.code),
        (12 << 20, &b"done\n"[..], Some(0))
    );
    assert_eq!(sha256_bytes(&out), want);

    eprintln!("phase orphans are reaped");
    run(&client, req(&["sh", "-c", "(sleep 0.2 &); true"])).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (out, _, _) = run(
        &client,
        req(&["sh", "-c", "cat /proc/[0-9]*/stat | grep -c ') Z '"]),
    )
    .await;
    assert_eq!(out, "0\n", "zombies left");

    eprintln!("phase quiesce");
    client.quiesce().await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), client.ping()).await;
    assert!(
        quiet.is_err(),
        "the guest answered while quiesced: {quiet:?}"
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, _) = connect(&sock).await;
    client.ping().await.unwrap();

    // (A background child keeps the main process's stdout open: its exit is
    // reported anyway, shortly after it ends.)
    eprintln!("phase main process, SIGTERM to PID 1 forwarded, shutdown");
    let mut r = req(&["sh", "-c", "echo main; sleep 1000 & exec sleep 100"]);
    r.main = true;
    let mut main = client.exec(r).await.unwrap();
    assert_eq!(
        main.recv().await.unwrap().unwrap(),
        Output::Stdout("main\n".into())
    );
    let (_, err, st) = run(&client, req(&["kill", "-TERM", "1"])).await;
    assert_eq!(st.code, Some(0), "{err}");
    let (out, _, st) = main.wait_with_output().await.unwrap();
    assert_eq!((out.as_slice(), st.signal), (&b""[..], Some(15)));
    // A new connection still sees the main process's status.
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, ack) = connect(&sock).await;
    let main = ack.main.expect("main process reported in HelloAck");
    assert_eq!(main.exit.map(|e| e.shell_code()), Some(143));
    client.shutdown().await.expect("shutdown");
    let mut q = vm.qemu.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = q.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU still running 30 s after Shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("phase done: QEMU exited ({status})");
}

/// A one-member ustar archive with any name (no sanitising, on purpose).
fn tar_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    let size = if kind == b'0' { data.len() } else { 0 };
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    if size > 0 {
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}
