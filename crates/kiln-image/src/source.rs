//! Where manifests and blobs come from: a registry (oci-client), an OCI layout directory,
//! or a `docker save` archive. Every blob is checked here against its descriptor's digest
//! and size, whatever the transport already checked.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::manifest::{self, Compression, Descriptor, Document, Manifest, Platform};
use crate::reference::{ImageRef, RegistryRef};
use crate::store::{PullImageError, PullOptions};
use crate::{Progress, PullPhase};

/// Largest manifest, index or config accepted.
pub(crate) const MAX_DOCUMENT: u64 = 4 << 20;

/// A resolved image manifest.
pub(crate) struct Resolved {
    pub manifest: Manifest,
    pub digest: String,
}

#[allow(clippy::large_enum_variant)] // one per pull, never stored in bulk
pub(crate) enum Source {
    Registry(RegistrySource),
    Local(LocalSource),
}

pub(crate) struct RegistrySource {
    client: oci_client::Client,
    reference: oci_client::Reference,
    auth: RegistryAuth,
    rref: RegistryRef,
}

/// An OCI layout, or an unpacked docker archive, on local disk.
pub(crate) struct LocalSource {
    /// Blob directory: `<dir>/sha256/<hex>`.
    blobs: PathBuf,
    what: String,
    kind: LocalKind,
    /// Holds an unpacked docker archive.
    _scratch: Option<tempfile::TempDir>,
}

enum LocalKind {
    Layout { dir: PathBuf, tag: Option<String> },
    Archive { manifest: Manifest },
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Source {
    pub(crate) fn open(
        r: &ImageRef,
        opts: &PullOptions,
        scratch_root: &Path,
    ) -> Result<Source, PullImageError> {
        match r {
            ImageRef::Registry(rref) => {
                let mut http = opts.insecure_registries.clone();
                if rref.is_loopback() {
                    http.push(rref.registry.clone());
                }
                let client = oci_client::Client::new(ClientConfig {
                    protocol: ClientProtocol::HttpsExcept(http),
                    connect_timeout: Some(Duration::from_secs(10)),
                    read_timeout: Some(Duration::from_secs(60)),
                    ..Default::default()
                });
                let reference = match (&rref.digest, &rref.tag) {
                    (Some(d), _) => oci_client::Reference::with_digest(
                        rref.registry.clone(),
                        rref.repository.clone(),
                        d.clone(),
                    ),
                    (None, t) => oci_client::Reference::with_tag(
                        rref.registry.clone(),
                        rref.repository.clone(),
                        t.clone()
                            .unwrap_or_else(|| crate::reference::DEFAULT_TAG.into()),
                    ),
                };
                let auth = docker_auth(&rref.registry, opts.docker_config.as_deref());
                Ok(Source::Registry(RegistrySource {
                    client,
                    reference,
                    auth,
                    rref: rref.clone(),
                }))
            }
            ImageRef::OciLayout { path, tag } => {
                let layout = |reason: String| PullImageError::Layout {
                    path: path.clone(),
                    reason,
                };
                let marker = fs::read(path.join("oci-layout"))
                    .map_err(|e| layout(format!("no readable oci-layout file ({e})")))?;
                let v: serde_json::Value = serde_json::from_slice(&marker)
                    .map_err(|e| layout(format!("oci-layout is not JSON ({e})")))?;
                if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
                    return Err(layout(
                        "oci-layout does not say imageLayoutVersion 1.0.0".into(),
                    ));
                }
                Ok(Source::Local(LocalSource {
                    blobs: path.join("blobs"),
                    what: r.to_string(),
                    kind: LocalKind::Layout {
                        dir: path.clone(),
                        tag: tag.clone(),
                    },
                    _scratch: None,
                }))
            }
            ImageRef::DockerArchive { path } => open_archive(path, scratch_root, &r.to_string()),
        }
    }

    /// A short name for messages.
    pub(crate) fn what(&self) -> String {
        match self {
            Source::Registry(r) => r.rref.to_string(),
            Source::Local(l) => l.what.clone(),
        }
    }

    pub(crate) async fn resolve(&self, platform: &Platform) -> Result<Resolved, PullImageError> {
        match self {
            Source::Registry(r) => r.resolve(platform).await,
            Source::Local(l) => l.resolve(platform),
        }
    }

