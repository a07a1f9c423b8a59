//! kiln-server runs on control-plane hosts without KVM: nothing it links,
//! directly or through another crate, may touch VMs, images or a host's
//! disks. Checked on the resolved dependency graph (`cargo metadata`), so
//! a dependency that sneaks in through kiln-store is caught too.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

#[test]
fn links_no_host_crate_even_transitively() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            // This host's platform only: without it cargo wants the
            // sources of every platform's crates (android_system_properties
            // …), which a fresh machine has not downloaded.
            "--filter-platform",
            &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");

    let mut name_of = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        name_of.insert(
            p["id"].as_str().expect("id").to_string(),
            p["name"].as_str().expect("name").to_string(),
        );
    }
    // Normal (not dev, not build) dependency edges of the resolved graph.
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in meta["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let from = n["id"].as_str().expect("id").to_string();
        let deps = n["deps"].as_array().expect("deps").iter().filter(|d| {
            d["dep_kinds"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k["kind"].is_null()))
        });
        edges.insert(
            from,
            deps.map(|d| d["pkg"].as_str().expect("pkg").to_string())
                .collect(),
        );
    }
    let root = name_of
        .iter()
        .find(|(_, n)| *n == "kiln-server")
        .map(|(id, _)| id.clone())
        .expect("kiln-server in the metadata");
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        if seen.insert(id.clone()) {
            todo.extend(edges.get(&id).into_iter().flatten().cloned());
        }
    }
    let linked: BTreeSet<&str> = seen.iter().map(|id| name_of[id].as_str()).collect();
    for forbidden in [
        "kiln-node",
        "kiln-vmm",
        "kiln-image",
        "kiln-cli",
        "kiln-guest",
    ] {
        assert!(!linked.contains(forbidden), "kiln-server links {forbidden}");
    }
    assert!(linked.contains("kiln-api") && linked.contains("kiln-store"));
}
