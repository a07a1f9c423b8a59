//! `/v1/sandboxes/{id}/policy`: a networked sandbox's network policy, part
//! of its replicated spec, read and replaced live.
//!
//! A new policy is checked with the node's own parser (`kiln_net`) before
//! it is proposed, so an invalid one is a 400 naming the rule and the
//! reason, and the policy in force does not change. Only presets may be
//! named (`policy`): a policy file is a path on a node, which an API
//! caller has no business naming.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use kiln_api::rest::{ErrorBody, SandboxPolicy, SetPolicy};
use kiln_api::sandbox::{NetworkSpec, PolicyAction, PolicyRule, SandboxId};
use kiln_store::state::SandboxRecord;
use kiln_store::{Command, Rejection, Response, query};

use super::body::JsonBody;
use super::{ApiError, caller, rejection};
use crate::server::Shared;

/// The destinations a rule from the API may never open: the node's
/// always-protected ranges (loopback, link-local with the cloud metadata
/// address, multicast…), the default sandbox subnet (other tenants'
/// sandboxes), and the addresses of the cluster's nodes and servers. A
/// local `kiln run --allow` of the host's administrator may open them (a
/// rule whose CIDR lies inside one does, on the node); a tenant's may not.
pub fn api_protected(s: &Shared) -> Vec<ipnet::Ipv4Net> {
    let mut out: Vec<ipnet::Ipv4Net> = kiln_net::compile::ALWAYS_PROTECTED
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    out.extend("10.88.0.0/16".parse::<ipnet::Ipv4Net>().ok());
    let mut hosts: Vec<String> = s
        .raft
        .read_local(|st| st.nodes.values().map(|n| n.address.clone()).collect());
    for p in s.cfg.peers.values() {
        hosts.push(p.raft_addr.clone());
        hosts.push(p.api_addr.clone());
    }
    hosts.push(s.cfg.listen.to_string());
    hosts.push(s.cfg.raft_listen.to_string());
    for h in hosts {
        let h = h
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let host = h.rsplit_once(':').map_or(h, |(a, _)| a);
        if let Ok(ip) = host.parse::<std::net::Ipv4Addr>()
            && !ip.is_unspecified()
        {
            out.push(ipnet::Ipv4Net::from(ip));
        }
    }
    out
}

/// Checks a policy exactly as the node will compile it; the error names
/// the field, the rule's index and the reason. An allow rule whose CIDR
/// lies inside one of `protected` (see [`api_protected`]) is refused.
pub fn check_policy(
    policy: Option<&str>,
    default: Option<PolicyAction>,
    rules: &[PolicyRule],
    protected: &[ipnet::Ipv4Net],
) -> Result<(), String> {
    let base = match policy {
        None => kiln_net::Preset::InternetOnly.policy(),
        Some(p) => p
            .parse::<kiln_net::Preset>()
            .map_err(|e| {
                format!("policy: {e} (a policy file on a node cannot be named through the API)")
            })?
            .policy(),
    };
    let action = |a: PolicyAction| match a {
        PolicyAction::Allow => kiln_net::Action::Allow,
        PolicyAction::Deny => kiln_net::Action::Deny,
    };
    let rules: Vec<(kiln_net::Action, String)> = rules
        .iter()
        .map(|r| (action(r.action), r.rule.clone()))
        .collect();
    let parsed =
        kiln_net::Policy::from_flags(Some(base), default.map(action), &rules).map_err(|e| {
            // The rule's index, then why (the source chain).
            let mut msg = format!("rules: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            msg
        })?;
    for (i, r) in parsed.egress.iter().chain(&parsed.ingress).enumerate() {
        if let (kiln_net::Action::Allow, kiln_net::policy::Target::Cidr(net)) =
            (r.action, &r.target)
            && let Some(p) = protected.iter().find(|p| p.contains(net))
        {
            return Err(format!(
                "rules: rule {i} ({net}) would open {p}, a protected destination (the node's \
                 and servers' addresses, link-local and metadata, loopback, multicast, other \
                 sandboxes); rules from the API may not open these"
            ));
        }
    }
    Ok(())
}

/// The policy part of a sandbox's network (`None`: it has no network).
fn policy_view(r: &SandboxRecord) -> Option<SandboxPolicy> {
    let NetworkSpec::Default {
        policy,
        policy_default,
        rules,
        ..
    } = &r.spec.network
    else {
        return None;
    };
    let revision = r.policy_generation.max(1);
    Some(SandboxPolicy {
        id: r.id.clone(),
        policy: SetPolicy {
            policy: policy.clone(),
            policy_default: *policy_default,
            rules: rules.clone(),
        },
        revision,
        observed_generation: r.observed_generation,
        applied: r.observed_generation >= revision,
        node: r.node.clone(),
    })
}

fn not_found(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("sandbox {shown:?} does not exist"),
    )
}

