//! Host side of the hybrid vsock protocol, shared by Firecracker's vsock
//! device and QEMU's `vhost-user-vsock-device` served by
//! `vhost-device-vsock`: the host connects to a Unix socket, writes
//! `CONNECT <port>\n`, and the VMM (or the vhost-user backend) answers
//! `OK <host port>\n` once the guest accepted the connection; from then on
//! the socket is the guest connection's byte stream.
//!
//! Invariants: the answer is read byte by byte, so no guest byte after the
//! newline is consumed; it is at most [`MAX_ANSWER`] bytes and must be
//! exactly `OK ` and a decimal `u32`, anything else is refused; the whole
//! exchange (connect included) has a deadline, because a guest that never
//! accepts leaves the VMM silent (seen with Firecracker: a hang of 15 s and
//! more).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::ConnectAgentError;

/// How long `connect` + `CONNECT`/`OK` may take by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer line accepted (`OK 4294967295` is 13 bytes).
pub const MAX_ANSWER: usize = 32;

/// Connect to the hybrid vsock socket at `path` and open a connection to
/// guest `port`, all within `timeout`. Returns the stream, positioned at
/// the guest's first byte.
pub async fn connect(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, ConnectAgentError> {
    let exchange = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ConnectAgentError::Connect {
                    path: path.to_owned(),
                    source,
                })?;
        handshake(&mut stream, port)
            .await
            .map_err(|reason| ConnectAgentError::Handshake {
                path: path.to_owned(),
                reason,
            })?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        ConnectAgentError::HandshakeTimeout {
            path: path.to_owned(),
            port,
            timeout,
        }
    })?
}

/// `CONNECT <port>\n`, then read and check the answer. Returns the host
/// port the VMM named. No deadline of its own: [`connect`] adds it.
pub async fn handshake(stream: &mut UnixStream, port: u32) -> Result<u32, String> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("writing CONNECT: {e}"))?;
    let mut line = Vec::with_capacity(MAX_ANSWER);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(format!(
                    "the VMM closed the connection after {} bytes of answer (nothing accepted vsock port {port} in the guest?)",
                    line.len()
                ));
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        };
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_ANSWER {
            return Err(format!(
                "the answer is longer than {MAX_ANSWER} bytes: {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
    }
    parse_answer(&line)
}

/// `OK <u32>` exactly (no sign, no spaces around the number, no `\r`).
fn parse_answer(line: &[u8]) -> Result<u32, String> {
    let refuse = || {
        format!(
            "expected `OK <port>`, got {:?}",
            String::from_utf8_lossy(line)
        )
    };
    let digits = line.strip_prefix(b"OK ").ok_or_else(refuse)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(refuse());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u32>().ok())
        .ok_or_else(refuse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::net::UnixListener;

    /// A fake VMM end on a real Unix socket: reads `CONNECT <port>\n`, then
    /// writes `answer` (and keeps the connection open for `hold`).
    async fn peer(
        answer: &'static [u8],
        hold: Duration,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    while let Ok(b) = s.read_u8().await {
                        if b == b'\n' {
                            break;
                        }
                        line.push(b);
                    }
                    assert_eq!(line, b"CONNECT 1024");
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(hold).await;
                });
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn ok_then_guest_bytes_are_left_in_the_stream() {
        let (_d, path) = peer(b"OK 1073741824\nhello", Duration::from_secs(1)).await;
        let mut s = connect(&path, 1024, Duration::from_secs(2))
            .await
            .expect("handshake");
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"hello");
    }

    #[tokio::test]
    async fn a_silent_peer_hits_the_deadline() {
        let (_d, path) = peer(b"", Duration::from_secs(30)).await;
        let started = Instant::now();
        let err = connect(&path, 1024, Duration::from_millis(300))
            .await
            .expect_err("no answer");
        assert!(
            matches!(err, ConnectAgentError::HandshakeTimeout { port: 1024, .. }),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.to_string().contains("CONNECT 1024"), "{err}");
    }

    #[tokio::test]
    async fn garbage_answers_are_refused() {
        for answer in [
            &b"NOPE\n"[..],
            b"OK\n",
            b"OK \n",
            b"ok 5\n",
            b"OK -5\n",
            b"OK 5 \n",
            b"OK 5\r\n",
            b"OK 99999999999\n",
            b"OK 1\xff\n",
            b"\x00\x00\x00\n",
            b"OK 1111111111111111111111111111111111111111111\n",
        ] {
            let (_d, path) = peer(answer, Duration::from_secs(1)).await;
            let err = connect(&path, 1024, Duration::from_secs(2))
                .await
                .expect_err("garbage");
            assert!(
                matches!(err, ConnectAgentError::Handshake { .. }),
                "{answer:?}: {err:?}"
            );
        }
        // An endless line without a newline is cut at MAX_ANSWER bytes, not
        // read until the deadline.
        let (_d, path) = peer(&[b'A'; 4096], Duration::from_secs(5)).await;
        let started = Instant::now();
        let err = connect(&path, 1024, Duration::from_secs(3))
            .await
            .expect_err("too long");
        assert!(err.to_string().contains("longer than"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_is_a_clear_error() {
        let (_d, path) = peer(b"", Duration::ZERO).await;
        let err = connect(&path, 1024, Duration::from_secs(2))
            .await
            .expect_err("closed");
        assert!(err.to_string().contains("closed"), "{err}");
        let err = connect(
            &path.with_extension("missing"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .expect_err("no socket");
        assert!(matches!(err, ConnectAgentError::Connect { .. }), "{err:?}");
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer(b"OK 0"), Ok(0));
        assert_eq!(parse_answer(b"OK 4294967295"), Ok(u32::MAX));
        assert!(parse_answer(b"OK 4294967296").is_err());
        assert!(parse_answer(b"OK +1").is_err());
    }
}
