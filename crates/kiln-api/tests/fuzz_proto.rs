//! Property-based fuzzing of the guest protocol decoder (`kiln_api::proto`),
//! the first code that touches every byte a guest sends. Inputs are the
//! seeds in `tests/corpus/proto/` (frames of every kind, garbage, cut
//! frames) mutated by proptest (flips, cuts, splices, insertions, random
//! read boundaries); the run is bounded (a fixed number of cases, a few
//! seconds). `KILN_REGENERATE_CORPUS=1` rewrites the seeds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::path::PathBuf;

use kiln_api::proto::{
    self, Channel, Configure, Decoded, Decoder, Event, ExecRequest, ExitStatus, Hello, HelloAck,
    Kind, Request, Response,
};
use proptest::prelude::*;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/proto")
}

fn seeds_to_write() -> Vec<(&'static str, Vec<u8>)> {
    let exec = Request::Exec(ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec!["PATH=/bin".into()],
        cwd: Some("/".into()),
        user: Some("1000:1000".into()),
        tty: false,
        rows: None,
        cols: None,
        stdin: true,
        main: true,
        detached: false,
    });
    let ack = HelloAck {
        version: 1,
        session: 7,
        agent: "kiln-init test".into(),
        boot_id: "b".into(),
        main: None,
    };
    let mut mixed = proto::encode_json(Kind::HelloAck, 0, &ack).unwrap();
    mixed.extend(proto::encode_json(Kind::Response, 1, &Response::Started { pid: 42 }).unwrap());
    mixed.extend(proto::encode_data(1, Channel::Stdout, b"hello\x1b[2J").unwrap());
    mixed.extend(proto::encode_credit(1, Channel::Stdin, 4096));
    mixed.extend(proto::encode_eof(1, Channel::Stdout));
    mixed.extend(
        proto::encode_json(
            Kind::Event,
            1,
            &Event::Exit {
                pid: 42,
                status: ExitStatus {
                    code: Some(0),
                    signal: None,
                },
            },
        )
        .unwrap(),
    );
    mixed.extend(proto::encode_close(1));
    let mut cut = proto::encode_data(3, Channel::Tar, &[0xAB; 300]).unwrap();
    cut.truncate(150);
    cut.extend(b"garbage KLN\x01KLN");
    cut.extend(
        proto::encode_json(
            Kind::Hello,
            0,
            &Hello {
                version: 1,
                session: 9,
            },
        )
        .unwrap(),
    );
    let configure = Request::Configure(Configure {
        sandbox_id: "abc".into(),
        hostname: "h".into(),
        entropy: "AAAA".into(),
        time_unix_ns: 1,
        network: None,
    });
    let mut big_header = proto::encode_header(Kind::Data, 5, 10).unwrap().to_vec();
    big_header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32(&big_header[..16]);
    big_header[16..20].copy_from_slice(&crc.to_le_bytes());
    vec![
        ("session.bin", mixed),
        ("cut-and-garbage.bin", cut),
        (
            "exec-request.bin",
            proto::encode_json(Kind::Request, 2, &exec).unwrap(),
        ),
        (
            "configure-request.bin",
            proto::encode_json(Kind::Request, 1, &configure).unwrap(),
        ),
        (
            "error-response.bin",
            proto::encode_json(
                Kind::Response,
                4,
                &Response::Error {
                    kind: proto::ErrorKind::Path,
                    message: "\x1b]0;pwned\x07".into(),
                },
            )
            .unwrap(),
        ),
        ("oversized-header.bin", big_header),
    ]
}

