//! kiln-store sits under the server and beside nothing that touches VMs:
//! it must not depend on the node, VMM or image crates (the control plane
//! runs on hosts without KVM), nor on the server or CLI above it.

#[test]
fn depends_on_no_host_or_upper_crate() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("read Cargo.toml");
    let table: Vec<&str> = manifest.lines().map(str::trim).collect();
    for forbidden in [
        "kiln-node",
        "kiln-vmm",
        "kiln-image",
        "kiln-server",
        "kiln-cli",
        "kiln-guest",
    ] {
        assert!(
            !table.iter().any(|l| l.starts_with(forbidden)),
            "kiln-store must not depend on {forbidden}"
        );
    }
    assert!(table.iter().any(|l| l.starts_with("kiln-api")));
}
