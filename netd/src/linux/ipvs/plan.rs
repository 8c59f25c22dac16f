//! The IPVS backend's pure core: what the kernel must hold for an [`LbSpec`] ([`IpvsState`]),
//! the ordered requests that turn one state into another ([`plan`]), and the companion
//! nftables table that does what IPVS cannot ([`Companion`]).
//!
//! IPVS has no transactions: every request takes effect on its own. [`plan`] therefore orders
//! them so that no connection ever finds a service that should have a healthy backend without
//! one (DESIGN.md LB requirement 7):
//! 1. new services, each created and then given its destinations;
//! 2. per changed service: new destinations, then weights raised, then weights lowered (to 0:
//!    draining), then option changes (`SET_SERVICE`), then deleted destinations: a service
//!    that goes from backends A to B has A and B for a moment, never neither;
//! 3. removed services last.
//!
//! Around these, the companion table changes in two nftables transactions: before the IPVS
//! requests everything it adds (services entering `no-backends` are rejected before IPVS
//! loses their last healthy destination; new hairpin addresses are masqueraded before IPVS
//! can pick them), after them everything it deletes (a service leaves `no-backends` only once
//! IPVS has its destination).
//!
//! Companion layout (table `ip swarmnet-lb`, the same name as the nftables backend's table,
//! so switching `--lb` replaces one with the other): set `no-backends` rejected from filter
//! chains at priority dstnat - 10 exactly as in [`crate::lb::nft_render`] (IPVS itself would
//! answer a service without an available destination with an ICMP port-unreachable, which is
//! rate-limited per client by `icmp_ratelimit`, and for TCP not a reset), and set `hairpin`
//! of `b . b` masqueraded at nat postrouting without the `ct status dnat` test of the nftables
//! layout: IPVS rewrites the destination outside netfilter's NAT, so conntrack never marks
//! its connections DNAT; a packet leaving the network namespace with source = destination is
//! only ever a hairpinned IPVS connection.
//!
//! Mapping of the model: one virtual service per [`ServiceKey`], scheduler `rr`; client-IP
//! affinity is a persistent service (`IP_VS_SVC_F_PERSISTENT`, netmask /32, the affinity
//! timeout as persistence timeout); each backend is a masquerading destination at
//! `ip:target_port`, weight 1 when healthy and 0 when draining (IPVS sends it no new
//! connection; established ones continue while it exists).
//!
//! Invariants: [`plan`] of a state to itself is empty; applying the plan's requests in order
//! to `old` gives `new` ([`apply_to`] models the kernel for the tests); the companion's
//! elements are a function of the spec.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::msg::{IP_VS_SVC_F_PERSISTENT, IpvsDest, IpvsService, Request};
use crate::lb::model::{Affinity, BackendState, LbSpec, Proto, ServiceKey, ServiceSpec};
use crate::lb::nft_render::{BaseChain, Elem, Hook, NamedSet, NftOp, REJECT_CHAIN, Rule};

/// The scheduler of services without affinity.
pub const SCHED: &str = "rr";

/// One virtual service and its destinations (`(address, port)` → destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsServiceState {
    pub svc: IpvsService,
    pub dests: BTreeMap<(Ipv4Addr, u16), IpvsDest>,
}

/// What the kernel holds in one namespace (or must hold).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpvsState {
    pub services: BTreeMap<ServiceKey, IpvsServiceState>,
}

/// The virtual service for one entry of the spec.
pub fn service_state(s: &ServiceSpec) -> IpvsServiceState {
    let (flags, timeout, netmask) = match s.affinity {
        Affinity::None => (0, 0, 0),
        Affinity::ClientIp { timeout } => (
            IP_VS_SVC_F_PERSISTENT,
            u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX),
            u32::MAX,
        ),
    };
    IpvsServiceState {
        svc: IpvsService {
            key: s.key,
            sched: SCHED.into(),
            flags,
            timeout,
            netmask,
        },
        dests: s
            .backends
            .iter()
            .map(|(ip, st)| {
                let weight = match st {
                    BackendState::Healthy => 1,
                    BackendState::Draining => 0,
                };
                (
                    (*ip, s.target_port),
                    IpvsDest::masq(*ip, s.target_port, weight),
                )
            })
            .collect(),
    }
}

/// The state for a whole spec.
pub fn desired(spec: &LbSpec) -> IpvsState {
    IpvsState {
        services: spec
            .services
            .iter()
            .map(|(k, s)| (*k, service_state(s)))
            .collect(),
    }
}

