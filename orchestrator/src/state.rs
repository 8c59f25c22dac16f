//! The cluster state and the commands that change it: the deterministic heart of the
//! orchestrator, replicated by Raft. [`ClusterState::apply`] takes a [`Command`] and returns a
//! [`Response`] or a typed [`CommandError`]; it reads no clock and draws no random numbers, so
//! every manager that applies the same log holds the same state. Whatever needs time (heartbeat
//! timeouts, update delays) or randomness (gossip keys, cluster ids) is decided by the leader and
//! written into the command.
//!
//! Layout: the records ([`Node`], [`Network`], [`Service`], [`Task`]), the commands, and the
//! reconcile step that runs after every command: for each service, drop tasks that must go
//! (scaled away, on a removed, down or drained node, no longer matching the constraints,
//! outdated by a rolling update), create the missing ones, then give each pending task its
//! addresses and a node. A task that cannot get an address or a node stays `pending` with the
//! reason in its status (never only in a log) and is retried after every later command.
//!
//! Invariants (checked by `tests/state_random.rs` after every step of random command sequences):
//! - an address is held by at most one of: a network gateway, a VIP, a task, a node's ingress
//!   sandbox; and exactly the held addresses are marked used in the network's allocator;
//! - a task that is not pending has a node and an address on every network of its service;
//! - [`crate::project::project`] of the state always validates as a `model::Intent`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use swarmnet_model::spec::{
    Affinity, Availability, EndpointMode, NodeRole, PortSpec, Protocol, PublishMode, RestartPolicy,
    ServiceMode, TaskRuntime,
};
use swarmnet_model::{IfName, Mtu, Name, NodeId, TaskId, Vni};

mod gossip_keys;
mod restart;

pub use gossip_keys::{KeyAck, Rotation, next_step as next_rotation_step};

pub use restart::HISTORY_LEN;

use crate::constraint::Constraint;
use crate::ipam::{self, AddressError, Addresses, PoolConfig};

/// The name of the routing-mesh network created with the cluster.
pub const INGRESS: &str = "ingress";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster: Option<ClusterInfo>,
    pub nodes: BTreeMap<NodeId, Node>,
    pub networks: BTreeMap<Name, Network>,
    pub services: BTreeMap<Name, Service>,
    pub tasks: BTreeMap<TaskId, Task>,
    /// Gossip encryption keys, oldest first: one, or two during a rotation (see
    /// `gossip_keys`).
    pub keyring: Vec<GossipKey>,
    /// The key nodes seal with; `None` in state from before it was recorded (the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_primary: Option<u64>,
    /// Sequence for task ids.
    pub next_task: u64,
    /// The cluster's root CA, key included: it lives only in the managers' replicated state
    /// (never in an assignment), so that any leader can issue and renew node certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_ca: Option<swarmnet_pki::ca::RootCa>,
    /// Per service, its last tasks that failed, exited or turned unhealthy and were replaced
    /// (newest last, at most [`HISTORY_LEN`]): `service ps` shows them and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub history: BTreeMap<Name, Vec<Task>>,
    /// The certificate epoch node certificates are issued at now ([`swarmnet_pki::Identity::epoch`]);
    /// each node removal moves it on.
    #[serde(default)]
    pub cert_epoch: u64,
    /// Per removed node, the first epoch whose certificates are valid again: its certificates
    /// from before its removal are revoked (a removed node cannot come back with them; it
    /// joins again with a token, which gets it a certificate of the current epoch).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revoked_before: BTreeMap<NodeId, u64>,
}

