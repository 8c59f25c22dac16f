//! `inspect`: what this node wants beside what the kernel really holds, read fresh, with every
//! difference flagged as drift (the view `swarmnet inspect` shows; ANCHORS pains 2, 3 and 7).
//!
//! Drift is defined by the planner, not by a second comparison that could disagree with it:
//! the kernel is observed in full scope and planned against the desired state exactly as a
//! full round would, and the ops that round would run *are* the drift. Nothing is applied.
//! A converged node therefore shows no drift; an FDB entry deleted by hand shows as the
//! `add fdb` that would restore it, under the object that owns it.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::{Reconciler, gate_for};
use crate::desired::DesiredNode;
use crate::lb::BackendState;
use crate::plan::{self, NsObserved, Observed, Scope};
use crate::port::{LinkKindState, LinkState};

/// One object whose kernel state differs from what is wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub object: String,
    /// What the next full round would do about it, in planner terms.
    pub ops: Vec<String>,
}

/// A network namespace (or the node's) as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NsView {
    pub links: Vec<String>,
    pub addrs: Vec<String>,
    pub routes: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fdb: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub neighbours: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbView>,
}

/// A namespace's load balancer: whether the kernel still holds what netd applied, and that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LbView {
    pub in_sync: bool,
    /// `vip:port/proto` → backends as `ip:port` (`draining` marked).
    pub services: BTreeMap<String, Vec<String>>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    pub node: String,
    pub round: u64,
    /// False until a first round has projected the intent.
    pub ready: bool,
    /// Objects whose kernel state differs from the desired state; empty: no drift.
    pub drift: Vec<Drift>,
    /// What is wanted, in short: networks (VNI, subnet, VIPs, remote endpoints), sandboxes.
    pub desired: serde_json::Value,
    /// What the kernel holds: the node namespace, then every namespace netd owns.
    pub kernel: BTreeMap<String, NsView>,
    /// The node firewall table as listed by the kernel (normalized).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall: Option<String>,
    /// Per sandbox (task id): the embedded resolver's sockets, policy for outside names and
    /// the names → records it answers (filled in by the daemon, which owns the resolver).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dns: BTreeMap<String, serde_json::Value>,
}

impl Reconciler {
    /// Observes everything and plans a full round without applying it (see the module docs).
    pub fn inspect(&mut self, now: Instant) -> Inspection {
        let node = self.cfg.node.to_string();
        let Some(desired) = self.last_desired.clone() else {
            return Inspection {
                node,
                round: self.round,
                ready: false,
                drift: Vec::new(),
                desired: serde_json::Value::Null,
                kernel: BTreeMap::new(),
                firewall: None,
                dns: BTreeMap::new(),
            };
        };
        let observed = self.observe(&desired, &Scope::Full);
        let restarts = &self.restarts;
        let gate = |t: &swarmnet_model::TaskId| gate_for(restarts.get(t), now);
        let plans = plan::plan(&desired, &observed, &Scope::Full, &self.tables, &gate);
        let drift = plans
            .iter()
            .filter(|p| !p.ops.is_empty())
            .map(|p| Drift {
                object: p.key.to_string(),
                ops: p.ops.iter().map(ToString::to_string).collect(),
            })
            .collect();
        Inspection {
            node,
            round: self.round,
            ready: true,
            drift,
            desired: desired_summary(&desired),
            kernel: kernel_view(&observed),
            firewall: observed.firewall.clone(),
            dns: BTreeMap::new(),
        }
    }
}

