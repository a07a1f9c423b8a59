//! `kiln-store` owns Kiln's replicated control-plane state: the
//! deterministic state machine ([`state`], [`command`], [`apply()`],
//! [`query`]), its durable storage in redb ([`storage`]: Raft log, vote,
//! committed index, snapshots, applied state) and the Raft transport
//! between servers over HTTP ([`network`]), tied together by
//! [`RaftNode`].
//!
//! It must not depend on `kiln-node`, `kiln-vmm`, `kiln-image` or any
//! crate that touches a host's VMs: the server runs it on machines with no
//! KVM at all. It depends on `kiln-api` for the public types only.
#![forbid(unsafe_code)]

pub mod apply;
pub mod command;
pub mod query;
pub mod state;

pub use apply::apply;
pub use command::{ApplyMeta, Command, ObjectKind, QuotaResource, Rejection, Response};
pub use state::{SCHEMA_VERSION, State};
