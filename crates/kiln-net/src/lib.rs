//! Node-local sandbox networking: the per-node bridge, one tap per sandbox,
//! IPAM, NAT egress (nftables), and the eBPF network policy on each tap
//! (programs in `bpf/`, compiled by `build.rs`, loaded with aya).
//!
//! It owns every kernel object it creates (bridge, taps, nftables chains,
//! pinned BPF programs and maps under `/sys/fs/bpf/kiln/`) and finds a
//! crashed node's leftovers again from their names, leases and pins. It must
//! not depend on the node, server, VMM or image crates: it knows sandbox ids,
//! addresses and policies, not VMs.
//!
//! The node service holds one [`Network`] and calls [`Network::attach`]
//! before it starts a sandbox's VMM, [`Network::detach`] after the VMM is
//! gone, [`Network::update_policy`] for `kiln policy set`, and
//! [`Network::reconcile`] with the live sandbox ids at start-up and
//! periodically.

pub mod bpf;
pub mod claims;
pub mod compile;
pub mod dns;
pub mod events;
pub mod host;
pub mod ipam;
pub mod nft;
pub mod policy;
pub mod protect;
pub mod publish;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use bpf::{Counter, Counters, PolicyProgram};
pub use compile::{Compiled, Protected};
pub use ipam::{Ipam, Lease, format_mac, mac_for};
pub use policy::{Action, Policy, Preset, Rule};
pub use publish::{Publish, PublishError};

/// Where the node's network lives. Defaults are documented per field.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Bridge name, `[a-z0-9-]`, at most 15 characters. Default `kiln0`.
    pub bridge: String,
    /// Sandbox subnet; the bridge takes its first address (the gateway).
    /// Default `10.88.0.0/16`: private, 65,533 sandboxes, and outside the
    /// ranges Docker (172.17/16), libvirt (192.168.122/24) and most home and
    /// cloud LANs use; change it where it collides.
    pub subnet: Ipv4Net,
    /// Leases and per-sandbox policies (the node's state dir + `/net`).
    pub state_dir: PathBuf,
    /// BPF pins; one directory per sandbox below. Default `/sys/fs/bpf/kiln`.
    pub bpf_root: PathBuf,
    /// Host-wide address claims ([`claims`]), in `<claims_root>/<bridge>/`:
    /// every state directory using the same bridge shares them, so no
    /// address goes to two live sandboxes and no reconcile deletes another
    /// state directory's taps. Default `/run/kiln/net`.
    pub claims_root: PathBuf,
    /// Prefix of tap names (`<prefix><hash of the sandbox id>`). Default `kt`.
    pub tap_prefix: String,
    /// DNS servers handed to guests when there is no node resolver.
    /// Default: none.
    pub dns: Vec<Ipv4Addr>,
    /// The node runs its resolver ([`dns`]) on the gateway, port 53: guests
    /// get the gateway as their only DNS server, their policy program drops
    /// DNS (TCP/UDP 53, TLS 853) to any other address, and domain rules
    /// admit what it resolves for them. Default: false (the library alone
    /// runs no resolver; whoever sets this runs one).
    pub resolver: bool,
    /// Node-level protected infrastructure ranges (control-plane servers,
    /// management networks): closed like the node's own addresses, opened
    /// only by a rule whose CIDR lies inside one. Default: none; the node
    /// fills it from [`protect::configured`].
    pub protected: Vec<Ipv4Net>,
}

impl NetConfig {
    /// The defaults, with the given state directory.
    pub fn new(state_dir: &Path) -> NetConfig {
        NetConfig {
            bridge: "kiln0".to_owned(),
            subnet: "10.88.0.0/16".parse().expect("constant CIDR parses"),
            state_dir: state_dir.to_owned(),
            bpf_root: PathBuf::from("/sys/fs/bpf/kiln"),
            claims_root: PathBuf::from("/run/kiln/net"),
            tap_prefix: "kt".to_owned(),
            dns: Vec::new(),
            resolver: false,
            protected: Vec::new(),
        }
    }
}

