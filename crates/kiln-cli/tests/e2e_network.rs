//! Sandbox networking through the `kiln` binary on real microVMs: `--net
//! default` gives the guest an address, a route and NAT; the policy given
//! with `--allow`/`--deny`/`--policy-default` is enforced on real traffic
//! to a server in a network namespace; `kiln policy set` changes it live;
//! `kiln policy get` counts; bad rules are refused with the old policy kept;
//! nothing (tap, BPF pins) outlives the sandbox. `--net none` has no device.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};

/// A "host" on the network: a namespace behind a veth with two TCP servers
/// (8080 says `allowed`, 9090 says `denied`). Removed on drop.
struct Outside {
    ns: String,
    host_if: String,
    addr: String,
    servers: Vec<Child>,
}

fn sh(args: &[&str]) {
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
    fn new() -> Outside {
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

fn ok(k: &Kiln, args: &[&str]) -> String {
    let out = k.run(args);
    assert_eq!(code(&out), 0, "kiln {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// What the guest gets from `nc ADDR PORT` (empty: nothing reached it).
fn reach(k: &Kiln, id: &str, addr: &str, port: u16) -> String {
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

fn taps() -> usize {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("kt")))
        .count()
}

#[test]
fn policies_are_enforced_on_real_traffic_and_changed_live() {
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    let taps_before = taps();

    tracing::info!("--net none: no network device");
    let links = ok(&k, &["run", "--rm", &bb, "--", "ls", "/sys/class/net"]);
    // Only the kernel's own pseudo-devices (lo, and sit0 from IPv6), no NIC.
    assert!(
        links.split_whitespace().all(|l| l == "lo" || l == "sit0"),
        "{links}"
    );

    tracing::info!("a policy given as flags, first match wins, on real TCP");
    let allow = format!("{addr}/32:tcp:8080");
    let got = ok(
        &k,
        &[
            "run",
            "--rm",
            "--net",
            "default",
            "--policy-default",
            "deny",
            "--allow",
            &allow,
            &bb,
            "--",
            "sh",
            "-c",
            &format!(
                "ip -4 addr show eth0 | grep -q 'inet 10.88.' && echo addressed; \
                 nc -w 3 {addr} 8080 </dev/null; nc -w 2 {addr} 9090 </dev/null; echo done"
            ),
        ],
    );
    assert_eq!(
        got.split_whitespace().collect::<Vec<_>>(),
        vec!["addressed", "allowed", "done"],
        "{got}"
    );

    tracing::info!("a live sandbox: allowed, then denied by kiln policy set, counted");
    let id = ok(
        &k,
        &[
            "run",
            "-d",
            "--net",
            "default",
            "--policy-default",
            "deny",
            "--allow",
            &allow,
            &bb,
            "--",
            "sleep",
            "600",
        ],
    )
    .trim()
    .to_string();
    assert_eq!(reach(&k, &id, &addr, 8080), "allowed");
    assert_eq!(reach(&k, &id, &addr, 9090), "");
    let t = Instant::now();
    ok(
        &k,
        &[
            "policy",
            "set",
            &id,
            "--policy-default",
            "deny",
            "--deny",
            &allow,
        ],
    );
    let set_ms = t.elapsed().as_millis();
    assert_eq!(
        reach(&k, &id, &addr, 8080),
        "",
        "still allowed after the change"
    );
    tracing::info!(set_ms, "policy changed");
    let get = ok(&k, &["policy", "get", &id]);
    let rule_line = get
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap_or_else(|| panic!("no rule 1: {get}"));
    assert!(rule_line.contains("deny"), "{get}");
    let dropped: u64 = rule_line
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 1, "the deny rule counted nothing: {get}");

    tracing::info!("a bad rule is refused and the policy in force stays");
    let bad = k.run(&["policy", "set", &id, "--allow", "10.0.0.0/33"]);
    assert_ne!(code(&bad), 0);
    assert!(stderr(&bad).contains("10.0.0.0/33"), "{}", stderr(&bad));
    assert_eq!(reach(&k, &id, &addr, 8080), "");
    ok(
        &k,
        &[
            "policy",
            "set",
            &id,
            "--policy-default",
            "deny",
            "--allow",
            &allow,
        ],
    );
    assert_eq!(reach(&k, &id, &addr, 8080), "allowed");

    tracing::info!("a bad rule at run: refused before anything exists");
    let before = ok(&k, &["ps", "-a", "-q"]);
    let bad = k.run(&[
        "run",
        "--net",
        "default",
        "--allow",
        "pypi.org:tcp:99999",
        &bb,
        "--",
        "true",
    ]);
    assert_eq!(code(&bad), 125, "{}", stderr(&bad));
    assert!(stderr(&bad).contains("99999"), "{}", stderr(&bad));
    assert_eq!(ok(&k, &["ps", "-a", "-q"]), before);
    let bad = k.run(&["run", "--allow", &allow, &bb, "--", "true"]);
    assert!(stderr(&bad).contains("--net default"), "{}", stderr(&bad));

    tracing::info!("snapshots of a networked sandbox are refused clearly, not half-done");
    let snap = k.run(&["snapshot", &id]);
    assert_ne!(code(&snap), 0);
    assert!(stderr(&snap).contains("network"), "{}", stderr(&snap));

    tracing::info!("removed: its tap and policy program are gone");
    ok(&k, &["rm", "-f", &id]);
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/kiln").join(&id).exists(),
        "BPF pins outlived the sandbox"
    );
    k.assert_clean();
    // The node's bridge and NAT table (made by the first `--net default`)
    // go too when no sandbox on this host uses them any more.
    if taps() == 0 {
        let _ = Command::new("ip").args(["link", "del", "kiln0"]).output();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "kiln"])
            .output();
    }
}
