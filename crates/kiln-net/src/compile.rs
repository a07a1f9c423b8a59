//! Compiles a [`Policy`] direction into the contents of the BPF maps, and
//! evaluates packets against both forms (the reference semantics and the
//! compiled maps) so property tests can hold them equal.
//!
//! # Semantics (the reference, [`evaluate`])
//! For a packet to address `D` with protocol `P` and (TCP/UDP, first
//! fragment) destination port `N`:
//! 1. Rules are tried in order; a rule matches when `D` is in its CIDR, its
//!    protocol is `any` or `P`, and it has no port range or `N` is in it.
//!    Domain rules match nothing here (the resolver adds their addresses).
//! 2. If `D` is *protected* (the node's own addresses, the sandbox subnet,
//!    link-local incl. 169.254.169.254, loopback, `0.0.0.0/8`, multicast and
//!    above), only rules whose CIDR lies inside a protected range are tried:
//!    a protected address is opened by naming it (`--allow 10.88.0.1/32:udp:53`),
//!    never by a broad rule such as `0.0.0.0/0`.
//! 3. The first matching rule decides; with none, a protected `D` is denied
//!    and any other `D` gets the policy's default.
//!
//! # Compiled form (what the BPF program reads)
//! First-match over CIDRs cannot be an LPM lookup alone (the longest prefix is
//! not the first rule). Every rule CIDR and every protected range becomes an
//! LPM-trie key `K`, whose value is the bitmask of the rules that may match any
//! address whose longest key is `K`: the rules whose CIDR contains `K` (and,
//! when `K` is protected, lies inside a protected range), plus a protected flag.
//! This is exact: if rule `R` contains `D`, `R`'s CIDR is a key matching `D`,
//! so the longest key `K` for `D` is inside `R`. The program then walks the set
//! bits in ascending order (rule order) and checks protocol and ports in the
//! rule array: cost is the number of rules whose CIDR contains `D`, not the
//! number of rules.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::policy::{Action, MAX_RULES, Proto, Rule, Target};

/// Words of the per-prefix rule bitmask (`MAX_RULES` bits).
pub const MASK_WORDS: usize = MAX_RULES / 64;

/// Ranges no broad rule opens (see the module docs). The node adds its own
/// addresses and the sandbox subnet.
pub const ALWAYS_PROTECTED: [&str; 5] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/3",
    "255.255.255.255/32",
];

/// The protected destination ranges of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    ranges: Vec<Ipv4Net>,
}

impl Protected {
    /// [`ALWAYS_PROTECTED`] plus the sandbox subnet and the host's addresses.
    pub fn new(subnet: Ipv4Net, host_addrs: &[Ipv4Addr]) -> Self {
        let mut ranges: Vec<Ipv4Net> = ALWAYS_PROTECTED
            .iter()
            .map(|c| c.parse().expect("constant CIDRs parse"))
            .collect();
        ranges.push(subnet.trunc());
        ranges.extend(
            host_addrs
                .iter()
                .map(|a| Ipv4Net::new(*a, 32).expect("32 is a valid prefix")),
        );
        ranges.sort();
        ranges.dedup();
        Protected { ranges }
    }
    /// Adds the node's configured infrastructure ranges
    /// ([`crate::protect`]): treated like the node's own addresses.
    pub fn with_extra(mut self, extra: &[Ipv4Net]) -> Self {
        self.ranges.extend(extra.iter().map(Ipv4Net::trunc));
        self.ranges.sort();
        self.ranges.dedup();
        self
    }
    pub fn ranges(&self) -> &[Ipv4Net] {
        &self.ranges
    }
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.ranges.iter().any(|r| r.contains(&addr))
    }
    fn covers(&self, net: &Ipv4Net) -> bool {
        self.ranges.iter().any(|r| r.contains(net))
    }
}

/// One rule as the BPF program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompiledRule {
    /// IP protocol number, 0 = any.
    pub proto: u8,
    pub action: Action,
    /// Inclusive port range; `(0, 65535)` when the rule has none.
    pub ports: Option<(u16, u16)>,
}

/// One LPM-trie entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixEntry {
    pub prefix: Ipv4Net,
    /// Bit `i` set: rule `i` may match addresses whose longest key is `prefix`.
    pub mask: [u64; MASK_WORDS],
    pub protected: bool,
}

/// The map contents for one direction of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub default: Action,
    pub rules: Vec<CompiledRule>,
    pub prefixes: Vec<PrefixEntry>,
}

/// A packet as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub addr: Ipv4Addr,
    /// IP protocol number.
    pub proto: u8,
    /// `None` for protocols without ports and for non-first fragments.
    pub port: Option<u16>,
}