impl ClusterState {
    /// Why a certificate naming `id` at `epoch` no longer counts, if it does not: its node
    /// was removed after the certificate was issued.
    pub fn revoked(&self, id: &str, epoch: u64) -> Option<String> {
        let id: NodeId = id.parse().ok()?;
        let first_valid = *self.revoked_before.get(&id)?;
        (epoch < first_valid).then(|| {
            format!(
                "the certificate of node {id} is revoked: the node was removed from the cluster \
                 after it was issued; join it again with a token (swarmnet cluster join-token)"
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: String,
    pub pool: PoolConfig,
    pub tokens: JoinTokens,
}

/// The secrets a node presents to join, one per role. Made by the leader (random), kept in
/// the replicated state so every manager can check them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokens {
    pub worker: String,
    pub manager: String,
}

impl JoinTokens {
    /// The role a token grants, if it is one of the cluster's.
    pub fn role_of(&self, token: &str) -> Option<NodeRole> {
        // Compare in constant time: a token is a secret.
        let eq = |a: &str, b: &str| {
            a.len() == b.len()
                && a.bytes()
                    .zip(b.bytes())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        };
        if !self.worker.is_empty() && eq(token, &self.worker) {
            Some(NodeRole::Worker)
        } else if !self.manager.is_empty() && eq(token, &self.manager) {
            Some(NodeRole::Manager)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKey {
    pub id: u64,
    /// 32 bytes, hex.
    pub key: String,
    /// When it was made (Unix ms, from the manager that proposed it; 0 if unknown): the
    /// leader starts the next rotation one rotation period later.
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Ready,
    /// Missed its heartbeats (decided by the leader): its tasks are placed elsewhere.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub hostname: String,
    pub addr: Ipv4Addr,
    pub role: NodeRole,
    pub labels: BTreeMap<String, String>,
    pub availability: Availability,
    pub status: NodeStatus,
    pub data_interface: Option<IfName>,
    /// Its ingress sandbox's address on the ingress network.
    pub ingress_ip: Option<Ipv4Addr>,
}

/// What a node says about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeJoin {
    pub id: NodeId,
    pub hostname: String,
    pub addr: Ipv4Addr,
    pub role: NodeRole,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub data_interface: Option<IfName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: Name,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: Vni,
    pub mtu: Option<Mtu>,
    pub internal: bool,
    pub attachable: bool,
    pub ingress: bool,
    pub addresses: Addresses,
}

/// A network create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub name: Option<Name>,
    /// Carved from the cluster's pool when absent.
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: Option<Mtu>,
    pub internal: bool,
    pub attachable: bool,
}

/// How a port is published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Publish {
    /// Reachable only on the service's networks.
    #[default]
    No,
    /// Published on a port the orchestrator picks from 30000–32767.
    Auto,
    Port(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub name: Option<Name>,
    pub protocol: Protocol,
    pub target: u16,
    pub publish: Publish,
    pub publish_mode: PublishMode,
    /// Which tasks serve an ingress-published port.
    #[serde(default)]
    pub traffic_policy: swarmnet_model::spec::TrafficPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNetworkConfig {
    pub network: Name,
    #[serde(default)]
    pub aliases: Vec<Name>,
}

/// What each task of a service runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub runtime: TaskRuntime,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    /// Stop replacing tasks; the operator decides.
    #[default]
    Pause,
    Continue,
    /// Go back to the previous definition.
    Rollback,
}

/// How a change of a service's definition reaches its tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0 replaces all at once.
    pub parallelism: u32,
    /// Pause between batches (the leader waits, then sends [`Command::AdvanceUpdate`]).
    pub delay_ms: u64,
    pub failure_action: FailureAction,
}

/// Swarm's default restart delay.
pub const DEFAULT_RESTART_DELAY_MS: u64 = 5_000;

fn default_restart_delay_ms() -> u64 {
    DEFAULT_RESTART_DELAY_MS
}

/// A service as the user defines it (create and update take the whole definition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub name: Name,
    pub mode: ServiceMode,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub networks: Vec<ServiceNetworkConfig>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Time between a task ending and its replacement (Swarm's `--restart-delay`, default
    /// [`DEFAULT_RESTART_DELAY_MS`]): a crash-looping task is replaced at this pace, not as
    /// fast as its node reports. The ended task keeps its slot meanwhile; the leader sends
    /// [`Command::RestartTasks`] when the delay is over. 0 replaces at once.
    #[serde(default = "default_restart_delay_ms")]
    pub restart_delay_ms: u64,
    #[serde(default)]
    pub affinity: Affinity,
    pub task: TaskTemplate,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    #[serde(default)]
    pub update: UpdateConfig,
    /// Run in each task's sandbox by its node; an unhealthy task is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Boxed: commands carry whole definitions, and most services have no check.
    pub health: Option<Box<swarmnet_model::spec::HealthCheck>>,
}

impl ServiceDef {
    /// The replica count, or `None` for a global service.
    pub fn replicas(&self) -> Option<u32> {
        match self.mode {
            ServiceMode::Replicated { replicas } => Some(replicas),
            ServiceMode::Global => None,
        }
    }

    /// Whether two definitions differ in anything but the replica count (a change that
    /// replaces tasks rather than adding or removing some).
    fn differs_beyond_scale(&self, other: &ServiceDef) -> bool {
        let mut a = self.clone();
        if let (ServiceMode::Replicated { .. }, ServiceMode::Replicated { replicas }) =
            (&a.mode, &other.mode)
        {
            a.mode = ServiceMode::Replicated {
                replicas: *replicas,
            };
        }
        a != *other
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    /// Waiting for the leader's delay before the next batch.
    Waiting,
    Paused,
    Completed,
    RollingBack,
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub def: ServiceDef,
    /// Bumped by every change that replaces tasks.
    pub version: u64,
    /// The definition before the last update (for rollback).
    pub previous: Option<ServiceDef>,
    /// VIP per network (endpoint mode vip).
    pub vips: BTreeMap<Name, Ipv4Addr>,
    /// Ports with the published numbers resolved.
    pub ports: Vec<PortSpec>,
    pub update: Option<UpdateStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for addresses or a node; the status says which and why.
    Pending,
    /// Placed on a node, not yet reported running.
    Assigned,
    Running,
    /// Exited with an error, turned unhealthy, or refused by the node; replaced per the
    /// service's restart policy (see `state/restart.rs`).
    Failed,
    /// Exited successfully.
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    /// Why the task is where it is (e.g. the exhaustion of a network), empty when all is well.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskNetwork {
    pub network: Name,
    pub aliases: Vec<Name>,
    pub ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub service: Name,
    /// 1-based replica slot; 0 for global tasks.
    pub slot: u32,
    pub node: Option<NodeId>,
    /// The service version it runs.
    pub version: u64,
    pub template: TaskTemplate,
    pub networks: Vec<TaskNetwork>,
    pub status: TaskStatus,
    /// As its node last reported (services with a health check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<swarmnet_model::spec::HealthStatus>,
    /// Leaving: the first phase of a two-phase removal. The task is out of every node's load
    /// balancers and DNS but keeps running (and keeps its addresses) until the leader reaps it
    /// with [`Command::ReapTasks`] after the stop grace period. Its slot is free meanwhile: a
    /// replacement starts at once (make before break).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl Task {
    pub fn is_pending(&self) -> bool {
        self.status.state == TaskState::Pending
    }

    /// A task that counts for its service: not draining.
    pub fn is_active(&self) -> bool {
        !self.draining
    }
}

/// Everything that changes the cluster state. Serialized into the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Creates the cluster, its first node and the ingress network.
    Init {
        cluster_id: String,
        pool: PoolConfig,
        #[serde(default)]
        tokens: JoinTokens,
        ingress_subnet: Option<Ipv4Net>,
        node: NodeJoin,
    },
    JoinNode(NodeJoin),
    UpdateNode {
        id: NodeId,
        labels: Option<BTreeMap<String, String>>,
        availability: Option<Availability>,
    },
    SetNodeRole {
        id: NodeId,
        role: NodeRole,
    },
    /// The leader's verdict on a node's heartbeats.
    SetNodeStatus {
        id: NodeId,
        status: NodeStatus,
    },
    RemoveNode {
        id: NodeId,
        /// Remove even while it is ready.
        force: bool,
    },
    CreateNetwork(NetworkConfig),
    RemoveNetwork {
        name: Name,
    },
    CreateService(ServiceDef),
    UpdateService(ServiceDef),
    ScaleService {
        name: Name,
        replicas: u32,
    },
    RemoveService {
        name: Name,
    },
    /// A node reports what became of one of its tasks, with its health when its service has a
    /// check (`None` leaves the recorded health as it is).
    ReportTask {
        node: NodeId,
        task: TaskId,
        state: TaskState,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health: Option<swarmnet_model::spec::HealthStatus>,
    },
    /// The leader's update timer fired: replace the next batch of a rolling update.
    AdvanceUpdate {
        service: Name,
        version: u64,
    },
    /// A new gossip key joins the keyring, accepted only (step 1 of a rotation; refused while
    /// one is in progress). The cluster's first key is primary at once.
    RotateGossipKey(GossipKey),
    /// Step 2 (decided by the leader once every ready node holds it): the newest key seals.
    PromoteGossipKey {
        id: u64,
    },
    /// Step 3 (decided by the leader once every ready node seals with it): every key but
    /// `keep`, the primary, is dropped.
    RetireGossipKeys {
        keep: u64,
    },
    /// The second phase of a two-phase removal (decided by the leader after the stop grace
    /// period): the draining tasks among `tasks` are stopped and their addresses released.
    /// Ids that are not draining (any more) are ignored.
    ReapTasks {
        tasks: Vec<TaskId>,
    },
    /// The restart delay of these ended tasks is over (decided by the leader): each is
    /// replaced per its service's restart policy. Ids that are not ended tasks whose policy
    /// replaces them (any more) are ignored.
    RestartTasks {
        tasks: Vec<TaskId>,
    },
    /// Replaces the join token of one role (nodes that joined stay).
    RotateJoinToken {
        role: NodeRole,
        token: String,
    },
    /// Installs the root CA made by the manager that created the cluster. Idempotent; a
    /// different CA is refused (root rotation is not supported).
    SetRootCa(swarmnet_pki::ca::RootCa),
}

impl Command {
    /// Whether every refusal of this command comes before its first change to the state (so it
    /// can be applied in place). Keep in step with `apply_inner`.
    fn checks_before_changing(&self) -> bool {
        match self {
            Command::ScaleService { .. }
            | Command::RemoveService { .. }
            | Command::AdvanceUpdate { .. }
            | Command::ReapTasks { .. }
            | Command::RestartTasks { .. }
            | Command::SetNodeStatus { .. }
            | Command::UpdateNode { .. }
            | Command::SetNodeRole { .. }
            | Command::RotateGossipKey(_)
            | Command::PromoteGossipKey { .. }
            | Command::RetireGossipKeys { .. }
            | Command::RotateJoinToken { .. }
            | Command::RemoveNetwork { .. } => true,
            // A failure may roll a service back (an update that can be refused), after the
            // task's status was set.
            Command::ReportTask { state, .. } => *state != TaskState::Failed,
            _ => false,
        }
    }
}

/// Which services the reconcile step after a command must look at.
#[derive(Debug)]
enum Scope {
    /// Every service: the command changed nodes, networks or the cluster.
    All,
    /// Only these (the command changed only them or their tasks).
    Services(BTreeSet<Name>),
}

impl Scope {
    /// The scope of `cmd` applied to `state` (read before the command is applied).
    fn of(cmd: &Command, state: &ClusterState) -> Self {
        let one = |n: &Name| Scope::Services(BTreeSet::from([n.clone()]));
        match cmd {
            Command::CreateService(def) | Command::UpdateService(def) => one(&def.name),
            Command::ScaleService { name, .. } | Command::RemoveService { name } => one(name),
            Command::AdvanceUpdate { service, .. } => one(service),
            // A report changes one task's state, which paces its service's rolling update.
            Command::ReportTask { task, .. } => match state.tasks.get(task) {
                Some(t) => one(&t.service),
                None => Scope::Services(BTreeSet::new()),
            },
            // Reaping frees addresses: pending tasks (of any service) are retried below anyway.
            Command::ReapTasks { .. } => Scope::Services(BTreeSet::new()),
            // The replaced tasks' services get their replacements.
            Command::RestartTasks { tasks } => Scope::Services(
                tasks
                    .iter()
                    .filter_map(|id| state.tasks.get(id).map(|t| t.service.clone()))
                    .collect(),
            ),
            Command::RotateGossipKey(_)
            | Command::PromoteGossipKey { .. }
            | Command::RetireGossipKeys { .. }
            | Command::RotateJoinToken { .. } => Scope::Services(BTreeSet::new()),
            _ => Scope::All,
        }
    }
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Done,
    Network {
        name: Name,
        subnet: Ipv4Net,
        vni: u32,
    },
    Service {
        name: Name,
        version: u64,
    },
}

/// The kinds of object a command names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Node,
    Network,
    Service,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Node => "node",
            Self::Network => "network",
            Self::Service => "service",
        })
    }
}

