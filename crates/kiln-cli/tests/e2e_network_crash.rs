//! `kill -9` of every Kiln process on the host, on real microVMs with a
//! network: the CLI of a foreground `kiln run`, every supervisor (one of
//! them holds the node's DNS resolver) and then the VMMs. While only the
//! guests' VMMs are left, their policies are still enforced (the pins own
//! the programs and maps: no Kiln process is needed), counted on the
//! receiving side; after the VMMs die too, the next `kiln` command (the
//! reconciler) removes the taps, BPF programs, pins and nftables rules
//! they left, and the counts are as before the test.

mod common;
mod net_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kiln, busybox, stderr};
use net_support::{Outside, ok, sh, taps};

/// Packets counted by the rule of the outside namespace's chain whose text
/// contains `needle`.
fn counted(ns: &str, needle: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "list", "chain", "inet", "cnt", "in",
        ])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(needle) && l.contains("counter"))
        .unwrap_or_else(|| panic!("no counter {needle}: {text}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "packets").expect("packets");
    w[i + 1].parse().expect("count")
}

/// Rules in the `inet kiln` table (0 when there is none).
fn nft_rules() -> usize {
    let out = Command::new("nft")
        .args(["-a", "list", "table", "inet", "kiln"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("# handle") && !l.trim_start().starts_with("chain"))
        .filter(|l| !l.contains("table inet kiln"))
        .count()
}

/// Sandbox pin directories under `/sys/fs/bpf/kiln`.
fn pin_dirs() -> usize {
    std::fs::read_dir("/sys/fs/bpf/kiln")
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

#[derive(Debug, PartialEq, Eq)]
struct Counts {
    taps: usize,
    programs: usize,
    pins: usize,
    nft_rules: usize,
}

fn counts() -> Counts {
    Counts {
        taps: taps(),
        programs: kiln_net::bpf::loaded_policy_programs(),
        pins: pin_dirs(),
        nft_rules: nft_rules(),
    }
}

/// `kill -9` of this state directory's processes whose command line
/// matches `pick`; their pids.
fn kill_9(k: &Kiln, pick: impl Fn(&str) -> bool) -> Vec<i32> {
    let mut killed = vec![];
    for p in k.leftover_processes() {
        let Some((pid, cmd)) = p.split_once(": ") else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if pick(cmd) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    killed
}

fn is_vmm(cmd: &str) -> bool {
    cmd.contains("qemu") || cmd.contains("firecracker")
}

#[test]
fn kill_9_of_every_kiln_process_keeps_policies_and_leaks_nothing() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    let out = Outside::new();
    let addr = out.addr.clone();
    // A bridge and table no sandbox uses (an earlier failed test's) go
    // first, so that "before" is the host without Kiln's network.
    net_support::drop_node_network();
    let before = counts();
    tracing::info!(?before, "host network objects before");
    let script = "table inet cnt {\n chain in {\n  type filter hook input priority 0; \
                  policy accept;\n  tcp dport 8080 tcp flags syn counter\n  \
                  tcp dport 9090 tcp flags syn counter\n }\n}\n";
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("cnt.nft");
    std::fs::write(&f, script).expect("write");
    sh(&[
        "ip",
        "netns",
        "exec",
        &out.ns,
        "nft",
        "-f",
        f.to_str().expect("utf-8"),
    ]);
    let cnt = |port: &str| counted(&out.ns, &format!("dport {port}"));

    tracing::info!("A: a guest that keeps trying an allowed and a denied port, with -p");
    let allow = format!("{addr}/32:tcp:8080");
    let loop_sh = format!(
        "while true; do nc -w 1 {addr} 8080 </dev/null; nc -w 1 {addr} 9090 </dev/null; \
         sleep 0.3; done"
    );
    let a = ok(
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
            "-p",
            "18089:80",
            &bb,
            "--",
            "sh",
            "-c",
            &loop_sh,
        ],
    )
    .trim()
    .to_string();
    tracing::info!("B: a foreground kiln run (its CLI is alive when killed)");
    let mut b_cli = k
        .cmd()
        .args(["run", "--net", "default", &bb, "--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln run");
    let t0 = Instant::now();
    while ok(&k, &["ps", "-q"]).lines().count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "B never ran");
        std::thread::sleep(Duration::from_millis(300));
    }
    let t0 = Instant::now();
    while cnt("8080") < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "A never reached 8080"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cnt("9090"), 0, "a denied SYN arrived");
    let during = counts();
    assert_eq!(during.taps, before.taps + 2, "{during:?}");
    assert_eq!(during.programs, before.programs + 4, "{during:?}");

    tracing::info!("kill -9: the CLI and every supervisor (the DNS resolver's holder too)");
    let _ = b_cli.kill();
    let _ = b_cli.wait();
    let killed = kill_9(&k, |cmd| !is_vmm(cmd));
    assert!(killed.len() >= 2, "supervisors killed: {killed:?}");
    std::thread::sleep(Duration::from_millis(500));
    let left: Vec<String> = k
        .leftover_processes()
        .into_iter()
        .filter(|p| !is_vmm(p))
        .collect();
    assert!(left.is_empty(), "Kiln processes survived: {left:?}");
    let vmms = k.leftover_processes().len();
    assert!(vmms >= 2, "the VMMs should still run: {vmms}");

    tracing::info!("only VMMs left: the guest still reaches 8080, never 9090");
    let c1 = cnt("8080");
    let t0 = Instant::now();
    while cnt("8080") < c1 + 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the allowed port is no longer reached with the supervisors gone"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cnt("9090"), 0, "a denied SYN arrived with no Kiln process");
    assert!(Path::new("/sys/fs/bpf/kiln").join(&a).exists(), "pins");

    tracing::info!("kill -9 of the VMMs: nothing of Kiln runs; the next command repairs");
    let killed = kill_9(&k, is_vmm);
    assert!(killed.len() >= 2, "VMMs killed: {killed:?}");
    let t0 = Instant::now();
    while !k.leftover_processes().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "a VMM survived");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ps = k.run(&["ps", "-a"]);
    assert!(ps.status.success(), "{}", stderr(&ps));
    let after = counts();
    assert_eq!(
        (after.taps, after.programs, after.pins),
        (before.taps, before.programs, before.pins),
        "the reconciler left network objects: {after:?} vs {before:?}"
    );
    let nft = Command::new("nft")
        .args(["list", "table", "inet", "kiln"])
        .output()
        .expect("nft");
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(
        !nft.contains(&format!("kiln:{a}")),
        "A's -p rule left: {nft}"
    );

    tracing::info!("removed: as before the test");
    for id in ok(&k, &["ps", "-a", "-q"]).lines() {
        ok(&k, &["rm", "-f", id]);
    }
    k.assert_clean();
    drop(out);
    net_support::drop_node_network();
    assert_eq!(counts(), before, "the host's network objects differ");
}
