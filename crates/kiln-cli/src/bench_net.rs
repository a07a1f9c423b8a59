//! `kiln bench net`: what network policy costs.
//!
//! 1. Policy update latency: a sandbox interface (a tap with its BPF
//!    programs, on a bridge of the benchmark's own so nothing else is
//!    touched) gets its policy replaced again and again, alternately one
//!    rule and `--rules` rules; the time of each live update (maps rewritten
//!    in place) is measured.
//! 2. Guest → host TCP through the policy, on real microVMs: throughput of
//!    one stream and the rate of short connections, with no policy (default
//!    allow, one rule opening the host port) and with `--rules` rules in
//!    front of that one (first match: the traffic matches the last rule).
//!    The ratio is the figure; under TCG the guest's CPU is the bottleneck.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_net::policy::{Action, Policy};
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::bench::{Stats, kiln, stats};

/// MiB the guest sends in the throughput measurement.
const STREAM_MIB: u32 = 64;
/// Connections the guest makes in the rate measurement.
const CONNECTIONS: u32 = 100;

pub async fn net(image: Option<String>, rules: usize, updates: usize, out: &Path) -> Result<i32> {
    let Some(image) = image else {
        bail!(
            "give the image to benchmark with --image (scripts/quickstart.sh prints a local one)"
        );
    };
    if rules == 0 || rules > 10_000 || updates == 0 {
        bail!("--rules must be 1 to 10000 and --updates at least 1");
    }
    eprintln!("policy updates: {updates} each with 1 and {rules} rules");
    let (one, many) = update_latency(rules, updates).await?;
    eprintln!("guest → host TCP without policy rules");
    let plain = traffic(&image, 0).await?;
    eprintln!("guest → host TCP behind {rules} rules");
    let ruled = traffic(&image, rules).await?;
    let loss = |a: f64, b: f64| {
        if a > 0.0 {
            (1.0 - b / a) * 100.0
        } else {
            f64::NAN
        }
    };
    println!(
        "{:<52} {:>9} {:>9} {:>9}",
        "policy update (live, maps rewritten)", "p50 ms", "p99 ms", "max ms"
    );
    for (label, s) in [
        ("  1 rule".to_string(), &one),
        (format!("  {rules} rules"), &many),
    ] {
        println!(
            "{label:<52} {:>9.2} {:>9.2} {:>9.2}",
            s.p50_ms, s.p99_ms, s.max_ms
        );
    }
    println!(
        "{:<52} {:>11} {:>11} {:>7}",
        "guest → host TCP", "no rules", "with rules", "loss %"
    );
    println!(
        "{:<52} {:>11.1} {:>11.1} {:>7.1}",
        format!("  throughput, MiB/s ({STREAM_MIB} MiB, one stream)"),
        plain.mib_per_s,
        ruled.mib_per_s,
        loss(plain.mib_per_s, ruled.mib_per_s)
    );
    println!(
        "{:<52} {:>11.1} {:>11.1} {:>7.1}",
        format!("  connections/s ({CONNECTIONS} short connections)"),
        plain.conn_per_s,
        ruled.conn_per_s,
        loss(plain.conn_per_s, ruled.conn_per_s)
    );
    let doc = json!({
        "benchmark": "net",
        "rules": rules,
        "update_ms": { "one_rule": one, "many_rules": many },
        "tcp": {
            "no_rules": { "mib_per_s": plain.mib_per_s, "connections_per_s": plain.conn_per_s },
            "with_rules": { "mib_per_s": ruled.mib_per_s, "connections_per_s": ruled.conn_per_s },
            "throughput_loss_percent": loss(plain.mib_per_s, ruled.mib_per_s),
            "connection_rate_loss_percent": loss(plain.conn_per_s, ruled.conn_per_s),
        },
    });
    std::fs::write(out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// `n` rules none of the benchmark's traffic matches (denies of
/// documentation and CGNAT addresses), in front of whatever follows.
fn filler_rules(n: usize) -> Vec<(Action, String)> {
    (0..n)
        .map(|i| {
            let (a, b) = ((i / 250) % 64, i % 250 + 1);
            (
                Action::Deny,
                format!("100.{}.{a}.{b}/32:tcp:1-65535", 64 + (i / 16_000)),
            )
        })
        .collect()
}

/// Live update latency on a bridge and BPF root of the benchmark's own.
async fn update_latency(rules: usize, updates: usize) -> Result<(Stats, Stats)> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut cfg = kiln_net::NetConfig::new(scratch.path());
    cfg.bridge = format!("kbench{}", std::process::id() % 100_000);
    cfg.subnet = "10.87.0.0/24".parse().expect("constant CIDR parses");
    cfg.bpf_root =
        std::path::PathBuf::from(format!("/sys/fs/bpf/kiln-bench-{}", std::process::id()));
    cfg.tap_prefix = "kb".into();
    let net = kiln_net::Network::open(cfg).context("cannot set up the benchmark's bridge")?;
    let id = "bench-policy";
    let small = Policy::from_flags(
        None,
        Some(Action::Deny),
        &[(Action::Allow, "198.51.100.0/24:tcp:443".into())],
    )?;
    let big = Policy::from_flags(None, Some(Action::Deny), &filler_rules(rules))?;
    let result = async {
        net.attach(id, kiln_net::Endpoint::Tap, &small)?;
        let (mut one, mut many) = (vec![], vec![]);
        for _ in 0..updates {
            let t = Instant::now();
            net.update_policy(id, &big)?;
            many.push(t.elapsed());
            let t = Instant::now();
            net.update_policy(id, &small)?;
            one.push(t.elapsed());
        }
        anyhow::Ok((stats(&one), stats(&many)))
    }
    .await;
    let _ = net.detach(id);
    let _ = net.teardown();
    let _ = std::fs::remove_dir_all(&net.config().bpf_root);
    result
}

struct Traffic {
    mib_per_s: f64,
    conn_per_s: f64,
}

/// One sandbox streams to a host listener, then makes short connections to
/// another, behind `rules` filler rules and the rule that opens the ports.
async fn traffic(image: &str, rules: usize) -> Result<Traffic> {
    let gateway = "10.88.0.1";
    let stream = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let conns = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let (sp, cp) = (stream.local_addr()?.port(), conns.local_addr()?.port());
    let received = Arc::new(AtomicU64::new(0));
    let first_last: Arc<std::sync::Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let (r2, fl2) = (received.clone(), first_last.clone());
    let streamer = tokio::spawn(async move {
        while let Ok((mut s, _)) = stream.accept().await {
            let mut buf = vec![0u8; 256 * 1024];
            let t0 = Instant::now();
            let mut n = 0u64;
            // busybox nc does not close its side when its input ends: the
            // host closes once everything arrived.
            let want = u64::from(STREAM_MIB) << 20;
            while let Ok(k) = s.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k as u64;
                if n >= want {
                    break;
                }
            }
            r2.store(n, Ordering::SeqCst);
            fl2.lock().expect("not poisoned").0 = Some(t0);
            fl2.lock().expect("not poisoned").1 = Some(Instant::now());
        }
    });
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let acc2 = accepted.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = conns.accept().await {
            acc2.lock().expect("not poisoned").push(Instant::now());
            drop(s);
        }
    });
    let script = format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {gateway} {sp}; \
         i=0; while [ $i -lt {CONNECTIONS} ]; do nc {gateway} {cp} </dev/null; i=$((i+1)); done",
        STREAM_MIB * 16
    );
    let mut args: Vec<String> = ["run", "-d", "--net", "default", "--policy-default", "allow"]
        .map(String::from)
        .to_vec();
    for (_, r) in filler_rules(rules) {
        args.push("--deny".into());
        args.push(r);
    }
    args.push("--allow".into());
    args.push(format!("{gateway}/32:tcp:1-65535"));
    args.extend([
        image.to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script,
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = kiln(&argv).await?;
    let waited = tokio::time::timeout(Duration::from_secs(600), kiln(&["wait", &id])).await;
    let _ = kiln(&["rm", "-f", &id]).await;
    streamer.abort();
    acceptor.abort();
    match waited {
        Ok(Ok(code)) if code.trim() == "0" => {}
        Ok(Ok(code)) => bail!("the benchmark's guest exited {code}"),
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("the benchmark's guest did not finish within 600 s"),
    }
    let bytes = received.load(Ordering::SeqCst);
    if bytes != u64::from(STREAM_MIB) << 20 {
        bail!(
            "the host received {bytes} bytes of {}",
            u64::from(STREAM_MIB) << 20
        );
    }
    let (t0, t1) = *first_last.lock().expect("not poisoned");
    let secs = match (t0, t1) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => bail!("the stream never arrived"),
    };
    let acc = accepted.lock().expect("not poisoned").clone();
    if acc.len() != CONNECTIONS as usize {
        bail!("{} of {CONNECTIONS} connections arrived", acc.len());
    }
    let span = acc[acc.len() - 1].duration_since(acc[0]).as_secs_f64();
    Ok(Traffic {
        mib_per_s: f64::from(STREAM_MIB) / secs,
        conn_per_s: (acc.len() - 1) as f64 / span.max(1e-9),
    })
}
