//! What becomes of a task its node reports failed (its process exited with an error, it
//! turned unhealthy, its sandbox could not be built) or complete: the service's restart
//! policy decides, as Swarm's does. `always` (the default, Swarm's `any`) replaces it either
//! way, `on_failure` only when it failed, `never` leaves it as it is. A replaced task leaves
//! the state (its addresses are released) for the service's history, where `service ps` shows
//! it and why; the reconcile step that follows every command creates its replacement in the
//! same slot (global services: on the same node).
//!
//! netd never restarts orchestrated tasks itself: the projection gives every service the
//! `never` policy, so one authority (this one) decides, and a crash-looping task shows as a
//! trail of failed tasks rather than a silently restarting one.

use swarmnet_model::TaskId;
use swarmnet_model::spec::{HealthStatus, RestartPolicy};

use super::{ClusterState, TaskState};

/// Replaced tasks kept per service for `service ps`.
pub const HISTORY_LEN: usize = 10;

impl ClusterState {
    /// Records the health a node reported for one of its tasks.
    pub(super) fn note_health(&mut self, id: &TaskId, health: Option<HealthStatus>) {
        if let Some(t) = self.tasks.get_mut(id) {
            t.health = health;
            return;
        }
        // Replaced by this very report: the history keeps the verdict.
        if let Some(t) = self
            .history
            .values_mut()
            .flat_map(|h| h.iter_mut())
            .find(|t| &t.id == id)
        {
            t.health = health;
        }
    }

    /// The restart delay of `id` if it ended (failed or completed) and its service's policy
    /// replaces it; `None` otherwise.
    pub fn restart_due(&self, id: &TaskId) -> Option<u64> {
        let t = self.tasks.get(id)?;
        let svc = self.services.get(&t.service)?;
        let replace = matches!(
            (t.status.state, svc.def.restart),
            (
                TaskState::Failed,
                RestartPolicy::Always | RestartPolicy::OnFailure
            ) | (TaskState::Complete, RestartPolicy::Always)
        );
        (replace && !t.draining).then_some(svc.def.restart_delay_ms)
    }

    /// Ended tasks waiting for their restart delay, with the delay (ms), for the leader.
    pub fn awaiting_restart(&self) -> Vec<(TaskId, u64)> {
        self.tasks
            .keys()
            .filter_map(|id| self.restart_due(id).map(|d| (id.clone(), d)))
            .collect()
    }

    /// Applies the restart policy to a task its node just reported: replaced at once when the
    /// service's delay is 0, else left for the leader's [`Command::RestartTasks`].
    pub(super) fn apply_restart_policy(&mut self, id: &TaskId) {
        if self.restart_due(id) == Some(0) {
            self.replace_ended(id);
        }
    }

    /// Moves an ended task to its service's history; the reconcile step that follows fills
    /// its slot.
    pub(super) fn replace_ended(&mut self, id: &TaskId) {
        let Some(task) = self.tasks.get(id).cloned() else {
            return;
        };
        let history = self.history.entry(task.service.clone()).or_default();
        history.push(task);
        let excess = history.len().saturating_sub(HISTORY_LEN);
        history.drain(..excess);
        self.remove_task(id);
    }
}
