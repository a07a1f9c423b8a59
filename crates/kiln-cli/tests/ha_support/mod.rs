//! A multi-host control plane for `e2e_cluster_ha`: network namespaces
//! joined by a test bridge (one per server, one per node), `kiln server`
//! processes in them, and a REST client that checks every answer against
//! the server's own `/v1/openapi.json`.
//!
//! Everything is named after the test run (pid + random tag) and removed on
//! drop, even when the test fails: processes are SIGKILLed, namespaces
//! (with the nftables rules inside them) and links deleted.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::ApiSchemas;
use serde_json::Value;

/// The REST port and Raft port every server uses inside its namespace.
pub const API_PORT: u16 = 7070;
pub const RAFT_PORT: u16 = 7071;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rand_u16() -> u16 {
    use std::io::Read;
    let mut b = [0u8; 2];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u16::from_le_bytes(b)
}

/// `n` namespaces on one bridge: namespace `i` has `PREFIX.(i+1)/24`, the
/// root namespace (the test client) `PREFIX.254`.
pub struct HaNet {
    pub prefix: String,
    bridge: String,
    pub namespaces: Vec<String>,
    host_veths: Vec<String>,
}

impl HaNet {
    pub fn new(n: usize) -> HaNet {
        let tag = format!("{:04x}", rand_u16());
        // 10.251.X: not the 10.250.N of node_host's veth pairs.
        let prefix = format!("10.251.{}", u32::from(rand_u16()) % 250 + 1);
        let mut net = HaNet {
            prefix,
            bridge: format!("khb{tag}"),
            namespaces: vec![],
            host_veths: vec![],
        };
        sh(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}.254/24", net.prefix),
            "dev",
            &net.bridge,
        ]);
        sh(&["ip", "link", "set", &net.bridge, "up"]);
        for i in 0..n {
            let ns = format!("kiln-ha-{tag}-{i}");
            let host = format!("khv{tag}{i}");
            let peer = format!("khp{tag}{i}");
            sh(&["ip", "netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            sh(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ]);
            net.host_veths.push(host.clone());
            sh(&["ip", "link", "set", &peer, "netns", &ns]);
            sh(&["ip", "link", "set", &host, "master", &net.bridge]);
            sh(&["ip", "link", "set", &host, "up"]);
            let ip = net.ip(i);
            for a in [
                vec!["ip", "link", "set", "lo", "up"],
                vec!["ip", "addr", "add", &format!("{ip}/24"), "dev", &peer],
                vec!["ip", "link", "set", &peer, "up"],
            ] {
                let mut v = vec!["ip", "netns", "exec", &ns];
                v.extend(a);
                sh(&v);
            }
        }
        net
    }

    /// Namespace `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 1)
    }

    /// nftables in namespace `i` (and only there) drops every packet to
    /// and from the namespaces `others`: a partition. The test client in
    /// the root namespace still reaches it.
    pub fn isolate(&self, i: usize, others: &[usize]) {
        let set: Vec<String> = others.iter().map(|o| self.ip(*o)).collect();
        let set = set.join(", ");
        let rules = format!(
            "table inet kiln_ha_partition {{\n\
             chain input {{ type filter hook input priority -10; policy accept; ip saddr {{ {set} }} drop; }}\n\
             chain output {{ type filter hook output priority -10; policy accept; ip daddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        let file = std::env::temp_dir().join(format!("kiln-ha-nft-{}", std::process::id()));
        std::fs::write(&file, rules).expect("nft rules");
        let f = file.to_string_lossy().into_owned();
        sh(&["ip", "netns", "exec", &self.namespaces[i], "nft", "-f", &f]);
        let _ = std::fs::remove_file(&file);
    }

    /// Removes namespace `i`'s partition rules.
    pub fn heal(&self, i: usize) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.namespaces[i],
            "nft",
            "delete",
            "table",
            "inet",
            "kiln_ha_partition",
        ]);
    }
}

