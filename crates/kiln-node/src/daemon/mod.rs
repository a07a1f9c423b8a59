//! `kiln node`: the daemon that makes one host a node of a Kiln cluster.
//!
//! It registers with the control plane (capacity, driver, labels, cached
//! images; the join token, then its own credential, stored 0600 in the
//! state directory and presented again after a restart), heartbeats at the
//! interval the server gives, watches its desired state and converges to
//! it, and reports what it observes of its sandboxes.
//!
//! Invariants:
//! - The daemon holds no sandbox logic: it decides with the pure
//!   [`converge::decide`] and acts through the node service
//!   ([`crate::node::Node`]: run with the server's ID, pause, resume, stop,
//!   remove, wait, reconcile) or, with `--dry-run`, through an in-memory
//!   node that records sandboxes as running without booting anything.
//! - Level-triggered: a pass observes everything and decides again on each
//!   desired-state update, each finished action, each sandbox exit (one
//!   `Node::wait` per running sandbox) and every [`CONVERGE_EVERY`]. Before
//!   the first desired state arrives nothing is touched.
//! - Supervisors and VMMs outlive the daemon. After a `kill -9` and a
//!   restart it finds its sandboxes by their ownership markers and records
//!   (`backend`), adopts them (a create for an ID that exists locally is
//!   adoption, never a second VM) and reports them.
//! - The server unreachable changes nothing that runs: the daemon keeps the
//!   last desired state, retries with backoff, tries the other `--server`
//!   URLs and follows `kiln-leader` hints.

pub mod backend;
pub mod client;
pub mod converge;
pub mod host;
pub mod images_api;
pub mod snap_routes;
pub mod stream_tls;
pub mod streams;
pub mod templates;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_api::cluster::{Assignment, NodeDesired, NodeName};
use kiln_api::node_rpc::SandboxReport;
use kiln_api::sandbox::{SandboxId, SandboxState};
use tokio::sync::{Notify, Semaphore, watch};

pub use backend::{Backend, DryRun, Marker, RealBackend};
pub use client::{Backoff, Client, ClientError, Registration};
pub use converge::{Action, Local, Observed, decide};
pub use host::CapacityOverrides;

use crate::node::Node;

/// How often a converge pass runs without any other trigger.
pub const CONVERGE_EVERY: Duration = Duration::from_secs(2);
/// How often the node's own reconciler (`Node::reconcile`) runs.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// How often the cached images are checked for the heartbeat.
const IMAGES_EVERY: Duration = Duration::from_secs(30);
/// How often the automatic templates are listed for the heartbeat (a
/// directory scan and its manifests).
const TEMPLATES_EVERY: Duration = Duration::from_secs(3);

/// What `kiln node` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Server URLs (`http://host:port` or `host:port`), tried in turn.
    pub servers: Vec<String>,
    pub join_token: String,
    pub name: NodeName,
    /// Where the node serves its stream endpoints (`host:port`).
    pub address: String,
    pub labels: HashMap<String, String>,
    /// Record sandboxes as running without booting VMs.
    pub dry_run: bool,
    pub capacity: CapacityOverrides,
    pub insecure_registries: Vec<String>,
    /// Most sandbox starts at once (default: the host's CPUs × 2).
    pub max_parallel_starts: Option<usize>,
    /// Seconds from SIGTERM to SIGKILL when the server wants a sandbox
    /// stopped.
    pub stop_grace: u64,
    /// CA certificate(s) (PEM) that `https://` servers must chain to.
    pub ca_pem: Option<Vec<u8>>,
    /// The certificate and key (PEM files) the stream endpoints serve;
    /// `None`: the node's own self-signed one (`stream_tls`).
    pub stream_tls_files: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Seconds without a frame either way after which a stream session is
    /// closed (`None`: `kiln_api::stream::IDLE_SECS`).
    pub stream_idle_secs: Option<u64>,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("this host cannot run microVMs (use --dry-run to test the control plane without them)")]
    NoDriver(#[source] kiln_vmm::SelectDriverError),
    #[error("no server URL was given")]
    NoServer,
    #[error(
        "another kiln node runs on state directory {0} (two would fence each other's sandboxes)"
    )]
    Busy(std::path::PathBuf),
    #[error("cannot lock the node state {0}")]
    Lock(std::path::PathBuf, #[source] std::io::Error),
}

