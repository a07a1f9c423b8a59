//! What a node tells the server about its host when it registers:
//! capacity (CPUs, RAM, the state directory's filesystem), driver (from
//! `kiln-vmm`'s detection, never guessed) and cached images.

use kiln_api::cluster::{Capacity, DriverKind};

use crate::node::Node;

/// Overrides of the detected capacity (`--capacity-*`, `--cpu-overcommit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityOverrides {
    /// vCPUs offered to sandboxes (replaces CPUs × overcommit).
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
    /// vCPUs offered per host CPU (default [`DEFAULT_CPU_OVERCOMMIT`]).
    pub cpu_overcommit: Option<u32>,
}

/// vCPUs a node offers per host CPU unless told otherwise. A sandbox's
/// vCPU is a VMM thread that agent workloads leave idle most of the time
/// (an interpreter waiting on a model, a shell between commands), so
/// hosts running them share CPUs the way Fly's shared-CPU machines and
/// E2B's sandboxes do; memory and disk are never overcommitted (guest
/// RAM a guest touched stays resident, a writable disk may fill).
/// `--cpu-overcommit 1` gives one host CPU per vCPU.
pub const DEFAULT_CPU_OVERCOMMIT: u32 = 8;

/// The host's CPUs (times the overcommit), RAM and the state directory's
/// filesystem size, with `over` applied.
pub fn capacity(node: &Node, over: CapacityOverrides) -> Capacity {
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let cpus =
        host_cpus.saturating_mul(over.cpu_overcommit.unwrap_or(DEFAULT_CPU_OVERCOMMIT).max(1));
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib >> 10);
    let disk_mib = nix::sys::statvfs::statvfs(&node.dirs().state)
        .map(|fs| fs.blocks().saturating_mul(fs.fragment_size()) >> 20)
        .unwrap_or(0);
    Capacity {
        cpus: over.cpus.unwrap_or(cpus),
        memory_mib: over.memory_mib.unwrap_or(memory_mib),
        disk_mib: over.disk_mib.unwrap_or(disk_mib),
    }
}

/// The driver this host runs sandboxes with (`kiln_vmm`'s automatic
/// selection), or why there is none.
pub fn driver() -> Result<(DriverKind, String), kiln_vmm::SelectDriverError> {
    let host = kiln_vmm::detect(&kiln_vmm::DriverConfig::default());
    let sel = kiln_vmm::select(kiln_vmm::DriverChoice::Auto, &host)?;
    let kind = match (sel.kind, sel.accel) {
        (kiln_vmm::DriverKind::Firecracker, _) => DriverKind::Firecracker,
        (kiln_vmm::DriverKind::Qemu, kiln_vmm::Accel::Kvm) => DriverKind::QemuKvm,
        (kiln_vmm::DriverKind::Qemu, kiln_vmm::Accel::Tcg) => DriverKind::QemuTcg,
    };
    Ok((kind, sel.reason))
}

/// References of the images whose base disks are cached, sorted.
pub fn cached_images(node: &Node) -> Vec<String> {
    let mut out: Vec<String> = match node.images().map(|s| s.list()) {
        Ok(Ok(images)) => images.into_iter().map(|i| i.reference).collect(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot list the cached images");
            vec![]
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the image cache");
            vec![]
        }
    };
    let left_out = kiln_api::cluster::bound_node_images(&mut out);
    if left_out > 0 {
        tracing::warn!(
            left_out,
            reported = out.len(),
            "more cached images than the control plane takes (or unusable references): reporting the first {}",
            kiln_api::cluster::MAX_NODE_IMAGES
        );
    }
    out
}
