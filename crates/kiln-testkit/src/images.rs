//! Test images built deterministically from code, cached under
//! `${KILN_CACHE_DIR:-$HOME/.cache/kiln}/testimages/<name>-<key>` (keyed on their inputs,
//! built under a temp name and renamed into place, one builder at a time per key).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tracing::info;

/// Bump when any builder below changes what it produces.
const BUILDER_VERSION: &str = "1";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Kiln's cache dir: `$KILN_CACHE_DIR` or `$HOME/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KILN_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/kiln"),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout directory and the tag of the image in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayout {
    /// The layout directory.
    pub dir: PathBuf,
    /// The `org.opencontainers.image.ref.name` of the image.
    pub tag: String,
}

impl OciLayout {
    /// `oci:<dir>:<tag>`, for `ImageRef::parse`.
    pub fn image_ref(&self) -> String {
        format!("oci:{}:{}", self.dir.display(), self.tag)
    }

    /// Path of a blob.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    /// The manifest's media type and raw bytes.
    pub fn manifest(&self) -> Result<(String, Vec<u8>)> {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(self.dir.join("index.json"))?)?;
        let entry = index["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter()
                    .find(|d| d["annotations"][REF_NAME].as_str() == Some(self.tag.as_str()))
            })
            .with_context(|| {
                format!("no manifest tagged {} in {}", self.tag, self.dir.display())
            })?;
        let digest = entry["digest"].as_str().context("digest")?;
        let media_type = entry["mediaType"]
            .as_str()
            .unwrap_or(OCI_MANIFEST)
            .to_owned();
        Ok((media_type, fs::read(self.blob_path(digest))?))
    }

    /// The manifest digest recorded in `index.json`.
    pub fn manifest_digest(&self) -> Result<String> {
        let (_, bytes) = self.manifest()?;
        Ok(sha256_hex(&bytes))
    }

    /// Writes a `docker save`-style archive with `skopeo copy … docker-archive:FILE:NAME:TAG`.
    pub fn to_docker_archive(&self, file: &Path, name_tag: &str) -> Result<()> {
        let _ = fs::remove_file(file);
        let out = Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:{}", self.dir.display(), self.tag))
            .arg(format!("docker-archive:{}:{name_tag}", file.display()))
            .output()
            .context("cannot run skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo docker-archive failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// Layer compression for [`LayoutWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comp {
    /// `application/vnd.oci.image.layer.v1.tar`
    None,
    /// `…tar+gzip`
    Gzip,
    /// `…tar+zstd`
    Zstd,
}

impl Comp {
    fn media_type(self) -> &'static str {
        match self {
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Writes an OCI image layout by hand: blobs, manifest, `index.json`, `oci-layout`.
pub struct LayoutWriter {
    dir: PathBuf,
    layers: Vec<serde_json::Value>,
    diff_ids: Vec<String>,
}

impl LayoutWriter {
    /// Creates the layout skeleton in `dir`.
    pub fn new(dir: &Path) -> Result<LayoutWriter> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(LayoutWriter {
            dir: dir.to_owned(),
            layers: Vec::new(),
            diff_ids: Vec::new(),
        })
    }

    /// Stores bytes as a blob; returns (digest, size).
    pub fn blob(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let d = sha256_hex(bytes);
        fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes)?;
        Ok((d, bytes.len() as u64))
    }

    /// Compresses an in-memory tar and adds it as the next layer; returns its digest.
    pub fn layer(&mut self, tar: &[u8], comp: Comp) -> Result<String> {
        self.layer_from_reader(tar, comp)
    }

    /// Adds a tar read from a file (streamed) as the next layer.
    pub fn layer_file(&mut self, tar: &Path, comp: Comp) -> Result<String> {
        self.layer_from_reader(io::BufReader::new(fs::File::open(tar)?), comp)
    }

    fn layer_from_reader(&mut self, mut tar: impl Read, comp: Comp) -> Result<String> {
        let tmp = self.dir.join("blobs/incoming");
        let out = HashWriter::new(fs::File::create(&tmp)?);
        let mut diff = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let out = match comp {
            Comp::None => {
                let mut w = out;
                copy_hashing(&mut tar, &mut w, &mut diff, &mut buf)?;
                w
            }
            Comp::Gzip => {
                let mut w = flate2::GzBuilder::new().write(out, flate2::Compression::new(6));
                copy_hashing(&mut tar, &mut w, &mut diff, &mut buf)?;
                w.finish()?
            }
            Comp::Zstd => {
                let mut w = zstd::stream::write::Encoder::new(out, 3)?;
                copy_hashing(&mut tar, &mut w, &mut diff, &mut buf)?;
                w.finish()?
            }
        };
        let (digest, size) = out.finish()?;
        fs::rename(&tmp, self.dir.join("blobs/sha256").join(&digest[7..]))?;
        self.layers
            .push(json!({"mediaType": comp.media_type(), "digest": digest, "size": size}));
        self.diff_ids
            .push(format!("sha256:{}", hex::encode(diff.finalize())));
        Ok(digest)
    }

    /// Appends every layer of another layout (blobs copied, descriptors and
    /// diff IDs kept), e.g. to build an image on top of the busybox one.
    pub fn copy_layers(&mut self, from: &OciLayout) -> Result<()> {
        let (_, bytes) = from.manifest()?;
        let manifest: serde_json::Value = serde_json::from_slice(&bytes)?;
        let cfg_digest = manifest["config"]["digest"]
            .as_str()
            .context("config digest")?;
        let cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(from.blob_path(cfg_digest))?)?;
        let layers = manifest["layers"].as_array().context("layers")?;
        let diff_ids = cfg["rootfs"]["diff_ids"].as_array().context("diff_ids")?;
        if layers.len() != diff_ids.len() {
            bail!("{} layers but {} diff_ids", layers.len(), diff_ids.len());
        }
        for (l, d) in layers.iter().zip(diff_ids) {
            let digest = l["digest"].as_str().context("layer digest")?;
            fs::copy(
                from.blob_path(digest),
                self.dir
                    .join("blobs/sha256")
                    .join(digest.trim_start_matches("sha256:")),
            )?;
            self.layers.push(l.clone());
            self.diff_ids
                .push(d.as_str().context("diff_id")?.to_owned());
        }
        Ok(())
    }

    /// The layer descriptors so far (editable, for hostile manifests).
    pub fn layers_mut(&mut self) -> &mut Vec<serde_json::Value> {
        &mut self.layers
    }

    /// Writes config (`config` is the `config` object of the image config), manifest and
    /// index; returns the layout.
    pub fn finish(self, config: serde_json::Value, tag: &str) -> Result<OciLayout> {
        let cfg = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
        });
        let (cd, cs) = self.blob(&serde_json::to_vec(&cfg)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": cs},
            "layers": self.layers,
        });
        self.finish_raw(&serde_json::to_vec(&manifest)?, tag)
    }

    /// Stores arbitrary manifest bytes and points `index.json` at them.
    pub fn finish_raw(self, manifest: &[u8], tag: &str) -> Result<OciLayout> {
        let (md, ms) = self.blob(manifest)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": OCI_MANIFEST, "digest": md, "size": ms,
                "annotations": {REF_NAME: tag},
                "platform": {"os": "linux", "architecture": "amd64"},
            }],
        });
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(OciLayout {
            dir: self.dir,
            tag: tag.to_owned(),
        })
    }
}

