//! Address management for one bridge's subnet.
//!
//! Invariants: one lease per sandbox id, never one address in two leases;
//! the gateway (first host address), the network and broadcast addresses are
//! never leased. The lease table is a JSON file written atomically (temp
//! file, fsync, rename, fsync of the directory) under an exclusive `flock`,
//! so concurrent Kiln processes and a crash at any point leave either the old
//! or the new table. Addresses are handed out round-robin from a persisted
//! cursor, so a just-released address (still in some ARP cache) is the last
//! to be reused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::claims::{Claims, HostLock, Owner};

/// One sandbox's address, MAC and host interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The host-side interface (tap) name.
    pub ifname: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    version: u32,
    subnet: Option<Ipv4Net>,
    /// Offset (from the network address) of the last address handed out.
    cursor: u32,
    leases: BTreeMap<String, Lease>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("subnet {0} is too small for sandboxes (use a prefix of /29 or shorter)")]
    SubnetTooSmall(Ipv4Net),
    #[error("lease table {path} is for subnet {stored}, the node is configured for {configured}")]
    SubnetChanged {
        path: PathBuf,
        stored: Ipv4Net,
        configured: Ipv4Net,
    },
    #[error("subnet {0} has no free address")]
    Exhausted(Ipv4Net),
    #[error("cannot read lease table {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("lease table {0} is corrupt")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    #[error("cannot write lease table {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("cannot lock {0}")]
    Lock(PathBuf, #[source] nix::Error),
}

/// The lease table of one subnet, kept in `dir/leases.json`, and, when
/// the subnet is shared by other state directories on the host, the
/// host-wide claims ([`crate::claims`]) that keep their addresses apart.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    subnet: Ipv4Net,
    claims: Option<Claims>,
}

