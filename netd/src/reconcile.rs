//! The reconciler: the thin effectful shell around `project` and `plan`.
//!
//! A round: project the intent → decide the scope (everything in a full round; in an incremental
//! round, the objects whose desired state changed, that failed and are due a retry, or that
//! were changed last round and need a confirming look) → observe just those objects → plan →
//! apply each object's ops in order. An object that fails gets an error status and an
//! exponential backoff; the others proceed. Full rounds also prune what netd owns but no
//! longer wants, and repair drift made by anyone else.

mod health;
mod inspect;

pub use health::LocalHealth;
pub use inspect::{Drift, Inspection, LbView, NsView};

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::Serialize;
use swarmnet_model::spec::{RestartPolicy, TaskRuntime};
use swarmnet_model::{IfName, Intent, NodeId, TaskId};
use tracing::{debug, info, warn};

use crate::desired::{self, DesiredNode, NodeContext};
use crate::lb::{BackendState, LbObserved, LbSpec, LoadBalancerPort, ServiceKey};
use crate::plan::{self, NsObserved, ObjectKey, ObjectPlan, Observed, Op, ProcessGate, Scope};
use crate::port::{
    FirewallPort, LinkKindState, LinkPort, NsName, NsRef, PortError, PortResult, ProcessPort,
    ProcessSpec, ProcessState,
};

/// The kernel-facing ports netd works through.
pub struct Ports {
    pub links: Box<dyn LinkPort>,
    pub firewall: Box<dyn FirewallPort>,
    pub processes: Box<dyn ProcessPort>,
    pub lb: Box<dyn LoadBalancerPort>,
    /// The ingress sandbox's own table (masquerade into the ingress network).
    pub ingress_firewall: Box<dyn FirewallPort>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ports")
    }
}

/// Node settings the reconciler needs (a subset of netd's config).
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub node: NodeId,
    pub vxlan_port: u16,
    pub gw_subnet: Ipv4Net,
    /// Per-task files: logs, resolv.conf.
    pub task_dir: PathBuf,
    /// Where state that must survive a restart is kept (gateway leases, attachments).
    pub state_dir: PathBuf,
    /// How long a stopping task gets between SIGTERM and SIGKILL; also how long a leaving
    /// backend stays draining (no new connections, established ones continue) in the VIPs.
    pub stop_grace: Duration,
    /// How long one round may apply before leaving the rest pending for the next round.
    pub round_budget: Duration,
    /// Idle timeouts of load-balanced connections (`None`: the kernel's).
    pub lb_timeouts: Option<crate::lb::IdleTimeouts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectState {
    Ok,
    /// Changed last round; waiting for a confirming observation.
    Pending,
    Error,
}

/// Reconcile status of one object, shown in status.json and by `swarmnet inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectStatus {
    pub state: ObjectState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Consecutive failed attempts.
    #[serde(skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Ops applied in the last round that touched it.
    #[serde(skip_serializing_if = "is_zero")]
    pub last_ops: u32,
    #[serde(skip)]
    pub retry_at: Option<Instant>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default)]
struct RestartState {
    exits: u32,
    not_before: Option<Instant>,
    done: bool,
    started_at: Option<Instant>,
    /// How the process last ended: kept after its record is forgotten, so that a task the
    /// restart policy keeps down still reports how it ended (`reconcile/health.rs`).
    last_exit: Option<crate::port::Exit>,
}

/// What a round did, for logs, status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub full: bool,
    pub objects: usize,
    pub ops_applied: usize,
    pub errors: usize,
    /// Ops applied in full rounds to objects whose desired state had not changed: drift.
    pub drift_repaired: usize,
    /// Objects left for the next round because this one used its time budget.
    pub deferred: usize,
    /// Objects whose ops were applied (successfully or not).
    pub objects_applied: usize,
}

/// How long one round may spend applying before it leaves the rest to the next round.
pub const DEFAULT_ROUND_BUDGET: Duration = Duration::from_secs(1);

/// Backoff after `attempts` failures: 200 ms doubling, capped at 30 s.
pub fn backoff(attempts: u32) -> Duration {
    let ms = 200u64.saturating_mul(1u64 << attempts.min(8).saturating_sub(1));
    Duration::from_millis(ms.min(30_000))
}

