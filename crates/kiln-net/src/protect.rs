//! Node-level protected infrastructure ranges: CIDRs (control-plane
//! servers, a management LAN, ...) that the policy program treats like the
//! node's own addresses, so a broad rule or a default-allow policy never
//! reaches them; only a rule whose CIDR lies inside one opens it.
//!
//! Two sources, unioned by every process that compiles a policy (so `kiln
//! run`, `kiln policy set` and the node daemon agree):
//! - `KILN_PROTECTED_CIDRS`: comma- or space-separated IPv4 CIDRs (a bare
//!   address is a /32), read from the environment of each process;
//! - `<state>/net/protected-cidrs`: one CIDR a line, written by `kiln node`
//!   at start from its `--protected-cidr` flags and the addresses of its
//!   `--server` URLs (replaced atomically on each start);
//! - `<state>/net/protected-cidrs.cluster`: the addresses of the cluster's
//!   other nodes, written by the node daemon from its watch whenever they
//!   change (a tenant's broad allow rule must not reach another host).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub use ipnet::Ipv4Net;

/// The environment variable naming extra protected CIDRs.
pub const ENV: &str = "KILN_PROTECTED_CIDRS";
/// The file (in the network's state directory) the node daemon writes.
pub const FILE: &str = "protected-cidrs";
/// The file (same directory) the node daemon keeps the cluster's other
/// nodes' addresses in.
pub const CLUSTER_FILE: &str = "protected-cidrs.cluster";
/// At most this many configured ranges (each is a trie key per sandbox).
pub const MAX: usize = 256;
/// At most this many cluster node addresses.
pub const MAX_CLUSTER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProtectedCidrsError {
    #[error("protected range {text:?} ({origin}): {why}")]
    Parse {
        text: String,
        origin: String,
        why: &'static str,
    },
    #[error("more than {MAX} protected ranges ({origin})")]
    TooMany { origin: String },
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Parses one CIDR or address (IPv4 only: sandboxes have no IPv6).
pub fn parse_one(text: &str, origin: &str) -> Result<Ipv4Net, ProtectedCidrsError> {
    let err = |why| ProtectedCidrsError::Parse {
        text: text.chars().take(64).collect(),
        origin: origin.to_owned(),
        why,
    };
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => {
            let len: u8 = l
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| err("the prefix length must be a number 0-32"))?;
            (a, len)
        }
        None => (text, 32),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| err("not an IPv4 address (a.b.c.d or a.b.c.d/len)"))?;
    let net = Ipv4Net::new(addr, len).map_err(|_| err("bad prefix length"))?;
    if net.prefix_len() == 0 {
        return Err(err(
            "0.0.0.0/0 would protect everything: refuse all instead",
        ));
    }
    Ok(net.trunc())
}

/// Parses a list separated by commas, spaces or newlines (`#` comments to
/// the end of a line).
pub fn parse_list(text: &str, origin: &str) -> Result<Vec<Ipv4Net>, ProtectedCidrsError> {
    parse_list_max(text, origin, MAX)
}

