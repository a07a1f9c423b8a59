//! Sandbox networking through the `kiln` binary on real microVMs: `--net
//! default` gives the guest an address, a route and NAT; the policy given
//! with `--allow`/`--deny`/`--policy-default` is enforced on real traffic
//! to a server in a network namespace; `kiln policy set` changes it live;
//! `kiln policy get` counts; bad rules are refused with the old policy kept;
//! nothing (tap, BPF pins) outlives the sandbox. `--net none` has no device.

mod common;
mod net_support;

use std::time::Instant;

use common::{Kiln, busybox, code, stderr};
use net_support::{Outside, ok, reach, taps};

#[test]
fn policies_are_enforced_on_real_traffic_and_changed_live() {
    let _net = net_support::exclusive();
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

    tracing::info!("removed: its tap and policy program are gone");
    ok(&k, &["rm", "-f", &id]);
    assert_eq!(taps(), taps_before, "a tap outlived its sandbox");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/kiln").join(&id).exists(),
        "BPF pins outlived the sandbox"
    );
    k.assert_clean();
    // The node's bridge and NAT table go too when nothing uses them.
    net_support::drop_node_network();
}
