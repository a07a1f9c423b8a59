//! Real kernel objects for the network tests: namespaces as sandboxes and
//! outside hosts, veth pairs, servers bound inside namespaces. Every object is
//! owned by a guard that removes it on drop, also when a test fails.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sched::CloneFlags;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short suffix unique to this process and call: `<pid%10000><n>`.
pub fn unique() -> (String, u32) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    (format!("{}{}", std::process::id() % 10000, n), n)
}

pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a namespace; true when it exits 0.
pub fn ns_ok(ns: &str, args: &[&str]) -> bool {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    Command::new(full[0])
        .args(&full[1..])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Result<Netns> {
        run(&["ip", "netns", "add", name])?;
        let ns = Netns(name.to_owned());
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        run(&full)
    }
    /// Runs `f` on a thread inside this namespace; sockets it creates stay
    /// in the namespace after it returns.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(file, CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

/// A host-side link deleted on drop (its peer goes with it).
pub struct HostLink(pub String);

impl Drop for HostLink {
    fn drop(&mut self) {
        if std::path::Path::new("/sys/class/net")
            .join(&self.0)
            .exists()
        {
            let _ = run(&["ip", "link", "del", &self.0]);
        }
    }
}

/// A veth pair: `host` in the root namespace, `eth0` in `ns`.
pub fn veth_into(ns: &Netns, host: &str) -> Result<HostLink> {
    let peer = format!("{host}p");
    run(&[
        "ip", "link", "add", host, "type", "veth", "peer", "name", &peer,
    ])?;
    let link = HostLink(host.to_owned());
    run(&["ip", "link", "set", &peer, "netns", &ns.0])?;
    ns.exec(&["ip", "link", "set", &peer, "name", "eth0"])?;
    Ok(link)
}

/// Configures eth0 in a sandbox namespace as kiln-init would in a guest.
pub fn configure_guest(ns: &Netns, a: &kiln_net::Attachment) -> Result<()> {
    let mac = kiln_net::format_mac(&a.mac);
    ns.exec(&["ip", "link", "set", "eth0", "address", &mac])?;
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/{}", a.ip, a.prefix_len),
        "dev",
        "eth0",
    ])?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    ns.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &a.gateway.to_string(),
    ])?;
    Ok(())
}

/// A TCP server in `ns` that greets and closes every connection.
pub fn tcp_server(ns: &Netns, addr: SocketAddr) -> Result<()> {
    tcp_server_peers(ns, addr).map(|_| ())
}

/// Like [`tcp_server`]; every client's address is sent on the receiver.
pub fn tcp_server_peers(
    ns: &Netns,
    addr: SocketAddr,
) -> Result<std::sync::mpsc::Receiver<SocketAddr>> {
    let l = ns.enter(move || TcpListener::bind(addr))??;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            if let Ok(p) = c.peer_addr() {
                let _ = tx.send(p);
            }
            let _ = c.write_all(b"hi");
        }
    });
    Ok(rx)
}

/// A UDP echo server in `ns`; every datagram's payload is also sent on `seen`.
pub fn udp_echo(
    ns: &Netns,
    addr: SocketAddr,
    seen: Option<std::sync::mpsc::Sender<Vec<u8>>>,
) -> Result<()> {
    let s = ns.enter(move || UdpSocket::bind(addr))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if let Some(seen) = &seen {
                let _ = seen.send(buf[..n].to_vec());
            }
            let _ = s.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// Whether a TCP connection from `ns` to `to` completes and reads the greeting.
pub fn tcp_reaches(ns: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    ns.enter(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        let mut b = [0u8; 2];
        s.read_exact(&mut b).is_ok() && &b == b"hi"
    })
    .unwrap_or(false)
}

/// Whether a UDP datagram from `ns` to `to` comes back.
pub fn udp_reaches(ns: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    ns.enter(move || {
        let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        if s.send_to(b"ping", to).is_err() {
            return false;
        }
        let mut b = [0u8; 16];
        matches!(s.recv_from(&mut b), Ok((4, _)))
    })
    .unwrap_or(false)
}

pub fn ping(ns: &Netns, to: &str) -> bool {
    ns_ok(&ns.0, &["ping", "-c", "1", "-W", "1", to])
}

/// Names of loaded BPF programs called `kiln_egress`.
pub fn kiln_programs() -> usize {
    // kiln_egress and kiln_ingress: two per sandbox.
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.name_as_str(), Some("kiln_egress" | "kiln_ingress")))
        .count()
}

/// Sends one raw Ethernet frame out of `eth0` in `ns`.
pub fn send_frame(ns: &Netns, frame: Vec<u8>) -> Result<()> {
    ns.enter(move || -> Result<()> {
        // SAFETY: plain socket syscalls on a fresh fd and a local sockaddr_ll
        // we fully initialise; the fd is closed before returning.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            libc::close(fd);
            if n < 0 {
                bail!("sendto: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    })?
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame (UDP checksum 0: none).
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// An ARP reply frame claiming `sender_ip` is at `sender_mac`.
pub fn arp_frame(
    eth_src: [u8; 6],
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&target_ip.octets());
    f
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("not a MAC: {s}"))
}

/// Opens an existing (persistent) tap the way a VMM does; the file then is
/// the guest's side of the wire: frames written are sent by "the guest",
/// frames read are what the guest receives.
pub fn open_tap(name: &str) -> Result<File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is valid.
    #[allow(unsafe_code)]
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF reads the ifreq we own for the duration of the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut libc::ifreq) };
    if r < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    // Non-blocking reads so a test can wait with a deadline.
    let flags = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(f)
}

/// Reads frames from a tap until `want` returns true for one or `timeout`
/// passes; answers ARP requests for `me` (ip, mac) on the way, as a guest's
/// kernel would.
pub fn tap_wait(
    tap: &mut File,
    me: (Ipv4Addr, [u8; 6]),
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) => {
                let f = &buf[..n];
                if want(f) {
                    return true;
                }
                // ARP request (op 1) for our address: answer it.
                if n >= 42
                    && f[12..14] == [0x08, 0x06]
                    && f[20..22] == [0, 1]
                    && f[38..42] == me.0.octets()
                {
                    let mut sender_mac = [0u8; 6];
                    sender_mac.copy_from_slice(&f[22..28]);
                    let sender_ip = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
                    let mut r = sender_mac.to_vec();
                    r.extend_from_slice(&me.1);
                    r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
                    r.extend_from_slice(&me.1);
                    r.extend_from_slice(&me.0.octets());
                    r.extend_from_slice(&sender_mac);
                    r.extend_from_slice(&sender_ip.octets());
                    let _ = tap.write_all(&r);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => return false,
        }
    }
    false
}

/// An ARP request from (`ip`, `mac`) for `target`.
pub fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}
