//! The stream sessions of the API client (`client_cmd.rs`): one
//! exec/attach session over a WebSocket (`admin::Client::ws`) with stdin,
//! tty, signals and window sizes (`kiln_api::stream`).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use kiln_api::stream::{ClientMsg, ServerMsg};
use kiln_api::text::sanitize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::client_cmd::{Api, api_err};
use crate::{attach, term};

pub(crate) use crate::admin::Ws;

/// Opens the WebSocket of `path` (`/sandboxes/ID/exec|attach`) through
/// the client's transport; an HTTP refusal is the server's error.
pub(crate) async fn open_ws(api: &Api, path: &str) -> Result<Ws> {
    match api.0.ws(path).await {
        Ok(ws) => Ok(ws),
        Err(e) => match e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            Some(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                Err(api_err(r.status().as_u16(), r.body().as_deref().unwrap_or_default()).into())
            }
            _ => Err(e),
        },
    }
}

/// What the input side sends.
pub(crate) enum Input {
    Data(Vec<u8>),
    Eof,
    Signal(i32),
    Resize(u16, u16),
}

/// How a stream session ended.
pub(crate) enum End {
    Exit(i32),
    /// The server refused or broke the stream before the process started.
    NotStarted(ServerMsg),
}

/// An `exec -d` session: the start message, then the process's pid
/// (`Ok`), or the server's refusal (`Err`); the server ends the session.
pub(crate) async fn detached_start(ws: Ws, start: String) -> Result<Result<u32, End>> {
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(start)).await?;
    let r = match next_msg(&mut stream).await? {
        Some(ServerMsg::Started { pid }) => Ok(pid),
        Some(m) => Err(End::NotStarted(m)),
        None => bail!("the server closed the stream before the process started"),
    };
    let _ = sink.close().await;
    Ok(r)
}

/// One exec/attach session: the start message, then stdin, signals and
/// window sizes one way, output the other, until `exit`.
pub(crate) async fn session(
    ws: Ws,
    start: String,
    stdin: bool,
    tty: bool,
    main: bool,
) -> Result<End> {
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(start)).await?;
    match next_msg(&mut stream).await? {
        Some(ServerMsg::Started { .. }) => {}
        Some(m) => return Ok(End::NotStarted(m)),
        None => bail!("the server closed the stream before the process started"),
    }
    let _raw = if tty { term::RawMode::enable() } else { None };
    let (tx, mut rx) = mpsc::channel::<Input>(16);
    let writer = tokio::spawn(async move {
        while let Some(i) = rx.recv().await {
            let m = match i {
                Input::Data(b) => {
                    let mut f = Vec::with_capacity(b.len() + 1);
                    f.push(kiln_api::stream::STDIN);
                    f.extend_from_slice(&b);
                    Message::binary(f)
                }
                Input::Eof => ctl(&ClientMsg::StdinEof {}),
                Input::Signal(signal) => ctl(&ClientMsg::Signal { signal }),
                Input::Resize(rows, cols) => ctl(&ClientMsg::Resize { rows, cols }),
            };
            if sink.send(m).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    if tty && let (Some(r), Some(c)) = term::size() {
        let _ = tx.send(Input::Resize(r, c)).await;
    }
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
    {
        // As the local path: the first Ctrl-C (or SIGTERM) goes to the
        // process; a second one kills the sandbox's main process (`run`)
        // or leaves (`exec`).
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term_sig, mut winch) = (
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            signal(SignalKind::window_change()).context("cannot handle SIGWINCH")?,
        );
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut interrupts = 0;
            loop {
                tokio::select! {
                    _ = int.recv() => {
                        interrupts += 1;
                        if interrupts == 1 {
                            let _ = tx.send(Input::Signal(2)).await;
                        } else if main {
                            eprintln!("kiln: second interrupt, killing the sandbox's command");
                            let _ = tx.send(Input::Signal(9)).await;
                            tokio::time::sleep(Duration::from_secs(40)).await;
                            std::process::exit(130);
                        } else {
                            std::process::exit(130);
                        }
                    }
                    _ = term_sig.recv() => { let _ = tx.send(Input::Signal(15)).await; }
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
    let end = loop {
        let m = match stream.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                break Err(anyhow::Error::from(e).context("the stream broke"));
            }
            None => {
                break Err(anyhow::anyhow!(
                    "the server closed the stream before the process ended"
                ));
            }
        };
        match m {
            Message::Binary(b) => match b.first() {
                Some(&kiln_api::stream::STDOUT) => {
                    out.write_all(&b[1..]).await?;
                    out.flush().await?;
                    attach::mark_output();
                }
                Some(&kiln_api::stream::STDERR) => {
                    err.write_all(&b[1..]).await?;
                    err.flush().await?;
                    attach::mark_output();
                }
                _ => {}
            },
            Message::Text(t) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(ServerMsg::Exit { exit_code, .. }) => break Ok(End::Exit(exit_code)),
                Ok(ServerMsg::Error { error }) => {
                    break Err(anyhow::anyhow!(
                        "{} ({})",
                        sanitize(&error.message),
                        sanitize(&error.code)
                    ));
                }
                _ => {}
            },
            Message::Close(_) => {
                break Err(anyhow::anyhow!(
                    "the server closed the stream before the process ended"
                ));
            }
            _ => {}
        }
    };
    writer.abort();
    end
}

pub(crate) fn ctl(m: &ClientMsg) -> Message {
    Message::text(serde_json::to_string(m).unwrap_or_default())
}

pub(crate) async fn next_msg(
    stream: &mut futures::stream::SplitStream<Ws>,
) -> Result<Option<ServerMsg>> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                return Ok(Some(
                    serde_json::from_str(&t).context("the server sent an unknown message")?,
                ));
            }
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(Message::Binary(_))) => bail!("the server sent output before the start"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(anyhow::Error::from(e).context("the stream broke")),
        }
    }
}
