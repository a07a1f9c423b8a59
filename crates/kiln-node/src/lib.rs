//! The node agent: everything Kiln does on one host. Sandbox lifecycle over a
//! `kiln_vmm::VmmDriver`, the state directory, and the host side of the guest
//! agent protocol (`agent`).
//!
//! Must not depend on the server or CLI crates.
#![forbid(unsafe_code)]

pub mod agent;
pub mod compose;
pub mod ctl;
pub mod daemon;
pub mod dns;
pub mod logs;
pub mod node;
pub mod paths;
pub mod pool;
pub mod shim;
pub mod snapshot;
pub mod store;
pub mod template;
pub mod vm;

/// `e` and its sources, joined with `: ` (one line for a log or a report).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The environment variable that makes a `kiln` command use this host's
/// node service even when a server is configured or `kiln up` runs; set on
/// every `kiln` process the node service starts itself.
pub const NODE_LOCAL_ENV: &str = "KILN_NODE_LOCAL";
