//! The node's resolver and domain rules, with real packets: sandboxes are
//! network namespaces on a real bridge with the real policy program; the
//! "upstream" is an authoritative server for a test zone (hickory-server,
//! written below) in an outside namespace, routed through the host. Needs
//! root. Runs its tests one at a time (global counts).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use kiln_net::dns::{DnsServer, ResolverSettings};
use kiln_net::{Action, Attachment, Endpoint, NetConfig, Network, Policy, Rule};

static SERIAL: Mutex<()> = Mutex::new(());
const T: Duration = Duration::from_millis(400);

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kiln_net=debug,dns=info")
        .with_test_writer()
        .try_init();
}

fn policy(default: Action, rules: &[(Action, &str)]) -> Policy {
    Policy {
        default,
        egress: rules
            .iter()
            .map(|(a, s)| Rule::parse(*a, s).expect("test rule parses"))
            .collect(),
        ingress: Vec::new(),
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// An authoritative server for a fixed zone: name → (address, TTL);
/// NXDOMAIN for the rest. Counts the queries it receives.
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
        match request.request_info() {
            Ok(info) => {
                let name = info.query.name().to_string();
                match self.records.get(&name) {
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
            Err(_) => {
                header.set_response_code(ResponseCode::FormErr);
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

/// One A query from inside `ns` to `server`, over UDP or TCP, with
/// hickory-proto building and parsing the messages.
fn query(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    tcp: bool,
) -> Result<(ResponseCode, Vec<(Ipv4Addr, u32)>)> {
    let name = name.to_owned();
    ns.enter(move || -> Result<(ResponseCode, Vec<(Ipv4Addr, u32)>)> {
        let mut m = Message::new();
        m.set_id(rand_id());
        m.set_message_type(MessageType::Query);
        m.set_op_code(OpCode::Query);
        m.set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(&name)?, RecordType::A));
        let bytes = m.to_vec()?;
        let reply = if tcp {
            let mut s = TcpStream::connect_timeout(&server, T)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            s.write_all(&framed)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf)?;
            buf
        } else {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send_to(&bytes, server)?;
            let mut buf = vec![0u8; 4096];
            let (n, _) = s.recv_from(&mut buf)?;
            buf.truncate(n);
            buf
        };
        let r = Message::from_vec(&reply)?;
        ensure!(r.id() == m.id(), "reply id");
        let addrs = r
            .answers()
            .iter()
            .filter_map(|rec| match rec.data() {
                RData::A(a) => Some((a.0, rec.ttl())),
                _ => None,
            })
            .collect();
        Ok((r.response_code(), addrs))
    })?
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        & 0xffff) as u16
}

/// Bridge with the node resolver, an outside namespace with the zone's
/// server (`dns_ip`) and two TCP servers (`a1`, `a2`), sandboxes.
struct Topo {
    sandboxes: Vec<(Netns, HostLink, Attachment)>,
    net: Option<Arc<Network>>,
    _state: tempfile::TempDir,
    suffix: String,
    outside: Netns,
    _outside_link: HostLink,
    dns_ip: Ipv4Addr,
    a1: Ipv4Addr,
    a2: Ipv4Addr,
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.sandboxes.clear();
        if let Some(net) = self.net.take() {
            let _ = net.reconcile(&BTreeSet::new());
            let _ = net.teardown();
        }
    }
}

impl Topo {
    fn new() -> Result<Topo> {
        let (suffix, n) = unique();
        let pid = std::process::id() % 250;
        let state = tempfile::tempdir()?;
        let mut cfg = NetConfig::new(state.path());
        cfg.bridge = format!("kb{suffix}");
        cfg.subnet = format!("10.{}.{pid}.0/24", 180 + n).parse()?;
        cfg.tap_prefix = "kv".into();
        cfg.resolver = true;
        let outside = Netns::new(&format!("kno{suffix}"))?;
        let host_end = format!("ko{suffix}");
        let outside_link = veth_into(&outside, &host_end)?;
        let net3 = [172, 40 + n as u8, pid as u8];
        let host_out = Ipv4Addr::new(net3[0], net3[1], net3[2], 1);
        let addr = |last| Ipv4Addr::new(net3[0], net3[1], net3[2], last);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_out}/24"),
            "dev",
            &host_end,
        ])?;
        run(&["ip", "link", "set", &host_end, "up"])?;
        for last in [2, 3, 4] {
            outside.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", addr(last)),
                "dev",
                "eth0",
            ])?;
        }
        outside.exec(&["ip", "link", "set", "eth0", "up"])?;
        outside.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &host_out.to_string(),
        ])?;
        let net = Network::open(cfg)?;
        Ok(Topo {
            sandboxes: Vec::new(),
            net: Some(Arc::new(net)),
            _state: state,
            suffix,
            outside,
            _outside_link: outside_link,
            dns_ip: addr(2),
            a1: addr(3),
            a2: addr(4),
        })
    }

    fn net(&self) -> &Arc<Network> {
        self.net.as_ref().expect("network is open until drop")
    }

    fn sandbox(&mut self, name: &str, policy: &Policy) -> Result<usize> {
        let ns = Netns::new(&format!("kns{}{name}", self.suffix))?;
        let host_end = format!("kv{}{name}", self.suffix);
        let link = veth_into(&ns, &host_end)?;
        let id = format!("t{}{name}", self.suffix);
        let a = self
            .net()
            .attach(&id, Endpoint::Existing(&host_end), policy)
            .context("attach")?;
        configure_guest(&ns, &a)?;
        self.sandboxes.push((ns, link, a));
        Ok(self.sandboxes.len() - 1)
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.sandboxes[i].0
    }
    fn att(&self, i: usize) -> &Attachment {
        &self.sandboxes[i].2
    }
}

