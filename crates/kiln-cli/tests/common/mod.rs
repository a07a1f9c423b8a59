//! Shared harness of the end-to-end tests: each test gets its own state
//! directory (so sandboxes never mix) and the shared cache (kernel,
//! initramfs, images), and drives the real `kiln` binary as a user would.
//!
//! Two routes, chosen by `KILN_E2E_ROUTE`: `local` (the default) runs every
//! command on this host's node service (`KILN_AUTO_UP=0`, no server named:
//! tests about servers name theirs); `up` starts
//! `kiln up -d` on the test's state directory first, so every command that
//! goes through the API (run, exec, cp, logs, ps, inspect, stop, rm, pause,
//! resume, wait, snapshot, restore, fork, template, images) does, as a user's
//! would with the embedded server running. `scripts/test.sh` runs the
//! files about `kiln run`, templates, snapshots and fork both ways.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub struct Kiln {
    pub state: tempfile::TempDir,
    pub bin: PathBuf,
    /// A private image cache (kernel and initramfs still come from the
    /// shared one), for tests that check what a failure leaves in it.
    pub cache: Option<tempfile::TempDir>,
    /// The `kiln up` of this test (route `up`): its pid once started.
    up: std::sync::Mutex<Option<u32>>,
    /// Environment of that `kiln up` (node settings such as
    /// `KILN_QEMU_BIN` are its, not the client's, on route `up`).
    up_env: std::sync::Mutex<Vec<(String, std::ffi::OsString)>>,
}

/// Whether the tests run through `kiln up` (`KILN_E2E_ROUTE=up`).
pub fn through_up() -> bool {
    std::env::var("KILN_E2E_ROUTE").is_ok_and(|v| v == "up")
}

/// The shared cache (`KILN_CACHE_DIR` or `~/.cache/kiln`).
pub fn shared_cache() -> PathBuf {
    kiln_testkit::images::cache_dir()
}

impl Kiln {
    pub fn new() -> Kiln {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        Kiln {
            state: tempfile::Builder::new()
                .prefix("kiln-e2e-")
                .tempdir_in("/tmp")
                .expect("temp state dir"),
            bin: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
            cache: None,
            up: std::sync::Mutex::new(None),
            up_env: std::sync::Mutex::new(vec![]),
        }
    }

    /// A harness whose image cache is private to the test.
    pub fn with_own_cache() -> Kiln {
        let mut k = Kiln::new();
        k.cache = Some(
            tempfile::Builder::new()
                .prefix("kiln-e2e-cache-")
                .tempdir_in("/tmp")
                .expect("temp cache dir"),
        );
        k
    }

