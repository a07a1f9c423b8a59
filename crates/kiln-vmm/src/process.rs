//! Detached VMM processes: spawn in a new session, identify by pid + start
//! time, wait for their exit (a pidfd; polling `/proc` where there is
//! none), signal, and remove runtime files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{CleanupVmError, StartVmError, StopVmError};

/// How often `/proc` is polled while waiting for a process to exit.
const POLL: Duration = Duration::from_millis(10);

/// A VMM process identified by pid and start time (so a reused pid is not
/// mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VmmProcess {
    pub pid: i32,
    pub start_time: u64,
}

impl VmmProcess {
    /// Whether the process still runs (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }

    #[allow(unsafe_code)]
    pub async fn wait(&self) {
        // Event-driven where the kernel has pidfds (5.3+): an idle waiter
        // (a paused pool member's supervisor) costs no CPU.
        let registered = self.pidfd().and_then(|fd| {
            // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns
            // it until dropped: it stays open and its raw fd never changes.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .ok()
        });
        if let Some(fd) = registered {
            // The pid may have been reused between the check and the
            // open: only this process, identified by its start time, counts.
            if !self.alive() || fd.readable().await.is_ok() {
                return;
            }
            // The reactor failed us: poll instead.
        }
        while self.alive() {
            tokio::time::sleep(POLL).await;
        }
    }

    /// A pidfd for the process (readable once it has exited).
    #[allow(unsafe_code)]
    fn pidfd(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open(2) takes a pid and flags, reads and writes no
        // memory of ours, and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// Wait up to `timeout`; true if the process is gone.
    pub async fn wait_timeout(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait()).await.is_ok()
    }

    pub fn signal(&self, signal: Signal) -> Result<(), StopVmError> {
        if !self.alive() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(source) => Err(StopVmError::Signal {
                pid: self.pid,
                source,
            }),
        }
    }

    /// SIGKILL and wait (bounded) until the process is gone.
    pub async fn kill(&self) -> Result<(), StopVmError> {
        self.signal(Signal::SIGKILL)?;
        let waited = Duration::from_secs(5);
        if self.wait_timeout(waited).await {
            Ok(())
        } else {
            Err(StopVmError::StillAlive {
                pid: self.pid,
                waited,
            })
        }
    }
}

/// Session id (field 6) from `/proc/PID/stat`.
pub(crate) fn proc_session(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3; the session is field 6.
    rest.split_ascii_whitespace().nth(3)?.parse().ok()
}

/// State letter and start time (field 22) from `/proc/PID/stat`.
pub(crate) fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(char, u64)> {
    // The command name (field 2) is in parentheses and may contain anything,
    // so fields are counted from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// Spawn `binary args` detached: its own session, stdin on /dev/null, stdout
/// to `stdout_path` (or /dev/null), stderr to `stderr_path`. The child is reaped in the background
/// while this process runs; it outlives this process.
pub(crate) fn spawn_detached(
    binary: &Path,
    args: &[String],
    stderr_path: &Path,
    stdout_path: Option<&Path>,
) -> Result<VmmProcess, StartVmError> {
    let stdout = match stdout_path {
        Some(path) => Stdio::from(File::create(path).map_err(|source| StartVmError::Dir {
            path: path.to_owned(),
            source,
        })?),
        None => Stdio::null(),
    };
    let stderr = File::create(stderr_path).map_err(|source| StartVmError::Dir {
        path: stderr_path.to_owned(),
        source,
    })?;
    let mut command = tokio::process::Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::from(stderr))
        .kill_on_drop(false);
    new_session(command.as_std_mut());
    let mut child = command.spawn().map_err(|source| StartVmError::Spawn {
        binary: binary.to_owned(),
        source,
    })?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| StartVmError::Exited {
            status: "no pid".into(),
            stderr: String::new(),
        })?;
    let start_time = proc_stat(pid).map(|(_, start)| start).unwrap_or(0);
    // Reap the child when it exits, so that it does not linger as a zombie
    // while we live. If this task is dropped, tokio reaps orphans itself.
    tokio::spawn(async move {
        let status = child.wait().await;
        tracing::debug!(pid, ?status, "VMM process exited");
    });
    Ok(VmmProcess { pid, start_time })
}

#[allow(unsafe_code)]
fn new_session(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setsid(2), which is async-signal-safe; it touches no memory shared with
    // the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
}

/// Poll until `path` accepts a Unix-socket connection, the process dies, or
/// `timeout` passes.
pub(crate) async fn connect_when_ready(
    path: &Path,
    process: &VmmProcess,
    timeout: Duration,
    stderr_path: &Path,
) -> Result<tokio::net::UnixStream, StartVmError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(stream) = tokio::net::UnixStream::connect(path).await {
            return Ok(stream);
        }
        if !process.alive() {
            // Give stderr a moment to be flushed by the dying process.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(StartVmError::Exited {
                status: "exited".into(),
                stderr: read_tail(stderr_path),
            });
        }
        if Instant::now() >= deadline {
            return Err(StartVmError::SocketTimeout {
                path: path.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The last 4 KiB of a log file, trimmed, for error messages.
pub(crate) fn read_tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(4096);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

/// Remove files, ignoring those already gone.
pub(crate) fn remove_files(files: &[PathBuf]) -> Result<(), CleanupVmError> {
    for path in files {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CleanupVmError::Remove {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (qemu (x) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 10 ...";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R"), None);
    }

    #[test]
    fn own_process_is_alive() {
        let pid = i32::try_from(std::process::id()).expect("pid fits");
        let (state, start) = proc_stat(pid).expect("own stat");
        assert_ne!(state, 'Z');
        assert!(proc_session(pid).is_some());
        assert!(
            VmmProcess {
                pid,
                start_time: start
            }
            .alive()
        );
        assert!(
            !VmmProcess {
                pid,
                start_time: start + 1
            }
            .alive()
        );
    }
}
