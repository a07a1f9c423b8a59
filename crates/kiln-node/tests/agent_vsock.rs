//! End to end over vsock on a real microVM: QEMU microvm (TCG here) with a
//! `vhost-user-vsock-device` served by `vhost-device-vsock`, the Kiln kernel
//! and kiln-init listening on AF_VSOCK (`kiln.channel=vsock`); the host side
//! is kiln_vmm's QEMU driver (`connect_agent`: the hybrid `CONNECT`/`OK`
//! handshake with its deadline, the same code as Firecracker's) and
//! `kiln_node::agent`. One linear story (a boot is expensive under TCG):
//! handshake and agent session, data both ways, the host end reconnecting
//! (with and without closing the old connection), a port nobody listens
//! on, a guest that never answers (paused), the capability table refusing
//! snapshots and restores, and nothing left behind.
//!
//! Needs: `qemu-system-x86_64` 10, qboot, `vhost-device-vsock`
//! (scripts/setup-host.sh), the kernel from `scripts/build-kernel.sh`,
//! Debian's busybox-static at `/bin/busybox`, `tar`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_api::proto::ExecRequest;
use kiln_node::agent::{AgentClient, ExecError};
use kiln_vmm::conformance::{VmmReaper, leftovers, processes_mentioning};
use kiln_vmm::qemu::QemuDriver;
use kiln_vmm::{
    Accel, AgentTransport, ConnectAgentError, RestoreVmError, SnapshotVmError, Vm, VmSpec,
    VmmDriver,
};

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

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin:/tmp".into()],
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

/// Prints the guest console if the story panics.
struct ConsoleOnPanic(PathBuf);

impl Drop for ConsoleOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let console = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("---- guest console ----\n{console}\n-----------------------");
        }
    }
}

