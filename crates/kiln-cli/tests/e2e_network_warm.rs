//! Networking for everything that is not a cold boot, through the `kiln`
//! binary on real microVMs: restores of a snapshot of a networked sandbox
//! and forks of it get their own tap, address and MAC (configured in the
//! guest after the restore), keep the policy, reach an allowed server in a
//! namespace, and leave the parent working; nothing outlives them.

mod common;
mod net_support;

use common::{Kiln, busybox};
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