pub struct Reconciler {
    ports: Ports,
    cfg: ReconcilerConfig,
    intent: Intent,
    intent_generation: u64,
    leases: BTreeMap<TaskId, Ipv4Addr>,
    external: BTreeMap<TaskId, PathBuf>,
    underlay: Option<(IfName, u16)>,
    node_error: Option<String>,
    last_desired: Option<DesiredNode>,
    status: BTreeMap<ObjectKey, ObjectStatus>,
    projection_issues: BTreeMap<ObjectKey, String>,
    tables: plan::Tables,
    restarts: BTreeMap<TaskId, RestartState>,
    /// Task processes as last listed.
    proc_snapshot: BTreeMap<TaskId, ProcessState>,
    /// Objects a round left for the next one (time budget spent).
    deferred: BTreeSet<ObjectKey>,
    /// What each network namespace's load balancer was last given.
    lb_applied: BTreeMap<NsName, LbSpec>,
    /// Backends that left a service still on the network: draining until the deadline.
    drains: BTreeMap<(NsName, ServiceKey, Ipv4Addr), Instant>,
    round: u64,
    /// Remote endpoints gossip holds live (`None`: gossip not configured, intent alone).
    remote: Option<crate::gossip::view::RemoteLive>,
    /// Bumped whenever `remote` changes (DNS views depend on it).
    remote_generation: u64,
    /// The health monitor's last verdicts on local tasks (see `reconcile/health.rs`).
    health_verdicts: BTreeMap<TaskId, crate::health::TaskHealth>,
    /// Local tasks that must not serve (not running, or not healthy), as of the last round.
    unready: BTreeSet<TaskId>,
    /// Bumped whenever `unready` changes (DNS views depend on it).
    health_generation: u64,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("node", &self.cfg.node)
            .field("round", &self.round)
            .finish()
    }
}

impl Reconciler {
    /// Starts with an empty intent; gateway leases are read back from the task directory so
    /// that a restarted netd keeps every sandbox's address.
    pub fn new(ports: Ports, cfg: ReconcilerConfig) -> Self {
        let leases = read_json(&cfg.state_dir.join(LEASES)).unwrap_or_default();
        let external = read_json(&cfg.state_dir.join(ATTACHMENTS)).unwrap_or_default();
        Self {
            ports,
            cfg,
            intent: Intent::empty(),
            intent_generation: 0,
            leases,
            external,
            underlay: None,
            node_error: None,
            last_desired: None,
            status: BTreeMap::new(),
            projection_issues: BTreeMap::new(),
            tables: plan::Tables::default(),
            restarts: BTreeMap::new(),
            proc_snapshot: BTreeMap::new(),
            deferred: BTreeSet::new(),
            lb_applied: BTreeMap::new(),
            drains: BTreeMap::new(),
            round: 0,
            remote: None,
            remote_generation: 0,
            health_verdicts: BTreeMap::new(),
            unready: BTreeSet::new(),
            health_generation: 0,
        }
    }

    pub fn set_intent(&mut self, intent: Intent) {
        self.intent = intent;
        self.intent_generation += 1;
    }

    pub fn intent_generation(&self) -> u64 {
        self.intent_generation
    }

    /// Sets what gossip holds live (see `gossip::view`); true if it changed, and then the next
    /// round must run (the projection depends on it).
    pub fn set_remote_live(&mut self, remote: Option<crate::gossip::view::RemoteLive>) -> bool {
        if self.remote == remote {
            return false;
        }
        self.remote = remote;
        self.remote_generation += 1;
        true
    }

    pub fn remote_live(&self) -> Option<&crate::gossip::view::RemoteLive> {
        self.remote.as_ref()
    }

    pub fn remote_generation(&self) -> u64 {
        self.remote_generation
    }

    /// The endpoints this node runs, as gossip publishes them: every attachment of each
    /// intent task whose sandbox is built, with its health (`reconcile/health.rs`): healthy
    /// while its process runs and its check (if any) passes (an external task: while
    /// attached), starting until the first pass, unhealthy while down or failing.
    pub fn local_endpoints(&self) -> Vec<crate::gossip::EndpointRecord> {
        use crate::gossip::{EndpointRecord, Health};
        let Some(d) = &self.last_desired else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for sb in d.sandboxes.values() {
            let Some((t, atts)) = self.intent.task(&sb.task) else {
                continue; // the ingress sandbox is not a task
            };
            if !self.sandbox_ready(&sb.task) {
                continue;
            }
            let health = match (&sb.process, self.local_health(t).status) {
                (None, _) => Health::Healthy,
                (Some(_), swarmnet_model::spec::HealthStatus::Healthy) => Health::Healthy,
                (Some(_), swarmnet_model::spec::HealthStatus::Starting) => Health::Starting,
                (Some(_), swarmnet_model::spec::HealthStatus::Unhealthy) => Health::Unhealthy,
            };
            out.extend(atts.iter().map(|a| EndpointRecord {
                network: a.network.clone(),
                task: t.id.clone(),
                ip: std::net::IpAddr::V4(a.ip),
                mac: a.mac,
                service: Some(t.service.clone()),
                health,
            }));
        }
        out
    }

    /// Hands an external task's namespace to netd (the attach API). Only a task that the intent
    /// places on this node with `runtime: external` can be attached.
    pub fn attach(&mut self, task: TaskId, netns: PathBuf) -> Result<(), String> {
        let Some((t, _)) = self.intent.task(&task) else {
            return Err(format!(
                "task {task:?} is not in the intent; the orchestrator (or the intent file) must place it first"
            ));
        };
        if t.node != self.cfg.node {
            return Err(format!(
                "task {task:?} is placed on node {:?}, not on this node {:?}",
                t.node.as_str(),
                self.cfg.node.as_str()
            ));
        }
        if t.runtime != TaskRuntime::External {
            return Err(format!(
                "task {task:?} is run by netd; only tasks with runtime \"external\" can be attached"
            ));
        }
        if !netns.exists() {
            return Err(format!(
                "{} does not exist; pass the runtime's network namespace (e.g. /proc/<pid>/ns/net)",
                netns.display()
            ));
        }
        if let Some(old) = self.external.get(&task)
            && old != &netns
        {
            return Err(format!(
                "task {task:?} is already attached to {}; detach it first",
                old.display()
            ));
        }
        self.external.insert(task, netns);
        self.persist_attachments();
        Ok(())
    }

