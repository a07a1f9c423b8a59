//! Templates and warm pools of the node's desired state (made through
//! `POST /v1/templates`): the daemon builds each with
//! [`Node::create_template`], sizes its pool with [`Node::size_pool`],
//! removes what left the desired state, and reports back (ready and size,
//! or the failure and why; the pool's ready members).
//!
//! Invariants:
//! - The node names its templates by content (image, resources, guest,
//!   driver), the server by `tenant/name`: several server templates (two
//!   tenants', say) may share one node template. The mapping is kept in
//!   `<state>/node/templates.json` (written atomically), so a restarted
//!   daemon knows which node templates it made for the server; it never
//!   touches templates it did not make (a `kiln template create` on the
//!   same state directory).
//! - A node template's pool is sized to the sum of the targets of the
//!   server templates sharing it; it is removed only when none is left.
//! - Decisions are the pure [`decide`]; a failed build is retried after
//!   [`RETRY_FAILED`], not in a loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_api::cluster::TemplateAssignment;
use kiln_api::sandbox::{Resources, SandboxId};
use kiln_api::templates::TemplateReport;
use serde::{Deserialize, Serialize};

use crate::node::{Node, PullPolicy, TemplateRequest};

/// How long after a failed build the daemon tries again.
pub const RETRY_FAILED: Duration = Duration::from_secs(30);
/// The most bytes of an error reported.
const MAX_ERROR: usize = 4000;

/// A node template the daemon made for one server template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Made {
    /// The node's name of it.
    pub local: String,
    pub image: String,
    pub resources: Resources,
}

/// What the daemon knows of the node's templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalTemplates {
    /// Server key → node template made for it.
    pub made: BTreeMap<String, Made>,
    /// Node template → `(ready members, size)` of its pool.
    pub pools: BTreeMap<String, (u32, u32)>,
    /// Node template → IDs of its pool's ready members.
    pub members: BTreeMap<String, Vec<SandboxId>>,
    /// Node templates that exist (and are usable) on the node.
    pub present: BTreeSet<String>,
    /// Server keys whose last build failed too recently to try again.
    pub failed_recently: BTreeSet<String>,
}

/// One step towards the desired templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TplAction {
    /// Build (or find) the node template of a server template.
    Create {
        key: String,
        image: String,
        resources: Resources,
    },
    /// Size node template `local`'s pool to `size` (0 drains it).
    SizePool { local: String, size: u32 },
    /// The server template `key` left the desired state: forget it, and
    /// remove node template `local` when `remove` (no other key uses it).
    Drop {
        key: String,
        local: String,
        remove: bool,
    },
}

impl TplAction {
    /// What two actions must not do at once (the server key, or the node
    /// template).
    pub fn lock_key(&self) -> String {
        match self {
            TplAction::Create { key, .. } => format!("key:{key}"),
            TplAction::SizePool { local, .. } | TplAction::Drop { local, .. } => {
                format!("local:{local}")
            }
        }
    }
}

/// The actions that move `local` towards `desired` (pure).
pub fn decide(desired: &[TemplateAssignment], local: &LocalTemplates) -> Vec<TplAction> {
    let mut out = vec![];
    let wanted: BTreeMap<&str, &TemplateAssignment> =
        desired.iter().map(|a| (a.key.as_str(), a)).collect();
    // Build what is wanted and not (or no longer) there.
    for a in desired {
        let made = local.made.get(&a.key);
        let fits = made.is_some_and(|m| {
            m.image == a.image && m.resources == a.resources && local.present.contains(&m.local)
        });
        if !fits && !local.failed_recently.contains(&a.key) {
            out.push(TplAction::Create {
                key: a.key.clone(),
                image: a.image.clone(),
                resources: a.resources,
            });
        }
    }
    // Pool sizes: per node template, the sum of its keys' targets.
    let mut sizes: BTreeMap<&str, u32> = BTreeMap::new();
    for (key, m) in &local.made {
        let Some(a) = wanted.get(key.as_str()) else {
            continue;
        };
        if m.image != a.image || m.resources != a.resources || !local.present.contains(&m.local) {
            continue;
        }
        let s = sizes.entry(m.local.as_str()).or_default();
        *s = s.saturating_add(a.pool).min(crate::pool::MAX_SIZE);
    }
    for (l, size) in &sizes {
        let current = local.pools.get(*l).map_or(0, |p| p.1);
        if current != *size {
            out.push(TplAction::SizePool {
                local: (*l).to_owned(),
                size: *size,
            });
        }
    }
    // What left the desired state.
    for (key, m) in &local.made {
        if wanted.contains_key(key.as_str()) {
            continue;
        }
        let shared = local
            .made
            .iter()
            .any(|(k, o)| k != key && o.local == m.local && wanted.contains_key(k.as_str()));
        out.push(TplAction::Drop {
            key: key.clone(),
            local: m.local.clone(),
            remove: !shared,
        });
    }
    out
}

