//! `kiln cp` as an API client: `GET`/`PUT /v1/sandboxes/{id}/files` (tar
//! streams, nothing buffered whole) with the local path's semantics.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kiln_api::text::sanitize;
use tokio::sync::mpsc;

use crate::attach::{self, Cancel, Loc};
use crate::client_cmd::{Api, is_status};

/// `kiln cp` through the API (`GET`/`PUT /files`, tar streams), with the
/// local path's semantics; Ctrl-C cancels (exit 130, nothing left).
pub(crate) async fn cp(api: &Api, src: &str, dst: &str) -> Result<i32> {
    let mut cancel = Cancel::on_signals()?;
    let done = match (attach::parse_loc(src), attach::parse_loc(dst)) {
        (Loc::Sandbox(id, path), Loc::Local(local)) => {
            let id = api.resolve(&id).await?;
            copy_out(api, &id, &path, &local, &mut cancel).await?
        }
        (Loc::Local(local), Loc::Sandbox(id, path)) => {
            let id = api.resolve(&id).await?;
            copy_in(api, &id, &local, &path, &mut cancel).await?
        }
        _ => bail!("kiln cp needs exactly one side in a sandbox: ID:/path"),
    };
    if done {
        Ok(0)
    } else {
        eprintln!("kiln: copy cancelled");
        Ok(130)
    }
}

fn files_path(id: &str, path: &str) -> String {
    format!(
        "/sandboxes/{id}/files?path={}",
        form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>()
    )
}

/// Whether `path` in the sandbox is a directory: the type of the first
/// entry of its download (read until that entry's header parses, long
/// names included; the rest is not read).
async fn guest_is_dir(api: &Api, id: &str, path: &str) -> Result<bool> {
    let mut r = match api
        .send(api.request(reqwest::Method::GET, &files_path(id, path)))
        .await
    {
        Ok(r) => r,
        Err(e) if is_status(&e, 422) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut head: Vec<u8> = Vec::new();
    while head.len() < 1024 * 1024 {
        match r.chunk().await {
            Ok(Some(c)) => head.extend_from_slice(&c),
            _ => return Ok(false),
        }
        if let Some(dir) = first_entry_is_dir(&head) {
            return Ok(dir);
        }
    }
    Ok(false)
}

/// The first entry's type in the start of a tar stream, once it parses.
fn first_entry_is_dir(head: &[u8]) -> Option<bool> {
    let mut ar = tar::Archive::new(std::io::Cursor::new(head));
    let e = ar.entries().ok()?.next()?.ok()?;
    Some(e.header().entry_type().is_dir())
}

async fn copy_in(
    api: &Api,
    id: &str,
    local: &Path,
    path: &str,
    cancel: &mut Cancel,
) -> Result<bool> {
    let from_stdin = local == Path::new("-");
    let (dest, name) = if from_stdin {
        (path.to_string(), String::new())
    } else {
        let src_name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", local.display()))?;
        let into_dir = !path.ends_with('/') && guest_is_dir(api, id, path).await?;
        if into_dir {
            attach::guest_target(&format!("{path}/"), &src_name)?
        } else {
            attach::guest_target(path, &src_name)?
        }
    };
    let meta = if from_stdin {
        None
    } else {
        Some(std::fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?)
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let local = local.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let w = attach::ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(attach::CHUNK),
        };
        let r = if from_stdin {
            let mut w = w;
            std::io::copy(&mut std::io::stdin().lock(), &mut w).and_then(|_| w.finish())
        } else {
            let mut b = tar::Builder::new(w);
            b.follow_symlinks(false);
            let r = if meta.is_some_and(|m| m.is_dir()) {
                b.append_dir_all(&name, &local)
            } else {
                b.append_path_with_name(&local, &name)
            };
            r.and_then(|()| b.into_inner())
                .and_then(attach::ChunkWriter::finish)
        };
        if let Err(e) = &r {
            // The body ends with an error: the upload is broken off, never
            // taken for a whole archive.
            let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        r
    });
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c, rx))
    }));
    let put = api.send(
        api.request(reqwest::Method::PUT, &files_path(id, &dest))
            .header("content-type", "application/x-tar")
            .body(body),
    );
    let r = tokio::select! {
        r = put => r,
        () = cancel.wait() => {
            if !from_stdin {
                let _ = producer.await;
            }
            return Ok(false);
        }
    };
    let produced = if from_stdin {
        Ok(Ok(()))
    } else {
        producer.await
    };
    produced
        .context("tar producer failed")?
        .context("cannot read the files to copy")?;
    if let Err(e) = &r
        && e.downcast_ref::<crate::client_cmd::ApiErr>().is_none()
        && let Ok(sb) = api.get(id).await
        && !matches!(sb.state, kiln_api::sandbox::SandboxState::Running { .. })
    {
        // The server refused the copy (a paused or ended sandbox) before
        // reading the body, and the connection closed under the upload:
        // say why rather than the broken pipe.
        bail!(
            "copy into {} failed: sandbox {id} is {}",
            sanitize(&dest),
            sb.state.label()
        );
    }
    r.with_context(|| format!("copy into {} failed", sanitize(&dest)))?;
    Ok(true)
}

