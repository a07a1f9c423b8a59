//! `kiln-server` owns Kiln's control-plane server: the [`scheduler`] (a
//! pure function from the cluster view to placement decisions) and, to
//! come, the REST API under `/v1` (axum), the gRPC service nodes register,
//! heartbeat and watch their assignments through (tonic), the leader's
//! reconcilers (node expiry, rescheduling) and the server's metrics. It
//! turns requests into `kiln_store::Command`s and answers from
//! `kiln_store::query` views.
//!
//! It depends on `kiln-api` (public types) and `kiln-store` (replicated
//! state) only. It must not depend on `kiln-node`, `kiln-vmm` or
//! `kiln-image`: a server runs on machines with no KVM and never touches a
//! VM, an image or a host's disks; nodes do that and report back.
#![forbid(unsafe_code)]

pub mod scheduler;

pub use scheduler::{Decision, Outcome, Pending, Policy, Unschedulable, place};
