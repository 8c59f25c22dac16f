//! Pure planning: `plan(desired, observed, scope) -> Vec<ObjectPlan>`.
//!
//! Each [`ObjectPlan`] holds the ordered ops for one object (the node, a network, a sandbox, an
//! orphaned namespace). The reconciler applies objects independently, so one failing object
//! never stalls the rest. Ops are computed from what was observed, so applying a plan to a
//! kernel that already matches is a no-op plan, and a restart of netd adopts what it finds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use swarmnet_model::{IfName, Name, TaskId};

use crate::desired::{
    ALIAS_PREFIX, DesiredGwIface, DesiredIface, DesiredNetwork, DesiredNode, DesiredProcess,
    DesiredSandbox, NET_BRIDGE, gw_host_if,
};
use crate::lb::LbSpec;
use crate::port::{
    AddrState, FdbEntry, LinkChange, LinkKind, LinkKindState, LinkSpec, LinkState, NeighEntry,
    NsName, NsRef, ProcessState, RouteState,
};

/// Sysctls set in every namespace netd creates, before any link exists, so that links inherit
/// them: never accept router advertisements on our interfaces (CVE-2020-10749).
pub const NS_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/accept_ra", "0"),
    ("net/ipv6/conf/default/accept_ra", "0"),
];

/// What was observed in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsObserved {
    pub links: Vec<LinkState>,
    pub addrs: Vec<AddrState>,
    pub routes: Vec<RouteState>,
    /// FDB entries per VXLAN device.
    pub fdb: BTreeMap<IfName, BTreeSet<FdbEntry>>,
    /// Permanent neighbour entries per VXLAN device.
    pub neighs: BTreeMap<IfName, BTreeSet<NeighEntry>>,
    pub sysctls: BTreeMap<String, String>,
}

impl NsObserved {
    pub fn link(&self, name: &str) -> Option<&LinkState> {
        self.links.iter().find(|l| l.name.as_str() == name)
    }
    fn addrs_on(&self, link: &str) -> impl Iterator<Item = Ipv4Net> + '_ {
        let link = link.to_owned();
        self.addrs
            .iter()
            .filter(move |a| a.link.as_str() == link)
            .map(|a| a.addr)
    }
}

/// Everything the planner needs to know about the kernel and the processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every namespace under the run directory.
    pub netns: BTreeSet<NsName>,
    /// The node namespace (links, addresses, `net/ipv4/ip_forward`).
    pub node: NsObserved,
    /// The namespaces observed this round (a subset of `netns` in incremental rounds).
    pub ns: BTreeMap<NsName, NsObserved>,
    /// Normalized listing of our firewall table, `None` when it does not exist.
    pub firewall: Option<String>,
    /// Normalized listing of the ingress sandbox's table, when that sandbox was observed.
    pub ingress_firewall: Option<String>,
    pub processes: BTreeMap<TaskId, ProcessState>,
    /// Namespaces bound from another runtime (they outlive our reference).
    pub bound: BTreeSet<NsName>,
    /// Load balancer of each observed network namespace.
    pub lb: BTreeMap<NsName, LbObservedState>,
}

/// What is known of a namespace's load balancer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbObservedState {
    /// The kernel holds what was applied last (no drift).
    pub in_sync: bool,
    /// What this netd applied last; `None` after a restart (the next apply reprograms whole).
    pub applied: Option<LbSpec>,
    /// Something of ours is in the kernel there (in sync or not): a namespace that should
    /// balance nothing has it removed.
    pub present: bool,
}

/// Sysctls of a network namespace that load-balances: forwarding (without it every VIP
/// connection times out) and bridge netfilter (so bridged packets reach the nat hooks).
pub const LB_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
];

/// Sysctls of a network namespace that balances nothing (the ingress network, whose services
/// the ingress sandbox balances): its bridge only switches frames, so bridge netfilter is
/// turned off. With it on (the kernel's default in a new namespace once `br_netfilter` is
/// loaded), every bridged IPv4 frame is passed through the IPv4 hooks: a header check, an
/// skb extension allocation and a fake route per frame, for nothing. Where `br_netfilter` is
/// not loaded the key does not exist and nothing needs turning off.
pub const BRIDGE_ONLY_SYSCTLS: &[(&str, &str)] = &[("net/bridge/bridge-nf-call-iptables", "0")];

/// Sysctls of the ingress sandbox: it forwards between the node and the ingress network.
pub const ROUTER_SYSCTLS: &[(&str, &str)] = &[("net/ipv4/ip_forward", "1")];

/// A table netd replaces whole: what it applied last and how the kernel listed it right
/// after. Applied again when the desired ruleset differs, or the listing changed (drift).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableMemo {
    pub ruleset: String,
    pub listing: String,
}

/// The memos of netd's whole-replaced tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub node: Option<TableMemo>,
    pub ingress: Option<TableMemo>,
}

fn table_needs_apply(ruleset: &str, current: Option<&str>, memo: Option<&TableMemo>) -> bool {
    match (current, memo) {
        (Some(now), Some(m)) => m.ruleset != ruleset || m.listing != now,
        _ => true,
    }
}

/// Whether a sandbox's process may be started now (decided by the reconciler from the
/// restart policy and backoff, so planning stays pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessGate {
    Start,
    /// Backing off after an exit.
    Wait,
    /// Exited and the restart policy says it stays down.
    Done,
}

