//! Runs gossip for the daemon and keeps the reconciler's view of live remote endpoints in step
//! with it (the effectful shell around `gossip::{table, view}`).
//!
//! - Start: after the first round of the first valid intent that places this node, so the
//!   node's VTEP and running endpoints are in its chitchat state from the first exchange
//!   (`GossipNode::spawn_with`). The socket binds `<advertise address>:<gossip port>` in the
//!   node namespace (netd's own); seeds are the other nodes' addresses from the intent, and a
//!   node the intent adds later is contacted at once. A failed start (address not up yet) is
//!   retried every second and shown in status; meanwhile the intent alone is used.
//! - Runtime: one tokio runtime with one worker thread. A task there re-reads the live nodes'
//!   states when chitchat's membership watch fires (once per round at most: joins, deaths,
//!   version changes, deletions included) or a key listener sees an endpoint or VTEP record
//!   applied (at once), and publishes the snapshot with a version number.
//! - Daemon tick (100 ms): [`GossipSync::tick`] merges a new snapshot (or the same one under
//!   a new intent) against the intent, and hands the resulting `RemoteLive` to the reconciler;
//!   when it changed, the daemon runs an incremental round and syncs DNS in the same tick.
//! - Publish: after each round, [`GossipSync::publish`] writes the node's running endpoints
//!   when they changed (only changed keys are written; stopped ones become tombstones).
//! - Keyring: the key file is re-read when its stamp changes (checked every second); a bad
//!   file is refused with the previous keyring kept, and the error shown in status.
//! - Warm-up: for one liveness bound after the start, remote nodes not yet heard from are
//!   trusted from intent (see `gossip::view`): a netd restart never blackholes remote
//!   backends, and nothing the intent does not hold is ever added.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use swarmnet_model::NodeId;
use tracing::{info, warn};

use crate::assign::Wakeup;
use crate::config::GossipSettings;
use crate::gossip::keyfile::KeyFile;
use crate::gossip::record::{EP_PREFIX, VTEP_KEY};
use crate::gossip::view::{IntentChecker, RemoteLive};
use crate::gossip::{
    CounterSnapshot, EndpointRecord, GossipConfig, GossipNode, MergeStats, NodeSnapshot, UdpNet,
    merge,
};
use crate::reconcile::Reconciler;

/// How often the key file's stamp is looked at.
const KEY_CHECK: Duration = Duration::from_secs(1);
/// Largest gossip frame: 1500 − IPv4 20 − UDP 8, rounded down.
const MAX_FRAME: usize = 1400;
/// How long after a failed start the next attempt comes.
const START_RETRY: Duration = Duration::from_secs(1);

/// What the gossip task shares with the daemon thread.
#[derive(Default)]
struct Shared {
    version: AtomicU64,
    snaps: Mutex<Arc<Vec<NodeSnapshot>>>,
    live: AtomicUsize,
    dead: AtomicUsize,
}

struct Running {
    rt: tokio::runtime::Runtime,
    node: Arc<GossipNode>,
    shared: Arc<Shared>,
    _listeners: Vec<chitchat::ListenerHandle>,
    listen: SocketAddr,
    generation: u64,
    started: Instant,
}

/// Gossip status in `status.json`.
#[derive(Debug, Serialize)]
pub struct GossipStatus {
    pub listen: Option<String>,
    pub generation: Option<u64>,
    pub start_error: Option<String>,
    pub key_file: String,
    pub key_error: Option<String>,
    pub sealing_key: Option<u32>,
    pub accepted_keys: Vec<u32>,
    /// Remote nodes not yet heard from are still trusted from intent.
    pub warming_up: bool,
    pub peers_live: usize,
    pub peers_dead: usize,
    /// Validated endpoints in the merged table (this node's included).
    pub table_endpoints: usize,
    pub published_endpoints: usize,
    /// Exchanges opened to push changed endpoints to the live peers at once.
    pub pushes: u64,
    /// The last merge: records accepted, and ignored by reason (forged or stale records are
    /// `rejected_by_intent`).
    pub merge: MergeStats,
    /// Datagrams refused by reason, bytes sent and received.
    pub transport: CounterSnapshot,
}

