//! Drop events: what the policy program dropped, for `kiln events ID`.
//!
//! The program writes one record per dropped connection attempt (a packet
//! the policy denies: a deny rule, the default, a protected destination; and
//! DNS to another server) into the sandbox's pinned ring buffer (64 KiB),
//! at most 20 a second per sandbox (the rest are counted and reported with
//! the next event), so a guest cannot flood the host. Reader: whoever asks,
//! on demand ([`crate::Network::drop_events`]): under the sandbox's lock it
//! drains the ring into a bounded file, `<net state>/events/<id>.jsonl`
//! (the last [`KEEP`] events), and returns the file's events. Nothing has
//! to run between reads: the ring keeps what arrived (about 2,700 events;
//! when it is full the program counts further drops as suppressed). The
//! file goes with the sandbox's network (`detach`).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bpf::{EV_RULE_DEFAULT, EV_RULE_DNS, EV_RULE_PROTECTED, RawDropEvent};
use crate::policy::Policy;

/// Events kept per sandbox.
pub const KEEP: usize = 1000;

/// One dropped connection attempt, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEvent {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub proto: String,
    pub destination: Ipv4Addr,
    /// Destination port (TCP/UDP), none for ICMP and the rest.
    pub port: Option<u16>,
    /// What dropped it: `rule N (TEXT)`, `default deny`, `protected
    /// destination`, `dns-elsewhere`.
    pub by: String,
    /// Events the rate limit dropped just before this one.
    pub suppressed: u32,
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        n => format!("ip-proto-{n}"),
    }
}

/// Turns raw records into events: CLOCK_MONOTONIC to wall-clock time, the
/// rule index to its text in `policy` (the policy in force when read; a
/// rule index beyond it is shown by number only).
pub fn convert(raw: &[RawDropEvent], policy: Option<&Policy>) -> Vec<DropEvent> {
    let mono_now = crate::bpf::monotonic_ns();
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    raw.iter()
        .map(|r| {
            let age_ms = mono_now.saturating_sub(r.time_ns) / 1_000_000;
            let by = match r.rule {
                EV_RULE_DEFAULT => "default deny".to_owned(),
                EV_RULE_PROTECTED => "protected destination".to_owned(),
                EV_RULE_DNS => "dns-elsewhere (only the node's resolver)".to_owned(),
                i => match policy.and_then(|p| p.egress.get(i as usize)) {
                    Some(rule) => format!("rule {} ({rule})", i + 1),
                    None => format!("rule {}", i as u64 + 1),
                },
            };
            DropEvent {
                unix_ms: wall_now.saturating_sub(age_ms),
                proto: proto_name(r.proto),
                destination: r.daddr,
                port: (r.proto == 6 || r.proto == 17).then_some(r.dport),
                by,
                suppressed: r.suppressed,
            }
        })
        .collect()
}

/// Appends `new` to the file at `path` and keeps the last [`KEEP`];
/// returns every event kept. Lines that do not parse are skipped.
pub fn append_and_read(path: &Path, new: &[DropEvent]) -> std::io::Result<Vec<DropEvent>> {
    let mut all: Vec<DropEvent> = match fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e),
    };
    if new.is_empty() {
        return Ok(all);
    }
    all.extend_from_slice(new);
    if all.len() > KEEP {
        all.drain(..all.len() - KEEP);
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = fs::File::create(&tmp)?;
    let mut text = String::new();
    for e in &all {
        text.push_str(&serde_json::to_string(e).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(all)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC) for milliseconds since the epoch.
pub fn format_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(format_utc(1_796_342_400_000), "2026-12-04T00:00:00.000Z");
    }

    #[test]
    fn the_file_keeps_the_last_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events").join("x.jsonl");
        let ev = |i: u64| DropEvent {
            unix_ms: i,
            proto: "tcp".into(),
            destination: Ipv4Addr::new(10, 0, 0, 1),
            port: Some(80),
            by: "default deny".into(),
            suppressed: 0,
        };
        assert!(append_and_read(&path, &[]).unwrap().is_empty());
        let first: Vec<DropEvent> = (0..KEEP as u64).map(ev).collect();
        append_and_read(&path, &first).unwrap();
        let all = append_and_read(&path, &[ev(5000), ev(5001)]).unwrap();
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].unix_ms, 2);
        assert_eq!(all.last().unwrap().unix_ms, 5001);
        let raw = RawDropEvent {
            time_ns: crate::bpf::monotonic_ns(),
            daddr: Ipv4Addr::new(1, 2, 3, 4),
            rule: EV_RULE_PROTECTED,
            dport: 0,
            proto: 1,
            suppressed: 3,
        };
        let e = &convert(&[raw], None)[0];
        assert_eq!((e.proto.as_str(), e.port, e.suppressed), ("icmp", None, 3));
        assert_eq!(e.by, "protected destination");
    }
}
