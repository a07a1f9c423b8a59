//! Node-local sandbox networking: the per-node bridge, one tap per sandbox,
//! IPAM, NAT egress (nftables), and the eBPF network policy on each tap
//! (programs in `bpf/`, compiled by `build.rs`, loaded with aya).
//!
//! It owns every kernel object it creates (bridge, taps, nftables chains,
//! pinned BPF programs and maps under `/sys/fs/bpf/kiln/`) and finds a
//! crashed node's leftovers again from their names and pins. It must not
//! depend on the node, server, VMM or image crates: it knows sandbox ids,
//! addresses and policies, not VMs.

pub mod compile;
pub mod policy;
