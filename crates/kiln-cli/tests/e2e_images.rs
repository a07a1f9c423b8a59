//! Images end to end: every kind of image source, a real local registry,
//! layered images, and `kiln images`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Kiln, assert_one_line_error, busybox, code, stderr, stdout};
use kiln_testkit::images::{self, LayoutWriter, OciLayout};
use kiln_testkit::registry::Registry;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The digest the registry serves for a reference, asked with skopeo (not
/// with Kiln, whose answer is what the test checks).
fn registry_digest(reference: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo runs");
    assert!(
        out.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn registry_by_tag_and_by_digest() {
    let rt = runtime();
    let reg = rt.block_on(Registry::start()).expect("registry starts");
    let bb = images::busybox().expect("busybox image");
    rt.block_on(reg.push_layout(&bb, "tools/busybox", "1.0"))
        .expect("push");
    let by_tag = reg.reference("tools/busybox", "1.0");
    let digest = registry_digest(&by_tag);
    assert!(digest.starts_with("sha256:"), "{digest}");

    let k = Kiln::with_own_cache();
    let out = k.run(&["run", &by_tag, "--", "echo", "pulled by tag"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "pulled by tag\n");

    let by_digest = format!("{}/tools/busybox@{digest}", reg.host());
    let out = k.run(&["run", &by_digest, "--", "echo", "pulled by digest"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "pulled by digest\n");

    // `kiln images pull` prints the manifest digest the registry serves.
    let out = k.run(&["images", "pull", &by_tag]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), digest);
    // Not a terminal: no progress bar noise.
    assert_eq!(stderr(&out), "");

    // A Docker v2 (schema 2) manifest with gzip layers works too.
    rt.block_on(reg.push_layout_docker(&bb, "tools/busybox-docker", "1.0"))
        .expect("push docker");
    let out = k.run(&[
        "run",
        &reg.reference("tools/busybox-docker", "1.0"),
        "--",
        "echo",
        "docker media types",
    ]);
    assert_eq!(
        stdout(&out),
        "docker media types\n",
        "stderr: {}",
        stderr(&out)
    );
    k.assert_clean();
}

#[test]
fn oci_layout_and_docker_archive() {
    let k = Kiln::with_own_cache();
    let bb = images::busybox().expect("busybox image");
    let out = k.run(&["run", &bb.image_ref(), "--", "echo", "from a layout"]);
    assert_eq!(stdout(&out), "from a layout\n", "stderr: {}", stderr(&out));
    // Without a tag: the layout's only image.
    let out = k.run(&[
        "run",
        &format!("oci:{}", bb.dir.display()),
        "--",
        "echo",
        "untagged",
    ]);
    assert_eq!(stdout(&out), "untagged\n", "stderr: {}", stderr(&out));

    let dir = tempfile::tempdir().expect("tmp");
    let archive = dir.path().join("busybox.tar");
    bb.to_docker_archive(&archive, "busybox:saved")
        .expect("docker-archive");
    let out = k.run(&[
        "run",
        &format!("docker-archive:{}", archive.display()),
        "--",
        "echo",
        "from docker save",
    ]);
    assert_eq!(
        stdout(&out),
        "from docker save\n",
        "stderr: {}",
        stderr(&out)
    );
    k.assert_clean();
}

#[test]
fn layers_with_whiteouts_give_the_right_tree() {
    let k = Kiln::with_own_cache();
    // busybox underneath (for the tools), then the three layers of the
    // testkit's multi-layer image: gzip, zstd and plain, with whiteouts, an
    // opaque directory, hardlinks, a symlink, setuid and ownership.
    let dir = tempfile::tempdir().expect("tmp");
    let mut w = LayoutWriter::new(&dir.path().join("layout")).expect("layout");
    w.copy_layers(&images::busybox().expect("busybox"))
        .expect("busybox layers");
    w.copy_layers(&images::multilayer().expect("multilayer"))
        .expect("multilayer layers");
    let layout = w
        .finish(
            serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
            "v1",
        )
        .expect("finish");
    let script = r#"
        for p in /etc/keep.conf /etc/gone.conf /opq/old1 /opq/sub /opq/new /emptied/x /replaced /late; do
            if [ -e $p ]; then echo "$p exists"; else echo "$p absent"; fi
        done
        echo "keep=$(cat /etc/keep.conf) replaced=$(cat /replaced) late=$(cat /late) new=$(cat /opq/new)"
        echo "opq: $(ls -A /opq | tr '\n' ' ')"
        echo "emptied: $(ls -A /emptied | wc -l)"
        echo "link -> $(readlink /data/link): $(cat /data/link)"
        [ "$(stat -c %i /data/hard)" = "$(stat -c %i /data/base.txt)" ] && echo "hardlink shared"
        [ "$(stat -c %i /bin/tool)" = "$(stat -c %i /bin/tool-link)" ] && echo "tool hardlink shared"
        stat -c '%n %a %u:%g' /bin/tool /data/base.txt
        echo "busybox still here: $(ls /bin/busybox)"
    "#;
    let out = k.run(&["run", &layout.image_ref(), "--", "sh", "-c", script]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let expected = "\
/etc/keep.conf exists
/etc/gone.conf absent
/opq/old1 absent
/opq/sub absent
/opq/new exists
/emptied/x absent
/replaced exists
/late exists
keep=keep replaced=v2 late=late new=new
opq: new 
emptied: 0
link -> base.txt: base
hardlink shared
tool hardlink shared
/bin/tool 4755 0:0
/data/base.txt 644 1000:1000
busybox still here: /bin/busybox
";
    assert_eq!(stdout(&out), expected);
    k.assert_clean();
}

#[test]
fn python3_in_a_debian_image() {
    let k = Kiln::new();
    let py = images::python().expect("the Debian python3 image builds (debootstrap)");
    let out = k.run(&[
        "run",
        &py.image_ref(),
        "--",
        "python3",
        "-c",
        "import sys, hashlib; print(sys.version_info[0], hashlib.sha256(b'kiln').hexdigest()[:12])",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("3 {}\n", sha12(b"kiln")));
    k.assert_clean();
}

fn sha12(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))[..12].to_string()
}

#[test]
fn images_ls_rm_prune() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let out = k.run(&["images", "pull", &bb]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let digest = stdout(&out).trim().to_string();
    let out = k.run(&["images", "ls"]);
    assert!(
        stdout(&out).contains(&digest[7..19]),
        "ls: {}",
        stdout(&out)
    );
    let out = k.run(&["images", "ls", "-q"]);
    assert_eq!(stdout(&out).trim(), digest);
    let out = k.run(&["images", "rm", &digest]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let out = k.run(&["images", "ls", "-q"]);
    assert_eq!(stdout(&out).trim(), "");
    let out = k.run(&[
        "images",
        "rm",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ]);
    assert_ne!(code(&out), 0);
    let out = k.run(&["images", "prune"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        k.cached_image_files().is_empty(),
        "{:?}",
        k.cached_image_files()
    );
}

#[test]
fn private_registry_with_credentials_from_docker_config() {
    let rt = runtime();
    let reg = rt
        .block_on(Registry::start_with_auth("kiln", "s3cret"))
        .expect("registry starts");
    let bb = images::busybox().expect("busybox image");
    rt.block_on(reg.push_layout_as(&bb, "private/busybox", "1", Some("kiln:s3cret")))
        .expect("push");
    let reference = reg.reference("private/busybox", "1");
    let k = Kiln::with_own_cache();
    let dir = tempfile::tempdir().expect("tmp");
    // No credentials: refused, clearly.
    std::fs::create_dir_all(dir.path().join("anon")).expect("mkdir");
    std::fs::write(dir.path().join("anon/config.json"), "{}").expect("write");
    let out = k
        .cmd()
        .env("DOCKER_CONFIG", dir.path().join("anon"))
        .args(["run", &reference, "--", "true"])
        .output()
        .expect("kiln runs");
    common::assert_one_line_error(&out, "refused access");
    // Credentials in the Docker config (base64 of kiln:s3cret).
    std::fs::create_dir_all(dir.path().join("creds")).expect("mkdir");
    let config = serde_json::json!({"auths": {reg.host(): {"auth": "a2lsbjpzM2NyZXQ="}}});
    std::fs::write(dir.path().join("creds/config.json"), config.to_string()).expect("write");
    let out = k
        .cmd()
        .env("DOCKER_CONFIG", dir.path().join("creds"))
        .args(["run", &reference, "--", "echo", "authenticated"])
        .output()
        .expect("kiln runs");
    assert_eq!(stdout(&out), "authenticated\n", "stderr: {}", stderr(&out));
    k.assert_clean();
}

/// `kiln ARGS` with the guest kernel and initramfs pinned to what they are
/// now: a snapshot is refused under any other, and the shared cache's
/// `current` links move when someone rebuilds them.
fn pinned(k: &Kiln, args: &[&str]) -> Output {
    let shared = common::shared_cache();
    let canon = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    let out = k
        .cmd()
        .env("KILN_KERNEL", canon(shared.join("kernel/current/bzImage")))
        .env(
            "KILN_INITRAMFS",
            canon(shared.join("initramfs/current/initramfs.img")),
        )
        .args(args)
        .output()
        .expect("kiln runs");
    tracing::info!(
        ?args,
        code = ?out.status.code(),
        stderr = %String::from_utf8_lossy(&out.stderr),
        "kiln finished"
    );
    out
}

/// `kiln ARGS` must succeed; its stdout.
fn ok(k: &Kiln, args: &[&str]) -> String {
    let out = pinned(k, args);
    assert_eq!(code(&out), 0, "kiln {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// `kiln run -d IMAGE -- ARGV`: the new sandbox's ID.
fn detach(k: &Kiln, image: &str, argv: &[&str]) -> String {
    let mut args = vec!["run", "-d", image, "--"];
    args.extend_from_slice(argv);
    let id = ok(k, &args).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{id:?}"
    );
    id
}

fn image_digests(k: &Kiln) -> Vec<String> {
    ok(k, &["images", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// `kiln images rm NAME` is refused: exit code 125 and one line on stderr
/// that names every user in `users`.
fn assert_rm_refused(k: &Kiln, name: &str, users: &[&str]) -> String {
    let out = pinned(k, &["images", "rm", name]);
    assert_one_line_error(&out, "in use by");
    assert_eq!(code(&out), 125, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    for u in users {
        assert!(err.contains(u), "{u:?} not named in: {err}");
    }
    assert_eq!(stdout(&out), "", "nothing removed");
    err
}

/// The sandbox works: a command runs in it.
fn assert_exec_works(k: &Kiln, id: &str) {
    assert_eq!(
        ok(k, &["exec", id, "--", "echo", "still here"]),
        "still here\n"
    );
}

/// `images rm` refuses an image while a sandbox runs from it (and while an
/// ended sandbox still references it), by reference and by digest; the
/// running sandbox is untouched; once the sandboxes are removed the image
/// goes.
#[test]
fn images_rm_refuses_an_image_sandboxes_use() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let running = detach(&k, &bb, &["sleep", "600"]);
    let ended = detach(&k, &bb, &["true"]);
    assert_eq!(ok(&k, &["wait", &ended]).trim(), "0");
    let digests = image_digests(&k);
    assert_eq!(digests.len(), 1, "{digests:?}");
    let digest = &digests[0];
    let disk = k
        .cache_dir()
        .join("images/sha256")
        .join(&digest[7..])
        .join("disk.ext4");
    assert!(disk.is_file(), "{}", disk.display());

    let err = assert_rm_refused(
        &k,
        &bb,
        &[
            &format!("sandbox {running} (running)"),
            &format!("ended sandbox {ended}"),
            &format!("kiln rm -f {running}"),
        ],
    );
    assert!(err.contains(&digest[..19]), "{err}");
    assert_rm_refused(&k, digest, &[&running]);
    assert!(disk.is_file());
    assert_eq!(image_digests(&k), digests);
    assert_exec_works(&k, &running);
    // -f never removes the disk a VM runs from.
    let out = pinned(&k, &["images", "rm", "-f", &bb]);
    assert_eq!(code(&out), 125, "stderr: {}", stderr(&out));
    assert!(disk.is_file());
    assert_exec_works(&k, &running);
    // prune leaves named images alone, and this one is in use anyway.
    ok(&k, &["images", "prune"]);
    assert!(disk.is_file());

    // The running sandbox removed: the ended one still holds it, until it
    // is removed too (it never boots again; -f would remove past it).
    ok(&k, &["rm", "-f", &running]);
    let err = assert_rm_refused(&k, &bb, &[&format!("ended sandbox {ended}")]);
    assert!(!err.contains(&running), "{err}");
    assert!(err.contains("-f"), "{err}");
    // Only an ended sandbox uses it (it never boots again): -f removes it,
    // and the ended sandbox can still be removed afterwards.
    let out = ok(&k, &["images", "rm", "-f", &bb]);
    assert!(out.contains(&format!("removed {digest}")), "{out}");
    assert!(image_digests(&k).is_empty());
    assert!(!disk.exists());
    ok(&k, &["rm", &ended]);
    k.assert_clean();
}

/// A snapshot keeps its image: `images rm` is refused while it exists, the
/// snapshot can still be restored, and once it is removed the image goes.
#[test]
fn images_rm_refuses_an_image_a_snapshot_needs() {
    let k = Kiln::with_own_cache();
    let bb = busybox();
    let id = detach(&k, &bb, &["sleep", "600"]);
    let name = "img-snap";
    assert_eq!(ok(&k, &["snapshot", &id, "--name", name]).trim(), name);
    ok(&k, &["rm", "-f", &id]);
    let digests = image_digests(&k);
    assert_eq!(digests.len(), 1, "{digests:?}");

    assert_rm_refused(&k, &bb, &[&format!("snapshot {name}")]);
    assert_rm_refused(&k, &digests[0], &[&format!("snapshot {name}")]);
    assert_eq!(image_digests(&k), digests);
    // Still restorable; its sandbox runs from the image too.
    let restored = ok(&k, &["restore", "-d", name]).trim().to_string();
    assert_exec_works(&k, &restored);
    assert_rm_refused(
        &k,
        &bb,
        &[
            &format!("sandbox {restored} (running)"),
            &format!("snapshot {name}"),
        ],
    );
    ok(&k, &["rm", "-f", &restored]);
    assert_rm_refused(&k, &bb, &[&format!("snapshot {name}")]);

    ok(&k, &["snapshot", "rm", name]);
    let out = ok(&k, &["images", "rm", &bb]);
    assert!(out.contains(&format!("removed {}", digests[0])), "{out}");
    assert!(image_digests(&k).is_empty());
    k.assert_clean();
}

/// A busybox layout of our own in `dir`, tagged `v1`; `mark` makes the
/// config, and so the digest, differ.
fn own_busybox(dir: &Path, mark: &str) -> OciLayout {
    let mut w = LayoutWriter::new(dir).expect("layout");
    w.copy_layers(&images::busybox().expect("busybox"))
        .expect("busybox layers");
    w.finish(
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin:/usr/bin", format!("MARK={mark}")]}),
        "v1",
    )
    .expect("finish")
}

/// The tag a sandbox was started from moves to another image: the old one
/// is named by no reference any more, but `images prune` keeps it while
/// the sandbox runs from it, and removes it afterwards.
#[test]
fn images_prune_keeps_an_untagged_image_in_use() {
    let k = Kiln::with_own_cache();
    let dir = tempfile::tempdir().expect("tmp");
    let layout = own_busybox(&dir.path().join("layout"), "one");
    let reference = layout.image_ref();
    let id = detach(&k, &reference, &["sleep", "600"]);
    let old = image_digests(&k);
    assert_eq!(old.len(), 1, "{old:?}");
    let old = old[0].clone();

    own_busybox(&dir.path().join("layout"), "two");
    let new = ok(&k, &["images", "pull", &reference]).trim().to_string();
    assert_ne!(new, old, "the tag moved");
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    let mut listed = image_digests(&k);
    listed.sort();
    assert_eq!(listed, both);

    let out = ok(&k, &["images", "prune"]);
    assert!(
        out.contains(&format!("kept {old} (used by sandbox {id} (running))")),
        "{out}"
    );
    assert!(!out.contains("removed sha256:"), "{out}");
    let mut listed = image_digests(&k);
    listed.sort();
    assert_eq!(listed, both);
    assert_exec_works(&k, &id);
    assert_rm_refused(&k, &old, &[&format!("sandbox {id} (running)")]);

    ok(&k, &["rm", "-f", &id]);
    let out = ok(&k, &["images", "prune"]);
    assert!(out.contains(&format!("removed {old}")), "{out}");
    assert_eq!(image_digests(&k), vec![new]);
    k.assert_clean();
}