/// The daemon's gossip: started lazily, ticked every daemon tick.
pub struct GossipSync {
    node_id: NodeId,
    settings: GossipSettings,
    keys: KeyFile,
    key_stamp: Option<(Option<SystemTime>, u64, u64)>,
    key_error: Option<String>,
    next_key_check: Instant,
    running: Option<Running>,
    start_error: Option<String>,
    next_start: Instant,
    seen_version: u64,
    merged_intent: u64,
    was_warming: bool,
    heard: BTreeSet<NodeId>,
    contacted: BTreeSet<SocketAddr>,
    stats: MergeStats,
    table_size: usize,
    published: Option<Vec<EndpointRecord>>,
    /// Woken when gossip holds a new view, so the daemon merges it now, not at its next tick.
    wake: Arc<Wakeup>,
    /// See [`GossipSync::key_generation`].
    key_generation: u64,
    /// Exchanges opened to push this node's changed endpoints (see `publish_endpoints`).
    pushes: u64,
}

impl std::fmt::Debug for GossipSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipSync")
            .field("node", &self.node_id)
            .field("running", &self.running.is_some())
            .finish()
    }
}

fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), m.ino()))
}

fn read_keys(path: &Path) -> Result<KeyFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the gossip key file {}: {e}", path.display()))?;
    KeyFile::parse(&text).map_err(|e| format!("gossip key file {}: {e}", path.display()))
}

impl GossipSync {
    /// Reads the key file (an unreadable or invalid one is an error: netd refuses to start
    /// rather than run a cluster half without gossip).
    /// `wake` is woken whenever gossip's view of the live nodes changes.
    pub fn new(
        node_id: NodeId,
        settings: GossipSettings,
        wake: Arc<Wakeup>,
    ) -> anyhow::Result<Self> {
        let keys = read_keys(&settings.key_file).map_err(anyhow::Error::msg)?;
        let now = Instant::now();
        Ok(GossipSync {
            node_id,
            key_stamp: stamp(&settings.key_file),
            settings,
            keys,
            key_error: None,
            next_key_check: now + KEY_CHECK,
            running: None,
            start_error: None,
            next_start: now,
            seen_version: 0,
            merged_intent: 0,
            was_warming: false,
            heard: BTreeSet::new(),
            contacted: BTreeSet::new(),
            stats: MergeStats::default(),
            table_size: 0,
            published: None,
            wake,
            pushes: 0,
            key_generation: 0,
        })
    }

    /// Moves whenever the running keyring may have changed (gossip started, key file applied):
    /// 0 before gossip runs. The daemon tells the managers the keys only when it moves.
    pub fn key_generation(&self) -> u64 {
        self.key_generation
    }

    /// The key file this node reads.
    pub fn key_file(&self) -> &PathBuf {
        &self.settings.key_file
    }

