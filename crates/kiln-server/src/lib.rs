//! `kiln-server` owns Kiln's control-plane server (`kiln server`): the
//! [`scheduler`] (a pure function from the cluster view to placement
//! decisions), the REST API under `/v1` ([`rest`], axum, with its OpenAPI
//! document), the node protocol's gRPC service ([`grpc`], tonic: register,
//! heartbeat, watch of desired state, reports), the leader's reconcile
//! loop ([`leader`]: node expiry, placement of pending sandboxes) and the
//! server's [`metrics`]. It turns requests into `kiln_store::Command`s and
//! answers from `kiln_store::query` views.
//!
//! It depends on `kiln-api` (public types) and `kiln-store` (replicated
//! state) only. It must not depend on `kiln-node`, `kiln-vmm` or
//! `kiln-image`: a server runs on machines with no KVM and never touches a
//! VM, an image or a host's disks; nodes do that and report back.
#![forbid(unsafe_code)]

pub mod config;
pub mod grpc;
pub mod leader;
pub mod metrics;
pub mod rest;
pub mod scheduler;
pub mod server;
pub mod tls;
pub mod unix;

pub use config::{ServerConfig, parse_peers};
pub use scheduler::{Decision, Outcome, Pending, Policy, Unschedulable, place};
pub use server::{Server, ServerError};
