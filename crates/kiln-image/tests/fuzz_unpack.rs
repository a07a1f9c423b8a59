//! Property-based fuzzing of the layer unpacker (`kiln_image::unpack`):
//! image layers are hostile input. Seeds in `tests/corpus/unpack/` (files,
//! directories, links, whiteouts, long names, escapes) are mutated by
//! proptest and unpacked, one after another, into a fresh root; nothing may
//! panic and nothing may appear outside the root. Bounded: a fixed number
//! of cases (seconds). `KILN_REGENERATE_CORPUS=1` rewrites the seeds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::path::{Path, PathBuf};

use kiln_image::unpack::{UnpackOptions, unpack_layer};
use proptest::prelude::*;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/unpack")
}

fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    let gnu = h.as_gnu_mut().expect("gnu header");
    gnu.name[..name.len()].copy_from_slice(name);
    gnu.linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    b.append(&h, data).expect("append");
}

fn seeds_to_write() -> Vec<(&'static str, Vec<u8>)> {
    use tar::EntryType as E;
    let mut out = vec![];
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, b"etc/", E::Directory, b"", b"");
    raw_entry(
        &mut b,
        b"etc/passwd",
        E::Regular,
        b"",
        b"root:x:0:0::/root:/bin/sh\n",
    );
    raw_entry(&mut b, b"bin/sh", E::Regular, b"", b"#!fake");
    raw_entry(&mut b, b"bin/ash", E::Link, b"bin/sh", b"");
    raw_entry(&mut b, b"usr/lib", E::Symlink, b"../lib", b"");
    out.push(("base.tar", b.into_inner().unwrap()));
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, b"etc/.wh.passwd", E::Regular, b"", b"");
    raw_entry(&mut b, b"bin/.wh..wh..opq", E::Regular, b"", b"");
    raw_entry(&mut b, b"bin/new", E::Regular, b"", b"x");
    out.push(("whiteouts.tar", b.into_inner().unwrap()));
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, b"../escape", E::Regular, b"", b"x");
    raw_entry(&mut b, b"/abs", E::Regular, b"", b"x");
    raw_entry(&mut b, b"up", E::Symlink, b"/", b"");
    raw_entry(&mut b, b"up/kiln-escape", E::Regular, b"", b"x");
    raw_entry(&mut b, b"dot", E::Symlink, b"../../..", b"");
    raw_entry(&mut b, b"dot/x", E::Regular, b"", b"x");
    raw_entry(&mut b, b"hl", E::Link, b"../../etc/shadow", b"");
    raw_entry(&mut b, b"dev/sda", E::Block, b"", b"");
    raw_entry(&mut b, b"fifo", E::Fifo, b"", b"");
    out.push(("escapes.tar", b.into_inner().unwrap()));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    let long = format!("{}/file", "d".repeat(300));
    b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    h.set_mode(0o4755);
    b.append_data(&mut h, "setuid", &b"hi"[..]).unwrap();
    out.push(("long-names.tar", b.into_inner().unwrap()));
    out
}

fn seeds() -> &'static Vec<Vec<u8>> {
    static S: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let dir = corpus_dir();
        if std::env::var_os("KILN_REGENERATE_CORPUS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in seeds_to_write() {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("the corpus is in the repository")
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(v.len() >= 4, "corpus seeds missing in {}", dir.display());
        v.sort();
        v
    })
}

/// Everything under `p` (not following symlinks).
fn tree(p: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            tree(&e.path(), out);
        }
    }
}

fn unpack_all(layers: &[Vec<u8>]) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let opts = UnpackOptions {
        max_entry_size: 1 << 20,
        max_layer_uncompressed: 8 << 20,
        ..UnpackOptions::default()
    };
    for (i, l) in layers.iter().enumerate() {
        let _ = unpack_layer(&root, &l[..], &format!("fuzz-{i}"), None, &opts);
    }
    let mut top: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    top.sort();
    assert_eq!(
        top,
        vec!["outside", "root"],
        "the layer wrote beside its root"
    );
    let mut escaped = vec![];
    tree(&outside, &mut escaped);
    assert!(escaped.is_empty(), "written outside the root: {escaped:?}");
    assert!(!Path::new("/kiln-escape").exists());
    // No device node inside the root either.
    let mut inside = vec![];
    tree(&root, &mut inside);
    for p in inside {
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(
            !m.file_type().is_block_device() && !m.file_type().is_char_device(),
            "{p:?}"
        );
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Splice(usize, usize),
    Block(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Splice(a, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..48)
        )
            .prop_map(|(i, v)| Mutation::Block(i, v)),
    ]
}

fn apply(mut b: Vec<u8>, muts: &[Mutation], other: &[u8]) -> Vec<u8> {
    for m in muts {
        let n = b.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if !b.is_empty() {
                    let i = i % n;
                    b[i] ^= x | 1;
                }
            }
            Mutation::Cut(i) => b.truncate(i % n),
            Mutation::Splice(i, j) => {
                // At block boundaries, so headers of one seed follow another's.
                let i = (i % (b.len() / 512 + 1)) * 512;
                let j = (j % (other.len() / 512 + 1)) * 512;
                b.truncate(i.min(b.len()));
                b.extend_from_slice(&other[j.min(other.len())..]);
            }
            Mutation::Block(i, v) => {
                // Overwrite header fields (names, sizes, link names, types).
                if !b.is_empty() {
                    let i = i % n;
                    let end = (i + v.len()).min(b.len());
                    b[i..end].copy_from_slice(&v[..end - i]);
                }
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        max_shrink_iters: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_layers_stay_inside_their_root(
        picks in proptest::collection::vec(
            (any::<proptest::sample::Index>(), any::<proptest::sample::Index>(),
             proptest::collection::vec(mutation(), 0..5)), 1..4),
    ) {
        let s = seeds();
        let layers: Vec<Vec<u8>> = picks
            .iter()
            .map(|(a, b, muts)| apply(s[a.index(s.len())].clone(), muts, &s[b.index(s.len())]))
            .collect();
        unpack_all(&layers);
    }
}

#[test]
fn corpus_seeds_unpack_safely() {
    for seed in seeds() {
        unpack_all(std::slice::from_ref(seed));
    }
    unpack_all(seeds());
}
