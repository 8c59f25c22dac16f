//! Gossip of endpoint tables between the netd of every node (issue 6): chitchat 0.13 over an
//! authenticated, encrypted transport.
//!
//! Layout:
//! - [`crypto`]: the keyring (rotation without a partition) and the sealed frame format with
//!   replay protection. Pure.
//! - [`transport`]: chitchat `Transport` that seals every datagram, over real UDP
//!   ([`transport::UdpNet`]) or an in-process network ([`transport::MemNet`]); counters of
//!   everything dropped.
//! - [`record`]: the compact `ep/<network>/<task>` and `vtep` records. Pure.
//! - [`table`]: the merge from live nodes' states to a validated endpoint table, checked
//!   against intent through a trait. Pure.
//! - [`view`]: the intent check over the real intent, and the live remote endpoints the
//!   projection (`desired::project_with_gossip`) and DNS consume, with the start-up warm-up.
//!   Pure.
//! - [`keyfile`]: the keyring file (`--gossip-key-file`) and how a changed file is applied
//!   to the running keyring (rotation). Pure.
//! - this file: [`GossipConfig`] (→ chitchat's config, failure detector included) and
//!   [`GossipNode`], the handle the daemon holds.
//!
//! Liveness: one operator knob, [`GossipConfig::liveness_bound`]. A node is live while
//! chitchat's phi-accrual detector (set lenient, see [`chitchat_config`]) says so *and* its
//! heartbeat moved within [`stale_after`] (60 % of the bound); only live nodes enter the
//! table, so a dead node's endpoints leave it within the bound and come back with its
//! heartbeats.
//!
//! Deletion: an endpoint that stops is removed with `NodeState::delete` (a versioned tombstone,
//! invisible at once; garbage-collected after [`GossipConfig::tombstone_grace`], and a peer that
//! missed the tombstone's GC is reset from the owner's state by chitchat's `last_gc_version`).
//! Not `delete_after_ttl`: it keeps the value *visible* until the grace period ends, which
//! would keep a stopped task in DNS and the LBs. Only the owner writes its keys, so a deletion
//! made while a peer was away carries a higher version than anything that peer holds and
//! cannot be resurrected by it. A restarted netd is a new chitchat generation that publishes
//! only what runs now; the merge ignores older generations of the same node id.
//!
//! The daemon runs this through `crate::gossip_sync` (start after the first round, seeds from
//! intent, keyring file reloads, warm-up, status) and consumes it through
//! `desired::project_with_gossip` and the DNS views; see ARCHITECTURE.md "Gossip". Measured
//! propagation, cost per node, and where chitchat's full-membership digest stops scaling:
//! docs/gossip-scaling.md.
//!
//! Invariants: nothing received unauthenticated reaches chitchat; nothing gossiped reaches the
//! table unless intent backs it.

pub mod crypto;
pub mod keyfile;
pub mod record;
pub mod table;
pub mod transport;
pub mod view;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, Heartbeat, ProtocolVersion,
};

pub use crypto::{Keyring, KeyringError};
pub use record::{EndpointRecord, Health};
pub use table::{EndpointTable, IntentCheck, MergeStats, NodeSnapshot, TableEntry, merge};
pub use transport::{
    CounterSnapshot, DatagramNet, GossipCounters, MemNet, SealedTransport, TransportConfig, UdpNet,
};

/// Operator configuration of gossip. Defaults in [`GossipConfig::new`].
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_id: String,
    /// Incarnation: must grow across restarts of the same node (e.g. start time in ms).
    pub generation: u64,
    /// Shared by all nodes; a peer with another cluster id is refused by chitchat.
    pub cluster_id: String,
    pub listen_addr: SocketAddr,
    /// What peers use to reach us (usually `listen_addr` on the underlay).
    pub advertise_addr: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub gossip_interval: Duration,
    /// A stopped node's endpoints leave every table within this time.
    pub liveness_bound: Duration,
    /// How long deletions (tombstones) are remembered before GC.
    pub tombstone_grace: Duration,
    /// How many peers a changed endpoint set is pushed to at once (see
    /// [`GossipNode::publish_endpoints`]); 0 leaves changes to the gossip rounds.
    pub push_fanout: usize,
    pub transport: TransportConfig,
}

