//! The control plane as separate hosts: three `kiln server` processes and
//! two `kiln node` processes (one running real microVMs, one `--dry-run`),
//! each in its own network namespace on a test bridge, with the test client
//! in the root namespace speaking REST with tenant tokens. Every answer it
//! receives is checked against the schemas of the servers' own
//! `/v1/openapi.json` (`ha_support::Api`).
//!
//! Proven here, in order:
//! - 200 creates with idempotency keys (the first 20 steered by cordons to
//!   the real node as real microVMs, the rest to the dry-run node) while
//!   the leader is `kill -9`ed twice and restarted on its data directory;
//!   the client retries each create with its key until acknowledged; then,
//!   listed through each server, every acknowledged create exists exactly
//!   once and nothing else exists.
//! - `kill -9` of the real node: its microVMs run on; the restarted node
//!   adopts them (same supervisor, one VMM each) and reports them again.
//! - Tenant isolation: tenant B cannot list, read, stop or delete tenant A's
//!   sandbox (404, like a missing one).
//! - A partition (nftables in the isolated server's namespace only): writes
//!   through the minority get 503 `commit_timeout` and never commit; the
//!   majority commits; after healing the minority catches up.
//! - `kiln cluster remove|add|status`: a member leaves and comes back.

mod common;
mod ha_support;
mod node_host;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Kiln;
use ha_support::{Api, HaNet, Reply, ServerProc, wait_until};
use kiln_api::sandbox::SandboxId;
use node_host::{NodeProc, alive, shim_pid, spec, vmm_processes};
use serde_json::{Value, json};

const REAL: usize = 20;
const TOTAL: usize = 200;
/// The real node offers more vCPUs than this 2-core host has (TCG
/// microVMs mostly sleep here), so 20 fit.
const REAL_NODE: &[&str] = &["--capacity-cpus", "64"];

struct Cluster {
    servers: Vec<Arc<Mutex<ServerProc>>>,
    urls: Vec<String>,
    admin: String,
}

impl Cluster {
    /// The leader's index in `servers`, as the first answering server says.
    fn leader(&self, api: &Api) -> Option<usize> {
        for u in &self.urls {
            if let Ok(r) = api.call(u, "GET", "/cluster", &self.admin, None, None)
                && r.status == 200
                && let Some(l) = r.body["leader"].as_u64()
            {
                return self.servers.iter().position(|s| lock(s).id == l);
            }
        }
        None
    }