/// The deterministic, locally administered unicast MAC of a sandbox: two
/// bytes from a hash of its id, then its IPv4 address. Unique among live
/// sandboxes (their addresses are), and a reused address gets a new MAC
/// (with probability 65535/65536), so stale ARP entries do not match.
pub fn mac_for(id: &str, ip: Ipv4Addr) -> [u8; 6] {
    let h = Sha256::digest(id.as_bytes());
    let o = ip.octets();
    [(h[0] & 0xfc) | 0x02, h[1], o[0], o[1], o[2], o[3]]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Ipam {
    pub fn new(dir: &Path, subnet: Ipv4Net) -> Result<Ipam, IpamError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > 29 {
            return Err(IpamError::SubnetTooSmall(subnet));
        }
        Ok(Ipam {
            dir: dir.to_owned(),
            subnet,
            claims: None,
        })
    }

    /// Shares the subnet with other state directories through the claims
    /// in `claims_dir` (one per bridge, e.g. `/run/kiln/net/kiln0`).
    pub fn with_claims(mut self, claims_dir: &Path) -> Result<Ipam, IpamError> {
        fs::create_dir_all(&self.dir).map_err(|e| IpamError::Write(self.dir.clone(), e))?;
        self.dir = fs::canonicalize(&self.dir).map_err(|e| IpamError::Read(self.dir.clone(), e))?;
        self.claims = Some(Claims::new(claims_dir));
        Ok(self)
    }

    /// The host-wide claims, if the subnet is shared.
    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    fn host_lock(&self) -> Result<Option<HostLock>, IpamError> {
        self.claims.as_ref().map(Claims::lock).transpose()
    }

    fn owner(&self, id: &str, ifname: &str) -> Owner {
        Owner {
            state: self.dir.clone(),
            id: id.to_owned(),
            ifname: ifname.to_owned(),
        }
    }

    /// Claims `ip` for `id` host-wide (true without claims).
    fn claim(
        &self,
        host: &Option<HostLock>,
        ip: Ipv4Addr,
        id: &str,
        ifname: &str,
    ) -> Result<bool, IpamError> {
        match (&self.claims, host) {
            (Some(c), Some(h)) => c.claim(h, ip, &self.owner(id, ifname)),
            _ => Ok(true),
        }
    }

    fn unclaim(&self, host: &Option<HostLock>, ip: Ipv4Addr, id: &str) -> Result<(), IpamError> {
        match (&self.claims, host) {
            (Some(c), Some(h)) => c.release(h, ip, &self.dir, id),
            _ => Ok(()),
        }
    }

    /// Claims every lease of this table host-wide (leases made before
    /// claims existed, or before `/run` was cleared by a reboot). Returns
    /// the ids whose address another live sandbox claims: a conflict only
    /// such old leases can have; new allocations never do.
    pub fn claim_all(&self) -> Result<Vec<String>, IpamError> {
        let _lock = self.lock()?;
        let host = self.host_lock()?;
        let mut conflicts = Vec::new();
        for (id, l) in self.read()?.leases {
            if !self.claim(&host, l.ip, &id, &l.ifname)? {
                conflicts.push(id);
            }
        }
        Ok(conflicts)
    }

    /// The interfaces of live sandboxes of *other* state directories on
    /// this subnet (empty without claims). Stale claims are removed.
    pub fn foreign_ifnames(&self) -> Result<BTreeSet<String>, IpamError> {
        let (Some(c), Some(h)) = (&self.claims, self.host_lock()?) else {
            return Ok(BTreeSet::new());
        };
        Ok(c.live(&h)?
            .into_iter()
            .filter(|(_, o)| o.state != self.dir)
            .map(|(_, o)| o.ifname)
            .collect())
    }

    /// Whether any sandbox of any state directory holds an address here.
    pub fn any_live_on_host(&self) -> Result<bool, IpamError> {
        if !self.leases()?.is_empty() {
            return Ok(true);
        }
        let (Some(c), Some(h)) = (&self.claims, self.host_lock()?) else {
            return Ok(false);
        };
        Ok(!c.live(&h)?.is_empty())
    }

    /// Removes the claims directory if no claim is left (teardown).
    pub fn remove_claims_dir(&self) -> Result<bool, IpamError> {
        let (Some(c), Some(h)) = (&self.claims, self.host_lock()?) else {
            return Ok(true);
        };
        c.remove_if_empty(h)
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The bridge's address: the subnet's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("leases.json")
    }

    fn lock(&self) -> Result<Flock<File>, IpamError> {
        let path = self.dir.join("leases.lock");
        fs::create_dir_all(&self.dir).map_err(|e| IpamError::Write(path.clone(), e))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| IpamError::Write(path.clone(), e))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| IpamError::Lock(path, e))
    }

    fn read(&self) -> Result<Table, IpamError> {
        let path = self.path();
        let table: Table = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| IpamError::Corrupt(path.clone(), e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Table::default(),
            Err(e) => return Err(IpamError::Read(path, e)),
        };
        if let Some(stored) = table.subnet
            && stored != self.subnet
        {
            return Err(IpamError::SubnetChanged {
                path,
                stored,
                configured: self.subnet,
            });
        }
        Ok(table)
    }

    fn write(&self, table: &mut Table) -> Result<(), IpamError> {
        table.version = 1;
        table.subnet = Some(self.subnet);
        let bytes = serde_json::to_vec_pretty(table).expect("a lease table serialises");
        write_atomic(&self.path(), &bytes)
    }

    /// The sandbox's lease, created if it has none (`ifname` names its tap).
    pub fn allocate(&self, id: &str, ifname: &str) -> Result<Lease, IpamError> {
        let _lock = self.lock()?;
        let host = self.host_lock()?;
        let mut table = self.read()?;
        if let Some(l) = table.leases.get(id) {
            if !self.claim(&host, l.ip, id, &l.ifname)? {
                tracing::warn!(sandbox = id, ip = %l.ip, "another state directory's live sandbox claims this lease's address");
            }
            return Ok(l.clone());
        }
        let used: BTreeSet<Ipv4Addr> = table.leases.values().map(|l| l.ip).collect();
        let size = 1u32 << (32 - self.subnet.prefix_len());
        // Host offsets 2..size-2: skip network (0), gateway (1), broadcast (size-1).
        let first = 2;
        let count = size - 3;
        let net = u32::from(self.subnet.network());
        let start = table.cursor.max(first - 1);
        let mut found = None;
        for off in (1..=count).map(|step| first + (start + step - first) % count) {
            let ip = Ipv4Addr::from(net + off);
            if !used.contains(&ip) && self.claim(&host, ip, id, ifname)? {
                found = Some(off);
                break;
            }
        }
        let Some(off) = found else {
            return Err(IpamError::Exhausted(self.subnet));
        };
        let ip = Ipv4Addr::from(net + off);
        let lease = Lease {
            ip,
            mac: mac_for(id, ip),
            ifname: ifname.to_owned(),
        };
        table.cursor = off;
        table.leases.insert(id.to_owned(), lease.clone());
        if let Err(e) = self.write(&mut table) {
            let _ = self.unclaim(&host, ip, id);
            return Err(e);
        }
        Ok(lease)
    }

    /// Frees the sandbox's lease; returns it, or `None` if it had none.
    pub fn release(&self, id: &str) -> Result<Option<Lease>, IpamError> {
        let _lock = self.lock()?;
        let host = self.host_lock()?;
        let mut table = self.read()?;
        let lease = table.leases.remove(id);
        if let Some(l) = &lease {
            self.write(&mut table)?;
            self.unclaim(&host, l.ip, id)?;
        }
        Ok(lease)
    }

    /// Frees the leases of every sandbox not in `live`; returns them.
    pub fn reconcile(&self, live: &BTreeSet<String>) -> Result<Vec<(String, Lease)>, IpamError> {
        let _lock = self.lock()?;
        let host = self.host_lock()?;
        let mut table = self.read()?;
        let dead: Vec<String> = table
            .leases
            .keys()
            .filter(|id| !live.contains(*id))
            .cloned()
            .collect();
        let freed: Vec<(String, Lease)> = dead
            .into_iter()
            .filter_map(|id| table.leases.remove(&id).map(|l| (id, l)))
            .collect();
        if !freed.is_empty() {
            self.write(&mut table)?;
        }
        for (id, l) in &freed {
            self.unclaim(&host, l.ip, id)?;
        }
        Ok(freed)
    }

    /// Every lease, by sandbox id.
    pub fn leases(&self) -> Result<BTreeMap<String, Lease>, IpamError> {
        let _lock = self.lock()?;
        Ok(self.read()?.leases)
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IpamError> {
    let err = |e| IpamError::Write(path.to_owned(), e);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn leases_survive_reopen_and_reconcile_frees_dead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net: Ipv4Net = "10.88.0.0/16".parse().expect("cidr");
        let ipam = Ipam::new(dir.path(), net).expect("ipam");
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        let a = ipam.allocate("a", "kta").expect("a");
        let b = ipam.allocate("b", "ktb").expect("b");
        assert_eq!(a.ip, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(b.ip, Ipv4Addr::new(10, 88, 0, 3));
        assert_eq!(ipam.allocate("a", "kta").expect("again"), a);
        assert_eq!(a.mac[0] & 0x03, 0x02, "locally administered unicast");
        let again = Ipam::new(dir.path(), net).expect("reopen");
        assert_eq!(again.leases().expect("leases").len(), 2);
        let live: BTreeSet<String> = ["b".to_owned()].into();
        let freed = again.reconcile(&live).expect("reconcile");
        assert_eq!(freed, vec![("a".to_owned(), a)]);
        // Round-robin: the next address is new, not a's.
        assert_eq!(
            again.allocate("c", "ktc").expect("c").ip,
            Ipv4Addr::new(10, 88, 0, 4)
        );
        let other: Ipv4Net = "10.89.0.0/16".parse().expect("cidr");
        assert!(matches!(
            Ipam::new(dir.path(), other).expect("ipam").leases(),
            Err(IpamError::SubnetChanged { .. })
        ));
    }

    #[test]
    fn exhausts_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::new(dir.path(), "10.0.0.0/29".parse().expect("cidr")).expect("ipam");
        for i in 0..5 {
            ipam.allocate(&format!("s{i}"), "t").expect("fits");
        }
        assert!(matches!(
            ipam.allocate("s5", "t"),
            Err(IpamError::Exhausted(_))
        ));
        ipam.release("s2").expect("release");
        assert_eq!(
            ipam.allocate("s6", "t").expect("reuse").ip,
            Ipv4Addr::new(10, 0, 0, 4)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of allocations, releases and reconciles keeps every
        /// live lease's address unique, inside the subnet and off the
        /// reserved addresses.
        #[test]
        fn never_two_sandboxes_one_address(ops in prop::collection::vec((0u8..3, 0u8..12), 1..60)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let net: Ipv4Net = "10.9.0.0/28".parse().expect("cidr");
            let ipam = Ipam::new(dir.path(), net).expect("ipam");
            for (op, n) in ops {
                let id = format!("s{n}");
                match op {
                    0 => { let _ = ipam.allocate(&id, "t"); }
                    1 => { ipam.release(&id).expect("release"); }
                    _ => {
                        let live: BTreeSet<String> = (0..12).filter(|i| i % 3 != n % 3).map(|i| format!("s{i}")).collect();
                        ipam.reconcile(&live).expect("reconcile");
                    }
                }
                let leases = ipam.leases().expect("leases");
                let ips: BTreeSet<Ipv4Addr> = leases.values().map(|l| l.ip).collect();
                prop_assert_eq!(ips.len(), leases.len());
                for ip in ips {
                    prop_assert!(net.contains(&ip));
                    prop_assert!(ip != net.network() && ip != net.broadcast() && ip != ipam.gateway());
                }
            }
        }
    }
}
