//! The REST API against 3 real replicas (in-process, real Raft, real
//! listeners on 127.0.0.1): creates through a follower, tenant isolation,
//! quotas, precise 4xx codes, the OpenAPI document, a gRPC node seeing a
//! REST create and reporting it running, and the leader killed while a
//! client creates with idempotency keys.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, JOIN};
use kiln_api::cluster::{Capacity, DriverKind, NodeDesired};
use kiln_api::node_rpc::node_service_client::NodeServiceClient;
use kiln_api::node_rpc::{
    HeartbeatRequest, RegisterRequest, ReportRequest, SandboxReport, WatchRequest,
};
use kiln_api::rest::{ErrorBody, Sandbox, SandboxList, TokenCreated};
use kiln_api::sandbox::{SandboxState, StartKind, StartPhase, StartReport};
use serde_json::{Value, json};

struct Api {
    http: reqwest::Client,
    /// Every answer on a documented route is checked against its schema.
    schemas: kiln_testkit::ApiSchemas,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: status {} body {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn code(&self) -> String {
        self.json::<ErrorBody>().error.code
    }
}

impl Api {
    fn new() -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            schemas: kiln_testkit::ApiSchemas::new(kiln_server::rest::openapi_json().as_bytes())
                .expect("the OpenAPI document"),
        }
    }
    async fn call(
        &self,
        method: &str,
        url: &str,
        token: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut rb = self
            .http
            .request(method.parse().expect("method"), url)
            .header("authorization", format!("Bearer {token}"));
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_vec());
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.expect("request");
        let reply = Reply {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.bytes().await.expect("body").to_vec(),
        };
        // Routes and methods the document does not have (the tests' bad
        // requests) are answered outside it; everything else must match.
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("/");
        if self.schemas.describes(method, path)
            && let Err(e) = self.schemas.check(method, path, reply.status, &reply.body)
        {
            panic!("{method} {url}: {e:#}");
        }
        reply
    }
    async fn post(&self, url: &str, token: &str, v: &Value) -> Reply {
        let b = serde_json::to_vec(v).expect("json");
        self.call("POST", url, token, Some(&b), &[]).await
    }
    async fn get(&self, url: &str, token: &str) -> Reply {
        self.call("GET", url, token, None, &[]).await
    }
}

