//! The policy's reach on real microVMs through `kiln run --net default`,
//! counted on the receiving side: UDP and ICMP allowed vs denied (nftables
//! counters in the outside namespace); frames with a spoofed source IP or
//! MAC, hand-made by a static tool on an `AF_PACKET` socket in the guest,
//! never arrive while the genuine one does; one sandbox cannot reach
//! another until a rule allows it; the host's addresses and
//! 169.254.169.254 are closed by default and open only to a rule naming
//! them; an IPv6 frame to a peer on the bridge never arrives (the same
//! frame sent by the host does); bad rules, port ranges, domain patterns
//! and presets are refused by `kiln policy set` with the policy in force
//! unchanged.

mod common;
mod net_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};
use net_support::{Outside, guest_addr, ok, reach, sh, taps};

/// Builds the hostile network tool (static, so it runs in any image).
fn net_tool(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/net_tool.c");
    let out = dir.join("net_tool");
    let st = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs (build-essential)");
    assert!(st.success(), "cannot build {}", src.display());
    out
}

/// What the test adds to the host beyond [`Outside`]: a TCP listener on
/// the host, a route to a metadata address, a namespace on the bridge.
/// Removed on drop, whatever happened.
#[derive(Default)]
struct Extras {
    listener: Option<Child>,
    route: bool,
    v6_ns: Option<(String, String)>,
}

impl Drop for Extras {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.route {
            let _ = Command::new("ip")
                .args(["route", "del", "169.254.169.254/32"])
                .output();
        }
        if let Some((ns, host_if)) = self.v6_ns.take() {
            let _ = Command::new("ip").args(["link", "del", &host_if]).output();
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(args);
    sh(&a);
}

/// Loads an nftables script inside a namespace.
fn nft_in(ns: &str, script: &str, dir: &Path) {
    let f = dir.join(format!("{ns}.nft"));
    std::fs::write(&f, script).expect("write nft script");
    in_ns(ns, &["nft", "-f", f.to_str().expect("utf-8")]);
}

/// The packet count of the rule of `chain` (in namespace `ns`) whose text
/// contains `needle`.
fn counted(ns: &str, family_table_chain: &[&str], needle: &str) -> u64 {
    let mut a = vec!["netns", "exec", ns, "nft", "list", "chain"];
    a.extend_from_slice(family_table_chain);
    let out = Command::new("ip").args(&a).output().expect("nft");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(needle) && l.contains("counter"))
        .unwrap_or_else(|| panic!("no counter for {needle} in {text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "packets").expect("packets");
    words[i + 1].parse().expect("a count")
}

fn mac_of(dev: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))
        .expect("a MAC")
        .trim()
        .to_string()
}

/// Runs a shell command in the guest; its exit code and stdout.
fn guest(k: &Kiln, id: &str, script: &str) -> (i32, String) {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    (code(&out), stdout(&out))
}

/// The dropped-packets column of the `kiln policy get` row containing `what`.
fn policy_dropped(k: &Kiln, id: &str, what: &str) -> u64 {
    let get = ok(k, &["policy", "get", id]);
    get.lines()
        .find(|l| l.contains(what))
        .and_then(|l| l.split_whitespace().rev().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no row {what}: {get}"))
}

/// The rule lines of `kiln policy get` without their counters.
fn policy_rules(k: &Kiln, id: &str) -> Vec<String> {
    ok(k, &["policy", "get", id])
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let keep = if w.len() > 4 && w[w.len() - 4..].iter().all(|x| x.parse::<u64>().is_ok()) {
                w.len() - 4
            } else {
                w.len()
            };
            w[..keep].join(" ")
        })
        .filter(|l| !l.starts_with("admitted"))
        .collect()
}

