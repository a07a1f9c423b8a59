//! Loads the policy program (`bpf/policy.c`) onto a tap and owns its pins.
//!
//! Layout under a per-sandbox pin directory (`/sys/fs/bpf/kiln/<sandbox>/`):
//! `link` (the TCX link holding `kiln_egress` on the tap's ingress hook: frames
//! from the guest), `link_in` (`kiln_ingress` on its egress hook: frames to the
//! guest) and one file per map. The pins are the only owner: no process has to stay
//! alive, a restarted node reopens the maps from their pins to update the
//! policy or read counters, and removing the directory's files detaches the
//! program and frees the maps. A directory there without a live sandbox is a
//! crashed node's leftover, which `reconcile` removes.
//!
//! Invariants: the object is loaded and its maps are written (identity,
//! policy generation 0) before the program is attached, so no packet ever
//! sees an empty policy. Updates write the inactive generation, then flip
//! `active` with one aligned 32-bit store. Callers serialise updates per
//! sandbox (the [`crate::Network`] takes a per-sandbox file lock).

#![allow(unsafe_code)]

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::links::FdLink;
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfError, Pod};

use crate::compile::{Compiled, MASK_WORDS};
use crate::policy::{Action, MAX_RULES};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.o"));

const SLOTS: u32 = MAX_RULES as u32 + 3;
const SLOT_DEFAULT: u32 = MAX_RULES as u32;
const SLOT_PROTECTED: u32 = MAX_RULES as u32 + 1;
const SLOT_REPLY: u32 = MAX_RULES as u32 + 2;
const DROP_REASONS: [&str; 7] = [
    "spoofed-mac",
    "spoofed-ip",
    "bad-arp",
    "ipv6",
    "ethertype",
    "malformed",
    "dns-elsewhere",
];
const MAPS: [&str; 12] = [
    "events",
    "evstate",
    "flows",
    "dns",
    "identity",
    "active",
    "gens",
    "rules",
    "prefixes0",
    "prefixes1",
    "counters",
    "drops",
];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Identity {
    mac: [u8; 6],
    pad: [u8; 2],
    ip: u32,
    resolver: u32,
}
// SAFETY: repr(C), only integer fields, no padding bytes left implicit.
unsafe impl Pod for Identity {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GenConfig {
    default_action: u32,
}
// SAFETY: repr(C) with one u32.
unsafe impl Pod for GenConfig {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawRule {
    proto: u8,
    action: u8,
    flags: u8,
    pad: u8,
    port_lo: u16,
    port_hi: u16,
}
// SAFETY: repr(C), integer fields laid out without implicit padding (8 bytes).
unsafe impl Pod for RawRule {}

#[repr(C)]
#[derive(Clone, Copy)]
struct LpmVal {
    mask: [u64; MASK_WORDS],
    protected: u32,
    pad: u32,
}
// SAFETY: repr(C), integer fields, size a multiple of 8 with explicit padding.
unsafe impl Pod for LpmVal {}

/// An address the node's resolver admitted (`struct admit` in policy.c).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawAdmit {
    expires_ns: u64,
    mask: [[u64; MASK_WORDS]; 2],
}
// SAFETY: repr(C), only u64 fields.
unsafe impl Pod for RawAdmit {}

/// One address admitted for domain rules, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub addr: Ipv4Addr,
    /// CLOCK_MONOTONIC nanoseconds after which the program ignores it.
    pub expires_ns: u64,
    /// Rule indices (of the policy in force) it is admitted for.
    pub rules: Vec<usize>,
}

/// One record of the program's `events` ring buffer (`struct drop_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDropEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    pub daddr: Ipv4Addr,
    /// Rule index, or one of the `EV_RULE_*` codes.
    pub rule: u32,
    pub dport: u16,
    pub proto: u8,
    /// Events the rate limit dropped before this one.
    pub suppressed: u32,
}

/// `rule` of an event the default action dropped.
pub const EV_RULE_DEFAULT: u32 = 0xffff_ffff;
/// `rule` of an event dropped as a protected destination.
pub const EV_RULE_PROTECTED: u32 = 0xffff_fffe;
/// `rule` of a DNS query to a server other than the node's resolver.
pub const EV_RULE_DNS: u32 = 0xffff_fffd;

