//! Compiles the eBPF programs in `bpf/` with Debian's clang (`-target bpf`).
//! `scripts/setup-host.sh` installs clang, llvm and libbpf-dev.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("KILN_CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=KILN_CLANG");
    // uapi headers such as <asm/types.h> live in the multiarch include dir.
    let host = env::var("HOST").expect("cargo sets HOST");
    let arch = host.split('-').next().unwrap_or("x86_64");
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    {
        let name = "policy";
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg("-idirafter")
            .arg(&multiarch)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{clang} failed on {src} ({s})"),
            Err(e) => panic!(
                "cannot run {clang} ({e}): install clang, llvm and libbpf-dev (scripts/setup-host.sh)"
            ),
        }
    }
}
