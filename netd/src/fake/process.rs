//! In-memory task runtime with the semantics of `LinuxProcessPort`, for the reconciler's tests
//! and the contract suite (`netd/tests/process_runtime.rs`).
//!
//! Model:
//! - `start` hands out increasing fake pids; it fails with Exists while the task runs, Invalid
//!   for an empty argv, and replaces a record whose process has exited.
//! - `stop` returns at once and marks the process stopping. A process that honours SIGTERM is
//!   reported exited with `Signal(15)` by the next `list` (the kernel would take a moment; the
//!   fake takes exactly one observation). One made to ignore SIGTERM
//!   ([`FakeProcessPort::ignore_sigterm`]) stays running and stopping until `grace` has passed
//!   in real time, then the next `list` reports `Signal(9)`.
//! - `forget` of a running process is Busy, of an unknown one NotFound.
//! - [`FakeProcessPort::restart`] plays a netd restart: every process becomes adopted, pending
//!   stop timers are lost (as the timer thread dies with netd), and an adopted process that exits
//!   later is reported `Exit::Unknown`, since its status is no longer ours to collect.
//!
//! Test helpers act out what a real process would do by itself: [`FakeProcessPort::exit`] (it
//! crashed or finished), [`FakeProcessPort::running`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use swarmnet_model::TaskId;

use crate::port::{ErrorKind, Exit, PortError, PortResult, ProcessPort, ProcessSpec, ProcessState};

#[derive(Debug, Clone)]
struct FakeProc {
    spec: ProcessSpec,
    pid: u32,
    exit: Option<Exit>,
    /// When the stop was asked, its SIGKILL deadline.
    stop: Option<Instant>,
    ignores_term: bool,
    /// Started by an earlier netd: its exit status is unknowable.
    adopted: bool,
}

/// The in-memory process port. See the module documentation.
#[derive(Debug, Clone)]
pub struct FakeProcessPort {
    procs: BTreeMap<TaskId, FakeProc>,
    next_pid: u32,
}

impl Default for FakeProcessPort {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeProcessPort {
    pub fn new() -> Self {
        // Well away from the pids of real system processes, so a confused test cannot mistake one.
        Self {
            procs: BTreeMap::new(),
            next_pid: 100_000,
        }
    }

    /// The process of `task` ends by itself with `exit` (as a crash would). Returns false when it
    /// was not running.
    pub fn exit(&mut self, task: &TaskId, exit: Exit) -> bool {
        match self.procs.get_mut(task) {
            Some(p) if p.exit.is_none() => {
                p.exit = Some(if p.adopted { Exit::Unknown } else { exit });
                true
            }
            _ => false,
        }
    }

    /// Whether the process of `task` is known and running.
    pub fn running(&self, task: &TaskId) -> bool {
        self.procs.get(task).is_some_and(|p| p.exit.is_none())
    }

    /// Makes the running process of `task` ignore SIGTERM (`trap '' TERM`), so only the SIGKILL
    /// after the grace period ends it. Returns false when it was not running.
    pub fn ignore_sigterm(&mut self, task: &TaskId) -> bool {
        match self.procs.get_mut(task) {
            Some(p) if p.exit.is_none() => {
                p.ignores_term = true;
                true
            }
            _ => false,
        }
    }

    /// The spec the process of `task` was started with.
    pub fn spec(&self, task: &TaskId) -> Option<&ProcessSpec> {
        self.procs.get(task).map(|p| &p.spec)
    }

    /// A netd restart: see the module documentation.
    pub fn restart(&mut self) {
        for p in self.procs.values_mut() {
            p.adopted = true;
            p.stop = None;
        }
    }
}

impl ProcessPort for FakeProcessPort {
    fn list(&mut self) -> PortResult<Vec<ProcessState>> {
        let now = Instant::now();
        for p in self.procs.values_mut() {
            if let (None, Some(deadline)) = (p.exit, p.stop) {
                let sig = if !p.ignores_term {
                    Some(libc::SIGTERM)
                } else if now >= deadline {
                    Some(libc::SIGKILL)
                } else {
                    None
                };
                if let Some(sig) = sig {
                    // A process we stopped ourselves is still ours to reap unless adopted.
                    p.exit = Some(if p.adopted {
                        Exit::Unknown
                    } else {
                        Exit::Signal(sig)
                    });
                }
            }
        }
        Ok(self
            .procs
            .iter()
            .map(|(task, p)| ProcessState {
                task: task.clone(),
                pid: p.pid,
                exit: p.exit,
                stopping: p.stop.is_some() && p.exit.is_none(),
            })
            .collect())
    }

    fn start(&mut self, spec: &ProcessSpec) -> PortResult<u32> {
        if spec.argv.is_empty() {
            return Err(PortError::new(
                "start process",
                spec.task.as_str(),
                ErrorKind::Invalid,
                "argv is empty; give the command to run",
            ));
        }
        if let Some(p) = self.procs.get(&spec.task)
            && p.exit.is_none()
        {
            return Err(PortError::new(
                "start process",
                spec.task.as_str(),
                ErrorKind::Exists,
                format!("already running as pid {}; stop it first", p.pid),
            ));
        }
        let pid = self.next_pid;
        self.next_pid += 1;
        self.procs.insert(
            spec.task.clone(),
            FakeProc {
                spec: spec.clone(),
                pid,
                exit: None,
                stop: None,
                ignores_term: false,
                adopted: false,
            },
        );
        Ok(pid)
    }

    fn stop(&mut self, task: &TaskId, grace: Duration) -> PortResult<()> {
        let Some(p) = self.procs.get_mut(task) else {
            return Err(PortError::new(
                "stop process",
                task.as_str(),
                ErrorKind::NotFound,
                "no such task process",
            ));
        };
        if p.exit.is_none() {
            let deadline = Instant::now() + grace;
            // A second stop may shorten the grace, never extend it (as the Linux port).
            p.stop = Some(p.stop.map_or(deadline, |d| d.min(deadline)));
        }
        Ok(())
    }

    fn forget(&mut self, task: &TaskId) -> PortResult<()> {
        match self.procs.get(task) {
            None => Err(PortError::new(
                "forget process",
                task.as_str(),
                ErrorKind::NotFound,
                "no such task process",
            )),
            Some(p) if p.exit.is_none() => Err(PortError::new(
                "forget process",
                task.as_str(),
                ErrorKind::Busy,
                format!("still running as pid {}; stop it first", p.pid),
            )),
            Some(_) => {
                self.procs.remove(task);
                Ok(())
            }
        }
    }
}
