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

/// An `AF_INET` datagram socket: the handle for the interface ioctls below.
pub fn inet_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the returned fd is owned
    // by the OwnedFd from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(name: &str) -> std::io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "bad interface name {name:?}"
        )));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain old data; this is the kernel ABI's own cast.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_ifreq(sock: &OwnedFd, op: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: `req` is a valid, initialised ifreq that outlives the call;
    // every op used here reads or writes only that struct.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), op, req as *mut libc::ifreq) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets an interface's MAC address.
pub fn set_mac(sock: &OwnedFd, name: &str, mac: [u8; 6]) -> std::io::Result<()> {
    let mut req = ifreq_for(name)?;
    // SAFETY: writing the union member SIOCSIFHWADDR reads.
    let hw = unsafe { &mut req.ifr_ifru.ifru_hwaddr };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in hw.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    ioctl_ifreq(sock, libc::SIOCSIFHWADDR, &mut req)
}

/// Sets an interface's IPv4 address and netmask.
pub fn set_ipv4(
    sock: &OwnedFd,
    name: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> std::io::Result<()> {
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl_ifreq(sock, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl_ifreq(sock, libc::SIOCSIFNETMASK, &mut req)
}

/// Brings an interface up (or down).
pub fn set_up(sock: &OwnedFd, name: &str, up: bool) -> std::io::Result<()> {
    let mut req = ifreq_for(name)?;
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let want = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    req.ifr_ifru.ifru_flags = if up { flags | want } else { flags & !want };
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// Replaces the default route with one via `gateway`.
pub fn set_default_route(sock: &OwnedFd, gateway: std::net::Ipv4Addr) -> std::io::Result<()> {
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    let call = |op: libc::c_ulong, rt: &mut libc::rtentry| {
        // SAFETY: `rt` is a valid rtentry with a null rt_dev, outliving the call.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), op, rt as *mut libc::rtentry) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // Remove every old default route (a restored guest may carry one).
    while call(libc::SIOCDELRT, &mut rt.clone()).is_ok() {}
    call(libc::SIOCADDRT, &mut rt)
}

/// Forgets the ARP entry for `addr` on `name`, if any.
pub fn forget_neighbour(sock: &OwnedFd, name: &str, addr: std::net::Ipv4Addr) {
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    req.arp_pa = sockaddr_in(addr);
    for (d, s) in req.arp_dev.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // SAFETY: `req` is a valid arpreq that outlives the call. A missing
    // entry is not an error worth reporting.
    let _ = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCDARP,
            &mut req as *mut libc::arpreq,
        )
    };
}
