//! The few system calls nix does not wrap safely for us. Every `unsafe` block
//! of kiln-init lives here.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::unistd::{Gid, Uid};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Adds `bytes` to the kernel's entropy pool and credits them as entropy.
pub fn add_entropy(random: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u32> = vec![0; 2 + bytes.len().div_ceil(4)];
    let bits =
        i32::try_from(bytes.len() * 8).map_err(|_| std::io::Error::other("too much entropy"))?;
    let len = i32::try_from(bytes.len()).map_err(|_| std::io::Error::other("too much entropy"))?;
    info[0] = bits as u32;
    info[1] = len as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a properly aligned rand_pool_info whose buf_size
    // (`len`) bytes follow the 8-byte header inside the allocation; the
    // kernel only reads from it during the call.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Makes the kernel re-key its CRNG from the input pool now. Crediting
/// entropy alone does not: once the CRNG is ready it reseeds on a timer (up
/// to 60 s), so two forks of one snapshot would read the same `/dev/urandom`
/// bytes until then.
pub fn reseed_crng(random: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is a
    // valid local for the duration of the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the child does between fork and exec.
pub struct ChildSetup {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    /// New session with fd 0 (the pty slave) as controlling terminal.
    pub tty: bool,
}

/// Arranges `setup` to run in the child before exec.
pub fn prepare(cmd: &mut Command, setup: ChildSetup) {
    let hook = move || -> std::io::Result<()> {
        // Only async-signal-safe calls below: sigprocmask, setsid, ioctl,
        // setgroups, setgid, setuid are plain system calls.
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
        if setup.tty {
            nix::unistd::setsid()?;
            // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty slave
            // that Command installed as stdin.
            let r = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        nix::unistd::setgroups(&setup.groups)?;
        nix::unistd::setgid(setup.gid)?;
        nix::unistd::setuid(setup.uid)?;
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls and does
    // not allocate (the groups vector was built before the fork).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Accepts a connection on a listening socket, close-on-exec and non-blocking.
pub fn accept(listener: &OwnedFd) -> nix::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
