//! What the projection takes from gossip (pure): the intent check the merge runs, and the set
//! of remote endpoints gossip holds live.
//!
//! DESIGN "Who owns the truth": intent says what may run, gossip says what runs. A remote
//! task is used for FDB/neighbour entries, load-balancer backends and DNS only while
//! [`RemoteLive::allows`] it: its node is live in gossip, its record is present, healthy, and
//! matches intent (node, network, address, MAC; see [`IntentChecker`]). Gossip never adds
//! anything: the projection only ever *removes* remote endpoints the intent holds.
//!
//! Warm-up: right after netd starts it has heard from nobody; treating that as "every remote
//! endpoint is dead" would blackhole every remote backend on each netd restart. During the
//! warm-up (one liveness bound, see `GossipSync`) a remote node gossip has not yet heard from
//! is trusted from intent; a node that was heard from is judged by gossip at once.
//!
//! Local tasks are never filtered here: this node knows its own tasks first-hand.

use std::collections::BTreeSet;
use std::net::IpAddr;

use swarmnet_model::spec::DesiredState;
use swarmnet_model::{Intent, Name, NodeId, TaskId};

use super::record::{EndpointRecord, Health};
use super::table::{EndpointTable, IntentCheck};

/// [`IntentCheck`] over the intent in force.
#[derive(Debug, Clone, Copy)]
pub struct IntentChecker<'a> {
    pub intent: &'a Intent,
}

impl IntentCheck for IntentChecker<'_> {
    fn endpoint_allowed(&self, node: &str, rec: &EndpointRecord) -> bool {
        let Some((t, atts)) = self.intent.task(&rec.task) else {
            return false;
        };
        if t.node.as_str() != node || !t.desired_state.keeps_sandbox() {
            return false;
        }
        if rec
            .service
            .as_ref()
            .is_some_and(|service| *service != t.service)
        {
            return false;
        }
        atts.iter()
            .any(|a| a.network == rec.network && IpAddr::V4(a.ip) == rec.ip && a.mac == rec.mac)
    }

    fn vtep_allowed(&self, node: &str, vtep: IpAddr) -> bool {
        NodeId::new(node)
            .ok()
            .and_then(|id| self.intent.node(&id).map(|n| IpAddr::V4(n.addr) == vtep))
            .unwrap_or(false)
    }
}

/// The remote endpoints gossip holds live, as the projection consumes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteLive {
    /// `(network, task)` of every validated, healthy endpoint of a live node.
    pub endpoints: BTreeSet<(Name, TaskId)>,
    /// During warm-up: the nodes gossip has heard from so far. A remote node not in it is
    /// still trusted from intent. `None` once the warm-up is over.
    pub warming: Option<BTreeSet<NodeId>>,
    /// VTEPs of the nodes gossip holds live (validated against intent).
    pub live_vteps: BTreeSet<IpAddr>,
}

impl RemoteLive {
    /// From the merged table; `heard` is `Some` during the warm-up.
    pub fn from_table(table: &EndpointTable, warming: Option<BTreeSet<NodeId>>) -> Self {
        RemoteLive {
            endpoints: table
                .endpoints
                .iter()
                .filter(|(_, e)| e.health == Health::Healthy)
                .map(|(k, _)| k.clone())
                .collect(),
            warming,
            live_vteps: table.vteps.values().copied().collect(),
        }
    }

    /// Whether the node behind `vtep` is known dead: past the warm-up and not live in gossip.
    /// A leaving backend of a dead node is not kept reachable while it drains (its
    /// connections are gone with it): its FDB and neighbour entries go at once.
    pub fn vtep_dead(&self, vtep: std::net::Ipv4Addr) -> bool {
        self.warming.is_none() && !self.live_vteps.contains(&IpAddr::V4(vtep))
    }

    /// Whether the remote task `task` of node `node` may be used on `network`.
    pub fn allows(&self, node: &NodeId, network: &Name, task: &TaskId) -> bool {
        if self.warming.as_ref().is_some_and(|h| !h.contains(node)) {
            return true;
        }
        // Lookup without cloning into a tuple of owned values is not possible with a tuple
        // key; the clone is two short strings.
        self.endpoints.contains(&(network.clone(), task.clone()))
    }

