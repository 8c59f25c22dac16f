//! The pure merge: from the live nodes' gossiped states to a validated endpoint table.
//!
//! Gossip carries what is running, intent says what may run (DESIGN "Who owns the truth"): a
//! record enters the table only if the [`IntentCheck`] says that task, with that address and
//! MAC, lives on that network on the publishing node, and that node's VTEP is the one intent
//! knows. Everything else is ignored and counted in [`MergeStats`]; gossip never creates a name
//! or a backend by itself.
//!
//! Invariants: only nodes the failure detector calls live are passed in (a dead node's
//! endpoints are simply absent); per node id only the newest generation counts (a restarted
//! netd supersedes its previous incarnation, whose records are never merged again); the output
//! is deterministic (sorted maps), so every node given the same input builds the same table.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use chitchat::{ChitchatId, NodeState};
use swarmnet_model::{MacAddr, Name, TaskId};

use super::record::{EP_PREFIX, EndpointRecord, Health, VTEP_KEY, decode_vtep};

/// What the merge asks intent. The reconciler implements it over its current `Intent`; tests
/// and benches use closures through [`AllowAll`] / [`FnCheck`].
pub trait IntentCheck {
    /// Does intent place `rec.task` on `node`, attached to `rec.network` with `rec.ip` and
    /// `rec.mac`?
    fn endpoint_allowed(&self, node: &str, rec: &EndpointRecord) -> bool;
    /// Is `vtep` the underlay address intent has for `node`?
    fn vtep_allowed(&self, node: &str, vtep: IpAddr) -> bool;
}

/// Accepts everything (benches, transport tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl IntentCheck for AllowAll {
    fn endpoint_allowed(&self, _: &str, _: &EndpointRecord) -> bool {
        true
    }
    fn vtep_allowed(&self, _: &str, _: IpAddr) -> bool {
        true
    }
}

/// An [`IntentCheck`] from two closures.
pub struct FnCheck<E, V> {
    pub endpoint: E,
    pub vtep: V,
}

impl<E, V> std::fmt::Debug for FnCheck<E, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCheck")
    }
}

impl<E, V> IntentCheck for FnCheck<E, V>
where
    E: Fn(&str, &EndpointRecord) -> bool,
    V: Fn(&str, IpAddr) -> bool,
{
    fn endpoint_allowed(&self, node: &str, rec: &EndpointRecord) -> bool {
        (self.endpoint)(node, rec)
    }
    fn vtep_allowed(&self, node: &str, vtep: IpAddr) -> bool {
        (self.vtep)(node, vtep)
    }
}

/// One live node's gossiped state, detached from chitchat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub generation: u64,
    /// Non-deleted key/values.
    pub key_values: Vec<(String, String)>,
}

impl NodeSnapshot {
    /// Snapshots of chitchat's live nodes (`Chitchat::live_nodes_watcher()` content).
    pub fn from_live(live: &BTreeMap<ChitchatId, NodeState>) -> Vec<NodeSnapshot> {
        live.iter()
            .map(|(id, state)| NodeSnapshot {
                node_id: id.node_id.to_string(),
                generation: id.generation_id,
                key_values: state
                    .key_values()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
            .collect()
    }
}

/// A remote (or local) endpoint that passed validation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableEntry {
    pub node: String,
    pub vtep: IpAddr,
    pub ip: IpAddr,
    pub mac: MacAddr,
    pub service: Option<Name>,
    pub health: Health,
}

/// The validated endpoint table: `(network, task)` → where it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointTable {
    pub endpoints: BTreeMap<(Name, TaskId), TableEntry>,
    /// VTEP of every live node whose `vtep` record passed validation.
    pub vteps: BTreeMap<String, IpAddr>,
}

impl EndpointTable {
    /// Endpoints published by `node`.
    pub fn of_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = (&'a (Name, TaskId), &'a TableEntry)> + 'a {
        self.endpoints.iter().filter(move |(_, e)| e.node == node)
    }
}

/// What the merge ignored, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeStats {
    pub accepted: u64,
    /// Records that do not decode (bad key, value, version).
    pub malformed: u64,
    /// Records intent does not back: forged or stale.
    pub rejected_by_intent: u64,
    /// VTEP records intent does not back.
    pub rejected_vtep: u64,
    /// Endpoint records of a node without a valid VTEP (cannot be programmed).
    pub no_vtep: u64,
    /// Older generations of a node id, superseded by a newer live one.
    pub superseded_generations: u64,
    /// The same `(network, task)` accepted from two nodes: the lowest node id is kept.
    pub conflicts: u64,
}

/// Builds the table from the live nodes' snapshots. Pure and deterministic.
pub fn merge(nodes: &[NodeSnapshot], check: &dyn IntentCheck) -> (EndpointTable, MergeStats) {
    let mut stats = MergeStats::default();
    let mut newest: HashMap<&str, &NodeSnapshot> = HashMap::new();
    for n in nodes {
        match newest.get(n.node_id.as_str()) {
            Some(cur) if cur.generation >= n.generation => stats.superseded_generations += 1,
            Some(_) => {
                stats.superseded_generations += 1;
                newest.insert(&n.node_id, n);
            }
            None => {
                newest.insert(&n.node_id, n);
            }
        }
    }
    let mut ordered: Vec<&NodeSnapshot> = newest.into_values().collect();
    ordered.sort_by(|a, b| a.node_id.cmp(&b.node_id));

    let mut table = EndpointTable::default();
    for n in ordered {
        let vtep = n
            .key_values
            .iter()
            .find(|(k, _)| k == VTEP_KEY)
            .and_then(|(_, v)| match decode_vtep(v) {
                Ok(ip) if check.vtep_allowed(&n.node_id, ip) => Some(ip),
                Ok(_) => {
                    stats.rejected_vtep += 1;
                    None
                }
                Err(_) => {
                    stats.malformed += 1;
                    None
                }
            });
        if let Some(v) = vtep {
            table.vteps.insert(n.node_id.clone(), v);
        }
        for (k, v) in &n.key_values {
            if !k.starts_with(EP_PREFIX) {
                continue;
            }
            let rec = match EndpointRecord::decode(k, v) {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(_) => {
                    stats.malformed += 1;
                    continue;
                }
            };
            if !check.endpoint_allowed(&n.node_id, &rec) {
                stats.rejected_by_intent += 1;
                continue;
            }
            let Some(vtep) = vtep else {
                stats.no_vtep += 1;
                continue;
            };
            let key = (rec.network, rec.task);
            if table.endpoints.contains_key(&key) {
                // Nodes are visited in id order, so the lowest id already won.
                stats.conflicts += 1;
                continue;
            }
            stats.accepted += 1;
            table.endpoints.insert(
                key,
                TableEntry {
                    node: n.node_id.clone(),
                    vtep,
                    ip: rec.ip,
                    mac: rec.mac,
                    service: rec.service,
                    health: rec.health,
                },
            );
        }
    }
    (table, stats)
}
