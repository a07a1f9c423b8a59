//! Domain rules through the `kiln` binary on real microVMs: a test zone
//! is served (hickory-server, below) in a network namespace and is the
//! node resolver's upstream (`KILN_DNS_UPSTREAM`); the guest resolves with
//! busybox `nslookup` through the node's resolver (its `/etc/resolv.conf`
//! from `Configure.network`) and connects with `nc`. A domain rule admits
//! exactly the address its name resolved to, for the record's TTL; an
//! address never resolved is refused; DNS to the outside server (UDP and
//! TCP) is dropped even under a default-allow policy.

mod common;
mod net_support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Kiln, busybox, code, stderr, stdout};
use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An authoritative server for a fixed zone (name → address, TTL),
/// NXDOMAIN for the rest; counts the queries it receives.
struct Zone {
    records: HashMap<String, (Ipv4Addr, u32)>,
    queries: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for Zone {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let mut header = Header::response_from_request(request.header());
        header.set_authoritative(true);
        let mut answers = Vec::new();
        if let Ok(info) = request.request_info() {
            match self.records.get(&info.query.name().to_string()) {
                Some((addr, ttl)) if info.query.query_type() == RecordType::A => {
                    answers.push(Record::from_rdata(
                        info.query.original().name().clone(),
                        *ttl,
                        RData::A(A(*addr)),
                    ));
                }
                Some(_) => {}
                None => {
                    header.set_response_code(ResponseCode::NXDomain);
                }
            }
        }
        let resp = MessageResponseBuilder::from_message_request(request).build(
            header,
            answers.iter(),
            &[],
            &[],
            &[],
        );
        handle
            .send_response(resp)
            .await
            .unwrap_or_else(|_| Header::response_from_request(request.header()).into())
    }
}

/// The outside: a namespace with the zone's server on `dns:53` (UDP, TCP)
/// and a TCP server on port 8080 of every address (`a1`, `a2`) that says
/// `hello`. Removed on drop.
struct Outside {
    ns: String,
    host_if: String,
    dns: Ipv4Addr,
    a1: Ipv4Addr,
    a2: Ipv4Addr,
    queries: Arc<AtomicUsize>,
    server: Option<ServerFuture<Zone>>,
    rt: tokio::runtime::Runtime,
    nc: Option<Child>,
}

impl Outside {
    fn new(ttl: u32) -> Outside {
        let n = (std::process::id() % 200 + 20) as u8;
        let ns = format!("kiln-e2e-dns{n}");
        let host_if = format!("kdh{n}");
        let peer = format!("kdp{n}");
        let ip = |last| Ipv4Addr::new(10, 252, n, last);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut o = Outside {
            ns: ns.clone(),
            host_if: host_if.clone(),
            dns: ip(2),
            a1: ip(3),
            a2: ip(4),
            queries: Arc::new(AtomicUsize::new(0)),
            server: None,
            rt,
            nc: None,
        };
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ip(1)),
            "dev",
            &host_if,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &ns];
            a.extend_from_slice(args);
            sh(&a);
        };
        for last in [2, 3, 4] {
            in_ns(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", ip(last)),
                "dev",
                &peer,
            ]);
        }
        in_ns(&["ip", "link", "set", &peer, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        o.nc = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns, "busybox", "nc", "-ll", "-p", "8080"])
                .args(["-e", "echo", "hello"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("busybox nc serves"),
        );
        let records: HashMap<String, (Ipv4Addr, u32)> = [
            ("allowed.kiln.test.", (o.a1, ttl)),
            ("other.example.test.", (o.a2, 300)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // Sockets made on a thread inside the namespace stay in it.
        let listen = SocketAddr::from((o.dns, 53));
        let path = format!("/run/netns/{ns}");
        let (udp, tcp) = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let udp = std::net::UdpSocket::bind(listen).expect("udp 53");
            let tcp = std::net::TcpListener::bind(listen).expect("tcp 53");
            udp.set_nonblocking(true).expect("nonblocking");
            tcp.set_nonblocking(true).expect("nonblocking");
            (udp, tcp)
        })
        .join()
        .expect("namespace thread");
        let zone = Zone {
            records,
            queries: o.queries.clone(),
        };
        o.server = Some(o.rt.block_on(async move {
            let mut s = ServerFuture::new(zone);
            s.register_socket(tokio::net::UdpSocket::from_std(udp).expect("udp"));
            s.register_listener(
                tokio::net::TcpListener::from_std(tcp).expect("tcp"),
                Duration::from_secs(5),
            );
            s
        }));
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = self.rt.block_on(s.shutdown_gracefully());
        }
        if let Some(mut c) = self.nc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn ok(o: Output, what: &str) -> String {
    assert_eq!(code(&o), 0, "{what}: {}", stderr(&o));
    stdout(&o)
}

