//! The stream protocol of Kiln's API: exec and attach over WebSocket, logs
//! as NDJSON, files as tar streams. The server's `/v1/sandboxes/{id}/…`
//! routes and the node's `/node/v1/sandboxes/{id}/…` routes speak exactly
//! this (the server relays the bytes to the node that runs the sandbox), and
//! so will the CLI once it is an API client (`kiln run`, `exec`, `logs -f`,
//! `cp`).
//!
//! WebSocket (`exec`, `attach`):
//! 1. The client's first message is a text frame: [`ExecStart`] (exec) or
//!    [`AttachStart`] (attach), at most [`MAX_START`] bytes.
//! 2. The server answers [`ServerMsg::Started`] (or `Error` and closes).
//! 3. Binary frames carry bytes, the first byte naming the stream
//!    ([`STDIN`], [`STDOUT`], [`STDERR`]); at most [`MAX_BINARY`] bytes.
//! 4. Text frames carry control: [`ClientMsg`] (resize, signal, stdin EOF)
//!    from the client, [`ServerMsg`] from the server, which ends with
//!    `exit` (or `error`) and closes. At most [`MAX_TEXT`] bytes.
//!
//! Anything else (an unknown message, a binary frame on another stream than
//! stdin, an oversized frame) is answered with `error` and the socket is
//! closed; the process goes on running unless the stream was its main
//! process's stdin.
//!
//! Logs: `application/x-ndjson`, one [`LogRecord`] per line.

use serde::{Deserialize, Serialize};

use crate::rest::ErrorDetail;

/// Binary frame prefix: bytes for the process's stdin (client → server).
pub const STDIN: u8 = 0;
/// Binary frame prefix: the process's stdout (server → client).
pub const STDOUT: u8 = 1;
/// Binary frame prefix: the process's stderr (server → client).
pub const STDERR: u8 = 2;
/// Largest binary frame: the prefix and 256 KiB of data.
pub const MAX_BINARY: usize = 256 * 1024 + 1;
/// Largest control text frame (after the start message).
pub const MAX_TEXT: usize = 4 * 1024;
/// Largest start message, and the largest message or frame of the whole
/// session (the WebSocket layer refuses bigger ones before they are
/// buffered): a command and environment up to 1 MiB of JSON.
pub const MAX_START: usize = 1024 * 1024;
/// A stream with no frame either way for this long is closed (seconds;
/// the default of `kiln node --stream-idle-timeout`).
pub const IDLE_SECS: u64 = 3600;
/// The client must send its start message within this time (seconds).
pub const START_SECS: u64 = 30;