fn copy_hashing(
    r: &mut impl Read,
    w: &mut impl Write,
    h: &mut Sha256,
    buf: &mut [u8],
) -> Result<()> {
    loop {
        let n = r.read(buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
    }
}

struct HashWriter<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }
    fn finish(mut self) -> Result<(String, u64)> {
        self.inner.flush()?;
        Ok((
            format!("sha256:{}", hex::encode(self.hash.finalize())),
            self.size,
        ))
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Builds tar streams entry by entry, names written raw (so hostile names are possible).
pub struct Tar {
    b: tar::Builder<Vec<u8>>,
}

impl Default for Tar {
    fn default() -> Self {
        Tar::new()
    }
}

impl Tar {
    /// An empty archive.
    pub fn new() -> Tar {
        Tar {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, name: &str, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        if let Some(gnu) = h.as_gnu_mut() {
            gnu.name = [0; 100];
            let n = name.len().min(100);
            gnu.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        }
        h.set_cksum();
        h
    }

    /// A directory owned by root.
    pub fn dir(self, name: &str, mode: u32) -> Self {
        self.dir_owned(name, mode, 0)
    }

    /// A directory owned by `uid:uid`.
    pub fn dir_owned(mut self, name: &str, mode: u32, uid: u64) -> Self {
        let h = Self::header(tar::EntryType::Directory, name, mode, uid, 0);
        self.b.append(&h, io::empty()).expect("in-memory tar");
        self
    }

    /// A regular file owned by root.
    pub fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.file_owned(name, mode, 0, data)
    }

    /// A regular file owned by `uid:uid`.
    pub fn file_owned(mut self, name: &str, mode: u32, uid: u64, data: &[u8]) -> Self {
        let h = Self::header(tar::EntryType::Regular, name, mode, uid, data.len() as u64);
        self.b.append(&h, data).expect("in-memory tar");
        self
    }

    /// A regular file with PAX xattrs (`SCHILY.xattr.<name>`).
    pub fn file_xattr(mut self, name: &str, data: &[u8], xattrs: &[(&str, &str)]) -> Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_bytes()))
            .collect();
        self.b
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .expect("in-memory tar");
        self.file(name, 0o644, data)
    }

    fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, name, 0o777, 0, 0);
        if let Some(gnu) = h.as_gnu_mut() {
            let n = target.len().min(100);
            gnu.linkname[..n].copy_from_slice(&target.as_bytes()[..n]);
        }
        h.set_cksum();
        self.b.append(&h, io::empty()).expect("in-memory tar");
        self
    }

    /// A symlink.
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, name, target)
    }

    /// A hardlink to an earlier entry.
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, name, target)
    }

    /// The archive bytes.
    pub fn bytes(self) -> Vec<u8> {
        self.b.into_inner().expect("in-memory tar")
    }
}