    pub fn detach(&mut self, task: &TaskId) -> Result<(), String> {
        if self.external.remove(task).is_none() {
            return Err(format!("task {task:?} is not attached"));
        }
        self.persist_attachments();
        Ok(())
    }

    fn persist_attachments(&self) {
        if let Err(e) = persist_json(&self.cfg.state_dir.join(ATTACHMENTS), &self.external) {
            warn!(error = %e, "cannot persist attachments");
        }
    }

    /// The ports, for tests that inject drift and for inspection.
    pub fn ports_mut(&mut self) -> &mut Ports {
        &mut self.ports
    }

    /// Gives the ports back, as a netd that stops leaves the kernel to the next one.
    pub fn into_ports(self) -> Ports {
        self.ports
    }

    pub fn status(&self) -> &BTreeMap<ObjectKey, ObjectStatus> {
        &self.status
    }
    /// Whether the sandbox of `task` has been built (its namespace and interfaces are there):
    /// confirmed, or changed in the last round. A sandbox deferred to a later round, or
    /// failing, is not.
    pub fn sandbox_ready(&self, task: &TaskId) -> bool {
        self.status
            .get(&ObjectKey::Sandbox(task.clone()))
            .is_some_and(|s| {
                s.state == ObjectState::Ok || (s.state == ObjectState::Pending && s.last_ops > 0)
            })
    }

    /// The intent in force.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

    /// Where the namespace file of `ns` is.
    pub fn netns_path(&self, ns: &NsName) -> PathBuf {
        self.ports.links.netns_path(ns)
    }

    pub fn round_number(&self) -> u64 {
        self.round
    }
    pub fn desired(&self) -> Option<&DesiredNode> {
        self.last_desired.as_ref()
    }
    /// Deletes the node firewall table. For leaving the cluster only: after a round with an
    /// intent that places nothing here, it is the one thing netd made that the node
    /// namespace still holds (a later round would put it back).
    pub fn delete_node_firewall(&mut self) -> Result<(), String> {
        self.ports
            .firewall
            .delete_table()
            .map_err(|e| e.to_string())
    }

    pub fn node_error(&self) -> Option<&str> {
        self.node_error.as_deref()
    }

    /// True when the last round left nothing pending and nothing failing.
    pub fn converged(&self) -> bool {
        self.last_desired.is_some()
            && self.deferred.is_empty()
            && self.node_error.is_none()
            && self.status.values().all(|s| s.state == ObjectState::Ok)
    }

    /// Whether an incremental round has work: pending objects, retries due, or tasks to start.
    pub fn wants_round(&mut self, now: Instant) -> bool {
        if !self.deferred.is_empty() || self.drains.values().any(|d| *d <= now) {
            return true;
        }
        if self
            .status
            .values()
            .any(|s| s.state == ObjectState::Pending || s.retry_at.is_some_and(|t| t <= now))
        {
            return true;
        }
        self.tasks_due(now)
    }

    /// Asks the process port for exits (a `waitpid` per child, a /proc read per adopted
    /// process) and says whether a round is due for them. Costly on a node with many tasks:
    /// the daemon calls it on SIGCHLD and every couple of seconds, not every tick.
    pub fn poll_processes(&mut self, now: Instant) -> bool {
        self.refresh_processes();
        self.tasks_due(now)
    }

    /// A task whose process exited, or that may (re)start now, per the last process listing.
    fn tasks_due(&self, now: Instant) -> bool {
        let Some(d) = &self.last_desired else {
            return true;
        };
        self.due_tasks(d, now).next().is_some()
    }

