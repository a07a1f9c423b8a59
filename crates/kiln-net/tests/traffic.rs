//! The policy program enforcing real traffic. Sandboxes are network
//! namespaces behind veth pairs on a real bridge (the host end takes the
//! tap's place: it sees the guest's frames on its ingress hook, exactly as a
//! tap does), outside hosts are namespaces behind routed veths, and the real
//! BPF program, nftables NAT and IPAM are in the path. Needs root.
//!
//! The tests share global counts (loaded programs, pins), so they hold one
//! lock and run one at a time.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use kiln_net::{Action, Attachment, Endpoint, NetConfig, Network, Policy, Rule};

static SERIAL: Mutex<()> = Mutex::new(());
const T: Duration = Duration::from_millis(400);

fn rule(a: Action, s: &str) -> Rule {
    Rule::parse(a, s).expect("test rule parses")
}

fn policy(default: Action, rules: &[(Action, &str)]) -> Policy {
    Policy {
        default,
        egress: rules.iter().map(|(a, s)| rule(*a, s)).collect(),
        ingress: Vec::new(),
    }
}

/// Bridge + outside host; sandboxes added with `sandbox()`. Drop order:
/// sandboxes' namespaces and links, then the network (reconcile to nothing,
/// teardown), then the outside host.
struct Topo {
    sandboxes: Vec<(Netns, HostLink, Attachment)>,
    net: Option<Network>,
    _state: tempfile::TempDir,
    suffix: String,
    outside: Netns,
    _outside_link: HostLink,
    /// The outside server's address.
    out: Ipv4Addr,
    /// The host's address on the outside link.
    host_out: Ipv4Addr,
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.sandboxes.clear();
        if let Some(net) = self.net.take() {
            let _ = net.reconcile(&BTreeSet::new());
            let _ = net.teardown();
        }
    }
}

impl Topo {
    fn new() -> Result<Topo> {
        let (suffix, n) = unique();
        let pid = std::process::id() % 250;
        let state = tempfile::tempdir()?;
        let mut cfg = NetConfig::new(state.path());
        cfg.bridge = format!("kb{suffix}");
        cfg.subnet = format!("10.{}.{pid}.0/24", 200 + n).parse()?;
        cfg.tap_prefix = "kv".into();
        let outside = Netns::new(&format!("kno{suffix}"))?;
        let host_end = format!("ko{suffix}");
        let outside_link = veth_into(&outside, &host_end)?;
        let host_out = Ipv4Addr::new(172, 20 + n as u8, pid as u8, 1);
        let out = Ipv4Addr::new(172, 20 + n as u8, pid as u8, 2);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_out}/24"),
            "dev",
            &host_end,
        ])?;
        run(&["ip", "link", "set", &host_end, "up"])?;
        outside.exec(&["ip", "addr", "add", &format!("{out}/24"), "dev", "eth0"])?;
        outside.exec(&["ip", "link", "set", "eth0", "up"])?;
        outside.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &host_out.to_string(),
        ])?;
        let net = Network::open(cfg)?;
        Ok(Topo {
            sandboxes: Vec::new(),
            net: Some(net),
            _state: state,
            suffix,
            outside,
            _outside_link: outside_link,
            out,
            host_out,
        })
    }

    fn net(&self) -> &Network {
        self.net.as_ref().expect("network is open until drop")
    }

    /// A sandbox namespace on the bridge with the policy program; returns its index.
    fn sandbox(&mut self, name: &str, policy: &Policy) -> Result<usize> {
        let ns = Netns::new(&format!("kns{}{name}", self.suffix))?;
        let host_end = format!("kv{}{name}", self.suffix);
        let link = veth_into(&ns, &host_end)?;
        let id = format!("t{}{name}", self.suffix);
        let a = self
            .net()
            .attach(&id, Endpoint::Existing(&host_end), policy)
            .context("attach")?;
        configure_guest(&ns, &a)?;
        self.sandboxes.push((ns, link, a));
        Ok(self.sandboxes.len() - 1)
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.sandboxes[i].0
    }
    fn att(&self, i: usize) -> &Attachment {
        &self.sandboxes[i].2
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kiln_net=debug,traffic=info")
        .with_test_writer()
        .try_init();
}