/// One daemon per state directory: held for the daemon's lifetime (the
/// kernel releases it when the process dies, even by SIGKILL).
fn lock_state_dir(
    state: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let dir = state.join("node");
    std::fs::create_dir_all(&dir).map_err(|e| DaemonError::Lock(dir.clone(), e))?;
    let path = dir.join(".daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DaemonError::Lock(path.clone(), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| DaemonError::Busy(state.to_path_buf()))
}

/// The state the daemon's tasks share.
struct Shared {
    backend: Backend,
    client: Client,
    desired: watch::Receiver<Option<NodeDesired>>,
    /// IDs with an action in flight.
    busy: Mutex<BTreeSet<SandboxId>>,
    /// IDs with an exit watcher.
    watching: Mutex<BTreeSet<SandboxId>>,
    wake: Notify,
    starts: Semaphore,
    /// What the node observes of its owned, assigned sandboxes:
    /// `(converged generation, state)`, for the reporter.
    observed: watch::Sender<BTreeMap<SandboxId, Observation>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the daemon until `shutdown` completes (sandboxes keep running).
pub async fn run(
    node: Node,
    cfg: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    if cfg.servers.iter().all(|s| s.trim().is_empty()) {
        return Err(DaemonError::NoServer);
    }
    let _one_daemon = lock_state_dir(&node.dirs().state)?;
    let driver = match tokio::task::spawn_blocking(host::driver).await {
        Ok(Ok((kind, reason))) => {
            tracing::info!(driver = ?kind, %reason, "driver");
            kind
        }
        Ok(Err(e)) if !cfg.dry_run => return Err(DaemonError::NoDriver(e)),
        _ => {
            tracing::warn!("no usable VMM on this host; the dry-run node reports qemu-tcg");
            kiln_api::cluster::DriverKind::QemuTcg
        }
    };
    let capacity = host::capacity(&node, cfg.capacity);
    let images = host::cached_images(&node);
    tracing::info!(
        ?capacity,
        images = images.len(),
        dry_run = cfg.dry_run,
        "node"
    );
    let backend = if cfg.dry_run {
        Backend::DryRun(DryRun::default())
    } else {
        Backend::Real(RealBackend {
            node: node.clone(),
            insecure_registries: cfg.insecure_registries.clone(),
            stop_grace: cfg.stop_grace,
        })
    };
    let parallel = cfg
        .max_parallel_starts
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() * 2));
    let mut client = Client::new(&cfg.servers, cfg.name.clone(), &node.dirs().state);
    if let Some(ca) = &cfg.ca_pem {
        client = client.with_ca(ca.clone());
    }
    let (desired_tx, desired_rx) = watch::channel(None);
    let (observed_tx, observed_rx) = watch::channel(BTreeMap::new());
    let shared = Arc::new(Shared {
        backend,
        client,
        desired: desired_rx,
        busy: Mutex::new(BTreeSet::new()),
        watching: Mutex::new(BTreeSet::new()),
        wake: Notify::new(),
        starts: Semaphore::new(parallel.max(1)),
        observed: observed_tx,
    });
    let (address, stream_key, listener) =
        stream_listener(&node, &cfg.address, cfg.stream_tls_files.as_ref()).await;
    let reg = Registration {
        join_token: cfg.join_token.clone(),
        name: cfg.name.clone(),
        address,
        stream_key: stream_key.clone(),
        stream_cert_sha256: listener
            .as_ref()
            .map(|(_, t)| t.fingerprint.clone())
            .unwrap_or_default(),
        capacity_json: serde_json::to_vec(&capacity).expect("capacity serializes"),
        driver_json: serde_json::to_vec(&driver).expect("driver serializes"),
        labels: cfg.labels.clone(),
        images,
    };
    let (registered_tx, registered_rx) = watch::channel(0u64);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some((l, tls)) = listener {
        let sh = shared.clone();
        let owned: Arc<dyn Fn(&SandboxId) -> bool + Send + Sync> =
            Arc::new(move |id| streams::owned_by(&sh.backend, id));
        let mut cx = streams::Ctx::new(node.clone(), &stream_key, owned);
        if let Some(secs) = cfg.stream_idle_secs {
            cx.idle = Duration::from_secs(secs.max(1));
        }
        cx.insecure_registries = cfg.insecure_registries.clone();
        let cx = Arc::new(cx);
        tasks.spawn(streams::serve(l, tls, cx));
    }
    tasks.spawn(converge_loop(shared.clone()));
    tasks.spawn(session_loop(
        shared.clone(),
        node.clone(),
        reg,
        registered_tx,
    ));
    tasks.spawn(watch_loop(
        shared.clone(),
        desired_tx,
        registered_rx.clone(),
    ));
    tasks.spawn(report_loop(
        shared.clone(),
        observed_rx,
        registered_rx.clone(),
    ));
    if let Backend::Real(r) = &shared.backend {
        tasks.spawn(template_loop(
            shared.clone(),
            r.node.clone(),
            cfg.insecure_registries.clone(),
            registered_rx,
        ));
    }
    shutdown.await;
    tracing::info!("shutting down; sandboxes keep running");
    tasks.abort_all();
    Ok(())
}

