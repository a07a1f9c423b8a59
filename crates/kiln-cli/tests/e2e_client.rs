//! The sandbox commands as API clients, end to end: a real `kiln server`
//! replica in this process, a real `kiln node` process in its own network
//! namespace, real microVMs, and the real `kiln` binary run with
//! `KILN_SERVER`/`KILN_TOKEN` set, so that `run`, `exec`, `cp`, `logs`,
//! `ps`, `inspect`, `pause`, `resume`, `wait`, `stop` and `rm` go through
//! the REST API (WebSocket attach/exec, NDJSON logs, tar files) with the
//! node-local path's output and exit codes. Tenant B gets nothing of tenant
//! A's sandbox through these commands.

mod common;
mod net_support;
mod node_host;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Command as Proc, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};
use kiln_api::cluster::{Quotas, Role, TenantName};
use kiln_server::{Server, ServerConfig};
use kiln_store::{Command, State};
use kiln_testkit::ApiSchemas;
use node_host::{JOIN, Netns, NodeProc};
use sha2::{Digest, Sha256};

struct Api {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
    /// Tenant A's and tenant B's tokens.
    a: String,
    b: String,
}

impl Api {
    fn start(ip: &str) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-server-")
            .tempdir_in("/tmp")
            .expect("server dir");
        let mut cfg = ServerConfig::new(
            1,
            format!("{ip}:0").parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
            dir.path(),
            JOIN,
        );
        cfg.init = true;
        cfg.allow_local_images = true;
        cfg.heartbeat_interval_ms = 300;
        cfg.grace_ms = 10_000;
        cfg.reconcile_ms = 100;
        let server = rt.block_on(Server::start(cfg)).expect("kiln server starts");
        let t0 = Instant::now();
        while server.raft().status().role != kiln_store::RaftRole::Leader {
            assert!(t0.elapsed() < Duration::from_secs(20), "no leader");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut tokens = vec![];
        for (i, t) in ["acme", "other"].iter().enumerate() {
            let tenant = TenantName::new(*t).expect("tenant");
            let w = |c| {
                let r = rt.block_on(server.raft().write(c)).expect("write");
                assert!(!r.is_rejected(), "{r:?}");
            };
            w(Command::CreateTenant {
                name: tenant.clone(),
                quotas: Quotas {
                    sandboxes: 100,
                    cpus: 1000,
                    memory_mib: 1_000_000,
                },
                now_ms: 1,
            });
            let secret = format!("tenant-{t}-secret-0123456789abcdef");
            w(Command::CreateToken {
                id: format!("{t}-1"),
                tenant: Some(tenant),
                role: Role::Tenant,
                sha256: kiln_store::query::hash_token(&secret),
                description: String::new(),
                now_ms: 2 + i as u64,
                node: None,
            });
            tokens.push(secret);
        }
        Api {
            rt,
            server: Some(server),
            _dir: dir,
            b: tokens.pop().expect("b"),
            a: tokens.pop().expect("a"),
        }
    }

    fn url(&self) -> String {
        self.server.as_ref().expect("running").api_url().to_string()
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.server.as_ref().expect("running").raft().read_local(f)
    }

    fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&State) -> bool) {
        let t0 = Instant::now();
        while !self.read(&f) {
            assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn openapi(&self) -> ApiSchemas {
        let out = Proc::new("curl")
            .args(["-sS", "-f"])
            .arg(format!("{}/v1/openapi.json", self.url()))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ApiSchemas::new(&out.stdout).expect("the server's OpenAPI document")
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// The CLI as tenant `token`'s client of the server.
struct Cli<'a> {
    k: &'a Kiln,
    url: String,
    token: String,
}

impl Cli<'_> {
    fn cmd(&self) -> Proc {
        let mut c = self.k.cmd();
        c.env("KILN_SERVER", &self.url)
            .env("KILN_TOKEN", &self.token)
            .env("KILN_CONFIG", "/nonexistent");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let t = Instant::now();
        let o = self.cmd().args(args).output().expect("kiln runs");
        eprintln!(
            "kiln {} -> {:?} in {} ms",
            args.join(" "),
            o.status.code(),
            t.elapsed().as_millis()
        );
        o
    }

    fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln runs");
        let mut stdin = child.stdin.take().expect("piped");
        let input = input.to_vec();
        let w = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("kiln finishes");
        let _ = w.join();
        out
    }

    /// `kiln ps -a -q` as a list.
    fn ids(&self) -> Vec<String> {
        let o = self.run(&["ps", "-a", "-q"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o).lines().map(str::to_owned).collect()
    }
}

fn ok(o: &Output) -> String {
    assert_eq!(code(o), 0, "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    stdout(o)
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn sha256_file(p: &std::path::Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).expect("open");
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

#[test]
fn sandbox_commands_work_through_the_api() {
    let _net = net_support::exclusive();
    let t_all = Instant::now();
    let k = Kiln::new();
    let ns = Netns::new();
    let api = Api::start(&ns.host_ip);
    let node_ip = format!(
        "{}.2",
        ns.host_ip.rsplit_once('.').expect("an IPv4 address").0
    );
    let mut node = NodeProc::start_with_servers(
        &k,
        &ns,
        &api.url(),
        "host-c",
        &[
            "--address",
            &format!("{node_ip}:0"),
            "--capacity-cpus",
            "16",
        ],
    );
    api.wait_for(Duration::from_secs(60), "the node registered", |s| {
        s.nodes.values().any(|n| n.stream_key.is_some())
    });
    let schemas = api.openapi();
    let a = Cli {
        k: &k,
        url: api.url(),
        token: api.a.clone(),
    };
    let b = Cli {
        k: &k,
        url: api.url(),
        token: api.b.clone(),
    };
    let img = busybox();
    let res = ["--memory", "128", "--disk", "64"];
    let run_args = |extra: &[&str], cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["run".into()];
        if !extra.contains(&"--disk") {
            v.extend(res.iter().map(|s| s.to_string()));
        } else {
            v.extend(["--memory".to_string(), "128".to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(img.clone());
        v.push("--".into());
        v.extend(cmd.iter().map(|s| s.to_string()));
        v
    };

    // A long-running sandbox S for exec, cp, ps, pause; started detached
    // first so that it boots while the attached runs below go on.
    let s_args = run_args(
        &["-d", "--disk", "256", "-l", "app=client-e2e"],
        &["sleep", "3600"],
    );
    let s = ok(&a.run(&argv(&s_args))).trim().to_owned();
    assert!(kiln_api::sandbox::SandboxId::is_valid(&s), "{s:?}");

    // run: stdout exact, exit code 0.
    let o = a.run(&argv(&run_args(&[], &["echo", "hello", "world"])));
    assert_eq!(ok(&o), "hello world\n");
    // Exit code 3, stderr apart from stdout.
    let o = a.run(&argv(&run_args(
        &[],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    )));
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "err\n");
    // -i: stdin reaches the command, EOF ends it.
    let o = a.run_stdin(
        &argv(&run_args(&["-i"], &["cat"])),
        b"through stdin\nand more\n",
    );
    assert_eq!(ok(&o), "through stdin\nand more\n");
    // -t: a terminal.
    let o = a.run(&argv(&run_args(&["-t"], &["tty"])));
    assert!(ok(&o).contains("/dev/pts/"), "{}", stdout(&o));
    // --rm: nothing left once it returns.
    let before = a.ids();
    let o = a.run(&argv(&run_args(&["--rm"], &["sh", "-c", "echo gone"])));
    assert_eq!(ok(&o), "gone\n");
    assert_eq!(a.ids(), before, "--rm left a sandbox");

    // A command that cannot be run: 127 / 126 and one line; --timeout: 137.
    let o = a.run(&argv(&run_args(&[], &["/no/such/program", "arg"])));
    assert_eq!(code(&o), 127, "{}", stderr(&o));
    assert!(stderr(&o).contains("/no/such/program"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let o = a.run(&argv(&run_args(&[], &["/etc/passwd"])));
    assert_eq!(code(&o), 126, "{}", stderr(&o));
    let o = a.run(&argv(&run_args(&["--timeout", "2"], &["sleep", "600"])));
    assert_eq!(code(&o), 137, "{}", stderr(&o));
    assert!(stderr(&o).contains("--timeout of 2 s"), "{}", stderr(&o));

    // SIGTERM to `kiln run` reaches the command: 143.
    let args = run_args(&[], &["sh", "-c", "echo ready; exec sleep 600"]);
    let mut child = a
        .cmd()
        .args(argv(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln run");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(code(&o), 143, "{}", stderr(&o));

    // -d, logs -f, wait.
    let o = a.run(&argv(&run_args(
        &["-d"],
        &[
            "sh",
            "-c",
            "for i in 1 2 3; do echo l$i; echo e$i >&2; sleep 1; done; exit 5",
        ],
    )));
    let d = ok(&o).trim().to_owned();
    let o = a.run(&["logs", "-f", &d]);
    assert_eq!(ok(&o), "l1\nl2\nl3\n");
    assert_eq!(stderr(&o), "e1\ne2\ne3\n");
    assert_eq!(ok(&a.run(&["wait", &d])), "5\n");
    // logs of an ended sandbox; by a unique prefix.
    assert_eq!(ok(&a.run(&["logs", &d[..12]])), "l1\nl2\nl3\n");

    // exec into S: output, exit code, stdin, env, workdir.
    let o = a.run(&["exec", &s, "--", "sh", "-c", "echo $((6*7)); exit 4"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    let o = a.run_stdin(&["exec", "-i", &s, "--", "cat"], b"exec stdin\n");
    assert_eq!(ok(&o), "exec stdin\n");
    // SIGINT to `kiln exec` reaches the process: 130.
    let mut child = a
        .cmd()
        .args(["exec", &s, "--", "sh", "-c", "echo ready; exec sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln exec");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("kill");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    // -t on a real terminal: the guest's terminal gets its size.
    let script = format!(
        "stty rows 33 cols 99; exec '{}' exec -t {s} -- stty size",
        k.bin.display()
    );
    let o = {
        let mut c = Proc::new("script");
        c.args(["-qec", &script, "/dev/null"])
            .env("KILN_SERVER", &a.url)
            .env("KILN_TOKEN", &a.token)
            .env("KILN_CONFIG", "/nonexistent")
            .stdin(Stdio::null());
        c.output().expect("script runs")
    };
    assert!(
        stdout(&o).contains("33 99"),
        "{:?} {:?}",
        stdout(&o),
        stderr(&o)
    );
    let o = a.run(&["exec", &s, "--", "/no/such/command"]);
    assert_eq!(code(&o), 127, "{}", stderr(&o));
    let o = a.run(&[
        "exec",
        "-e",
        "X=y",
        "-w",
        "/tmp",
        &s,
        "--",
        "sh",
        "-c",
        "echo $X; pwd",
    ]);
    assert_eq!(ok(&o), "y\n/tmp\n");

    // cp in (into an existing directory, and to a new name) and out, by
    // sha256.
    let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let src = dir.path().join("data.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..(24 * 1024 * 1024 / 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.write_all(&x.to_le_bytes()).expect("write");
        }
    }
    let want = sha256_file(&src);
    let t = Instant::now();
    ok(&a.run(&["cp", src.to_str().expect("utf-8"), &format!("{s}:/root")]));
    eprintln!("cp in 24 MiB: {} ms", t.elapsed().as_millis());
    ok(&a.run(&[
        "cp",
        src.to_str().expect("utf-8"),
        &format!("{s}:/root/renamed.bin"),
    ]));
    let o = a.run(&[
        "exec",
        &s,
        "--",
        "sha256sum",
        "/root/data.bin",
        "/root/renamed.bin",
    ]);
    assert_eq!(
        ok(&o),
        format!("{want}  /root/data.bin\n{want}  /root/renamed.bin\n")
    );
    let back = dir.path().join("back.bin");
    let t = Instant::now();
    ok(&a.run(&[
        "cp",
        &format!("{s}:/root/data.bin"),
        back.to_str().expect("utf-8"),
    ]));
    eprintln!("cp out 24 MiB: {} ms", t.elapsed().as_millis());
    assert_eq!(sha256_file(&back), want);
    // A missing file: a clear error, nothing left locally.
    let o = a.run(&[
        "cp",
        &format!("{s}:/root/missing"),
        dir.path().join("m").to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(!dir.path().join("m").exists());

    // ps shows S running; inspect's body is the API's Sandbox.
    let o = a.run(&["ps"]);
    let row = ok(&o)
        .lines()
        .find(|l| l.starts_with(&s))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("S in ps: {}", stdout(&o)));
    assert!(
        row.contains("running") && row.contains("sleep 3600"),
        "{row}"
    );
    assert!(ok(&a.run(&["ps", "-q"])).lines().any(|l| l == s));
    // --server instead of KILN_SERVER.
    let o = k
        .cmd()
        .env_remove("KILN_SERVER")
        .env("KILN_TOKEN", &api.a)
        .env("KILN_CONFIG", "/nonexistent")
        .args(["ps", "-q", "--server", &api.url()])
        .output()
        .expect("kiln ps");
    assert!(ok(&o).lines().any(|l| l == s), "{}", stdout(&o));
    let o = a.run(&["inspect", &s]);
    let body = ok(&o);
    schemas
        .check("GET", &format!("/v1/sandboxes/{s}"), 200, body.as_bytes())
        .expect("inspect prints the API's Sandbox");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["state"]["state"], "running");
    assert_eq!(v["spec"]["labels"]["app"], "client-e2e");

    // pause, resume.
    assert_eq!(ok(&a.run(&["pause", &s])), format!("{s}\n"));
    assert!(
        ok(&a.run(&["ps"]))
            .lines()
            .any(|l| l.starts_with(&s) && l.contains("paused"))
    );
    assert_eq!(ok(&a.run(&["resume", &s])), format!("{s}\n"));
    assert_eq!(ok(&a.run(&["exec", &s, "--", "echo", "back"])), "back\n");

    // Tenant B: nothing of A's sandbox, exactly as a missing one.
    let o = b.run(&["exec", &s, "--", "true"]);
    assert_eq!(code(&o), 125);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    let o = b.run(&["cp", &format!("{s}:/root/data.bin"), "-"]);
    assert_eq!(code(&o), 125);
    assert!(stdout(&o).is_empty());
    let o = b.run(&[
        "cp",
        src.to_str().expect("utf-8"),
        &format!("{s}:/root/evil"),
    ]);
    assert_eq!(code(&o), 125);
    let o = b.run(&["logs", &s]);
    assert_eq!(code(&o), 125);
    for verb in ["rm", "stop", "inspect", "wait"] {
        let o = if verb == "rm" {
            b.run(&["rm", "-f", &s])
        } else {
            b.run(&[verb, &s])
        };
        assert_eq!(code(&o), 1, "{verb}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("does not exist"),
            "{verb}: {}",
            stderr(&o)
        );
    }
    assert!(b.ids().is_empty(), "B sees A's sandboxes");
    assert!(a.ids().contains(&s), "S survived B");

    // Kiln's errors: 125 with the server's message.
    let o = a.run(&argv(&run_args(
        &["--net", "default", "-p", "18080:80"],
        &["true"],
    )));
    assert_eq!(code(&o), 125);
    assert!(stderr(&o).contains("publish"), "{}", stderr(&o));
    let o = a.run(&[
        "run",
        "--memory",
        "128",
        "oci:/nonexistent/image",
        "--",
        "true",
    ]);
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/image"), "{}", stderr(&o));

    // rm refuses a running sandbox; stop, then rm.
    let o = a.run(&["rm", &s]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is running"), "{}", stderr(&o));
    assert_eq!(ok(&a.run(&["stop", &s])), format!("{s}\n"));
    for id in a.ids() {
        ok(&a.run(&["rm", "-f", &id]));
    }
    assert!(a.ids().is_empty());
    api.wait_for(Duration::from_secs(60), "every sandbox forgotten", |st| {
        st.sandboxes.is_empty()
    });
    eprintln!("whole test: {} ms", t_all.elapsed().as_millis());
    node.term();
    drop(dir);
    k.assert_clean();
}

/// A CA and a certificate for 127.0.0.1 it signed: (ca, cert, key) files.
fn certs(dir: &std::path::Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("kiln client test CA {tag}"),
    );
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("cert");
    let paths = (
        dir.join(format!("ca-{tag}.pem")),
        dir.join(format!("cert-{tag}.pem")),
        dir.join(format!("key-{tag}.pem")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

/// Over https: the WebSocket routes are reached over TLS verified against
/// `KILN_CA` (a missing sandbox is the server's 404, not a transport
/// error); another CA is refused, and no CA is a clear error. No VM needed.
#[test]
fn streams_reach_an_https_server() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca, cert, key) = certs(dir.path(), "a");
    let (other_ca, _, _) = certs(dir.path(), "b");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = ServerConfig::new(
        1,
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("server"),
        JOIN,
    );
    cfg.init = true;
    cfg.tls = Some(kiln_server::tls::TlsFiles { cert, key });
    let server = rt.block_on(Server::start(cfg)).expect("kiln server starts");
    let t0 = Instant::now();
    while server.raft().status().role != kiln_store::RaftRole::Leader {
        assert!(t0.elapsed() < Duration::from_secs(20), "no leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tenant = TenantName::new("acme").expect("tenant");
    let secret = "tenant-acme-tls-secret-0123456789abcdef";
    for c in [
        Command::CreateTenant {
            name: tenant.clone(),
            quotas: Quotas::default(),
            now_ms: 1,
        },
        Command::CreateToken {
            id: "acme-tls".into(),
            tenant: Some(tenant),
            role: Role::Tenant,
            sha256: kiln_store::query::hash_token(secret),
            description: String::new(),
            now_ms: 2,
            node: None,
        },
    ] {
        let r = rt.block_on(server.raft().write(c)).expect("write");
        assert!(!r.is_rejected(), "{r:?}");
    }
    let url = server.api_url().to_string();
    assert!(url.starts_with("https://"), "{url}");
    let kiln = |ca: Option<&std::path::Path>, args: &[&str]| -> Output {
        let mut c = Proc::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
            .env("KILN_SERVER", &url)
            .env("KILN_TOKEN", secret)
            .env("KILN_CONFIG", "/nonexistent")
            .env_remove("KILN_CA")
            .stdin(Stdio::null());
        if let Some(ca) = ca {
            c.env("KILN_CA", ca);
        }
        c.output().expect("kiln runs")
    };
    // The WebSocket handshake went through TLS: the answer is the server's.
    let o = kiln(Some(&ca), &["exec", "0123456789abcdef", "--", "true"]);
    assert_eq!(code(&o), 125);
    assert!(
        stderr(&o).contains("does not exist") && stderr(&o).contains("HTTP 404"),
        "{}",
        stderr(&o)
    );
    let o = kiln(Some(&ca), &["ps", "-a"]);
    assert!(ok(&o).starts_with("ID "), "{}", stdout(&o));
    // Another CA: refused in the handshake; no CA: the stream needs one.
    for (ca, says) in [(Some(other_ca.as_path()), "TLS"), (None, "--ca")] {
        let o = kiln(ca, &["exec", "0123456789abcdef", "--", "true"]);
        assert_eq!(code(&o), 125);
        assert!(stderr(&o).contains(says), "{ca:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("does not exist"), "{}", stderr(&o));
    }
    rt.block_on(server.shutdown());
}

/// No server behind the URL: `run` retries its create (same
/// Idempotency-Key) a few times, then one clear line and 125; `ps` too.
#[test]
fn an_unreachable_server_is_a_clear_125() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    for args in [&["run", "busybox", "--", "true"][..], &["ps"][..]] {
        let t0 = Instant::now();
        let o = Proc::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_SERVER", format!("http://127.0.0.1:{port}"))
            .env("KILN_TOKEN", "t")
            .env("KILN_CONFIG", "/nonexistent")
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs");
        assert_eq!(code(&o), 125, "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(
            stderr(&o).contains("cannot reach the server"),
            "{}",
            stderr(&o)
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
}

/// With no server configured and a `kiln up` running on the state
/// directory, the sandbox commands go through its API socket (the tenant
/// `default`'s token): `inspect` shows the API's view, and the node of
/// `kiln up` runs the microVM.
#[test]
fn sandbox_commands_go_through_kiln_up() {
    let k = Kiln::new();
    let kiln = |args: &[&str]| -> Output {
        k.cmd()
            .args(args)
            .env_remove("KILN_SERVER")
            .env_remove("KILN_TOKEN")
            .env("KILN_CONFIG", "/nonexistent")
            .output()
            .expect("kiln runs")
    };
    ok(&kiln(&["up", "-d", "--listen", "127.0.0.1:0"]));
    let img = busybox();
    let res = ["--memory", "128", "--disk", "64"];
    let mut args = vec!["run"];
    args.extend(res);
    args.extend([img.as_str(), "--", "echo", "through kiln up"]);
    assert_eq!(ok(&kiln(&args)), "through kiln up\n");
    let mut args = vec!["run", "-d"];
    args.extend(res);
    args.extend([img.as_str(), "--", "sleep", "600"]);
    let id = ok(&kiln(&args)).trim().to_owned();
    let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&["inspect", &id]))).expect("json");
    assert_eq!(v["tenant"], "default", "{v}");
    assert_eq!(ok(&kiln(&["exec", &id, "--", "echo", "hi"])), "hi\n");
    for id in ok(&kiln(&["ps", "-a", "-q"])).lines() {
        ok(&kiln(&["rm", "-f", id]));
    }
    ok(&kiln(&["down"]));
    k.assert_clean();
}