impl Drop for HaNet {
    fn drop(&mut self) {
        for v in &self.host_veths {
            let _ = Command::new("ip").args(["link", "del", v]).output();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// One `kiln server` replica: its namespace, address and data directory;
/// restartable on the same directory after a `kill -9`.
pub struct ServerProc {
    pub id: u64,
    pub ns: String,
    pub ip: String,
    pub dir: PathBuf,
    pub join_file: PathBuf,
    pub peers: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl ServerProc {
    pub fn new(id: u64, ns: &str, ip: &str, root: &std::path::Path, peers: &str) -> ServerProc {
        let dir = root.join(format!("server-{id}"));
        std::fs::create_dir_all(&dir).expect("server dir");
        ServerProc {
            id,
            ns: ns.to_owned(),
            ip: ip.to_owned(),
            join_file: root.join("join-token"),
            log: root.join(format!("server-{id}.log")),
            dir,
            peers: peers.to_owned(),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{API_PORT}", self.ip)
    }

    /// The cluster secret shared by the replicas, written once beside the
    /// join token.
    pub fn secret_file(&self) -> PathBuf {
        let f = self.join_file.with_file_name("cluster.secret");
        if !f.exists() {
            std::fs::write(&f, "e2e-cluster-secret-0123456789abcdef").expect("cluster secret");
        }
        f
    }

    pub fn raft_addr(&self) -> String {
        format!("{}:{RAFT_PORT}", self.ip)
    }

    /// Every flag of `kiln server` the test uses: the one place to add
    /// flags (TLS, a Raft secret) later.
    pub fn server_args(&self, init: bool) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "server".into(),
            "--id".into(),
            self.id.to_string(),
            "--listen".into(),
            format!("{}:{API_PORT}", self.ip),
            "--raft-listen".into(),
            self.raft_addr(),
            "--peers".into(),
            self.peers.clone(),
            "--state-dir".into(),
            self.dir.to_string_lossy().into_owned(),
            "--join-token-file".into(),
            self.join_file.to_string_lossy().into_owned(),
            // Every replica the same secret (one file beside the join token).
            "--cluster-secret-file".into(),
            self.secret_file().to_string_lossy().into_owned(),
            "--heartbeat-ms".into(),
            "300".into(),
            "--grace-ms".into(),
            "20000".into(),
            // The nodes run the test's busybox OCI layout from their disk.
            "--allow-local-images".into(),
        ];
        if init {
            a.push("--init".into());
        }
        a
    }

    pub fn start(&mut self, bin: &std::path::Path, init: bool) {
        assert!(self.child.is_none(), "server {} runs already", self.id);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(bin)
            .args(self.server_args(init))
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("kiln server starts");
        self.child = Some(child);
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One answer of the API (already checked against its schema).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// The test's REST client: every answer is validated against the
/// server's OpenAPI document, and a mismatch fails the test.
pub struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    schemas: ApiSchemas,
    pub checked: std::sync::atomic::AtomicU64,
}

impl Api {
    /// Fetches `/v1/openapi.json` from `base` (retrying while it starts).
    pub fn new(base: &str) -> Api {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let t0 = Instant::now();
        let doc = loop {
            let r = rt.block_on(async {
                let r = http.get(format!("{base}/v1/openapi.json")).send().await?;
                r.error_for_status()?.bytes().await
            });
            match r {
                Ok(b) => break b,
                Err(e) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "no OpenAPI document from {base}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        let schemas = ApiSchemas::new(&doc).expect("the server's OpenAPI document");
        Api {
            rt,
            http,
            schemas,
            checked: 0.into(),
        }
    }

    /// One request; `Err` only when no answer came (connection refused,
    /// reset, timed out). Panics when the answer does not match its schema.
    pub fn call(
        &self,
        base: &str,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Reply, String> {
        let (status, retry_after, bytes) = self.rt.block_on(async {
            let mut rb = self
                .http
                .request(method.parse().expect("method"), format!("{base}/v1{path}"))
                .header("authorization", format!("Bearer {token}"));
            if let Some(b) = body {
                rb = rb
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            if let Some(k) = idempotency_key {
                rb = rb.header("idempotency-key", k);
            }
            let r = rb.send().await.map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            let ra = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let b = r.bytes().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, ra, b))
        })?;
        if let Err(e) = self
            .schemas
            .check(method, &format!("/v1{path}"), status, &bytes)
        {
            panic!("{method} {base}/v1{path}: {e:#}");
        }
        self.checked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    /// As [`Api::call`], retrying what a client retries (no answer, or
    /// 503 with Retry-After during an election) for up to 30 s.
    pub fn must(
        &self,
        base: &str,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Reply {
        let t0 = Instant::now();
        loop {
            let r = self.call(base, method, path, token, body, None);
            let again = match &r {
                Ok(r) => r.status == 503 && r.retry_after.is_some(),
                Err(_) => true,
            };
            if !again || t0.elapsed() > Duration::from_secs(30) {
                return r.unwrap_or_else(|e| panic!("{method} {base}/v1{path}: {e}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Checks a body the test got another way (the CLI's `-o json`).
    pub fn check(&self, method: &str, path: &str, status: u16, body: &[u8]) {
        if let Err(e) = self.schemas.check(method, path, status, body) {
            panic!("{method} {path}: {e:#}");
        }
    }
}

/// Polls `f` until it is true or `limit` passes (then fails with `what`).
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
