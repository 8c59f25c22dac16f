//! Intent from the orchestrator: netd joins the cluster through any manager it is given, then
//! follows that manager's assignment stream (a snapshot of the cluster intent in the
//! intent-file format, then deltas; each stamped with the Raft (term, index) it was read at)
//! and sends heartbeats.
//!
//! - The session keeps the stream's own copy of the intent (its base): a delta is applied only
//!   on top of the exact base it names ([`swarmnet_model::delta`]); a delta on any other base
//!   ends the session, and the next one (to any manager) starts with a snapshot.
//! - Only an assignment newer than the one in force is taken ([`newer`]): a lagging follower or
//!   a deposed leader cannot roll the node back. A stale snapshot still becomes the stream's
//!   base, so that manager's following deltas chain on it.
//! - When a manager stops answering, the next one in the list is tried, round robin, with a
//!   bounded backoff. Meanwhile the data plane stays as it is: nothing is removed because the
//!   managers are unreachable.
//! - The last assignment taken is kept in `<run_dir>/assignment.json` and loaded at start, so a
//!   netd restarted while no manager answers still serves its intent.
//! - The gossip keyring the managers send is written into the gossip key file
//!   ([`FeedConfig::gossip_key_file`]) whenever the one in force changes (a rotation included):
//!   gossip reads that file as it reads an operator's, and re-reads it when it changes.
//!
//! - Every connection is mTLS. The first time, netd trades its join token for a node
//!   certificate (`swarmnet_pki::join`: the manager must present the CA the token pins) and
//!   keeps key, certificate and CA in `<run_dir>/tls/` (0600); later sessions and restarts use
//!   them. The certificate is renewed at half its life over the session's connection;
//!   established connections and the data plane are untouched by a renewal.
//!
//! The daemon loop polls [`AssignmentFeed::poll`] like the intent file; all network work runs
//! on the feed's own thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use swarmnet_api as pb;
use swarmnet_model::delta::{self, SpecDelta, Stamp};
use swarmnet_model::spec::ClusterSpec;
use swarmnet_model::{Intent, NodeId};
use tracing::{info, warn};

/// Where the feed connects and who it says it is.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub node: NodeId,
    pub hostname: String,
    pub addr: std::net::Ipv4Addr,
    pub managers: Vec<String>,
    pub join_token: String,
    /// `<run_dir>/assignment.json`.
    pub state_file: PathBuf,
    /// Where the managers' gossip keyring is written (the gossip key file), if gossip is on.
    pub gossip_key_file: Option<PathBuf>,
}

/// A taken assignment, as kept on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    term: u64,
    index: u64,
    intent: serde_json::Value,
    /// Gossip keys (hex), oldest first.
    keyring: Vec<String>,
    /// Their ids, in the same order.
    #[serde(default)]
    key_ids: Vec<u64>,
}

/// A task's state as this node reports it: (`running` | `failed` | `complete`, message,
/// health: `starting` | `healthy` | `unhealthy`, empty when its service has no check).
pub type TaskReport = (String, String, String);

