//! Assignment deltas: the difference between two cluster intents as per-object upserts and
//! removals, so the orchestrator's assignment stream sends a full snapshot once and then only
//! what changed.
//!
//! - [`diff`] (`old`, `new`) → [`SpecDelta`]; [`apply`] (`spec`, `delta`) turns `old` into
//!   `new`. Objects are keyed by node id, network name, service name and task id; an upsert
//!   carries the whole object (objects are small; the win is not resending the other 10k).
//! - Canonical order: every list sorted by its key, which is how the orchestrator projects its
//!   state. [`apply`] keeps that order, so for canonical specs `apply(old, diff(old, new)) ==
//!   new` exactly; [`canonical`] sorts a spec written in another order.
//! - A delta is only meaningful on top of the exact intent it was computed from: the stream
//!   stamps each message with its Raft (term, index) and the base it applies to ([`Stamp`]);
//!   the receiver checks the base before calling [`apply`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{ClusterSpec, NetworkSpec, NodeSpec, ServiceSpec, TaskSpec};
use crate::types::{Name, NodeId, TaskId};

/// A Raft position: (term, index). Ordered: a greater stamp is newer.
pub type Stamp = (u64, u64);

/// What changed between two intents. Empty lists are left out of the JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecDelta {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_nodes: Vec<NodeId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_networks: Vec<Name>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_services: Vec<Name>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_tasks: Vec<TaskId>,
}

impl SpecDelta {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.removed_nodes.is_empty()
            && self.networks.is_empty()
            && self.removed_networks.is_empty()
            && self.services.is_empty()
            && self.removed_services.is_empty()
            && self.tasks.is_empty()
            && self.removed_tasks.is_empty()
    }

    /// Objects upserted plus objects removed.
    pub fn len(&self) -> usize {
        self.nodes.len()
            + self.removed_nodes.len()
            + self.networks.len()
            + self.removed_networks.len()
            + self.services.len()
            + self.removed_services.len()
            + self.tasks.len()
            + self.removed_tasks.len()
    }
}

fn node_key(n: &NodeSpec) -> &NodeId {
    &n.id
}
fn network_key(n: &NetworkSpec) -> &Name {
    &n.name
}
fn service_key(s: &ServiceSpec) -> &Name {
    &s.name
}
fn task_key(t: &TaskSpec) -> &TaskId {
    &t.id
}

/// Upserts and removals turning `old` into `new` for one kind of object.
fn diff_list<T: Clone + PartialEq, K: Ord + Clone>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> &K,
) -> (Vec<T>, Vec<K>) {
    let before: BTreeMap<&K, &T> = old.iter().map(|o| (key(o), o)).collect();
    let upserts = new
        .iter()
        .filter(|n| before.get(key(n)) != Some(n))
        .cloned()
        .collect();
    let after: BTreeMap<&K, ()> = new.iter().map(|n| (key(n), ())).collect();
    let removed = old
        .iter()
        .map(&key)
        .filter(|k| !after.contains_key(k))
        .cloned()
        .collect();
    (upserts, removed)
}

/// Applies one kind's upserts and removals; the result is sorted by key.
fn apply_list<T: Clone, K: Ord + Clone>(
    list: &mut Vec<T>,
    upserts: &[T],
    removed: &[K],
    key: impl Fn(&T) -> &K,
) {
    if upserts.is_empty() && removed.is_empty() {
        return;
    }
    let mut by_key: BTreeMap<K, T> = std::mem::take(list)
        .into_iter()
        .map(|o| (key(&o).clone(), o))
        .collect();
    for k in removed {
        by_key.remove(k);
    }
    for o in upserts {
        by_key.insert(key(o).clone(), o.clone());
    }
    *list = by_key.into_values().collect();
}

/// The delta that turns `old` into `new`.
pub fn diff(old: &ClusterSpec, new: &ClusterSpec) -> SpecDelta {
    let (nodes, removed_nodes) = diff_list(&old.nodes, &new.nodes, node_key);
    let (networks, removed_networks) = diff_list(&old.networks, &new.networks, network_key);
    let (services, removed_services) = diff_list(&old.services, &new.services, service_key);
    let (tasks, removed_tasks) = diff_list(&old.tasks, &new.tasks, task_key);
    SpecDelta {
        nodes,
        removed_nodes,
        networks,
        removed_networks,
        services,
        removed_services,
        tasks,
        removed_tasks,
    }
}

/// Applies `delta` to `spec` (the intent it was computed from). Removing an object that is
/// not there is a no-op and an upsert replaces or adds, so applying a delta twice is harmless.
pub fn apply(spec: &mut ClusterSpec, delta: &SpecDelta) {
    apply_list(
        &mut spec.nodes,
        &delta.nodes,
        &delta.removed_nodes,
        node_key,
    );
    apply_list(
        &mut spec.networks,
        &delta.networks,
        &delta.removed_networks,
        network_key,
    );
    apply_list(
        &mut spec.services,
        &delta.services,
        &delta.removed_services,
        service_key,
    );
    apply_list(
        &mut spec.tasks,
        &delta.tasks,
        &delta.removed_tasks,
        task_key,
    );
}

