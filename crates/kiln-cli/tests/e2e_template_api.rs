//! Templates, warm pools and images through the REST API end to end: a
//! real `kiln server` replica in this process and a real `kiln node`
//! process in its own network namespace (private image cache), real
//! microVMs. A template with a pool of 1 is created with `POST
//! /v1/templates`; the node builds it, fills the pool and reports both; a
//! sandbox created through the API for the same image and resources starts
//! from the pool member (the node's log says so) and the pool is refilled;
//! the pool is resized to 0; the delete is refused while the sandbox runs,
//! then removes everything from the node. Images: pull (and an unknown
//! image's 4xx), listing, removal refused while in use and to tenants.
//! Tenant B never sees tenant A's template. Every body is checked against
//! the server's OpenAPI document.

mod common;
mod net_support;
mod node_host;

use std::process::Command as Proc;
use std::time::{Duration, Instant};

use common::Kiln;
use kiln_api::cluster::{Quotas, Role, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxState};
use kiln_api::templates::{ImageList, ImageResult, Template, TemplateList, TemplatePhase};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Command, State};
use kiln_testkit::ApiSchemas;
use node_host::{JOIN, Netns, NodeProc, spec};

struct Api {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
    schemas: ApiSchemas,
    /// Tenant A's, tenant B's and an admin token.
    a: String,
    b: String,
    admin: String,
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
        let w = |c| {
            let r = rt.block_on(server.raft().write(c)).expect("write");
            assert!(!r.is_rejected(), "{r:?}");
        };
        let mut tokens = vec![];
        for (i, t) in ["acme", "other"].iter().enumerate() {
            let tenant = TenantName::new(*t).expect("tenant");
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
        let admin = "admin-secret-0123456789abcdef".to_string();
        w(Command::CreateToken {
            id: "admin-1".into(),
            tenant: None,
            role: Role::Admin,
            sha256: kiln_store::query::hash_token(&admin),
            description: String::new(),
            now_ms: 9,
            node: None,
        });
        let schemas = ApiSchemas::new(kiln_server::rest::openapi_json().as_bytes())
            .expect("the server's OpenAPI document");
        Api {
            rt,
            server: Some(server),
            _dir: dir,
            schemas,
            b: tokens.pop().expect("b"),
            a: tokens.pop().expect("a"),
            admin,
        }
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
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{what}: {} ms", t0.elapsed().as_millis());
    }