/// Binds the stream endpoints on `address` (`host:port`; port 0 picks
/// one) and loads the node's stream key and TLS certificate. Returns the
/// address to advertise, the key, and the listener with its certificate; a
/// node that cannot bind (an address that is no local `host:port`) or has
/// no certificate runs without stream endpoints and says so (never in
/// clear).
async fn stream_listener(
    node: &Node,
    address: &str,
    tls_files: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> (
    String,
    String,
    Option<(tokio::net::TcpListener, stream_tls::StreamTls)>,
) {
    let key = match streams::load_or_create_key(&node.dirs().state) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the stream key; no stream endpoints");
            return (address.to_owned(), String::new(), None);
        }
    };
    let state = node.dirs().state.clone();
    let given = tls_files.cloned();
    let tls = tokio::task::spawn_blocking(move || {
        stream_tls::load_or_create(
            &state,
            given.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
    })
    .await;
    let tls = match tls {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "no TLS certificate for the stream endpoints; none served");
            return (address.to_owned(), String::new(), None);
        }
        Err(e) => {
            tracing::warn!(error = %e, "no TLS certificate for the stream endpoints; none served");
            return (address.to_owned(), String::new(), None);
        }
    };
    let bind = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    match tokio::net::TcpListener::bind(bind).await {
        Ok(l) => {
            let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
            let host = bind.rsplit_once(':').map_or(bind, |(h, _)| h);
            let advertised = format!("{host}:{port}");
            tracing::info!(address = %advertised, cert_sha256 = %tls.fingerprint, "stream endpoints over TLS (exec, attach, logs, files)");
            (advertised, key, Some((l, tls)))
        }
        Err(e) => {
            tracing::warn!(%address, error = %e, "cannot listen for the stream endpoints; exec, logs and files through the API will fail (give --address HOST:PORT)");
            (address.to_owned(), String::new(), None)
        }
    }
}