/// Wakes the daemon loop when the feed took a new intent, so it applies it now instead of at
/// its next tick (on the path of every change: a scale reaches the data plane one tick sooner
/// on the node that runs the task and again on every node when the task turns running).
#[derive(Debug, Default)]
pub struct Wakeup {
    woken: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Wakeup {
    pub fn notify(&self) {
        *self.woken.lock().expect("lock") = true;
        self.cv.notify_all();
    }

    /// Sleeps until [`Wakeup::notify`] or `timeout`, whichever comes first; true if notified
    /// (also by a notification made before the call, since the last wait).
    pub fn wait(&self, timeout: Duration) -> bool {
        let g = self.woken.lock().expect("lock");
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |woken| !*woken)
            .expect("lock");
        std::mem::take(&mut *g)
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// What the node wants the managers to know about its tasks (latest per task).
    reports: std::collections::BTreeMap<swarmnet_model::TaskId, TaskReport>,
    stamp: Option<(u64, u64)>,
    intent: Option<Intent>,
    keyring: Vec<Vec<u8>>,
    key_ids: Vec<u64>,
    generation: u64,
    error: Option<String>,
    /// The current session's stream: its last stamp and intent (the base of its next delta).
    stream: Option<(Stamp, ClusterSpec)>,
    /// Notified when a new intent is taken (the daemon loop waits on it between ticks).
    wake: Arc<Wakeup>,
    /// Notified when the reports change, so the feed sends them at once.
    reported: Arc<tokio::sync::Notify>,
    /// The keys this node's running gossip holds, as the managers name them (`None`: gossip
    /// not running); sent with every heartbeat.
    gossip_keys: Option<pb::GossipKeyState>,
    /// Notified when `gossip_keys` changes: the next heartbeat goes at once (a key rotation
    /// moves on as soon as every node confirms).
    keys_changed: Arc<tokio::sync::Notify>,
    /// The managers as the last heartbeat answer listed them (kept in `<run_dir>/managers.json`
    /// across restarts): followed before the configured ones, so a node keeps reaching the
    /// cluster when the managers it was started with are removed.
    learned: Vec<String>,
}

/// Whether an assignment stamped `incoming` replaces the one stamped `current`.
pub fn newer(current: Option<(u64, u64)>, incoming: (u64, u64)) -> bool {
    current.is_none_or(|c| incoming > c)
}

/// The daemon's handle on the stream.
#[derive(Debug)]
pub struct AssignmentFeed {
    shared: Arc<Mutex<Shared>>,
    delivered: u64,
}

impl AssignmentFeed {
    /// Loads the stored assignment, if any, and starts following the managers.
    pub fn start(cfg: FeedConfig) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        if let Ok(text) = std::fs::read_to_string(managers_file(&cfg))
            && let Ok(learned) = serde_json::from_str::<Vec<String>>(&text)
        {
            shared.lock().expect("lock").learned = learned;
        }
        if let Ok(text) = std::fs::read_to_string(&cfg.state_file)
            && let Ok(stored) = serde_json::from_str::<Stored>(&text)
        {
            let intent = serde_json::from_value(stored.intent.clone())
                .map_err(|e| e.to_string())
                .and_then(|spec| Intent::new(spec).map_err(|e| e.to_string()));
            match intent {
                Ok(intent) => {
                    let mut s = shared.lock().expect("lock");
                    s.stamp = Some((stored.term, stored.index));
                    s.intent = Some(intent);
                    s.keyring = stored.keyring.iter().map(|k| unhex(k)).collect();
                    s.key_ids = stored.key_ids.clone();
                    s.generation = 1;
                    write_key_file(&cfg, &s.key_ids, &s.keyring);
                    info!(
                        term = stored.term,
                        index = stored.index,
                        "loaded the last assignment"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "the stored assignment is invalid; waiting for a manager")
                }
            }
        }
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("assign".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(follow(cfg, thread_shared));
            })
            .expect("spawning the assignment thread");
        Self {
            shared,
            delivered: 0,
        }
    }

    /// A new intent, if one was taken since the last call.
    pub fn poll(&mut self) -> Option<Intent> {
        let s = self.shared.lock().expect("lock");
        if s.generation == self.delivered {
            return None;
        }
        self.delivered = s.generation;
        s.intent.clone()
    }

    /// Why the feed is not following a manager right now (or why it refused an assignment).
    pub fn error(&self) -> Option<String> {
        self.shared.lock().expect("lock").error.clone()
    }

    /// Records the state of this node's tasks; the feed thread sends what changed, at once.
    pub fn set_reports(
        &self,
        reports: std::collections::BTreeMap<swarmnet_model::TaskId, TaskReport>,
    ) {
        let mut s = self.shared.lock().expect("lock");
        if s.reports != reports {
            s.reports = reports;
            s.reported.notify_one();
        }
    }

    /// Records what this node's running gossip holds: `(sealing, accepted)` gossip key ids, or
    /// `None` when gossip is not running. The managers' ids are recovered from the keyring in
    /// force; a key the managers no longer list is left out.
    pub fn set_gossip_keys(&self, running: Option<(u32, Vec<u32>)>) {
        let mut s = self.shared.lock().expect("lock");
        let state = running.map(|(sealing, accepted)| pb::GossipKeyState {
            accepted: s
                .key_ids
                .iter()
                .copied()
                .filter(|id| accepted.contains(&gossip_key_id(*id)))
                .collect(),
            sealing: s
                .key_ids
                .iter()
                .copied()
                .find(|id| gossip_key_id(*id) == sealing)
                .unwrap_or(0),
        });
        if s.gossip_keys != state {
            s.gossip_keys = state;
            s.keys_changed.notify_one();
        }
    }

    /// What the daemon loop waits on between ticks: notified when a new intent was taken.
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.shared.lock().expect("lock").wake.clone()
    }

    /// The gossip keys of the assignment in force, oldest first.
    pub fn keyring(&self) -> Vec<Vec<u8>> {
        self.shared.lock().expect("lock").keyring.clone()
    }
}

