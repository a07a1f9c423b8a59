//! Kiln's public types: sandbox and image identifiers, control-plane types
//! (`cluster`: nodes, tenants, roles, desired state), and the host/guest
//! agent protocol (`proto`) spoken between Kiln on the host and `kiln-init`
//! in the guest.
//!
//! This crate does no I/O and depends on no other Kiln crate. Everything a
//! guest sends is parsed here first, so every decoder is bounded and total:
//! bad bytes give an error, never a panic.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod proto;
pub mod sandbox;
pub mod text;
