//! Security of one real replica: the API over TLS (certificates made here
//! with rcgen: a node registers over TLS, an admin lists nodes over TLS, a
//! client trusting another CA is refused), REST authentication before the
//! body is read, bounded node image lists, and a crash-safe bootstrap
//! admin token.

mod common;

use std::time::Duration;

use common::JOIN;
use kiln_api::cluster::{Capacity, DriverKind};
use kiln_api::node_rpc::node_service_client::NodeServiceClient;
use kiln_api::node_rpc::{HeartbeatRequest, RegisterRequest};
use kiln_server::Server;
use kiln_server::tls::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and a server certificate for 127.0.0.1/localhost signed by it,
/// written as PEM files into `dir`. Returns the CA file.
fn make_certs(dir: &std::path::Path, tag: &str) -> (std::path::PathBuf, TlsFiles) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("kiln test CA {tag}"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("p");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let ca = dir.join(format!("ca-{tag}.pem"));
    std::fs::write(&ca, ca_cert.pem()).expect("write ca");
    let files = TlsFiles {
        cert: dir.join(format!("server-{tag}.pem")),
        key: dir.join(format!("server-{tag}.key")),
    };
    std::fs::write(&files.cert, cert.pem()).expect("write cert");
    std::fs::write(&files.key, key.serialize_pem()).expect("write key");
    (ca, files)
}

fn registration(name: &str, images: Vec<String>) -> tonic::Request<RegisterRequest> {
    let mut r = tonic::Request::new(RegisterRequest {
        join_token: String::new(),
        name: name.into(),
        address: "127.0.0.1:9".into(),
        capacity_json: serde_json::to_vec(&Capacity {
            cpus: 4,
            memory_mib: 4096,
            disk_mib: 10_000,
        })
        .expect("json"),
        driver_json: serde_json::to_vec(&DriverKind::QemuTcg).expect("json"),
        labels: Default::default(),
        images,
        stream_key: String::new(),
        stream_cert_sha256: String::new(),
    });
    r.metadata_mut()
        .insert("kiln-join-token", JOIN.parse().expect("metadata"));
    r
}

async fn start_single(dir: &std::path::Path, tls: Option<TlsFiles>) -> Server {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("KILN_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let mut cfg = common::config(1, dir);
    cfg.init = true;
    cfg.tls = tls;
    Server::start(cfg).await.expect("start")
}

fn admin_token(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("admin.token"))
        .expect("admin token")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_over_tls_verifies_the_server() {
    let dir = tempfile::tempdir().expect("tmp");
    let certs = tempfile::tempdir().expect("tmp");
    let (ca, files) = make_certs(certs.path(), "good");
    let (other_ca, _) = make_certs(certs.path(), "other");
    let server = start_single(dir.path(), Some(files)).await;
    let url = server.api_url().to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let admin = admin_token(dir.path());

    // A node registers over TLS (gRPC, ALPN h2), verifying the server.
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(&ca).expect("ca")),
    );
    let ch = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect over TLS");
    let mut node = NodeServiceClient::new(ch);
    let cred = node
        .register(registration("tls-node", vec!["busybox".into()]))
        .await
        .expect("register over TLS")
        .into_inner()
        .credential;
    assert!(!cred.is_empty());

    // An admin lists it over TLS (REST).
    let client = |ca: &std::path::Path| {
        let pem = std::fs::read(ca).expect("ca");
        reqwest::Client::builder()
            .use_preconfigured_tls(kiln_server::tls::client_config(ca).expect("client config"))
            .timeout(Duration::from_secs(10))
            .build()
            .map(|c| (c, pem))
            .expect("client")
    };
    let (good, _) = client(&ca);
    let r = good
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("list over TLS");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    assert_eq!(body["items"][0]["name"], "tls-node", "{body}");

    // A client trusting another CA is refused during the handshake.
    let (bad, _) = client(&other_ca);
    let e = bad
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect_err("wrong CA");
    let chain = format!("{:?}", e);
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("certificate"),
        "{chain}"
    );
    // Plain HTTP to the TLS port gets no API answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let r = plain
        .get(format!(
            "{}/v1/nodes",
            url.replacen("https://", "http://", 1)
        ))
        .bearer_auth(&admin)
        .send()
        .await;
    assert!(r.is_err(), "plain HTTP on the TLS port: {r:?}");
    server.shutdown().await;
}