    fn wait_leader(&self, api: &Api) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.leader(api) {
                return l;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn lock(s: &Mutex<ServerProc>) -> std::sync::MutexGuard<'_, ServerProc> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates with `key` until acknowledged (201, or 200 when a retry found
/// the earlier attempt), trying server `first` and then the others.
fn create_acked(
    api: &Api,
    urls: &[String],
    first: usize,
    token: &str,
    body: &Value,
    key: &str,
) -> (String, u32, u16) {
    let t0 = Instant::now();
    let mut attempt = 0u32;
    loop {
        let url = &urls[(first + attempt as usize) % urls.len()];
        attempt += 1;
        match api.call(url, "POST", "/sandboxes", token, Some(body), Some(key)) {
            Ok(r) if r.status == 201 || r.status == 200 => {
                let id = r.body["id"].as_str().expect("an ID").to_owned();
                return (id, attempt, r.status);
            }
            Ok(r) if r.status == 503 => {
                assert!(r.retry_after.is_some(), "503 without Retry-After");
            }
            Ok(r) => panic!("create {key}: {} {}", r.status, r.body),
            Err(_) => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "create {key} never acknowledged"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// Every sandbox the token sees, through server `url`, paging.
fn list_all(api: &Api, url: &str, token: &str, query: &str) -> Vec<Value> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("/sandboxes?limit=64{query}");
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let r = api.must(url, "GET", &q, token, None);
        assert_eq!(r.status, 200, "{}", r.body);
        out.extend(r.body["items"].as_array().cloned().unwrap_or_default());
        match r.body["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => return out,
        }
    }
}

fn state_of(s: &Value) -> &str {
    s["state"]["state"].as_str().unwrap_or("")
}

fn kiln_cli(k: &Kiln, url: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(&k.bin)
        .args(args)
        .args(["--server", url, "--token", token])
        .env_remove("KILN_SERVER")
        .env_remove("KILN_TOKEN")
        .output()
        .expect("kiln runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn raft_applied(url: &str) -> u64 {
    let o = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("{url}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("kiln_raft_applied_index "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn three_servers_two_nodes_survive_kills_partitions_and_membership_changes() {
    let t_start = Instant::now();
    let k = Kiln::new();
    let dry = Kiln::new();
    // Namespaces 0-2: servers; 3: the real node; 4: the dry-run node.
    let net = HaNet::new(5);
    let root = tempfile::Builder::new()
        .prefix("kiln-e2e-ha-")
        .tempdir_in("/tmp")
        .expect("dir");
    std::fs::write(
        root.path().join("join-token"),
        format!("{}\n", node_host::JOIN),
    )
    .expect("join token");
    let peers: Vec<String> = (0..3)
        .map(|i| {
            let ip = net.ip(i);
            format!(
                "{}={ip}:{}=http://{ip}:{}",
                i + 1,
                ha_support::RAFT_PORT,
                ha_support::API_PORT
            )
        })
        .collect();
    let peers = peers.join(",");
    let servers: Vec<Arc<Mutex<ServerProc>>> = (0..3)
        .map(|i| {
            let mut s = ServerProc::new(
                i as u64 + 1,
                &net.namespaces[i],
                &net.ip(i),
                root.path(),
                &peers,
            );
            s.start(&k.bin, i == 0);
            Arc::new(Mutex::new(s))
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| lock(s).url()).collect();
    let api = Api::new(&urls[0]);
    let token_file = lock(&servers[0]).dir.join("admin.token");
    wait_until(Duration::from_secs(30), "the admin token", || {
        token_file.exists()
    });
    let admin = std::fs::read_to_string(&token_file)
        .expect("admin token")
        .trim()
        .to_owned();
    let c = Cluster {
        servers,
        urls: urls.clone(),
        admin: admin.clone(),
    };
    let l0 = c.wait_leader(&api);
    eprintln!(
        "cluster up, leader {} after {} ms",
        l0 + 1,
        t_start.elapsed().as_millis()
    );

    // Tenants and their tokens, through a follower (forwarded).
    let mut tokens = BTreeMap::new();
    for t in ["alpha", "beta"] {
        let via = &urls[(l0 + 1) % 3];
        let r = api.must(
            via,
            "POST",
            "/tenants",
            &admin,
            Some(&json!({
                "name": t,
                "quotas": {"sandboxes": 1000, "cpus": 10_000, "memory_mib": 10_000_000},
            })),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let r = api.must(
            via,
            "POST",
            "/tokens",
            &admin,
            Some(&json!({"role": "tenant", "tenant": t})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        tokens.insert(t, r.body["secret"].as_str().expect("secret").to_owned());
    }
    let alpha = tokens["alpha"].clone();
    let beta = tokens["beta"].clone();

    // The nodes, each told every server.
    let all = urls.join(",");
    let real_ns = net.namespaces[3].clone();
    let dry_ns = net.namespaces[4].clone();
    let mut real = NodeProc::start_in(&k, &real_ns, &all, "real-1", REAL_NODE);
    let mut dryn = NodeProc::start_in(
        &dry,
        &dry_ns,
        &all,
        "dry-1",
        &[
            "--dry-run",
            "--capacity-cpus",
            "1000",
            "--capacity-memory-mib",
            "1000000",
            "--capacity-disk-mib",
            "10000000",
        ],
    );
    wait_until(Duration::from_secs(60), "both nodes ready", || {
        let r = api.must(&urls[0], "GET", "/nodes", &admin, None);
        r.body["items"]
            .as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|n| n["status"] == "ready"))
    });
    let cordon = |node: &str, on: bool| {
        let verb = if on { "cordon" } else { "uncordon" };
        let r = api.must(
            &urls[0],
            "POST",
            &format!("/nodes/{node}/{verb}"),
            &admin,
            None,
        );
        assert_eq!(r.status, 204, "{verb} {node}: {}", r.body);
    };

    // 200 creates while the leader is killed twice.
    cordon("dry-1", true);
    let acked = Arc::new(AtomicUsize::new(0));
    let killer = {
        let acked = acked.clone();
        let servers = c.servers.clone();
        let urls = urls.clone();
        let admin = admin.clone();
        let bin = k.bin.clone();
        std::thread::spawn(move || {
            let api = Api::new(&urls[0]);
            let c = Cluster {
                servers,
                urls,
                admin,
            };
            let mut killed = vec![];
            for at in [8, 110] {
                while acked.load(Ordering::SeqCst) < at {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let l = c.wait_leader(&api);
                lock(&c.servers[l]).kill9();
                eprintln!(
                    "kill -9 of leader {} after {at} acknowledged creates",
                    l + 1
                );
                killed.push(l);
                std::thread::sleep(Duration::from_millis(1500));
                lock(&c.servers[l]).start(&bin, false);
            }
            killed
        })
    };
    let t_create = Instant::now();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let (mut retried, mut replayed) = (0, 0);
    for i in 0..TOTAL {
        if i == REAL {
            cordon("dry-1", false);
            cordon("real-1", true);
        }
        let key = format!("create-{i:03}");
        let mut s = if i < REAL {
            spec(&["sh", "-c", "echo up; exec sleep 3600"])
        } else {
            kiln_api::sandbox::SandboxSpec::for_image(common::busybox())
        };
        s.labels.insert("key".into(), key.clone());
        let body = serde_json::to_value(&s).expect("spec json");
        let (id, attempts, status) = create_acked(&api, &urls, i, &alpha, &body, &key);
        if attempts > 1 {
            retried += 1;
        }
        if status == 200 {
            replayed += 1;
        }
        assert!(ids.insert(key, id).is_none());
        acked.fetch_add(1, Ordering::SeqCst);
    }
    let killed = killer.join().expect("killer thread");
    eprintln!(
        "{TOTAL} creates acknowledged in {} ms ({retried} retried, {replayed} answered by an earlier attempt); leaders killed: {killed:?}",
        t_create.elapsed().as_millis()
    );
    assert_eq!(killed.len(), 2);
    cordon("real-1", false);

    // Exactly once, through each server.
    let want: BTreeSet<&String> = ids.values().collect();
    for u in &urls {
        let items = list_all(&api, u, &alpha, "");
        let mut keys: BTreeMap<String, u32> = BTreeMap::new();
        for s in &items {
            *keys
                .entry(s["spec"]["labels"]["key"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
        assert_eq!(items.len(), TOTAL, "through {u}: {} sandboxes", items.len());
        assert!(keys.values().all(|n| *n == 1), "a key twice through {u}");
        let got: BTreeSet<&String> = items
            .iter()
            .filter_map(|s| s["id"].as_str())
            .map(|s| {
                ids.values()
                    .find(|v| *v == s)
                    .unwrap_or_else(|| panic!("unacknowledged {s}"))
            })
            .collect();
        assert_eq!(got, want, "through {u}");
    }
    let real_ids: Vec<String> = (0..REAL)
        .map(|i| ids[&format!("create-{i:03}")].clone())
        .collect();
    let t_run = Instant::now();
    wait_until(
        Duration::from_secs(180),
        "20 real microVMs and 180 dry-run sandboxes running",
        || {
            let items = list_all(&api, &urls[0], &alpha, "&state=running");
            items.len() == TOTAL
        },
    );
    eprintln!(
        "all {TOTAL} running {} ms after the last create",
        t_run.elapsed().as_millis()
    );
    for id in &real_ids {
        let r = api.must(&urls[1], "GET", &format!("/sandboxes/{id}"), &alpha, None);
        assert_eq!(r.body["node"], "real-1", "{id} ran elsewhere");
        let sid = SandboxId::try_from(id.clone()).expect("id");
        assert_eq!(vmm_processes(k.state_dir(), &sid).len(), 1, "{id}: one VMM");
    }

    // kill -9 of the real node: the VMs run on and are adopted.
    let shims: BTreeMap<String, u32> = real_ids
        .iter()
        .map(|id| {
            let sid = SandboxId::try_from(id.clone()).expect("id");
            (
                id.clone(),
                shim_pid(k.state_dir(), &sid).expect("a supervisor"),
            )
        })
        .collect();
    real.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        shims.values().all(|p| alive(*p)),
        "a supervisor died with the node"
    );
    let hb_before = node_heartbeat(&api, &urls[0], &admin, "real-1");
    let log_before = real.log().len();
    let mut real = NodeProc::start_in(&k, &real_ns, &all, "real-1", REAL_NODE);
    wait_until(
        Duration::from_secs(60),
        "the restarted node heartbeats",
        || node_heartbeat(&api, &urls[0], &admin, "real-1") > hb_before,
    );
    wait_until(
        Duration::from_secs(60),
        "the restarted node registered",
        || {
            real.log()
                .get(log_before..)
                .is_some_and(|l| l.contains("registered"))
        },
    );
    // Several converge rounds of the restarted node.
    std::thread::sleep(Duration::from_secs(3));
    for id in &real_ids {
        let sid = SandboxId::try_from(id.clone()).expect("id");
        assert_eq!(
            shim_pid(k.state_dir(), &sid),
            Some(shims[id]),
            "{id}: same supervisor"
        );
        assert!(alive(shims[id]));
        assert_eq!(
            vmm_processes(k.state_dir(), &sid).len(),
            1,
            "{id}: no second VM"
        );
        let r = api.must(&urls[2], "GET", &format!("/sandboxes/{id}"), &alpha, None);
        assert_eq!(state_of(&r.body), "running", "{}", r.body);
    }

    // Tenant isolation: B sees none of A's sandboxes.
    let a0 = &real_ids[0];
    assert!(list_all(&api, &urls[0], &beta, "").is_empty());
    for (m, p) in [
        ("GET", format!("/sandboxes/{a0}")),
        ("POST", format!("/sandboxes/{a0}/stop")),
        ("DELETE", format!("/sandboxes/{a0}")),
    ] {
        let r = api.must(&urls[1], m, &p, &beta, None);
        assert_eq!(
            (r.status, r.code()),
            (404, "not_found"),
            "{m} {p}: {}",
            r.body
        );
    }
    let r = api.must(&urls[1], "GET", &format!("/sandboxes/{a0}"), &alpha, None);
    assert_eq!(state_of(&r.body), "running");

    // Partition: the leader alone against the other two servers.
    let l = c.wait_leader(&api);
    let others: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    net.isolate(l, &others);
    let minority_body =
        serde_json::to_value(kiln_api::sandbox::SandboxSpec::for_image(common::busybox()))
            .expect("json");
    let t_minority = Instant::now();
    let r = api
        .call(
            &urls[l],
            "POST",
            "/sandboxes",
            &alpha,
            Some(&minority_body),
            Some("minority-1"),
        )
        .expect("the minority answers");
    assert_eq!((r.status, r.code()), (503, "commit_timeout"), "{}", r.body);
    eprintln!(
        "minority write refused after {} ms",
        t_minority.elapsed().as_millis()
    );
    let r = api.must(&urls[l], "GET", "/sandboxes?limit=1", &alpha, None);
    assert_eq!(r.status, 503, "a minority read: {}", r.body);
    assert!(
        matches!(r.code(), "commit_timeout" | "no_leader"),
        "{}",
        r.body
    );
    let majority: Vec<String> = others.iter().map(|i| urls[*i].clone()).collect();
    let (maj_id, _, _) = create_acked(&api, &majority, 0, &alpha, &minority_body, "majority-1");
    let new_leader = c.leader_among(&api, &others);
    let commit = api
        .must(&urls[others[0]], "GET", "/cluster", &admin, None)
        .body["commit_index"]
        .as_u64()
        .expect("commit index");
    assert_ne!(new_leader, l);
    net.heal(l);
    wait_until(Duration::from_secs(30), "the old leader caught up", || {
        raft_applied(&urls[l]) >= commit
    });
    let r = api.must(
        &urls[l],
        "GET",
        &format!("/sandboxes/{maj_id}"),
        &alpha,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let minority = list_all(&api, &urls[l], &alpha, "")
        .into_iter()
        .filter(|s| s["spec"]["labels"].as_object().is_none_or(|m| m.is_empty()))
        .count();
    assert_eq!(minority, 1, "only the majority's write exists");

    // Membership: remove a follower and add it back.
    let l = c.wait_leader(&api);
    let f = (l + 1) % 3;
    let fid = (f + 1).to_string();
    let (ok, _, err) = kiln_cli(&k, &urls[l], &admin, &["cluster", "remove", &fid]);
    assert!(ok, "cluster remove: {err}");
    let status = |k: &Kiln| {
        let (ok, out, err) = kiln_cli(k, &urls[l], &admin, &["cluster", "status", "-o", "json"]);
        assert!(ok, "cluster status: {err}");
        api.check("GET", "/v1/cluster", 200, out.as_bytes());
        serde_json::from_str::<Value>(&out).expect("json")
    };
    let members = |v: &Value| -> BTreeSet<u64> {
        v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["voter"] == true)
            .filter_map(|m| m["id"].as_u64())
            .collect()
    };
    assert!(!members(&status(&k)).contains(&(f as u64 + 1)));
    let (ok, _, err) = kiln_cli(
        &k,
        &urls[l],
        &admin,
        &[
            "cluster",
            "add",
            &fid,
            "--raft-addr",
            &lock(&c.servers[f]).raft_addr(),
            "--api-url",
            &urls[f],
        ],
    );
    assert!(ok, "cluster add: {err}");
    assert_eq!(members(&status(&k)).len(), 3);
    let (_, _, _) = create_acked(&api, &urls, f, &alpha, &minority_body, "after-readd");

    // Clean up: delete everything, the real VMs go.
    let everything = list_all(&api, &urls[0], &alpha, "");
    for (i, s) in everything.iter().enumerate() {
        let id = s["id"].as_str().expect("id");
        let r = api.must(
            &urls[i % 3],
            "DELETE",
            &format!("/sandboxes/{id}"),
            &alpha,
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    wait_until(Duration::from_secs(120), "every sandbox forgotten", || {
        list_all(&api, &urls[0], &alpha, "").is_empty()
    });
    wait_until(Duration::from_secs(30), "the real VMs gone", || {
        shims.values().all(|p| !alive(*p))
    });
    real.term();
    dryn.term();
    for s in &c.servers {
        lock(s).kill9();
    }
    eprintln!(
        "{} responses checked against the OpenAPI schemas; total {} ms",
        api.checked.load(Ordering::Relaxed),
        t_start.elapsed().as_millis()
    );
    k.assert_clean();
    dry.assert_clean();
}

fn node_heartbeat(api: &Api, url: &str, admin: &str, name: &str) -> u64 {
    let r: Reply = api.must(url, "GET", "/nodes", admin, None);
    r.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == name)
        .and_then(|n| n["last_heartbeat_ms"].as_u64())
        .unwrap_or(0)
}

impl Cluster {
    /// The leader among servers `among` (asking only them).
    fn leader_among(&self, api: &Api, among: &[usize]) -> usize {
        for i in among {
            if let Ok(r) = api.call(&self.urls[*i], "GET", "/cluster", &self.admin, None, None)
                && let Some(l) = r.body["leader"].as_u64()
            {
                return (l - 1) as usize;
            }
        }
        panic!("no leader among {among:?}")
    }
}