/// Builds `<cache>/testimages/<name>-<key>` once, atomically, with a lock per key.
fn cached(
    name: &str,
    key: &str,
    tag: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<OciLayout> {
    let root = cache_dir().join("testimages");
    fs::create_dir_all(&root)?;
    let final_dir = root.join(format!("{name}-{key}"));
    let layout = OciLayout {
        dir: final_dir.clone(),
        tag: tag.to_owned(),
    };
    if final_dir.join("index.json").is_file() {
        return Ok(layout);
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(format!("{name}-{key}.lock")))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
    if final_dir.join("index.json").is_file() {
        return Ok(layout);
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}-{key}."))
        .tempdir_in(&root)?;
    let started = std::time::Instant::now();
    build(tmp.path())?;
    let _ = fs::remove_dir_all(&final_dir);
    fs::rename(tmp.path().join("layout"), &final_dir)?;
    info!(
        name,
        key,
        secs = started.elapsed().as_secs_f64(),
        "test image built"
    );
    Ok(layout)
}

fn key_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    h.update(BUILDER_VERSION.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())[..16].to_owned()
}

/// `/etc/passwd` of the test images: root, `app` (1000) and `nobody`.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// `/etc/group` of the test images.
pub const GROUP: &str = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n";

/// A one-layer busybox image from Debian's `busybox-static` (tag `latest`).
pub fn busybox() -> Result<OciLayout> {
    let bin = fs::read("/bin/busybox").context("busybox-static is not installed")?;
    let key = key_of(&[b"busybox", &bin, PASSWD.as_bytes()]);
    cached("busybox", &key, "latest", |tmp| {
        let list = Command::new("/bin/busybox").arg("--list").output()?;
        let mut applets: Vec<String> = String::from_utf8(list.stdout)?
            .lines()
            .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
            .map(str::to_owned)
            .collect();
        applets.sort();
        applets.dedup();
        let mut t = Tar::new()
            .dir("bin/", 0o755)
            .dir("dev/", 0o755)
            .dir("etc/", 0o755)
            .dir("home/", 0o755)
            .dir("proc/", 0o555)
            .dir("root/", 0o700)
            .dir("sys/", 0o555)
            .dir("tmp/", 0o1777)
            .dir("usr/", 0o755)
            .dir("usr/bin/", 0o755)
            .dir("var/", 0o755)
            .file("bin/busybox", 0o755, &bin)
            .file("etc/passwd", 0o644, PASSWD.as_bytes())
            .file("etc/group", 0o644, GROUP.as_bytes())
            .file("etc/hostname", 0o644, b"kiln\n");
        for a in &applets {
            t = t.symlink(&format!("bin/{a}"), "busybox");
        }
        t = t.dir_owned("home/app/", 0o755, 1000).file_owned(
            "home/app/.profile",
            0o644,
            1000,
            b"export PS1='$ '\n",
        );
        let mut w = LayoutWriter::new(&tmp.join("layout"))?;
        let bytes = t.bytes();
        w.layer(&bytes, Comp::Gzip)?;
        w.finish(
            json!({"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"}),
            "latest",
        )?;
        Ok(())
    })
}

