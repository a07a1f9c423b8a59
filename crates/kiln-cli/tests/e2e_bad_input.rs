//! Bad input, each a test: a clear one-line error naming the cause, a
//! non-zero exit, and no partial cache entry, leaked VMM process, socket or
//! file.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Kiln, assert_one_line_error, busybox, code, stderr};
use kiln_testkit::images::{self, Hostile};
use kiln_testkit::registry::Registry;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Nothing but locks in the private image cache, no process, no socket.
fn assert_nothing_left(k: &Kiln) {
    let files = k.cached_image_files();
    assert!(files.is_empty(), "image cache entries left: {files:#?}");
    k.assert_clean();
}

#[test]
fn unknown_image() {
    let k = Kiln::with_own_cache();
    let out = k.run(&["run", "oci:/nonexistent/layout:v1", "--", "true"]);
    assert_one_line_error(&out, "/nonexistent/layout");
    let bb = images::busybox().expect("busybox");
    let out = k.run(&[
        "run",
        &format!("oci:{}:no-such-tag", bb.dir.display()),
        "--",
        "true",
    ]);
    assert_one_line_error(&out, "no-such-tag");
    let out = k.run(&["run", "docker-archive:/nonexistent.tar", "--", "true"]);
    assert_one_line_error(&out, "/nonexistent.tar");
    let out = k.run(&["run", "Bad Reference!!", "--", "true"]);
    assert_one_line_error(&out, "Bad Reference!!");
    // A registry that has no such repository.
    let rt = runtime();
    let reg = rt.block_on(Registry::start()).expect("registry");
    let out = k.run(&["run", &reg.reference("nobody/here", "latest"), "--", "true"]);
    assert_one_line_error(&out, "nobody/here");
    assert_nothing_left(&k);
}

#[test]
fn unreachable_registry() {
    let k = Kiln::with_own_cache();
    // Port 9 on loopback: nothing listens.
    let out = k.run(&["run", "127.0.0.1:9/some/image:1", "--", "true"]);
    assert_one_line_error(&out, "127.0.0.1:9");
    assert_nothing_left(&k);
}

fn hostile(kind: Hostile, needle: &str) {
    let k = Kiln::with_own_cache();
    let dir = tempfile::tempdir().expect("tmp");
    let sentinel = tempfile::tempdir().expect("sentinel");
    let layout =
        images::hostile(kind, &dir.path().join("layout"), sentinel.path()).expect("hostile image");
    let out = k.run(&["run", &layout.image_ref(), "--", "true"]);
    assert_one_line_error(&out, needle);
    assert_eq!(code(&out), 125);
    let escaped: Vec<_> = std::fs::read_dir(sentinel.path())
        .expect("sentinel")
        .collect();
    assert!(
        escaped.is_empty(),
        "the image wrote outside its rootfs: {escaped:?}"
    );
    assert!(!Path::new("/kiln-escape").exists());
    assert_nothing_left(&k);
}

#[test]
fn wrong_layer_digest() {
    hostile(Hostile::WrongLayerDigest, "does not match its digest");
}

#[test]
fn wrong_layer_size() {
    hostile(Hostile::WrongLayerSize, "the manifest says");
}

#[test]
fn truncated_layer() {
    hostile(Hostile::TruncatedLayer, "truncated or corrupt");
}

#[test]
fn malformed_manifest() {
    hostile(Hostile::MalformedManifest, "malformed");
}

#[test]
fn path_traversal_layer() {
    hostile(Hostile::PathTraversal, "escapes the image root");
}

#[test]
fn absolute_path_layer() {
    hostile(Hostile::AbsolutePath, "absolute path");
}

#[test]
fn symlink_escape_layers() {
    hostile(Hostile::SymlinkEscapeRelative, "symlink");
}

#[test]
fn absolute_symlinks_resolve_inside_the_image() {
    // `root -> /` then `root/<sentinel>/pwned`: an absolute symlink means the
    // image's own root, so the file lands inside the image, never on the host.
    let k = Kiln::with_own_cache();
    let dir = tempfile::tempdir().expect("tmp");
    let sentinel = tempfile::tempdir().expect("sentinel");
    let layout = images::hostile(
        Hostile::SymlinkEscapeAbsolute,
        &dir.path().join("layout"),
        sentinel.path(),
    )
    .expect("image");
    let out = k.run(&["images", "pull", &layout.image_ref()]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let escaped: Vec<_> = std::fs::read_dir(sentinel.path())
        .expect("sentinel")
        .collect();
    assert!(
        escaped.is_empty(),
        "the image wrote outside its rootfs: {escaped:?}"
    );
}

#[test]
fn hardlink_escape_layers() {
    hostile(Hostile::HardlinkEscape, "hardlink");
    hostile(Hostile::HardlinkViaSymlink, "hardlink");
}

#[test]
fn huge_declared_sizes() {
    hostile(Hostile::HugeDeclaredSize, "byte limit");
    hostile(Hostile::HugeEntry, "bytes");
}

#[test]
fn registry_serving_a_corrupted_blob() {
    let rt = runtime();
    let reg = rt.block_on(Registry::start()).expect("registry");
    let dir = tempfile::tempdir().expect("tmp");
    let layout = images::unique_small(&dir.path().join("layout"), "corrupt-me").expect("image");
    rt.block_on(reg.push_layout(&layout, "corrupt", "v1"))
        .expect("push");
    // Flip the layer's bytes behind the registry's back.
    let (_, manifest) = layout.manifest().expect("manifest");
    let m: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
    let layer = m["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string();
    let mut bytes = std::fs::read(layout.blob_path(&layer)).expect("blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    reg.corrupt_blob(&layer, &bytes).expect("corrupt");
    let k = Kiln::with_own_cache();
    let out = k.run(&["run", &reg.reference("corrupt", "v1"), "--", "true"]);
    assert_one_line_error(&out, "digest");
    assert_nothing_left(&k);
}

#[test]
fn guest_sending_garbage_on_the_channel() {
    // An initramfs whose /init floods the agent port with random bytes.
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("root");
    for d in ["bin", "dev", "sys", "proc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox");
    let init = r#"#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t sysfs sys /sys
for p in /sys/class/virtio-ports/*; do
  if [ "$(/bin/busybox cat $p/name)" = kiln.agent ]; then port=/dev/${p##*/}; fi
done
while true; do /bin/busybox cat /dev/urandom > $port; done
"#;
    std::fs::write(root.join("init"), init).expect("init");
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let img = dir.path().join("garbage.img");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            img.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success());

    let k = Kiln::new();
    let out = k
        .cmd()
        .env("KILN_INITRAMFS", &img)
        .args(["run", &busybox(), "--", "true"])
        .output()
        .expect("kiln runs");
    assert_one_line_error(&out, "without a valid handshake");
    assert_eq!(code(&out), 125, "stderr: {}", stderr(&out));
    k.assert_clean();
}
