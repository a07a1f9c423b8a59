//! Read-only views of the state: what the API lists, what a node's watch
//! streams, what the scheduler sees. Pure functions of [`State`]; the
//! caller decides how fresh the state must be (`RaftNode::read` is
//! linearizable, `RaftNode::read_local` is not).

use std::collections::BTreeMap;

use kiln_api::cluster::{Capacity, DesiredState, DriverKind, NodeName, NodeStatus, TenantName};
use kiln_api::sandbox::{Resources, SandboxId, SandboxSpec, SandboxState};
use serde::{Deserialize, Serialize};

use crate::state::{NodeRecord, SandboxRecord, State, TokenRecord, Usage};

/// The most sandboxes one page may hold.
pub const MAX_PAGE: usize = 1000;

/// The observed-state filter of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateFilter {
    Creating,
    Pooled,
    Running,
    Paused,
    Exited,
    Failed,
}

impl StateFilter {
    pub fn matches(self, s: &SandboxState) -> bool {
        matches!(
            (self, s),
            (StateFilter::Creating, SandboxState::Creating)
                | (StateFilter::Pooled, SandboxState::Pooled)
                | (StateFilter::Running, SandboxState::Running { .. })
                | (StateFilter::Paused, SandboxState::Paused { .. })
                | (StateFilter::Exited, SandboxState::Exited { .. })
                | (StateFilter::Failed, SandboxState::Failed { .. })
        )
    }
}

/// A listing request. `tenant: None` lists every tenant's (admin).
#[derive(Debug, Clone, Default)]
pub struct ListSandboxes {
    pub tenant: Option<TenantName>,
    /// Every label given must be present with this value.
    pub labels: BTreeMap<String, String>,
    pub state: Option<StateFilter>,
    pub desired: Option<DesiredState>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    /// 1..=[`MAX_PAGE`]; 0 means the maximum.
    pub limit: usize,
}

/// One page of results; `next` is the cursor of the following page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListSandboxesError {
    #[error("cursor {0:?} is not one this server handed out")]
    BadCursor(String),
}

/// Sandboxes in ID order, filtered, one page at a time.
pub fn list_sandboxes(
    st: &State,
    q: &ListSandboxes,
) -> Result<Page<SandboxRecord>, ListSandboxesError> {
    let after = match &q.cursor {
        None => None,
        Some(c) => Some(
            SandboxId::try_from(c.clone()).map_err(|_| ListSandboxesError::BadCursor(c.clone()))?,
        ),
    };
    let limit = if q.limit == 0 {
        MAX_PAGE
    } else {
        q.limit.min(MAX_PAGE)
    };
    let keep = |r: &SandboxRecord| {
        q.state.is_none_or(|f| f.matches(&r.observed))
            && q.desired.is_none_or(|d| d == r.desired)
            && q.labels
                .iter()
                .all(|(k, v)| r.spec.labels.get(k) == Some(v))
    };
    let mut items = Vec::new();
    let mut next = None;
    let mut push = |r: &SandboxRecord| -> bool {
        if !keep(r) {
            return true;
        }
        if items.len() == limit {
            next = items.last().map(|l: &SandboxRecord| l.id.to_string());
            return false;
        }
        items.push(r.clone());
        true
    };
    use std::ops::Bound::{Excluded, Unbounded};
    let lower = after.map_or(Unbounded, Excluded);
    match &q.tenant {
        Some(t) => {
            if let Some(ids) = st.idx.by_tenant.get(t) {
                for id in ids.range((lower, Unbounded)) {
                    if let Some(r) = st.sandboxes.get(id)
                        && !push(r)
                    {
                        break;
                    }
                }
            }
        }
        None => {
            for r in st.sandboxes.range((lower, Unbounded)).map(|(_, r)| r) {
                if !push(r) {
                    break;
                }
            }
        }
    }
    Ok(Page { items, next })
}

/// One sandbox, if `tenant` may see it (`None` = admin).
pub fn get_sandbox<'a>(
    st: &'a State,
    tenant: Option<&TenantName>,
    id: &SandboxId,
) -> Option<&'a SandboxRecord> {
    st.sandboxes
        .get(id)
        .filter(|r| tenant.is_none_or(|t| *t == r.tenant))
}

pub use kiln_api::cluster::{Assignment, NodeDesired, TemplateAssignment};

/// The desired state of one node, or `None` if it is not registered.
pub fn node_desired(st: &State, node: &NodeName) -> Option<NodeDesired> {
    let rec = st.nodes.get(node)?;
    let mut revision = 0;
    let sandboxes = st
        .idx
        .by_node
        .get(node)
        .into_iter()
        .flatten()
        .filter_map(|id| st.sandboxes.get(id))
        .map(|r| {
            revision = revision.max(r.mod_index);
            Assignment {
                id: r.id.clone(),
                tenant: r.tenant.clone(),
                spec: r.spec.clone(),
                desired: r.desired,
                generation: r.generation,
                observed_generation: r.observed_generation,
                stop_grace_secs: r.stop_grace_secs,
            }
        })
        .collect();
    let pools = st
        .pools
        .iter()
        .filter_map(|(k, p)| p.nodes.get(node).map(|s| (k.clone(), s.target)))
        .collect();
    let templates = st
        .templates
        .iter()
        .filter(|(_, t)| t.placed.contains(node))
        .map(|(k, t)| TemplateAssignment {
            key: k.clone(),
            tenant: t.tenant.clone(),
            name: t.name.clone(),
            image: t.image.clone(),
            resources: t.resources,
            pool: st
                .pools
                .get(k)
                .and_then(|p| p.nodes.get(node))
                .map_or(0, |s| s.target),
        })
        .collect();
    let mut cluster_addresses: Vec<std::net::Ipv4Addr> = st
        .nodes
        .iter()
        .filter(|(name, _)| *name != node)
        .filter_map(|(_, n)| address_ipv4(&n.address))
        .collect();
    cluster_addresses.sort();
    cluster_addresses.dedup();
    Some(NodeDesired {
        node: node.clone(),
        cordoned: rec.cordoned,
        status: rec.status,
        revision,
        sandboxes,
        pools,
        templates,
        cluster_addresses,
    })
}

