//! Networking for everything that is not a cold boot, through the `kiln`
//! binary on real microVMs: restores of a snapshot of a networked sandbox
//! and forks of it get their own tap, address and MAC (configured in the
//! guest after the restore), keep the policy, reach an allowed server in a
//! namespace, and leave the parent working; warm starts from a networked
//! template (its VM has a NIC on a placeholder tap) likewise; nothing
//! outlives them.

mod common;
mod net_support;

use common::{Kiln, busybox, code, stderr};
use net_support::{Outside, drop_node_network, guest_addr, ok, reach, taps};

#[test]
fn restores_and_forks_of_a_networked_sandbox_get_their_own_address() {
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
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    let taps_before = taps();
    let allow = format!("{addr}/32:tcp:8080");

    tracing::info!("a pool of a networked template is refused before anything is made");
    let refused = k.run(&["template", "create", "--net", "default", "--pool", "1", &bb]);
    assert_ne!(code(&refused), 0);
    assert!(
        stderr(&refused).contains("pools of networked templates"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(ok(&k, &["template", "ls", "-q"]).trim(), "");

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
