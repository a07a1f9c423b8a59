//! One network per host: several state directories on one bridge (a user's
//! `kiln run` and a `kiln bench net`, two test harnesses) never hand one
//! address to two live sandboxes and never delete each other's taps, pins
//! or leases. Real bridge, real taps, real BPF programs; a bridge, tap
//! prefix, pin root and claims directory of the test's own. Needs root.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use common::*;
use kiln_net::{Action, Endpoint, NetConfig, Network, Policy};

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kiln_net=info,hostwide=info")
        .with_test_writer()
        .try_init();
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Everything the test may leave on failure, removed on drop.
struct Cleanup {
    nets: Vec<Network>,
    bridge: String,
    bpf_root: PathBuf,
    claims: PathBuf,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.nets {
            let _ = n.reconcile(&BTreeSet::new());
        }
        // Taps of a state directory deleted under its sandboxes.
        if let Ok(ports) = kiln_net::host::bridge_ports(&self.bridge) {
            for p in ports.iter().filter(|p| p.starts_with(&self.prefix)) {
                let _ = kiln_net::host::delete_link(p);
            }
        }
        if let Ok(d) = std::fs::read_dir(&self.bpf_root) {
            for e in d.flatten() {
                let _ = kiln_net::bpf::remove_pins(&e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.bpf_root);
        for n in &self.nets {
            let _ = n.teardown();
        }
        if link_exists(&self.bridge) {
            let _ = run(&["ip", "link", "del", &self.bridge]);
        }
        let _ = std::fs::remove_dir_all(&self.claims);
    }
}

#[test]
fn two_state_dirs_share_one_bridge() -> Result<()> {
    init();
    let started = Instant::now();
    let (suffix, _) = unique();
    let pid = std::process::id() % 250;
    let bridge = format!("khb{suffix}");
    let prefix = "kh".to_owned();
    let bpf_root = PathBuf::from(format!("/sys/fs/bpf/kiln-hostwide-{suffix}"));
    let claims_root = PathBuf::from("/run/kiln/net");
    let cfg = |state: &Path| {
        let mut c = NetConfig::new(state);
        c.bridge = bridge.clone();
        c.subnet = format!("10.199.{pid}.0/24").parse().expect("cidr");
        c.tap_prefix = prefix.clone();
        c.bpf_root = bpf_root.clone();
        c.claims_root = claims_root.clone();
        c
    };
    let (sa, sb, sc, sd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let mut g = Cleanup {
        nets: vec![],
        bridge: bridge.clone(),
        bpf_root: bpf_root.clone(),
        claims: claims_root.join(&bridge),
        prefix: prefix.clone(),
    };
    g.nets.push(Network::open(cfg(sa.path()))?);
    g.nets.push(Network::open(cfg(sb.path()))?);
    let policy = Policy {
        default: Action::Allow,
        egress: vec![],
        ingress: vec![],
    };

    // 50 attaches (tap, lease, claim, pinned programs) alternating between
    // the two state directories; both lease tables start at the same cursor.
    let t = Instant::now();
    let mut ids: [Vec<String>; 2] = [vec![], vec![]];
    let mut seen: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for i in 0..50 {
        let which = i % 2;
        let id = format!("h{suffix}-{i}");
        let a = g.nets[which]
            .attach(&id, Endpoint::Tap, &policy)
            .with_context(|| format!("attach {id}"))?;
        ensure!(seen.insert(a.ip), "{} handed out twice (attach {i})", a.ip);
        ids[which].push(id);
    }
    tracing::info!(elapsed = ?t.elapsed(), "50 alternating attaches");
    for n in &g.nets {
        ensure!(n.ipam().leases()?.len() == 25);
    }
    let lease_ips = |n: &Network| -> Result<BTreeSet<Ipv4Addr>> {
        Ok(n.ipam().leases()?.values().map(|l| l.ip).collect())
    };
    ensure!(lease_ips(&g.nets[0])?.is_disjoint(&lease_ips(&g.nets[1])?));

    // Concurrently, from two threads, plain allocations on both tables.
    let t = Instant::now();
    let extra: Vec<Vec<Ipv4Addr>> = std::thread::scope(|s| {
        let hs: Vec<_> = g
            .nets
            .iter()
            .enumerate()
            .map(|(w, n)| {
                let suffix = &suffix;
                s.spawn(move || {
                    (0..40)
                        .map(|i| {
                            n.ipam()
                                .allocate(&format!("x{suffix}-{w}-{i}"), "none")
                                .map(|l| l.ip)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("thread").map_err(anyhow::Error::from))
            .collect::<Result<_>>()
    })?;
    for ip in extra.iter().flatten() {
        ensure!(seen.insert(*ip), "{ip} handed out twice (concurrent)");
    }
    tracing::info!(elapsed = ?t.elapsed(), "80 concurrent allocations");
    for (w, n) in g.nets.iter().enumerate() {
        for i in 0..40 {
            n.ipam().release(&format!("x{suffix}-{w}-{i}"))?;
        }
    }

    // A's reconcile (all its sandboxes live) leaves B's taps, pins and
    // leases alone, and still removes a tap nobody owns.
    let orphan = format!("{prefix}orphan{}", suffix.len());
    run(&["ip", "tuntap", "add", "dev", &orphan, "mode", "tap"])?;
    run(&["ip", "link", "set", &orphan, "master", &bridge])?;
    let b_leases = g.nets[1].ipam().leases()?;
    let live_a: BTreeSet<String> = ids[0].iter().cloned().collect();
    let report = g.nets[0].reconcile(&live_a)?;
    ensure!(report.released.is_empty(), "{report:?}");
    ensure!(report.orphan_pins.is_empty(), "{report:?}");
    ensure!(
        report.orphan_links == vec![orphan.clone()],
        "reconcile removed {:?}",
        report.orphan_links
    );
    ensure!(!link_exists(&orphan));
    ensure!(g.nets[1].ipam().leases()? == b_leases);
    for id in &ids[1] {
        let l = &b_leases[id];
        ensure!(link_exists(&l.ifname), "B's tap {} was deleted", l.ifname);
        ensure!(bpf_root.join(id).exists(), "B's pins of {id} were removed");
    }
    // And B's reconcile leaves A's.
    let live_b: BTreeSet<String> = ids[1].iter().cloned().collect();
    ensure!(g.nets[1].reconcile(&live_b)? == Default::default());
    for (id, l) in g.nets[0].ipam().leases()? {
        ensure!(link_exists(&l.ifname) && bpf_root.join(&id).exists());
    }

    // A third state directory attaches one sandbox, then its directory is
    // deleted under it: its claim is stale, and a fourth state directory
    // (whose cursor starts at the bottom, below every live claim) takes
    // exactly that address over.
    g.nets.push(Network::open(cfg(sc.path()))?);
    let c_id = format!("h{suffix}-c");
    let c = g.nets[2].attach(&c_id, Endpoint::Tap, &policy)?;
    ensure!(!lease_ips(&g.nets[0])?.contains(&c.ip) && !lease_ips(&g.nets[1])?.contains(&c.ip));
    drop(g.nets.pop());
    std::fs::remove_dir_all(sc.path())?;
    g.nets.push(Network::open(cfg(sd.path()))?);
    let d_id = format!("h{suffix}-d");
    let d = g.nets[2].attach(&d_id, Endpoint::Tap, &policy)?;
    ensure!(
        d.ip == c.ip,
        "stale claim on {} not taken over (got {})",
        c.ip,
        d.ip
    );
    let claim = std::fs::read_to_string(claims_root.join(&bridge).join(format!("ip-{}", d.ip)))?;
    ensure!(claim.contains(&d_id) && !claim.contains(&c_id), "{claim}");
    // C's tap is now nobody's: A's reconcile removes it, not D's.
    let report = g.nets[0].reconcile(&live_a)?;
    ensure!(report.orphan_links == vec![c.ifname.clone()], "{report:?}");
    ensure!(link_exists(&d.ifname));
    // C's pins have no owner any state directory can judge (its policy
    // file went with its directory): removed here, by hand.
    kiln_net::bpf::remove_pins(&bpf_root.join(&c_id))?;

    // Teardown refuses while another state directory has live sandboxes.
    g.nets[0].reconcile(&BTreeSet::new())?;
    ensure!(
        !g.nets[0].teardown()?,
        "teardown under B's and D's sandboxes"
    );
    ensure!(link_exists(&bridge));
    for &w in &[1, 2] {
        g.nets[w].reconcile(&BTreeSet::new())?;
    }
    ensure!(g.nets[0].teardown()?);
    ensure!(!link_exists(&bridge), "bridge left");
    ensure!(!claims_root.join(&bridge).exists(), "claims directory left");
    let left: Vec<_> = std::fs::read_dir(&bpf_root)?.flatten().collect();
    ensure!(left.is_empty(), "pins left: {left:?}");
    std::fs::remove_dir(&bpf_root)?;
    let taps = run(&["ip", "-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with(&prefix))
        .count();
    ensure!(taps == 0, "{taps} taps left");
    tracing::info!(elapsed = ?started.elapsed(), "two_state_dirs_share_one_bridge");
    Ok(())
}
