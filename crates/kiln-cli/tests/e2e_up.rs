//! `kiln up` / `kiln down` end to end: the real `kiln` binary runs the
//! embedded server and node in one background process on the test's state
//! directory; admin commands find it with no flags (its endpoint file, its
//! Unix socket, its admin token); a sandbox created with `POST
//! /v1/sandboxes` over the socket runs a real microVM, which outlives `kiln
//! down` and `kill -9` of the process and is adopted by the next `kiln up`
//! (same supervisor); a second `kiln up` is refused; a command starts it on
//! first use by default, saying so in one line (not with `KILN_AUTO_UP=0`). Every body is checked
//! against `/v1/openapi.json`.

mod common;
mod node_host;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use common::{Kiln, assert_one_line_error, code, stderr, stdout};
use kiln_testkit::ApiSchemas;
use node_host::{alive, shim_pid, spec, vmm_processes};
use serde_json::Value;

struct Up<'a> {
    k: &'a Kiln,
    schemas: Option<ApiSchemas>,
}

impl<'a> Up<'a> {
    fn state(&self) -> &Path {
        self.k.state_dir()
    }
    fn sock(&self) -> PathBuf {
        self.state().join("api.sock")
    }
    fn endpoint_file(&self) -> PathBuf {
        self.state().join("up/endpoint.json")
    }
    fn endpoint(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.endpoint_file()).expect("endpoint.json"))
            .expect("endpoint.json is JSON")
    }
    fn pid(&self) -> u32 {
        self.endpoint()["pid"].as_u64().expect("pid") as u32
    }
    fn tenant_token(&self) -> String {
        std::fs::read_to_string(self.state().join("up/tenant-token"))
            .expect("tenant token")
            .trim()
            .to_owned()
    }

    /// `kiln up -d` on a free port; asserts it succeeded.
    fn up_d(&self) {
        let t0 = Instant::now();
        let o = self.k.run(&["up", "-d", "--listen", "127.0.0.1:0"]);
        assert_eq!(code(&o), 0, "kiln up -d: {}", stderr(&o));
        assert!(alive(self.pid()), "the up process runs");
        tracing::info!(took = ?t0.elapsed(), "kiln up -d");
    }

    fn down(&self) {
        let pid = self.pid();
        let o = self.k.run(&["down"]);
        assert_eq!(code(&o), 0, "kiln down: {}", stderr(&o));
        assert!(!alive(pid), "kiln down waits until the process is gone");
        assert!(!self.sock().exists(), "the socket is removed on exit");
        assert!(!self.endpoint_file().exists(), "the endpoint file too");
    }

    /// `curl` over the API socket: (status, body); the body is checked
    /// against the OpenAPI document once that is loaded.
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
        let mut c = Proc::new("curl");
        c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("--unix-socket")
            .arg(self.sock())
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.tenant_token()));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = c
            .arg(format!("http://kiln{path}"))
            .output()
            .expect("curl runs");
        let body = out.stdout;
        let cut = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&body[cut..])
            .trim()
            .parse()
            .unwrap_or(0);
        let body = body[..cut].to_vec();
        if let Some(s) = &self.schemas {
            s.check(method, path, status, &body)
                .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        }
        (status, body)
    }

    fn sandbox(&self, id: &str) -> Value {
        let (status, body) = self.curl("GET", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("json")
    }

    fn wait_state(&self, id: &str, want: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.sandbox(id);
            if v["state"]["state"] == want {
                return v;
            }
            assert!(t0.elapsed() < limit, "{id} not {want} after {limit:?}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An admin command with no server flags; its JSON, checked against
    /// the document for `GET /v1{path}`.
    fn admin_json(&self, args: &[&str], path: &str, env: &[(&str, &str)]) -> (Value, String) {
        let mut c = self.k.cmd();
        c.args(args).args(["-o", "json"]);
        for (k, v) in env {
            // An empty value: the variable unset (the default).
            if v.is_empty() {
                c.env_remove(k);
            } else {
                c.env(k, v);
            }
        }
        let o = c.output().expect("kiln runs");
        assert_eq!(code(&o), 0, "kiln {args:?}: {}", stderr(&o));
        if let Some(s) = &self.schemas {
            s.check("GET", &format!("/v1{path}"), 200, &o.stdout)
                .unwrap_or_else(|e| panic!("kiln {args:?}: {e:#}"));
        }
        (serde_json::from_slice(&o.stdout).expect("json"), stderr(&o))
    }
}

/// `sh -c 'echo via the socket; exit 5'` through `/v1/sandboxes/ID/exec`
/// on the API socket: (stdout, exit code).
fn exec_over_socket(sock: &Path, token: &str, id: &str) -> (String, Option<i32>) {
    use futures::{SinkExt, StreamExt};
    use kiln_api::stream::ServerMsg;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect");
        let mut req = format!("ws://kiln/v1/sandboxes/{id}/exec")
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (mut w, _) = tokio_tungstenite::client_async(req, s)
            .await
            .expect("the WebSocket opens on the socket");
        w.send(Message::text(
            r#"{"cmd":["sh","-c","echo via the socket; exit 5"]}"#,
        ))
        .await
        .expect("send");
        let mut out = Vec::new();
        let mut exit = None;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(60), w.next()).await {
            match m {
                Message::Binary(b) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
                Message::Text(t) => {
                    match serde_json::from_str::<ServerMsg>(&t).expect("a ServerMsg") {
                        ServerMsg::Exit { exit_code, .. } => {
                            exit = Some(exit_code);
                            break;
                        }
                        ServerMsg::Started { .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
                _ => {}
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), exit)
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
}

#[test]
fn up_serves_the_api_on_its_socket_and_adopts_sandboxes_across_down_and_kill() {
    let t_all = Instant::now();
    let k = Kiln::new();
    let mut up = Up {
        k: &k,
        schemas: None,
    };
    // No server anywhere: the admin commands say how to get one.
    let o = k.run(&["nodes", "ls"]);
    assert_one_line_error(&o, "kiln up");

    up.up_d();
    assert_eq!(mode(k.state_dir()), 0o700);
    assert_eq!(mode(&up.sock()), 0o600);
    assert_eq!(mode(&k.state_dir().join("up/token")), 0o600);
    assert_eq!(mode(&k.state_dir().join("up/tenant-token")), 0o600);
    let ep = up.endpoint();
    assert!(
        ep["url"]
            .as_str()
            .expect("url")
            .starts_with("http://127.0.0.1:"),
        "{ep}"
    );
    assert_eq!(ep["socket"].as_str(), up.sock().to_str());
    let (status, doc) = up.curl("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    up.schemas = Some(ApiSchemas::new(&doc).expect("an OpenAPI 3.1 document"));
    // The TCP listener serves the same API.
    let tcp = Proc::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "{}/v1/openapi.json",
            ep["url"].as_str().expect("url")
        ))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&tcp.stdout), "200");

    // Admin commands with no flags: one ready node, one member.
    let (nodes, _) = up.admin_json(&["nodes", "ls"], "/nodes", &[]);
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{nodes}");
    assert_eq!(items[0]["status"], "ready", "{nodes}");
    let (cluster, _) = up.admin_json(&["cluster", "status"], "/cluster", &[]);
    assert_eq!(cluster["members"].as_array().expect("members").len(), 1);
    assert_eq!(cluster["leader"], 1, "{cluster}");
    let (tenants, _) = up.admin_json(&["tenants", "ls"], "/tenants", &[]);
    assert!(
        tenants["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|t| t["name"] == "default"),
        "{tenants}"
    );

    // A second `kiln up` on the same state directory is refused.
    let o = k.run(&["up", "--listen", "127.0.0.1:0"]);
    assert_one_line_error(&o, "already runs");
    let o = k.run(&["up", "-d", "--listen", "127.0.0.1:0"]);
    assert_one_line_error(&o, "already runs");

    // A real microVM through the API on the socket.
    let body = serde_json::to_string(&spec(&["sleep", "600"])).expect("json");
    let t_create = Instant::now();
    let (status, out) = up.curl("POST", "/v1/sandboxes", Some(&body));
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&out));
    let created: Value = serde_json::from_slice(&out).expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    up.wait_state(&id, "running", Duration::from_secs(60));
    tracing::info!(took = ?t_create.elapsed(), "POST /v1/sandboxes → running");
    let sid: kiln_api::sandbox::SandboxId =
        serde_json::from_value(created["id"].clone()).expect("id");
    let shim = shim_pid(k.state_dir(), &sid).expect("a supervisor");
    let vmms = vmm_processes(k.state_dir(), &sid);
    assert!(alive(shim) && !vmms.is_empty(), "supervisor and VMM run");

    // A WebSocket exec upgrades on the Unix socket like on TCP.
    let t_exec = Instant::now();
    let (out, exit) = exec_over_socket(&up.sock(), &up.tenant_token(), &id);
    tracing::info!(took = ?t_exec.elapsed(), "exec over the socket");
    assert_eq!(out, "via the socket\n");
    assert_eq!(exit, Some(5));

    // `kiln down`: the microVM keeps running; `kiln up -d` adopts it.
    up.down();
    assert!(alive(shim), "the supervisor outlives kiln down");
    assert_eq!(vmm_processes(k.state_dir(), &sid), vmms);
    up.up_d();
    let v = up.wait_state(&id, "running", Duration::from_secs(20));
    // The member lists this start's addresses (the port changed).
    let (cluster, _) = up.admin_json(&["cluster", "status"], "/cluster", &[]);
    assert_eq!(
        cluster["members"][0]["api_url"],
        up.endpoint()["url"],
        "{cluster}"
    );
    assert_eq!(shim_pid(k.state_dir(), &sid), Some(shim), "{v}");
    assert!(alive(shim));
    assert_eq!(vmm_processes(k.state_dir(), &sid), vmms, "not restarted");

    // kill -9: stale socket and endpoint file; the next `up -d` takes over.
    let pid = up.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not dead");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        up.sock().exists() && up.endpoint_file().exists(),
        "stale files"
    );
    let o = k.run(&["nodes", "ls"]);
    assert_one_line_error(&o, "no server");
    up.up_d();
    assert_ne!(up.pid(), pid);
    up.wait_state(&id, "running", Duration::from_secs(20));
    assert_eq!(shim_pid(k.state_dir(), &sid), Some(shim));
    assert_eq!(vmm_processes(k.state_dir(), &sid), vmms);

    // Killed between the server's credential rotation and the node storing
    // the new one: the node holds a revoked credential. `kiln up` owns both
    // sides and lets the node register again.
    up.down();
    let cred_file = k.state_dir().join("node/credential.json");
    let mut cred: Value =
        serde_json::from_slice(&std::fs::read(&cred_file).expect("credential")).expect("json");
    cred["credential"] = Value::from("kilnnode_0123456789abcdef0123456789abcdef0123");
    std::fs::write(&cred_file, serde_json::to_vec(&cred).expect("json")).expect("write");
    let t0 = Instant::now();
    up.up_d();
    assert!(t0.elapsed() < Duration::from_secs(30));
    let now: Value =
        serde_json::from_slice(&std::fs::read(&cred_file).expect("credential")).expect("json");
    assert_ne!(now["credential"], cred["credential"], "registered anew");
    let (nodes, _) = up.admin_json(&["nodes", "ls"], "/nodes", &[]);
    assert_eq!(nodes["items"][0]["status"], "ready", "{nodes}");
    up.wait_state(&id, "running", Duration::from_secs(20));
    assert_eq!(vmm_processes(k.state_dir(), &sid), vmms);

    // KILN_AUTO_UP=0: nothing is started, the command says how to name a
    // server.
    up.down();
    let o = k
        .cmd()
        .args(["nodes", "ls"])
        .env("KILN_AUTO_UP", "0")
        .output()
        .expect("kiln runs");
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("KILN_SERVER"), "{}", stderr(&o));
    assert!(!up.sock().exists(), "nothing started");
    // By default (the variable unset): the first admin command starts it
    // and says so once.
    let (nodes, err) = up.admin_json(&["nodes", "ls"], "/nodes", &[("KILN_AUTO_UP", "")]);
    assert_eq!(nodes["items"].as_array().expect("items").len(), 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    let want_tail = format!(" and {}; stop it with kiln down", up.sock().display());
    assert!(
        lines[0].starts_with("kiln: started the embedded server (kiln up): API on 127.0.0.1:")
            && lines[0].ends_with(&want_tail),
        "{err}"
    );
    // Running now: the next command is quiet.
    let (_, err) = up.admin_json(&["nodes", "ls"], "/nodes", &[("KILN_AUTO_UP", "")]);
    assert_eq!(err, "");

    // Clean up through the API: the node stops and removes the sandbox.
    let (status, out) = up.curl("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
    let t0 = Instant::now();
    while alive(shim) || !vmm_processes(k.state_dir(), &sid).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "sandbox not removed: shim {shim} alive {}, VMMs {:?}, record {}, ps: {}\n{}",
            alive(shim),
            vmm_processes(k.state_dir(), &sid),
            std::fs::read_to_string(k.state_dir().join(format!("sandboxes/{id}/record.json")))
                .unwrap_or_default(),
            stdout(&k.run(&["ps", "-a"])),
            std::fs::read_to_string(k.state_dir().join("up/up.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    up.down();

    // The local user's token revoked by an admin: the next start makes a
    // new one (it used to fail to start for good).
    up.up_d();
    let old = up.tenant_token();
    let id = {
        use sha2::Digest;
        format!(
            "default-{}",
            &hex::encode(sha2::Sha256::digest(old.as_bytes()))[..8]
        )
    };
    let o = k.run(&["tokens", "revoke", &id]);
    assert_eq!(code(&o), 0, "revoke: {}", stderr(&o));
    let o = k.run(&["ps"]);
    assert_ne!(code(&o), 0, "a revoked token still works");
    up.down();
    up.up_d();
    assert_ne!(up.tenant_token(), old, "a new token");
    let o = k.run(&["ps"]);
    assert_eq!(code(&o), 0, "ps with the new token: {}", stderr(&o));
    up.down();

    // In the foreground: Ctrl-C (SIGINT) stops it the same way.
    let mut fg = k
        .cmd()
        .args(["up", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln up");
    let t0 = Instant::now();
    while !(up.endpoint_file().exists() && up.pid() == fg.id()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "foreground up not ready"
        );
        assert!(fg.try_wait().expect("wait").is_none(), "kiln up ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fg.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let out = fg.wait_with_output().expect("kiln up ends");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("kiln up: API on http://127.0.0.1:"), "{err}");
    assert!(!up.sock().exists() && !up.endpoint_file().exists());

    let o = k.run(&["down"]);
    assert_eq!(code(&o), 0, "kiln down with none running: {}", stdout(&o));
    k.assert_clean();
    tracing::info!(took = ?t_all.elapsed(), "e2e_up");
}

/// The default path as a new user meets it: no server configured and no
/// `kiln up` running, `kiln run -v` starts the embedded server (one line)
/// and says, as the node-local path does, how the start went: cold and why,
/// where the time went, the template made in the background; `kiln template
/// ls` through the API shows the node's automatic template; the next run
/// starts warm from it. `--pull never` reaches the node.
#[test]
fn run_v_through_the_embedded_server_says_how_each_start_went() {
    let k = Kiln::new();
    let mut up = Up {
        k: &k,
        schemas: None,
    };
    let bb = common::busybox();
    let kiln = |args: &[&str]| {
        let mut c = k.cmd();
        // The product's default (auto-start); the node it starts makes
        // automatic templates (the harness turns them off).
        c.env_remove("KILN_AUTO_UP")
            .env("KILN_AUTO_TEMPLATES", "1")
            .args(args);
        c.output().expect("kiln runs")
    };
    let probe = ["sh", "-c", "echo hello $0", "probe"];
    let mut args = vec!["run", "-v", "--rm", bb.as_str(), "--"];
    args.extend(probe);
    let first = kiln(&args);
    let err = stderr(&first);
    assert_eq!(code(&first), 0, "{err}");
    assert_eq!(stdout(&first).trim(), "hello probe");
    assert!(
        err.lines()
            .next()
            .is_some_and(|l| l.starts_with("kiln: started the embedded server (kiln up)")),
        "{err}"
    );
    assert!(alive(up.pid()), "kiln up runs in the background");
    assert!(err.contains("kiln: cold boot: no template"), "{err}");
    assert!(err.contains("template in the background"), "{err}");
    assert!(err.contains(" (cold, "), "{err}");
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
        "on the node ",
        "agent ready at ",
        "first byte at ",
        "exit at ",
        "teardown ",
        "total ",
    ] {
        assert!(timing.contains(phase), "{phase:?} missing: {timing}");
    }

    // The automatic template, through the API (heartbeats carry it).
    let (status, doc) = up.curl("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    up.schemas = Some(ApiSchemas::new(&doc).expect("an OpenAPI 3.1 document"));
    let t0 = Instant::now();
    let name = loop {
        let (status, body) = up.curl("GET", "/v1/templates", None);
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&body).expect("json");
        if let Some(t) = v["automatic"].as_array().and_then(|a| a.first()) {
            assert_eq!(t["image"], bb.as_str(), "{v}");
            assert_eq!(t["resources"]["memory_mib"], 256, "{v}");
            let ls = kiln(&["template", "ls"]);
            assert_eq!(code(&ls), 0, "{}", stderr(&ls));
            let name = t["name"].as_str().expect("name").to_owned();
            let row = stdout(&ls)
                .lines()
                .find(|l| l.starts_with(&name))
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("{name} not listed: {}", stdout(&ls)));
            assert!(row.contains("ready (automatic, node "), "{row}");
            break name;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "no automatic template through the API: {v}; node log: {}",
            std::fs::read_to_string(k.state_dir().join("templates/.auto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };

    let second = kiln(&args);
    let err = stderr(&second);
    assert_eq!(code(&second), 0, "{err}");
    assert_eq!(stdout(&second).trim(), "hello probe");
    assert!(
        err.contains(&format!("warm start from template {name}")),
        "{err}"
    );
    assert!(err.contains(" (warm (template), "), "{err}");
    let timing = err
        .lines()
        .find(|l| l.starts_with("kiln: timing: "))
        .unwrap_or_else(|| panic!("no timing line: {err}"));
    assert!(timing.contains(", restore "), "{timing}");
    assert!(!err.contains("started the embedded server"), "{err}");

    // --pull reaches the node, told apart by a real registry: `never`
    // refuses an image the node has not cached (the default would pull
    // it); `missing` pulls it; with the registry gone, `never` runs the
    // cached image and `always` fails (it asks the registry every time).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reg = rt
        .block_on(kiln_testkit::registry::Registry::start())
        .expect("registry starts");
    let layout = kiln_testkit::images::busybox().expect("busybox image");
    let tag = format!("t{}", std::process::id());
    rt.block_on(reg.push_layout(&layout, "pull/policy", &tag))
        .expect("push");
    let r = reg.reference("pull/policy", &tag);
    let o = kiln(&["run", "--rm", "--pull", "never", &r, "--", "true"]);
    assert_eq!(code(&o), 125, "never pulled: {}", stderr(&o));
    let o = kiln(&[
        "run", "--rm", "--pull", "missing", &r, "--", "echo", "pulled",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "pulled\n");
    drop(reg);
    let o = kiln(&["run", "--rm", "--pull", "never", &r, "--", "echo", "cached"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "cached\n");
    let o = kiln(&["run", "--rm", "--pull", "always", &r, "--", "true"]);
    assert_eq!(
        code(&o),
        125,
        "always did not ask the registry: {}",
        stderr(&o)
    );
    let o = kiln(&["images", "rm", &r]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    up.down();
    let o = k
        .cmd()
        .env("KILN_NODE_LOCAL", "1")
        .args(["template", "rm", &name])
        .output()
        .expect("kiln runs");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    k.assert_clean();
}
