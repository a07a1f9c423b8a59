//! `kiln server` over TLS as a real process, with a CA and certificate
//! made here (rcgen): a dry-run `kiln node --ca` registers over TLS, the
//! CLI lists it over TLS with `--ca` and the token from `--token-file`, a
//! client trusting another CA (or only the system's roots) is refused, and
//! `--init` writes the cluster secret 0600.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kiln(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(KILN)
        .args(args)
        .env_remove("KILN_SERVER")
        .env_remove("KILN_TOKEN")
        .env("KILN_CONFIG", "/nonexistent/kiln-config.toml")
        // Never a `kiln up` started on first use (in the default state
        // directory).
        .env("KILN_AUTO_UP", "0")
        .output()
        .expect("run kiln");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A CA and a server certificate for 127.0.0.1 signed by it (PEM files in
/// `dir`): (ca, cert, key).
fn certs(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("kiln test CA {tag}"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
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

fn mode(p: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions())
        & 0o777
}

#[test]
fn server_node_and_cli_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = certs(dir.path(), "good");
    let (other_ca, _, _) = certs(dir.path(), "other");
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
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln server");
    let stderr = child.stderr.take().expect("stderr");
    let _server = Killed(child);
    let mut url = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("line");
        if let Some(rest) = line.split("API ").nth(1) {
            url = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let url = url.expect("the server prints its API URL");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_eq!(mode(&state.join("cluster.secret")), 0o600);
    let token_file = state.join("admin.token");
    assert_eq!(mode(&token_file), 0o600);
    let ca_s = ca.to_str().expect("utf-8");
    let tok_s = token_file.to_str().expect("utf-8");

    // A dry-run node registers over TLS, verifying the server with --ca.
    let node_state = dir.path().join("node");
    let node = Command::new(KILN)
        .args(["node", "--server", &url, "--ca", ca_s, "--name", "tls-node"])
        .arg("--join-token-file")
        .arg(&join)
        .arg("--state-dir")
        .arg(&node_state)
        .args([
            "--dry-run",
            "--capacity-cpus",
            "2",
            "--capacity-memory-mib",
            "1024",
            "--capacity-disk-mib",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln node");
    let _node = Killed(node);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = kiln(&[
            "nodes",
            "ls",
            "--server",
            &url,
            "--ca",
            ca_s,
            "--token-file",
            tok_s,
            "-o",
            "json",
        ]);
        assert_eq!(code, 0, "nodes ls over TLS: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        if v["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["name"] == "tls-node"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the node never registered: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The token never needs to be in argv: --token-file (above) works for
    // creating tokens too.
    let (code, out, err) = kiln(&[
        "tokens",
        "create",
        "--admin",
        "--server",
        &url,
        "--ca",
        ca_s,
        "--token-file",
        tok_s,
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"secret\""), "{out}");

    // Another CA, or none (system roots), is refused.
    for extra in [vec!["--ca", other_ca.to_str().expect("utf-8")], vec![]] {
        let mut args = vec!["nodes", "ls", "--server", &url, "--token-file", tok_s];
        args.extend(extra.iter().copied());
        let (code, _, err) = kiln(&args);
        assert_ne!(code, 0, "{extra:?} must be refused");
        assert!(err.contains("cannot reach"), "{err}");
    }
}