/// Default [`GossipConfig::push_fanout`]: every peer of a cluster of up to 17 nodes gets a
/// change within a round trip; in a larger one, 16 random peers do and pass it on at their
/// next rounds (each exchange carries a digest of every node, so pushing to all would cost
/// O(nodes²) bytes per change).
pub const PUSH_FANOUT: usize = 16;

impl GossipConfig {
    /// Defaults: gossip every 500 ms, liveness bound 10 s, tombstones kept 1 h.
    pub fn new(node_id: impl Into<String>, generation: u64, listen_addr: SocketAddr) -> Self {
        GossipConfig {
            node_id: node_id.into(),
            generation,
            cluster_id: "swarmnet".into(),
            listen_addr,
            advertise_addr: listen_addr,
            seeds: Vec::new(),
            gossip_interval: Duration::from_millis(500),
            liveness_bound: Duration::from_secs(10),
            tombstone_grace: Duration::from_secs(3600),
            push_fanout: PUSH_FANOUT,
            transport: TransportConfig::default(),
        }
    }
}

/// How long a remote node's heartbeat may stand still before the node counts as dead: 60 %
/// of the liveness bound, leaving the rest for one gossip interval (the watch re-reads the
/// states once per interval), the daemon's 100 ms tick and the reconcile round.
pub fn stale_after(cfg: &GossipConfig) -> Duration {
    cfg.liveness_bound.mul_f64(0.6)
}

/// Chitchat's configuration for `cfg` (pure).
///
/// Phi accrual: chitchat declares a node dead when the time since its last heartbeat
/// increment exceeds `phi_threshold × mean observed increment interval` (seeded with
/// `initial_interval`, weight 5). A node's heartbeat moves once per gossip round and on every
/// message it handles, and an observer learns of it directly or through others, so the mean
/// is below the interval in small clusters and above it in large ones: the detector alone
/// has no fixed bound. Here it is set lenient (`phi = bound / interval`, at least 3, to avoid
/// flapping) and the hard bound comes from [`stale_after`] in
/// [`GossipNode::live_snapshots`]; samples longer than the bound are ignored (`max_interval`).
/// Dead nodes are remembered for the tombstone grace so their state is not re-learned from a
/// lagging peer as new.
pub fn chitchat_config(cfg: &GossipConfig) -> ChitchatConfig {
    let interval = cfg.gossip_interval.max(Duration::from_millis(10));
    let phi = (cfg.liveness_bound.as_secs_f64() / interval.as_secs_f64()).max(3.0);
    ChitchatConfig {
        chitchat_id: ChitchatId::new(cfg.node_id.clone(), cfg.generation, cfg.advertise_addr),
        cluster_id: cfg.cluster_id.clone(),
        gossip_interval: interval,
        listen_addr: cfg.listen_addr,
        seed_nodes: cfg.seeds.iter().map(ToString::to_string).collect(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: phi,
            sampling_window_size: 100,
            max_interval: cfg.liveness_bound,
            initial_interval: interval,
            dead_node_grace_period: cfg.tombstone_grace,
        },
        marked_for_deletion_grace_period: cfg.tombstone_grace,
        catchup_callback: None,
        extra_liveness_predicate: None,
        // V1 compresses the digest (zstd); every netd runs this code, so no V0 peer exists.
        protocol_version: ProtocolVersion::V1,
    }
}