impl RawDropEvent {
    /// Parses the 24-byte record (native endian, as the kernel wrote it).
    fn parse(b: &[u8]) -> Option<RawDropEvent> {
        if b.len() < 24 {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[0..8]);
        Some(RawDropEvent {
            time_ns: u64::from_ne_bytes(t),
            daddr: Ipv4Addr::from([b[8], b[9], b[10], b[11]]),
            rule: u32_at(12),
            dport: u16::from_ne_bytes([b[16], b[17]]),
            proto: b[18],
            suppressed: u32_at(20),
        })
    }
}

/// How many Kiln policy programs (`kiln_egress`, `kiln_ingress`: two per
/// attached sandbox) the kernel holds, whoever loaded them: for leak checks.
pub fn loaded_policy_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.name_as_str(), Some("kiln_egress" | "kiln_ingress")))
        .count()
}

/// CLOCK_MONOTONIC in nanoseconds (what `bpf_ktime_get_ns` reads).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn mask_bits(mask: &[u64; MASK_WORDS]) -> Vec<usize> {
    (0..MAX_RULES)
        .filter(|i| mask[i / 64] & (1u64 << (i % 64)) != 0)
        .collect()
}

/// Packets and bytes one rule (or the default) let through and dropped.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counter {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}
// SAFETY: repr(C) with four u64.
unsafe impl Pod for Counter {}

impl Counter {
    fn add(&mut self, o: &Counter) {
        self.allowed_packets += o.allowed_packets;
        self.allowed_bytes += o.allowed_bytes;
        self.dropped_packets += o.dropped_packets;
        self.dropped_bytes += o.dropped_bytes;
    }
}

