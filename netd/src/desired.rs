//! Pure projection of the cluster intent onto one node: which networks, sandboxes, links,
//! addresses, FDB/neighbour entries and processes this node should have. No I/O.
//!
//! Naming (all kernel names carry the `sn` prefix and fit in 15 bytes):
//! - overlay network namespace `net-<network id>`, holding `br0` and `snvx<vni>`;
//! - sandbox namespace `sb-<task id>`; the host end of its overlay veth is `snv<hash>` in the
//!   network namespace, the host end of its gateway veth `sng<hash>` in the node namespace;
//! - the node-local gateway bridge `sngw0` in the node namespace.
//!
//! `<hash>` is 10 hex digits of FNV-1a over the task id (and network id): stable across
//! versions and restarts, unlike `std`'s hasher.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use swarmnet_model::spec::{
    DesiredState, EndpointMode, Protocol, PublishMode, RestartPolicy, TaskRuntime, TrafficPolicy,
};
use swarmnet_model::{IfName, Intent, MacAddr, Name, NodeId, TaskId};

use crate::lb::{Affinity, LbSpec, Proto, ServiceKey, ServiceSpec};
use crate::port::NsName;

/// Marker written into IFLA_IFALIAS of every link netd creates; prune requires it.
pub const ALIAS_PREFIX: &str = "swarmnet:";
/// The node-local gateway bridge.
pub const GW_BRIDGE: &str = "sngw0";
/// The bridge inside every overlay network namespace.
pub const NET_BRIDGE: &str = "br0";
/// VXLAN overhead: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD: u16 = 50;

/// FNV-1a, 64 bit: a stable hash for interface names.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A stable, node-unique MAC for a bridge netd owns. A bridge whose address was never set
/// takes the lowest MAC of its ports and changes it as ports come and go; sandboxes then keep
/// a stale neighbour entry for their gateway (or a VIP) and their traffic is dropped until it
/// re-resolves. A fixed address also keeps two nodes' bridges apart when frames routed by one
/// cross VXLAN. Locally administered, unicast, prefix 06 (task MACs use 02:42).
pub fn bridge_mac(parts: &[&str]) -> MacAddr {
    let h = stable_hash(parts).to_be_bytes();
    MacAddr::new([0x06, h[0], h[1], h[2], h[3], h[4]]).expect("unicast and not all zeros")
}

fn hashed_ifname(prefix: &str, parts: &[&str]) -> IfName {
    let h = stable_hash(parts) & 0xff_ffff_ffff;
    IfName::new(format!("{prefix}{h:010x}")).expect("prefix + 10 hex digits fits in 15 bytes")
}

pub fn network_ns(id: &Name) -> NsName {
    NsName::new(format!("net-{id}")).expect("network ids are valid file names")
}
pub fn sandbox_ns(task: &TaskId) -> NsName {
    NsName::new(format!("sb-{task}")).expect("task ids are valid file names")
}
pub fn vxlan_name(vni: u32) -> IfName {
    IfName::new(format!("snvx{vni}")).expect("snvx + at most 8 digits fits")
}
pub fn overlay_host_if(task: &TaskId, network: &Name) -> IfName {
    hashed_ifname("snv", &[task.as_str(), network.as_str()])
}
pub fn gw_host_if(task: &TaskId) -> IfName {
    hashed_ifname("sng", &[task.as_str()])
}

