//! `kiln node` as a process in its own network namespace (its own "host")
//! with its own state directory, against a fake control plane that speaks
//! the node protocol (tests/fake_cp; e2e_cluster drives the real `kiln
//! server`): registration and the stored credential, 200 sandboxes on a
//! dry-run node, and on real microVMs: create with the server's ID, output,
//! exit codes reported, `kill -9` of the node leaving its VMs running and
//! adopted after a restart (same supervisor, no second VM), fencing of a
//! sandbox moved elsewhere, deletion.

mod common;
mod fake_cp;
mod node_host;

use std::time::{Duration, Instant};

use common::{Kiln, code, stderr, stdout};
use fake_cp::FakeCp;
use kiln_api::cluster::DesiredState;
use kiln_api::sandbox::{SandboxId, SandboxSpec, SandboxState};
use node_host::{Netns, NodeProc, alive, shim_pid, spec, vmm_processes};

impl NodeProc {
    fn start(k: &Kiln, ns: &Netns, cp: &FakeCp, name: &str, extra: &[&str]) -> NodeProc {
        NodeProc::start_with_servers(k, ns, &cp.url(), name, extra)
    }
}

fn is_running(o: &Option<(u64, SandboxState)>, generation: u64) -> bool {
    matches!(o, Some((g, SandboxState::Running { .. })) if *g == generation)
}

/// A dry-run node registers (detected capacity, driver; credential stored
/// 0600), runs 200 sandboxes as records and reports each running; pause,
/// stop and delete are converged and reported; after a restart it
/// registers again presenting its stored credential.
#[test]
fn a_dry_run_node_reports_200_sandboxes() {
    let k = Kiln::new();
    let ns = Netns::new();
    let cp = FakeCp::start(&format!("{}:0", ns.host_ip), node_host::JOIN);
    let mut node = NodeProc::start(&k, &ns, &cp, "dry-1", &["--dry-run"]);
    cp.wait_for(Duration::from_secs(30), "registration", |s| {
        s.nodes.get("dry-1").is_some_and(|n| n.registrations == 1)
    });
    let cap: kiln_api::cluster::Capacity =
        serde_json::from_slice(&cp.state().nodes["dry-1"].capacity_json).expect("capacity");
    assert!(
        cap.cpus >= 1 && cap.memory_mib > 0 && cap.disk_mib > 0,
        "{cap:?}"
    );
    let cred_file = k.state_dir().join("node/credential.json");
    let t = Instant::now();
    while !cred_file.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cred_file)
            .expect("credential stored")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let t0 = Instant::now();
    let ids: Vec<SandboxId> = (0..200)
        .map(|_| cp.create("dry-1", SandboxSpec::for_image("busybox")))
        .collect();
    cp.wait_for(Duration::from_secs(60), "200 running", |s| {
        ids.iter()
            .all(|id| is_running(&s.sandboxes[id].observed, 1))
    });
    eprintln!(
        "200 dry-run sandboxes reported running in {} ms",
        t0.elapsed().as_millis()
    );
    cp.set_desired(&ids[0], DesiredState::Paused);
    cp.set_desired(&ids[1], DesiredState::Stopped);
    cp.set_desired(&ids[2], DesiredState::Deleted);
    cp.wait_for(
        Duration::from_secs(20),
        "pause, stop, delete converged",
        |s| {
            matches!(
                s.sandboxes[&ids[0]].observed,
                Some((2, SandboxState::Paused { .. }))
            ) && matches!(
                s.sandboxes[&ids[1]].observed,
                Some((2, SandboxState::Exited { .. }))
            ) && matches!(
                s.sandboxes[&ids[2]].observed,
                Some((
                    2,
                    SandboxState::Exited {
                        signal: Some(9),
                        ..
                    }
                ))
            )
        },
    );
    cp.forget(&ids[2]);
    assert_eq!(cp.state().refused, 0, "no report was refused");
    // A restart: registers with the stored credential, reports again.
    let cred = cp.state().nodes["dry-1"].credential.clone();
    node.kill9();
    let mut node = NodeProc::start(&k, &ns, &cp, "dry-1", &["--dry-run"]);
    cp.wait_for(Duration::from_secs(30), "re-registration", |s| {
        s.nodes["dry-1"].registrations == 2
    });
    assert_eq!(cp.state().nodes["dry-1"].register_auth[1], Some(cred));
    cp.wait_for(Duration::from_secs(30), "reports after the restart", |s| {
        ids[3..].iter().all(|id| s.sandboxes[id].reports.len() >= 2)
    });
    assert!(cp.state().nodes["dry-1"].heartbeats > 0);
    node.term();
    assert!(node.log().contains("registered"), "{}", node.log());
}