/// Registers, then heartbeats; registers again when the server no longer
/// knows the credential. Each successful registration bumps `registered`.
async fn session_loop(
    sh: Arc<Shared>,
    node: Node,
    mut reg: Registration,
    registered: watch::Sender<u64>,
) {
    let mut backoff = Backoff::default();
    let mut last_images = reg.images.clone();
    'register: loop {
        let interval = match sh.client.register(&reg).await {
            Ok(r) => {
                backoff.reset();
                tracing::info!(node = %reg.name, heartbeat_ms = r.heartbeat_interval_ms, "registered");
                registered.send_modify(|n| *n += 1);
                Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 60_000))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot register; retrying");
                backoff.wait().await;
                continue;
            }
        };
        let mut images_at = tokio::time::Instant::now();
        // Registering empties the server's list: the first heartbeat sends
        // them all.
        let mut last_templates: Option<Vec<kiln_api::templates::NodeTemplate>> = None;
        let mut templates_at: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut templates = None;
            if sh.backend.is_dry_run() {
                // Makes none.
            } else if templates_at.is_none_or(|t| t.elapsed() >= TEMPLATES_EVERY) {
                templates_at = Some(tokio::time::Instant::now());
                let n = node.clone();
                let now = tokio::task::spawn_blocking(move || n.automatic_templates())
                    .await
                    .unwrap_or_default();
                if last_templates.as_ref() != Some(&now) {
                    templates = Some(now);
                }
            }
            let mut changed = None;
            if images_at.elapsed() >= IMAGES_EVERY {
                images_at = tokio::time::Instant::now();
                let n = node.clone();
                let now = tokio::task::spawn_blocking(move || host::cached_images(&n))
                    .await
                    .unwrap_or_default();
                if now != last_images {
                    changed = Some(now);
                }
            }
            match sh
                .client
                .heartbeat(changed.clone(), templates.as_deref())
                .await
            {
                Ok(()) => {
                    backoff.reset();
                    if let Some(now) = changed {
                        last_images = now.clone();
                        reg.images = now;
                    }
                    if templates.is_some() {
                        last_templates = templates;
                    }
                }
                Err(e) if e.is_auth() => {
                    tracing::warn!(error = %e, "the server refused the credential; registering again");
                    continue 'register;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }
}

/// Keeps a watch of the desired state open and publishes each update.
async fn watch_loop(
    sh: Arc<Shared>,
    desired: watch::Sender<Option<NodeDesired>>,
    mut registered: watch::Receiver<u64>,
) {
    let mut backoff = Backoff::default();
    let mut revision = 0u64;
    if registered.wait_for(|n| *n > 0).await.is_err() {
        return;
    }
    loop {
        let (url, mut stream) = match sh.client.watch(revision).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the desired state; retrying");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(upd)) => {
                    backoff.reset();
                    match serde_json::from_slice::<NodeDesired>(&upd.desired_json) {
                        Ok(d) if d.node == *sh.client.name() => {
                            revision = upd.revision;
                            tracing::debug!(
                                revision,
                                sandboxes = d.sandboxes.len(),
                                "desired state"
                            );
                            sh.backend.protect_cluster(&d.cluster_addresses).await;
                            desired.send_replace(Some(d));
                            sh.wake.notify_one();
                        }
                        Ok(d) => {
                            tracing::warn!(node = %d.node, "a desired state for another node; ignored")
                        }
                        Err(e) => tracing::warn!(error = %e, "an invalid desired state; ignored"),
                    }
                }
                Ok(None) => {
                    tracing::info!("the server closed the watch; reopening");
                    break;
                }
                Err(s) => {
                    let e = ClientError::Status(s);
                    tracing::warn!(error = %e, "the watch broke; reopening");
                    sh.client.stream_failed(&url, &e).await;
                    backoff.wait().await;
                    break;
                }
            }
        }
    }
}

/// What the server hears of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    /// The generation the node converged to.
    generation: u64,
    state: SandboxState,
    /// How its start went (sent with each report until it ends).
    start: Option<kiln_api::sandbox::StartReport>,
}

