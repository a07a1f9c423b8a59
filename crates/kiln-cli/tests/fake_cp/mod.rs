//! A fake control plane for the node daemon's end-to-end tests: the
//! node protocol (`kiln.node.v1.NodeService`, the generated tonic server)
//! over a tiny in-memory state the test drives directly (create, set the
//! desired state, reassign, forget). It checks what the real server
//! checks of a node (join token, per-node credential, reports only from the
//! assigned node, generations not ahead), so the node is tested against the
//! contract; the real `kiln server` replaces it in e2e_cluster.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::cluster::{Assignment, DesiredState, NodeDesired, NodeName, NodeStatus, TenantName};
use kiln_api::node_rpc::node_service_server::{NodeService, NodeServiceServer};
use kiln_api::node_rpc::*;
use kiln_api::sandbox::{SandboxId, SandboxSpec, SandboxState};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Default)]
pub struct NodeRec {
    pub credential: String,
    pub registrations: u32,
    /// The `authorization` each Register carried (a restarted node
    /// presents its stored credential).
    pub register_auth: Vec<Option<String>>,
    pub heartbeats: u64,
    pub capacity_json: Vec<u8>,
    pub driver_json: Vec<u8>,
    pub images: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Sb {
    pub node: NodeName,
    pub spec: SandboxSpec,
    pub desired: DesiredState,
    pub generation: u64,
    pub observed: Option<(u64, SandboxState)>,
    /// Every report accepted for it, in order.
    pub reports: Vec<(u64, SandboxState)>,
    pub mod_index: u64,
}

#[derive(Debug, Default)]
pub struct CpState {
    pub join_token: String,
    pub nodes: BTreeMap<String, NodeRec>,
    pub sandboxes: BTreeMap<SandboxId, Sb>,
    pub index: u64,
    pub refused: u64,
    /// While set, every call is answered UNAVAILABLE (a server that is
    /// down or partitioned), with this `kiln-leader` hint if non-empty.
    pub down: Option<String>,
    /// Calls answered while down.
    pub unavailable: u64,
}

#[derive(Clone)]
struct Svc {
    st: Arc<Mutex<CpState>>,
    bump: Arc<tokio::sync::watch::Sender<u64>>,
}

fn lock(st: &Mutex<CpState>) -> std::sync::MutexGuard<'_, CpState> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}

fn bearer<T>(r: &Request<T>) -> Option<String> {
    r.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

impl Svc {
    fn up(&self) -> Result<(), Status> {
        let mut st = lock(&self.st);
        let Some(hint) = st.down.clone() else {
            return Ok(());
        };
        st.unavailable += 1;
        let mut s = Status::unavailable("not the leader");
        if !hint.is_empty() {
            s.metadata_mut()
                .insert("kiln-leader", hint.parse().expect("ascii hint"));
        }
        Err(s)
    }

    fn check<T>(&self, r: &Request<T>, name: &str) -> Result<(), Status> {
        self.up()?;
        let st = lock(&self.st);
        match (st.nodes.get(name), bearer(r)) {
            (Some(n), Some(c)) if n.credential == c => Ok(()),
            _ => Err(Status::unauthenticated("unknown node credential")),
        }
    }
}

fn desired_of(st: &CpState, node: &str) -> NodeDesired {
    let name = NodeName::new(node).expect("valid node name");
    let mut revision = 0;
    let sandboxes = st
        .sandboxes
        .iter()
        .filter(|(_, s)| s.node == name)
        .map(|(id, s)| {
            revision = revision.max(s.mod_index);
            Assignment {
                id: id.clone(),
                tenant: TenantName::new("t").expect("valid"),
                spec: s.spec.clone(),
                desired: s.desired,
                generation: s.generation,
                observed_generation: s.observed.as_ref().map_or(0, |o| o.0),
            }
        })
        .collect();
    NodeDesired {
        node: name,
        cordoned: false,
        status: NodeStatus::Ready,
        revision,
        sandboxes,
        pools: vec![],
    }
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<DesiredUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for Svc {
    async fn register(
        &self,
        r: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        self.up()?;
        let auth = bearer(&r);
        let req = r.into_inner();
        let mut st = lock(&self.st);
        if req.join_token != st.join_token {
            return Err(Status::unauthenticated("bad join token"));
        }
        NodeName::new(req.name.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        serde_json::from_slice::<kiln_api::cluster::Capacity>(&req.capacity_json)
            .map_err(|e| Status::invalid_argument(format!("capacity: {e}")))?;
        serde_json::from_slice::<kiln_api::cluster::DriverKind>(&req.driver_json)
            .map_err(|e| Status::invalid_argument(format!("driver: {e}")))?;
        let n = st.nodes.entry(req.name.clone()).or_default();
        n.registrations += 1;
        n.register_auth.push(auth);
        n.credential = format!("cred-{}-{}", req.name, n.registrations);
        n.capacity_json = req.capacity_json;
        n.driver_json = req.driver_json;
        n.images = req.images;
        Ok(Response::new(RegisterReply {
            credential: n.credential.clone(),
            heartbeat_interval_ms: 500,
            grace_ms: 5000,
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let name = r.get_ref().name.clone();
        self.check(&r, &name)?;
        lock(&self.st).nodes.entry(name).or_default().heartbeats += 1;
        Ok(Response::new(HeartbeatReply {}))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, r: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let name = r.get_ref().name.clone();
        self.check(&r, &name)?;
        let st = self.st.clone();
        let mut rx = self.bump.subscribe();
        let stream = async_stream(move |tx| async move {
            let mut last: Option<NodeDesired> = None;
            loop {
                if lock(&st).down.is_some() {
                    let _ = tx.send(Err(Status::unavailable("going down"))).await;
                    return;
                }
                let d = desired_of(&lock(&st), &name);
                if last.as_ref() != Some(&d) {
                    let upd = DesiredUpdate {
                        revision: d.revision,
                        desired_json: serde_json::to_vec(&d).expect("serializes"),
                    };
                    if tx.send(Ok(upd)).await.is_err() {
                        return;
                    }
                    last = Some(d);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn report(&self, r: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        let name = r.get_ref().name.clone();
        self.check(&r, &name)?;
        let req = r.into_inner();
        let mut st = lock(&self.st);
        let mut refused = vec![];
        for s in req.sandboxes {
            let why = (|| {
                let id = SandboxId::try_from(s.id.clone()).map_err(|e| e.to_string())?;
                let state: SandboxState =
                    serde_json::from_slice(&s.state_json).map_err(|e| e.to_string())?;
                let sb = st.sandboxes.get_mut(&id).ok_or("no such sandbox")?;
                if sb.node.as_str() != name {
                    return Err("not assigned to this node".to_string());
                }
                if s.generation > sb.generation {
                    return Err("generation ahead".into());
                }
                sb.observed = Some((s.generation, state.clone()));
                sb.reports.push((s.generation, state));
                Ok::<(), String>(())
            })();
            if why.is_err() {
                st.refused += 1;
            }
            refused.push(why.err().unwrap_or_default());
        }
        Ok(Response::new(ReportReply { refused }))
    }
}

/// A stream fed by a task (`tokio_stream` over an mpsc channel).
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<DesiredUpdate, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running fake control plane (its own runtime; stopped on drop).
pub struct FakeCp {
    pub addr: SocketAddr,
    st: Arc<Mutex<CpState>>,
    bump: Arc<tokio::sync::watch::Sender<u64>>,
    _rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeCp {
    /// Listens on `bind` (e.g. `127.0.0.1:0`) with join token `token`.
    pub fn start(bind: &str, token: &str) -> FakeCp {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let st = Arc::new(Mutex::new(CpState {
            join_token: token.into(),
            ..Default::default()
        }));
        let (bump, _) = tokio::sync::watch::channel(0u64);
        let bump = Arc::new(bump);
        let svc = Svc {
            st: st.clone(),
            bump: bump.clone(),
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .expect("bind the fake control plane");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(NodeServiceServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        FakeCp {
            addr,
            st,
            bump,
            _rt: rt,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, CpState> {
        lock(&self.st)
    }

    fn changed(&self) {
        self.bump.send_modify(|n| *n += 1);
    }

    /// Answers every call UNAVAILABLE (with a `kiln-leader` hint if
    /// `hint` is non-empty) until [`FakeCp::up`]; open watches end.
    pub fn down(&self, hint: &str) {
        self.state().down = Some(hint.to_string());
        self.changed();
    }

    pub fn up(&self) {
        self.state().down = None;
        self.changed();
    }

    /// Assigns a new sandbox to `node`, desired running.
    pub fn create(&self, node: &str, spec: SandboxSpec) -> SandboxId {
        let mut b = [0u8; 8];
        rand_bytes(&mut b);
        let id = SandboxId::from_random(b);
        {
            let mut st = self.state();
            st.index += 1;
            let idx = st.index;
            st.sandboxes.insert(
                id.clone(),
                Sb {
                    node: NodeName::new(node).expect("node name"),
                    spec,
                    desired: DesiredState::Running,
                    generation: 1,
                    observed: None,
                    reports: vec![],
                    mod_index: idx,
                },
            );
        }
        self.changed();
        id
    }

    fn modify(&self, id: &SandboxId, f: impl FnOnce(&mut Sb)) {
        {
            let mut st = self.state();
            st.index += 1;
            let idx = st.index;
            let sb = st.sandboxes.get_mut(id).expect("sandbox exists");
            f(sb);
            sb.generation += 1;
            sb.mod_index = idx;
        }
        self.changed();
    }

    pub fn set_desired(&self, id: &SandboxId, d: DesiredState) {
        self.modify(id, |s| s.desired = d);
    }

    /// Moves the sandbox to another node (as a reschedule would).
    pub fn reassign(&self, id: &SandboxId, node: &str) {
        self.modify(id, |s| s.node = NodeName::new(node).expect("node name"));
    }

    /// Drops the sandbox (the server's forget after deletion).
    pub fn forget(&self, id: &SandboxId) {
        self.state().sandboxes.remove(id);
        self.changed();
    }

    pub fn observed(&self, id: &SandboxId) -> Option<(u64, SandboxState)> {
        self.state()
            .sandboxes
            .get(id)
            .and_then(|s| s.observed.clone())
    }

    pub fn reports(&self, id: &SandboxId) -> Vec<(u64, SandboxState)> {
        self.state()
            .sandboxes
            .get(id)
            .map(|s| s.reports.clone())
            .unwrap_or_default()
    }

    /// Waits until `f` holds of the state, up to `limit`.
    pub fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&CpState) -> bool) {
        let t0 = Instant::now();
        while !f(&self.state()) {
            assert!(
                t0.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeCp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn rand_bytes(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .expect("urandom");
}