/// `connect_agent()` then the agent's Hello, retried while the guest boots.
/// Every failed attempt must be a handshake refusal or its deadline, and
/// end within the deadline.
async fn session(vm: &dyn Vm, within: Duration) -> (AgentClient, u32) {
    let deadline = Instant::now() + within;
    let mut refused = 0;
    loop {
        let attempt = Instant::now();
        match vm.connect_agent().await {
            Ok(stream) => {
                let (client, _) = AgentClient::connect(stream, Duration::from_secs(60))
                    .await
                    .expect("agent Hello over vsock");
                return (client, refused);
            }
            Err(
                e @ (ConnectAgentError::Handshake { .. }
                | ConnectAgentError::HandshakeTimeout { .. }),
            ) => {
                assert!(
                    attempt.elapsed() < kiln_vmm::vsock::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
                    "an attempt took {:?}: {e}",
                    attempt.elapsed()
                );
                refused += 1;
                if refused <= 3 || refused % 20 == 0 {
                    eprintln!(
                        "  attempt {refused} refused after {:?}: {e}",
                        attempt.elapsed()
                    );
                }
            }
            Err(e) => panic!("connect_agent: unexpected error {e:#}"),
        }
        assert!(
            Instant::now() < deadline,
            "no agent over vsock within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn echo(client: &AgentClient, text: &str) {
    let p = client
        .exec(req(&["/tmp/busybox", "echo", text]))
        .await
        .expect("exec");
    let (out, _, status) = p.wait_with_output().await.expect("output");
    assert_eq!(status.code, Some(0));
    assert_eq!(String::from_utf8_lossy(&out), format!("{text}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_over_vsock_on_qemu() {
    tokio::time::timeout(Duration::from_secs(600), story())
        .await
        .expect("the story finishes within 10 min");
}

async fn story() {
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    let kernel = home.join(".cache/kiln/kernel/current/bzImage");
    assert!(
        kernel.is_file(),
        "{} missing: run scripts/build-kernel.sh",
        kernel.display()
    );
    let initramfs = PathBuf::from(
        sh(&mut Command::new(
            repo_root().join("scripts/build-initramfs.sh"),
        ))
        .trim(),
    )
    .join("initramfs.img");
    let backend = kiln_vmm::find_vhost_vsock()
        .expect("vhost-device-vsock is installed (scripts/setup-host.sh)");
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = VmmReaper::new(tmp.path());
    let driver = QemuDriver::detect(Accel::Tcg)
        .expect("QEMU 10")
        .with_vsock_backend(backend)
        .with_agent_transport(AgentTransport::HybridVsock)
        .expect("vsock transport");
    let dir = tmp.path().join("vm");
    let spec = VmSpec {
        id: "vsock-e2e".into(),
        console_log: dir.join("console.log"),
        network: None,
        dir: dir.clone(),
        kernel,
        initrd: Some(initramfs),
        cmdline: "quiet kiln.channel=vsock".into(),
        cpus: 1,
        memory_mib: 256,
        disks: vec![],
        agent_channel: true,
    };
    let _console = ConsoleOnPanic(spec.console_log.clone());

    eprintln!("phase boot");
    let started = Instant::now();
    let vm = driver.start(&spec).await.expect("start with vsock");
    assert_eq!(
        vm.record().helpers.len(),
        1,
        "the vsock backend is recorded"
    );
    let (client, refused) = session(vm.as_ref(), Duration::from_secs(120)).await;
    eprintln!(
        "phase boot: agent session over vsock {:.0} ms after start ({refused} refused attempts while booting)",
        started.elapsed().as_secs_f64() * 1000.0
    );
    client.ping().await.expect("ping");

    eprintln!("phase exec: requests, and a binary copied in");
    let e = client
        .exec(req(&["sh", "-c", "true"]))
        .await
        .err()
        .expect("no shell in the initramfs");
    assert!(matches!(e, ExecError::NotFound(_)), "{e:?}");
    let staging = tmp.path().join("bb");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy("/bin/busybox", staging.join("busybox")).expect("/bin/busybox");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&staging)
        .args(["-cf", "bb.tar", "busybox"])
        .current_dir(tmp.path()));
    let tar = std::fs::read(tmp.path().join("bb.tar")).unwrap();
    let copied = Instant::now();
    client.copy_in("/tmp", &tar[..]).await.expect("copy_in");
    eprintln!(
        "phase exec: {} KiB copied in over vsock in {:.0} ms",
        tar.len() / 1024,
        copied.elapsed().as_secs_f64() * 1000.0
    );
    echo(&client, "over-vsock").await;

    eprintln!("phase reconnect: the host end closes and connects again");
    drop(client);
    let (client, _) = session(vm.as_ref(), Duration::from_secs(30)).await;
    echo(&client, "second-connection").await;
    eprintln!("phase reconnect: a new connection while the old one is open replaces it");
    let (newer, _) = session(vm.as_ref(), Duration::from_secs(30)).await;
    echo(&newer, "third-connection").await;
    assert!(
        tokio::time::timeout(Duration::from_secs(10), client.ping())
            .await
            .expect("the old session answers or fails, it does not hang")
            .is_err(),
        "the replaced connection still works"
    );
    drop(client);

    eprintln!("phase no listener: a port nothing listens on is refused at once");
    let socket = vm.record().agent_socket.expect("agent socket");
    let t = Instant::now();
    let err = kiln_vmm::vsock::connect(&socket, 4242, Duration::from_secs(5))
        .await
        .expect_err("nothing listens on 4242");
    assert!(
        matches!(err, ConnectAgentError::Handshake { .. }),
        "{err:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("phase no listener: refused after {:?}: {err}", t.elapsed());

    eprintln!("phase pause: a pause and a resume keep the channel working");
    vm.pause().await.expect("pause");
    tokio::time::sleep(Duration::from_secs(1)).await;
    vm.resume().await.expect("resume");
    let (after_pause, _) = session(vm.as_ref(), Duration::from_secs(30)).await;
    echo(&after_pause, "after-pause").await;
    drop(after_pause);

    eprintln!("phase capabilities: no snapshots or restores with the agent over vsock");
    let caps = vm.capabilities();
    assert_eq!(caps.agent_transport, AgentTransport::HybridVsock);
    match vm.snapshot(&tmp.path().join("snap")).await {
        Err(SnapshotVmError::Unsupported(e)) => assert_eq!(
            e.to_string(),
            "driver qemu (agent channel over vsock) cannot do Full snapshots"
        ),
        other => panic!("snapshot of a vsock QEMU VM: {other:?}"),
    }
    assert!(!tmp.path().join("snap").exists());
    let mut other = spec.clone();
    other.dir = tmp.path().join("restored");
    other.console_log = other.dir.join("console.log");
    match driver.restore(&tmp.path().join("snap"), &other).await {
        Err(RestoreVmError::Unsupported(e)) => {
            assert!(e.to_string().contains("cannot do restore"), "{e}")
        }
        Err(e) => panic!("restore: wrong error {e:#}"),
        Ok(_) => panic!("restore of a vsock QEMU VM succeeded"),
    }
    assert_eq!(
        vm.status().await.expect("status"),
        kiln_vmm::VmStatus::Running,
        "the refused snapshot left the VM running"
    );
    drop(newer);

    eprintln!("phase silent guest: a paused guest never answers; the deadline ends the wait");
    vm.pause().await.expect("pause");
    // The driver refuses at once (it would wedge the backend, below)...
    let t = Instant::now();
    let err = vm.connect_agent().await.expect_err("paused");
    assert!(matches!(err, ConnectAgentError::Paused), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    // ...and the raw protocol hits its deadline.
    let t = Instant::now();
    let err = kiln_vmm::vsock::connect(&socket, 1024, kiln_vmm::vsock::HANDSHAKE_TIMEOUT)
        .await
        .expect_err("a paused guest cannot accept");
    assert!(
        matches!(err, ConnectAgentError::HandshakeTimeout { port: 1024, .. }),
        "{err:?}"
    );
    assert!(
        t.elapsed() < kiln_vmm::vsock::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("phase silent guest: {err}");
    vm.resume().await.expect("resume");
    // Known: vhost-device-vsock 0.3.0 serves no new connection after one
    // was abandoned while the guest was paused (see docs/vmm-drivers.md),
    // so this phase comes last and the VM is stopped from the host.
    let stderr = std::fs::read_to_string(dir.join("vhost-vsock.stderr")).unwrap_or_default();
    eprintln!("phase silent guest: backend stderr: {stderr:?}");

    eprintln!("phase stop: QEMU and the backend are gone, nothing is left");
    stop_and_check(vm, &dir).await;
}

/// Stops the VM from the host (the agent may be unreachable), and checks
/// that QEMU and its vsock backend are gone and nothing is left.
async fn stop_and_check(vm: Box<dyn Vm>, dir: &Path) {
    vm.stop(Duration::from_millis(200)).await.expect("stop");
    assert_eq!(
        vm.status().await.expect("status"),
        kiln_vmm::VmStatus::Exited
    );
    vm.cleanup().await.expect("cleanup");
    assert!(leftovers(dir).is_empty(), "left: {:?}", leftovers(dir));
    assert!(
        processes_mentioning(&dir.display().to_string()).is_empty(),
        "a process of the VM (QEMU or vhost-device-vsock) outlived it"
    );
}
