//! Raft over TLS: the configurations a replica serves and dials with, and
//! a listener that hands axum only connections whose handshake (with a
//! client certificate the peer CA signed) finished.
//!
//! Invariants:
//! - With [`RaftTls`] configured every Raft connection is mutually
//!   authenticated: the serving side demands a client certificate chaining
//!   to the peer CA, the dialling side verifies the peer's certificate
//!   against the same CA and presents its own. The cluster secret is still
//!   required on every RPC on top.
//! - A handshake gets [`HANDSHAKE_TIMEOUT`]; a failed or slow one never
//!   stops the accept loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// How long a peer has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once.
const MAX_HANDSHAKES: usize = 64;

/// The TLS configurations of one replica's Raft traffic.
#[derive(Debug, Clone)]
pub struct RaftTls {
    /// What the Raft listener serves; must demand client certificates.
    pub server: Arc<rustls::ServerConfig>,
    /// What the replica dials peers with; must present a client
    /// certificate and verify peers against the peer CA.
    pub client: Arc<rustls::ClientConfig>,
}

/// A listener yielding TLS connections whose handshake finished.
pub(crate) struct TlsListener {
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
    pub(crate) fn new(
        listener: TcpListener,
        cfg: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let (tx, rx) = mpsc::channel(16);
        let accepting = tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
            let per_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
                Arc::default();
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "Raft accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Handshakes in progress are bounded per peer address and in
                // all; past either bound the connection is closed at once,
                // so silent connections from one host cannot keep the
                // servers' own from being accepted.
                let Some(slot) = PeerHandshake::take(&per_ip, peer.ip()) else {
                    tracing::debug!(%peer, "too many Raft handshakes from one address");
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many Raft handshakes");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    drop(slot);
                    match hs {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "Raft TLS handshake refused");
                        }
                        Err(_) => tracing::debug!(%peer, "Raft TLS handshake timed out"),
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

/// Raft handshakes in progress from one address.
const MAX_HANDSHAKES_PER_IP: usize = 4;

/// One handshake's share of [`MAX_HANDSHAKES_PER_IP`], given back on drop.
struct PeerHandshake {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerHandshake {
    fn take(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<PeerHandshake> {
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        *n += 1;
        Some(PeerHandshake {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for PeerHandshake {
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

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
