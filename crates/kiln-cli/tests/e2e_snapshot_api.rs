//! Snapshots, restores and forks through the REST API end to end: a real
//! `kiln server` replica in this process, a real `kiln node` process in its
//! own network namespace (its endpoints on the namespace's address), real
//! microVMs. A counting process is snapshotted (`POST
//! /v1/sandboxes/{id}/snapshot`), restored (`POST /v1/sandboxes` with
//! `origin: snapshot`) and goes on counting where it was; it is forked
//! twice; the snapshot cannot be deleted while its restore runs; tenant B
//! sees none of A's; bad names are 400. Every answer's body is checked
//! against the server's own OpenAPI document.

mod common;
mod node_host;

use std::process::Command as Proc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::Kiln;
use kiln_api::cluster::{Quotas, Role, TenantName};
use kiln_api::rest::{ForkResult, Snapshot, SnapshotList};
use kiln_api::sandbox::{Origin, SandboxId, SandboxState};
use kiln_api::stream::{LogRecord, LogStreamName};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Command, State};
use kiln_testkit::ApiSchemas;
use node_host::{JOIN, Netns, NodeProc, spec};

struct Api {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
    schemas: Option<ApiSchemas>,
    /// Tenant A's and tenant B's tokens.
    a: String,
    b: String,
}

impl Api {
    fn start(ip: &str) -> Api {
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
        let mut tokens = vec![];
        for (i, t) in ["acme", "other"].iter().enumerate() {
            let tenant = TenantName::new(*t).expect("tenant");
            let w = |c| {
                let r = rt.block_on(server.raft().write(c)).expect("write");
                assert!(!r.is_rejected(), "{r:?}");
            };
            w(Command::CreateTenant {
                name: tenant.clone(),
                quotas: Quotas {
                    sandboxes: 100,
                    cpus: 1000,
                    memory_mib: 1_000_000,
                },
                now_ms: 1,
            });
            let secret = format!("tenant-{t}-secret-0123456789abcdef");
            w(Command::CreateToken {
                id: format!("{t}-1"),
                tenant: Some(tenant),
                role: Role::Tenant,
                sha256: kiln_store::query::hash_token(&secret),
                description: String::new(),
                now_ms: 2 + i as u64,
                node: None,
            });
            tokens.push(secret);
        }
        let mut api = Api {
            rt,
            server: Some(server),
            _dir: dir,
            schemas: None,
            b: tokens.pop().expect("b"),
            a: tokens.pop().expect("a"),
        };
        let (status, doc) = api.raw("x", "GET", "/v1/openapi.json", None);
        assert_eq!(status, 200);
        api.schemas = Some(ApiSchemas::new(&doc).expect("the server's OpenAPI document"));
        api
    }

    fn url(&self) -> String {
        self.server.as_ref().expect("running").api_url().to_string()
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.server.as_ref().expect("running").raft().read_local(f)
    }

    fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&State) -> bool) {
        let t0 = Instant::now();
        while !self.read(&f) {
            assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn raw(&self, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
        let mut c = Proc::new("curl");
        c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = c
            .arg(format!("{}{path}", self.url()))
            .output()
            .expect("curl runs");
        let body = out.stdout;
        let cut = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&body[cut..])
            .trim()
            .parse()
            .unwrap_or(0);
        (status, body[..cut].to_vec())
    }

    /// A JSON call whose answer is checked against the OpenAPI document.
    fn call(&self, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
        let (status, out) = self.raw(token, method, path, body);
        if let Err(e) = self
            .schemas
            .as_ref()
            .expect("schemas")
            .check(method, path, status, &out)
        {
            panic!(
                "{method} {path} -> {status}: the body does not match the OpenAPI document: {e:#}\n{}",
                String::from_utf8_lossy(&out)
            );
        }
        (status, out)
    }

    /// A call expected to fail with `status` and error `code`.
    fn refused(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        status: u16,
        code: &str,
    ) {
        let (got, out) = self.call(token, method, path, body);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(got, status, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("an ErrorBody");
        assert_eq!(v["error"]["code"], code, "{method} {path}: {text}");
    }

    fn create(&self, s: &kiln_api::sandbox::SandboxSpec) -> SandboxId {
        let body = serde_json::to_string(s).expect("json");
        let (status, out) = self.call(&self.a, "POST", "/v1/sandboxes", Some(&body));
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&out));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        serde_json::from_value(v["id"].clone()).expect("an ID")
    }

    /// The numbers sandbox `id` printed so far (its stdout, `c-N` lines).
    fn counts(&self, id: &SandboxId) -> Vec<u64> {
        // NDJSON (documented as such), not one JSON body.
        let (status, body) = self.raw(&self.a, "GET", &format!("/v1/sandboxes/{id}/logs"), None);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let mut out = Vec::new();
        for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let LogRecord::Output {
                stream: LogStreamName::Stdout,
                data,
            } = serde_json::from_slice(line).expect("a LogRecord")
            {
                out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .expect("base64"),
                );
            }
        }
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.strip_prefix("c-")?.trim().parse().ok())
            .collect()
    }

    /// Waits until `id` printed at least `n` numbers; returns them.
    fn counted(&self, id: &SandboxId, n: usize) -> Vec<u64> {
        let t0 = Instant::now();
        loop {
            let c = self.counts(id);
            if c.len() >= n {
                return c;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{id} printed {c:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn running(s: &State, id: &SandboxId) -> bool {
    s.sandboxes
        .get(id)
        .is_some_and(|r| matches!(r.observed, SandboxState::Running { .. }))
}

/// `kiln ARGS` as a client of the server (tenant A): exit code, stdout,
/// stderr.
fn cli(k: &Kiln, api: &Api, args: &[&str]) -> (i32, String, String) {
    let out = Proc::new(&k.bin)
        .args(args)
        .env("KILN_SERVER", api.url())
        .env("KILN_TOKEN", &api.a)
        .env("KILN_CONFIG", "/nonexistent/kiln-config.toml")
        .env_remove("KILN_STATE_DIR")
        .output()
        .expect("kiln runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Consecutive, and not from the start: the process went on counting.
fn continues(c: &[u64], after: u64, what: &str) {
    assert!(!c.is_empty(), "{what}: nothing printed");
    assert!(
        c[0] > after,
        "{what} started again from {} (the snapshot was taken after {after}): {c:?}",
        c[0]
    );
    assert!(
        c.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: not consecutive: {c:?}"
    );
}

#[test]
fn snapshot_restore_and_fork_through_the_api() {
    let k = Kiln::new();
    let ns = Netns::new();
    let api = Api::start(&ns.host_ip);
    let node_ip = format!(
        "{}.2",
        ns.host_ip.rsplit_once('.').expect("an IPv4 address").0
    );
    let mut node = NodeProc::start_with_servers(
        &k,
        &ns,
        &api.url(),
        "host-s",
        &[
            "--address",
            &format!("{node_ip}:0"),
            "--capacity-cpus",
            "16",
        ],
    );
    api.wait_for(
        Duration::from_secs(60),
        "the node registered with a key",
        |s| {
            s.nodes
                .values()
                .any(|n| n.name.as_str() == "host-s" && n.stream_key.is_some())
        },
    );

    // A counter: one number a second.
    let src = api.create(&spec(&[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo c-$i; sleep 1; done",
    ]));
    let t0 = Instant::now();
    api.wait_for(Duration::from_secs(180), "the counter running", |st| {
        running(st, &src)
    });
    eprintln!("counter running: {} ms", t0.elapsed().as_millis());
    let before = *api.counted(&src, 3).last().expect("counted");

    // Bad names, and tenant B, are refused before any node is asked.
    let snap_path = format!("/v1/sandboxes/{src}/snapshot");
    for bad in [r#"{"name":"../x"}"#, r#"{"name":"-x"}"#, r#"{"name":""}"#] {
        api.refused(&api.a, "POST", &snap_path, Some(bad), 400, "invalid_name");
    }
    let long = format!(r#"{{"name":"{}"}}"#, "x".repeat(125));
    api.refused(&api.a, "POST", &snap_path, Some(&long), 400, "invalid_name");
    api.refused(
        &api.a,
        "POST",
        &snap_path,
        Some(r#"{"nme":"x"}"#),
        400,
        "unknown_field",
    );
    api.refused(
        &api.b,
        "POST",
        &snap_path,
        Some(r#"{"name":"s1"}"#),
        404,
        "not_found",
    );

    // Snapshot (the counter goes on in the source).
    let t1 = Instant::now();
    let (status, out) = api.call(&api.a, "POST", &snap_path, Some(r#"{"name":"s1"}"#));
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&out));
    eprintln!("snapshot through the API: {} ms", t1.elapsed().as_millis());
    let snap: Snapshot = serde_json::from_slice(&out).expect("a Snapshot");
    assert_eq!(snap.name, "s1");
    assert_eq!(snap.source.as_ref(), Some(&src));
    assert_eq!(snap.holders.len(), 1);
    assert_eq!(snap.holders[0].node.as_str(), "host-s");
    assert!(snap.holders[0].size_bytes > 0);
    api.refused(
        &api.a,
        "POST",
        &snap_path,
        Some(r#"{"name":"s1"}"#),
        409,
        "already_exists",
    );
    // On the node it is stored under the tenant.
    assert!(k.state_dir().join("snapshots").join("acme.s1").is_dir());

    // The node's snapshot endpoints want its key and check every body.
    let node_addr = api.read(|s| s.nodes.values().next().expect("node").address.clone());
    let key = std::fs::read_to_string(k.state_dir().join("node").join("stream.key")).expect("key");
    let node_call = |key: &str, method: &str, path: &str, body: &str| -> String {
        let out = Proc::new("curl")
            // -k: the node's certificate is self-signed (the server pins it).
            .args([
                "-sSk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                method,
            ])
            .args(["-H", &format!("Authorization: Bearer {key}")])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("https://{node_addr}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let node_snap = format!("/node/v1/sandboxes/{src}/snapshot");
    assert_eq!(
        node_call("wrong", "POST", &node_snap, r#"{"name":"x"}"#),
        "401"
    );
    assert_eq!(
        node_call("wrong", "DELETE", "/node/v1/snapshots/acme.s1", ""),
        "401"
    );
    let key = key.trim();
    assert_eq!(
        node_call(key, "POST", &node_snap, r#"{"name":"../x"}"#),
        "400"
    );
    assert_eq!(node_call(key, "POST", &node_snap, "{not json"), "400");
    assert_eq!(
        node_call(
            key,
            "POST",
            &node_snap,
            r#"{"name":"x","hold_for":["0000000000000001"]}"#
        ),
        "400",
        "hold_for without ephemeral"
    );
    assert_eq!(
        node_call(
            key,
            "POST",
            "/node/v1/sandboxes/0000000000000001/snapshot",
            r#"{"name":"x"}"#
        ),
        "404"
    );
    assert_eq!(node_call(key, "DELETE", "/node/v1/snapshots/-x", ""), "400");
    assert_eq!(
        node_call(key, "DELETE", "/node/v1/snapshots/nope", ""),
        "404"
    );
    assert!(k.state_dir().join("snapshots").join("acme.s1").is_dir());

    let (status, out) = api.call(&api.a, "GET", "/v1/snapshots", None);
    assert_eq!(status, 200);
    let list: SnapshotList = serde_json::from_slice(&out).expect("a list");
    assert_eq!(list.items, vec![snap.clone()]);
    let (status, out) = api.call(&api.b, "GET", "/v1/snapshots", None);
    assert_eq!(status, 200);
    let list: SnapshotList = serde_json::from_slice(&out).expect("a list");
    assert!(list.items.is_empty(), "B sees A's snapshots: {list:?}");
    let (status, out) = api.call(&api.a, "GET", "/v1/snapshots/s1", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Snapshot>(&out).expect("one"), snap);
    api.refused(&api.b, "GET", "/v1/snapshots/s1", None, 404, "not_found");
    api.refused(&api.b, "DELETE", "/v1/snapshots/s1", None, 404, "not_found");
    api.refused(&api.a, "GET", "/v1/snapshots/-x", None, 400, "invalid_name");
    api.refused(
        &api.a,
        "GET",
        "/v1/snapshots/a%2Fb",
        None,
        400,
        "invalid_name",
    );

    // Restore: B cannot; A's restore counts on from where the snapshot was.
    let mut restore = spec(&[]);
    restore.origin = Origin::Snapshot {
        snapshot: "s1".into(),
    };
    let body = serde_json::to_string(&restore).expect("json");
    api.refused(
        &api.b,
        "POST",
        "/v1/sandboxes",
        Some(&body),
        404,
        "not_found",
    );
    let mut missing = restore.clone();
    missing.origin = Origin::Snapshot {
        snapshot: "nope".into(),
    };
    let missing = serde_json::to_string(&missing).expect("json");
    api.refused(
        &api.a,
        "POST",
        "/v1/sandboxes",
        Some(&missing),
        404,
        "not_found",
    );
    let t2 = Instant::now();
    let restored = api.create(&restore);
    api.wait_for(Duration::from_secs(180), "the restore running", |st| {
        running(st, &restored)
    });
    eprintln!("restore through the API: {} ms", t2.elapsed().as_millis());
    let rec_node = api.read(|st| st.sandboxes[&restored].node.clone());
    assert_eq!(rec_node.as_ref().map(|n| n.as_str()), Some("host-s"));
    let c = api.counted(&restored, 3);
    continues(&c, before, "the restored counter");

    // The snapshot is in use by the restore.
    api.refused(
        &api.a,
        "DELETE",
        "/v1/snapshots/s1",
        None,
        409,
        "snapshot_in_use",
    );

    // Fork: B cannot; a bad count is 422; two forks count on, distinct.
    let fork_path = format!("/v1/sandboxes/{src}/fork");
    api.refused(
        &api.b,
        "POST",
        &fork_path,
        Some(r#"{"count":2}"#),
        404,
        "not_found",
    );
    api.refused(
        &api.a,
        "POST",
        &fork_path,
        Some(r#"{"count":0}"#),
        422,
        "invalid_count",
    );
    api.refused(
        &api.a,
        "POST",
        &fork_path,
        Some(r#"{"count":65}"#),
        422,
        "invalid_count",
    );
    // 64 forks do not fit on the node: refused before anything is taken.
    api.refused(
        &api.a,
        "POST",
        &fork_path,
        Some(r#"{"count":64}"#),
        422,
        "unschedulable",
    );
    let fork_after = *api.counts(&src).last().expect("counted");
    let t3 = Instant::now();
    let (status, out) = api.call(&api.a, "POST", &fork_path, Some(r#"{"count":2}"#));
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&out));
    let forks: ForkResult = serde_json::from_slice(&out).expect("a ForkResult");
    assert_eq!(forks.source, src);
    assert_eq!(forks.ids.len(), 2);
    assert_ne!(forks.ids[0], forks.ids[1]);
    // Committed before the answer.
    assert!(api.read(|st| forks.ids.iter().all(|i| st.sandboxes.contains_key(i))));
    api.wait_for(Duration::from_secs(180), "both forks running", |st| {
        forks.ids.iter().all(|i| running(st, i))
    });
    eprintln!("fork of 2 through the API: {} ms", t3.elapsed().as_millis());
    for f in &forks.ids {
        let c = api.counted(f, 2);
        continues(&c, fork_after, "a fork's counter");
    }

    // The CLI against the server: same commands, same output.
    let t5 = Instant::now();
    let (code, out, err) = cli(
        &k,
        &api,
        &["snapshot", &src.as_str()[..8], "--name", "cli1"],
    );
    assert_eq!((code, out.as_str()), (0, "cli1\n"), "{err}");
    let (code, out, err) = cli(&k, &api, &["snapshot", "ls", "-q"]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<&str> = out.lines().collect();
    assert!(names.contains(&"cli1") && names.contains(&"s1"), "{out}");
    let (code, out, err) = cli(&k, &api, &["snapshot", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NAME") && out.contains("cli1"), "{out}");
    let (code, out, err) = cli(&k, &api, &["restore", "cli1", "-d"]);
    assert_eq!(code, 0, "{err}");
    let cli_restored = SandboxId::try_from(out.trim().to_owned()).expect("an ID");
    api.wait_for(
        Duration::from_secs(180),
        "the CLI's restore running",
        |st| running(st, &cli_restored),
    );
    let (code, _, err) = cli(&k, &api, &["snapshot", "rm", "cli1"]);
    assert_eq!(code, 125);
    assert!(err.contains("snapshot_in_use"), "{err}");
    let (code, out, err) = cli(&k, &api, &["fork", src.as_str(), "-n", "1"]);
    assert_eq!(code, 0, "{err}");
    let cli_fork = SandboxId::try_from(out.trim().to_owned()).expect("an ID");
    api.wait_for(Duration::from_secs(180), "the CLI's fork running", |st| {
        running(st, &cli_fork)
    });
    let (code, _, err) = cli(&k, &api, &["restore", "nope", "-d"]);
    assert_eq!(code, 125);
    assert!(err.contains("not_found"), "{err}");
    for id in [&cli_restored, &cli_fork] {
        let (status, _) = api.call(&api.a, "DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, 200);
    }
    api.wait_for(
        Duration::from_secs(60),
        "the CLI's sandboxes forgotten",
        |st| !st.sandboxes.contains_key(&cli_restored) && !st.sandboxes.contains_key(&cli_fork),
    );
    let (code, out, err) = cli(&k, &api, &["snapshot", "rm", "cli1"]);
    assert_eq!((code, out.as_str()), (0, "cli1\n"), "{err}");
    eprintln!("CLI through the API: {} ms", t5.elapsed().as_millis());

    // Remove the restore: then the snapshot can go, from the node too.
    let (status, _) = api.call(&api.a, "DELETE", &format!("/v1/sandboxes/{restored}"), None);
    assert_eq!(status, 200);
    api.wait_for(Duration::from_secs(60), "the restore forgotten", |st| {
        !st.sandboxes.contains_key(&restored)
    });
    let (status, out) = api.call(&api.a, "DELETE", "/v1/snapshots/s1", None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
    api.refused(&api.a, "GET", "/v1/snapshots/s1", None, 404, "not_found");
    assert!(!k.state_dir().join("snapshots").join("acme.s1").exists());

    // Clean up through the API; the fork snapshot goes with its last fork.
    for id in forks.ids.iter().chain([&src]) {
        let (status, _) = api.call(&api.a, "DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, 200);
    }
    api.wait_for(Duration::from_secs(60), "all forgotten", |st| {
        st.sandboxes.is_empty()
    });
    // The forks' ephemeral snapshot records went with the last fork.
    let left = api.read(|st| st.snapshots.keys().cloned().collect::<Vec<_>>());
    assert!(left.is_empty(), "snapshot records left: {left:?}");
    let snaps = k.state_dir().join("snapshots");
    let t4 = Instant::now();
    loop {
        let left: Vec<String> = std::fs::read_dir(&snaps)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t4.elapsed() < Duration::from_secs(30),
            "snapshots left on the node: {left:?}, their users: {:?}; node log:\n{}",
            left.iter()
                .map(|n| std::fs::read_dir(snaps.join(n).join("users"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    node.term();
    k.assert_clean();
}
