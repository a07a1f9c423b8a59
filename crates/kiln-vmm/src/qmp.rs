//! A small async QMP client: JSON objects, one per line, over QEMU's Unix
//! control socket. Commands carry an `id` and their answers are matched by
//! it; asynchronous events arriving in between are kept (a bounded ring plus
//! a broadcast channel), never dropped on the floor. Lines are bounded and
//! bad JSON is an error, never a panic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::ControlVmError;

/// Longest line accepted from QEMU (QMP answers here are small; a
/// `query-*` listing is a few KiB).
pub const MAX_LINE: usize = 1 << 20;
/// Events kept for [`QmpClient::recent_events`].
const EVENT_RING: usize = 256;
/// Default time to wait for a command's answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Value,
}

type Pending = Arc<Mutex<PendingState>>;

#[derive(Default)]
struct PendingState {
    waiting: HashMap<u64, oneshot::Sender<Result<Value, ControlVmError>>>,
    closed: Option<String>,
}

/// A connected QMP session (capabilities negotiated).
pub struct QmpClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: Arc<Mutex<VecDeque<QmpEvent>>>,
    event_tx: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    /// QEMU's version from the greeting, e.g. (10, 0, 2).
    pub version: (u64, u64, u64),
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QmpClient {
    /// Read the greeting, negotiate capabilities, and start the reader.
    pub async fn handshake(stream: UnixStream) -> Result<Self, ControlVmError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = crate::clock::run_time_timeout(DEFAULT_TIMEOUT, read_line(&mut reader))
            .await
            .map_err(|_| ControlVmError::Timeout {
                command: "greeting".into(),
                timeout: DEFAULT_TIMEOUT,
            })??
            .ok_or(ControlVmError::Gone)?;
        let version = parse_greeting(&greeting)?;
        let pending: Pending = Arc::default();
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let (event_tx, _) = broadcast::channel(EVENT_RING);
        let reader = tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            event_tx.clone(),
        ));
        let client = QmpClient {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            event_tx,
            next_id: AtomicU64::new(1),
            reader,
            version,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Run a command and return its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, ControlVmError> {
        self.execute_timeout(command, arguments, DEFAULT_TIMEOUT)
            .await
    }

    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ControlVmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.pending);
            if state.closed.is_some() {
                return Err(ControlVmError::Gone);
            }
            state.waiting.insert(id, tx);
        }
        let mut line = request.to_string();
        line.push('\n');
        let written = {
            let mut writer = self.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if let Err(e) = written {
            lock(&self.pending).waiting.remove(&id);
            return Err(if is_disconnect(&e) {
                ControlVmError::Gone
            } else {
                ControlVmError::Io(e)
            });
        }
        match crate::clock::run_time_timeout(timeout, rx).await {
            Ok(Ok(result)) => result.map_err(|e| match e {
                ControlVmError::Refused { message, .. } => ControlVmError::Refused {
                    command: command.to_owned(),
                    message,
                },
                other => other,
            }),
            Ok(Err(_)) => Err(ControlVmError::Gone),
            Err(_) => {
                lock(&self.pending).waiting.remove(&id);
                Err(ControlVmError::Timeout {
                    command: command.to_owned(),
                    timeout,
                })
            }
        }
    }

    /// Events received so far (the most recent [`EVENT_RING`]).
    pub fn recent_events(&self) -> Vec<QmpEvent> {
        lock(&self.events).iter().cloned().collect()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.event_tx.subscribe()
    }

    /// Whether the connection has closed (QEMU exited or hung up).
    pub fn is_closed(&self) -> bool {
        lock(&self.pending).closed.is_some()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent
    // (single inserts/removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::NotConnected
    )
}

/// Read one line of at most [`MAX_LINE`] bytes; `None` at EOF.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> Result<Option<Value>, ControlVmError> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(ControlVmError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if buf.len() > MAX_LINE {
            ControlVmError::Protocol(format!("a line longer than {MAX_LINE} bytes"))
        } else {
            ControlVmError::Protocol("connection closed in the middle of a line".into())
        });
    }
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| ControlVmError::Protocol(format!("bad JSON: {e}")))
}

