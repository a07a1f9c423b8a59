//! Scaffolding of the network e2e tests: a routed namespace with TCP
//! servers standing for a host outside the node, and small helpers.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Kiln, code, stderr, stdout};

/// A "host" on the network: a namespace behind a veth with two TCP servers
/// (8080 says `allowed`, 9090 says `denied`). Removed on drop.
pub struct Outside {
    pub ns: String,
    pub host_if: String,
    pub addr: String,
    pub servers: Vec<Child>,
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Outside {
    pub fn new() -> Outside {
        let n = std::process::id() % 200 + 20;
        let ns = format!("kiln-e2e-out{n}");
        let host_if = format!("kvh{n}");
        let peer = format!("kvp{n}");
        let (host_ip, addr) = (format!("10.251.{n}.1"), format!("10.251.{n}.2"));
        let mut o = Outside {
            ns: ns.clone(),
            host_if: host_if.clone(),
            addr: addr.clone(),
            servers: vec![],
        };
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &ns];
            a.extend_from_slice(args);
            sh(&a);
        };
        in_ns(&["ip", "addr", "add", &format!("{addr}/30"), "dev", &peer]);
        in_ns(&["ip", "link", "set", &peer, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        for (port, says) in [("8080", "allowed"), ("9090", "denied")] {
            o.servers.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "busybox", "nc", "-ll", "-p", port])
                    .args(["-e", "echo", says])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("busybox nc serves"),
            );
        }
        // Both answer from the host before any sandbox exists.
        for (port, says) in [("8080", "allowed"), ("9090", "denied")] {
            let t0 = Instant::now();
            loop {
                let out = Command::new("busybox")
                    .args(["nc", "-w", "2", &addr, port])
                    .stdin(Stdio::null())
                    .output()
                    .expect("nc");
                if String::from_utf8_lossy(&out.stdout).trim() == says {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "server {port} down");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

pub fn ok(k: &Kiln, args: &[&str]) -> String {
    let out = k.run(args);
    assert_eq!(code(&out), 0, "kiln {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// What the guest gets from `nc ADDR PORT` (empty: nothing reached it).
pub fn reach(k: &Kiln, id: &str, addr: &str, port: u16) -> String {
    let out = k.run(&[
        "exec",
        id,
        "--",
        "sh",
        "-c",
        &format!("nc -w 2 {addr} {port} </dev/null"),
    ]);
    stdout(&out).trim().to_string()
}

pub fn taps() -> usize {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("kt")))
        .count()
}

/// The guest's view of its network: (IPv4 address with prefix, MAC) of eth0.
pub fn guest_addr(k: &Kiln, id: &str) -> (String, String) {
    let out = k.run(&[
        "exec",
        id,
        "--",
        "sh",
        "-c",
        "ip -4 -o addr show eth0 | awk '{print $4}'; cat /sys/class/net/eth0/address",
    ]);
    assert_eq!(code(&out), 0, "exec in {id}: {}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines().map(str::trim);
    let ip = lines.next().unwrap_or_default().to_string();
    let mac = lines.next().unwrap_or_default().to_string();
    assert!(ip.starts_with("10.88."), "{id}: no address on eth0: {text}");
    (ip, mac)
}

/// Removes the node's bridge and NAT table when no sandbox on this host
/// uses them any more (the first `--net default` made them).
pub fn drop_node_network() {
    if taps() == 0 {
        let _ = Command::new("ip").args(["link", "del", "kiln0"]).output();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "kiln"])
            .output();
    }
}

/// Serializes the networked tests on this host: within one test binary
/// (a mutex) and across test processes and checkouts (an `flock` on
/// `/run/lock/kiln-e2e-net.lock`). They share the host's bridge, nftables
/// table and namespace names, and each one's `kiln ps` reconciles the host
/// network from its own state directory (which removes taps of sandboxes
/// another state directory leased: a known limit of one network per host,
/// see docs/networking.md).
#[allow(dead_code)]
pub struct Exclusive {
    _thread: std::sync::MutexGuard<'static, ()>,
    _host: std::fs::File,
}

#[allow(dead_code)]
pub fn exclusive() -> Exclusive {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let thread = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _ = std::fs::create_dir_all("/run/lock");
    let host = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/kiln-e2e-net.lock")
        .expect("open /run/lock/kiln-e2e-net.lock");
    host.lock().expect("flock /run/lock/kiln-e2e-net.lock");
    Exclusive {
        _thread: thread,
        _host: host,
    }
}