async fn copy_out(
    api: &Api,
    id: &str,
    path: &str,
    local: &Path,
    cancel: &mut Cancel,
) -> Result<bool> {
    let to_stdout = local == Path::new("-");
    let (target_dir, rename) = if to_stdout {
        (std::path::PathBuf::new(), None)
    } else if local.is_dir() {
        (local.to_path_buf(), None)
    } else {
        let parent = local
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("{} is not a directory", parent.display());
        }
        let name = local
            .file_name()
            .context("the local destination has no file name")?;
        (parent.to_path_buf(), Some(name.to_os_string()))
    };
    if !to_stdout {
        attach::reap_stale_copies(&target_dir);
    }
    let mut r = api
        .send(api.request(reqwest::Method::GET, &files_path(id, path)))
        .await?;
    let (tx, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let consumer = tokio::task::spawn_blocking(move || -> Result<()> {
        let r = BodyReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        if to_stdout {
            let mut r = r;
            std::io::copy(&mut r, &mut std::io::stdout().lock())?;
            return Ok(());
        }
        attach::unpack_from_guest(r, &target_dir, rename.as_deref())
    });
    let complete = loop {
        let c = tokio::select! {
            c = r.chunk() => c,
            () = cancel.wait() => {
                let _ = tx.send(Err(std::io::Error::other("cancelled"))).await;
                drop(r);
                drop(tx);
                if !to_stdout {
                    let _ = consumer.await;
                }
                return Ok(false);
            }
        };
        match c {
            Ok(Some(b)) => {
                if tx.send(Ok(b.to_vec())).await.is_err() {
                    break true;
                }
            }
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    if !complete {
        // A broken-off body: the consumer fails (and removes what it
        // unpacked), never keeps a short file that looks whole.
        let _ = tx
            .send(Err(std::io::Error::other("the download ended early")))
            .await;
        drop(tx);
        let _ = consumer.await;
        bail!("the copy of {} ended early", sanitize(path));
    }
    drop(tx);
    consumer.await.context("tar consumer failed")??;
    Ok(true)
}

/// A blocking `Read` over chunks from the async side; an `Err` chunk
/// fails the read (a broken-off or cancelled download).
struct BodyReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_entry_says_whether_it_is_a_directory() {
        let long = "d".repeat(150);
        for (name, dir) in [("short", true), (long.as_str(), true), ("f", false)] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(if dir {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            h.set_size(if dir { 0 } else { 3 });
            h.set_mode(0o755);
            let data: &[u8] = if dir { b"" } else { b"abc" };
            b.append_data(&mut h, name, data).expect("tar");
            let whole = b.into_inner().expect("tar");
            // Only the start: a long name's extra header included.
            let cut = if name.len() > 100 { 1536 } else { 512 };
            assert_eq!(first_entry_is_dir(&whole[..cut]), Some(dir), "{name}");
            assert_eq!(first_entry_is_dir(&whole[..100]), None);
        }
    }

    /// A download that breaks off midway must fail the unpack and leave
    /// nothing, not a short file that looks whole.
    #[test]
    fn a_broken_off_download_leaves_nothing() {
        let mut b = tar::Builder::new(Vec::new());
        let data = vec![7u8; 64 * 1024];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f.bin", &data[..]).expect("tar");
        let whole = b.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("tmp");
        for broken in [true, false] {
            let (tx, rx) = mpsc::channel(4);
            tx.try_send(Ok(whole[..whole.len() / 2].to_vec()))
                .expect("send");
            if broken {
                tx.try_send(Err(std::io::Error::other("the download ended early")))
                    .expect("send");
            } else {
                tx.try_send(Ok(whole[whole.len() / 2..].to_vec()))
                    .expect("send");
            }
            drop(tx);
            let r = BodyReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            };
            let out = dir.path().join("out.bin");
            let res =
                attach::unpack_from_guest(r, dir.path(), Some(out.file_name().expect("name")));
            if broken {
                assert!(res.is_err());
                assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
            } else {
                res.expect("whole archive");
                assert_eq!(std::fs::read(&out).expect("read"), data);
            }
        }
    }
}