/// Starts the zone's server in the outside namespace (UDP and TCP on port 53).
fn start_zone(
    rt: &tokio::runtime::Runtime,
    t: &Topo,
    records: HashMap<String, (Ipv4Addr, u32)>,
) -> Result<(ServerFuture<Zone>, Arc<AtomicUsize>)> {
    let listen = sa(t.dns_ip, 53);
    let (udp, tcp) = t.outside.enter(move || -> Result<_> {
        let udp = std::net::UdpSocket::bind(listen)?;
        let tcp = std::net::TcpListener::bind(listen)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })??;
    let queries = Arc::new(AtomicUsize::new(0));
    let zone = Zone {
        records,
        queries: queries.clone(),
    };
    let server = rt.block_on(async move {
        let mut s = ServerFuture::new(zone);
        s.register_socket(tokio::net::UdpSocket::from_std(udp)?);
        s.register_listener(
            tokio::net::TcpListener::from_std(tcp)?,
            Duration::from_secs(5),
        );
        anyhow::Ok(s)
    })?;
    Ok((server, queries))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn census() -> (usize, usize, usize) {
    (
        kiln_programs(),
        std::fs::read_dir("/sys/fs/bpf/kiln").map_or(0, |d| d.count()),
        run(&["ip", "netns", "list"])
            .map_or(0, |s| s.lines().filter(|l| l.starts_with("kn")).count()),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn domain_rules_admit_exactly_what_the_node_resolved() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let before = census();
    {
        let rt = runtime()?;
        let mut t = Topo::new()?;
        let (a1, a2) = (t.a1, t.a2);
        let gw = t.net().ipam().gateway();
        let zone: HashMap<String, (Ipv4Addr, u32)> = [
            ("allowed.kiln.test.", (a1, 6)),
            ("other.example.test.", (a2, 300)),
            ("long.kiln.test.", (a1, 300)),
            ("meta.kiln.test.", (Ipv4Addr::new(169, 254, 169, 254), 300)),
            ("gw.kiln.test.", (gw, 300)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        let (zone_server, zone_queries) = start_zone(&rt, &t, zone)?;
        tcp_server(&t.outside, sa(a1, 8080))?;
        tcp_server(&t.outside, sa(a2, 8080))?;
        let resolver = rt.block_on(DnsServer::start(
            t.net().clone(),
            ResolverSettings {
                listen: sa(gw, 53),
                upstreams: vec![sa(t.dns_ip, 53)],
                timeout: Duration::from_secs(1),
            },
        ))?;

        let a = t.sandbox(
            "a",
            &policy(
                Action::Deny,
                &[
                    (Action::Allow, "allowed.kiln.test:tcp:8080"),
                    (Action::Allow, "*.kiln.test:tcp:9"),
                    (Action::Allow, "meta.kiln.test"),
                    (Action::Allow, "gw.kiln.test"),
                ],
            ),
        )?;
        let b = t.sandbox("b", &policy(Action::Allow, &[]))?;
        ensure!(t.att(a).dns == vec![gw], "guests get the gateway as DNS");

        tracing::info!("the control: a default-allow sandbox reaches both servers");
        ensure!(tcp_reaches(t.ns(b), sa(a1, 8080), T), "b -> a1");
        ensure!(tcp_reaches(t.ns(b), sa(a2, 8080), T), "b -> a2");

        tracing::info!("nothing is admitted before the name is resolved");
        ensure!(!tcp_reaches(t.ns(a), sa(a1, 8080), T), "a -> a1 unresolved");

        tracing::info!("resolving the allowed name admits its address (UDP)");
        let (code, addrs) = query(t.ns(a), sa(gw, 53), "allowed.kiln.test", false)?;
        ensure!(
            code == ResponseCode::NoError && addrs == vec![(a1, 6)],
            "{code} {addrs:?}"
        );
        let resolved_at = Instant::now();
        ensure!(
            tcp_reaches(t.ns(a), sa(a1, 8080), T),
            "a -> a1 after resolving"
        );
        let adm = t.net().admissions(&t.att(a).id)?;
        ensure!(
            adm.len() == 1 && adm[0].addr == a1 && adm[0].rules == vec![0, 1],
            "admissions {adm:?}"
        );
        // The rule's protocol and port still apply.
        ensure!(
            !udp_reaches(t.ns(a), sa(a1, 8080), T),
            "udp to a1 stays denied"
        );

        tracing::info!("a live policy change keeps admissions for the same pattern");
        t.net().update_policy(
            &t.att(a).id,
            &policy(
                Action::Deny,
                &[
                    (Action::Deny, "10.255.255.255"),
                    (Action::Allow, "long.kiln.test:tcp:8080"),
                    (Action::Allow, "allowed.kiln.test:tcp:8080"),
                    // Names the checks below resolve (under default deny
                    // only names an allow rule matches are looked up).
                    (Action::Allow, "meta.kiln.test:tcp:9"),
                    (Action::Allow, "gw.kiln.test:tcp:9"),
                    (Action::Allow, "missing.kiln.test:tcp:9"),
                ],
            ),
        )?;
        let adm = t.net().admissions(&t.att(a).id)?;
        ensure!(
            adm.len() == 1 && adm[0].rules == vec![2],
            "carried: {adm:?}"
        );
        ensure!(tcp_reaches(t.ns(a), sa(a1, 8080), T), "still admitted");

        tracing::info!("under default deny, a name no rule allows is not even looked up");
        let seen = zone_queries.load(Ordering::SeqCst);
        for tcp in [false, true] {
            let (code, addrs) = query(t.ns(a), sa(gw, 53), "other.example.test", tcp)?;
            ensure!(
                code == ResponseCode::Refused && addrs.is_empty(),
                "query (tcp {tcp}): {code} {addrs:?}"
            );
        }
        ensure!(
            zone_queries.load(Ordering::SeqCst) == seen,
            "a refused name never reached the upstream"
        );
        ensure!(
            !tcp_reaches(t.ns(a), sa(a2, 8080), T),
            "a -> a2 never admitted"
        );
        let (code, _) = query(t.ns(a), sa(gw, 53), "missing.kiln.test", false)?;
        ensure!(
            code == ResponseCode::NXDomain,
            "nxdomain passes through: {code}"
        );

        tracing::info!("names resolving to protected addresses admit nothing");
        let (code, addrs) = query(t.ns(a), sa(gw, 53), "meta.kiln.test", false)?;
        ensure!(code == ResponseCode::NoError && addrs.len() == 1, "{code}");
        let (code, _) = query(t.ns(a), sa(gw, 53), "gw.kiln.test", false)?;
        ensure!(code == ResponseCode::NoError, "{code}");
        let adm = t.net().admissions(&t.att(a).id)?;
        ensure!(
            adm.iter().all(|x| x.addr == a1),
            "only a1 admitted: {adm:?}"
        );

        tracing::info!("admission ends with the TTL");
        let left = Duration::from_secs(6).saturating_sub(resolved_at.elapsed());
        std::thread::sleep(left + Duration::from_millis(300));
        ensure!(
            !tcp_reaches(t.ns(a), sa(a1, 8080), T),
            "a -> a1 after the TTL"
        );
        ensure!(t.net().admissions(&t.att(a).id)?.is_empty(), "expired");
        ensure!(t.net().sweep_admissions()? >= 1, "swept");
        // The rule's counter counted the admitted packets.
        let counters = t.net().policy(&t.att(a).id)?.1;
        ensure!(counters.rules[2].allowed_packets > 0, "{counters:?}");
        ensure!(counters.default.dropped_packets > 0, "{counters:?}");

        tracing::info!("DNS to any other server is dropped, whatever the policy");
        let seen = zone_queries.load(Ordering::SeqCst);
        for (i, tcp) in [(a, false), (a, true), (b, false), (b, true)] {
            let r = query(t.ns(i), sa(t.dns_ip, 53), "allowed.kiln.test", tcp);
            ensure!(
                r.is_err(),
                "direct DNS from sandbox {i} (tcp {tcp}) answered: {r:?}"
            );
        }
        ensure!(
            !tcp_reaches(t.ns(b), sa(t.dns_ip, 853), T),
            "DNS over TLS port"
        );
        ensure!(
            zone_queries.load(Ordering::SeqCst) == seen,
            "the outside server received no query"
        );
        let drops = t.net().policy(&t.att(b).id)?.1.drops;
        let elsewhere = drops
            .iter()
            .find(|(n, _)| n == "dns-elsewhere")
            .map_or(0, |(_, c)| c.dropped_packets);
        ensure!(elsewhere >= 2, "dns-elsewhere drops counted: {drops:?}");
        // The control: the default-allow sandbox does resolve through the node.
        let (code, _) = query(t.ns(b), sa(gw, 53), "other.example.test", true)?;
        ensure!(code == ResponseCode::NoError, "b resolves through the node");
        // A query from an address that is no sandbox's is refused.
        let host_q = query_from_host(sa(gw, 53));
        ensure!(
            matches!(host_q, Ok(ResponseCode::Refused)),
            "host query: {host_q:?}"
        );

        tracing::info!("admission latency: answer in hand -> map entry written");
        let id = t.att(a).id.clone();
        let mut lat = Vec::new();
        for i in 0..200u32 {
            let addr = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
            let t0 = Instant::now();
            let n = t.net().admit(&id, "long.kiln.test.", &[(addr, 60)])?;
            lat.push(t0.elapsed());
            ensure!(n == 1, "admitted");
        }
        lat.sort();
        // Through the resolver: a query for an admitted name vs. one for a
        // name no rule matches (same upstream, no admission).
        let mut with = Vec::new();
        let mut without = Vec::new();
        for _ in 0..30 {
            let t0 = Instant::now();
            query(t.ns(a), sa(gw, 53), "long.kiln.test", false)?;
            with.push(t0.elapsed());
            let t0 = Instant::now();
            query(t.ns(a), sa(gw, 53), "other.example.test", false)?;
            without.push(t0.elapsed());
        }
        with.sort();
        without.sort();
        tracing::info!(
            admit_p50 = ?percentile(&lat, 0.5),
            admit_p99 = ?percentile(&lat, 0.99),
            query_admitting_p50 = ?percentile(&with, 0.5),
            query_admitting_p99 = ?percentile(&with, 0.99),
            query_plain_p50 = ?percentile(&without, 0.5),
            query_plain_p99 = ?percentile(&without, 0.99),
            "DNS-rule admission latency"
        );
        println!(
            "BENCH dns admission: admit p50 {:?} p99 {:?}; query with admission p50 {:?} p99 {:?}; without p50 {:?} p99 {:?}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&with, 0.5),
            percentile(&with, 0.99),
            percentile(&without, 0.5),
            percentile(&without, 0.99)
        );

        rt.block_on(resolver.shutdown())?;
        let mut zone_server = zone_server;
        rt.block_on(zone_server.shutdown_gracefully())?;
    }
    let after = census();
    ensure!(
        before == after,
        "leaked: before {before:?}, after {after:?}"
    );
    Ok(())
}

/// A query to the node resolver from the host itself (no sandbox address).
fn query_from_host(server: SocketAddr) -> Result<ResponseCode> {
    let mut m = Message::new();
    m.set_id(7);
    m.set_message_type(MessageType::Query);
    m.set_op_code(OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("allowed.kiln.test.")?,
        RecordType::A,
    ));
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(&m.to_vec()?, server)?;
    let mut buf = vec![0u8; 1024];
    let (n, _) = s.recv_from(&mut buf)?;
    let r = Message::from_vec(&buf[..n])?;
    if r.id() != 7 {
        bail!("reply id");
    }
    Ok(r.response_code())
}
