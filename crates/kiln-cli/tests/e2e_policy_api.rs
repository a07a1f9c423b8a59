//! A sandbox's network policy through the REST API, enforced live by a
//! real node: a `kiln server` replica in this process (listening on the
//! root side of a veth pair) and a `kiln node` process in its own network
//! namespace (its own bridge, NAT and BPF programs) running a real microVM.
//!
//! The sandbox is created with `POST /v1/sandboxes` and a policy that
//! allows one TCP server on the root side and denies another; the guest
//! connects in a loop and the servers record what they accept. Then
//! `PUT /v1/sandboxes/{id}/policy` flips the first server between denied
//! and allowed several times, without restarting the sandbox (same
//! supervisor, same VMM process), and the time from the PUT's answer to
//! the flip is measured. An invalid policy is a 400 and the policy in
//! force stays; another tenant sees 404.

mod common;
mod net_support;
mod node_host;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Kiln;
use kiln_api::cluster::{Quotas, Role, TenantName};
use kiln_api::sandbox::{NetworkSpec, PolicyAction, PolicyRule, SandboxId, SandboxState};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Command, State};
use node_host::{JOIN, Netns, NodeProc, shim_pid, spec, vmm_processes};

const TOKEN: &str = "tenant-acme-secret-0123456789abcdef";
const OTHER_TOKEN: &str = "tenant-other-secret-0123456789abcdef";

/// One initialised replica on `ip`, with tenants `acme` and `other`.
struct OneServer {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
}

impl OneServer {
    fn start(ip: &str) -> OneServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-server-")
            .tempdir_in("/tmp")
            .expect("server dir");
        let mut cfg = ServerConfig::new(
            1,
            format!("{ip}:0").parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
            dir.path(),
            JOIN,
        );
        cfg.init = true;
        // The node runs the test's busybox OCI layout from its disk.
        cfg.allow_local_images = true;
        cfg.heartbeat_interval_ms = 300;
        cfg.grace_ms = 10_000;
        cfg.reconcile_ms = 100;
        let server = rt.block_on(Server::start(cfg)).expect("kiln server starts");
        let t0 = Instant::now();
        while server.raft().status().role != kiln_store::RaftRole::Leader {
            assert!(t0.elapsed() < Duration::from_secs(20), "no leader");
            std::thread::sleep(Duration::from_millis(50));
        }
        let s = OneServer {
            rt,
            server: Some(server),
            _dir: dir,
        };
        for (i, (name, token)) in [("acme", TOKEN), ("other", OTHER_TOKEN)]
            .into_iter()
            .enumerate()
        {
            let tenant = TenantName::new(name).expect("tenant");
            s.write(Command::CreateTenant {
                name: tenant.clone(),
                quotas: Quotas {
                    sandboxes: 10,
                    cpus: 100,
                    memory_mib: 100_000,
                },
                now_ms: 1,
            });
            s.write(Command::CreateToken {
                id: format!("{name}-{i}"),
                tenant: Some(tenant),
                role: Role::Tenant,
                sha256: kiln_store::query::hash_token(token),
                description: String::new(),
                now_ms: 2,
                node: None,
            });
        }
        s
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn url(&self) -> String {
        self.server().api_url().to_string()
    }

    fn write(&self, cmd: Command) {
        let r = self
            .rt
            .block_on(self.server().raft().write(cmd))
            .expect("write");
        assert!(!r.is_rejected(), "rejected: {r:?}");
    }