/// Who decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Rule(usize, Action),
    Protected,
    Default(Action),
}

impl Verdict {
    pub fn allows(self) -> bool {
        matches!(
            self,
            Verdict::Rule(_, Action::Allow) | Verdict::Default(Action::Allow)
        )
    }
}

fn rule_matches_l4(r: &CompiledRule, flow: &Flow) -> bool {
    if r.proto != 0 && r.proto != flow.proto {
        return false;
    }
    match (r.ports, flow.port) {
        (None, _) => true,
        (Some((lo, hi)), Some(p)) => lo <= p && p <= hi,
        (Some(_), None) => false,
    }
}

fn compile_rule(r: &Rule) -> CompiledRule {
    CompiledRule {
        proto: r.proto.number(),
        action: r.action,
        ports: r.ports.map(|p| (p.lo(), p.hi())),
    }
}

/// Reference semantics, straight from the module docs.
pub fn evaluate(rules: &[Rule], default: Action, protected: &Protected, flow: &Flow) -> Verdict {
    let is_protected = protected.contains(flow.addr);
    for (i, r) in rules.iter().enumerate() {
        let Target::Cidr(net) = &r.target else {
            continue;
        };
        if !net.contains(&flow.addr) {
            continue;
        }
        if is_protected && !protected.covers(net) {
            continue;
        }
        if rule_matches_l4(&compile_rule(r), flow) {
            return Verdict::Rule(i, r.action);
        }
    }
    if is_protected {
        Verdict::Protected
    } else {
        Verdict::Default(default)
    }
}

/// Compiles one direction (`rules.len() <= MAX_RULES`, as [`Policy`](crate::policy::Policy)
/// guarantees; extra rules are ignored).
pub fn compile(rules: &[Rule], default: Action, protected: &Protected) -> Compiled {
    let rules = &rules[..rules.len().min(MAX_RULES)];
    let mut keys: Vec<Ipv4Net> = rules
        .iter()
        .filter_map(|r| match &r.target {
            Target::Cidr(n) => Some(*n),
            Target::Domain(_) => None,
        })
        .chain(protected.ranges().iter().copied())
        .collect();
    keys.sort();
    keys.dedup();
    let prefixes = keys
        .into_iter()
        .map(|key| {
            let key_protected = protected.covers(&key);
            let mut mask = [0u64; MASK_WORDS];
            for (i, r) in rules.iter().enumerate() {
                let Target::Cidr(net) = &r.target else {
                    continue;
                };
                if net.contains(&key) && (!key_protected || protected.covers(net)) {
                    mask[i / 64] |= 1 << (i % 64);
                }
            }
            PrefixEntry {
                prefix: key,
                mask,
                protected: key_protected,
            }
        })
        .collect();
    Compiled {
        default,
        rules: rules.iter().map(compile_rule).collect(),
        prefixes,
    }
}

impl Compiled {
    /// What the BPF program computes: longest-prefix lookup, then the set
    /// bits in order. (A model of `bpf/policy.c` for tests and `policy get`.)
    pub fn evaluate(&self, flow: &Flow) -> Verdict {
        let entry = self
            .prefixes
            .iter()
            .filter(|p| p.prefix.contains(&flow.addr))
            .max_by_key(|p| p.prefix.prefix_len());
        let Some(entry) = entry else {
            return Verdict::Default(self.default);
        };
        for (w, word) in entry.mask.iter().enumerate() {
            for b in 0..64 {
                if word >> b & 1 == 1 {
                    let i = w * 64 + b;
                    if let Some(r) = self.rules.get(i)
                        && rule_matches_l4(r, flow)
                    {
                        return Verdict::Rule(i, r.action);
                    }
                }
            }
        }
        if entry.protected {
            Verdict::Protected
        } else {
            Verdict::Default(self.default)
        }
    }
}

