//! Links and addresses on the host, through iproute2's `ip` program.
//!
//! Why `ip` and not a netlink crate: `ip` is Debian's reference netlink
//! client, already a Kiln host dependency, stable in its interface (`-json`
//! output for reads), and every operation here is a handful of calls on the
//! attach/detach path, not a hot loop. The Rust netlink crates (rtnetlink,
//! neli) change their builder APIs between minor versions and need an async
//! runtime or hand-built messages; swapping one in later touches only this
//! module. Every name passed to `ip` has been validated by the caller
//! ([`valid_ifname`]), and arguments are passed as argv, never through a shell.

use std::io;
use std::net::Ipv4Addr;
use std::process::Command;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("cannot run ip {args}")]
    Spawn {
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("ip {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("ip {args} printed JSON that is not a list of links")]
    Json {
        args: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A Linux interface name Kiln creates: 1-15 of `[a-z0-9-]`, not starting with `-`.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Runs `ip ARGS`; returns stdout.
pub fn ip(args: &[&str]) -> Result<String, HostNetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| HostNetError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(HostNetError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json(args: &[&str]) -> Result<Vec<serde_json::Value>, HostNetError> {
    let text = ip(args)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).map_err(|source| HostNetError::Json {
        args: args.join(" "),
        source,
    })
}

/// Whether an interface exists.
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Creates the bridge if missing, gives it `gateway/len`, brings it up, and
/// turns IPv6 off on it (the host offers sandboxes no IPv6 at all).
pub fn ensure_bridge(name: &str, gateway: Ipv4Addr, subnet: Ipv4Net) -> Result<(), HostNetError> {
    if !link_exists(name) {
        match ip(&["link", "add", name, "type", "bridge"]) {
            Ok(_) => {}
            // Another process created it between the check and here.
            Err(_) if link_exists(name) => {}
            Err(e) => return Err(e),
        }
    }
    let _ = write_sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    // A bridge without an address of its own takes the lowest MAC of its
    // ports, so a port joining (a tap, a veth) could change the gateway's
    // MAC under the guests' ARP caches: their packets would go to a MAC
    // nobody has until the entries expire. A fixed one, derived from the
    // name (locally administered), keeps it.
    let mac = bridge_mac(name);
    let current =
        std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_default();
    if current.trim() != mac {
        ip(&["link", "set", name, "address", &mac])?;
    }
    let addr = format!("{gateway}/{}", subnet.prefix_len());
    ip(&["addr", "replace", &addr, "dev", name])?;
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// The fixed MAC of bridge `name`: `02:6b:` and four bytes of its name's
/// SHA-256 (locally administered, unicast).
pub fn bridge_mac(name: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("kiln bridge {name}").as_bytes());
    format!("02:6b:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3])
}

/// Turns on IPv4 forwarding (needed for NAT egress).
pub fn enable_forwarding() -> Result<(), HostNetError> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
}

fn write_sysctl(path: &str, value: &str) -> Result<(), HostNetError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|source| HostNetError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

/// Creates a persistent tap (if missing) and attaches it to `bridge`, up.
pub fn ensure_tap(name: &str, bridge: &str) -> Result<(), HostNetError> {
    if !link_exists(name) {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    }
    attach_to_bridge(name, bridge)
}

/// Puts an existing interface on `bridge` and brings it up; IPv6 off on the port.
pub fn attach_to_bridge(name: &str, bridge: &str) -> Result<(), HostNetError> {
    let _ = write_sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["link", "set", name, "master", bridge, "up"])?;
    Ok(())
}

/// Deletes an interface; a missing one is fine.
pub fn delete_link(name: &str) -> Result<(), HostNetError> {
    if !link_exists(name) {
        return Ok(());
    }
    match ip(&["link", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !link_exists(name) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names of the interfaces enslaved to `bridge`.
pub fn bridge_ports(bridge: &str) -> Result<Vec<String>, HostNetError> {
    if !link_exists(bridge) {
        return Ok(Vec::new());
    }
    Ok(ip_json(&["-json", "link", "show", "master", bridge])?
        .iter()
        .filter_map(|l| l.get("ifname")?.as_str().map(str::to_owned))
        .collect())
}

/// Forgets the bridge's neighbour entry for `addr` (a reused address must
/// not be sent to the previous owner's MAC).
pub fn flush_neighbour(bridge: &str, addr: Ipv4Addr) -> Result<(), HostNetError> {
    if !link_exists(bridge) {
        return Ok(());
    }
    ip(&["neigh", "flush", "to", &addr.to_string(), "dev", bridge]).map(|_| ())
}

/// The host's own IPv4 addresses (every interface).
pub fn host_addresses() -> Result<Vec<Ipv4Addr>, HostNetError> {
    let links = ip_json(&["-json", "-4", "addr", "show"])?;
    let mut out = Vec::new();
    for l in &links {
        let Some(infos) = l.get("addr_info").and_then(|a| a.as_array()) else {
            continue;
        };
        for i in infos {
            if let Some(a) = i.get("local").and_then(|v| v.as_str())
                && let Ok(a) = a.parse()
            {
                out.push(a);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("kiln0"));
        assert!(valid_ifname("kt-0123456789a"));
        assert!(!valid_ifname("kt-0123456789ab0"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("-x"));
        assert!(!valid_ifname("a b"));
        assert!(!valid_ifname("a/b"));
    }
}
