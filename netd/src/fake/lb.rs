//! [`FakeLoadBalancer`]: an in-memory [`LoadBalancerPort`] that models what a client sees: which
//! backend a new connection to `vip:port/proto` reaches, refusal when no backend is healthy,
//! client-IP affinity, draining, and a conntrack table that keeps established connections on
//! their backend whatever happens to the service afterwards.
//!
//! Invariants: a namespace's spec changes only through `apply` (one "transaction" per apply
//! that changes something) or `tamper` (drift injected by a test); random choices come from a
//! seeded xorshift, so runs are reproducible.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::lb::model::diff;
use crate::lb::{
    Affinity, ApplyStats, LbKind, LbObserved, LbSpec, LoadBalancerPort, ServiceChange, ServiceKey,
};
use crate::port::{NsRef, PortResult};

/// Why a new connection did not reach a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeRefusal {
    /// The service exists and has no healthy backend: TCP reset / ICMP port-unreachable.
    NoBackend,
    /// No load balancer state for this address in the namespace: the kernel would answer as
    /// for any other local address without a listener.
    NoService,
}

/// An established connection (a conntrack entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeConn {
    pub id: u64,
    pub backend: Ipv4Addr,
    pub port: u16,
    /// The source address the backend sees.
    pub peer: Ipv4Addr,
}

#[derive(Debug, Default)]
struct NsState {
    applied: LbSpec,
    /// What the "kernel" holds: differs from `applied` after `tamper`.
    kernel: Option<LbSpec>,
    commits: u64,
    drifted: bool,
}

/// The in-memory load balancer.
#[derive(Debug)]
pub struct FakeLoadBalancer {
    nss: BTreeMap<NsRef, NsState>,
    rng: u64,
    next_conn: u64,
    conns: BTreeMap<u64, FakeConn>,
    /// UDP flows (namespace, client address, client port, service) and their conntrack entry.
    flows: BTreeMap<(NsRef, Ipv4Addr, u16, ServiceKey), u64>,
}