/// Convenience for `Proto` values in tests and tools.
pub fn proto_number(p: Proto) -> u8 {
    p.number()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, PortRange, Preset};
    use proptest::prelude::*;

    fn protected() -> Protected {
        Protected::new(
            "10.88.0.0/16".parse().expect("cidr"),
            &[Ipv4Addr::new(10, 88, 0, 1), Ipv4Addr::new(192, 0, 2, 2)],
        )
    }

    fn flow(a: [u8; 4], proto: u8, port: Option<u16>) -> Flow {
        Flow {
            addr: Ipv4Addr::from(a),
            proto,
            port,
        }
    }

    #[test]
    fn protected_needs_a_narrow_rule() {
        let p = protected();
        let rules = vec![
            Rule::parse(Action::Allow, "0.0.0.0/0").expect("rule"),
            Rule::parse(Action::Allow, "10.88.0.1/32:udp:53").expect("rule"),
        ];
        let c = compile(&rules, Action::Allow, &p);
        for f in [
            flow([10, 88, 0, 1], 6, Some(22)),
            flow([169, 254, 169, 254], 6, Some(80)),
            flow([10, 88, 0, 7], 1, None),
            flow([192, 0, 2, 2], 6, Some(22)),
        ] {
            assert_eq!(evaluate(&rules, Action::Allow, &p, &f), Verdict::Protected);
            assert_eq!(c.evaluate(&f), Verdict::Protected);
        }
        let dns = flow([10, 88, 0, 1], 17, Some(53));
        assert_eq!(c.evaluate(&dns), Verdict::Rule(1, Action::Allow));
        let out = flow([1, 1, 1, 1], 6, Some(443));
        assert_eq!(c.evaluate(&out), Verdict::Rule(0, Action::Allow));
    }

    #[test]
    fn internet_only() {
        let p = protected();
        let pol = Preset::InternetOnly.policy();
        let c = compile(&pol.egress, pol.default, &p);
        assert!(c.evaluate(&flow([8, 8, 8, 8], 17, Some(53))).allows());
        assert!(!c.evaluate(&flow([10, 1, 2, 3], 6, Some(443))).allows());
        assert!(!c.evaluate(&flow([192, 168, 1, 1], 6, Some(80))).allows());
        assert!(!c.evaluate(&flow([192, 0, 2, 2], 6, Some(80))).allows());
        assert!(c.evaluate(&flow([192, 0, 2, 3], 6, Some(80))).allows());
    }

    fn arb_net() -> impl Strategy<Value = Ipv4Net> {
        // Addresses from a small pool so prefixes overlap often.
        (
            prop::sample::select(vec![
                [10u8, 88, 0, 1],
                [10, 88, 3, 4],
                [10, 1, 2, 3],
                [169, 254, 169, 254],
                [1, 2, 3, 4],
                [1, 2, 200, 4],
                [0, 0, 0, 0],
                [192, 0, 2, 2],
            ]),
            0u8..=32,
        )
            .prop_map(|(a, l)| {
                Ipv4Net::new(Ipv4Addr::from(a), l)
                    .expect("len <= 32")
                    .trunc()
            })
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            any::<bool>(),
            arb_net(),
            prop::sample::select(vec![Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp]),
            prop::option::of((1u16..100, 0u16..50)),
        )
            .prop_map(|(allow, net, proto, ports)| Rule {
                action: if allow { Action::Allow } else { Action::Deny },
                target: Target::Cidr(net),
                proto,
                ports: match proto {
                    Proto::Tcp | Proto::Udp => {
                        ports.and_then(|(lo, span)| PortRange::new(lo, lo + span))
                    }
                    _ => None,
                },
            })
    }

    fn arb_flow() -> impl Strategy<Value = Flow> {
        (
            arb_net(),
            any::<u32>(),
            prop::sample::select(vec![1u8, 6, 17, 47]),
            prop::option::of(1u16..160),
        )
            .prop_map(|(net, bits, proto, port)| {
                // An address inside `net` (random host bits).
                let host = if net.prefix_len() == 32 {
                    0
                } else {
                    bits >> net.prefix_len()
                };
                Flow {
                    addr: Ipv4Addr::from(u32::from(net.network()) | host),
                    proto,
                    port: if proto == 6 || proto == 17 {
                        port
                    } else {
                        None
                    },
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn compiled_equals_reference(
            rules in prop::collection::vec(arb_rule(), 0..24),
            default_allow in any::<bool>(),
            flows in prop::collection::vec(arb_flow(), 1..16),
        ) {
            let p = protected();
            let default = if default_allow { Action::Allow } else { Action::Deny };
            let c = compile(&rules, default, &p);
            for f in &flows {
                prop_assert_eq!(c.evaluate(f), evaluate(&rules, default, &p, f), "flow {:?}", f);
            }
        }
    }

    #[test]
    fn many_rules_use_high_bits() {
        let p = protected();
        let mut rules: Vec<Rule> = (0..1000)
            .map(|i| {
                Rule::parse(
                    Action::Deny,
                    &format!("11.{}.{}.0/24:tcp:443", i / 256, i % 256),
                )
                .expect("rule")
            })
            .collect();
        rules.push(Rule::parse(Action::Allow, "11.0.0.0/8").expect("rule"));
        let c = compile(&rules, Action::Deny, &p);
        assert_eq!(
            c.evaluate(&flow([11, 3, 231, 9], 6, Some(443))),
            Verdict::Rule(999, Action::Deny)
        );
        assert_eq!(
            c.evaluate(&flow([11, 3, 231, 9], 6, Some(80))),
            Verdict::Rule(1000, Action::Allow)
        );
    }
}