fn crc32(b: &[u8]) -> u32 {
    // CRC-32 (IEEE), bitwise: the test does not trust the code it checks.
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = corpus_dir();
    if std::env::var_os("KILN_REGENERATE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds_to_write() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("the corpus is in the repository")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(out.len() >= 6, "corpus seeds missing in {}", dir.display());
    out.sort();
    out
}

/// One mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Splice(usize, usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Splice(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
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
            Mutation::Insert(i, v) => {
                let i = i % (b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Mutation::Splice(i, j) => {
                let i = i % (b.len() + 1);
                let j = j % (other.len() + 1);
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            Mutation::Duplicate(i, j) => {
                let (i, j) = (i % n, j % n);
                let (lo, hi) = (i.min(j), i.max(j).min(b.len()));
                let copy = b[lo..hi].to_vec();
                b.extend(copy);
            }
        }
    }
    b
}

/// Feeds `bytes` in the given chunk sizes and looks at every frame the
/// way the host and the guest do. Nothing may panic; the decoder's memory
/// stays bounded; every frame obeys the limits.
fn decode_everything(bytes: &[u8], chunks: &[usize], guest: bool) {
    let mut d = if guest {
        Decoder::accepting_requests()
    } else {
        Decoder::new()
    };
    let max_request = if guest {
        proto::MAX_REQUEST
    } else {
        proto::MAX_PAYLOAD
    };
    let mut rest = bytes;
    let mut k = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(k)
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        k += 1;
        d.feed(&rest[..n]);
        rest = &rest[n..];
        while let Some(got) = d.next_frame() {
            match got {
                Decoded::Frame(f) => {
                    let max = if f.kind == Kind::Request {
                        max_request
                    } else {
                        proto::MAX_PAYLOAD
                    };
                    assert!(f.payload.len() <= max);
                    let _ = f.json::<Request>("request");
                    let _ = f.json::<Response>("response");
                    let _ = f.json::<Event>("event");
                    let _ = f.json::<Hello>("hello");
                    let _ = f.json::<HelloAck>("ack");
                    let _ = f.data();
                    let _ = f.eof();
                    let _ = f.credit();
                    if let Ok(Request::Exec(e)) = f.json::<Request>("request") {
                        let _ = e.check_limits();
                    }
                }
                Decoded::Invalid(e) => {
                    let _ = kiln_api::text::sanitize(&e.to_string());
                }
            }
        }
        assert!(d.buffered() <= proto::HEADER_LEN + max_request + n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_corpus_never_breaks_the_decoder(
        seed in any::<proptest::sample::Index>(),
        other in any::<proptest::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 0..6),
        chunks in proptest::collection::vec(1usize..700, 0..20),
        guest in any::<bool>(),
    ) {
        let seeds = seeds_cached();
        let base = seeds[seed.index(seeds.len())].clone();
        let other = &seeds[other.index(seeds.len())];
        let bytes = apply(base, &muts, other);
        decode_everything(&bytes, &chunks, guest);
    }

    #[test]
    fn frames_round_trip_through_any_chunking(
        frames in proptest::collection::vec(
            (1u32..100, 0u8..4, proptest::collection::vec(any::<u8>(), 0..2000)), 1..8),
        garbage in proptest::collection::vec(any::<u8>(), 0..40),
        chunks in proptest::collection::vec(1usize..300, 0..40),
    ) {
        let mut bytes = garbage.clone();
        for (stream, ch, data) in &frames {
            let ch = Channel::from_u8(*ch).unwrap();
            bytes.extend(proto::encode_data(*stream, ch, data).unwrap());
        }
        let mut d = Decoder::new();
        let mut got = vec![];
        let mut rest = &bytes[..];
        let mut k = 0;
        while !rest.is_empty() {
            let n = chunks.get(k).copied().unwrap_or(rest.len()).clamp(1, rest.len());
            k += 1;
            d.feed(&rest[..n]);
            rest = &rest[n..];
            while let Some(Decoded::Frame(f)) = d.next_frame() {
                got.push(f);
            }
        }
        // Garbage before the first frame may hide (at most) that frame if
        // it ends in a partial magic; everything after it comes out intact.
        let tail: Vec<_> = got.iter().rev().take(frames.len() - 1).collect();
        for (f, (stream, ch, data)) in tail.iter().rev().zip(frames.iter().skip(1)) {
            prop_assert_eq!(f.stream, *stream);
            let (c, b) = f.data().unwrap();
            prop_assert_eq!(c as u8, *ch);
            prop_assert_eq!(b, &data[..]);
        }
    }
}

fn seeds_cached() -> &'static Vec<Vec<u8>> {
    static S: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    S.get_or_init(seeds)
}

#[test]
fn corpus_seeds_decode_cleanly() {
    for s in seeds_cached() {
        decode_everything(s, &[], true);
        decode_everything(s, &[1; 64], false);
    }
}
