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
pub mod rest;
pub mod sandbox;
pub mod stream;
pub mod templates;
pub mod text;

/// The node protocol (gRPC): generated from `proto/kiln/node/v1/node.proto`.
/// Domain payloads travel as JSON of this crate's serde types; see the
/// proto file for authentication and leader rules.
#[cfg(feature = "grpc")]
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod node_rpc {
    tonic::include_proto!("kiln.node.v1");
}
