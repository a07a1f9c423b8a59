//! Who runs the node's DNS resolver ([`kiln_net::dns`]) until there is a
//! node daemon: the supervisors (`kiln shim`) of networked sandboxes.
//!
//! Every supervisor of a `--net default` sandbox starts a *candidate*
//! thread that waits (a blocking `flock`) on a host-wide lock (`/run/kiln/dns-<bridge>.lock`, one
//! resolver per bridge, since it binds the gateway's port 53). The one
//! holding it runs the resolver; the others wait. The resolver so lives
//! exactly as long as some networked sandbox does, in a process that
//! already outlives the CLI, without a process of its own: when its
//! supervisor exits (its sandbox ended, or it was killed), the kernel
//! releases the lock and closes its sockets, and another live supervisor
//! takes over at once (queries in that gap are retried by
//! the guest's resolver). A crash leaves nothing behind: the lock is an
//! flock, the resolver has no pins of its own (its admissions live in the
//! sandboxes' pinned maps, expire on their own, and go with the sandbox).
//!
//! Upstream servers: `KILN_DNS_UPSTREAM` (`IP:PORT[,IP:PORT...]`) if set,
//! else the host's `/etc/resolv.conf`.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_net::dns::{DnsServer, ResolverError, ResolverSettings};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::paths::Dirs;

/// Overrides the host's upstream DNS servers (`IP:PORT[,IP:PORT...]`).
pub const UPSTREAM_ENV: &str = "KILN_DNS_UPSTREAM";

const SWEEP: Duration = Duration::from_secs(5);

/// Starts a resolver candidate for this process (a detached thread; it ends
/// with the process). Call once, from a supervisor of a networked sandbox.
pub fn start_candidate(dirs: &Dirs) {
    let dirs = dirs.clone();
    let spawned = std::thread::Builder::new()
        .name("dns-candidate".into())
        .spawn(move || candidate(dirs));
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the DNS resolver candidate");
    }
}

/// Starts a candidate when sandbox `id` has a network (a one-line hook for
/// the supervisor).
pub fn start_candidate_if_networked(store: &crate::store::Store, id: &str) {
    if store.load(id).is_ok_and(|r| r.spec.network.is_some()) {
        start_candidate(store.dirs());
    }
}

fn lock_path(bridge: &str) -> PathBuf {
    PathBuf::from("/run/kiln").join(format!("dns-{bridge}.lock"))
}

fn candidate(dirs: Dirs) {
    let net = match crate::node::open_network(&dirs) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            warn!(error = %e, "DNS resolver: cannot open the sandbox network");
            return;
        }
    };
    let path = lock_path(&net.config().bridge);
    let open = std::fs::create_dir_all("/run/kiln").and_then(|()| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    });
    let mut file = match open {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "DNS resolver: cannot open its lock");
            return;
        }
    };
    // Blocks this thread (not a poll) until the holder's process ends and
    // the kernel releases the lock; retried only when a signal interrupts.
    let lock = loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(l) => break l,
            Err((f, nix::errno::Errno::EINTR)) => file = f,
            Err((_, e)) => {
                warn!(error = %e, "DNS resolver: cannot take its lock");
                return;
            }
        }
    };
    if let Err(e) = serve(net, lock) {
        warn!(error = %e, "DNS resolver stopped");
    }
}

fn upstreams() -> Result<Vec<SocketAddr>, ResolverError> {
    match std::env::var(UPSTREAM_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            let parsed: Result<Vec<SocketAddr>, _> =
                v.split(',').map(|s| s.trim().parse()).collect();
            match parsed {
                Ok(list) => Ok(list),
                Err(_) => {
                    warn!(value = %v, "{UPSTREAM_ENV} is not IP:PORT[,IP:PORT...]; using the host's");
                    kiln_net::dns::system_upstreams()
                }
            }
        }
        _ => kiln_net::dns::system_upstreams(),
    }
}

fn serve(net: Arc<kiln_net::Network>, _lock: Flock<std::fs::File>) -> Result<(), ResolverError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ResolverError::Bind(SocketAddr::from(([0, 0, 0, 0], 53)), e))?;
    rt.block_on(async move {
        let settings = ResolverSettings {
            listen: SocketAddr::from((net.ipam().gateway(), 53)),
            upstreams: upstreams()?,
            timeout: Duration::from_secs(2),
        };
        // The previous holder's sockets close as its process ends, maybe
        // just after its lock was released.
        let mut tries = 0;
        let server = loop {
            match DnsServer::start(net.clone(), settings.clone()).await {
                Ok(s) => break s,
                Err(ResolverError::Bind(..)) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        info!(
            pid = std::process::id(),
            "this supervisor runs the node's DNS resolver"
        );
        let sweeper = net.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP).await;
                let net = sweeper.clone();
                let _ = tokio::task::spawn_blocking(move || net.sweep_admissions()).await;
            }
        });
        server.wait().await
    })
}