impl Default for FakeLoadBalancer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeLoadBalancer {
    pub fn new() -> Self {
        Self {
            nss: BTreeMap::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
            next_conn: 1,
            conns: BTreeMap::new(),
            flows: BTreeMap::new(),
        }
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// A new connection from `client` in namespace `ns` to `key`.
    pub fn connect(
        &mut self,
        ns: &NsRef,
        client: Ipv4Addr,
        key: ServiceKey,
    ) -> Result<FakeConn, FakeRefusal> {
        let svc = self
            .nss
            .get(ns)
            .and_then(|s| s.kernel.as_ref())
            .and_then(|k| k.services.get(&key))
            .cloned()
            .ok_or(FakeRefusal::NoService)?;
        let healthy = svc.healthy();
        if healthy.is_empty() {
            return Err(FakeRefusal::NoBackend);
        }
        let n = u64::try_from(healthy.len()).unwrap_or(1);
        let pick = match svc.affinity {
            // Stateless hash of the client address, as the nftables backend does.
            Affinity::ClientIp { .. } => {
                u64::from(u32::from(client)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32
            }
            Affinity::None => self.random(),
        } % n;
        let backend = healthy[usize::try_from(pick).unwrap_or(0)];
        let id = self.next_conn;
        self.next_conn += 1;
        let conn = FakeConn {
            id,
            backend,
            port: svc.target_port,
            // Hairpin: a backend reaching itself is masqueraded to the namespace's address;
            // the fake has no addresses, so it says "not the client" with 0.0.0.0.
            peer: if backend == client {
                Ipv4Addr::UNSPECIFIED
            } else {
                client
            },
        };
        self.conns.insert(id, conn);
        Ok(conn)
    }

    /// A datagram of the UDP flow from `client:client_port` to `key`: the flow's conntrack
    /// entry while it exists, else a new pick (as a first datagram gets).
    pub fn udp_send(
        &mut self,
        ns: &NsRef,
        client: Ipv4Addr,
        client_port: u16,
        key: ServiceKey,
    ) -> Result<FakeConn, FakeRefusal> {
        let flow = (ns.clone(), client, client_port, key);
        if let Some(c) = self.flows.get(&flow).and_then(|id| self.conns.get(id)) {
            return Ok(*c);
        }
        let c = self.connect(ns, client, key)?;
        self.flows.insert(flow, c.id);
        Ok(c)
    }

    /// Whether an established connection still works: conntrack keeps it on its backend
    /// whatever happened to the service (drain, removal, flush).
    pub fn established(&self, id: u64) -> Option<FakeConn> {
        self.conns.get(&id).copied()
    }

    /// Transactions committed in `ns` so far.
    pub fn commits(&self, ns: &NsRef) -> u64 {
        self.nss.get(ns).map_or(0, |s| s.commits)
    }

    /// Drift injected by a test: someone removed every service from our table.
    pub fn tamper(&mut self, ns: &NsRef) {
        if let Some(s) = self.nss.get_mut(ns) {
            s.kernel = Some(LbSpec::default());
            s.commits += 1;
        }
    }
}

impl LoadBalancerPort for FakeLoadBalancer {
    fn kind(&self) -> LbKind {
        LbKind::Fake
    }

    fn apply(&mut self, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats> {
        let state = self.nss.entry(ns.clone()).or_default();
        let full = state.kernel.is_none() || state.drifted;
        let base = if full {
            LbSpec::default()
        } else {
            state.applied.clone()
        };
        let changes = diff(&base, spec);
        // One "message" per changed service and per changed backend: what a kernel with
        // per-object updates would have to touch.
        let messages: usize = changes
            .iter()
            .map(|c| match c {
                ServiceChange::Added(s) | ServiceChange::Removed(s) => 1 + s.backends.len(),
                ServiceChange::Changed { old, new } => {
                    let mut n = 1;
                    for (ip, st) in &new.backends {
                        if old.backends.get(ip) != Some(st) {
                            n += 1;
                        }
                    }
                    n + old
                        .backends
                        .keys()
                        .filter(|ip| !new.backends.contains_key(ip))
                        .count()
                }
            })
            .sum();
        // A backend removed from a UDP service loses its flows (conntrack deletion).
        for c in &changes {
            let (old, new) = match c {
                ServiceChange::Removed(s) => (*s, None),
                ServiceChange::Changed { old, new } => (*old, Some(*new)),
                ServiceChange::Added(_) => continue,
            };
            if old.key.proto != crate::lb::Proto::Udp {
                continue;
            }
            for ip in old.backends.keys() {
                if new.is_some_and(|n| n.backends.contains_key(ip)) {
                    continue;
                }
                let conns = &mut self.conns;
                self.flows.retain(|(fns, _, _, k), id| {
                    let gone = fns == ns
                        && *k == old.key
                        && conns.get(id).is_some_and(|c| c.backend == *ip);
                    if gone {
                        conns.remove(id);
                    }
                    !gone
                });
            }
        }
        let changed = !changes.is_empty() || full;
        state.applied = spec.clone();
        state.kernel = Some(spec.clone());
        state.drifted = false;
        if changed {
            state.commits += 1;
        }
        Ok(ApplyStats {
            services_changed: changes.len(),
            messages,
            bytes: 0,
            transactions: usize::from(changed),
            full,
        })
    }

    fn observe(&mut self, ns: &NsRef) -> PortResult<LbObserved> {
        Ok(match self.nss.get_mut(ns) {
            None => LbObserved::Absent,
            Some(s) if s.kernel.is_none() => LbObserved::Absent,
            Some(s) => {
                if s.kernel.as_ref() == Some(&s.applied) && !s.drifted {
                    LbObserved::InSync
                } else {
                    s.drifted = true;
                    LbObserved::Drifted
                }
            }
        })
    }

    fn flush(&mut self, ns: &NsRef) -> PortResult<()> {
        if let Some(s) = self.nss.remove(ns)
            && s.kernel.is_some()
        {
            // Keep the commit count visible to tests that compare it afterwards.
            self.nss.insert(
                ns.clone(),
                NsState {
                    commits: s.commits + 1,
                    ..NsState::default()
                },
            );
        }
        Ok(())
    }

    fn namespaces(&self) -> Vec<NsRef> {
        self.nss
            .iter()
            .filter(|(_, s)| s.kernel.is_some())
            .map(|(ns, _)| ns.clone())
            .collect()
    }
}