fn parse_list_max(
    text: &str,
    origin: &str,
    max: usize,
) -> Result<Vec<Ipv4Net>, ProtectedCidrsError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for item in line.split([',', ' ', '\t']).filter(|s| !s.is_empty()) {
            out.push(parse_one(item, origin)?);
            if out.len() > max {
                return Err(ProtectedCidrsError::TooMany {
                    origin: origin.to_owned(),
                });
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The configured ranges: `KILN_PROTECTED_CIDRS` and the node's files in
/// `net_dir` (absent: none).
pub fn configured(net_dir: &Path) -> Result<Vec<Ipv4Net>, ProtectedCidrsError> {
    let mut out = match std::env::var(ENV) {
        Ok(v) => parse_list(&v, ENV)?,
        Err(_) => Vec::new(),
    };
    for (file, max) in [(FILE, MAX), (CLUSTER_FILE, MAX_CLUSTER)] {
        let path = net_dir.join(file);
        match fs::read_to_string(&path) {
            Ok(text) => out.extend(parse_list_max(&text, &path.display().to_string(), max)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProtectedCidrsError::Read(path, e)),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The cluster's other nodes' addresses as the daemon last wrote them
/// (absent or unreadable: none, with a warning for the latter). Read at
/// every use by long-lived holders (the DNS resolver), since it changes
/// while they run.
pub fn cluster_file(net_dir: &Path) -> Vec<Ipv4Net> {
    let path = net_dir.join(CLUSTER_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            parse_list_max(&text, &path.display().to_string(), MAX_CLUSTER).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "ignoring the cluster's protected addresses");
                Vec::new()
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the cluster's protected addresses");
            Vec::new()
        }
    }
}

/// Replaces the node's file with `ranges` (temp file, fsync, rename).
pub fn write_file(net_dir: &Path, ranges: &[Ipv4Net]) -> Result<(), ProtectedCidrsError> {
    write_ranges(net_dir, FILE, "written by `kiln node` at start", ranges)
}

/// Replaces the cluster file with `ranges` if they differ from what it
/// holds; returns whether it changed.
pub fn write_cluster_file(net_dir: &Path, ranges: &[Ipv4Net]) -> Result<bool, ProtectedCidrsError> {
    let mut want = ranges.to_vec();
    want.sort();
    want.dedup();
    if want.len() > MAX_CLUSTER {
        return Err(ProtectedCidrsError::TooMany {
            origin: "the cluster's node addresses".into(),
        });
    }
    let path = net_dir.join(CLUSTER_FILE);
    let have = match fs::read_to_string(&path) {
        Ok(text) => parse_list_max(&text, &path.display().to_string(), MAX_CLUSTER).ok(),
        Err(_) => None,
    };
    if have.as_deref() == Some(want.as_slice()) {
        return Ok(false);
    }
    write_ranges(
        net_dir,
        CLUSTER_FILE,
        "the cluster's other nodes, written by the `kiln node` daemon from its watch",
        &want,
    )?;
    Ok(true)
}

fn write_ranges(
    net_dir: &Path,
    file: &str,
    header: &str,
    ranges: &[Ipv4Net],
) -> Result<(), ProtectedCidrsError> {
    let path = net_dir.join(file);
    let werr = |e| ProtectedCidrsError::Write(path.clone(), e);
    fs::create_dir_all(net_dir).map_err(werr)?;
    let tmp = net_dir.join(format!(".{file}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(werr)?;
    let mut text = format!("# {header}; see docs/networking.md\n");
    for r in ranges {
        text.push_str(&format!("{r}\n"));
    }
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    fs::rename(&tmp, &path).map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_bad_entries_are_named() {
        let got = parse_list("10.0.0.0/8, 192.168.1.7 # a server\n172.16.0.0/12", "t").unwrap();
        let want: Vec<Ipv4Net> = ["10.0.0.0/8", "172.16.0.0/12", "192.168.1.7/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            parse_list("10.1.2.3/16", "t").unwrap(),
            vec!["10.1.0.0/16".parse::<Ipv4Net>().unwrap()]
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/8",
            "0.0.0.0/0",
            "x",
            "10.0.0.1/",
        ] {
            let e = parse_list(bad, "KILN_PROTECTED_CIDRS")
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad) && e.contains("KILN_PROTECTED_CIDRS"), "{e}");
        }
        let many: Vec<String> = (0..=MAX)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        assert!(matches!(
            parse_list(&many.join(","), "t"),
            Err(ProtectedCidrsError::TooMany { .. })
        ));
    }

    #[test]
    fn the_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(configured(dir.path()).unwrap().is_empty() || std::env::var(ENV).is_ok());
        let r: Vec<Ipv4Net> = vec![
            "10.9.0.0/16".parse().unwrap(),
            "10.1.1.1/32".parse().unwrap(),
        ];
        write_file(dir.path(), &r).unwrap();
        let got = parse_list(&fs::read_to_string(dir.path().join(FILE)).unwrap(), "f").unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.contains(&r[0]) && got.contains(&r[1]));
    }

    #[test]
    fn the_cluster_file_is_rewritten_only_on_change_and_read_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let node: Vec<Ipv4Net> = vec!["10.9.0.0/16".parse().unwrap()];
        write_file(dir.path(), &node).unwrap();
        let peers: Vec<Ipv4Net> = vec![
            "192.168.7.2/32".parse().unwrap(),
            "192.168.7.3/32".parse().unwrap(),
        ];
        assert!(write_cluster_file(dir.path(), &peers).unwrap());
        assert!(!write_cluster_file(dir.path(), &[peers[1], peers[0]]).unwrap());
        let all = configured(dir.path()).unwrap();
        for r in node.iter().chain(&peers) {
            assert!(all.contains(r), "{r} missing from {all:?}");
        }
        assert!(write_cluster_file(dir.path(), &peers[..1]).unwrap());
        assert!(!configured(dir.path()).unwrap().contains(&peers[1]));
        // More than MAX (the flag/file limit) is fine for a cluster.
        let many: Vec<Ipv4Net> = (0..300u32)
            .map(|i| Ipv4Net::new(Ipv4Addr::from(0x0a63_0000 + i), 32).unwrap())
            .collect();
        assert!(write_cluster_file(dir.path(), &many).unwrap());
        assert!(configured(dir.path()).unwrap().len() >= 300);
    }
}