    /// Tasks of the intent that are live for DNS: running, and local or allowed on at least one
    /// of their networks.
    pub fn live_tasks(&self, intent: &Intent, me: &NodeId) -> BTreeSet<TaskId> {
        intent
            .tasks()
            .filter(|(t, _)| t.desired_state == DesiredState::Running)
            .filter(|(t, atts)| {
                &t.node == me || atts.iter().any(|a| self.allows(&t.node, &a.network, &t.id))
            })
            .map(|(t, _)| t.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::NodeSnapshot;
    use crate::gossip::table::merge;

    const INTENT: &str = include_str!("../../tests/fixtures/three-nodes.json");

    fn snap(node: &str, vtep: &str, eps: &[(&str, &str, &str, &str)]) -> NodeSnapshot {
        let mut kv = vec![("vtep".to_string(), format!("1 {vtep}"))];
        for (net, task, ip, mac) in eps {
            kv.push((format!("ep/{net}/{task}"), format!("1 {ip} {mac} - h")));
        }
        NodeSnapshot {
            node_id: node.into(),
            generation: 1,
            key_values: kv,
        }
    }

    #[test]
    fn intent_check_refuses_forged_and_stale() {
        let intent = Intent::from_json(INTENT).unwrap();
        let (t, atts) = intent.task(&TaskId::new("web2").unwrap()).unwrap();
        let a = &atts[0];
        let node = t.node.as_str().to_string();
        let vtep = intent.node(&t.node).unwrap().addr.to_string();
        let ip = a.ip.to_string();
        let mac = a.mac.to_string();
        let net = a.network.as_str().to_string();
        let good = snap(&node, &vtep, &[(&net, "web2", &ip, &mac)]);
        let check = IntentChecker { intent: &intent };
        let (table, stats) = merge(std::slice::from_ref(&good), &check);
        assert_eq!(table.endpoints.len(), 1, "{stats:?}");
        // Wrong node, wrong address, unknown task, wrong VTEP: all ignored and counted.
        let forged = [
            snap("n1", "198.18.0.1", &[(&net, "web2", &ip, &mac)]),
            snap(&node, &vtep, &[(&net, "web2", "10.10.0.99", &mac)]),
            snap(&node, &vtep, &[(&net, "ghost", &ip, &mac)]),
        ];
        for f in forged {
            let (t, s) = merge(&[f], &check);
            assert!(t.endpoints.is_empty(), "{t:?}");
            assert_eq!(s.rejected_by_intent, 1);
        }
        let (t, s) = merge(
            &[snap(&node, "198.18.0.99", &[(&net, "web2", &ip, &mac)])],
            &check,
        );
        assert!(t.endpoints.is_empty());
        assert_eq!((s.rejected_vtep, s.no_vtep), (1, 1));
    }

    #[test]
    fn warm_up_trusts_unheard_nodes_only() {
        let n2 = NodeId::new("n2").unwrap();
        let net = Name::new("app").unwrap();
        let t = TaskId::new("web2").unwrap();
        let mut r = RemoteLive {
            endpoints: BTreeSet::new(),
            warming: Some(BTreeSet::new()),
            live_vteps: BTreeSet::new(),
        };
        let vtep = "198.18.0.2".parse().unwrap();
        assert!(!r.vtep_dead(vtep), "nothing is dead during the warm-up");
        assert!(r.allows(&n2, &net, &t), "not heard yet: intent is trusted");
        r.warming = Some([n2.clone()].into());
        assert!(!r.allows(&n2, &net, &t), "heard without the record: gone");
        r.warming = None;
        assert!(r.vtep_dead(vtep));
        r.endpoints.insert((net.clone(), t.clone()));
        r.live_vteps.insert(IpAddr::V4(vtep));
        assert!(r.allows(&n2, &net, &t));
        assert!(!r.vtep_dead(vtep));
    }
}
