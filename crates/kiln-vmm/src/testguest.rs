//! The bare-metal test guest (`guest/baremetal/`): a few hundred bytes of
//! x86 that print `kiln-counter N` lines to COM1, bootable by QEMU (PVH note,
//! through qboot) and Firecracker (PVH, or its 64-bit ELF entry). Built from
//! source with `nasm` and `ld`; no binary is checked in.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = include_str!("../../../guest/baremetal/counter.asm");
const LINKER_SCRIPT: &str = include_str!("../../../guest/baremetal/link.ld");
/// Prefix of every line the guest prints.
pub const LINE_PREFIX: &str = "kiln-counter ";

#[derive(Debug, thiserror::Error)]
pub enum BuildGuestError {
    #[error("cannot write into {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {tool} (is it installed?)")]
    Tool {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: &'static str, stderr: String },
}

/// Assemble and link the guest into `out_dir/kiln-counter.elf`.
pub fn build(out_dir: &Path) -> Result<PathBuf, BuildGuestError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BuildGuestError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let asm = out_dir.join("counter.asm");
    let ld_script = out_dir.join("link.ld");
    let object = out_dir.join("counter.o");
    let elf = out_dir.join("kiln-counter.elf");
    std::fs::write(&asm, SOURCE).map_err(io(&asm))?;
    std::fs::write(&ld_script, LINKER_SCRIPT).map_err(io(&ld_script))?;
    run(
        "nasm",
        Command::new("nasm")
            .args(["-f", "elf64", "-o"])
            .arg(&object)
            .arg(&asm),
    )?;
    run(
        "ld",
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-z",
                "noexecstack",
                "--no-warn-rwx-segments",
                "-T",
            ])
            .arg(&ld_script)
            .arg("-o")
            .arg(&elf)
            .arg(&object),
    )?;
    Ok(elf)
}

fn run(tool: &'static str, command: &mut Command) -> Result<(), BuildGuestError> {
    let out = command
        .output()
        .map_err(|source| BuildGuestError::Tool { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BuildGuestError::Failed {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Counter values in a console log, in order (partial last line ignored).
pub fn counters(console: &str) -> Vec<u64> {
    let complete = console.rfind('\n').map_or("", |end| &console[..end]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix(LINE_PREFIX))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters() {
        assert_eq!(
            counters("kiln-counter 0\nkiln-counter 1\nnoise\nkiln-counter 2\nkiln-cou"),
            vec![0, 1, 2]
        );
        assert_eq!(counters("kiln-counter 7\nkiln-counter 1"), vec![7]);
    }
}
