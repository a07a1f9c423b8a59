//! The node's DNS resolver for its sandboxes, and domain-rule admission.
//!
//! One resolver per node listens on the bridge gateway (`10.88.0.1:53`, UDP
//! and TCP); guests get it as their only DNS server and their policy program
//! drops DNS (TCP/UDP 53, TLS 853) to any other address. It forwards each
//! query to the host's upstream resolvers (hickory-resolver, no cache, so the
//! TTLs a guest sees are the upstream's) and answers with hickory-server.
//! It knows which sandbox asks from the source address: the policy program
//! drops frames whose source is not the sandbox's own address, and the lease
//! table maps addresses to sandboxes.
//!
//! Before an answer goes back, the IPv4 addresses (A records, after any
//! CNAME chain) of a name that a domain rule of the asking sandbox matches
//! are written into that sandbox's `dns` map with the rule bits and an
//! expiry of now + the record's TTL (capped at [`MAX_ADMIT_TTL`]): the
//! program treats them as addresses of those rules until then, and ignores
//! them after (expired entries are also swept). Answers for names no rule
//! matches are returned unchanged and admit nothing (a default-allow policy
//! needs them, and CIDR rules need names too); queries from addresses that
//! are no sandbox's are refused.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Header, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record};
use hickory_proto::xfer::Protocol;
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tracing::{debug, info, warn};

use crate::Network;
use crate::policy::{Rule, Target};

/// The longest an answer admits an address for (one day), whatever its TTL.
pub const MAX_ADMIT_TTL: u32 = 86_400;

/// How long an idle TCP connection to the resolver stays open.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Indices of the domain rules in `rules` whose pattern matches `name`.
pub fn matching_rules(rules: &[Rule], name: &str) -> Vec<usize> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(&r.target, Target::Domain(d) if d.matches(name)))
        .map(|(i, _)| i)
        .collect()
}

/// Whether a sandbox with `policy` may have `name` resolved: always under
/// default allow; under default deny only when the first domain rule
/// matching `name` allows it.
pub fn may_resolve(policy: &crate::policy::Policy, name: &str) -> bool {
    if policy.default == crate::policy::Action::Allow {
        return true;
    }
    policy
        .egress
        .iter()
        .find(|r| matches!(&r.target, Target::Domain(d) if d.matches(name)))
        .is_some_and(|r| r.action == crate::policy::Action::Allow)
}

/// For each rule of `old`, the rules of `new` that take over its domain
/// admissions: the domain rules with the same pattern. CIDR rules carry none.
pub fn carry_admissions(old: &[Rule], new: &[Rule]) -> Vec<Vec<usize>> {
    old.iter()
        .map(|o| match &o.target {
            Target::Domain(d) => new
                .iter()
                .enumerate()
                .filter(|(_, n)| matches!(&n.target, Target::Domain(nd) if nd == d))
                .map(|(i, _)| i)
                .collect(),
            Target::Cidr(_) => Vec::new(),
        })
        .collect()
}

/// Where the resolver listens and where it forwards.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// Normally the gateway, port 53.
    pub listen: SocketAddr,
    /// Upstream servers (UDP, and TCP for truncated answers).
    pub upstreams: Vec<SocketAddr>,
    /// Per-attempt upstream timeout.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("no upstream DNS servers")]
    NoUpstreams,
    #[error("cannot read the host's resolver configuration")]
    SystemConf(#[source] hickory_resolver::ResolveError),
    #[error("the DNS server failed")]
    Serve(#[source] hickory_proto::ProtoError),
}

/// The host's upstream resolvers, from `/etc/resolv.conf`.
pub fn system_upstreams() -> Result<Vec<SocketAddr>, ResolverError> {
    let (conf, _) =
        hickory_resolver::system_conf::read_system_conf().map_err(ResolverError::SystemConf)?;
    let mut out: Vec<SocketAddr> = conf.name_servers().iter().map(|n| n.socket_addr).collect();
    out.dedup();
    Ok(out)
}

/// A running resolver; dropping it does not stop it, [`DnsServer::shutdown`] does.
pub struct DnsServer {
    server: ServerFuture<Handler>,
    listen: SocketAddr,
}

impl DnsServer {
    /// Binds UDP and TCP on `settings.listen` and starts serving (on the
    /// current tokio runtime) the sandboxes of `net`.
    pub async fn start(
        net: Arc<Network>,
        settings: ResolverSettings,
    ) -> Result<DnsServer, ResolverError> {
        if settings.upstreams.is_empty() {
            return Err(ResolverError::NoUpstreams);
        }
        let mut group = Vec::new();
        for u in &settings.upstreams {
            group.push(NameServerConfig::new(*u, Protocol::Udp));
            group.push(NameServerConfig::new(*u, Protocol::Tcp));
        }
        let config = ResolverConfig::from_parts(None, vec![], group);
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.preserve_intermediates = true;
        opts.timeout = settings.timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        let resolver = Resolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        let udp = tokio::net::UdpSocket::bind(settings.listen)
            .await
            .map_err(|e| ResolverError::Bind(settings.listen, e))?;
        let tcp = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|e| ResolverError::Bind(settings.listen, e))?;
        let mut server = ServerFuture::new(Handler { net, resolver });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT);
        info!(listen = %settings.listen, upstreams = ?settings.upstreams, "sandbox DNS resolver up");
        Ok(DnsServer {
            server,
            listen: settings.listen,
        })
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Stops listening and waits for queries in flight.
    pub async fn shutdown(mut self) -> Result<(), ResolverError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(ResolverError::Serve)
    }

    /// Serves until the server fails.
    pub async fn wait(mut self) -> Result<(), ResolverError> {
        self.server
            .block_until_done()
            .await
            .map_err(ResolverError::Serve)
    }
}

