//! Streaming between the user's terminal and a sandbox: `run` (attached),
//! `exec`, `exec --attach`, `logs -f` and `cp`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kiln_api::proto::{self, Channel, ExecRequest, Kind, Request};
use kiln_api::text::sanitize;
use kiln_node::ctl::{CtlConn, CtlRequest, CtlResponse};
use kiln_node::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::term;

/// When this process first wrote a sandbox's output (`kiln run -v`).
static FIRST_OUTPUT: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// When the first byte of a sandbox's output was written here, if any was.
pub fn first_output() -> Option<std::time::Instant> {
    FIRST_OUTPUT.get().copied()
}

pub(crate) fn mark_output() {
    let _ = FIRST_OUTPUT.set(std::time::Instant::now());
}

/// What the input side sends to the supervisor.
enum Input {
    Data(Vec<u8>),
    Eof,
    Signal(i32),
    Resize(u16, u16),
}

/// Follows the main process of the sandbox behind `sock`.
pub async fn attach_main(sock: &Path, stdin: bool, tty: bool, replay: bool) -> Result<i32> {
    let (conn, resp) = CtlConn::open(sock, &CtlRequest::Attach { stdin, replay }).await?;
    follow_main(sock, conn, resp, stdin, tty, &mut || {}).await
}

/// Follows sandbox `id`'s main process from its first output. A sandbox
/// whose command ended before we could attach (its supervisor was already
/// tearing down) has its output log replayed and its exit code returned.
/// `at_exit` runs when the exit is reported, while the connection still
/// holds the supervisor (a `--rm` sandbox's record is still there).
pub async fn attach_main_or_replay(
    store: &Store,
    id: &str,
    stdin: bool,
    tty: bool,
    at_exit: &mut dyn FnMut(),
) -> Result<i32> {
    let sock = store.dir(id).join("ctl.sock");
    match CtlConn::open(
        &sock,
        &CtlRequest::Attach {
            stdin,
            replay: true,
        },
    )
    .await
    {
        Ok((conn, resp)) => follow_main(&sock, conn, resp, stdin, tty, at_exit).await,
        Err(e) => {
            for _ in 0..200 {
                if let Ok(rec) = store.load(id)
                    && let Some(code) = rec.state.exit_code()
                {
                    replay_log(&store.dir(id).join("output.log"))?;
                    return Ok(code);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e.into())
        }
    }
}

/// Writes a whole output log to stdout and stderr, saying first how much
/// older output the log limit dropped.
pub fn replay_log(path: &Path) -> Result<()> {
    use std::io::Write;
    if !path.exists() {
        return Ok(());
    }
    let dropped = kiln_node::logs::dropped(path).unwrap_or(0);
    if dropped > 0 {
        eprintln!(
            "kiln: {dropped} bytes of earlier output were dropped (the log keeps the newest; \
             set the size with kiln run --log-limit or {})",
            kiln_node::logs::LIMIT_ENV
        );
    }
    let mut r = kiln_node::logs::LogReader::open(path, 0)?;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    r.read_to_end(|s, b| {
        mark_output();
        match s {
            kiln_node::logs::LogStream::Stdout => out.write_all(b),
            kiln_node::logs::LogStream::Stderr => err.write_all(b),
        }
    })?;
    out.flush()?;
    Ok(())
}

async fn follow_main(
    sock: &Path,
    conn: CtlConn,
    resp: CtlResponse,
    stdin: bool,
    tty: bool,
    at_exit: &mut dyn FnMut(),
) -> Result<i32> {
    let pid = match resp {
        CtlResponse::Started { pid } => pid,
        CtlResponse::Error { message, exit_code } => {
            eprintln!("kiln: {}", sanitize(&message));
            return Ok(exit_code.unwrap_or(125));
        }
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    };
    stream(sock, conn, pid, stdin, tty, true, at_exit).await
}

/// How long `kiln exec` waits for the sandbox to start the process
/// (`--start-timeout`, `KILN_EXEC_START_TIMEOUT` in seconds).
pub const START_TIMEOUT_ENV: &str = "KILN_EXEC_START_TIMEOUT";
const DEFAULT_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

static START_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Sets the start deadline of `exec` (from `--start-timeout`).
pub fn set_start_timeout(d: std::time::Duration) {
    let _ = START_TIMEOUT.set(d);
}

fn start_timeout() -> std::time::Duration {
    if let Some(d) = START_TIMEOUT.get() {
        return *d;
    }
    std::env::var(START_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .unwrap_or(DEFAULT_START_TIMEOUT)
}

/// Starts a process with `exec` and streams it. The command is checked
/// against what Linux can run first; a guest too busy to start it in
/// `start_timeout()` gets a clear error instead of a hang.
pub async fn exec(
    sock: &Path,
    req: ExecRequest,
    stdin: bool,
    tty: bool,
    detach: bool,
) -> Result<i32> {
    req.check_limits()?;
    let limit = start_timeout();
    let (conn, resp) = match tokio::time::timeout(
        limit,
        CtlConn::open(sock, &CtlRequest::Exec(req)),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => bail!(
            "the sandbox did not start the command within {:.0} s: its guest is too busy to answer \
             (raise the deadline with --start-timeout, or kiln stop the sandbox)",
            limit.as_secs_f64()
        ),
    };
    let pid = match resp {
        CtlResponse::Started { pid } => pid,
        CtlResponse::Error { message, exit_code } => {
            eprintln!("kiln: {}", sanitize(&message));
            return Ok(exit_code.unwrap_or(125));
        }
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    };
    if detach {
        println!("{pid}");
        return Ok(0);
    }
    stream(sock, conn, pid, stdin, tty, false, &mut || {}).await
}

/// Re-attaches to an exec'd process.
pub async fn exec_attach(sock: &Path, pid: u32, stdin: bool, tty: bool) -> Result<i32> {
    let (conn, resp) = CtlConn::open(sock, &CtlRequest::AttachExec { pid, stdin }).await?;
    match resp {
        CtlResponse::Started { .. } => {}
        CtlResponse::Error { message, exit_code } => {
            eprintln!("kiln: {}", sanitize(&message));
            return Ok(exit_code.unwrap_or(125));
        }
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
    stream(sock, conn, pid, stdin, tty, false, &mut || {}).await
}

async fn stream(
    sock: &Path,
    conn: CtlConn,
    pid: u32,
    stdin: bool,
    tty: bool,
    main: bool,
    at_exit: &mut dyn FnMut(),
) -> Result<i32> {
    let CtlConn {
        mut reader,
        mut writer,
    } = conn;
    let _raw = if tty { term::RawMode::enable() } else { None };
    let (tx, mut rx) = mpsc::channel::<Input>(16);
    // Writer task: everything the user sends.
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let r = match msg {
                Input::Data(b) => writer.data(Channel::Stdin, &b).await,
                Input::Eof => writer.eof(Channel::Stdin).await,
                Input::Signal(signal) => {
                    writer
                        .json(Kind::Request, &Request::Signal { pid, signal })
                        .await
                }
                Input::Resize(rows, cols) => {
                    writer
                        .json(Kind::Request, &Request::Resize { pid, rows, cols })
                        .await
                }
            };
            if r.is_err() {
                break;
            }
        }
        writer
    });
    if stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut inp = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match inp.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Input::Eof).await;
                        break;
                    }
                    Ok(n) => {
                        if tx.send(Input::Data(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    // Signals: the first Ctrl-C (or SIGTERM) goes to the process; a second
    // Ctrl-C tears the sandbox down (for `run`) or detaches (for `exec`).
    {
        let tx = tx.clone();
        let sock = sock.to_path_buf();
        // Registered here, before any output is shown: a Ctrl-C that
        // follows the first output must never find the default handler.
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term, mut winch) = (
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            signal(SignalKind::window_change()).context("cannot handle SIGWINCH")?,
        );
        tokio::spawn(async move {
            let mut interrupts = 0;
            loop {
                tokio::select! {
                    _ = int.recv() => {
                        interrupts += 1;
                        if interrupts == 1 {
                            let _ = tx.send(Input::Signal(2)).await;
                        } else {
                            if main {
                                eprintln!("kiln: second interrupt, tearing the sandbox down");
                                let _ = CtlConn::open(&sock, &CtlRequest::Kill).await;
                                // The killed process's exit (137) reaches the
                                // output loop, which returns it once the VM is
                                // gone; exit here only if that never happens.
                                tokio::time::sleep(std::time::Duration::from_secs(40)).await;
                            }
                            std::process::exit(130);
                        }
                    }
                    _ = term.recv() => { let _ = tx.send(Input::Signal(15)).await; }
                    _ = winch.recv() => {
                        if let (Some(r), Some(c)) = term::size() {
                            let _ = tx.send(Input::Resize(r, c)).await;
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    let code = loop {
        let Some(f) = reader.next().await? else {
            bail!("the sandbox supervisor closed the connection before the process ended");
        };
        match f.kind {
            Kind::Data => {
                let (ch, bytes) = f.data()?;
                match ch {
                    Channel::Stdout => {
                        out.write_all(bytes).await?;
                        out.flush().await?;
                        mark_output();
                    }
                    Channel::Stderr => {
                        err.write_all(bytes).await?;
                        err.flush().await?;
                        mark_output();
                    }
                    _ => {}
                }
            }
            Kind::Event => {
                if let Ok(proto::Event::Exit { status, .. }) = f.json::<proto::Event>("event") {
                    at_exit();
                    break status.shell_code();
                }
            }
            _ => {}
        }
    };
    writer_task.abort();
    Ok(code)
}

/// `ID:/path` or a local path.
pub(crate) enum Loc {
    Sandbox(String, String),
    Local(PathBuf),
}

pub(crate) fn parse_loc(s: &str) -> Loc {
    if let Some((id, path)) = s.split_once(':')
        && !id.is_empty()
        && !id.contains('/')
        && id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Loc::Sandbox(id.to_string(), path.to_string());
    }
    Loc::Local(PathBuf::from(s))
}

/// `kiln cp`. Ctrl-C (or SIGTERM) cancels it: nothing is left on either
/// side (a file being replaced in the sandbox keeps its old content, a
/// partial copy on the host is removed) and the exit code is 130.
pub async fn cp(node: &kiln_node::node::Node, src: &str, dst: &str) -> Result<i32> {
    let mut cancel = Cancel::on_signals()?;
    let outcome = match (parse_loc(src), parse_loc(dst)) {
        (Loc::Sandbox(id, path), Loc::Local(local)) => {
            let (_, sock) = node.active_socket(&id)?;
            copy_out(&sock, &path, &local, &mut cancel).await?
        }
        (Loc::Local(local), Loc::Sandbox(id, path)) => {
            let (_, sock) = node.active_socket(&id)?;
            copy_in(&sock, &local, &path, &mut cancel).await?
        }
        _ => bail!("kiln cp needs exactly one side in a sandbox: ID:/path"),
    };
    match outcome {
        Outcome::Done => Ok(0),
        Outcome::Cancelled => {
            eprintln!("kiln: copy cancelled");
            Ok(130)
        }
    }
}

/// How a copy ended (errors aside).
enum Outcome {
    Done,
    Cancelled,
}

/// Set once the user interrupted the command.
pub(crate) struct Cancel(tokio::sync::watch::Receiver<bool>);

impl Cancel {
    /// Listens for SIGINT and SIGTERM from now on.
    pub(crate) fn on_signals() -> Result<Cancel> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(true);
            // Stay registered: a second Ctrl-C must not kill us half-way
            // through removing what the copy left.
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
        });
        Ok(Cancel(rx))
    }

    /// Resolves once cancelled.
    pub(crate) async fn wait(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Splits a guest destination into (directory, name): `dir/` keeps the
/// source's name, anything else names the copy.
pub(crate) fn guest_target(path: &str, src_name: &str) -> Result<(String, String)> {
    if !path.starts_with('/') {
        bail!("the path in the sandbox must be absolute: {path:?}");
    }
    if path.ends_with('/') {
        return Ok((path.to_string(), src_name.to_string()));
    }
    let p = Path::new(path);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "..")
        .context("the destination has no file name")?;
    let dir = p
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    Ok((dir, name))
}

/// Describes a path in the sandbox; `None` when it does not exist.
async fn guest_stat(sock: &Path, path: &str) -> Result<Option<proto::FileStat>> {
    let (_conn, resp) = CtlConn::open(
        sock,
        &CtlRequest::Stat {
            path: path.to_string(),
        },
    )
    .await?;
    match resp {
        CtlResponse::Stat { stat } => Ok(stat),
        CtlResponse::Error { message, .. } => bail!("{}", sanitize(&message)),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}

async fn copy_in(sock: &Path, local: &Path, path: &str, cancel: &mut Cancel) -> Result<Outcome> {
    let from_stdin = local == Path::new("-");
    let (dest, name) = if from_stdin {
        (path.to_string(), String::new())
    } else {
        let src_name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", local.display()))?;
        // Like `docker cp`: an existing directory receives the source under
        // its own name; anything else is the name of the copy.
        let into_dir = !path.ends_with('/')
            && matches!(guest_stat(sock, path).await?, Some(st) if st.kind == proto::FileKind::Dir);
        if into_dir {
            guest_target(&format!("{path}/"), &src_name)?
        } else {
            guest_target(path, &src_name)?
        }
    };
    let meta = if from_stdin {
        None
    } else {
        Some(std::fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?)
    };
    let (conn, resp) = CtlConn::open(sock, &CtlRequest::CopyIn { dest: dest.clone() }).await?;
    match resp {
        CtlResponse::Ok => {}
        CtlResponse::Error { message, .. } => bail!("{}", sanitize(&message)),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
    let CtlConn {
        mut reader,
        mut writer,
    } = conn;
    // The tar stream is produced on a blocking thread and sent in chunks.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let local = local.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let w = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        if from_stdin {
            let mut w = w;
            std::io::copy(&mut std::io::stdin().lock(), &mut w)?;
            w.finish()
        } else {
            let mut b = tar::Builder::new(w);
            b.follow_symlinks(false);
            if meta.is_some_and(|m| m.is_dir()) {
                b.append_dir_all(&name, &local)?;
            } else {
                b.append_path_with_name(&local, &name)?;
            }
            let w = b.into_inner()?;
            w.finish()
        }
    });
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => c,
            () = cancel.wait() => {
                // Closing the connection without an end of archive makes
                // the supervisor cancel the copy; the guest removes the
                // file it was writing and keeps the one it replaced.
                drop(writer);
                drop(reader);
                drop(rx);
                if !from_stdin {
                    let _ = producer.await;
                }
                return Ok(Outcome::Cancelled);
            }
        };
        let Some(chunk) = chunk else { break };
        writer.data(Channel::Tar, &chunk?).await?;
    }
    producer
        .await
        .context("tar producer failed")?
        .context("cannot read the files to copy")?;
    writer.eof(Channel::Tar).await?;
    // The supervisor answers once the guest wrote everything.
    let f = reader
        .next()
        .await?
        .context("the supervisor closed the connection before the copy finished")?;
    let resp: CtlResponse = f.json("copy result")?;
    match resp {
        CtlResponse::Ok => Ok(Outcome::Done),
        CtlResponse::Error { message, .. } => {
            bail!(
                "copy into {} failed: {}",
                sanitize(&dest),
                sanitize(&message)
            )
        }
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}

pub(crate) const CHUNK: usize = 256 * 1024;

/// A `Write` that sends fixed-size chunks to an async consumer.
pub(crate) struct ChunkWriter {
    pub(crate) tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
    pub(crate) buf: Vec<u8>,
}

impl ChunkWriter {
    fn flush_buf(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "copy aborted"))
    }

    pub(crate) fn finish(mut self) -> std::io::Result<()> {
        self.flush_buf()
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn copy_out(sock: &Path, path: &str, local: &Path, cancel: &mut Cancel) -> Result<Outcome> {
    let to_stdout = local == Path::new("-");
    // Where the top-level entry goes: into an existing directory under its
    // own name, or to `local` itself.
    let (target_dir, rename) = if to_stdout {
        (PathBuf::new(), None)
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
        reap_stale_copies(&target_dir);
    }
    let (conn, resp) = CtlConn::open(
        sock,
        &CtlRequest::CopyOut {
            path: path.to_string(),
        },
    )
    .await?;
    match resp {
        CtlResponse::Ok => {}
        CtlResponse::Error { message, .. } => bail!("{}", sanitize(&message)),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
    let CtlConn { mut reader, .. } = conn;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let consumer = tokio::task::spawn_blocking(move || -> Result<()> {
        let r = ChunkReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        if to_stdout {
            let mut r = r;
            std::io::copy(&mut r, &mut std::io::stdout().lock())?;
            return Ok(());
        }
        unpack_from_guest(r, &target_dir, rename.as_deref())
    });
    let mut ok = false;
    loop {
        let f = tokio::select! {
            f = reader.next() => f?,
            () = cancel.wait() => {
                // The consumer sees the stream end early, fails, and removes
                // its temporary directory; the supervisor sees us go and
                // stops the guest's side.
                drop(reader);
                drop(tx);
                if !to_stdout {
                    let _ = consumer.await;
                }
                return Ok(Outcome::Cancelled);
            }
        };
        let Some(f) = f else { break };
        match f.kind {
            Kind::Data => {
                let (_, bytes) = f.data()?;
                if tx.send(bytes.to_vec()).is_err() {
                    break;
                }
            }
            Kind::Eof => {
                ok = true;
                break;
            }
            Kind::Response => {
                if let Ok(CtlResponse::Error { message, .. }) = f.json::<CtlResponse>("copy result")
                {
                    bail!(
                        "copy out of {} failed: {}",
                        sanitize(path),
                        sanitize(&message)
                    );
                }
            }
            _ => {}
        }
    }
    drop(tx);
    consumer.await.context("tar consumer failed")??;
    if !ok {
        bail!("the copy of {} ended early", sanitize(path));
    }
    Ok(Outcome::Done)
}

struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Prefix of the temporary directories copies out of a sandbox unpack into.
pub const COPY_TEMP_PREFIX: &str = ".kiln-cp-";

/// A temporary directory younger than this is never reaped: its creator
/// may not have locked it yet.
const REAP_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(2);

/// Removes the temporary directories of copies into `dir` whose `kiln cp`
/// died (SIGKILL, a crash, power loss). A live copy holds an exclusive
/// `flock` on its directory for as long as it runs, so a directory that can
/// be locked (and is not brand new) has no owner.
pub fn reap_stale_copies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(COPY_TEMP_PREFIX) {
            continue;
        }
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir()
            || meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_none_or(|age| age < REAP_MIN_AGE)
        {
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        if let Ok(lock) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            tracing::info!(path = %path.display(), "removing the leftover of a killed kiln cp");
            let _ = std::fs::remove_dir_all(&path);
            drop(lock);
        }
    }
}

/// A tar error caused by what the sandbox sent; its text (which may quote
/// guest bytes) is escaped.
fn malformed(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "the sandbox sent a malformed archive: {}",
        sanitize(&e.to_string())
    )
}

/// Unpacks a tar stream from a guest (hostile input) into `dir`, renaming
/// the top-level entry to `rename` if given. `tar`'s `unpack_in` refuses
/// entries that would land outside the directory it unpacks into; we unpack
/// into a fresh temporary directory inside `dir` (locked while we work, see
/// `reap_stale_copies`) and move the result.
pub(crate) fn unpack_from_guest(
    r: impl std::io::Read,
    dir: &Path,
    rename: Option<&std::ffi::OsStr>,
) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix(COPY_TEMP_PREFIX)
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
    let _lock = std::fs::File::open(tmp.path())
        .ok()
        .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok());
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    // Files from the guest are untrusted: never setuid, setgid or sticky on the host.
    ar.set_mask(0o7000);
    let mut top: Option<std::ffi::OsString> = None;
    for entry in ar.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let path = entry.path().map_err(malformed)?.into_owned();
        let mut comps = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir));
        let Some(std::path::Component::Normal(first)) = comps.next() else {
            bail!(
                "the sandbox sent a malformed archive: unsafe path {}",
                kiln_api::text::sanitize_bytes(path.as_os_str().as_encoded_bytes())
            );
        };
        match &top {
            None => top = Some(first.to_os_string()),
            Some(t) if t.as_os_str() != first => {
                bail!("the sandbox sent a malformed archive: more than one top-level entry")
            }
            _ => {}
        }
        match entry.unpack_in(tmp.path()) {
            Ok(true) => {}
            Ok(false) => bail!(
                "the sandbox sent a malformed archive: unsafe path {}",
                kiln_api::text::sanitize_bytes(path.as_os_str().as_encoded_bytes())
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull
                        | std::io::ErrorKind::PermissionDenied
                        | std::io::ErrorKind::ReadOnlyFilesystem
                        | std::io::ErrorKind::QuotaExceeded
                        | std::io::ErrorKind::FileTooLarge
                ) =>
            {
                bail!(
                    "cannot write the copy into {}: {}",
                    dir.display(),
                    sanitize(&e.to_string())
                )
            }
            Err(e) => return Err(malformed(e)),
        }
    }
    let Some(top) = top else {
        bail!("the sandbox sent an empty tar stream");
    };
    let name = rename
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| top.clone());
    let target = dir.join(&name);
    merge_into(&tmp.path().join(&top), &target)
}

/// Moves `src` to `dst`; a directory onto an existing directory is merged
/// (like `docker cp`): files replace files, directories merge.
fn merge_into(src: &Path, dst: &Path) -> Result<()> {
    let dst_meta = std::fs::symlink_metadata(dst).ok();
    let src_is_dir = std::fs::symlink_metadata(src)
        .map(|m| m.is_dir())
        .unwrap_or(false);
    match dst_meta {
        Some(m) if m.is_dir() && src_is_dir => {
            for e in
                std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))?
            {
                let e = e?;
                merge_into(&e.path(), &dst.join(e.file_name()))?;
            }
            Ok(())
        }
        Some(m) if m.is_dir() => bail!(
            "cannot overwrite the directory {} with a file",
            dst.display()
        ),
        Some(_) if src_is_dir => bail!(
            "cannot overwrite the file {} with a directory",
            dst.display()
        ),
        _ => std::fs::rename(src, dst)
            .with_context(|| format!("cannot move the copy to {}", dst.display())),
    }
}