/// Sends a request head only (a large body is declared, none is sent) and
/// returns the status line the server answers with.
async fn head_only(addr: std::net::SocketAddr, head: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the server answers without waiting for the body")
        .expect("read");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_bodies_are_not_read_and_image_lists_are_bounded() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = start_single(dir.path(), None).await;
    let addr = server.api_addr();
    // REST: no token, or a wrong one, is a 401 before the body arrives.
    for auth in ["", "authorization: Bearer kiln_not_a_token\r\n"] {
        let line = head_only(
            addr,
            &format!(
                "POST /v1/sandboxes HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}content-length: 900000\r\n\r\n"
            ),
        )
        .await;
        assert!(line.contains(" 401 "), "{auth:?}: {line}");
    }
    // gRPC: a call with neither join token nor credential is refused
    // before its message is read.
    let url = server.api_url().to_owned();
    let mut node = NodeServiceClient::connect(url.clone())
        .await
        .expect("connect");
    let mut bare = registration("n1", vec![]);
    bare.metadata_mut().remove("kiln-join-token");
    bare.get_mut().join_token = JOIN.into();
    let e = node.register(bare).await.expect_err("no metadata");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A node with more cached images than the state takes registers and
    // heartbeats: the list is cut, never refused.
    let many: Vec<String> = (0..5000)
        .map(|i| format!("registry.test/img{i:05}:1"))
        .collect();
    let cred = node
        .register(registration("n1", many.clone()))
        .await
        .expect("register with 5000 images")
        .into_inner()
        .credential;
    let mut hb = tonic::Request::new(HeartbeatRequest {
        name: "n1".into(),
        images_changed: true,
        images: many,
        ..Default::default()
    });
    hb.metadata_mut().insert(
        "authorization",
        format!("Bearer {cred}").parse().expect("metadata"),
    );
    node.heartbeat(hb)
        .await
        .expect("heartbeat with 5000 images");
    let admin = admin_token(dir.path());
    let bytes = reqwest::Client::new()
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("list")
        .bytes()
        .await
        .expect("body");
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let images = body["items"][0]["images"].as_array().expect("images").len();
    assert_eq!(images, kiln_api::cluster::MAX_NODE_IMAGES);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_admin_token_survives_a_crash_between_commit_and_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = start_single(dir.path(), None).await;
    let secret = admin_token(dir.path());
    server.shutdown().await;
    // A crash after the commit, before the rename: the secret is still in
    // the pending file, the token in the state.
    let file = dir.path().join("admin.token");
    let pending = dir.path().join("admin.token.pending");
    std::fs::rename(&file, &pending).expect("rename");
    let server = start_restart(dir.path()).await;
    assert!(!pending.exists(), "the pending file is renamed");
    assert_eq!(admin_token(dir.path()), secret, "the same secret");
    let r = reqwest::Client::new()
        .get(format!("{}/v1/nodes", server.api_url()))
        .bearer_auth(&secret)
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200, "the recovered token works");
    server.shutdown().await;

    // A crash before the commit: a fresh directory with only the pending
    // file; the next start commits that secret.
    let dir2 = tempfile::tempdir().expect("tmp");
    let pending2 = dir2.path().join("admin.token.pending");
    std::fs::write(&pending2, "kiln_pending_secret_0123456789abcdef\n").expect("write");
    let server = start_single(dir2.path(), None).await;
    assert_eq!(
        admin_token(dir2.path()),
        "kiln_pending_secret_0123456789abcdef"
    );
    let r = reqwest::Client::new()
        .get(format!("{}/v1/nodes", server.api_url()))
        .bearer_auth("kiln_pending_secret_0123456789abcdef")
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200);
    server.shutdown().await;
}

/// Restarts a single replica from `dir` (`init` again, as `kiln server
/// --init` rerun would; the flusher may hold the database a moment).
async fn start_restart(dir: &std::path::Path) -> Server {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cfg = common::config(1, dir);
        cfg.init = true;
        match Server::start(cfg).await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "restart retry");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("restart: {e}"),
        }
    }
}