/// Node-local facts the projection needs besides the intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    pub node: NodeId,
    pub vxlan_port: u16,
    /// MTU of the underlay link, observed.
    pub underlay_mtu: u16,
    pub underlay_if: Option<IfName>,
    /// Subnet of the node-local gateway bridge; the first host is the bridge's address.
    pub gw_subnet: Ipv4Net,
    /// Gateway-bridge addresses already handed to sandboxes (persisted in the run directory).
    pub gw_leases: BTreeMap<TaskId, Ipv4Addr>,
    /// Namespaces of external tasks, attached through the local API.
    pub external: BTreeMap<TaskId, PathBuf>,
    /// Directory holding per-task files (logs, resolv.conf).
    pub task_dir: PathBuf,
    /// Local tasks that must not serve: not running, or not (yet) healthy. They keep their
    /// sandbox and process but are no load-balancer backend or published-port target here
    /// (other nodes learn it through gossip).
    pub unready: BTreeSet<TaskId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredNetwork {
    pub id: Name,
    pub ns: NsName,
    pub vni: u32,
    pub vxlan: IfName,
    /// Gateway address with the subnet's prefix, on `br0`.
    pub gateway: Ipv4Net,
    pub mtu: u16,
    pub local: Ipv4Addr,
    pub port: u16,
    pub underlay_if: Option<IfName>,
    /// Remote endpoints: IP → (MAC, VTEP).
    pub peers: BTreeMap<Ipv4Addr, (MacAddr, Ipv4Addr)>,
    /// Virtual IPs of the services on this network: a /32 on `br0` each, so every local
    /// sandbox reaches them through the bridge and ARP for them never crosses VXLAN.
    pub vips: BTreeSet<Ipv4Addr>,
    /// The network's load balancer: one entry per VIP and port, backends from every node.
    pub lb: LbSpec,
    /// Fixed MAC of `br0`, see [`bridge_mac`].
    pub bridge_mac: MacAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredIface {
    pub network: Name,
    pub net_ns: NsName,
    pub host_if: IfName,
    pub ifname: IfName,
    pub addr: Ipv4Net,
    pub mac: MacAddr,
    pub mtu: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredGwIface {
    pub host_if: IfName,
    pub ifname: IfName,
    pub addr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredProcess {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub restart: RestartPolicy,
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredSandbox {
    pub task: TaskId,
    pub ns: NsName,
    /// For external tasks: the runtime's namespace, bound as `ns`.
    pub external: Option<PathBuf>,
    pub ifaces: Vec<DesiredIface>,
    pub gw: Option<DesiredGwIface>,
    pub process: Option<DesiredProcess>,
    /// Set on the ingress sandbox: the routing mesh's load balancer and its way into the
    /// ingress network.
    pub router: Option<DesiredRouter>,
}

/// The ingress sandbox's part of the routing mesh: the load-balancing point of the ingress
/// network on this node (as Docker's `ingress-sbox`). A published port's traffic arrives from
/// the node (DNATed to a service's ingress VIP), is balanced here over the service's tasks on
/// every node and leaves into the ingress network out of `out_if`, masqueraded as the
/// sandbox's own address there, so the replies of a task on any node come back through this
/// node. The ingress network's own namespace then only bridges: one NAT point fewer and no
/// netfilter on its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRouter {
    /// The interface on the ingress network.
    pub out_if: IfName,
    /// The ingress network.
    pub network: Name,
    /// The ingress VIPs, /32s on `out_if`: local addresses here, which IPVS needs (it
    /// schedules at `LOCAL_IN`); nftables DNATs them before routing either way.
    pub vips: BTreeSet<Ipv4Addr>,
    /// The ingress network's services, balanced here.
    pub lb: LbSpec,
}

/// One load-balancing point of a node, borrowed mutably: a network's services balanced in the
/// namespace `ns` (the network's own, or for the ingress network the ingress sandbox's), and
/// that network's remote endpoints (a remote backend that drains keeps its FDB/neighbour
/// entries).
#[derive(Debug)]
pub struct LbPointMut<'a> {
    pub ns: &'a NsName,
    pub network: &'a Name,
    pub lb: &'a mut LbSpec,
    pub peers: &'a mut BTreeMap<Ipv4Addr, (MacAddr, Ipv4Addr)>,
}

impl DesiredNode {
    /// Every load-balancing point: each network's, in its own namespace, except the ingress
    /// network's, which is in the ingress sandbox.
    pub fn lb_points_mut(&mut self) -> Vec<LbPointMut<'_>> {
        let mut routers: BTreeMap<&Name, (&NsName, &mut LbSpec)> = self
            .sandboxes
            .values_mut()
            .filter_map(|DesiredSandbox { ns, router, .. }| {
                let ns: &NsName = ns;
                router.as_mut().map(|DesiredRouter { network, lb, .. }| {
                    let network: &Name = network;
                    (network, (ns, lb))
                })
            })
            .collect();
        self.networks
            .values_mut()
            .map(
                |DesiredNetwork {
                     id, ns, lb, peers, ..
                 }| {
                    let (id, ns): (&Name, &NsName) = (id, ns);
                    let (ns, lb) = routers.remove(id).unwrap_or((ns, lb));
                    LbPointMut {
                        ns,
                        network: id,
                        lb,
                        peers,
                    }
                },
            )
            .collect()
    }

    /// The load balancer wanted in namespace `ns`, if one is balanced there.
    pub fn lb_in(&self, ns: &NsName) -> Option<&LbSpec> {
        self.networks
            .values()
            .find(|n| &n.ns == ns)
            .map(|n| &n.lb)
            .or_else(|| {
                self.sandboxes
                    .values()
                    .find(|s| &s.ns == ns)
                    .and_then(|s| s.router.as_ref())
                    .map(|r| &r.lb)
            })
    }
}

/// A port published on this node: `proto/port` on the node's addresses goes to `target`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedPort {
    pub proto: Protocol,
    pub port: u16,
    pub target: PublishTarget,
    /// Which service, for logs and status.
    pub service: Name,
}

/// Where a published port's connections go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PublishTarget {
    /// The routing mesh: every healthy task of the service on every node gets an equal share
    /// of new connections. `direct` are this node's healthy tasks, reached straight through
    /// their gateway-bridge addresses (the host-mode path: no ingress sandbox hop, the task
    /// sees the client's address); the other `via_sandbox` tasks are reached through the
    /// service's VIP on the ingress network, routed to the ingress sandbox, which balances
    /// them (the task sees the ingress sandbox's address). The node picks among
    /// `direct.len() + via_sandbox` slots at random, so each task's share is the same. With
    /// `direct` empty everything goes to the VIP (also when no task is healthy: the sandbox
    /// refuses). See [`crate::mesh`].
    Mesh {
        vip: std::net::SocketAddrV4,
        direct: Vec<std::net::SocketAddrV4>,
        via_sandbox: usize,
    },
    /// Tasks on this node, straight through their gateway-bridge addresses, spread at random;
    /// the task sees the client's own address. Empty: refuse at once (TCP reset, ICMP
    /// port-unreachable), as the local traffic policy demands on a node without a task.
    Local(Vec<std::net::SocketAddrV4>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredGwBridge {
    pub name: IfName,
    pub addr: Ipv4Net,
    /// Fixed, see [`bridge_mac`].
    pub mac: MacAddr,
}

/// This node's share of the intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredNode {
    pub node: NodeId,
    pub vxlan_port: u16,
    /// Underlay addresses of every other node: the only sources VXLAN is accepted from.
    pub vteps: BTreeSet<Ipv4Addr>,
    pub gw_bridge: Option<DesiredGwBridge>,
    pub networks: BTreeMap<Name, DesiredNetwork>,
    pub sandboxes: BTreeMap<TaskId, DesiredSandbox>,
    pub published: Vec<PublishedPort>,
    /// Route in the node namespace to the ingress network through the ingress sandbox
    /// (destination subnet, next hop on the gateway bridge).
    pub ingress_route: Option<(Ipv4Net, Ipv4Addr)>,
}