/// What the server hears of each desired template.
pub fn reports(
    desired: &[TemplateAssignment],
    local: &LocalTemplates,
    errors: &BTreeMap<String, String>,
    size_of: impl Fn(&str) -> u64,
) -> Vec<TemplateReport> {
    desired
        .iter()
        .map(|a| {
            let made = local
                .made
                .get(&a.key)
                .filter(|m| m.image == a.image && m.resources == a.resources)
                .filter(|m| local.present.contains(&m.local));
            let pool_ready = made
                .and_then(|m| local.pools.get(&m.local))
                .map_or(0, |p| p.0.min(a.pool));
            let members = made
                .and_then(|m| local.members.get(&m.local))
                .map(|v| v.iter().take(pool_ready as usize).cloned().collect())
                .unwrap_or_default();
            TemplateReport {
                members,
                tenant: a.tenant.clone(),
                name: a.name.clone(),
                ready: made.is_some(),
                size_bytes: made.map_or(0, |m| size_of(&m.local)),
                error: if made.is_some() {
                    None
                } else {
                    errors.get(&a.key).cloned()
                },
                pool_ready,
            }
        })
        .collect()
}

/// The key under which a node template replaced by a newer build waits to
/// be removed (`decide` drops it once nothing uses it). Never a server
/// key: `:` is not in template names.
pub fn retired_key(local: &str) -> String {
    format!("retired:{local}")
}

/// Whether `key` is a [`retired_key`].
pub fn is_retired(key: &str) -> bool {
    key.starts_with("retired:")
}

fn state_path(node: &Node) -> PathBuf {
    node.dirs().state.join("node").join("templates.json")
}

