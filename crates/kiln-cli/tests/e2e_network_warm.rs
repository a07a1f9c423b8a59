//! Networking for everything that is not a cold boot, through the `kiln`
//! binary on real microVMs: restores of a snapshot of a networked sandbox
//! and forks of it get their own tap, address and MAC (configured in the
//! guest after the restore), keep the policy, reach an allowed server in a
//! namespace, and leave the parent working; warm starts from a networked
//! template (its VM has a NIC on a placeholder tap) likewise, and so do
//! runs that claim a member of a networked template's warm pool; nothing
//! outlives them.

mod common;
mod net_support;

use common::{Kiln, busybox, code, stderr};
use net_support::{Outside, drop_node_network, guest_addr, ok, reach, taps};

#[test]
fn restores_and_forks_of_a_networked_sandbox_get_their_own_address() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    let taps_before = taps();
    let allow = format!("{addr}/32:tcp:8080");

    let parent = ok(
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
    assert_eq!(reach(&k, &parent, &addr, 8080), "allowed");
    let parent_addr = guest_addr(&k, &parent);

    tracing::info!("two forks: each its own address and MAC, the policy kept");
    let t0 = std::time::Instant::now();
    let forks: Vec<String> = ok(&k, &["fork", &parent, "-n", "2"])
        .lines()
        .map(str::to_string)
        .collect();
    tracing::info!(fork_ms = t0.elapsed().as_millis() as u64, "forked");
    assert_eq!(forks.len(), 2, "{forks:?}");
    let mut seen = vec![parent_addr.clone()];
    for f in &forks {
        assert_eq!(reach(&k, f, &addr, 8080), "allowed", "fork {f}");
        assert_eq!(reach(&k, f, &addr, 9090), "", "fork {f}: policy lost");
        let a = guest_addr(&k, f);
        for s in &seen {
            assert_ne!(a.0, s.0, "fork {f} shares an address");
            assert_ne!(a.1, s.1, "fork {f} shares a MAC");
        }
        seen.push(a);
    }
    tracing::info!("the parent still works, with its own address");
    assert_eq!(reach(&k, &parent, &addr, 8080), "allowed");
    assert_eq!(guest_addr(&k, &parent), parent_addr);

    tracing::info!("a named snapshot, restored after the parent is gone");
    ok(&k, &["snapshot", &parent, "--name", "netsnap"]);
    ok(&k, &["rm", "-f", &parent]);
    let restored = ok(&k, &["restore", "-d", "netsnap"]).trim().to_string();
    assert_eq!(reach(&k, &restored, &addr, 8080), "allowed");
    assert_eq!(reach(&k, &restored, &addr, 9090), "");
    let r = guest_addr(&k, &restored);
    assert!(
        seen.iter().all(|s| s.1 != r.1),
        "the restored sandbox reuses a MAC: {r:?} {seen:?}"
    );
    // The policy is the restored sandbox's own: `kiln policy get` reads it.
    let get = ok(&k, &["policy", "get", &restored]);
    assert!(get.contains("8080"), "{get}");

    for id in forks.iter().chain([&restored]) {
        ok(&k, &["rm", "-f", id]);
        assert!(
            !std::path::Path::new("/sys/fs/bpf/kiln").join(id).exists(),
            "BPF pins of {id} outlived it"
        );
    }
    ok(&k, &["snapshot", "rm", "netsnap"]);
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    k.assert_clean();
    drop_node_network();
}

#[test]
fn warm_starts_from_a_networked_template_get_their_own_address() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    let taps_before = taps();
    let allow = format!("{addr}/32:tcp:8080");

    let t0 = std::time::Instant::now();
    let name = ok(&k, &["template", "create", "--net", "default", &bb])
        .trim()
        .to_string();
    tracing::info!(create_ms = t0.elapsed().as_millis() as u64, %name, "networked template");
    assert_eq!(
        taps(),
        taps_before,
        "the template's placeholder tap outlived its VM"
    );

    let mut seen: Vec<(String, String)> = vec![];
    let mut ids = vec![];
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let run = k.run(&[
            "run",
            "-d",
            "-v",
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
        ]);
        assert_eq!(code(&run), 0, "{}", stderr(&run));
        assert!(
            stderr(&run).contains(&format!("warm start from template {name}")),
            "not a warm start: {}",
            stderr(&run)
        );
        tracing::info!(
            run_ms = t0.elapsed().as_millis() as u64,
            "networked warm start"
        );
        let id = common::stdout(&run).trim().to_string();
        assert_eq!(reach(&k, &id, &addr, 8080), "allowed", "warm start {id}");
        assert_eq!(reach(&k, &id, &addr, 9090), "", "warm start {id}: policy");
        let a = guest_addr(&k, &id);
        assert_ne!(a.1, "02:00:00:00:00:01", "the template's MAC");
        for s in &seen {
            assert_ne!(a.0, s.0, "two warm starts share an address");
            assert_ne!(a.1, s.1, "two warm starts share a MAC");
        }
        seen.push(a);
        ids.push(id);
    }
    tracing::info!("a --net none run does not take the networked template");
    let none = k.run(&["run", "--rm", "-v", &bb, "--", "ls", "/sys/class/net"]);
    assert_eq!(code(&none), 0, "{}", stderr(&none));
    assert!(!stderr(&none).contains(&name), "{}", stderr(&none));
    assert!(
        common::stdout(&none)
            .split_whitespace()
            .all(|l| l == "lo" || l == "sit0"),
        "{}",
        common::stdout(&none)
    );

    for id in &ids {
        ok(&k, &["rm", "-f", id]);
    }
    ok(&k, &["template", "rm", &name]);
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    k.assert_clean();
    drop_node_network();
}