/// Why the projection could not place something; reported per object, the rest proceeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionIssue {
    pub object: String,
    pub message: String,
}

/// Tasks of this node that need a gateway-bridge address (running, on a non-internal network).
pub fn gw_tasks(intent: &Intent, node: &NodeId) -> BTreeSet<TaskId> {
    let ingress = intent.ingress_network().is_some()
        && intent.node(node).is_some_and(|n| n.ingress_ip.is_some());
    let mut out: BTreeSet<TaskId> = intent
        .tasks()
        .filter(|(t, atts)| {
            &t.node == node
                && t.desired_state.keeps_sandbox()
                && atts
                    .iter()
                    .any(|a| intent.network(&a.network).is_some_and(|n| !n.spec.internal))
        })
        .map(|(t, _)| t.id.clone())
        .collect();
    if ingress {
        out.insert(ingress_task());
    }
    out
}

/// The pseudo task id of the node's ingress sandbox (reserved by the intent's validation).
pub fn ingress_task() -> TaskId {
    TaskId::new(swarmnet_model::intent::RESERVED_TASK).expect("valid id")
}

/// Hands out gateway-bridge addresses: keeps existing leases of wanted tasks, drops the rest,
/// and gives new tasks the lowest free host address (the first host is the bridge's own).
/// Returns the new leases and the tasks that could not get one (subnet exhausted).
pub fn lease_gw(
    subnet: Ipv4Net,
    leases: &BTreeMap<TaskId, Ipv4Addr>,
    wanted: &BTreeSet<TaskId>,
) -> (BTreeMap<TaskId, Ipv4Addr>, Vec<TaskId>) {
    let mut out: BTreeMap<TaskId, Ipv4Addr> = leases
        .iter()
        .filter(|(t, ip)| wanted.contains(*t) && subnet.contains(*ip))
        .map(|(t, ip)| (t.clone(), *ip))
        .collect();
    let used: BTreeSet<Ipv4Addr> = out.values().copied().collect();
    let mut free = subnet.hosts().skip(1).filter(|ip| !used.contains(ip));
    let mut exhausted = Vec::new();
    for t in wanted {
        if !out.contains_key(t) {
            match free.next() {
                Some(ip) => {
                    out.insert(t.clone(), ip);
                }
                None => exhausted.push(t.clone()),
            }
        }
    }
    (out, exhausted)
}

/// Projects `intent` onto the node in `ctx`.
pub fn project(intent: &Intent, ctx: &NodeContext) -> (DesiredNode, Vec<ProjectionIssue>) {
    let (mut out, issues) = project_intent(intent, ctx);
    crate::mesh::route_local_tasks(&mut out);
    (out, issues)
}