struct Census {
    programs: usize,
    pins: usize,
    netns: usize,
    links: usize,
    kiln_table: bool,
}

fn census() -> Census {
    Census {
        programs: kiln_programs(),
        pins: std::fs::read_dir("/sys/fs/bpf/kiln").map_or(0, |d| d.count()),
        // Only names these tests and kiln-net use: other work on a shared
        // host may create and remove its own links and namespaces meanwhile.
        netns: run(&["ip", "netns", "list"])
            .map_or(0, |s| s.lines().filter(|l| l.starts_with("kn")).count()),
        links: run(&["ip", "-o", "link", "show"]).map_or(0, |s| {
            s.lines()
                .filter_map(|l| l.split(": ").nth(1))
                .filter(|n| ["kb", "kv", "ko", "kt"].iter().any(|p| n.starts_with(p)))
                .count()
        }),
        kiln_table: run(&["nft", "list", "table", "inet", "kiln"]).is_ok(),
    }
}

#[test]
fn egress_policy_with_real_traffic() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let before = census();
    {
        let mut t = Topo::new()?;
        // A port free on the host, used by every "protected" server.
        let host_listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let p = host_listener.local_addr()?.port();
        std::thread::spawn(move || {
            for c in host_listener.incoming() {
                let Ok(mut c) = c else { break };
                let _ = std::io::Write::write_all(&mut c, b"hi");
            }
        });
        let out = t.out;
        let peers = tcp_server_peers(&t.outside, sa(out, 8080))?;
        tcp_server(&t.outside, sa(out, 9090))?;
        udp_echo(&t.outside, sa(out, 5353), None)?;
        udp_echo(&t.outside, sa(out, 5354), None)?;
        // A metadata server, routed to the outside namespace.
        let md = Ipv4Addr::new(169, 254, 169, 254);
        t.outside
            .exec(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"])?;
        tcp_server(&t.outside, sa(md, p))?;
        let _md_route = RouteGuard::add("169.254.169.254/32", t.out)?;

        let subnet = t.net().ipam().subnet();
        let gw = t.net().ipam().gateway();
        let a = t.sandbox(
            "a",
            &policy(
                Action::Deny,
                &[
                    (Action::Allow, &format!("{out}/32:tcp:8080")),
                    (Action::Allow, &format!("{out}:udp:5353")),
                    (Action::Allow, &format!("{out}:icmp")),
                    // Broad: must not open the host, other sandboxes or metadata.
                    (Action::Allow, &format!("0.0.0.0/0:tcp:{p}")),
                ],
            ),
        )?;
        let b = t.sandbox(
            "b",
            &policy(
                Action::Deny,
                &[
                    (Action::Allow, &format!("{gw}/32:tcp:{p}")),
                    (Action::Allow, &format!("169.254.169.254/32:tcp:{p}")),
                    (Action::Allow, &format!("{subnet}:tcp:{p}")),
                ],
            ),
        )?;
        tcp_server(t.ns(a), sa(t.att(a).ip, p))?;
        tcp_server(t.ns(b), sa(t.att(b).ip, p))?;
        let (a_ip, b_ip) = (t.att(a).ip, t.att(b).ip);
        ensure!(
            a_ip != b_ip && t.att(a).mac != t.att(b).mac,
            "distinct leases"
        );

        tracing::info!("allowed destinations are reached (TCP, UDP, ICMP)");
        ensure!(tcp_reaches(t.ns(a), sa(out, 8080), T), "tcp 8080 allowed");
        let seen = peers.recv_timeout(T)?;
        ensure!(
            seen.ip() == std::net::IpAddr::V4(t.host_out),
            "NAT: the outside host sees {seen}, not the host's address {}",
            t.host_out
        );
        ensure!(udp_reaches(t.ns(a), sa(out, 5353), T), "udp 5353 allowed");
        ensure!(ping(t.ns(a), &out.to_string()), "icmp allowed");

        tracing::info!("denied destinations are not");
        ensure!(!tcp_reaches(t.ns(a), sa(out, 9090), T), "tcp 9090 denied");
        ensure!(!udp_reaches(t.ns(a), sa(out, 5354), T), "udp 5354 denied");
        ensure!(!ping(t.ns(b), &out.to_string()), "icmp denied for b");

        tracing::info!(
            "the host, metadata and other sandboxes: closed to a broad rule, open to a narrow one"
        );
        ensure!(!tcp_reaches(t.ns(a), sa(gw, p), T), "a -> gateway");
        ensure!(
            !tcp_reaches(t.ns(a), sa(t.host_out, p), T),
            "a -> host's other address"
        );
        ensure!(!tcp_reaches(t.ns(a), sa(md, p), T), "a -> metadata");
        ensure!(!tcp_reaches(t.ns(a), sa(b_ip, p), T), "a -> b");
        ensure!(
            tcp_reaches(t.ns(b), sa(gw, p), T),
            "b -> gateway (narrow rule)"
        );
        ensure!(
            tcp_reaches(t.ns(b), sa(md, p), T),
            "b -> metadata (narrow rule)"
        );
        let b_to_a = tcp_reaches(t.ns(b), sa(a_ip, p), T);
        if !b_to_a {
            let (_, ca) = t.net().policy(&format!("t{}a", t.suffix))?;
            let (_, cb) = t.net().policy(&format!("t{}b", t.suffix))?;
            tracing::error!(?ca, ?cb, "b -> a failed");
            if std::env::var_os("KILN_TEST_PAUSE").is_some() {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        ensure!(b_to_a, "b -> a (subnet rule)");

        tracing::info!("counters count");
        let (pol, c) = t.net().policy(&format!("t{}a", t.suffix))?;
        ensure!(pol.egress.len() == 4 && c.rules.len() == 4);
        ensure!(
            c.rules[0].allowed_packets >= 3,
            "tcp 8080 rule: {:?}",
            c.rules[0]
        );
        ensure!(c.rules[0].allowed_bytes > 100);
        ensure!(
            c.rules[1].allowed_packets >= 1,
            "udp rule: {:?}",
            c.rules[1]
        );
        ensure!(
            c.rules[2].allowed_packets >= 1,
            "icmp rule: {:?}",
            c.rules[2]
        );
        ensure!(c.default.dropped_packets >= 2, "default: {:?}", c.default);
        ensure!(
            c.protected.dropped_packets >= 4,
            "protected: {:?}",
            c.protected
        );
        tracing::info!(?c, "counters of a");
    }
    let after = census();
    ensure!(
        after.programs == before.programs,
        "programs {} -> {}",
        before.programs,
        after.programs
    );
    ensure!(
        after.pins == before.pins,
        "pins {} -> {}",
        before.pins,
        after.pins
    );
    ensure!(
        after.netns == before.netns,
        "netns {} -> {}",
        before.netns,
        after.netns
    );
    ensure!(
        after.links == before.links,
        "links {} -> {}",
        before.links,
        after.links
    );
    ensure!(
        after.kiln_table == before.kiln_table,
        "nft table inet kiln left behind"
    );
    Ok(())
}

struct RouteGuard(String);
impl RouteGuard {
    fn add(dst: &str, via: Ipv4Addr) -> Result<RouteGuard> {
        run(&["ip", "route", "add", dst, "via", &via.to_string()])?;
        Ok(RouteGuard(dst.to_owned()))
    }
}
impl Drop for RouteGuard {
    fn drop(&mut self) {
        let _ = run(&["ip", "route", "del", &self.0]);
    }
}

#[test]
fn spoofing_and_ipv6_are_dropped() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let mut t = Topo::new()?;
    let out = t.out;
    let (tx, rx) = std::sync::mpsc::channel();
    udp_echo(&t.outside, sa(out, 5353), Some(tx))?;

    // IPv6 control first: an unfiltered port on the bridge (c) and a
    // namespace whose port has no program yet (a) talk IPv6.
    let c_ns = Netns::new(&format!("kns{}c", t.suffix))?;
    let c_host = format!("kv{}c", t.suffix);
    let _c_link = veth_into(&c_ns, &c_host)?;
    let bridge = t.net().config().bridge.clone();
    run(&["ip", "link", "set", &c_host, "master", &bridge, "up"])?;
    c_ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    c_ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd99::c/64",
        "dev",
        "eth0",
        "nodad",
    ])?;

    let pre_ns = Netns::new(&format!("kns{}a", t.suffix))?;
    let a_host = format!("kv{}a", t.suffix);
    let a_link = veth_into(&pre_ns, &a_host)?;
    run(&["ip", "link", "set", &a_host, "master", &bridge, "up"])?;
    pre_ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    pre_ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd99::a/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    // (new bridge ports take a moment to forward)
    ensure!(
        (0..5).any(|_| ns_ok(&pre_ns.0, &["ping", "-6", "-c", "1", "-W", "1", "fd99::c"])),
        "control: IPv6 works on the bridge without the program"
    );

    let id = format!("t{}a", t.suffix);
    let pol = policy(Action::Allow, &[]);
    let att = t.net().attach(&id, Endpoint::Existing(&a_host), &pol)?;
    configure_guest(&pre_ns, &att)?;
    t.sandboxes.push((pre_ns, a_link, att.clone()));
    let a = 0;
    ensure!(
        !ns_ok(&t.ns(a).0, &["ping", "-6", "-c", "1", "-W", "1", "fd99::c"]),
        "IPv6 leaves the sandbox"
    );

    let gw_mac = parse_mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{bridge}/address"
    ))?)?;
    let send = |src_mac: [u8; 6], src: Ipv4Addr, tag: &str| {
        send_frame(
            t.ns(a),
            udp_frame(src_mac, gw_mac, src, out, 5353, tag.as_bytes()),
        )
    };
    let recv = |tag: &str| -> bool {
        let deadline = Instant::now() + T;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(p) if p == tag.as_bytes() => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        false
    };
    // The guest's kernel must know the gateway's MAC for the UDP control; raw
    // frames carry it themselves.
    send(att.mac, att.ip, "genuine")?;
    ensure!(
        recv("genuine"),
        "control: a hand-made frame with the sandbox's own MAC and IP passes"
    );
    send(att.mac, Ipv4Addr::new(10, 99, 99, 99), "spoofed-ip")?;
    ensure!(!recv("spoofed-ip"), "a spoofed source IP is dropped");
    let mut other_mac = att.mac;
    other_mac[5] ^= 0x55;
    send(other_mac, att.ip, "spoofed-mac")?;
    ensure!(!recv("spoofed-mac"), "a spoofed source MAC is dropped");
    // ARP: claim to be the gateway.
    send_frame(
        t.ns(a),
        arp_frame(att.mac, att.mac, att.gateway, att.gateway),
    )?;
    send_frame(
        t.ns(a),
        arp_frame(other_mac, other_mac, att.ip, att.gateway),
    )?;

    let (_, c) = t.net().policy(&id)?;
    let drop = |name: &str| {
        c.drops
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| c.dropped_packets)
    };
    tracing::info!(?c.drops, "drop counters");
    ensure!(drop("spoofed-ip") >= 1, "spoofed-ip counted");
    ensure!(
        drop("spoofed-mac") >= 2,
        "spoofed-mac counted (frame and ARP)"
    );
    ensure!(drop("bad-arp") >= 1, "ARP for another IP counted");
    ensure!(drop("ipv6") >= 1, "IPv6 counted");
    Ok(())
}

