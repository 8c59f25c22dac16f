//! Task health checks: a pure state machine per task ([`HealthState`]) and the monitor thread
//! that runs the checks ([`HealthMonitor`]) through a narrow port ([`CheckRunner`]; the Linux
//! one is `linux::health_exec`).
//!
//! Semantics (Docker's `HEALTHCHECK`): the first check runs one `interval` after the task's
//! process was first seen running, then one `interval` after each check ends. A check that
//! exits 0 passes; anything else, or still running at `timeout` (then its process group is
//! killed), fails. `retries` failures in a row make the task unhealthy; one pass makes it
//! healthy. During `start_period` failures do not count, and the first pass ends it. A task
//! with a check is `starting` until its first pass.
//!
//! The monitor runs on its own thread so that a slow check never holds up a reconcile round:
//! the reconciler hands it the targets after each round ([`HealthMonitor::set_targets`]) and
//! picks up results each tick ([`HealthMonitor::poll`]). At most `max_concurrent` checks run
//! at once (the rest wait their turn); each running check has a waiter thread that reads its
//! output and reaps it, so no check is left a zombie. Changing a task's pid (a restart) starts
//! its state afresh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use swarmnet_model::TaskId;
use swarmnet_model::spec::{HealthCheck, HealthStatus};
use tracing::{debug, info, warn};

/// How many bytes of a check's output are kept (Docker keeps 4 KiB).
pub const OUTPUT_LIMIT: usize = 4096;

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub passed: bool,
    /// `exit 1: <output>`, `timed out after 1s`, `cannot start: ...`.
    pub detail: String,
}

/// One task's health, pure: the caller supplies the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    check: HealthCheck,
    /// When the task's process was first seen running: the start period counts from here.
    born: Instant,
    status: HealthStatus,
    /// Failures in a row that counted.
    streak: u32,
    /// Still in the start period (until it elapses or the first pass).
    starting: bool,
    next_due: Instant,
    /// The running check's start.
    in_flight: Option<Instant>,
    last: Option<CheckOutcome>,
    checks: u64,
}

impl HealthState {
    pub fn new(check: HealthCheck, now: Instant) -> Self {
        let next_due = now + check.interval.get();
        Self {
            check,
            born: now,
            status: HealthStatus::Starting,
            streak: 0,
            starting: true,
            next_due,
            in_flight: None,
            last: None,
            checks: 0,
        }
    }

    pub fn status(&self) -> HealthStatus {
        self.status
    }
    pub fn streak(&self) -> u32 {
        self.streak
    }
    pub fn last(&self) -> Option<&CheckOutcome> {
        self.last.as_ref()
    }
    pub fn check(&self) -> &HealthCheck {
        &self.check
    }

    /// Whether a check should start now.
    pub fn due(&self, now: Instant) -> bool {
        self.in_flight.is_none() && now >= self.next_due
    }

    /// When this state next needs attention: its next check, or its running check's timeout.
    pub fn wake_at(&self) -> Instant {
        match self.in_flight {
            Some(t) => t + self.check.timeout.get(),
            None => self.next_due,
        }
    }

