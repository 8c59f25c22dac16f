//! The daemon loop: watches the intent file, runs incremental rounds on change and full rounds
//! on a timer, and writes `status.json` after every round. Single-threaded: the reconciler owns
//! the ports, so two rounds never race.
//!
//! Stopping netd (SIGTERM, SIGINT, or `kill -9`) leaves the data plane and the tasks as they are:
//! the next netd adopts them. Only a change of intent removes things.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use swarmnet_model::Intent;
use tracing::{error, info, warn};

use std::sync::mpsc::Receiver;

use crate::api::{Call, Request, Response};
use crate::config::{IntentSource, NetdConfig};
use crate::dns_sync::DnsSync;
use crate::gossip_sync::GossipSync;
use crate::plan::ObjectKey;
use crate::reconcile::{ObjectStatus, Reconciler, persist_json};
use crate::selftest::SelfTest;

/// How often the intent file and the task processes are looked at.
const TICK: Duration = Duration::from_millis(100);
/// Rounds in a row without waiting for the tick while one is wanted right away.
const EAGER_ROUNDS: u32 = 4;
/// Health checks running at once on a node (each is a process start in a task's namespaces).
const MAX_CONCURRENT_CHECKS: usize = 8;

/// What `status.json` holds: for tests, for `swarmnet inspect`, for operators.
#[derive(Debug, Serialize)]
pub struct StatusFile<'a> {
    pub node: &'a str,
    pub pid: u32,
    pub round: u64,
    pub full: bool,
    pub intent_generation: u64,
    pub intent_error: Option<&'a str>,
    pub node_error: Option<&'a str>,
    pub converged: bool,
    pub objects: std::collections::BTreeMap<String, &'a ObjectStatus>,
    /// The last self-test of each published port (after full rounds).
    pub published: std::collections::BTreeMap<String, crate::selftest::PortCheck>,
    /// Gossip counters and membership (absent when gossip is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip: Option<crate::gossip_sync::GossipStatus>,
    /// Each local task's health: `healthy` (serving), `starting` (its check has not passed
    /// yet, or its process is not running yet), `unhealthy` (failing, or its process exited).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub health: std::collections::BTreeMap<String, crate::reconcile::LocalHealth>,
}

/// Identity of the intent file's current content, cheap to poll.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// Watches the intent file by polling its stamp: it works with editors and with atomic
/// rename-into-place alike, and costs one stat per tick.
#[derive(Debug)]
pub struct IntentWatcher {
    path: PathBuf,
    last: Option<FileStamp>,
    pub error: Option<String>,
    /// Set when intent comes from the orchestrator instead of the file.
    feed: Option<crate::assign::AssignmentFeed>,
}

impl IntentWatcher {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            last: None,
            error: None,
            feed: None,
        }
    }

    /// Intent from the orchestrator's assignment stream.
    pub fn from_managers(feed: crate::assign::AssignmentFeed) -> Self {
        Self {
            feed: Some(feed),
            ..Self::new(PathBuf::new())
        }
    }

    /// With the orchestrator, tells it the state of this node's tasks after a round.
    /// What to wait on between ticks: the feed's wakeup with managers, none with a file.
    pub fn wakeup(&self) -> Option<std::sync::Arc<crate::assign::Wakeup>> {
        self.feed
            .as_ref()
            .map(crate::assign::AssignmentFeed::wakeup)
    }

    /// With the orchestrator, tells it which gossip keys are in force here (heartbeats).
    pub fn report_gossip_keys(&self, gossip: Option<&GossipSync>) {
        if let Some(feed) = &self.feed {
            feed.set_gossip_keys(gossip.and_then(GossipSync::running_keys));
        }
    }

    pub fn report_tasks(&self, rec: &Reconciler, node: &swarmnet_model::NodeId) {
        if let Some(feed) = &self.feed {
            feed.set_reports(crate::assign::task_reports(rec, node));
        }
    }

    /// A new valid intent if the file changed and parses; a parse failure is kept in `error`
    /// and the previous intent stays in force.
    pub fn poll(&mut self) -> Option<Intent> {
        if let Some(feed) = &mut self.feed {
            let intent = feed.poll();
            self.error = feed.error();
            return intent;
        }
        let now = stamp(&self.path);
        if now.is_some() && now == self.last {
            return None;
        }
        if now.is_none() {
            let msg = format!("intent file {} does not exist", self.path.display());
            if self.error.as_deref() != Some(&msg) {
                warn!(path = %self.path.display(), "intent file missing; keeping the current state");
                self.error = Some(msg);
            }
            return None;
        }
        self.last = now;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                self.error = Some(format!("cannot read {}: {e}", self.path.display()));
                return None;
            }
        };
        match Intent::from_json(&text) {
            Ok(i) => {
                self.error = None;
                Some(i)
            }
            Err(e) => {
                error!(path = %self.path.display(), error = %e, "intent refused; the previous intent stays in force");
                self.error = Some(e.to_string());
                None
            }
        }
    }
}