/// The object an op belongs to; status and backoff are tracked per object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Node,
    Network(Name),
    Sandbox(TaskId),
    /// A namespace under the run directory that no desired object explains.
    Orphan(NsName),
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node => f.write_str("node"),
            Self::Network(n) => write!(f, "network/{n}"),
            Self::Sandbox(t) => write!(f, "sandbox/{t}"),
            Self::Orphan(n) => write!(f, "orphan/{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    CreateNetns(NsName),
    BindNetns {
        ns: NsName,
        from: PathBuf,
    },
    DeleteNetns(NsName),
    CreateLink {
        ns: NsRef,
        spec: LinkSpec,
    },
    SetLink {
        ns: NsRef,
        name: IfName,
        change: LinkChange,
    },
    DeleteLink {
        ns: NsRef,
        name: IfName,
    },
    AddAddr {
        ns: NsRef,
        link: IfName,
        addr: Ipv4Net,
    },
    DeleteAddr {
        ns: NsRef,
        link: IfName,
        addr: Ipv4Net,
    },
    AddRoute {
        ns: NsRef,
        route: RouteState,
    },
    DeleteRoute {
        ns: NsRef,
        route: RouteState,
    },
    AddFdb {
        ns: NsRef,
        link: IfName,
        entry: FdbEntry,
    },
    DeleteFdb {
        ns: NsRef,
        link: IfName,
        entry: FdbEntry,
    },
    AddNeigh {
        ns: NsRef,
        link: IfName,
        entry: NeighEntry,
    },
    DeleteNeigh {
        ns: NsRef,
        link: IfName,
        entry: NeighEntry,
    },
    SetSysctl {
        ns: NsRef,
        key: String,
        value: String,
    },
    /// Replace the node firewall table with this ruleset.
    ApplyFirewall(String),
    /// Replace the ingress sandbox's table with this ruleset.
    ApplyIngressFirewall(String),
    /// Make the load balancer of a network namespace serve exactly `spec`.
    ApplyLb {
        ns: NsName,
        spec: LbSpec,
    },
    /// Remove our load balancer from a namespace (before the namespace goes).
    FlushLb(NsName),
    StartProcess {
        task: TaskId,
        ns: NsName,
        process: DesiredProcess,
    },
    StopProcess(TaskId),
    ForgetProcess(TaskId),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateNetns(n) => write!(f, "create netns {n}"),
            Self::BindNetns { ns, from } => write!(f, "bind netns {ns} from {}", from.display()),
            Self::DeleteNetns(n) => write!(f, "delete netns {n}"),
            Self::CreateLink { ns, spec } => {
                write!(f, "create {} {} in {ns}", kind_name(&spec.kind), spec.name)?;
                match &spec.kind {
                    LinkKind::Vxlan {
                        vni, local, port, ..
                    } => write!(f, " (vni {vni} local {local} port {port})")?,
                    LinkKind::Veth { peer, peer_ns, .. } => {
                        write!(f, " (peer {peer}")?;
                        if let Some(p) = peer_ns {
                            write!(f, " in {p}")?;
                        }
                        write!(f, ")")?;
                    }
                    LinkKind::Bridge => {}
                }
                if let Some(m) = spec.mtu {
                    write!(f, " mtu {m}")?;
                }
                if let Some(to) = &spec.move_to {
                    write!(f, " and move it to {to}")?;
                }
                Ok(())
            }
            Self::SetLink { ns, name, change } => {
                write!(f, "set link {name} in {ns}:")?;
                if let Some(m) = change.mtu {
                    write!(f, " mtu {m}")?;
                }
                match &change.master {
                    Some(Some(m)) => write!(f, " master {m}")?,
                    Some(None) => write!(f, " nomaster")?,
                    None => {}
                }
                if let Some(mac) = change.mac {
                    write!(f, " address {mac}")?;
                }
                if let Some(h) = change.hairpin {
                    write!(f, " hairpin {}", if h { "on" } else { "off" })?;
                }
                match change.up {
                    Some(true) => write!(f, " up")?,
                    Some(false) => write!(f, " down")?,
                    None => {}
                }
                Ok(())
            }
            Self::DeleteLink { ns, name } => write!(f, "delete link {name} in {ns}"),
            Self::AddAddr { ns, link, addr } => write!(f, "add {addr} to {link} in {ns}"),
            Self::DeleteAddr { ns, link, addr } => write!(f, "delete {addr} from {link} in {ns}"),
            Self::AddRoute { ns, route } => write!(f, "add route {} in {ns}", route_text(route)),
            Self::DeleteRoute { ns, route } => {
                write!(f, "delete route {} in {ns}", route_text(route))
            }
            Self::AddFdb { ns, link, entry } => {
                write!(
                    f,
                    "add fdb {} dst {} on {link} in {ns}",
                    entry.mac, entry.dst
                )
            }
            Self::DeleteFdb { ns, link, entry } => {
                write!(
                    f,
                    "delete fdb {} dst {} on {link} in {ns}",
                    entry.mac, entry.dst
                )
            }
            Self::AddNeigh { ns, link, entry } => {
                write!(
                    f,
                    "add neigh {} lladdr {} on {link} in {ns}",
                    entry.ip, entry.mac
                )
            }
            Self::DeleteNeigh { ns, link, entry } => {
                write!(
                    f,
                    "delete neigh {} lladdr {} on {link} in {ns}",
                    entry.ip, entry.mac
                )
            }
            Self::SetSysctl { ns, key, value } => write!(f, "sysctl {key}={value} in {ns}"),
            Self::ApplyFirewall(_) => write!(f, "apply node firewall table"),
            Self::ApplyIngressFirewall(_) => write!(f, "apply ingress sandbox table"),
            Self::ApplyLb { ns, spec } => write!(
                f,
                "apply load balancer in netns {ns}: {} service ports",
                spec.services.len()
            ),
            Self::FlushLb(ns) => write!(f, "flush load balancer in netns {ns}"),
            Self::StartProcess { task, .. } => write!(f, "start task {task}"),
            Self::StopProcess(t) => write!(f, "stop task {t}"),
            Self::ForgetProcess(t) => write!(f, "forget exited task {t}"),
        }
    }
}