    /// A check starts now.
    pub fn begin(&mut self, now: Instant) {
        self.in_flight = Some(now);
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether the running check has passed its timeout (the shell then kills it and reports
    /// [`HealthState::timeout_outcome`]).
    pub fn timed_out(&self, now: Instant) -> bool {
        self.in_flight
            .is_some_and(|t| now >= t + self.check.timeout.get())
    }

    pub fn timeout_outcome(&self) -> CheckOutcome {
        CheckOutcome {
            passed: false,
            detail: format!("timed out after {}", self.check.timeout),
        }
    }

    /// The running check ended with `outcome`; returns the new status when it changed.
    pub fn finish(&mut self, now: Instant, outcome: CheckOutcome) -> Option<HealthStatus> {
        self.in_flight = None;
        self.next_due = now + self.check.interval.get();
        self.checks += 1;
        let before = self.status;
        if self.starting && now >= self.born + self.check.start_period.get() {
            self.starting = false;
        }
        if outcome.passed {
            self.streak = 0;
            self.starting = false;
            self.status = HealthStatus::Healthy;
        } else if !self.starting {
            self.streak += 1;
            if self.streak >= self.check.retries {
                self.status = HealthStatus::Unhealthy;
            }
        }
        self.last = Some(outcome);
        (self.status != before).then_some(self.status)
    }

    /// What status, inspect and the orchestrator see.
    pub fn report(&self, pid: u32) -> TaskHealth {
        TaskHealth {
            status: self.status,
            pid,
            failing_streak: self.streak,
            checks: self.checks,
            last: self.last.as_ref().map(|o| o.detail.clone()),
        }
    }
}

/// A task's health as published by the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskHealth {
    pub status: HealthStatus,
    /// The process the checks ran against.
    #[serde(skip)]
    pub pid: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub failing_streak: u32,
    pub checks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl TaskHealth {
    /// Why the task is unhealthy, for the orchestrator and `service ps`.
    pub fn reason(&self) -> String {
        format!(
            "unhealthy: health check failed {} times in a row (last: {})",
            self.failing_streak,
            self.last.as_deref().unwrap_or("none")
        )
    }
}

/// What to check: the task, its running process, its sandbox and its service's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTarget {
    pub task: TaskId,
    /// The task's process: its mount namespace is entered (as `docker exec` does).
    pub pid: u32,
    /// The sandbox's network namespace file.
    pub netns: PathBuf,
    pub env: BTreeMap<String, String>,
    pub check: HealthCheck,
}

/// A check process started by a [`CheckRunner`]. Shared between the monitor (which may
/// `kill` it at its timeout) and its waiter thread (which blocks in `wait`).
pub trait RunningCheck: Send + Sync {
    /// Kills the check (its whole process group) unless it has already been reaped; it then
    /// ends through `wait`.
    fn kill(&self);
    /// Waits for the end (reading the output, reaping the process). Called once.
    fn wait(&self) -> CheckOutcome;
}

/// Starts check processes. One implementation per runtime (the Linux one enters the task's
/// namespaces); tests use a scripted one.
pub trait CheckRunner: Send {
    fn spawn(&mut self, target: &HealthTarget) -> Result<Box<dyn RunningCheck>, String>;
}

struct Tracked {
    target: HealthTarget,
    state: HealthState,
    /// The running check and whether it was killed for its timeout.
    running: Option<(Arc<dyn RunningCheck>, bool)>,
    /// Bumped on every spawn, so that a late result of an older target is ignored.
    seq: u64,
}

enum Msg {
    Targets(Vec<HealthTarget>),
    Done {
        task: TaskId,
        seq: u64,
        outcome: CheckOutcome,
    },
}

#[derive(Debug, Default)]
struct Published {
    health: BTreeMap<TaskId, TaskHealth>,
    generation: u64,
}

/// The health-check thread. See the module documentation.
#[derive(Debug)]
pub struct HealthMonitor {
    tx: Sender<Msg>,
    published: Arc<Mutex<Published>>,
    seen: u64,
    last_targets: Vec<HealthTarget>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl HealthMonitor {
    /// Starts the thread; it ends when the monitor is dropped.
    pub fn start(runner: Box<dyn CheckRunner>, max_concurrent: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        let published = Arc::new(Mutex::new(Published::default()));
        let p = Arc::clone(&published);
        let done_tx = tx.clone();
        std::thread::Builder::new()
            .name("health".into())
            .spawn(move || run(runner, max_concurrent.max(1), rx, done_tx, p))
            .expect("spawning the health thread");
        Self {
            tx,
            published,
            seen: 0,
            last_targets: Vec::new(),
        }
    }

    /// The tasks to check now (after each round). Cheap when nothing changed.
    pub fn set_targets(&mut self, targets: Vec<HealthTarget>) {
        if targets == self.last_targets {
            return;
        }
        self.last_targets = targets.clone();
        let _ = self.tx.send(Msg::Targets(targets));
    }

    /// Every target's health, when it changed since the last poll.
    pub fn poll(&mut self) -> Option<BTreeMap<TaskId, TaskHealth>> {
        let p = self.published.lock().expect("health lock");
        if p.generation == self.seen {
            return None;
        }
        self.seen = p.generation;
        Some(p.health.clone())
    }
}

fn run(
    mut runner: Box<dyn CheckRunner>,
    max_concurrent: usize,
    rx: Receiver<Msg>,
    done_tx: Sender<Msg>,
    published: Arc<Mutex<Published>>,
) {
    let mut tracked: BTreeMap<TaskId, Tracked> = BTreeMap::new();
    let mut seq: u64 = 0;
    loop {
        let now = Instant::now();
        let wake = tracked.values().map(|t| t.state.wake_at()).min();
        let msg = match wake {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(now)) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            },
        };
        let now = Instant::now();
        let mut changed = false;
        match msg {
            Some(Msg::Targets(targets)) => {
                let want: BTreeMap<TaskId, HealthTarget> =
                    targets.into_iter().map(|t| (t.task.clone(), t)).collect();
                tracked.retain(|task, t| {
                    let keep = want
                        .get(task)
                        .is_some_and(|w| w.pid == t.target.pid && w.check == t.target.check);
                    if !keep && let Some((check, _)) = &t.running {
                        check.kill();
                    }
                    keep
                });
                for (task, target) in want {
                    if let Some(t) = tracked.get_mut(&task) {
                        t.target = target;
                        continue;
                    }
                    debug!(task = %task, pid = target.pid, "health: tracking");
                    tracked.insert(
                        task,
                        Tracked {
                            state: HealthState::new(target.check.clone(), now),
                            target,
                            running: None,
                            seq: 0,
                        },
                    );
                }
                changed = true;
            }
            Some(Msg::Done { task, seq, outcome }) => {
                if let Some(t) = tracked.get_mut(&task)
                    && t.seq == seq
                    && let Some((_, timed_out)) = t.running.take()
                {
                    let outcome = if timed_out {
                        t.state.timeout_outcome()
                    } else {
                        outcome
                    };
                    if let Some(status) = t.state.finish(now, outcome) {
                        log_transition(&task, &t.state, status);
                    }
                    changed = true;
                }
            }
            None => {}
        }
        // Timeouts: kill; the waiter then reports and the outcome is the timeout's.
        for t in tracked.values_mut() {
            if t.state.timed_out(now)
                && let Some((check, timed_out)) = &mut t.running
                && !*timed_out
            {
                *timed_out = true;
                check.kill();
            }
        }
        // Start what is due, oldest due first, within the concurrency bound.
        let mut running = tracked.values().filter(|t| t.running.is_some()).count();
        let mut due: Vec<(Instant, TaskId)> = tracked
            .iter()
            .filter(|(_, t)| t.state.due(now))
            .map(|(k, t)| (t.state.wake_at(), k.clone()))
            .collect();
        due.sort();
        for (_, task) in due {
            if running >= max_concurrent {
                break;
            }
            let t = tracked.get_mut(&task).expect("present");
            t.state.begin(now);
            seq += 1;
            t.seq = seq;
            match runner.spawn(&t.target) {
                Ok(check) => {
                    running += 1;
                    let check: Arc<dyn RunningCheck> = Arc::from(check);
                    t.running = Some((Arc::clone(&check), false));
                    let (tx, task2, s) = (done_tx.clone(), task.clone(), seq);
                    std::thread::Builder::new()
                        .name("health-wait".into())
                        .spawn(move || {
                            let outcome = check.wait();
                            let _ = tx.send(Msg::Done {
                                task: task2,
                                seq: s,
                                outcome,
                            });
                        })
                        .expect("spawning a health waiter");
                }
                Err(e) => {
                    let outcome = CheckOutcome {
                        passed: false,
                        detail: format!("cannot start the check: {e}"),
                    };
                    if let Some(status) = t.state.finish(now, outcome) {
                        log_transition(&task, &t.state, status);
                    }
                    changed = true;
                }
            }
        }
        if changed {
            let mut p = published.lock().expect("health lock");
            p.health = tracked
                .iter()
                .map(|(k, t)| (k.clone(), t.state.report(t.target.pid)))
                .collect();
            p.generation += 1;
        }
    }
}

