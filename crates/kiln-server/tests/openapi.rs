//! The OpenAPI document generated from the code validates with a real
//! validator (PyPI `openapi-spec-validator`, in a cached virtualenv outside
//! the repository made by `scripts/lib.sh`'s `kiln_openapi_venv`), and
//! covers every route.

use std::process::Command;

#[test]
fn openapi_document_validates() {
    let doc = kiln_server::rest::openapi_json();
    let v: serde_json::Value = serde_json::from_str(&doc).expect("JSON");
    assert!(v["openapi"].as_str().is_some_and(|s| s.starts_with("3.1")));
    for p in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/wait",
        "/v1/nodes",
        "/v1/nodes/{name}/drain",
        "/v1/cluster",
        "/v1/cluster/members",
        "/v1/tenants",
        "/v1/tokens",
        "/v1/tokens/{id}",
        "/v1/templates",
        "/v1/templates/{name}/pool",
        "/v1/images/pull",
        "/v1/images/{reference}",
    ] {
        assert!(v["paths"][p].is_object(), "{p} missing");
    }
    for s in [
        "SandboxSpec",
        "Sandbox",
        "ErrorBody",
        "SandboxState",
        "Node",
    ] {
        assert!(
            v["components"]["schemas"][s].is_object(),
            "schema {s} missing"
        );
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("bash")
        .arg("-c")
        .arg("source scripts/lib.sh && kiln_openapi_venv")
        .current_dir(root)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &doc).expect("write");
    let out = Command::new(&python)
        .arg("-c")
        .arg(
            "import json, sys\n\
             from openapi_spec_validator import validate, OpenAPIV31SpecValidator\n\
             validate(json.load(open(sys.argv[1])), cls=OpenAPIV31SpecValidator)\n\
             print('valid')",
        )
        .arg(&file)
        .output()
        .expect("python");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("valid"),
        "the OpenAPI document does not validate:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