/// The server keys → node templates the daemon made (empty when none).
pub fn load_made(node: &Node) -> BTreeMap<String, Made> {
    match std::fs::read(state_path(node)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "unreadable templates.json; starting afresh");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

pub fn save_made(node: &Node, made: &BTreeMap<String, Made>) -> std::io::Result<()> {
    let path = state_path(node);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(made).expect("the map serializes");
    super::backend::write_synced(&tmp, &body)?;
    std::fs::rename(&tmp, &path)
}

/// Observes the node's side of [`LocalTemplates`] (everything but the
/// failures, which the caller tracks).
pub fn observe(node: &Node, made: &BTreeMap<String, Made>) -> LocalTemplates {
    let templates = node.templates();
    let mut local = LocalTemplates {
        made: made.clone(),
        ..Default::default()
    };
    for m in made.values() {
        // A template made for another guest or driver (the node was
        // upgraded) is not there for the server: it is made again.
        if templates.exists(&m.local) {
            match node.template_stale(&m.local) {
                None => {
                    local.present.insert(m.local.clone());
                }
                Some(why) => {
                    tracing::info!(template = %m.local, %why, "stale: it will be made again");
                }
            }
        }
        if let Some((ready, size)) = node.pool_status(&m.local) {
            local
                .pools
                .insert(m.local.clone(), (ready.min(u32::MAX as usize) as u32, size));
            let ids = crate::pool::Pool::of(node.dirs(), &m.local)
                .ready()
                .into_iter()
                .filter(|id| node.store().load(id).is_ok_and(|r| r.shim_alive()))
                .filter_map(|id| SandboxId::try_from(id).ok())
                .collect();
            local.members.insert(m.local.clone(), ids);
        }
    }
    local
}

pub fn size_of(node: &Node, local: &str) -> u64 {
    crate::snapshot::disk_usage(&node.templates().dir(local))
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The node template built for `image`/`resources`, or why not.
pub async fn create(
    node: &Node,
    image: &str,
    resources: Resources,
    insecure: &[String],
) -> Result<String, String> {
    let req = TemplateRequest {
        image: image.to_owned(),
        resources,
        driver: "auto".into(),
        insecure_registries: insecure.to_vec(),
        pull: PullPolicy::Missing,
        pool: None,
        automatic: false,
        when_idle: false,
        network: false,
    };
    let t0 = Instant::now();
    match node.create_template(&req, &kiln_image::NoProgress).await {
        Ok(c) => {
            tracing::info!(template = %c.created.manifest.name, %image, ms = t0.elapsed().as_millis() as u64, "template ready for the server");
            Ok(c.created.manifest.name)
        }
        Err(e) => Err(clip(crate::error_chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(mem: u32) -> Resources {
        Resources {
            cpus: 1,
            memory_mib: mem,
            disk_mib: 64,
        }
    }

    fn asg(key: &str, image: &str, pool: u32) -> TemplateAssignment {
        TemplateAssignment {
            key: key.into(),
            tenant: None,
            name: key.rsplit('/').next().unwrap_or(key).into(),
            image: image.into(),
            resources: res(128),
            pool,
        }
    }

    fn made(local: &str, image: &str) -> Made {
        Made {
            local: local.into(),
            image: image.into(),
            resources: res(128),
        }
    }

    #[test]
    fn a_new_template_is_built_then_its_pool_sized() {
        let d = [asg("a/py", "busybox", 2)];
        let mut l = LocalTemplates::default();
        assert_eq!(
            decide(&d, &l),
            vec![TplAction::Create {
                key: "a/py".into(),
                image: "busybox".into(),
                resources: res(128)
            }]
        );
        l.made.insert("a/py".into(), made("tpl-1", "busybox"));
        l.present.insert("tpl-1".into());
        assert_eq!(
            decide(&d, &l),
            vec![TplAction::SizePool {
                local: "tpl-1".into(),
                size: 2
            }]
        );
        l.pools.insert("tpl-1".into(), (2, 2));
        assert!(decide(&d, &l).is_empty(), "converged");
        // Resized to 0: drained.
        let d0 = [asg("a/py", "busybox", 0)];
        assert_eq!(
            decide(&d0, &l),
            vec![TplAction::SizePool {
                local: "tpl-1".into(),
                size: 0
            }]
        );
    }

    #[test]
    fn a_shared_node_template_gets_the_sum_and_outlives_one_key() {
        let d = [asg("a/py", "busybox", 1), asg("b/py", "busybox", 2)];
        let mut l = LocalTemplates::default();
        for k in ["a/py", "b/py"] {
            l.made.insert(k.into(), made("tpl-1", "busybox"));
        }
        l.present.insert("tpl-1".into());
        l.pools.insert("tpl-1".into(), (0, 1));
        assert_eq!(
            decide(&d, &l),
            vec![TplAction::SizePool {
                local: "tpl-1".into(),
                size: 3
            }]
        );
        // a/py deleted: forgotten, not removed (b/py uses it), pool shrinks.
        l.pools.insert("tpl-1".into(), (3, 3));
        let d = [asg("b/py", "busybox", 2)];
        assert_eq!(
            decide(&d, &l),
            vec![
                TplAction::SizePool {
                    local: "tpl-1".into(),
                    size: 2
                },
                TplAction::Drop {
                    key: "a/py".into(),
                    local: "tpl-1".into(),
                    remove: false
                }
            ]
        );
        // Both gone: removed.
        l.made.remove("a/py");
        assert_eq!(
            decide(&[], &l),
            vec![TplAction::Drop {
                key: "b/py".into(),
                local: "tpl-1".into(),
                remove: true
            }]
        );
    }

    #[test]
    fn failures_wait_and_vanished_templates_are_rebuilt() {
        let d = [asg("a/py", "nope", 1)];
        let mut l = LocalTemplates::default();
        l.failed_recently.insert("a/py".into());
        assert!(decide(&d, &l).is_empty(), "no retry loop");
        let errors = BTreeMap::from([("a/py".to_string(), "image not found".to_string())]);
        let r = reports(&d, &l, &errors, |_| 0);
        assert!(!r[0].ready);
        assert_eq!(r[0].error.as_deref(), Some("image not found"));
        // Made once, removed behind the daemon's back: built again.
        let d = [asg("a/py", "busybox", 0)];
        let mut l = LocalTemplates::default();
        l.made.insert("a/py".into(), made("tpl-1", "busybox"));
        assert!(matches!(decide(&d, &l)[..], [TplAction::Create { .. }]));
        let r = reports(&d, &l, &BTreeMap::new(), |_| 0);
        assert!(!r[0].ready && r[0].error.is_none(), "creating");
    }

    #[test]
    fn a_replaced_build_is_removed_once_no_key_uses_it() {
        // a/py and b/py shared tpl-old; a/py was made again as tpl-new
        // (the guest changed): tpl-old is kept while b/py still uses it.
        let d = [asg("a/py", "busybox", 0), asg("b/py", "busybox", 0)];
        let mut l = LocalTemplates::default();
        l.made.insert("a/py".into(), made("tpl-new", "busybox"));
        l.made.insert("b/py".into(), made("tpl-old", "busybox"));
        l.made
            .insert(retired_key("tpl-old"), made("tpl-old", "busybox"));
        l.present.insert("tpl-new".into());
        let acts = decide(&d, &l);
        assert!(
            acts.contains(&TplAction::Drop {
                key: retired_key("tpl-old"),
                local: "tpl-old".into(),
                remove: false
            }),
            "{acts:?}"
        );
        // b/py was made again too: now nothing uses it, it goes.
        l.made.insert("b/py".into(), made("tpl-new", "busybox"));
        assert_eq!(
            decide(&d, &l),
            vec![TplAction::Drop {
                key: retired_key("tpl-old"),
                local: "tpl-old".into(),
                remove: true
            }]
        );
        assert!(is_retired(&retired_key("x")) && !is_retired("a/py") && !is_retired("py"));
    }

    #[test]
    fn reports_cap_pool_members_at_the_target() {
        let d = [asg("a/py", "busybox", 1)];
        let mut l = LocalTemplates::default();
        l.made.insert("a/py".into(), made("tpl-1", "busybox"));
        l.present.insert("tpl-1".into());
        l.pools.insert("tpl-1".into(), (3, 3));
        let r = reports(&d, &l, &BTreeMap::new(), |_| 42);
        assert_eq!(
            (r[0].ready, r[0].size_bytes, r[0].pool_ready),
            (true, 42, 1)
        );
    }
}
