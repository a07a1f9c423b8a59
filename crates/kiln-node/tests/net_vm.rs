//! A real microVM on the network: QEMU/TCG with a virtio-net device on a tap
//! made by `kiln-net`, the guest configured over the agent protocol
//! (`Configure.network`, applied by kiln-init), the policy program on the tap.
//! The guest reaches a TCP server its policy allows and not one it denies.
//! Needs root, QEMU 10, the guest kernel (scripts/build-kernel.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_api::proto::{Configure, ExecRequest, GuestNetwork};
use kiln_net::{Action, Endpoint, NetConfig, Network, Policy, Rule};
use kiln_node::agent::AgentClient;

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

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

/// Everything the test creates, removed on drop (also on panic).
struct Guard {
    /// The VM's runtime directory: its VMM is killed on drop.
    vm_dir: Option<PathBuf>,
    dir: PathBuf,
    net: Option<Network>,
    ns: String,
    host_end: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(vm_dir) = self.vm_dir.take() {
            for pid in kiln_vmm::conformance::processes_mentioning(&vm_dir.display().to_string()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if std::thread::panicking() {
            let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
            eprintln!("---- guest console ----\n{console}\n-----------------------");
        }
        if let Some(net) = self.net.take() {
            let _ = net.reconcile(&BTreeSet::new());
            let _ = net.teardown();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "run", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("Debian busybox-static at /bin/busybox");
    for applet in ["sh", "nc", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let img = dir.join("root.ext4");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("32M"));
    img
}

/// A TCP server inside a namespace that greets every client.
fn serve_in_netns(ns: &str, addr: SocketAddr, greeting: &'static [u8]) {
    let path = format!("/run/netns/{ns}");
    let l = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpListener::bind(addr).unwrap()
    })
    .join()
    .unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let _ = c.write_all(greeting);
        }
    });
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

