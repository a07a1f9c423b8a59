//! OCI images to read-only ext4 base disks.
//!
//! Owns: image references, pulling from registries (oci-client), OCI layout directories and
//! `docker save` archives, digest and size checks on every blob, the **safe layer unpacker**
//! (image layers are hostile input; see [`unpack`]), `mkfs.ext4 -d` base disks, and the
//! on-disk cache with its locking and GC.
//!
//! Must not depend on: other kiln crates (the node and the CLI depend on this one), any VMM.
#![forbid(unsafe_code)]

pub mod disk;
pub mod manifest;
pub mod reference;
mod source;
pub mod store;
pub mod unpack;

pub use disk::BuildDiskError;
pub use manifest::{Compression, ImageConfig, Platform};
pub use reference::{ImageRef, ParseImageRefError, RegistryRef};
pub use store::{
    Image, ImageStore, ListImagesError, OpenStoreError, PruneImagesError, PruneReport,
    PullImageError, PullOptions, Removal, RemoveImageError,
};
pub use unpack::{LayerStats, UnpackLayerError, UnpackOptions};

/// A step of a pull, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullPhase {
    /// Resolving the reference to a manifest.
    Resolve,
    /// Transferring a layer (total = compressed size).
    Download {
        /// Layer digest.
        digest: String,
    },
    /// Applying a layer to the root filesystem.
    Unpack {
        /// Layer digest.
        digest: String,
    },
    /// Running `mkfs.ext4`.
    BuildDisk,
}

/// Receives progress of a pull (e.g. to drive indicatif bars). All methods default to no-ops.
pub trait Progress: Send + Sync {
    /// A phase starts; `total_bytes` when known.
    fn start(&self, _phase: &PullPhase, _total_bytes: Option<u64>) {}
    /// Bytes done in the current phase.
    fn advance(&self, _bytes: u64) {}
    /// A phase ended.
    fn finish(&self, _phase: &PullPhase) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
