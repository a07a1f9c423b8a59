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
        // Node-local templates are named by content; through the API by
        // image and resources (`busybox-…-1c-256m-1024d`).
        assert!(
            name.starts_with("tpl-") || (common::through_up() && !name.is_empty()),
            "name: {name}"
        );
        name
    }

    /// The node's name of template `name`: itself on the local route;
    /// through `kiln up`, the node template its daemon made for the
    /// tenant `default`'s template (`STATE/node/templates.json`).
    fn local_name(&self, name: &str) -> String {
        if !common::through_up() {
            return name.to_owned();
        }
        let made: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.k.state_dir().join("node/templates.json"))
                .expect("the node's template map"),
        )
        .expect("json");
        made[format!("default/{name}")]["local"]
            .as_str()
            .unwrap_or_else(|| panic!("no node template for {name}: {made}"))
            .to_owned()
    }

    fn users(&self, name: &str) -> Vec<String> {
        let dir = self
            .k
            .state_dir()
            .join("templates")
            .join(self.local_name(name))
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

/// Asserts that `kiln run -v` said `what` on stderr.
fn assert_said(out: &std::process::Output, what: &str) {
    let err = stderr(out);
    assert!(err.contains(what), "expected {what:?} on stderr: {err}");
}

fn assert_warm(out: &std::process::Output, name: &str) {
    assert_said(out, &format!("warm start from template {name}"));
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
        assert!(
            rec.contains(&t.local_name(&name)),
            "sandbox {id} not warm-started: {rec}"
        );
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
    // With --rm too: the record is gone by the time kiln exits, the reason
    // must still be given.
    let out = t.run(&[
        "run",
        "--rm",
        "-v",
        "--timeout",
        "2",
        &img,
        "--",
        "sleep",
        "600",
    ]);
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
    // Through the API the node removes its template once its daemon sees
    // the server's one gone.
    let t0 = Instant::now();
    loop {
        let left: Vec<_> = std::fs::read_dir(t.k.state_dir().join("templates"))
            .expect("templates dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 30,
            "template store not empty: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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
    if common::through_up() {
        // Through the API the guest is the node's setting: an operator
        // restarts `kiln up` with the other one (a host's guest upgrade).
        // The node makes the server's template again for its new guest,
        // runs start warm from that, and the old build is removed.
        let rebuilt = |before: &str, guest: &std::path::Path| {
            t.k.restart_up(false, &[("KILN_INITRAMFS", guest.as_os_str().to_owned())]);
            let t0 = Instant::now();
            loop {
                let now = t.local_name(&name);
                if now != before && t.k.state_dir().join("templates").join(&now).is_dir() {
                    break now;
                }
                assert!(
                    t0.elapsed().as_secs() < 120,
                    "the node never made {name} again for its new guest"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        };
        let first = t.local_name(&name);
        // A sandbox started from the first build keeps it through the
        // upgrade (its memory is that build's file).
        let out = t.run(&["run", "-d", "-v", &img, "--", "sleep", "600"]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        assert_warm(&out, &name);
        let holder = stdout(&out).trim().to_string();
        let second = rebuilt(&first, &other);
        let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "still runs"]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), "still runs\n");
        assert_warm(&out, &name);
        let gone = |local: &str| {
            let t0 = Instant::now();
            while t.k.state_dir().join("templates").join(local).exists() {
                assert!(
                    t0.elapsed().as_secs() < 60,
                    "the replaced build {local} is still there"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        };
        std::thread::sleep(std::time::Duration::from_secs(3));
        assert!(
            t.k.state_dir().join("templates").join(&first).is_dir(),
            "the first build went while {holder} used it"
        );
        assert_eq!(t.ok(&["exec", &holder, "--", "echo", "alive"]), "alive\n");
        t.ok(&["rm", "-f", &holder]);
        gone(&first);
        // And back: made again with the guest it first had.
        let third = rebuilt(&second, &initramfs);
        assert_eq!(third, first, "the same guest gives the same node template");
        gone(&second);
    } else {
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
        // A pool made under the other initramfs is emptied once a template
        // is created with the current one: no run would ever take its
        // members.
        let other_tpl = stdout(&t.run_env(&env, &["template", "create", "--pool", "1", &img]))
            .trim()
            .to_string();
        assert_ne!(other_tpl, name);
        assert_eq!(t.members(&other_tpl).len(), 1);
        let out = t.run(&["template", "create", &img]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("emptied the pool of stale template {other_tpl}")),
            "stderr: {}",
            stderr(&out)
        );
        assert!(t.members(&other_tpl).is_empty());
        let out = t.run_env(&env, &["template", "rm", &other_tpl]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    }
    // With the artifacts it was made with, it is used again.
    let out = t.run(&["run", "--rm", "-v", &img, "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_warm(&out, &name);

    tracing::info!("phase: a damaged template is refused and the run boots");
    let state =
        t.k.state_dir()
            .join("templates")
            .join(t.local_name(&name))
            .join("vmm/state");
    let len = std::fs::metadata(&state).expect("state").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    drop(f);
    if common::through_up() {
        // The node finds its build damaged and makes it again by itself
        // (a run meanwhile boots cold or starts from the new build).
        let t0 = Instant::now();
        while std::fs::metadata(&state).map_or(0, |m| m.len()) != len {
            assert!(
                t0.elapsed().as_secs() < 120,
                "the damaged template was never made again"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    } else {
        let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "booted"]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), "booted\n");
        assert!(
            stderr(&out).contains(&format!("template {name} cannot be used")),
            "stderr: {}",
            stderr(&out)
        );
    }
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

impl T {
    /// The pool column of `template ls` for `name`.
    fn pool_status(&self, name: &str) -> String {
        let ls = self.ok(&["template", "ls"]);
        let line = ls
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed: {ls}"));
        // NAME IMAGE CPUS MEMORY DISK SIZE(2 words) CREATED(2 words) IN-USE POOL
        line.split_whitespace().nth(10).unwrap_or("").to_string()
    }

    /// No template is being made: no work or staging directory is left.
    fn assert_no_work_dirs(&self) {
        let works: Vec<_> = std::fs::read_dir(self.k.state_dir().join("templates"))
            .expect("templates")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".work-") || n.starts_with(".staging-"))
            .collect();
        assert!(works.is_empty(), "work or staging dirs left: {works:?}");
    }

    /// The IDs of the pool members of `name` that can be claimed.
    fn members(&self, name: &str) -> Vec<String> {
        let dir = self
            .k
            .state_dir()
            .join("pools")
            .join(self.local_name(name))
            .join("ready");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn record(&self, id: &str) -> serde_json::Value {
        let p = self
            .k
            .state_dir()
            .join("sandboxes")
            .join(id)
            .join("record.json");
        serde_json::from_slice(&std::fs::read(&p).expect("record")).expect("json")
    }

    /// Waits until `name`'s pool has `n` members ready again.
    fn wait_pool(&self, name: &str, n: usize) {
        let t0 = Instant::now();
        while self.members(name).len() != n {
            assert!(
                t0.elapsed().as_secs() < 90,
                "the pool of {name} never got back to {n}: {:?}",
                self.members(name)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn assert_from_pool(out: &std::process::Output, name: &str) {
    assert_said(out, &format!("warm start from the pool of template {name}"));
}

#[test]
fn a_warm_pool_hands_out_paused_sandboxes_and_refills_itself() {
    let t = T::new();
    let img = busybox();
    tracing::info!("phase: a template with a pool of 2");
    let name = t.template_create(&["--pool", "2"]);
    assert_eq!(t.pool_status(&name), "2/2");
    let first = t.members(&name);
    assert_eq!(first.len(), 2, "members: {first:?}");
    // Members run nothing yet: not in ps, paused, using no CPU.
    assert_eq!(t.ok(&["ps", "-a", "-q"]).trim(), "");
    let mut qemu_pids = vec![];
    for id in &first {
        let r = t.record(id);
        assert_eq!(r["state"]["state"], "pooled", "record: {r}");
        qemu_pids.push(r["vm"]["pid"].as_u64().expect("vm pid"));
    }
    let before: Vec<u64> = qemu_pids.iter().map(|p| cpu_ticks(*p)).collect();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after: Vec<u64> = qemu_pids.iter().map(|p| cpu_ticks(*p)).collect();
    for (b, a) in before.iter().zip(&after) {
        // A running idle TCG guest burns far more than this in 2 s.
        assert!(a - b <= 10, "a paused member used CPU: {b} -> {a} ticks");
    }
    assert!(t.run(&["exec", &first[0], "--", "true"]).status.code() != Some(0));

    tracing::info!("phase: a run takes a member and runs exactly its command");
    let out = t.run(&[
        "run",
        "--rm",
        "-v",
        "-e",
        "GREETING=from the pool",
        "-u",
        "app",
        "-w",
        "/srv/work",
        &img,
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|$(id -u)|$(pwd)|$(hostname)|$HOSTNAME\"; echo err >&2; exit 4",
    ]);
    assert_eq!(code(&out), 4, "stderr: {}", stderr(&out));
    assert_from_pool(&out, &name);
    let line = stdout(&out);
    let f: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(f.len(), 5, "output: {line:?}");
    assert_eq!(&f[..3], ["from the pool", "1000", "/srv/work"]);
    assert_eq!(f[3], f[4], "hostname and $HOSTNAME agree");
    let taken = first
        .iter()
        .find(|id| id.starts_with(f[3]))
        .unwrap_or_else(|| panic!("hostname {} is none of the members {first:?}", f[3]));
    assert!(stderr(&out).contains("err\n"), "stderr: {}", stderr(&out));
    // --rm: the claimed member is gone; the pool refills to 2 with a new one.
    t.wait_pool(&name, 2);
    let now = t.members(&name);
    assert!(!now.contains(taken), "{taken} offered again: {now:?}");
    assert!(!t.k.state_dir().join("sandboxes").join(taken).exists());

    tracing::info!("phase: runs at once get different members and diverge");
    let script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /tmp/rand; \
                  echo mine > /root/own-$(hostname); echo ready; sleep 600";
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let out = t.run(&["run", "-d", "-v", &img, "--", "sh", "-c", script]);
                    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
                    stdout(&out).trim().to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("run")).collect()
    });
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 3, "ids: {ids:?}");
    let mut rands = vec![];
    for id in &ids {
        let t0 = Instant::now();
        while !t.ok(&["logs", id]).contains("ready") {
            assert!(t0.elapsed().as_secs() < 60, "{id} never got ready");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        rands.push(t.ok(&["exec", id, "--", "cat", "/tmp/rand"]));
        assert_eq!(
            t.ok(&["exec", id, "--", "ls", "/root"]).trim(),
            format!("own-{}", &id[..12]),
            "files leak between pool sandboxes"
        );
    }
    rands.sort();
    rands.dedup();
    assert_eq!(rands.len(), 3, "pool sandboxes drew the same random bytes");
    let ps = t.ok(&["ps", "-q"]);
    for id in &ids {
        assert!(ps.contains(id.as_str()), "ps: {ps}");
    }

    tracing::info!("phase: template rm is refused while runs use it");
    let out = t.run(&["template", "rm", &name]);
    assert_eq!(code(&out), 125, "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("in use"), "stderr: {}", stderr(&out));
    for id in &ids {
        t.ok(&["rm", "-f", id]);
    }
    t.wait_pool(&name, 2);

    tracing::info!("phase: a member whose supervisor and VMM died is skipped and reaped");
    let dead = t.members(&name)[0].clone();
    let r = t.record(&dead);
    for pid in [r["shim_pid"].as_u64(), r["vm"]["pid"].as_u64()] {
        let pid = pid.expect("pid") as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..2 {
        let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "survived"]);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), "survived\n");
    }
    t.wait_pool(&name, 2);
    assert!(!t.members(&name).contains(&dead));
    assert!(!t.k.state_dir().join("sandboxes").join(&dead).exists());

    tracing::info!("phase: resizing the pool, then removing the template");
    t.template_create(&["--pool", "1"]);
    if common::through_up() {
        // The node shrinks it in the background (the API counts a pool's
        // members only up to its target).
        t.wait_pool(&name, 1);
    }
    assert_eq!(t.members(&name).len(), 1);
    assert_eq!(t.pool_status(&name), "1/1");
    t.ok(&["template", "rm", &name]);
    assert!(!t.k.state_dir().join("pools").join(&name).exists());
    assert!(t.ok(&["template", "ls", "-q"]).trim().is_empty());
    let sandboxes: Vec<_> = std::fs::read_dir(t.k.state_dir().join("sandboxes"))
        .expect("sandboxes dir")
        .flatten()
        .collect();
    assert!(sandboxes.is_empty(), "left: {sandboxes:?}");
    t.k.assert_clean();
}

#[test]
fn a_template_changed_in_place_is_refused() {
    let t = T::new();
    let img = busybox();
    let name = t.template_create(&[]);
    let out = t.run(&["run", "--rm", "-v", &img, "--", "true"]);
    assert_warm(&out, &name);
    // Same size, one page of guest memory overwritten: only its digest
    // can tell (the digest remembered for the old file must not be used).
    let memory =
        t.k.state_dir()
            .join("templates")
            .join(t.local_name(&name))
            .join("vmm/memory");
    let len = std::fs::metadata(&memory).expect("memory").len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&memory)
            .expect("open");
        f.seek(SeekFrom::Start(len / 3)).expect("seek");
        f.write_all(&[0xa5u8; 4096]).expect("write");
    }
    assert_eq!(std::fs::metadata(&memory).expect("memory").len(), len);
    let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "booted"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "booted\n");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("template {name} cannot be used")) && err.contains("vmm/memory"),
        "stderr: {err}"
    );
    t.ok(&["template", "rm", &name]);
    t.k.assert_clean();
}

