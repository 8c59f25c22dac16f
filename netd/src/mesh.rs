//! The routing mesh's local shortcut (issue 5): a published port's connections that the mesh
//! gives to a task on this node go to it straight from the node namespace, through its
//! gateway-bridge address (the path host-mode publishing uses), instead of through the ingress
//! sandbox. Pure: it rewrites the projection.
//!
//! Why: measured on the node with the task, the sandbox hop (a veth pair, a second DNAT and
//! conntrack entry, the masquerade, a forward and a bridge pass) cost about 16 µs per connection
//! and kept that path under 0.9 of a direct connection.
//!
//! How every healthy task keeps its share: the node picks among one slot per healthy task of
//! the service, on any node: a local task's slot is its own address, the others' slots are
//! the service's ingress VIP. In the ingress sandbox the local tasks are then marked draining
//! (no new connection, established ones kept), so the sandbox balances what reaches it over
//! the remote tasks only: each task gets 1/N of new connections, wherever it runs.
//!
//! Invariants:
//! - only healthy backends of the ingress balancer (after health gating, drain and gossip's
//!   dead-node removal) are ever given a slot, so an unhealthy or leaving local task stops
//!   getting new connections from the node as it does from the sandbox;
//! - local tasks are marked draining in the sandbox only while at least one task is reached
//!   through it; otherwise the sandbox's balancer is left as it is (the node sends it nothing,
//!   and the VIP keeps answering from inside the ingress network);
//! - services with client-IP affinity keep the sandbox path for every connection: a random
//!   pick in the node would break the binding (the sandbox hashes or persists per client).
//!
//! What changes for a connection to a local task: the task sees the client's own address (as
//! with host mode and the local traffic policy); through the sandbox it sees the sandbox's.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use swarmnet_model::spec::Protocol;

use crate::desired::{DesiredNode, PublishTarget, ingress_task};
use crate::lb::{Affinity, BackendState, Proto, ServiceKey};

