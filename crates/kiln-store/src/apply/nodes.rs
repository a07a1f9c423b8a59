//! Worker nodes: registration, heartbeats, cordons, drains, expiry.

use super::checks::*;
use super::*;

pub(super) fn apply(st: &mut State, cmd: &Command, meta: ApplyMeta) -> Applied {
    let _ = meta;
    match cmd {
        Command::RegisterNode {
            name,
            address,
            capacity,
            driver,
            labels,
            images,
            now_ms,
        } => {
            check_text("address", address, 256)?;
            if capacity.cpus == 0 || capacity.memory_mib == 0 {
                return Err(Rejection::invalid(
                    "capacity",
                    "a node must offer at least one CPU and some memory",
                ));
            }
            check_labels(labels)?;
            if images.len() > kiln_api::cluster::MAX_NODE_IMAGES {
                return Err(Rejection::invalid("images", "at most 4096 cached images"));
            }
            for i in images {
                check_text("images", i, 4096)?;
            }
            let rec = st.nodes.entry(name.clone()).or_insert_with(|| NodeRecord {
                name: name.clone(),
                address: String::new(),
                capacity: *capacity,
                driver: *driver,
                labels: Default::default(),
                images: Default::default(),
                cordoned: false,
                status: NodeStatus::Ready,
                registered_at_ms: *now_ms,
                last_heartbeat_ms: *now_ms,
                stream_key: None,
                stream_cert_sha256: None,
                templates: Vec::new(),
            });
            rec.address = address.clone();
            rec.templates.clear();
            rec.capacity = *capacity;
            rec.driver = *driver;
            rec.labels = labels.clone();
            rec.images = images.clone();
            rec.last_heartbeat_ms = rec.last_heartbeat_ms.max(*now_ms);
            if rec.status == NodeStatus::Unreachable {
                rec.status = if rec.cordoned {
                    NodeStatus::Draining
                } else {
                    NodeStatus::Ready
                };
            }
            place_everywhere(st, name);
            Ok(Response::Done)
        }
        Command::Heartbeat {
            name,
            now_ms,
            images,
            templates,
        } => {
            if let Some(images) = images {
                if images.len() > kiln_api::cluster::MAX_NODE_IMAGES {
                    return Err(Rejection::invalid("images", "at most 4096 cached images"));
                }
                for i in images {
                    check_text("images", i, 4096)?;
                }
            }
            if let Some(templates) = templates {
                if templates.len() > kiln_api::templates::MAX_NODE_TEMPLATES {
                    return Err(Rejection::invalid(
                        "templates",
                        format!(
                            "at most {} automatic templates",
                            kiln_api::templates::MAX_NODE_TEMPLATES
                        ),
                    ));
                }
                for t in templates {
                    t.validate()
                        .map_err(|e| Rejection::invalid("templates", e))?;
                    if t.node.is_some() {
                        return Err(Rejection::invalid("templates", "node is set by the server"));
                    }
                }
            }
            let rec = node_mut(st, name)?;
            rec.last_heartbeat_ms = rec.last_heartbeat_ms.max(*now_ms);
            if rec.status == NodeStatus::Unreachable {
                rec.status = if rec.cordoned {
                    NodeStatus::Draining
                } else {
                    NodeStatus::Ready
                };
            }
            if let Some(images) = images {
                rec.images = images.clone();
            }
            if let Some(templates) = templates {
                rec.templates = templates.clone();
            }
            Ok(Response::Done)
        }
        Command::CordonNode { name, cordoned } => {
            let rec = node_mut(st, name)?;
            rec.cordoned = *cordoned;
            if !cordoned && rec.status == NodeStatus::Draining {
                rec.status = NodeStatus::Ready;
            }
            Ok(Response::Done)
        }
        Command::DrainNode { name } => {
            let rec = node_mut(st, name)?;
            rec.cordoned = true;
            if rec.status == NodeStatus::Ready {
                rec.status = NodeStatus::Draining;
            }
            Ok(Response::Done)
        }
        Command::ExpireNodes { now_ms, grace_ms } => Ok(expire_nodes(st, *now_ms, *grace_ms, meta)),
        Command::SetNodeStreamKey {
            name,
            key,
            cert_sha256,
        } => {
            if key.len() < 32
                || key.len() > 128
                || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(Rejection::invalid(
                    "key",
                    "32-128 characters of [A-Za-z0-9_]",
                ));
            }
            if let Some(c) = cert_sha256
                && (c.len() != 64 || !c.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            {
                return Err(Rejection::invalid(
                    "cert_sha256",
                    "64 lowercase hex characters (SHA-256 of the certificate)",
                ));
            }
            let rec = st
                .nodes
                .get_mut(name)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Node, name))?;
            rec.stream_key = Some(key.clone());
            rec.stream_cert_sha256 = cert_sha256.clone();
            Ok(Response::Done)
        }
        Command::RemoveNode { name } => {
            if !st.nodes.contains_key(name) {
                return Err(Rejection::not_found(ObjectKind::Node, name));
            }
            if let Some(ids) = st.idx.by_node.get(name)
                && let Some(first) = ids.iter().next()
            {
                return Err(Rejection::conflict(format!(
                    "node {name} still has {} sandbox(es) assigned, e.g. {first}",
                    ids.len()
                )));
            }
            st.nodes.remove(name);
            for t in st.templates.values_mut() {
                t.nodes.remove(name);
                // Placement names existing nodes (one registering again
                // gets the templates placed everywhere anew).
                t.placed.remove(name);
            }
            for p in st.pools.values_mut() {
                p.nodes.remove(name);
            }
            st.pools.retain(|_, p| !p.nodes.is_empty());
            for s in st.snapshots.values_mut() {
                s.holders.remove(name);
            }
            Ok(Response::Done)
        }
        _ => Err(Rejection::invalid("command", "routed to the wrong handler")),
    }
}

