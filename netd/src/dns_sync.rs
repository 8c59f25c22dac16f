//! Keeps the DNS server's sandboxes in step with the reconciler: after every round, each local
//! sandbox gets the view of its task (built from the intent) and its forwarding policy.
//!
//! Views depend only on the intent (with gossip: and on which remote tasks gossip holds live)
//! and on the ordered networks of the asking task, so one view
//! is built per distinct network list and shared (`Arc`) by every sandbox on the same networks:
//! a node with a thousand sandboxes on three networks builds three views per intent change.
//! Nothing is rebuilt when neither the intent nor the set of sandboxes changed, unless the last
//! sync left a sandbox without its resolver (it is retried).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use swarmnet_model::{Name, TaskId};
use tracing::{debug, warn};

use crate::dns::{DenyAnswer, DnsServer, DnsView, ForwardPolicy, SandboxDns, ViewOptions};
use crate::reconcile::{Drift, Reconciler};

/// DNS settings from netd's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSyncConfig {
    pub ttl: u32,
    pub upstreams: Vec<SocketAddr>,
    pub deny: DenyAnswer,
}

#[derive(Debug)]
pub struct DnsSync {
    server: DnsServer,
    cfg: DnsSyncConfig,
    /// (intent generation, gossip view generation, local health generation) of the last sync.
    last_generation: (u64, u64, u64),
    last_set: BTreeMap<TaskId, PathBuf>,
    /// Sandboxes whose resolver could not be opened in the last sync (retried).
    failing: BTreeSet<TaskId>,
    /// One view (and forwarding policy) per distinct network list, for `views_generation`.
    views: HashMap<Vec<Name>, (Arc<DnsView>, ForwardPolicy)>,
    views_generation: (u64, u64, u64),
}

impl DnsSync {
    pub fn new(server: DnsServer, cfg: DnsSyncConfig) -> Self {
        Self {
            server,
            cfg,
            last_generation: (0, 0, 0),
            last_set: BTreeMap::new(),
            failing: BTreeSet::new(),
            views: HashMap::new(),
            views_generation: (0, 0, 0),
        }
    }

    /// Whether a sandbox is waiting for its resolver (the next sync retries it).
    pub fn pending_retry(&self) -> bool {
        !self.failing.is_empty()
    }

    /// Restores redirect tables removed or changed behind netd's back (called on full rounds);
    /// returns the sandboxes that had drifted and what differed.
    pub fn repair_redirect(&mut self) -> Vec<(TaskId, String)> {
        self.server.repair_redirect()
    }

    /// Sandboxes whose DNAT table differs from what was applied, read fresh: `inspect` drift
    /// entries `dns/<task>` beside the reconciler's own.
    pub fn drift(&self) -> Vec<Drift> {
        self.server
            .drift()
            .into_iter()
            .map(|(task, what)| Drift {
                object: format!("dns/{task}"),
                ops: vec![what],
            })
            .collect()
    }

    /// Per sandbox (task id): what its resolver answers now, or why it is not serving.
    pub fn inspect(&self) -> BTreeMap<String, serde_json::Value> {
        let mut out: BTreeMap<String, serde_json::Value> = self
            .server
            .inspect()
            .into_iter()
            .map(|(t, i)| {
                let v = serde_json::to_value(&i).unwrap_or(serde_json::Value::Null);
                (t.to_string(), v)
            })
            .collect();
        for t in &self.failing {
            out.insert(
                t.to_string(),
                serde_json::json!({"error": "resolver not started; retrying (see netd's log)"}),
            );
        }
        out
    }

    /// Brings the server in line with the reconciler's current intent and sandboxes.
    pub fn sync(&mut self, rec: &Reconciler) {
        let Some(desired) = rec.desired() else { return };
        let want: BTreeMap<TaskId, PathBuf> = desired
            .sandboxes
            .values()
            // Sandboxes still being built join when they are (the next sync after their round).
            .filter(|s| rec.sandbox_ready(&s.task))
            .map(|s| (s.task.clone(), rec.netns_path(&s.ns)))
            .collect();
        // Views depend on the intent, on which local tasks are ready (health) and, with gossip,
        // on which remote tasks are live.
        let generation = (
            rec.intent_generation(),
            rec.remote_generation(),
            rec.health_generation(),
        );
        if self.failing.is_empty() && generation == self.last_generation && want == self.last_set {
            return;
        }
        let intent = rec.intent();
        // A local task answers only while ready (running, and healthy when it has a check).
        let mut live = match rec.remote_live() {
            Some(r) => r.live_tasks(intent, &desired.node),
            None => intent
                .tasks()
                .filter(|(t, _)| t.desired_state == swarmnet_model::spec::DesiredState::Running)
                .map(|(t, _)| t.id.clone())
                .collect(),
        };
        live.retain(|t| !rec.unready().contains(t));
        let opts = ViewOptions {
            ttl: self.cfg.ttl,
            live: Some(live),
        };
        // Views of the intent in force are kept: the sync after a round (new sandboxes) and
        // retries reuse them; a new intent starts afresh.
        if self.views_generation != generation {
            self.views.clear();
            self.views_generation = generation;
        }
        let shared = &mut self.views;
        let mut set = BTreeMap::new();
        for (task, netns) in &want {
            let nets: Vec<Name> = intent
                .task(task)
                .map(|(_, atts)| atts.iter().map(|a| a.network.clone()).collect())
                .unwrap_or_default();
            let (view, forward) = shared
                .entry(nets)
                .or_insert_with(|| {
                    let view = Arc::new(DnsView::build(intent, task, &opts));
                    let policy =
                        ForwardPolicy::for_task(intent, task, &self.cfg.upstreams, self.cfg.deny);
                    (view, policy)
                })
                .clone();
            set.insert(
                task.clone(),
                SandboxDns {
                    netns: netns.clone(),
                    view,
                    forward,
                },
            );
        }
        let errors = self.server.set_sandboxes(set);
        let failing: BTreeSet<TaskId> = errors.iter().map(|e| e.task.clone()).collect();
        for e in &errors {
            if !self.failing.contains(&e.task) {
                warn!(task = %e.task, error = %e, cause = %e.source, "dns: resolver not started; retrying");
            }
        }
        debug!(
            sandboxes = want.len(),
            views = shared.len(),
            errors = errors.len(),
            "dns synced"
        );
        self.failing = failing;
        self.last_generation = generation;
        self.last_set = want;
    }
}
