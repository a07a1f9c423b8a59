//! Automatic templates on real microVMs: the second run of an image starts
//! warm with no template made by hand, with the same output and a fresh
//! identity; automatic templates are evicted least-recently-used past the
//! budget and never while in use; a stale one is rebuilt, never used.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};

/// `kiln ARGS` with automatic templates on (the harness turns them off for
/// every other test) and `env` added.
fn auto(k: &Kiln, env: &[(&str, String)], args: &[&str]) -> Output {
    let mut c = k.cmd();
    c.env("KILN_AUTO_TEMPLATES", "1");
    for (key, v) in env {
        c.env(key, v);
    }
    c.args(args).output().expect("kiln runs")
}

fn ok(out: Output) -> (String, String) {
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    (stdout(&out), stderr(&out))
}

/// `(name, memory MiB, status)` of every template.
fn templates(k: &Kiln, env: &[(&str, String)]) -> Vec<(String, String, String)> {
    let (out, _) = ok(auto(k, env, &["template", "ls"]));
    out.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let status = l.split("  ").last().unwrap_or("").trim().to_string();
            (f[0].to_string(), f[3].to_string(), status)
        })
        .collect()
}

/// Waits until an automatic, ready template with `memory` exists.
fn wait_template(k: &Kiln, env: &[(&str, String)], memory: u32) -> String {
    let t0 = Instant::now();
    loop {
        if let Some((name, _, _)) = templates(k, env).into_iter().find(|(_, m, s)| {
            *m == format!("{memory}M") && s.starts_with("ready") && s.contains("(automatic)")
        }) {
            return name;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "no automatic template for {memory} MiB: {:?}; log: {}",
            templates(k, env),
            std::fs::read_to_string(k.state_dir().join("templates/.auto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

const PROBE: &str = "echo host=$HOSTNAME; echo arg=$0; env | grep -v HOSTNAME | sort";

#[test]
fn the_second_run_starts_warm_without_a_hand_made_template() {
    let k = Kiln::new();
    let bb = busybox();
    let none: &[(&str, String)] = &[];
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "-v", "--rm", "-e", "X=1"];
        a.extend_from_slice(extra);
        a.extend([bb.as_str(), "--", "sh", "-c", PROBE, "probe"]);
        ok(auto(&k, none, &a))
    };
    tracing::info!("first run: cold, and its template is made in the background");
    let (first, err) = run(&[]);
    assert!(err.contains("cold boot: no template"), "{err}");
    // `-v` ends with the one-line breakdown of where the time went.
    let timing = err
        .lines()
        .find(|l| l.starts_with("kiln: timing: "))
        .unwrap_or_else(|| panic!("no timing line: {err}"));
    for phase in [
        "resolve ",
        "prepare ",
        "VMM spawn ",
        "boot ",
        "configure ",
        "exec ",
        "agent ready at ",
        "first byte at ",
        "exit at ",
        "teardown ",
        "total ",
    ] {
        assert!(timing.contains(phase), "{phase:?} missing: {timing}");
    }
    assert!(err.contains("template in the background"), "{err}");
    let name = wait_template(&k, none, 256);

    tracing::info!("second run: warm, same output, its own identity");
    let (second, err) = run(&[]);
    assert!(
        err.contains(&format!("warm start from template {name}")),
        "{err}"
    );
    assert!(
        err.contains(", restore "),
        "the breakdown says restore: {err}"
    );
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("host="))
            .map(String::from)
            .collect()
    };
    assert_eq!(strip(&first), strip(&second));
    let host = |s: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix("host="))
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(host(&first).len(), 12, "{first}");
    assert_ne!(host(&first), host(&second));
    assert!(
        second.contains("X=1") && second.contains("arg=probe"),
        "{second}"
    );

    tracing::info!("--cold and KILN_AUTO_TEMPLATES=0 still boot and make nothing");
    let (_, err) = run(&["--cold", "--memory", "288"]);
    assert!(err.contains("cold boot: --cold"), "{err}");
    assert!(!err.contains("in the background"), "{err}");
    let out = k
        .cmd()
        .args(["run", "-v", "--rm", "--memory", "288", &bb, "--", "true"])
        .output()
        .expect("kiln runs");
    assert!(
        !stderr(&out).contains("in the background"),
        "{}",
        stderr(&out)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(templates(&k, none).len(), 1, "{:?}", templates(&k, none));
    ok(auto(&k, none, &["template", "rm", &name]));
    k.assert_clean();
}

#[test]
fn automatic_templates_are_evicted_past_the_budget_never_in_use() {
    let k = Kiln::new();
    let bb = busybox();
    // A budget smaller than any template: every automatic template but the
    // newest is evicted, unless it is in use.
    let tiny = [("KILN_TEMPLATE_BUDGET_MIB", "1".to_string())];
    let cold = |memory: &str| {
        ok(auto(
            &k,
            &tiny,
            &["run", "--rm", "--memory", memory, &bb, "--", "true"],
        ))
    };
    cold("256");
    let a = wait_template(&k, &tiny, 256);
    tracing::info!("a sandbox started from template A keeps it");
    let (id, err) = ok(auto(
        &k,
        &tiny,
        &["run", "-v", "-d", &bb, "--", "sleep", "600"],
    ));
    assert!(
        err.contains(&format!("warm start from template {a}")),
        "{err}"
    );
    let id = id.trim().to_string();
    cold("320");
    let b = wait_template(&k, &tiny, 320);
    let names: Vec<String> = templates(&k, &tiny).into_iter().map(|t| t.0).collect();
    assert!(names.contains(&a) && names.contains(&b), "{names:?}");

    tracing::info!("once A is unused, the next automatic template evicts A and B");
    ok(auto(&k, &tiny, &["rm", "-f", &id]));
    cold("384");
    let c = wait_template(&k, &tiny, 384);
    let t0 = Instant::now();
    loop {
        let names: Vec<String> = templates(&k, &tiny).into_iter().map(|t| t.0).collect();
        if names == vec![c.clone()] {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{names:?}");
        std::thread::sleep(Duration::from_millis(300));
    }

    tracing::info!("a user's create adopts an automatic template: never evicted");
    ok(auto(
        &k,
        &tiny,
        &["template", "create", "--memory", "384", &bb],
    ));
    let (ls, _) = ok(auto(&k, &tiny, &["template", "ls"]));
    assert!(!ls.contains("(automatic)"), "{ls}");
    ok(auto(&k, &tiny, &["template", "rm", &c]));
    k.assert_clean();
}

#[test]
fn a_stale_automatic_template_is_rebuilt_never_used() {
    let k = Kiln::new();
    let bb = busybox();
    let none: &[(&str, String)] = &[];
    ok(auto(&k, none, &["run", "--rm", &bb, "--", "true"]));
    let old = wait_template(&k, none, 256);

    tracing::info!("another initramfs (same content plus cpio padding): the template is stale");
    let dir = tempfile::tempdir().expect("tmp");
    let cache = common::shared_cache();
    let current =
        std::fs::canonicalize(cache.join("initramfs/current/initramfs.img")).expect("initramfs");
    let copy: PathBuf = dir.path().join("initramfs.img");
    let mut bytes = std::fs::read(&current).expect("read initramfs");
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&copy, bytes).expect("write initramfs");
    std::fs::copy(
        current.with_file_name("kiln-init"),
        dir.path().join("kiln-init"),
    )
    .expect("kiln-init beside it");
    let other = [("KILN_INITRAMFS", copy.display().to_string())];
    let (out, err) = ok(auto(
        &k,
        &other,
        &["run", "-v", "--rm", &bb, "--", "echo", "fresh"],
    ));
    assert_eq!(out.trim(), "fresh");
    assert!(err.contains("cold boot"), "{err}");
    assert!(
        !err.contains(&format!("warm start from template {old}")),
        "{err}"
    );
    let new = {
        let t0 = Instant::now();
        loop {
            let ready: Vec<String> = templates(&k, &other)
                .into_iter()
                .filter(|(n, _, s)| *n != old && s.starts_with("ready"))
                .map(|t| t.0)
                .collect();
            if let Some(n) = ready.first() {
                break n.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "not rebuilt");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let (_, err) = ok(auto(&k, &other, &["run", "-v", "--rm", &bb, "--", "true"]));
    assert!(
        err.contains(&format!("warm start from template {new}")),
        "{err}"
    );
    for name in [old, new] {
        let _ = auto(&k, &other, &["template", "rm", &name]);
    }
    k.assert_clean();
}

/// Automatic templates are a cache: `kiln images rm` evicts an idle one
/// made from the image instead of refusing (a user's template still
/// refuses, as before).
#[test]
fn images_rm_evicts_idle_automatic_templates() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let none: &[(&str, String)] = &[];
    ok(auto(&k, none, &["run", "--rm", &bb, "--", "true"]));
    let name = wait_template(&k, none, 256);
    let (out, _) = ok(auto(&k, none, &["images", "rm", &bb]));
    assert!(
        out.contains(&format!("evicted automatic template {name}"))
            && out.contains("removed sha256:"),
        "{out}"
    );
    assert!(templates(&k, none).is_empty(), "{:?}", templates(&k, none));
    k.assert_clean();
}