/// What can go wrong starting gossip.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("cannot start chitchat on {addr}")]
    Start {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A running gossip node: the handle the daemon keeps.
pub struct GossipNode {
    handle: ChitchatHandle,
    transport: SealedTransport,
    node_id: String,
    /// Per remote node: the last heartbeat seen and when it was first seen.
    heartbeats: std::sync::Mutex<std::collections::HashMap<ChitchatId, (Heartbeat, Instant)>>,
    /// A node whose heartbeat has not moved for this long is treated as dead (see
    /// [`GossipNode::live_snapshots`]).
    stale_after: Duration,
    push_fanout: usize,
}

impl std::fmt::Debug for GossipNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipNode")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl GossipNode {
    /// Starts chitchat on `net` (use [`UdpNet`] in the daemon) with every datagram sealed
    /// under `keyring`. Must run inside a tokio runtime.
    pub async fn spawn(
        cfg: &GossipConfig,
        keyring: Keyring,
        net: Arc<dyn DatagramNet>,
    ) -> Result<GossipNode, GossipError> {
        Self::spawn_with(cfg, keyring, net, None, &[]).await
    }

    /// [`GossipNode::spawn`] with this node's VTEP and endpoints already in its state, so the
    /// very first exchange carries them: a restarted netd (a new generation, which supersedes
    /// the previous one in every peer's merge) never shows peers an empty node.
    pub async fn spawn_with(
        cfg: &GossipConfig,
        keyring: Keyring,
        net: Arc<dyn DatagramNet>,
        vtep: Option<IpAddr>,
        local: &[EndpointRecord],
    ) -> Result<GossipNode, GossipError> {
        let transport = SealedTransport::new(net, keyring, cfg.transport.clone());
        let initial: Vec<(String, String)> = vtep
            .map(|v| (record::VTEP_KEY.to_string(), record::encode_vtep(v)))
            .into_iter()
            .chain(local.iter().map(|r| (r.key(), r.value())))
            .collect();
        let handle = chitchat::spawn_chitchat(chitchat_config(cfg), initial, &transport)
            .await
            .map_err(|e| GossipError::Start {
                addr: cfg.listen_addr,
                source: e.into(),
            })?;
        Ok(GossipNode {
            handle,
            transport,
            node_id: cfg.node_id.clone(),
            heartbeats: std::sync::Mutex::default(),
            stale_after: stale_after(cfg),
            push_fanout: cfg.push_fanout,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Publishes this node's VTEP (underlay address).
    pub async fn set_vtep(&self, addr: IpAddr) {
        let v = record::encode_vtep(addr);
        self.handle
            .with_chitchat(|c| c.self_node_state().set(record::VTEP_KEY, &v))
            .await;
    }

    /// Makes the published endpoints exactly `local` (the node's live endpoints): new and
    /// changed records are set, absent ones deleted (tombstones). Idempotent; call it after
    /// every reconcile round.
    ///
    /// A change is pushed at once: this node opens an exchange with every peer not known dead
    /// (at most [`GossipConfig::push_fanout`], chosen at random), as
    /// [`GossipNode::gossip_with`]; the peer's reply asks for the versions it lacks, so the new
    /// records reach it within a round trip instead of at this node's next gossip rounds (half
    /// an interval on average, more for peers the random choice skips). Cost: one digest per
    /// peer per change; changes come from task starts, stops and health transitions, never
    /// from heartbeats. Answers how many peers were contacted.
    pub async fn publish_endpoints(&self, local: &[EndpointRecord]) -> usize {
        let want: BTreeMap<String, String> = local.iter().map(|r| (r.key(), r.value())).collect();
        let peers = self
            .handle
            .with_chitchat(|c| {
                let st = c.self_node_state();
                let stale: Vec<String> = st
                    .key_values()
                    .filter(|(k, _)| k.starts_with(record::EP_PREFIX) && !want.contains_key(*k))
                    .map(|(k, _)| k.to_string())
                    .collect();
                let deleted = !stale.is_empty();
                for k in stale {
                    st.delete(&k);
                }
                // Stale keys are gone: what differs now is a missing or changed record.
                let changed = want.iter().any(|(k, v)| st.get(k) != Some(v.as_str()));
                for (k, v) in &want {
                    st.set(k, v);
                }
                if !changed && !deleted {
                    return std::collections::BTreeSet::new();
                }
                // Every known node not declared dead (one still warming up in the failure
                // detector included: it needs the records as much).
                let me = c.self_chitchat_id().clone();
                let dead: Vec<&ChitchatId> = c.dead_nodes().collect();
                c.node_states()
                    .keys()
                    .filter(|id| **id != me && !dead.contains(id))
                    .map(|id| id.gossip_advertise_addr)
                    // A restarted node's previous incarnation shares its address.
                    .collect::<std::collections::BTreeSet<SocketAddr>>()
            })
            .await;
        let mut peers: Vec<SocketAddr> = peers.into_iter().collect();
        if peers.len() > self.push_fanout {
            use rand::seq::SliceRandom as _;
            peers.shuffle(&mut rand::rng());
            peers.truncate(self.push_fanout);
        }
        for addr in &peers {
            self.gossip_with(*addr);
        }
        peers.len()
    }

    /// Snapshots of the live nodes (this one included): those chitchat's failure detector
    /// calls live *and* whose heartbeat moved within [`stale_after`] of this call's view.
    ///
    /// Why both: chitchat's phi detector measures against the observed mean interval between
    /// heartbeat increments, which shrinks in small clusters (a node's heartbeat also moves
    /// on every message it handles) and grows in large ones (news of a node's heartbeat
    /// arrives every few rounds), so on its own it gives no fixed upper bound. The heartbeat
    /// freshness rule does: a node nobody has heard from, directly or through others, for
    /// `stale_after` is out. Call this at least once per gossip interval for the rule to be
    /// precise (the daemon's watch task does).
    pub async fn live_snapshots(&self) -> Vec<NodeSnapshot> {
        let mut live = self
            .handle
            .with_chitchat(|c| {
                let ids: Vec<ChitchatId> = c.live_nodes().cloned().collect();
                ids.into_iter()
                    .filter_map(|id| c.node_state(&id).map(|s| (id.clone(), s.clone())))
                    .collect::<BTreeMap<_, _>>()
            })
            .await;
        let now = Instant::now();
        let mut seen = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|id, _| live.contains_key(id));
        live.retain(|id, state| {
            if &*id.node_id == self.node_id.as_str() {
                return true;
            }
            let hb = state.heartbeat();
            let entry = seen.entry(id.clone()).or_insert((hb, now));
            if entry.0 != hb {
                *entry = (hb, now);
            }
            now.duration_since(entry.1) <= self.stale_after
        });
        drop(seen);
        NodeSnapshot::from_live(&live)
    }

    /// The validated endpoint table of the live nodes, as of now.
    pub async fn table(&self, check: &dyn IntentCheck) -> (EndpointTable, MergeStats) {
        merge(&self.live_snapshots().await, check)
    }

    /// Node ids the failure detector calls live (this one included), sorted.
    pub async fn live_node_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .live_snapshots()
            .await
            .into_iter()
            .map(|s| s.node_id)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A watch that changes when a node joins, leaves or changes its state (not on mere
    /// heartbeats): the daemon wakes its reconciler on it.
    pub async fn watcher(
        &self,
    ) -> tokio::sync::watch::Receiver<BTreeMap<ChitchatId, chitchat::NodeState>> {
        self.handle.with_chitchat(|c| c.live_nodes_watcher()).await
    }

    /// Calls `callback` whenever a key starting with `prefix` is set by any node, as chitchat
    /// applies it (deletions are not notified; the [`GossipNode::watcher`] sees them at the end
    /// of the round). The callback runs under chitchat's lock: it must be quick and must not
    /// call back into this node. Dropping the handle unsubscribes.
    pub async fn subscribe(
        &self,
        prefix: &str,
        callback: impl Fn(chitchat::KeyChangeEvent<'_>) + Send + Sync + 'static,
    ) -> chitchat::ListenerHandle {
        let callback = Arc::new(callback);
        self.handle
            .with_chitchat(|c| {
                let cb = callback.clone();
                c.subscribe_event(prefix, move |e| cb(e))
            })
            .await
    }

    /// Sends one gossip round to `addr` now (a node the intent just added).
    pub fn gossip_with(&self, addr: SocketAddr) {
        if let Err(e) = self.handle.gossip(addr) {
            tracing::warn!(error = %e, %addr, "gossip: cannot reach the chitchat loop");
        }
    }

    /// Nodes the failure detector calls live (this one excluded) and dead.
    pub async fn membership(&self) -> (usize, usize) {
        self.handle
            .with_chitchat(|c| {
                (
                    c.live_nodes().count().saturating_sub(1),
                    c.dead_nodes().count(),
                )
            })
            .await
    }

    /// Transport counters (drops by reason, bytes).
    pub fn counters(&self) -> CounterSnapshot {
        self.transport.counters().snapshot()
    }

    /// The keyring, for rotation.
    pub fn keyring(&self) -> &Keyring {
        self.transport.keyring()
    }

    /// Stops gossiping (peers will declare this node dead within the bound).
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::warn!(error = %e, node = %self.node_id, "gossip: chitchat ended with an error");
        }
    }
}