    /// The tasks of `desired` whose process exited, or that may (re)start now, per
    /// `proc_snapshot`.
    fn due_tasks<'a>(
        &'a self,
        desired: &'a DesiredNode,
        now: Instant,
    ) -> impl Iterator<Item = &'a TaskId> {
        desired
            .sandboxes
            .values()
            .filter(|s| s.process.is_some())
            .filter(move |s| match self.proc_snapshot.get(&s.task) {
                Some(p) => p.exit.is_some(),
                None => gate_for(self.restarts.get(&s.task), now) == ProcessGate::Start,
            })
            .map(|s| &s.task)
    }

    /// Lists the task processes once for a round (a `waitpid` or /proc read each).
    fn refresh_processes(&mut self) {
        match self.ports.processes.list() {
            Ok(v) => self.proc_snapshot = v.into_iter().map(|p| (p.task.clone(), p)).collect(),
            Err(e) => warn!(error = %e, "cannot list task processes"),
        }
    }

    fn context(&mut self) -> NodeContext {
        let addr = self.intent.node(&self.cfg.node).map(|n| n.addr);
        if let Some(addr) = addr {
            match self.ports.links.underlay_for(addr) {
                Ok(u) => {
                    self.underlay = Some(u);
                    self.node_error = None;
                }
                Err(e) => {
                    self.node_error = Some(format!(
                        "underlay: no interface in the node namespace holds {addr} ({e})"
                    ));
                }
            }
        }
        let (underlay_if, underlay_mtu) = self
            .underlay
            .clone()
            .map_or((None, 1500), |(i, m)| (Some(i), m));
        let wanted = desired::gw_tasks(&self.intent, &self.cfg.node);
        let (leases, _exhausted) = desired::lease_gw(self.cfg.gw_subnet, &self.leases, &wanted);
        if leases != self.leases {
            self.leases = leases;
            if let Err(e) = persist_json(&self.cfg.state_dir.join(LEASES), &self.leases) {
                warn!(error = %e, "cannot persist gateway leases");
            }
        }
        NodeContext {
            node: self.cfg.node.clone(),
            vxlan_port: self.cfg.vxlan_port,
            underlay_mtu,
            underlay_if,
            gw_subnet: self.cfg.gw_subnet,
            gw_leases: self.leases.clone(),
            external: self.external.clone(),
            task_dir: self.cfg.task_dir.clone(),
            unready: self.unready.clone(),
        }
    }

    /// Runs one round. `full` rounds look at everything and prune.
    pub fn round(&mut self, full: bool, now: Instant) -> RoundReport {
        self.round += 1;
        // A node the intent does not know (a mistyped --node-id, a file for another cluster)
        // must not be read as "this node should have nothing": that would prune every network
        // and task here. Refuse to reconcile and say why.
        if self.intent.node(&self.cfg.node).is_none() {
            self.node_error = Some(format!(
                "node {:?} is not in the intent; nothing is changed on this node until it is (check --node-id)",
                self.cfg.node.as_str()
            ));
            warn!(node = %self.cfg.node, "node not in the intent; round skipped");
            return RoundReport {
                full,
                ..RoundReport::default()
            };
        }
        // One process listing serves readiness (health), the scope and the observation of
        // this round: a task started last round is a backend from this one on.
        self.refresh_processes();
        self.refresh_unready();
        let ctx = self.context();
        let (mut desired, issues) =
            desired::project_with_gossip(&self.intent, &ctx, self.remote.as_ref());
        for p in desired.lb_points_mut() {
            if !p.lb.services.is_empty() {
                p.lb.timeouts = self.cfg.lb_timeouts;
            }
        }
        self.keep_draining(&mut desired, now);
        self.projection_issues = issues
            .into_iter()
            .map(|i| {
                let key = match i
                    .object
                    .strip_prefix("sandbox/")
                    .and_then(|t| TaskId::new(t).ok())
                {
                    Some(t) => ObjectKey::Sandbox(t),
                    None => ObjectKey::Node,
                };
                (key, i.message)
            })
            .collect();
        let changed = changed_objects(self.last_desired.as_ref(), &desired);
        let scope = if full {
            Scope::Full
        } else {
            let mut keys = changed.clone();
            keys.extend(std::mem::take(&mut self.deferred));
            for (k, s) in &self.status {
                if s.state == ObjectState::Pending || s.retry_at.is_some_and(|t| t <= now) {
                    keys.insert(k.clone());
                }
            }
            // Tasks whose process exited, or that may start now.
            keys.extend(
                self.due_tasks(&desired, now)
                    .map(|t| ObjectKey::Sandbox(t.clone())),
            );
            Scope::Objects(keys)
        };
        if full {
            self.deferred.clear();
        }
        let observed = self.observe(&desired, &scope);
        self.note_exits(&observed, &desired, now);
        let restarts = &self.restarts;
        let gate = |t: &TaskId| gate_for(restarts.get(t), now);
        let plans = plan::plan(&desired, &observed, &scope, &self.tables, &gate);
        let mut report = RoundReport {
            full,
            objects: plans.len(),
            ..RoundReport::default()
        };
        let planned: BTreeSet<ObjectKey> = plans.iter().map(|p| p.key.clone()).collect();
        let started = Instant::now();
        for p in plans {
            // At least one object per round, so a round always makes progress.
            if report.objects_applied > 0 && started.elapsed() > self.cfg.round_budget {
                // A big change (a node's first bring-up) is applied in slices, so that status
                // stays fresh and a newer intent is not kept waiting; the rest is pending and
                // the next round takes it up.
                report.deferred += 1;
                // A known object keeps its status (a running sandbox stays served meanwhile);
                // a new one shows as pending.
                self.status.entry(p.key.clone()).or_insert(ObjectStatus {
                    state: ObjectState::Pending,
                    error: None,
                    attempts: 0,
                    last_ops: 0,
                    retry_at: None,
                });
                self.deferred.insert(p.key.clone());
                continue;
            }
            let in_backoff = self
                .status
                .get(&p.key)
                .and_then(|s| s.retry_at)
                .is_some_and(|t| t > now);
            if in_backoff && !full {
                continue;
            }
            let n = p.ops.len();
            report.objects_applied += 1;
            match self.apply(&p, now) {
                Ok(()) => {
                    report.ops_applied += n;
                    if full && !changed.contains(&p.key) && !is_process_only(&p) {
                        report.drift_repaired += n;
                        warn!(object = %p.key, ops = n, "drift repaired");
                    }
                    self.status.insert(
                        p.key.clone(),
                        ObjectStatus {
                            state: ObjectState::Pending,
                            error: None,
                            attempts: 0,
                            last_ops: n as u32,
                            retry_at: None,
                        },
                    );
                }
                Err((done, e)) => {
                    report.ops_applied += done;
                    report.errors += 1;
                    let attempts = self.status.get(&p.key).map_or(0, |s| s.attempts) + 1;
                    warn!(object = %p.key, attempts, error = %e, "reconcile failed");
                    self.status.insert(
                        p.key.clone(),
                        ObjectStatus {
                            state: ObjectState::Error,
                            error: Some(e.to_string()),
                            attempts,
                            last_ops: done as u32,
                            retry_at: Some(now + backoff(attempts)),
                        },
                    );
                }
            }
        }
        // Objects in scope that needed nothing are confirmed ok.
        let all_keys: BTreeSet<ObjectKey> = std::iter::once(ObjectKey::Node)
            .chain(
                desired
                    .networks
                    .keys()
                    .map(|k| ObjectKey::Network(k.clone())),
            )
            .chain(
                desired
                    .sandboxes
                    .keys()
                    .map(|k| ObjectKey::Sandbox(k.clone())),
            )
            .collect();
        for k in &all_keys {
            if scope.includes(k) && !planned.contains(k) {
                self.status.insert(
                    k.clone(),
                    ObjectStatus {
                        state: ObjectState::Ok,
                        error: None,
                        attempts: 0,
                        last_ops: 0,
                        retry_at: None,
                    },
                );
            }
        }
        // Forget objects that are gone and no longer planned.
        self.status
            .retain(|k, _| all_keys.contains(k) || planned.contains(k));
        for (k, msg) in &self.projection_issues {
            self.status.insert(
                k.clone(),
                ObjectStatus {
                    state: ObjectState::Error,
                    error: Some(msg.clone()),
                    attempts: 1,
                    last_ops: 0,
                    retry_at: None,
                },
            );
        }
        self.restarts
            .retain(|t, _| desired.sandboxes.contains_key(t));
        self.last_desired = Some(desired);
        if report.ops_applied > 0 || report.errors > 0 {
            info!(
                round = self.round,
                full,
                ops = report.ops_applied,
                errors = report.errors,
                deferred = report.deferred,
                "round applied"
            );
        } else {
            debug!(round = self.round, full, "round: nothing to do");
        }
        report
    }

    /// A backend that left a service which is still on the network keeps receiving the
    /// connections it has, but no new ones, for the grace period (DESIGN.md LB requirement 4):
    /// it stays in the desired load balancer as draining until its deadline.
    fn keep_draining(&mut self, desired: &mut DesiredNode, now: Instant) {
        let grace = self.cfg.stop_grace;
        let last = self.last_desired.as_ref();
        let remote = self.remote.as_ref();
        for net in desired.lb_points_mut() {
            let Some(prev) = self.lb_applied.get(net.ns) else {
                continue;
            };
            for (key, prev_svc) in &prev.services {
                let Some(svc) = net.lb.services.get_mut(key) else {
                    continue;
                };
                for ip in prev_svc.backends.keys() {
                    let id = (net.ns.clone(), *key, *ip);
                    if svc.backends.contains_key(ip) {
                        self.drains.remove(&id);
                        continue;
                    }
                    let deadline = *self.drains.entry(id).or_insert(now + grace);
                    if deadline > now {
                        svc.backends.insert(*ip, BackendState::Draining);
                        // A remote backend stays reachable while it drains: keep its FDB and
                        // neighbour entries until the deadline. Not when gossip says its node
                        // is dead: nothing is left to reach, and the entries must go within
                        // the liveness bound.
                        if !net.peers.contains_key(ip)
                            && let Some(peer) = last
                                .and_then(|l| l.networks.get(net.network))
                                .and_then(|l| l.peers.get(ip))
                            && !remote.is_some_and(|r| r.vtep_dead(peer.1))
                        {
                            net.peers.insert(*ip, *peer);
                        }
                    }
                }
            }
        }
        self.drains.retain(|(ns, key, ip), deadline| {
            *deadline > now
                && desired.lb_in(ns).is_some_and(|lb| {
                    lb.services
                        .get(key)
                        .is_some_and(|s| s.backends.get(ip) == Some(&BackendState::Draining))
                })
        });
    }

    fn note_exits(&mut self, observed: &Observed, desired: &DesiredNode, now: Instant) {
        for p in observed.processes.values() {
            let Some(exit) = p.exit else { continue };
            let Some(proc_spec) = desired
                .sandboxes
                .get(&p.task)
                .and_then(|s| s.process.as_ref())
            else {
                continue;
            };
            let st = self.restarts.entry(p.task.clone()).or_default();
            if st.not_before.is_some_and(|t| t > now) {
                continue; // already handled this exit
            }
            let long_run = st
                .started_at
                .is_some_and(|s| now.duration_since(s) > Duration::from_secs(10));
            if long_run {
                st.exits = 0;
            }
            let stays_down = match proc_spec.restart {
                RestartPolicy::Never => true,
                RestartPolicy::OnFailure => exit.success(),
                RestartPolicy::Always => false,
            };
            st.last_exit = Some(exit);
            if stays_down {
                st.done = true;
                info!(task = %p.task, ?exit, "task exited; restart policy keeps it down");
            } else {
                st.exits += 1;
                let delay = backoff(st.exits);
                st.not_before = Some(now + delay);
                warn!(task = %p.task, ?exit, restart_in_ms = delay.as_millis() as u64, "task exited; restarting");
            }
        }
    }

    fn observe(&mut self, desired: &DesiredNode, scope: &Scope) -> Observed {
        let mut o = Observed::default();
        let links = &mut self.ports.links;
        match links.list_netns() {
            Ok(v) => o.netns = v.into_iter().collect(),
            Err(e) => warn!(error = %e, "cannot list namespaces"),
        }
        o.bound = o
            .netns
            .iter()
            .filter(|n| links.is_bound(n))
            .cloned()
            .collect();
        o.node = match scope {
            Scope::Full => observe_ns(links.as_mut(), &NsRef::Node, false),
            // The node namespace holds a veth end per sandbox, and dumping them all costs the
            // kernel a peer-namespace lookup each (quadratic in the sandbox count): an
            // incremental round fetches only the links its objects can touch.
            Scope::Objects(keys) => {
                let names = node_links_for(keys, desired, self.last_desired.as_ref());
                let mut n = NsObserved::default();
                for name in names {
                    match links.get_link(&NsRef::Node, &name) {
                        Ok(Some(l)) => n.links.push(l),
                        Ok(None) => {}
                        Err(e) => warn!(link = %name, error = %e, "cannot read a node link"),
                    }
                }
                n.addrs = links.list_addrs(&NsRef::Node).unwrap_or_default();
                n.routes = links.list_routes(&NsRef::Node).unwrap_or_default();
                n
            }
        };
        if let Ok(v) = links.get_sysctl(&NsRef::Node, "net/ipv4/ip_forward") {
            o.node
                .sysctls
                .insert("net/ipv4/ip_forward".into(), v.trim().to_owned());
        }
        if scope.includes(&ObjectKey::Node) {
            match self.ports.firewall.list_table() {
                Ok(l) => o.firewall = l.map(|l| plan::normalize_listing(&l)),
                Err(e) => warn!(error = %e, "cannot list the firewall table"),
            }
        }
        let mut wanted: BTreeSet<NsName> = BTreeSet::new();
        match scope {
            Scope::Full => wanted.extend(o.netns.iter().cloned()),
            Scope::Objects(keys) => {
                for k in keys {
                    match k {
                        ObjectKey::Network(id) => {
                            wanted.insert(desired::network_ns(id));
                        }
                        ObjectKey::Sandbox(t) => {
                            wanted.insert(desired::sandbox_ns(t));
                            for d in [Some(desired), self.last_desired.as_ref()]
                                .into_iter()
                                .flatten()
                            {
                                if let Some(s) = d.sandboxes.get(t) {
                                    wanted.extend(s.ifaces.iter().map(|i| i.net_ns.clone()));
                                }
                            }
                        }
                        ObjectKey::Orphan(ns) => {
                            wanted.insert(ns.clone());
                        }
                        ObjectKey::Node => {}
                    }
                }
            }
        }
        let ingress_sb = desired::sandbox_ns(&desired::ingress_task());
        for ns in wanted.into_iter().filter(|n| o.netns.contains(n)) {
            let net = ns.as_str().starts_with("net-");
            let at = NsRef::Owned(ns.clone());
            let mut obs = observe_ns(links.as_mut(), &at, net);
            let sysctls = if net {
                plan::LB_SYSCTLS
            } else if ns == ingress_sb {
                plan::ROUTER_SYSCTLS
            } else {
                &[]
            };
            for (key, _) in sysctls {
                if let Ok(v) = links.get_sysctl(&at, key) {
                    obs.sysctls.insert((*key).to_owned(), v.trim().to_owned());
                }
            }
            if net || ns == ingress_sb {
                let applied = self.lb_applied.get(&ns).cloned();
                let serves = desired.lb_in(&ns).is_some_and(|lb| !lb.services.is_empty());
                // A full round also looks where nothing is applied or wanted: a table left by
                // an earlier netd (the ingress network balanced in its own namespace before
                // the ingress sandbox took it over) is removed.
                if applied.is_some() || serves || matches!(scope, Scope::Full) {
                    let (in_sync, present) = match self.ports.lb.observe(&at) {
                        Ok(LbObserved::InSync) => (true, true),
                        Ok(LbObserved::Absent) => (
                            applied.as_ref().is_none_or(|a| a.services.is_empty()),
                            false,
                        ),
                        Ok(LbObserved::Drifted) => (false, true),
                        Err(e) => {
                            warn!(%ns, error = %e, "cannot observe the load balancer");
                            (false, applied.is_some())
                        }
                    };
                    o.lb.insert(
                        ns.clone(),
                        plan::LbObservedState {
                            in_sync,
                            applied,
                            present,
                        },
                    );
                }
            }
            if ns == ingress_sb {
                match self.ports.ingress_firewall.list_table() {
                    Ok(l) => o.ingress_firewall = l.map(|l| plan::normalize_listing(&l)),
                    Err(e) => warn!(error = %e, "cannot list the ingress sandbox's table"),
                }
            }
            o.ns.insert(ns, obs);
        }
        o.processes = self.proc_snapshot.clone();
        o
    }

    /// Applies one object's ops in order; stops at the first failure.
    fn apply(&mut self, p: &ObjectPlan, now: Instant) -> Result<(), (usize, PortError)> {
        for (i, op) in p.ops.iter().enumerate() {
            debug!(object = %p.key, %op, "apply");
            self.apply_op(op, now).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn apply_op(&mut self, op: &Op, now: Instant) -> PortResult<()> {
        let l = &mut self.ports.links;
        match op {
            Op::CreateNetns(ns) => l.create_netns(ns),
            Op::BindNetns { ns, from } => l.bind_netns(ns, from),
            Op::DeleteNetns(ns) => ok_if_missing(l.delete_netns(ns)),
            Op::CreateLink { ns, spec } => l.create_link(ns, spec),
            Op::SetLink { ns, name, change } => l.set_link(ns, name, change),
            Op::DeleteLink { ns, name } => ok_if_missing(l.delete_link(ns, name)),
            Op::AddAddr { ns, link, addr } => l.add_addr(ns, link, *addr),
            Op::DeleteAddr { ns, link, addr } => ok_if_missing(l.delete_addr(ns, link, *addr)),
            Op::AddRoute { ns, route } => l.add_route(ns, route),
            Op::DeleteRoute { ns, route } => ok_if_missing(l.delete_route(ns, route)),
            Op::AddFdb { ns, link, entry } => l.add_fdb(ns, link, entry),
            Op::DeleteFdb { ns, link, entry } => ok_if_missing(l.delete_fdb(ns, link, entry)),
            Op::AddNeigh { ns, link, entry } => l.add_neigh(ns, link, entry),
            Op::DeleteNeigh { ns, link, entry } => ok_if_missing(l.delete_neigh(ns, link, entry)),
            Op::SetSysctl { ns, key, value } => match l.set_sysctl(ns, key, value) {
                // IPv6 compiled out or disabled: there is no accept_ra to turn off.
                Err(e) if e.is_not_found() && key.starts_with("net/ipv6/") => Ok(()),
                // br_netfilter not loaded: bridged frames skip netfilter anyway.
                Err(e) if e.is_not_found() && key.starts_with("net/bridge/") && value == "0" => {
                    Ok(())
                }
                r => r,
            },
            Op::ApplyFirewall(ruleset) => {
                self.tables.node = None;
                self.ports.firewall.apply(ruleset)?;
                let listing = self
                    .ports
                    .firewall
                    .list_table()?
                    .map(|l| plan::normalize_listing(&l));
                self.tables.node = listing.map(|listing| plan::TableMemo {
                    ruleset: ruleset.clone(),
                    listing,
                });
                Ok(())
            }
            Op::ApplyIngressFirewall(ruleset) => {
                self.tables.ingress = None;
                self.ports.ingress_firewall.apply(ruleset)?;
                let listing = self
                    .ports
                    .ingress_firewall
                    .list_table()?
                    .map(|l| plan::normalize_listing(&l));
                self.tables.ingress = listing.map(|listing| plan::TableMemo {
                    ruleset: ruleset.clone(),
                    listing,
                });
                Ok(())
            }
            Op::StartProcess { task, ns, process } => {
                let resolv = self.cfg.task_dir.join(format!("{task}.resolv.conf"));
                write_resolv_conf(&resolv).map_err(|e| {
                    PortError::io("write resolv.conf", resolv.display().to_string(), e)
                })?;
                let spec = ProcessSpec {
                    task: task.clone(),
                    netns: l.netns_path(ns),
                    argv: process.argv.clone(),
                    env: process.env.clone(),
                    resolv_conf: Some(resolv),
                    log: process.log.clone(),
                };
                self.ports.processes.start(&spec)?;
                let st = self.restarts.entry(task.clone()).or_default();
                st.started_at = Some(now);
                st.not_before = None;
                Ok(())
            }
            Op::ApplyLb { ns, spec } => {
                let stats = self.ports.lb.apply(&NsRef::Owned(ns.clone()), spec)?;
                debug!(%ns, services_changed = stats.services_changed, messages = stats.messages, full = stats.full, "load balancer applied");
                self.lb_applied.insert(ns.clone(), spec.clone());
                Ok(())
            }
            Op::FlushLb(ns) => {
                self.lb_applied.remove(ns);
                self.ports.lb.flush(&NsRef::Owned(ns.clone()))
            }
            Op::StopProcess(t) => ok_if_missing(self.ports.processes.stop(t, self.cfg.stop_grace)),
            Op::ForgetProcess(t) => ok_if_missing(self.ports.processes.forget(t)),
        }
    }
}

fn is_process_only(p: &ObjectPlan) -> bool {
    p.ops.iter().all(|o| {
        matches!(
            o,
            Op::StartProcess { .. } | Op::ForgetProcess(_) | Op::StopProcess(_)
        )
    })
}

fn gate_for(st: Option<&RestartState>, now: Instant) -> ProcessGate {
    match st {
        Some(s) if s.done => ProcessGate::Done,
        Some(s) if s.not_before.is_some_and(|t| t > now) => ProcessGate::Wait,
        _ => ProcessGate::Start,
    }
}

fn ok_if_missing(r: PortResult<()>) -> PortResult<()> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}

