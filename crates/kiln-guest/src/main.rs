//! kiln-init: PID 1 in a Kiln guest. Mounts the overlay root, then serves the
//! agent protocol (`kiln_api::proto`) on the host channel: runs processes,
//! streams their output with flow control, copies files, reaps zombies.
//!
//! It logs with plain `eprintln!` to the console (ttyS0): the binary stays
//! small and starts fast without a tracing subscriber. Depends only on
//! `kiln-api`'s protocol types; never on host crates.

mod agent;
mod boot;
mod copy;
mod lookup;
mod net;
mod sys;
mod users;

use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Prints a line on the console.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { eprintln!("kiln-init: {}", format_args!($($arg)*)) };
}

/// Syncs and reboots, which ends the VM (`reboot=t`, QEMU `-no-reboot`).
pub(crate) fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not PID 1 (tests), or reboot was refused: PID 1 must never exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn fatal(msg: std::fmt::Arguments<'_>) -> ! {
    log!("FATAL: {msg}");
    log!("rebooting");
    power_off()
}

fn main() {
    if std::process::id() != 1
        && std::env::args_os().nth(1).as_deref()
            == Some(std::ffi::OsStr::new(kiln_api::proto::WARM_UP_ARG))
    {
        std::process::exit(0);
    }
    let started = std::time::Instant::now();
    let mut mask = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None) {
        fatal(format_args!("blocking signals: {e}"));
    }
    let sigfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => fatal(format_args!("signalfd: {e}")),
    };
    let cfg = match boot::boot() {
        Ok(c) => c,
        Err(e) => fatal(format_args!("boot: {e}")),
    };
    let transport = match cfg.channel.as_str() {
        "vsock" => match vsock_listener() {
            Ok(l) => agent::Transport::Vsock(l),
            Err(e) => fatal(format_args!(
                "listening on vsock port {}: {e}",
                kiln_api::proto::VSOCK_PORT
            )),
        },
        "serial" => {
            // Devices are probed before init runs; wait a little just in case.
            let mut port = None;
            for _ in 0..200 {
                port = agent::find_serial_port();
                if port.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            match port {
                Some(p) => agent::Transport::Serial(p),
                None => fatal(format_args!(
                    "no virtio-serial port named {} (is virtio-serial-device present?)",
                    kiln_api::proto::PORT_NAME
                )),
            }
        }
        other => fatal(format_args!("unknown kiln.channel={other}")),
    };
    let mut agent = match agent::Agent::new(transport, sigfd) {
        Ok(a) => a,
        Err(e) => fatal(format_args!("agent setup: {e}")),
    };
    if let Err(e) = agent.open_channel() {
        fatal(format_args!("opening the agent channel: {e}"));
    }
    log!("ready in {} ms", started.elapsed().as_millis());
    agent.run()
}

fn vsock_listener() -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, listen, socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, kiln_api::proto::VSOCK_PORT),
    )?;
    listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}
