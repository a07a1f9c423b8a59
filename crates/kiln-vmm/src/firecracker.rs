//! Firecracker driver (placeholder, filled in below).
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct FirecrackerDriver {
    pub binary: PathBuf,
    pub version: String,
}

impl FirecrackerDriver {
    pub fn new(binary: PathBuf, version: String) -> Self {
        FirecrackerDriver { binary, version }
    }
}
