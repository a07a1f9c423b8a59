//! The real control plane and a real node: a `kiln server` replica
//! (`kiln_server::Server`, in this process: Raft with redb, the node
//! protocol, the leader's scheduler and reconcile loop) listening on the
//! root side of a veth pair, and a `kiln node` process in its own network
//! namespace with its own state directory. Sandboxes are created with
//! `POST /v1/sandboxes` and through the replicated state
//! (`Command::CreateSandbox` without a node: the
//! leader's scheduler places them), as the REST API will once it exists.
//!
//! Real microVMs: a sandbox runs on the node, its output is in `kiln logs`
//! of the node's state directory; `kill -9` of the node leaves its VM
//! running and the restarted node adopts it (same supervisor, one VMM) and
//! reports it; delete removes the VM and the server forgets the sandbox.
//! A dry-run node runs 200 sandboxes reported running.

mod common;
mod node_host;

use std::time::{Duration, Instant};

use common::{Kiln, stderr, stdout};
use kiln_api::cluster::{DesiredState, Quotas, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxSpec, SandboxState};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Command, State};
use node_host::{JOIN, Netns, NodeProc, alive, shim_pid, spec, vmm_processes};

/// One initialised replica on `ip` (its API and node protocol).
struct OneServer {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
    tenant: TenantName,
    /// A tenant token for the REST API.
    token: String,
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
        let tenant = TenantName::new("acme").expect("tenant");
        rt.block_on(server.raft().write(Command::CreateTenant {
            name: tenant.clone(),
            quotas: Quotas {
                sandboxes: 1000,
                cpus: 10_000,
                memory_mib: 10_000_000,
            },
            now_ms: 1,
        }))
        .expect("tenant");
        let token = "tenant-acme-secret-0123456789abcdef".to_string();
        rt.block_on(server.raft().write(Command::CreateToken {
            id: "acme-1".into(),
            tenant: Some(tenant.clone()),
            role: kiln_api::cluster::Role::Tenant,
            sha256: kiln_store::query::hash_token(&token),
            description: String::new(),
            now_ms: 2,
            node: None,
        }))
        .expect("token");
        OneServer {
            rt,
            server: Some(server),
            _dir: dir,
            tenant,
            token,
        }
    }

    /// `curl` against the REST API with the tenant's token: (status, body).
    fn rest(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}{path}", self.url()));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = c.output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let status = status.trim().parse().unwrap_or(0);
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn url(&self) -> String {
        self.server().api_url().to_string()
    }

    fn write(&self, cmd: Command) -> kiln_store::Response {
        let r = self
            .rt
            .block_on(self.server().raft().write(cmd))
            .expect("write");
        assert!(
            !matches!(r, kiln_store::Response::Rejected(_)),
            "rejected: {r:?}"
        );
        r
    }

    /// A new sandbox, placed by the leader's scheduler.
    fn create(&self, spec: SandboxSpec) -> SandboxId {
        let mut b = [0u8; 8];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .expect("urandom");
        let id = SandboxId::from_random(b);
        self.write(Command::CreateSandbox {
            id: id.clone(),
            tenant: self.tenant.clone(),
            spec,
            idempotency_key: None,
            node: None,
            now_ms: now_ms(),
        });
        id
    }

    fn delete(&self, id: &SandboxId) {
        self.write(Command::SetDesired {
            tenant: Some(self.tenant.clone()),
            id: id.clone(),
            desired: DesiredState::Deleted,
            stop_grace_secs: None,
        });
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.server().raft().read_local(f)
    }

    fn observed(&self, id: &SandboxId) -> Option<(u64, SandboxState)> {
        self.read(|s| {
            s.sandboxes
                .get(id)
                .map(|r| (r.observed_generation, r.observed.clone()))
        })
    }

    fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&State) -> bool) {
        let t0 = Instant::now();
        while !self.read(&f) {
            assert!(
                t0.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn running(s: &State, id: &SandboxId) -> bool {
    s.sandboxes
        .get(id)
        .is_some_and(|r| matches!(r.observed, SandboxState::Running { .. }))
}

#[test]
fn a_real_node_runs_adopts_and_deletes_microvms_for_the_server() {
    let k = Kiln::new();
    let ns = Netns::new();
    let srv = OneServer::start(&ns.host_ip);
    let mut node = NodeProc::start_with_servers(&k, &ns, &srv.url(), "host-a", &[]);
    srv.wait_for(Duration::from_secs(60), "the node registered", |s| {
        s.nodes.keys().any(|n| n.as_str() == "host-a")
    });
    let t0 = Instant::now();
    // Through the REST API, as a client would.
    let body = serde_json::to_string(&spec(&[
        "sh",
        "-c",
        "echo hello-through-the-server; exec sleep 600",
    ]))
    .expect("json");
    let (status, created) = srv.rest("POST", "/v1/sandboxes", Some(&body));
    assert_eq!(status, 201, "{created}");
    let a: SandboxId = serde_json::from_value(created["id"].clone()).expect("an ID");
    srv.wait_for(Duration::from_secs(120), "A running", |s| running(s, &a));
    eprintln!(
        "create → running through the server: {} ms",
        t0.elapsed().as_millis()
    );
    let placed = srv.read(|s| s.sandboxes[&a].node.clone());
    assert_eq!(placed.map(|n| n.to_string()).as_deref(), Some("host-a"));
    let t1 = Instant::now();
    loop {
        let out = k.run(&["logs", a.as_str()]);
        if stdout(&out).contains("hello-through-the-server") {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "no output: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let shim = shim_pid(k.state_dir(), &a).expect("a supervisor");
    assert_eq!(vmm_processes(k.state_dir(), &a).len(), 1);

    // kill -9 of the node: the VM runs on; the restarted node adopts it.
    node.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(shim), "the supervisor outlived the node");
    let at_before = srv.read(|s| s.sandboxes[&a].observed_at_ms);
    let mut node = NodeProc::start_with_servers(&k, &ns, &srv.url(), "host-a", &[]);
    srv.wait_for(Duration::from_secs(60), "A reported again", |s| {
        s.sandboxes[&a].observed_at_ms > at_before && running(s, &a)
    });
    assert_eq!(shim_pid(k.state_dir(), &a), Some(shim), "same supervisor");
    assert!(alive(shim));
    assert_eq!(vmm_processes(k.state_dir(), &a).len(), 1, "no second VM");

    // An exit code is reported.
    let b = srv.create(spec(&["sh", "-c", "exit 7"]));
    srv.wait_for(Duration::from_secs(120), "B exited 7", |s| {
        matches!(
            s.sandboxes.get(&b).map(|r| &r.observed),
            Some(SandboxState::Exited { exit_code: 7, .. })
        )
    });

    // Delete: the VM goes and the server forgets the sandbox.
    let (status, body) = srv.rest("DELETE", &format!("/v1/sandboxes/{a}"), None);
    assert!((200..300).contains(&status), "{status} {body}");
    srv.delete(&b);
    srv.wait_for(Duration::from_secs(60), "A and B forgotten", |s| {
        !s.sandboxes.contains_key(&a) && !s.sandboxes.contains_key(&b)
    });
    let t2 = Instant::now();
    while k.state_dir().join("sandboxes").join(a.as_str()).exists() {
        assert!(t2.elapsed() < Duration::from_secs(10), "A's record stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(shim));
    assert!(vmm_processes(k.state_dir(), &a).is_empty());
    assert!(srv.observed(&a).is_none());
    node.term();
    k.assert_clean();
}

#[test]
fn a_dry_run_node_runs_200_sandboxes_for_the_server() {
    let k = Kiln::new();
    let ns = Netns::new();
    let srv = OneServer::start(&ns.host_ip);
    let mut node = NodeProc::start_with_servers(
        &k,
        &ns,
        &srv.url(),
        "dry-a",
        &[
            "--dry-run",
            "--capacity-cpus",
            "1000",
            "--capacity-memory-mib",
            "1000000",
            "--capacity-disk-mib",
            "10000000",
        ],
    );
    srv.wait_for(Duration::from_secs(60), "the node registered", |s| {
        s.nodes.keys().any(|n| n.as_str() == "dry-a")
    });
    let t0 = Instant::now();
    let ids: Vec<SandboxId> = (0..200)
        .map(|_| srv.create(SandboxSpec::for_image("busybox")))
        .collect();
    srv.wait_for(Duration::from_secs(120), "200 running", |s| {
        ids.iter().all(|id| running(s, id))
    });
    eprintln!(
        "200 creates → running on a dry-run node through the server: {} ms",
        t0.elapsed().as_millis()
    );
    for id in &ids {
        srv.delete(id);
    }
    srv.wait_for(Duration::from_secs(120), "200 forgotten", |s| {
        ids.iter().all(|id| !s.sandboxes.contains_key(id))
    });
    node.term();
    assert!(node.log().contains("registered"));
}