/// Counters of the policy in force (reset when a policy is set).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// One per rule, in rule order.
    pub rules: Vec<Counter>,
    /// Packets no rule matched that got the default.
    pub default: Counter,
    /// Packets to protected destinations no rule opened.
    pub protected: Counter,
    /// Replies within flows a peer started (TCP after its SYN, UDP/ICMP
    /// after its first packet), let through without the rules.
    pub replies: Counter,
    /// Drops before the policy (spoofing, IPv6, ...), by reason.
    pub drops: Vec<(String, Counter)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachProgramError {
    #[error("cannot mount the BPF filesystem on /sys/fs/bpf")]
    MountBpffs(#[source] nix::Error),
    #[error("cannot create pin directory {0}")]
    PinDir(PathBuf, #[source] io::Error),
    #[error("the kernel refused the policy object")]
    Load(#[source] EbpfError),
    #[error("the object has no map or program {0}")]
    Missing(&'static str),
    #[error("cannot pin map {name}")]
    PinMap {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the verifier refused the policy program")]
    Verify(#[source] ProgramError),
    #[error("cannot attach the policy program to {0}")]
    Attach(String, #[source] ProgramError),
    #[error("cannot pin the program's link")]
    PinLink(#[source] aya::pin::PinError),
    #[error("cannot write the initial policy")]
    Write(#[from] WriteMapsError),
}

#[derive(Debug, thiserror::Error)]
pub enum WriteMapsError {
    #[error("cannot open pinned map {0}")]
    Open(PathBuf, #[source] MapError),
    #[error("map {name}: {op} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot count CPUs")]
    Cpus(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot remove pinned program {dir}")]
pub struct RemoveProgramError {
    dir: PathBuf,
    #[source]
    source: io::Error,
}

/// Mounts bpffs on `/sys/fs/bpf` when nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<(), AttachProgramError> {
    let path = Path::new("/sys/fs/bpf");
    if let Ok(s) = nix::sys::statfs::statfs(path)
        && s.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(AttachProgramError::MountBpffs)
}

/// The policy program of one sandbox, known by its pin directory.
#[derive(Debug, Clone)]
pub struct PolicyProgram {
    dir: PathBuf,
}

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(MapError) -> WriteMapsError {
    move |source| WriteMapsError::Map { name, op, source }
}

impl PolicyProgram {
    /// Loads the program for a sandbox with `mac` and `ip`, writes `policy`,
    /// attaches it to the ingress hook of `ifname` and pins everything under
    /// `dir`. With a `resolver`, DNS (TCP/UDP 53, TLS 853) may go only to
    /// it. On error nothing stays pinned.
    pub fn attach(
        dir: &Path,
        ifname: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
        resolver: Option<Ipv4Addr>,
        policy: &Compiled,
    ) -> Result<PolicyProgram, AttachProgramError> {
        ensure_bpffs()?;
        // A leftover of a crash under the same name would make pinning fail.
        let _ = remove_pins(dir);
        fs::create_dir_all(dir).map_err(|e| AttachProgramError::PinDir(dir.to_owned(), e))?;
        let prog = PolicyProgram {
            dir: dir.to_owned(),
        };
        let result = prog.load_and_attach(ifname, mac, ip, resolver, policy);
        if result.is_err() {
            let _ = remove_pins(dir);
        }
        result.map(|()| prog)
    }

    fn load_and_attach(
        &self,
        ifname: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
        resolver: Option<Ipv4Addr>,
        policy: &Compiled,
    ) -> Result<(), AttachProgramError> {
        let t0 = std::time::Instant::now();
        let mut ebpf = Ebpf::load(OBJECT).map_err(AttachProgramError::Load)?;
        tracing::debug!(elapsed = ?t0.elapsed(), "policy object loaded (maps created)");
        for name in MAPS {
            let map = ebpf.map(name).ok_or(AttachProgramError::Missing(name))?;
            map.pin(self.dir.join(name))
                .map_err(|source| AttachProgramError::PinMap { name, source })?;
        }
        let mut identity: Array<MapData, Identity> = self.array("identity")?;
        identity
            .set(
                0,
                Identity {
                    mac,
                    pad: [0; 2],
                    ip: u32::from_ne_bytes(ip.octets()),
                    resolver: resolver.map_or(0, |r| u32::from_ne_bytes(r.octets())),
                },
                0,
            )
            .map_err(map_err("identity", "set"))?;
        tracing::debug!(elapsed = ?t0.elapsed(), "maps pinned, identity written");
        // Generation 1 is written, then `active` flips from 0 to 1: the same
        // path every later update takes.
        self.update(policy, &[])?;

        // Frames to the guest first (it records the flows peers start), then
        // frames from the guest: both are enforcing once the second is in.
        for (prog_name, hook, pin) in [
            ("kiln_ingress", TcAttachType::Egress, "link_in"),
            ("kiln_egress", TcAttachType::Ingress, "link"),
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(prog_name)
                .ok_or(AttachProgramError::Missing(prog_name))?
                .try_into()
                .map_err(AttachProgramError::Verify)?;
            let t1 = std::time::Instant::now();
            program.load().map_err(AttachProgramError::Verify)?;
            tracing::debug!(program = prog_name, elapsed = ?t1.elapsed(), "verified");
            let link_id = program
                .attach(ifname, hook)
                .map_err(|e| AttachProgramError::Attach(ifname.to_owned(), e))?;
            let link = program
                .take_link(link_id)
                .map_err(|e| AttachProgramError::Attach(ifname.to_owned(), e))?;
            let fd_link: FdLink = link.try_into().map_err(|e| {
                AttachProgramError::Attach(
                    ifname.to_owned(),
                    ProgramError::IOError(io::Error::other(format!(
                        "not a TCX link (kernel older than 6.6?): {e}"
                    ))),
                )
            })?;
            fd_link
                .pin(self.dir.join(pin))
                .map_err(AttachProgramError::PinLink)?;
        }
        Ok(())
    }

    /// The program pinned in `dir` (by an earlier `attach`, maybe by another process).
    pub fn open(dir: &Path) -> Option<PolicyProgram> {
        dir.join("link").exists().then(|| PolicyProgram {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self, name: &'static str) -> Result<MapData, WriteMapsError> {
        let path = self.dir.join(name);
        MapData::from_pin(&path).map_err(|e| WriteMapsError::Open(path, e))
    }

    fn array<V: Pod>(&self, name: &'static str) -> Result<Array<MapData, V>, WriteMapsError> {
        Array::try_from(Map::Array(self.map(name)?)).map_err(map_err(name, "open"))
    }

    fn percpu<V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<PerCpuArray<MapData, V>, WriteMapsError> {
        PerCpuArray::try_from(Map::PerCpuArray(self.map(name)?)).map_err(map_err(name, "open"))
    }

    fn trie(&self, name: &'static str) -> Result<LpmTrie<MapData, u32, LpmVal>, WriteMapsError> {
        LpmTrie::try_from(Map::LpmTrie(self.map(name)?)).map_err(map_err(name, "open"))
    }

    /// Takes every drop event the program queued since the last call (the
    /// ring buffer is consumed: one reader at a time, under the sandbox's
    /// lock). A program pinned before events existed has none.
    pub fn drain_events(&self) -> Result<Vec<RawDropEvent>, WriteMapsError> {
        if !self.dir.join("events").exists() {
            return Ok(vec![]);
        }
        let mut ring = aya::maps::RingBuf::try_from(Map::RingBuf(self.map("events")?))
            .map_err(map_err("events", "open"))?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(e) = RawDropEvent::parse(&item) {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn admits(&self) -> Result<aya::maps::HashMap<MapData, u32, RawAdmit>, WriteMapsError> {
        aya::maps::HashMap::try_from(Map::HashMap(self.map("dns")?)).map_err(map_err("dns", "open"))
    }

    /// Admits `addr` for the domain rules `rules` (indices in the policy in
    /// force) until `expires_ns` (CLOCK_MONOTONIC). An admission still in
    /// force keeps its rules and the later expiry. Callers hold the
    /// sandbox's lock (so no update flips the generation meanwhile).
    pub fn admit(
        &self,
        addr: Ipv4Addr,
        rules: &[usize],
        expires_ns: u64,
    ) -> Result<(), WriteMapsError> {
        let active: Array<MapData, u32> = self.array("active")?;
        let generation = (active.get(&0, 0).map_err(map_err("active", "get"))? & 1) as usize;
        let mut map = self.admits()?;
        let key = u32::from_ne_bytes(addr.octets());
        let now = monotonic_ns();
        let mut entry = match map.get(&key, 0) {
            Ok(e) if e.expires_ns > now => e,
            _ => RawAdmit {
                expires_ns: 0,
                mask: [[0; MASK_WORDS]; 2],
            },
        };
        entry.expires_ns = entry.expires_ns.max(expires_ns);
        for &r in rules.iter().filter(|&&r| r < MAX_RULES) {
            entry.mask[generation][r / 64] |= 1u64 << (r % 64);
        }
        if let Err(e) = map.insert(key, entry, 0) {
            // Full: make room from what has expired, then try once more.
            self.sweep()?;
            map.insert(key, entry, 0)
                .map_err(|_| e)
                .map_err(map_err("dns", "insert"))?;
        }
        Ok(())
    }

    /// Removes expired admissions (the program already ignores them);
    /// returns how many.
    pub fn sweep(&self) -> Result<usize, WriteMapsError> {
        let mut map = self.admits()?;
        let now = monotonic_ns();
        let expired: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        for k in &expired {
            let _ = map.remove(k);
        }
        Ok(expired.len())
    }

    /// The admissions in force (not expired), for the policy in force.
    pub fn admissions(&self) -> Result<Vec<Admission>, WriteMapsError> {
        let active: Array<MapData, u32> = self.array("active")?;
        let generation = (active.get(&0, 0).map_err(map_err("active", "get"))? & 1) as usize;
        let now = monotonic_ns();
        let mut out: Vec<Admission> = self
            .admits()?
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns > now)
            .map(|(k, v)| Admission {
                addr: Ipv4Addr::from(k.to_ne_bytes()),
                expires_ns: v.expires_ns,
                rules: mask_bits(&v.mask[generation]),
            })
            .collect();
        out.sort_by_key(|a| a.addr);
        Ok(out)
    }

    /// Replaces the policy in place: writes the inactive generation and flips
    /// to it. Counters of the new generation start at zero. `carry[i]` lists
    /// the new policy's rules that take over what old rule `i` admitted
    /// (the domain rules with the same pattern); admissions of rules not in
    /// it end with the flip.
    pub fn update(&self, policy: &Compiled, carry: &[Vec<usize>]) -> Result<(), WriteMapsError> {
        let mut active: Array<MapData, u32> = self.array("active")?;
        let cur = active.get(&0, 0).map_err(map_err("active", "get"))? & 1;
        let next = 1 - cur;

        let trie_name = if next == 0 { "prefixes0" } else { "prefixes1" };
        let mut trie = self.trie(trie_name)?;
        let stale: Vec<Key<u32>> = trie.keys().filter_map(Result::ok).collect();
        for k in &stale {
            trie.remove(k).map_err(map_err(trie_name, "remove"))?;
        }

        let mut rules: Array<MapData, RawRule> = self.array("rules")?;
        let rbase = next * MAX_RULES as u32;
        for (i, r) in policy.rules.iter().enumerate() {
            let (flags, lo, hi) = match r.ports {
                Some((lo, hi)) => (1, lo, hi),
                None => (0, 0, 0),
            };
            let raw = RawRule {
                proto: r.proto,
                action: action_code(r.action),
                flags,
                pad: 0,
                port_lo: lo,
                port_hi: hi,
            };
            rules
                .set(rbase + i as u32, raw, 0)
                .map_err(map_err("rules", "set"))?;
        }

        let mut counters: PerCpuArray<MapData, Counter> = self.percpu("counters")?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| WriteMapsError::Cpus(e))?;
        let cbase = next * SLOTS;
        let slots =
            (0..policy.rules.len() as u32).chain([SLOT_DEFAULT, SLOT_PROTECTED, SLOT_REPLY]);
        for s in slots {
            let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus])
                .map_err(WriteMapsError::Cpus)?;
            counters
                .set(cbase + s, zeros, 0)
                .map_err(map_err("counters", "set"))?;
        }

        for p in &policy.prefixes {
            let key = Key::new(
                u32::from(p.prefix.prefix_len()),
                u32::from_ne_bytes(p.prefix.network().octets()),
            );
            let val = LpmVal {
                mask: p.mask,
                protected: u32::from(p.protected),
                pad: 0,
            };
            trie.insert(&key, val, 0)
                .map_err(map_err(trie_name, "insert"))?;
        }

        // Admissions: the next generation's bits, before the flip.
        let mut admits = self.admits()?;
        let entries: Vec<(u32, RawAdmit)> = admits.iter().filter_map(Result::ok).collect();
        for (k, mut v) in entries {
            let mut next_mask = [0u64; MASK_WORDS];
            for old in mask_bits(&v.mask[cur as usize]) {
                for &new in carry.get(old).map(Vec::as_slice).unwrap_or(&[]) {
                    if new < MAX_RULES {
                        next_mask[new / 64] |= 1u64 << (new % 64);
                    }
                }
            }
            v.mask[next as usize] = next_mask;
            admits.insert(k, v, 0).map_err(map_err("dns", "insert"))?;
        }

        let mut gens: Array<MapData, GenConfig> = self.array("gens")?;
        gens.set(
            next,
            GenConfig {
                default_action: u32::from(action_code(policy.default)),
            },
            0,
        )
        .map_err(map_err("gens", "set"))?;
        active.set(0, next, 0).map_err(map_err("active", "set"))?;
        Ok(())
    }

    /// Counters of the policy in force, summed over CPUs; `rules` is how many
    /// rules that policy has.
    pub fn counters(&self, rules: usize) -> Result<Counters, WriteMapsError> {
        let active: Array<MapData, u32> = self.array("active")?;
        let generation = active.get(&0, 0).map_err(map_err("active", "get"))? & 1;
        let counters: PerCpuArray<MapData, Counter> = self.percpu("counters")?;
        let read = |slot: u32| -> Result<Counter, WriteMapsError> {
            let per_cpu = counters
                .get(&(generation * SLOTS + slot), 0)
                .map_err(map_err("counters", "get"))?;
            let mut c = Counter::default();
            for v in per_cpu.iter() {
                c.add(v);
            }
            Ok(c)
        };
        let rules = (0..rules.min(MAX_RULES) as u32)
            .map(read)
            .collect::<Result<_, _>>()?;
        let drops_map: PerCpuArray<MapData, Counter> = self.percpu("drops")?;
        let mut drops = Vec::new();
        for (i, name) in DROP_REASONS.iter().enumerate() {
            let per_cpu = drops_map
                .get(&(i as u32), 0)
                .map_err(map_err("drops", "get"))?;
            let mut c = Counter::default();
            for v in per_cpu.iter() {
                c.add(v);
            }
            drops.push(((*name).to_owned(), c));
        }
        Ok(Counters {
            rules,
            default: read(SLOT_DEFAULT)?,
            protected: read(SLOT_PROTECTED)?,
            replies: read(SLOT_REPLY)?,
            drops,
        })
    }

    /// Detaches the program and frees its maps.
    pub fn remove(self) -> Result<(), RemoveProgramError> {
        remove_pins(&self.dir)
    }
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => 0,
        Action::Deny => 1,
    }
}

/// Unpins everything in a sandbox's pin directory and removes it; a missing
/// directory is fine. Removing the link pin detaches the program (no other
/// reference holds it).
pub fn remove_pins(dir: &Path) -> Result<(), RemoveProgramError> {
    let err = |source| RemoveProgramError {
        dir: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    for entry in entries {
        let entry = entry.map_err(err)?;
        fs::remove_file(entry.path()).map_err(err)?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}