fn route_text(r: &RouteState) -> String {
    let mut s = if r.dst.prefix_len() == 0 {
        "default".to_owned()
    } else {
        r.dst.to_string()
    };
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(l) = &r.link {
        s.push_str(&format!(" dev {l}"));
    }
    s
}

fn kind_name(k: &LinkKind) -> &'static str {
    match k {
        LinkKind::Bridge => "bridge",
        LinkKind::Vxlan { .. } => "vxlan",
        LinkKind::Veth { .. } => "veth",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPlan {
    pub key: ObjectKey,
    pub ops: Vec<Op>,
}

/// Which objects a round looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything, including prune of orphans.
    Full,
    /// Only these objects (those whose desired state changed, or that are due a retry).
    Objects(BTreeSet<ObjectKey>),
}

impl Scope {
    pub fn includes(&self, key: &ObjectKey) -> bool {
        match self {
            Self::Full => true,
            Self::Objects(s) => s.contains(key),
        }
    }
}

/// Plans every object in `scope`. Objects whose plan is empty are left out.
pub fn plan(
    desired: &DesiredNode,
    observed: &Observed,
    scope: &Scope,
    tables: &Tables,
    gate: &dyn Fn(&TaskId) -> ProcessGate,
) -> Vec<ObjectPlan> {
    let mut out = Vec::new();
    let mut push = |key: ObjectKey, ops: Vec<Op>| {
        if !ops.is_empty() {
            out.push(ObjectPlan { key, ops });
        }
    };
    if scope.includes(&ObjectKey::Node) {
        push(
            ObjectKey::Node,
            plan_node(
                desired,
                observed,
                tables.node.as_ref(),
                scope == &Scope::Full,
            ),
        );
    }
    // Removals first (sandboxes, then networks), so that a VNI or a name freed by a removal can
    // be taken by a creation in the same round.
    let mut explained = BTreeSet::new();
    for s in desired.sandboxes.values() {
        explained.insert(s.ns.clone());
    }
    for n in desired.networks.values() {
        explained.insert(n.ns.clone());
    }
    let orphans: Vec<&NsName> = observed
        .netns
        .iter()
        .filter(|n| !explained.contains(*n))
        .collect();
    for ns in orphans.iter().filter(|n| n.as_str().starts_with("sb-")) {
        let task = TaskId::new(&ns.as_str()[3..]).ok();
        let key = task
            .clone()
            .map_or_else(|| ObjectKey::Orphan((*ns).clone()), ObjectKey::Sandbox);
        if scope.includes(&key) || scope == &Scope::Full {
            push(key, plan_sandbox_removal(ns, task.as_ref(), observed));
        }
    }
    for ns in orphans.iter().filter(|n| !n.as_str().starts_with("sb-")) {
        let key = match ns
            .as_str()
            .strip_prefix("net-")
            .and_then(|id| Name::new(id).ok())
        {
            Some(id) => ObjectKey::Network(id),
            None => ObjectKey::Orphan((*ns).clone()),
        };
        if scope.includes(&key) || scope == &Scope::Full {
            push(key, plan_network_removal(ns, observed));
        }
    }
    for n in desired.networks.values() {
        let key = ObjectKey::Network(n.id.clone());
        if scope.includes(&key) {
            push(key, plan_network(n, observed, desired));
        }
    }
    for s in desired.sandboxes.values() {
        let key = ObjectKey::Sandbox(s.task.clone());
        if scope.includes(&key) {
            push(
                key,
                plan_sandbox(s, observed, gate(&s.task), tables.ingress.as_ref()),
            );
        }
    }
    out
}

fn alias(owner: &str) -> Option<String> {
    Some(format!("{ALIAS_PREFIX}{owner}"))
}

fn owned_by(l: &LinkState, owner: &str) -> bool {
    l.alias
        .as_deref()
        .and_then(|a| a.strip_prefix(ALIAS_PREFIX))
        == Some(owner)
}

fn ours(l: &LinkState) -> bool {
    l.name.as_str().starts_with("sn")
        && l.alias
            .as_deref()
            .is_some_and(|a| a.starts_with(ALIAS_PREFIX))
}

/// Brings an existing link to the wanted master/MTU/up state.
fn converge_link(
    ns: &NsRef,
    l: &LinkState,
    mtu: Option<u16>,
    master: Option<&str>,
    ops: &mut Vec<Op>,
) {
    let mut change = LinkChange::default();
    if let Some(m) = mtu
        && l.mtu != m
    {
        change.mtu = Some(m);
    }
    if let Some(m) = master
        && l.master.as_ref().map(IfName::as_str) != Some(m)
    {
        change.master = Some(Some(IfName::new(m).expect("valid master name")));
    }
    if !l.up {
        change.up = Some(true);
    }
    if change != LinkChange::default() {
        ops.push(Op::SetLink {
            ns: ns.clone(),
            name: l.name.clone(),
            change,
        });
    }
}