/// [`project`] without the routing mesh's local shortcut, which must come last (it reads the
/// ingress balancer's final backends).
fn project_intent(intent: &Intent, ctx: &NodeContext) -> (DesiredNode, Vec<ProjectionIssue>) {
    let mut issues = Vec::new();
    let me = intent.node(&ctx.node);
    let vteps = intent
        .nodes()
        .filter(|n| n.id != ctx.node)
        .map(|n| n.addr)
        .collect();
    let mut out = DesiredNode {
        node: ctx.node.clone(),
        vxlan_port: ctx.vxlan_port,
        vteps,
        gw_bridge: None,
        networks: BTreeMap::new(),
        sandboxes: BTreeMap::new(),
        published: Vec::new(),
        ingress_route: None,
    };
    let Some(me) = me else {
        issues.push(ProjectionIssue {
            object: format!("node/{}", ctx.node),
            message: format!(
                "node {:?} is not in the intent; nothing is placed on it",
                ctx.node.as_str()
            ),
        });
        return (out, issues);
    };
    let default_mtu = ctx.underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
    let net_mtu = |n: &swarmnet_model::Network| n.spec.mtu.map_or(default_mtu, |m| m.get());
    let node_addr = |id: &NodeId| intent.node(id).map(|n| n.addr);

    // Networks used by a running local task are instantiated here, and the ingress network on
    // every node (the routing mesh answers everywhere).
    // A draining task keeps its sandbox, its networks and its FDB entries everywhere (open
    // connections to it finish); only the LB backends and published ports below skip it.
    let running = |t: &swarmnet_model::spec::TaskSpec| t.desired_state.keeps_sandbox();
    let ingress = intent.ingress_network().zip(me.ingress_ip);
    let mut wanted: Vec<&swarmnet_model::Network> = intent
        .tasks()
        .filter(|(t, _)| t.node == ctx.node && running(t))
        .flat_map(|(_, atts)| {
            atts.iter()
                .map(|a| intent.network(&a.network).expect("validated reference"))
        })
        .collect();
    wanted.extend(ingress.map(|(n, _)| n));
    {
        for net in wanted {
            out.networks
                .entry(net.id.clone())
                .or_insert_with(|| DesiredNetwork {
                    id: net.id.clone(),
                    ns: network_ns(&net.id),
                    vni: net.spec.vni.get(),
                    vxlan: vxlan_name(net.spec.vni.get()),
                    gateway: Ipv4Net::new(net.gateway, net.spec.subnet.prefix_len())
                        .expect("valid prefix"),
                    mtu: net_mtu(net),
                    local: me.addr,
                    port: ctx.vxlan_port,
                    underlay_if: me
                        .data_interface
                        .clone()
                        .or_else(|| ctx.underlay_if.clone()),
                    peers: BTreeMap::new(),
                    vips: BTreeSet::new(),
                    lb: LbSpec::default(),
                    bridge_mac: bridge_mac(&[NET_BRIDGE, ctx.node.as_str(), net.id.as_str()]),
                });
        }
    }
    // Remote endpoints of those networks become FDB and neighbour entries.
    for (t, atts) in intent
        .tasks()
        .filter(|(t, _)| t.node != ctx.node && running(t))
    {
        let Some(vtep) = node_addr(&t.node) else {
            continue;
        };
        for a in atts {
            let net = intent.network(&a.network).expect("validated reference");
            if let Some(d) = out.networks.get_mut(&net.id) {
                d.peers.insert(a.ip, (a.mac, vtep));
            }
        }
    }

    if let Some((ing, _)) = ingress
        && let Some(d) = out.networks.get_mut(&ing.id)
    {
        // Other nodes' ingress sandboxes answer the replies of the tasks they forwarded to.
        for n in intent.nodes().filter(|n| n.id != ctx.node) {
            if let Some(ip) = n.ingress_ip {
                d.peers.insert(ip, (MacAddr::from_ipv4(ip), n.addr));
            }
        }
    }

    project_vips(intent, &ctx.unready, &mut out.networks);

    let gw_gateway = ctx.gw_subnet.hosts().next();
    for (t, atts) in intent
        .tasks()
        .filter(|(t, _)| t.node == ctx.node && running(t))
    {
        let external = match t.runtime {
            TaskRuntime::Netd => None,
            TaskRuntime::External => match ctx.external.get(&t.id) {
                Some(p) => Some(p.clone()),
                // Not attached yet: the runtime has not handed us its namespace.
                None => continue,
            },
        };
        let ifaces: Vec<DesiredIface> = atts
            .iter()
            .map(|a| {
                let net = intent.network(&a.network).expect("validated reference");
                DesiredIface {
                    network: net.id.clone(),
                    net_ns: network_ns(&net.id),
                    host_if: overlay_host_if(&t.id, &net.id),
                    ifname: a.ifname.clone(),
                    addr: Ipv4Net::new(a.ip, net.spec.subnet.prefix_len()).expect("valid prefix"),
                    mac: a.mac,
                    mtu: net_mtu(net),
                }
            })
            .collect();
        let wants_gw = atts
            .iter()
            .any(|a| intent.network(&a.network).is_some_and(|n| !n.spec.internal));
        let gw = match (wants_gw, ctx.gw_leases.get(&t.id), gw_gateway) {
            (false, _, _) => None,
            (true, Some(ip), Some(gateway)) => Some(DesiredGwIface {
                host_if: gw_host_if(&t.id),
                ifname: next_ifname(&ifaces),
                addr: Ipv4Net::new(*ip, ctx.gw_subnet.prefix_len()).expect("valid prefix"),
                gateway,
                mtu: ctx.underlay_mtu,
            }),
            (true, _, _) => {
                issues.push(ProjectionIssue {
                    object: format!("sandbox/{}", t.id),
                    message: format!("no free address in the gateway subnet {}", ctx.gw_subnet),
                });
                continue;
            }
        };
        let service = intent.service(&t.service).expect("validated reference");
        let process = (t.runtime == TaskRuntime::Netd).then(|| DesiredProcess {
            argv: t.argv.clone(),
            env: task_env(t),
            restart: service.restart,
            log: ctx.task_dir.join(format!("{}.log", t.id)),
        });
        out.sandboxes.insert(
            t.id.clone(),
            DesiredSandbox {
                task: t.id.clone(),
                ns: sandbox_ns(&t.id),
                external,
                ifaces,
                gw,
                process,
                router: None,
            },
        );
    }
    if let Some((ing, ip)) = ingress {
        project_ingress(
            ctx,
            ing,
            ip,
            net_mtu(ing),
            gw_gateway,
            &mut out,
            &mut issues,
        );
    }
    project_published(intent, ingress.map(|(ing, _)| ing), &ctx.unready, &mut out);
    if out.sandboxes.values().any(|s| s.gw.is_some())
        && let Some(gateway) = gw_gateway
    {
        out.gw_bridge = Some(DesiredGwBridge {
            name: IfName::new(GW_BRIDGE).expect("valid"),
            addr: Ipv4Net::new(gateway, ctx.gw_subnet.prefix_len()).expect("valid prefix"),
            mac: bridge_mac(&[GW_BRIDGE, ctx.node.as_str()]),
        });
    }
    (out, issues)
}

/// [`project`] with gossip as an input: remote endpoints that gossip does not hold live (see
/// [`crate::gossip::view`]) are taken out of the FDB/neighbour entries and the load-balancer
/// backends. `None` (gossip not configured) is the intent alone. Gossip only ever removes:
/// nothing the intent does not hold is added.
pub fn project_with_gossip(
    intent: &Intent,
    ctx: &NodeContext,
    remote: Option<&crate::gossip::view::RemoteLive>,
) -> (DesiredNode, Vec<ProjectionIssue>) {
    let (mut out, issues) = project_intent(intent, ctx);
    if let Some(remote) = remote {
        drop_dead_remotes(intent, &ctx.node, remote, &mut out);
    }
    crate::mesh::route_local_tasks(&mut out);
    (out, issues)
}

fn drop_dead_remotes(
    intent: &Intent,
    me: &NodeId,
    remote: &crate::gossip::view::RemoteLive,
    out: &mut DesiredNode,
) {
    let mut dead: BTreeSet<(&Name, Ipv4Addr)> = BTreeSet::new();
    for (t, atts) in intent
        .tasks()
        .filter(|(t, _)| &t.node != me && t.desired_state.keeps_sandbox())
    {
        for a in atts {
            if remote.allows(&t.node, &a.network, &t.id) {
                continue;
            }
            if let Some(n) = intent.network(&a.network) {
                dead.insert((&n.id, a.ip));
            }
        }
    }
    if dead.is_empty() {
        return;
    }
    for p in out.lb_points_mut() {
        for (_, ip) in
            dead.range((p.network, Ipv4Addr::UNSPECIFIED)..=(p.network, Ipv4Addr::BROADCAST))
        {
            p.peers.remove(ip);
            for svc in p.lb.services.values_mut() {
                svc.backends.remove(ip);
            }
        }
    }
}