#[test]
fn live_policy_update_flips_within_100ms() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let mut t = Topo::new()?;
    let out = t.out;
    tcp_server(&t.outside, sa(out, 8080))?;
    let allow = policy(Action::Deny, &[(Action::Allow, &format!("{out}:tcp:8080"))]);
    let deny = policy(Action::Deny, &[(Action::Deny, &format!("{out}:tcp:8080"))]);
    let a = t.sandbox("a", &allow)?;
    let id = format!("t{}a", t.suffix);
    let mut latencies = Vec::new();
    for round in 0..5 {
        ensure!(
            tcp_reaches(t.ns(a), sa(out, 8080), T),
            "round {round}: allowed before"
        );
        let t0 = Instant::now();
        t.net().update_policy(&id, &deny)?;
        let took = t0.elapsed();
        // The first attempt after the update returns is refused.
        ensure!(
            !tcp_reaches(t.ns(a), sa(out, 8080), T),
            "round {round}: blocked after update"
        );
        ensure!(took < Duration::from_millis(100), "update took {took:?}");
        latencies.push(took);
        t.net().update_policy(&id, &allow)?;
    }
    ensure!(tcp_reaches(t.ns(a), sa(out, 8080), T), "allowed again");
    // Bad input: the previous policy stays in force.
    ensure!(Rule::parse(Action::Allow, "10.0.0.0/33").is_err());
    ensure!(tcp_reaches(t.ns(a), sa(out, 8080), T), "still allowed");
    latencies.sort();
    tracing::info!(
        ?latencies,
        "policy update latency (update call returns; next SYN is judged by the new policy)"
    );
    // 1,000 rules.
    let mut big: Vec<(Action, String)> = (0..999)
        .map(|i| {
            (
                Action::Deny,
                format!("11.{}.{}.0/24:tcp:443", i / 256, i % 256),
            )
        })
        .collect();
    big.push((Action::Deny, format!("{out}:tcp:8080")));
    let big = Policy {
        default: Action::Allow,
        egress: big.iter().map(|(a, s)| rule(*a, s)).collect(),
        ingress: Vec::new(),
    };
    let t0 = Instant::now();
    t.net().update_policy(&id, &big)?;
    let took = t0.elapsed();
    ensure!(!tcp_reaches(t.ns(a), sa(out, 8080), T), "rule 1000 denies");
    tracing::info!(?took, "1,000-rule policy update");
    ensure!(tcp_reaches(t.ns(a), sa(t.out, 8080), T) == false);
    let (_, c) = t.net().policy(&id)?;
    ensure!(c.rules[999].dropped_packets >= 1, "rule 1000 counted");
    Ok(())
}