/// The Debian mirror this machine's apt uses for bookworm (never hard-coded in the repo).
pub fn debian_mirror() -> Result<String> {
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sources"))
            .collect();
        files.sort();
        for f in files {
            if let Some(uri) = mirror_from_deb822(&fs::read_to_string(&f)?, "bookworm") {
                return Ok(uri);
            }
        }
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list")
        && let Some(uri) = mirror_from_one_line(&text, "bookworm")
    {
        return Ok(uri);
    }
    bail!(
        "no apt source for bookworm in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    )
}

/// The first `URIs:` of a deb822 stanza of type `deb` whose `Suites:` include `suite`.
pub fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut fields: HashMap<String, String> = HashMap::new();
        for line in stanza.lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let enabled = fields.get("enabled").is_none_or(|e| e != "no");
        let types = fields.get("types").map(String::as_str).unwrap_or("");
        let suites = fields.get("suites").map(String::as_str).unwrap_or("");
        if enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
            && let Some(uri) = fields.get("uris").and_then(|u| u.split_whitespace().next())
        {
            return Some(uri.to_owned());
        }
    }
    None
}

/// The URI of the first `deb [options] URI SUITE …` line for `suite`.
pub fn mirror_from_one_line(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let close = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=close);
        }
        if rest.len() >= 2 && rest[1] == suite {
            return Some(rest[0].to_owned());
        }
    }
    None
}

/// Directories emptied in the python image to keep it small.
const TRIM: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "var/cache/debconf",
];

/// Debian bookworm minbase + `python3-minimal`, one gzip layer (tag `latest`).
/// Runs `debootstrap` (about a minute) the first time only.
pub fn python() -> Result<OciLayout> {
    let key = key_of(&[
        b"python",
        b"bookworm",
        b"minbase",
        b"python3-minimal",
        TRIM.join(",").as_bytes(),
    ]);
    cached("python", &key, "latest", |tmp| {
        let mirror = debian_mirror()?;
        let root = tmp.join("root");
        let out = Command::new("debootstrap")
            .args(["--variant=minbase", "--include=python3-minimal", "bookworm"])
            .arg(&root)
            .arg(&mirror)
            .output()
            .context("cannot run debootstrap")?;
        if !out.status.success() {
            bail!(
                "debootstrap failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for t in TRIM {
            let p = root.join(t);
            if p.is_dir() {
                for e in fs::read_dir(&p)? {
                    let e = e?;
                    if e.file_type()?.is_dir() {
                        fs::remove_dir_all(e.path())?;
                    } else {
                        fs::remove_file(e.path())?;
                    }
                }
            }
        }
        let tar_path = tmp.join("layer.tar");
        tar_tree(&root, &tar_path)?;
        let mut w = LayoutWriter::new(&tmp.join("layout"))?;
        w.layer_file(&tar_path, Comp::Gzip)?;
        w.finish(
            json!({"Env": [PATH_ENV, "LANG=C.UTF-8"], "Cmd": ["python3"], "WorkingDir": "/"}),
            "latest",
        )?;
        Ok(())
    })
}

/// Tars a directory tree: sorted, no device nodes, contents of dev/proc/sys skipped,
/// hardlinks kept as hardlinks, ownership and modes kept.
pub fn tar_tree(root: &Path, out: &Path) -> Result<()> {
    let mut b = tar::Builder::new(io::BufWriter::new(fs::File::create(out)?));
    let mut seen: HashMap<(u64, u64), String> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))?
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let m = fs::symlink_metadata(&p)?;
            let name = r.to_string_lossy().into_owned();
            let mut h = tar::Header::new_gnu();
            h.set_mode(m.mode() & 0o7777);
            h.set_uid(m.uid() as u64);
            h.set_gid(m.gid() as u64);
            h.set_mtime(m.mtime().max(0) as u64);
            let ft = m.file_type();
            if ft.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}/"), io::empty())?;
                if !matches!(name.as_str(), "dev" | "proc" | "sys") {
                    subdirs.push(r);
                }
            } else if ft.is_symlink() {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &name, fs::read_link(&p)?)?;
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = seen.get(&(m.dev(), m.ino())) {
                        h.set_entry_type(tar::EntryType::Link);
                        h.set_size(0);
                        b.append_link(&mut h, &name, first)?;
                        continue;
                    }
                    seen.insert((m.dev(), m.ino()), name.clone());
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(m.len());
                b.append_data(&mut h, &name, fs::File::open(&p)?)?;
            }
        }
        // Depth-first in sorted order.
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    b.into_inner()?.flush()?;
    Ok(())
}

