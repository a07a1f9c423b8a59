//! End-to-end test harness: real test images and a real OCI registry, no mocks.
//!
//! Owns: test image builders (busybox, python, multi-layer, hostile), the OCI layout writer
//! they use, and [`Registry`], Debian's `docker-registry` on loopback. Later: clusters,
//! network namespaces as hosts.
//!
//! Must not depend on: product crates' internals (tests use their public APIs).
#![forbid(unsafe_code)]

pub mod images;
pub mod openapi;
pub mod registry;

pub use images::{Hostile, OciLayout, cache_dir};
pub use openapi::ApiSchemas;
pub use registry::Registry;