/// Sends what changed in the observed states; retries what was not sent.
async fn report_loop(
    sh: Arc<Shared>,
    mut observed: watch::Receiver<BTreeMap<SandboxId, Observation>>,
    mut registered: watch::Receiver<u64>,
) {
    let mut sent: BTreeMap<SandboxId, Observation> = BTreeMap::new();
    let mut backoff = Backoff::default();
    if registered.wait_for(|n| *n > 0).await.is_err() {
        return;
    }
    loop {
        let cur = observed.borrow_and_update().clone();
        sent.retain(|id, _| cur.contains_key(id));
        let changed: Vec<(SandboxId, Observation)> = cur
            .into_iter()
            .filter(|(id, v)| sent.get(id) != Some(v))
            .collect();
        if !changed.is_empty() {
            // Bounded batches: a node with many sandboxes reports in parts.
            let mut ok = true;
            for chunk in changed.chunks(256) {
                let reports = chunk
                    .iter()
                    .map(|(id, o)| SandboxReport {
                        id: id.to_string(),
                        generation: o.generation,
                        state_json: serde_json::to_vec(&o.state).expect("states serialize"),
                        start_json: o.start.as_ref().map_or_else(Vec::new, |s| {
                            serde_json::to_vec(s).expect("start reports serialize")
                        }),
                    })
                    .collect();
                match sh.client.report(reports).await {
                    Ok(refused) => {
                        for ((id, v), why) in chunk.iter().zip(refused) {
                            if let Some(why) = why {
                                tracing::warn!(sandbox = %id, reason = %why, "report refused");
                            }
                            sent.insert(id.clone(), v.clone());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "report failed; retrying");
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                backoff.reset();
            } else {
                backoff.wait().await;
                continue;
            }
        }
        tokio::select! {
            r = observed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// Converges the templates and pools of the desired state
/// ([`templates`]) and reports them: on each desired-state update, each
/// finished action and every [`CONVERGE_EVERY`].
async fn template_loop(
    sh: Arc<Shared>,
    node: Node,
    insecure: Vec<String>,
    mut registered: watch::Receiver<u64>,
) {
    use templates::{TplAction, decide};
    if registered.wait_for(|n| *n > 0).await.is_err() {
        return;
    }
    let made = Arc::new(Mutex::new(templates::load_made(&node)));
    let errors: Arc<Mutex<BTreeMap<String, (String, std::time::Instant)>>> = Arc::default();
    let busy: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    // Pool sizings and removals that failed (a build still in use): not
    // tried again before RETRY_FAILED, so a failure never spins the loop.
    let held_back: Arc<Mutex<BTreeMap<String, std::time::Instant>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let mut desired = sh.desired.clone();
    let mut tick = tokio::time::interval(CONVERGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = None;
    loop {
        tokio::select! {
            r = desired.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = done.notified() => {}
        }
        let Some(want) = desired.borrow().clone().map(|d| d.templates) else {
            continue;
        };
        let snapshot = lock(&made).clone();
        let n2 = node.clone();
        let mut local = tokio::task::spawn_blocking(move || templates::observe(&n2, &snapshot))
            .await
            .unwrap_or_default();
        let errs: BTreeMap<String, String> = {
            let mut e = lock(&errors);
            e.retain(|_, (_, at)| at.elapsed() < templates::RETRY_FAILED * 20);
            local.failed_recently = e
                .iter()
                .filter(|(_, (_, at))| at.elapsed() < templates::RETRY_FAILED)
                .map(|(k, _)| k.clone())
                .collect();
            e.iter().map(|(k, (m, _))| (k.clone(), m.clone())).collect()
        };
        lock(&held_back).retain(|_, at| at.elapsed() < templates::RETRY_FAILED);
        for a in decide(&want, &local) {
            let lk = a.lock_key();
            if lock(&held_back).contains_key(&lk) || !lock(&busy).insert(lk.clone()) {
                continue;
            }
            let (node, made, errors, busy, done, insecure, held_back) = (
                node.clone(),
                made.clone(),
                errors.clone(),
                busy.clone(),
                done.clone(),
                insecure.clone(),
                held_back.clone(),
            );
            tokio::spawn(async move {
                match &a {
                    TplAction::Create {
                        key,
                        image,
                        resources,
                    } => match templates::create(&node, image, *resources, &insecure).await {
                        Ok(local) => {
                            lock(&errors).remove(key);
                            let mut m = lock(&made);
                            let old = m.insert(
                                key.clone(),
                                templates::Made {
                                    local: local.clone(),
                                    image: image.clone(),
                                    resources: *resources,
                                },
                            );
                            // The build it replaces (stale after an
                            // upgrade) goes once nothing uses it.
                            if let Some(old) = old
                                && old.local != local
                            {
                                tracing::info!(template = %old.local, new = %local, "replaced; the old one will be removed");
                                m.insert(templates::retired_key(&old.local), old);
                            }
                            if let Err(e) = templates::save_made(&node, &m) {
                                tracing::warn!(error = %e, "cannot save templates.json");
                            }
                        }
                        Err(why) => {
                            tracing::warn!(template = %key, %image, error = %why, "cannot build the template");
                            lock(&errors).insert(key.clone(), (why, std::time::Instant::now()));
                        }
                    },
                    TplAction::SizePool { local, size } => {
                        match node.size_pool(local, *size).await {
                            Ok(f) => {
                                tracing::info!(template = %local, size, ready = f.ready, started = f.started, removed = f.removed, "pool sized for the server")
                            }
                            Err(e) => {
                                tracing::warn!(template = %local, error = %crate::error_chain(&e), "cannot size the pool");
                                lock(&held_back).insert(lk.clone(), std::time::Instant::now());
                            }
                        }
                    }
                    TplAction::Drop { key, local, remove } => {
                        // Decided from a snapshot: a build another key
                        // took meanwhile (a Create that found it) stays.
                        let taken = lock(&made).iter().any(|(k, m)| {
                            k != key && m.local == *local && !templates::is_retired(k)
                        });
                        let gone = if *remove && !taken {
                            match node.remove_template(local).await {
                                Ok(()) | Err(crate::node::TemplateOpError::NotFound(_)) => {
                                    tracing::info!(template = %local, "template removed for the server");
                                    true
                                }
                                Err(e) => {
                                    tracing::warn!(template = %local, error = %crate::error_chain(&e), "cannot remove the template yet");
                                    lock(&held_back).insert(lk.clone(), std::time::Instant::now());
                                    false
                                }
                            }
                        } else {
                            true
                        };
                        if gone {
                            let mut m = lock(&made);
                            m.remove(key);
                            if let Err(e) = templates::save_made(&node, &m) {
                                tracing::warn!(error = %e, "cannot save templates.json");
                            }
                        }
                    }
                }
                lock(&busy).remove(&lk);
                done.notify_one();
            });
        }
        // Report what changed (and again now and then: a lost report).
        let n2 = node.clone();
        let sizes: BTreeMap<String, u64> = {
            let locals: Vec<String> = local.present.iter().cloned().collect();
            tokio::task::spawn_blocking(move || {
                locals
                    .into_iter()
                    .map(|l| {
                        let s = templates::size_of(&n2, &l);
                        (l, s)
                    })
                    .collect()
            })
            .await
            .unwrap_or_default()
        };
        let reports =
            templates::reports(&want, &local, &errs, |l| sizes.get(l).copied().unwrap_or(0));
        if reports.is_empty() || last_sent.as_ref() == Some(&reports) {
            continue;
        }
        match sh.client.report_templates(&reports).await {
            Ok(refused) => {
                for (r, why) in reports.iter().zip(refused) {
                    if let Some(why) = why {
                        tracing::warn!(template = %r.name, reason = %why, "template report refused");
                    }
                }
                last_sent = Some(reports);
            }
            Err(e) => tracing::warn!(error = %e, "template report failed; retrying"),
        }
    }
}

/// The converge loop: a pass on every trigger (see the module doc).
async fn converge_loop(sh: Arc<Shared>) {
    let mut desired = sh.desired.clone();
    let mut tick = tokio::time::interval(CONVERGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sh.wake.notified() => {}
            r = desired.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = reconcile.tick() => sh.backend.reconcile().await,
        }
        pass(&sh).await;
    }
}

/// One converge pass: observe, decide, start the actions, publish what is
/// observed.
async fn pass(sh: &Arc<Shared>) {
    let Some(desired) = sh.desired.borrow().clone() else {
        return;
    };
    let (records, markers) = sh.backend.observe().await;
    let mut local = BTreeMap::new();
    for id in records.keys().chain(markers.keys()) {
        let marker = markers.get(id);
        let observed = match (records.get(id), marker.and_then(|m| m.terminal.as_ref())) {
            (Some(st), _) => Observed::of(st),
            (None, Some(_)) => Observed::Finished,
            (None, None) => Observed::Absent,
        };
        local.insert(
            id.clone(),
            Local {
                observed,
                converged: marker.map_or(0, |m| m.converged),
                owned: marker.is_some(),
                policy_stale: false,
            },
        );
    }
    let by_id: HashMap<&SandboxId, &Assignment> =
        desired.sandboxes.iter().map(|a| (&a.id, a)).collect();
    // A networked sandbox enforces what the daemon last applied to it.
    for (id, l) in local.iter_mut() {
        if let (Some(a), Some(m)) = (by_id.get(id), markers.get(id)) {
            l.policy_stale = a.spec.network != kiln_api::sandbox::NetworkSpec::None
                && m.network.as_ref() != Some(&a.spec.network);
        }
    }
    let busy = lock(&sh.busy).clone();
    let actions = decide(&desired.sandboxes, &local, &busy);
    for a in actions {
        let id = a.id().clone();
        if !lock(&sh.busy).insert(id.clone()) {
            continue;
        }
        let assignment = by_id.get(&id).map(|a| (*a).clone());
        let sh2 = sh.clone();
        tokio::spawn(async move {
            execute(&sh2, &a, assignment.as_ref()).await;
            lock(&sh2.busy).remove(a.id());
            sh2.wake.notify_one();
        });
    }
    // Exit watchers for every owned sandbox that runs.
    for (id, st) in &records {
        if !markers.contains_key(id)
            || !matches!(
                st,
                SandboxState::Running { .. } | SandboxState::Paused { .. }
            )
        {
            continue;
        }
        if sh.backend.is_dry_run() || !lock(&sh.watching).insert(id.clone()) {
            continue;
        }
        let (sh2, id) = (sh.clone(), id.clone());
        tokio::spawn(async move {
            sh2.backend.wait_exit(&id).await;
            lock(&sh2.watching).remove(&id);
            sh2.wake.notify_one();
        });
    }
    // What the server hears: owned, assigned, converged at least once.
    let mut observed = BTreeMap::new();
    for a in &desired.sandboxes {
        let Some(m) = markers.get(&a.id) else {
            continue;
        };
        if m.converged == 0 {
            continue;
        }
        let state = match (records.get(&a.id), &m.terminal) {
            (Some(st), _) => st.clone(),
            (None, Some(t)) => t.clone(),
            (None, None) => continue,
        };
        observed.insert(
            a.id.clone(),
            Observation {
                generation: m.converged,
                state,
                start: m.start.clone(),
            },
        );
    }
    sh.observed.send_if_modified(|cur| {
        if *cur == observed {
            false
        } else {
            *cur = observed;
            true
        }
    });
}

/// The most bytes of an error the node reports.
const MAX_ERROR: usize = 4000;

fn failed(e: &dyn std::fmt::Display) -> SandboxState {
    let mut error = e.to_string();
    if error.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    SandboxState::Failed {
        error,
        exit_code: 255,
    }
}

/// Carries out one action (errors are logged; the next pass decides again).
async fn execute(sh: &Shared, a: &Action, assignment: Option<&Assignment>) {
    let b = &sh.backend;
    let result: Result<(), backend::BackendError> = async {
        match a {
            Action::Create { id, generation } => {
                let Some(asg) = assignment else { return Ok(()) };
                let mut marker = b.marker(id).unwrap_or_default();
                marker.terminal = None;
                marker.network = Some(asg.spec.network.clone());
                b.set_marker(id, &marker)?;
                let _permit = sh.starts.acquire().await;
                let t0 = std::time::Instant::now();
                let made = match &asg.spec.origin {
                    kiln_api::sandbox::Origin::Snapshot { snapshot } => {
                        b.restore(id, &asg.tenant, snapshot).await
                    }
                    kiln_api::sandbox::Origin::Image => b.create(id, &asg.tenant, &asg.spec).await,
                };
                match made {
                    Ok(start) => {
                        tracing::info!(sandbox = %id, ms = t0.elapsed().as_millis() as u64, "created");
                        if start.is_some() {
                            // Within the bounds the server checks (a long
                            // image reference or many templates in a note
                            // are cut, not refused with the state).
                            marker.start = start.map(kiln_api::sandbox::StartReport::bounded);
                            b.set_marker(id, &marker)?;
                        }
                    }
                    Err(backend::BackendError::Run(crate::node::RunError::Store(
                        crate::store::StoreError::Exists(_),
                    ))) => {
                        tracing::info!(sandbox = %id, "exists already: adopted");
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "cannot create the sandbox");
                        marker.converged = *generation;
                        marker.terminal = Some(failed(&e));
                        b.set_marker(id, &marker)?;
                    }
                }
            }
            Action::Adopt { id } => {
                if b.marker(id).is_none() {
                    tracing::info!(sandbox = %id, "adopted");
                    b.set_marker(id, &Marker::default())?;
                }
            }
            Action::Pause { id } => b.pause(id).await?,
            Action::Resume { id } => b.resume(id).await?,
            Action::Stop { id } => {
                b.stop(id, assignment.and_then(|a| a.stop_grace_secs))
                    .await?
            }
            Action::Remove { id, generation } => {
                let last = b.remove(id).await?;
                let mut marker = b.marker(id).unwrap_or_default();
                marker.converged = *generation;
                marker.terminal = last
                    .or(marker.terminal.take())
                    .or_else(|| Some(backend::never_started("deleted")));
                b.set_marker(id, &marker)?;
                tracing::info!(sandbox = %id, "removed");
            }
            Action::Converged { id, generation } => {
                let mut marker = b.marker(id).unwrap_or_default();
                marker.converged = *generation;
                if marker.terminal.is_none() && !b.has_record(id) {
                    marker.terminal = Some(backend::never_started("stopped"));
                }
                b.set_marker(id, &marker)?;
            }
            Action::UpdatePolicy { id, generation } => {
                let Some(asg) = assignment else { return Ok(()) };
                let t0 = std::time::Instant::now();
                b.update_policy(id, &asg.spec.network).await?;
                let mut marker = b.marker(id).unwrap_or_default();
                marker.network = Some(asg.spec.network.clone());
                marker.converged = *generation;
                b.set_marker(id, &marker)?;
                tracing::info!(sandbox = %id, generation, us = t0.elapsed().as_micros() as u64, "policy updated live");
            }
            Action::Fence { id } => {
                tracing::info!(sandbox = %id, "no longer assigned here: removing");
                b.remove(id).await?;
                b.drop_marker(id);
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(action = ?a, error = %e, "action failed; will retry");
    }
}
