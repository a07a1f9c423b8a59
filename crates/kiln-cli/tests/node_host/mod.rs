//! A separate "host" for `kiln node` in the end-to-end tests: a network
//! namespace joined to the root namespace by a veth pair, the node process
//! in it with its own state directory, and what the tests look at on the
//! host (supervisors, VMM processes).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_api::sandbox::{SandboxId, SandboxSpec};

use crate::common::{Kiln, busybox};

/// The join token of the clusters in these tests.
pub const JOIN: &str = "node-join-secret-0123456789abcdef";

/// A network namespace joined to the root namespace by a veth pair
/// (`10.250.N.1` here, `10.250.N.2` there); removed on drop.
pub struct Netns {
    pub name: String,
    pub veth: String,
    pub host_ip: String,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new() -> Netns {
        // One subnet per namespace of this process (tests run in parallel).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = (std::process::id() + seq * 61) % 250 + 1;
        let tag = format!("{:04x}{:02x}", std::process::id() & 0xffff, rand_u8());
        let ns = Netns {
            name: format!("kiln-node-{tag}"),
            veth: format!("kvr{tag}"),
            host_ip: format!("10.250.{n}.1"),
        };
        let peer = format!("kvn{tag}");
        sh(&["ip", "netns", "add", &ns.name]);
        sh(&[
            "ip", "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns.name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.veth,
        ]);
        sh(&["ip", "link", "set", &ns.veth, "up"]);
        let inside = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns.name];
            v.extend_from_slice(a);
            sh(&v);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("10.250.{n}.2/30"),
            "dev",
            &peer,
        ]);
        inside(&["ip", "link", "set", &peer, "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn rand_u8() -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b[0]
}

/// A `kiln node` process in `ns`; killed (SIGKILL) on drop if still there.
pub struct NodeProc {
    pub child: Child,
    pub log: PathBuf,
}

impl NodeProc {
    pub fn start_with_servers(
        k: &Kiln,
        ns: &Netns,
        servers: &str,
        name: &str,
        extra: &[&str],
    ) -> NodeProc {
        NodeProc::start_in(k, &ns.name, servers, name, extra)
    }

    /// As [`NodeProc::start_with_servers`], in the namespace named `ns`.
    pub fn start_in(k: &Kiln, ns: &str, servers: &str, name: &str, extra: &[&str]) -> NodeProc {
        let token = k.state_dir().join("join-token");
        std::fs::write(&token, format!("{JOIN}\n")).expect("token file");
        let log = k.state_dir().join(format!("node-{name}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&k.bin)
            .args(["node", "--server", servers])
            .arg("--join-token-file")
            .arg(&token)
            .args(["--name", name, "--state-dir"])
            .arg(k.state_dir())
            .args(extra)
            .env("KILN_STATE_DIR", k.state_dir())
            .env("KILN_AUTO_TEMPLATES", "0")
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("kiln node starts");
        NodeProc { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn term(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

pub fn spec(cmd: &[&str]) -> SandboxSpec {
    let mut s = SandboxSpec::for_image(busybox());
    s.cmd = cmd.iter().map(|c| c.to_string()).collect();
    s.resources.memory_mib = 128;
    s.resources.disk_mib = 64;
    s
}

pub fn shim_pid(state: &Path, id: &SandboxId) -> Option<u32> {
    let body = std::fs::read(
        state
            .join("sandboxes")
            .join(id.as_str())
            .join("record.json"),
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("shim_pid")?.as_u64().map(|p| p as u32)
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// Processes (VMMs) whose command line names sandbox `id`'s directory.
pub fn vmm_processes(state: &Path, id: &SandboxId) -> Vec<u32> {
    let needle = format!("{}/sandboxes/{id}/", state.display());
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(&needle)
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}
