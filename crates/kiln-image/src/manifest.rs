//! The OCI / Docker v2 documents Kiln reads: indexes, manifests, image configs.
//!
//! Parsed with our own types so that every source (registry, layout, archive) goes
//! through the same checks, whatever a client library accepts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The manifest media types Kiln asks a registry for.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares, or `None` if it is not a layer type.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// Guesses from the first bytes of a blob (used for `docker save` archives).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Target platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OS/architecture pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64`, the only platform Kiln's guests run.
    pub fn linux_amd64() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform::linux_amd64()
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI or Docker v2.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Media type, when the document states it.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// Layers, lowest first.
    pub layers: Vec<Descriptor>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Media type, when stated.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The entries.
    pub manifests: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Debug, Clone)]
pub enum Document {
    /// An index / manifest list.
    Index(Index),
    /// A single-platform image manifest.
    Manifest(Manifest),
}

/// Parses a manifest document; `Err` carries a short reason.
pub fn parse_document(bytes: &[u8], content_type: Option<&str>) -> Result<Document, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let media_type = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .or(content_type)
        .unwrap_or("");
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => value.get("manifests").is_some(),
    };
    match value.get("schemaVersion").and_then(|v| v.as_u64()) {
        Some(2) => {}
        Some(v) => return Err(format!("schemaVersion {v} is not supported (only 2)")),
        None => return Err("no schemaVersion".into()),
    }
    if is_index {
        let index: Index = serde_json::from_value(value).map_err(|e| e.to_string())?;
        for m in &index.manifests {
            check_digest(&m.digest)?;
        }
        Ok(Document::Index(index))
    } else {
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| e.to_string())?;
        check_digest(&manifest.config.digest)?;
        for l in &manifest.layers {
            check_digest(&l.digest)?;
        }
        Ok(Document::Manifest(manifest))
    }
}

fn check_digest(d: &str) -> Result<(), String> {
    if crate::reference::valid_digest(d) {
        Ok(())
    } else {
        Err(format!("digest {d:?} is not sha256:<64 lowercase hex>"))
    }
}

/// The first index entry for `platform` (variant ignored when the wanted one has none).
pub fn select_platform<'a>(index: &'a Index, platform: &Platform) -> Option<&'a Descriptor> {
    index.manifests.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == platform.os
                && p.architecture == platform.architecture
                && (platform.variant.is_none() || p.variant == platform.variant)
        })
    })
}

/// What a sandbox needs from an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir` (empty = `/`).
    pub working_dir: String,
    /// `User` (empty = root).
    pub user: String,
    /// `ExposedPorts` keys, e.g. `80/tcp`.
    pub exposed_ports: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `StopSignal`.
    pub stop_signal: Option<String>,
    /// `os` of the image.
    pub os: String,
    /// `architecture` of the image.
    pub architecture: String,
}

#[derive(Deserialize, Default)]
struct RawConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parses an image config blob into the config and the layers' `diff_ids`.
pub fn parse_config(bytes: &[u8]) -> Result<(ImageConfig, Vec<String>), String> {
    let raw: RawConfigFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let c = raw.config.unwrap_or_default();
    let diff_ids = raw.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    for d in &diff_ids {
        check_digest(d)?;
    }
    Ok((
        ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: c.labels.unwrap_or_default(),
            stop_signal: c.stop_signal,
            os: raw.os,
            architecture: raw.architecture,
        },
        diff_ids,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_manifest_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":3}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{D}","size":9}}]}}"#
        );
        let Ok(Document::Manifest(m)) = parse_document(m.as_bytes(), None) else {
            panic!("manifest expected");
        };
        assert_eq!(
            Compression::from_media_type(&m.layers[0].media_type),
            Some(Compression::Zstd)
        );
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},{{"digest":"{D}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Ok(Document::Index(i)) = parse_document(i.as_bytes(), None) else {
            panic!("index expected");
        };
        assert_eq!(
            select_platform(&i, &Platform::linux_amd64()).map(|d| d.size),
            Some(2)
        );
    }

    #[test]
    fn refuses_malformed() {
        assert!(parse_document(b"nope", None).is_err());
        assert!(parse_document(br#"{"schemaVersion":1}"#, None).is_err());
        assert!(parse_document(br#"{"schemaVersion":2,"layers":"x"}"#, None).is_err());
        let bad =
            r#"{"schemaVersion":2,"config":{"digest":"sha256:../../x","size":1},"layers":[]}"#;
        assert!(parse_document(bad.as_bytes(), None).is_err());
    }

    #[test]
    fn parses_config() {
        let (c, diffs) = parse_config(
            format!(r#"{{"os":"linux","architecture":"amd64","config":{{"Cmd":["sh"],"Env":["PATH=/bin"],"User":"1000","ExposedPorts":{{"80/tcp":{{}}}}}},"rootfs":{{"type":"layers","diff_ids":["{D}"]}}}}"#).as_bytes(),
        )
        .expect("parses");
        assert_eq!(c.cmd, vec!["sh"]);
        assert_eq!(c.user, "1000");
        assert_eq!(c.exposed_ports, vec!["80/tcp"]);
        assert_eq!(diffs, vec![D]);
    }
}
