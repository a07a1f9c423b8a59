//! `Configure`: identity, entropy, clock and network from the host.

use super::*;

pub(super) fn configure(c: &Configure) -> Result<(), String> {
    use base64::Engine as _;
    if let Some(n) = &c.network {
        crate::net::configure(n)?;
    }
    if !c.hostname.is_empty() {
        nix::unistd::sethostname(&c.hostname).map_err(|e| format!("sethostname: {e}"))?;
        let _ = std::fs::write("/etc/hostname", format!("{}\n", c.hostname));
        if let Ok(hosts) = std::fs::read_to_string("/etc/hosts")
            && !hosts
                .lines()
                .any(|l| l.split_whitespace().skip(1).any(|n| n == c.hostname))
        {
            let line = format!("127.0.1.1\t{}\n", c.hostname);
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open("/etc/hosts")
                .and_then(|mut f| f.write_all(line.as_bytes()));
        } else if std::fs::metadata("/etc/hosts").is_err() {
            let _ = std::fs::write(
                "/etc/hosts",
                format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n", c.hostname),
            );
        }
    }
    if !c.entropy.is_empty() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&c.entropy)
            .map_err(|e| format!("entropy is not base64: {e}"))?;
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/random")
            .map_err(|e| format!("opening /dev/random: {e}"))?;
        let random = OwnedFd::from(random);
        sys::add_entropy(&random, &bytes).map_err(|e| format!("RNDADDENTROPY: {e}"))?;
        // After a restore every fork holds the same CRNG state: re-key it
        // from the pool that now holds this fork's own entropy.
        // ENODATA: the CRNG is not ready yet, so it will seed from the pool
        // when it becomes ready; nothing to do.
        match sys::reseed_crng(&random) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(format!("RNDRESEEDCRNG: {e}")),
        }
    }
    if c.time_unix_ns > 0 {
        let ts = nix::sys::time::TimeSpec::new(
            (c.time_unix_ns / 1_000_000_000) as libc::time_t,
            (c.time_unix_ns % 1_000_000_000) as libc::c_long,
        );
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| format!("clock_settime: {e}"))?;
    }
    Ok(())
}