fn status_json(
    cfg: &NetdConfig,
    rec: &Reconciler,
    watcher: &IntentWatcher,
    full: bool,
    selftest: &SelfTest,
    gossip: Option<&GossipSync>,
) -> serde_json::Value {
    let status = StatusFile {
        node: cfg.node_id.as_str(),
        pid: std::process::id(),
        round: rec.round_number(),
        full,
        intent_generation: rec.intent_generation(),
        intent_error: watcher.error.as_deref(),
        node_error: rec.node_error(),
        converged: rec.converged() && watcher.error.is_none(),
        objects: rec
            .status()
            .iter()
            .map(|(k, v): (&ObjectKey, _)| (k.to_string(), v))
            .collect(),
        published: selftest.results(),
        gossip: gossip.map(GossipSync::status),
        health: rec
            .local_health_all()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    serde_json::to_value(&status).expect("status serializes")
}

/// Answers one local-API request. Attach and detach run a round at once, so that when the
/// answer comes the interfaces are in place (or the error says why not). Leave empties the
/// node (the caller then ends the loop).
fn answer(
    cfg: &NetdConfig,
    rec: &mut Reconciler,
    watcher: &IntentWatcher,
    selftest: &SelfTest,
    gossip: Option<&mut GossipSync>,
    dns: &mut DnsSync,
    req: Request,
) -> Response {
    let task = match &req {
        Request::Attach { task, .. } | Request::Detach { task } => Some(task.clone()),
        Request::Status {} | Request::Inspect {} | Request::Leave {} => None,
    };
    let mut inspect = None;
    let r = match req {
        Request::Leave {} => return leave(&cfg.node_id, cfg.advertise_addr, rec, dns, gossip),
        Request::Inspect {} => {
            let mut report = rec.inspect(Instant::now());
            report.dns = dns.inspect();
            report.drift.extend(dns.drift());
            inspect = Some(serde_json::to_value(&report).expect("inspection serializes"));
            Ok(())
        }
        Request::Status {} => Ok(()),
        Request::Attach { task, netns } => rec.attach(task, netns),
        Request::Detach { task } => rec.detach(&task),
    };
    if let Err(e) = r {
        return Response::error(e);
    }
    if let Some(t) = task {
        let now = Instant::now();
        rec.round(false, now);
        rec.round(false, now);
        if let Some(s) = rec.status().get(&ObjectKey::Sandbox(t))
            && let Some(e) = &s.error
        {
            return Response::error(e.clone());
        }
    }
    Response {
        inspect,
        status: Some(status_json(
            cfg,
            rec,
            watcher,
            false,
            selftest,
            gossip.as_deref(),
        )),
        ..Response::ok()
    }
}

/// How long leaving waits for the node's tasks to stop and its objects to go.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The node leaves: an intent that places nothing here, full rounds until every object netd
/// made is gone (tasks stop with their stop grace), this node's endpoints withdrawn from
/// gossip. Answers what is left, as an error, if anything could not be removed in time.
fn leave(
    node: &swarmnet_model::NodeId,
    advertise: Option<std::net::Ipv4Addr>,
    rec: &mut Reconciler,
    dns: &mut DnsSync,
    gossip: Option<&mut GossipSync>,
) -> Response {
    info!("leaving the cluster: stopping tasks, removing every object netd made");
    // This node alone, with nothing placed on it (a node missing from the intent would make
    // the reconciler skip its rounds rather than empty it). The managers may already have
    // sent an intent without it (it was removed first): then its address comes from the
    // configuration.
    let me = rec.intent().node(node).cloned().or_else(|| {
        advertise.map(|addr| swarmnet_model::spec::NodeSpec {
            id: node.clone(),
            hostname: None,
            addr,
            labels: Default::default(),
            role: Default::default(),
            availability: Default::default(),
            data_interface: None,
            ingress_ip: None,
        })
    });
    let Some(mut me) = me else {
        return Response::error(
            "this node is not in the intent and netd has no --advertise-addr: nothing to leave from",
        );
    };
    me.ingress_ip = None;
    let nodes = vec![me];
    let empty = swarmnet_model::Intent::new(swarmnet_model::spec::ClusterSpec {
        version: 1,
        nodes,
        networks: vec![],
        services: vec![],
        tasks: vec![],
    });
    match empty {
        Ok(i) => rec.set_intent(i),
        Err(e) => return Response::error(format!("cannot make the empty intent: {e}")),
    }
    let deadline = Instant::now() + LEAVE_TIMEOUT;
    let left = loop {
        rec.round(true, Instant::now());
        dns.sync(rec);
        // The node object stays (it is what holds the node-wide state, empty now); what it
        // could not remove shows as its error.
        let left: Vec<String> = rec
            .status()
            .iter()
            .filter(|(k, st)| **k != ObjectKey::Node || st.error.is_some())
            .map(|(k, st)| match &st.error {
                Some(e) => format!("{k} ({e})"),
                None => k.to_string(),
            })
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(TICK);
    };
    if let Some(g) = gossip {
        g.publish(rec);
    }
    let mut left = left;
    if let Err(e) = rec.delete_node_firewall() {
        left.push(format!("the node firewall table ({e})"));
    }
    if left.is_empty() {
        Response::ok()
    } else {
        Response::error(format!(
            "left behind after {}s: {}",
            LEAVE_TIMEOUT.as_secs(),
            left.join(", ")
        ))
    }
}

/// How the daemon loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A signal: the data plane and tasks stay as they are.
    Stopped,
    /// The node left its cluster: everything netd made is gone.
    Left,
}