/// What a sandbox's VMM and guest need to know about its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: String,
    /// Host interface (tap) for the VMM.
    pub ifname: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// The policy it was attached with (a restore of a snapshot of this
    /// sandbox attaches its new interface with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
}

/// How the sandbox's host side interface comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// A tap Kiln creates (and deletes on detach): the microVM case.
    Tap,
    /// An interface someone else created (a veth in tests); Kiln attaches it
    /// to the bridge and the program to it, and deletes it on detach.
    Existing(&'a str),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenNetworkError {
    #[error("bridge name {0:?} is not 1-15 of [a-z0-9-]")]
    BridgeName(String),
    #[error("tap prefix {0:?} must be 1-3 of [a-z0-9]")]
    TapPrefix(String),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error("cannot set up bridge {bridge}")]
    Bridge {
        bridge: String,
        #[source]
        source: host::HostNetError,
    },
    #[error("cannot install NAT rules for {bridge}")]
    Nat {
        bridge: String,
        #[source]
        source: nft::NftError,
    },
    #[error(transparent)]
    Protected(#[from] protect::ProtectedCidrsError),
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("sandbox id {0:?} is not 1-64 of [a-z0-9_-]")]
    Id(String),
    #[error("interface name {0:?} is not valid")]
    Ifname(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error("cannot create the sandbox's interface")]
    Link(#[source] host::HostNetError),
    #[error("cannot read the host's addresses")]
    HostAddrs(#[source] host::HostNetError),
    #[error(transparent)]
    Program(#[from] bpf::AttachProgramError),
    #[error("cannot save the sandbox's policy")]
    SavePolicy(#[source] ipam::IpamError),
}

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Program(#[from] bpf::RemoveProgramError),
    #[error("cannot delete interface {0}")]
    Link(String, #[source] host::HostNetError),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error("cannot remove {0}")]
    State(PathBuf, #[source] io::Error),
    #[error("cannot remove published ports")]
    Unpublish(#[source] nft::NftError),
}

#[derive(Debug, thiserror::Error)]
pub enum UpdatePolicyError {
    #[error("sandbox {0} has no network")]
    NotAttached(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot read the host's addresses")]
    HostAddrs(#[source] host::HostNetError),
    #[error(transparent)]
    Maps(#[from] bpf::WriteMapsError),
    #[error("cannot save the sandbox's policy")]
    SavePolicy(#[source] ipam::IpamError),
    #[error("cannot read the sandbox's saved policy {0}")]
    ReadPolicy(PathBuf, #[source] io::Error),
    #[error("the sandbox's saved policy {0} is corrupt")]
    CorruptPolicy(PathBuf, #[source] serde_json::Error),
    #[error("cannot keep the sandbox's drop events in {0}")]
    Events(PathBuf, #[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Policy(#[from] UpdatePolicyError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot read the host's addresses")]
    HostAddrs(#[source] host::HostNetError),
    #[error(transparent)]
    Maps(#[from] bpf::WriteMapsError),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot lock {0}")]
pub struct LockError(PathBuf, #[source] io::Error);

/// What [`Network::reconcile`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Sandboxes whose lease, program and interface were removed.
    pub released: Vec<String>,
    /// Bridge ports without a live lease that were deleted.
    pub orphan_links: Vec<String>,
    /// Pin directories without a live lease that were removed.
    pub orphan_pins: Vec<String>,
}

/// The node's sandbox network.
#[derive(Debug)]
pub struct Network {
    cfg: NetConfig,
    ipam: Ipam,
    /// The protected ranges as last read, for DNS admissions (read at most
    /// once a second: reading the host's addresses runs `ip`).
    protected_cache: std::sync::Mutex<Option<(std::time::Instant, Protected)>>,
}

/// `cfg` if its bridge name and tap prefix are usable.
fn checked(cfg: NetConfig) -> Result<NetConfig, OpenNetworkError> {
    if !host::valid_ifname(&cfg.bridge) {
        return Err(OpenNetworkError::BridgeName(cfg.bridge));
    }
    if cfg.tap_prefix.is_empty()
        || cfg.tap_prefix.len() > 3
        || !cfg
            .tap_prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(OpenNetworkError::TapPrefix(cfg.tap_prefix));
    }
    Ok(cfg)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Network {
    /// Sets up (idempotently) the bridge, forwarding, NAT and bpffs.
    pub fn open(cfg: NetConfig) -> Result<Network, OpenNetworkError> {
        let cfg = checked(cfg)?;
        let ipam = Ipam::new(&cfg.state_dir, cfg.subnet)?
            .with_claims(&cfg.claims_root.join(&cfg.bridge))?;
        for id in ipam.claim_all()? {
            warn!(sandbox = %id, "another state directory's live sandbox has this sandbox's address");
        }
        let bridge_err = |source| OpenNetworkError::Bridge {
            bridge: cfg.bridge.clone(),
            source,
        };
        host::ensure_bridge(&cfg.bridge, ipam.gateway(), ipam.subnet()).map_err(bridge_err)?;
        host::enable_forwarding().map_err(bridge_err)?;
        nft::ensure_bridge_rules(&cfg.bridge, ipam.subnet()).map_err(|source| {
            OpenNetworkError::Nat {
                bridge: cfg.bridge.clone(),
                source,
            }
        })?;
        info!(bridge = %cfg.bridge, subnet = %ipam.subnet(), "sandbox network ready");
        Ok(Network {
            cfg,
            ipam,
            protected_cache: std::sync::Mutex::new(None),
        })
    }

    /// A handle for the per-sandbox parts only (policy maps, counters,
    /// drop events, saved policies): sets up nothing on the host (no
    /// bridge, forwarding or nftables changes, no address claims), so
    /// frequent callers (the supervisor's drop-event drain) cost nothing to
    /// the rest of the node. `attach` needs [`Network::open`].
    pub fn view(cfg: NetConfig) -> Result<Network, OpenNetworkError> {
        let ipam = Ipam::new(&cfg.state_dir, cfg.subnet)?;
        Ok(Network {
            cfg,
            ipam,
            protected_cache: std::sync::Mutex::new(None),
        })
    }

    /// A handle for cleanup ([`Network::reconcile`], `detach`): the
    /// host-wide address claims as [`Network::open`] reads them, but no
    /// bridge, forwarding or nftables set-up, so a reconcile on a host
    /// whose bridge is gone (removed, or never made since a reboot) cleans
    /// up what its state names without creating the bridge again.
    pub fn for_cleanup(cfg: NetConfig) -> Result<Network, OpenNetworkError> {
        // Checked as for `open`: reconcile deletes bridge ports by prefix.
        let cfg = checked(cfg)?;
        let ipam = Ipam::new(&cfg.state_dir, cfg.subnet)?
            .with_claims(&cfg.claims_root.join(&cfg.bridge))?;
        Ok(Network {
            cfg,
            ipam,
            protected_cache: std::sync::Mutex::new(None),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// The tap name of a sandbox: the prefix and a hash of its id (15 chars max).
    pub fn tap_name(&self, id: &str) -> String {
        let h = hex(&Sha256::digest(id.as_bytes()));
        let keep = 15 - self.cfg.tap_prefix.len();
        format!("{}{}", self.cfg.tap_prefix, &h[..keep])
    }

    fn pin_dir(&self, id: &str) -> PathBuf {
        self.cfg.bpf_root.join(id)
    }

    fn policy_path(&self, id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("policies")
            .join(format!("{id}.json"))
    }

    fn lock(&self, id: &str) -> Result<Flock<File>, LockError> {
        let dir = self.cfg.state_dir.join("locks");
        let path = dir.join(format!("{id}.lock"));
        fs::create_dir_all(&dir).map_err(|e| LockError(path.clone(), e))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LockError(path.clone(), e))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| LockError(path, e.into()))
    }

    /// The protected destinations: always-protected ranges, the sandbox
    /// subnet, the host's addresses as of now, and the configured
    /// infrastructure ranges ([`NetConfig::protected`]).
    pub fn protected(&self) -> Result<Protected, host::HostNetError> {
        let mut addrs = host::host_addresses()?;
        addrs.push(self.ipam.gateway());
        // The cluster list changes while a `Network` is held (the resolver
        // holds one for its life): read it fresh.
        let mut extra = self.cfg.protected.clone();
        extra.extend(protect::cluster_file(&self.cfg.state_dir));
        Ok(Protected::new(self.ipam.subnet(), &addrs).with_extra(&extra))
    }

    /// Gives a sandbox its address, MAC, interface and policy program.
    /// Idempotent: attaching an attached sandbox keeps its lease and
    /// reinstalls its interface and program with `policy`.
    pub fn attach(
        &self,
        id: &str,
        endpoint: Endpoint<'_>,
        policy: &Policy,
    ) -> Result<Attachment, AttachError> {
        if !valid_id(id) {
            return Err(AttachError::Id(id.to_owned()));
        }
        let ifname = match endpoint {
            Endpoint::Tap => self.tap_name(id),
            Endpoint::Existing(n) => n.to_owned(),
        };
        if !host::valid_ifname(&ifname) {
            return Err(AttachError::Ifname(ifname));
        }
        let started = std::time::Instant::now();
        let _lock = self.lock(id)?;
        let lease = self.ipam.allocate(id, &ifname)?;
        let result = self.install(id, &lease, endpoint, policy);
        tracing::debug!(sandbox = id, elapsed = ?started.elapsed(), ok = result.is_ok(), "attach");
        if result.is_err() {
            let _ = bpf::remove_pins(&self.pin_dir(id));
            if endpoint == Endpoint::Tap {
                let _ = host::delete_link(&ifname);
            }
            let _ = self.ipam.release(id);
        }
        result
    }

    fn install(
        &self,
        id: &str,
        lease: &Lease,
        endpoint: Endpoint<'_>,
        policy: &Policy,
    ) -> Result<Attachment, AttachError> {
        match endpoint {
            Endpoint::Tap => host::ensure_tap(&lease.ifname, &self.cfg.bridge),
            Endpoint::Existing(n) => host::attach_to_bridge(n, &self.cfg.bridge),
        }
        .map_err(AttachError::Link)?;
        let t_link = std::time::Instant::now();
        let _ = host::flush_neighbour(&self.cfg.bridge, lease.ip);
        let protected = self.protected().map_err(AttachError::HostAddrs)?;
        let compiled = compile::compile(&policy.egress, policy.default, &protected);
        ipam::write_atomic(
            &self.policy_path(id),
            &serde_json::to_vec_pretty(policy).expect("a policy serialises"),
        )
        .map_err(AttachError::SavePolicy)?;
        PolicyProgram::attach(
            &self.pin_dir(id),
            &lease.ifname,
            lease.mac,
            lease.ip,
            self.cfg.resolver.then(|| self.ipam.gateway()),
            &compiled,
        )?;
        tracing::debug!(program = ?t_link.elapsed(), "attach: program loaded and pinned");
        info!(sandbox = id, ip = %lease.ip, ifname = %lease.ifname, "sandbox network attached");
        Ok(Attachment {
            id: id.to_owned(),
            ifname: lease.ifname.clone(),
            mac: lease.mac,
            ip: lease.ip,
            prefix_len: self.ipam.subnet().prefix_len(),
            gateway: self.ipam.gateway(),
            dns: if self.cfg.resolver {
                vec![self.ipam.gateway()]
            } else {
                self.cfg.dns.clone()
            },
            policy: Some(policy.clone()),
        })
    }

    /// Replaces a sandbox's policy in place (no reload, no detach). The new
    /// policy was validated when it was built; on error the old one stays.
    pub fn update_policy(&self, id: &str, policy: &Policy) -> Result<(), UpdatePolicyError> {
        let _lock = self.lock(id)?;
        self.update_policy_locked(id, policy)
    }

    /// Recompiles sandbox `id`'s saved policy against the protected ranges
    /// in force now (rules unchanged), under the sandbox's lock, so a
    /// concurrent `update_policy` is never undone by a stale copy.
    pub fn recompile(&self, id: &str) -> Result<(), UpdatePolicyError> {
        let _lock = self.lock(id)?;
        let policy = self.saved_policy(id)?;
        self.update_policy_locked(id, &policy)
    }

    fn update_policy_locked(&self, id: &str, policy: &Policy) -> Result<(), UpdatePolicyError> {
        let prog = PolicyProgram::open(&self.pin_dir(id))
            .ok_or_else(|| UpdatePolicyError::NotAttached(id.to_owned()))?;
        let protected = self.protected().map_err(UpdatePolicyError::HostAddrs)?;
        let compiled = compile::compile(&policy.egress, policy.default, &protected);
        // Addresses admitted for a domain rule stay admitted for the new
        // policy's rules with the same pattern (until their TTL ends).
        let old = self.saved_policy(id);
        let carry = match &old {
            Ok(old) => dns::carry_admissions(&old.egress, &policy.egress),
            Err(e) => {
                warn!(sandbox = id, error = %e, "no saved policy: domain admissions end");
                Vec::new()
            }
        };
        // Drop events so far name rules of the old policy: keep them with
        // its rule texts (best effort; events are not worth failing for).
        match prog.drain_events() {
            Ok(raw) if !raw.is_empty() => {
                let evs = events::convert(&raw, old.as_ref().ok());
                if let Err(e) = events::append_and_read(&self.events_path(id), &evs) {
                    warn!(sandbox = id, error = %e, "cannot keep drop events");
                }
            }
            Ok(_) => {}
            Err(e) => warn!(sandbox = id, error = %e, "cannot read drop events"),
        }
        prog.update(&compiled, &carry)?;
        ipam::write_atomic(
            &self.policy_path(id),
            &serde_json::to_vec_pretty(policy).expect("a policy serialises"),
        )
        .map_err(UpdatePolicyError::SavePolicy)?;
        info!(sandbox = id, rules = policy.egress.len(), "policy updated");
        Ok(())
    }

    /// The sandbox's policy and the counters of its rules.
    pub fn policy(&self, id: &str) -> Result<(Policy, Counters), UpdatePolicyError> {
        let prog = PolicyProgram::open(&self.pin_dir(id))
            .ok_or_else(|| UpdatePolicyError::NotAttached(id.to_owned()))?;
        let policy = self.saved_policy(id)?;
        let counters = prog.counters(policy.egress.len())?;
        Ok((policy, counters))
    }

    /// The drop events of sandbox `id` ([`events`]): drains its program's
    /// ring buffer into its bounded events file and returns the file's
    /// events, oldest first. A sandbox without a network has none.
    pub fn drop_events(&self, id: &str) -> Result<Vec<events::DropEvent>, UpdatePolicyError> {
        let _lock = self.lock(id)?;
        let path = self.events_path(id);
        let new = match PolicyProgram::open(&self.pin_dir(id)) {
            Some(prog) => {
                let raw = prog.drain_events()?;
                let policy = self.saved_policy(id).ok();
                events::convert(&raw, policy.as_ref())
            }
            None => vec![],
        };
        events::append_and_read(&path, &new).map_err(|e| UpdatePolicyError::Events(path, e))
    }

    fn events_path(&self, id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("events")
            .join(format!("{id}.jsonl"))
    }

    fn saved_policy(&self, id: &str) -> Result<Policy, UpdatePolicyError> {
        let path = self.policy_path(id);
        let bytes = fs::read(&path).map_err(|e| UpdatePolicyError::ReadPolicy(path.clone(), e))?;
        serde_json::from_slice(&bytes).map_err(|e| UpdatePolicyError::CorruptPolicy(path, e))
    }

    /// Whether sandbox `id`'s policy lets the node's resolver look `name`
    /// up for it ([`dns::may_resolve`]).
    pub fn may_resolve(&self, id: &str, name: &str) -> Result<bool, UpdatePolicyError> {
        Ok(dns::may_resolve(&self.saved_policy(id)?, name))
    }

    /// The sandbox holding address `ip`, if any (the lease table).
    pub fn sandbox_of(&self, ip: Ipv4Addr) -> Result<Option<String>, ipam::IpamError> {
        Ok(self
            .ipam
            .leases()?
            .into_iter()
            .find(|(_, l)| l.ip == ip)
            .map(|(id, _)| id))
    }

    /// Admits the addresses a DNS answer for `name` gave sandbox `id`, each
    /// `(address, ttl seconds)`, for the domain rules of its policy that
    /// match `name`, until the TTL ends. Protected addresses (the node,
    /// sandboxes, link-local, ...) are never admitted. Returns how many
    /// addresses were admitted (0 when no domain rule matches `name`).
    pub fn admit(
        &self,
        id: &str,
        name: &str,
        answers: &[(Ipv4Addr, u32)],
    ) -> Result<usize, AdmitError> {
        let _lock = self.lock(id)?;
        let prog = PolicyProgram::open(&self.pin_dir(id))
            .ok_or_else(|| UpdatePolicyError::NotAttached(id.to_owned()))?;
        let policy = self.saved_policy(id)?;
        let rules = dns::matching_rules(&policy.egress, name);
        if rules.is_empty() || answers.is_empty() {
            return Ok(0);
        }
        let protected = self.protected_recent().map_err(AdmitError::HostAddrs)?;
        let now = bpf::monotonic_ns();
        let mut admitted = 0;
        for &(addr, ttl) in answers {
            if protected.contains(addr) {
                warn!(sandbox = id, name, %addr, "a name resolved to a protected address: not admitted");
                continue;
            }
            let ttl = u64::from(ttl.min(dns::MAX_ADMIT_TTL));
            prog.admit(addr, &rules, now + ttl * 1_000_000_000)?;
            admitted += 1;
        }
        Ok(admitted)
    }

    fn protected_recent(&self) -> Result<Protected, host::HostNetError> {
        let mut cache = self
            .protected_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, p)) = cache.as_ref()
            && at.elapsed() < std::time::Duration::from_secs(1)
        {
            return Ok(p.clone());
        }
        let p = self.protected()?;
        *cache = Some((std::time::Instant::now(), p.clone()));
        Ok(p)
    }

    /// The addresses admitted for sandbox `id`'s domain rules, in force now.
    pub fn admissions(&self, id: &str) -> Result<Vec<bpf::Admission>, AdmitError> {
        let prog = PolicyProgram::open(&self.pin_dir(id))
            .ok_or_else(|| UpdatePolicyError::NotAttached(id.to_owned()))?;
        Ok(prog.admissions()?)
    }

    /// Removes expired admissions of every sandbox (the programs already
    /// ignore them; this frees map space).
    pub fn sweep_admissions(&self) -> Result<usize, ipam::IpamError> {
        let mut n = 0;
        for id in self.ipam.leases()?.keys() {
            if let Some(prog) = PolicyProgram::open(&self.pin_dir(id)) {
                n += prog.sweep().unwrap_or(0);
            }
        }
        Ok(n)
    }

    /// Refuses ports that cannot be published (see [`publish::check`]).
    pub fn check_publish(&self, ports: &[Publish]) -> Result<(), PublishError> {
        publish::check(&self.cfg.bridge, ports)
    }

    /// Publishes `ports` of an attached sandbox on the host (DNAT to its
    /// address); removed by [`Network::detach`].
    pub fn publish(&self, a: &Attachment, ports: &[Publish]) -> Result<(), PublishError> {
        let _lock = self.lock(&a.id)?;
        publish::check(&self.cfg.bridge, ports)?;
        publish::add(&self.cfg.bridge, &a.id, a.ip, ports)?;
        info!(sandbox = %a.id, ports = ?ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "ports published");
        Ok(())
    }

    /// Removes a sandbox's published ports, program, interface and lease.
    /// Idempotent.
    pub fn detach(&self, id: &str) -> Result<(), DetachError> {
        let _lock = self.lock(id)?;
        publish::remove(&self.cfg.bridge, &|owner| owner == id).map_err(DetachError::Unpublish)?;
        bpf::remove_pins(&self.pin_dir(id))?;
        if let Some(lease) = self.ipam.leases()?.get(id) {
            host::delete_link(&lease.ifname)
                .map_err(|e| DetachError::Link(lease.ifname.clone(), e))?;
            let _ = host::flush_neighbour(&self.cfg.bridge, lease.ip);
        }
        self.ipam.release(id)?;
        let path = self.policy_path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DetachError::State(path, e)),
        }
        let _ = fs::remove_file(self.events_path(id));
        let _ = fs::remove_file(self.cfg.state_dir.join("locks").join(format!("{id}.lock")));
        info!(sandbox = id, "sandbox network detached");
        Ok(())
    }

    /// Frees everything of sandboxes not in `live`: leases, programs, taps,
    /// and bridge ports or pin directories no lease explains (a crash's
    /// leftovers). Call at start-up and periodically.
    pub fn reconcile(&self, live: &BTreeSet<String>) -> Result<ReconcileReport, DetachError> {
        let mut report = ReconcileReport::default();
        for (id, _) in self.ipam.leases()? {
            if !live.contains(&id) {
                self.detach(&id)?;
                report.released.push(id);
            }
        }
        let leases = self.ipam.leases()?;
        // Published ports of sandboxes without a lease (a crash between
        // publishing and detaching). Other state dirs share the bridge's
        // chains: only ids with a saved policy here are judged.
        let orphans = publish::remove(&self.cfg.bridge, &|owner| {
            !leases.contains_key(owner) && self.owns_pin(owner, &leases)
        })
        .map_err(DetachError::Unpublish)?;
        report.orphan_links.extend(
            orphans
                .into_iter()
                .map(|id| format!("published ports of {id}")),
        );
        let known: BTreeSet<&str> = leases.values().map(|l| l.ifname.as_str()).collect();
        let ports = host::bridge_ports(&self.cfg.bridge)
            .map_err(|e| DetachError::Link(self.cfg.bridge.clone(), e))?;
        // Read after the ports: another state directory claims an address
        // before it creates the tap, so every port listed that is theirs
        // has its claim by now (or is being detached by them anyway).
        let foreign = self.ipam.foreign_ifnames()?;
        for port in ports {
            if port.starts_with(&self.cfg.tap_prefix)
                && !known.contains(port.as_str())
                && !foreign.contains(&port)
            {
                warn!(ifname = %port, "removing a tap no sandbox owns");
                host::delete_link(&port).map_err(|e| DetachError::Link(port.clone(), e))?;
                report.orphan_links.push(port);
            }
        }
        if let Ok(entries) = fs::read_dir(&self.cfg.bpf_root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Only ids this network leased can be judged here: other
                // networks (other bridges) share the pin root.
                if self.owns_pin(&name, &leases) && !leases.contains_key(&name) {
                    warn!(sandbox = %name, "removing a policy program no sandbox owns");
                    bpf::remove_pins(&e.path())?;
                    report.orphan_pins.push(name);
                }
            }
        }
        Ok(report)
    }

    fn owns_pin(&self, name: &str, leases: &std::collections::BTreeMap<String, Lease>) -> bool {
        if leases.contains_key(name) {
            return true;
        }
        // A pin directory whose saved policy lives in our state dir is ours.
        self.policy_path(name).exists()
    }

    /// Removes the bridge, its NAT chains and its claims directory, when no
    /// sandbox of any state directory holds an address on it. Returns false
    /// (and removes nothing) while leases or other live claims remain.
    pub fn teardown(&self) -> Result<bool, DetachError> {
        if self.ipam.any_live_on_host()? {
            return Ok(false);
        }
        nft::remove_bridge_rules(&self.cfg.bridge).map_err(|e| {
            DetachError::Link(
                self.cfg.bridge.clone(),
                host::HostNetError::Failed {
                    args: "nft".into(),
                    stderr: e.to_string(),
                },
            )
        })?;
        host::delete_link(&self.cfg.bridge)
            .map_err(|e| DetachError::Link(self.cfg.bridge.clone(), e))?;
        self.ipam.remove_claims_dir()?;
        Ok(true)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
