//! The network policy a user writes: ordered rules, then a default.
//!
//! A rule is `CIDR|DOMAIN[:PROTO[:PORT[-PORT]]]` with an action (allow or
//! deny). Rules are evaluated in order, the first that matches decides, and
//! the default decides when none matches. Everything here is pure parsing and
//! validation: input comes from users and API clients, so every error names
//! the offending text and what is wrong with it, and nothing panics.
//!
//! Invariants of a [`Policy`] once built: CIDRs are IPv4 and normalised to
//! their network address; port ranges have `lo <= hi` and only appear on TCP
//! or UDP rules; domain patterns are lower-case, valid DNS names, optionally
//! with one leading `*.`; at most [`MAX_RULES`] rules per direction.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Most rules one direction of a policy may hold (the BPF maps are sized for it).
pub const MAX_RULES: usize = 1024;

/// What a rule, or the default, does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

impl FromStr for Action {
    type Err = ParseActionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(ParseActionError(s.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an action: use allow or deny")]
pub struct ParseActionError(String);

/// The transport protocol a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// The IPv4 protocol number, 0 for [`Proto::Any`].
    pub fn number(self) -> u8 {
        match self {
            Proto::Any => 0,
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// An inclusive range of destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    /// A range `lo..=hi`; `None` when `lo > hi` or `lo == 0`.
    pub fn new(lo: u16, hi: u16) -> Option<Self> {
        (lo != 0 && lo <= hi).then_some(PortRange { lo, hi })
    }
    pub fn lo(self) -> u16 {
        self.lo
    }
    pub fn hi(self) -> u16 {
        self.hi
    }
    pub fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// A DNS name a rule admits: exactly `name`, or with `wildcard` any name
/// ending in `.name` (one or more labels more; not `name` itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DomainPattern {
    wildcard: bool,
    name: String,
}

impl DomainPattern {
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }
    /// The name without the `*.` prefix.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether a (case-insensitive, optionally dot-terminated) query name matches.
    pub fn matches(&self, query: &str) -> bool {
        let q = query
            .strip_suffix('.')
            .unwrap_or(query)
            .to_ascii_lowercase();
        if self.wildcard {
            q.len() > self.name.len() + 1
                && q.ends_with(&self.name)
                && q.as_bytes()[q.len() - self.name.len() - 1] == b'.'
        } else {
            q == self.name
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// What a rule matches on: the peer's address, or the names it resolved from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Cidr(Ipv4Net),
    Domain(DomainPattern),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cidr(n) => write!(f, "{n}"),
            Target::Domain(d) => write!(f, "{d}"),
        }
    }
}

/// One rule: an action for packets to (egress) or from (ingress) `target`
/// with protocol `proto` and, for TCP and UDP, a port in `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
    pub proto: Proto,
    /// `None`: every port.
    pub ports: Option<PortRange>,
}

impl Rule {
    /// Parses `CIDR|DOMAIN[:PROTO[:PORT[-PORT]]]` with the given action.
    pub fn parse(action: Action, text: &str) -> Result<Rule, ParseRuleError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ParseRuleError::Empty);
        }
        if text.contains("::") || text.starts_with('[') || text.matches(':').count() > 3 {
            return Err(ParseRuleError::Ipv6(text.to_owned()));
        }
        let mut parts = text.split(':');
        let target_text = parts.next().unwrap_or_default();
        let proto_text = parts.next();
        let port_text = parts.next();
        if let Some(extra) = parts.next() {
            return Err(ParseRuleError::TrailingField {
                rule: text.to_owned(),
                extra: extra.to_owned(),
            });
        }
        let target = parse_target(target_text)?;
        let proto = match proto_text {
            None => Proto::Any,
            Some("tcp") => Proto::Tcp,
            Some("udp") => Proto::Udp,
            Some("icmp") => Proto::Icmp,
            Some("any") => Proto::Any,
            Some(other) => return Err(ParseRuleError::Protocol(other.to_owned())),
        };
        let ports = match port_text {
            None => None,
            Some(p) => {
                if !matches!(proto, Proto::Tcp | Proto::Udp) {
                    return Err(ParseRuleError::PortsNeedTcpOrUdp {
                        rule: text.to_owned(),
                        proto,
                    });
                }
                Some(parse_ports(p)?)
            }
        };
        Ok(Rule {
            action,
            target,
            proto,
            ports,
        })
    }

    /// The rule in the syntax [`Rule::parse`] reads (without the action).
    pub fn spec(&self) -> String {
        let mut s = self.target.to_string();
        if self.proto != Proto::Any || self.ports.is_some() {
            s.push(':');
            s.push_str(&self.proto.to_string());
        }
        if let Some(p) = self.ports {
            if p.lo == p.hi {
                s.push_str(&format!(":{}", p.lo));
            } else {
                s.push_str(&format!(":{}-{}", p.lo, p.hi));
            }
        }
        s
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.spec())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseRuleError {
    #[error("empty rule")]
    Empty,
    #[error("{input:?} is not a valid IPv4 CIDR: {reason}")]
    Cidr { input: String, reason: String },
    #[error("{0:?} is IPv6: sandboxes have no IPv6 (it is dropped), so IPv6 rules are refused")]
    Ipv6(String),
    #[error("{input:?} is not a valid domain pattern: {reason}")]
    Domain { input: String, reason: String },
    #[error("{0:?} is not a protocol: use tcp, udp, icmp or any")]
    Protocol(String),
    #[error("{input:?} is not a valid port range: {reason}")]
    Ports { input: String, reason: String },
    #[error("rule {rule:?}: ports need tcp or udp, not {proto}")]
    PortsNeedTcpOrUdp { rule: String, proto: Proto },
    #[error(
        "rule {rule:?} has an extra field {extra:?}: the syntax is CIDR|DOMAIN[:PROTO[:PORT[-PORT]]]"
    )]
    TrailingField { rule: String, extra: String },
}