/// Whether two services differ in what `SET_SERVICE` changes. The kernel lists the
/// netmask of a non-persistent service as whatever was sent; only persistence uses it.
fn options_differ(a: &IpvsService, b: &IpvsService) -> bool {
    let persistent = |s: &IpvsService| s.flags & IP_VS_SVC_F_PERSISTENT != 0;
    a.sched != b.sched
        || a.flags != b.flags
        || (persistent(a) || persistent(b)) && (a.timeout != b.timeout || a.netmask != b.netmask)
}

/// Destinations as they matter for the plan: address, port, forwarding, weight (counters
/// and thresholds aside).
fn same_dest(a: &IpvsDest, b: &IpvsDest) -> bool {
    a.fwd == b.fwd && a.weight == b.weight && a.u_thresh == b.u_thresh && a.l_thresh == b.l_thresh
}

/// The ordered requests that turn `old` into `new` (see the module docs for the order).
pub fn plan(old: &IpvsState, new: &IpvsState) -> Vec<Request> {
    let mut added = Vec::new();
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for (k, n) in &new.services {
        match old.services.get(k) {
            None => {
                added.push(Request::NewService(n.svc.clone()));
                added.extend(n.dests.values().map(|d| Request::NewDest(*k, *d)));
            }
            Some(o) if o != n => changed.extend(plan_service(o, n)),
            Some(_) => {}
        }
    }
    for k in old.services.keys() {
        if !new.services.contains_key(k) {
            removed.push(Request::DelService(*k));
        }
    }
    added.extend(changed);
    added.extend(removed);
    added
}

fn plan_service(o: &IpvsServiceState, n: &IpvsServiceState) -> Vec<Request> {
    let key = n.svc.key;
    let mut out = Vec::new();
    for (id, d) in &n.dests {
        if !o.dests.contains_key(id) {
            out.push(Request::NewDest(key, *d));
        }
    }
    let mut lowered = Vec::new();
    for (id, d) in &n.dests {
        if let Some(od) = o.dests.get(id)
            && !same_dest(od, d)
        {
            if d.weight >= od.weight {
                out.push(Request::SetDest(key, *d));
            } else {
                lowered.push(Request::SetDest(key, *d));
            }
        }
    }
    out.extend(lowered);
    if options_differ(&o.svc, &n.svc) {
        out.push(Request::SetService(n.svc.clone()));
    }
    for id in o.dests.keys() {
        if !n.dests.contains_key(id) {
            out.push(Request::DelDest {
                service: key,
                addr: id.0,
                port: id.1,
            });
        }
    }
    out
}

/// The requests applied to `state` the way the kernel applies them: what the state is after
/// each one. Errors name the request the kernel would refuse (with the errno it would use).
pub fn apply_to(state: &mut IpvsState, req: &Request) -> Result<(), (Request, i32)> {
    let fail = |e| Err((req.clone(), e));
    match req {
        Request::NewService(s) => {
            if state.services.contains_key(&s.key) {
                return fail(libc::EEXIST);
            }
            state.services.insert(
                s.key,
                IpvsServiceState {
                    svc: s.clone(),
                    dests: BTreeMap::new(),
                },
            );
        }
        Request::SetService(s) => match state.services.get_mut(&s.key) {
            Some(st) => st.svc = s.clone(),
            None => return fail(libc::ESRCH),
        },
        Request::DelService(k) => {
            if state.services.remove(k).is_none() {
                return fail(libc::ESRCH);
            }
        }
        Request::NewDest(k, d) | Request::SetDest(k, d) => {
            let Some(st) = state.services.get_mut(k) else {
                return fail(libc::ESRCH);
            };
            let exists = st.dests.contains_key(&(d.addr, d.port));
            match (req, exists) {
                (Request::NewDest(..), true) => return fail(libc::EEXIST),
                (Request::SetDest(..), false) => return fail(libc::ENOENT),
                _ => {
                    st.dests.insert((d.addr, d.port), *d);
                }
            }
        }
        Request::DelDest {
            service,
            addr,
            port,
        } => {
            let Some(st) = state.services.get_mut(service) else {
                return fail(libc::ESRCH);
            };
            if st.dests.remove(&(*addr, *port)).is_none() {
                return fail(libc::ENOENT);
            }
        }
        Request::Flush => state.services.clear(),
        Request::GetService(_)
        | Request::DumpServices
        | Request::DumpDests(_)
        | Request::SetConfig(_)
        | Request::GetConfig
        | Request::GetInfo => {}
    }
    Ok(())
}