/// A bridge's MAC must not follow its ports (see `desired::bridge_mac`).
fn converge_mac(ns: &NsRef, l: &LinkState, mac: swarmnet_model::MacAddr, ops: &mut Vec<Op>) {
    if l.mac != Some(mac) {
        ops.push(Op::SetLink {
            ns: ns.clone(),
            name: l.name.clone(),
            change: LinkChange {
                mac: Some(mac),
                ..LinkChange::default()
            },
        });
    }
}

fn up_change(master: Option<&IfName>) -> LinkChange {
    LinkChange {
        master: master.map(|m| Some(m.clone())),
        up: Some(true),
        ..LinkChange::default()
    }
}

/// Adds the wanted addresses on `link` and removes the others.
fn converge_addrs(
    ns: &NsRef,
    link: &IfName,
    obs: &NsObserved,
    want: &[Ipv4Net],
    ops: &mut Vec<Op>,
) {
    let have: BTreeSet<Ipv4Net> = obs.addrs_on(link.as_str()).collect();
    for a in have.iter().filter(|a| !want.contains(a)) {
        ops.push(Op::DeleteAddr {
            ns: ns.clone(),
            link: link.clone(),
            addr: *a,
        });
    }
    for a in want.iter().filter(|a| !have.contains(a)) {
        ops.push(Op::AddAddr {
            ns: ns.clone(),
            link: link.clone(),
            addr: *a,
        });
    }
}

fn create_ns_ops(ns: &NsName, ops: &mut Vec<Op>) {
    ops.push(Op::CreateNetns(ns.clone()));
    for (k, v) in NS_SYSCTLS {
        ops.push(Op::SetSysctl {
            ns: NsRef::Owned(ns.clone()),
            key: (*k).into(),
            value: (*v).into(),
        });
    }
}

fn plan_node(
    desired: &DesiredNode,
    observed: &Observed,
    firewall: Option<&TableMemo>,
    prune: bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let node = NsRef::Node;
    let obs = &observed.node;
    if let Some(gw) = &desired.gw_bridge {
        match obs.link(gw.name.as_str()) {
            Some(l) if l.kind == LinkKindState::Bridge => {
                converge_link(&node, l, None, None, &mut ops);
                converge_mac(&node, l, gw.mac, &mut ops);
            }
            other => {
                if other.is_some() {
                    ops.push(Op::DeleteLink {
                        ns: node.clone(),
                        name: gw.name.clone(),
                    });
                }
                ops.push(Op::CreateLink {
                    ns: node.clone(),
                    spec: LinkSpec {
                        name: gw.name.clone(),
                        kind: LinkKind::Bridge,
                        mtu: None,
                        mac: Some(gw.mac),
                        alias: alias("node"),
                        move_to: None,
                    },
                });
                ops.push(Op::SetSysctl {
                    ns: node.clone(),
                    key: format!("net/ipv6/conf/{}/accept_ra", gw.name),
                    value: "0".into(),
                });
                ops.push(Op::SetLink {
                    ns: node.clone(),
                    name: gw.name.clone(),
                    change: up_change(None),
                });
            }
        }
        let empty = NsObserved::default();
        let gw_obs = if obs
            .link(gw.name.as_str())
            .is_some_and(|l| l.kind == LinkKindState::Bridge)
        {
            obs
        } else {
            &empty
        };
        converge_addrs(&node, &gw.name, gw_obs, &[gw.addr], &mut ops);
        // Sandboxes reach the world through the node: forwarding must be on.
        if obs.sysctls.get("net/ipv4/ip_forward").map(String::as_str) != Some("1") {
            ops.push(Op::SetSysctl {
                ns: node.clone(),
                key: "net/ipv4/ip_forward".into(),
                value: "1".into(),
            });
        }
    }
    if desired.gw_bridge.is_none()
        && let Some(l) = obs.link(crate::desired::GW_BRIDGE)
        && ours(l)
    {
        // The last sandbox that needed egress is gone: so is the gateway bridge.
        ops.push(Op::DeleteLink {
            ns: node.clone(),
            name: l.name.clone(),
        });
    }
    // The routing mesh's way in: the ingress network through the ingress sandbox.
    let sngw0 = IfName::new(crate::desired::GW_BRIDGE).expect("valid");
    let want_route = desired.ingress_route.map(|(dst, via)| RouteState {
        dst,
        gateway: Some(via),
        link: Some(sngw0.clone()),
    });
    for r in obs
        .routes
        .iter()
        .filter(|r| r.link.as_ref() == Some(&sngw0) && r.gateway.is_some())
        .filter(|r| Some(*r) != want_route.as_ref())
    {
        ops.push(Op::DeleteRoute {
            ns: node.clone(),
            route: r.clone(),
        });
    }
    if let Some(r) = want_route
        && !obs.routes.contains(&r)
    {
        ops.push(Op::AddRoute {
            ns: node.clone(),
            route: r,
        });
    }
    let ruleset = crate::firewall::render(desired);
    if table_needs_apply(&ruleset, observed.firewall.as_deref(), firewall) {
        ops.push(Op::ApplyFirewall(ruleset));
    }
    if prune {
        let mut wanted: BTreeSet<&str> = desired
            .sandboxes
            .values()
            .filter_map(|s| s.gw.as_ref())
            .map(|g| g.host_if.as_str())
            .collect();
        if let Some(gw) = &desired.gw_bridge {
            wanted.insert(gw.name.as_str());
        }
        let gw_done = desired.gw_bridge.is_none();
        for l in obs
            .links
            .iter()
            .filter(|l| ours(l) && !wanted.contains(l.name.as_str()))
            // Already deleted above.
            .filter(|l| !(gw_done && l.name.as_str() == crate::desired::GW_BRIDGE))
        {
            // gateway veth ends of live sandboxes vanish with their namespace; the rest
            // (a stale bridge, a VXLAN left behind by a crash mid-create) is ours to delete.
            ops.push(Op::DeleteLink {
                ns: node.clone(),
                name: l.name.clone(),
            });
        }
    }
    ops
}

