//! Compiles the node protocol (`proto/kiln/node/v1/node.proto`) into Rust
//! with tonic when the `grpc` feature is on; does nothing otherwise, so
//! `kiln-init` (which uses kiln-api without it) needs no `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "grpc")]
    {
        if let Err(e) = tonic_prost_build::configure()
            .compile_protos(&["proto/kiln/node/v1/node.proto"], &["proto"])
        {
            // `protoc` comes from Debian's protobuf-compiler
            // (scripts/setup-host.sh installs it).
            panic!("cannot compile the node protocol (is protoc installed?): {e}");
        }
    }
}
