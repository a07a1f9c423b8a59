//! A real OCI registry (CNCF distribution, Debian's `docker-registry`) on loopback.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest as _, Sha256};
use tracing::info;

use crate::images::OciLayout;

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry on `127.0.0.1:<port>` with its storage in a temp dir; killed on drop.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Registry {
    /// Starts a registry (filesystem storage, delete enabled) and waits until `/v2/` answers.
    pub async fn start() -> Result<Registry> {
        Self::start_inner(None).await
    }

    /// Like [`Registry::start`], with HTTP basic auth (htpasswd) for one user.
    /// The raw push helpers are not authenticated: push with skopeo `--dest-creds`.
    pub async fn start_with_auth(user: &str, password: &str) -> Result<Registry> {
        Self::start_inner(Some((user, password))).await
    }

    async fn start_inner(auth: Option<(&str, &str)>) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-registry.")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage)?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
        if let Some((user, password)) = auth {
            let hash = bcrypt::hash(password, 5)?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            let mut f = std::fs::OpenOptions::new().append(true).open(&config)?;
            std::io::Write::write_all(
                &mut f,
                format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    htpasswd.display()
                )
                .as_bytes(),
            )?;
        }
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {REGISTRY_BIN}"))?;
        let mut reg = Registry {
            child,
            port,
            dir,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = reg.child.try_wait()? {
                bail!(
                    "registry exited ({status}): {}",
                    std::fs::read_to_string(reg.dir.path().join("registry.log"))
                        .unwrap_or_default()
                );
            }
            if let Ok(r) = reg.http.get(format!("{}/v2/", reg.base())).send().await
                && (r.status().is_success() || (auth.is_some() && r.status().as_u16() == 401))
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "registry on port {} did not answer /v2/ within 15 s",
                    reg.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(port = reg.port, "registry started");
        // Give the struct back fully formed.
        let _ = &mut reg;
        Ok(reg)
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:<port>/<name>:<tag>`.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host())
    }

    /// The registry's storage root (filesystem driver).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Pushes an OCI layout with `skopeo copy` (validates everything on the way).
    pub async fn push_layout(&self, layout: &OciLayout, name: &str, tag: &str) -> Result<()> {
        self.push_layout_as(layout, name, tag, None).await
    }

    /// Pushes converting to Docker v2 schema 2 (Docker media types, gzip layers).
    pub async fn push_layout_docker(
        &self,
        layout: &OciLayout,
        name: &str,
        tag: &str,
    ) -> Result<()> {
        self.skopeo_push(layout, name, tag, &["--format=v2s2"])
            .await
    }

    /// [`Registry::push_layout`] with `user:password` credentials.
    pub async fn push_layout_as(
        &self,
        layout: &OciLayout,
        name: &str,
        tag: &str,
        creds: Option<&str>,
    ) -> Result<()> {
        let creds = creds.map(|c| format!("--dest-creds={c}"));
        let extra: Vec<&str> = creds.iter().map(String::as_str).collect();
        self.skopeo_push(layout, name, tag, &extra).await
    }

    async fn skopeo_push(
        &self,
        layout: &OciLayout,
        name: &str,
        tag: &str,
        extra: &[&str],
    ) -> Result<()> {
        let src = format!("oci:{}:{}", layout.dir.display(), layout.tag);
        let dst = format!("docker://{}", self.reference(name, tag));
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        cmd.args(extra);
        let out = cmd
            .args([&src, &dst])
            .output()
            .await
            .context("cannot run skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo copy {src} {dst} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Uploads a blob with `POST` + `PUT` (monolithic) and returns its digest.
    pub async fn put_blob(&self, name: &str, bytes: Vec<u8>) -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let r = self
            .http
            .post(format!("{}/v2/{name}/blobs/uploads/", self.base()))
            .send()
            .await?;
        if r.status().as_u16() != 202 {
            bail!("blob upload start for {name}: HTTP {}", r.status());
        }
        let location = r
            .headers()
            .get("location")
            .context("no Location header")?
            .to_str()?
            .to_owned();
        let mut url = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.base())
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let r = self
            .http
            .put(url)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!(
                "blob upload {digest} to {name}: HTTP {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(digest)
    }

    /// `PUT`s raw manifest bytes under `reference` (a tag or digest) and returns their digest.
    pub async fn put_manifest(
        &self,
        name: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let r = self
            .http
            .put(format!("{}/v2/{name}/manifests/{reference}", self.base()))
            .header("content-type", media_type)
            .body(bytes)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!(
                "manifest upload {name}:{reference}: HTTP {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(digest)
    }

    /// Pushes a layout's blobs and manifest with raw HTTP, bypassing skopeo's checks
    /// (the registry still checks blob digests and that manifest blobs exist).
    /// Returns the manifest digest.
    pub async fn push_raw(&self, layout: &OciLayout, name: &str, tag: &str) -> Result<String> {
        let (media_type, manifest) = layout.manifest()?;
        let v: serde_json::Value = serde_json::from_slice(&manifest)?;
        let mut digests = vec![
            v["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ];
        if let Some(layers) = v["layers"].as_array() {
            for l in layers {
                digests.push(l["digest"].as_str().unwrap_or_default().to_owned());
            }
        }
        for d in digests {
            let bytes = std::fs::read(layout.blob_path(&d))?;
            self.put_blob(name, bytes).await?;
        }
        self.put_manifest(name, tag, &media_type, manifest).await
    }

    /// Overwrites a stored blob's bytes behind the registry's back (same digest path).
    pub fn corrupt_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
        let path = self
            .storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        if !path.is_file() {
            bail!("blob {digest} is not stored at {}", path.display());
        }
        std::fs::write(&path, bytes)?;
        Ok(())
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The directory holding config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
