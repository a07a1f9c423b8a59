//! The state machine stepped directly, without Raft.

use std::collections::{BTreeMap, BTreeSet};

use kiln_api::cluster::{
    Capacity, DesiredState, DriverKind, NodeName, NodeStatus, Quotas, Role, TenantName,
};
use kiln_api::sandbox::{RestartPolicy, SandboxId, SandboxSpec, SandboxState};

use super::apply;
use crate::command::{ApplyMeta, Command, ObjectKind, QuotaResource, Rejection, Response};
use crate::query::{self, ListSandboxes, StateFilter};
use crate::state::{LoadStateError, SCHEMA_VERSION, State};

struct Sm {
    st: State,
    index: u64,
}

impl Sm {
    fn new() -> Sm {
        Sm {
            st: State::default(),
            index: 0,
        }
    }
    fn step(&mut self, c: Command) -> Response {
        self.index += 1;
        apply(
            &mut self.st,
            &c,
            ApplyMeta {
                index: self.index,
                term: 1,
            },
        )
    }
    fn ok(&mut self, c: Command) -> Response {
        let r = self.step(c.clone());
        assert!(!r.is_rejected(), "{c:?} was rejected: {r:?}");
        r
    }
    fn rejected(&mut self, c: Command) -> Rejection {
        let before = self.st.clone();
        match self.step(c) {
            Response::Rejected(r) => {
                assert_eq!(self.st, before, "a rejected command changed the state");
                r
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
}

fn t(s: &str) -> TenantName {
    TenantName::new(s).expect("tenant name")
}
fn n(s: &str) -> NodeName {
    NodeName::new(s).expect("node name")
}
fn sid(i: u64) -> SandboxId {
    SandboxId::from_random(i.to_be_bytes())
}
fn spec(cpus: u32, mem: u32) -> SandboxSpec {
    let mut s = SandboxSpec::for_image("busybox");
    s.resources.cpus = cpus;
    s.resources.memory_mib = mem;
    s
}
fn tenant(name: &str, quotas: Quotas) -> Command {
    Command::CreateTenant {
        name: t(name),
        quotas,
        now_ms: 1,
    }
}
fn node(name: &str, cpus: u32, mem: u64) -> Command {
    Command::RegisterNode {
        name: n(name),
        address: format!("{name}:7000"),
        capacity: Capacity {
            cpus,
            memory_mib: mem,
            disk_mib: 100_000,
        },
        driver: DriverKind::QemuTcg,
        labels: BTreeMap::new(),
        images: BTreeSet::new(),
        now_ms: 1000,
    }
}
fn create(id: u64, ten: &str, s: SandboxSpec, key: Option<&str>, node: Option<&str>) -> Command {
    Command::CreateSandbox {
        id: sid(id),
        tenant: t(ten),
        spec: s,
        idempotency_key: key.map(str::to_owned),
        node: node.map(n),
        now_ms: 5000,
    }
}

#[test]
fn idempotent_create_returns_the_same_sandbox() {
    let mut sm = Sm::new();
    sm.ok(tenant("acme", Quotas::default()));
    let r = sm.ok(create(1, "acme", spec(1, 256), Some("k1"), None));
    assert_eq!(
        r,
        Response::SandboxCreated {
            id: sid(1),
            created: true,
            generation: 1
        }
    );
    // A retry carries a fresh ID (the leader picks one per attempt).
    let r = sm.ok(create(2, "acme", spec(1, 256), Some("k1"), None));
    assert_eq!(
        r,
        Response::SandboxCreated {
            id: sid(1),
            created: false,
            generation: 1
        }
    );
    assert_eq!(sm.st.sandboxes.len(), 1);
    // Same key, other request: refused.
    let r = sm.rejected(create(3, "acme", spec(2, 256), Some("k1"), None));
    assert!(matches!(r, Rejection::IdempotencyConflict { .. }));
    // Keys are per tenant.
    sm.ok(tenant("other", Quotas::default()));
    let r = sm.ok(create(4, "other", spec(1, 256), Some("k1"), None));
    assert!(matches!(r, Response::SandboxCreated { created: true, .. }));
    // Unknown tenant, duplicate id, invalid spec.
    assert!(matches!(
        sm.rejected(create(5, "nobody", spec(1, 256), None, None)),
        Rejection::NotFound {
            kind: ObjectKind::Tenant,
            ..
        }
    ));
    assert!(matches!(
        sm.rejected(create(1, "acme", spec(1, 256), None, None)),
        Rejection::AlreadyExists {
            kind: ObjectKind::Sandbox,
            ..
        }
    ));
    assert!(matches!(
        sm.rejected(create(6, "acme", spec(0, 256), None, None)),
        Rejection::Invalid { .. }
    ));
    assert!(matches!(
        sm.rejected(create(7, "acme", spec(1, 256), Some("bad key"), None)),
        Rejection::Invalid { .. }
    ));
}

#[test]
fn quotas_are_enforced_in_apply() {
    let mut sm = Sm::new();
    sm.ok(tenant(
        "acme",
        Quotas {
            sandboxes: 3,
            cpus: 4,
            memory_mib: 1024,
        },
    ));
    sm.ok(create(1, "acme", spec(2, 256), None, None));
    sm.ok(create(2, "acme", spec(2, 256), None, None));
    let r = sm.rejected(create(3, "acme", spec(1, 256), None, None));
    assert_eq!(
        r,
        Rejection::QuotaExceeded {
            resource: QuotaResource::Cpus,
            limit: 4,
            used: 4,
            requested: 1
        }
    );
    // Deleting frees the quota at once (it no longer counts).
    sm.ok(Command::SetDesired {
        tenant: Some(t("acme")),
        id: sid(1),
        desired: DesiredState::Deleted,
        stop_grace_secs: None,
    });
    sm.ok(create(3, "acme", spec(1, 256), None, None));
    sm.ok(create(4, "acme", spec(1, 256), None, None));
    let r = sm.rejected(create(5, "acme", spec(1, 64), None, None));
    assert!(matches!(
        r,
        Rejection::QuotaExceeded {
            resource: QuotaResource::Sandboxes,
            limit: 3,
            ..
        }
    ));
    let r = sm.rejected(Command::CreateTenant {
        name: t("acme"),
        quotas: Quotas::default(),
        now_ms: 2,
    });
    assert!(matches!(
        r,
        Rejection::AlreadyExists {
            kind: ObjectKind::Tenant,
            ..
        }
    ));
    assert_eq!(query::tenant_usage(&sm.st, &t("acme")).sandboxes, 3);
}

#[test]
fn placement_respects_capacity_and_cordons() {
    let mut sm = Sm::new();
    sm.ok(tenant("acme", Quotas::default()));
    sm.ok(node("a", 2, 1024));
    sm.ok(create(1, "acme", spec(2, 512), None, Some("a")));
    let r = sm.rejected(create(2, "acme", spec(1, 256), None, Some("a")));
    assert!(matches!(r, Rejection::Conflict { .. }), "{r:?}");
    sm.ok(create(2, "acme", spec(1, 256), None, None));
    sm.ok(node("b", 4, 4096));
    sm.ok(Command::CordonNode {
        name: n("b"),
        cordoned: true,
    });
    assert!(matches!(
        sm.rejected(Command::PlaceSandbox {
            id: sid(2),
            node: n("b"),
            expected_generation: 1
        }),
        Rejection::Conflict { .. }
    ));
    sm.ok(Command::CordonNode {
        name: n("b"),
        cordoned: false,
    });
    assert!(matches!(
        sm.rejected(Command::PlaceSandbox {
            id: sid(2),
            node: n("b"),
            expected_generation: 7
        }),
        Rejection::StaleGeneration {
            expected: 7,
            actual: 1
        }
    ));
    let r = sm.ok(Command::PlaceSandbox {
        id: sid(2),
        node: n("b"),
        expected_generation: 1,
    });
    assert_eq!(
        r,
        Response::SandboxChanged {
            id: sid(2),
            generation: 2
        }
    );
    let view = query::cluster_view(&sm.st);
    assert_eq!(view.nodes[1].allocated.cpus, 1);
    assert!(view.pending.is_empty());
    let d = query::node_desired(&sm.st, &n("b")).expect("registered");
    assert_eq!(d.sandboxes.len(), 1);
    assert_eq!(d.sandboxes[0].generation, 2);
    // A node with sandboxes cannot be removed.
    assert!(matches!(
        sm.rejected(Command::RemoveNode { name: n("b") }),
        Rejection::Conflict { .. }
    ));
}

#[test]
fn lost_nodes_fail_or_reschedule_their_sandboxes() {
    let mut sm = Sm::new();
    sm.ok(tenant("acme", Quotas::default()));
    sm.ok(node("a", 8, 8192));
    sm.ok(create(1, "acme", spec(1, 256), None, Some("a")));
    let mut again = spec(1, 256);
    again.restart = RestartPolicy::OnNodeFailure;
    sm.ok(create(2, "acme", again, None, Some("a")));
    sm.ok(Command::ReportSandbox {
        node: n("a"),
        id: sid(1),
        generation: 1,
        state: SandboxState::Running { main_pid: 10 },
        now_ms: 1500,
        start: None,
    });
    sm.ok(Command::ReportSandbox {
        node: n("a"),
        id: sid(2),
        generation: 1,
        state: SandboxState::Running { main_pid: 11 },
        now_ms: 1500,
        start: Some(kiln_api::sandbox::StartReport {
            path: kiln_api::sandbox::StartKind::Cold,
            template: None,
            notes: vec!["cold boot".into()],
            phases: vec![],
            ready_ms: 900,
        }),
    });
    assert!(sm.st.sandboxes[&sid(2)].start.is_some());
    sm.ok(Command::Heartbeat {
        name: n("a"),
        now_ms: 2000,
        images: None,
        templates: None,
    });
    // Within the grace period: nothing.
    let r = sm.ok(Command::ExpireNodes {
        now_ms: 6000,
        grace_ms: 5000,
    });
    assert_eq!(
        r,
        Response::NodesExpired {
            nodes: vec![],
            lost: vec![],
            unassigned: vec![]
        }
    );
    let r = sm.ok(Command::ExpireNodes {
        now_ms: 7001,
        grace_ms: 5000,
    });
    assert_eq!(
        r,
        Response::NodesExpired {
            nodes: vec![n("a")],
            lost: vec![sid(1)],
            unassigned: vec![sid(2)]
        }
    );
    // Rescheduled: its next start is another node's, not the lost one's.
    assert!(sm.st.sandboxes[&sid(2)].start.is_none());
    assert_eq!(sm.st.nodes[&n("a")].status, NodeStatus::Unreachable);
    assert!(sm.st.sandboxes[&sid(1)].observed.is_finished());
    assert_eq!(sm.st.sandboxes[&sid(2)].node, None);
    assert_eq!(query::cluster_view(&sm.st).pending.len(), 1);
    // The old node coming back cannot report on the rescheduled sandbox,
    // nor resurrect the lost one.
    sm.ok(Command::Heartbeat {
        name: n("a"),
        now_ms: 8000,
        images: None,
        templates: None,
    });
    assert_eq!(sm.st.nodes[&n("a")].status, NodeStatus::Ready);
    assert!(matches!(
        sm.rejected(Command::ReportSandbox {
            node: n("a"),
            id: sid(2),
            generation: 1,
            state: SandboxState::Running { main_pid: 1 },
            now_ms: 8000,
            start: None,
        }),
        Rejection::Conflict { .. }
    ));
    assert!(matches!(
        sm.rejected(Command::ReportSandbox {
            node: n("a"),
            id: sid(1),
            generation: 2,
            state: SandboxState::Running { main_pid: 1 },
            now_ms: 8000,
            start: None,
        }),
        Rejection::Conflict { .. }
    ));
    // Deleted + lost: forgettable.
    sm.ok(Command::SetDesired {
        tenant: None,
        id: sid(1),
        desired: DesiredState::Deleted,
        stop_grace_secs: None,
    });
    sm.ok(Command::ForgetSandbox { id: sid(1) });
    assert!(!sm.st.sandboxes.contains_key(&sid(1)));
}

#[test]
fn tenants_cannot_touch_each_others_sandboxes() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    sm.ok(tenant("b", Quotas::default()));
    sm.ok(create(1, "a", spec(1, 256), None, None));
    let r = sm.rejected(Command::SetDesired {
        tenant: Some(t("b")),
        id: sid(1),
        desired: DesiredState::Deleted,
        stop_grace_secs: None,
    });
    assert_eq!(
        r,
        Rejection::NotFound {
            kind: ObjectKind::Sandbox,
            name: sid(1).to_string()
        }
    );
    let r = sm.rejected(Command::PutSnapshot {
        tenant: t("b"),
        name: "s".into(),
        source: sid(1),
        now_ms: 1,
        ephemeral: false,
    });
    assert!(matches!(
        r,
        Rejection::NotFound {
            kind: ObjectKind::Sandbox,
            ..
        }
    ));
    assert!(query::get_sandbox(&sm.st, Some(&t("b")), &sid(1)).is_none());
    assert!(query::get_sandbox(&sm.st, Some(&t("a")), &sid(1)).is_some());
    let page = query::list_sandboxes(
        &sm.st,
        &ListSandboxes {
            tenant: Some(t("b")),
            ..Default::default()
        },
    )
    .expect("list");
    assert!(page.items.is_empty());
    // Deleting a tenant with sandboxes is refused.
    assert!(matches!(
        sm.rejected(Command::DeleteTenant {
            name: t("a"),
            now_ms: 2
        }),
        Rejection::Conflict { .. }
    ));
}

#[test]
fn tokens_are_stored_hashed_and_revocable() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    let hash = query::hash_token("s3cret");
    assert_eq!(hash.len(), 64);
    let mk = |id: &str, tenant: Option<&str>, role, sha256: &str| Command::CreateToken {
        id: id.into(),
        tenant: tenant.map(t),
        role,
        sha256: sha256.into(),
        description: String::new(),
        now_ms: 3,
        node: None,
    };
    assert!(matches!(
        sm.rejected(mk("t1", None, Role::Admin, "s3cret")),
        Rejection::Invalid { .. }
    ));
    assert!(matches!(
        sm.rejected(mk("t1", Some("a"), Role::Admin, &hash)),
        Rejection::Invalid { .. }
    ));
    assert!(matches!(
        sm.rejected(mk("t1", None, Role::Tenant, &hash)),
        Rejection::Invalid { .. }
    ));
    assert!(matches!(
        sm.rejected(mk("t1", Some("zz"), Role::Tenant, &hash)),
        Rejection::NotFound { .. }
    ));
    sm.ok(mk("t1", Some("a"), Role::Tenant, &hash));
    assert!(matches!(
        sm.rejected(mk("t2", None, Role::Admin, &hash)),
        Rejection::Conflict { .. }
    ));
    assert_eq!(
        query::token_by_hash(&sm.st, &hash).map(|t| t.id.as_str()),
        Some("t1")
    );
    assert!(
        !serde_json::to_string(&sm.st)
            .expect("json")
            .contains("s3cret")
    );
    sm.ok(Command::RevokeToken {
        id: "t1".into(),
        now_ms: 9,
    });
    assert!(query::token_by_hash(&sm.st, &hash).is_none());
}

#[test]
fn listing_filters_and_pages() {
    let mut sm = Sm::new();
    sm.ok(tenant(
        "a",
        Quotas {
            sandboxes: 1000,
            cpus: 1000,
            memory_mib: 1 << 30,
        },
    ));
    sm.ok(node("x", 1000, 1 << 30));
    for i in 0..25u64 {
        let mut s = spec(1, 64);
        s.labels.insert(
            "team".into(),
            if i % 2 == 0 { "red" } else { "blue" }.into(),
        );
        sm.ok(create(i, "a", s, None, Some("x")));
    }
    for i in 0..5u64 {
        sm.ok(Command::ReportSandbox {
            node: n("x"),
            id: sid(i * 2),
            generation: 1,
            state: SandboxState::Running { main_pid: 1 },
            now_ms: 1,
            start: None,
        });
    }
    let mut q = ListSandboxes {
        tenant: Some(t("a")),
        limit: 4,
        ..Default::default()
    };
    q.labels.insert("team".into(), "red".into());
    let mut seen = Vec::new();
    loop {
        let p = query::list_sandboxes(&sm.st, &q).expect("list");
        assert!(p.items.len() <= 4);
        seen.extend(p.items.iter().map(|r| r.id.clone()));
        match p.next {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 13);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    let running = query::list_sandboxes(
        &sm.st,
        &ListSandboxes {
            tenant: Some(t("a")),
            state: Some(StateFilter::Running),
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(running.items.len(), 5);
    assert!(
        query::list_sandboxes(
            &sm.st,
            &ListSandboxes {
                cursor: Some("../x".into()),
                ..Default::default()
            }
        )
        .is_err()
    );
}

#[test]
fn newer_schema_is_refused_and_indexes_are_rebuilt() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    sm.ok(create(1, "a", spec(1, 256), Some("k"), None));
    let bytes = sm.st.to_bytes().expect("serialize");
    let back = State::from_bytes(&bytes).expect("load");
    assert_eq!(
        back, sm.st,
        "indexes rebuilt on load equal the incremental ones"
    );
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    v["schema_version"] = (SCHEMA_VERSION + 1).into();
    let newer = serde_json::to_vec(&v).expect("json");
    assert!(matches!(
        State::from_bytes(&newer),
        Err(LoadStateError::NewerSchema { found, supported }) if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
    ));
    assert!(matches!(
        State::from_bytes(b"{garbage"),
        Err(LoadStateError::Decode(_))
    ));
}

#[test]
fn room_for_policies_volumes_groups_and_migrations() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    sm.ok(node("x", 8, 8192));
    sm.ok(node("y", 8, 8192));
    sm.ok(create(1, "a", spec(1, 256), None, Some("x")));
    sm.ok(create(2, "a", spec(1, 256), None, Some("x")));
    sm.ok(Command::PutPolicy {
        tenant: t("a"),
        name: "p".into(),
        document: serde_json::json!({"default": "deny"}),
    });
    sm.ok(Command::PutPolicy {
        tenant: t("a"),
        name: "p".into(),
        document: serde_json::json!({"default": "allow"}),
    });
    assert_eq!(sm.st.policies["a/p"].revision, 2);
    assert!(matches!(
        sm.rejected(Command::PutPolicy {
            tenant: t("a"),
            name: "q".into(),
            document: serde_json::json!([1])
        }),
        Rejection::Invalid { .. }
    ));
    sm.ok(Command::PutVolume {
        tenant: t("a"),
        name: "v".into(),
        size_mib: 10,
        now_ms: 1,
    });
    sm.ok(Command::PutGroup {
        tenant: t("a"),
        name: "g".into(),
        members: [sid(1), sid(2)].into(),
    });
    assert_eq!(sm.st.sandboxes[&sid(1)].group.as_deref(), Some("g"));
    sm.ok(Command::StartMigration {
        id: sid(1),
        to: n("y"),
        now_ms: 1,
    });
    assert!(matches!(
        sm.rejected(Command::AdvanceMigration {
            id: sid(1),
            phase: crate::state::MigrationPhase::Done
        }),
        Rejection::Conflict { .. }
    ));
    for p in [
        crate::state::MigrationPhase::Copying,
        crate::state::MigrationPhase::Switching,
    ] {
        sm.ok(Command::AdvanceMigration {
            id: sid(1),
            phase: p,
        });
    }
    sm.ok(Command::AdvanceMigration {
        id: sid(1),
        phase: crate::state::MigrationPhase::Done,
    });
    assert_eq!(sm.st.sandboxes[&sid(1)].node, Some(n("y")));
    assert_eq!(sm.st.idx.allocated[&n("y")].cpus, 1);
    sm.ok(Command::DeleteGroup {
        tenant: t("a"),
        name: "g".into(),
    });
    assert_eq!(sm.st.sandboxes[&sid(1)].group, None);
}

/// A long pseudo-random mix of valid and invalid commands: never a panic,
/// the same bytes on two replicas, and incremental indexes equal to
/// rebuilt ones.
#[test]
fn random_command_mix_is_deterministic_and_keeps_indexes_consistent() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let tenants = ["a", "b", "c"];
    let nodes = ["x", "y"];
    let mut cmds = vec![
        tenant(
            "a",
            Quotas {
                sandboxes: 20,
                cpus: 30,
                memory_mib: 8192,
            },
        ),
        tenant("b", Quotas::default()),
        node("x", 16, 16384),
        node("y", 4, 2048),
    ];
    for i in 0..3000u64 {
        let id = sid(next(60));
        let tn = tenants[next(3) as usize];
        let nd = nodes[next(2) as usize];
        let c = match next(10) {
            0..=2 => {
                let mut s = spec(1 + next(4) as u32, 64 * (1 + next(8) as u32));
                if next(3) == 0 {
                    s.restart = RestartPolicy::OnNodeFailure;
                }
                let key = format!("k{}", next(30));
                Command::CreateSandbox {
                    id,
                    tenant: t(tn),
                    spec: s,
                    idempotency_key: (next(2) == 0).then_some(key),
                    node: (next(2) == 0).then(|| n(nd)),
                    now_ms: i,
                }
            }
            3 => Command::SetDesired {
                tenant: (next(2) == 0).then(|| t(tn)),
                id,
                desired: [
                    DesiredState::Running,
                    DesiredState::Stopped,
                    DesiredState::Deleted,
                ][next(3) as usize],
                stop_grace_secs: None,
            },
            4 => Command::ReportSandbox {
                node: n(nd),
                id,
                generation: next(4),
                state: if next(2) == 0 {
                    SandboxState::Running { main_pid: 1 }
                } else {
                    SandboxState::Exited {
                        exit_code: 0,
                        signal: None,
                        finished_at: i,
                        timed_out: false,
                    }
                },
                now_ms: i,
                start: None,
            },
            5 => Command::PlaceSandbox {
                id,
                node: n(nd),
                expected_generation: next(4),
            },
            6 => Command::ForgetSandbox { id },
            7 => Command::Heartbeat {
                name: n(nd),
                now_ms: i * 10,
                images: None,
                templates: None,
            },
            8 => Command::ExpireNodes {
                now_ms: i * 10,
                grace_ms: 500,
            },
            _ => Command::CordonNode {
                name: n(nd),
                cordoned: next(2) == 0,
            },
        };
        cmds.push(c);
    }
    let run = |cmds: &[Command]| {
        let mut st = State::default();
        for (i, c) in cmds.iter().enumerate() {
            apply(
                &mut st,
                c,
                ApplyMeta {
                    index: i as u64 + 1,
                    term: 1,
                },
            );
        }
        st
    };
    let a = run(&cmds);
    let b = run(&cmds);
    assert_eq!(a.to_bytes().expect("ser"), b.to_bytes().expect("ser"));
    let mut rebuilt = a.clone();
    rebuilt.rebuild_indexes();
    assert_eq!(rebuilt.idx, a.idx);
    assert!(!a.sandboxes.is_empty());
    for (tn, u) in &a.idx.usage {
        let q = a.tenants[tn].quotas;
        assert!(u.sandboxes <= q.sandboxes && u.cpus <= q.cpus && u.memory_mib <= q.memory_mib);
    }
    for (nd, al) in &a.idx.allocated {
        let cap = a.nodes[nd].capacity;
        assert!(
            al.cpus <= cap.cpus && al.memory_mib <= cap.memory_mib,
            "{nd}: {al:?} > {cap:?}"
        );
    }
}

#[test]
fn a_batch_applies_each_command_as_if_alone_and_never_nests() {
    let mut sm = Sm::new();
    let r = sm.step(Command::Batch {
        commands: vec![
            tenant(
                "acme",
                Quotas {
                    sandboxes: 1,
                    cpus: 8,
                    memory_mib: 4096,
                },
            ),
            create(1, "acme", spec(1, 256), Some("k"), None),
            create(2, "acme", spec(1, 256), Some("k"), None),
            create(3, "acme", spec(1, 256), None, None),
            Command::Batch { commands: vec![] },
        ],
    });
    let Response::Batch { responses } = r else {
        panic!("{r:?}")
    };
    assert_eq!(responses.len(), 5);
    assert_eq!(responses[0], Response::Done);
    assert_eq!(
        responses[1],
        Response::SandboxCreated {
            id: sid(1),
            created: true,
            generation: 1
        }
    );
    assert_eq!(
        responses[2],
        Response::SandboxCreated {
            id: sid(1),
            created: false,
            generation: 1
        }
    );
    assert!(matches!(
        responses[3],
        Response::Rejected(Rejection::QuotaExceeded { .. })
    ));
    assert!(matches!(
        responses[4],
        Response::Rejected(Rejection::Invalid { .. })
    ));
    assert_eq!(sm.st.sandboxes.len(), 1);
}

#[test]
fn tenants_see_only_their_snapshots_and_their_or_shared_templates() {
    let mut sm = Sm::new();
    sm.ok(tenant("a", Quotas::default()));
    sm.ok(tenant("ab", Quotas::default()));
    sm.ok(create(1, "a", spec(1, 256), None, None));
    sm.ok(create(2, "ab", spec(1, 256), None, None));
    sm.ok(Command::PutSnapshot {
        tenant: t("a"),
        name: "s1".into(),
        source: sid(1),
        now_ms: 1,
        ephemeral: false,
    });
    sm.ok(Command::PutSnapshot {
        tenant: t("ab"),
        name: "s1".into(),
        source: sid(2),
        now_ms: 1,
        ephemeral: false,
    });
    let names: Vec<_> = query::list_snapshots(&sm.st, &t("a"))
        .map(|s| s.tenant.clone())
        .collect();
    assert_eq!(names, vec![t("a")]);
    let r = spec(1, 256).resources;
    for (owner, name) in [
        (None, "shared"),
        (Some(t("a")), "mine"),
        (Some(t("ab")), "theirs"),
    ] {
        sm.ok(Command::PutTemplate {
            tenant: owner,
            name: name.into(),
            image: "busybox".into(),
            resources: r,
            auto: false,
            now_ms: 1,
            nodes: vec![],
            everywhere: false,
        });
    }
    let ta = t("a");
    let mut seen: Vec<_> = query::list_templates(&sm.st, Some(&ta))
        .map(|t| t.name.clone())
        .collect();
    seen.sort();
    assert_eq!(seen, vec!["mine".to_string(), "shared".to_string()]);
    assert_eq!(query::list_templates(&sm.st, None).count(), 3);
    // Same name, different tenants: no collision; deleting one leaves the other.
    sm.ok(Command::DeleteSnapshot {
        tenant: t("a"),
        name: "s1".into(),
    });
    assert_eq!(query::list_snapshots(&sm.st, &t("ab")).count(), 1);
    assert!(matches!(
        sm.rejected(Command::DeleteSnapshot {
            tenant: t("a"),
            name: "s1".into()
        }),
        Rejection::NotFound {
            kind: ObjectKind::Snapshot,
            ..
        }
    ));
}

mod nodes;
mod sandboxes;
