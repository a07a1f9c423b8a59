//! The node protocol against 3 real replicas: a node registers with the
//! join token through the generated gRPC client, watches its desired
//! state, sees an assignment appear, reports it running; wrong join tokens
//! and credentials are refused; a follower points writes at the leader.

mod common;

use std::time::Duration;

use common::{Cluster, JOIN};
use kiln_api::cluster::{Capacity, DriverKind, NodeDesired, NodeName, Quotas, TenantName};
use kiln_api::node_rpc::node_service_client::NodeServiceClient;
use kiln_api::node_rpc::{
    HeartbeatRequest, RegisterRequest, ReportRequest, SandboxReport, WatchRequest,
};
use kiln_api::sandbox::{SandboxId, SandboxSpec, SandboxState};
use kiln_store::{Command, Response};
use tonic::transport::Channel;

pub async fn client(url: &str) -> NodeServiceClient<Channel> {
    NodeServiceClient::connect(url.to_owned())
        .await
        .expect("connect")
}

/// A registration carrying `join` in its metadata (checked before the
/// message is read) and its body.
pub fn register_req(name: &str, join: &str) -> tonic::Request<RegisterRequest> {
    let mut r = tonic::Request::new(register_msg(name, join));
    r.metadata_mut()
        .insert("kiln-join-token", join.parse().expect("metadata"));
    r
}

pub fn register_msg(name: &str, join: &str) -> RegisterRequest {
    RegisterRequest {
        join_token: join.into(),
        name: name.into(),
        address: "127.0.0.1:9".into(),
        capacity_json: serde_json::to_vec(&Capacity {
            cpus: 8,
            memory_mib: 16384,
            disk_mib: 100_000,
        })
        .expect("json"),
        driver_json: serde_json::to_vec(&DriverKind::QemuTcg).expect("json"),
        labels: Default::default(),
        images: vec!["busybox".into()],
        stream_key: String::new(),
        stream_cert_sha256: String::new(),
    }
}