/// The node-namespace links the objects in `keys` can touch: the gateway bridge, VXLAN
/// devices of the networks (a leftover of a crash between create and move), gateway veth ends
/// of the sandboxes.
fn node_links_for(
    keys: &BTreeSet<ObjectKey>,
    desired: &DesiredNode,
    last: Option<&DesiredNode>,
) -> BTreeSet<IfName> {
    let mut out = BTreeSet::new();
    for k in keys {
        match k {
            ObjectKey::Node => {
                out.insert(IfName::new(desired::GW_BRIDGE).expect("valid"));
            }
            ObjectKey::Network(id) => {
                for d in std::iter::once(desired).chain(last) {
                    if let Some(n) = d.networks.get(id) {
                        out.insert(n.vxlan.clone());
                    }
                }
            }
            ObjectKey::Sandbox(t) => {
                out.insert(desired::gw_host_if(t));
            }
            ObjectKey::Orphan(_) => {}
        }
    }
    out
}

/// Observes one namespace. A failed dump leaves that part empty; the planner then tries to
/// create what it expects, and the resulting error lands on the object's status.
fn observe_ns(links: &mut dyn LinkPort, ns: &NsRef, with_fdb: bool) -> NsObserved {
    let mut o = NsObserved::default();
    match links.list_links(ns) {
        Ok(v) => o.links = v,
        Err(e) => {
            warn!(%ns, error = %e, "cannot list links");
            return o;
        }
    }
    o.addrs = links.list_addrs(ns).unwrap_or_default();
    o.routes = links.list_routes(ns).unwrap_or_default();
    if with_fdb {
        let vx: Vec<IfName> = o
            .links
            .iter()
            .filter(|l| matches!(l.kind, LinkKindState::Vxlan { .. }))
            .map(|l| l.name.clone())
            .collect();
        for name in vx {
            o.fdb.insert(
                name.clone(),
                links
                    .list_fdb(ns, &name)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            );
            o.neighs.insert(
                name.clone(),
                links
                    .list_neighs(ns, &name)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            );
        }
    }
    o
}

