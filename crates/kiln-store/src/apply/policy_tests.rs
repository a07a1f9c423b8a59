//! `SetSandboxPolicy` stepped directly: scoping, generation, refusals.

use kiln_api::cluster::{DesiredState, Quotas, TenantName};
use kiln_api::sandbox::{NetworkSpec, PolicyAction, PolicyRule, SandboxId, SandboxSpec};

use super::apply;
use crate::command::{ApplyMeta, Command, ObjectKind, Rejection, Response};
use crate::state::State;

fn step(st: &mut State, index: u64, c: Command) -> Response {
    apply(st, &c, ApplyMeta { index, term: 1 })
}

fn t(s: &str) -> TenantName {
    TenantName::new(s).expect("tenant name")
}

fn sid(i: u64) -> SandboxId {
    SandboxId::from_random(i.to_be_bytes())
}

fn rule(action: PolicyAction, r: &str) -> PolicyRule {
    PolicyRule {
        action,
        rule: r.to_owned(),
    }
}

fn set(tenant: Option<&str>, id: u64, rules: Vec<PolicyRule>) -> Command {
    Command::SetSandboxPolicy {
        tenant: tenant.map(t),
        id: sid(id),
        policy: Some("none".into()),
        policy_default: Some(PolicyAction::Deny),
        rules,
    }
}

/// Tenants `acme` and `other`; sandbox 1 (acme, networked, one published
/// port) and sandbox 2 (acme, no network).
fn setup() -> State {
    let mut st = State::default();
    for (i, name) in ["acme", "other"].into_iter().enumerate() {
        let r = step(
            &mut st,
            i as u64 + 1,
            Command::CreateTenant {
                name: t(name),
                quotas: Quotas::default(),
                now_ms: 1,
            },
        );
        assert!(!r.is_rejected(), "{r:?}");
    }
    let mut net = SandboxSpec::for_image("busybox");
    net.network = NetworkSpec::Default {
        policy: None,
        policy_default: None,
        rules: vec![rule(PolicyAction::Allow, "10.0.0.0/8:tcp:80")],
        publish: vec!["8080:80".into()],
    };
    for (id, spec) in [(1, net), (2, SandboxSpec::for_image("busybox"))] {
        let r = step(
            &mut st,
            10 + id,
            Command::CreateSandbox {
                id: sid(id),
                tenant: t("acme"),
                spec,
                idempotency_key: None,
                node: None,
                now_ms: 5,
            },
        );
        assert!(!r.is_rejected(), "{r:?}");
    }
    st
}

#[test]
fn a_policy_change_moves_the_generation_and_keeps_published_ports() {
    let mut st = setup();
    assert_eq!(st.sandboxes[&sid(1)].policy_generation, 1);
    let rules = vec![rule(PolicyAction::Deny, "10.1.2.3:tcp:80")];
    let r = step(&mut st, 20, set(Some("acme"), 1, rules.clone()));
    assert_eq!(
        r,
        Response::SandboxChanged {
            id: sid(1),
            generation: 2
        }
    );
    let rec = &st.sandboxes[&sid(1)];
    assert_eq!(rec.policy_generation, 2);
    assert_eq!(rec.mod_index, 20);
    assert_eq!(
        rec.spec.network,
        NetworkSpec::Default {
            policy: Some("none".into()),
            policy_default: Some(PolicyAction::Deny),
            rules: rules.clone(),
            publish: vec!["8080:80".into()],
        }
    );
    // The same policy again: nothing moves.
    let before = st.clone();
    let r = step(&mut st, 21, set(None, 1, rules));
    assert_eq!(
        r,
        Response::SandboxChanged {
            id: sid(1),
            generation: 2
        }
    );
    assert_eq!(st, before);
}

#[test]
fn policy_changes_are_scoped_and_refused_without_a_network_or_when_ended() {
    let mut st = setup();
    let refused = |st: &mut State, c: Command| -> Rejection {
        let before = st.clone();
        match step(st, 30, c) {
            Response::Rejected(r) => {
                assert_eq!(*st, before, "a rejected command changed the state");
                r
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    };
    // Another tenant's sandbox is not found, exactly like a missing one.
    assert!(matches!(
        refused(&mut st, set(Some("other"), 1, vec![])),
        Rejection::NotFound {
            kind: ObjectKind::Sandbox,
            ..
        }
    ));
    assert!(matches!(
        refused(&mut st, set(Some("acme"), 9, vec![])),
        Rejection::NotFound { .. }
    ));
    // No network: no policy.
    assert!(matches!(
        refused(&mut st, set(Some("acme"), 2, vec![])),
        Rejection::Conflict { .. }
    ));
    // Too many rules, or a rule with control characters.
    let many = vec![rule(PolicyAction::Allow, "1.2.3.4"); 1025];
    assert!(matches!(
        refused(&mut st, set(Some("acme"), 1, many)),
        Rejection::Invalid { .. }
    ));
    assert!(matches!(
        refused(
            &mut st,
            set(Some("acme"), 1, vec![rule(PolicyAction::Allow, "a\nb")])
        ),
        Rejection::Invalid { .. }
    ));
    // Being deleted: refused.
    let r = step(
        &mut st,
        31,
        Command::SetDesired {
            tenant: None,
            id: sid(1),
            desired: DesiredState::Deleted,
            stop_grace_secs: None,
        },
    );
    assert!(!r.is_rejected());
    assert!(matches!(
        refused(&mut st, set(Some("acme"), 1, vec![])),
        Rejection::Conflict { .. }
    ));
}