/// Several server URLs: a dead one is skipped; a follower's `kiln-leader`
/// hint is followed to the leader.
#[test]
fn a_node_finds_the_leader_among_several_servers() {
    let k = Kiln::new();
    let ns = Netns::new();
    let leader = FakeCp::start(&format!("{}:0", ns.host_ip), node_host::JOIN);
    let follower = FakeCp::start(&format!("{}:0", ns.host_ip), node_host::JOIN);
    follower.down(&leader.url());
    // A port nobody listens on, then the follower.
    let dead = format!("http://{}:1", ns.host_ip);
    let mut node = NodeProc::start_with_servers(
        &k,
        &ns,
        &format!("{dead},{}", follower.url()),
        "multi-1",
        &["--dry-run"],
    );
    leader.wait_for(Duration::from_secs(30), "registration at the leader", |s| {
        s.nodes.get("multi-1").is_some_and(|n| n.registrations == 1)
    });
    assert!(follower.state().unavailable > 0, "the follower was asked");
    let id = leader.create("multi-1", SandboxSpec::for_image("busybox"));
    leader.wait_for(Duration::from_secs(20), "running", |s| {
        is_running(&s.sandboxes[&id].observed, 1)
    });
    node.term();
}

/// Real microVMs: a sandbox the server assigns runs under its ID; its
/// output is in `kiln logs`; an exit code is reported; `kill -9` of the
/// node leaves the VM running and a restarted node adopts it (same
/// supervisor, one VMM) and reports it; a sandbox moved to another node is
/// removed (fencing); delete removes the VM.
#[test]
fn a_node_runs_adopts_and_removes_real_microvms() {
    let k = Kiln::new();
    let ns = Netns::new();
    let cp = FakeCp::start(&format!("{}:0", ns.host_ip), node_host::JOIN);
    let mut node = NodeProc::start(&k, &ns, &cp, "real-1", &[]);
    cp.wait_for(Duration::from_secs(60), "registration", |s| {
        s.nodes.get("real-1").is_some_and(|n| n.registrations == 1)
    });
    let t0 = Instant::now();
    let a = cp.create(
        "real-1",
        spec(&["sh", "-c", "echo hello-from-node; exec sleep 600"]),
    );
    let b = cp.create("real-1", spec(&["sh", "-c", "exit 3"]));
    cp.wait_for(Duration::from_secs(120), "A running", |s| {
        is_running(&s.sandboxes[&a].observed, 1)
    });
    eprintln!("A reported running in {} ms", t0.elapsed().as_millis());
    cp.wait_for(Duration::from_secs(120), "B exited 3", |s| {
        matches!(
            s.sandboxes[&b].observed,
            Some((1, SandboxState::Exited { exit_code: 3, .. }))
        )
    });
    // Its output, through the node's own state directory.
    let t1 = Instant::now();
    loop {
        let out = k.run(&["logs", a.as_str()]);
        if stdout(&out).contains("hello-from-node") {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "no output: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let shim = shim_pid(k.state_dir(), &a).expect("A has a supervisor");
    assert!(alive(shim));
    assert_eq!(vmm_processes(k.state_dir(), &a).len(), 1, "one VMM for A");

    // The server unreachable for a while: nothing stops.
    cp.down("");
    std::thread::sleep(Duration::from_secs(3));
    assert!(alive(shim), "the sandbox runs on while the server is down");
    assert!(
        matches!(node.child.try_wait(), Ok(None)),
        "the node runs on"
    );
    let beats = cp.state().nodes["real-1"].heartbeats;
    cp.up();
    cp.wait_for(Duration::from_secs(30), "heartbeats again", |s| {
        s.nodes["real-1"].heartbeats > beats
    });
    assert!(is_running(&cp.observed(&a), 1));

    // kill -9 of the node: the VM runs on.
    node.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(shim), "the supervisor survived the node");
    let reports_before = cp.reports(&a).len();
    let node_log_before = node.log().len();
    let mut node = NodeProc::start(&k, &ns, &cp, "real-1", &[]);
    cp.wait_for(
        Duration::from_secs(60),
        "A reported again after the restart",
        |s| s.nodes["real-1"].registrations == 2 && s.sandboxes[&a].reports.len() > reports_before,
    );
    assert!(is_running(&cp.observed(&a), 1), "{:?}", cp.observed(&a));
    assert_eq!(shim_pid(k.state_dir(), &a), Some(shim), "same supervisor");
    assert!(alive(shim));
    assert_eq!(
        vmm_processes(k.state_dir(), &a).len(),
        1,
        "no second VM for A"
    );
    assert!(
        !node.log()[node_log_before.min(node.log().len())..].contains("created"),
        "nothing was created again: {}",
        node.log()
    );

    // Fencing: moved to another node, it is removed here.
    cp.reassign(&b, "elsewhere");
    let c = cp.create("real-1", spec(&["sleep", "600"]));
    cp.wait_for(Duration::from_secs(120), "C running", |s| {
        is_running(&s.sandboxes[&c].observed, 1)
    });
    cp.reassign(&c, "elsewhere");
    let t2 = Instant::now();
    while k.state_dir().join("sandboxes").join(c.as_str()).exists()
        || k.state_dir().join("sandboxes").join(b.as_str()).exists()
    {
        assert!(
            t2.elapsed() < Duration::from_secs(60),
            "fenced sandboxes were not removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(vmm_processes(k.state_dir(), &c).is_empty());

    // Delete: the VM goes, the final state is reported at the new generation.
    cp.set_desired(&a, DesiredState::Deleted);
    cp.wait_for(
        Duration::from_secs(60),
        "A deleted",
        |s| matches!(&s.sandboxes[&a].observed, Some((2, st)) if st.is_finished()),
    );
    assert!(!k.state_dir().join("sandboxes").join(a.as_str()).exists());
    assert!(!alive(shim));
    assert!(vmm_processes(k.state_dir(), &a).is_empty());
    cp.forget(&a);
    assert_eq!(cp.state().refused, 0, "no report was refused");
    node.term();
    let ps = k.run(&["ps", "-a", "-q"]);
    assert_eq!(code(&ps), 0);
    assert!(stdout(&ps).trim().is_empty(), "left: {}", stdout(&ps));
    k.assert_clean();
}

/// 20 real microVMs assigned at once start in parallel (bounded by the
/// node's CPUs × 2) and are all reported running, then all deleted.
#[test]
fn twenty_real_microvms_converge_in_parallel() {
    let k = Kiln::new();
    let ns = Netns::new();
    let cp = FakeCp::start(&format!("{}:0", ns.host_ip), node_host::JOIN);
    let mut node = NodeProc::start(&k, &ns, &cp, "real-20", &[]);
    cp.wait_for(Duration::from_secs(60), "registration", |s| {
        s.nodes.get("real-20").is_some_and(|n| n.registrations == 1)
    });
    let t0 = Instant::now();
    let ids: Vec<SandboxId> = (0..20)
        .map(|_| cp.create("real-20", spec(&["sleep", "600"])))
        .collect();
    cp.wait_for(Duration::from_secs(300), "20 running", |s| {
        ids.iter()
            .all(|id| is_running(&s.sandboxes[id].observed, 1))
    });
    let started = t0.elapsed();
    eprintln!(
        "20 real microVMs reported running in {} ms",
        started.as_millis()
    );
    for id in &ids {
        assert_eq!(
            vmm_processes(k.state_dir(), id).len(),
            1,
            "one VMM for {id}"
        );
    }
    let t1 = Instant::now();
    for id in &ids {
        cp.set_desired(id, DesiredState::Deleted);
    }
    cp.wait_for(Duration::from_secs(120), "20 deleted", |s| {
        ids.iter()
            .all(|id| matches!(&s.sandboxes[id].observed, Some((2, st)) if st.is_finished()))
    });
    eprintln!(
        "20 real microVMs deleted in {} ms",
        t1.elapsed().as_millis()
    );
    for id in &ids {
        cp.forget(id);
    }
    assert_eq!(cp.state().refused, 0, "no report was refused");
    node.term();
    k.assert_clean();
}