    /// One daemon tick: start if due, reload keys, contact new nodes, and refresh the
    /// reconciler's view of live remote endpoints. True when that view changed (a round is due).
    pub fn tick(&mut self, rec: &mut Reconciler, now: Instant) -> bool {
        if self.running.is_none() {
            if rec.round_number() == 0 || rec.desired().is_none() || now < self.next_start {
                return false;
            }
            self.start(rec, now);
            if self.running.is_none() {
                return false;
            }
        }
        if now >= self.next_key_check {
            self.next_key_check = now + KEY_CHECK;
            self.reload_keys();
        }
        let Some(run) = &self.running else {
            return false;
        };
        // Nodes the intent added since: contact them now rather than wait to hear of them.
        let port = self.settings.port;
        for n in rec.intent().nodes().filter(|n| n.id != self.node_id) {
            let addr = SocketAddr::new(IpAddr::V4(n.addr), port);
            if self.contacted.insert(addr) {
                run.node.gossip_with(addr);
            }
        }
        let version = run.shared.version.load(Ordering::Acquire);
        let warming = now < run.started + self.settings.liveness_bound;
        if version == self.seen_version
            && rec.intent_generation() == self.merged_intent
            && warming == self.was_warming
        {
            return false;
        }
        self.seen_version = version;
        self.merged_intent = rec.intent_generation();
        if self.was_warming && !warming {
            info!("gossip: warm-up over; remote endpoints now follow gossip alone");
        }
        self.was_warming = warming;
        let snaps = run
            .shared
            .snaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (table, stats) = merge(
            &snaps,
            &IntentChecker {
                intent: rec.intent(),
            },
        );
        if stats.rejected_by_intent > self.stats.rejected_by_intent
            || stats.rejected_vtep > self.stats.rejected_vtep
        {
            warn!(
                rejected = stats.rejected_by_intent,
                rejected_vtep = stats.rejected_vtep,
                "gossip: records the intent does not back are ignored (forged or stale)"
            );
        }
        self.stats = stats;
        self.table_size = table.endpoints.len();
        let view_warming = if warming {
            self.heard.extend(
                snaps
                    .iter()
                    .filter_map(|s| NodeId::new(s.node_id.as_str()).ok())
                    .filter(|n| *n != self.node_id),
            );
            Some(self.heard.clone())
        } else {
            None
        };
        rec.set_remote_live(Some(RemoteLive::from_table(&table, view_warming)))
    }