/// Polls until `f` is true (counters in another namespace settle quickly
/// but not instantly) or 8 s have passed; whether it became true.
fn settle(mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(8) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn udp_icmp_spoofing_peers_host_metadata_ipv6_and_bad_input() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let tmp = tempfile::tempdir().expect("tmp");
    let tool = net_tool(tmp.path());
    let out = Outside::new();
    let addr = out.addr.clone();
    let n = std::process::id() % 200 + 20;
    let host_ip = format!("10.251.{n}.1");
    let taps_before = taps();
    let mut extras = Extras::default();

    tracing::info!("receiving side: counters in the outside namespace, a metadata address");
    nft_in(
        &out.ns,
        "table inet cnt {\n chain in {\n  type filter hook input priority 0; policy accept;\n  \
         udp dport 7070 counter\n  udp dport 7071 counter\n  udp dport 7072 counter\n  \
         icmp type echo-request counter\n }\n}\n",
        tmp.path(),
    );
    let cnt = |needle: &str| counted(&out.ns, &["inet", "cnt", "in"], needle);
    in_ns(
        &out.ns,
        &[
            "ip",
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            &format!("kvp{n}"),
        ],
    );
    sh(&["ip", "route", "add", "169.254.169.254/32", "via", &addr]);
    extras.route = true;
    extras.listener = Some(
        Command::new("busybox")
            .args(["nc", "-ll", "-p", "8181", "-e", "echo", "host"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox nc serves on the host"),
    );

    tracing::info!("sandbox B serves TCP 8080; sandbox A gets the hostile tool");
    let b = ok(
        &k,
        &[
            "run",
            "-d",
            "--net",
            "default",
            &bb,
            "--",
            "nc",
            "-ll",
            "-p",
            "8080",
            "-e",
            "echo",
            "sandbox-b",
        ],
    )
    .trim()
    .to_string();
    let (b_ip, _) = guest_addr(&k, &b);
    let b_ip = b_ip.split('/').next().expect("ip").to_string();
    let deny_udp = format!("{addr}/32:udp:7071");
    let a = ok(
        &k,
        &[
            "run",
            "-d",
            "--net",
            "default",
            "--policy",
            "none",
            "--policy-default",
            "allow",
            "--deny",
            &deny_udp,
            &bb,
            "--",
            "sleep",
            "900",
        ],
    )
    .trim()
    .to_string();
    let (a_cidr, a_mac) = guest_addr(&k, &a);
    let a_ip = a_cidr.split('/').next().expect("ip").to_string();
    let cp = k.run(&["cp", tool.to_str().expect("utf-8"), &format!("{a}:/")]);
    assert_eq!(code(&cp), 0, "cp net_tool: {}", stderr(&cp));
    let gw_mac = mac_of("kiln0");

    tracing::info!("default allow, UDP 7071 denied: UDP and ICMP counted where they arrive");
    assert_eq!(reach(&k, &a, &addr, 8080), "allowed", "the TCP control");
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7070"));
    assert_eq!(rc, 0);
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7071"));
    assert_eq!(
        rc, 0,
        "the guest's kernel sent it; the tap's program drops it"
    );
    assert!(
        settle(|| cnt("dport 7070") == 1),
        "allowed UDP did not arrive"
    );
    assert_eq!(cnt("dport 7071"), 0, "denied UDP arrived");
    let (rc, text) = guest(&k, &a, &format!("ping -c 1 -W 3 {addr}"));
    assert_eq!(rc, 0, "allowed ping: {text}");
    assert_eq!(cnt("echo-request"), 1);

    tracing::info!("hand-made frames: spoofed IP, spoofed MAC, then the genuine one");
    let spoof_ip = format!("/net_tool frame eth0 {a_mac} 10.88.250.250 {gw_mac} {addr} 7072");
    let spoof_mac = format!("/net_tool frame eth0 02:00:00:be:ef:01 {a_ip} {gw_mac} {addr} 7072");
    let genuine = format!("/net_tool frame eth0 {a_mac} {a_ip} {gw_mac} {addr} 7072");
    for (what, cmd) in [("spoofed IP", &spoof_ip), ("spoofed MAC", &spoof_mac)] {
        let (rc, _) = guest(&k, &a, cmd);
        assert_eq!(rc, 0, "{what}: the frame left the guest's socket");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cnt("dport 7072"), 0, "a spoofed frame arrived");
    assert!(policy_dropped(&k, &a, "spoofed-ip") >= 1);
    assert!(policy_dropped(&k, &a, "spoofed-mac") >= 1);
    let (rc, _) = guest(&k, &a, &genuine);
    assert_eq!(rc, 0);
    assert!(
        settle(|| cnt("dport 7072") == 1),
        "the genuine hand-made frame did not arrive (the path works?)"
    );

    tracing::info!("closed by default: other sandboxes, the host, metadata");
    assert_eq!(reach(&k, &a, &b_ip, 8080), "", "A reached sandbox B");
    assert_eq!(
        reach(&k, &a, "10.88.0.1", 8181),
        "",
        "A reached the gateway"
    );
    assert_eq!(
        reach(&k, &a, &host_ip, 8181),
        "",
        "A reached a host address"
    );
    assert_eq!(
        reach(&k, &a, "169.254.169.254", 8080),
        "",
        "A reached metadata"
    );
    assert!(policy_dropped(&k, &a, "protected") >= 4);

    tracing::info!("IPv6: a peer namespace on the bridge sees the host's frame, not the guest's");
    let (v6_ns, v6_h, v6_p) = (
        format!("kiln-e2e-v6{n}"),
        format!("kv6h{n}"),
        format!("kv6p{n}"),
    );
    sh(&["ip", "netns", "add", &v6_ns]);
    extras.v6_ns = Some((v6_ns.clone(), v6_h.clone()));
    sh(&[
        "ip", "link", "add", &v6_h, "type", "veth", "peer", "name", &v6_p,
    ]);
    sh(&["ip", "link", "set", &v6_p, "netns", &v6_ns]);
    sh(&["ip", "link", "set", &v6_h, "master", "kiln0", "up"]);
    in_ns(&v6_ns, &["ip", "link", "set", &v6_p, "up"]);
    let peer_mac = {
        let o = Command::new("ip")
            .args(["netns", "exec", &v6_ns, "cat"])
            .arg(format!("/sys/class/net/{v6_p}/address"))
            .output()
            .expect("cat");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    nft_in(
        &v6_ns,
        &format!(
            "table netdev cnt {{\n chain in {{\n  type filter hook ingress device \"{v6_p}\" \
             priority 0; policy accept;\n  ip6 daddr fd00:88::2 counter\n  \
             ether saddr {a_mac} arp operation request counter\n }}\n}}\n"
        ),
        tmp.path(),
    );
    let v6cnt = |needle: &str| counted(&v6_ns, &["netdev", "cnt", "in"], needle);
    // The control: the same frame from the host onto the bridge arrives.
    let host_tool = tmp.path().join("net_tool");
    sh(&[
        host_tool.to_str().expect("utf-8"),
        "frame6",
        "kiln0",
        &gw_mac,
        &peer_mac,
    ]);
    assert!(
        settle(|| v6cnt("fd00:88::2") == 1),
        "the host's IPv6 frame did not reach the peer"
    );
    // And the guest's ARP does (its layer 2 path to the peer works).
    let _ = guest(&k, &a, "arping -c 1 -w 1 -I eth0 10.88.255.250");
    assert!(settle(|| v6cnt("arp operation") >= 1), "the guest's ARP");
    let (rc, _) = guest(&k, &a, &format!("/net_tool frame6 eth0 {a_mac} {peer_mac}"));
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(v6cnt("fd00:88::2"), 1, "the guest's IPv6 frame arrived");
    assert!(policy_dropped(&k, &a, "ipv6") >= 1);

    tracing::info!("a live change: default deny, UDP 7071, the host, metadata and B allowed");
    let allow_b = format!("{b_ip}/32:tcp:8080");
    ok(
        &k,
        &[
            "policy",
            "set",
            &a,
            "--policy",
            "none",
            "--policy-default",
            "deny",
            "--allow",
            &format!("{addr}/32:udp:7071"),
            "--allow",
            "10.88.0.1/32:tcp:8181",
            "--allow",
            "169.254.169.254/32:tcp:8080",
            "--allow",
            &allow_b,
        ],
    );
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7070"));
    assert_eq!(rc, 0);
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7071"));
    assert_eq!(rc, 0);
    if !settle(|| cnt("dport 7071") == 1) {
        panic!(
            "allowed UDP 7071 did not arrive; policy: {}\nevents: {}\nguest: {:?}",
            ok(&k, &["policy", "get", &a]),
            ok(&k, &["events", &a]),
            guest(&k, &a, "ip neigh; ip route; cat /proc/net/snmp | grep Udp")
        );
    }
    assert_eq!(cnt("dport 7070"), 1, "UDP 7070 arrived under default deny");
    let (rc, _) = guest(&k, &a, &format!("ping -c 1 -W 2 {addr}"));
    assert_ne!(rc, 0, "ping passed under default deny");
    assert_eq!(cnt("echo-request"), 1, "ICMP arrived under default deny");
    assert_eq!(reach(&k, &a, &b_ip, 8080), "sandbox-b", "a rule opens B");
    assert_eq!(
        reach(&k, &a, "10.88.0.1", 8181),
        "host",
        "a rule opens the gateway"
    );
    assert_eq!(
        reach(&k, &a, "169.254.169.254", 8080),
        "allowed",
        "a rule opens metadata"
    );
    assert_eq!(reach(&k, &a, &host_ip, 8181), "", "no rule names this one");

    tracing::info!("bad input: refused, clearly, and the policy in force stays");
    let rules = policy_rules(&k, &a);
    for (args, needle) in [
        (vec!["--allow", "10.0.0.0/33"], "10.0.0.0/33"),
        (vec!["--allow", "300.1.2.3"], "300.1.2.3"),
        (vec!["--allow", "10.0.0.1:tcp:90-80"], "90-80"),
        (vec!["--allow", "10.0.0.1:icmp:80"], "icmp"),
        (vec!["--deny", "*x.example.com"], "*x.example.com"),
        (vec!["--allow", "exa_mple..com:tcp:443"], "exa_mple..com"),
        (vec!["--policy", "everything"], "everything"),
        (vec!["--policy-default", "maybe"], "maybe"),
    ] {
        let mut full = vec!["policy", "set", a.as_str()];
        full.extend_from_slice(&args);
        let o = k.run(&full);
        assert_ne!(code(&o), 0, "{args:?} was accepted");
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: unclear error: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(policy_rules(&k, &a), rules, "{args:?} changed the policy");
    }
    assert_eq!(reach(&k, &a, &b_ip, 8080), "sandbox-b", "still in force");
    assert_eq!(reach(&k, &a, &addr, 8080), "", "still in force");

    tracing::info!("drop events: what was dropped, and by what");
    let ev = ok(&k, &["events", &a]);
    let has = |ev: &str, proto: &str, dest: &str, port: &str, by: &str| {
        ev.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 5 && w[1] == proto && w[2] == dest && w[3] == port && l.contains(by)
        })
    };
    let first_rule = format!("rule 1 (deny {addr}/32:udp:7071)");
    for (proto, dest, port, by) in [
        ("udp", addr.as_str(), "7071", first_rule.as_str()),
        ("tcp", b_ip.as_str(), "8080", "protected destination"),
        ("tcp", "10.88.0.1", "8181", "protected destination"),
        ("tcp", "169.254.169.254", "8080", "protected destination"),
        ("udp", addr.as_str(), "7070", "default deny"),
        ("icmp", addr.as_str(), "-", "default deny"),
        ("tcp", host_ip.as_str(), "8181", "protected destination"),
        ("tcp", addr.as_str(), "8080", "default deny"),
    ] {
        assert!(
            has(&ev, proto, dest, port, by),
            "no event {proto} {dest} {port} {by}: {ev}"
        );
    }
    assert!(
        !has(&ev, "tcp", &b_ip, "8080", "default"),
        "an allowed flow: {ev}"
    );
    tracing::info!("a flood of denied datagrams: rate-limited, the rest counted");
    let shown = |ev: &str| ev.lines().filter(|l| l.contains(" 7099 ")).count();
    let before = shown(&ev);
    assert_eq!(before, 0);
    let t = Instant::now();
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7099 2000"));
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(1100));
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7099"));
    assert_eq!(rc, 0);
    let secs = t.elapsed().as_secs() + 1;
    let ev = ok(&k, &["events", &a]);
    let n = shown(&ev);
    let suppressed: u64 = ev
        .lines()
        .filter(|l| l.contains(" 7099 "))
        .filter_map(|l| {
            let (_, rest) = l.split_once("(+")?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    tracing::info!(n, suppressed, secs, "flood events");
    assert!(n >= 2 && n as u64 <= 20 * secs, "{n} events in {secs} s");
    assert!(
        n as u64 + suppressed >= 1990 && n as u64 + suppressed <= 2001,
        "shown {n} + suppressed {suppressed}"
    );

    tracing::info!("the supervisor drains the ring on its own: no `kiln events` needed");
    let (rc, _) = guest(&k, &a, &format!("/net_tool udp {addr} 7098"));
    assert_eq!(rc, 0);
    let file = k
        .state_dir()
        .join("net")
        .join("events")
        .join(format!("{a}.jsonl"));
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains("\"port\":7098") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the denied datagram to 7098 never reached {}: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    tracing::info!("removed: no tap, pin or process left");
    drop(extras);
    ok(&k, &["rm", "-f", &a, &b]);
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    for id in [&a, &b] {
        assert!(
            !Path::new("/sys/fs/bpf/kiln").join(id).exists(),
            "BPF pins outlived {id}"
        );
    }
    k.assert_clean();
    drop(out);
    net_support::drop_node_network();
}

/// Node-level protected ranges (`KILN_PROTECTED_CIDRS`, and the file
/// `kiln node` writes from `--protected-cidr` and its servers): a
/// default-allow policy and a broad rule do not reach them; a rule inside
/// one does; a bad list is refused before anything exists.
#[test]
fn protected_infrastructure_ranges_need_a_narrow_rule() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    let n = std::process::id() % 200 + 20;
    let range = format!("10.251.{n}.0/24");
    let taps_before = taps();
    let with_env = |args: &[&str], env: Option<&str>| {
        let mut c = k.cmd();
        c.args(args);
        match env {
            Some(v) => c.env("KILN_PROTECTED_CIDRS", v),
            None => c.env_remove("KILN_PROTECTED_CIDRS"),
        };
        c.stdin(Stdio::null()).output().expect("kiln runs")
    };

    tracing::info!("a bad list is refused before anything exists");
    let before = ok(&k, &["ps", "-a", "-q"]);
    let bad = with_env(
        &["run", "--rm", "--net", "default", &bb, "--", "true"],
        Some("10.251.0.0/33"),
    );
    assert_ne!(code(&bad), 0);
    let err = stderr(&bad);
    assert!(
        err.contains("10.251.0.0/33") && err.contains("KILN_PROTECTED_CIDRS"),
        "{err}"
    );
    assert_eq!(ok(&k, &["ps", "-a", "-q"]), before);

    tracing::info!("default allow does not reach a protected range");
    let o = with_env(
        &[
            "run",
            "-d",
            "--net",
            "default",
            "--policy",
            "none",
            "--policy-default",
            "allow",
            &bb,
            "--",
            "sleep",
            "600",
        ],
        Some(&range),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    assert_eq!(reach(&k, &id, &addr, 8080), "", "default allow reached it");
    let set = |rules: &[&str], env: Option<&str>| {
        // `--policy none`: without it the base is internet-only, which
        // denies private ranges by itself.
        let mut a = vec!["policy", "set", id.as_str(), "--policy", "none"];
        a.extend_from_slice(rules);
        let o = with_env(&a, env);
        assert_eq!(code(&o), 0, "policy set {rules:?}: {}", stderr(&o));
    };
    set(
        &["--policy-default", "allow", "--allow", "0.0.0.0/0:tcp"],
        Some(&range),
    );
    assert_eq!(reach(&k, &id, &addr, 8080), "", "a broad rule reached it");
    let narrow = format!("{addr}/32:tcp:8080");
    set(
        &["--policy-default", "allow", "--allow", &narrow],
        Some(&range),
    );
    assert_eq!(
        reach(&k, &id, &addr, 8080),
        "allowed",
        "a narrow rule opens it"
    );
    assert_eq!(reach(&k, &id, &addr, 9090), "", "only what the rule names");
    // Counters are per policy generation: this one saw the 9090 attempt.
    assert!(policy_dropped(&k, &id, "protected") >= 1);

    tracing::info!("the node's file protects too; without any, the path is open");
    let file = k.state_dir().join("net").join("protected-cidrs");
    std::fs::write(&file, format!("# test\n{range}\n")).expect("write");
    set(&["--policy-default", "allow"], None);
    assert_eq!(
        reach(&k, &id, &addr, 8080),
        "",
        "the file's range was reached"
    );
    std::fs::remove_file(&file).expect("rm");
    set(&["--policy-default", "allow"], None);
    assert_eq!(reach(&k, &id, &addr, 8080), "allowed", "the control");

    ok(&k, &["rm", "-f", &id]);
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    k.assert_clean();
    drop(out);
    net_support::drop_node_network();
}