/// The final tree of [`multilayer`], as [`tree_listing`] prints it.
///
/// Layer 1 (gzip) creates `etc/{keep,gone}.conf`, `opq/{old1,sub/old2}`, `data/base.txt`
/// (uid 1000), setuid `bin/tool` and its hardlink `bin/tool-link`, `replaced` = v1.
/// Layer 2 (zstd) whites out `etc/gone.conf`, makes `opq` opaque and adds `opq/new`,
/// adds symlink `data/link -> base.txt`, replaces `replaced` with v2, adds `xattr.txt`
/// (xattr `user.kiln=yes`) and `emptied/x`.
/// Layer 3 (plain tar) whites out `emptied/x`, adds hardlink `data/hard -> data/base.txt`
/// and `late`.
pub const MULTILAYER_EXPECTED: &[&str] = &[
    "bin/ d 755 0:0",
    "bin/tool f 4755 0:0 tool",
    "bin/tool-link f 4755 0:0 tool",
    "data/ d 755 0:0",
    "data/base.txt f 644 1000:1000 base",
    "data/hard f 644 1000:1000 base",
    "data/link l 777 0:0 -> base.txt",
    "emptied/ d 755 0:0",
    "etc/ d 755 0:0",
    "etc/keep.conf f 644 0:0 keep",
    "late f 644 0:0 late",
    "opq/ d 755 0:0",
    "opq/new f 644 0:0 new",
    "replaced f 644 0:0 v2",
    "xattr.txt f 644 0:0 yes",
];

/// Three layers (gzip, zstd, plain) with whiteouts, an opaque dir, hardlinks, a symlink,
/// setuid, ownership and an xattr. See [`MULTILAYER_EXPECTED`].
pub fn multilayer() -> Result<OciLayout> {
    let key = key_of(&[b"multilayer"]);
    cached("multilayer", &key, "v1", |tmp| {
        let mut w = LayoutWriter::new(&tmp.join("layout"))?;
        w.layer(
            &Tar::new()
                .dir("etc/", 0o755)
                .file("etc/keep.conf", 0o644, b"keep")
                .file("etc/gone.conf", 0o644, b"gone")
                .dir("opq/", 0o755)
                .file("opq/old1", 0o644, b"old1")
                .dir("opq/sub/", 0o755)
                .file("opq/sub/old2", 0o644, b"old2")
                .dir("data/", 0o755)
                .file_owned("data/base.txt", 0o644, 1000, b"base")
                .dir("bin/", 0o755)
                .file("bin/tool", 0o4755, b"tool")
                .hardlink("bin/tool-link", "bin/tool")
                .file("replaced", 0o644, b"v1")
                .bytes(),
            Comp::Gzip,
        )?;
        w.layer(
            &Tar::new()
                .file("etc/.wh.gone.conf", 0o644, b"")
                .file("opq/.wh..wh..opq", 0o644, b"")
                .file("opq/new", 0o644, b"new")
                .symlink("data/link", "base.txt")
                .file("replaced", 0o644, b"v2")
                .file_xattr("xattr.txt", b"yes", &[("user.kiln", "yes")])
                .dir("emptied/", 0o755)
                .file("emptied/x", 0o644, b"x")
                .bytes(),
            Comp::Zstd,
        )?;
        w.layer(
            &Tar::new()
                .file("emptied/.wh.x", 0o644, b"")
                .hardlink("data/hard", "data/base.txt")
                .file("late", 0o644, b"late")
                .bytes(),
            Comp::None,
        )?;
        w.finish(json!({"Cmd": ["/bin/tool"], "Env": [PATH_ENV]}), "v1")?;
        Ok(())
    })
}