fn vxlan_matches(l: &LinkState, n: &DesiredNetwork) -> bool {
    matches!(&l.kind, LinkKindState::Vxlan { vni, local, port, learning }
        if *vni == n.vni && *local == Some(n.local) && *port == n.port && !*learning)
}

fn plan_network(n: &DesiredNetwork, observed: &Observed, desired: &DesiredNode) -> Vec<Op> {
    let mut ops = Vec::new();
    let ns = NsRef::Owned(n.ns.clone());
    let empty = NsObserved::default();
    let present = observed.netns.contains(&n.ns);
    let obs = if present {
        observed.ns.get(&n.ns).unwrap_or(&empty)
    } else {
        &empty
    };
    if !present {
        create_ns_ops(&n.ns, &mut ops);
    }
    let owner = n.ns.as_str();
    let br = IfName::new(NET_BRIDGE).expect("valid");
    let bridge_ok = match obs.link(NET_BRIDGE) {
        Some(l) if l.kind == LinkKindState::Bridge => {
            converge_link(&ns, l, Some(n.mtu), None, &mut ops);
            converge_mac(&ns, l, n.bridge_mac, &mut ops);
            true
        }
        other => {
            if other.is_some() {
                ops.push(Op::DeleteLink {
                    ns: ns.clone(),
                    name: br.clone(),
                });
            }
            ops.push(Op::CreateLink {
                ns: ns.clone(),
                spec: LinkSpec {
                    name: br.clone(),
                    kind: LinkKind::Bridge,
                    mtu: Some(n.mtu),
                    mac: Some(n.bridge_mac),
                    alias: alias(owner),
                    move_to: None,
                },
            });
            ops.push(Op::SetLink {
                ns: ns.clone(),
                name: br.clone(),
                change: up_change(None),
            });
            false
        }
    };
    let mut br_addrs = vec![n.gateway];
    br_addrs.extend(n.vips.iter().map(|v| Ipv4Net::from(*v)));
    converge_addrs(
        &ns,
        &br,
        if bridge_ok { obs } else { &empty },
        &br_addrs,
        &mut ops,
    );
    // A table this process applied stays (emptied) when the last service leaves: its nat hooks
    // keep translating the connections still open, and they need bridge netfilter too.
    let balances =
        !n.lb.services.is_empty() || observed.lb.get(&n.ns).is_some_and(|l| l.applied.is_some());
    let (sysctls, needed) = if balances {
        (LB_SYSCTLS, true)
    } else {
        (BRIDGE_ONLY_SYSCTLS, false)
    };
    for (k, v) in sysctls {
        let differs = match obs.sysctls.get(*k) {
            Some(now) => now != v,
            // Unreadable: missing in this kernel. Only a setting we depend on is an error;
            // one that turns something off is tried once, in a new namespace.
            None => needed || !present,
        };
        if differs {
            ops.push(Op::SetSysctl {
                ns: ns.clone(),
                key: (*k).into(),
                value: (*v).into(),
            });
        }
    }

    let vx_ok = match obs.link(n.vxlan.as_str()) {
        Some(l) if vxlan_matches(l, n) => {
            converge_link(&ns, l, Some(n.mtu), Some(NET_BRIDGE), &mut ops);
            true
        }
        other => {
            if other.is_some() {
                ops.push(Op::DeleteLink {
                    ns: ns.clone(),
                    name: n.vxlan.clone(),
                });
            }
            // A VXLAN left in the node namespace by a crash between create and move holds the
            // VNI and port: remove it first or the create fails with EEXIST.
            if observed.node.link(n.vxlan.as_str()).is_some() {
                ops.push(Op::DeleteLink {
                    ns: NsRef::Node,
                    name: n.vxlan.clone(),
                });
            }
            ops.push(Op::CreateLink {
                ns: NsRef::Node,
                spec: LinkSpec {
                    name: n.vxlan.clone(),
                    kind: LinkKind::Vxlan {
                        vni: n.vni,
                        local: n.local,
                        port: n.port,
                        underlay: n.underlay_if.clone(),
                    },
                    mtu: Some(n.mtu),
                    mac: None,
                    alias: alias(owner),
                    move_to: Some(ns.clone()),
                },
            });
            ops.push(Op::SetLink {
                ns: ns.clone(),
                name: n.vxlan.clone(),
                change: up_change(Some(&br)),
            });
            false
        }
    };
    let no_fdb = BTreeSet::new();
    let no_neigh = BTreeSet::new();
    let (have_fdb, have_neigh) = if vx_ok {
        (
            obs.fdb.get(&n.vxlan).unwrap_or(&no_fdb),
            obs.neighs.get(&n.vxlan).unwrap_or(&no_neigh),
        )
    } else {
        (&no_fdb, &no_neigh)
    };
    let want_fdb: BTreeSet<FdbEntry> = n
        .peers
        .values()
        .map(|(mac, vtep)| FdbEntry {
            mac: *mac,
            dst: *vtep,
        })
        .collect();
    let want_neigh: BTreeSet<NeighEntry> = n
        .peers
        .iter()
        .map(|(ip, (mac, _))| NeighEntry { ip: *ip, mac: *mac })
        .collect();
    for e in have_fdb.difference(&want_fdb) {
        ops.push(Op::DeleteFdb {
            ns: ns.clone(),
            link: n.vxlan.clone(),
            entry: e.clone(),
        });
    }
    for e in want_fdb.difference(have_fdb) {
        ops.push(Op::AddFdb {
            ns: ns.clone(),
            link: n.vxlan.clone(),
            entry: e.clone(),
        });
    }
    for e in have_neigh.difference(&want_neigh) {
        ops.push(Op::DeleteNeigh {
            ns: ns.clone(),
            link: n.vxlan.clone(),
            entry: e.clone(),
        });
    }
    for e in want_neigh.difference(have_neigh) {
        ops.push(Op::AddNeigh {
            ns: ns.clone(),
            link: n.vxlan.clone(),
            entry: e.clone(),
        });
    }
    ops.extend(plan_lb(&n.ns, &n.lb, observed));
    // Host ends of sandboxes that stay but are no longer on this network (a detach), or whose
    // sandbox is gone. A sandbox being removed keeps its interface until its namespace goes
    // (after its process has stopped): a stopping task finishes what it was serving.
    let attached: BTreeSet<String> = desired
        .sandboxes
        .values()
        .filter(|s| s.ifaces.iter().any(|i| i.net_ns == n.ns))
        .map(|s| s.ns.as_str().to_owned())
        .collect();
    let leaving = |o: &str| {
        !desired.sandboxes.values().any(|s| s.ns.as_str() == o)
            && observed.netns.iter().any(|x| x.as_str() == o)
    };
    for l in obs
        .links
        .iter()
        .filter(|l| l.name.as_str().starts_with("snv"))
    {
        let owner = l
            .alias
            .as_deref()
            .and_then(|a| a.strip_prefix(ALIAS_PREFIX));
        if owner.is_some_and(|o| o.starts_with("sb-") && !attached.contains(o) && !leaving(o)) {
            ops.push(Op::DeleteLink {
                ns: ns.clone(),
                name: l.name.clone(),
            });
        }
    }
    ops
}

