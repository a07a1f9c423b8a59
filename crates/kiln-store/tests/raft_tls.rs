//! Raft over mutually authenticated TLS (certificates made here with
//! rcgen): three replicas elect a leader and commit; the Raft port then
//! refuses plain HTTP, a client without a certificate and a client whose
//! certificate another CA signed; a peer certificate still needs the
//! cluster secret.

use std::sync::Arc;
use std::time::Duration;

use kiln_store::bench::{LOCAL_CLUSTER_SECRET, start_local_cluster};
use kiln_store::tls::RaftTls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    cert: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(tag: &str) -> Ca {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("kiln raft CA {tag}"));
    let cert = p.self_signed(&key).expect("ca");
    Ca {
        cert: cert.der().clone(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// A leaf for 127.0.0.1 signed by `ca`: chain and key.
fn leaf(ca: &Ca) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let p = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).expect("params");
    let cert = p.signed_by(&key, &ca.issuer).expect("leaf");
    (
        vec![cert.der().clone()],
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(ca: &Ca) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(ca.cert.clone()).expect("root");
    Arc::new(r)
}

fn raft_tls(ca: &Ca) -> RaftTls {
    let (chain, key) = leaf(ca);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .expect("verifier");
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .expect("server");
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(chain, key)
        .expect("client");
    RaftTls {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// A vote RPC over TLS with `client`; the status line, or the error.
async fn vote(
    addr: std::net::SocketAddr,
    client: rustls::ClientConfig,
    secret: Option<&str>,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut head = "POST /raft/vote HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-kiln-raft-from: 2\r\ncontent-length: 5\r\n".to_string();
    if let Some(v) = secret {
        head.push_str(&format!("x-kiln-cluster-secret: {v}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n{oops");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let line = String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if line.is_empty() {
        return Err("closed".into());
    }
    Ok(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_runs_over_mutual_tls() -> anyhow::Result<()> {
    let good = ca("good");
    let other = ca("other");
    let dir = tempfile::tempdir()?;
    let tls: Vec<RaftTls> = (0..3).map(|_| raft_tls(&good)).collect();
    let nodes = start_local_cluster(3, dir.path(), |cfg| {
        cfg.tls = Some(tls[usize::try_from(cfg.id).expect("id") - 1].clone());
    })
    .await?;
    // The cluster commits over TLS.
    let leader = nodes
        .iter()
        .find(|n| n.status().role == kiln_store::RaftRole::Leader)
        .expect("a leader");
    let r = leader
        .write(kiln_store::Command::CreateTenant {
            name: kiln_api::cluster::TenantName::new("acme").expect("name"),
            quotas: kiln_api::cluster::Quotas::default(),
            now_ms: 1,
        })
        .await?;
    assert!(!r.is_rejected(), "{r:?}");
    let t0 = std::time::Instant::now();
    while !nodes.iter().all(|n| n.read_local(|s| s.tenants.len() == 1)) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not replicated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let addr = nodes[0].local_addr();
    // Plain HTTP gets no HTTP answer.
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"POST /raft/vote HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1"),
        "plain HTTP answered"
    );
    // A client without a certificate, or with another CA's, is refused.
    let no_cert = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&good))
        .with_no_client_auth();
    let e = vote(addr, no_cert, Some(LOCAL_CLUSTER_SECRET)).await;
    assert!(e.is_err(), "no client certificate: {e:?}");
    let (chain, key) = leaf(&other);
    let foreign = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&good))
        .with_client_auth_cert(chain, key)?;
    let e = vote(addr, foreign, Some(LOCAL_CLUSTER_SECRET)).await;
    assert!(e.is_err(), "another CA's certificate: {e:?}");
    // A peer's certificate still needs the secret; with both, the RPC
    // reaches the decoder (which refuses the garbage body).
    let peer = (*raft_tls(&good).client).clone();
    let r = vote(addr, peer.clone(), None).await;
    assert!(r.as_deref().is_ok_and(|l| l.contains(" 401 ")), "{r:?}");
    let r = vote(addr, peer.clone(), Some(LOCAL_CLUSTER_SECRET)).await;
    assert!(r.as_deref().is_ok_and(|l| l.contains(" 400 ")), "{r:?}");
    // Silent connections from one host (more than every handshake slot)
    // do not keep a peer's handshake from being served at once.
    let mut silent = Vec::new();
    for _ in 0..100 {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind("127.0.0.2:0".parse()?)?;
        if let Ok(c) = sock.connect(addr).await {
            silent.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        vote(addr, peer, Some(LOCAL_CLUSTER_SECRET)),
    )
    .await;
    assert!(
        matches!(&r, Ok(Ok(l)) if l.contains(" 400 ")),
        "a peer starved by silent connections: {r:?} after {:?}",
        t.elapsed()
    );
    drop(silent);
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
