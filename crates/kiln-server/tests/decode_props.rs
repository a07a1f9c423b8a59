//! Request decoding never panics and always answers a precise 4xx: random
//! bytes, mutated valid bodies, and the committed corpus of hostile inputs
//! (`tests/corpus/decode/`; add a file for every input that ever broke
//! it; proptest's own regressions go to `proptest-regressions/`).

use kiln_api::rest::{AddMember, CreateTenant, CreateToken};
use kiln_api::sandbox::SandboxSpec;
use kiln_server::rest::decode_json;
use proptest::prelude::*;

const CODES: [&str; 3] = ["malformed_json", "unknown_field", "invalid_body"];

fn check_all(bytes: &[u8]) {
    check::<SandboxSpec>(bytes);
    check::<CreateTenant>(bytes);
    check::<CreateToken>(bytes);
    check::<AddMember>(bytes);
}

fn check<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    if let Err(e) = decode_json::<T>(bytes) {
        assert!(
            e.status.is_client_error(),
            "{} for {:?}",
            e.status,
            String::from_utf8_lossy(bytes)
        );
        assert!(CODES.contains(&e.detail.code.as_str()), "{}", e.detail.code);
        assert!(!e.detail.message.is_empty());
    }
}

fn valid() -> impl Strategy<Value = String> {
    (
        "[a-z]{1,10}",
        0u32..100,
        0u32..5000,
        prop::collection::btree_map("[a-z]{0,5}", "[ -~]{0,8}", 0..3),
    )
        .prop_map(|(image, cpus, mem, labels)| {
            serde_json::json!({
                "image": image,
                "resources": {"cpus": cpus, "memory_mib": mem, "disk_mib": 1024},
                "labels": labels,
            })
            .to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_all(&bytes);
    }

    #[test]
    fn mutated_bodies_never_panic(body in valid(), cut in 0usize..200, pos in 0usize..200, b in any::<u8>()) {
        let mut bytes = body.into_bytes();
        check_all(&bytes);
        if !bytes.is_empty() {
            let p = pos % bytes.len();
            bytes[p] = b;
            check_all(&bytes);
            bytes.truncate(cut % bytes.len());
            check_all(&bytes);
        }
    }

    #[test]
    fn specs_that_decode_validate_without_panicking(body in valid()) {
        if let Ok(spec) = decode_json::<SandboxSpec>(body.as_bytes()) {
            let _ = spec.validate();
        }
    }
}

#[test]
fn committed_corpus_is_refused_precisely() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/decode");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("corpus dir") {
        let path = e.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        check_all(&bytes);
        if let Ok(spec) = decode_json::<SandboxSpec>(&bytes) {
            let _ = spec.validate();
        }
        n += 1;
    }
    assert!(n >= 10, "corpus has {n} files");
}