async fn tenant_token(api: &Api, base: &str, admin: &str, name: &str, quotas: Value) -> String {
    let r = api
        .post(
            &format!("{base}/v1/tenants"),
            admin,
            &json!({"name": name, "quotas": quotas}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = api
        .post(
            &format!("{base}/v1/tokens"),
            admin,
            &json!({"role": "tenant", "tenant": name}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json::<TokenCreated>().secret
}

/// A node-protocol request carrying the join token in its metadata (the
/// server checks it there before reading the message).
fn joined<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("kiln-join-token", JOIN.parse().expect("metadata"));
    r
}

async fn register(url: &str, name: &str) -> (NodeServiceClient<tonic::transport::Channel>, String) {
    let mut c = NodeServiceClient::connect(url.to_owned())
        .await
        .expect("connect");
    let cred = c
        .register(joined(RegisterRequest {
            join_token: JOIN.into(),
            name: name.into(),
            address: format!("{name}:0"),
            capacity_json: serde_json::to_vec(&Capacity {
                cpus: 4,
                memory_mib: 8192,
                disk_mib: 100_000,
            })
            .expect("json"),
            driver_json: serde_json::to_vec(&DriverKind::QemuTcg).expect("json"),
            labels: Default::default(),
            images: vec![],
            stream_key: String::new(),
            stream_cert_sha256: String::new(),
        }))
        .await
        .expect("register")
        .into_inner()
        .credential;
    (c, cred)
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
async fn rest_api_on_three_replicas() {
    let c = Cluster::start(3).await;
    let api = Api::new();
    let l = c.leader().await;
    let f = c.follower().await;
    let lead = c.server(l).api_url().to_owned();
    let fol = c.server(f).api_url().to_owned();
    let admin = c.admin.clone();

    // Admin calls through a follower are forwarded to the leader.
    let a = tenant_token(
        &api,
        &fol,
        &admin,
        "alpha",
        json!({"sandboxes": 2, "cpus": 8, "memory_mib": 8192}),
    )
    .await;
    let b = tenant_token(
        &api,
        &fol,
        &admin,
        "beta",
        json!({"sandboxes": 10, "cpus": 8, "memory_mib": 8192}),
    )
    .await;

    // No nodes yet: unschedulable, with the scheduler's reason code.
    let spec = json!({"image": "busybox", "cmd": ["sleep", "1000"], "labels": {"app": "web"}});
    let r = api.post(&format!("{fol}/v1/sandboxes"), &a, &spec).await;
    assert_eq!((r.status, r.code()), (422, "unschedulable".into()));
    assert_eq!(
        r.json::<ErrorBody>().error.reason.as_deref(),
        Some("no_nodes")
    );

    // A node registers and watches (through the follower).
    let (mut node, cred) = register(&lead, "h1").await;
    let mut fnode = NodeServiceClient::connect(fol.clone())
        .await
        .expect("connect");
    let mut watch = fnode
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
    assert!(next(&mut watch).await.sandboxes.is_empty());

    // REST create through a follower, with an idempotency key.
    let key = [("idempotency-key", "create-1")];
    let body = serde_json::to_vec(&spec).expect("json");
    let r = api
        .call(
            "POST",
            &format!("{fol}/v1/sandboxes"),
            &a,
            Some(&body),
            &key,
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let sb: Sandbox = r.json();
    assert_eq!(sb.node.as_ref().map(|n| n.as_str()), Some("h1"));
    let r = api
        .call(
            "POST",
            &format!("{fol}/v1/sandboxes"),
            &a,
            Some(&body),
            &key,
        )
        .await;
    assert_eq!(r.status, 200, "same key: the same sandbox");
    assert_eq!(r.json::<Sandbox>().id, sb.id);
    let other = serde_json::to_vec(&json!({"image": "alpine"})).expect("json");
    let r = api
        .call(
            "POST",
            &format!("{lead}/v1/sandboxes"),
            &a,
            Some(&other),
            &key,
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "idempotency_conflict".into()));

    // The node sees the assignment, reports it running with how its
    // start went; REST shows both. A start report the server must not
    // keep (escape sequences for users' terminals) refuses the item.
    let d = next(&mut watch).await;
    assert_eq!(d.sandboxes.len(), 1);
    assert_eq!(d.sandboxes[0].id, sb.id);
    let start = StartReport {
        path: StartKind::Pool,
        template: Some("tpl-0123".into()),
        notes: vec!["claimed pool member of template tpl-0123".into()],
        phases: vec![StartPhase {
            name: "exec".into(),
            ms: 3,
        }],
        ready_ms: 41,
    };
    let mut hostile = start.clone();
    hostile.notes.push("\u{1b}]0;owned\u{7}".into());
    let running = serde_json::to_vec(&SandboxState::Running { main_pid: 7 }).expect("json");
    // A start report out of bounds (or not one) is dropped, never the
    // state it came with: the sandbox must not stay `creating`.
    for (start_json, pid, kept) in [
        (serde_json::to_vec(&hostile).expect("json"), 5, false),
        (b"{\"path\":\"warp\",\"ready_ms\":1}".to_vec(), 6, false),
        (serde_json::to_vec(&start).expect("json"), 7, true),
    ] {
        let rep = node
            .report(authed(
                ReportRequest {
                    name: "h1".into(),
                    templates_json: Vec::new(),
                    sandboxes: vec![SandboxReport {
                        id: sb.id.to_string(),
                        generation: d.sandboxes[0].generation,
                        state_json: serde_json::to_vec(&SandboxState::Running { main_pid: pid })
                            .expect("json"),
                        start_json,
                    }],
                },
                &cred,
            ))
            .await
            .expect("report")
            .into_inner();
        assert_eq!(rep.refused, vec![String::new()]);
        let got = api
            .get(&format!("{lead}/v1/sandboxes/{}", sb.id), &a)
            .await
            .json::<Sandbox>();
        assert_eq!(got.state, SandboxState::Running { main_pid: pid });
        assert_eq!(got.start.is_some(), kept, "{:?}", got.start);
    }
    let r = api.get(&format!("{fol}/v1/sandboxes/{}", sb.id), &a).await;
    assert_eq!(r.status, 200);
    let got = r.json::<Sandbox>();
    assert_eq!(got.state, SandboxState::Running { main_pid: 7 });
    assert_eq!(got.start, Some(start.clone()));
    // A later report without one keeps it.
    let rep = node
        .report(authed(
            ReportRequest {
                name: "h1".into(),
                templates_json: Vec::new(),
                sandboxes: vec![SandboxReport {
                    id: sb.id.to_string(),
                    generation: d.sandboxes[0].generation,
                    state_json: running.clone(),
                    start_json: Vec::new(),
                }],
            },
            &cred,
        ))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(rep.refused, vec![String::new()]);
    let r = api.get(&format!("{lead}/v1/sandboxes/{}", sb.id), &a).await;
    assert_eq!(r.json::<Sandbox>().start, Some(start));

    // Listing with filters.
    let r = api
        .get(
            &format!("{fol}/v1/sandboxes?state=running&label=app%3Dweb"),
            &a,
        )
        .await;
    assert_eq!(r.json::<SandboxList>().items.len(), 1);
    let r = api
        .get(&format!("{fol}/v1/sandboxes?label=app%3Dnope"), &a)
        .await;
    assert!(r.json::<SandboxList>().items.is_empty());

    // Tenant B sees nothing of A's: 404, never 403.
    let r = api.get(&format!("{fol}/v1/sandboxes"), &b).await;
    assert!(r.json::<SandboxList>().items.is_empty());
    for (m, path) in [
        ("GET", format!("/v1/sandboxes/{}", sb.id)),
        ("DELETE", format!("/v1/sandboxes/{}", sb.id)),
        ("POST", format!("/v1/sandboxes/{}/stop", sb.id)),
        (
            "GET",
            format!("/v1/sandboxes/{}/wait?timeout_secs=0", sb.id),
        ),
    ] {
        let r = api.call(m, &format!("{lead}{path}"), &b, None, &[]).await;
        assert_eq!(
            (r.status, r.code()),
            (404, "not_found".into()),
            "{m} {path}"
        );
    }
    // A stop's grace time: 0-3600 s, anything else a 400 that changes
    // nothing.
    for q in [
        "timeout_secs=3601",
        "timeout_secs=x",
        "timeout_secs=-1",
        "grace=5",
    ] {
        let r = api
            .call(
                "POST",
                &format!("{lead}/v1/sandboxes/{}/stop?{q}", sb.id),
                &a,
                None,
                &[],
            )
            .await;
        assert_eq!((r.status, r.code()), (400, "invalid_query".into()), "{q}");
    }
    let r = api.get(&format!("{lead}/v1/sandboxes/{}", sb.id), &a).await;
    assert_eq!(
        r.json::<Sandbox>().desired,
        kiln_api::cluster::DesiredState::Running
    );

    // The node's automatic templates: a tenant sees those of images it
    // used (alpha ran busybox), never others'; the hour it was made, not
    // the moment. An admin sees all.
    let made_at = 7_200_000 + 1_234_567;
    let auto = |image: &str| kiln_api::templates::NodeTemplate {
        name: format!("tpl-{image}"),
        node: None,
        image: image.into(),
        resources: kiln_api::sandbox::Resources::default(),
        size_bytes: 1 << 20,
        created_at_ms: made_at,
    };
    node.heartbeat(authed(
        HeartbeatRequest {
            name: "h1".into(),
            templates_changed: true,
            templates_json: serde_json::to_vec(&[auto("busybox"), auto("secret-image")])
                .expect("json"),
            ..Default::default()
        },
        &cred,
    ))
    .await
    .expect("heartbeat");
    let shown = |t: &str| {
        let api = &api;
        let url = format!("{lead}/v1/templates");
        let t = t.to_owned();
        async move {
            let r = api.get(&url, &t).await;
            assert_eq!(r.status, 200);
            let mut v: Vec<(String, u64)> = r
                .json::<kiln_api::templates::TemplateList>()
                .automatic
                .into_iter()
                .map(|t| (t.image, t.created_at_ms))
                .collect();
            v.sort();
            v
        }
    };
    assert_eq!(shown(&a).await, vec![("busybox".to_string(), 7_200_000)]);
    assert!(shown(&b).await.is_empty(), "beta never used these images");
    assert_eq!(
        shown(&admin).await,
        vec![
            ("busybox".to_string(), made_at),
            ("secret-image".to_string(), made_at)
        ]
    );

    // Tenants cannot use admin endpoints; no token is 401.
    let r = api.get(&format!("{lead}/v1/nodes"), &b).await;
    assert_eq!((r.status, r.code()), (403, "admin_required".into()));
    let r = api.get(&format!("{lead}/v1/sandboxes"), "nope").await;
    assert_eq!((r.status, r.code()), (401, "unauthenticated".into()));
    // A node credential is not an API token.
    let r = api.get(&format!("{lead}/v1/sandboxes"), &cred).await;
    assert_eq!(r.status, 401);

    // Quota: alpha may hold 2 sandboxes; the third is 429 + Retry-After.
    let r = api
        .post(
            &format!("{lead}/v1/sandboxes"),
            &a,
            &json!({"image": "busybox"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = api
        .post(
            &format!("{fol}/v1/sandboxes"),
            &a,
            &json!({"image": "busybox"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (429, "quota_exceeded".into()));
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(
        r.json::<ErrorBody>().error.reason.as_deref(),
        Some("sandboxes")
    );

    // Bad inputs: each a precise 4xx and code.
    let url = format!("{lead}/v1/sandboxes");
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"{\"image\": ", 400, "malformed_json"),
        (b"not json", 400, "malformed_json"),
        (b"{\"image\":\"busybox\",\"bogus\":1}", 400, "unknown_field"),
        (b"{\"image\":\"busybox\",\"resources\":{\"cpus\":1,\"memory_mib\":256,\"disk_mib\":1024,\"gpus\":1}}", 400, "unknown_field"),
        (b"{\"image\":7}", 422, "invalid_body"),
        (b"{}", 422, "invalid_body"),
        (b"{\"image\":\"busybox\",\"resources\":{\"cpus\":0,\"memory_mib\":256,\"disk_mib\":1024}}", 422, "invalid_spec"),
        (b"{\"image\":\"busybox\",\"resources\":{\"cpus\":1,\"memory_mib\":1,\"disk_mib\":1024}}", 422, "invalid_spec"),
        (b"{\"image\":\"\"}", 422, "invalid_spec"),
        // A path on the node's disk, and host ports: not through the API.
        (b"{\"image\":\"docker-archive:/etc/shadow\"}", 422, "invalid_spec"),
        (b"{\"image\":\"oci:/var/lib/x\"}", 422, "invalid_spec"),
        (b"{\"image\":\"busybox\",\"network\":{\"mode\":\"default\",\"publish\":[\"22:22\"]}}", 422, "invalid_spec"),
        (b"{\"image\":\"busybox\",\"resources\":{\"cpus\":64,\"memory_mib\":256,\"disk_mib\":1024}}", 422, "unschedulable"),
    ];
    for (body, status, code) in cases {
        let r = api.call("POST", &url, &b, Some(body), &[]).await;
        assert_eq!(
            (r.status, r.code()),
            (status, code.into()),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let big = vec![b' '; kiln_server::rest::MAX_BODY + 10];
    let r = api.call("POST", &url, &b, Some(&big), &[]).await;
    assert_eq!((r.status, r.code()), (413, "body_too_large".into()));
    let r = api
        .call("POST", &url, &b, None, &[("content-type", "text/plain")])
        .await;
    assert_eq!((r.status, r.code()), (415, "unsupported_media_type".into()));
    let r = api
        .call(
            "POST",
            &url,
            &b,
            Some(b"{\"image\":\"busybox\"}"),
            &[("idempotency-key", "a b")],
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_idempotency_key".into())
    );
    let r = api.get(&format!("{url}?state=bogus"), &b).await;
    assert_eq!((r.status, r.code()), (400, "invalid_query".into()));
    let r = api.get(&format!("{url}?cursor=zz"), &b).await;
    assert_eq!((r.status, r.code()), (400, "invalid_cursor".into()));

    // Delete: the node reports the final state; the record is forgotten.
    let r = api
        .call(
            "DELETE",
            &format!("{fol}/v1/sandboxes/{}", sb.id),
            &a,
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    // Updates queued before the delete may come first.
    let asg = loop {
        let d = next(&mut watch).await;
        let a = d
            .sandboxes
            .into_iter()
            .find(|s| s.id == sb.id)
            .expect("still assigned");
        if a.desired == kiln_api::cluster::DesiredState::Deleted {
            break a;
        }
    };
    node.report(authed(
        ReportRequest {
            name: "h1".into(),
            templates_json: Vec::new(),
            sandboxes: vec![SandboxReport {
                id: sb.id.to_string(),
                generation: asg.generation,
                state_json: serde_json::to_vec(&SandboxState::Exited {
                    exit_code: 137,
                    signal: Some(9),
                    finished_at: 1,
                    timed_out: false,
                })
                .expect("json"),
                start_json: Vec::new(),
            }],
        },
        &cred,
    ))
    .await
    .expect("report");
    let mut gone = false;
    for _ in 0..100 {
        let r = api.get(&format!("{lead}/v1/sandboxes/{}", sb.id), &a).await;
        if r.status == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "the deleted sandbox is forgotten once its node let it go"
    );

    // Nodes and cluster status for admins.
    let r = api.get(&format!("{fol}/v1/nodes"), &admin).await;
    let nodes: kiln_api::rest::NodeList = r.json();
    assert_eq!(nodes.items.len(), 1);
    assert_eq!(nodes.items[0].driver, DriverKind::QemuTcg);
    let r = api
        .post(&format!("{fol}/v1/nodes/h1/cordon"), &admin, &json!({}))
        .await;
    assert_eq!(r.status, 204);
    let r = api
        .post(
            &format!("{lead}/v1/sandboxes"),
            &b,
            &json!({"image": "busybox"}),
        )
        .await;
    assert_eq!(
        r.json::<ErrorBody>().error.reason.as_deref(),
        Some("none_schedulable")
    );
    let r = api.get(&format!("{fol}/v1/cluster"), &admin).await;
    let st: kiln_api::rest::ClusterStatus = r.json();
    assert_eq!(st.members.len(), 3);
    assert_eq!(st.leader, Some(c.server(l).id()));
    assert!(
        st.members
            .iter()
            .all(|m| m.voter && m.api_url.starts_with("http://"))
    );

    // The OpenAPI document is served without a token.
    let r = api.get(&format!("{fol}/v1/openapi.json"), "").await;
    let doc: Value = r.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1"))
    );
    assert!(doc["paths"]["/v1/sandboxes"]["post"].is_object());

    // Prometheus metrics on the leader.
    let r = api.get(&format!("{lead}/metrics"), "").await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    for m in [
        "kiln_create_seconds_count 3",
        "kiln_scheduler_decisions_total{outcome=\"no_nodes\"} 1",
        "kiln_raft_term ",
        "kiln_raft_is_leader 1",
        "kiln_raft_apply_lag ",
        "kiln_sandboxes{state=\"creating\"} 1",
        "kiln_scheduler_decisions_total{outcome=\"placed\"}",
    ] {
        assert!(text.contains(m), "{m} missing from:\n{text}");
    }

    drop(watch);
    c.shutdown().await;
}

async fn next(s: &mut tonic::Streaming<kiln_api::node_rpc::DesiredUpdate>) -> NodeDesired {
    let u = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an update within 10 s")
        .expect("stream ok")
        .expect("stream open");
    serde_json::from_slice(&u.desired_json).expect("NodeDesired JSON")
}

/// The leader is killed twice while a client creates with idempotency
/// keys through whichever replica answers: every acknowledged create
/// exists exactly once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_creating_loses_and_doubles_nothing() {
    let mut c = Cluster::start(3).await;
    let api = Api::new();
    let l = c.leader().await;
    let lead = c.server(l).api_url().to_owned();
    let a = tenant_token(
        &api,
        &lead,
        &c.admin,
        "alpha",
        json!({"sandboxes": 1000, "cpus": 1000, "memory_mib": 1000000}),
    )
    .await;
    let _node = register(&lead, "h1").await;
    let spec = serde_json::to_vec(
        &json!({"image": "busybox", "resources": {"cpus": 1, "memory_mib": 64, "disk_mib": 16}}),
    )
    .expect("json");
    // Bigger node so 60 creates fit.
    let mut reg = NodeServiceClient::connect(lead.clone())
        .await
        .expect("connect");
    reg.register(joined(RegisterRequest {
        join_token: JOIN.into(),
        name: "big".into(),
        address: "big:0".into(),
        capacity_json: serde_json::to_vec(&Capacity {
            cpus: 1000,
            memory_mib: 1_000_000,
            disk_mib: 1_000_000,
        })
        .expect("json"),
        driver_json: serde_json::to_vec(&DriverKind::QemuTcg).expect("json"),
        labels: Default::default(),
        images: vec![],
        stream_key: String::new(),
        stream_cert_sha256: String::new(),
    }))
    .await
    .expect("register");

    let total = 60;
    let mut acked = BTreeSet::new();
    let mut kills = 0;
    for i in 0..total {
        if i == 20 || i == 40 {
            // kill -9 the leader (Raft stops as a crashed process would),
            // then restart it from its database on the same ports.
            let l = c.leader().await;
            let s = c.servers[l].take().expect("leader");
            let mut cfg = s.config().clone();
            cfg.raft_listen = s.raft().local_addr();
            cfg.init = false;
            s.shutdown().await;
            kills += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.servers[l] = Some(kiln_server::Server::start(cfg).await.expect("restart"));
        }
        let key = format!("k-{i}");
        let mut done = false;
        for _ in 0..100 {
            // Any running replica; followers forward to the leader.
            let urls: Vec<String> = c
                .servers
                .iter()
                .flatten()
                .map(|s| s.api_url().to_owned())
                .collect();
            let url = &urls[i % urls.len()];
            let r = api
                .http
                .post(format!("{url}/v1/sandboxes"))
                .header("authorization", format!("Bearer {a}"))
                .header("content-type", "application/json")
                .header("idempotency-key", &key)
                .body(spec.clone())
                .send()
                .await;
            if let Ok(r) = r {
                let st = r.status().as_u16();
                let b = r.bytes().await.unwrap_or_default();
                if st == 200 || st == 201 {
                    let sb: Sandbox = serde_json::from_slice(&b).expect("sandbox");
                    acked.insert((key.clone(), sb.id));
                    done = true;
                    break;
                }
                assert!(
                    st == 503 || st == 502,
                    "unexpected {st}: {}",
                    String::from_utf8_lossy(&b)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(done, "create {i} never acknowledged");
    }
    assert_eq!(kills, 2);
    assert_eq!(acked.len(), total);
    c.wait_all_applied().await;
    let l = c.leader().await;
    let lead = c.server(l).api_url().to_owned();
    let r = api
        .get(&format!("{lead}/v1/sandboxes?limit=1000"), &a)
        .await;
    let list: SandboxList = r.json();
    assert_eq!(
        list.items.len(),
        total,
        "every acknowledged create exactly once"
    );
    let ids: BTreeSet<_> = list.items.iter().map(|s| s.id.clone()).collect();
    let acked_ids: BTreeSet<_> = acked.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids, acked_ids);
    c.shutdown().await;
}
