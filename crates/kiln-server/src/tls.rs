//! TLS for the API listener (rustls, no OpenSSL) and the accept loop that
//! serves it: REST, `/metrics` and the node protocol (gRPC) on one port,
//! over TLS when a certificate is configured (ALPN `h2` and `http/1.1`),
//! else plain HTTP (HTTP/1.1 and cleartext HTTP/2).
//!
//! Invariants:
//! - At most [`Limits::max_connections`] connections are served at once;
//!   further ones wait in the kernel's backlog (accepting stops), they are
//!   not served half-way.
//! - A TLS handshake and a request head each get
//!   [`Limits::handshake_timeout`]; a connection whose protocol is not
//!   known by then (no byte, or only part of the HTTP/2 preface, after the
//!   TLS handshake or at all) is dropped, whatever hyper's protocol
//!   detection would wait for.
//! - At most [`Limits::max_connections_per_ip`] connections from one peer
//!   address: one client cannot take every slot.
//! - HTTP/2 connections are pinged every 30 s and dropped when a ping is
//!   not answered within 20 s.
//! - Each HTTP/2 connection carries at most
//!   [`Limits::max_streams_per_connection`] concurrent requests.
//! - Dropping the serving future ends every connection it started.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A certificate chain and its key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate(s) in {path}: {message}")]
    Certs { path: PathBuf, message: String },
    #[error("no certificate in {0}")]
    NoCert(PathBuf),
    #[error("cannot read the private key in {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("the CA certificate(s) in {path} cannot be used: {message}")]
    Ca { path: PathBuf, message: String },
}

/// The certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.to_owned()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The API listener's TLS configuration: `files`' chain and key, ALPN
/// `h2` then `http/1.1`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration trusting only the CA certificate(s) in `ca`.
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Ca {
            path: ca.to_owned(),
            message: e.to_string(),
        })?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The CA certificate(s) in `ca` as trust roots.
fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Ca {
            path: ca.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Raft over mutually authenticated TLS: the listener serves `files` and
/// demands a client certificate chaining to `ca`; the dialling side
/// verifies peers against `ca` and presents `files`. Without `ca` the only
/// trusted certificate is this server's own (the first in `files.cert`,
/// shared by the servers): never an issuer that file may also carry, which
/// would admit every certificate it ever issued.
pub fn raft_tls(files: &TlsFiles, ca: Option<&Path>) -> Result<kiln_store::tls::RaftTls, TlsError> {
    let certs = load_certs(&files.cert)?;
    let roots = match ca {
        Some(ca) => roots(ca)?,
        None => {
            let mut own = rustls::RootCertStore::empty();
            if let Some(leaf) = certs.first() {
                own.add(leaf.clone()).map_err(|e| TlsError::Ca {
                    path: files.cert.clone(),
                    message: e.to_string(),
                })?;
            }
            own
        }
    };
    let ca = ca.unwrap_or(files.cert.as_path());
    let key = || {
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
            path: files.key.clone(),
            message: e.to_string(),
        })
    };
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Ca {
                path: ca.to_owned(),
                message: e.to_string(),
            })?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key()?)
        .map_err(TlsError::Config)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key()?)
        .map_err(TlsError::Config)?;
    Ok(kiln_store::tls::RaftTls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// A client configuration that accepts exactly the certificate whose DER
/// has the SHA-256 `sha256_hex` (a node's stream endpoints: the node sent
/// the fingerprint in `Register`). No CA, no name check: the pin is the
/// identity. The handshake signature is verified against that
/// certificate's key as usual. ALPN `http/1.1` only.
pub fn pinned_client_config(sha256_hex: &str) -> Result<rustls::ClientConfig, TlsError> {
    let pin: [u8; 32] = hex::decode(sha256_hex)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| TlsError::Ca {
            path: PathBuf::from("(pinned certificate)"),
            message: "not a SHA-256 in hex".to_owned(),
        })?;
    let provider = provider();
    let verifier = Arc::new(Pinned {
        pin,
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts one certificate, by the SHA-256 of its DER.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        // Not secret, but compared in constant time anyway.
        let diff = got.iter().zip(&self.pin).fold(0u8, |a, (x, y)| a | (x ^ y));
        if diff == 0 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// How much one listener serves at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_streams_per_connection: u32,
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    /// 1024 connections (128 from one address), 256 concurrent requests
    /// on each, 10 s to finish a handshake or send a request head.
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_ip: 128,
            max_streams_per_connection: 256,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until the returned future is dropped
/// (every connection ends with it).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(limits.max_streams_per_connection);
    let builder = Arc::new(builder);
    let per_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(peer_slot) = PeerSlot::take(&per_ip, peer.ip(), limits.max_connections_per_ip)
        else {
            tracing::debug!(%peer, "too many connections from this address");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let svc = TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let _permit = permit;
            let _peer_slot = peer_slot;
            let r = match acceptor {
                Some(a) => {
                    let tls =
                        match tokio::time::timeout(limits.handshake_timeout, a.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let (io, first) = FirstByte::new(tls);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    first_byte_within(conn, first, limits.handshake_timeout, peer).await
                }
                None => {
                    let (io, first) = FirstByte::new(tcp);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    first_byte_within(conn, first, limits.handshake_timeout, peer).await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The key a peer's connections are counted under: its IPv4 address, or
/// the /64 of an IPv6 one (a single host commonly holds a whole /64, so
/// counting exact IPv6 addresses would not limit it at all).
fn peer_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => ip,
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// One connection's share of [`Limits::max_connections_per_ip`], given
/// back when dropped.
struct PeerSlot {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Option<PeerSlot> {
        let ip = peer_key(ip);
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The HTTP/2 connection preface: hyper's protocol detection waits, with
/// no timer of its own, for as long as what arrived is a prefix of it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An I/O stream that says when the protocol is known: the whole HTTP/2
/// preface arrived, or bytes that are not a prefix of it (HTTP/1, whose
/// request head `header_read_timeout` then bounds).
pub(crate) struct FirstByte<S> {
    inner: S,
    seen: Vec<u8>,
    first: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<S> FirstByte<S> {
    pub(crate) fn new(inner: S) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            FirstByte {
                inner,
                seen: Vec::new(),
                first: Some(tx),
            },
            rx,
        )
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByte<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.first.is_some() && buf.filled().len() > before {
            let want = H2_PREFACE.len() - self.seen.len();
            let new = &buf.filled()[before..];
            let take = new.len().min(want);
            let chunk = new[..take].to_vec();
            self.seen.extend_from_slice(&chunk);
            let known = self.seen.len() == H2_PREFACE.len() || !H2_PREFACE.starts_with(&self.seen);
            if known && let Some(tx) = self.first.take() {
                let _ = tx.send(());
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByte<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `conn` but drops it when no byte arrived within `deadline`.
pub(crate) async fn first_byte_within<F, E>(
    conn: F,
    first: tokio::sync::oneshot::Receiver<()>,
    deadline: Duration,
    peer: std::net::SocketAddr,
) -> Result<(), E>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => return r,
        got = tokio::time::timeout(deadline, first) => {
            if !matches!(got, Ok(Ok(()))) {
                tracing::debug!(%peer, "no request within the deadline: dropped");
                return Ok(());
            }
        }
    }
    conn.await
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_peer_is_its_ipv4_address_or_its_ipv6_64() {
        let map = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let a: std::net::IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other: std::net::IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        let s1 = PeerSlot::take(&map, a, 2).expect("first");
        let _s2 = PeerSlot::take(&map, b, 2).expect("same /64, second");
        assert!(PeerSlot::take(&map, a, 2).is_none(), "the /64 is full");
        assert!(PeerSlot::take(&map, other, 2).is_some(), "another /64");
        drop(s1);
        assert!(PeerSlot::take(&map, b, 2).is_some(), "a slot came back");
        let mapped: std::net::IpAddr = "::ffff:10.0.0.7".parse().expect("ip");
        assert_eq!(
            peer_key(mapped),
            "10.0.0.7".parse::<std::net::IpAddr>().expect("ip")
        );
    }

    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Silent connections are dropped after the deadline, one address
    /// cannot take more than its share, and a real request still works.
    #[tokio::test]
    async fn silent_and_excess_connections_are_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let limits = Limits {
            max_connections: 16,
            max_connections_per_ip: 2,
            max_streams_per_connection: 8,
            handshake_timeout: Duration::from_millis(500),
        };
        let server = tokio::spawn(serve(listener, app, None, limits));
        let mut a = tokio::net::TcpStream::connect(addr).await.expect("a");
        // Part of the HTTP/2 preface, then nothing (hyper would wait).
        let mut b = tokio::net::TcpStream::connect(addr).await.expect("b");
        b.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("c");
        assert!(
            closed_within(&mut c, Duration::from_millis(300)).await,
            "a third connection from one address is refused"
        );
        assert!(
            closed_within(&mut a, Duration::from_secs(3)).await,
            "a silent connection is dropped"
        );
        assert!(
            closed_within(&mut b, Duration::from_secs(3)).await,
            "a connection stalled inside the HTTP/2 preface is dropped"
        );
        let mut d = tokio::net::TcpStream::connect(addr).await.expect("d");
        d.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(3), d.read_to_string(&mut out))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        server.abort();
    }
}

#[cfg(test)]
mod pin_tests {
    use super::*;

    fn reqwest_with(cfg: rustls::ClientConfig) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(cfg)
            .http1_only()
            .build()
            .expect("client")
    }

    /// The pinned client talks to the pinned certificate only, whatever
    /// name or CA it shows.
    #[tokio::test]
    async fn a_pinned_client_accepts_exactly_the_pinned_certificate() {
        let d = tempfile::tempdir().expect("tempdir");
        let mk = |n: &str| {
            let c = rcgen::generate_simple_self_signed(vec![n.to_owned()]).expect("cert");
            let files = TlsFiles {
                cert: d.path().join(format!("{n}.pem")),
                key: d.path().join(format!("{n}.key")),
            };
            std::fs::write(&files.cert, c.cert.pem()).expect("write");
            std::fs::write(&files.key, c.signing_key.serialize_pem()).expect("write");
            use sha2::Digest;
            (
                files,
                hex::encode(sha2::Sha256::digest(c.cert.der().as_ref())),
            )
        };
        let (served, pin) = mk("kiln-node");
        let (_, other_pin) = mk("other");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let cfg = server_config(&served).expect("server config");
        let server = tokio::spawn(serve(listener, app, Some(cfg), Limits::default()));
        let url = format!("https://{addr}/");
        let ok = reqwest_with(pinned_client_config(&pin).expect("pin"))
            .get(&url)
            .send()
            .await
            .expect("the pinned certificate is accepted");
        assert_eq!(ok.text().await.expect("body"), "ok");
        let e = reqwest_with(pinned_client_config(&other_pin).expect("pin"))
            .get(&url)
            .send()
            .await
            .expect_err("another certificate is refused");
        assert!(e.is_connect(), "{e:?}");
        // Plain HTTP does not reach it either.
        let plain = reqwest::Client::new()
            .get(format!("http://{addr}/"))
            .send()
            .await;
        assert!(plain.is_err() || !plain.expect("resp").status().is_success());
        for bad in ["", "zz", &"ab".repeat(31), &"ab".repeat(33)] {
            assert!(pinned_client_config(bad).is_err(), "{bad}");
        }
        server.abort();
    }
}