fn log_transition(task: &TaskId, state: &HealthState, status: HealthStatus) {
    let last = state.last().map(|o| o.detail.as_str()).unwrap_or("");
    match status {
        HealthStatus::Unhealthy => {
            warn!(task = %task, streak = state.streak(), last, "health: task unhealthy")
        }
        _ => info!(task = %task, status = %status, last, "health: task status changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use swarmnet_model::HumanDuration;

    fn check(interval: u64, timeout: u64, retries: u32, start: u64) -> HealthCheck {
        HealthCheck {
            cmd: vec!["true".into()],
            interval: HumanDuration::from_millis(interval),
            timeout: HumanDuration::from_millis(timeout),
            retries,
            start_period: HumanDuration::from_millis(start),
        }
    }
    fn ok() -> CheckOutcome {
        CheckOutcome {
            passed: true,
            detail: "exit 0".into(),
        }
    }
    fn fail() -> CheckOutcome {
        CheckOutcome {
            passed: false,
            detail: "exit 1: no".into(),
        }
    }
    fn ms(t0: Instant, v: u64) -> Instant {
        t0 + Duration::from_millis(v)
    }

    #[test]
    fn first_check_after_one_interval_then_one_interval_after_each_end() {
        let t0 = Instant::now();
        let mut h = HealthState::new(check(1000, 500, 3, 0), t0);
        assert_eq!(h.status(), HealthStatus::Starting);
        assert!(!h.due(ms(t0, 999)));
        assert!(h.due(ms(t0, 1000)));
        h.begin(ms(t0, 1000));
        assert!(!h.due(ms(t0, 5000)), "never two at once");
        assert_eq!(h.finish(ms(t0, 1100), ok()), Some(HealthStatus::Healthy));
        assert!(!h.due(ms(t0, 2099)));
        assert!(h.due(ms(t0, 2100)));
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy_and_one_pass_heals() {
        let t0 = Instant::now();
        let mut h = HealthState::new(check(100, 50, 3, 0), t0);
        h.begin(ms(t0, 100));
        h.finish(ms(t0, 101), ok());
        let mut t = 200;
        for i in 1..=3 {
            h.begin(ms(t0, t));
            let changed = h.finish(ms(t0, t + 1), fail());
            assert_eq!(h.streak(), i);
            if i < 3 {
                assert_eq!(changed, None, "still healthy after {i}");
                assert_eq!(h.status(), HealthStatus::Healthy);
            } else {
                assert_eq!(changed, Some(HealthStatus::Unhealthy));
            }
            t += 100;
        }
        // A pass in between resets the streak.
        h.begin(ms(t0, t));
        assert_eq!(h.finish(ms(t0, t + 1), ok()), Some(HealthStatus::Healthy));
        assert_eq!(h.streak(), 0);
        h.begin(ms(t0, t + 100));
        h.finish(ms(t0, t + 101), fail());
        assert_eq!(h.status(), HealthStatus::Healthy);
        assert_eq!(h.report(7).failing_streak, 1);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_and_a_pass_ends_it() {
        let t0 = Instant::now();
        let mut h = HealthState::new(check(100, 50, 1, 1000), t0);
        for t in [100, 300, 600, 900] {
            h.begin(ms(t0, t));
            assert_eq!(h.finish(ms(t0, t + 1), fail()), None, "at {t} ms");
            assert_eq!(h.status(), HealthStatus::Starting);
            assert_eq!(h.streak(), 0);
        }
        // Past the start period a failure counts (retries 1: at once).
        h.begin(ms(t0, 1000));
        assert_eq!(
            h.finish(ms(t0, 1001), fail()),
            Some(HealthStatus::Unhealthy)
        );

        // The first pass ends the start period early: the next failure counts.
        let mut h = HealthState::new(check(100, 50, 1, 60_000), t0);
        h.begin(ms(t0, 100));
        assert_eq!(h.finish(ms(t0, 101), ok()), Some(HealthStatus::Healthy));
        h.begin(ms(t0, 200));
        assert_eq!(h.finish(ms(t0, 201), fail()), Some(HealthStatus::Unhealthy));
    }

    #[test]
    fn a_check_past_its_timeout_is_timed_out_and_fails() {
        let t0 = Instant::now();
        let mut h = HealthState::new(check(100, 300, 1, 0), t0);
        h.begin(ms(t0, 100));
        assert_eq!(h.wake_at(), ms(t0, 400), "wakes for the timeout");
        assert!(!h.timed_out(ms(t0, 399)));
        assert!(h.timed_out(ms(t0, 400)));
        let o = h.timeout_outcome();
        assert_eq!(o.detail, "timed out after 300ms");
        assert_eq!(h.finish(ms(t0, 400), o), Some(HealthStatus::Unhealthy));
        assert!(h.report(1).reason().contains("timed out after 300ms"));
    }

    /// A scripted runner: each task's next outcomes, a delay per check; `hang` never ends
    /// until killed.
    struct Scripted {
        outcomes: Arc<Mutex<BTreeMap<String, Vec<Option<bool>>>>>,
        started: Arc<Mutex<Vec<String>>>,
    }
    struct ScriptedCheck {
        result: Option<bool>,
        killed: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }
    impl RunningCheck for ScriptedCheck {
        fn kill(&self) {
            *self.killed.0.lock().unwrap() = true;
            self.killed.1.notify_all();
        }
        fn wait(&self) -> CheckOutcome {
            match self.result {
                Some(passed) => CheckOutcome {
                    passed,
                    detail: if passed { "exit 0" } else { "exit 1" }.into(),
                },
                None => {
                    let mut k = self.killed.0.lock().unwrap();
                    while !*k {
                        k = self.killed.1.wait(k).unwrap();
                    }
                    CheckOutcome {
                        passed: false,
                        detail: "killed".into(),
                    }
                }
            }
        }
    }
    impl CheckRunner for Scripted {
        fn spawn(&mut self, t: &HealthTarget) -> Result<Box<dyn RunningCheck>, String> {
            self.started.lock().unwrap().push(t.task.to_string());
            let mut o = self.outcomes.lock().unwrap();
            let q = o.get_mut(t.task.as_str()).ok_or("no script")?;
            let result = if q.len() > 1 { q.remove(0) } else { q[0] };
            Ok(Box::new(ScriptedCheck {
                result,
                killed: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
            }))
        }
    }

    fn wait_for(
        m: &mut HealthMonitor,
        what: impl Fn(&BTreeMap<TaskId, TaskHealth>) -> bool,
    ) -> BTreeMap<TaskId, TaskHealth> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = BTreeMap::new();
        while Instant::now() < deadline {
            if let Some(h) = m.poll() {
                last = h;
            }
            if what(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("condition not reached; last {last:?}");
    }

    #[test]
    fn monitor_runs_checks_off_thread_kills_on_timeout_and_resets_on_a_new_pid() {
        let outcomes = Arc::new(Mutex::new(BTreeMap::from([
            ("a".to_string(), vec![Some(true)]),
            ("b".to_string(), vec![Some(true), None]),
        ])));
        let started = Arc::new(Mutex::new(Vec::new()));
        let runner = Scripted {
            outcomes: Arc::clone(&outcomes),
            started: Arc::clone(&started),
        };
        let mut m = HealthMonitor::start(Box::new(runner), 2);
        let target = |task: &str, pid: u32| HealthTarget {
            task: TaskId::new(task).unwrap(),
            pid,
            netns: PathBuf::from("/nonexistent"),
            env: BTreeMap::new(),
            check: check(20, 50, 1, 0),
        };
        m.set_targets(vec![target("a", 1), target("b", 2)]);
        let a = TaskId::new("a").unwrap();
        let b = TaskId::new("b").unwrap();
        wait_for(&mut m, |h| {
            h.get(&a).is_some_and(|x| x.status == HealthStatus::Healthy)
                && h.get(&b).is_some_and(|x| x.status == HealthStatus::Healthy)
        });
        // b's next check hangs: killed at its timeout, and a failure (retries 1).
        let h = wait_for(&mut m, |h| {
            h.get(&b)
                .is_some_and(|x| x.status == HealthStatus::Unhealthy)
        });
        assert_eq!(h[&b].last.as_deref(), Some("timed out after 50ms"));
        assert_eq!(h[&a].status, HealthStatus::Healthy, "a is unaffected");
        // A new pid for b (a restart) starts afresh.
        outcomes
            .lock()
            .unwrap()
            .insert("b".into(), vec![Some(true)]);
        m.set_targets(vec![target("a", 1), target("b", 3)]);
        wait_for(&mut m, |h| {
            h.get(&b)
                .is_some_and(|x| x.pid == 3 && x.status == HealthStatus::Healthy)
        });
        // Dropped targets are forgotten.
        m.set_targets(vec![target("a", 1)]);
        wait_for(&mut m, |h| !h.contains_key(&b) && h.contains_key(&a));
        assert!(started.lock().unwrap().len() >= 4);
    }
}