/// Why a command was refused. Each names the object and says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("the cluster is not initialized yet; run `swarmnet cluster init` first")]
    NotInitialized,
    #[error("the cluster is already initialized (id {id})")]
    AlreadyInitialized { id: String },
    #[error("no {kind} named {name:?}")]
    NotFound { kind: Kind, name: String },
    #[error("a {kind} named {name:?} exists already")]
    Exists { kind: Kind, name: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("subnet {subnet} overlaps {other} of network {network:?}; pick another subnet")]
    SubnetOverlap {
        subnet: Ipv4Net,
        other: Ipv4Net,
        network: String,
    },
    #[error("the address pool {pool} has no free /{size} left; give a subnet explicitly")]
    PoolExhausted { pool: Ipv4Net, size: u8 },
    #[error("every VNI from 4096 to 16777215 is in use")]
    VniExhausted,
    #[error("network {network:?} is in use by {users}; remove those first")]
    NetworkInUse { network: String, users: String },
    #[error("{port}/{protocol} is already published by service {service:?}")]
    PortInUse {
        port: u16,
        protocol: Protocol,
        service: String,
    },
    #[error("no free port left in 30000-32767 for {protocol}")]
    PortsExhausted { protocol: Protocol },
    #[error("network {network:?}: {source}")]
    Address {
        network: String,
        #[source]
        source: AddressError,
    },
    #[error("node {node:?} is {why}; {what}")]
    NodeBusy {
        node: String,
        why: String,
        what: String,
    },
    #[error("report for task {task:?} from node {node:?} is stale: the task is not on that node")]
    StaleReport { task: String, node: String },
    #[error(
        "a gossip key rotation is in progress (step: {step}); it completes once every ready \
         node confirms (see `swarmnet cluster info`), then rotate again"
    )]
    RotationInProgress { step: String },
}

