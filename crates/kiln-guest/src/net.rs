//! The guest's network, from the host's `Configure.network`: the MAC, IPv4
//! address, default route and `/etc/resolv.conf` of the first non-loopback
//! interface. Only ioctls (no `ip` program: the guest image may have none).
//! Idempotent; run again after every restore, so a fork or warm-pool member
//! takes its own address and MAC and drops neighbour entries of its parent.

use std::net::Ipv4Addr;

use kiln_api::proto::GuestNetwork;

use crate::sys;

/// The interface to configure: `eth0` if present, else the first non-`lo`.
fn interface() -> Result<String, String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("listing /sys/class/net: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    if names.iter().any(|n| n == "eth0") {
        return Ok("eth0".to_owned());
    }
    names
        .into_iter()
        .next()
        .ok_or_else(|| "the guest has no network interface".to_owned())
}

pub fn configure(n: &GuestNetwork) -> Result<(), String> {
    n.validate()?;
    let mac = n.mac_bytes().ok_or("bad MAC")?;
    let ifname = interface()?;
    let sock = sys::inet_socket().map_err(|e| format!("socket: {e}"))?;
    // Announce the (new) address with gratuitous ARP when the link changes.
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{ifname}/arp_notify"), "1");
    if sys::set_mac(&sock, &ifname, mac).is_err() {
        // Some drivers refuse a live change: down, set, up.
        sys::set_up(&sock, &ifname, false).map_err(|e| format!("{ifname} down: {e}"))?;
        sys::set_mac(&sock, &ifname, mac).map_err(|e| format!("{ifname} MAC: {e}"))?;
    }
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(n.prefix_len)));
    sys::set_ipv4(&sock, &ifname, n.address, mask)
        .map_err(|e| format!("{ifname} address {}: {e}", n.address))?;
    sys::set_up(&sock, &ifname, true).map_err(|e| format!("{ifname} up: {e}"))?;
    // A restored guest (fork, pool member, warm start) still knows its
    // parent's neighbours: forget them all, the gateway included.
    for addr in neighbours(&ifname) {
        sys::forget_neighbour(&sock, &ifname, addr);
    }
    sys::forget_neighbour(&sock, &ifname, n.gateway);
    sys::set_default_route(&sock, n.gateway)
        .map_err(|e| format!("default route via {}: {e}", n.gateway))?;
    if !n.dns.is_empty() {
        let text: String = n.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        // A symlink (to a resolver stub the image expects) is replaced.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        std::fs::write("/etc/resolv.conf", text)
            .map_err(|e| format!("writing /etc/resolv.conf: {e}"))?;
    }
    Ok(())
}

/// The IPv4 neighbours the kernel has for `ifname` (`/proc/net/arp`).
fn neighbours(ifname: &str) -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
    parse_arp(&text, ifname)
}

fn parse_arp(text: &str, ifname: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[5] == ifname)
                .then(|| f[0].parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn arp_table_entries_of_one_interface() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.88.0.1        0x1         0x2         aa:bb:cc:dd:ee:ff     *        eth0\n\
                    10.88.0.9        0x1         0x2         aa:bb:cc:dd:ee:01     *        eth1\n\
                    garbage\n";
        assert_eq!(
            super::parse_arp(text, "eth0"),
            vec!["10.88.0.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
    }
}
