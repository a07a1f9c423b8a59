//! REST bodies of templates, warm pools and images (`/v1/templates`,
//! `/v1/images`). Requests refuse unknown fields.

use serde::{Deserialize, Serialize};

use crate::cluster::{NodeName, TenantName};
use crate::sandbox::Resources;

/// `POST /v1/templates`: a template of `image` with `resources` on `nodes`
/// (default: every node ready now), and a warm pool of `pool` members on
/// each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateTemplate {
    /// Default: [`default_template_name`] of the image and resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: String,
    #[serde(default)]
    pub resources: Resources,
    /// Warm pool members per node (0: none).
    #[serde(default)]
    pub pool: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeName>>,
}

/// The most warm pool members one node keeps of one template.
pub const MAX_POOL_PER_NODE: u32 = 64;

/// `PUT /v1/templates/{name}/pool`: the pool size on every node holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResizePool {
    pub size: u32,
}

/// Where a template stands on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TemplatePhase {
    /// Wanted there, not reported yet.
    Creating,
    Ready,
    /// The node could not build it (`reason`); it tries again later.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateOnNode {
    pub node: NodeName,
    pub phase: TemplatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub size_bytes: u64,
    /// Warm pool members ready there, and the target.
    pub pool_ready: u32,
    pub pool_target: u32,
}

/// A template as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Template {
    pub name: String,
    /// `None`: a shared template (made with an admin token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantName>,
    pub image: String,
    pub resources: Resources,
    pub created_at_ms: u64,
    pub nodes: Vec<TemplateOnNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TemplateList {
    pub items: Vec<Template>,
    /// The templates nodes made on their own after cold starts (one per
    /// image and resources, used by later starts of the same; kept within
    /// each node's disk budget), as their heartbeats say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub automatic: Vec<NodeTemplate>,
}

/// An automatic template on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeTemplate {
    /// The node's name of it (`tpl-…`).
    pub name: String,
    /// Set by the server: the node holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    pub image: String,
    pub resources: Resources,
    pub size_bytes: u64,
    pub created_at_ms: u64,
}

/// The most automatic templates one node reports.
pub const MAX_NODE_TEMPLATES: usize = 256;

impl NodeTemplate {
    /// Refuses what a node must not report (it is not trusted).
    pub fn validate(&self) -> Result<(), String> {
        let bad = |s: &str, max: usize| {
            s.is_empty() || s.len() > max || s.chars().any(crate::text::is_unprintable)
        };
        if bad(&self.name, 128) {
            return Err("name: 1 to 128 bytes, no control characters".into());
        }
        if bad(&self.image, 4096) {
            return Err("image: 1 to 4096 bytes, no control characters".into());
        }
        self.resources
            .validate()
            .map_err(|e| format!("resources: {e}"))
    }
}

/// One cached image and the nodes holding it (as their heartbeats say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Image {
    pub reference: String,
    pub nodes: Vec<NodeName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageList {
    pub items: Vec<Image>,
}

/// `POST /v1/images/pull`: pull `reference` on `node` (default: every
/// ready node), synchronously.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PullImage {
    #[serde(rename = "ref")]
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
}

/// What one node did with an image request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageOnNode {
    pub node: NodeName,
    /// The image's digest (pull), or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Pulled now (false: it was cached) / removed.
    pub changed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageResult {
    pub reference: String,
    pub nodes: Vec<ImageOnNode>,
}

/// The body of the node's own image routes (`/node/v1/images/...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeImageRequest {
    #[serde(rename = "ref")]
    pub reference: String,
}

/// The node's answer on its own image routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeImageAnswer {
    #[serde(default)]
    pub digest: String,
    pub changed: bool,
}

/// What a node reports of one template of its desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantName>,
    pub name: String,
    /// Built and usable here.
    pub ready: bool,
    #[serde(default)]
    pub size_bytes: u64,
    /// Why it could not be built (when not ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Warm pool members ready here.
    #[serde(default)]
    pub pool_ready: u32,
    /// Their IDs (a create that takes one starts from that member).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<crate::sandbox::SandboxId>,
}

/// Most templates one report may carry.
pub const MAX_TEMPLATE_REPORTS: usize = 1024;

/// The name a template gets when the request names none: the image with
/// every character outside `[A-Za-z0-9._-]` as `-`, and the resources
/// (`busybox-1c-256m-1024d`).
pub fn default_template_name(image: &str, r: &Resources) -> String {
    let mut base: String = image
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    base = base.trim_start_matches(['.', '-']).to_owned();
    base.truncate(80);
    if base.is_empty() {
        base = "template".into();
    }
    format!("{base}-{}c-{}m-{}d", r.cpus, r.memory_mib, r.disk_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_valid() {
        let r = Resources::default();
        for image in ["busybox", "docker.io/library/alpine:3.20", "..x", "ü", ""] {
            let n = default_template_name(image, &r);
            assert!(crate::sandbox::valid_name(&n), "{image:?} -> {n:?}");
        }
        assert_eq!(
            default_template_name("busybox", &r),
            "busybox-1c-256m-1024d"
        );
    }
}
