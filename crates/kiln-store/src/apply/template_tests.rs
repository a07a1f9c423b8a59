//! Templates and pools created through the API, stepped directly: which
//! nodes must hold them, what a node reports (ready, failed with a reason),
//! what each node's desired state carries, tenant scoping, and a delete
//! refused while sandboxes of the template's image and resources run.

use std::collections::{BTreeMap, BTreeSet};

use kiln_api::cluster::{Capacity, DesiredState, DriverKind, NodeName, Quotas, TenantName};
use kiln_api::sandbox::{Resources, SandboxId, SandboxSpec, SandboxState};

use super::apply;
use crate::command::{ApplyMeta, Command, Rejection, Response};
use crate::query;
use crate::state::State;

struct Sm(State, u64);

impl Sm {
    fn step(&mut self, c: Command) -> Response {
        self.1 += 1;
        apply(
            &mut self.0,
            &c,
            ApplyMeta {
                index: self.1,
                term: 1,
            },
        )
    }
    fn ok(&mut self, c: Command) {
        let r = self.step(c.clone());
        assert!(!r.is_rejected(), "{c:?} was rejected: {r:?}");
    }
    fn rejected(&mut self, c: Command) -> Rejection {
        let before = self.0.clone();
        match self.step(c) {
            Response::Rejected(r) => {
                assert_eq!(self.0, before, "a rejected command changed the state");
                r
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
}

fn t(s: &str) -> TenantName {
    TenantName::new(s).expect("tenant")
}
fn n(s: &str) -> NodeName {
    NodeName::new(s).expect("node")
}
fn res() -> Resources {
    Resources {
        cpus: 1,
        memory_mib: 256,
        disk_mib: 1024,
    }
}

fn setup() -> Sm {
    let mut sm = Sm(State::default(), 0);
    for name in ["acme", "other"] {
        sm.ok(Command::CreateTenant {
            name: t(name),
            quotas: Quotas::default(),
            now_ms: 1,
        });
    }
    for name in ["n1", "n2"] {
        sm.ok(register(name, 1));
    }
    sm
}

fn register(name: &str, now_ms: u64) -> Command {
    Command::RegisterNode {
        name: n(name),
        address: format!("{name}:7000"),
        capacity: Capacity {
            cpus: 8,
            memory_mib: 8192,
            disk_mib: 100_000,
        },
        driver: DriverKind::QemuTcg,
        labels: BTreeMap::new(),
        images: BTreeSet::new(),
        now_ms,
    }
}

fn put(tenant: &str, name: &str, nodes: &[&str]) -> Command {
    Command::PutTemplate {
        tenant: Some(t(tenant)),
        name: name.into(),
        image: "busybox".into(),
        resources: res(),
        auto: false,
        now_ms: 2,
        nodes: nodes.iter().map(|s| n(s)).collect(),
        everywhere: false,
    }
}

fn report(node: &str, ready: bool, error: Option<&str>) -> Command {
    Command::ReportTemplate {
        node: n(node),
        tenant: Some(t("acme")),
        name: "py".into(),
        ready,
        size_bytes: 10,
        error: error.map(str::to_owned),
    }
}

#[test]
fn a_placed_template_reaches_its_nodes_with_the_pool_target() {
    let mut sm = setup();
    sm.ok(put("acme", "py", &["n1"]));
    sm.ok(Command::SetPool {
        tenant: Some(t("acme")),
        template: "py".into(),
        node: n("n1"),
        target: 2,
    });
    let d1 = query::node_desired(&sm.0, &n("n1")).expect("n1");
    assert_eq!(d1.templates.len(), 1);
    let a = &d1.templates[0];
    assert_eq!(
        (a.key.as_str(), a.image.as_str(), a.pool),
        ("acme/py", "busybox", 2)
    );
    assert_eq!(a.tenant, Some(t("acme")));
    let d2 = query::node_desired(&sm.0, &n("n2")).expect("n2");
    assert!(d2.templates.is_empty());
    // The same template again adds nodes; another image under the name is refused.
    sm.ok(put("acme", "py", &["n2"]));
    let placed: Vec<_> = sm.0.templates["acme/py"].placed.iter().cloned().collect();
    assert_eq!(placed, vec![n("n1"), n("n2")]);
    let mut other = put("acme", "py", &[]);
    if let Command::PutTemplate { image, .. } = &mut other {
        *image = "alpine".into();
    }
    assert!(matches!(
        sm.rejected(other),
        Rejection::AlreadyExists { .. }
    ));
    // An unknown node is refused.
    assert!(matches!(
        sm.rejected(put("acme", "js", &["n9"])),
        Rejection::NotFound { .. }
    ));
}

#[test]
fn a_template_placed_everywhere_follows_nodes_that_join() {
    let mut sm = setup();
    let mut everywhere = put("acme", "py", &["n1", "n2"]);
    if let Command::PutTemplate { everywhere: e, .. } = &mut everywhere {
        *e = true;
    }
    sm.ok(everywhere);
    sm.ok(put("acme", "pinned", &["n1"]));
    for node in ["n1", "n2"] {
        sm.ok(Command::SetPool {
            tenant: Some(t("acme")),
            template: "py".into(),
            node: n(node),
            target: 2,
        });
    }
    let join = |name: &str| register(name, 5);
    sm.ok(join("n3"));
    let d3 = query::node_desired(&sm.0, &n("n3")).expect("n3");
    let keys: Vec<(&str, u32)> = d3
        .templates
        .iter()
        .map(|a| (a.key.as_str(), a.pool))
        .collect();
    assert_eq!(
        keys,
        vec![("acme/py", 2)],
        "only the everywhere one, with its pool"
    );
    // Registering again changes nothing.
    sm.ok(join("n3"));
    assert_eq!(
        query::node_desired(&sm.0, &n("n3"))
            .expect("n3")
            .templates
            .len(),
        1
    );
    // Removed and registered again: placed anew, with its pool.
    sm.ok(Command::RemoveNode { name: n("n3") });
    assert!(!sm.0.templates["acme/py"].placed.contains(&n("n3")));
    sm.ok(join("n3"));
    let d3 = query::node_desired(&sm.0, &n("n3")).expect("n3");
    assert_eq!(
        d3.templates
            .iter()
            .map(|a| (a.key.as_str(), a.pool))
            .collect::<Vec<_>>(),
        vec![("acme/py", 2)]
    );
    // A pool beyond the tenant's quota is not given to a joining node:
    // the template is, without a pool.
    sm.ok(Command::SetQuotas {
        name: t("acme"),
        quotas: Quotas {
            sandboxes: 6,
            ..Quotas::default()
        },
    });
    sm.ok(join("n4"));
    let d4 = query::node_desired(&sm.0, &n("n4")).expect("n4");
    assert_eq!(
        d4.templates
            .iter()
            .map(|a| (a.key.as_str(), a.pool))
            .collect::<Vec<_>>(),
        vec![("acme/py", 0)]
    );
}

#[test]
fn reports_record_ready_and_failed_with_the_reason() {
    let mut sm = setup();
    sm.ok(put("acme", "py", &["n1", "n2"]));
    sm.ok(report("n1", true, None));
    sm.ok(report("n2", false, Some("image not found")));
    let tpl = &sm.0.templates["acme/py"];
    assert!(tpl.nodes[&n("n1")].ready);
    assert_eq!(tpl.failed[&n("n2")], "image not found");
    // A later success clears the failure.
    sm.ok(report("n2", true, None));
    assert!(sm.0.templates["acme/py"].failed.is_empty());
    // An oversized reason is refused, not stored.
    let long = "x".repeat(5000);
    assert!(matches!(
        sm.rejected(report("n2", false, Some(&long))),
        Rejection::Invalid { .. }
    ));
    // Once ready on n1, the scheduler sees it there.
    let view = query::cluster_view(&sm.0);
    let n1 = view.nodes.iter().find(|v| v.name == n("n1")).expect("n1");
    assert_eq!(n1.templates, vec![("busybox".to_string(), res())]);
}

#[test]
fn templates_are_scoped_to_their_tenant() {
    let mut sm = setup();
    sm.ok(put("acme", "py", &["n1"]));
    assert!(query::get_template(&sm.0, Some(&t("acme")), "py").is_some());
    assert!(query::get_template(&sm.0, Some(&t("other")), "py").is_none());
    // The other tenant's delete is "not found", like a missing one.
    assert!(matches!(
        sm.rejected(Command::DeleteTemplate {
            tenant: Some(t("other")),
            name: "py".into(),
        }),
        Rejection::NotFound { .. }
    ));
    // The other tenant may hold its own template of the same name.
    sm.ok(put("other", "py", &["n1"]));
    let d = query::node_desired(&sm.0, &n("n1")).expect("n1");
    let keys: Vec<_> = d.templates.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, vec!["acme/py", "other/py"]);
}

#[test]
fn delete_is_refused_while_a_sandbox_of_its_image_runs_on_a_holder() {
    let mut sm = setup();
    sm.ok(put("acme", "py", &["n1"]));
    sm.ok(Command::SetPool {
        tenant: Some(t("acme")),
        template: "py".into(),
        node: n("n1"),
        target: 1,
    });
    sm.ok(report("n1", true, None));
    let mut spec = SandboxSpec::for_image("busybox");
    spec.resources = res();
    let id = SandboxId::from_random(7u64.to_be_bytes());
    sm.ok(Command::CreateSandbox {
        id: id.clone(),
        tenant: t("acme"),
        spec: spec.clone(),
        idempotency_key: None,
        node: Some(n("n1")),
        now_ms: 3,
    });
    // Another tenant's sandbox of the same image does not hold it.
    sm.ok(Command::CreateSandbox {
        id: SandboxId::from_random(8u64.to_be_bytes()),
        tenant: t("other"),
        spec,
        idempotency_key: None,
        node: Some(n("n1")),
        now_ms: 3,
    });
    let del = Command::DeleteTemplate {
        tenant: Some(t("acme")),
        name: "py".into(),
    };
    match sm.rejected(del.clone()) {
        Rejection::Conflict { message } => assert!(message.contains(id.as_str()), "{message}"),
        other => panic!("{other:?}"),
    }
    // Once the sandbox is deleted (and finished), the delete goes through
    // and takes the pool with it.
    sm.ok(Command::SetDesired {
        tenant: Some(t("acme")),
        id: id.clone(),
        desired: DesiredState::Deleted,
        stop_grace_secs: None,
    });
    sm.ok(Command::ReportSandbox {
        node: n("n1"),
        id,
        generation: 2,
        state: SandboxState::Exited {
            exit_code: 0,
            signal: None,
            finished_at: 4,
            timed_out: false,
        },
        now_ms: 4,
        start: None,
    });
    sm.ok(del);
    assert!(sm.0.templates.is_empty() && sm.0.pools.is_empty());
    let d = query::node_desired(&sm.0, &n("n1")).expect("n1");
    assert!(d.templates.is_empty() && d.pools.is_empty());
}

/// Warm-pool members count against the tenant's quotas (they are its VMs,
/// kept running): a pool larger than the quota is refused, and so is a
/// second pool that together with the first would exceed it.
#[test]
fn pools_are_charged_to_the_tenant_quota() {
    let mut sm = setup();
    sm.ok(Command::SetQuotas {
        name: t("acme"),
        quotas: Quotas {
            sandboxes: 10,
            cpus: 4,
            memory_mib: 4096,
        },
    });
    sm.ok(put("acme", "py", &["n1", "n2"]));
    let pool = |node: &str, target: u32| Command::SetPool {
        tenant: Some(t("acme")),
        template: "py".into(),
        node: n(node),
        target,
    };
    assert!(matches!(
        sm.rejected(pool("n1", 5)),
        Rejection::QuotaExceeded {
            resource: crate::QuotaResource::Cpus,
            ..
        }
    ));
    assert!(
        !sm.0.pools.contains_key("acme/py"),
        "nothing left of the refused pool"
    );
    sm.ok(pool("n1", 3));
    assert!(matches!(
        sm.rejected(pool("n2", 2)),
        Rejection::QuotaExceeded { .. }
    ));
    sm.ok(pool("n2", 1));
    // Shrinking is always allowed.
    sm.ok(pool("n1", 1));
}
