//! Templates and warm starts on real microVMs: `kiln template create|ls|rm`,
//! `kiln run` restoring a matching template (and saying so with `-v`),
//! `--cold`, stale templates that must not be used, and a template that
//! cannot be removed while sandboxes started from it run.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{Kiln, busybox, code, stderr, stdout};

/// The kernel and initramfs as resolved now (the shared cache's `current`
/// links move when someone rebuilds them): each test pins what it started
/// with, since a template is refused under any other.
fn pin_guest(k: &Kiln) -> Vec<(&'static str, PathBuf)> {
    let cache = k.cache_dir();
    let canon = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    vec![
        ("KILN_KERNEL", canon(cache.join("kernel/current/bzImage"))),
        (
            "KILN_INITRAMFS",
            canon(cache.join("initramfs/current/initramfs.img")),
        ),
    ]
}

struct T {
    k: Kiln,
    pin: Vec<(&'static str, PathBuf)>,
}

impl T {
    fn new() -> T {
        let k = Kiln::new();
        let pin = pin_guest(&k);
        T { k, pin }
    }

    /// `kiln ARGS` with the pinned guest artifacts and extra `env`.
    fn run_env(&self, env: &[(&str, PathBuf)], args: &[&str]) -> std::process::Output {
        let mut c = self.k.cmd();
        c.envs(self.pin.iter().map(|(k, v)| (*k, v.clone())));
        c.envs(env.iter().map(|(k, v)| (*k, v.clone())));
        let out = c.args(args).output().expect("kiln runs");
        tracing::info!(
            ?args,
            code = ?out.status.code(),
            stderr = %String::from_utf8_lossy(&out.stderr),
            "kiln finished"
        );
        out
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_env(&[], args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(code(&out), 0, "kiln {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    fn template_create(&self, extra: &[&str]) -> String {
        let img = busybox();
        let mut a = vec!["template", "create", "-v"];
        a.extend_from_slice(extra);
        a.push(&img);
        let t0 = Instant::now();
        let name = self.ok(&a).trim().to_string();
        eprintln!(
            "MEASURE template: kiln template create took {} ms",
            t0.elapsed().as_millis()
        );
        assert!(name.starts_with("tpl-"), "name: {name}");
        name
    }

    fn users(&self, name: &str) -> Vec<String> {
        let dir = self
            .k
            .state_dir()
            .join("templates")
            .join(name)
            .join("users");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn assert_warm(out: &std::process::Output, name: &str) {
    let err = stderr(out);
    assert!(
        err.contains(&format!("warm start from template {name}")),
        "expected a warm start from {name}: {err}"
    );
}

#[test]
fn warm_start_runs_the_right_process_with_a_fresh_identity() {
    let t = T::new();
    let img = busybox();
    tracing::info!("phase: create a template, list it");
    let name = t.template_create(&[]);
    let ls = t.ok(&["template", "ls"]);
    assert!(ls.contains(&name) && ls.contains("ready"), "ls: {ls}");
    assert_eq!(t.ok(&["template", "ls", "-q"]).trim(), name);
    // Creating it again keeps the valid one.
    assert_eq!(t.template_create(&[]), name);

    tracing::info!("phase: a warm start runs the command with env, user, workdir");
    let t0 = Instant::now();
    let out = t.run(&[
        "run",
        "-v",
        "-e",
        "GREETING=hello warm",
        "-u",
        "app",
        "-w",
        "/srv/work",
        &img,
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|$(id -u):$(id -g)|$(pwd)|$(hostname)|$HOSTNAME|$HOME\"; echo err >&2; exit 3",
    ]);
    eprintln!(
        "MEASURE warm: kiln run (warm) took {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(code(&out), 3, "stderr: {}", stderr(&out));
    assert_warm(&out, &name);
    let line = stdout(&out);
    let f: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(f.len(), 6, "output: {line:?}");
    assert_eq!(f[0], "hello warm");
    assert_eq!(f[1], "1000:1000");
    assert_eq!(f[2], "/srv/work");
    assert_eq!(f[3], f[4], "hostname and $HOSTNAME agree");
    assert_eq!(f[3].len(), 12);
    assert_eq!(f[5], "/home/app");
    assert!(stderr(&out).contains("err\n"), "stderr: {}", stderr(&out));
    // The sandbox's ID starts with its hostname.
    let ps = t.ok(&["ps", "-a"]);
    assert!(ps.contains(f[3]), "ps: {ps}");

    tracing::info!("phase: the same as a cold boot, with --cold");
    let t0 = Instant::now();
    let cold = t.run(&[
        "run",
        "-v",
        "--cold",
        "-e",
        "GREETING=hello warm",
        "-u",
        "app",
        "-w",
        "/srv/work",
        &img,
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|$(id -u):$(id -g)|$(pwd)|$HOME\"; exit 3",
    ]);
    eprintln!(
        "MEASURE cold: kiln run --cold took {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(code(&cold), 3, "stderr: {}", stderr(&cold));
    assert!(
        stderr(&cold).contains("cold boot: --cold"),
        "stderr: {}",
        stderr(&cold)
    );
    assert_eq!(stdout(&cold), "hello warm|1000:1000|/srv/work|/home/app\n");

    tracing::info!("phase: two warm starts at once: own hostnames, files, random numbers");
    let script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /tmp/rand; \
                  echo mine > /root/own-$(hostname); echo ready; sleep 600";
    let a = t
        .ok(&["run", "-d", &img, "--", "sh", "-c", script])
        .trim()
        .to_string();
    let b = t
        .ok(&["run", "-d", &img, "--", "sh", "-c", script])
        .trim()
        .to_string();
    assert_ne!(a, b);
    assert_eq!(t.users(&name), {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });
    for id in [&a, &b] {
        let rec = std::fs::read_to_string(
            t.k.state_dir()
                .join("sandboxes")
                .join(id)
                .join("record.json"),
        )
        .expect("record");
        assert!(rec.contains(&name), "sandbox {id} not warm-started: {rec}");
    }
    let wait_ready = |id: &str| {
        let t0 = Instant::now();
        while !t.ok(&["logs", id]).contains("ready") {
            assert!(t0.elapsed().as_secs() < 60, "{id} never got ready");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_ready(&a);
    wait_ready(&b);
    let ra = t.ok(&["exec", &a, "--", "cat", "/tmp/rand"]);
    let rb = t.ok(&["exec", &b, "--", "cat", "/tmp/rand"]);
    assert_eq!(ra.len(), 64, "{ra:?}");
    assert_ne!(ra, rb, "two warm starts drew the same random bytes");
    // A fresh draw differs too (the CRNG was re-keyed, not just offset).
    let ra2 = t.ok(&[
        "exec",
        &a,
        "--",
        "sh",
        "-c",
        "head -c 16 /dev/urandom | od -An -tx1",
    ]);
    let rb2 = t.ok(&[
        "exec",
        &b,
        "--",
        "sh",
        "-c",
        "head -c 16 /dev/urandom | od -An -tx1",
    ]);
    assert_ne!(ra2, rb2);
    let ha = t.ok(&["exec", &a, "--", "hostname"]);
    let hb = t.ok(&["exec", &b, "--", "hostname"]);
    assert_eq!(ha.trim(), &a[..12]);
    assert_eq!(hb.trim(), &b[..12]);
    let la = t.ok(&["exec", &a, "--", "ls", "/root"]);
    let lb = t.ok(&["exec", &b, "--", "ls", "/root"]);
    assert_eq!(
        la.trim(),
        format!("own-{}", &a[..12]),
        "files leak between warm starts"
    );
    assert_eq!(
        lb.trim(),
        format!("own-{}", &b[..12]),
        "files leak between warm starts"
    );

    tracing::info!("phase: exec, cp, logs, stop and rm on a warm-started sandbox");
    let out = t.run(&[
        "exec",
        "-u",
        "app",
        "-w",
        "/tmp",
        &a,
        "--",
        "sh",
        "-c",
        "echo $(id -u) $(pwd)",
    ]);
    assert_eq!(stdout(&out), "1000 /tmp\n", "stderr: {}", stderr(&out));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("in.txt");
    std::fs::write(&src, b"copied in\n").expect("write");
    t.ok(&["cp", src.to_str().expect("utf-8"), &format!("{a}:/root/")]);
    assert_eq!(
        t.ok(&["exec", &a, "--", "cat", "/root/in.txt"]),
        "copied in\n"
    );
    let back = dir.path().join("back.txt");
    t.ok(&[
        "cp",
        &format!("{a}:/root/in.txt"),
        back.to_str().expect("utf-8"),
    ]);
    assert_eq!(std::fs::read(&back).expect("read"), b"copied in\n");
    assert_eq!(t.ok(&["logs", &a]), "ready\n");
    t.ok(&["stop", "-t", "5", &a]);
    assert_eq!(t.ok(&["wait", &a]).trim(), "143");
    t.ok(&["rm", "-f", &b]);
    t.ok(&["rm", &a]);
    assert!(
        t.users(&name).is_empty(),
        "users left: {:?}",
        t.users(&name)
    );

    tracing::info!("phase: --timeout on a warm start");
    let out = t.run(&["run", "-v", "--timeout", "2", &img, "--", "sleep", "600"]);
    assert_warm(&out, &name);
    assert_eq!(code(&out), 137, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("--timeout"),
        "stderr: {}",
        stderr(&out)
    );

    tracing::info!("phase: a missing program is reported like a cold run");
    let out = t.run(&["run", "--rm", "-v", &img, "--", "/no/such/program"]);
    assert_warm(&out, &name);
    assert_eq!(code(&out), 127, "stderr: {}", stderr(&out));

    tracing::info!("phase: nothing left behind");
    for id in t.ok(&["ps", "-a", "-q"]).lines() {
        t.ok(&["rm", "-f", id]);
    }
    assert!(
        t.users(&name).is_empty(),
        "users left: {:?}",
        t.users(&name)
    );
    t.k.assert_clean();
    t.ok(&["template", "rm", &name]);
    assert!(t.ok(&["template", "ls", "-q"]).trim().is_empty());
    let left: Vec<_> = std::fs::read_dir(t.k.state_dir().join("templates"))
        .expect("templates dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "template store not empty: {left:?}");
}

#[test]
fn stale_templates_are_not_used() {
    let t = T::new();
    let img = busybox();
    let name = t.template_create(&["--memory", "256"]);

    tracing::info!("phase: other resources → no template, said with -v");
    let out = t.run(&[
        "run", "--rm", "-v", "--memory", "320", &img, "--", "echo", "ok",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
    let err = stderr(&out);
    assert!(
        err.contains("cold boot: no template for") && err.contains("320 MiB memory"),
        "stderr: {err}"
    );
    assert!(
        err.contains(&name),
        "the template of this image is named: {err}"
    );
    let out = t.run(&["run", "--rm", "-v", "--disk", "1024", &img, "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("cold boot: no template"),
        "{}",
        stderr(&out)
    );

    tracing::info!("phase: another initramfs → the template is stale, never used");
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = t
        .pin
        .iter()
        .find(|(k, _)| *k == "KILN_INITRAMFS")
        .map(|(_, v)| v.clone())
        .expect("pinned initramfs");
    let other = dir.path().join("initramfs.img");
    let mut bytes = std::fs::read(&initramfs).expect("initramfs");
    // Zero padding after the archive: the kernel unpacks the same files,
    // but it is another file with another digest.
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&other, bytes).expect("write");
    std::fs::copy(
        initramfs.with_file_name("kiln-init"),
        dir.path().join("kiln-init"),
    )
    .expect("copy kiln-init");
    let env = [("KILN_INITRAMFS", other.clone())];
    let out = t.run_env(
        &env,
        &["run", "--rm", "-v", &img, "--", "echo", "still runs"],
    );
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "still runs\n");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cold boot: template {name} is stale"))
            && err.contains("another initramfs"),
        "stderr: {err}"
    );
    let ls = stdout(&t.run_env(&env, &["template", "ls"]));
    assert!(ls.contains("stale"), "ls: {ls}");
    // With the artifacts it was made with, it is used again.
    let out = t.run(&["run", "--rm", "-v", &img, "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_warm(&out, &name);

    tracing::info!("phase: a damaged template is refused and the run boots");
    let state =
        t.k.state_dir()
            .join("templates")
            .join(&name)
            .join("vmm/state");
    let len = std::fs::metadata(&state).expect("state").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    drop(f);
    let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "booted"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "booted\n");
    assert!(
        stderr(&out).contains(&format!("template {name} cannot be used")),
        "stderr: {}",
        stderr(&out)
    );
    // Creating it again replaces the damaged one.
    assert_eq!(t.template_create(&["--memory", "256"]), name);
    let out = t.run(&["run", "--rm", "-v", &img, "--", "true"]);
    assert_warm(&out, &name);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(t.users(&name).is_empty());
    t.k.assert_clean();
}

#[test]
fn template_rm_refuses_while_sandboxes_use_it() {
    let t = T::new();
    let img = busybox();
    let name = t.template_create(&[]);
    let out = t.run(&["run", "-d", "-v", &img, "--", "sleep", "600"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_warm(&out, &name);
    let id = stdout(&out).trim().to_string();
    let out = t.run(&["template", "rm", &name]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("in use"), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains(&id), "stderr: {}", stderr(&out));
    // The template is intact and still serves runs meanwhile.
    let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "second"]);
    assert_warm(&out, &name);
    assert_eq!(stdout(&out), "second\n");
    assert_eq!(t.users(&name), vec![id.clone()]);
    t.ok(&["rm", "-f", &id]);
    assert!(t.users(&name).is_empty());
    t.ok(&["template", "rm", &name]);
    let out = t.run(&["template", "rm", &name]);
    assert_ne!(code(&out), 0);
    let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "cold"]);
    assert_eq!(stdout(&out), "cold\n");
    assert!(
        stderr(&out).contains("cold boot: no template"),
        "{}",
        stderr(&out)
    );
    t.k.assert_clean();
}