/// The first message of `exec`: the process to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    /// argv (argv[0] looked up in `PATH` when it has no `/`).
    pub cmd: Vec<String>,
    /// `KEY=VALUE`, over the sandbox's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default: the sandbox's).
    #[serde(default)]
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group`, `uid:gid` (default: the sandbox's).
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal (stderr merged into stdout).
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
    /// The client will send stdin (otherwise stdin is /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Start the process and end the session at once with its `started`
    /// (its output is kept; re-attach with [`AttachStart::pid`]), as
    /// `kiln exec -d`. Sent only when set, so nodes that predate it
    /// still take every other start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// The first message of `attach`: follow the sandbox's main process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AttachStart {
    /// Forward stdin to the main process (a sandbox created with
    /// `stdin: true`).
    #[serde(default)]
    pub stdin: bool,
    /// Send the output since the start first (from the output log).
    #[serde(default)]
    pub replay: bool,
    /// Attach to this process, started by an earlier exec of the sandbox,
    /// instead of the main process (as `kiln exec --attach PID`); its
    /// output produced meanwhile is sent first (`replay` does not apply).
    /// The new attach takes the process's streams over: an earlier
    /// session attached to it ends, and without `stdin` the process's
    /// stdin is closed. Sent only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// Control messages from the client (text frames after the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// A tty's new window size.
    Resize { rows: u16, cols: u16 },
    /// A signal (1-64) for the process.
    Signal { signal: i32 },
    /// No more stdin. (A struct variant, so that extra fields are refused
    /// like in every other message.)
    StdinEof {},
}

/// Messages from the server (text frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMsg {
    /// The process runs (its pid in the guest).
    Started { pid: u32 },
    /// The process ended: its exit code as a shell reports it (128 + the
    /// signal when killed by one), and the signal.
    Exit {
        exit_code: i32,
        #[serde(default)]
        signal: Option<i32>,
    },
    /// The stream failed (`code`: `invalid_message`, `frame_too_large`,
    /// `not_running`, `exec_failed`, `idle_timeout`, `node_unavailable`, …).
    Error { error: ErrorDetail },
}

/// One line of a logs stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogRecord {
    /// Output bytes, base64 (standard alphabet, padded).
    Output { stream: LogStreamName, data: String },
    /// Older output the log limit dropped before it was read.
    Dropped { bytes: u64 },
    /// The main process ended (the last line when the sandbox ended).
    Exit {
        exit_code: i32,
        #[serde(default)]
        signal: Option<i32>,
    },
    /// The stream failed (the last line).
    Error { error: ErrorDetail },
}

/// Which output stream a log record is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogStreamName {
    Stdout,
    Stderr,
}

impl ServerMsg {
    pub fn error(code: &str, message: impl Into<String>) -> ServerMsg {
        ServerMsg::Error {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                reason: None,
            },
        }
    }
}

impl ClientMsg {
    /// Checks values a hostile client may send out of range.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            ClientMsg::Resize { rows, cols } if rows == 0 || cols == 0 => {
                Err("resize: rows and cols must be 1-65535".into())
            }
            ClientMsg::Signal { signal } if !(1..=64).contains(&signal) => {
                Err(format!("signal {signal}: must be 1-64"))
            }
            _ => Ok(()),
        }
    }
}

/// A sandbox path given in `?path=`: absolute, no NUL, at most 4096 bytes.
pub fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("path: must be absolute".into());
    }
    if p.len() > 4096 || p.contains('\0') {
        return Err("path: at most 4096 bytes, no NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_strict_and_validated() {
        let m: ClientMsg =
            serde_json::from_str(r#"{"type":"resize","rows":40,"cols":120}"#).expect("resize");
        assert_eq!(
            m,
            ClientMsg::Resize {
                rows: 40,
                cols: 120
            }
        );
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"resize","rows":1}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"stdin_eof","x":1}"#).is_err());
        assert_eq!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"stdin_eof"}"#).expect("eof"),
            ClientMsg::StdinEof {}
        );
        assert!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"resize","rows":70000,"cols":1}"#)
                .is_err()
        );
        assert!(ClientMsg::Signal { signal: 0 }.validate().is_err());
        assert!(ClientMsg::Signal { signal: 15 }.validate().is_ok());
        assert!(ClientMsg::Resize { rows: 0, cols: 3 }.validate().is_err());
        assert!(serde_json::from_str::<ExecStart>(r#"{"cmd":["cat"],"bogus":1}"#).is_err());
        // The later fields are sent only when set (older nodes refuse
        // unknown fields).
        let a = serde_json::to_string(&AttachStart {
            stdin: false,
            replay: true,
            pid: None,
        })
        .expect("json");
        assert_eq!(a, r#"{"stdin":false,"replay":true}"#);
        let e: ExecStart = serde_json::from_str(r#"{"cmd":["cat"]}"#).expect("exec");
        assert!(!serde_json::to_string(&e).expect("json").contains("detach"));
        let e: ExecStart = serde_json::from_str(r#"{"cmd":["cat"],"stdin":true}"#).expect("exec");
        assert!(e.stdin && !e.tty && e.env.is_empty());
        assert_eq!(
            serde_json::to_string(&ServerMsg::Exit {
                exit_code: 3,
                signal: None
            })
            .expect("json"),
            r#"{"type":"exit","exit_code":3,"signal":null}"#
        );
        assert!(check_path("/a/b").is_ok());
        assert!(check_path("a").is_err());
        assert!(check_path("/a\0").is_err());
    }
}