/// The node's share of the routing mesh: its ingress sandbox (an interface on the ingress
/// network with the node's ingress address, one on the gateway bridge, forwarding with
/// masquerade into the ingress network) and the route to the ingress network through it.
fn project_ingress(
    ctx: &NodeContext,
    ing: &swarmnet_model::Network,
    ip: Ipv4Addr,
    mtu: u16,
    gw_gateway: Option<Ipv4Addr>,
    out: &mut DesiredNode,
    issues: &mut Vec<ProjectionIssue>,
) {
    let task = ingress_task();
    let eth0 = IfName::new("eth0").expect("valid");
    let iface = DesiredIface {
        network: ing.id.clone(),
        net_ns: network_ns(&ing.id),
        host_if: overlay_host_if(&task, &ing.id),
        ifname: eth0.clone(),
        addr: Ipv4Net::new(ip, ing.spec.subnet.prefix_len()).expect("valid prefix"),
        mac: MacAddr::from_ipv4(ip),
        mtu,
    };
    let (Some(lease), Some(gateway)) = (ctx.gw_leases.get(&task), gw_gateway) else {
        issues.push(ProjectionIssue {
            object: format!("sandbox/{task}"),
            message: format!("no free address in the gateway subnet {}", ctx.gw_subnet),
        });
        return;
    };
    let gw = DesiredGwIface {
        host_if: gw_host_if(&task),
        ifname: IfName::new("eth1").expect("valid"),
        addr: Ipv4Net::new(*lease, ctx.gw_subnet.prefix_len()).expect("valid prefix"),
        gateway,
        mtu: ctx.underlay_mtu,
    };
    out.ingress_route = Some((ing.spec.subnet, *lease));
    // The ingress network's VIPs and services are balanced here, not in the network's
    // namespace (which then only bridges).
    let (vips, lb) = out
        .networks
        .get_mut(&ing.id)
        .map(|n| (std::mem::take(&mut n.vips), std::mem::take(&mut n.lb)))
        .unwrap_or_default();
    out.sandboxes.insert(
        task.clone(),
        DesiredSandbox {
            task: task.clone(),
            ns: sandbox_ns(&task),
            external: None,
            ifaces: vec![iface],
            gw: Some(gw),
            process: None,
            router: Some(DesiredRouter {
                out_if: eth0,
                network: ing.id.clone(),
                vips,
                lb,
            }),
        },
    );
}

/// Every port this node publishes: ingress mode to the service's VIP on the ingress network
/// (routing mesh) or, with the local traffic policy, to the service's tasks on this node; host
/// mode to the service's task on this node (a node can bind a host port once, so the first),
/// and not at all where none runs.
fn project_published(
    intent: &Intent,
    ingress: Option<&swarmnet_model::Network>,
    unready: &BTreeSet<TaskId>,
    out: &mut DesiredNode,
) {
    for s in intent.services() {
        let local = || -> Vec<Ipv4Addr> {
            out.sandboxes
                .values()
                .filter(|sb| sb.process.is_some() || sb.external.is_some())
                .filter(|sb| !unready.contains(&sb.task))
                .filter(|sb| {
                    intent.task(&sb.task).is_some_and(|(t, _)| {
                        t.service == s.name && t.desired_state == DesiredState::Running
                    })
                })
                .filter_map(|sb| sb.gw.as_ref().map(|g| g.addr.addr()))
                .collect()
        };
        for p in &s.ports {
            let Some(port) = p.published else { continue };
            let at = |ips: Vec<Ipv4Addr>| {
                ips.into_iter()
                    .map(|ip| std::net::SocketAddrV4::new(ip, p.target))
                    .collect::<Vec<_>>()
            };
            let target = match (p.publish_mode, p.traffic_policy) {
                (PublishMode::Ingress, TrafficPolicy::Cluster) => {
                    let Some(vip) = ingress.and_then(|ing| {
                        s.networks
                            .iter()
                            .find(|sn| sn.network == ing.spec.name)
                            .and_then(|sn| sn.vip)
                    }) else {
                        continue;
                    };
                    // All through the ingress sandbox until `crate::mesh` has seen the
                    // balancer's backends (after gossip dropped the dead ones).
                    PublishTarget::Mesh {
                        vip: std::net::SocketAddrV4::new(vip, p.target),
                        direct: Vec::new(),
                        via_sandbox: 0,
                    }
                }
                (PublishMode::Ingress, TrafficPolicy::Local) => PublishTarget::Local(at(local())),
                (PublishMode::Host, _) => {
                    let mut one = at(local());
                    one.truncate(1);
                    if one.is_empty() {
                        continue;
                    }
                    PublishTarget::Local(one)
                }
            };
            out.published.push(PublishedPort {
                proto: p.protocol,
                port,
                target,
                service: s.name.clone(),
            });
        }
    }
    out.published.sort();
}