/// Objects whose desired state differs between two projections (added, removed or changed).
pub fn changed_objects(old: Option<&DesiredNode>, new: &DesiredNode) -> BTreeSet<ObjectKey> {
    let mut out = BTreeSet::new();
    let Some(old) = old else {
        out.insert(ObjectKey::Node);
        out.extend(new.networks.keys().map(|k| ObjectKey::Network(k.clone())));
        out.extend(new.sandboxes.keys().map(|k| ObjectKey::Sandbox(k.clone())));
        return out;
    };
    let gw_ifs = |d: &DesiredNode| {
        d.sandboxes
            .values()
            .filter_map(|s| s.gw.as_ref().map(|g| g.host_if.clone()))
            .collect::<BTreeSet<_>>()
    };
    // The node object owns the node firewall (VTEPs, published ports) and the ingress route.
    if old.vteps != new.vteps
        || old.gw_bridge != new.gw_bridge
        || old.vxlan_port != new.vxlan_port
        || gw_ifs(old) != gw_ifs(new)
        || old.published != new.published
        || old.ingress_route != new.ingress_route
    {
        out.insert(ObjectKey::Node);
    }
    for k in old.networks.keys().chain(new.networks.keys()) {
        if old.networks.get(k) != new.networks.get(k) {
            out.insert(ObjectKey::Network(k.clone()));
        }
    }
    for k in old.sandboxes.keys().chain(new.sandboxes.keys()) {
        if old.sandboxes.get(k) != new.sandboxes.get(k) {
            out.insert(ObjectKey::Sandbox(k.clone()));
        }
    }
    out
}

/// The resolv.conf every task sees (bind-mounted over /etc/resolv.conf in its private mount
/// namespace): the embedded resolver only. `ndots:0` sends every name to it as written, so a
/// service name is one query, not a walk through search domains.
pub const RESOLV_CONF: &str = "# written by swarmnet-netd: the embedded resolver of this sandbox\nnameserver 127.0.0.11\noptions ndots:0\n";

fn write_resolv_conf(path: &Path) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == RESOLV_CONF) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, RESOLV_CONF)?;
    std::fs::rename(&tmp, path)
}

const LEASES: &str = "gw-leases.json";
const ATTACHMENTS: &str = "attachments.json";

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read state file");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "state file is corrupt; starting without it");
            None
        }
    }
}

/// Writes JSON atomically (temp file + rename).
pub fn persist_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}