/// Backends (service, address, target port) of UDP services that the change from `old` to
/// `new` removes: their conntrack entries are deleted after the change, so a client's UDP
/// flow is balanced anew instead of staying on a destination that is gone.
pub fn removed_udp(old: &IpvsState, new: &IpvsState) -> Vec<(ServiceKey, Ipv4Addr, u16)> {
    let mut out = Vec::new();
    for (k, o) in &old.services {
        if k.proto != Proto::Udp {
            continue;
        }
        for id in o.dests.keys() {
            if !new
                .services
                .get(k)
                .is_some_and(|n| n.dests.contains_key(id))
            {
                out.push((*k, id.0, id.1));
            }
        }
    }
    out
}

/// The companion nftables table's content: services without a healthy backend, and how many
/// services use each backend address (for the `hairpin` set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Companion {
    pub no_backends: BTreeSet<ServiceKey>,
    pub hairpin: BTreeMap<Ipv4Addr, u32>,
}

/// Two nftables transactions around the IPVS requests: additions before, deletions after.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompanionOps {
    pub before: Vec<NftOp>,
    pub after: Vec<NftOp>,
}

fn hairpin_rule() -> Rule {
    Rule::HairpinMasqueradeAny
}

impl Companion {
    fn of(spec: &LbSpec) -> Self {
        let mut c = Self::default();
        for s in spec.services.values() {
            if s.healthy().is_empty() {
                c.no_backends.insert(s.key);
            }
            for ip in s.backends.keys() {
                *c.hairpin.entry(*ip).or_default() += 1;
            }
        }
        c
    }

    /// Ops that replace whatever table exists with the companion of `spec` (one transaction;
    /// the table holds no connection state, so replacing it drops nothing).
    pub fn plan_full(spec: &LbSpec) -> (Vec<NftOp>, Self) {
        let c = Self::of(spec);
        let mut ops = vec![
            NftOp::AddTable,
            NftOp::DelTable,
            NftOp::AddTable,
            NftOp::AddSet(NamedSet::NoBackends),
            NftOp::AddSet(NamedSet::Hairpin),
            NftOp::AddChain {
                name: REJECT_CHAIN.into(),
                base: None,
            },
            NftOp::AddRule {
                chain: REJECT_CHAIN.into(),
                rule: Rule::RejectTcp,
            },
            NftOp::AddRule {
                chain: REJECT_CHAIN.into(),
                rule: Rule::Reject,
            },
        ];
        let chains = [
            ("filter-prerouting", "filter", Hook::Prerouting, -110),
            ("filter-output", "filter", Hook::Output, -110),
            ("nat-postrouting", "nat", Hook::Postrouting, 100),
        ];
        for (name, kind, hook, priority) in chains {
            ops.push(NftOp::AddChain {
                name: name.into(),
                base: Some(BaseChain {
                    kind,
                    hook,
                    priority,
                }),
            });
            ops.push(NftOp::AddRule {
                chain: name.into(),
                rule: if kind == "nat" {
                    hairpin_rule()
                } else {
                    Rule::NoBackendReject
                },
            });
        }
        if !c.no_backends.is_empty() {
            ops.push(NftOp::AddElems {
                set: NamedSet::NoBackends,
                elems: c.no_backends.iter().map(|k| Elem::Service(*k)).collect(),
            });
        }
        if !c.hairpin.is_empty() {
            ops.push(NftOp::AddElems {
                set: NamedSet::Hairpin,
                elems: c.hairpin.keys().map(|ip| Elem::Hairpin(*ip)).collect(),
            });
        }
        (ops, c)
    }