/// Runs until `shutdown` is set, answering local-API calls from `calls`.
pub fn run(
    cfg: &NetdConfig,
    mut rec: Reconciler,
    mut dns: DnsSync,
    calls: Receiver<Call>,
    shutdown: Arc<AtomicBool>,
    child_exited: Arc<AtomicBool>,
) -> anyhow::Result<Ended> {
    let (mut watcher, source) = match &cfg.intent {
        IntentSource::File(path) => (IntentWatcher::new(path.clone()), path.display().to_string()),
        IntentSource::Managers { addrs, join_token } => (
            IntentWatcher::from_managers(crate::assign::AssignmentFeed::start(
                crate::assign::FeedConfig {
                    node: cfg.node_id.clone(),
                    hostname: cfg.node_id.to_string(),
                    addr: cfg.advertise_addr.expect("validated with --managers"),
                    managers: addrs.clone(),
                    join_token: join_token.clone(),
                    state_file: cfg.run_dir.join("assignment.json"),
                    gossip_key_file: cfg.gossip.as_ref().map(|g| g.key_file.clone()),
                },
            )),
            format!("managers {}", addrs.join(",")),
        ),
    };
    let status_path = cfg.run_dir.join("status.json");
    let mut next_full: Option<Instant> = None;
    let mut last_err: Option<String> = None;
    let mut tick: u64 = 0;
    // With managers, the feed wakes the loop on a new assignment; gossip wakes it on a new
    // view of the live nodes in both modes.
    let wakeup = watcher.wakeup().unwrap_or_default();
    let mut eager = 0;
    let mut reported_keys = 0;
    let selftest = SelfTest::default();
    let mut last_checks = std::collections::BTreeMap::new();
    // With managers, the key file appears with the first assignment: gossip starts then.
    let managed = matches!(cfg.intent, IntentSource::Managers { .. });
    let mut gossip = match &cfg.gossip {
        Some(g) if !managed || g.key_file.exists() => Some(GossipSync::new(
            cfg.node_id.clone(),
            g.clone(),
            wakeup.clone(),
        )?),
        _ => None,
    };
    let mut health = crate::health::HealthMonitor::start(
        Box::new(crate::linux::health_exec::LinuxCheckRunner::new(
            cfg.task_path.as_str(),
        )),
        MAX_CONCURRENT_CHECKS,
    );
    info!(node = %cfg.node_id, intent = %source, "netd running");
    while !shutdown.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut ran = None;
        // A change of what gossip holds live is a change of the projection's input: it gets
        // an incremental round (FDB, LB backends) and a DNS sync in this same tick.
        if gossip.is_none()
            && managed
            && let Some(g) = &cfg.gossip
            && g.key_file.exists()
        {
            match GossipSync::new(cfg.node_id.clone(), g.clone(), wakeup.clone()) {
                Ok(sync) => gossip = Some(sync),
                Err(e) => warn!(error = %e, "gossip: the managers' keyring is not usable yet"),
            }
        }
        let gossip_changed = gossip.as_mut().is_some_and(|g| g.tick(&mut rec, now));
        // The keys in force, told to the managers (heartbeats) when they may have changed.
        let key_generation = gossip.as_ref().map_or(0, GossipSync::key_generation);
        if key_generation != reported_keys {
            reported_keys = key_generation;
            watcher.report_gossip_keys(gossip.as_ref());
        }
        // A health transition changes backends, published ports, DNS and what gossip says of
        // the task: it gets a round in this same tick.
        let health_changed = health.poll().is_some_and(|h| rec.set_local_health(h));
        if let Some(intent) = watcher.poll() {
            if let Some(addr) = cfg.advertise_addr
                && let Some(n) = intent.node(&cfg.node_id)
                && n.addr != addr
            {
                watcher.error = Some(format!(
                    "the intent gives node {} the address {}, but netd was started with --advertise-addr {addr}",
                    cfg.node_id, n.addr
                ));
                error!(error = watcher.error.as_deref(), "intent refused");
            } else {
                let first = rec.intent_generation() == 0;
                rec.set_intent(intent);
                info!(generation = rec.intent_generation(), "intent loaded");
                // Names depend on the intent alone: existing sandboxes get their new answers
                // now, not after a round that may spend its time building other sandboxes.
                dns.sync(&rec);
                // The first round after start is full: adopt what is there and prune the rest.
                ran = Some(rec.round(first, now));
                if first {
                    next_full = Some(now + cfg.full_reconcile_interval);
                }
            }
        } else if next_full.is_some_and(|t| t <= now) {
            ran = Some(rec.round(true, now));
            next_full = Some(now + cfg.full_reconcile_interval);
        } else if rec.intent_generation() > 0
            && (gossip_changed
                || health_changed
                || rec.wants_round(now)
                || ((child_exited.swap(false, Ordering::Relaxed) || tick.is_multiple_of(20))
                    && rec.poll_processes(now)))
        {
            ran = Some(rec.round(false, now));
        }
        tick += 1;
        if ran.is_some() {
            watcher.report_tasks(&rec, &cfg.node_id);
            health.set_targets(rec.health_targets());
        }
        if let Some(g) = gossip.as_mut()
            && ran.is_some()
        {
            g.publish(&rec);
        }
        if ran.is_some() || (dns.pending_retry() && tick.is_multiple_of(10)) {
            // Answers follow the round at once (an intent change shows in DNS within a tick);
            // a sandbox whose resolver could not start is retried about once a second.
            dns.sync(&rec);
        }
        let mut answered = false;
        while let Ok((req, reply)) = calls.try_recv() {
            let leaving = req == (Request::Leave {});
            let _ = reply.send(answer(
                cfg,
                &mut rec,
                &watcher,
                &selftest,
                gossip.as_mut(),
                &mut dns,
                req,
            ));
            if leaving {
                // The managers' next assignment must not bring anything back: netd exits.
                shutdown.store(true, Ordering::Relaxed);
                info!("left the cluster; netd exits");
                return Ok(Ended::Left);
            }
            dns.sync(&rec);
            answered = true;
        }
        if ran.as_ref().is_some_and(|r| r.full) {
            // The resolver's redirect tables in the sandboxes are ours too: restored after a
            // foreign flush like every other object (ANCHORS: our rules, reconciled).
            dns.repair_redirect();
        }
        if ran.as_ref().is_some_and(|r| r.full)
            && let (Some(addr), Some(d)) = (
                rec.intent().node(&cfg.node_id).map(|n| n.addr),
                rec.desired(),
            )
            && !d.published.is_empty()
        {
            selftest.start(addr, d.published.clone());
        }
        let checks = selftest.results();
        let checks_changed = checks != last_checks;
        last_checks = checks;
        // With gossip, counters move without rounds: status is also refreshed every second.
        let gossip_due = gossip.is_some() && tick.is_multiple_of(10);
        if ran.is_some() || answered || checks_changed || gossip_due || watcher.error != last_err {
            last_err = watcher.error.clone();
            let full = ran.as_ref().is_some_and(|r| r.full);
            if let Err(e) = persist_json(
                &status_path,
                &status_json(cfg, &rec, &watcher, full, &selftest, gossip.as_ref()),
            ) {
                warn!(error = %e, path = %status_path.display(), "cannot write status");
            }
        }
        // A round that left objects to confirm (a sandbox just built and its process just
        // started is confirmed by the next round, and only then reported running and made a
        // backend) is followed by the next one at once, a few times in a row at most: every
        // round makes progress, and the tick stays the pace otherwise.
        if ran.is_some() && rec.wants_round(Instant::now()) && eager < EAGER_ROUNDS {
            eager += 1;
            continue;
        }
        eager = 0;
        // A new assignment (with managers) or a new gossip view ends the wait at once: it is
        // applied now, not at the next tick (which stays the pace of everything else).
        wakeup.wait(TICK);
    }
    info!("netd stopping; the data plane and tasks stay as they are");
    Ok(Ended::Stopped)
}