fn guest(k: &Kiln, id: &str, script: &str) -> String {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    stdout(&out).trim().to_string()
}

fn reach(k: &Kiln, id: &str, addr: Ipv4Addr) -> String {
    guest(k, id, &format!("nc -w 2 {addr} 8080 </dev/null"))
}

/// The addresses busybox nslookup printed for `name` (through `server`
/// when given, else the guest's resolv.conf).
fn nslookup(k: &Kiln, id: &str, name: &str, server: Option<Ipv4Addr>) -> Vec<String> {
    let server = server.map(|s| s.to_string()).unwrap_or_default();
    let out = guest(k, id, &format!("nslookup -type=a {name} {server} 2>&1"));
    // Skip the "Server:/Address:" header block: answers come after "Name:".
    out.split("Name:")
        .skip(1)
        .flat_map(|block| {
            block
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Address:"))
                .map(|a| a.split_whitespace().next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Bytes of the answer to a DNS-over-TCP A query for `name` sent from the
/// guest to `server:53` with nc (0: no answer). The query is made with
/// hickory-proto and passed as printf octal escapes.
fn tcp_dns_bytes(k: &Kiln, id: &str, server: Ipv4Addr, name: &str) -> usize {
    let mut m = Message::new();
    m.set_id(4242);
    m.set_message_type(MessageType::Query);
    m.set_op_code(OpCode::Query);
    m.set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    let body = m.to_vec().expect("query");
    let mut framed = (body.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&body);
    let esc: String = framed.iter().map(|b| format!("\\{b:03o}")).collect();
    let out = guest(
        k,
        id,
        &format!("(printf '{esc}'; sleep 1) | nc -w 2 {server} 53 | wc -c"),
    );
    out.trim().parse().unwrap_or(0)
}

/// The pid of sandbox `id`'s supervisor (`kiln shim ID`).
fn shim_pid(id: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        (args.len() >= 3 && args[1] == b"shim" && args[2] == id.as_bytes()).then_some(pid)
    })
}

#[test]
fn domain_rules_admit_what_the_node_resolved_for_its_ttl() {
    let _net = net_support::exclusive();
    let k = Kiln::new();
    let bb = busybox();
    const TTL: u64 = 12;
    let out = Outside::new(TTL as u32);
    let (a1, a2, dns) = (out.a1, out.a2, out.dns);
    let upstream = format!("{dns}:53");
    let start = |args: &[&str]| -> String {
        let o = k
            .cmd()
            .env("KILN_DNS_UPSTREAM", &upstream)
            .args(["run", "-d", "--net", "default"])
            .args(args)
            .args([bb.as_str(), "--", "sleep", "600"])
            .output()
            .expect("kiln runs");
        ok(o, "kiln run").trim().to_string()
    };

    tracing::info!("a sandbox whose policy allows one name, default deny");
    let a = start(&[
        "--policy-default",
        "deny",
        "--allow",
        "allowed.kiln.test:tcp:8080",
    ]);
    let conf = guest(&k, &a, "cat /etc/resolv.conf");
    assert!(conf.contains("nameserver 10.88.0.1"), "{conf}");
    assert_eq!(reach(&k, &a, a1), "", "reached before resolving");

    // The resolver comes up with the first networked supervisor.
    let t0 = Instant::now();
    let addrs = loop {
        let got = nslookup(&k, &a, "allowed.kiln.test", None);
        if !got.is_empty() || t0.elapsed() > Duration::from_secs(20) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let resolved = Instant::now();
    assert_eq!(addrs, vec![a1.to_string()], "nslookup through the node");
    assert_eq!(
        reach(&k, &a, a1),
        "hello",
        "the resolved address is admitted"
    );
    let get = ok(k.run(&["policy", "get", &a]), "policy get");
    let line = get
        .lines()
        .find(|l| l.trim_start().starts_with(&a1.to_string()))
        .unwrap_or_else(|| panic!("no admission shown: {get}"));
    assert_eq!(line.split_whitespace().nth(1), Some("1"), "{get}");
    assert_eq!(
        reach(&k, &a, a2),
        "",
        "an address never resolved for this sandbox is refused"
    );
    let other = nslookup(&k, &a, "other.example.test", None);
    assert!(
        other.is_empty(),
        "under default deny a name no rule allows is refused, not looked up: {other:?}"
    );
    assert_eq!(
        reach(&k, &a, a2),
        "",
        "a name no rule allows admits nothing"
    );

    tracing::info!("DNS to the outside server: dropped, even when the policy allows everything");
    let b = start(&["--policy", "none", "--policy-default", "allow"]);
    assert_eq!(reach(&k, &b, a2), "hello", "control: b reaches the outside");
    let seen = out.queries.load(Ordering::SeqCst);
    assert!(
        nslookup(&k, &b, "allowed.kiln.test", Some(dns)).is_empty(),
        "UDP DNS to the outside server answered"
    );
    assert_eq!(
        tcp_dns_bytes(&k, &b, dns, "allowed.kiln.test."),
        0,
        "TCP DNS to the outside server answered"
    );
    assert_eq!(
        out.queries.load(Ordering::SeqCst),
        seen,
        "the outside server saw a query"
    );
    assert!(
        tcp_dns_bytes(
            &k,
            &b,
            "10.88.0.1".parse().expect("ip"),
            "allowed.kiln.test."
        ) > 12,
        "control: TCP DNS to the node resolver is answered"
    );

    tracing::info!("the admission ends with the TTL");
    let wait = Duration::from_secs(TTL + 1).saturating_sub(resolved.elapsed());
    std::thread::sleep(wait);
    assert_eq!(reach(&k, &a, a1), "", "still admitted after the TTL");
    let get = ok(k.run(&["policy", "get", &a]), "policy get");
    assert!(get.contains("allowed.kiln.test"), "{get}");

    tracing::info!("kill -9 of the supervisor running the resolver: another one takes over");
    let holder = shim_pid(&a).expect("a's supervisor");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let t0 = Instant::now();
    let again = loop {
        let got = nslookup(&k, &b, "other.example.test", None);
        if !got.is_empty() || t0.elapsed() > Duration::from_secs(20) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(again, vec![a2.to_string()], "b resolves after the crash");
    eprintln!(
        "resolver taken over: a surviving guest resolved {} ms after kill -9",
        t0.elapsed().as_millis()
    );

    for id in [&a, &b] {
        ok(k.run(&["rm", "-f", id]), "rm");
    }
    // The killed supervisor could not release a's network; the next
    // command's reconcile pass does.
    ok(k.run(&["ps", "-a"]), "ps");
    for id in [&a, &b] {
        assert!(
            !std::path::Path::new("/sys/fs/bpf/kiln").join(id).exists(),
            "BPF pins outlived the sandbox"
        );
    }
    k.assert_clean();
}
