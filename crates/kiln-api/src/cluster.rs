//! Public types of the control plane: worker nodes, tenants, API tokens and
//! the desired state of a sandbox. They appear in REST bodies, in the Raft
//! state machine (`kiln-store`) and in the node protocol, so they carry no
//! host-local detail.
//!
//! Invariants:
//! - Every name ([`NodeName`], [`TenantName`]) is checked when parsed
//!   (`try_from` on deserialize): a value of these types is always valid.
//! - Tokens are never represented here in the clear beyond the moment they
//!   are minted: the replicated state holds their SHA-256 only.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::sandbox::{SandboxId, SandboxSpec};

/// Most cached image references a node reports (registration and
/// heartbeats); a node with more reports the first ones, sorted.
pub const MAX_NODE_IMAGES: usize = 4096;
/// Longest image reference a node reports (longer ones are left out).
pub const MAX_IMAGE_REF: usize = 1024;

/// `images` cut to what the control plane accepts: references of 1 to
/// [`MAX_IMAGE_REF`] printable characters, sorted, deduplicated, at most
/// [`MAX_NODE_IMAGES`]. Returns how many were left out.
pub fn bound_node_images(images: &mut Vec<String>) -> usize {
    let before = images.len();
    images
        .retain(|i| !i.is_empty() && i.len() <= MAX_IMAGE_REF && !i.chars().any(char::is_control));
    images.sort();
    images.dedup();
    images.truncate(MAX_NODE_IMAGES);
    before - images.len()
}

/// A worker node's name (`kiln node --name`, default the host name):
/// 1-63 characters of `[a-z0-9-]`, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeName(String);

/// A tenant's name: same rules as [`NodeName`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenantName(String);

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A name that is not a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} must be 1-63 characters of a-z 0-9 -, not starting or ending with -")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! label_name {
    ($t:ident, $kind:literal) => {
        impl $t {
            pub fn new(s: impl Into<String>) -> Result<$t, NameError> {
                let s = s.into();
                if dns_label(&s) {
                    Ok($t(s))
                } else {
                    Err(NameError {
                        kind: $kind,
                        value: s.chars().take(64).filter(|c| !c.is_control()).collect(),
                    })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<$t, NameError> {
                $t::new(s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
label_name!(NodeName, "node name");
label_name!(TenantName, "tenant name");

/// Which VMM a node runs its sandboxes with (reported, never guessed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DriverKind {
    Firecracker,
    QemuKvm,
    QemuTcg,
}

/// What a node offers to sandboxes, or what is allocated of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// A node's health as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum NodeStatus {
    /// Heartbeating; takes new sandboxes unless cordoned.
    Ready,
    /// Missed heartbeats past the grace period; its sandboxes are lost.
    Unreachable,
    /// Cordoned and being emptied (migration or stop of its sandboxes).
    Draining,
}

/// Limits on what one tenant may hold at once. Counted over sandboxes that
/// are neither deleted nor finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quotas {
    pub sandboxes: u32,
    pub cpus: u32,
    pub memory_mib: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            sandboxes: 100,
            cpus: 64,
            memory_mib: 64 * 1024,
        }
    }
}

/// What a bearer token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Nodes, cluster membership, tenants and tokens; every tenant's objects.
    Admin,
    /// Only its own tenant's sandboxes, snapshots and templates.
    Tenant,
    /// A worker node's credential (minted at registration): the node
    /// protocol only, and only for the node it is bound to.
    Node,
}

/// What a client wants a sandbox to be; the node converges to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DesiredState {
    Running,
    Paused,
    Stopped,
    /// Remove everything; the record goes once the node confirms.
    Deleted,
}

/// What a node must converge to: the payload of the node watch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDesired {
    pub node: NodeName,
    pub cordoned: bool,
    pub status: NodeStatus,
    /// The highest `mod_index` among its sandboxes: a watch that saw this
    /// revision has seen every change to them.
    pub revision: u64,
    pub sandboxes: Vec<Assignment>,
    /// `(scoped template name, target)` of the pools on this node.
    pub pools: Vec<(String, u32)>,
    /// The IPv4 addresses of the cluster's other nodes: the node protects
    /// them like its own (no tenant rule broader than the address opens
    /// them), so a sandbox cannot reach another host's node endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_addresses: Vec<std::net::Ipv4Addr>,
    /// The templates this node must hold (created through the API), with
    /// their pool targets here. A template that leaves this list is drained
    /// and removed by the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateAssignment>,
}

/// One template a node must build and keep (and its warm pool's size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateAssignment {
    /// The scoped name (`tenant/name`, or `name` for a shared one).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantName>,
    pub name: String,
    pub image: String,
    pub resources: crate::sandbox::Resources,
    /// Warm pool members wanted on this node (0: none).
    #[serde(default)]
    pub pool: u32,
}

/// One sandbox a node must run (or stop, or remove).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: SandboxId,
    pub tenant: TenantName,
    pub spec: SandboxSpec,
    pub desired: DesiredState,
    pub generation: u64,
    pub observed_generation: u64,
    /// Seconds from SIGTERM to SIGKILL when it is stopped (`kiln stop
    /// -t`); `None`: the node's default. Sent only when set, so nodes
    /// that predate it keep decoding assignments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_when_parsed() {
        assert!(NodeName::new("host-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
            let j = serde_json::to_string(bad).expect("json");
            assert!(serde_json::from_str::<TenantName>(&j).is_err(), "{bad:?}");
        }
        let t: TenantName = serde_json::from_str("\"acme\"").expect("valid");
        assert_eq!(t.as_str(), "acme");
    }
}