    /// `curl` against the REST API: (status, body).
    fn rest(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("{}{path}", self.url()));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = c.output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            status.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.server().raft().read_local(f)
    }

    fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&State) -> bool) {
        let t0 = Instant::now();
        while !self.read(&f) {
            assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for OneServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// A TCP server on the root side that records when it accepts.
struct Recorder {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn new(ip: &str) -> Recorder {
        let l = TcpListener::bind(format!("{ip}:0")).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        a.lock().expect("lock").push(Instant::now());
                        drop(c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Recorder {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn times(&self) -> Vec<Instant> {
        self.accepted.lock().expect("lock").clone()
    }

    fn count(&self) -> usize {
        self.accepted.lock().expect("lock").len()
    }

    /// The first accept after `t`, waiting up to `limit`.
    fn first_after(&self, t: Instant, limit: Duration) -> Option<Instant> {
        let t0 = Instant::now();
        loop {
            if let Some(x) = self.times().into_iter().find(|x| *x > t) {
                return Some(x);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rules_allowing(addr: Option<SocketAddr>) -> Vec<PolicyRule> {
    addr.map(|a| PolicyRule {
        action: PolicyAction::Allow,
        rule: format!("{}:tcp:{}", a.ip(), a.port()),
    })
    .into_iter()
    .collect()
}

/// The body of a PUT: preset `none`, default deny, `rules`.
fn policy_body(rules: &[PolicyRule]) -> String {
    serde_json::json!({"policy": "none", "policy_default": "deny", "rules": rules}).to_string()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A second address on the root side of `ns`'s veth (`10.251.N.1`, where
/// `host_ip` is `10.250.N.1`), routed from inside the namespace; it goes
/// with the veth and the namespace.
fn service_ip(ns: &Netns) -> String {
    extra_ip(ns, 251)
}

/// `10.X.N.1` on the root side of `ns`'s veth, routed from inside it.
fn extra_ip(ns: &Netns, x: u8) -> String {
    let n = ns.host_ip.split('.').nth(2).expect("10.250.N.1");
    let ip = format!("10.{x}.{n}.1");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["ip", "addr", "add", &format!("{ip}/32"), "dev", &ns.veth]);
    run(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "ip",
        "route",
        "replace",
        &format!("{ip}/32"),
        "via",
        &ns.host_ip,
    ]);
    ip
}

#[test]
fn a_policy_changed_through_the_api_is_enforced_live_by_the_node() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let ns = Netns::new();
    let srv = OneServer::start(&ns.host_ip);
    // The test's TCP servers listen on an address of their own: the API
    // refuses rules that would open the control plane's addresses (the
    // server listens on `host_ip`) to a tenant's sandbox.
    let svc = service_ip(&ns);
    let allowed = Recorder::new(&svc);
    let denied = Recorder::new(&svc);
    let mut node = NodeProc::start_with_servers(&k, &ns, &srv.url(), "host-p", &[]);
    srv.wait_for(Duration::from_secs(60), "the node registered", |s| {
        s.nodes.keys().any(|n| n.as_str() == "host-p")
    });

    // The guest connects to the first server in a tight loop and to the
    // second one every second (a denied attempt waits its 1 s timeout).
    let (a, b) = (allowed.addr, denied.addr);
    let script = format!(
        "(while true; do nc -w 1 {} {} </dev/null >/dev/null 2>&1; sleep 1; done) & \
         while true; do nc -w 1 {} {} </dev/null >/dev/null 2>&1; done",
        b.ip(),
        b.port(),
        a.ip(),
        a.port()
    );
    let mut sp = spec(&["sh", "-c", &script]);
    sp.network = NetworkSpec::Default {
        policy: Some("none".into()),
        policy_default: Some(PolicyAction::Deny),
        rules: rules_allowing(Some(a)),
        publish: vec![],
    };
    // An invalid rule in a create is refused before anything is placed.
    let mut bad = sp.clone();
    if let NetworkSpec::Default { rules, .. } = &mut bad.network {
        rules[0].rule = "10.0.0.0/33:tcp:80".into();
    }
    let (status, body) = srv.rest(
        TOKEN,
        "POST",
        "/v1/sandboxes",
        Some(&serde_json::to_string(&bad).expect("json")),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("prefix length")),
        "{body}"
    );

    let (status, created) = srv.rest(
        TOKEN,
        "POST",
        "/v1/sandboxes",
        Some(&serde_json::to_string(&sp).expect("json")),
    );
    assert_eq!(status, 201, "{created}");
    let id: SandboxId = serde_json::from_value(created["id"].clone()).expect("an ID");
    srv.wait_for(Duration::from_secs(180), "the sandbox running", |s| {
        s.sandboxes
            .get(&id)
            .is_some_and(|r| matches!(r.observed, SandboxState::Running { .. }))
    });
    assert!(
        allowed
            .first_after(
                Instant::now() - Duration::from_secs(600),
                Duration::from_secs(60)
            )
            .is_some(),
        "the allowed server was never reached; node log:\n{}",
        node.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(allowed.count() >= 3, "the guest's loop stalled");
    assert_eq!(denied.count(), 0, "the denied server was reached");
    let shim = shim_pid(k.state_dir(), &id).expect("a supervisor");
    let vmms = vmm_processes(k.state_dir(), &id);
    assert_eq!(vmms.len(), 1);

    // The policy as the API shows it; another tenant sees nothing.
    let path = format!("/v1/sandboxes/{id}/policy");
    let (status, got) = srv.rest(TOKEN, "GET", &path, None);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["revision"], 1, "{got}");
    assert_eq!(got["applied"], true, "{got}");
    assert_eq!(
        got["policy"]["rules"][0]["rule"],
        format!("{}:tcp:{}", a.ip(), a.port())
    );
    for method in ["GET", "PUT"] {
        let body = (method == "PUT").then(|| policy_body(&[]));
        let (status, e) = srv.rest(OTHER_TOKEN, method, &path, body.as_deref());
        assert_eq!(status, 404, "{method}: {e}");
    }

    // Flips: denied, allowed, denied, allowed, denied, allowed.
    let mut to_denied = vec![];
    let mut to_applied = vec![];
    let mut to_allowed = vec![];
    for flip in 0..6 {
        let allow = flip % 2 == 1;
        let rules = rules_allowing(allow.then_some(a));
        let (status, put) = srv.rest(TOKEN, "PUT", &path, Some(&policy_body(&rules)));
        let ack = Instant::now();
        assert_eq!(status, 200, "{put}");
        let revision = put["revision"].as_u64().expect("a revision");
        srv.wait_for(Duration::from_secs(30), "the node enforcing it", |s| {
            s.sandboxes[&id].observed_generation >= revision
        });
        let applied = Instant::now();
        to_applied.push(millis(applied - ack));
        if allow {
            let first = allowed
                .first_after(ack, Duration::from_secs(10))
                .expect("the server is reached again once allowed");
            to_allowed.push(millis(first.saturating_duration_since(ack)));
        } else {
            // Connections already on their way may still land; none after
            // the node reported the new policy.
            std::thread::sleep(Duration::from_secs(3));
            let times = allowed.times();
            let late: Vec<_> = times
                .iter()
                .filter(|t| **t > applied + Duration::from_millis(100))
                .collect();
            assert!(
                late.is_empty(),
                "flip {flip}: {} connections accepted after the denying policy was applied",
                late.len()
            );
            let last = times.iter().max().copied().unwrap_or(ack);
            to_denied.push(millis(last.saturating_duration_since(ack)));
        }
        let (_, got) = srv.rest(TOKEN, "GET", &path, None);
        assert_eq!(got["revision"].as_u64(), Some(revision), "{got}");
        assert_eq!(got["applied"], true, "{got}");
    }
    eprintln!(
        "PUT answered → node reports applied, ms: {to_applied:?} (p50 {:.1})",
        p50(to_applied.clone())
    );
    eprintln!(
        "PUT answered → last accepted connection (allow→deny), ms: {to_denied:?} (p50 {:.1})",
        p50(to_denied.clone())
    );
    eprintln!(
        "PUT answered → first accepted connection (deny→allow), ms: {to_allowed:?} (p50 {:.1})",
        p50(to_allowed.clone())
    );

    // An invalid policy: a precise 400, and the one in force stays.
    let (_, before) = srv.rest(TOKEN, "GET", &path, None);
    let generation = srv.read(|s| s.sandboxes[&id].generation);
    let bad = [PolicyRule {
        action: PolicyAction::Deny,
        rule: format!("{}:tcp:70000", a.ip()),
    }];
    let (status, e) = srv.rest(TOKEN, "PUT", &path, Some(&policy_body(&bad)));
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_policy", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("1-65535")),
        "{e}"
    );
    let (status, e) = srv.rest(
        TOKEN,
        "PUT",
        &path,
        Some(r#"{"policy": "/etc/kiln/policy.toml"}"#),
    );
    assert_eq!(status, 400, "{e}");
    let (status, e) = srv.rest(TOKEN, "PUT", &path, Some(r#"{"rulez": []}"#));
    assert_eq!(status, 400, "{e}");
    let (_, after) = srv.rest(TOKEN, "GET", &path, None);
    assert_eq!(before, after);
    assert_eq!(srv.read(|s| s.sandboxes[&id].generation), generation);
    // A tenant's rule may not open the control plane's addresses, the
    // node's, cloud metadata or other sandboxes (a local admin's may).
    for opens in [
        format!("{}:tcp", ns.host_ip),
        "10.250.0.0/16:tcp".to_owned(),
        "169.254.169.254:tcp:80".to_owned(),
        "10.88.0.5".to_owned(),
    ] {
        let rules = [PolicyRule {
            action: PolicyAction::Allow,
            rule: opens.clone(),
        }];
        let (status, e) = srv.rest(TOKEN, "PUT", &path, Some(&policy_body(&rules)));
        let protected_refused = status == 400
            && e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("protected destination"));
        // A /16 around the server's address does not lie inside its /32:
        // it is allowed, and opens nothing protected on the node.
        if opens.starts_with("10.250.0.0/16") {
            assert_eq!(status, 200, "{opens}: {e}");
        } else {
            assert!(protected_refused, "{opens}: {status} {e}");
        }
    }
    let rules = rules_allowing(Some(a));
    let (status, e) = srv.rest(TOKEN, "PUT", &path, Some(&policy_body(&rules)));
    assert_eq!(status, 200, "{e}");
    srv.wait_for(
        Duration::from_secs(30),
        "the allowing policy applied again",
        |s| {
            let r = &s.sandboxes[&id];
            r.observed_generation >= r.generation
        },
    );
    let t = Instant::now();
    assert!(
        allowed.first_after(t, Duration::from_secs(10)).is_some(),
        "the policy in force (allowing) was lost"
    );
    assert_eq!(denied.count(), 0, "the denied server was reached");

    // Another node of the cluster is protected like the node's own
    // addresses: a tenant's broad rule that reached its address before it
    // joined does not once it has (the node refreshes running sandboxes).
    let other_ip = extra_ip(&ns, 252);
    let other = Recorder::new(&other_ip);
    let mut rules = rules_allowing(Some(a));
    rules.push(PolicyRule {
        action: PolicyAction::Allow,
        rule: "10.252.0.0/16:tcp".into(),
    });
    let (status, e) = srv.rest(TOKEN, "PUT", &path, Some(&policy_body(&rules)));
    assert_eq!(status, 200, "{e}");
    srv.wait_for(Duration::from_secs(30), "the broad rule applied", |s| {
        let r = &s.sandboxes[&id];
        r.observed_generation >= r.generation
    });
    let probe = format!(
        "nc -w 2 {} {} </dev/null",
        other.addr.ip(),
        other.addr.port()
    );
    let _ = k.run(&["exec", id.as_str(), "--", "sh", "-c", &probe]);
    assert_eq!(
        other.count(),
        1,
        "the broad rule did not reach an ordinary address"
    );
    srv.write(Command::RegisterNode {
        name: kiln_api::cluster::NodeName::new("host-q").expect("name"),
        address: other.addr.to_string(),
        capacity: kiln_api::cluster::Capacity {
            cpus: 1,
            memory_mib: 1024,
            disk_mib: 1024,
        },
        driver: kiln_api::cluster::DriverKind::QemuTcg,
        labels: Default::default(),
        images: Default::default(),
        now_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    });
    let cluster_file = k.state_dir().join("net").join("protected-cidrs.cluster");
    let t = Instant::now();
    while !std::fs::read_to_string(&cluster_file)
        .unwrap_or_default()
        .contains(&format!("{other_ip}/32"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the node never protected the other node's address; log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The running sandbox's policy is recompiled right after the file.
    while !node.log().contains("other nodes' addresses protected") {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = k.run(&["exec", id.as_str(), "--", "sh", "-c", &probe]);
    assert_eq!(other.count(), 1, "the broad rule reached another node");
    assert!(
        allowed
            .first_after(Instant::now(), Duration::from_secs(10))
            .is_some(),
        "the narrow rule stopped working"
    );
    drop(other);

    // Never restarted: same supervisor, same VMM process.
    assert_eq!(shim_pid(k.state_dir(), &id), Some(shim));
    assert_eq!(vmm_processes(k.state_dir(), &id), vmms);

    let (status, body) = srv.rest(TOKEN, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert!((200..300).contains(&status), "{status} {body}");
    srv.wait_for(Duration::from_secs(60), "the sandbox forgotten", |s| {
        !s.sandboxes.contains_key(&id)
    });
    let t = Instant::now();
    while k.state_dir().join("sandboxes").join(id.as_str()).exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "its record stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vmm_processes(k.state_dir(), &id).is_empty());
    node.term();
    assert!(node.log().contains("policy updated live"), "{}", node.log());
    k.assert_clean();
}