#[test]
fn reconcile_removes_a_crashed_nodes_leftovers() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let programs_before = kiln_programs();
    let mut t = Topo::new()?;
    let pol = Policy::default();
    let live = t.sandbox("a", &pol)?;
    let dead_id = format!("t{}d", t.suffix);
    // A tap the way a microVM gets one, then "the node crashed": the
    // Network value is gone, the kernel objects stay.
    let dead = t.net().attach(&dead_id, Endpoint::Tap, &pol)?;
    ensure!(
        std::path::Path::new("/sys/class/net")
            .join(&dead.ifname)
            .exists()
    );
    ensure!(
        kiln_programs() == programs_before + 4,
        "two sandboxes, two programs each"
    );
    let cfg = t.net().config().clone();
    drop(t.net.take());
    ensure!(
        std::path::Path::new("/sys/fs/bpf/kiln")
            .join(&dead_id)
            .join("link")
            .exists()
    );
    // Pinned: the program still filters with no process holding it.
    ensure!(
        kiln_programs() == programs_before + 4,
        "programs survive their loader"
    );

    let net = Network::open(cfg)?;
    let live_ids: BTreeSet<String> = [t.att(live).id.clone()].into();
    let report = net.reconcile(&live_ids)?;
    ensure!(report.released == vec![dead_id.clone()], "{report:?}");
    ensure!(
        !std::path::Path::new("/sys/class/net")
            .join(&dead.ifname)
            .exists(),
        "tap gone"
    );
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/kiln")
            .join(&dead_id)
            .exists(),
        "pins gone"
    );
    ensure!(
        kiln_programs() == programs_before + 2,
        "the dead sandbox's program is gone"
    );
    ensure!(net.ipam().leases()?.len() == 1);
    // The live one still works after the restart: its policy can be read and updated.
    let (_, _c) = net.policy(&t.att(live).id)?;
    net.update_policy(&t.att(live).id, &Preset::None.policy())?;
    t.net = Some(net);
    Ok(())
}