/// VIPs and load-balancer entries of every network instantiated here: services in `vip` mode
/// with a VIP on the network, one entry per port (VIP:target → task:target, as Swarm does), and
/// as backends the running tasks of the service on that network, wherever they run.
fn project_vips(
    intent: &Intent,
    unready: &BTreeSet<TaskId>,
    networks: &mut BTreeMap<Name, DesiredNetwork>,
) {
    let by_name: BTreeMap<&Name, &Name> =
        intent.networks().map(|n| (&n.spec.name, &n.id)).collect();
    // Running tasks' addresses by (service, network), built once: looking them up per service
    // would be services × tasks (10k services with 100k tasks: 10^9 steps).
    let mut addrs: BTreeMap<(&Name, &Name), Vec<Ipv4Addr>> = BTreeMap::new();
    for (t, atts) in intent
        .tasks()
        .filter(|(t, _)| t.desired_state == DesiredState::Running && !unready.contains(&t.id))
    {
        for a in atts {
            addrs
                .entry((&t.service, &a.network))
                .or_default()
                .push(a.ip);
        }
    }
    for s in intent
        .services()
        .filter(|s| s.endpoint_mode == EndpointMode::Vip)
    {
        for sn in &s.networks {
            let (Some(vip), Some(id)) = (sn.vip, by_name.get(&sn.network)) else {
                continue;
            };
            let Some(net) = networks.get_mut(*id) else {
                continue;
            };
            net.vips.insert(vip);
            let backends: &[Ipv4Addr] = addrs
                .get(&(&s.name, &sn.network))
                .map_or(&[], Vec::as_slice);
            for port in &s.ports {
                let proto = match port.protocol {
                    Protocol::Tcp => Proto::Tcp,
                    Protocol::Udp => Proto::Udp,
                };
                let key = ServiceKey {
                    vip,
                    proto,
                    port: port.target,
                };
                let mut spec = ServiceSpec::new(key, port.target, backends.iter().copied());
                spec.affinity = match s.affinity {
                    swarmnet_model::spec::Affinity::None => Affinity::None,
                    // The nftables backend hashes the client address (stateless); the timeout
                    // is for stateful backends (IPVS persistence): Kubernetes' default.
                    swarmnet_model::spec::Affinity::ClientIp => Affinity::ClientIp {
                        timeout: std::time::Duration::from_secs(10_800),
                    },
                };
                net.lb.services.insert(key, spec);
            }
        }
    }
}

/// The task's environment: the intent's, plus who it is (these win over the intent's, so a
/// task can trust them): `SWARMNET_TASK_ID`, `SWARMNET_SERVICE`, `SWARMNET_TASK_SLOT`,
/// `SWARMNET_NODE`.
pub fn task_env(t: &swarmnet_model::spec::TaskSpec) -> BTreeMap<String, String> {
    let mut env = t.env.clone();
    env.insert("SWARMNET_TASK_ID".into(), t.id.to_string());
    env.insert("SWARMNET_SERVICE".into(), t.service.to_string());
    env.insert("SWARMNET_TASK_SLOT".into(), t.slot.to_string());
    env.insert("SWARMNET_NODE".into(), t.node.to_string());
    env
}

