//! The pure load-balancer model of one namespace: services (VIP, protocol, port), their
//! backends and options, and the difference between two such sets.
//!
//! Nothing here knows nftables, IPVS or eBPF: every backend implements the same model, and the
//! contract suite (`netd/tests/lb_contract.rs`) checks the same semantics on each.
//!
//! Invariants: a service is identified by its [`ServiceKey`] (one entry per VIP, protocol and
//! port, so a service with several ports is several entries); a backend is identified by its IP
//! within a service (all backends of one entry share `target_port`); [`LbSpec`] holds services
//! in key order, so everything derived from it is deterministic.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client connects to: `vip:port/proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub vip: Ipv4Addr,
    pub proto: Proto,
    pub port: u16,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.proto)
    }
}

/// Whether a backend takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Takes new connections.
    Healthy,
    /// Leaving: no new connection reaches it, established ones continue. The caller keeps a
    /// backend `Draining` for its grace period, then removes it.
    Draining,
}

/// Client-IP session affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Affinity {
    /// Every new connection picks a healthy backend at random.
    #[default]
    None,
    /// New connections from one client IP go to one backend. `timeout` is how long the binding
    /// must at least hold while the client is idle. The nftables backend hashes the client
    /// address (stateless `jhash`), which holds for as long as the set of healthy backends is
    /// unchanged, whatever the timeout; a stateful backend (IPVS persistence, eBPF map) uses
    /// the timeout as its expiry.
    ClientIp { timeout: Duration },
}

/// One service entry of a namespace's load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub key: ServiceKey,
    /// The port the backends listen on.
    pub target_port: u16,
    pub backends: BTreeMap<Ipv4Addr, BackendState>,
    pub affinity: Affinity,
}

impl ServiceSpec {
    /// A service without affinity whose backends are all healthy.
    pub fn new(
        key: ServiceKey,
        target_port: u16,
        healthy: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Self {
        Self {
            key,
            target_port,
            backends: healthy
                .into_iter()
                .map(|ip| (ip, BackendState::Healthy))
                .collect(),
            affinity: Affinity::None,
        }
    }

    /// Healthy backends in address order: the ones new connections may reach.
    pub fn healthy(&self) -> Vec<Ipv4Addr> {
        self.backends
            .iter()
            .filter(|(_, s)| **s == BackendState::Healthy)
            .map(|(ip, _)| *ip)
            .collect()
    }
}

/// Idle timeouts of load-balanced connections. They are conntrack-level in the nftables
/// backend (per namespace: `net.netfilter.nf_conntrack_tcp_timeout_established` and
/// `nf_conntrack_udp_timeout_stream` in the network's namespace, which only carries overlay
/// traffic), IPVS has the same three per-namespace values (`IPVS_CMD_SET_CONFIG`), and a
/// connect-time eBPF balancer has no per-connection state to expire. `None` leaves the
/// kernel's defaults (TCP established: 5 days, so no silent drop at 900 s as with IPVS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeouts {
    pub tcp_established: Duration,
    pub udp_stream: Duration,
}

/// The desired load-balancer state of one namespace: every service it must serve. The port
/// compares it with what it applied last and changes only the difference.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LbSpec {
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    pub timeouts: Option<IdleTimeouts>,
}

impl LbSpec {
    /// Builds a spec; a later service with the same key replaces an earlier one.
    pub fn from_services(services: impl IntoIterator<Item = ServiceSpec>) -> Self {
        Self {
            services: services.into_iter().map(|s| (s.key, s)).collect(),
            timeouts: None,
        }
    }
    pub fn insert(&mut self, s: ServiceSpec) {
        self.services.insert(s.key, s);
    }
}

/// How one service differs between two specs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceChange<'a> {
    Added(&'a ServiceSpec),
    Removed(&'a ServiceSpec),
    Changed {
        old: &'a ServiceSpec,
        new: &'a ServiceSpec,
    },
}

/// Services that differ between `old` and `new`, in key order. Unchanged services are not
/// visited at all beyond the comparison, so the output is proportional to what changed.
pub fn diff<'a>(old: &'a LbSpec, new: &'a LbSpec) -> Vec<ServiceChange<'a>> {
    let mut out = Vec::new();
    let mut o = old.services.iter().peekable();
    let mut n = new.services.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((_, os)), None) => {
                out.push(ServiceChange::Removed(os));
                o.next();
            }
            (None, Some((_, ns))) => {
                out.push(ServiceChange::Added(ns));
                n.next();
            }
            (Some((ok, os)), Some((nk, ns))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    out.push(ServiceChange::Removed(os));
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(ServiceChange::Added(ns));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if os != ns {
                        out.push(ServiceChange::Changed { old: os, new: ns });
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8, port: u16) -> ServiceKey {
        ServiceKey {
            vip: Ipv4Addr::new(10, 0, 0, last),
            proto: Proto::Tcp,
            port,
        }
    }

    #[test]
    fn diff_reports_only_what_changed() {
        let a = ServiceSpec::new(key(1, 80), 8080, [Ipv4Addr::new(10, 0, 1, 1)]);
        let b = ServiceSpec::new(key(2, 80), 8080, [Ipv4Addr::new(10, 0, 1, 2)]);
        let c = ServiceSpec::new(key(3, 80), 8080, [Ipv4Addr::new(10, 0, 1, 3)]);
        let old = LbSpec::from_services([a.clone(), b.clone()]);
        let mut b2 = b.clone();
        b2.backends
            .insert(Ipv4Addr::new(10, 0, 1, 1), BackendState::Draining);
        let new = LbSpec::from_services([b2.clone(), c.clone()]);
        assert_eq!(
            diff(&old, &new),
            vec![
                ServiceChange::Removed(&a),
                ServiceChange::Changed { old: &b, new: &b2 },
                ServiceChange::Added(&c),
            ]
        );
        assert!(diff(&new, &new).is_empty());
        assert_eq!(b2.healthy(), vec![Ipv4Addr::new(10, 0, 1, 2)]);
    }
}
