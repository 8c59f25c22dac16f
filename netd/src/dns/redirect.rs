//! [`DnsRedirectPort`]: the resolver's redirect of 127.0.0.11:53 to its sockets' random ports
//! inside one sandbox namespace, as a narrow port with a Linux implementation
//! (`crate::linux::nft::dns_redirect`, our own nft table per sandbox) and a fake
//! (`crate::fake::dns_redirect`) held to one contract suite
//! (`netd/tests/dns_redirect_contract.rs`).
//!
//! Docker's embedded resolver (moby `libnetwork/resolver_unix.go`) binds random ports too and
//! DNATs port 53 to them, which sends every query through conntrack and NAT: a new conntrack
//! entry per query, kept for the UDP timeout, so one sandbox flooding its resolver fills the
//! conntrack table it shares with every other sandbox. Ours is stateless: per transport, one
//! rule rewrites the destination port of queries (53 → the socket's port) and one the source
//! port of replies (the socket's port → 53), both `notrack`, at the raw priority of the output
//! hook (all of it is loopback traffic inside the sandbox). No conntrack entry, no NAT lookup.
//!
//! [`DnsRedirect::rules`] is what a sandbox should hold; [`DnsRedirectPort::read`] is what it
//! does hold, decoded rule by rule, so a hand edit that keeps the table but changes or removes
//! a rule is drift (not only a deleted table).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::port::PortResult;

/// IP protocol numbers of the two redirected transports.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Where 127.0.0.11:53 really goes in one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRedirect {
    pub addr: Ipv4Addr,
    pub udp_port: u16,
    pub tcp_port: u16,
}

impl DnsRedirect {
    /// The rules the sandbox should hold, in chain order: per transport (UDP first), the
    /// query rewrite then the reply rewrite.
    pub fn rules(&self) -> Vec<RuleSeen> {
        [(PROTO_UDP, self.udp_port), (PROTO_TCP, self.tcp_port)]
            .into_iter()
            .flat_map(|(proto, port)| {
                [
                    Rewrite {
                        dir: Dir::Query,
                        proto,
                        addr: self.addr,
                        from_port: 53,
                        to_port: port,
                    },
                    Rewrite {
                        dir: Dir::Reply,
                        proto,
                        addr: self.addr,
                        from_port: port,
                        to_port: 53,
                    },
                ]
            })
            .map(RuleSeen::Rewrite)
            .collect()
    }
}

/// Which packets a rewrite applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// To `addr:from_port`: the destination port becomes `to_port`.
    Query,
    /// From `addr:from_port`: the source port becomes `to_port`.
    Reply,
}

/// `ip daddr A <proto> dport P notrack <proto> dport set Q` (query) or
/// `ip saddr A <proto> sport P notrack <proto> sport set Q` (reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    pub dir: Dir,
    pub proto: u8,
    pub addr: Ipv4Addr,
    pub from_port: u16,
    pub to_port: u16,
}

impl fmt::Display for Rewrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            PROTO_UDP => "udp".to_string(),
            PROTO_TCP => "tcp".to_string(),
            p => format!("proto {p}"),
        };
        let (what, port) = match self.dir {
            Dir::Query => ("to", "dport"),
            Dir::Reply => ("from", "sport"),
        };
        write!(
            f,
            "{proto} {what} {}:{}: {port} -> {} (notrack)",
            self.addr, self.from_port, self.to_port
        )
    }
}

/// One rule of the sandbox's redirect chain as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSeen {
    Rewrite(Rewrite),
    /// A rule that is not a redirect of ours (added by hand, or edited): its expressions.
    Other(String),
}

impl fmt::Display for RuleSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rewrite(r) => r.fmt(f),
            Self::Other(s) => write!(f, "foreign rule [{s}]"),
        }
    }
}

/// What is wrong with a sandbox's redirect, `None` when it holds exactly `want`.
pub fn drift(want: &DnsRedirect, seen: Option<&[RuleSeen]>) -> Option<String> {
    let Some(seen) = seen else {
        return Some("redirect table missing: restore it".into());
    };
    let want = want.rules();
    if seen == want.as_slice() {
        return None;
    }
    let missing: Vec<String> = want
        .iter()
        .filter(|r| !seen.contains(r))
        .map(ToString::to_string)
        .collect();
    let extra: Vec<String> = seen
        .iter()
        .filter(|r| !want.contains(r))
        .map(ToString::to_string)
        .collect();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("add {}", missing.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("remove {}", extra.join(", ")));
    }
    if parts.is_empty() {
        parts.push("reorder the rules".into());
    }
    Some(format!("redirect table differs: {}", parts.join("; ")))
}

/// The redirect in sandbox namespaces, addressed by their namespace file.
pub trait DnsRedirectPort: Send + Sync + std::fmt::Debug {
    /// Makes the sandbox's redirect exactly `want` (one transaction: a failure changes nothing).
    fn ensure(&self, netns: &Path, want: &DnsRedirect) -> PortResult<()>;
    /// Removes the redirect; a missing one is fine.
    fn delete(&self, netns: &Path) -> PortResult<()>;
    /// The redirect's rules as held now, in order; `None` when the table or its chain is gone.
    fn read(&self, netns: &Path) -> PortResult<Option<Vec<RuleSeen>>>;
    /// A number that changes whenever the namespace's ruleset changes (ours or anyone's), so
    /// the caller reads the rules back only when something may have moved.
    fn generation(&self, netns: &Path) -> PortResult<u32>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want() -> DnsRedirect {
        DnsRedirect {
            addr: Ipv4Addr::new(127, 0, 0, 11),
            udp_port: 40001,
            tcp_port: 40002,
        }
    }

    #[test]
    fn four_rewrites_query_and_reply_per_transport() {
        let r: Vec<String> = want().rules().iter().map(ToString::to_string).collect();
        assert_eq!(
            r,
            [
                "udp to 127.0.0.11:53: dport -> 40001 (notrack)",
                "udp from 127.0.0.11:40001: sport -> 53 (notrack)",
                "tcp to 127.0.0.11:53: dport -> 40002 (notrack)",
                "tcp from 127.0.0.11:40002: sport -> 53 (notrack)",
            ]
        );
    }

    #[test]
    fn exact_rules_are_no_drift() {
        assert_eq!(drift(&want(), Some(&want().rules())), None);
    }

    #[test]
    fn missing_table_changed_port_and_foreign_rule_are_named() {
        assert!(drift(&want(), None).unwrap().contains("missing"));
        let mut seen = want().rules();
        if let RuleSeen::Rewrite(r) = &mut seen[2] {
            r.to_port = 9;
        }
        seen.push(RuleSeen::Other("counter".into()));
        let d = drift(&want(), Some(&seen)).unwrap();
        assert!(
            d.contains("add tcp to 127.0.0.11:53: dport -> 40002"),
            "{d}"
        );
        assert!(d.contains("remove tcp to 127.0.0.11:53: dport -> 9"), "{d}");
        assert!(d.contains("foreign rule [counter]"), "{d}");
        let mut swapped = want().rules();
        swapped.reverse();
        assert!(drift(&want(), Some(&swapped)).unwrap().contains("reorder"));
        assert!(drift(&want(), Some(&[])).unwrap().contains("add udp"));
    }
}