/// A stream key needs the certificate fingerprint the relay pins; a node
/// that served stream endpoints cannot re-register without a key (the old
/// one would stay valid); neither the key nor the node's credential
/// appears in `GET /v1/nodes` or `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_keys_need_a_pinned_certificate_and_never_show() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = start_single(dir.path(), None).await;
    let url = server.api_url().to_owned();
    let mut node = NodeServiceClient::connect(url.clone())
        .await
        .expect("connect");
    let key = "k".repeat(20) + &"0123456789".repeat(3);
    let cert = "ab".repeat(32);
    let with = |key: &str, cert: &str, cred: Option<&str>| {
        let mut r = registration("sk", vec![]);
        r.get_mut().stream_key = key.into();
        r.get_mut().stream_cert_sha256 = cert.into();
        if let Some(c) = cred {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {c}").parse().expect("metadata"),
            );
        }
        r
    };
    let e = node
        .register(with(&key, "", None))
        .await
        .expect_err("a key without a certificate");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("stream_cert_sha256"), "{e:?}");
    let e = node
        .register(with(&key, &"AB".repeat(32), None))
        .await
        .expect_err("not lowercase hex");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let cred = node
        .register(with(&key, &cert, None))
        .await
        .expect("register")
        .into_inner()
        .credential;
    let e = node
        .register(with("", "", Some(&cred)))
        .await
        .expect_err("an empty key after one");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("stream_key"), "{e:?}");
    // A new key (and certificate) replaces the old one.
    let key2 = "z".repeat(40);
    let cert2 = "cd".repeat(32);
    let cred2 = node
        .register(with(&key2, &cert2, Some(&cred)))
        .await
        .expect("re-register with a new key")
        .into_inner()
        .credential;
    let (k, c) = server.raft().read_local(|s| {
        let n = &s.nodes[&kiln_api::cluster::NodeName::new("sk").expect("name")];
        (n.stream_key.clone(), n.stream_cert_sha256.clone())
    });
    assert_eq!((k.as_deref(), c.as_deref()), (Some(&*key2), Some(&*cert2)));

    let admin = admin_token(dir.path());
    let http = reqwest::Client::new();
    for path in ["/v1/nodes", "/metrics"] {
        let body = http
            .get(format!("{url}{path}"))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("body");
        assert!(
            path == "/metrics" || body.contains("\"sk\""),
            "{path}: {body}"
        );
        for secret in [&key, &key2, &cred, &cred2] {
            assert!(!body.contains(secret.as_str()), "{path} shows a secret");
        }
    }
    server.shutdown().await;
}

/// With --tls-cert/--tls-key/--peer-ca, Raft between servers runs over
/// mutually authenticated TLS: two replicas form a cluster and replicate;
/// their Raft ports give plain HTTP no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_between_servers_runs_over_mutual_tls() {
    let certs = tempfile::tempdir().expect("tmp");
    let (ca, files) = make_certs(certs.path(), "raft");
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=2 {
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg = common::config(id, dir.path());
        cfg.tls = Some(files.clone());
        cfg.peer_ca = Some(ca.clone());
        servers.push(Server::start(cfg).await.expect("start"));
        dirs.push(dir);
    }
    let members = servers.iter().map(|s| (s.id(), s.node_info())).collect();
    servers[0].initialize(members).await.expect("initialize");
    let t0 = std::time::Instant::now();
    loop {
        let idx = servers[0].raft().applied_index().unwrap_or(0);
        if idx > 0
            && servers[1]
                .raft()
                .wait_applied(idx, Duration::from_millis(200))
                .await
                .is_ok()
            && servers[1].raft().read_local(|s| !s.tokens.is_empty())
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no replication over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in &servers {
        let mut c = tokio::net::TcpStream::connect(s.raft().local_addr())
            .await
            .expect("connect");
        c.write_all(b"POST /raft/vote HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("closed or answered in time")
            .unwrap_or(0);
        assert!(
            !String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1"),
            "plain HTTP answered"
        );
    }
    for s in servers {
        s.shutdown().await;
    }
}