fn not_found(kind: Kind, name: impl ToString) -> CommandError {
    CommandError::NotFound {
        kind,
        name: name.to_string(),
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ClusterState {
    /// Applies one command. A refused command leaves the state exactly as it was.
    pub fn apply(&mut self, cmd: &Command) -> Result<Response, CommandError> {
        if !matches!(cmd, Command::Init { .. } | Command::SetRootCa(_)) && self.cluster.is_none() {
            return Err(CommandError::NotInitialized);
        }
        let scope = Scope::of(cmd, self);
        if cmd.checks_before_changing() {
            // Every refusal of these commands happens before their first change: apply in
            // place (no copy of the state per write). `tests/state_random.rs` checks that a
            // refused command leaves the state exactly as it was.
            let response = self.apply_inner(cmd)?;
            self.reconcile(&scope);
            return Ok(response);
        }
        // The others may be refused half-way (an address allocated, the next one exhausted):
        // work on a copy so a refusal leaves nothing behind. They are the rare ones (cluster,
        // node and network changes, service create and update, a failed task's rollback).
        let mut next = self.clone();
        let response = next.apply_inner(cmd)?;
        next.reconcile(&scope);
        *self = next;
        Ok(response)
    }

    /// [`Self::apply`] with a copy of the state and the reconcile step over every service, as
    /// the state machine did before scoping: the reference `tests/state_random.rs` compares
    /// `apply` against after every random command.
    #[doc(hidden)]
    pub fn apply_reconciling_all(&mut self, cmd: &Command) -> Result<Response, CommandError> {
        if !matches!(cmd, Command::Init { .. } | Command::SetRootCa(_)) && self.cluster.is_none() {
            return Err(CommandError::NotInitialized);
        }
        let mut next = self.clone();
        let response = next.apply_inner(cmd)?;
        next.reconcile(&Scope::All);
        *self = next;
        Ok(response)
    }

    fn apply_inner(&mut self, cmd: &Command) -> Result<Response, CommandError> {
        match cmd {
            Command::Init {
                cluster_id,
                pool,
                tokens,
                ingress_subnet,
                node,
            } => self.init(cluster_id, pool, tokens, *ingress_subnet, node),
            Command::RotateJoinToken { role, token } => {
                if token.len() < 16 {
                    return Err(invalid(
                        "token",
                        "a join token needs at least 16 characters",
                    ));
                }
                let c = self.cluster.as_mut().expect("initialized");
                match role {
                    NodeRole::Worker => c.tokens.worker = token.clone(),
                    NodeRole::Manager => c.tokens.manager = token.clone(),
                }
                Ok(Response::Done)
            }
            Command::SetRootCa(ca) => match &self.root_ca {
                Some(c) if c != ca => Err(invalid(
                    "root_ca",
                    "the cluster already has a different root CA",
                )),
                _ => {
                    self.root_ca = Some(ca.clone());
                    Ok(Response::Done)
                }
            },
            Command::JoinNode(join) => self.join_node(join),
            Command::UpdateNode {
                id,
                labels,
                availability,
            } => {
                let node = self.node_mut(id)?;
                if let Some(l) = labels {
                    node.labels = l.clone();
                }
                if let Some(a) = availability {
                    node.availability = *a;
                }
                Ok(Response::Done)
            }
            Command::SetNodeRole { id, role } => {
                self.node_mut(id)?;
                if *role == NodeRole::Worker && self.is_last_manager(id) {
                    return Err(CommandError::NodeBusy {
                        node: id.to_string(),
                        why: "the last manager".into(),
                        what: "promote another node before demoting this one".into(),
                    });
                }
                self.node_mut(id)?.role = *role;
                Ok(Response::Done)
            }
            Command::SetNodeStatus { id, status } => {
                self.node_mut(id)?.status = *status;
                Ok(Response::Done)
            }
            Command::RemoveNode { id, force } => self.remove_node(id, *force),
            Command::CreateNetwork(cfg) => self.create_network(cfg, false),
            Command::RemoveNetwork { name } => self.remove_network(name),
            Command::CreateService(def) => self.create_service(def),
            Command::UpdateService(def) => self.update_service(def),
            Command::ScaleService { name, replicas } => {
                let svc = self
                    .services
                    .get_mut(name)
                    .ok_or_else(|| not_found(Kind::Service, name))?;
                match &mut svc.def.mode {
                    ServiceMode::Replicated { replicas: r } => *r = *replicas,
                    ServiceMode::Global => {
                        return Err(invalid(
                            "replicas",
                            format!("service {name:?} is global: it runs one task per node"),
                        ));
                    }
                }
                Ok(Response::Service {
                    name: name.clone(),
                    version: svc.version,
                })
            }
            Command::RemoveService { name } => {
                let svc = self
                    .services
                    .remove(name)
                    .ok_or_else(|| not_found(Kind::Service, name))?;
                let ids: Vec<TaskId> = self
                    .tasks
                    .values()
                    .filter(|t| &t.service == name)
                    .map(|t| t.id.clone())
                    .collect();
                for id in ids {
                    self.remove_task(&id);
                }
                self.history.remove(name);
                for (net, vip) in &svc.vips {
                    self.release(net, *vip);
                }
                Ok(Response::Done)
            }
            Command::ReportTask {
                node,
                task,
                state,
                message,
                health,
            } => {
                let r = self.report_task(node, task, *state, message)?;
                if health.is_some() {
                    self.note_health(task, *health);
                }
                Ok(r)
            }
            Command::AdvanceUpdate { service, version } => {
                if let Some(svc) = self.services.get_mut(service)
                    && svc.version == *version
                    && let Some(u) = &mut svc.update
                    && u.state == UpdateState::Waiting
                {
                    u.state = UpdateState::Updating;
                }
                Ok(Response::Done)
            }
            Command::ReapTasks { tasks } => {
                for id in tasks {
                    if self.tasks.get(id).is_some_and(|t| t.draining) {
                        self.remove_task(id);
                    }
                }
                Ok(Response::Done)
            }
            Command::RestartTasks { tasks } => {
                for id in tasks {
                    if self.restart_due(id).is_some() {
                        self.replace_ended(id);
                    }
                }
                Ok(Response::Done)
            }
            Command::RotateGossipKey(key) => self.add_gossip_key(key),
            Command::PromoteGossipKey { id } => self.promote_gossip_key(*id),
            Command::RetireGossipKeys { keep } => self.retire_gossip_keys(*keep),
        }
    }

    fn init(
        &mut self,
        cluster_id: &str,
        pool: &PoolConfig,
        tokens: &JoinTokens,
        ingress_subnet: Option<Ipv4Net>,
        node: &NodeJoin,
    ) -> Result<Response, CommandError> {
        if let Some(c) = &self.cluster {
            return Err(CommandError::AlreadyInitialized { id: c.id.clone() });
        }
        pool.validate().map_err(|r| invalid("pool", r))?;
        self.cluster = Some(ClusterInfo {
            id: cluster_id.to_string(),
            pool: *pool,
            tokens: tokens.clone(),
        });
        self.create_network(
            &NetworkConfig {
                name: Some(Name::new(INGRESS).expect("valid")),
                subnet: ingress_subnet,
                ..Default::default()
            },
            true,
        )?;
        self.join_node(node)
    }

    fn join_node(&mut self, join: &NodeJoin) -> Result<Response, CommandError> {
        if self.nodes.contains_key(&join.id) {
            // A node that rejoins keeps its record (labels, availability) but may have moved.
            let node = self.nodes.get_mut(&join.id).expect("present");
            node.addr = join.addr;
            node.hostname = join.hostname.clone();
            node.data_interface = join.data_interface.clone();
            node.status = NodeStatus::Ready;
        } else {
            if let Some(other) = self.nodes.values().find(|n| n.addr == join.addr) {
                return Err(invalid(
                    "addr",
                    format!(
                        "{} is already the address of node {:?}",
                        join.addr, other.id
                    ),
                ));
            }
            let ingress_ip = match self.ingress_name() {
                Some(net) => Some(self.allocate(&net)?),
                None => None,
            };
            self.nodes.insert(
                join.id.clone(),
                Node {
                    id: join.id.clone(),
                    hostname: join.hostname.clone(),
                    addr: join.addr,
                    role: join.role,
                    labels: join.labels.clone(),
                    availability: Availability::Active,
                    status: NodeStatus::Ready,
                    data_interface: join.data_interface.clone(),
                    ingress_ip,
                },
            );
        }
        if self.nodes.values().filter(|n| n.addr == join.addr).count() > 1 {
            return Err(invalid(
                "addr",
                format!("{} is already the address of another node", join.addr),
            ));
        }
        Ok(Response::Done)
    }

    fn remove_node(&mut self, id: &NodeId, force: bool) -> Result<Response, CommandError> {
        let node = self
            .nodes
            .get(id)
            .ok_or_else(|| not_found(Kind::Node, id))?;
        if node.status == NodeStatus::Ready && !force {
            return Err(CommandError::NodeBusy {
                node: id.to_string(),
                why: "ready".into(),
                what: "drain it and stop it first, or force the removal".into(),
            });
        }
        if self.is_last_manager(id) {
            return Err(CommandError::NodeBusy {
                node: id.to_string(),
                why: "the last manager".into(),
                what: "the cluster cannot lose its last manager".into(),
            });
        }
        let node = self.nodes.remove(id).expect("present");
        if let (Some(ip), Some(net)) = (node.ingress_ip, self.ingress_name()) {
            self.release(&net, ip);
        }
        // Revokes every certificate issued to it so far.
        self.cert_epoch += 1;
        self.revoked_before.insert(id.clone(), self.cert_epoch);
        // Its tasks are dropped by the reconcile step that follows.
        Ok(Response::Done)
    }

    /// Whether `id` is a manager and no other node is (a worker never is: with no manager
    /// node at all, removing a worker must not be refused as "the last manager").
    fn is_last_manager(&self, id: &NodeId) -> bool {
        self.nodes
            .get(id)
            .is_some_and(|n| n.role == NodeRole::Manager)
            && self
                .nodes
                .values()
                .filter(|n| n.role == NodeRole::Manager)
                .all(|n| &n.id == id)
    }

    fn node_mut(&mut self, id: &NodeId) -> Result<&mut Node, CommandError> {
        self.nodes
            .get_mut(id)
            .ok_or_else(|| not_found(Kind::Node, id))
    }

    fn ingress_name(&self) -> Option<Name> {
        self.networks
            .values()
            .find(|n| n.ingress)
            .map(|n| n.name.clone())
    }

    fn create_network(
        &mut self,
        cfg: &NetworkConfig,
        ingress: bool,
    ) -> Result<Response, CommandError> {
        let name = cfg
            .name
            .clone()
            .ok_or_else(|| invalid("name", "a network needs a name"))?;
        if self.networks.contains_key(&name) {
            return Err(CommandError::Exists {
                kind: Kind::Network,
                name: name.to_string(),
            });
        }
        if ingress && cfg.internal {
            return Err(invalid(
                "internal",
                "the ingress network cannot be internal",
            ));
        }
        let taken: Vec<Ipv4Net> = self.networks.values().map(|n| n.subnet).collect();
        let subnet = match cfg.subnet {
            Some(s) => {
                if s != s.trunc() {
                    return Err(invalid(
                        "subnet",
                        format!("{s} has host bits set; did you mean {}?", s.trunc()),
                    ));
                }
                if s.prefix_len() > 30 {
                    return Err(invalid(
                        "subnet",
                        format!("{s} is too small: a network needs at least a /30"),
                    ));
                }
                if let Some(other) = self
                    .networks
                    .values()
                    .find(|n| ipam::overlaps(&n.subnet, &s))
                {
                    return Err(CommandError::SubnetOverlap {
                        subnet: s,
                        other: other.subnet,
                        network: other.name.to_string(),
                    });
                }
                s
            }
            None => {
                let pool = self.cluster.as_ref().expect("initialized").pool;
                ipam::carve(&pool, &taken).ok_or(CommandError::PoolExhausted {
                    pool: pool.base,
                    size: pool.size,
                })?
            }
        };
        let used: BTreeSet<u32> = self.networks.values().map(|n| n.vni.get()).collect();
        let vni = ipam::allocate_vni(&used).ok_or(CommandError::VniExhausted)?;
        let mut addresses = Addresses::new(subnet);
        let gateway = match cfg.gateway {
            Some(g) => {
                addresses
                    .reserve(g)
                    .map_err(|source| CommandError::Address {
                        network: name.to_string(),
                        source,
                    })?;
                g
            }
            None => addresses
                .allocate()
                .map_err(|source| CommandError::Address {
                    network: name.to_string(),
                    source,
                })?,
        };
        self.networks.insert(
            name.clone(),
            Network {
                name: name.clone(),
                subnet,
                gateway,
                vni: Vni::new(u64::from(vni)).expect("in range"),
                mtu: cfg.mtu,
                internal: cfg.internal,
                attachable: cfg.attachable,
                ingress,
                addresses,
            },
        );
        Ok(Response::Network { name, subnet, vni })
    }

    fn remove_network(&mut self, name: &Name) -> Result<Response, CommandError> {
        let net = self
            .networks
            .get(name)
            .ok_or_else(|| not_found(Kind::Network, name))?;
        if net.ingress {
            return Err(CommandError::NetworkInUse {
                network: name.to_string(),
                users: "every node (the routing mesh)".into(),
            });
        }
        let users: Vec<String> = self
            .services
            .values()
            .filter(|s| s.def.networks.iter().any(|n| &n.network == name))
            .map(|s| format!("service {:?}", s.def.name.as_str()))
            .collect();
        let attached = self
            .tasks
            .values()
            .filter(|t| t.networks.iter().any(|a| &a.network == name))
            .count();
        if users.is_empty() && attached > 0 {
            return Err(CommandError::NetworkInUse {
                network: name.to_string(),
                users: format!("{attached} task(s) of a service still being updated"),
            });
        }
        if !users.is_empty() {
            return Err(CommandError::NetworkInUse {
                network: name.to_string(),
                users: users.join(", "),
            });
        }
        self.networks.remove(name);
        Ok(Response::Done)
    }

    /// Checks a definition against the cluster: networks exist, ports are sane.
    fn check_def(&self, def: &ServiceDef) -> Result<(), CommandError> {
        if let Some(h) = &def.health
            && let Some((field, why)) = h.problems().into_iter().next()
        {
            return Err(invalid(format!("health.{field}"), why));
        }
        let mut seen = BTreeSet::new();
        for (i, n) in def.networks.iter().enumerate() {
            let net = self
                .networks
                .get(&n.network)
                .ok_or_else(|| not_found(Kind::Network, &n.network))?;
            if net.ingress {
                return Err(invalid(
                    format!("networks[{i}]"),
                    "the ingress network is joined by publishing a port, not by name",
                ));
            }
            if !seen.insert(&n.network) {
                return Err(invalid(
                    format!("networks[{i}]"),
                    format!("network {:?} is listed twice", n.network.as_str()),
                ));
            }
        }
        match def.task.runtime {
            TaskRuntime::Netd if def.task.argv.is_empty() => {
                return Err(invalid("argv", "a task run by netd needs a command"));
            }
            TaskRuntime::External if !def.task.argv.is_empty() => {
                return Err(invalid(
                    "argv",
                    "an external runtime starts the task itself; argv must be empty",
                ));
            }
            _ => {}
        }
        let mut names = BTreeSet::new();
        let mut published = BTreeSet::new();
        for (i, p) in def.ports.iter().enumerate() {
            if p.target == 0 {
                return Err(invalid(
                    format!("ports[{i}].target"),
                    "port 0 cannot be a target",
                ));
            }
            if let Some(n) = &p.name
                && !names.insert((n.clone(), p.protocol))
            {
                return Err(invalid(
                    format!("ports[{i}].name"),
                    format!("port name {n:?} is used twice for {}", p.protocol),
                ));
            }
            if let Publish::Port(n) = p.publish {
                if n == 0 {
                    return Err(invalid(format!("ports[{i}]"), "port 0 cannot be published"));
                }
                if !published.insert((n, p.protocol)) {
                    return Err(invalid(
                        format!("ports[{i}]"),
                        format!("{n}/{} is published twice", p.protocol),
                    ));
                }
            }
            if p.publish != Publish::No
                && p.publish_mode == PublishMode::Ingress
                && def.endpoint_mode == EndpointMode::Dnsrr
            {
                return Err(invalid(
                    format!("ports[{i}]"),
                    "a dnsrr service has no VIP for the routing mesh; publish in host mode",
                ));
            }
        }
        Ok(())
    }

    /// Resolves published ports: explicit ones must be free, `Auto` ones keep what `prior`
    /// had for the same target and protocol, or take the lowest free dynamic port.
    fn resolve_ports(
        &self,
        def: &ServiceDef,
        prior: Option<&Service>,
    ) -> Result<Vec<PortSpec>, CommandError> {
        let mut used: BTreeMap<(u16, Protocol), &str> = BTreeMap::new();
        for s in self.services.values() {
            if s.def.name == def.name {
                continue;
            }
            for p in &s.ports {
                if let Some(n) = p.published {
                    used.insert((n, p.protocol), s.def.name.as_str());
                }
            }
        }
        let mut out = Vec::new();
        let mut mine: BTreeSet<(u16, Protocol)> = BTreeSet::new();
        for (i, p) in def.ports.iter().enumerate() {
            if p.traffic_policy == swarmnet_model::spec::TrafficPolicy::Local
                && (p.publish == Publish::No || p.publish_mode == PublishMode::Host)
            {
                return Err(invalid(
                    format!("ports[{i}].traffic_policy"),
                    "\"local\" applies to ports published in ingress mode (host mode always \
                     serves from the local task only)",
                ));
            }
        }
        for p in &def.ports {
            if let Publish::Port(n) = p.publish {
                if let Some(other) = used.get(&(n, p.protocol)) {
                    return Err(CommandError::PortInUse {
                        port: n,
                        protocol: p.protocol,
                        service: other.to_string(),
                    });
                }
                mine.insert((n, p.protocol));
            }
        }
        for p in &def.ports {
            let published = match p.publish {
                Publish::No => None,
                Publish::Port(n) => Some(n),
                Publish::Auto => {
                    let kept = prior.and_then(|s| {
                        s.ports
                            .iter()
                            .find(|q| {
                                q.target == p.target
                                    && q.protocol == p.protocol
                                    && q.published.is_some_and(|n| {
                                        ipam::DYNAMIC_PORTS.contains(&n)
                                            && !mine.contains(&(n, p.protocol))
                                    })
                            })
                            .and_then(|q| q.published)
                    });
                    let n = match kept {
                        Some(n) => n,
                        None => {
                            let taken: BTreeSet<u16> = used
                                .keys()
                                .chain(mine.iter())
                                .filter(|(_, proto)| *proto == p.protocol)
                                .map(|(n, _)| *n)
                                .collect();
                            ipam::allocate_port(&taken).ok_or(CommandError::PortsExhausted {
                                protocol: p.protocol,
                            })?
                        }
                    };
                    mine.insert((n, p.protocol));
                    Some(n)
                }
            };
            out.push(PortSpec {
                name: p.name.clone(),
                protocol: p.protocol,
                target: p.target,
                published,
                publish_mode: p.publish_mode,
                traffic_policy: p.traffic_policy,
            });
        }
        Ok(out)
    }

    /// The networks a service needs a VIP on: its own (vip mode), plus ingress when it
    /// publishes a port through the routing mesh.
    fn vip_networks(&self, def: &ServiceDef, ports: &[PortSpec]) -> Vec<Name> {
        let mut out = Vec::new();
        if def.endpoint_mode == EndpointMode::Vip {
            out.extend(def.networks.iter().map(|n| n.network.clone()));
        }
        if ports
            .iter()
            .any(|p| p.published.is_some() && p.publish_mode == PublishMode::Ingress)
            && let Some(ingress) = self.ingress_name()
        {
            out.push(ingress);
        }
        out
    }

    fn create_service(&mut self, def: &ServiceDef) -> Result<Response, CommandError> {
        if self.services.contains_key(&def.name) {
            return Err(CommandError::Exists {
                kind: Kind::Service,
                name: def.name.to_string(),
            });
        }
        self.check_def(def)?;
        let ports = self.resolve_ports(def, None)?;
        let mut vips = BTreeMap::new();
        for net in self.vip_networks(def, &ports) {
            let ip = self.allocate(&net)?;
            vips.insert(net, ip);
        }
        self.services.insert(
            def.name.clone(),
            Service {
                def: def.clone(),
                version: 1,
                previous: None,
                vips,
                ports,
                update: None,
            },
        );
        Ok(Response::Service {
            name: def.name.clone(),
            version: 1,
        })
    }

    fn update_service(&mut self, def: &ServiceDef) -> Result<Response, CommandError> {
        let old = self
            .services
            .get(&def.name)
            .ok_or_else(|| not_found(Kind::Service, &def.name))?
            .clone();
        if std::mem::discriminant(&old.def.mode) != std::mem::discriminant(&def.mode) {
            return Err(invalid(
                "mode",
                "a service cannot change between replicated and global; create a new one",
            ));
        }
        self.check_def(def)?;
        let ports = self.resolve_ports(def, Some(&old))?;
        let wanted = self.vip_networks(def, &ports);
        // Keep VIPs on networks that stay; release the others; allocate new ones.
        let mut vips = BTreeMap::new();
        for (net, ip) in &old.vips {
            if wanted.contains(net) {
                vips.insert(net.clone(), *ip);
            } else {
                self.release(net, *ip);
            }
        }
        for net in wanted {
            if let std::collections::btree_map::Entry::Vacant(e) = vips.entry(net) {
                let ip = self.allocate(e.key())?;
                e.insert(ip);
            }
        }
        let replaces = old.def.differs_beyond_scale(def) || old.ports != ports;
        let svc = self.services.get_mut(&def.name).expect("present");
        svc.vips = vips;
        svc.ports = ports;
        if replaces {
            svc.previous = Some(old.def.clone());
            svc.version += 1;
            svc.update = Some(UpdateStatus {
                state: UpdateState::Updating,
                message: String::new(),
            });
        }
        svc.def = def.clone();
        Ok(Response::Service {
            name: def.name.clone(),
            version: svc.version,
        })
    }

    fn report_task(
        &mut self,
        node: &NodeId,
        id: &TaskId,
        state: TaskState,
        message: &str,
    ) -> Result<Response, CommandError> {
        let stale = || CommandError::StaleReport {
            task: id.to_string(),
            node: node.to_string(),
        };
        let task = self.tasks.get_mut(id).ok_or_else(stale)?;
        if task.node.as_ref() != Some(node) || task.is_pending() {
            return Err(stale());
        }
        if state == TaskState::Pending {
            return Err(invalid("state", "a node cannot report a task pending"));
        }
        task.status = TaskStatus {
            state,
            message: message.to_string(),
        };
        let (service, version) = (task.service.clone(), task.version);
        if state == TaskState::Failed
            && let Some(svc) = self.services.get_mut(&service)
            && svc.version == version
            && let Some(u) = &mut svc.update
            && matches!(u.state, UpdateState::Updating | UpdateState::Waiting)
        {
            match svc.def.update.failure_action {
                FailureAction::Continue => {}
                FailureAction::Pause => {
                    u.state = UpdateState::Paused;
                    u.message = format!("task {id} failed: {message}");
                }
                FailureAction::Rollback => {
                    let prev = svc.previous.clone().expect("an update has a previous def");
                    let reason = format!("task {id} failed: {message}");
                    self.update_service(&prev)?;
                    let svc = self.services.get_mut(&service).expect("present");
                    svc.update = Some(UpdateStatus {
                        state: UpdateState::RollingBack,
                        message: reason,
                    });
                }
            }
        }
        self.apply_restart_policy(id);
        Ok(Response::Done)
    }

    fn allocate(&mut self, net: &Name) -> Result<Ipv4Addr, CommandError> {
        let n = self
            .networks
            .get_mut(net)
            .ok_or_else(|| not_found(Kind::Network, net))?;
        n.addresses
            .allocate()
            .map_err(|source| CommandError::Address {
                network: net.to_string(),
                source,
            })
    }

    fn release(&mut self, net: &Name, ip: Ipv4Addr) {
        if let Some(n) = self.networks.get_mut(net) {
            n.addresses.release(ip);
        }
    }

    fn remove_task(&mut self, id: &TaskId) {
        if let Some(t) = self.tasks.remove(id) {
            for a in &t.networks {
                if let Some(ip) = a.ip {
                    self.release(&a.network, ip);
                }
            }
        }
    }

    fn new_task_id(&mut self) -> TaskId {
        // splitmix64 is a bijection on u64, so distinct sequence numbers give distinct ids;
        // mixing in the cluster id keeps ids of different clusters apart.
        let salt = self
            .cluster
            .as_ref()
            .map(|c| {
                c.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                })
            })
            .unwrap_or(0);
        self.next_task += 1;
        let mut z = self
            .next_task
            .wrapping_add(salt)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let mut s = String::with_capacity(14);
        let mut v = z;
        for _ in 0..13 {
            s.push(char::from_digit((v % 36) as u32, 36).expect("digit"));
            v /= 36;
        }
        TaskId::new(format!("t{s}")).expect("valid task id")
    }

    /// Whether a node may keep running tasks of this service.
    fn may_keep(node: &Node, def: &ServiceDef) -> bool {
        node.status == NodeStatus::Ready
            && node.availability != Availability::Drain
            && def.constraints.iter().all(|c| c.matches(node))
    }

    /// Why a node may not take a new task of this service, or `None` when it may.
    fn refusal(node: &Node, def: &ServiceDef) -> Option<String> {
        if node.status != NodeStatus::Ready {
            return Some("down".into());
        }
        match node.availability {
            Availability::Active => {}
            Availability::Pause => return Some("paused".into()),
            Availability::Drain => return Some("drained".into()),
        }
        def.constraints
            .iter()
            .find(|c| !c.matches(node))
            .map(|c| format!("does not satisfy {c}"))
    }

    /// Brings the services in `scope` in line with their definitions and the nodes, then
    /// retries every pending task (of any service: an address or a node may have been freed).
    /// Runs after every command; deterministic (ordered maps, no clock). A command that
    /// changed only some services reconciles only those: a service's tasks depend only on its
    /// definition, the nodes and the addresses, and a scoped command changes no node.
    fn reconcile(&mut self, scope: &Scope) {
        let names: Vec<Name> = match scope {
            Scope::All => self.services.keys().cloned().collect(),
            // Plus every service in the middle of a rolling update: a batch may become due
            // through another service's change (addresses freed for its pending tasks), as
            // it would under a reconcile of every service.
            Scope::Services(set) => self
                .services
                .values()
                .filter(|s| {
                    set.contains(&s.def.name)
                        || s.update.as_ref().is_some_and(|u| {
                            matches!(u.state, UpdateState::Updating | UpdateState::RollingBack)
                        })
                })
                .map(|s| s.def.name.clone())
                .collect(),
        };
        if matches!(scope, Scope::All) {
            // A draining task whose node was removed has nothing left to finish.
            let orphans: Vec<TaskId> = self
                .tasks
                .values()
                .filter(|t| {
                    t.draining && t.node.as_ref().is_none_or(|n| !self.nodes.contains_key(n))
                })
                .map(|t| t.id.clone())
                .collect();
            for id in orphans {
                self.remove_task(&id);
            }
        }
        for name in &names {
            self.drop_unwanted(name);
        }
        // Create and place after every service dropped what it must, so addresses freed by
        // one service are there for the pending tasks of all.
        for name in &names {
            self.create_missing(name);
        }
        let pending: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.is_pending())
            .map(|t| t.id.clone())
            .collect();
        if !pending.is_empty() {
            let mut load = self.node_load();
            for id in pending {
                self.progress_pending(&id, &mut load);
            }
        }
        for name in &names {
            self.finish_update(name);
        }
    }

    /// Tasks per node: (all tasks, per service).
    fn node_load(&self) -> BTreeMap<NodeId, (usize, BTreeMap<Name, usize>)> {
        let mut load: BTreeMap<NodeId, (usize, BTreeMap<Name, usize>)> = self
            .nodes
            .keys()
            .map(|id| (id.clone(), (0, BTreeMap::new())))
            .collect();
        for t in self.tasks.values().filter(|t| t.is_active()) {
            if let Some(n) = &t.node
                && let Some(l) = load.get_mut(n)
            {
                l.0 += 1;
                *l.1.entry(t.service.clone()).or_default() += 1;
            }
        }
        load
    }

    fn drop_unwanted(&mut self, name: &Name) {
        let svc = &self.services[name];
        let def = &svc.def;
        let mut drop: Vec<TaskId> = Vec::new();
        let mut seen_slots: BTreeSet<(u32, Option<NodeId>)> = BTreeSet::new();
        for t in self
            .tasks
            .values()
            .filter(|t| &t.service == name && t.is_active())
        {
            let key = match def.mode {
                ServiceMode::Replicated { .. } => (t.slot, None),
                ServiceMode::Global => (0, t.node.clone()),
            };
            let gone = match def.mode {
                ServiceMode::Replicated { replicas } => t.slot > replicas,
                ServiceMode::Global => false,
            };
            let node_bad = t
                .node
                .as_ref()
                .is_some_and(|n| self.nodes.get(n).is_none_or(|n| !Self::may_keep(n, def)));
            if gone || node_bad || !seen_slots.insert(key) {
                drop.push(t.id.clone());
            }
        }
        // Rolling update: replace outdated tasks, a batch at a time.
        let updating = svc
            .update
            .as_ref()
            .is_some_and(|u| matches!(u.state, UpdateState::Updating | UpdateState::RollingBack));
        if updating {
            let version = svc.version;
            let in_flight = self
                .tasks
                .values()
                .filter(|t| {
                    &t.service == name
                        && t.is_active()
                        && !drop.contains(&t.id)
                        && t.version == version
                        && !matches!(t.status.state, TaskState::Running | TaskState::Complete)
                })
                .count();
            let budget = match def.update.parallelism {
                0 => usize::MAX,
                p => (p as usize).saturating_sub(in_flight),
            };
            let outdated: Vec<TaskId> = self
                .tasks
                .values()
                .filter(|t| {
                    &t.service == name
                        && t.is_active()
                        && t.version < version
                        && !drop.contains(&t.id)
                })
                .map(|t| t.id.clone())
                .take(budget)
                .collect();
            let replaced = !outdated.is_empty();
            drop.extend(outdated);
            let svc = self.services.get_mut(name).expect("present");
            if replaced
                && svc.def.update.delay_ms > 0
                && let Some(u) = &mut svc.update
                && u.state == UpdateState::Updating
            {
                // Wait for the leader's timer before the next batch.
                u.state = UpdateState::Waiting;
            }
        }
        for id in drop {
            self.drain_task(&id);
        }
    }

    /// Takes a task out of service. One that may still be serving (placed on a node that is
    /// up) drains first; others (pending, or on a down or removed node) go at once.
    fn drain_task(&mut self, id: &TaskId) {
        let Some(t) = self.tasks.get(id) else { return };
        let serving = !t.is_pending()
            && t.node
                .as_ref()
                .and_then(|n| self.nodes.get(n))
                .is_some_and(|n| n.status == NodeStatus::Ready);
        if serving {
            self.tasks.get_mut(id).expect("present").draining = true;
        } else {
            self.remove_task(id);
        }
    }

    fn create_missing(&mut self, name: &Name) {
        let svc = &self.services[name];
        let def = svc.def.clone();
        let version = svc.version;
        let mut want: Vec<(u32, Option<NodeId>)> = Vec::new();
        match def.mode {
            ServiceMode::Replicated { replicas } => {
                let have: BTreeSet<u32> = self
                    .tasks
                    .values()
                    .filter(|t| &t.service == name && t.is_active())
                    .map(|t| t.slot)
                    .collect();
                want.extend(
                    (1..=replicas)
                        .filter(|s| !have.contains(s))
                        .map(|s| (s, None)),
                );
            }
            ServiceMode::Global => {
                let have: BTreeSet<&NodeId> = self
                    .tasks
                    .values()
                    .filter(|t| &t.service == name && t.is_active())
                    .filter_map(|t| t.node.as_ref())
                    .collect();
                want.extend(
                    self.nodes
                        .values()
                        .filter(|n| Self::refusal(n, &def).is_none() && !have.contains(&n.id))
                        .map(|n| (0, Some(n.id.clone()))),
                );
            }
        }
        for (slot, node) in want {
            let id = self.new_task_id();
            let task = Task {
                id: id.clone(),
                service: name.clone(),
                slot,
                node,
                version,
                template: def.task.clone(),
                networks: def
                    .networks
                    .iter()
                    .map(|n| TaskNetwork {
                        network: n.network.clone(),
                        aliases: n.aliases.clone(),
                        ip: None,
                    })
                    .chain(
                        self.services[name]
                            .vips
                            .keys()
                            .filter(|n| self.networks.get(*n).is_some_and(|net| net.ingress))
                            .map(|n| TaskNetwork {
                                network: n.clone(),
                                aliases: vec![],
                                ip: None,
                            }),
                    )
                    .collect(),
                status: TaskStatus {
                    state: TaskState::Pending,
                    message: "new".into(),
                },
                health: None,
                draining: false,
            };
            self.tasks.insert(id, task);
        }
    }

    /// Gives a pending task its addresses (all or none) and a node.
    fn progress_pending(
        &mut self,
        id: &TaskId,
        load: &mut BTreeMap<NodeId, (usize, BTreeMap<Name, usize>)>,
    ) {
        let task = self.tasks[id].clone();
        let def = self.services[&task.service].def.clone();
        // Addresses first: a task without them can run nowhere.
        let mut got: Vec<(Name, Ipv4Addr)> = Vec::new();
        let mut failure = None;
        for a in task.networks.iter().filter(|a| a.ip.is_none()) {
            match self.allocate(&a.network) {
                Ok(ip) => got.push((a.network.clone(), ip)),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(reason) = failure {
            for (net, ip) in got {
                self.release(&net, ip);
            }
            self.tasks.get_mut(id).expect("present").status.message = reason;
            return;
        }
        // Then a node: the given one (global), or the eligible node with the fewest tasks of
        // this service, then the fewest tasks overall, then the lowest id (spread).
        let node = match &task.node {
            Some(n) => Ok(n.clone()),
            None => {
                let mut refusals = Vec::new();
                let mut best: Option<(usize, usize, NodeId)> = None;
                for n in self.nodes.values() {
                    if let Some(why) = Self::refusal(n, &def) {
                        refusals.push(format!("{}: {why}", n.id));
                        continue;
                    }
                    let (all, per) = &load[&n.id];
                    let key = (
                        per.get(&task.service).copied().unwrap_or(0),
                        *all,
                        n.id.clone(),
                    );
                    if best.as_ref().is_none_or(|b| key < *b) {
                        best = Some(key);
                    }
                }
                best.map(|b| b.2).ok_or_else(|| {
                    if refusals.is_empty() {
                        "no suitable node: the cluster has no nodes".to_string()
                    } else {
                        format!("no suitable node ({})", refusals.join("; "))
                    }
                })
            }
        };
        match node {
            Err(reason) => {
                for (net, ip) in got {
                    self.release(&net, ip);
                }
                self.tasks.get_mut(id).expect("present").status.message = reason;
            }
            Ok(node) => {
                let l = load.entry(node.clone()).or_default();
                l.0 += 1;
                *l.1.entry(task.service.clone()).or_default() += 1;
                let t = self.tasks.get_mut(id).expect("present");
                for a in &mut t.networks {
                    if a.ip.is_none() {
                        a.ip = got.iter().find(|(n, _)| *n == a.network).map(|(_, ip)| *ip);
                    }
                }
                t.node = Some(node);
                t.status = TaskStatus {
                    state: TaskState::Assigned,
                    message: String::new(),
                };
            }
        }
    }

    /// Marks a rolling update complete once no task runs an older version.
    fn finish_update(&mut self, name: &Name) {
        let svc = &self.services[name];
        let Some(u) = &svc.update else { return };
        if !matches!(
            u.state,
            UpdateState::Updating | UpdateState::RollingBack | UpdateState::Waiting
        ) {
            return;
        }
        let outdated = self
            .tasks
            .values()
            .any(|t| &t.service == name && t.is_active() && t.version < svc.version);
        if !outdated {
            let svc = self.services.get_mut(name).expect("present");
            let u = svc.update.as_mut().expect("present");
            u.state = if u.state == UpdateState::RollingBack {
                UpdateState::RolledBack
            } else {
                UpdateState::Completed
            };
        }
    }
}