    /// Fetches a blob, checks digest and size, and returns where it is on disk.
    pub(crate) async fn fetch_blob(
        &self,
        kind: &'static str,
        desc: &Descriptor,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<PathBuf, PullImageError> {
        match self {
            Source::Registry(r) => {
                r.fetch_blob(kind, desc, dest, progress).await?;
                Ok(dest.to_owned())
            }
            Source::Local(l) => {
                let path = l.blob_path(&desc.digest);
                let (p, d) = (path.clone(), desc.clone());
                tokio::task::spawn_blocking(move || verify_file(kind, &p, &d))
                    .await
                    .map_err(|e| PullImageError::Internal(e.to_string()))??;
                progress.advance(desc.size);
                Ok(path)
            }
        }
    }
}

fn check_size(kind: &'static str, desc: &Descriptor, limit: u64) -> Result<(), PullImageError> {
    if desc.size > limit {
        return Err(PullImageError::TooLarge {
            kind,
            digest: desc.digest.clone(),
            size: desc.size,
            limit,
        });
    }
    Ok(())
}

/// Checks a blob on disk against its descriptor, streaming.
fn verify_file(kind: &'static str, path: &Path, desc: &Descriptor) -> Result<(), PullImageError> {
    let io_err = |source: io::Error| PullImageError::BlobIo {
        kind,
        digest: desc.digest.clone(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io_err)?;
    let len = f.metadata().map_err(io_err)?.len();
    if len != desc.size {
        return Err(PullImageError::BlobSize {
            kind,
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: len,
        });
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let actual = format!("sha256:{}", hex::encode(h.finalize()));
    if actual != desc.digest {
        return Err(PullImageError::BlobDigest {
            kind,
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// Checks an in-memory document against its descriptor.
fn verify_bytes(kind: &'static str, bytes: &[u8], desc: &Descriptor) -> Result<(), PullImageError> {
    if bytes.len() as u64 != desc.size {
        return Err(PullImageError::BlobSize {
            kind,
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: bytes.len() as u64,
        });
    }
    let actual = sha256_hex(bytes);
    if actual != desc.digest {
        return Err(PullImageError::BlobDigest {
            kind,
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(())
}

fn parse_manifest_doc(what: &str, bytes: &[u8]) -> Result<Document, PullImageError> {
    manifest::parse_document(bytes, None).map_err(|reason| PullImageError::MalformedManifest {
        reference: what.to_owned(),
        reason,
    })
}

impl RegistrySource {
    fn classify(&self, what: &str, source: OciDistributionError) -> PullImageError {
        let registry = self.rref.registry.clone();
        let name = match what {
            "manifest" => self.rref.name(),
            other => other.to_owned(),
        };
        let not_found = match &source {
            OciDistributionError::ImageManifestNotFoundError(_) => true,
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                })
            }
            OciDistributionError::ServerError { code: 404, .. } => true,
            _ => false,
        };
        if not_found {
            return PullImageError::NotFound { registry, name };
        }
        match source {
            OciDistributionError::RequestError(_) => {
                PullImageError::Unreachable { registry, source }
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => PullImageError::Unauthorized {
                registry,
                name,
                source,
            },
            source => PullImageError::Registry {
                registry,
                name,
                source,
            },
        }
    }

    async fn fetch_document(
        &self,
        reference: &oci_client::Reference,
    ) -> Result<Vec<u8>, PullImageError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, manifest::ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.classify("manifest", e))?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(PullImageError::MalformedManifest {
                reference: self.rref.to_string(),
                reason: format!(
                    "{} bytes is more than the {MAX_DOCUMENT} byte limit",
                    bytes.len()
                ),
            });
        }
        Ok(bytes.to_vec())
    }

    async fn resolve(&self, platform: &Platform) -> Result<Resolved, PullImageError> {
        let what = self.rref.to_string();
        let bytes = self.fetch_document(&self.reference).await?;
        let digest = sha256_hex(&bytes);
        if let Some(want) = &self.rref.digest
            && *want != digest
        {
            return Err(PullImageError::ManifestDigest {
                reference: what,
                expected: want.clone(),
                actual: digest,
            });
        }
        match parse_manifest_doc(&what, &bytes)? {
            Document::Manifest(m) => Ok(Resolved {
                manifest: m,
                digest,
            }),
            Document::Index(index) => {
                let desc = manifest::select_platform(&index, platform).ok_or_else(|| {
                    PullImageError::NoPlatform {
                        reference: what.clone(),
                        platform: platform.to_string(),
                    }
                })?;
                check_size("manifest", desc, MAX_DOCUMENT)?;
                debug!(digest = %desc.digest, %platform, "index entry selected");
                let r = self.reference.clone_with_digest(desc.digest.clone());
                let bytes = self.fetch_document(&r).await?;
                verify_bytes("manifest", &bytes, desc)?;
                match parse_manifest_doc(&what, &bytes)? {
                    Document::Manifest(m) => Ok(Resolved {
                        manifest: m,
                        digest: desc.digest.clone(),
                    }),
                    Document::Index(_) => Err(PullImageError::MalformedManifest {
                        reference: what,
                        reason: "an index entry for the platform is itself an index".into(),
                    }),
                }
            }
        }
    }

    async fn fetch_blob(
        &self,
        kind: &'static str,
        desc: &Descriptor,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), PullImageError> {
        let io_err = |source: io::Error| PullImageError::BlobIo {
            kind,
            digest: desc.digest.clone(),
            source,
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, desc.digest.as_str())
            .await
            .map_err(|e| self.classify(&desc.digest, e))?;
        if let Some(len) = stream.content_length
            && len != desc.size
        {
            return Err(PullImageError::BlobSize {
                kind,
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: len,
            });
        }
        let mut out = tokio::fs::File::create(dest).await.map_err(io_err)?;
        let mut hasher = Sha256::new();
        let mut count = 0u64;
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The library's own check may fail first; ours below decides the message.
                    stream_error = Some(e);
                    break;
                }
            };
            count += chunk.len() as u64;
            if count > desc.size {
                return Err(PullImageError::BlobSize {
                    kind,
                    digest: desc.digest.clone(),
                    expected: desc.size,
                    actual: count,
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io_err)?;
            progress.advance(chunk.len() as u64);
        }
        out.flush().await.map_err(io_err)?;
        if count != desc.size {
            if let Some(e) = stream_error
                && count < desc.size
            {
                return Err(io_err(e));
            }
            return Err(PullImageError::BlobSize {
                kind,
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: count,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != desc.digest {
            return Err(PullImageError::BlobDigest {
                kind,
                expected: desc.digest.clone(),
                actual,
            });
        }
        if let Some(e) = stream_error {
            return Err(io_err(e));
        }
        Ok(())
    }
}

impl LocalSource {
    fn blob_path(&self, digest: &str) -> PathBuf {
        // Digests were validated as sha256:<64 hex> when parsed: no path tricks possible.
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.blobs.join("sha256").join(hex)
    }

    fn read_document(&self, desc: &Descriptor) -> Result<Vec<u8>, PullImageError> {
        check_size("manifest", desc, MAX_DOCUMENT)?;
        let path = self.blob_path(&desc.digest);
        let bytes = fs::read(&path).map_err(|source| PullImageError::BlobIo {
            kind: "manifest",
            digest: desc.digest.clone(),
            source,
        })?;
        verify_bytes("manifest", &bytes, desc)?;
        Ok(bytes)
    }

    fn resolve(&self, platform: &Platform) -> Result<Resolved, PullImageError> {
        let (dir, tag) = match &self.kind {
            LocalKind::Archive { manifest } => {
                let bytes = serde_json::to_vec(manifest)
                    .map_err(|e| PullImageError::Internal(e.to_string()))?;
                return Ok(Resolved {
                    manifest: manifest.clone(),
                    digest: sha256_hex(&bytes),
                });
            }
            LocalKind::Layout { dir, tag } => (dir, tag),
        };
        let layout = |reason: String| PullImageError::Layout {
            path: dir.clone(),
            reason,
        };
        let index_path = dir.join("index.json");
        let meta = fs::metadata(&index_path).map_err(|e| layout(format!("no index.json ({e})")))?;
        if meta.len() > MAX_DOCUMENT {
            return Err(layout("index.json is too large".into()));
        }
        let bytes = fs::read(&index_path).map_err(|e| layout(format!("index.json: {e}")))?;
        let index = match manifest::parse_document(&bytes, Some(manifest::OCI_INDEX)) {
            Ok(Document::Index(i)) => i,
            Ok(Document::Manifest(_)) => return Err(layout("index.json is not an index".into())),
            Err(reason) => return Err(layout(format!("index.json is malformed: {reason}"))),
        };
        const REF_NAME: &str = "org.opencontainers.image.ref.name";
        let candidates: Vec<&Descriptor> = match tag {
            Some(t) => index
                .manifests
                .iter()
                .filter(|d| d.annotations.get(REF_NAME) == Some(t))
                .collect(),
            None => index.manifests.iter().collect(),
        };
        let desc = match candidates.as_slice() {
            [] => {
                let tags: Vec<&str> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                    .collect();
                return Err(layout(format!(
                    "no image tagged {:?} (tags: {})",
                    tag.as_deref().unwrap_or(""),
                    tags.join(", ")
                )));
            }
            [one] => *one,
            many => {
                let sub = manifest::Index {
                    schema_version: 2,
                    media_type: None,
                    manifests: many.iter().map(|d| (*d).clone()).collect(),
                };
                match manifest::select_platform(&sub, platform) {
                    Some(d) => many
                        .iter()
                        .find(|x| x.digest == d.digest)
                        .copied()
                        .unwrap_or(many[0]),
                    None if tag.is_none() => {
                        return Err(layout(
                            "holds several images: name one with oci:PATH:TAG".into(),
                        ));
                    }
                    None => many[0],
                }
            }
        };
        let bytes = self.read_document(desc)?;
        match parse_manifest_doc(&self.what, &bytes)? {
            Document::Manifest(m) => Ok(Resolved {
                manifest: m,
                digest: desc.digest.clone(),
            }),
            Document::Index(inner) => {
                let d = manifest::select_platform(&inner, platform).ok_or_else(|| {
                    PullImageError::NoPlatform {
                        reference: self.what.clone(),
                        platform: platform.to_string(),
                    }
                })?;
                let bytes = self.read_document(d)?;
                match parse_manifest_doc(&self.what, &bytes)? {
                    Document::Manifest(m) => Ok(Resolved {
                        manifest: m,
                        digest: d.digest.clone(),
                    }),
                    Document::Index(_) => Err(PullImageError::MalformedManifest {
                        reference: self.what.clone(),
                        reason: "nested indexes are not supported".into(),
                    }),
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// What to say of an error reading a `docker save` archive. The tar
/// parser quotes the bytes of a header field it cannot read; the path may
/// name any file the caller can read (`kiln run docker-archive:/etc/shadow`
/// as root), so its bytes never go into a message.
fn tar_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::Other | io::ErrorKind::UnexpectedEof => {
            "is not a tar archive (a header is malformed or the file is cut short)".into()
        }
        _ => format!("unreadable: {}", e.kind()),
    }
}

/// Unpacks a `docker save` archive into content-addressed blobs and builds a manifest.
fn open_archive(path: &Path, scratch_root: &Path, what: &str) -> Result<Source, PullImageError> {
    let bad = |reason: String| PullImageError::Archive {
        path: path.to_owned(),
        reason,
    };
    let scratch = tempfile::Builder::new()
        .prefix("archive.")
        .tempdir_in(scratch_root)
        .map_err(|e| bad(format!("cannot make a scratch dir: {e}")))?;
    let blobs = scratch.path().join("blobs");
    fs::create_dir_all(blobs.join("sha256")).map_err(|e| bad(e.to_string()))?;
    let file = fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut ar = tar::Archive::new(io::BufReader::new(file));
    // Archive member name -> (digest, size). Members are copied by content, never by name.
    let mut members: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut manifest_json: Option<Vec<u8>> = None;
    for entry in ar.entries().map_err(|e| bad(tar_error(&e)))? {
        let mut entry = entry.map_err(|e| bad(tar_error(&e)))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        if name == "manifest.json" {
            let mut buf = Vec::new();
            (&mut entry)
                .take(MAX_DOCUMENT)
                .read_to_end(&mut buf)
                .map_err(|e| bad(e.to_string()))?;
            manifest_json = Some(buf);
            continue;
        }
        let tmp = blobs.join("incoming");
        let mut out = fs::File::create(&tmp).map_err(|e| bad(e.to_string()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(|e| bad(tar_error(&e)))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            io::Write::write_all(&mut out, &buf[..n]).map_err(|e| bad(e.to_string()))?;
            size += n as u64;
        }
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        fs::rename(&tmp, blobs.join("sha256").join(&digest[7..]))
            .map_err(|e| bad(e.to_string()))?;
        members.insert(name, (digest, size));
    }
    let manifest_json = manifest_json.ok_or_else(|| bad("has no manifest.json".into()))?;
    let entries: Vec<ArchiveManifest> = serde_json::from_slice(&manifest_json)
        .map_err(|e| bad(format!("manifest.json is malformed: {e}")))?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err(bad("manifest.json lists no image".into())),
        many => {
            let tags: Vec<String> = many
                .iter()
                .flat_map(|m| m.repo_tags.clone().unwrap_or_default())
                .collect();
            return Err(bad(format!(
                "holds {} images ({}); only single-image archives are supported",
                many.len(),
                tags.join(", ")
            )));
        }
    };
    let member = |n: &str| {
        members
            .get(n.trim_start_matches("./"))
            .cloned()
            .ok_or_else(|| {
                bad(format!(
                    "manifest.json names {n:?}, which is not in the archive"
                ))
            })
    };
    let (config_digest, config_size) = member(&entry.config)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (digest, size) = member(l)?;
        let mut head = [0u8; 4];
        let n = fs::File::open(blobs.join("sha256").join(&digest[7..]))
            .and_then(|mut f| f.read(&mut head))
            .map_err(|e| bad(e.to_string()))?;
        let media_type = match Compression::sniff(&head[..n]) {
            Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
            Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        layers.push(Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
        });
    }
    info!(path = %path.display(), layers = layers.len(), "docker archive read");
    Ok(Source::Local(LocalSource {
        blobs,
        what: what.to_owned(),
        kind: LocalKind::Archive {
            manifest: Manifest {
                schema_version: 2,
                media_type: Some(manifest::DOCKER_MANIFEST.into()),
                config: Descriptor {
                    media_type: manifest::DOCKER_CONFIG.into(),
                    digest: config_digest,
                    size: config_size,
                    platform: None,
                    annotations: BTreeMap::new(),
                },
                layers,
            },
        },
        _scratch: Some(scratch),
    }))
}

/// Credentials for `registry` from a Docker config file, if it has any.
fn docker_auth(registry: &str, config: Option<&Path>) -> RegistryAuth {
    let path = match config {
        Some(p) => p.to_owned(),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker/config.json"),
                None => return RegistryAuth::Anonymous,
            },
        },
    };
    let Ok(bytes) = fs::read(&path) else {
        return RegistryAuth::Anonymous;
    };
    parse_docker_auth(&bytes, registry).unwrap_or(RegistryAuth::Anonymous)
}

fn parse_docker_auth(bytes: &[u8], registry: &str) -> Option<RegistryAuth> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let hub = registry == "docker.io";
    for (key, val) in auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        let matches = host == registry
            || (hub
                && matches!(
                    host,
                    "index.docker.io" | "registry-1.docker.io" | "docker.io"
                ));
        if !matches {
            continue;
        }
        let encoded = val.get("auth")?.as_str()?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        debug!(registry, "using credentials from the docker config");
        return Some(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
    }
    None
}

pub(crate) fn layer_compression(desc: &Descriptor) -> Result<Compression, PullImageError> {
    Compression::from_media_type(&desc.media_type).ok_or_else(|| PullImageError::MediaType {
        digest: desc.digest.clone(),
        media_type: desc.media_type.clone(),
    })
}

pub(crate) fn phase_download(desc: &Descriptor) -> PullPhase {
    PullPhase::Download {
        digest: desc.digest.clone(),
    }
}

pub(crate) fn size_limit(
    kind: &'static str,
    desc: &Descriptor,
    limit: u64,
) -> Result<(), PullImageError> {
    check_size(kind, desc, limit)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_that_is_not_a_tar_archive_is_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("shadow");
        let mut text = String::from("root:$6$SECRETSALT$SECRETHASHSECRETHASH:19000:0:99999:7:::\n");
        while text.len() < 4096 {
            text.push_str("daemon:*:19000:0:99999:7:::SECRETLINE\n");
        }
        std::fs::write(&secret, &text).unwrap();
        let Err(err) = super::open_archive(&secret, dir.path(), "docker-archive:shadow") else {
            panic!("a text file opened as an archive");
        };
        let msg = err.to_string();
        assert!(!msg.contains("SECRET") && !msg.contains("root:"), "{msg}");
        assert!(msg.contains("not a tar archive"), "{msg}");
    }

    use super::*;

    #[test]
    fn docker_config_auth() {
        let cfg = br#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"},"https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="}}}"#;
        assert!(matches!(
            parse_docker_auth(cfg, "127.0.0.1:5000"),
            Some(RegistryAuth::Basic(u, p)) if u == "user" && p == "pass"
        ));
        assert!(matches!(
            parse_docker_auth(cfg, "docker.io"),
            Some(RegistryAuth::Basic(u, p)) if u == "hub" && p == "secret"
        ));
        assert!(parse_docker_auth(cfg, "ghcr.io").is_none());
    }
}