    /// The image cache directory this harness uses.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.cache {
            Some(c) => c.path().to_path_buf(),
            None => shared_cache(),
        }
    }

    /// Every file under the private image cache's `images/` (partial
    /// entries, temporaries), excluding lock files.
    pub fn cached_image_files(&self) -> Vec<PathBuf> {
        let mut out = vec![];
        walk(&self.cache_dir().join("images"), &mut out);
        out.retain(|p| !p.components().any(|c| c.as_os_str() == "locks"));
        out
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// A `kiln` command with this test's state directory (and, on route
    /// `up`, its `kiln up` running).
    pub fn cmd(&self) -> Command {
        let mut c = self.base_cmd();
        if through_up() {
            let pid = *self
                .up
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| self.start_up());
            // A command must never fall back to the node-local path: the
            // test's `kiln up` is alive, and nothing starts another.
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "this test's kiln up (pid {pid}) is gone; its log: {}",
                std::fs::read_to_string(self.state.path().join("up/up.log")).unwrap_or_default()
            );
            c.env("KILN_AUTO_UP", "0");
        } else {
            // No embedded server started on first use; a server the test
            // names (KILN_SERVER) or a `kiln up` it starts still counts.
            c.env("KILN_AUTO_UP", "0");
        }
        c
    }

    /// [`Kiln::cmd`] without starting or checking `kiln up` (for cleanup).
    fn quiet_cmd(&self) -> Command {
        let mut c = self.base_cmd();
        c.env("KILN_AUTO_UP", "0");
        c
    }

    /// The pid of this test's `kiln up` (route `up`, once started).
    pub fn up_pid(&self) -> Option<u32> {
        *self.up.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route `up`: stops this test's `kiln up` (`kill -9` when `crash`,
    /// else `kiln down`) and starts it again with `env` set in its
    /// environment (as an operator restarting the node with another
    /// setting). Its sandboxes keep running and are adopted.
    pub fn restart_up(&self, crash: bool, env: &[(&str, std::ffi::OsString)]) {
        assert!(through_up(), "restart_up on route local");
        let mut up = self.up.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = up.take() {
            if crash {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let t0 = std::time::Instant::now();
                // Gone, or a zombie nobody reaped yet (dead all the same).
                let alive = |pid: u32| {
                    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                        st.rsplit_once(") ")
                            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
                    })
                };
                while alive(pid) {
                    assert!(
                        t0.elapsed().as_secs() < 30,
                        "kiln up {pid} outlived kill -9"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            } else {
                let out = self
                    .base_cmd()
                    .arg("down")
                    .output()
                    .expect("kiln down runs");
                assert!(
                    out.status.success(),
                    "kiln down: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        {
            let mut e = self.up_env.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in env {
                e.retain(|(key, _)| key != k);
                e.push((k.to_string(), v.clone()));
            }
        }
        *up = Some(self.start_up());
    }

    /// Sets `key` in the environment of this test's `kiln up` (route
    /// `up`; before its first command) and returns whether the route is
    /// `up`. On route `local` the test sets it on its commands itself.
    pub fn node_env(&self, key: &str, val: impl AsRef<std::ffi::OsStr>) -> bool {
        assert!(self.up_pid().is_none(), "node_env after kiln up started");
        self.up_env
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key.to_string(), val.as_ref().to_owned()));
        through_up()
    }

    fn start_up(&self) -> u32 {
        let mut env = self
            .up_env
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The guest as of now (what tests pin on their commands): the node
        // boots and restores with it even if the shared cache's `current`
        // links move meanwhile.
        for (key, rel) in [
            ("KILN_KERNEL", "kernel/current/bzImage"),
            ("KILN_INITRAMFS", "initramfs/current/initramfs.img"),
        ] {
            if !env.iter().any(|(k, _)| k == key) {
                let p = shared_cache().join(rel);
                let p = std::fs::canonicalize(&p).unwrap_or(p);
                env.push((key.to_string(), p.into_os_string()));
            }
        }
        let out = self
            .base_cmd()
            .envs(env)
            .args(["up", "-d", "--listen", "127.0.0.1:0"])
            .output()
            .expect("kiln up runs");
        assert!(
            out.status.success(),
            "kiln up -d failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ep = std::fs::read(self.state.path().join("up/endpoint.json")).expect("endpoint.json");
        let v: serde_json::Value = serde_json::from_slice(&ep).expect("endpoint.json is JSON");
        let pid = v["pid"].as_u64().expect("endpoint.json names a pid") as u32;
        tracing::info!(pid, "kiln up started for this test");
        pid
    }

    fn base_cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("KILN_STATE_DIR", self.state.path());
        // Commands start no `kiln up` of their own (the product's default):
        // a test's route decides (see `cmd`).
        c.env("KILN_AUTO_UP", "0");
        if let Some(cache) = &self.cache {
            let shared = shared_cache();
            c.env("KILN_CACHE_DIR", cache.path());
            c.env("KILN_KERNEL", shared.join("kernel/current/bzImage"));
            c.env(
                "KILN_INITRAMFS",
                shared.join("initramfs/current/initramfs.img"),
            );
        }
        c.env_remove("KILN_LOG");
        // Tests that are not about automatic templates must not race a
        // background template boot (e2e_auto_templates turns them on).
        c.env("KILN_AUTO_TEMPLATES", "0");
        c.stdin(Stdio::null());
        c
    }

    /// Runs `kiln ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("kiln runs");
        tracing::info!(
            ?args,
            code = ?out.status.code(),
            stderr = %String::from_utf8_lossy(&out.stderr),
            "kiln finished"
        );
        out
    }

    /// Runs `kiln ARGS` feeding `input` on stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln runs");
        let mut stdin = child.stdin.take().expect("piped");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("kiln finishes");
        let _ = writer.join();
        out
    }

    /// Processes (VMMs, supervisors) that still mention this state directory.
    pub fn leftover_processes(&self) -> Vec<String> {
        let needle = self.state.path().to_string_lossy().into_owned();
        let mut found = vec![];
        let me = std::process::id();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me || Some(pid) == self.up_pid() {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let env_entry = format!("KILN_STATE_DIR={needle}\0");
            if text.contains(&format!("{needle}/"))
                || String::from_utf8_lossy(&environ).contains(&env_entry)
            {
                found.push(format!("{pid}: {text}"));
            }
        }
        found
    }

    /// Sockets and VM files (anything under a sandbox's `vm/`) left under
    /// the state directory. Ended sandboxes keep their record, output log
    /// and writable disk until `kiln rm`, like containers.
    pub fn leftover_files(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let mut out = vec![];
        walk(self.state.path(), &mut out);
        out.retain(|p| {
            let sock = std::fs::symlink_metadata(p)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            (sock && !(self.up_pid().is_some() && *p == self.state.path().join("api.sock")))
                || p.components().any(|c| c.as_os_str() == "vm")
        });
        out
    }

    /// Everything under the state directory (on route `up`, except what
    /// `kiln up` itself keeps there while it runs: its server's and node's
    /// state, its socket, the node's network settings).
    pub fn all_state_files(&self) -> Vec<PathBuf> {
        let mut out = vec![];
        walk(self.state.path(), &mut out);
        if self.up_pid().is_some() {
            let root = self.state.path();
            out.retain(|p| {
                let rel = p.strip_prefix(root).unwrap_or(p);
                let first = rel.components().next().map(|c| c.as_os_str().to_owned());
                // The node's ownership markers (`node/owned/ID.json`) are
                // per sandbox: they must go with it.
                let own_dir = first
                    .as_deref()
                    .is_some_and(|f| f == "up" || f == "server" || f == "node")
                    && !rel.starts_with("node/owned");
                let own_file = rel == Path::new("api.sock")
                    || rel == Path::new("net/leases.lock")
                    || rel.starts_with("net/protected-cidrs")
                    || rel
                        .to_str()
                        .is_some_and(|r| r.starts_with("net/protected-cidrs"));
                !(own_dir || own_file)
            });
        }
        out
    }

    /// Asserts that no VMM or supervisor process, socket or VM file is left.
    ///
    /// A supervisor tears its VM down after `kiln run` returned (off the
    /// command's exit path), so this allows it a few seconds to finish.
    pub fn assert_clean(&self) {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(10)
            && !(self.leftover_processes().is_empty() && self.leftover_files().is_empty())
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let procs = self.leftover_processes();
        assert!(procs.is_empty(), "processes left behind: {procs:#?}");
        let files = self.leftover_files();
        assert!(files.is_empty(), "files left behind: {files:#?}");
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        // Remove every sandbox, then kill anything still alive. (Never
        // starts a `kiln up`: a panic here while unwinding would abort the
        // whole test binary.)
        let usable = !through_up()
            || self
                .up_pid()
                .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if usable && let Ok(out) = self.quiet_cmd().args(["ps", "-a", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.quiet_cmd().args(["rm", "-f", id]).output();
            }
        }
        if self.up_pid().is_some() {
            let _ = self.base_cmd().arg("down").output();
        }
        for p in self.leftover_processes() {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Asserts the command failed with one clear line on stderr that contains `needle`.
pub fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_ne!(code(o), 0, "expected a failure; stdout: {}", stdout(o));
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in: {err}"
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// The busybox test image (an OCI layout built by the testkit), as a
/// `kiln run` reference.
pub fn busybox() -> String {
    static IMG: OnceLock<String> = OnceLock::new();
    IMG.get_or_init(|| {
        kiln_testkit::images::busybox()
            .expect("the busybox test image builds")
            .image_ref()
    })
    .clone()
}