/// The gossip key id for a manager's key id: the key file's ids are 32-bit.
pub fn gossip_key_id(id: u64) -> u32 {
    (id ^ (id >> 32)) as u32
}

/// The gossip key file for the managers' keyring (oldest first; the last one seals), or why
/// there is none.
pub fn render_key_file(ids: &[u64], keys: &[Vec<u8>]) -> Result<String, String> {
    use crate::gossip::crypto::KEY_LEN;
    let mut out: Vec<(u32, [u8; KEY_LEN])> = Vec::new();
    for (id, key) in ids.iter().zip(keys) {
        let key: [u8; KEY_LEN] = key
            .as_slice()
            .try_into()
            .map_err(|e| format!("gossip key {id} is {} bytes, not {KEY_LEN}: {e}", key.len()))?;
        let short = gossip_key_id(*id);
        if out.iter().any(|(i, _)| *i == short) {
            return Err(format!("two gossip keys share the id {short}"));
        }
        out.push((short, key));
    }
    let Some((current, _)) = out.last() else {
        return Err("the managers sent no gossip key".into());
    };
    Ok(crate::gossip::keyfile::render(*current, &out))
}

/// Writes the keyring into the gossip key file (atomically, owner-only), if gossip is on.
fn write_key_file(cfg: &FeedConfig, ids: &[u64], keys: &[Vec<u8>]) {
    let Some(path) = &cfg.gossip_key_file else {
        return;
    };
    if keys.is_empty() {
        return;
    }
    let result = render_key_file(ids, keys).and_then(|text| {
        swarmnet_pki::store::write_private(path, &text).map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => {
            info!(path = %path.display(), keys = keys.len(), "gossip keyring from the managers written")
        }
        Err(e) => warn!(error = %e, "cannot write the managers' gossip keyring"),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The reports for this node's tasks after a round: a task whose sandbox is built (status
/// `ok`) is running, with its health; one whose sandbox failed is failed, with the error; one
/// whose process exited is complete (exit 0) or failed, with how it ended; one whose health
/// check turned unhealthy is failed, with the check's last output (the orchestrator then
/// replaces it, as Swarm does).
pub fn task_reports(
    rec: &crate::reconcile::Reconciler,
    node: &NodeId,
) -> std::collections::BTreeMap<swarmnet_model::TaskId, TaskReport> {
    use crate::plan::ObjectKey;
    use crate::reconcile::ObjectState;
    rec.intent()
        .tasks()
        .filter(|(t, _)| &t.node == node)
        .filter_map(|(t, _)| {
            let s = rec.status().get(&ObjectKey::Sandbox(t.id.clone()))?;
            let h = rec.local_health(t);
            let checked = rec
                .intent()
                .service(&t.service)
                .is_some_and(|s| s.health.is_some());
            let health = if checked {
                h.status.as_str().to_string()
            } else {
                String::new()
            };
            let report = match (s.state, h.exit) {
                (ObjectState::Ok, Some(exit)) => exit_report(exit),
                (ObjectState::Ok, None)
                    if checked && h.status == swarmnet_model::spec::HealthStatus::Unhealthy =>
                {
                    let reason = h.check.as_ref().map_or_else(
                        || "unhealthy".to_string(),
                        crate::health::TaskHealth::reason,
                    );
                    ("failed".to_string(), reason)
                }
                (ObjectState::Ok, None) => ("running".to_string(), String::new()),
                (ObjectState::Error, _) => {
                    ("failed".to_string(), s.error.clone().unwrap_or_default())
                }
                (ObjectState::Pending, _) => return None,
            };
            let report = (report.0, report.1, health);
            Some((t.id.clone(), report))
        })
        .collect()
}

/// Where the node's key, certificate and CA are kept: `<run_dir>/tls`.
fn tls_dir(cfg: &FeedConfig) -> PathBuf {
    cfg.state_file
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("tls")
}

/// The node's credentials: from disk, else by joining through `addr` with the token.
async fn credentials(
    cfg: &FeedConfig,
    addr: &str,
) -> Result<Arc<swarmnet_pki::tls::Credentials>, String> {
    let dir = tls_dir(cfg);
    let material = match swarmnet_pki::store::load(&dir).map_err(|e| e.to_string())? {
        Some(m) => m,
        None => {
            let (m, role) = swarmnet_pki::join::request_certificate(
                addr,
                &cfg.join_token,
                cfg.node.as_str(),
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| format!("join refused: {e}"))?;
            swarmnet_pki::store::save(&dir, &m).map_err(|e| e.to_string())?;
            info!(manager = %addr, %role, dir = %dir.display(), "joined: got a node certificate");
            m
        }
    };
    swarmnet_pki::tls::Credentials::new(material).map_err(|e| e.to_string())
}

/// How an exited process is reported.
fn exit_report(exit: crate::port::Exit) -> (String, String) {
    use crate::port::Exit;
    match exit {
        Exit::Code(0) => ("complete".into(), "exit code 0".into()),
        Exit::Code(c) => ("failed".into(), format!("exit code {c}")),
        Exit::Signal(s) => ("failed".into(), format!("killed by signal {s}")),
        Exit::Unknown => (
            "failed".into(),
            "exited while netd was restarting (status unknown)".into(),
        ),
    }
}

/// Where the learned manager addresses are kept.
fn managers_file(cfg: &FeedConfig) -> PathBuf {
    cfg.state_file.with_file_name("managers.json")
}

/// The managers to try, in order: the ones the cluster listed last, then the configured ones,
/// then the manager nodes of the last intent (at the configured managers' port) — the last
/// resort when every manager known by address was replaced before a heartbeat told of the
/// new ones (pure; no address twice).
pub fn manager_order(learned: &[String], configured: &[String], intent: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in learned.iter().chain(configured).chain(intent) {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// `addr:port` of the manager nodes of `intent`, at the port of the first configured manager
/// (4242 when it names none).
fn intent_managers(intent: Option<&Intent>, configured: &[String]) -> Vec<String> {
    let port = configured
        .first()
        .and_then(|a| a.rsplit_once(':'))
        .map_or("4242", |(_, p)| p);
    intent
        .map(|i| {
            i.nodes()
                .filter(|n| n.role == swarmnet_model::spec::NodeRole::Manager)
                .map(|n| format!("{}:{port}", n.addr))
                .collect()
        })
        .unwrap_or_default()
}

/// Records the managers a heartbeat answer listed (on change, persisted).
fn learn_managers(cfg: &FeedConfig, shared: &Arc<Mutex<Shared>>, managers: Vec<String>) {
    if managers.is_empty() {
        return;
    }
    let mut s = shared.lock().expect("lock");
    if s.learned == managers {
        return;
    }
    info!(managers = ?managers, "the cluster's managers changed");
    s.learned = managers;
    let learned = s.learned.clone();
    drop(s);
    let path = managers_file(cfg);
    if let Err(e) = crate::reconcile::persist_json(&path, &learned) {
        warn!(path = %path.display(), error = %e, "cannot keep the managers' addresses");
    }
}

/// Round robin over the managers until the process ends.
async fn follow(cfg: FeedConfig, shared: Arc<Mutex<Shared>>) {
    let mut backoff = Duration::from_millis(100);
    let mut creds: Option<Arc<swarmnet_pki::tls::Credentials>> = None;
    for turn in 0usize.. {
        let order = {
            let s = shared.lock().expect("lock");
            let from_intent = intent_managers(s.intent.as_ref(), &cfg.managers);
            manager_order(&s.learned, &cfg.managers, &from_intent)
        };
        let Some(addr) = order.get(turn % order.len().max(1)) else {
            warn!("no manager address to follow");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        };
        let addr = addr.as_str();
        let c = match &creds {
            Some(c) => Ok(c.clone()),
            None => credentials(&cfg, addr).await,
        };
        let result = match c {
            Ok(c) => {
                creds = Some(c.clone());
                session(&cfg, addr, &shared, &mut backoff, &c).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {}
            Err(e) => {
                warn!(manager = %addr, error = %e, "lost the manager; trying the next one");
                shared.lock().expect("lock").error = Some(format!("manager {addr}: {e}"));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn session(
    cfg: &FeedConfig,
    addr: &str,
    shared: &Arc<Mutex<Shared>>,
    backoff: &mut Duration,
    creds: &Arc<swarmnet_pki::tls::Credentials>,
) -> Result<(), String> {
    let tls = swarmnet_pki::tls::client_config(creds.clone()).map_err(|e| e.to_string())?;
    let channel = swarmnet_pki::net::channel(addr, tls, Duration::from_secs(1))
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut cluster = pb::cluster_client::ClusterClient::new(channel.clone());
    cluster
        .join_node(pb::JoinNodeRequest {
            id: cfg.node.to_string(),
            hostname: cfg.hostname.clone(),
            addr: cfg.addr.to_string(),
            token: cfg.join_token.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("join refused ({:?}): {}", s.code(), s.message()))?;
    let mut dispatcher = pb::dispatcher_client::DispatcherClient::new(channel.clone());
    let mut stream = dispatcher
        .assignments(pb::AssignmentsRequest {
            node_id: cfg.node.to_string(),
        })
        .await
        .map_err(|s| format!("assignments refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    info!(manager = %addr, "following the manager's assignments");
    // A new stream starts from its snapshot.
    shared.lock().expect("lock").stream = None;
    *backoff = Duration::from_millis(100);
    let mut hb = dispatcher.clone();
    let node = cfg.node.to_string();
    let hb_shared = shared.clone();
    let keys_changed = shared.lock().expect("lock").keys_changed.clone();
    let hb_cfg = cfg.clone();
    let heartbeats = async move {
        loop {
            let gossip = hb_shared.lock().expect("lock").gossip_keys.clone();
            let period = match hb
                .heartbeat(pb::HeartbeatRequest {
                    node_id: node.clone(),
                    gossip,
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    learn_managers(&hb_cfg, &hb_shared, r.managers);
                    Duration::from_millis(r.period_ms.max(100))
                }
                Err(s) => return format!("heartbeat failed ({:?}): {}", s.code(), s.message()),
            };
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = keys_changed.notified() => {}
            }
        }
    };
    tokio::pin!(heartbeats);
    // What this session has told the manager; a new session tells everything again.
    let mut told: std::collections::BTreeMap<swarmnet_model::TaskId, TaskReport> =
        Default::default();
    let mut reporter = dispatcher.clone();
    // Reports are sent only when they change, so a short tick costs little; it is on the path
    // of a new task becoming a backend (starting -> running).
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let renewal_channel = channel.clone();
    // When the certificate is next due for renewal (half its life); a deadline, not a sleep
    // per turn, since the other branches wake the loop every 50 ms.
    let next_renewal = |min: Duration| {
        let info = creds.info();
        let wait = swarmnet_pki::ca::renew_at(info.not_before, info.not_after)
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(min);
        tokio::time::Instant::now() + wait
    };
    let mut renewal = next_renewal(Duration::ZERO);
    let reported = shared.lock().expect("lock").reported.clone();
    loop {
        tokio::select! {
            e = &mut heartbeats => return Err(e),
            _ = tokio::time::sleep_until(renewal) => {
                renew(cfg, addr, creds, renewal_channel.clone()).await;
                // After a failure, retry in a second.
                renewal = next_renewal(Duration::from_secs(1));
            }
            _ = async {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = reported.notified() => {}
                }
            } => {
                let want = shared.lock().expect("lock").reports.clone();
                for (task, report) in want {
                    if told.get(&task) == Some(&report) {
                        continue;
                    }
                    let r = reporter
                        .report_task(pb::TaskReport {
                            node_id: cfg.node.to_string(),
                            task_id: task.to_string(),
                            state: report.0.clone(),
                            message: report.1.clone(),
                            health: report.2.clone(),
                        })
                        .await;
                    match r {
                        // A stale report (the task moved or went) is dropped, not retried.
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                        Err(s) => return Err(format!("task report failed ({:?}): {}", s.code(), s.message())),
                    }
                    told.insert(task, report);
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(a)) => take(cfg, shared, a)?,
                Ok(None) => return Err("the stream ended".into()),
                Err(s) => return Err(format!("stream broke ({:?}): {}", s.code(), s.message())),
            },
        }
    }
}

/// Renews the node certificate over the session's channel (half its life has passed); a
/// failure is logged and retried at the next turn (the certificate in force stays valid).
async fn renew(
    cfg: &FeedConfig,
    addr: &str,
    creds: &swarmnet_pki::tls::Credentials,
    channel: tonic::transport::Channel,
) {
    let info = creds.info();
    if std::time::SystemTime::now() < swarmnet_pki::ca::renew_at(info.not_before, info.not_after) {
        return;
    }
    let r = swarmnet_pki::join::renew(channel, addr, &creds.material(), Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())
        .and_then(|m| {
            creds.replace(m.clone()).map_err(|e| e.to_string())?;
            swarmnet_pki::store::save(&tls_dir(cfg), &m).map_err(|e| e.to_string())
        });
    match r {
        Ok(()) => info!(manager = %addr, "renewed the node certificate"),
        Err(e) => {
            warn!(manager = %addr, error = %e, "renewing the node certificate failed; retrying")
        }
    }
}

/// Takes one message of the stream: a snapshot, or a delta on top of the stream's base. The
/// result goes into force if it is newer than what is in force and valid, and is kept on disk.
/// An error means the stream cannot continue (a delta on a base this node does not hold, or
/// one that does not decode): the session ends and the next one starts with a snapshot.
fn take(cfg: &FeedConfig, shared: &Arc<Mutex<Shared>>, a: pb::Assignment) -> Result<(), String> {
    let stamp = (a.term, a.index);
    let mut s = shared.lock().expect("lock");
    s.error = None;
    let spec = if a.delta {
        let base = (a.base_term, a.base_index);
        let d: SpecDelta = serde_json::from_slice(&a.delta_json)
            .map_err(|e| format!("delta ({}, {}) does not decode: {e}", a.term, a.index))?;
        let Some((held, mut spec)) = s.stream.take() else {
            return Err("a delta before any snapshot; resynchronizing".into());
        };
        if held != base {
            return Err(format!(
                "a delta on base {base:?} while this node holds {held:?}; resynchronizing"
            ));
        }
        delta::apply(&mut spec, &d);
        spec
    } else {
        match serde_json::from_slice::<ClusterSpec>(&a.intent_json) {
            Ok(spec) => spec,
            Err(e) => {
                s.stream = None;
                warn!(term = a.term, index = a.index, error = %e, "assignment refused; the previous intent stays in force");
                s.error = Some(format!("assignment ({}, {}) refused: {e}", a.term, a.index));
                return Ok(());
            }
        }
    };
    s.stream = Some((stamp, spec.clone()));
    if !newer(s.stamp, stamp) {
        return Ok(());
    }
    match Intent::new(spec.clone()) {
        Ok(intent) => {
            s.stamp = Some(stamp);
            s.intent = Some(intent);
            let keyring: Vec<Vec<u8>> = a.keyring.iter().map(|k| k.key.clone()).collect();
            let key_ids: Vec<u64> = a.keyring.iter().map(|k| k.id).collect();
            if keyring != s.keyring || key_ids != s.key_ids {
                write_key_file(cfg, &key_ids, &keyring);
            }
            s.keyring = keyring;
            s.key_ids = key_ids;
            s.generation += 1;
            s.wake.notify();
            let stored = Stored {
                term: a.term,
                index: a.index,
                intent: serde_json::to_value(&spec).unwrap_or(serde_json::Value::Null),
                keyring: s.keyring.iter().map(|k| hex(k)).collect(),
                key_ids: s.key_ids.clone(),
            };
            if let Err(e) = crate::reconcile::persist_json(&cfg.state_file, &stored) {
                warn!(error = %e, "cannot keep the assignment on disk");
            }
        }
        Err(e) => {
            warn!(term = a.term, index = a.index, error = %e, "assignment refused; the previous intent stays in force");
            s.error = Some(format!("assignment ({}, {}) refused: {e}", a.term, a.index));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_managers_come_first_then_the_configured_ones() {
        let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(manager_order(&[], &s(&["a:1"]), &[]), s(&["a:1"]));
        assert_eq!(
            manager_order(
                &s(&["b:1", "a:1"]),
                &s(&["a:1", "c:1"]),
                &s(&["d:1", "b:1"])
            ),
            s(&["b:1", "a:1", "c:1", "d:1"])
        );
        // The intent's manager nodes, at the configured port.
        let intent = Intent::from_json(
            r#"{"version":1,"nodes":[{"id":"n1","addr":"198.18.0.1","role":"manager"},{"id":"n2","addr":"198.18.0.2"}]}"#,
        )
        .unwrap();
        assert_eq!(
            intent_managers(Some(&intent), &s(&["198.18.0.9:5000"])),
            s(&["198.18.0.1:5000"])
        );
        assert_eq!(intent_managers(None, &[]), Vec::<String>::new());
    }

    #[test]
    fn only_newer_stamps_replace() {
        assert!(newer(None, (1, 1)));
        assert!(newer(Some((1, 5)), (1, 6)));
        assert!(newer(Some((1, 5)), (2, 6)));
        assert!(!newer(Some((1, 5)), (1, 5)), "a repeat is not new");
        assert!(!newer(Some((2, 9)), (2, 8)), "a lagging follower");
        assert!(!newer(Some((3, 9)), (2, 12)), "a deposed leader's term");
    }

    fn cfg(dir: &std::path::Path) -> FeedConfig {
        FeedConfig {
            node: NodeId::new("n1").unwrap(),
            hostname: "n1".into(),
            addr: "198.18.0.1".parse().unwrap(),
            // Nothing listens here: the feed keeps retrying and never delivers.
            managers: vec!["127.0.0.1:1".into()],
            join_token: "t".into(),
            state_file: dir.join("assignment.json"),
            gossip_key_file: Some(dir.join("gossip-keys.toml")),
        }
    }

    fn assignment(term: u64, index: u64, nodes: &[&str]) -> pb::Assignment {
        let spec = serde_json::json!({
            "version": 1,
            "nodes": nodes.iter().enumerate().map(|(i, n)| serde_json::json!({"id": n, "addr": format!("198.18.0.{}", i + 1)})).collect::<Vec<_>>(),
        });
        pb::Assignment {
            term,
            index,
            intent_json: serde_json::to_vec(&spec).unwrap(),
            keyring: vec![pb::GossipKey {
                id: 1,
                key: vec![7; 32],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_taken_assignment_wakes_the_daemon_and_a_stale_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let feed = AssignmentFeed::start(c.clone());
        let wake = feed.wakeup();
        // Nothing taken: the wait runs out.
        assert!(!wake.wait(Duration::from_millis(20)));
        // Taken from another thread while the daemon waits: the wait ends early.
        let shared = feed.shared.clone();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            take(&c2, &shared, assignment(2, 10, &["n1"])).unwrap();
        });
        let started = std::time::Instant::now();
        assert!(
            wake.wait(Duration::from_secs(60)),
            "woken by the assignment"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        t.join().unwrap();
        // A stale one (older stamp) is not news: no wakeup.
        take(&c, &feed.shared, assignment(1, 20, &["n1"])).unwrap();
        assert!(!wake.wait(Duration::from_millis(20)));
    }

    #[test]
    fn changed_reports_notify_the_sender_and_unchanged_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let feed = AssignmentFeed::start(cfg(dir.path()));
        let reported = feed.shared.lock().unwrap().reported.clone();
        let report = std::collections::BTreeMap::from([(
            swarmnet_model::TaskId::new("t1").unwrap(),
            ("running".to_string(), String::new(), String::new()),
        )]);
        feed.set_reports(report.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let notified = |n: &Arc<tokio::sync::Notify>| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(50), n.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(notified(&reported), "a change is sent at once");
        feed.set_reports(report);
        assert!(
            !notified(&reported),
            "the same reports again: nothing to send"
        );
    }

    /// The keys the running gossip holds are told to the managers by their manager ids (a key
    /// they no longer list is left out), and only a change sends a heartbeat early.
    #[test]
    fn running_gossip_keys_are_reported_by_manager_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let feed = AssignmentFeed::start(c.clone());
        let mut a = assignment(2, 10, &["n1"]);
        // During a rotation: key 5 accepted only (first), key 1 seals (last).
        a.keyring.insert(
            0,
            pb::GossipKey {
                id: 5,
                key: vec![9; 32],
            },
        );
        take(&c, &feed.shared, a).unwrap();
        let changed = feed.shared.lock().unwrap().keys_changed.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let notified = || {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(50), changed.notified())
                    .await
                    .is_ok()
            })
        };
        let g = gossip_key_id;
        // The running keyring also still holds a key the managers dropped (id 77).
        feed.set_gossip_keys(Some((g(1), vec![g(77), g(5), g(1)])));
        assert!(notified(), "a change sends a heartbeat at once");
        let state = feed.shared.lock().unwrap().gossip_keys.clone().unwrap();
        assert_eq!(state.accepted, vec![5, 1]);
        assert_eq!(state.sealing, 1);
        feed.set_gossip_keys(Some((g(1), vec![g(77), g(5), g(1)])));
        assert!(!notified(), "unchanged: nothing early");
        feed.set_gossip_keys(None);
        assert!(notified());
        assert!(feed.shared.lock().unwrap().gossip_keys.is_none());
    }

    #[test]
    fn stale_and_invalid_assignments_are_ignored_and_the_last_one_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let mut feed = AssignmentFeed::start(c.clone());
        assert!(feed.poll().is_none());
        take(&c, &feed.shared, assignment(2, 10, &["n1", "n2"])).unwrap();
        assert_eq!(feed.poll().unwrap().nodes().count(), 2);
        assert!(feed.poll().is_none(), "delivered once");
        // Older: ignored.
        take(&c, &feed.shared, assignment(1, 20, &["n1"])).unwrap();
        take(&c, &feed.shared, assignment(2, 9, &["n1"])).unwrap();
        assert!(feed.poll().is_none());
        // Newer but invalid: refused with the reason, the previous intent stays.
        let mut bad = assignment(2, 11, &["n1"]);
        bad.intent_json = br#"{"version": 7}"#.to_vec();
        take(&c, &feed.shared, bad).unwrap();
        assert!(feed.poll().is_none());
        assert!(
            feed.error()
                .unwrap()
                .contains("unsupported format version 7")
        );
        take(&c, &feed.shared, assignment(3, 12, &["n1", "n2", "n3"])).unwrap();
        assert_eq!(feed.poll().unwrap().nodes().count(), 3);
        assert_eq!(feed.keyring(), vec![vec![7u8; 32]]);
        // The keyring is in the gossip key file, as gossip reads it.
        let file = std::fs::read_to_string(dir.path().join("gossip-keys.toml")).unwrap();
        let keys = crate::gossip::keyfile::KeyFile::parse(&file).unwrap();
        assert_eq!(keys.ids(), vec![gossip_key_id(1)]);
        assert_eq!(keys.current, gossip_key_id(1));
        // A new netd with no reachable manager starts from what was kept.
        let mut again = AssignmentFeed::start(c.clone());
        assert_eq!(again.poll().unwrap().nodes().count(), 3);
        take(&c, &again.shared, assignment(3, 12, &["n1"])).unwrap();
        assert!(again.poll().is_none(), "the stored stamp is in force");
    }

    fn delta(base: (u64, u64), stamp: (u64, u64), old: &[&str], new: &[&str]) -> pb::Assignment {
        let spec = |nodes: &[&str]| -> ClusterSpec {
            serde_json::from_slice(&assignment(0, 0, nodes).intent_json).unwrap()
        };
        let d = delta::diff(&spec(old), &spec(new));
        pb::Assignment {
            term: stamp.0,
            index: stamp.1,
            keyring: vec![],
            delta: true,
            base_term: base.0,
            base_index: base.1,
            delta_json: serde_json::to_vec(&d).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn deltas_apply_only_on_their_base_and_a_stale_snapshot_is_still_the_streams_base() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let mut feed = AssignmentFeed::start(c.clone());
        // Before any snapshot a delta cannot be applied.
        assert!(
            take(
                &c,
                &feed.shared,
                delta((1, 1), (1, 2), &["n1"], &["n1", "n2"])
            )
            .is_err()
        );
        take(&c, &feed.shared, assignment(1, 5, &["n1"])).unwrap();
        assert_eq!(feed.poll().unwrap().nodes().count(), 1);
        take(
            &c,
            &feed.shared,
            delta((1, 5), (1, 6), &["n1"], &["n1", "n2"]),
        )
        .unwrap();
        let intent = feed.poll().unwrap();
        assert_eq!(intent.nodes().count(), 2);
        assert!(
            feed.keyring().is_empty(),
            "the delta's keyring is the one in force"
        );
        // A delta on another base (a message was lost): the session must resynchronize.
        let e = take(&c, &feed.shared, delta((1, 5), (1, 7), &["n1"], &["n1"])).unwrap_err();
        assert!(e.contains("resynchronizing"), "{e}");
        assert!(feed.poll().is_none(), "nothing changed in force");
        // A lagging manager's session: its snapshot is older than what is in force (ignored),
        // but its deltas chain on it and go into force once they are newer.
        take(&c, &feed.shared, assignment(1, 4, &["n1"])).unwrap();
        assert!(feed.poll().is_none());
        take(
            &c,
            &feed.shared,
            delta((1, 4), (1, 6), &["n1"], &["n1", "n3"]),
        )
        .unwrap();
        assert!(feed.poll().is_none(), "(1, 6) is already in force");
        take(
            &c,
            &feed.shared,
            delta((1, 6), (1, 8), &["n1", "n3"], &["n1", "n2", "n3"]),
        )
        .unwrap();
        assert_eq!(feed.poll().unwrap().nodes().count(), 3);
        // What is in force survives a restart.
        let mut again = AssignmentFeed::start(c.clone());
        assert_eq!(again.poll().unwrap().nodes().count(), 3);
    }
}