fn desired_summary(d: &DesiredNode) -> serde_json::Value {
    let networks: serde_json::Map<String, serde_json::Value> = d
        .networks
        .iter()
        .map(|(id, n)| {
            (
                id.to_string(),
                serde_json::json!({
                    "netns": n.ns.to_string(),
                    "vni": n.vni,
                    "bridge": n.gateway.to_string(),
                    "vips": n.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "remote_endpoints": n.peers.iter()
                        .map(|(ip, (mac, vtep))| format!("{ip} {mac} via {vtep}"))
                        .collect::<Vec<_>>(),
                    "lb_services": n.lb.services.len(),
                }),
            )
        })
        .collect();
    let sandboxes: serde_json::Map<String, serde_json::Value> = d
        .sandboxes
        .iter()
        .map(|(t, s)| {
            (
                t.to_string(),
                serde_json::json!({
                    "netns": s.ns.to_string(),
                    "interfaces": s.ifaces.iter()
                        .map(|i| format!("{} {} {} mtu {} on {}", i.ifname, i.addr, i.mac, i.mtu, i.network))
                        .collect::<Vec<_>>(),
                    "gateway": s.gw.as_ref().map(|g| format!("{} {} via {}", g.ifname, g.addr, g.gateway)),
                    "process": s.process.as_ref().map(|p| p.argv.join(" ")),
                    "external": s.external.as_ref().map(|p| p.display().to_string()),
                    "router": s.router.as_ref().map(|r| serde_json::json!({
                        "network": r.network.to_string(),
                        "out": r.out_if.to_string(),
                        "vips": r.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "lb_services": r.lb.services.len(),
                    })),
                }),
            )
        })
        .collect();
    serde_json::json!({
        "networks": networks,
        "sandboxes": sandboxes,
        "published": d.published.iter().map(|p| format!("{}/{} {:?} ({})", p.port, p.proto, p.target, p.service)).collect::<Vec<_>>(),
    })
}

fn kernel_view(o: &Observed) -> BTreeMap<String, NsView> {
    let mut out = BTreeMap::new();
    out.insert("node".to_string(), ns_view(&o.node));
    for (ns, obs) in &o.ns {
        let mut v = ns_view(obs);
        if let Some(lb) = o.lb.get(ns) {
            v.lb = Some(LbView {
                in_sync: lb.in_sync,
                services: lb
                    .applied
                    .as_ref()
                    .map(|spec| {
                        spec.services
                            .values()
                            .map(|s| {
                                let backends = s
                                    .backends
                                    .iter()
                                    .map(|(ip, st)| match st {
                                        BackendState::Healthy => format!("{ip}:{}", s.target_port),
                                        BackendState::Draining => {
                                            format!("{ip}:{} draining", s.target_port)
                                        }
                                    })
                                    .collect();
                                (s.key.to_string(), backends)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        out.insert(ns.to_string(), v);
    }
    out
}

fn link_line(l: &LinkState) -> String {
    let kind = match &l.kind {
        LinkKindState::Bridge => "bridge".to_string(),
        LinkKindState::Vxlan {
            vni,
            local,
            port,
            learning,
        } => format!(
            "vxlan id {vni} local {} dstport {port}{}",
            local.map_or_else(|| "-".into(), |a| a.to_string()),
            if *learning { " learning" } else { "" }
        ),
        LinkKindState::Veth => "veth".to_string(),
        LinkKindState::Other(k) => k.clone(),
    };
    let mut s = format!("{} {kind} mtu {}", l.name, l.mtu);
    if let Some(m) = &l.mac {
        s.push_str(&format!(" mac {m}"));
    }
    if let Some(m) = &l.master {
        s.push_str(&format!(" master {m}"));
    }
    s.push_str(if l.up { " up" } else { " down" });
    if l.hairpin {
        s.push_str(" hairpin");
    }
    s
}

fn ns_view(o: &NsObserved) -> NsView {
    NsView {
        links: o.links.iter().map(link_line).collect(),
        addrs: o
            .addrs
            .iter()
            .map(|a| format!("{} {}", a.link, a.addr))
            .collect(),
        routes: o
            .routes
            .iter()
            .map(|r| {
                format!(
                    "{}{}{}",
                    r.dst,
                    r.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
                    r.link
                        .as_ref()
                        .map(|l| format!(" dev {l}"))
                        .unwrap_or_default()
                )
            })
            .collect(),
        fdb: o
            .fdb
            .iter()
            .map(|(dev, es)| {
                (
                    dev.to_string(),
                    es.iter()
                        .map(|e| format!("{} dst {}", e.mac, e.dst))
                        .collect(),
                )
            })
            .collect(),
        neighbours: o
            .neighs
            .iter()
            .map(|(dev, es)| {
                (
                    dev.to_string(),
                    es.iter()
                        .map(|e| format!("{} lladdr {}", e.ip, e.mac))
                        .collect(),
                )
            })
            .collect(),
        sysctls: o.sysctls.clone(),
        lb: None,
    }
}
