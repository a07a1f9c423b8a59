//! The sandbox commands (`run`, `exec`, `cp`, `logs`, `ps`, `inspect`,
//! `stop`, `rm`, `pause`, `resume`, `wait`) as clients of a Kiln server's
//! REST API, used when a server is configured (`--server`, `KILN_SERVER`, a context
//! of `~/.config/kiln/config.toml`, or a running `kiln up`: see
//! `admin::api_route`).
//!
//! Invariants:
//! - Same flags, output and exit codes as the node-local path
//!   (`commands.rs`, `attach.rs`): the command's own exit code for `run`
//!   and `exec`, 125 and `kiln: MESSAGE` for Kiln's errors (an API error
//!   shows the server's message and code).
//! - No sandbox logic: a flag becomes a [`SandboxSpec`] (built by
//!   `commands::run_request`, shared with the local path) or a request;
//!   streams speak `kiln_api::stream` (WebSocket for attach/exec, NDJSON
//!   logs, tar files).
//! - The transport is `admin::Client` (HTTP requests, and `Client::ws` for
//!   WebSockets over TCP, TLS or `kiln up`'s Unix socket); the sessions
//!   are in `client_stream.rs`, `kiln cp` in `client_cp.rs`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use kiln_api::rest::{ErrorBody, Sandbox, SandboxList, WaitResult};
use kiln_api::sandbox::{SandboxId, SandboxState};
use kiln_api::stream::{AttachStart, ExecStart, LogRecord, LogStreamName, ServerMsg};
use kiln_api::text::sanitize;

use crate::admin::{Client, Conn, Output};
use crate::attach;
use crate::client_stream::{End, detached_start, open_ws, session};
use crate::{Command, ExecArgs, RunArgs, commands, term};

/// The largest JSON answer read from the server (a page of 1,000
/// sandboxes with large specs fits).
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// What [`try_dispatch`] did with a command.
pub enum Routed {
    /// Ran through the API.
    Done(Result<i32>),
    /// Not an API command, or no server configured: run it locally.
    Local(Box<Command>),
}

/// The connection the flags and environment give: `--server`, else
/// `KILN_SERVER`; the token from `KILN_TOKEN`/`KILN_TOKEN_FILE`; `KILN_CA`;
/// `KILN_CONTEXT` (else the config's current context).
fn conn(flag: Option<String>) -> Conn {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    Conn {
        server: flag.or_else(|| env("KILN_SERVER")),
        token: env("KILN_TOKEN"),
        token_file: env("KILN_TOKEN_FILE").map(Into::into),
        ca: env("KILN_CA").map(Into::into),
        context: env("KILN_CONTEXT"),
        output: Output::Table,
    }
}

/// Runs `cmd` through the API if it is a sandbox command and a server is
/// configured (`server`: the `--server` flag).
pub async fn try_dispatch(cmd: Command, server: Option<String>) -> Routed {
    let api_cmd = matches!(
        cmd,
        Command::Run(_)
            | Command::Exec(_)
            | Command::Cp { .. }
            | Command::Logs { .. }
            | Command::Ps { .. }
            | Command::Inspect { .. }
            | Command::Stop { .. }
            | Command::Rm { .. }
            | Command::Pause { .. }
            | Command::Resume { .. }
            | Command::Wait { .. }
            | Command::Snapshot(_)
            | Command::Restore { .. }
            | Command::Fork { .. }
            | Command::Images { .. }
    ) || matches!(&cmd, Command::Template { command } if !node_internal(command));
    if !api_cmd {
        // (`kiln node --server` is its own flag: clap hands its value to
        // the global one too.)
        if server.is_some() && !matches!(cmd, Command::Node(_)) {
            return Routed::Done(Err(anyhow::anyhow!(
                "--server: this command runs on this host only (the sandbox commands \
                 run, exec, cp, logs, ps, inspect, stop, rm, pause, resume, wait, \
                 snapshot, restore, fork, template and images go through a server)"
            )));
        }
        return Routed::Local(Box::new(cmd));
    }
    // Removing this host's cached images (`images rm`, `prune`) is the
    // host owner's act, not a tenant's: with no server named it is this
    // host's node service's (the same one `kiln up` runs); a named server
    // takes it with the caller's token (an admin's).
    if matches!(
        &cmd,
        Command::Images {
            command: crate::ImagesCommand::Rm { .. } | crate::ImagesCommand::Prune
        }
    ) {
        match crate::admin::explicit_server(&conn(server.clone())) {
            Ok(false) => return Routed::Local(Box::new(cmd)),
            Ok(true) => {}
            Err(e) => return Routed::Done(Err(e)),
        }
    }
    // A server named by the flag, the environment or a context; else the
    // `kiln up` of this state directory (or one started now, unless
    // `KILN_AUTO_UP=0`); else this host's node service.
    match crate::admin::api_route(&conn(server)).await {
        Ok(Some(c)) => Routed::Done(dispatch(&c, cmd).await),
        Ok(None) => Routed::Local(Box::new(cmd)),
        Err(e) => Routed::Done(Err(e)),
    }
}

