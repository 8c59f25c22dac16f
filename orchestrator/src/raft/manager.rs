//! One manager: an openraft node over the redb store, plus what the leader alone does (turning
//! missed node heartbeats into `SetNodeStatus`, firing rolling-update timers).
//!
//! Writes enter through [`Manager::write`] on any manager: a follower forwards them to the
//! leader over the internal `Raft.Forward` call. A write is acknowledged only once committed by
//! a quorum and applied. Without a leader, or without a quorum, it fails within
//! `write_timeout` with [`WriteError::NoQuorum`], never hangs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState};
use serde::{Deserialize, Serialize};
use swarmnet_model::NodeId;
use tokio::sync::watch;

use super::network::{Network, channel};
use super::store::{self, SharedState};
use super::{CommandResult, ManagerId, TypeConfig};
use crate::pb;
use crate::state::{Command, CommandError, GossipKey, KeyAck, NodeStatus, Response, UpdateState};

/// A manager's settings. Defaults in [`ManagerConfig::new`].
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub id: ManagerId,
    /// `host:port` other managers and clients reach this one at.
    pub advertise: String,
    /// Holds `manager.redb`.
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    /// How long a write may wait for a leader and a quorum.
    pub write_timeout: Duration,
    /// Nodes are told to heartbeat this often.
    pub node_heartbeat_period: Duration,
    /// A node silent this long is marked down and its tasks go elsewhere.
    pub node_down_after: Duration,
    /// Lifetime of the node certificates this manager issues (renewed at half of it).
    pub cert_lifetime: Duration,
    /// How long a removed task drains (out of every node's load balancers and DNS, still
    /// running) before the leader stops it. It must cover the time every node needs to apply
    /// an assignment (a few hundred ms; see bench/intent.sh), with a wide margin for loaded
    /// nodes: a timer rather than per-node acks, so a silent node can never hold a task (and
    /// its addresses) forever, and the removal time is bounded and known.
    pub task_stop_grace: Duration,
    /// The leader starts a gossip key rotation when the primary key is this old (`None`:
    /// only on request).
    pub gossip_key_rotation: Option<Duration>,
}

/// Default [`ManagerConfig::gossip_key_rotation`]: Swarm's network key rotation period.
pub const GOSSIP_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);

impl ManagerConfig {
    pub fn new(id: ManagerId, advertise: String, data_dir: PathBuf) -> Self {
        Self {
            id,
            advertise,
            data_dir,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(3),
            node_heartbeat_period: Duration::from_secs(1),
            node_down_after: Duration::from_secs(5),
            cert_lifetime: swarmnet_pki::ca::DEFAULT_NODE_LIFETIME,
            task_stop_grace: Duration::from_secs(3),
            gossip_key_rotation: Some(GOSSIP_KEY_ROTATION),
        }
    }
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The command was applied and refused by the state machine.
    #[error(transparent)]
    Refused(#[from] CommandError),
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// What a follower hands the leader.
#[derive(Debug, Serialize, Deserialize)]
pub enum Forwarded {
    Write(Command),
    Heartbeat {
        node: NodeId,
        /// What the node's running gossip holds (`None`: its gossip is not running).
        #[serde(default)]
        gossip: Option<KeyAck>,
    },
    AddManager {
        id: ManagerId,
        addr: String,
    },
    RemoveManager {
        id: ManagerId,
    },
}

/// The answer to a forwarded request.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardReply {
    /// The result and the log index it was committed at.
    Applied(CommandResult, u64),
    /// A membership change failed.
    Failed(String),
    /// The receiver is not the leader (any more): try again.
    NotLeader,
    Done,
}

pub struct Manager {
    pub id: ManagerId,
    pub raft: Raft<TypeConfig>,
    pub state: SharedState,
    pub config: ManagerConfig,
    /// This manager's certificate and the TLS configurations built on it.
    pub tls: crate::ca::ManagerTls,
    /// Last heartbeat per node, as seen by this manager while leader.
    heartbeats: Mutex<HashMap<NodeId, Instant>>,
    /// The gossip keys each node said it holds in its last heartbeat to this leader.
    key_acks: Mutex<HashMap<NodeId, Option<KeyAck>>>,
    /// When this manager last became leader (heartbeat grace starts then).
    leader_since: Mutex<Option<Instant>>,
    forward_clients: Mutex<HashMap<String, pb::raft_client::RaftClient<tonic::transport::Channel>>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("id", &self.id)
            .field("advertise", &self.config.advertise)
            .finish_non_exhaustive()
    }
}

