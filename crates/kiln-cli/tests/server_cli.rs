//! `kiln server` as a real process (1 replica, --init) and the admin
//! commands as its API clients: tenants, tokens, nodes, cluster, `-o json`,
//! and the server/token taken from a config context.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kiln(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(KILN);
    c.args(args)
        .env_remove("KILN_SERVER")
        .env_remove("KILN_TOKEN")
        // Never a `kiln up` started on first use (in the default state
        // directory); a test may set it.
        .env("KILN_AUTO_UP", "0");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run kiln");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn server_process_and_admin_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let join = dir.path().join("join");
    std::fs::write(&join, "a-join-token-of-some-length\n").expect("write");
    let state = dir.path().join("state");
    let mut child = Command::new(KILN)
        .args([
            "server",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
            "--init",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--join-token-file")
        .arg(&join)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln server");
    let stderr = child.stderr.take().expect("stderr");
    let _guard = Killed(child);
    let mut url = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("line");
        if let Some(rest) = line.split("API ").nth(1) {
            url = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let url = url.expect("the server prints its API URL");
    let token_file = state.join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file)
            .expect("admin token")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let admin = std::fs::read_to_string(&token_file)
        .expect("read")
        .trim()
        .to_owned();
    let conn = [
        ("KILN_SERVER", url.as_str()),
        ("KILN_TOKEN", admin.as_str()),
    ];

    let (code, out, err) = kiln(
        &[
            "tenants",
            "create",
            "acme",
            "--max-sandboxes",
            "3",
            "-o",
            "json",
        ],
        &conn,
    );
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(t["quotas"]["sandboxes"], 3);
    let (code, out, err) = kiln(
        &["tokens", "create", "--tenant", "acme", "-o", "json"],
        &conn,
    );
    assert_eq!(code, 0, "{err}");
    let tok: serde_json::Value = serde_json::from_str(&out).expect("json");
    let tenant_secret = tok["secret"].as_str().expect("secret").to_owned();
    let (code, out, _) = kiln(&["nodes", "ls", "-o", "json"], &conn);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["items"],
        serde_json::json!([])
    );
    let (code, out, _) = kiln(&["cluster", "status", "-o", "json"], &conn);
    assert_eq!(code, 0);
    let st: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(st["leader"], 1);
    assert_eq!(st["members"][0]["api_url"], url.as_str());

    // A tenant's token is refused on admin commands, with the API's code.
    let (code, _, err) = kiln(
        &["tenants", "ls", "--server", &url, "--token", &tenant_secret],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("admin_required"), "{err}");

    // Server and token from a named context of the config file.
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!("current-context = \"x\"\n[contexts.x]\nserver = \"{url}\"\ntoken = \"{admin}\"\n"),
    )
    .expect("config");
    let cfg_s = cfg.to_str().expect("utf-8");
    let (code, out, err) = kiln(&["tenants", "ls"], &[("KILN_CONFIG", cfg_s)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("acme") && out.contains("0/3"), "{out}");
    let (code, _, err) = kiln(
        &["tenants", "ls", "--context", "nope"],
        &[("KILN_CONFIG", cfg_s)],
    );
    assert_ne!(code, 0);
    assert!(err.contains("no context"), "{err}");
    // Revoked tokens stop working.
    let id = tok["id"].as_str().expect("id");
    let (code, _, err) = kiln(&["tokens", "revoke", id], &conn);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = kiln(
        &["nodes", "ls", "--server", &url, "--token", &tenant_secret],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("unauthenticated"), "{err}");
}