struct Handler {
    net: Arc<Network>,
    resolver: Resolver<TokioConnectionProvider>,
}

impl Handler {
    /// The sandbox at `src`, read from the lease table (off the runtime).
    async fn sandbox(&self, src: IpAddr) -> Option<String> {
        let IpAddr::V4(ip) = src else {
            return None;
        };
        let net = self.net.clone();
        match tokio::task::spawn_blocking(move || net.sandbox_of(ip)).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the lease table");
                None
            }
            Err(_) => None,
        }
    }

    async fn may_resolve(&self, id: String, name: String) -> bool {
        let net = self.net.clone();
        match tokio::task::spawn_blocking(move || net.may_resolve(&id, &name)).await {
            Ok(Ok(yes)) => yes,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read a sandbox's policy: its query is refused");
                false
            }
            Err(_) => false,
        }
    }

    async fn admit(&self, id: String, name: String, answers: Vec<(Ipv4Addr, u32)>) {
        let net = self.net.clone();
        let t0 = Instant::now();
        let n = answers.len();
        let done = tokio::task::spawn_blocking(move || {
            net.admit(&id, &name, &answers).map(|k| (id, name, k))
        })
        .await;
        match done {
            Ok(Ok((id, name, k))) if k > 0 => {
                debug!(sandbox = %id, name, admitted = k, of = n, elapsed_us = t0.elapsed().as_micros() as u64, "domain rule admission");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot admit a DNS answer's addresses"),
            Err(e) => warn!(error = %e, "admission task failed"),
        }
    }
}

async fn respond<R: ResponseHandler>(
    request: &Request,
    mut handle: R,
    code: ResponseCode,
    answers: &[Record],
) -> ResponseInfo {
    let mut header = Header::response_from_request(request.header());
    header.set_recursion_available(true);
    header.set_authoritative(false);
    header.set_response_code(code);
    let builder = MessageResponseBuilder::from_message_request(request);
    let response = builder.build(header, answers.iter(), &[], &[], &[]);
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "cannot send a DNS response");
            let mut h = Header::response_from_request(request.header());
            h.set_response_code(ResponseCode::ServFail);
            h.into()
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        handle: R,
    ) -> ResponseInfo {
        if request.message_type() != MessageType::Query {
            return respond(request, handle, ResponseCode::FormErr, &[]).await;
        }
        if request.op_code() != OpCode::Query {
            return respond(request, handle, ResponseCode::NotImp, &[]).await;
        }
        let Some(id) = self.sandbox(request.src().ip()).await else {
            debug!(src = %request.src(), "query from no sandbox: refused");
            return respond(request, handle, ResponseCode::Refused, &[]).await;
        };
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => return respond(request, handle, ResponseCode::FormErr, &[]).await,
        };
        let mut name = info.query.original().name().clone();
        name.set_fqdn(true);
        // Under a default-deny policy the resolver is no way out: only names
        // an allow domain rule matches are looked up (else DNS itself would
        // carry data to and from any domain's servers).
        if !self.may_resolve(id.clone(), name.to_ascii()).await {
            debug!(sandbox = %id, %name, "no allow rule for this name under default deny: refused");
            return respond(request, handle, ResponseCode::Refused, &[]).await;
        }
        let rtype = info.query.query_type();
        let looked = self.resolver.lookup(name.clone(), rtype).await;
        let records: Vec<Record> = match looked {
            Ok(lookup) => lookup.records().to_vec(),
            Err(e) if e.is_nx_domain() => {
                return respond(request, handle, ResponseCode::NXDomain, &[]).await;
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                debug!(sandbox = %id, %name, error = %e, "upstream lookup failed");
                return respond(request, handle, ResponseCode::ServFail, &[]).await;
            }
        };
        let answers: Vec<(Ipv4Addr, u32)> = records
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some((a.0, r.ttl())),
                _ => None,
            })
            .collect();
        if !answers.is_empty() {
            // Before the answer leaves: the guest may connect right after.
            self.admit(id, name.to_ascii(), answers).await;
        }
        respond(request, handle, ResponseCode::NoError, &records).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    fn rules(specs: &[&str]) -> Vec<Rule> {
        specs
            .iter()
            .map(|s| Rule::parse(Action::Allow, s).expect("valid rule"))
            .collect()
    }

    #[test]
    fn names_match_their_domain_rules_only() {
        let r = rules(&[
            "10.0.0.0/8",
            "pypi.org:tcp:443",
            "*.githubusercontent.com",
            "PyPI.org:udp",
        ]);
        assert_eq!(matching_rules(&r, "pypi.org."), vec![1, 3]);
        assert_eq!(matching_rules(&r, "PYPI.ORG"), vec![1, 3]);
        assert_eq!(matching_rules(&r, "raw.githubusercontent.com."), vec![2]);
        assert!(matching_rules(&r, "githubusercontent.com.").is_empty());
        assert!(matching_rules(&r, "evilpypi.org.").is_empty());
        assert!(matching_rules(&r, "pypi.org.evil.").is_empty());
        assert!(matching_rules(&r, "10.0.0.1").is_empty());
    }

    #[test]
    fn admissions_carry_to_rules_with_the_same_pattern() {
        let old = rules(&["pypi.org:tcp:443", "1.2.3.4", "*.example.com"]);
        let new = rules(&["*.example.com:tcp", "5.6.7.8", "pypi.org", "pypi.org:udp"]);
        assert_eq!(
            carry_admissions(&old, &new),
            vec![vec![2, 3], vec![], vec![0]]
        );
        assert_eq!(carry_admissions(&old, &[]), vec![Vec::<usize>::new(); 3]);
    }
}