async fn run(c: &AgentClient, argv: &[&str]) -> (String, i32) {
    let p = c.exec(req(argv)).await.expect("exec");
    let (o, _e, s) = p.wait_with_output().await.expect("output");
    (String::from_utf8_lossy(&o).into_owned(), s.shell_code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reaches_only_what_its_policy_allows() {
    tokio::time::timeout(Duration::from_secs(300), story())
        .await
        .expect("test timed out");
}

async fn story() {
    let kernel = PathBuf::from(std::env::var_os("HOME").expect("HOME"))
        .join(".cache/kiln/kernel/current/bzImage");
    assert!(
        kernel.exists(),
        "kernel missing: run scripts/build-kernel.sh"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let initramfs_dir = sh(&mut Command::new(repo.join("scripts/build-initramfs.sh")));
    let initramfs = PathBuf::from(initramfs_dir.trim()).join("initramfs.img");

    let n = std::process::id() % 10000;
    let dir = std::env::temp_dir().join(format!("kiln-net-vm-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = Guard {
        vm_dir: None,
        dir: dir.clone(),
        net: None,
        ns: format!("knvm{n}"),
        host_end: format!("kvo{n}"),
    };

    eprintln!("phase network");
    let mut cfg = NetConfig::new(&dir.join("net"));
    cfg.bridge = format!("kbvm{n}");
    cfg.subnet = format!("10.199.{}.0/24", n % 250).parse().unwrap();
    let net = Network::open(cfg).expect("network");
    // The outside host: a namespace behind a routed veth.
    let host_ip = Ipv4Addr::new(172, 29, (n % 250) as u8, 1);
    let out = Ipv4Addr::new(172, 29, (n % 250) as u8, 2);
    ip(&["netns", "add", &g.ns]);
    let peer = format!("{}p", g.host_end);
    ip(&[
        "link",
        "add",
        &g.host_end,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ]);
    ip(&["link", "set", &peer, "netns", &g.ns]);
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &g.host_end]);
    ip(&["link", "set", &g.host_end, "up"]);
    ip(&[
        "-n",
        &g.ns,
        "addr",
        "add",
        &format!("{out}/24"),
        "dev",
        &peer,
    ]);
    ip(&["-n", &g.ns, "link", "set", &peer, "up"]);
    ip(&[
        "-n",
        &g.ns,
        "route",
        "add",
        "default",
        "via",
        &host_ip.to_string(),
    ]);
    serve_in_netns(&g.ns, SocketAddr::from((out, 8080)), b"allowed\n");
    serve_in_netns(&g.ns, SocketAddr::from((out, 9090)), b"denied\n");

    let id = format!("vm{n}");
    let policy = Policy {
        default: Action::Deny,
        egress: vec![Rule::parse(Action::Allow, &format!("{out}:tcp:8080")).unwrap()],
        ingress: vec![],
    };
    let att = net.attach(&id, Endpoint::Tap, &policy).expect("attach");
    g.net = Some(net);
    let dev = kiln_vmm::NetDevice {
        tap: att.ifname.clone(),
        mac: kiln_net::format_mac(&att.mac),
    };
    assert!(dev.is_valid());

    eprintln!("phase boot");
    let root = build_rootfs(&dir);
    let rw = dir.join("rw.ext4");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&rw));
    // The QEMU driver, with the tap as `VmSpec::network`.
    let driver = kiln_vmm::qemu::QemuDriver::detect(kiln_vmm::Accel::Tcg).expect("QEMU 10");
    let vm_spec = kiln_vmm::VmSpec {
        id: id.clone(),
        dir: dir.join("vm"),
        kernel: kernel.clone(),
        initrd: Some(initramfs.clone()),
        cmdline: "quiet kiln.root=/dev/vda kiln.rw=/dev/vdb kiln.channel=serial".into(),
        cpus: 1,
        memory_mib: 256,
        disks: vec![
            kiln_vmm::DiskSpec {
                path: root.clone(),
                read_only: true,
            },
            kiln_vmm::DiskSpec {
                path: rw.clone(),
                read_only: false,
            },
        ],
        agent_channel: true,
        console_log: dir.join("console.log"),
        network: Some(dev.clone()),
    };
    use kiln_vmm::VmmDriver;
    g.vm_dir = Some(vm_spec.dir.clone());
    let vm = driver
        .start(&vm_spec)
        .await
        .expect("the QEMU driver starts the VM");
    let stream = vm.connect_agent().await.expect("agent channel");
    let (client, _) = AgentClient::connect(stream, Duration::from_secs(60))
        .await
        .expect("agent handshake");

    eprintln!("phase configure");
    client
        .configure(Configure {
            sandbox_id: id.clone(),
            hostname: id.clone(),
            entropy: String::new(),
            time_unix_ns: 0,
            network: Some(GuestNetwork {
                mac: dev.mac.clone(),
                address: att.ip,
                prefix_len: att.prefix_len,
                gateway: att.gateway,
                dns: vec![],
            }),
        })
        .await
        .expect("configure with network");
    let (addrs, _) = run(&client, &["ip", "addr", "show", "eth0"]).await;
    assert!(
        addrs.contains(&format!("inet {}/{}", att.ip, att.prefix_len)),
        "{addrs}"
    );
    assert!(addrs.contains(&dev.mac), "{addrs}");

    eprintln!("phase traffic");
    let allowed = format!("nc -w 3 {out} 8080 </dev/null");
    let (o, code) = run(&client, &["sh", "-c", &allowed]).await;
    assert_eq!((o.as_str(), code), ("allowed\n", 0), "the allowed server");
    let denied = format!("nc -w 2 {out} 9090 </dev/null");
    let (o, code) = run(&client, &["sh", "-c", &denied]).await;
    assert!(
        o.is_empty() && code != 0,
        "the denied server answered: {o:?} {code}"
    );
    let (_, c) = g.net.as_ref().unwrap().policy(&id).expect("counters");
    eprintln!("counters: rule {:?} default {:?}", c.rules[0], c.default);
    assert!(c.rules[0].allowed_packets >= 3, "{:?}", c.rules[0]);
    assert!(c.default.dropped_packets >= 1, "{:?}", c.default);
    let spoofed = c.drops.iter().map(|(_, c)| c.dropped_packets).sum::<u64>();
    eprintln!("pre-policy drops: {spoofed} ({:?})", c.drops);
    let _ = vm.kill().await;
    let _ = vm.cleanup().await;
}
