//! TLS for the node's stream endpoints (`kiln node --address`): the
//! certificate the node serves, and a listener that hands axum only
//! connections whose TLS handshake finished.
//!
//! Invariants:
//! - Without `--tls-cert/--tls-key` the node makes a self-signed
//!   certificate once (rcgen; `<state>/node/stream-cert.pem`, the key 0600
//!   in `stream-cert.key`) and keeps it across restarts. Its SHA-256
//!   fingerprint goes to the server in `Register`; the server's relay
//!   accepts exactly that certificate (pinned), so no CA is involved and
//!   the stream key never travels in clear.
//! - A handshake gets [`HANDSHAKE_TIMEOUT`]; at most [`MAX_HANDSHAKES`]
//!   run at once (further connections wait in the kernel's backlog). A
//!   failed or slow handshake never stops the accept loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 64;

/// The node's stream certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum StreamTlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("no certificate in {0}")]
    NoCert(PathBuf),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The certificate the stream endpoints serve, ready to serve.
#[derive(Clone)]
pub struct StreamTls {
    pub config: Arc<rustls::ServerConfig>,
    /// Lowercase hex SHA-256 of the DER of the leaf certificate: what the
    /// server pins.
    pub fingerprint: String,
}

impl std::fmt::Debug for StreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTls")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Where the node keeps its self-signed stream certificate and its key.
pub fn default_paths(state: &Path) -> (PathBuf, PathBuf) {
    let d = state.join("node");
    (d.join("stream-cert.pem"), d.join("stream-cert.key"))
}

/// Lowercase hex SHA-256 of a certificate's DER.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The given certificate and key (PEM), or the node's own self-signed one
/// (made at the first start).
pub fn load_or_create(
    state: &Path,
    given: Option<(&Path, &Path)>,
) -> Result<StreamTls, StreamTlsError> {
    let (cert, key) = match given {
        Some((c, k)) => (c.to_owned(), k.to_owned()),
        None => {
            let (c, k) = default_paths(state);
            if !(c.exists() && k.exists()) {
                create(&c, &k)?;
            }
            (c, k)
        }
    };
    let read = |p: &Path, e: &dyn std::fmt::Display| StreamTlsError::Read {
        path: p.to_owned(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read(&cert, &e))?;
    let Some(leaf) = certs.first() else {
        return Err(StreamTlsError::NoCert(cert));
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| read(&key, &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(StreamTlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(StreamTlsError::Config)?;
    // The endpoints speak HTTP/1.1 only (WebSocket upgrades).
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(StreamTls {
        config: Arc::new(cfg),
        fingerprint,
    })
}

/// Makes a self-signed certificate: the key written 0600 first, then the
/// certificate (each atomically), so a crash leaves either both or a state
/// `load_or_create` makes again.
fn create(cert: &Path, key: &Path) -> Result<(), StreamTlsError> {
    let made = rcgen::generate_simple_self_signed(vec!["kiln-node".to_owned()])
        .map_err(|e| StreamTlsError::Generate(e.to_string()))?;
    write_atomic(key, made.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert, made.cert.pem().as_bytes(), 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StreamTlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let w = |e| StreamTlsError::Write(path.to_owned(), e);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(w)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(w)?;
    f.write_all(bytes).map_err(w)?;
    f.sync_all().map_err(w)?;
    std::fs::rename(&tmp, path).map_err(w)
}

/// A listener yielding TLS connections whose handshake finished; the
/// handshakes run in their own tasks, so a slow client delays nobody.
pub struct TlsListener {
    local: std::net::SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: &StreamTls) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let (tx, rx) = mpsc::channel(16);
        let accepting = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small stream frames go out at once (Nagle would hold a
                // chunk's tail for the peer's delayed ACK: 40 ms).
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match hs {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "stream endpoint TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "stream endpoint TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            local,
            rx,
            accepting,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (it only does when aborted): serve
            // nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_self_signed_certificate_is_made_once_with_a_private_key() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(d.path(), None).expect("made");
        assert_eq!(a.fingerprint.len(), 64);
        let (c, k) = default_paths(d.path());
        let mode = std::fs::metadata(&k).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key is the node's alone");
        assert!(
            std::fs::read_to_string(&c)
                .expect("cert")
                .contains("BEGIN CERTIFICATE")
        );
        let b = load_or_create(d.path(), None).expect("read again");
        assert_eq!(a.fingerprint, b.fingerprint, "kept across restarts");
        // Given files are served instead, with their own fingerprint.
        let other = tempfile::tempdir().expect("tempdir");
        let o = load_or_create(other.path(), None).expect("another");
        let (oc, ok) = default_paths(other.path());
        let g = load_or_create(d.path(), Some((&oc, &ok))).expect("given");
        assert_eq!(g.fingerprint, o.fingerprint);
        assert_ne!(g.fingerprint, a.fingerprint);
    }

    #[test]
    fn unreadable_or_empty_files_are_clear_errors() {
        let d = tempfile::tempdir().expect("tempdir");
        let empty = d.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = load_or_create(d.path(), Some((&empty, &empty))).expect_err("no cert");
        assert!(matches!(e, StreamTlsError::NoCert(_)), "{e}");
        let missing = d.path().join("missing.pem");
        let e = load_or_create(d.path(), Some((&missing, &missing))).expect_err("missing");
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