/// The load balancer of namespace `ns` to serve `spec`: programmed when it differs from what
/// was applied or the kernel drifted. When nothing is to be served, what this process applied
/// is emptied but stays (the nat hooks of its table keep translating established
/// connections: a table deleted under them would cut them), while a table of ours that this
/// process never applied (left by an earlier netd, e.g. the ingress network balanced in its
/// own namespace before the ingress sandbox took it over) is removed, so that namespace keeps
/// no NAT hooks and no conntrack.
fn plan_lb(ns: &NsName, spec: &LbSpec, observed: &Observed) -> Option<Op> {
    let lb = observed.lb.get(ns).cloned().unwrap_or_default();
    if spec.services.is_empty() && lb.applied.is_none() {
        return lb.present.then(|| Op::FlushLb(ns.clone()));
    }
    let up_to_date = lb.in_sync && lb.applied.as_ref() == Some(spec);
    (!up_to_date).then(|| Op::ApplyLb {
        ns: ns.clone(),
        spec: spec.clone(),
    })
}

fn plan_network_removal(ns: &NsName, observed: &Observed) -> Vec<Op> {
    // Our load balancer holds a socket in the namespace: let it go with the namespace.
    let mut ops = vec![Op::FlushLb(ns.clone())];
    if let Some(obs) = observed.ns.get(ns) {
        // Delete the VXLAN device first: namespace teardown is asynchronous in the kernel, and
        // until it finishes the VNI stays bound; deleting the link frees it at once.
        for l in obs
            .links
            .iter()
            .filter(|l| matches!(l.kind, LinkKindState::Vxlan { .. }))
        {
            ops.push(Op::DeleteLink {
                ns: NsRef::Owned(ns.clone()),
                name: l.name.clone(),
            });
        }
    }
    ops.push(Op::DeleteNetns(ns.clone()));
    ops
}

