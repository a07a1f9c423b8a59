//! Tests of the layer unpacker (hostile layers).
use super::*;

#[test]
fn names_are_cleaned_or_refused() {
    let c = |s: &str| match split_name(s.as_bytes()) {
        Name::Components(v) => v
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/"),
        Name::Absolute => "ABS".into(),
        Name::Escape => "ESC".into(),
    };
    assert_eq!(c("./a/b/"), "a/b");
    assert_eq!(c("a/./b//c"), "a/b/c");
    assert_eq!(c("a/../b"), "b");
    assert_eq!(c("./"), "");
    assert_eq!(c("../x"), "ESC");
    assert_eq!(c("a/../../x"), "ESC");
    assert_eq!(c("/etc/passwd"), "ABS");
}

struct T {
    b: tar::Builder<Vec<u8>>,
}

impl T {
    fn new() -> T {
        T {
            b: tar::Builder::new(Vec::new()),
        }
    }
    fn header(kind: tar::EntryType, name: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o755);
        h.set_mtime(1_000_000);
        h.set_uid(0);
        h.set_gid(0);
        // Write the name raw: the tar crate's setters refuse hostile names.
        let gnu = h.as_gnu_mut().expect("gnu header");
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        h
    }
    fn dir(mut self, name: &str) -> T {
        let h = Self::header(tar::EntryType::Directory, name, 0);
        self.b.append(&h, io::empty()).expect("append");
        self
    }
    fn file(mut self, name: &str, data: &str) -> T {
        let h = Self::header(tar::EntryType::Regular, name, data.len() as u64);
        self.b.append(&h, data.as_bytes()).expect("append");
        self
    }
    fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> T {
        let mut h = Self::header(kind, name, 0);
        let gnu = h.as_gnu_mut().expect("gnu header");
        gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.b.append(&h, io::empty()).expect("append");
        self
    }
    fn special(mut self, kind: tar::EntryType, name: &str) -> T {
        let h = Self::header(kind, name, 0);
        self.b.append(&h, io::empty()).expect("append");
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.b.into_inner().expect("finish")
    }
}

fn apply(root: &Path, t: T) -> Result<LayerStats, UnpackLayerError> {
    unpack_layer(
        root,
        &t.bytes()[..],
        "sha256:test",
        None,
        &UnpackOptions::default(),
    )
}

fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir).expect("read_dir").flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let m = fs::symlink_metadata(&p).expect("lstat");
            if m.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &p, out);
            } else if m.file_type().is_symlink() {
                out.push(format!(
                    "{rel} -> {}",
                    fs::read_link(&p).expect("link").display()
                ));
            } else {
                out.push(format!("{rel} = {}", fs::read_to_string(&p).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn whiteouts_and_opaque_dirs_touch_lower_layers_only() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    apply(
        &root,
        T::new()
            .dir("a")
            .file("a/keep", "k")
            .file("a/gone", "g")
            .dir("o")
            .file("o/old", "o")
            .dir("o/sub")
            .file("o/sub/x", "x"),
    )
    .expect("layer 1");
    let stats = apply(
        &root,
        T::new()
            .file("a/.wh.gone", "")
            .file("o/new", "n")
            .file("o/.wh..wh..opq", "")
            .file("a/.wh.missing", ""),
    )
    .expect("layer 2");
    assert_eq!(stats.whiteouts, 3);
    assert_eq!(tree(&root), vec!["a/", "a/keep = k", "o/", "o/new = n"],);
}

#[test]
fn replacing_a_symlink_never_writes_through_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    let outside = d.path().join("outside");
    fs::create_dir(&root).expect("mkdir");
    fs::write(&outside, "untouched").expect("write");
    apply(
        &root,
        T::new().link(
            tar::EntryType::Symlink,
            "f",
            outside.to_str().expect("utf8"),
        ),
    )
    .expect("layer 1");
    apply(&root, T::new().file("f", "inside")).expect("layer 2");
    assert_eq!(fs::read_to_string(&outside).expect("read"), "untouched");
    assert_eq!(tree(&root), vec!["f = inside"]);
}

#[test]
fn hostile_names_are_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    let e = apply(&root, T::new().file("../../escape", "x")).expect_err("refused");
    assert!(matches!(e, UnpackLayerError::Escape { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("\"../../escape\" escapes the image root")
    );
    let e = apply(&root, T::new().file("/abs", "x")).expect_err("refused");
    assert!(matches!(e, UnpackLayerError::AbsolutePath { .. }), "{e}");
    let e = apply(
        &root,
        T::new()
            .link(tar::EntryType::Symlink, "up", "../..")
            .file("up/x", "x"),
    )
    .expect_err("refused");
    assert!(matches!(e, UnpackLayerError::SymlinkEscape { .. }), "{e}");
    let e = apply(
        &root,
        T::new().link(tar::EntryType::Link, "h", "../../etc/passwd"),
    )
    .expect_err("refused");
    assert!(matches!(e, UnpackLayerError::BadHardlink { .. }), "{e}");
    assert!(!d.path().join("x").exists());
    assert!(!d.path().join("escape").exists());
}

#[test]
fn absolute_symlinks_resolve_inside_the_root() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    let sentinel = d.path().join("sentinel");
    fs::create_dir(&sentinel).expect("mkdir");
    let abs = format!("{}", sentinel.display());
    apply(
        &root,
        T::new()
            .link(tar::EntryType::Symlink, "s", &abs)
            .link(tar::EntryType::Symlink, "r", "/")
            .file("s/x", "x")
            .file("r/y", "y"),
    )
    .expect("applied inside the root");
    assert_eq!(fs::read_dir(&sentinel).expect("read").count(), 0);
    assert!(root.join(abs.trim_start_matches('/')).join("x").is_file());
    assert!(root.join("y").is_file());
}

#[test]
fn hardlinks_and_size_caps() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    apply(
        &root,
        T::new()
            .file("a", "data")
            .link(tar::EntryType::Link, "b", "./a"),
    )
    .expect("hardlink");
    assert_eq!(fs::read_to_string(root.join("b")).expect("read"), "data");
    let e = unpack_layer(
        &root,
        &T::new().file("big", "0123456789").bytes()[..],
        "sha256:test",
        None,
        &UnpackOptions {
            max_entry_size: 5,
            ..Default::default()
        },
    )
    .expect_err("too big");
    assert!(matches!(e, UnpackLayerError::EntryTooLarge { .. }), "{e}");
}

#[test]
fn devices_skipped_fifos_created_setuid_kept() {
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    let mut h = T::header(tar::EntryType::Regular, "suid", 1);
    h.set_mode(0o4755);
    h.set_uid(1000);
    h.set_cksum();
    let mut t = T::new()
        .special(tar::EntryType::Char, "null")
        .special(tar::EntryType::Block, "sda")
        .special(tar::EntryType::Fifo, "pipe");
    t.b.append(&h, &b"x"[..]).expect("append");
    let stats = apply(&root, t).expect("applied");
    assert_eq!(stats.skipped, 2);
    assert!(!root.join("null").exists() && !root.join("sda").exists());
    let m = fs::symlink_metadata(root.join("pipe")).expect("fifo");
    assert!(m.file_type().is_fifo());
    let m = fs::metadata(root.join("suid")).expect("suid");
    assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 1000);
}

#[test]
fn hardlink_to_an_escaping_symlink_links_the_symlink_itself() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    apply(
        &root,
        T::new()
            .link(tar::EntryType::Symlink, "s", "/etc/passwd")
            .link(tar::EntryType::Link, "h", "s"),
    )
    .expect("applied");
    let m = fs::symlink_metadata(root.join("h")).expect("lstat");
    assert!(
        m.file_type().is_symlink(),
        "h must be the symlink, not the host file"
    );
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&m), 2);
}