/// The first `ethN` not taken by the overlay interfaces.
fn next_ifname(ifaces: &[DesiredIface]) -> IfName {
    (0..)
        .map(|i| IfName::new(format!("eth{i}")).expect("valid"))
        .find(|n| !ifaces.iter().any(|i| &i.ifname == n))
        .expect("a free ethN exists")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendState;

    /// Shared with the golden tests: 3 nodes, an app network and an internal db network
    /// (MTU override), two services, tasks on n1, n2 and n3.
    pub(crate) const INTENT: &str = include_str!("../tests/fixtures/three-nodes.json");

    pub(crate) fn ctx(node: &str) -> NodeContext {
        NodeContext {
            node: NodeId::new(node).unwrap(),
            vxlan_port: 4789,
            underlay_mtu: 1500,
            underlay_if: Some(IfName::new("eth0").unwrap()),
            gw_subnet: "172.30.0.0/16".parse().unwrap(),
            gw_leases: BTreeMap::new(),
            external: BTreeMap::new(),
            task_dir: PathBuf::from("/run/sn/tasks"),
            unready: BTreeSet::new(),
        }
    }

    #[test]
    fn projects_networks_peers_and_sandboxes() {
        let intent = Intent::from_json(INTENT).unwrap();
        let mut c = ctx("n1");
        let (leases, exhausted) = lease_gw(c.gw_subnet, &c.gw_leases, &gw_tasks(&intent, &c.node));
        assert!(exhausted.is_empty());
        c.gw_leases = leases;
        let (d, issues) = project(&intent, &c);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(d.vteps.len(), 2);
        let app = &d.networks[&Name::new("app").unwrap()];
        assert_eq!(app.mtu, 1450, "underlay 1500 - 50");
        assert_eq!(app.gateway.to_string(), "10.10.0.1/24");
        assert_eq!(app.vxlan.as_str(), "snvx4097");
        assert_eq!(app.peers.len(), 1);
        assert_eq!(
            app.peers[&"10.10.0.4".parse::<Ipv4Addr>().unwrap()]
                .1
                .to_string(),
            "198.18.0.2"
        );
        let db = &d.networks[&Name::new("db").unwrap()];
        assert_eq!(db.mtu, 1400, "override wins");
        let web1 = &d.sandboxes[&TaskId::new("web1").unwrap()];
        assert_eq!(web1.ifaces[0].ifname.as_str(), "eth0");
        let gw = web1.gw.as_ref().unwrap();
        assert_eq!(gw.ifname.as_str(), "eth1");
        assert_eq!(gw.gateway.to_string(), "172.30.0.1");
        assert_eq!(gw.addr.to_string(), "172.30.0.2/16");
        // An internal network gets no gateway interface.
        assert!(d.sandboxes[&TaskId::new("pg1").unwrap()].gw.is_none());
        assert!(d.gw_bridge.is_some());
        // n3 only has pg2: it sees the db network, with pg1 as a peer, and not app.
        let (d3, _) = project(&intent, &ctx("n3"));
        assert_eq!(
            d3.networks.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["db"]
        );
        assert_eq!(d3.networks[&Name::new("db").unwrap()].peers.len(), 1);
    }

    #[test]
    fn gossip_removes_dead_remotes_and_never_adds() {
        use crate::gossip::view::RemoteLive;
        // The fixture with a VIP on web, so that web2 (on n2) is a load-balancer backend on n1.
        let mut v: serde_json::Value = serde_json::from_str(INTENT).unwrap();
        v["services"][0]["endpoint_mode"] = "vip".into();
        v["services"][0]["networks"][0]["vip"] = "10.10.0.200".into();
        v["services"][0]["ports"] = serde_json::json!([{"name": "http", "target": 80}]);
        let intent = Intent::from_json(&v.to_string()).unwrap();
        let c = ctx("n1");
        let app = Name::new("app").unwrap();
        let web2: Ipv4Addr = "10.10.0.4".parse().unwrap();
        let backends = |d: &DesiredNode| -> Vec<Ipv4Addr> {
            d.networks[&app]
                .lb
                .services
                .values()
                .flat_map(|s| s.backends.keys().copied())
                .collect()
        };
        let (plain, _) = project(&intent, &c);
        let (none, _) = project_with_gossip(&intent, &c, None);
        assert_eq!(plain, none, "without gossip: the intent alone");
        assert!(plain.networks[&app].peers.contains_key(&web2));
        assert!(backends(&plain).contains(&web2));

        // n2 heard from, web2 not in the table: no FDB/neighbour entry, no backend; local web1
        // stays.
        let dead = RemoteLive {
            endpoints: BTreeSet::new(),
            warming: None,
            live_vteps: BTreeSet::new(),
        };
        let (d, _) = project_with_gossip(&intent, &c, Some(&dead));
        assert!(!d.networks[&app].peers.contains_key(&web2));
        assert_eq!(backends(&d), vec!["10.10.0.3".parse::<Ipv4Addr>().unwrap()]);

        // Live in gossip: the same as the intent. A record of a task the intent does not hold
        // adds nothing.
        let live = RemoteLive {
            endpoints: [
                (app.clone(), TaskId::new("web2").unwrap()),
                (Name::new("db").unwrap(), TaskId::new("pg2").unwrap()),
                (app.clone(), TaskId::new("ghost").unwrap()),
            ]
            .into(),
            warming: None,
            live_vteps: BTreeSet::new(),
        };
        let (d, _) = project_with_gossip(&intent, &c, Some(&live));
        assert_eq!(d, plain);

        // Warm-up: n2 not heard from yet is trusted from intent.
        let warming = RemoteLive {
            endpoints: BTreeSet::new(),
            warming: Some(BTreeSet::new()),
            live_vteps: BTreeSet::new(),
        };
        assert_eq!(project_with_gossip(&intent, &c, Some(&warming)).0, plain);
    }

    /// Two nodes, an ingress network and a service published on it with a task on each node.
    const MESH: &str = r#"{
      "version": 1,
      "nodes": [{"id": "n1", "addr": "198.18.0.1", "ingress_ip": "10.255.0.101"},
                {"id": "n2", "addr": "198.18.0.2", "ingress_ip": "10.255.0.102"}],
      "networks": [{"name": "ingress", "subnet": "10.255.0.0/24", "vni": 4096, "ingress": true}],
      "services": [{"name": "web", "networks": [{"network": "ingress", "vip": "10.255.0.2"}],
                    "ports": [{"target": 80, "published": 8080}]}],
      "tasks": [{"id": "web1", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
                 "networks": [{"network": "ingress", "ip": "10.255.0.11"}]},
                {"id": "web2", "service": "web", "node": "n2", "argv": ["sleep", "inf"],
                 "networks": [{"network": "ingress", "ip": "10.255.0.12"}]}]
    }"#;

    #[test]
    fn the_ingress_network_is_balanced_in_the_ingress_sandbox() {
        use crate::gossip::view::RemoteLive;
        let intent = Intent::from_json(MESH).unwrap();
        let mut c = ctx("n1");
        c.gw_leases = lease_gw(c.gw_subnet, &c.gw_leases, &gw_tasks(&intent, &c.node)).0;
        let (mut d, issues) = project(&intent, &c);
        assert!(issues.is_empty(), "{issues:?}");
        let ing = Name::new("ingress").unwrap();
        let net = &d.networks[&ing];
        assert!(
            net.vips.is_empty() && net.lb.services.is_empty(),
            "the ingress network's namespace only bridges"
        );
        let r = d.sandboxes[&ingress_task()]
            .router
            .clone()
            .expect("the ingress sandbox routes");
        let vip: Ipv4Addr = "10.255.0.2".parse().unwrap();
        assert_eq!(r.out_if.as_str(), "eth0");
        assert_eq!(r.network, ing);
        assert_eq!(r.vips, BTreeSet::from([vip]));
        let key = ServiceKey {
            vip,
            proto: Proto::Tcp,
            port: 80,
        };
        let (web1, web2): (Ipv4Addr, Ipv4Addr) = (
            "10.255.0.11".parse().unwrap(),
            "10.255.0.12".parse().unwrap(),
        );
        // Tasks on every node; the local one's share goes straight from the node
        // (crate::mesh), so here it takes no new connection.
        assert_eq!(
            r.lb.services[&key].backends,
            BTreeMap::from([
                (web1, BackendState::Draining),
                (web2, BackendState::Healthy)
            ]),
        );
        // One load-balancing point per network, the ingress one in the sandbox.
        let points: Vec<(NsName, Name)> = d
            .lb_points_mut()
            .into_iter()
            .map(|p| (p.ns.clone(), p.network.clone()))
            .collect();
        assert_eq!(points, vec![(sandbox_ns(&ingress_task()), ing.clone())]);
        assert_eq!(d.lb_in(&sandbox_ns(&ingress_task())), Some(&r.lb));
        assert_eq!(d.lb_in(&network_ns(&ing)), Some(&LbSpec::default()));

        // Gossip without web2: it leaves the sandbox's load balancer and the FDB/neighbours.
        let dead = RemoteLive {
            endpoints: BTreeSet::new(),
            warming: None,
            live_vteps: BTreeSet::new(),
        };
        let (g, _) = project_with_gossip(&intent, &c, Some(&dead));
        let lb = &g.sandboxes[&ingress_task()].router.as_ref().unwrap().lb;
        assert!(!lb.services[&key].backends.contains_key(&web2));
        assert!(!g.networks[&ing].peers.contains_key(&web2));
        // The other node's ingress sandbox stays a peer (it is no task).
        assert!(
            g.networks[&ing]
                .peers
                .contains_key(&"10.255.0.102".parse().unwrap())
        );
        d.sandboxes.clear();
        assert_eq!(
            d.lb_points_mut()[0].ns,
            &network_ns(&ing),
            "without its sandbox a network is its own point"
        );
    }

    #[test]
    fn a_draining_task_keeps_its_sandbox_and_fdb_entry_but_is_no_backend() {
        // The fixture with a VIP on web: web1 (10.10.0.3) on n1, web2 (10.10.0.4) on n2.
        let mut v: serde_json::Value = serde_json::from_str(INTENT).unwrap();
        v["services"][0]["endpoint_mode"] = "vip".into();
        v["services"][0]["networks"][0]["vip"] = "10.10.0.200".into();
        v["services"][0]["ports"] = serde_json::json!([{"name": "http", "target": 80}]);
        let app = Name::new("app").unwrap();
        let (web1, web2): (Ipv4Addr, Ipv4Addr) =
            ("10.10.0.3".parse().unwrap(), "10.10.0.4".parse().unwrap());
        let backends = |d: &DesiredNode| -> BTreeSet<Ipv4Addr> {
            d.networks[&app]
                .lb
                .services
                .values()
                .flat_map(|s| s.backends.keys().copied())
                .collect()
        };
        let tasks = v["tasks"].as_array_mut().unwrap();
        for t in tasks.iter_mut() {
            if t["id"] == "web1" || t["id"] == "web2" {
                t["desired_state"] = "draining".into();
            }
        }
        let intent = Intent::from_json(&v.to_string()).unwrap();
        let mut c = ctx("n1");
        c.gw_leases = lease_gw(c.gw_subnet, &c.gw_leases, &gw_tasks(&intent, &c.node)).0;
        let (d, issues) = project(&intent, &c);
        assert!(issues.is_empty(), "{issues:?}");
        // Still running here (open connections finish), still reachable from here...
        assert!(d.sandboxes.contains_key(&TaskId::new("web1").unwrap()));
        assert!(d.networks[&app].peers.contains_key(&web2));
        // ...but no new connection goes to either.
        assert!(!backends(&d).contains(&web1));
        assert!(!backends(&d).contains(&web2));
        // Shut down: gone from its node.
        v["tasks"].as_array_mut().unwrap().iter_mut().for_each(|t| {
            if t["id"] == "web1" {
                t["desired_state"] = "shutdown".into();
            }
        });
        let (d, _) = project(&Intent::from_json(&v.to_string()).unwrap(), &c);
        assert!(!d.sandboxes.contains_key(&TaskId::new("web1").unwrap()));
    }

    #[test]
    fn names_fit_and_are_stable() {
        let t = TaskId::new("a-very-long-task-identifier-0123456789").unwrap();
        let n = Name::new("backend-network").unwrap();
        let a = overlay_host_if(&t, &n);
        assert!(a.as_str().len() <= 15);
        assert_eq!(a, overlay_host_if(&t, &n));
        assert_ne!(a, overlay_host_if(&TaskId::new("other").unwrap(), &n));
        // Golden: these names are in kernels of running nodes; changing the hash breaks adoption.
        assert_eq!(
            overlay_host_if(&TaskId::new("web1").unwrap(), &Name::new("app").unwrap()).as_str(),
            "snva61a215b84"
        );
        assert_eq!(
            gw_host_if(&TaskId::new("web1").unwrap()).as_str(),
            "sngf619ea4040"
        );
    }

    #[test]
    fn gw_leases_are_kept_and_reused() {
        let subnet: Ipv4Net = "172.30.0.0/30".parse().unwrap();
        let t = |s: &str| TaskId::new(s).unwrap();
        let wanted: BTreeSet<TaskId> = [t("a"), t("b")].into();
        let (l, ex) = lease_gw(subnet, &BTreeMap::new(), &wanted);
        // A /30 has two hosts; the first is the bridge: one lease, one exhausted.
        assert_eq!(l.len(), 1);
        assert_eq!(ex, vec![t("b")]);
        let (l2, _) = lease_gw(subnet, &l, &[t("a")].into());
        assert_eq!(l2, l, "existing lease kept");
        let (l3, ex3) = lease_gw(subnet, &l, &[t("b")].into());
        assert!(ex3.is_empty(), "a's lease was released and reused: {l3:?}");
    }

    #[test]
    fn missing_node_is_an_issue_not_a_panic() {
        let intent = Intent::from_json(INTENT).unwrap();
        let (d, issues) = project(&intent, &ctx("n9"));
        assert!(d.networks.is_empty() && d.sandboxes.is_empty());
        assert!(issues[0].message.contains("not in the intent"));
    }
}