fn plan_sandbox_removal(ns: &NsName, task: Option<&TaskId>, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    if task == Some(&crate::desired::ingress_task()) {
        // The routing mesh's load balancer holds a socket in the ingress sandbox: let it go
        // with the namespace.
        ops.push(Op::FlushLb(ns.clone()));
    }
    if let Some(t) = task
        && let Some(p) = observed.processes.get(t)
    {
        match (p.exit, p.stopping) {
            (None, false) => return vec![Op::StopProcess(t.clone())],
            // Wait for it to go; the namespace is deleted in a later round.
            (None, true) => return vec![],
            (Some(_), _) => ops.push(Op::ForgetProcess(t.clone())),
        }
    }
    // Host ends die with a namespace we created (the kernel removes its devices and their
    // peers in one batch); a bound (external) namespace lives on, so its veths must be deleted
    // explicitly, or the container keeps its interfaces.
    if !observed.bound.contains(ns) {
        ops.push(Op::DeleteNetns(ns.clone()));
        return ops;
    }
    let owner = ns.as_str();
    for (net_ns, obs) in &observed.ns {
        if net_ns == ns {
            continue;
        }
        for l in obs.links.iter().filter(|l| owned_by(l, owner)) {
            ops.push(Op::DeleteLink {
                ns: NsRef::Owned(net_ns.clone()),
                name: l.name.clone(),
            });
        }
    }
    if let Some(t) = task {
        let gw = gw_host_if(t);
        if observed.node.link(gw.as_str()).is_some() {
            ops.push(Op::DeleteLink {
                ns: NsRef::Node,
                name: gw,
            });
        }
    }
    ops.push(Op::DeleteNetns(ns.clone()));
    ops
}

fn plan_sandbox(
    s: &DesiredSandbox,
    observed: &Observed,
    gate: ProcessGate,
    ingress_table: Option<&TableMemo>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let sb = NsRef::Owned(s.ns.clone());
    let empty = NsObserved::default();
    let present = observed.netns.contains(&s.ns);
    let obs = if present {
        observed.ns.get(&s.ns).unwrap_or(&empty)
    } else {
        &empty
    };
    if !present {
        match &s.external {
            Some(from) => ops.push(Op::BindNetns {
                ns: s.ns.clone(),
                from: from.clone(),
            }),
            None => create_ns_ops(&s.ns, &mut ops),
        }
    }
    // A new namespace has its loopback down; 127.0.0.1 (and later 127.0.0.11) need it up.
    if !present || obs.link("lo").is_some_and(|l| !l.up) {
        ops.push(Op::SetLink {
            ns: sb.clone(),
            name: IfName::new("lo").expect("valid"),
            change: up_change(None),
        });
    }
    let owner = s.ns.as_str();
    for i in &s.ifaces {
        let net_obs = observed.ns.get(&i.net_ns).unwrap_or(&empty);
        // The ingress sandbox holds the ingress VIPs on its interface into the network.
        let mut addrs = vec![i.addr];
        if let Some(r) = s.router.as_ref().filter(|r| r.out_if == i.ifname) {
            addrs.extend(r.vips.iter().map(|v| Ipv4Net::from(*v)));
        }
        plan_veth(s, i, &addrs, obs, net_obs, owner, &mut ops);
    }
    if let Some(g) = &s.gw {
        plan_gw(s, g, obs, &observed.node, owner, &mut ops);
    }
    if let Some(r) = &s.router {
        // The ingress sandbox forwards published traffic from the node into the ingress
        // network, balanced over the services' tasks and masqueraded as its own address there.
        for (k, v) in ROUTER_SYSCTLS {
            if obs.sysctls.get(*k).map(String::as_str) != Some(*v) {
                ops.push(Op::SetSysctl {
                    ns: sb.clone(),
                    key: (*k).into(),
                    value: (*v).into(),
                });
            }
        }
        let ruleset = crate::firewall::render_ingress(r.out_if.as_str());
        let current = if present {
            observed.ingress_firewall.as_deref()
        } else {
            None
        };
        if table_needs_apply(&ruleset, current, ingress_table) {
            ops.push(Op::ApplyIngressFirewall(ruleset));
        }
        let lb_obs = if present {
            observed
        } else {
            &Observed::default()
        };
        ops.extend(plan_lb(&s.ns, &r.lb, lb_obs));
    }
    if let Some(p) = &s.process {
        match observed.processes.get(&s.task) {
            Some(st) if st.exit.is_none() => {}
            Some(_) => {
                ops.push(Op::ForgetProcess(s.task.clone()));
                if gate == ProcessGate::Start {
                    ops.push(Op::StartProcess {
                        task: s.task.clone(),
                        ns: s.ns.clone(),
                        process: p.clone(),
                    });
                }
            }
            None if gate == ProcessGate::Start => ops.push(Op::StartProcess {
                task: s.task.clone(),
                ns: s.ns.clone(),
                process: p.clone(),
            }),
            None => {}
        }
    }
    ops
}