    /// `curl` with `token` and an optional JSON body: (status, body), the
    /// body checked against the OpenAPI document.
    fn call(&self, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
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
        let raw = out.stdout;
        let cut = raw.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&raw[cut..])
            .trim()
            .parse()
            .unwrap_or(0);
        let body = raw[..cut].to_vec();
        let route = format!("/v1{}", path.strip_prefix("/v1").unwrap_or(path));
        if let Err(e) = self
            .schemas
            .check(&method.to_ascii_lowercase(), &route, status, &body)
        {
            panic!(
                "{method} {path} {status}: the body does not match the OpenAPI document: {e:#}\n{}",
                String::from_utf8_lossy(&body)
            );
        }
        (status, body)
    }

    fn template(&self, token: &str, name: &str) -> (u16, Option<Template>) {
        let (status, body) = self.call(token, "GET", &format!("/v1/templates/{name}"), None);
        (status, serde_json::from_slice(&body).ok())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// Sandbox directories in the node's state directory.
fn sandbox_dirs(k: &Kiln) -> Vec<String> {
    std::fs::read_dir(k.state_dir().join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// Templates (not hidden entries) in the node's template store.
fn node_templates(k: &Kiln) -> Vec<String> {
    std::fs::read_dir(k.state_dir().join("templates"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// `kiln node` in `ns` with this harness's private image cache (as
/// `NodeProc::start_in`, plus the cache's environment).
fn start_node(k: &Kiln, ns: &Netns, servers: &str, address: &str) -> NodeProc {
    let token = k.state_dir().join("join-token");
    std::fs::write(&token, format!("{JOIN}\n")).expect("token file");
    let log = k.state_dir().join("node-host-t.log");
    let logf = std::fs::File::create(&log).expect("log");
    let shared = common::shared_cache();
    let child = Proc::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&k.bin)
        .args(["node", "--server", servers])
        .arg("--join-token-file")
        .arg(&token)
        .args(["--name", "host-t", "--address", address, "--state-dir"])
        .arg(k.state_dir())
        .env("KILN_STATE_DIR", k.state_dir())
        .env("KILN_CACHE_DIR", k.cache_dir())
        .env("KILN_KERNEL", shared.join("kernel/current/bzImage"))
        .env(
            "KILN_INITRAMFS",
            shared.join("initramfs/current/initramfs.img"),
        )
        .env("KILN_AUTO_TEMPLATES", "0")
        .env("KILN_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("kiln node starts");
    NodeProc { child, log }
}

#[test]
fn templates_pools_and_images_through_the_api() {
    let _net = net_support::exclusive();
    let image = common::busybox();
    // The node caches images privately: removing one cannot touch
    // another test's.
    let k = Kiln::with_own_cache();
    let ns = Netns::new();
    let api = Api::start(&ns.host_ip);
    let node_ip = format!(
        "{}.2",
        ns.host_ip.rsplit_once('.').expect("an IPv4 address").0
    );
    let mut node = start_node(&k, &ns, &api.url(), &format!("{node_ip}:0"));
    api.wait_for(Duration::from_secs(60), "the node registered", |s| {
        s.nodes.values().any(|n| n.stream_key.is_some())
    });

    // Images: a pull through the API; an unknown image is a clear 4xx.
    let pull = serde_json::json!({ "ref": image }).to_string();
    let (status, body) = api.call(&api.a, "POST", "/v1/images/pull", Some(&pull));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let pulled: ImageResult = serde_json::from_slice(&body).expect("an ImageResult");
    assert_eq!(pulled.nodes.len(), 1);
    assert!(pulled.nodes[0].digest.starts_with("sha256:"), "{pulled:?}");
    let unknown = r#"{"ref":"oci:/nonexistent/kiln-e2e-no-such-image"}"#;
    let (status, body) = api.call(&api.a, "POST", "/v1/images/pull", Some(unknown));
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code(&body), "image_not_found");
    let (status, body) = api.call(&api.a, "POST", "/v1/images/pull", Some(r#"{"ref":""}"#));
    assert_eq!((status, code(&body).as_str()), (422, "invalid_reference"));

    // A template with a pool of 1, for tenant A.
    let create = serde_json::json!({
        "name": "bb", "image": image, "pool": 1,
        "resources": { "cpus": 1, "memory_mib": 128, "disk_mib": 64 },
    })
    .to_string();
    let t0 = Instant::now();
    let (status, body) = api.call(&api.a, "POST", "/v1/templates", Some(&create));
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let t: Template = serde_json::from_slice(&body).expect("a Template");
    assert_eq!(t.nodes.len(), 1);
    assert_eq!(t.nodes[0].phase, TemplatePhase::Creating);
    assert_eq!(t.nodes[0].pool_target, 1);
    // Tenant B: 404 for A's template, exactly like a missing one.
    for (m, p, b) in [
        ("GET", "/v1/templates/bb", None),
        ("DELETE", "/v1/templates/bb", None),
        ("PUT", "/v1/templates/bb/pool", Some(r#"{"size":3}"#)),
    ] {
        let (status, body) = api.call(&api.b, m, p, b);
        assert_eq!(
            (status, code(&body).as_str()),
            (404, "not_found"),
            "{m} {p}"
        );
    }
    let (_, body) = api.call(&api.b, "GET", "/v1/templates", None);
    let list: TemplateList = serde_json::from_slice(&body).expect("a TemplateList");
    assert!(list.items.is_empty(), "{list:?}");
    // Bad input: unknown field, bad name.
    let (status, body) = api.call(
        &api.a,
        "POST",
        "/v1/templates",
        Some(r#"{"image":"x","bogus":1}"#),
    );
    assert_eq!((status, code(&body).as_str()), (400, "unknown_field"));
    let bad = serde_json::json!({ "name": "../x", "image": image }).to_string();
    let (status, body) = api.call(&api.a, "POST", "/v1/templates", Some(&bad));
    assert_eq!((status, code(&body).as_str()), (422, "invalid_name"));
    let big = serde_json::json!({ "image": image, "pool": 65 }).to_string();
    let (status, body) = api.call(&api.a, "POST", "/v1/templates", Some(&big));
    assert_eq!((status, code(&body).as_str()), (422, "invalid_pool"));

    // The node builds it, fills the pool and reports both.
    api.wait_for(
        Duration::from_secs(600),
        "template ready and pool member reported",
        |s| {
            s.pools.get("acme/bb").is_some_and(|p| {
                p.nodes.values().any(|n| n.ready == 1) && p.members.values().any(|m| m.len() == 1)
            }) && s.templates["acme/bb"].nodes.values().any(|a| a.ready)
        },
    );
    eprintln!(
        "template + pool of 1 through the API: {} ms",
        t0.elapsed().as_millis()
    );
    let (status, t) = api.template(&api.a, "bb");
    let t = t.expect("a Template");
    assert_eq!(status, 200);
    assert_eq!(t.nodes[0].phase, TemplatePhase::Ready, "{t:?}");
    assert_eq!((t.nodes[0].pool_ready, t.nodes[0].pool_target), (1, 1));
    assert!(t.nodes[0].size_bytes > 0);
    let member: SandboxId =
        api.read(|s| s.pools["acme/bb"].members.values().next().expect("members")[0].clone());

    // A sandbox of A for that image and resources starts from the member.
    let mut sb = spec(&["sh", "-c", "echo from-pool; sleep 3600"]);
    sb.resources.cpus = 1;
    let t1 = Instant::now();
    let (status, body) = api.call(
        &api.a,
        "POST",
        "/v1/sandboxes",
        Some(&serde_json::to_string(&sb).expect("json")),
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let id: SandboxId = serde_json::from_value(v["id"].clone()).expect("an ID");
    assert_eq!(id, member, "the create took the pool member's ID");
    api.wait_for(Duration::from_secs(120), "the sandbox running", |s| {
        matches!(
            s.sandboxes.get(&id).map(|r| &r.observed),
            Some(SandboxState::Running { .. })
        )
    });
    eprintln!(
        "API create -> running from the pool: {} ms",
        t1.elapsed().as_millis()
    );
    let log = node.log();
    let started = log
        .lines()
        .find(|l| l.contains(id.as_str()) && l.contains("started"))
        .unwrap_or_else(|| panic!("no start line for {id} in the node log:\n{log}"));
    assert!(started.contains("Pool"), "not a pool start: {started}");
    assert!(started.contains("warm start from the pool"), "{started}");
    // The pool is refilled with a new member.
    api.wait_for(Duration::from_secs(300), "the pool refilled", |s| {
        s.pools["acme/bb"]
            .members
            .values()
            .any(|m| m.len() == 1 && m[0] != id)
    });

    // The CLI against the server (KILN_SERVER): tenant B makes a template
    // of the same image and resources (the node shares its template with
    // A's), lists it, and removes it: A's stays on the node.
    let cli = |token: &str, args: &[&str]| {
        let out = Proc::new(&k.bin)
            .args(args)
            .env("KILN_SERVER", api.url())
            .env("KILN_TOKEN", token)
            .env("KILN_CONFIG", "/nonexistent")
            .output()
            .expect("kiln runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let t4 = Instant::now();
    let (rc, out, err) = cli(
        &api.b,
        &[
            "template", "create", "--memory", "128", "--disk", "64", &image,
        ],
    );
    assert_eq!(rc, 0, "{out}{err}");
    let b_name = out.trim().to_string();
    assert!(b_name.ends_with("-1c-128m-64d"), "{b_name}");
    eprintln!(
        "kiln template create through the API (shared node template): {} ms",
        t4.elapsed().as_millis()
    );
    let (rc, out, err) = cli(&api.b, &["template", "ls"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(
        out.contains(&b_name) && out.contains("host-t: ready"),
        "{out}"
    );
    assert!(!out.contains("bb "), "B sees A's template: {out}");
    let (rc, out, _) = cli(&api.a, &["template", "ls", "-q"]);
    assert_eq!((rc, out.trim()), (0, "bb"));
    let (rc, out, err) = cli(&api.a, &["template", "rm", "bb"]);
    assert_eq!(rc, 125, "{out}");
    assert!(err.contains("template_in_use"), "{err}");
    let (rc, out, err) = cli(&api.b, &["template", "rm", &b_name]);
    assert_eq!((rc, out.trim()), (0, b_name.as_str()), "{err}");
    let (rc, out, err) = cli(&api.b, &["images", "pull", "oci:/nonexistent/kiln-e2e-x"]);
    assert_eq!(rc, 125, "{out}");
    assert!(err.contains("image_not_found"), "{err}");

    // Images: listed (from the heartbeat); removal is the admin's, and
    // refused while a sandbox uses the image.
    api.wait_for(
        Duration::from_secs(90),
        "the image in the node's heartbeat",
        |s| s.nodes.values().any(|n| n.images.contains(&image)),
    );
    // A tenant sees the images its own sandboxes and templates name: B has
    // none left, A's template names it.
    let (status, body) = api.call(&api.b, "GET", "/v1/images", None);
    assert_eq!(status, 200);
    let imgs: ImageList = serde_json::from_slice(&body).expect("an ImageList");
    assert!(
        imgs.items.is_empty(),
        "another tenant's image shown: {imgs:?}"
    );
    let (status, body) = api.call(&api.a, "GET", "/v1/images", None);
    assert_eq!(status, 200);
    let imgs: ImageList = serde_json::from_slice(&body).expect("an ImageList");
    assert!(imgs.items.iter().any(|i| i.reference == image), "{imgs:?}");
    let (rc, out, err) = cli(&api.a, &["images", "ls", "-q"]);
    assert_eq!((rc, out.trim()), (0, image.as_str()), "{err}");
    let rm_path = format!("/v1/images/{}", image.replace('/', "%2F"));
    let (status, body) = api.call(&api.a, "DELETE", &rm_path, None);
    assert_eq!((status, code(&body).as_str()), (403, "admin_required"));
    let (status, body) = api.call(&api.admin, "DELETE", &rm_path, None);
    assert_eq!(
        (status, code(&body).as_str()),
        (409, "image_in_use"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = api.call(&api.admin, "DELETE", "/v1/images/no%2Fsuch:image", None);
    assert_eq!((status, code(&body).as_str()), (404, "not_found"));

    // Resize to 0: the node drains the pool.
    let (status, body) = api.call(
        &api.a,
        "PUT",
        "/v1/templates/bb/pool",
        Some(r#"{"size":0}"#),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    api.wait_for(Duration::from_secs(120), "the pool drained", |s| {
        !s.pools.contains_key("acme/bb")
    });
    let t2 = Instant::now();
    while sandbox_dirs(&k) != vec![id.to_string()] {
        assert!(
            t2.elapsed() < Duration::from_secs(120),
            "pool members left on the node: {:?}",
            sandbox_dirs(&k)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The delete is refused while the sandbox runs...
    let (status, body) = api.call(&api.a, "DELETE", "/v1/templates/bb", None);
    assert_eq!(
        (status, code(&body).as_str()),
        (409, "template_in_use"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains(id.as_str()));
    let (status, _) = api.call(&api.a, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 200);
    api.wait_for(Duration::from_secs(120), "the sandbox forgotten", |s| {
        !s.sandboxes.contains_key(&id)
    });
    // ...then removes it from the node.
    let (status, body) = api.call(&api.a, "DELETE", "/v1/templates/bb", None);
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
    let (status, _) = api.template(&api.a, "bb");
    assert_eq!(status, 404);
    let t3 = Instant::now();
    while !node_templates(&k).is_empty() || !sandbox_dirs(&k).is_empty() {
        assert!(
            t3.elapsed() < Duration::from_secs(120),
            "left on the node: templates {:?}, sandboxes {:?}",
            node_templates(&k),
            sandbox_dirs(&k)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let made =
        std::fs::read_to_string(k.state_dir().join("node/templates.json")).unwrap_or_default();
    assert_eq!(made.trim(), "{}", "the daemon forgot the template");

    node.term();
    drop(api);
    k.assert_clean();
}