/// The IPv4 address of a node's `host:port` or URL (names and IPv6: none;
/// unspecified and loopback are not another host).
fn address_ipv4(address: &str) -> Option<std::net::Ipv4Addr> {
    let a = address
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let a = a.split('/').next().unwrap_or_default();
    let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
    host.parse::<std::net::Ipv4Addr>()
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
}

/// What the scheduler needs of one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub name: NodeName,
    pub driver: DriverKind,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub allocated: Capacity,
    /// Ready and not cordoned.
    pub schedulable: bool,
    pub status: NodeStatus,
    pub images: Vec<String>,
    /// `(image, resources)` of templates ready on this node.
    pub templates: Vec<(String, Resources)>,
    /// `(image, resources, ready members)` of its warm pools.
    pub pools: Vec<(String, Resources, u32)>,
}

/// The cluster as the scheduler sees it, plus the sandboxes waiting for
/// a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    /// `(id, generation, spec)` of live sandboxes with no node.
    pub pending: Vec<(SandboxId, u64, SandboxSpec)>,
}

pub fn cluster_view(st: &State) -> ClusterView {
    let nodes = st
        .nodes
        .values()
        .map(|n: &NodeRecord| NodeView {
            name: n.name.clone(),
            driver: n.driver,
            labels: n.labels.clone(),
            capacity: n.capacity,
            allocated: st.idx.allocated.get(&n.name).copied().unwrap_or_default(),
            schedulable: n.status == NodeStatus::Ready && !n.cordoned,
            status: n.status,
            images: n.images.iter().cloned().collect(),
            templates: st
                .templates
                .values()
                .filter(|t| t.nodes.get(&n.name).is_some_and(|a| a.ready))
                .map(|t| (t.image.clone(), t.resources))
                .collect(),
            pools: st
                .pools
                .iter()
                .filter_map(|(k, p)| {
                    let slot = p.nodes.get(&n.name)?;
                    let t = st.templates.get(k)?;
                    Some((t.image.clone(), t.resources, slot.ready))
                })
                .collect(),
        })
        .collect();
    let pending = st
        .sandboxes
        .values()
        .filter(|r| r.node.is_none() && r.counts())
        .map(|r| (r.id.clone(), r.generation, r.spec.clone()))
        .collect();
    ClusterView { nodes, pending }
}

/// The live (not revoked) token whose secret hashes to `sha256_hex`.
pub fn token_by_hash<'a>(st: &'a State, sha256_hex: &str) -> Option<&'a TokenRecord> {
    let id = st.idx.token_by_hash.get(sha256_hex)?;
    st.tokens.get(id).filter(|t| t.revoked_at_ms.is_none())
}

/// Lower-case hex SHA-256 of a token secret, as stored.
pub fn hash_token(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// What a tenant holds now.
pub fn tenant_usage(st: &State, tenant: &TenantName) -> Usage {
    st.idx.usage.get(tenant).copied().unwrap_or_default()
}

/// Snapshots a tenant may see (its own), by name.
pub fn list_snapshots<'a>(
    st: &'a State,
    tenant: &TenantName,
) -> impl Iterator<Item = &'a crate::state::SnapshotRecord> {
    let prefix = format!("{tenant}/");
    st.snapshots
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
}

/// Templates a tenant may use: its own and the shared ones (`None`: an
/// admin sees all).
pub fn list_templates<'a>(
    st: &'a State,
    tenant: Option<&'a TenantName>,
) -> impl Iterator<Item = &'a crate::state::TemplateRecord> {
    st.templates
        .values()
        .filter(move |t| tenant.is_none() || t.tenant.is_none() || t.tenant.as_ref() == tenant)
}

/// One template a tenant may see (its own, or a shared one; `None`: an
/// admin sees any), by name. Another tenant's is `None`, like a missing one.
pub fn get_template<'a>(
    st: &'a State,
    tenant: Option<&TenantName>,
    name: &str,
) -> Option<&'a crate::state::TemplateRecord> {
    match tenant {
        Some(t) => st
            .templates
            .get(&crate::state::scoped(Some(t), name))
            .or_else(|| st.templates.get(name)),
        None => st.templates.get(name),
    }
}

/// The tenant's sandboxes restored from its snapshot `name` that still
/// count (not deleted, not finished): while there are any, the snapshot
/// may not be deleted (their VMs map its memory).
pub fn snapshot_users(st: &State, tenant: &TenantName, name: &str) -> Vec<SandboxId> {
    let Some(ids) = st.idx.by_tenant.get(tenant) else {
        return vec![];
    };
    ids.iter()
        .filter_map(|id| st.sandboxes.get(id))
        .filter(|r| {
            r.counts()
                && matches!(&r.spec.origin, kiln_api::sandbox::Origin::Snapshot { snapshot } if snapshot == name)
        })
        .map(|r| r.id.clone())
        .collect()
}
