//! Firecracker's HTTP API: one Rust type per API resource (field names as
//! in `src/firecracker/swagger/firecracker.yaml`), and a client speaking
//! HTTP/1.1 on the API's Unix socket that checks every status and surfaces
//! Firecracker's `fault_message`. Response bodies are bounded.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::ControlVmError;

/// How long one API request may take (snapshot requests get more).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest API response body read.
const MAX_BODY: usize = 1 << 20;

// ---- API bodies: one type per resource, field names as in the spec ----

/// PUT /boot-source
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    pub boot_args: String,
}

/// PUT /machine-config
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
    /// Lets `/snapshot/create` write `Diff` snapshots (only the pages
    /// written since boot, load or the last snapshot).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// PUT /drives/{drive_id}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

/// PUT /vsock
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

/// PUT /network-interfaces/{iface_id}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

/// The configure request for a virtio-net device on an existing tap.
pub fn network_interface_request(dev: &crate::NetDevice) -> (String, serde_json::Value) {
    let body = NetworkInterface {
        iface_id: "net0".to_owned(),
        host_dev_name: dev.tap.clone(),
        guest_mac: dev.mac.clone(),
    };
    (
        "/network-interfaces/net0".to_owned(),
        serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
    )
}

/// PUT /actions
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// PATCH /vm
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    pub state: VmStateKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum VmStateKind {
    Paused,
    Resumed,
}

/// PUT /snapshot/create
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    pub snapshot_type: String,
}

/// PUT /snapshot/load
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    pub resume_vm: bool,
    /// Only sent when the vsock socket moves (newer Firecracker releases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Dirty page tracking after the load, under its name before 1.13
    /// (deprecated since, and logged as such on every load).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// The same, under its name from 1.13 on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: String,
    pub backend_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// GET / (InstanceInfo); only the fields Kiln reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: String,
    pub vmm_version: String,
}

/// Error body of every failing request.
#[derive(Debug, Clone, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    fault_message: Option<String>,
}

// ---- HTTP over the API socket ----

/// A Firecracker API client; one connection per request (Firecracker's API
/// server is single-threaded and requests are rare).
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: PathBuf) -> Self {
        ApiClient { socket }
    }

    /// Send one request; `Ok(body)` for a 2xx answer, otherwise `Refused`
    /// with Firecracker's `fault_message`.
    pub async fn request<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Bytes, ControlVmError> {
        let what = format!("{method} {path}");
        crate::clock::run_time_timeout(timeout, self.send(method, path, body, &what))
            .await
            .map_err(|_| ControlVmError::Timeout {
                command: what.clone(),
                timeout,
            })?
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        what: &str,
    ) -> Result<Bytes, ControlVmError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) {
                ControlVmError::Gone
            } else {
                ControlVmError::Io(e)
            }
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ControlVmError::Protocol(format!("HTTP handshake: {e}")))?;
        let connection = tokio::spawn(connection);
        let payload = match body {
            Some(body) => Bytes::from(
                serde_json::to_vec(body).map_err(|e| ControlVmError::Protocol(e.to_string()))?,
            ),
            None => Bytes::new(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost")
            .header("Accept", "application/json");
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let request = builder
            .body(Full::new(payload))
            .map_err(|e| ControlVmError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ControlVmError::Protocol(format!("{what}: {e}")))?;
        let status = response.status();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| ControlVmError::Protocol(format!("{what}: reading the body: {e}")))?
            .to_bytes();
        connection.abort();
        check_status(what, status, &bytes).map(|()| bytes)
    }

    pub(crate) async fn put<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(), ControlVmError> {
        self.request(Method::PUT, path, Some(body), REQUEST_TIMEOUT)
            .await
            .map(drop)
    }

    pub(crate) async fn patch<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(), ControlVmError> {
        self.request(Method::PATCH, path, Some(body), REQUEST_TIMEOUT)
            .await
            .map(drop)
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, ControlVmError> {
        let body = self
            .request::<()>(Method::GET, "/", None, REQUEST_TIMEOUT)
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ControlVmError::Protocol(format!("GET /: bad InstanceInfo: {e}")))
    }
}

fn check_status(what: &str, status: StatusCode, body: &[u8]) -> Result<(), ControlVmError> {
    if status.is_success() {
        return Ok(());
    }
    let fault = serde_json::from_slice::<ApiError>(body)
        .ok()
        .and_then(|e| e.fault_message)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    Err(ControlVmError::Refused {
        command: what.to_owned(),
        message: format!("{status}: {fault}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    #[test]
    fn action_vm_and_snapshot_bodies() {
        assert_eq!(
            serde_json::to_value(InstanceActionInfo {
                action_type: ActionType::InstanceStart
            })
            .expect("json"),
            json!({"action_type": "InstanceStart"})
        );
        assert_eq!(
            serde_json::to_value(VmState {
                state: VmStateKind::Paused
            })
            .expect("json"),
            json!({"state": "Paused"})
        );
        assert_eq!(
            serde_json::to_value(SnapshotLoadParams {
                snapshot_path: "/s/vmstate".into(),
                mem_backend: MemoryBackend {
                    backend_type: "File".into(),
                    backend_path: "/s/memory".into()
                },
                resume_vm: true,
                vsock_override: None,
                enable_diff_snapshots: None,
                track_dirty_pages: Some(true),
            })
            .expect("json"),
            json!({"snapshot_path": "/s/vmstate", "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"}, "resume_vm": true, "track_dirty_pages": true})
        );
    }

    #[test]
    fn fault_messages_are_surfaced() {
        let err = check_status(
            "PUT /machine-config",
            StatusCode::BAD_REQUEST,
            br#"{"fault_message": "The memory size (MiB) is invalid."}"#,
        )
        .expect_err("400");
        let text = err.to_string();
        assert!(text.contains("PUT /machine-config"), "{text}");
        assert!(format!("{err:?}").contains("memory size (MiB) is invalid"));
        assert!(check_status("GET /", StatusCode::OK, b"{}").is_ok());
    }

    /// The HTTP client against a fake API server on a Unix socket.
    #[tokio::test]
    async fn client_speaks_http_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 204 No Content\r\n\r\n".to_owned(), {
                let body = r#"{"fault_message":"bad vcpu count"}"#;
                format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }] {
                let (stream, _) = listener.accept().await.expect("accept");
                let (r, mut w) = stream.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let mut head = String::new();
                let mut content_length = 0usize;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).await.expect("read");
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        content_length = v.trim().parse().expect("length");
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; content_length];
                r.read_exact(&mut body).await.expect("body");
                assert!(
                    head.starts_with("PATCH /vm HTTP/1.1")
                        || head.starts_with("PUT /machine-config HTTP/1.1"),
                    "{head}"
                );
                w.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        let api = ApiClient::new(sock);
        api.patch(
            "/vm",
            &VmState {
                state: VmStateKind::Resumed,
            },
        )
        .await
        .expect("204");
        let err = api
            .put(
                "/machine-config",
                &MachineConfiguration {
                    vcpu_count: 99,
                    mem_size_mib: 1,
                    smt: false,
                    track_dirty_pages: false,
                },
            )
            .await
            .expect_err("400");
        assert!(
            err.to_string().contains("bad vcpu count")
                || format!("{err:?}").contains("bad vcpu count")
        );
        server.await.expect("server");
    }
}