fn no_network(id: &SandboxId) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "no_network",
        format!("sandbox {id} has no network (network mode none): it has no policy"),
    )
}

/// A sandbox's network policy and whether its node enforces it yet.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/policy", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxPolicy), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The sandbox has no network", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn get_policy(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SandboxPolicy>, ApiError> {
    let who = caller(&s, &headers)?;
    let sid = SandboxId::try_from(id.clone()).map_err(|_| not_found(&id))?;
    let view = s
        .raft
        .read(|st| query::get_sandbox(st, who.tenant.as_ref(), &sid).map(policy_view))
        .await?
        .ok_or_else(|| not_found(&id))?;
    view.map(Json).ok_or_else(|| no_network(&sid))
}

/// Replace a networked sandbox's policy; its node rewrites the policy
/// maps in place (no restart). Answers once the change is committed:
/// `applied` turns true when the node reports it enforced.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/policy", tag = "sandboxes",
    params(("id" = String, Path)), request_body = SetPolicy,
    responses((status = 200, body = SandboxPolicy),
        (status = 400, description = "Malformed JSON, unknown field, or an invalid policy (code invalid_policy; the policy in force stays)", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "No network, ended, or being deleted", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn put_policy(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<JsonBody<SetPolicy>, ApiError>,
) -> Result<Json<SandboxPolicy>, ApiError> {
    let who = caller(&s, &headers)?;
    let sid = SandboxId::try_from(id.clone()).map_err(|_| not_found(&id))?;
    let JsonBody(p) = body?;
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_policy", m);
    if p.rules.len() > kiln_api::sandbox::MAX_POLICY_RULES {
        return Err(invalid(format!(
            "rules: {} rules, at most {}",
            p.rules.len(),
            kiln_api::sandbox::MAX_POLICY_RULES
        )));
    }
    check_policy(
        p.policy.as_deref(),
        p.policy_default,
        &p.rules,
        &api_protected(&s),
    )
    .map_err(invalid)?;
    let r = s
        .raft
        .write(Command::SetSandboxPolicy {
            tenant: who.tenant.clone(),
            id: sid.clone(),
            policy: p.policy,
            policy_default: p.policy_default,
            rules: p.rules,
        })
        .await?;
    match r {
        Response::Rejected(Rejection::NotFound { .. }) => return Err(not_found(&id)),
        Response::Rejected(Rejection::Invalid { message, .. }) => return Err(invalid(message)),
        Response::Rejected(rej) => return Err(rejection(rej)),
        _ => {}
    }
    s.raft
        .read_local(|st| query::get_sandbox(st, who.tenant.as_ref(), &sid).map(policy_view))
        .ok_or_else(|| not_found(&id))?
        .map(Json)
        .ok_or_else(|| no_network(&sid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: PolicyAction, r: &str) -> PolicyRule {
        PolicyRule {
            action,
            rule: r.to_owned(),
        }
    }

    #[test]
    fn api_rules_cannot_open_protected_destinations() {
        let protected: Vec<ipnet::Ipv4Net> = ["169.254.0.0/16", "10.0.0.7/32"]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        for bad in ["169.254.169.254:tcp:80", "10.0.0.7", "169.254.0.0/16"] {
            let e = check_policy(None, None, &[rule(PolicyAction::Allow, bad)], &protected)
                .expect_err(bad);
            assert!(e.contains("protected destination"), "{e}");
        }
        // Broad rules do not open what lies inside them (the node keeps
        // protected ranges closed to them); deny rules are always fine.
        for ok in ["0.0.0.0/0:tcp", "10.0.0.0/8"] {
            check_policy(None, None, &[rule(PolicyAction::Allow, ok)], &protected).expect(ok);
        }
        check_policy(
            None,
            None,
            &[rule(PolicyAction::Deny, "10.0.0.7")],
            &protected,
        )
        .expect("deny");
    }

    #[test]
    fn policies_are_checked_with_the_node_parser() {
        let ok = [
            rule(PolicyAction::Allow, "10.1.2.0/24:tcp:443"),
            rule(PolicyAction::Deny, "*.example.com:udp:53-60"),
        ];
        assert!(check_policy(None, None, &ok, &[]).is_ok());
        assert!(check_policy(Some("none"), Some(PolicyAction::Deny), &ok, &[]).is_ok());
        for (bad, needle) in [
            ("10.1.2.0/33", "prefix length"),
            ("10.0.0.1:tcp:0", "1-65535"),
            ("10.0.0.1:tcp:90-80", "larger than the last"),
            ("10.0.0.1:sctp", "sctp"),
            ("exa*mple.com", "'*'"),
        ] {
            let e =
                check_policy(None, None, &[rule(PolicyAction::Allow, bad)], &[]).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let e = check_policy(Some("/etc/passwd"), None, &[], &[]).expect_err("a file");
        assert!(e.contains("policy file"), "{e}");
    }
}