use kiln_net::Preset;

/// The microVM path without a VM: a real tap created by `attach`, opened as a
/// VMM opens it, with the test writing and reading the guest's frames.
#[test]
fn a_real_tap_carries_guest_frames_through_the_program() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let t = Topo::new()?;
    let out = t.out;
    let (tx, rx) = std::sync::mpsc::channel();
    udp_echo(&t.outside, sa(out, 5353), Some(tx))?;
    udp_echo(&t.outside, sa(out, 5354), None)?;
    let id = format!("t{}v", t.suffix);
    let pol = policy(Action::Deny, &[(Action::Allow, &format!("{out}:udp:5353"))]);
    let att = t.net().attach(&id, Endpoint::Tap, &pol)?;
    let mut tap = open_tap(&att.ifname)?;
    let me = (att.ip, att.mac);

    tracing::info!("ARP for the gateway through the tap");
    let gw_mac = Arc::new(Mutex::new([0u8; 6]));
    let mut answered = false;
    for _ in 0..10 {
        std::io::Write::write_all(&mut tap, &arp_request(att.mac, att.ip, att.gateway))?;
        let gw = att.gateway.octets();
        let g = gw_mac.clone();
        if tap_wait(&mut tap, me, Duration::from_millis(300), move |f| {
            let hit = f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[20..22] == [0, 2]
                && f[28..32] == gw;
            if hit {
                g.lock().map(|mut m| m.copy_from_slice(&f[22..28])).ok();
            }
            hit
        }) {
            answered = true;
            break;
        }
    }
    ensure!(answered, "the gateway answers ARP through the tap");
    let gw_mac = *gw_mac.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;

    let udp_reply = |port: u16| {
        move |f: &[u8]| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x00]
                && f[23] == 17
                && f[34..36] == port.to_be_bytes()
        }
    };
    tracing::info!("allowed UDP goes out through NAT and its answer comes back to the tap");
    std::io::Write::write_all(
        &mut tap,
        &udp_frame(att.mac, gw_mac, att.ip, out, 5353, b"tap-genuine"),
    )?;
    ensure!(
        tap_wait(&mut tap, me, Duration::from_secs(2), udp_reply(5353)),
        "echo from 5353"
    );
    ensure!(rx.recv_timeout(T)? == b"tap-genuine");

    tracing::info!("denied UDP and spoofed frames do not leave");
    std::io::Write::write_all(
        &mut tap,
        &udp_frame(att.mac, gw_mac, att.ip, out, 5354, b"denied"),
    )?;
    ensure!(
        !tap_wait(&mut tap, me, T, udp_reply(5354)),
        "5354 is denied"
    );
    std::io::Write::write_all(
        &mut tap,
        &udp_frame(
            att.mac,
            gw_mac,
            Ipv4Addr::new(10, 9, 9, 9),
            out,
            5353,
            b"tap-spoof",
        ),
    )?;
    let mut other = att.mac;
    other[5] ^= 1;
    std::io::Write::write_all(
        &mut tap,
        &udp_frame(other, gw_mac, att.ip, out, 5353, b"tap-spoof"),
    )?;
    ensure!(
        rx.recv_timeout(T).is_err(),
        "no spoofed datagram reached the server"
    );
    let (_, c) = t.net().policy(&id)?;
    ensure!(c.rules[0].allowed_packets == 1, "{:?}", c.rules[0]);
    ensure!(c.default.dropped_packets == 1, "{:?}", c.default);
    let dropped = |n: &str| {
        c.drops
            .iter()
            .find(|(k, _)| k == n)
            .map_or(0, |(_, c)| c.dropped_packets)
    };
    ensure!(
        dropped("spoofed-ip") == 1 && dropped("spoofed-mac") == 1,
        "{:?}",
        c.drops
    );
    drop(tap);
    t.net().detach(&id)?;
    ensure!(
        !std::path::Path::new("/sys/class/net")
            .join(&att.ifname)
            .exists(),
        "tap removed"
    );
    Ok(())
}

use std::sync::Arc;
