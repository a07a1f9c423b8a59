//! How an image's configuration and a user's flags combine into the process
//! a sandbox runs, with the semantics `docker run` users know:
//!
//! - argv = ENTRYPOINT + CMD; command-line arguments replace CMD;
//!   `--entrypoint` replaces ENTRYPOINT (and, like Docker, drops the image's
//!   CMD unless arguments are given);
//! - environment = image `Env`, then `--env-file` entries, then `-e`, later
//!   entries replacing earlier ones with the same key; `-e KEY` (no `=`)
//!   takes the value from the caller's environment and is skipped if unset;
//!   `PATH` gets the usual default if the image sets none; `HOSTNAME` is the
//!   sandbox's hostname; `TERM=xterm` with a tty unless set;
//! - working directory = `-w` or the image's `WorkingDir` (default `/`);
//! - user = `-u` or the image's `User` (name, uid, `uid:gid`, `name:group`).

/// The parts of an OCI image config that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// What the user gave on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--entrypoint`: `Some(vec![])` clears it.
    pub entrypoint: Option<Vec<String>>,
    /// Arguments after the image (`-- CMD ARGS...`); empty = the image's CMD.
    pub args: Vec<String>,
    /// `--env-file` lines then `-e` values, in order.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub hostname: String,
}

/// The process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

/// The flags and the image do not make a runnable command.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ComposeError {
    #[error("no command specified: the image has no ENTRYPOINT or CMD; give one after `--`")]
    NoCommand,
    #[error("invalid environment variable {0:?}: the name must not be empty or contain '=' or NUL")]
    BadEnv(String),
    #[error("invalid working directory {0:?}: it must be an absolute path")]
    BadWorkdir(String),
}

/// The `PATH` of a process whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Combines an image's defaults with the user's overrides.
pub fn compose(
    image: &ImageDefaults,
    ov: &Overrides,
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<Composed, ComposeError> {
    let entrypoint = ov
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    let cmd = if !ov.args.is_empty() {
        ov.args.clone()
    } else if ov.entrypoint.is_some() {
        vec![]
    } else {
        image.cmd.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ComposeError::NoCommand);
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        if let Some(e) = env.iter_mut().find(|(ek, _)| *ek == k) {
            e.1 = v;
        } else {
            env.push((k, v));
        }
    };
    for e in &image.env {
        // The image is input too; skip malformed entries rather than fail.
        if let Some((k, v)) = e.split_once('=')
            && valid_key(k)
        {
            set(k.to_string(), v.to_string());
        }
    }
    let mut user_env = Vec::new();
    for e in &ov.env {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (e.clone(), None),
        };
        if !valid_key(&k) || e.contains('\0') {
            return Err(ComposeError::BadEnv(e.clone()));
        }
        let v = match v {
            Some(v) => Some(v),
            None => host_env(&k),
        };
        if let Some(v) = v {
            user_env.push((k, v));
        }
    }
    let mut upsert = |k: String, v: String, replace: bool| {
        if let Some(e) = env.iter_mut().find(|(ek, _)| *ek == k) {
            if replace {
                e.1 = v;
            }
        } else {
            env.push((k, v));
        }
    };
    for (k, v) in user_env {
        upsert(k, v, true);
    }
    upsert("PATH".into(), DEFAULT_PATH.into(), false);
    upsert("HOSTNAME".into(), ov.hostname.clone(), true);
    if ov.tty {
        upsert("TERM".into(), "xterm".into(), false);
    }
    let cwd = match ov
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
    {
        Some(w) if !w.starts_with('/') => return Err(ComposeError::BadWorkdir(w)),
        other => other,
    };
    let user = ov
        .user
        .clone()
        .or_else(|| image.user.clone())
        .filter(|u| !u.is_empty());
    Ok(Composed {
        argv,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd,
        user,
    })
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && !k.contains('=') && !k.contains('\0')
}

/// Parses an `--env-file`: `KEY=VALUE` or `KEY` lines; blank lines and lines
/// starting with `#` are skipped. Values are taken literally (no quotes).
pub fn parse_env_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_start())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec!["/entry".into(), "-x".into()],
            cmd: vec!["default".into()],
            env: vec!["A=1".into(), "PATH=/img/bin".into(), "B=2".into()],
            working_dir: Some("/app".into()),
            user: Some("app".into()),
        }
    }

    fn ov() -> Overrides {
        Overrides {
            hostname: "h".into(),
            ..Default::default()
        }
    }

    #[test]
    fn entrypoint_plus_cmd() {
        let c = compose(&img(), &ov(), |_| None).unwrap();
        assert_eq!(c.argv, ["/entry", "-x", "default"]);
        assert_eq!(c.cwd.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(c.env, ["A=1", "PATH=/img/bin", "B=2", "HOSTNAME=h"]);
    }

    #[test]
    fn args_replace_cmd_and_entrypoint_override_drops_cmd() {
        let mut o = ov();
        o.args = vec!["a".into(), "b".into()];
        assert_eq!(
            compose(&img(), &o, |_| None).unwrap().argv,
            ["/entry", "-x", "a", "b"]
        );
        let mut o = ov();
        o.entrypoint = Some(vec!["/bin/sh".into()]);
        assert_eq!(compose(&img(), &o, |_| None).unwrap().argv, ["/bin/sh"]);
        o.entrypoint = Some(vec![]);
        o.args = vec!["echo".into(), "hi".into()];
        assert_eq!(compose(&img(), &o, |_| None).unwrap().argv, ["echo", "hi"]);
        let empty = ImageDefaults::default();
        assert_eq!(
            compose(&empty, &ov(), |_| None),
            Err(ComposeError::NoCommand)
        );
    }

    #[test]
    fn env_order_and_host_passthrough() {
        let mut o = ov();
        o.env = vec![
            "A=file".into(),
            "A=flag".into(),
            "C".into(),
            "MISSING".into(),
            "D=x=y".into(),
        ];
        o.tty = true;
        let c = compose(&img(), &o, |k| (k == "C").then(|| "from-host".to_string())).unwrap();
        assert_eq!(
            c.env,
            [
                "A=flag",
                "PATH=/img/bin",
                "B=2",
                "C=from-host",
                "D=x=y",
                "HOSTNAME=h",
                "TERM=xterm"
            ]
        );
        let mut o = ov();
        o.env = vec!["=bad".into()];
        assert!(matches!(
            compose(&img(), &o, |_| None),
            Err(ComposeError::BadEnv(_))
        ));
    }

    #[test]
    fn defaults_when_image_sets_nothing() {
        let mut i = ImageDefaults {
            cmd: vec!["sh".into()],
            ..Default::default()
        };
        let c = compose(&i, &ov(), |_| None).unwrap();
        assert_eq!(c.env, [format!("PATH={DEFAULT_PATH}"), "HOSTNAME=h".into()]);
        assert_eq!(c.cwd, None);
        assert_eq!(c.user, None);
        i.working_dir = Some("rel".into());
        assert!(matches!(
            compose(&i, &ov(), |_| None),
            Err(ComposeError::BadWorkdir(_))
        ));
    }

    #[test]
    fn env_file() {
        let t = "# comment\n\nA=1\n  B=two words\nC\r\n";
        assert_eq!(parse_env_file(t), ["A=1", "B=two words", "C"]);
    }
}
