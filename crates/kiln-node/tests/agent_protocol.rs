//! The agent client against an in-process fake guest speaking the protocol
//! over `tokio::io::duplex`: demultiplexing, credit, and a hostile guest.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on failure by design

use std::time::Duration;

use kiln_api::proto::{
    self, Channel, Decoded, Decoder, ErrorKind, Event, ExecRequest, ExitStatus, Frame, Hello,
    HelloAck, INITIAL_WINDOW, Kind, Request, Response,
};
use kiln_node::agent::{AgentClient, ConnectAgentError, ExecError, Output, StreamError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

/// The guest end of the duplex, driven by each test.
struct FakeGuest {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    dec: Decoder,
}

impl FakeGuest {
    async fn frame(&mut self) -> Frame {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(d) = self.dec.next_frame() {
                match d {
                    Decoded::Frame(f) => return f,
                    Decoded::Invalid(e) => panic!("host sent an invalid frame: {e}"),
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.rd.read(&mut buf))
                .await
                .expect("host frame within 5 s")
                .unwrap();
            assert!(n > 0, "host closed");
            self.dec.feed(&buf[..n]);
        }
    }

    /// Next frame that is not a Hello (the host may repeat it).
    async fn non_hello(&mut self) -> Frame {
        loop {
            let f = self.frame().await;
            if f.kind != Kind::Hello {
                return f;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    async fn respond(&mut self, stream: u32, r: &Response) {
        self.send(&proto::encode_json(Kind::Response, stream, r).unwrap())
            .await;
    }

    /// Next request (skipping credit and close frames of other streams).
    async fn request(&mut self) -> (u32, Request) {
        loop {
            let f = self.non_hello().await;
            if f.kind == Kind::Request {
                return (f.stream, f.json("request").unwrap());
            }
        }
    }
}

async fn pair() -> (AgentClient, FakeGuest) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let (rd, wr) = tokio::io::split(guest);
    let mut g = FakeGuest {
        rd,
        wr,
        dec: Decoder::new(),
    };
    let guest_task = tokio::spawn(async move {
        // Ignore the first Hello to exercise the repetition.
        let first = g.frame().await;
        assert_eq!(first.kind, Kind::Hello);
        let h: Hello = loop {
            let f = g.frame().await;
            if f.kind == Kind::Hello {
                break f.json("hello").unwrap();
            }
        };
        // Stale garbage and a frame of an earlier session precede the ack.
        g.send(b"\x00garbage KLN").await;
        g.send(&proto::encode_data(99, Channel::Stdout, b"old").unwrap())
            .await;
        let ack = HelloAck {
            version: proto::VERSION,
            session: h.session,
            agent: "fake".into(),
            boot_id: "b".into(),
            main: None,
        };
        g.send(&proto::encode_json(Kind::HelloAck, 0, &ack).unwrap())
            .await;
        g
    });
    let (client, ack) = AgentClient::connect(host, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ack.agent, "fake");
    (client, guest_task.await.unwrap())
}

fn exec_req(argv: &[&str], stdin: bool) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        user: None,
        tty: false,
        rows: None,
        cols: None,
        stdin,
        main: false,
        detached: false,
    }
}

#[tokio::test]
async fn handshake_times_out_without_guest() {
    let (host, _guest) = tokio::io::duplex(1 << 16);
    let r = AgentClient::connect(host, Duration::from_millis(200)).await;
    assert!(matches!(r, Err(ConnectAgentError::Timeout(_))));
}

#[tokio::test]
async fn exec_demuxes_stdout_stderr_and_exit() {
    let (client, mut g) = pair().await;
    let c2 = client.clone();
    let h = tokio::spawn(async move { c2.exec(exec_req(&["echo"], false)).await });
    let (s, req) = g.request().await;
    assert!(matches!(req, Request::Exec(_)));
    g.respond(s, &Response::Started { pid: 42 }).await;
    g.send(&proto::encode_data(s, Channel::Stdout, b"out").unwrap())
        .await;
    let mut p = h.await.unwrap().unwrap();
    assert_eq!(p.pid(), 42);
    assert_eq!(
        p.recv().await.unwrap().unwrap(),
        Output::Stdout("out".into())
    );
    // Consuming returned the credit.
    let f = g.non_hello().await;
    assert_eq!(
        (f.kind, f.credit().unwrap()),
        (Kind::Credit, (Channel::Stdout, 3))
    );
    g.send(&proto::encode_data(s, Channel::Stderr, b"err").unwrap())
        .await;
    g.send(&proto::encode_eof(s, Channel::Stdout)).await;
    g.send(&proto::encode_eof(s, Channel::Stderr)).await;
    let ev = Event::Exit {
        pid: 42,
        status: ExitStatus {
            code: Some(3),
            signal: None,
        },
    };
    g.send(&proto::encode_json(Kind::Event, s, &ev).unwrap())
        .await;
    g.send(&proto::encode_close(s)).await;
    let (out, err, st) = p.wait_with_output().await.unwrap();
    assert_eq!(
        (out.as_slice(), err.as_slice(), st.code),
        (&b""[..], &b"err"[..], Some(3))
    );
}

#[tokio::test]
async fn exec_errors_map_to_kinds() {
    let (client, mut g) = pair().await;
    let c2 = client.clone();
    let h = tokio::spawn(async move { c2.exec(exec_req(&["nosuch"], false)).await });
    let (s, _) = g.request().await;
    let msg = "exec: \"nosuch\": executable file not found in $PATH";
    g.respond(
        s,
        &Response::Error {
            kind: ErrorKind::NotFound,
            message: msg.into(),
        },
    )
    .await;
    let e = h.await.unwrap().err().unwrap();
    assert!(matches!(e, ExecError::NotFound(_)));
    assert_eq!(e.shell_code(), Some(127));
    assert_eq!(e.to_string(), msg);
}

#[tokio::test]
async fn data_beyond_credit_fails_only_that_stream() {
    let (client, mut g) = pair().await;
    let c2 = client.clone();
    let h = tokio::spawn(async move { c2.exec(exec_req(&["yes"], false)).await });
    let (s, _) = g.request().await;
    g.respond(s, &Response::Started { pid: 7 }).await;
    let mut p = h.await.unwrap().unwrap();
    // Send the whole window without the consumer reading: allowed.
    let chunk = vec![b'y'; proto::MAX_DATA_CHUNK];
    let mut sent = 0usize;
    while sent < INITIAL_WINDOW as usize {
        let n = chunk.len().min(INITIAL_WINDOW as usize - sent);
        g.send(&proto::encode_data(s, Channel::Stdout, &chunk[..n]).unwrap())
            .await;
        sent += n;
    }
    // One byte more is a violation.
    g.send(&proto::encode_data(s, Channel::Stdout, b"!").unwrap())
        .await;
    // Let the reader see it all before the consumer returns any credit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = 0usize;
    let err = loop {
        match p.recv().await {
            Some(Ok(Output::Stdout(b))) => got += b.len(),
            Some(Err(e)) => break e,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(matches!(err, StreamError::Protocol { .. }), "{err}");
    assert!(got <= INITIAL_WINDOW as usize);
    assert!(p.recv().await.is_none());
    // The connection survives.
    let c3 = client.clone();
    let ping = tokio::spawn(async move { c3.ping().await });
    let (s2, req) = loop {
        let f = g.non_hello().await;
        if f.kind == Kind::Request {
            break (f.stream, f.json::<Request>("r").unwrap());
        }
    };
    assert_eq!(req, Request::Ping);
    g.respond(s2, &Response::Pong).await;
    ping.await.unwrap().unwrap();
}

#[tokio::test]
async fn hostile_frames_are_contained() {
    let (client, mut g) = pair().await;
    // Garbage, an oversized header, unknown kinds and streams, bad JSON.
    g.send(&[0xFFu8; 1000]).await;
    let mut h = proto::encode_header(Kind::Data, 1, 0).unwrap();
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    g.send(&h).await;
    g.send(&proto::encode_data(12345, Channel::Stdout, b"who").unwrap())
        .await;
    g.send(&proto::encode_json(Kind::Event, 777, &"nonsense").unwrap())
        .await;
    g.send(&proto::encode(Kind::Request, 5, b"{}").unwrap())
        .await;
    g.send(&proto::encode_credit(3, Channel::Stdin, u32::MAX))
        .await;

    // An exec whose response is malformed fails with a protocol error.
    let c2 = client.clone();
    let t = tokio::spawn(async move { c2.exec(exec_req(&["x"], false)).await });
    let (s, _) = g.request().await;
    g.send(&proto::encode(Kind::Response, s, b"{\"type\":\"started\"").unwrap())
        .await;
    assert!(matches!(
        t.await.unwrap(),
        Err(ExecError::Stream(StreamError::Protocol { .. }))
    ));

    // Data before the response, an exit for the wrong pid.
    let c2 = client.clone();
    let t = tokio::spawn(async move { c2.exec(exec_req(&["x"], true)).await });
    let (s, _) = g.request().await;
    g.respond(s, &Response::Started { pid: 1 }).await;
    let mut p = t.await.unwrap().unwrap();
    // Credit flooding on stdin is refused too (beyond the maximum).
    for _ in 0..100 {
        g.send(&proto::encode_credit(s, Channel::Stdin, u32::MAX))
            .await;
    }
    let r = p.recv().await.unwrap();
    assert!(matches!(r, Err(StreamError::Protocol { .. })), "{r:?}");

    let c2 = client.clone();
    let t = tokio::spawn(async move { c2.exec(exec_req(&["x"], false)).await });
    let (s, _) = g.request().await;
    g.respond(s, &Response::Started { pid: 9 }).await;
    let mut p = t.await.unwrap().unwrap();
    let ev = Event::Exit {
        pid: 10,
        status: ExitStatus {
            code: Some(0),
            signal: None,
        },
    };
    g.send(&proto::encode_json(Kind::Event, s, &ev).unwrap())
        .await;
    assert!(matches!(
        p.recv().await.unwrap(),
        Err(StreamError::Protocol { .. })
    ));
    assert!(client.is_connected());
}

#[tokio::test]
async fn stdin_honours_credit() {
    let (client, mut g) = pair().await;
    let c2 = client.clone();
    let t = tokio::spawn(async move { c2.exec(exec_req(&["cat"], true)).await });
    let (s, _) = g.request().await;
    g.respond(s, &Response::Started { pid: 5 }).await;
    let mut p = t.await.unwrap().unwrap();
    let mut stdin = p.take_stdin().unwrap();
    let total = INITIAL_WINDOW as usize + 1000;
    let writer = tokio::spawn(async move {
        stdin.write(&vec![1u8; total]).await.unwrap();
        stdin.close().await.unwrap();
    });
    let mut got = 0usize;
    while got < INITIAL_WINDOW as usize {
        let f = g.non_hello().await;
        assert_eq!(f.kind, Kind::Data);
        got += f.data().unwrap().1.len();
    }
    assert_eq!(got, INITIAL_WINDOW as usize);
    // Nothing more arrives without credit.
    let more = tokio::time::timeout(Duration::from_millis(200), g.non_hello()).await;
    assert!(more.is_err(), "host sent beyond credit: {more:?}");
    g.send(&proto::encode_credit(s, Channel::Stdin, 4096)).await;
    let f = g.non_hello().await;
    assert_eq!(f.data().unwrap().1.len(), 1000);
    let f = g.non_hello().await;
    assert_eq!((f.kind, f.eof().unwrap()), (Kind::Eof, Channel::Stdin));
    writer.await.unwrap();
}

#[tokio::test]
async fn transport_death_fails_pending_operations() {
    let (client, g) = pair().await;
    let c2 = client.clone();
    let t = tokio::spawn(async move { c2.ping().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(g);
    let e = t.await.unwrap().unwrap_err();
    assert_eq!(e.to_string(), "agent connection closed");
    assert!(!client.is_connected());
    assert!(client.ping().await.is_err());
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), enough for a test header.
    let mut crc = 0xFFFF_FFFFu32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn copy_out_without_eof_is_an_error_and_copy_in_stops_on_refusal() {
    let (client, mut g) = pair().await;
    let c2 = client.clone();
    let t = tokio::spawn(async move {
        let mut r = c2.copy_out("/x").await.unwrap();
        let mut v = Vec::new();
        let res = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut v).await;
        (v, res)
    });
    let (s, req) = g.request().await;
    assert_eq!(req, Request::CopyOut { path: "/x".into() });
    g.respond(s, &Response::Ok).await;
    g.send(&proto::encode_data(s, Channel::Tar, b"partial").unwrap())
        .await;
    g.send(&proto::encode_close(s)).await;
    let (v, res) = t.await.unwrap();
    assert_eq!(v, b"partial");
    assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);

    // Data on the wrong channel of a copy-out fails it.
    let c2 = client.clone();
    let t = tokio::spawn(async move {
        let mut r = c2.copy_out("/y").await.unwrap();
        let mut v = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut v).await
    });
    let (s, _) = g.request().await;
    g.respond(s, &Response::Ok).await;
    g.send(&proto::encode_data(s, Channel::Stdout, b"nope").unwrap())
        .await;
    assert!(t.await.unwrap().is_err());

    // The guest refuses a copy-in early: the host stops sending and reports it.
    let c2 = client.clone();
    let t = tokio::spawn(async move {
        // An endless tar source: only the refusal can end this call.
        let endless = tokio::io::repeat(0);
        c2.copy_in("/file", endless).await
    });
    let (s, req) = g.request().await;
    assert_eq!(
        req,
        Request::CopyIn {
            dest: "/file".into()
        }
    );
    g.respond(
        s,
        &Response::Error {
            kind: ErrorKind::Path,
            message: "destination /file is not a directory".into(),
        },
    )
    .await;
    let e = tokio::time::timeout(Duration::from_secs(5), t)
        .await
        .expect("copy_in ends")
        .unwrap();
    assert!(
        matches!(e, Err(kiln_node::agent::CopyInError::Refused { .. })),
        "{e:?}"
    );
}