fn authed<T>(msg: T, cred: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {cred}").parse().expect("metadata"),
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_watches_and_reports() {
    let c = Cluster::start(3).await;
    let l = c.leader().await;
    let f = c.follower().await;
    let mut leader = client(c.server(l).api_url()).await;
    let mut follower = client(c.server(f).api_url()).await;

    // A wrong join token is refused, on any replica.
    let e = leader
        .register(register_req("h1", "not-the-join-token"))
        .await
        .expect_err("wrong join token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // Bad payloads are INVALID_ARGUMENT.
    let mut bad = register_req("h1", JOIN);
    bad.get_mut().capacity_json = b"{\"cpus\":1,\"bogus\":2}".to_vec();
    let e = leader.register(bad).await.expect_err("unknown field");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = leader
        .register(register_req("Not_A_Name", JOIN))
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A follower does not write: UNAVAILABLE with the leader's URL.
    let e = follower
        .register(register_req("h1", JOIN))
        .await
        .expect_err("follower");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(
        e.metadata()
            .get("kiln-leader")
            .and_then(|v| v.to_str().ok()),
        Some(c.server(l).api_url())
    );

    let reply = leader
        .register(register_req("h1", JOIN))
        .await
        .expect("register")
        .into_inner();
    assert!(reply.heartbeat_interval_ms > 0 && reply.grace_ms > reply.heartbeat_interval_ms);
    let cred = reply.credential;
    let h2 = leader
        .register(register_req("h2", JOIN))
        .await
        .expect("register h2")
        .into_inner()
        .credential;

    // Credentials: missing, wrong, or another node's are refused.
    let e = leader
        .heartbeat(HeartbeatRequest {
            name: "h1".into(),
            ..Default::default()
        })
        .await
        .expect_err("no credential");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = leader
        .heartbeat(authed(
            HeartbeatRequest {
                name: "h1".into(),
                ..Default::default()
            },
            "kilnnode_wrong",
        ))
        .await
        .expect_err("wrong credential");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = leader
        .heartbeat(authed(
            HeartbeatRequest {
                name: "h1".into(),
                ..Default::default()
            },
            &h2,
        ))
        .await
        .expect_err("h2 speaking for h1");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    leader
        .heartbeat(authed(
            HeartbeatRequest {
                name: "h1".into(),
                images_changed: true,
                images: vec!["alpine".into()],
                ..Default::default()
            },
            &cred,
        ))
        .await
        .expect("heartbeat");
    // Automatic templates: what a node must not report is dropped
    // (terminal escapes, bidi overrides, impossible resources, a node name
    // of its own, not JSON) and the heartbeat still counts; a valid list
    // is kept on the node's record.
    let auto = kiln_api::templates::NodeTemplate {
        name: "tpl-0123456789ab".into(),
        node: None,
        image: "alpine".into(),
        resources: kiln_api::sandbox::Resources::default(),
        size_bytes: 1 << 20,
        created_at_ms: 5,
    };
    let mut escape = auto.clone();
    escape.image = "alpine\u{1b}[2J".into();
    let mut huge = auto.clone();
    huge.resources.cpus = 10_000;
    let mut named = auto.clone();
    named.node = Some(kiln_api::cluster::NodeName::new("h2").expect("name"));
    let mut bidi = auto.clone();
    bidi.name = "tpl-\u{202e}gpj.exe".into();
    let kept = |c: &Cluster| {
        c.server(l).raft().read_local(|s| {
            s.nodes
                .get(&NodeName::new("h1").expect("name"))
                .map(|n| (n.templates.clone(), n.last_heartbeat_ms))
        })
    };
    // A valid list first; then each bad one: a bad entry is dropped and
    // the good one beside it kept, an undecodable list keeps the last.
    let beat = |json: Vec<u8>| {
        let mut leader = leader.clone();
        let cred = cred.clone();
        async move {
            leader
                .heartbeat(authed(
                    HeartbeatRequest {
                        name: "h1".into(),
                        templates_changed: true,
                        templates_json: json,
                        ..Default::default()
                    },
                    &cred,
                ))
                .await
                .expect("the heartbeat counts");
        }
    };
    beat(serde_json::to_vec(std::slice::from_ref(&auto)).expect("json")).await;
    assert_eq!(kept(&c).expect("node").0, vec![auto.clone()]);
    for bad in [
        serde_json::to_vec(&[auto.clone(), escape]).expect("json"),
        serde_json::to_vec(&[auto.clone(), huge]).expect("json"),
        serde_json::to_vec(&[auto.clone(), named]).expect("json"),
        serde_json::to_vec(&[auto.clone(), bidi]).expect("json"),
        b"[{\"name\":".to_vec(),
    ] {
        let before = kept(&c).expect("node").1;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        beat(bad).await;
        let (templates, at) = kept(&c).expect("node");
        assert_eq!(templates, vec![auto.clone()]);
        assert!(at > before, "the heartbeat was not recorded");
    }
    assert_eq!(kept(&c).expect("node").0, vec![auto]);

    // Watch through a follower: the full state at once.
    let mut stream = follower
        .watch(authed(
            WatchRequest {
                name: "h1".into(),
                revision: 0,
            },
            &cred,
        ))
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.node.as_str(), "h1");
    assert!(first.sandboxes.is_empty());

    // An assignment appears when a sandbox is created on h1.
    let leader_raft = c.server(l).raft();
    let tenant = TenantName::new("acme").expect("tenant");
    leader_raft
        .write(Command::CreateTenant {
            name: tenant.clone(),
            quotas: Quotas::default(),
            now_ms: 1,
        })
        .await
        .expect("tenant");
    let id = SandboxId::from_random([1, 2, 3, 4, 5, 6, 7, 8]);
    let r = leader_raft
        .write(Command::CreateSandbox {
            id: id.clone(),
            tenant,
            spec: SandboxSpec::for_image("busybox"),
            idempotency_key: None,
            node: Some(NodeName::new("h1").expect("name")),
            now_ms: 2,
        })
        .await
        .expect("create");
    let Response::SandboxCreated { generation, .. } = r else {
        panic!("{r:?}")
    };
    let second = next(&mut stream).await;
    assert_eq!(second.sandboxes.len(), 1);
    assert_eq!(second.sandboxes[0].id, id);
    assert!(second.revision > first.revision);

    // Report running (plus one garbage item refused on its own).
    let state = SandboxState::Running { main_pid: 42 };
    let reply = leader
        .report(authed(
            ReportRequest {
                name: "h1".into(),
                templates_json: Vec::new(),
                sandboxes: vec![
                    SandboxReport {
                        id: id.to_string(),
                        generation,
                        state_json: serde_json::to_vec(&state).expect("json"),
                        start_json: Vec::new(),
                    },
                    SandboxReport {
                        id: "zz".into(),
                        generation: 1,
                        state_json: b"{}".to_vec(),
                        start_json: Vec::new(),
                    },
                ],
            },
            &cred,
        ))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(reply.refused.len(), 2);
    assert_eq!(reply.refused[0], "", "{reply:?}");
    assert!(!reply.refused[1].is_empty());
    let observed = leader_raft
        .read(|s| s.sandboxes.get(&id).map(|r| r.observed.clone()))
        .await
        .expect("read");
    assert_eq!(observed, Some(state));
    // The watch sends the new observed generation (contents changed).
    let third = next(&mut stream).await;
    assert_eq!(third.sandboxes[0].observed_generation, generation);

    // h2 may not report h1's sandbox.
    let reply = leader
        .report(authed(
            ReportRequest {
                name: "h2".into(),
                templates_json: Vec::new(),
                sandboxes: vec![SandboxReport {
                    id: id.to_string(),
                    generation,
                    state_json: serde_json::to_vec(&SandboxState::Pooled).expect("json"),
                    start_json: Vec::new(),
                }],
            },
            &h2,
        ))
        .await
        .expect("report")
        .into_inner();
    assert!(!reply.refused[0].is_empty());

    // The join token alone cannot take over a registered node name.
    let e = leader
        .register(register_req("h1", JOIN))
        .await
        .expect_err("takeover");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Neither can another node's credential.
    let mut other = register_req("h1", JOIN);
    other.metadata_mut().insert(
        "authorization",
        format!("Bearer {h2}").parse().expect("metadata"),
    );
    let e = leader.register(other).await.expect_err("other credential");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Re-registering with the credential mints a new one; the old one
    // stays until the new one is used, so a node that dies before saving
    // the new one registers again with the old one.
    let hb = |cred: &str| {
        authed(
            HeartbeatRequest {
                name: "h1".into(),
                ..Default::default()
            },
            cred,
        )
    };
    let reregister = |cred: &str| {
        let mut again = register_req("h1", JOIN);
        again.metadata_mut().insert(
            "authorization",
            format!("Bearer {cred}").parse().expect("metadata"),
        );
        again
    };
    let lost = leader
        .register(reregister(&cred))
        .await
        .expect("re-register")
        .into_inner()
        .credential;
    let cred2 = leader
        .register(reregister(&cred))
        .await
        .expect("re-register with the kept credential after a crash")
        .into_inner()
        .credential;
    let e = leader
        .heartbeat(hb(&lost))
        .await
        .expect_err("never used, replaced");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    leader.heartbeat(hb(&cred2)).await.expect("new credential");
    let e = leader
        .heartbeat(hb(&cred))
        .await
        .expect_err("rotated once used");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    leader
        .heartbeat(hb(&cred2))
        .await
        .expect("still the node's");
    // An admin revokes h1's credential: a replacement host may then
    // register under the name with the join token alone.
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/nodes/h1/revoke-credential",
            c.server(l).api_url()
        ))
        .bearer_auth(&c.admin)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    leader
        .register(register_req("h1", JOIN))
        .await
        .expect("a replacement registers after the revocation");
    drop(stream);
    c.shutdown().await;
}

async fn next(s: &mut tonic::Streaming<kiln_api::node_rpc::DesiredUpdate>) -> NodeDesired {
    let u = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an update within 10 s")
        .expect("stream ok")
        .expect("stream open");
    let d: NodeDesired = serde_json::from_slice(&u.desired_json).expect("NodeDesired JSON");
    assert_eq!(d.revision, u.revision);
    d
}