/// One veth per attached network: host end on the network's `br0`, inner end in the sandbox.
fn plan_veth(
    s: &DesiredSandbox,
    i: &DesiredIface,
    addrs: &[Ipv4Net],
    obs: &NsObserved,
    net_obs: &NsObserved,
    owner: &str,
    ops: &mut Vec<Op>,
) {
    let sb = NsRef::Owned(s.ns.clone());
    let net = NsRef::Owned(i.net_ns.clone());
    let host = net_obs.link(i.host_if.as_str());
    let inner = obs.link(i.ifname.as_str());
    let br = IfName::new(NET_BRIDGE).expect("valid");
    match (host, inner) {
        (Some(h), Some(inn))
            if inn.kind == LinkKindState::Veth && h.kind == LinkKindState::Veth =>
        {
            converge_link(&net, h, Some(i.mtu), Some(NET_BRIDGE), ops);
            // Hairpin: a task reaching its own service's VIP may be balanced back to itself,
            // and that frame must leave by the port it came in on.
            if !h.hairpin {
                ops.push(Op::SetLink {
                    ns: net.clone(),
                    name: i.host_if.clone(),
                    change: LinkChange {
                        hairpin: Some(true),
                        ..LinkChange::default()
                    },
                });
            }
            let mut change = LinkChange::default();
            if inn.mtu != i.mtu {
                change.mtu = Some(i.mtu);
            }
            if inn.mac != Some(i.mac) {
                change.mac = Some(i.mac);
            }
            if !inn.up {
                change.up = Some(true);
            }
            if change != LinkChange::default() {
                ops.push(Op::SetLink {
                    ns: sb.clone(),
                    name: i.ifname.clone(),
                    change,
                });
            }
            converge_addrs(&sb, &i.ifname, obs, addrs, ops);
        }
        (host, inner) => {
            if host.is_some() {
                ops.push(Op::DeleteLink {
                    ns: net.clone(),
                    name: i.host_if.clone(),
                });
            }
            if inner.is_some() {
                ops.push(Op::DeleteLink {
                    ns: sb.clone(),
                    name: i.ifname.clone(),
                });
            }
            ops.push(Op::CreateLink {
                ns: net.clone(),
                spec: LinkSpec {
                    name: i.host_if.clone(),
                    kind: LinkKind::Veth {
                        peer: i.ifname.clone(),
                        peer_ns: Some(sb.clone()),
                        peer_mac: Some(i.mac),
                    },
                    mtu: Some(i.mtu),
                    mac: None,
                    alias: alias(owner),
                    move_to: None,
                },
            });
            ops.push(Op::SetLink {
                ns: net,
                name: i.host_if.clone(),
                change: LinkChange {
                    hairpin: Some(true),
                    ..up_change(Some(&br))
                },
            });
            ops.push(Op::SetLink {
                ns: sb.clone(),
                name: i.ifname.clone(),
                change: up_change(None),
            });
            for a in addrs {
                ops.push(Op::AddAddr {
                    ns: sb.clone(),
                    link: i.ifname.clone(),
                    addr: *a,
                });
            }
        }
    }
}

/// The gateway veth: host end on the node's gateway bridge, default route through it.
fn plan_gw(
    s: &DesiredSandbox,
    g: &DesiredGwIface,
    obs: &NsObserved,
    node: &NsObserved,
    owner: &str,
    ops: &mut Vec<Op>,
) {
    let sb = NsRef::Owned(s.ns.clone());
    let gwbr = IfName::new(crate::desired::GW_BRIDGE).expect("valid");
    let host = node.link(g.host_if.as_str());
    let inner = obs.link(g.ifname.as_str());
    let fresh = match (host, inner) {
        (Some(h), Some(inn))
            if inn.kind == LinkKindState::Veth && h.kind == LinkKindState::Veth =>
        {
            converge_link(&NsRef::Node, h, Some(g.mtu), Some(gwbr.as_str()), ops);
            converge_link(&sb, inn, Some(g.mtu), None, ops);
            converge_addrs(&sb, &g.ifname, obs, &[g.addr], ops);
            false
        }
        (host, inner) => {
            if host.is_some() {
                ops.push(Op::DeleteLink {
                    ns: NsRef::Node,
                    name: g.host_if.clone(),
                });
            }
            if inner.is_some() {
                ops.push(Op::DeleteLink {
                    ns: sb.clone(),
                    name: g.ifname.clone(),
                });
            }
            ops.push(Op::CreateLink {
                ns: NsRef::Node,
                spec: LinkSpec {
                    name: g.host_if.clone(),
                    kind: LinkKind::Veth {
                        peer: g.ifname.clone(),
                        peer_ns: Some(sb.clone()),
                        peer_mac: None,
                    },
                    mtu: Some(g.mtu),
                    mac: None,
                    alias: alias(owner),
                    move_to: None,
                },
            });
            ops.push(Op::SetSysctl {
                ns: NsRef::Node,
                key: format!("net/ipv6/conf/{}/accept_ra", g.host_if),
                value: "0".into(),
            });
            ops.push(Op::SetLink {
                ns: NsRef::Node,
                name: g.host_if.clone(),
                change: up_change(Some(&gwbr)),
            });
            ops.push(Op::SetLink {
                ns: sb.clone(),
                name: g.ifname.clone(),
                change: up_change(None),
            });
            ops.push(Op::AddAddr {
                ns: sb.clone(),
                link: g.ifname.clone(),
                addr: g.addr,
            });
            true
        }
    };
    let want = RouteState {
        dst: Ipv4Net::default(),
        gateway: Some(g.gateway),
        link: Some(g.ifname.clone()),
    };
    let defaults: Vec<&RouteState> = if fresh {
        vec![]
    } else {
        obs.routes
            .iter()
            .filter(|r| r.dst.prefix_len() == 0)
            .collect()
    };
    if !defaults.contains(&&want) {
        for r in defaults {
            ops.push(Op::DeleteRoute {
                ns: sb.clone(),
                route: r.clone(),
            });
        }
        ops.push(Op::AddRoute {
            ns: sb,
            route: want,
        });
    }
}

/// Strips what changes without anyone touching the table (counter values), so a listing can
/// be compared with the one taken right after our last apply.
pub fn normalize_listing(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    for line in listing.lines() {
        let mut words = line.split_whitespace().peekable();
        let mut first = true;
        while let Some(w) = words.next() {
            if !first {
                out.push(' ');
            }
            first = false;
            out.push_str(w);
            if w == "counter" && words.peek() == Some(&"packets") {
                // counter packets N bytes M
                for _ in 0..4 {
                    words.next();
                }
            }
        }
        out.push('\n');
    }
    out
}