/// Why a manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::OpenError),
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error("raft did not start: {0}")]
    Raft(String),
}

impl Manager {
    /// Opens the store and starts Raft. A fresh manager waits to be initialized
    /// ([`Manager::bootstrap`]) or added by another one.
    pub async fn start(
        config: ManagerConfig,
        tls: crate::ca::ManagerTls,
    ) -> Result<Arc<Self>, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let path = config.data_dir.join("manager.redb");
        // A manager stopped in this same process releases its database only when openraft's
        // last task has dropped the store, which can trail `shutdown` a little.
        let mut tries = 0;
        let (log, sm, state) = loop {
            match store::open(&path) {
                Err(store::OpenError::Database { source, .. })
                    if matches!(*source, redb::Error::DatabaseAlreadyOpen) && tries < 50 =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => break r?,
            }
        };
        // The state holds the cluster's root CA key: readable by root only.
        {
            use std::os::unix::fs::PermissionsExt;
            for (p, mode) in [(&config.data_dir, 0o700), (&path, 0o600)] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(
                    |source| StartError::DataDir {
                        path: p.display().to_string(),
                        source,
                    },
                )?;
            }
        }
        let election = config.election_timeout.as_millis() as u64;
        let raft_config = Config {
            cluster_name: "swarmnet".into(),
            heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            // Snapshot every 5000 entries; keep 1000 behind it for slow followers.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5000),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            Network {
                tls: tls.client.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let (stop, _) = watch::channel(false);
        let m = Arc::new(Self {
            id: config.id,
            raft,
            state,
            config,
            tls,
            heartbeats: Mutex::default(),
            key_acks: Mutex::default(),
            leader_since: Mutex::default(),
            forward_clients: Mutex::default(),
            stop,
        });
        tokio::spawn(leader_duties(m.clone()));
        tokio::spawn(crate::ca::renew_own(m.clone()));
        Ok(m)
    }

    /// Makes this manager the single member of a new Raft group. Idempotent: a manager that
    /// is already initialized is left as it is.
    pub async fn bootstrap(&self) -> Result<(), WriteError> {
        if self
            .raft
            .is_initialized()
            .await
            .map_err(|e| WriteError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let members = BTreeMap::from([(self.id, BasicNode::new(&self.config.advertise))]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| WriteError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Stops Raft and the leader duties (the gRPC server is stopped by its owner).
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let _ = self.raft.shutdown().await;
    }

    /// Fires when the manager shuts down (streams end so clients reconnect elsewhere).
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Commits a command through Raft, from any manager.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        let deadline = Instant::now() + self.config.write_timeout;
        let mut last_reason = String::from("no leader is known");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WriteError::NoQuorum(format!(
                    "the write was not committed within {:?} ({last_reason}); at least a majority of the managers must be up",
                    self.config.write_timeout
                )));
            }
            match self.leader() {
                Some((l, _)) if l == self.id => {
                    match tokio::time::timeout(left, self.raft.client_write(cmd.clone())).await {
                        Err(_) => {
                            return Err(WriteError::NoQuorum(format!(
                                "the leader could not reach a majority within {:?}; the write may still be committed if one returns",
                                self.config.write_timeout
                            )));
                        }
                        Ok(Ok(r)) => return r.data.map_err(WriteError::Refused),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                            last_reason = "leadership changed".into();
                        }
                        Ok(Err(e)) => return Err(WriteError::Raft(e.to_string())),
                    }
                }
                Some((l, addr)) => {
                    match self
                        .forward(&addr, &Forwarded::Write(cmd.clone()), left)
                        .await
                    {
                        Ok(ForwardReply::Applied(r, index)) => {
                            // Read-your-writes: the caller reads this manager's state next.
                            self.wait_applied(index, left).await;
                            return r.map_err(WriteError::Refused);
                        }
                        Ok(_) => last_reason = format!("manager {l} is no longer the leader"),
                        // Not delivered: safe to try again (at the next leader).
                        Err(ForwardFailure::Unreachable(e)) => {
                            last_reason = format!("the leader (manager {l}) is unreachable: {e}");
                        }
                        // Delivered, outcome unknown: a retry could apply it twice.
                        Err(ForwardFailure::Unknown(e)) => {
                            return Err(WriteError::NoQuorum(format!(
                                "the leader (manager {l}) did not answer in time ({e}); the write may still be committed"
                            )));
                        }
                        Err(ForwardFailure::Other(e)) => return Err(WriteError::Raft(e)),
                    }
                }
                None => {}
            }
            // No leader yet, or it just changed: wait a little for the election.
            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        }
    }

    /// Waits (bounded) until this manager has applied the log up to `index`.
    async fn wait_applied(&self, index: u64, limit: Duration) {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout(limit, async {
            loop {
                if rx.borrow_and_update().is_some_and(|l| l.index >= index) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    async fn forward(
        &self,
        addr: &str,
        req: &Forwarded,
        timeout: Duration,
    ) -> Result<ForwardReply, ForwardFailure> {
        let mut client = {
            let mut clients = self.forward_clients.lock().expect("lock");
            match clients.get(addr) {
                Some(c) => c.clone(),
                None => {
                    let ch = channel(addr, &self.tls.client)
                        .map_err(|e| ForwardFailure::Other(e.to_string()))?;
                    let c = pb::raft_client::RaftClient::new(ch);
                    clients.insert(addr.to_string(), c.clone());
                    c
                }
            }
        };
        let mut request = tonic::Request::new(pb::Json {
            data: serde_json::to_vec(req).expect("serializes"),
        });
        request.set_timeout(timeout);
        match client.forward(request).await {
            Ok(r) => serde_json::from_slice(&r.into_inner().data)
                .map_err(|e| ForwardFailure::Other(e.to_string())),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                Err(ForwardFailure::Unreachable(s.message().to_string()))
            }
            // A deadline that passed: the write may or may not have been committed; do not
            // retry it blindly.
            Err(s)
                if s.code() == tonic::Code::DeadlineExceeded
                    || s.code() == tonic::Code::Cancelled =>
            {
                Err(ForwardFailure::Unknown(s.message().to_string()))
            }
            Err(s) => Err(ForwardFailure::Other(format!(
                "{}: {}",
                s.code(),
                s.message()
            ))),
        }
    }

    /// Serves a forwarded request (this manager should be the leader).
    pub async fn handle_forward(&self, req: Forwarded) -> ForwardReply {
        match req {
            Forwarded::Heartbeat { node, gossip } => {
                self.record_heartbeat(node, gossip).await;
                ForwardReply::Done
            }
            Forwarded::AddManager { id, addr } => {
                if !self.is_leader() {
                    return ForwardReply::NotLeader;
                }
                match self.add_manager(id, addr).await {
                    Ok(()) => ForwardReply::Done,
                    Err(e) => ForwardReply::Failed(e.to_string()),
                }
            }
            Forwarded::RemoveManager { id } => {
                if !self.is_leader() {
                    return ForwardReply::NotLeader;
                }
                match self.remove_manager(id).await {
                    Ok(()) => ForwardReply::Done,
                    Err(e) => ForwardReply::Failed(e.to_string()),
                }
            }
            Forwarded::Write(cmd) => match self.raft.client_write(cmd).await {
                Ok(r) => ForwardReply::Applied(r.data, r.log_id.index),
                Err(_) => ForwardReply::NotLeader,
            },
        }
    }

    /// A node's heartbeat: kept by the leader; a follower passes it on.
    pub async fn heartbeat(&self, node: NodeId, gossip: Option<KeyAck>) -> Result<(), WriteError> {
        if self.is_leader() {
            self.record_heartbeat(node, gossip).await;
            return Ok(());
        }
        let Some((_, addr)) = self.leader() else {
            return Err(WriteError::NoQuorum("no leader is known".into()));
        };
        self.forward(
            &addr,
            &Forwarded::Heartbeat { node, gossip },
            self.config.write_timeout,
        )
        .await
        .map(|_| ())
        .map_err(|e| WriteError::NoQuorum(format!("the leader is unreachable: {e:?}")))
    }

    async fn record_heartbeat(&self, node: NodeId, gossip: Option<KeyAck>) {
        self.heartbeats
            .lock()
            .expect("lock")
            .insert(node.clone(), Instant::now());
        self.key_acks
            .lock()
            .expect("lock")
            .insert(node.clone(), gossip);
        let down = self.state.read(|a| {
            a.state
                .nodes
                .get(&node)
                .is_some_and(|n| n.status == NodeStatus::Down)
        });
        if down {
            let _ = self
                .write(Command::SetNodeStatus {
                    id: node,
                    status: NodeStatus::Ready,
                })
                .await;
        }
    }

    /// The leader's part in gossip key rotation: moves a rotation on once the nodes' heartbeats
    /// allow it (see `state::gossip_keys`), and starts one when the primary key is older than
    /// the rotation period. Logs whom a rotation waits for every 30 s.
    async fn gossip_key_duty(&self, last_log: &mut Instant) {
        let now_ms = unix_ms();
        let (step, waiting, due) = self.state.read(|a| {
            let acks = self.key_acks.lock().expect("lock");
            let idle = a.state.gossip_rotation() == crate::state::Rotation::Idle;
            let due = idle
                && self.config.gossip_key_rotation.is_some_and(|period| {
                    a.state.primary_gossip_key().is_some_and(|k| {
                        now_ms.saturating_sub(k.created_ms) >= period.as_millis() as u64
                    })
                });
            let waiting = a.state.rotation_waits_for(&acks);
            let step = waiting
                .is_empty()
                .then(|| a.state.rotation_step())
                .flatten();
            (step, waiting, due)
        });
        if let Some(cmd) = step {
            tracing::info!(
                ?cmd,
                "gossip key rotation: every ready node confirmed; next step"
            );
            let _ = self.write(cmd).await;
        } else if !waiting.is_empty() && last_log.elapsed() >= Duration::from_secs(30) {
            *last_log = Instant::now();
            let nodes: Vec<String> = waiting.iter().map(ToString::to_string).collect();
            tracing::warn!(nodes = %nodes.join(","), "gossip key rotation waits for these nodes to confirm");
        }
        if due {
            match new_gossip_key() {
                Ok(key) => {
                    tracing::info!(id = key.id, "gossip key rotation period over; rotating");
                    let _ = self.write(Command::RotateGossipKey(key)).await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot make a gossip key"),
            }
        }
    }

    /// The leader's id and address, when one is known.
    fn leader(&self) -> Option<(ManagerId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let l = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&l)?.addr.clone();
        Some((l, addr))
    }

    /// A membership change made on a follower: passed to the leader, which alone can make it.
    async fn forward_membership(&self, req: Forwarded) -> Result<(), WriteError> {
        let Some((_, leader)) = self.leader() else {
            return Err(WriteError::NoQuorum("no leader is known".into()));
        };
        let timeout = self.config.write_timeout * 4;
        match self.forward(&leader, &req, timeout).await {
            Ok(ForwardReply::Done) => Ok(()),
            Ok(ForwardReply::Failed(e)) => Err(WriteError::Raft(e)),
            Ok(_) => Err(WriteError::NoQuorum("leadership changed; retry".into())),
            Err(e) => Err(WriteError::NoQuorum(format!(
                "the leader is unreachable: {e:?}"
            ))),
        }
    }

    /// Adds a manager: first as a learner that catches up, then as a voter. On a follower, the
    /// request goes to the leader.
    pub async fn add_manager(&self, id: ManagerId, addr: String) -> Result<(), WriteError> {
        if !self.is_leader() {
            return self
                .forward_membership(Forwarded::AddManager { id, addr })
                .await;
        }
        let raft_err = |e: RaftError<ManagerId, ClientWriteError<ManagerId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NoQuorum(
                format!("this manager is not the leader (leader: {:?})", f.leader_id),
            ),
            e => WriteError::Raft(e.to_string()),
        };
        self.raft
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(raft_err)?;
        let mut voters: BTreeSet<ManagerId> = self.voters();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(raft_err)?;
        Ok(())
    }

    /// Removes manager `id` from the Raft group (on any manager: a follower passes it to the
    /// leader).
    pub async fn remove_manager(&self, id: ManagerId) -> Result<(), WriteError> {
        if !self.is_leader() {
            return self
                .forward_membership(Forwarded::RemoveManager { id })
                .await;
        }
        let mut voters = self.voters();
        if !voters.remove(&id) {
            return Err(WriteError::Refused(CommandError::NotFound {
                kind: crate::state::Kind::Node,
                name: format!("manager {id}"),
            }));
        }
        if voters.is_empty() {
            return Err(WriteError::Refused(CommandError::Invalid {
                field: "id".into(),
                reason: "the last manager cannot be removed".into(),
            }));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| WriteError::Raft(e.to_string()))?;
        Ok(())
    }

    pub fn voters(&self) -> BTreeSet<ManagerId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}

#[derive(Debug)]
enum ForwardFailure {
    /// Not delivered.
    Unreachable(String),
    /// Delivered but not answered in time.
    Unknown(String),
    Other(String),
}

/// What only the leader does, checked a few times a second: mark silent nodes down (after a
/// grace period from when it became leader, so a new leader does not condemn every node it
/// has not heard from yet), fire rolling-update timers, reap draining tasks once their stop
/// grace is over, and replace ended tasks once their service's restart delay is over (a new
/// leader starts the grace and the delay again: later, never earlier).
async fn leader_duties(m: Arc<Manager>) {
    let mut stop = m.stop.subscribe();
    let mut timers: HashMap<(String, u64), Instant> = HashMap::new();
    let mut draining: HashMap<swarmnet_model::TaskId, Instant> = HashMap::new();
    let mut ended: HashMap<swarmnet_model::TaskId, Instant> = HashMap::new();
    let mut rotation_log = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if !m.is_leader() {
            *m.leader_since.lock().expect("lock") = None;
            m.key_acks.lock().expect("lock").clear();
            timers.clear();
            draining.clear();
            ended.clear();
            continue;
        }
        let since = *m
            .leader_since
            .lock()
            .expect("lock")
            .get_or_insert_with(Instant::now);
        let now = Instant::now();
        let (nodes, waiting, leaving, restarting) = m.state.read(|a| {
            let nodes: Vec<(NodeId, NodeStatus)> = a
                .state
                .nodes
                .values()
                .map(|n| (n.id.clone(), n.status))
                .collect();
            let waiting: Vec<(String, u64, u64)> = a
                .state
                .services
                .values()
                .filter(|s| {
                    s.update
                        .as_ref()
                        .is_some_and(|u| u.state == UpdateState::Waiting)
                })
                .map(|s| (s.def.name.to_string(), s.version, s.def.update.delay_ms))
                .collect();
            let leaving: Vec<swarmnet_model::TaskId> = a
                .state
                .tasks
                .values()
                .filter(|t| t.draining)
                .map(|t| t.id.clone())
                .collect();
            (nodes, waiting, leaving, a.state.awaiting_restart())
        });
        ended.retain(|id, _| restarting.iter().any(|(t, _)| t == id));
        let restart: Vec<swarmnet_model::TaskId> = restarting
            .into_iter()
            .filter(|(id, delay_ms)| {
                let since = *ended.entry(id.clone()).or_insert(now);
                now.duration_since(since) >= Duration::from_millis(*delay_ms)
            })
            .map(|(id, _)| id)
            .collect();
        if !restart.is_empty() {
            tracing::info!(
                tasks = restart.len(),
                "restart delay over; replacing ended tasks"
            );
            let _ = m.write(Command::RestartTasks { tasks: restart }).await;
        }
        draining.retain(|id, _| leaving.contains(id));
        let due: Vec<swarmnet_model::TaskId> = leaving
            .into_iter()
            .filter(|id| {
                let since = *draining.entry(id.clone()).or_insert(now);
                now.duration_since(since) >= m.config.task_stop_grace
            })
            .collect();
        if !due.is_empty() {
            tracing::info!(tasks = due.len(), "stop grace over; stopping drained tasks");
            let _ = m.write(Command::ReapTasks { tasks: due }).await;
        }
        if now.duration_since(since) >= m.config.node_down_after {
            let silent: Vec<NodeId> = {
                let hb = m.heartbeats.lock().expect("lock");
                nodes
                    .iter()
                    .filter(|(id, status)| {
                        *status == NodeStatus::Ready
                            && hb
                                .get(id)
                                .is_none_or(|t| now.duration_since(*t) >= m.config.node_down_after)
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            for id in silent {
                tracing::warn!(node = %id, "node missed its heartbeats; marking it down");
                let _ = m
                    .write(Command::SetNodeStatus {
                        id,
                        status: NodeStatus::Down,
                    })
                    .await;
            }
        }
        m.gossip_key_duty(&mut rotation_log).await;
        for (name, version, delay) in waiting {
            let due = *timers
                .entry((name.clone(), version))
                .or_insert_with(|| now + Duration::from_millis(delay));
            if now >= due {
                timers.remove(&(name.clone(), version));
                if let Ok(service) = name.parse() {
                    let _ = m.write(Command::AdvanceUpdate { service, version }).await;
                }
            }
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 32 random bytes from the kernel (gossip keys, cluster ids).
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading /dev/urandom: {e}")))?;
    Ok(b)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh gossip key: random id and 32 random bytes, stamped now.
pub fn new_gossip_key() -> std::io::Result<GossipKey> {
    let id_bytes = random_bytes()?;
    Ok(GossipKey {
        id: u64::from_le_bytes(id_bytes[..8].try_into().expect("8 bytes")),
        key: hex(&random_bytes()?),
        created_ms: unix_ms(),
    })
}
