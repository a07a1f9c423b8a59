//! `PATH` lookup of argv[0], with Docker's error messages.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_api::proto::ErrorKind;

/// `PATH` when the request's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the program to execute for `argv0` given the process environment
/// (`KEY=VALUE` entries). Relative names with a `/` are resolved against `cwd`.
pub fn find_program(
    argv0: &str,
    env: &[String],
    cwd: &Path,
) -> Result<PathBuf, (ErrorKind, String)> {
    if argv0.is_empty() {
        return Err((ErrorKind::Invalid, "exec: empty command".into()));
    }
    if argv0.contains('/') {
        let p = cwd.join(argv0);
        return match std::fs::metadata(&p) {
            Err(_) => Err((
                ErrorKind::NotFound,
                format!("exec: \"{argv0}\": stat {argv0}: no such file or directory"),
            )),
            Ok(m) if m.is_dir() => Err((
                ErrorKind::NotExecutable,
                format!("exec: \"{argv0}\": is a directory"),
            )),
            Ok(_) if !is_executable_file(&p) => Err((
                ErrorKind::NotExecutable,
                format!("exec: \"{argv0}\": permission denied"),
            )),
            Ok(_) => Ok(p),
        };
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        // An empty entry means the current directory.
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let cand = dir.join(argv0);
        if is_executable_file(&cand) {
            return Ok(cand);
        }
    }
    Err((
        ErrorKind::NotFound,
        format!("exec: \"{argv0}\": executable file not found in $PATH"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn lookup() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("tool"), "x").unwrap(); // not executable
        fs::write(b.join("tool"), "x").unwrap();
        fs::set_permissions(b.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec![format!("PATH={}:{}", a.display(), b.display())];
        assert_eq!(
            find_program("tool", &env, t.path()).unwrap(),
            b.join("tool")
        );
        let (k, msg) = find_program("nosuch", &env, t.path()).unwrap_err();
        assert_eq!(k, ErrorKind::NotFound);
        assert_eq!(msg, "exec: \"nosuch\": executable file not found in $PATH");
        // Explicit paths.
        assert_eq!(
            find_program("./b/tool", &[], t.path()).unwrap(),
            t.path().join("./b/tool")
        );
        assert_eq!(
            find_program("./a/tool", &[], t.path()).unwrap_err().0,
            ErrorKind::NotExecutable
        );
        assert_eq!(
            find_program("./a", &[], t.path()).unwrap_err().0,
            ErrorKind::NotExecutable
        );
        assert_eq!(
            find_program("/no/such", &[], t.path()).unwrap_err().0,
            ErrorKind::NotFound
        );
        assert_eq!(
            find_program("", &[], t.path()).unwrap_err().0,
            ErrorKind::Invalid
        );
    }

    #[test]
    fn default_path_used_without_path_var() {
        // `sh` exists in the default PATH of any test host.
        assert!(find_program("sh", &["HOME=/".into()], Path::new("/")).is_ok());
    }
}