fn looks_like_address(s: &str) -> bool {
    s.contains('/') || s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn parse_target(s: &str) -> Result<Target, ParseRuleError> {
    if looks_like_address(s) {
        return parse_cidr(s).map(Target::Cidr);
    }
    parse_domain(s).map(Target::Domain)
}

fn parse_cidr(s: &str) -> Result<Ipv4Net, ParseRuleError> {
    let err = |reason: &str| ParseRuleError::Cidr {
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| err("the address is not four dot-separated numbers 0-255"))?;
    let len: u8 = match len {
        None => 32,
        Some(l) => l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| err("the prefix length must be a number 0-32"))?,
    };
    let net = Ipv4Net::new(addr, len).map_err(|_| err("the prefix length must be 0-32"))?;
    Ok(net.trunc())
}

fn parse_domain(s: &str) -> Result<DomainPattern, ParseRuleError> {
    let err = |reason: &str| ParseRuleError::Domain {
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let (wildcard, name) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.contains('*') {
        return Err(err(
            "'*' is only allowed as a whole first label (\"*.example.com\")",
        ));
    }
    if name.len() > 253 {
        return Err(err("longer than 253 characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err(err("needs at least two labels (\"example.com\")"));
    }
    for label in &labels {
        if label.is_empty() {
            return Err(err("has an empty label"));
        }
        if label.len() > 63 {
            return Err(err("has a label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(err("labels may hold only letters, digits, '-' and '_'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(err("a label may not start or end with '-'"));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(err(
            "the last label is numeric (an address? use a.b.c.d/len)",
        ));
    }
    Ok(DomainPattern { wildcard, name })
}

fn parse_ports(s: &str) -> Result<PortRange, ParseRuleError> {
    let err = |reason: &str| ParseRuleError::Ports {
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let num = |p: &str| -> Result<u16, ParseRuleError> {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err("ports are numbers 1-65535"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (num(lo)?, num(hi)?),
        None => {
            let p = num(s)?;
            (p, p)
        }
    };
    PortRange::new(lo, hi).ok_or_else(|| err("the first port is larger than the last"))
}

/// A complete policy: rules for traffic leaving the sandbox (egress) and
/// entering it (ingress), each list ordered, then one default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub default: Action,
    pub egress: Vec<Rule>,
    pub ingress: Vec<Rule>,
}

/// Named policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Everything public; nothing private, link-local, multicast or the host.
    InternetOnly,
    /// Nothing at all.
    None,
}

/// Private, shared, link-local and other non-public IPv4 ranges that
/// `internet-only` denies (beside the always-protected ranges).
pub const NON_PUBLIC: [&str; 9] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

impl Preset {
    pub fn policy(self) -> Policy {
        match self {
            Preset::InternetOnly => {
                let mut egress: Vec<Rule> = NON_PUBLIC
                    .iter()
                    .map(|c| Rule {
                        action: Action::Deny,
                        target: Target::Cidr(c.parse().expect("constant CIDRs parse")),
                        proto: Proto::Any,
                        ports: None,
                    })
                    .collect();
                egress.push(Rule {
                    action: Action::Allow,
                    target: Target::Cidr(Ipv4Net::default()),
                    proto: Proto::Any,
                    ports: None,
                });
                Policy {
                    default: Action::Deny,
                    egress,
                    ingress: Vec::new(),
                }
            }
            Preset::None => Policy {
                default: Action::Deny,
                egress: Vec::new(),
                ingress: Vec::new(),
            },
        }
    }
}

impl FromStr for Preset {
    type Err = ParsePresetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "internet-only" => Ok(Preset::InternetOnly),
            "none" => Ok(Preset::None),
            _ => Err(ParsePresetError(s.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a preset: use internet-only or none")]
pub struct ParsePresetError(String);

impl Default for Policy {
    /// The policy of `--net default` without any policy flag: `internet-only`.
    /// An agent installs packages and calls APIs on the internet; it has no
    /// business with the node, other sandboxes, private networks or metadata.
    fn default() -> Self {
        Preset::InternetOnly.policy()
    }
}

/// One rule of a policy file: exactly one of `allow` or `deny`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deny: Option<String>,
}

/// A policy file (TOML):
///
/// ```toml
/// preset = "internet-only"      # optional: its rules follow the ones below
/// default = "deny"              # optional: overrides the preset's default
/// [[egress]]
/// allow = "10.1.2.0/24:tcp:443"
/// [[egress]]
/// deny = "*.example.com"
/// [[ingress]]
/// allow = "10.88.0.0/16:tcp:8080"
/// ```
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    preset: Option<String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    egress: Vec<FileRule>,
    #[serde(default)]
    ingress: Vec<FileRule>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadPolicyError {
    #[error("cannot read policy file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {path} is not valid TOML for a policy")]
    Syntax {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{direction} rule {index}: give exactly one of allow or deny")]
    RuleAction {
        direction: &'static str,
        index: usize,
    },
    #[error("{direction} rule {index}")]
    Rule {
        direction: &'static str,
        index: usize,
        #[source]
        source: ParseRuleError,
    },
    #[error(transparent)]
    Preset(#[from] ParsePresetError),
    #[error(transparent)]
    Default(#[from] ParseActionError),
    #[error("{direction} has {count} rules, at most {MAX_RULES} are allowed")]
    TooMany {
        direction: &'static str,
        count: usize,
    },
}

impl Policy {
    /// Parses a policy file's text (`path` only names it in errors).
    pub fn from_toml(path: &str, text: &str) -> Result<Policy, LoadPolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|source| LoadPolicyError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        let base = match &file.preset {
            Some(p) => p.parse::<Preset>()?.policy(),
            None => Policy {
                default: Action::Deny,
                egress: Vec::new(),
                ingress: Vec::new(),
            },
        };
        let rules = |direction: &'static str, list: &[FileRule]| {
            list.iter()
                .enumerate()
                .map(|(index, r)| {
                    let (action, text) = match (&r.allow, &r.deny) {
                        (Some(t), None) => (Action::Allow, t),
                        (None, Some(t)) => (Action::Deny, t),
                        _ => return Err(LoadPolicyError::RuleAction { direction, index }),
                    };
                    Rule::parse(action, text).map_err(|source| LoadPolicyError::Rule {
                        direction,
                        index,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mut egress = rules("egress", &file.egress)?;
        egress.extend(base.egress);
        let mut ingress = rules("ingress", &file.ingress)?;
        ingress.extend(base.ingress);
        let default = match &file.default {
            Some(d) => d.parse()?,
            None => base.default,
        };
        let policy = Policy {
            default,
            egress,
            ingress,
        };
        policy.check_size()?;
        Ok(policy)
    }

    /// Reads a policy file, or names a preset (`internet-only`, `none`).
    pub fn load(file_or_preset: &str) -> Result<Policy, LoadPolicyError> {
        if let Ok(p) = file_or_preset.parse::<Preset>() {
            return Ok(p.policy());
        }
        let path = Path::new(file_or_preset);
        if !path.exists() && !file_or_preset.contains('/') && !file_or_preset.contains('.') {
            // Neither a file nor a preset: say it as a preset error, which lists them.
            return Err(ParsePresetError(file_or_preset.to_owned()).into());
        }
        let text = std::fs::read_to_string(path).map_err(|source| LoadPolicyError::Read {
            path: file_or_preset.to_owned(),
            source,
        })?;
        Policy::from_toml(file_or_preset, &text)
    }

    /// The policy of `kiln run`/`kiln policy set` flags: `--allow`/`--deny`
    /// rules in the order given, then the base (`--policy`) rules, with
    /// `--policy-default` overriding the base's default.
    pub fn from_flags(
        base: Option<Policy>,
        default: Option<Action>,
        rules: &[(Action, String)],
    ) -> Result<Policy, LoadPolicyError> {
        let base = base.unwrap_or_default();
        let mut egress = rules
            .iter()
            .enumerate()
            .map(|(index, (a, t))| {
                Rule::parse(*a, t).map_err(|source| LoadPolicyError::Rule {
                    direction: "egress",
                    index,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        egress.extend(base.egress);
        let policy = Policy {
            default: default.unwrap_or(base.default),
            egress,
            ingress: base.ingress,
        };
        policy.check_size()?;
        Ok(policy)
    }

    fn check_size(&self) -> Result<(), LoadPolicyError> {
        for (direction, list) in [("egress", &self.egress), ("ingress", &self.ingress)] {
            if list.len() > MAX_RULES {
                return Err(LoadPolicyError::TooMany {
                    direction,
                    count: list.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(s: &str) -> Result<Rule, ParseRuleError> {
        Rule::parse(Action::Allow, s)
    }

    #[test]
    fn parses_rules() {
        let r = allow("10.1.2.3/24:tcp:443").expect("valid");
        assert_eq!(r.target, Target::Cidr("10.1.2.0/24".parse().expect("cidr")));
        assert_eq!(r.proto, Proto::Tcp);
        assert_eq!(r.ports, PortRange::new(443, 443));
        assert_eq!(r.spec(), "10.1.2.0/24:tcp:443");
        let r = allow("1.2.3.4:udp:1000-2000").expect("valid");
        assert_eq!(r.target, Target::Cidr("1.2.3.4/32".parse().expect("cidr")));
        assert_eq!(r.ports, PortRange::new(1000, 2000));
        let r = allow("*.GitHubUserContent.com:tcp").expect("valid");
        let Target::Domain(d) = &r.target else {
            panic!("domain expected")
        };
        assert!(d.is_wildcard());
        assert!(d.matches("raw.githubusercontent.com."));
        assert!(!d.matches("githubusercontent.com"));
        assert!(!d.matches("evilgithubusercontent.com"));
        assert_eq!(r.spec(), "*.githubusercontent.com:tcp");
        assert_eq!(allow("pypi.org").expect("valid").proto, Proto::Any);
        assert_eq!(allow("0.0.0.0/0:icmp").expect("valid").proto, Proto::Icmp);
    }

    #[test]
    fn refuses_bad_rules_precisely() {
        let e = |s: &str| allow(s).expect_err(s).to_string();
        assert!(e("10.0.0.0/33").contains("prefix length must be a number 0-32"));
        assert!(e("10.0.0.256/8").contains("not a valid IPv4 CIDR"));
        assert!(e("10.0.0/8").contains("not a valid IPv4 CIDR"));
        assert!(e("::1/128").contains("IPv6"));
        assert!(e("1.2.3.4:tcp:0").contains("1-65535"));
        assert!(e("1.2.3.4:tcp:70000").contains("1-65535"));
        assert!(e("1.2.3.4:tcp:443-80").contains("first port is larger"));
        assert!(e("1.2.3.4:icmp:80").contains("ports need tcp or udp"));
        assert!(e("1.2.3.4:any:80").contains("ports need tcp or udp"));
        assert!(e("1.2.3.4:sctp").contains("not a protocol"));
        assert!(e("1.2.3.4:tcp:1:2").contains("extra field"));
        assert!(e("foo*.com").contains("only allowed as a whole first label"));
        assert!(e("*.*.com").contains("only allowed"));
        assert!(e("localhost").contains("two labels"));
        assert!(e("a..com").contains("empty label"));
        assert!(e("-a.com").contains("start or end"));
        assert!(e("a b.com").contains("letters, digits"));
        assert_eq!(allow(""), Err(ParseRuleError::Empty));
        assert!("internet".parse::<Preset>().is_err());
    }

    #[test]
    fn policy_files_and_flags() {
        let p = Policy::from_toml(
            "t.toml",
            r#"
preset = "internet-only"
default = "allow"
[[egress]]
allow = "10.1.2.0/24:tcp:443"
[[egress]]
deny = "pypi.org"
"#,
        )
        .expect("valid");
        assert_eq!(p.default, Action::Allow);
        assert_eq!(p.egress.len(), 2 + NON_PUBLIC.len() + 1);
        assert_eq!(p.egress[1].action, Action::Deny);
        let e = Policy::from_toml(
            "t.toml",
            "[[egress]]\nallow = \"1.2.3.4\"\ndeny = \"x.com\"\n",
        )
        .expect_err("both");
        assert!(e.to_string().contains("exactly one"));
        let e =
            Policy::from_toml("t.toml", "[[egress]]\nallow = \"1.2.3.4/40\"\n").expect_err("cidr");
        assert!(format!("{:#}", anyhow_chain(&e)).contains("prefix length"));
        assert!(Policy::from_toml("t.toml", "bogus = 1\n").is_err());
        assert!(Policy::load("internet-everything").is_err());
        let p = Policy::from_flags(
            Some(Preset::None.policy()),
            Some(Action::Deny),
            &[(Action::Allow, "10.1.2.0/24:tcp:443".into())],
        )
        .expect("valid");
        assert_eq!(p.egress.len(), 1);
    }

    fn anyhow_chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(x) = src {
            s.push_str(": ");
            s.push_str(&x.to_string());
            src = x.source();
        }
        s
    }
}