/// Sandbox IDs holding a lease in `k`'s state directory.
fn leased(k: &Kiln) -> Vec<String> {
    leases(k).into_iter().map(|(id, _)| id).collect()
}

/// (sandbox ID, tap) of each lease in `k`'s state directory.
fn leases(k: &Kiln) -> Vec<(String, String)> {
    let path = k.state_dir().join("net").join("leases.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return vec![];
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("leases.json");
    v["leases"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(id, l)| (id.clone(), l["ifname"].as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether host interface `name` exists.
fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn runs_from_a_networked_warm_pool_get_their_own_address_and_policy() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    let allow = format!("{addr}/32:tcp:8080");

    let t0 = std::time::Instant::now();
    let name = ok(
        &k,
        &["template", "create", "--net", "default", "--pool", "2", &bb],
    )
    .trim()
    .to_string();
    tracing::info!(create_ms = t0.elapsed().as_millis() as u64, %name, "networked template with a pool of 2");
    tracing::info!("each member has its own tap, lease and pins, and a deny-all policy");
    let members = leased(&k);
    assert_eq!(members.len(), 2, "{members:?}");
    let member_taps: Vec<String> = leases(&k).into_iter().map(|(_, t)| t).collect();
    assert_eq!(member_taps.len(), 2);
    assert_ne!(member_taps[0], member_taps[1], "two members share a tap");
    for (m, t) in members.iter().zip(&member_taps) {
        assert!(link_exists(t), "member {m} has no tap {t}");
        assert!(
            std::path::Path::new("/sys/fs/bpf/kiln").join(m).exists(),
            "member {m} has no policy program"
        );
        let saved = std::fs::read_to_string(
            k.state_dir()
                .join("net")
                .join("policies")
                .join(format!("{m}.json")),
        )
        .expect("the member's saved policy");
        let v: serde_json::Value = serde_json::from_str(&saved).expect("policy JSON");
        assert!(
            v["default"]
                .as_str()
                .is_some_and(|d| d.eq_ignore_ascii_case("deny"))
                && v["egress"].as_array().is_some_and(|r| r.is_empty()),
            "an idle member's policy is not deny-all: {saved}"
        );
    }

    tracing::info!("a member whose supervisor was killed is reaped with its network");
    let victim = members[0].clone();
    let victim_tap = member_taps[0].clone();
    let shim = k
        .leftover_processes()
        .into_iter()
        .find(|p| p.contains("shim") && p.contains(&victim))
        .unwrap_or_else(|| panic!("no supervisor of member {victim}"));
    let pid: i32 = shim
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the member's supervisor");
    ok(&k, &["template", "fill", &name]);
    assert!(
        !leased(&k).contains(&victim),
        "the reaped member kept its lease"
    );
    assert!(!link_exists(&victim_tap), "the reaped member kept its tap");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/kiln")
            .join(&victim)
            .exists(),
        "the reaped member kept its pins"
    );
    assert_eq!(leased(&k).len(), 2, "the pool was not refilled");

    let mut seen: Vec<(String, String)> = vec![];
    let mut ids = vec![];
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let run = k.run(&[
            "run",
            "-d",
            "-v",
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
        ]);
        assert_eq!(code(&run), 0, "{}", stderr(&run));
        assert!(
            stderr(&run).contains(&format!("warm start from the pool of template {name}")),
            "not from the pool: {}",
            stderr(&run)
        );
        tracing::info!(
            run_ms = t0.elapsed().as_millis() as u64,
            "networked run from the pool"
        );
        let id = common::stdout(&run).trim().to_string();
        assert_eq!(reach(&k, &id, &addr, 8080), "allowed", "pool run {id}");
        assert_eq!(
            reach(&k, &id, &addr, 9090),
            "",
            "pool run {id}: denied port"
        );
        let get = ok(&k, &["policy", "get", &id]);
        assert!(
            get.contains("8080"),
            "the run's policy is not in force: {get}"
        );
        let a = guest_addr(&k, &id);
        assert_ne!(a.1, "02:00:00:00:00:01", "the template's MAC");
        for s in &seen {
            assert_ne!(a.0, s.0, "two pool runs share an address");
            assert_ne!(a.1, s.1, "two pool runs share a MAC");
        }
        assert!(leased(&k).contains(&id), "{id} holds no lease");
        seen.push(a);
        ids.push(id);
    }
    tracing::info!("a --net none run does not take a networked member");
    let none = k.run(&["run", "--rm", "-v", &bb, "--", "ls", "/sys/class/net"]);
    assert_eq!(code(&none), 0, "{}", stderr(&none));
    assert!(!stderr(&none).contains(&name), "{}", stderr(&none));
    assert!(
        common::stdout(&none)
            .split_whitespace()
            .all(|l| l == "lo" || l == "sit0"),
        "{}",
        common::stdout(&none)
    );

    // Every member now (the refills' too), the runs and the first members:
    // the host's other taps and pins may belong to other users of it.
    let mut all = leases(&k);
    all.extend(members.iter().cloned().zip(member_taps.iter().cloned()));
    for id in &ids {
        ok(&k, &["rm", "-f", id]);
    }
    tracing::info!("template rm drains the pool (members refilled meanwhile too)");
    ok(&k, &["template", "rm", &name]);
    assert_eq!(
        leased(&k),
        Vec::<String>::new(),
        "a lease outlived its member"
    );
    for (id, tap) in &all {
        assert!(!link_exists(tap), "tap {tap} of {id} outlived it");
        assert!(
            !std::path::Path::new("/sys/fs/bpf/kiln").join(id).exists(),
            "BPF pins of {id} outlived it"
        );
    }
    let ruleset = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft");
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    for (id, _) in &all {
        assert!(!ruleset.contains(id.as_str()), "an nft rule names {id}");
    }
    k.assert_clean();
    drop_node_network();
}

/// `busybox nc` from namespace `ns` (None: the host) to `addr:port`.
fn nc_from(ns: Option<&str>, addr: &str, port: u16) -> String {
    let mut c = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "busybox"]);
            c
        }
        None => std::process::Command::new("busybox"),
    };
    let out = c
        .args(["nc", "-w", "2", addr, &port.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("nc");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_published_port_is_reachable_through_it_and_nothing_else() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let taps_before = taps();
    let host_ip = match out.addr.rsplit_once('.') {
        Some((net, _)) => format!("{net}.1"),
        None => panic!("bad address {}", out.addr),
    };
    let host_port = 20000 + (std::process::id() % 5000) as u16;
    let publish = format!("{host_port}:8000");

    tracing::info!("bad and conflicting -p are refused before anything exists");
    let bad = k.run(&["run", "--net", "default", "-p", "80", &bb, "--", "true"]);
    assert_ne!(code(&bad), 0);
    assert!(
        stderr(&bad).contains("HOSTPORT:GUESTPORT"),
        "{}",
        stderr(&bad)
    );
    let bad = k.run(&["run", "-p", &publish, &bb, "--", "true"]);
    assert!(stderr(&bad).contains("--net default"), "{}", stderr(&bad));

    let id = ok(
        &k,
        &[
            "run",
            "-d",
            "--net",
            "default",
            "-p",
            &publish,
            &bb,
            "--",
            "sh",
            "-c",
            "nc -ll -p 8000 -e echo published & nc -ll -p 8001 -e echo secret & sleep 600",
        ],
    )
    .trim()
    .to_string();
    let guest_ip = guest_addr(&k, &id).0.split('/').next().unwrap().to_string();
    let t0 = std::time::Instant::now();
    loop {
        if nc_from(Some(&out.ns), &host_ip, host_port) == "published" {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the published port never answered from outside"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    tracing::info!("reached from another host; and from the host itself");
    assert_eq!(nc_from(None, &host_ip, host_port), "published");

    tracing::info!("nothing else of the guest is reachable from outside");
    net_support::sh(&[
        "ip",
        "netns",
        "exec",
        &out.ns,
        "ip",
        "route",
        "add",
        "10.88.0.0/16",
        "via",
        &host_ip,
    ]);
    assert_eq!(nc_from(Some(&out.ns), &guest_ip, 8000), "");
    assert_eq!(nc_from(Some(&out.ns), &guest_ip, 8001), "");
    assert_eq!(nc_from(Some(&out.ns), &host_ip, host_port + 1), "");

    tracing::info!("a second sandbox cannot take the same host port");
    let before = ok(&k, &["ps", "-a", "-q"]);
    let taken = k.run(&["run", "--net", "default", "-p", &publish, &bb, "--", "true"]);
    assert_ne!(code(&taken), 0);
    assert!(
        stderr(&taken).contains("already published"),
        "{}",
        stderr(&taken)
    );
    assert_eq!(ok(&k, &["ps", "-a", "-q"]), before);

    ok(&k, &["rm", "-f", &id]);
    let table = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&table.stdout).contains(&format!("kiln:{id}")),
        "a published port outlived its sandbox"
    );
    assert_eq!(nc_from(None, &host_ip, host_port), "");
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    k.assert_clean();
    drop_node_network();
}
