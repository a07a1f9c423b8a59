//! The API on a Unix socket (what `kiln up` serves at `STATE/api.sock`):
//! the same router as the TCP listener, so the same authentication, body
//! limits and request deadlines, served by the same hyper builder.
//!
//! Invariants:
//! - At most [`Limits::max_connections`] connections are served at once
//!   (further ones wait in the kernel's backlog). There is no per-address
//!   limit: every peer of a Unix socket is local, and the socket's file
//!   mode (0600, set by whoever binds it) decides who may connect.
//! - A connection whose protocol is not known within
//!   [`Limits::handshake_timeout`] is dropped, and an HTTP/1 request head
//!   must arrive within it, as on TCP.
//! - Dropping the serving future ends every connection it started.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;
use tokio::task::JoinSet;

use crate::tls::{FirstByte, Limits, first_byte_within};

/// Serves `app` on `listener` until the returned future is dropped.
pub async fn serve(listener: UnixListener, app: axum::Router, limits: Limits) {
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
    // Unix peers have no address; logs name them all alike.
    let peer = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the API socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let builder = builder.clone();
        let svc = TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let _permit = permit;
            let (io, first) = FirstByte::new(stream);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            if let Err(e) = first_byte_within(conn, first, limits.handshake_timeout, peer).await {
                tracing::debug!(error = %e, "API socket connection ended with an error");
            }
        });
    }
}