fn parse_greeting(greeting: &Value) -> Result<(u64, u64, u64), ControlVmError> {
    let qemu = &greeting["QMP"]["version"]["qemu"];
    match (
        qemu["major"].as_u64(),
        qemu["minor"].as_u64(),
        qemu["micro"].as_u64(),
    ) {
        (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
        _ => Err(ControlVmError::Protocol(format!(
            "not a QMP greeting: {}",
            truncate(&greeting.to_string())
        ))),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    pending: Pending,
    events: Arc<Mutex<VecDeque<QmpEvent>>>,
    event_tx: broadcast::Sender<QmpEvent>,
) {
    let reason = loop {
        let message = match read_line(&mut reader).await {
            Ok(Some(message)) => message,
            Ok(None) => break "QMP connection closed".to_owned(),
            Err(e) => break format!("QMP read failed: {e}"),
        };
        match classify(message) {
            Message::Event(event) => {
                tracing::debug!(event = %event.event, "QMP event");
                {
                    let mut ring = lock(&events);
                    if ring.len() == EVENT_RING {
                        ring.pop_front();
                    }
                    ring.push_back(event.clone());
                }
                // No subscriber is fine.
                let _ = event_tx.send(event);
            }
            Message::Answer(id, result) => {
                let waiter = lock(&pending).waiting.remove(&id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(result);
                    }
                    None => tracing::debug!(id, "QMP answer nobody waits for"),
                }
            }
            Message::Unknown(text) => tracing::warn!(message = %text, "unexpected QMP message"),
        }
    };
    tracing::debug!(%reason, "QMP reader stopped");
    let mut state = lock(&pending);
    state.closed = Some(reason);
    for (_, tx) in state.waiting.drain() {
        let _ = tx.send(Err(ControlVmError::Gone));
    }
}

enum Message {
    Event(QmpEvent),
    Answer(u64, Result<Value, ControlVmError>),
    Unknown(String),
}

fn classify(message: Value) -> Message {
    if message.get("event").is_some() {
        return match serde_json::from_value::<QmpEvent>(message.clone()) {
            Ok(event) => Message::Event(event),
            Err(_) => Message::Unknown(truncate(&message.to_string())),
        };
    }
    let Some(id) = message.get("id").and_then(Value::as_u64) else {
        return Message::Unknown(truncate(&message.to_string()));
    };
    if let Some(value) = message.get("return") {
        return Message::Answer(id, Ok(value.clone()));
    }
    if let Some(error) = message.get("error") {
        let class = error["class"].as_str().unwrap_or("Error");
        let desc = error["desc"].as_str().unwrap_or("(no description)");
        return Message::Answer(
            id,
            Err(ControlVmError::Refused {
                command: String::new(),
                message: format!("{class}: {desc}"),
            }),
        );
    }
    Message::Unknown(truncate(&message.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn fake_qemu(script: impl FnOnce(UnixStream) -> JoinHandle<()>) -> QmpClient {
        let (a, b) = UnixStream::pair().expect("pair");
        let server = script(b);
        let client = QmpClient::handshake(a).await.expect("handshake");
        drop(server);
        client
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

    #[tokio::test]
    async fn answers_are_matched_and_events_kept() {
        let client = fake_qemu(|stream| {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                w.write_all(format!("{GREETING}\n").as_bytes())
                    .await
                    .expect("write");
                let mut line = String::new();
                while r.read_line(&mut line).await.expect("read") > 0 {
                    let req: Value = serde_json::from_str(&line).expect("json");
                    let id = req["id"].clone();
                    let answer = match req["execute"].as_str() {
                        Some("stop") => format!(
                            "{{\"event\": \"STOP\", \"data\": {{}}, \"timestamp\": {{}}}}\n{}\n",
                            json!({"return": {}, "id": id})
                        ),
                        Some("bad") => format!(
                            "{}\n",
                            json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": id})
                        ),
                        _ => format!("{}\n", json!({"return": {}, "id": id})),
                    };
                    w.write_all(answer.as_bytes()).await.expect("write");
                    line.clear();
                }
            })
        })
        .await;
        assert_eq!(client.version, (10, 0, 2));
        let mut events = client.subscribe();
        client.execute("stop", None).await.expect("stop");
        assert_eq!(events.recv().await.expect("event").event, "STOP");
        assert_eq!(client.recent_events().len(), 1);
        let err = client.execute("bad", None).await.expect_err("refused");
        assert!(
            matches!(&err, ControlVmError::Refused { command, message } if command == "bad" && message.contains("CommandNotFound")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn garbage_closes_the_session_without_panicking() {
        let client = fake_qemu(|stream| {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                w.write_all(format!("{GREETING}\n").as_bytes())
                    .await
                    .expect("write");
                let mut buf = [0u8; 256];
                let _ = r.read(&mut buf).await;
                // answer qmp_capabilities
                w.write_all(b"{\"return\": {}, \"id\": 1}\n")
                    .await
                    .expect("write");
                let _ = r.read(&mut buf).await;
                w.write_all(b"{not json\n").await.expect("write");
                let _ = r.read(&mut buf).await;
            })
        })
        .await;
        let err = client
            .execute("query-status", None)
            .await
            .expect_err("gone");
        assert!(matches!(err, ControlVmError::Gone), "{err:?}");
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn overlong_lines_are_refused() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let writer = tokio::spawn(async move {
            let big = vec![b'x'; MAX_LINE + 10];
            let _ = b.write_all(&big).await;
        });
        let err = QmpClient::handshake(a).await.err().expect("error");
        assert!(matches!(err, ControlVmError::Protocol(_)), "{err:?}");
        writer.abort();
    }
}
