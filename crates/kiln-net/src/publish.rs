//! Published ports (`kiln run -p [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`,
//! docker semantics): a host port DNATed to the sandbox's address, in the
//! `inet kiln` table. Two NAT base chains per bridge hold the rules:
//! `pre_<bridge>` (prerouting: connections arriving from other hosts) and
//! `out_<bridge>` (output: connections the host itself opens to one of its
//! addresses). Each rule matches only packets addressed to the host
//! (`fib daddr type local`, or the given HOSTIP) and carries the comment
//! `kiln:<sandbox id>`, by which it is removed with the sandbox (and by the
//! reconciler after a crash). The forward chain lets into the bridge only
//! replies and connections DNATed here (`ct status dnat`), so a guest is
//! reachable from outside through its published ports and nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::nft::{self, NftError, TABLE};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// Only connections to this host address (`None`: any of the host's).
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(f, "{}:{}/{}", self.host_port, self.guest_port, self.proto)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-p {text:?}: {why} (expected [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp])")]
pub struct ParsePublishError {
    text: String,
    why: &'static str,
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|p| *p != 0)
}

impl FromStr for Publish {
    type Err = ParsePublishError;
    fn from_str(text: &str) -> Result<Publish, ParsePublishError> {
        let err = |why| ParsePublishError {
            text: text.chars().take(80).collect(),
            why,
        };
        let (spec, proto) = match text.rsplit_once('/') {
            Some((s, "tcp")) => (s, Proto::Tcp),
            Some((s, "udp")) => (s, Proto::Udp),
            Some(_) => return Err(err("the protocol must be tcp or udp")),
            None => (text, Proto::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, hp, gp) = match parts.as_slice() {
            [h, g] => (None, *h, *g),
            [ip, h, g] => (
                Some(
                    ip.parse::<Ipv4Addr>()
                        .map_err(|_| err("the host address must be an IPv4 address"))?,
                ),
                *h,
                *g,
            ),
            _ => return Err(err("wrong number of ':'")),
        };
        if host_ip.is_some_and(|ip| ip.is_unspecified()) {
            // 0.0.0.0 means every address, as in docker.
            return Ok(Publish {
                host_ip: None,
                host_port: port(hp).ok_or_else(|| err("the host port must be 1-65535"))?,
                guest_port: port(gp).ok_or_else(|| err("the guest port must be 1-65535"))?,
                proto,
            });
        }
        if host_ip.is_some_and(|ip| ip.is_multicast() || ip.is_broadcast()) {
            return Err(err("the host address must be a unicast address"));
        }
        Ok(Publish {
            host_ip,
            host_port: port(hp).ok_or_else(|| err("the host port must be 1-65535"))?,
            guest_port: port(gp).ok_or_else(|| err("the guest port must be 1-65535"))?,
            proto,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("host port {0} is published twice")]
    Duplicate(String),
    #[error("host port {port} is already published by sandbox {owner}")]
    Taken { port: String, owner: String },
    #[error("host port {port} is in use on this host: {source}")]
    InUse {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Lock(#[from] crate::LockError),
}

fn chain_names(bridge: &str) -> [String; 2] {
    let c = bridge.replace('-', "_");
    [format!("pre_{c}"), format!("out_{c}")]
}

/// The published ports of every sandbox on `bridge`: (sandbox id, host
/// port/proto, rule handle) per chain rule.
fn rules(bridge: &str) -> Result<Vec<(String, String, String, u64)>, NftError> {
    let mut out = vec![];
    for chain in chain_names(bridge) {
        let text = match nft::run(&format!("list chain inet {TABLE} {chain}\n"), true) {
            Ok(t) => t,
            Err(NftError::Failed { .. }) => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines() {
            let Some((_, rest)) = line.split_once("comment \"kiln:") else {
                continue;
            };
            let Some((tag, tail)) = rest.split_once('"') else {
                continue;
            };
            let Some(handle) = tail
                .split_once("# handle ")
                .and_then(|(_, h)| h.trim().parse().ok())
            else {
                continue;
            };
            // The tag is `<id>:<host port>/<proto>`.
            let Some((id, what)) = tag.split_once(':') else {
                continue;
            };
            out.push((id.to_owned(), what.to_owned(), chain.clone(), handle));
        }
    }
    Ok(out)
}

/// Host port/proto → the sandbox publishing it.
pub fn published(bridge: &str) -> Result<BTreeMap<String, String>, NftError> {
    Ok(rules(bridge)?
        .into_iter()
        .map(|(id, what, _, _)| (what, id))
        .collect())
}

/// Refuses what cannot be published (twice in `ports`, published by
/// another sandbox, or bound by a host process) before anything is made.
pub fn check(bridge: &str, ports: &[Publish]) -> Result<(), PublishError> {
    let taken = published(bridge)?;
    let mut seen = std::collections::BTreeSet::new();
    for p in ports {
        let key = format!("{}/{}", p.host_port, p.proto);
        if !seen.insert(key.clone()) {
            return Err(PublishError::Duplicate(key));
        }
        if let Some(owner) = taken.get(&key) {
            return Err(PublishError::Taken {
                port: key,
                owner: owner.clone(),
            });
        }
        let addr = (p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), p.host_port);
        let bound = match p.proto {
            Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
            Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
        };
        if let Err(source) = bound {
            return Err(PublishError::InUse { port: key, source });
        }
    }
    Ok(())
}

/// Publishes `ports` of sandbox `id` (at `ip`) in one transaction.
pub fn add(bridge: &str, id: &str, ip: Ipv4Addr, ports: &[Publish]) -> Result<(), NftError> {
    if ports.is_empty() {
        return Ok(());
    }
    let [pre, out] = chain_names(bridge);
    let mut script = String::new();
    for p in ports {
        let dst = match p.host_ip {
            Some(h) => format!("ip daddr {h}"),
            None => "fib daddr type local".to_owned(),
        };
        let tag = format!("kiln:{id}:{}/{}", p.host_port, p.proto);
        for chain in [&pre, &out] {
            script.push_str(&format!(
                "add rule inet {TABLE} {chain} {dst} {proto} dport {hp} dnat ip to {ip}:{gp} comment \"{tag}\"\n",
                proto = p.proto,
                hp = p.host_port,
                gp = p.guest_port,
            ));
        }
    }
    nft::run(&script, false).map(drop)
}

/// Removes every published port of `ids` (a missing chain is fine).
pub fn remove(bridge: &str, ids: &dyn Fn(&str) -> bool) -> Result<Vec<String>, NftError> {
    let mut script = String::new();
    let mut removed = vec![];
    for (id, _, chain, handle) in rules(bridge)? {
        if ids(&id) {
            script.push_str(&format!(
                "delete rule inet {TABLE} {chain} handle {handle}\n"
            ));
            removed.push(id);
        }
    }
    if !script.is_empty() {
        nft::run(&script, false)?;
    }
    removed.dedup();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_forms_parse_and_bad_ones_say_why() {
        let p: Publish = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_ip, p.host_port, p.guest_port, p.proto),
            (None, 8080, 80, Proto::Tcp)
        );
        let p: Publish = "127.0.0.1:53:5353/udp".parse().unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(p.proto, Proto::Udp);
        assert_eq!(p.to_string(), "127.0.0.1:53:5353/udp");
        assert_eq!("0.0.0.0:1:2".parse::<Publish>().unwrap().host_ip, None);
        for (bad, why) in [
            ("80", "':'"),
            ("0:80", "1-65535"),
            ("80:65536", "1-65535"),
            ("80:+1", "1-65535"),
            ("x:1:2", "IPv4"),
            ("::1:80:80", "':'"),
            ("80:80/sctp", "tcp or udp"),
            ("224.0.0.1:80:80", "unicast"),
            ("1:2:3:4", "':'"),
        ] {
            let e = bad.parse::<Publish>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