/// Lists a tree as `path kind mode uid:gid [content | -> target]`, sorted; file contents
/// are shown when they are short UTF-8.
pub fn tree_listing(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let m = fs::symlink_metadata(&p)?;
            let base = format!("{:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid());
            let ft = m.file_type();
            if ft.is_dir() {
                out.push(format!("{}/ d {base}", r.display()));
                stack.push(r);
            } else if ft.is_symlink() {
                out.push(format!(
                    "{} l {base} -> {}",
                    r.display(),
                    fs::read_link(&p)?.display()
                ));
            } else {
                let data = fs::read(&p)?;
                let text = match std::str::from_utf8(&data) {
                    Ok(t) if t.len() <= 64 => t.to_owned(),
                    _ => format!("<{} bytes>", data.len()),
                };
                out.push(format!("{} f {base} {text}", r.display()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Hostile inputs for the unpacker and the puller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Entry `../../<escape name>`.
    PathTraversal,
    /// Entry with an absolute name.
    AbsolutePath,
    /// Symlink `up -> ../../../..`, then a file `up/<sentinel>/pwned`.
    SymlinkEscapeRelative,
    /// Symlink `root -> /`, then a file `root/<sentinel>/pwned` (must land inside the root).
    SymlinkEscapeAbsolute,
    /// Hardlink `h -> ../../../etc/passwd`.
    HardlinkEscape,
    /// Symlink `s -> ../../..` then hardlink `h -> s/etc/passwd`.
    HardlinkViaSymlink,
    /// A gzip layer cut in half (its descriptor matches the cut bytes).
    TruncatedLayer,
    /// The layer blob's content does not hash to the digest the manifest names.
    WrongLayerDigest,
    /// The layer blob is one byte longer than the manifest says.
    WrongLayerSize,
    /// A manifest whose `layers` is not a list.
    MalformedManifest,
    /// A layer descriptor declaring 1 PiB.
    HugeDeclaredSize,
    /// A tar entry declaring 1 TiB (its data missing).
    HugeEntry,
}

impl Hostile {
    /// Every variant.
    pub const ALL: &'static [Hostile] = &[
        Hostile::PathTraversal,
        Hostile::AbsolutePath,
        Hostile::SymlinkEscapeRelative,
        Hostile::SymlinkEscapeAbsolute,
        Hostile::HardlinkEscape,
        Hostile::HardlinkViaSymlink,
        Hostile::TruncatedLayer,
        Hostile::WrongLayerDigest,
        Hostile::WrongLayerSize,
        Hostile::MalformedManifest,
        Hostile::HugeDeclaredSize,
        Hostile::HugeEntry,
    ];
}

/// Writes a hostile image as an OCI layout in `dir` (tag `hostile`). `sentinel` is a host
/// directory the image tries to write into; it must stay empty.
pub fn hostile(kind: Hostile, dir: &Path, sentinel: &Path) -> Result<OciLayout> {
    let s = sentinel
        .to_string_lossy()
        .trim_start_matches('/')
        .to_owned();
    let mut w = LayoutWriter::new(dir)?;
    let base = Tar::new().dir("etc/", 0o755).file("etc/ok", 0o644, b"ok");
    let cfg = json!({"Cmd": ["sh"]});
    let tar = match kind {
        Hostile::PathTraversal => base
            .file("../../../../../../../../kiln-escape", 0o644, b"x")
            .bytes(),
        Hostile::AbsolutePath => base.file(&format!("/{s}/pwned"), 0o644, b"x").bytes(),
        Hostile::SymlinkEscapeRelative => base
            .symlink("up", "../../../../../../../../../..")
            .file(&format!("up/{s}/pwned"), 0o644, b"x")
            .bytes(),
        Hostile::SymlinkEscapeAbsolute => base
            .symlink("root", "/")
            .file(&format!("root/{s}/pwned"), 0o644, b"x")
            .bytes(),
        Hostile::HardlinkEscape => base.hardlink("h", "../../../etc/passwd").bytes(),
        Hostile::HardlinkViaSymlink => base
            .symlink("s", "../../../../../../..")
            .hardlink("h", "s/etc/passwd")
            .bytes(),
        Hostile::HugeEntry => {
            let mut b = base.bytes();
            b.truncate(b.len() - 1024);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(1 << 40);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_path("huge")?;
            h.set_cksum();
            b.extend_from_slice(h.as_bytes());
            b.extend_from_slice(&[0u8; 4096]);
            b
        }
        _ => base.bytes(),
    };
    match kind {
        Hostile::TruncatedLayer => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            // Incompressible-ish content so the cut lands inside the data.
            let noise: Vec<u8> = (0..64 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let full = Tar::new()
                .file("etc/ok", 0o644, b"ok")
                .file("noise", 0o644, &noise)
                .bytes();
            gz.write_all(&full)?;
            let compressed = gz.finish()?;
            let cut = &compressed[..compressed.len() / 2];
            let (d, size) = w.blob(cut)?;
            w.layers_mut()
                .push(json!({"mediaType": Comp::Gzip.media_type(), "digest": d, "size": size}));
            w.diff_ids.push(sha256_hex(&full));
            w.finish(cfg, "hostile")
        }
        Hostile::WrongLayerDigest => {
            let d = w.layer(&tar, Comp::None)?;
            let path = dir.join("blobs/sha256").join(&d[7..]);
            let mut bytes = fs::read(&path)?;
            bytes[0] ^= 0x55;
            fs::write(&path, bytes)?;
            w.finish(cfg, "hostile")
        }
        Hostile::WrongLayerSize => {
            w.layer(&tar, Comp::None)?;
            if let Some(size) = w.layers_mut()[0]["size"].as_u64() {
                w.layers_mut()[0]["size"] = json!(size - 1);
            }
            w.finish(cfg, "hostile")
        }
        Hostile::HugeDeclaredSize => {
            w.layer(&tar, Comp::None)?;
            w.layers_mut()[0]["size"] = json!(1u64 << 50);
            w.finish(cfg, "hostile")
        }
        Hostile::MalformedManifest => {
            let (cd, cs) = w.blob(br#"{"os":"linux","architecture":"amd64"}"#)?;
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{cd}","size":{cs}}},"layers":"oops"}}"#
            );
            w.finish_raw(manifest.as_bytes(), "hostile")
        }
        _ => {
            w.layer(&tar, Comp::Gzip)?;
            w.finish(cfg, "hostile")
        }
    }
}

/// A small valid image whose single layer is unique to `seed` (for tests that corrupt
/// registry storage, which is shared by content).
pub fn unique_small(dir: &Path, seed: &str) -> Result<OciLayout> {
    let mut w = LayoutWriter::new(dir)?;
    w.layer(
        &Tar::new()
            .dir("etc/", 0o755)
            .file("etc/seed", 0o644, seed.as_bytes())
            .bytes(),
        Comp::Gzip,
    )?;
    let labels: BTreeMap<&str, &str> = [("seed", seed)].into_iter().collect();
    w.finish(json!({"Cmd": ["sh"], "Labels": labels}), "latest")
}

#[cfg(test)]
mod tests;