fn expire_nodes(st: &mut State, now_ms: u64, grace_ms: u64, meta: ApplyMeta) -> Response {
    let expired: Vec<NodeName> = st
        .nodes
        .values()
        .filter(|n| {
            n.status != NodeStatus::Unreachable
                && n.last_heartbeat_ms.saturating_add(grace_ms) < now_ms
        })
        .map(|n| n.name.clone())
        .collect();
    let (mut lost, mut unassigned) = (Vec::new(), Vec::new());
    for name in &expired {
        if let Some(n) = st.nodes.get_mut(name) {
            n.status = NodeStatus::Unreachable;
        }
        let ids: Vec<SandboxId> = st
            .idx
            .by_node
            .get(name)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            let Some(rec) = st.sandboxes.get(&id) else {
                continue;
            };
            if !rec.counts() {
                continue;
            }
            let again = rec.spec.restart == RestartPolicy::OnNodeFailure
                && rec.desired == DesiredState::Running;
            let msg = format!("node {name} was lost");
            let res = modify_sandbox(st, &id, meta, |r| {
                if again {
                    r.node = None;
                    r.observed = SandboxState::Creating;
                    r.observed_generation = 0;
                    // Its next start is another node's.
                    r.start = None;
                } else {
                    r.observed = SandboxState::Failed {
                        error: msg,
                        exit_code: LOST_EXIT_CODE,
                    };
                }
                Ok(true)
            });
            if res.is_ok() {
                if again {
                    unassigned.push(id);
                } else {
                    lost.push(id);
                }
            }
        }
    }
    Response::NodesExpired {
        nodes: expired,
        lost,
        unassigned,
    }
}

/// Templates placed everywhere follow the nodes that join: `node` is added
/// to each one's nodes, with its pool size per node when the template's
/// tenant has room for it (else without a pool there).
fn place_everywhere(st: &mut State, node: &NodeName) {
    let keys: Vec<String> = st
        .templates
        .iter()
        .filter(|(_, t)| t.everywhere && !t.placed.contains(node))
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        let Some(t) = st.templates.get_mut(&key) else {
            continue;
        };
        t.placed.insert(node.clone());
        let (tenant, template, per_node) = (t.tenant.clone(), t.name.clone(), t.pool_per_node);
        if per_node == 0 {
            continue;
        }
        if let Some(tn) = &tenant
            && super::artifacts::check_pool_quota(st, tn, &key, node, per_node).is_err()
        {
            continue;
        }
        let pool = st.pools.entry(key).or_insert_with(|| PoolRecord {
            tenant,
            template,
            nodes: Default::default(),
            members: Default::default(),
        });
        pool.nodes
            .entry(node.clone())
            .or_insert(PoolOnNode {
                target: 0,
                ready: 0,
            })
            .target = per_node;
    }
}