/// `spec` with every list sorted by its key (the order [`apply`] produces).
pub fn canonical(mut spec: ClusterSpec) -> ClusterSpec {
    spec.nodes.sort_by(|a, b| a.id.cmp(&b.id));
    spec.networks.sort_by(|a, b| a.name.cmp(&b.name));
    spec.services.sort_by(|a, b| a.name.cmp(&b.name));
    spec.tasks.sort_by(|a, b| a.id.cmp(&b.id));
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DesiredState, TaskAttachment};

    /// splitmix64: seedable and the same everywhere.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn node(i: u64, labels: u64) -> NodeSpec {
        serde_json::from_value(serde_json::json!({
            "id": format!("n{i}"),
            "addr": format!("198.18.0.{}", i + 1),
            "labels": {"zone": format!("z{labels}")},
        }))
        .unwrap()
    }

    fn network(i: u64, mtu: u64) -> NetworkSpec {
        serde_json::from_value(serde_json::json!({
            "name": format!("net{i}"),
            "subnet": format!("10.{i}.0.0/24"),
            "vni": 4096 + i,
            "mtu": 1300 + mtu,
        }))
        .unwrap()
    }

    fn service(i: u64, replicas: u64) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "name": format!("s{i}"),
            "mode": {"replicated": {"replicas": replicas}},
        }))
        .unwrap()
    }

    fn task(r: &mut Rng, i: u64) -> TaskSpec {
        let mut t: TaskSpec = serde_json::from_value(serde_json::json!({
            "id": format!("t{i}"),
            "service": format!("s{}", r.below(4)),
            "slot": r.below(3) + 1,
            "node": format!("n{}", r.below(4)),
            "argv": ["sleep", "inf"],
        }))
        .unwrap();
        t.networks.push(TaskAttachment {
            network: Name::new(format!("net{}", r.below(3))).unwrap(),
            ip: format!("10.0.0.{}", r.below(250) + 2).parse().unwrap(),
            mac: None,
            aliases: vec![],
            ifname: None,
        });
        if r.below(4) == 0 {
            t.desired_state = DesiredState::Draining;
        }
        t
    }

    /// One random change: add, change or remove an object of a random kind.
    fn mutate(r: &mut Rng, s: &mut ClusterSpec) {
        let i = r.below(8);
        match r.below(4) {
            0 => {
                s.nodes.retain(|n| n.id.as_str() != format!("n{i}"));
                if r.below(3) > 0 {
                    s.nodes.push(node(i, r.below(3)));
                }
            }
            1 => {
                s.networks.retain(|n| n.name.as_str() != format!("net{i}"));
                if r.below(3) > 0 {
                    s.networks.push(network(i, r.below(3)));
                }
            }
            2 => {
                s.services.retain(|n| n.name.as_str() != format!("s{i}"));
                if r.below(3) > 0 {
                    s.services.push(service(i, r.below(3)));
                }
            }
            _ => {
                let i = r.below(30);
                s.tasks.retain(|t| t.id.as_str() != format!("t{i}"));
                if r.below(3) > 0 {
                    s.tasks.push(task(r, i));
                }
            }
        }
    }

    #[test]
    fn a_snapshot_plus_its_deltas_is_the_final_snapshot() {
        let mut changed_objects = 0;
        for seed in 0..200 {
            let mut r = Rng(seed);
            let mut truth = ClusterSpec {
                version: 1,
                nodes: vec![],
                networks: vec![],
                services: vec![],
                tasks: vec![],
            };
            // The receiver starts from the snapshot and only ever sees deltas.
            let mut receiver = truth.clone();
            for step in 0..60 {
                let before = truth.clone();
                // A delta may cover several changes (the stream coalesces bursts).
                for _ in 0..=r.below(3) {
                    mutate(&mut r, &mut truth);
                }
                truth = canonical(truth);
                let d = diff(&before, &truth);
                changed_objects += d.len();
                assert_eq!(d.is_empty(), before == truth, "seed {seed} step {step}");
                // Through the wire encoding.
                let d: SpecDelta =
                    serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
                apply(&mut receiver, &d);
                assert_eq!(receiver, truth, "seed {seed} step {step}: {d:?}");
                // Applying the same delta again changes nothing.
                apply(&mut receiver, &d);
                assert_eq!(receiver, truth, "seed {seed} step {step}: applied twice");
            }
        }
        assert!(changed_objects > 10_000, "{changed_objects}");
    }

    #[test]
    fn a_delta_names_only_what_changed() {
        let mut r = Rng(7);
        let old = canonical(ClusterSpec {
            version: 1,
            nodes: (0..3).map(|i| node(i, 0)).collect(),
            networks: (0..2).map(|i| network(i, 0)).collect(),
            services: (0..3).map(|i| service(i, 1)).collect(),
            tasks: (0..20).map(|i| task(&mut r, i)).collect(),
        });
        let mut new = old.clone();
        new.services[1] = service(1, 5);
        new.tasks.remove(3);
        new.nodes.push(node(7, 1));
        let d = diff(&old, &new);
        assert_eq!(d.services, vec![service(1, 5)]);
        assert_eq!(d.removed_tasks, vec![old.tasks[3].id.clone()]);
        assert_eq!(d.nodes, vec![node(7, 1)]);
        assert_eq!(d.len(), 3);
        assert!(diff(&new, &new).is_empty());
    }
}