#[test]
fn a_killed_template_create_leaves_no_vm() {
    let t = T::new();
    let img = busybox();
    // `template create` boots its VM itself (no supervisor): kill it while
    // that VM runs.
    let mut c = t.k.cmd();
    c.envs(t.pin.iter().map(|(k, v)| (*k, v.clone())));
    let mut child = c
        .args(["template", "create", "--memory", "288", &img])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kiln runs");
    let t0 = Instant::now();
    loop {
        let qemu =
            t.k.leftover_processes()
                .into_iter()
                .any(|p| p.contains("qemu-system"));
        if qemu {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "the template's VM never started"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "create ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if common::through_up() {
        // Through the API the node daemon in `kiln up` makes the template
        // (the client only waits): kill -9 that instead. Restarted, it
        // finds the VM its predecessor left, kills it and makes the
        // template again; the waiting create still succeeds.
        t.k.restart_up(true, &[]);
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                t0.elapsed().as_secs() < 300,
                "template create still waits after the node's restart"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(status.success(), "template create failed: {status:?}");
        let ls = t.ok(&["template", "ls"]);
        assert!(ls.contains("ready"), "template ls: {ls}");
        t.assert_no_work_dirs();
        let name = t.ok(&["template", "ls", "-q"]).trim().to_string();
        t.ok(&["template", "rm", &name]);
        t.k.assert_clean();
        return;
    }
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(
        t.k.leftover_processes()
            .iter()
            .any(|p| p.contains("qemu-system")),
        "the VM went with its creator: nothing to reap"
    );
    // The next kiln command that sweeps (ps, template ls/create) kills it.
    t.ok(&["ps"]);
    t.assert_no_work_dirs();
    t.k.assert_clean();
    // And a template can be made afterwards.
    let name = t.template_create(&["--memory", "288"]);
    t.ok(&["template", "rm", &name]);
    t.k.assert_clean();
}

#[test]
fn a_warm_started_sandbox_snapshots_and_forks_like_a_booted_one() {
    let t = T::new();
    let img = busybox();
    let name = t.template_create(&[]);
    let counter =
        "i=0; while true; do i=$((i+1)); echo \"count $i\"; echo $i > /root/n; sleep 0.2; done";
    let out = t.run(&["run", "-d", "-v", &img, "--", "sh", "-c", counter]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_warm(&out, &name);
    let src = stdout(&out).trim().to_string();
    let last_count = |id: &str| -> u64 {
        t.ok(&["logs", id])
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("count "))
            .find_map(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let wait_past = |id: &str, n: u64| {
        let t0 = Instant::now();
        while last_count(id) <= n {
            assert!(
                t0.elapsed().as_secs() < 60,
                "{id} stuck at {}",
                last_count(id)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_past(&src, 3);
    t.ok(&["snapshot", &src, "--name", "warm-snap"]);
    // Its RAM is its own file, copied sparsely like a booted VM's: the
    // device state holds none of it.
    // (Through the API the node keeps it as `default.warm-snap`.)
    let on_node = if common::through_up() {
        "default.warm-snap"
    } else {
        "warm-snap"
    };
    let state =
        t.k.state_dir()
            .join("snapshots")
            .join(on_node)
            .join("vmm/state");
    let len = std::fs::metadata(&state).expect("state").len();
    assert!(
        len < 4 << 20,
        "device state is {len} bytes: RAM went into it"
    );
    let restored = t.ok(&["restore", "-d", "warm-snap"]).trim().to_string();
    let at = last_count(&src);
    wait_past(&restored, 1);
    let first: u64 = t
        .ok(&["logs", &restored])
        .lines()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|n| n.parse().ok())
        .next()
        .expect("a count");
    assert!(
        first > 3 && first <= at + 1,
        "restored at {first}, source at {at}"
    );
    let forks: Vec<String> = t
        .ok(&["fork", &restored, "-n", "2"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(forks.len(), 2);
    for f in &forks {
        let before = last_count(f);
        wait_past(f, before.max(1));
    }
    for id in forks.iter().chain([&restored, &src]) {
        t.ok(&["rm", "-f", id]);
    }
    t.ok(&["snapshot", "rm", "warm-snap"]);
    t.ok(&["template", "rm", &name]);
    t.k.assert_clean();
}

#[test]
fn a_pool_survives_ps_abandoned_claims_and_stuck_members() {
    let t = T::new();
    let img = busybox();
    let name = t.template_create(&[]);

    tracing::info!("phase: the pool fills while kiln ps runs in a loop");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = t.run(&["ps", "-a"]);
            }
        });
        let out = t.run(&["template", "create", "--pool", "3", &img]);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    });
    assert_eq!(t.members(&name).len(), 3);

    tracing::info!("phase: a member taken by a run that died is offered again");
    let taken = t.members(&name)[0].clone();
    std::fs::remove_file(
        t.k.state_dir()
            .join("pools")
            .join(t.local_name(&name))
            .join("ready")
            .join(&taken),
    )
    .expect("take the offer");
    t.wait_pool(&name, 3);
    assert!(t.members(&name).contains(&taken));

    tracing::info!("phase: a member whose VMM is stuck is skipped, the run still works");
    t.template_create(&["--pool", "1"]);
    let stuck = t.members(&name);
    assert_eq!(stuck.len(), 1);
    let qemu = t.record(&stuck[0])["vm"]["pid"].as_u64().expect("vm pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop the VMM");
    let out = t.run(&["run", "--rm", "-v", &img, "--", "echo", "still works"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "still works\n");
    assert!(
        stderr(&out).contains("the pool member failed"),
        "stderr: {}",
        stderr(&out)
    );
    // The stuck member is gone (its supervisor killed its VMM).
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{qemu}")).exists() {
        assert!(t0.elapsed().as_secs() < 30, "the stuck VMM is still there");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    t.ok(&["template", "rm", &name]);
    t.k.assert_clean();
}