    fn start(&mut self, rec: &Reconciler, now: Instant) {
        self.next_start = now + START_RETRY;
        let Some(me) = rec.intent().node(&self.node_id) else {
            return;
        };
        let listen = SocketAddr::new(IpAddr::V4(me.addr), self.settings.port);
        let seeds: Vec<SocketAddr> = rec
            .intent()
            .nodes()
            .filter(|n| n.id != self.node_id)
            .map(|n| SocketAddr::new(IpAddr::V4(n.addr), self.settings.port))
            .collect();
        // The generation must grow across restarts of this node: its start time in ms.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let mut cfg = GossipConfig::new(self.node_id.as_str(), generation, listen);
        cfg.seeds = seeds.clone();
        cfg.gossip_interval = self.settings.interval;
        cfg.liveness_bound = self.settings.liveness_bound;
        // One frame per IP packet on a 1500-byte underlay: the sealed transport fragments
        // large envelopes itself (IP fragments are lost whole when one piece is dropped).
        cfg.transport.max_datagram = MAX_FRAME;
        let local = rec.local_endpoints();
        let keyring = match self.keys.keyring() {
            Ok(k) => k,
            Err(e) => {
                self.start_error = Some(e.to_string());
                return;
            }
        };
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gossip")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                self.start_error = Some(format!("cannot start the gossip runtime: {e}"));
                return;
            }
        };
        let spawned = rt.block_on(GossipNode::spawn_with(
            &cfg,
            keyring,
            Arc::new(UdpNet),
            Some(IpAddr::V4(me.addr)),
            &local,
        ));
        let node = match spawned {
            Ok(n) => Arc::new(n),
            Err(e) => {
                let msg = format!("{e}: {}", error_chain(&e));
                if self.start_error.as_deref() != Some(&msg) {
                    warn!(error = %msg, "gossip: cannot start; retrying every second (intent alone meanwhile)");
                }
                self.start_error = Some(msg);
                return;
            }
        };
        let shared = Arc::new(Shared::default());
        let notify = Arc::new(tokio::sync::Notify::new());
        let mut listeners = Vec::new();
        for prefix in [EP_PREFIX, VTEP_KEY] {
            let n = notify.clone();
            listeners.push(rt.block_on(node.subscribe(prefix, move |_| n.notify_one())));
        }
        rt.spawn(watch_states(
            node.clone(),
            shared.clone(),
            notify,
            self.settings.interval,
            self.wake.clone(),
        ));
        self.key_generation += 1;
        info!(%listen, generation, seeds = seeds.len(), endpoints = local.len(), "gossip started");
        self.contacted.extend(seeds);
        self.published = Some(local);
        self.start_error = None;
        self.was_warming = true;
        self.running = Some(Running {
            rt,
            node,
            shared,
            _listeners: listeners,
            listen,
            generation,
            started: now,
        });
    }

    fn reload_keys(&mut self) {
        let now = stamp(&self.settings.key_file);
        if now == self.key_stamp {
            return;
        }
        self.key_stamp = now;
        let applied = read_keys(&self.settings.key_file).and_then(|k| {
            if let Some(run) = &self.running {
                k.apply(run.node.keyring()).map_err(|e| {
                    format!("gossip key file {}: {e}", self.settings.key_file.display())
                })?;
            }
            Ok(k)
        });
        match applied {
            Ok(k) => {
                info!(current = k.current, keys = ?k.ids(), "gossip keyring reloaded");
                self.keys = k;
                self.key_error = None;
                self.key_generation += 1;
            }
            Err(e) => {
                warn!(error = %e, "gossip key file refused; the previous keyring stays in force");
                self.key_error = Some(e);
            }
        }
    }

    /// Publishes the node's running endpoints if they changed since the last publish.
    pub fn publish(&mut self, rec: &Reconciler) {
        let Some(run) = &self.running else { return };
        let local = rec.local_endpoints();
        if self.published.as_ref() == Some(&local) {
            return;
        }
        let pushed = run.rt.block_on(run.node.publish_endpoints(&local));
        self.pushes += pushed as u64;
        self.published = Some(local);
    }

    /// The running keyring: (sealing id, accepted ids), or `None` before gossip started.
    pub fn running_keys(&self) -> Option<(u32, Vec<u32>)> {
        let ring = self.running.as_ref()?.node.keyring();
        Some((ring.sealing_id(), ring.ids()))
    }

    pub fn status(&self) -> GossipStatus {
        let run = self.running.as_ref();
        let ring = run.map(|r| r.node.keyring());
        GossipStatus {
            listen: run.map(|r| r.listen.to_string()),
            generation: run.map(|r| r.generation),
            start_error: self.start_error.clone(),
            key_file: self.settings.key_file.display().to_string(),
            key_error: self.key_error.clone(),
            sealing_key: ring.map(|k| k.sealing_id()),
            accepted_keys: ring.map(|k| k.ids()).unwrap_or_default(),
            warming_up: self.was_warming,
            peers_live: run.map_or(0, |r| r.shared.live.load(Ordering::Relaxed)),
            peers_dead: run.map_or(0, |r| r.shared.dead.load(Ordering::Relaxed)),
            table_endpoints: self.table_size,
            published_endpoints: self.published.as_ref().map_or(0, Vec::len),
            pushes: self.pushes,
            merge: self.stats,
            transport: run.map(|r| r.node.counters()).unwrap_or_default(),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    out.join(": ")
}

/// Re-reads the live nodes' states whenever chitchat's membership watch fires or an endpoint
/// record is applied, and publishes them when they differ from the last snapshot. Also
/// refreshes the membership counts once per gossip interval.
async fn watch_states(
    node: Arc<GossipNode>,
    shared: Arc<Shared>,
    notify: Arc<tokio::sync::Notify>,
    interval: Duration,
    wake: Arc<Wakeup>,
) {
    let mut watch = node.watcher().await;
    loop {
        let snaps = node.live_snapshots().await;
        let (live, dead) = node.membership().await;
        shared.live.store(live, Ordering::Relaxed);
        shared.dead.store(dead, Ordering::Relaxed);
        {
            let mut cur = shared.snaps.lock().unwrap_or_else(|e| e.into_inner());
            if **cur != snaps {
                *cur = Arc::new(snaps);
                shared.version.fetch_add(1, Ordering::Release);
                wake.notify();
            }
        }
        tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    return; // chitchat stopped
                }
            }
            () = notify.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}
