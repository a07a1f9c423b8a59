//! The stream routes of the REST API end to end: a real `kiln server`
//! replica in this process and a real `kiln node` process in its own network
//! namespace (its stream endpoints on the namespace's address), real
//! microVMs. Sandboxes are created with `POST /v1/sandboxes`; exec (stdin,
//! exit code, tty with resize, a signal), logs followed to the exit,
//! files up- and downloaded (larger than the guest's RAM), tenant
//! isolation, and the node refusing a wrong stream key, all through the
//! server's `/v1/sandboxes/{id}/…` routes (WebSocket, NDJSON, tar).

mod common;
mod node_host;

use std::io::Write;
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::Kiln;
use futures::{SinkExt, StreamExt};
use kiln_api::cluster::{Quotas, Role, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxState};
use kiln_api::stream::{LogRecord, LogStreamName, ServerMsg};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Command, State};
use node_host::{JOIN, Netns, NodeProc, spec};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Api {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
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
        Api {
            rt,
            server: Some(server),
            _dir: dir,
            b: tokens.pop().expect("b"),
            a: tokens.pop().expect("a"),
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
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `curl` with `token`: (status, body bytes).
    fn curl(&self, token: &str, method: &str, path: &str, extra: &[&str]) -> (u16, Vec<u8>) {
        let out = Proc::new("curl")
            .args(["-sS", "-N", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .args(extra)
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

    fn create(&self, s: &kiln_api::sandbox::SandboxSpec) -> SandboxId {
        let body = serde_json::to_string(s).expect("json");
        let (status, out) = self.curl(
            &self.a,
            "POST",
            "/v1/sandboxes",
            &[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ],
        );
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&out));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        serde_json::from_value(v["id"].clone()).expect("an ID")
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(api_url: &str, token: &str, id: &SandboxId, what: &str) -> Ws {
    let url = format!(
        "{}/v1/sandboxes/{id}/{what}",
        api_url.replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the WebSocket opens");
    ws
}

/// What a session printed, and how it ended.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Option<ServerMsg>,
}

async fn recv_msg(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(&t).expect("a ServerMsg"));
            }
            Ok(Some(Ok(Message::Binary(_)))) => panic!("output before the start"),
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

/// Reads output until `exit`/`error`, or until `stop(stdout)` holds.
async fn drain(ws: &mut Ws, o: &mut Outcome, stop: impl Fn(&[u8]) -> bool) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(180), ws.next())
            .await
            .expect("output within 180 s");
        match m {
            Some(Ok(Message::Binary(b))) => match b.first() {
                Some(1) => o.stdout.extend_from_slice(&b[1..]),
                Some(2) => o.stderr.extend_from_slice(&b[1..]),
                other => panic!("bad stream prefix {other:?}"),
            },
            Some(Ok(Message::Text(t))) => {
                let m: ServerMsg = serde_json::from_str(&t).expect("a ServerMsg");
                o.end = Some(m);
                return;
            }
            Some(Ok(_)) => {}
            _ => return,
        }
        if stop(&o.stdout) {
            return;
        }
    }
}

fn has(hay: &[u8], needle: &str) -> bool {
    String::from_utf8_lossy(hay).contains(needle)
}