    /// The element changes for the services that changed between `old` and `new` (given as
    /// pairs, `None` = absent); updates `self`.
    pub fn plan_diff<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (Option<&'a ServiceSpec>, Option<&'a ServiceSpec>)>,
    ) -> CompanionOps {
        let mut ops = CompanionOps::default();
        let (mut nb_add, mut nb_del, mut hp_add, mut hp_del) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut delta: BTreeMap<Ipv4Addr, i64> = BTreeMap::new();
        for (old, new) in changes {
            let was_empty = old.is_some_and(|o| o.healthy().is_empty());
            let is_empty = new.is_some_and(|n| n.healthy().is_empty());
            let key = new.or(old).map(|s| s.key);
            if let Some(key) = key {
                if is_empty && !was_empty {
                    nb_add.push(Elem::Service(key));
                    self.no_backends.insert(key);
                }
                if was_empty && !is_empty {
                    nb_del.push(Elem::Service(key));
                    self.no_backends.remove(&key);
                }
            }
            for (s, d) in [(old, -1i64), (new, 1)] {
                for ip in s.iter().flat_map(|s| s.backends.keys()) {
                    *delta.entry(*ip).or_default() += d;
                }
            }
        }
        for (ip, d) in delta {
            let before = i64::from(self.hairpin.get(&ip).copied().unwrap_or(0));
            let after = u32::try_from((before + d).max(0)).unwrap_or(u32::MAX);
            if before == 0 && after > 0 {
                hp_add.push(Elem::Hairpin(ip));
            } else if before > 0 && after == 0 {
                hp_del.push(Elem::Hairpin(ip));
            }
            if after == 0 {
                self.hairpin.remove(&ip);
            } else {
                self.hairpin.insert(ip, after);
            }
        }
        for (set, elems, into_before) in [
            (NamedSet::NoBackends, nb_add, true),
            (NamedSet::Hairpin, hp_add, true),
            (NamedSet::NoBackends, nb_del, false),
            (NamedSet::Hairpin, hp_del, false),
        ] {
            if elems.is_empty() {
                continue;
            }
            if into_before {
                ops.before.push(NftOp::AddElems { set, elems });
            } else {
                ops.after.push(NftOp::DelElems { set, elems });
            }
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::nft_render::render_script;
    use std::time::Duration;

    fn key(last: u8, proto: Proto) -> ServiceKey {
        ServiceKey {
            vip: Ipv4Addr::new(10, 0, 0, last),
            proto,
            port: 80,
        }
    }
    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, last)
    }

    /// Every prefix of the plan, applied to `old`, keeps each service that has a healthy
    /// destination in both `old` and `new` with at least one; the whole plan gives `new`.
    fn check_order(old: &LbSpec, new: &LbSpec) -> Vec<Request> {
        let (o, n) = (desired(old), desired(new));
        let reqs = plan(&o, &n);
        let healthy = |s: &IpvsState, k: &ServiceKey| {
            s.services
                .get(k)
                .is_some_and(|st| st.dests.values().any(|d| d.weight > 0))
        };
        let keep: Vec<ServiceKey> = n
            .services
            .keys()
            .filter(|k| healthy(&o, k) && healthy(&n, k))
            .copied()
            .collect();
        let mut state = o.clone();
        for r in &reqs {
            apply_to(&mut state, r).unwrap();
            for k in &keep {
                assert!(healthy(&state, k), "{k} without a backend after {r:?}");
            }
        }
        assert_eq!(state, n);
        assert!(plan(&n, &n).is_empty());
        reqs
    }

    #[test]
    fn replacing_every_backend_never_leaves_a_service_empty() {
        let a = LbSpec::from_services([
            ServiceSpec::new(key(1, Proto::Tcp), 8080, [ip(1), ip(2)]),
            ServiceSpec::new(key(2, Proto::Udp), 53, [ip(3)]),
        ]);
        let mut b = LbSpec::from_services([
            ServiceSpec::new(key(1, Proto::Tcp), 8080, [ip(4)]),
            ServiceSpec::new(key(2, Proto::Udp), 53, [ip(5)]),
            ServiceSpec::new(key(3, Proto::Tcp), 80, [ip(1)]),
        ]);
        let reqs = check_order(&a, &b);
        assert!(matches!(reqs[0], Request::NewService(_)), "{reqs:?}");
        assert!(matches!(reqs.last(), Some(Request::DelDest { .. })));
        // Swap which of two backends is healthy: raise before lowering.
        let mut c = b.clone();
        let s = c.services.get_mut(&key(1, Proto::Tcp)).unwrap();
        s.backends.insert(ip(4), BackendState::Draining);
        s.backends.insert(ip(6), BackendState::Healthy);
        check_order(&b, &c);
        let mut d = c.clone();
        let s = d.services.get_mut(&key(1, Proto::Tcp)).unwrap();
        s.backends.insert(ip(4), BackendState::Healthy);
        s.backends.insert(ip(6), BackendState::Draining);
        check_order(&c, &d);
        // Target port change: new destinations before the old ones go.
        b.services.get_mut(&key(2, Proto::Udp)).unwrap().target_port = 5353;
        check_order(&a, &b);
        // Removing services last.
        let reqs = check_order(&b, &a);
        assert!(matches!(reqs.last(), Some(Request::DelService(_))));
    }

    #[test]
    fn endpoint_change_is_one_request() {
        let mk = |n: u8| {
            LbSpec::from_services(
                (1..=n).map(|i| ServiceSpec::new(key(i, Proto::Tcp), 8080, [ip(i), ip(200)])),
            )
        };
        for n in [2u8, 200] {
            let old = mk(n);
            let mut new = old.clone();
            new.services
                .get_mut(&key(1, Proto::Tcp))
                .unwrap()
                .backends
                .insert(ip(201), BackendState::Healthy);
            assert_eq!(
                plan(&desired(&old), &desired(&new)),
                vec![Request::NewDest(
                    key(1, Proto::Tcp),
                    IpvsDest::masq(ip(201), 8080, 1)
                )]
            );
            let mut drained = new.clone();
            drained
                .services
                .get_mut(&key(1, Proto::Tcp))
                .unwrap()
                .backends
                .insert(ip(201), BackendState::Draining);
            assert_eq!(
                plan(&desired(&new), &desired(&drained)),
                vec![Request::SetDest(
                    key(1, Proto::Tcp),
                    IpvsDest::masq(ip(201), 8080, 0)
                )]
            );
        }
    }

    #[test]
    fn affinity_is_persistence() {
        let mut s = ServiceSpec::new(key(1, Proto::Tcp), 8080, [ip(1)]);
        let old = LbSpec::from_services([s.clone()]);
        s.affinity = Affinity::ClientIp {
            timeout: Duration::from_secs(10800),
        };
        let new = LbSpec::from_services([s]);
        let reqs = check_order(&old, &new);
        let [Request::SetService(svc)] = reqs.as_slice() else {
            panic!("{reqs:?}")
        };
        assert_eq!(
            (svc.flags, svc.timeout, svc.netmask),
            (IP_VS_SVC_F_PERSISTENT, 10800, u32::MAX)
        );
    }

    #[test]
    fn removed_udp_backends_are_listed() {
        let a = LbSpec::from_services([
            ServiceSpec::new(key(1, Proto::Udp), 53, [ip(1), ip(2)]),
            ServiceSpec::new(key(2, Proto::Tcp), 80, [ip(1)]),
        ]);
        let b = LbSpec::from_services([ServiceSpec::new(key(1, Proto::Udp), 53, [ip(2)])]);
        assert_eq!(
            removed_udp(&desired(&a), &desired(&b)),
            vec![(key(1, Proto::Udp), ip(1), 53)]
        );
    }

    #[test]
    fn companion_adds_before_and_deletes_after() {
        let a = LbSpec::from_services([
            ServiceSpec::new(key(1, Proto::Tcp), 8080, [ip(1)]),
            ServiceSpec::new(key(2, Proto::Tcp), 8080, []),
        ]);
        let (_, mut c) = Companion::plan_full(&a);
        assert_eq!(c, Companion::of(&a));
        let b = LbSpec::from_services([
            ServiceSpec::new(key(1, Proto::Tcp), 8080, []),
            ServiceSpec::new(key(2, Proto::Tcp), 8080, [ip(2)]),
        ]);
        let ops = c.plan_diff(
            model_changes(&a, &b)
                .iter()
                .map(|(o, n)| (o.as_ref(), n.as_ref())),
        );
        assert_eq!(
            render_script(&ops.before),
            "add element ip swarmnet-lb no-backends { 10.0.0.1 . tcp . 80 }\n\
             add element ip swarmnet-lb hairpin { 10.0.1.2 . 10.0.1.2 }\n"
        );
        assert_eq!(
            render_script(&ops.after),
            "delete element ip swarmnet-lb no-backends { 10.0.0.2 . tcp . 80 }\n\
             delete element ip swarmnet-lb hairpin { 10.0.1.1 . 10.0.1.1 }\n"
        );
        assert_eq!(c, Companion::of(&b));
    }

    fn model_changes(a: &LbSpec, b: &LbSpec) -> Vec<(Option<ServiceSpec>, Option<ServiceSpec>)> {
        crate::lb::model::diff(a, b)
            .into_iter()
            .map(|c| match c {
                crate::lb::ServiceChange::Added(n) => (None, Some(n.clone())),
                crate::lb::ServiceChange::Removed(o) => (Some(o.clone()), None),
                crate::lb::ServiceChange::Changed { old, new } => {
                    (Some(old.clone()), Some(new.clone()))
                }
            })
            .collect()
    }
}