/// The template commands the node service runs itself in the background
/// (after a cold start, after a pool claim): always this host's.
fn node_internal(cmd: &crate::templates::TemplateCommand) -> bool {
    use crate::templates::TemplateCommand as T;
    matches!(
        cmd,
        T::Create { auto: true, .. }
            | T::Create {
                when_idle: true,
                ..
            }
            | T::Fill { .. }
    )
}

async fn dispatch(conn: &Conn, cmd: Command) -> Result<i32> {
    let api = Api(Client::new(conn)?);
    match cmd {
        Command::Snapshot(a) => crate::client_snap::snapshot_cmd(conn, a).await,
        Command::Restore { snapshot, detach } => {
            crate::client_snap::restore(conn, &snapshot, detach).await
        }
        Command::Fork { id, count } => crate::client_snap::fork(conn, &id, count).await,
        Command::Template { command } => crate::client_tpl::template(conn, command).await,
        Command::Images { command } => crate::client_tpl::images(conn, command).await,
        Command::Run(args) => run(&api, *args).await,
        Command::Exec(args) => exec(&api, args).await,
        Command::Cp { src, dst } => crate::client_cp::cp(&api, &src, &dst).await,
        Command::Logs { follow, id } => {
            let id = api.resolve(&id).await?;
            logs(&api, &id, follow).await.map(|_| 0)
        }
        Command::Ps { all, quiet } => ps(&api, all, quiet).await,
        Command::Inspect { ids } => {
            let api = &api;
            let mut code = 0;
            for id in ids {
                let r = async move {
                    let id = api.resolve(&id).await?;
                    let b = api.call("GET", &format!("/sandboxes/{id}"), None).await?;
                    let v: serde_json::Value = serde_json::from_slice(&b)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    anyhow::Ok(())
                }
                .await;
                if let Err(e) = r {
                    eprintln!("kiln: {e:#}");
                    code = 1;
                }
            }
            Ok(code)
        }
        Command::Stop { time, ids } => {
            let api = &api;
            commands::each(ids, |id| async move {
                let id = api.resolve(&id).await?;
                // Without -t the node's own grace time (`--stop-grace`).
                let query = time.map_or(String::new(), |t| format!("?timeout_secs={t}"));
                api.call("POST", &format!("/sandboxes/{id}/stop{query}"), None)
                    .await?;
                // As the local stop: return once it has ended (the node
                // kills it after its grace time).
                let grace = time.unwrap_or(commands::DEFAULT_STOP_GRACE);
                api.wait_finished(&id, Duration::from_secs(grace.saturating_add(60)))
                    .await?;
                Ok(id)
            })
            .await
        }
        Command::Rm { force, ids } => {
            let api = &api;
            commands::each(ids, |id| async move {
                let id = api.resolve(&id).await?;
                if !force {
                    let sb = api.get(&id).await?;
                    if !sb.state.is_finished() {
                        bail!("sandbox {id} is running: stop it first or use rm -f");
                    }
                }
                api.call("DELETE", &format!("/sandboxes/{id}"), None)
                    .await?;
                api.wait_gone(&id, Duration::from_secs(60)).await?;
                Ok(id)
            })
            .await
        }
        Command::Pause { id } => {
            let id = api.resolve(&id).await?;
            api.call("POST", &format!("/sandboxes/{id}/pause"), None)
                .await?;
            api.wait_state(&id, "paused", |s| matches!(s, SandboxState::Paused { .. }))
                .await?;
            println!("{id}");
            Ok(0)
        }
        Command::Resume { id } => {
            let id = api.resolve(&id).await?;
            api.call("POST", &format!("/sandboxes/{id}/resume"), None)
                .await?;
            api.wait_state(&id, "running", |s| {
                matches!(s, SandboxState::Running { .. })
            })
            .await?;
            println!("{id}");
            Ok(0)
        }
        Command::Wait { ids } => {
            let mut code = 0;
            for id in ids {
                let r = async {
                    let id = api.resolve(&id).await?;
                    let sb = api.wait_finished(&id, Duration::MAX).await?;
                    anyhow::Ok(sb.state.exit_code().unwrap_or(125))
                }
                .await;
                match r {
                    Ok(c) => println!("{c}"),
                    Err(e) => {
                        eprintln!("kiln: {e:#}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        _ => bail!("not an API command"),
    }
}

/// An API error: the server's status, code and message.
#[derive(Debug)]
pub(crate) struct ApiErr {
    status: u16,
    code: String,
    message: String,
}

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (HTTP {}, {})",
            sanitize(&self.message),
            self.status,
            sanitize(&self.code)
        )
    }
}

impl std::error::Error for ApiErr {}

pub(crate) fn api_err(status: u16, body: &[u8]) -> ApiErr {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ApiErr {
            status,
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) => ApiErr {
            status,
            code: "http_error".into(),
            message: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        },
    }
}

pub(crate) fn is_status(e: &anyhow::Error, status: u16) -> bool {
    e.downcast_ref::<ApiErr>()
        .is_some_and(|a| a.status == status)
}

/// The API client (`admin::Client`: HTTP and WebSockets over TCP, TLS or
/// the `kiln up` socket) and what the sandbox commands ask of it.
pub(crate) struct Api(pub(crate) Client);

impl Api {
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.0.request(method, path)
    }

    pub(crate) async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let r = rb
            .send()
            .await
            .with_context(|| format!("cannot reach the server {}", self.0.server()))?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap_or_default();
        Err(api_err(status, &body).into())
    }

    async fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let mut rb = self.request(method.parse()?, path);
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        // A JSON answer is small: a server sending more is not believed.
        let mut r = self.send(rb).await?;
        let mut out = Vec::new();
        while let Some(c) = r.chunk().await? {
            if out.len() + c.len() > MAX_ANSWER {
                bail!("the server's answer is larger than {MAX_ANSWER} bytes");
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    pub(crate) async fn get(&self, id: &str) -> Result<Sandbox> {
        let b = self.call("GET", &format!("/sandboxes/{id}"), None).await?;
        Ok(serde_json::from_slice(&b)?)
    }

    /// Every sandbox the caller sees, page by page.
    async fn list(&self) -> Result<Vec<Sandbox>> {
        let mut out = vec![];
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!(
                    "/sandboxes?cursor={}",
                    form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
                ),
                None => "/sandboxes".into(),
            };
            let page: SandboxList = serde_json::from_slice(&self.call("GET", &path, None).await?)?;
            out.extend(page.items);
            match page.next {
                Some(n) if !n.is_empty() && Some(&n) != cursor.as_ref() => cursor = Some(n),
                _ => return Ok(out),
            }
        }
    }

    /// A full ID from an ID or a unique prefix of one (as the local path).
    pub(crate) async fn resolve(&self, prefix: &str) -> Result<String> {
        if SandboxId::is_valid(prefix) {
            return Ok(prefix.to_owned());
        }
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("no sandbox matches {prefix:?}");
        }
        let m: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .map(|s| s.id.to_string())
            .filter(|id| id.starts_with(prefix))
            .collect();
        match m.len() {
            0 => bail!("no sandbox matches {prefix:?}"),
            1 => Ok(m.into_iter().next().unwrap_or_default()),
            _ => bail!("{prefix:?} matches several sandboxes: {m:?}"),
        }
    }

    /// Polls until the sandbox left `creating` (running, ended already,
    /// or failed to start).
    pub(crate) async fn started(&self, id: &str) -> Result<Sandbox> {
        let t0 = Instant::now();
        loop {
            let sb = self.get(id).await?;
            if !matches!(sb.state, SandboxState::Creating | SandboxState::Pooled) {
                return Ok(sb);
            }
            // Often at first (a pooled start runs within ~50 ms; a GET
            // costs well under a millisecond), then less: each is a read
            // the leader confirms with a quorum.
            let pause = match t0.elapsed().as_millis() {
                0..100 => 2,
                100..2000 => 20,
                _ => 25,
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// Long-polls `wait` until the sandbox has ended (or `limit` ran out).
    async fn wait_finished(&self, id: &str, limit: Duration) -> Result<Sandbox> {
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed()).as_secs().clamp(1, 30);
            let b = self
                .call(
                    "GET",
                    &format!("/sandboxes/{id}/wait?timeout_secs={left}"),
                    None,
                )
                .await?;
            let w: WaitResult = serde_json::from_slice(&b)?;
            if w.finished {
                return Ok(w.sandbox);
            }
            if t0.elapsed() >= limit {
                bail!("sandbox {id} did not end within {} s", limit.as_secs());
            }
        }
    }

    /// Polls until the node reports `want` (or the sandbox ended).
    async fn wait_state(
        &self,
        id: &str,
        what: &str,
        want: impl Fn(&SandboxState) -> bool,
    ) -> Result<Sandbox> {
        let t0 = Instant::now();
        loop {
            let sb = self.get(id).await?;
            if want(&sb.state) {
                return Ok(sb);
            }
            if sb.state.is_finished() {
                bail!("sandbox {id} is not running ({})", sb.state.label());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("sandbox {id} is not {what} after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `--rm`: the server keeps an ended sandbox until it is deleted
    /// (`auto_remove` is not acted on by the cluster yet), so the client
    /// deletes it and returns once it is gone.
    pub(crate) async fn remove(&self, id: &str) -> Result<()> {
        match self.call("DELETE", &format!("/sandboxes/{id}"), None).await {
            Err(e) if is_status(&e, 404) => return Ok(()),
            r => r?,
        };
        self.wait_gone(id, Duration::from_secs(30)).await
    }

    /// Polls until the sandbox is forgotten (removed on its node).
    async fn wait_gone(&self, id: &str, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            match self.get(id).await {
                Err(e) if is_status(&e, 404) => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) if t0.elapsed() > limit => {
                    bail!("sandbox {id} was not removed within {} s", limit.as_secs())
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// `kiln run` through the API.
async fn run(api: &Api, args: RunArgs) -> Result<i32> {
    let t0 = Instant::now();
    let req = commands::run_request(&args)?;
    if !args.insecure.is_empty() {
        bail!(
            "--insecure-registry is the node's setting through the API: start the node (kiln up, kiln node) with --insecure-registry"
        );
    }
    let mut spec = req.spec;
    // An attached `--rm` run deletes the sandbox itself once it has the
    // exit (below): were the node to remove it on its own, a command that
    // ends before the attach could take its output with it.
    if !args.detach {
        spec.auto_remove = false;
    }
    let body = serde_json::to_vec(&spec)?;
    let key = format!("kiln-run-{}", SandboxId::from_random(rand_bytes()));
    // Retried with the same key when no answer came or the server had no
    // leader for a moment: the sandbox is created once.
    let mut attempt = 0;
    let r = loop {
        attempt += 1;
        let r = api
            .send(
                api.request(reqwest::Method::POST, "/sandboxes")
                    .header("content-type", "application/json")
                    .header("idempotency-key", &key)
                    .body(body.clone()),
            )
            .await;
        match r {
            Err(e) if attempt < 5 && e.downcast_ref::<ApiErr>().is_none_or(|a| a.status == 503) => {
                tracing::debug!(error = %format!("{e:#}"), attempt, "create retried");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            r => break r?,
        }
    };
    let sb: Sandbox = serde_json::from_slice(&r.bytes().await?)?;
    let id = sb.id.to_string();
    let sb = api.started(&id).await?;
    let ready_ms = t0.elapsed().as_millis() as u64;
    if args.verbose {
        verbose_start(&sb, ready_ms);
    }
    if let Some(code) = start_failure(&sb) {
        if args.rm {
            let _ = api.remove(&id).await;
        }
        return Ok(code);
    }
    if args.detach {
        println!("{id}");
        if args.verbose {
            eprintln!("kiln: {}", timing_line(&sb, ready_ms, t0, None, None));
        }
        return Ok(0);
    }
    attach_main(
        api,
        &id,
        Attach {
            interactive: args.process.interactive,
            tty: args.process.tty,
            rm: args.rm,
            timeout: args.timeout,
            verbose: args.verbose.then_some(Verbose {
                sandbox: sb,
                ready_ms,
            }),
            t0,
        },
    )
    .await
}

/// `kiln run -v`'s lines once the sandbox runs: the node's notes (image,
/// warm or why cold) and where and how it started.
pub(crate) fn verbose_start(sb: &Sandbox, ready_ms: u64) {
    let start = sb.start.as_ref();
    for n in start.map(|s| s.notes.as_slice()).unwrap_or_default() {
        eprintln!("kiln: {}", sanitize(n));
    }
    if matches!(sb.state, SandboxState::Failed { .. }) {
        // It could not start: the caller says why.
        return;
    }
    eprintln!(
        "kiln: sandbox {} running on node {} ({}, {ready_ms} ms after the command started)",
        sb.id,
        sb.node.as_ref().map_or("?", |n| n.as_str()),
        start.map_or("start not reported", |s| s.path.describe()),
    );
}

/// `timing: resolve 2 ms, …, on the node 812 ms, agent ready at 850 ms, …`:
/// the node's phases of the start, then what this command saw (since it
/// started): the sandbox running, first byte, exit, teardown, total.
pub(crate) fn timing_line(
    sb: &Sandbox,
    ready_ms: u64,
    t0: Instant,
    exit_ms: Option<u64>,
    teardown_ms: Option<u64>,
) -> String {
    let mut parts = vec![];
    if let Some(s) = &sb.start {
        parts.extend(
            s.phases
                .iter()
                .map(|p| format!("{} {} ms", sanitize(&p.name), p.ms)),
        );
        parts.push(format!("on the node {} ms", s.ready_ms));
    }
    parts.push(format!("agent ready at {ready_ms} ms"));
    if let Some(first) = crate::attach::first_output() {
        parts.push(format!(
            "first byte at {} ms",
            first.saturating_duration_since(t0).as_millis()
        ));
    }
    if let Some(e) = exit_ms {
        parts.push(format!("exit at {e} ms"));
    }
    if let Some(t) = teardown_ms {
        parts.push(format!("teardown {t} ms"));
    }
    parts.push(format!("total {} ms", t0.elapsed().as_millis()));
    format!("timing: {}", parts.join(", "))
}

/// What `-v` prints at the end of an attached run.
pub(crate) struct Verbose {
    /// The sandbox as it was seen running.
    pub sandbox: Sandbox,
    /// When it was seen running (since the command started).
    pub ready_ms: u64,
}

/// How [`attach_main`] follows a sandbox's main process.
pub(crate) struct Attach {
    pub interactive: bool,
    pub tty: bool,
    /// Delete the sandbox once it ended (and when the stream broke).
    pub rm: bool,
    /// The `--timeout` it was started with (for the message).
    pub timeout: Option<u64>,
    /// `-v`: the timing line at the end.
    pub verbose: Option<Verbose>,
    pub t0: Instant,
}

/// A sandbox that failed to start: its error printed (one line), and the
/// exit code `kiln run` returns for it (125 when Kiln could not start it;
/// 126/127 when the command cannot be run, as on the local path).
pub(crate) fn start_failure(sb: &Sandbox) -> Option<i32> {
    let SandboxState::Failed { error, exit_code } = &sb.state else {
        return None;
    };
    eprintln!("kiln: {}", sanitize(error));
    Some(if matches!(exit_code, 126 | 127) {
        *exit_code
    } else {
        125
    })
}

/// Attaches to sandbox `id`'s main process (its output from the start),
/// forwards stdin, the terminal and signals, and returns its exit code
/// once the server has seen the end.
pub(crate) async fn attach_main(api: &Api, id: &str, o: Attach) -> Result<i32> {
    let attached = async {
        let start = serde_json::to_string(&AttachStart {
            stdin: o.interactive,
            replay: true,
            pid: None,
        })?;
        let ws = open_ws(api, &format!("/sandboxes/{id}/attach")).await?;
        let code = match session(ws, start, o.interactive, o.tty, true).await? {
            End::Exit(c) => c,
            // It ended before we attached: its output is in the log (followed,
            // so that the node waits for the end to be recorded).
            End::NotStarted(m) => {
                let known = match &m {
                    ServerMsg::Exit { exit_code, .. } => Some(*exit_code),
                    ServerMsg::Error { error } if error.code == "not_running" => None,
                    ServerMsg::Error { error } => {
                        bail!("{} ({})", sanitize(&error.message), sanitize(&error.code))
                    }
                    ServerMsg::Started { .. } => None,
                };
                let logged = logs(api, id, true).await?;
                known.or(logged).unwrap_or(125)
            }
        };
        anyhow::Ok(code)
    }
    .await;
    let code = match attached {
        Ok(code) => code,
        Err(e) => {
            // The stream broke (server restarted, refused the session):
            // `--rm` still means nothing is left behind, as locally.
            if o.rm
                && let Err(r) = api.remove(id).await
            {
                eprintln!("kiln: cannot remove sandbox {id}: {r:#}");
            }
            return Err(e);
        }
    };
    let exit_ms = o.t0.elapsed().as_millis() as u64;
    // As the local path: once `run` returns, the sandbox shows as ended
    // (and its resources are free for the next one). The node reports the
    // end on its own; a few seconds at most.
    // (An attached `--rm` run asked for no `auto_remove`: the node keeps
    // the sandbox until it is deleted below.)
    let ended = api.wait_finished(id, Duration::from_secs(10)).await;
    if let Ok(sb) = ended
        && matches!(
            sb.state,
            SandboxState::Exited {
                timed_out: true,
                ..
            }
        )
    {
        eprintln!(
            "kiln: the command was killed after its --timeout of {} s",
            o.timeout.unwrap_or(0)
        );
    }
    if o.rm
        && let Err(e) = api.remove(id).await
    {
        eprintln!("kiln: {e:#}");
    }
    if let Some(v) = &o.verbose {
        let teardown = (o.t0.elapsed().as_millis() as u64).saturating_sub(exit_ms);
        eprintln!(
            "kiln: {}",
            timing_line(&v.sandbox, v.ready_ms, o.t0, Some(exit_ms), Some(teardown))
        );
    }
    Ok(code)
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (n as u64) ^ (u64::from(std::process::id()) << 32);
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let x = u64::from_le_bytes(b) ^ mixed;
    x.to_le_bytes()
}

/// `kiln exec` through the API.
async fn exec(api: &Api, args: ExecArgs) -> Result<i32> {
    let mut rest = args.rest.clone();
    let id = rest.remove(0);
    if rest.first().map(String::as_str) == Some("--") {
        rest.remove(0);
    }
    let id = api.resolve(&id).await?;
    if let Some(pid) = args.attach {
        // Re-attach to a process `exec -d` started: its output so far, then
        // the rest, and its exit code.
        let start = serde_json::to_string(&AttachStart {
            stdin: args.process.interactive,
            replay: false,
            pid: Some(pid),
        })?;
        let ws = open_ws(api, &format!("/sandboxes/{id}/attach")).await?;
        return exec_end(
            session(ws, start, args.process.interactive, args.process.tty, false).await?,
        );
    }
    if rest.is_empty() {
        bail!("no command given: kiln exec ID -- CMD [ARGS...]");
    }
    let (rows, cols) = if args.process.tty {
        term::size()
    } else {
        (None, None)
    };
    let start = serde_json::to_string(&ExecStart {
        cmd: rest,
        env: commands::read_env(&args.process)?,
        cwd: args.process.workdir.clone(),
        user: args.process.user.clone(),
        tty: args.process.tty,
        rows,
        cols,
        stdin: args.process.interactive,
        detach: args.detach,
    })?;
    let ws = open_ws(api, &format!("/sandboxes/{id}/exec")).await?;
    if args.detach {
        // `exec -d`: the process's pid once it runs (as locally).
        return match detached_start(ws, start).await? {
            Ok(pid) => {
                println!("{pid}");
                Ok(0)
            }
            Err(end) => exec_end(end),
        };
    }
    exec_end(session(ws, start, args.process.interactive, args.process.tty, false).await?)
}

/// What `kiln exec` returns for the end of its session.
fn exec_end(end: End) -> Result<i32> {
    match end {
        End::Exit(c) => Ok(c),
        End::NotStarted(ServerMsg::Error { error }) => {
            eprintln!("kiln: {}", sanitize(&error.message));
            // As locally: 126/127 when the command cannot be run (the
            // node gives the code in `reason`), else 125.
            Ok(error
                .reason
                .as_deref()
                .and_then(|r| r.parse::<i32>().ok())
                .filter(|c| (1..=255).contains(c))
                .unwrap_or(125))
        }
        End::NotStarted(m) => bail!("unexpected answer from the server: {m:?}"),
    }
}

/// Prints a sandbox's output (following it with `follow`); the exit code
/// if the log ended with one.
async fn logs(api: &Api, id: &str, follow: bool) -> Result<Option<i32>> {
    let mut r = api
        .send(api.request(
            reqwest::Method::GET,
            &format!("/sandboxes/{id}/logs?follow={follow}"),
        ))
        .await?;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut buf: Vec<u8> = Vec::new();
    let mut code = None;
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        let chunk = r.chunk().await.context("the log stream broke")?;
        let done = chunk.is_none();
        if let Some(c) = chunk {
            buf.extend_from_slice(&c);
        }
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if line.len() <= 1 {
                continue;
            }
            match serde_json::from_slice::<LogRecord>(&line).context("a malformed log record")? {
                LogRecord::Output { stream, data } => {
                    let bytes = b64.decode(data).context("a malformed log record")?;
                    attach::mark_output();
                    match stream {
                        LogStreamName::Stdout => {
                            out.write_all(&bytes)?;
                            out.flush()?;
                        }
                        LogStreamName::Stderr => err.write_all(&bytes)?,
                    }
                }
                LogRecord::Dropped { bytes } => eprintln!(
                    "kiln: {bytes} bytes of earlier output were dropped (the log keeps the \
                     newest; set the size with kiln run --log-limit)"
                ),
                LogRecord::Exit { exit_code, .. } => code = Some(exit_code),
                LogRecord::Error { error } => {
                    bail!("{} ({})", sanitize(&error.message), sanitize(&error.code))
                }
            }
        }
        if done {
            break;
        }
        if buf.len() > 4 * 1024 * 1024 {
            bail!("a log record longer than 4 MiB");
        }
    }
    Ok(code)
}

/// `kiln ps` through the API.
async fn ps(api: &Api, all: bool, quiet: bool) -> Result<i32> {
    let mut items = api.list().await?;
    items.retain(|s| all || !s.state.is_finished());
    items.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
    let mut out = std::io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "{:<16}  {:<24}  {:<28}  {:<12}  COMMAND",
            "ID", "IMAGE", "STATUS", "CREATED"
        )?;
    }
    for s in items {
        if quiet {
            writeln!(out, "{}", s.id)?;
            continue;
        }
        let argv: Vec<&str> = s
            .spec
            .entrypoint
            .iter()
            .flatten()
            .chain(s.spec.cmd.iter())
            .map(String::as_str)
            .collect();
        let cmd: String = argv.join(" ").chars().take(40).collect();
        writeln!(
            out,
            "{:<16}  {:<24}  {:<28}  {:<12}  {}",
            s.id,
            commands::truncate(&sanitize(&s.spec.image), 24),
            s.state.label(),
            commands::ago(s.created_at_ms / 1000),
            sanitize(&cmd)
        )?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_show_the_servers_message_and_code() {
        let e = api_err(
            422,
            br#"{"error":{"code":"invalid_spec","message":"memory: too big"}}"#,
        );
        assert_eq!(e.to_string(), "memory: too big (HTTP 422, invalid_spec)");
        let e = api_err(502, b"bad gateway\x1b[31m");
        assert_eq!(e.code, "http_error");
        assert!(!e.to_string().contains('\x1b'), "{e}");
        let any: anyhow::Error = api_err(404, b"{}").into();
        assert!(is_status(&any, 404) && !is_status(&any, 422));
    }
}
