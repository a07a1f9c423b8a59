//! NAT egress and the forward filter, in one nftables table owned by Kiln.
//!
//! The table `inet kiln` holds two base chains per bridge, named after it:
//! `nat_<bridge>` (postrouting: masquerade what leaves the subnet) and
//! `fwd_<bridge>` (forward: into the bridge only replies, never new
//! connections from outside; out of it only the subnet's addresses). Traffic
//! between two ports of the bridge also passes the forward hook on hosts with
//! `br_netfilter` (in and out interface are then both the bridge): it is left
//! alone here, the sandboxes' BPF programs judge it. Setting a bridge up replaces its chains in one
//! `nft -f` transaction (idempotent); removing the last bridge's chains
//! removes the table. A host-wide `flock` serialises Kiln processes around
//! that check-then-delete. We drive the `nft` program with script input:
//! Debian's nftables is a host dependency already, a script is one atomic
//! transaction, and there is no well-kept Rust crate for nftables' netlink
//! protocol (the `nftables` crate itself shells out to `nft` with JSON).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

/// The Kiln table.
pub const TABLE: &str = "kiln";
const LOCK: &str = "/run/kiln-nft.lock";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft")]
    Spawn(#[source] io::Error),
    #[error("nft refused the script ({stderr}):\n{script}")]
    Failed { script: String, stderr: String },
    #[error("cannot lock {LOCK}")]
    Lock(#[source] io::Error),
}

fn chain_suffix(bridge: &str) -> String {
    bridge.replace('-', "_")
}

fn lock() -> Result<Flock<File>, NftError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(LOCK))
        .map_err(NftError::Lock)?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| NftError::Lock(io::Error::from(e)))
}

fn nft(script: &str) -> Result<String, NftError> {
    run(script, false)
}

/// Runs an `nft -f -` script (`handles`: `-a`, rule handles in listings).
pub(crate) fn run(script: &str, handles: bool) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(if handles {
            &["-a", "-f", "-"][..]
        } else {
            &["-f", "-"][..]
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(NftError::Spawn)?;
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            script: script.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or replaces) the bridge's NAT and forward chains.
pub fn ensure_bridge_rules(bridge: &str, subnet: Ipv4Net) -> Result<(), NftError> {
    let _lock = lock()?;
    let c = chain_suffix(bridge);
    let script = format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} nat_{c} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {TABLE} nat_{c}\n\
         add rule inet {TABLE} nat_{c} ip saddr {subnet} ip daddr != {subnet} masquerade\n\
         add chain inet {TABLE} fwd_{c} {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain inet {TABLE} fwd_{c}\n\
         add rule inet {TABLE} fwd_{c} iifname \"{bridge}\" oifname != \"{bridge}\" ip saddr {subnet} accept\n\
         add rule inet {TABLE} fwd_{c} oifname \"{bridge}\" iifname != \"{bridge}\" ct state established,related accept\n\
         add rule inet {TABLE} fwd_{c} oifname \"{bridge}\" iifname != \"{bridge}\" ct status dnat accept\n\
         add rule inet {TABLE} fwd_{c} oifname \"{bridge}\" iifname != \"{bridge}\" drop\n\
         add rule inet {TABLE} fwd_{c} iifname \"{bridge}\" oifname != \"{bridge}\" drop\n\
         add chain inet {TABLE} pre_{c} {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain inet {TABLE} out_{c} {{ type nat hook output priority -100; policy accept; }}\n"
    );
    nft(&script).map(|_| ())
}

fn table_chains() -> Result<Vec<String>, NftError> {
    let out = match nft(&format!("list table inet {TABLE}\n")) {
        Ok(o) => o,
        Err(NftError::Failed { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Removes the bridge's chains, and the table when no other bridge has any.
pub fn remove_bridge_rules(bridge: &str) -> Result<(), NftError> {
    let _lock = lock()?;
    let c = chain_suffix(bridge);
    let chains = table_chains()?;
    let mut script = String::new();
    let ours = [
        format!("nat_{c}"),
        format!("fwd_{c}"),
        format!("pre_{c}"),
        format!("out_{c}"),
    ];
    for name in &ours {
        if chains.contains(name) {
            script.push_str(&format!(
                "flush chain inet {TABLE} {name}\ndelete chain inet {TABLE} {name}\n"
            ));
        }
    }
    let others = chains.iter().any(|n| !ours.contains(n));
    if !chains.is_empty() && !others {
        script = format!("delete table inet {TABLE}\n");
    }
    if script.is_empty() {
        return Ok(());
    }
    nft(&script).map(|_| ())
}

/// Whether the bridge's chains exist (for tests and diagnostics).
pub fn bridge_rules_present(bridge: &str) -> Result<bool, NftError> {
    let c = chain_suffix(bridge);
    Ok(table_chains()?.iter().any(|n| n == &format!("nat_{c}")))
}