/// What the in-process server logs, kept to check no secret is in it.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn exec_logs_and_files_stream_through_the_server_to_the_node() {
    let server_log = Captured::default();
    let w = server_log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info,kiln_server=debug,kiln_store=info")
        .with_ansi(false)
        .with_writer(move || w.clone())
        .init();
    let mib: u64 = std::env::var("KILN_E2E_STREAMS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
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
            "--stream-idle-timeout",
            "8",
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
    let node_addr = api.read(|s| s.nodes.values().next().expect("node").address.clone());
    assert!(node_addr.starts_with(&node_ip), "{node_addr}");

    // S runs for the exec and files checks; L prints and exits 4.
    let mut s_spec = spec(&["sleep", "3600"]);
    s_spec.resources.memory_mib = 256;
    s_spec.resources.disk_mib = u32::try_from(mib * 2 + 512).expect("disk size");
    let s = api.create(&s_spec);
    let l = api.create(&spec(&[
        "sh",
        "-c",
        "sleep 2; for i in 1 2 3; do echo line-$i; echo err-$i >&2; sleep 1; done; exit 4",
    ]));
    let t0 = Instant::now();
    api.wait_for(Duration::from_secs(180), "S and L running", |st| {
        running(st, &s) && (running(st, &l) || st.sandboxes[&l].observed.is_finished())
    });
    eprintln!("two sandboxes running: {} ms", t0.elapsed().as_millis());

    // Logs of L followed until its exit (NDJSON, base64, exit record last).
    let (status, body) = api.curl(
        &api.a,
        "GET",
        &format!("/v1/sandboxes/{l}/logs?follow=true"),
        &[],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let recs: Vec<LogRecord> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("a LogRecord"))
        .collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for r in &recs {
        if let LogRecord::Output { stream, data } = r {
            let b = base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("base64");
            match stream {
                LogStreamName::Stdout => out.extend(b),
                LogStreamName::Stderr => err.extend(b),
            }
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "line-1\nline-2\nline-3\n");
    assert_eq!(String::from_utf8_lossy(&err), "err-1\nerr-2\nerr-3\n");
    assert!(
        matches!(recs.last(), Some(LogRecord::Exit { exit_code: 4, .. })),
        "{recs:?}"
    );
    // After the end: stdout only, and the exit record again.
    let (status, body) = api.curl(
        &api.a,
        "GET",
        &format!("/v1/sandboxes/{l}/logs?stderr=false"),
        &[],
    );
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("\"stderr\""), "{text}");
    assert!(
        text.trim_end()
            .ends_with(r#"{"type":"exit","exit_code":4,"signal":null}"#),
        "{text}"
    );

    let url = api.url();
    api.rt.block_on(async {
        // exec `cat` with stdin echoed back and exit code 3.
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(
            r#"{"cmd":["sh","-c","cat; exit 3"],"stdin":true}"#,
        ))
        .await
        .expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        let mut b = vec![0u8];
        b.extend_from_slice(b"hello through the server\n");
        w.send(Message::binary(b)).await.expect("stdin");
        w.send(Message::text(r#"{"type":"stdin_eof"}"#)).await.expect("eof");
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hello through the server\n");
        assert_eq!(o.end, Some(ServerMsg::Exit { exit_code: 3, signal: None }));

        // tty: a terminal of the asked size, then resized.
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(
            r#"{"cmd":["sh","-c","tty; stty size; read x; stty size"],"tty":true,"rows":40,"cols":100,"stdin":true}"#,
        ))
        .await
        .expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |b| has(b, "40 100")).await;
        assert!(has(&o.stdout, "/dev/pts/"), "{:?}", String::from_utf8_lossy(&o.stdout));
        w.send(Message::text(r#"{"type":"resize","rows":50,"cols":120}"#))
            .await
            .expect("resize");
        w.send(Message::binary(b"\x00go\r".to_vec())).await.expect("stdin");
        drain(&mut w, &mut o, |_| false).await;
        assert!(has(&o.stdout, "50 120"), "{:?}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(o.end, Some(ServerMsg::Exit { exit_code: 0, signal: None }));

        // A signal ends the process: 128 + 15.
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["sleep","600"]}"#)).await.expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        w.send(Message::text(r#"{"type":"signal","signal":15}"#)).await.expect("signal");
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        assert_eq!(o.end, Some(ServerMsg::Exit { exit_code: 143, signal: Some(15) }));

        // Hostile messages: a bad start, then a bad control message.
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["true"],"shell":1}"#)).await.expect("send");
        match recv_msg(&mut w).await {
            Some(ServerMsg::Error { error }) => assert_eq!(error.code, "invalid_message"),
            other => panic!("{other:?}"),
        }
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["sleep","30"]}"#)).await.expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        w.send(Message::binary(b"\x01not stdin".to_vec())).await.expect("send");
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        match o.end {
            Some(ServerMsg::Error { error }) => assert_eq!(error.code, "invalid_message"),
            other => panic!("{other:?}"),
        }
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["sleep","30"]}"#)).await.expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        w.send(Message::text(r#"{"type":"signal","signal":99}"#)).await.expect("send");
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        assert!(matches!(o.end, Some(ServerMsg::Error { .. })), "{o:?}");
        // A frame over 1 MiB after the start ends the session: the
        // WebSocket layer refuses it before buffering it.
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["sleep","30"],"stdin":true}"#)).await.expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        let mut big = vec![b'x'; 2 * 1024 * 1024];
        big[0] = 0;
        let _ = w.send(Message::binary(big)).await;
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        assert!(!matches!(o.end, Some(ServerMsg::Exit { .. })), "{o:?}");
        // A session with no frame either way is closed after the node's
        // --stream-idle-timeout (8 s here).
        let t0 = Instant::now();
        let mut w = ws(&url, &api.a, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["sleep","600"]}"#)).await.expect("send");
        assert!(matches!(recv_msg(&mut w).await, Some(ServerMsg::Started { .. })));
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        match o.end {
            Some(ServerMsg::Error { error }) => assert_eq!(error.code, "idle_timeout"),
            other => panic!("{other:?}"),
        }
        let idle = t0.elapsed();
        assert!(idle >= Duration::from_secs(8) && idle < Duration::from_secs(40), "{idle:?}");
        eprintln!("idle session closed after {} ms", idle.as_millis());
    });

    // Upload a file larger than the guest's RAM, then download it.
    let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let src = dir.path().join("big.bin");
    let mut hasher = Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for c in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            hasher.update(&block);
            f.write_all(&block).expect("write");
        }
        f.flush().expect("flush");
    }
    let want = hex::encode(hasher.finalize());
    let put = format!(
        "tar -C {} -cf - big.bin | curl -sS -f -X PUT -T - -H 'Authorization: Bearer {}' '{}/v1/sandboxes/{s}/files?path=/root'",
        dir.path().display(),
        api.a,
        api.url()
    );
    let t = Instant::now();
    let out = Proc::new("sh").args(["-c", &put]).output().expect("sh");
    assert!(
        out.status.success(),
        "upload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = t.elapsed().as_secs_f64();
    eprintln!(
        "upload {mib} MiB into a 256 MiB guest: {up:.1} s, {:.1} MiB/s",
        mib as f64 / up
    );
    std::fs::remove_file(&src).expect("rm");
    let got = api.rt.block_on(async {
        let mut w = ws(&url, &api.a, &s, "exec").await;
        // A dot on stderr every 2 s keeps the session from the node's 8 s
        // idle timeout while the guest hashes in silence.
        w.send(Message::text(
            r#"{"cmd":["sh","-c","sha256sum /root/big.bin & while kill -0 $! 2>/dev/null; do echo . >&2; sleep 2; done; wait $!"]}"#,
        ))
            .await
            .expect("send");
        assert!(matches!(
            recv_msg(&mut w).await,
            Some(ServerMsg::Started { .. })
        ));
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        assert_eq!(
            o.end,
            Some(ServerMsg::Exit {
                exit_code: 0,
                signal: None
            })
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    });
    assert_eq!(got, format!("{want}  /root/big.bin\n"));
    let get = format!(
        "set -o pipefail; curl -sS -f -H 'Authorization: Bearer {}' '{}/v1/sandboxes/{s}/files?path=/root/big.bin' | tar -xOf - | sha256sum",
        api.a,
        api.url()
    );
    let t = Instant::now();
    let out = Proc::new("bash")
        .args(["-c", &get])
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let down = t.elapsed().as_secs_f64();
    eprintln!(
        "download {mib} MiB: {down:.1} s, {:.1} MiB/s",
        mib as f64 / down
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{want}  -\n"));

    // Tenant B: 404 on everything of A's sandbox, exactly like a missing one.
    for (method, path, extra) in [
        ("GET", format!("/v1/sandboxes/{s}/exec"), vec![]),
        ("GET", format!("/v1/sandboxes/{s}/attach"), vec![]),
        ("GET", format!("/v1/sandboxes/{s}/logs?follow=true"), vec![]),
        (
            "GET",
            format!("/v1/sandboxes/{s}/files?path=/root/big.bin"),
            vec![],
        ),
        (
            "PUT",
            format!("/v1/sandboxes/{s}/files?path=/root"),
            vec!["--data-binary", "x"],
        ),
    ] {
        let (status, body) = api.curl(&api.b, method, &path, &extra);
        assert_eq!(
            status,
            404,
            "{method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(has(&body, "not_found"));
    }
    // A missing sandbox looks the same; A itself gets a clear 400 on a
    // plain GET of a WebSocket route.
    let (status, _) = api.curl(&api.a, "GET", "/v1/sandboxes/sb-0000000000000000/logs", &[]);
    assert_eq!(status, 404);
    let (status, body) = api.curl(&api.a, "GET", &format!("/v1/sandboxes/{s}/exec"), &[]);
    assert_eq!(status, 400);
    assert!(has(&body, "websocket_required"));

    // The node serves its endpoints over TLS only, with the certificate
    // whose fingerprint the server pinned; it refuses anything but its key.
    let key = std::fs::read_to_string(k.state_dir().join("node").join("stream.key")).expect("key");
    let pem = std::fs::read_to_string(k.state_dir().join("node").join("stream-cert.pem"))
        .expect("the node's certificate");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("PEM body");
    let pinned = api.read(|s| {
        s.nodes
            .values()
            .next()
            .expect("node")
            .stream_cert_sha256
            .clone()
    });
    assert_eq!(pinned, Some(hex::encode(Sha256::digest(&der))));
    let code = |url: &str, auth: &str| {
        let out = Proc::new("curl")
            .args([
                "-sSk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                auth,
                url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let right = format!("Authorization: Bearer {}", key.trim());
    let plain = code(
        &format!("http://{node_addr}/node/v1/sandboxes/{s}/logs"),
        &right,
    );
    assert_ne!(plain, "200", "the key is never taken in clear");
    let node_logs = format!("https://{node_addr}/node/v1/sandboxes/{s}/logs");
    for auth in [
        "Authorization: Bearer wrong-key".to_string(),
        format!("Authorization: Bearer {}x", key.trim()),
        "X-Nothing: 1".to_string(),
    ] {
        assert_eq!(code(&node_logs, &auth), "401", "{auth}");
    }
    assert_eq!(code(&node_logs, &right), "200", "the right key works");

    // An open session ends when its token is revoked (a deleted tenant's
    // tokens are; a deleted sandbox ends it the same way).
    let extra = "tenant-acme-extra-0123456789abcdef";
    let write = |c| {
        let r = api
            .rt
            .block_on(api.server.as_ref().expect("running").raft().write(c))
            .expect("write");
        assert!(!r.is_rejected(), "{r:?}");
    };
    write(Command::CreateToken {
        id: "acme-extra".into(),
        tenant: Some(TenantName::new("acme").expect("tenant")),
        role: Role::Tenant,
        sha256: kiln_store::query::hash_token(extra),
        description: String::new(),
        now_ms: 10,
        node: None,
    });
    let mut w = api.rt.block_on(async {
        let mut w = ws(&url, extra, &s, "exec").await;
        w.send(Message::text(r#"{"cmd":["cat"],"stdin":true}"#))
            .await
            .expect("send");
        assert!(matches!(
            recv_msg(&mut w).await,
            Some(ServerMsg::Started { .. })
        ));
        w
    });
    let t0 = Instant::now();
    write(Command::RevokeToken {
        id: "acme-extra".into(),
        now_ms: 11,
    });
    api.rt.block_on(async {
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match w.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the session outlived its token");
    });
    eprintln!(
        "session closed {} ms after the revocation",
        t0.elapsed().as_millis()
    );

    // Attach to S's main process (what `kiln run` does) and signal it: the
    // sandbox ends with 143 and the server hears it.
    api.rt.block_on(async {
        let mut w = ws(&url, &api.a, &s, "attach").await;
        w.send(Message::text(r#"{"stdin":false,"replay":true}"#))
            .await
            .expect("send");
        assert!(matches!(
            recv_msg(&mut w).await,
            Some(ServerMsg::Started { .. })
        ));
        w.send(Message::text(r#"{"type":"signal","signal":15}"#))
            .await
            .expect("signal");
        let mut o = Outcome::default();
        drain(&mut w, &mut o, |_| false).await;
        assert_eq!(
            o.end,
            Some(ServerMsg::Exit {
                exit_code: 143,
                signal: Some(15)
            })
        );
    });
    api.wait_for(Duration::from_secs(60), "S exited 143", |st| {
        matches!(
            st.sandboxes.get(&s).map(|r| &r.observed),
            Some(SandboxState::Exited { exit_code: 143, .. })
        )
    });

    // Clean up through the API.
    for id in [&s, &l] {
        let (status, _) = api.curl(&api.a, "DELETE", &format!("/v1/sandboxes/{id}"), &[]);
        assert_eq!(status, 200);
    }
    api.wait_for(Duration::from_secs(60), "S and L forgotten", |st| {
        !st.sandboxes.contains_key(&s) && !st.sandboxes.contains_key(&l)
    });
    node.term();
    // Neither the stream key nor the node's credential is ever logged.
    let cred = std::fs::read_to_string(k.state_dir().join("node").join("credential.json"))
        .expect("credential");
    let cred: serde_json::Value = serde_json::from_str(&cred).expect("credential json");
    let cred = cred["credential"].as_str().expect("credential").to_owned();
    let log = node.log();
    assert!(log.contains("stream endpoints over TLS"), "{log}");
    let slog = String::from_utf8_lossy(&server_log.0.lock().expect("log")).into_owned();
    assert!(slog.contains("node registered"), "{slog}");
    for secret in [key.trim(), cred.as_str()] {
        assert!(!log.contains(secret), "the node logged a secret");
        assert!(!slog.contains(secret), "the server logged a secret");
    }
    drop(dir);
    k.assert_clean();
}