/// Gives this node's healthy tasks their direct slots in every routing-mesh port (see the
/// module docs). Call it last on a projection; applying it twice gives the same result only
/// when nothing was split, so it is called exactly once per projection.
pub fn route_local_tasks(d: &mut DesiredNode) {
    let task = ingress_task();
    let Some(router) = d.sandboxes.get(&task).and_then(|s| s.router.as_ref()) else {
        return;
    };
    // This node's tasks on the ingress network: their address there → their gateway address.
    let local: BTreeMap<Ipv4Addr, Ipv4Addr> = d
        .sandboxes
        .values()
        .filter(|sb| sb.task != task && (sb.process.is_some() || sb.external.is_some()))
        .filter_map(|sb| {
            let gw = sb.gw.as_ref()?.addr.addr();
            let ing = sb.ifaces.iter().find(|i| i.network == router.network)?;
            Some((ing.addr.addr(), gw))
        })
        .collect();
    let mut to_drain: Vec<(ServiceKey, Ipv4Addr)> = Vec::new();
    for p in &mut d.published {
        let PublishTarget::Mesh {
            vip,
            direct,
            via_sandbox,
        } = &mut p.target
        else {
            continue;
        };
        let key = ServiceKey {
            vip: *vip.ip(),
            proto: match p.proto {
                Protocol::Tcp => Proto::Tcp,
                Protocol::Udp => Proto::Udp,
            },
            port: vip.port(),
        };
        let Some(svc) = router.lb.services.get(&key) else {
            continue;
        };
        if svc.affinity != Affinity::None {
            continue;
        }
        let healthy = svc.healthy();
        let mine: Vec<(Ipv4Addr, Ipv4Addr)> = healthy
            .iter()
            .filter_map(|ip| local.get(ip).map(|gw| (*ip, *gw)))
            .collect();
        *direct = mine
            .iter()
            .map(|(_, gw)| SocketAddrV4::new(*gw, svc.target_port))
            .collect();
        *via_sandbox = healthy.len() - mine.len();
        if *via_sandbox > 0 {
            to_drain.extend(mine.iter().map(|(ip, _)| (key, *ip)));
        }
    }
    let Some(router) = d.sandboxes.get_mut(&task).and_then(|s| s.router.as_mut()) else {
        return;
    };
    for (key, ip) in to_drain {
        if let Some(svc) = router.lb.services.get_mut(&key) {
            svc.backends.insert(ip, BackendState::Draining);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use swarmnet_model::{Intent, NodeId, TaskId};

    use super::*;
    use crate::desired::{NodeContext, gw_tasks, lease_gw, project, project_with_gossip};
    use crate::gossip::view::RemoteLive;

    /// Three nodes, the ingress network and `web` published on 8080 with tasks web1 (n1), web2
    /// (n2), web3 (n1); `edit` changes the intent first.
    fn projected(
        node: &str,
        edit: impl FnOnce(&mut serde_json::Value),
        unready: &[&str],
        gossip: Option<&RemoteLive>,
    ) -> DesiredNode {
        let mut v = serde_json::json!({
          "version": 1,
          "nodes": [{"id": "n1", "addr": "198.18.0.1", "ingress_ip": "10.255.0.101"},
                    {"id": "n2", "addr": "198.18.0.2", "ingress_ip": "10.255.0.102"},
                    {"id": "n3", "addr": "198.18.0.3", "ingress_ip": "10.255.0.103"}],
          "networks": [{"name": "ingress", "subnet": "10.255.0.0/24", "vni": 4096,
                        "ingress": true}],
          "services": [{"name": "web", "networks": [{"network": "ingress", "vip": "10.255.0.2"}],
                        "ports": [{"target": 80, "published": 8080}]}],
          "tasks": [{"id": "web1", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
                     "networks": [{"network": "ingress", "ip": "10.255.0.11"}]},
                    {"id": "web2", "service": "web", "node": "n2", "argv": ["sleep", "inf"],
                     "networks": [{"network": "ingress", "ip": "10.255.0.12"}]},
                    {"id": "web3", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
                     "networks": [{"network": "ingress", "ip": "10.255.0.13"}]}]
        });
        edit(&mut v);
        let intent = Intent::from_json(&v.to_string()).unwrap();
        let mut c = NodeContext {
            node: NodeId::new(node).unwrap(),
            vxlan_port: 4789,
            underlay_mtu: 1500,
            underlay_if: None,
            gw_subnet: "172.30.0.0/16".parse().unwrap(),
            gw_leases: BTreeMap::new(),
            external: BTreeMap::new(),
            task_dir: "/run/sn/tasks".into(),
            unready: unready.iter().map(|t| TaskId::new(*t).unwrap()).collect(),
        };
        c.gw_leases = lease_gw(c.gw_subnet, &c.gw_leases, &gw_tasks(&intent, &c.node)).0;
        let (d, issues) = match gossip {
            None => project(&intent, &c),
            Some(g) => project_with_gossip(&intent, &c, Some(g)),
        };
        assert!(issues.is_empty(), "{issues:?}");
        d
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn gw_of(d: &DesiredNode, task: &str) -> SocketAddrV4 {
        let sb = &d.sandboxes[&TaskId::new(task).unwrap()];
        SocketAddrV4::new(sb.gw.as_ref().unwrap().addr.addr(), 80)
    }

    /// The target of 8080 and the sandbox balancer's backends of the web service.
    fn mesh(d: &DesiredNode) -> (PublishTarget, BTreeMap<Ipv4Addr, BackendState>) {
        let p = d.published.iter().find(|p| p.port == 8080).unwrap();
        let key = ServiceKey {
            vip: ip("10.255.0.2"),
            proto: Proto::Tcp,
            port: 80,
        };
        let lb = &d.sandboxes[&ingress_task()].router.as_ref().unwrap().lb;
        (p.target.clone(), lb.services[&key].backends.clone())
    }

    const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 255, 0, 2), 80);

    #[test]
    fn local_tasks_get_direct_slots_and_the_sandbox_balances_the_remote_ones() {
        let d = projected("n1", |_| {}, &[], None);
        let (target, backends) = mesh(&d);
        assert_eq!(
            target,
            PublishTarget::Mesh {
                vip: VIP,
                direct: vec![gw_of(&d, "web1"), gw_of(&d, "web3")],
                via_sandbox: 1,
            }
        );
        assert_eq!(
            backends,
            BTreeMap::from([
                (ip("10.255.0.11"), BackendState::Draining),
                (ip("10.255.0.12"), BackendState::Healthy),
                (ip("10.255.0.13"), BackendState::Draining),
            ]),
            "the sandbox sends what reaches it to the remote task only"
        );
        // Three slots, one per task: each gets a third.
        let rules = crate::firewall::render(&d);
        let want = format!(
            "tcp dport 8080 dnat ip to numgen random mod 3 map {{ 0 : {}, 1 : {}, 2 : 10.255.0.2 }}:80",
            gw_of(&d, "web1").ip(),
            gw_of(&d, "web3").ip()
        );
        assert!(rules.contains(&want), "{rules}");
    }

    #[test]
    fn a_node_without_a_task_sends_everything_through_the_sandbox() {
        let d = projected("n3", |_| {}, &[], None);
        let (target, backends) = mesh(&d);
        assert_eq!(
            target,
            PublishTarget::Mesh {
                vip: VIP,
                direct: vec![],
                via_sandbox: 3,
            }
        );
        assert!(backends.values().all(|s| *s == BackendState::Healthy));
        assert!(crate::firewall::render(&d).contains("tcp dport 8080 dnat ip to 10.255.0.2:80"));
    }

    #[test]
    fn an_unready_or_draining_local_task_gets_no_slot() {
        // web1 failed its health check, web3 is draining: only web2 (remote) serves.
        let d = projected(
            "n1",
            |v| v["tasks"][2]["desired_state"] = "draining".into(),
            &["web1"],
            None,
        );
        let (target, backends) = mesh(&d);
        assert_eq!(
            target,
            PublishTarget::Mesh {
                vip: VIP,
                direct: vec![],
                via_sandbox: 1,
            }
        );
        assert_eq!(
            backends,
            BTreeMap::from([(ip("10.255.0.12"), BackendState::Healthy)])
        );
        // Only web1 unready: web3 keeps its direct slot beside web2's.
        let d = projected("n1", |_| {}, &["web1"], None);
        assert_eq!(
            mesh(&d).0,
            PublishTarget::Mesh {
                vip: VIP,
                direct: vec![gw_of(&d, "web3")],
                via_sandbox: 1,
            }
        );
    }

    #[test]
    fn with_only_local_tasks_left_the_sandbox_balancer_is_left_alone() {
        // Gossip holds n2 dead: web2 leaves; both slots are local.
        let dead = RemoteLive {
            endpoints: BTreeSet::new(),
            warming: None,
            live_vteps: BTreeSet::new(),
        };
        let d = projected("n1", |_| {}, &[], Some(&dead));
        let (target, backends) = mesh(&d);
        assert_eq!(
            target,
            PublishTarget::Mesh {
                vip: VIP,
                direct: vec![gw_of(&d, "web1"), gw_of(&d, "web3")],
                via_sandbox: 0,
            }
        );
        assert_eq!(
            backends,
            BTreeMap::from([
                (ip("10.255.0.11"), BackendState::Healthy),
                (ip("10.255.0.13"), BackendState::Healthy),
            ]),
            "traffic from inside the ingress network still reaches them"
        );
        let rules = crate::firewall::render(&d);
        assert!(
            rules.contains(&format!(
                "dnat ip to numgen random mod 2 map {{ 0 : {}, 1 : {} }}:80",
                gw_of(&d, "web1").ip(),
                gw_of(&d, "web3").ip()
            )),
            "{rules}"
        );
    }

    #[test]
    fn client_ip_affinity_keeps_the_sandbox_path() {
        let d = projected(
            "n1",
            |v| v["services"][0]["affinity"] = "client_ip".into(),
            &[],
            None,
        );
        let (target, backends) = mesh(&d);
        assert_eq!(
            target,
            PublishTarget::Mesh {
                vip: VIP,
                direct: vec![],
                via_sandbox: 0,
            }
        );
        assert!(backends.values().all(|s| *s == BackendState::Healthy));
    }
}
