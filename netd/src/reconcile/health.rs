//! The reconciler's side of task health: which local tasks are ready to serve (the projection
//! leaves the others out of load balancers, published ports and DNS, and gossip publishes them
//! as not healthy), what the health monitor should check, and what status and the
//! orchestrator are told.
//!
//! A local task run by netd is *ready* while its process runs and, when its service has a
//! health check, its last verdict on that very process (same pid) is `healthy`. An external
//! task is ready while attached (netd cannot run checks in a namespace it did not build).

use std::collections::{BTreeMap, BTreeSet};

use swarmnet_model::TaskId;
use swarmnet_model::spec::{HealthStatus, TaskRuntime, TaskSpec};

use super::Reconciler;
use crate::health::{HealthTarget, TaskHealth};

/// A local task's health as status.json, inspect and the orchestrator show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LocalHealth {
    pub status: HealthStatus,
    /// The process is not running (not started yet, or exited).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub down: bool,
    /// How its process ended, when it did (and was not restarted yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<crate::port::Exit>,
    /// The check's details (tasks with a check, once checked).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub check: Option<TaskHealth>,
}

impl Reconciler {
    /// Takes the health monitor's verdicts; true when a task's status changed (then a round
    /// must run: backends, published ports, DNS and gossip follow).
    pub fn set_local_health(&mut self, health: BTreeMap<TaskId, TaskHealth>) -> bool {
        let statuses = |m: &BTreeMap<TaskId, TaskHealth>| -> BTreeMap<TaskId, (HealthStatus, u32)> {
            m.iter()
                .map(|(k, v)| (k.clone(), (v.status, v.pid)))
                .collect()
        };
        let changed = statuses(&health) != statuses(&self.health_verdicts);
        self.health_verdicts = health;
        changed
    }

    /// Bumped whenever the set of ready local tasks changes (DNS views depend on it).
    pub fn health_generation(&self) -> u64 {
        self.health_generation
    }

    /// Local tasks that must not serve, as of the last round.
    pub fn unready(&self) -> &BTreeSet<TaskId> {
        &self.unready
    }

    /// The health of local task `t`, from the last process listing and check verdicts.
    pub fn local_health(&self, t: &TaskSpec) -> LocalHealth {
        if t.runtime == TaskRuntime::External {
            return LocalHealth {
                status: HealthStatus::Healthy,
                down: false,
                exit: None,
                check: None,
            };
        }
        let running = self.proc_snapshot.get(&t.id).filter(|p| p.exit.is_none());
        let check = self
            .intent
            .service(&t.service)
            .and_then(|s| s.health.as_ref());
        let verdict = self.health_verdicts.get(&t.id);
        // Exited: still listed, or forgotten and kept down by the restart policy.
        let exit = match self.proc_snapshot.get(&t.id) {
            Some(p) => p.exit,
            None => self
                .restarts
                .get(&t.id)
                .filter(|r| r.done)
                .and_then(|r| r.last_exit),
        };
        let status = match (running, check) {
            (None, _) => {
                if exit.is_some() {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Starting
                }
            }
            (Some(_), None) => HealthStatus::Healthy,
            (Some(p), Some(_)) => verdict
                .filter(|v| v.pid == p.pid)
                .map_or(HealthStatus::Starting, |v| v.status),
        };
        LocalHealth {
            status,
            down: running.is_none(),
            exit,
            check: check.and(verdict.cloned()),
        }
    }

    /// Every local task's health (tasks of this node in the intent).
    pub fn local_health_all(&self) -> BTreeMap<TaskId, LocalHealth> {
        self.intent
            .tasks()
            .filter(|(t, _)| t.node == self.cfg.node)
            .map(|(t, _)| (t.id.clone(), self.local_health(t)))
            .collect()
    }

    /// Recomputes the local tasks that must not serve; bumps the generation on a change.
    pub(super) fn refresh_unready(&mut self) {
        let unready: BTreeSet<TaskId> = self
            .intent
            .tasks()
            .filter(|(t, _)| t.node == self.cfg.node)
            .filter(|(t, _)| self.local_health(t).status != HealthStatus::Healthy)
            .map(|(t, _)| t.id.clone())
            .collect();
        if unready != self.unready {
            self.unready = unready;
            self.health_generation += 1;
        }
    }

    /// What the health monitor should check now: local tasks whose service has a check and
    /// whose process runs in a built sandbox.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        let Some(d) = &self.last_desired else {
            return Vec::new();
        };
        d.sandboxes
            .values()
            .filter(|sb| sb.process.is_some())
            .filter_map(|sb| {
                let (t, _) = self.intent.task(&sb.task)?;
                let check = self.intent.service(&t.service)?.health.clone()?;
                let p = self
                    .proc_snapshot
                    .get(&sb.task)
                    .filter(|p| p.exit.is_none())?;
                Some(HealthTarget {
                    task: t.id.clone(),
                    pid: p.pid,
                    netns: self.ports.links.netns_path(&sb.ns),
                    env: crate::desired::task_env(t),
                    check,
                })
            })
            .collect()
    }
}
