//! Runs health-check commands inside a task's sandbox, as `docker exec` does: the child enters
//! the sandbox's network namespace (the file netd bind-mounted) and the mount namespace of the
//! task's process (`/proc/<pid>/ns/mnt`: the task's resolv.conf and anything it mounted), in a
//! session and process group of its own, so a timeout kills the check and whatever it forked.
//!
//! Invariants:
//! - The task's pid is confirmed to live in the sandbox's network namespace (same inode) before
//!   its mount namespace is opened, so a recycled pid cannot lend another process's mounts.
//! - A check's process group is signalled only while its leader is not yet reaped (`waitid`
//!   with `WNOWAIT` first, then the reap under the same lock the killer takes), so the pid
//!   cannot have been reused by then.
//! - stdout and stderr share one pipe; the first [`OUTPUT_LIMIT`] bytes are kept, the rest is
//!   read and dropped so a chatty check never blocks on a full pipe.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use crate::health::{CheckOutcome, CheckRunner, HealthTarget, OUTPUT_LIMIT, RunningCheck};

/// How long the verdict waits for the output pipe to close after the check ended.
const OUTPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts checks with fork/exec into the task's namespaces.
#[derive(Debug)]
pub struct LinuxCheckRunner {
    /// `PATH` of every check unless the task's environment sets one (as for the task itself).
    task_path: String,
}

impl LinuxCheckRunner {
    pub fn new(task_path: impl Into<String>) -> Self {
        Self {
            task_path: task_path.into(),
        }
    }
}

impl Default for LinuxCheckRunner {
    fn default() -> Self {
        Self::new(crate::linux::process::DEFAULT_TASK_PATH)
    }
}

impl CheckRunner for LinuxCheckRunner {
    fn spawn(&mut self, t: &HealthTarget) -> Result<Box<dyn RunningCheck>, String> {
        let netns = File::open(&t.netns)
            .map_err(|e| format!("open sandbox netns {}: {e}", t.netns.display()))?;
        let task_net = format!("/proc/{}/ns/net", t.pid);
        let same = std::fs::metadata(&task_net)
            .and_then(|a| {
                netns
                    .metadata()
                    .map(|b| (a.ino(), a.dev()) == (b.ino(), b.dev()))
            })
            .map_err(|e| format!("read {task_net}: {e}"))?;
        if !same {
            return Err(format!(
                "pid {} is not in the sandbox's network namespace (the task restarted?)",
                t.pid
            ));
        }
        let mnt_path = format!("/proc/{}/ns/mnt", t.pid);
        let mnt = File::open(&mnt_path).map_err(|e| format!("open {mnt_path}: {e}"))?;
        let (mut out_rx, out_tx) = io::pipe().map_err(|e| format!("create a pipe: {e}"))?;
        let err_tx = out_tx
            .try_clone()
            .map_err(|e| format!("duplicate a pipe: {e}"))?;
        let mut env: BTreeMap<String, String> = t.env.clone();
        env.entry("PATH".into())
            .or_insert_with(|| self.task_path.clone());
        let mut cmd = Command::new(&t.check.cmd[0]);
        cmd.args(&t.check.cmd[1..])
            .env_clear()
            .envs(&env)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out_tx)
            .stderr(err_tx);
        set_pre_exec(&mut cmd, netns, mnt);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{:?}: {e}", t.check.cmd[0]))?;
        // Our copies of the write ends go with `cmd`, so the reader sees EOF when the check
        // (and everything it forked) is gone.
        drop(cmd);
        let pid = child.id();
        // Read on a thread of its own: `wait` must not depend on the output being closed (a
        // check may leave a process of another session holding the pipe).
        let (out_tx, out_rx2) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("health-out".into())
            .spawn(move || {
                let mut kept = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match out_rx.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                            kept.extend_from_slice(&buf[..n.min(room)]);
                        }
                    }
                }
                let _ = out_tx.send(kept);
            })
            .map_err(|e| format!("spawn an output reader: {e}"))?;
        Ok(Box::new(LinuxCheck {
            pid,
            child: Mutex::new(Some(child)),
            reaped: Mutex::new(false),
            output: Mutex::new(out_rx2),
        }))
    }
}

struct LinuxCheck {
    pid: u32,
    child: Mutex<Option<Child>>,
    /// Set (under this lock) just before the leader is reaped; `kill` holds it too.
    reaped: Mutex<bool>,
    /// The output, once the pipe closed.
    output: Mutex<std::sync::mpsc::Receiver<Vec<u8>>>,
}

impl RunningCheck for LinuxCheck {
    fn kill(&self) {
        let reaped = self.reaped.lock().expect("reaped lock");
        if !*reaped {
            // The group the check leads (setsid): the check and whatever it forked. ESRCH
            // (already gone) is fine.
            let _ = kill(Pid::from_raw(-(self.pid as i32)), Signal::SIGKILL);
        }
    }

    fn wait(&self) -> CheckOutcome {
        let Some(mut child) = self.child.lock().expect("child lock").take() else {
            return CheckOutcome {
                passed: false,
                detail: "waited twice".into(),
            };
        };
        // Wait for the exit without reaping, so that `kill` can still name the group safely.
        let _ = waitid(
            Id::Pid(Pid::from_raw(self.pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        );
        let status = {
            let mut reaped = self.reaped.lock().expect("reaped lock");
            // The leader is a zombie now, which keeps its group id reserved: whatever it left
            // in its group (still holding the pipe, say) is killed, so the output read ends
            // and a check never leaves processes behind.
            let _ = kill(Pid::from_raw(-(self.pid as i32)), Signal::SIGKILL);
            *reaped = true;
            child.wait()
        };
        // Its group is dead; a process that left the group (a new session) and still holds
        // the pipe does not hold up the verdict: the output so far is not waited for.
        let output = self
            .output
            .lock()
            .expect("output lock")
            .recv_timeout(OUTPUT_WAIT)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&output).trim().to_string();
        match status {
            Ok(s) if s.success() => CheckOutcome {
                passed: true,
                detail: with_output("exit 0".into(), &text),
            },
            Ok(s) => {
                let how = match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exit {c}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "ended".into(),
                };
                CheckOutcome {
                    passed: false,
                    detail: with_output(how, &text),
                }
            }
            Err(e) => CheckOutcome {
                passed: false,
                detail: format!("wait: {e}"),
            },
        }
    }
}

fn with_output(how: String, text: &str) -> String {
    if text.is_empty() {
        how
    } else {
        format!("{how}: {text}")
    }
}

#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to setns in the child before exec"
)]
fn set_pre_exec(cmd: &mut Command, netns: File, mnt: File) {
    // SAFETY: the closure runs in the child after fork, where only async-signal-safe work is
    // allowed: setsid and setns on fds opened before the fork, no allocation, no locks, errors
    // are raw errnos. setns(CLONE_NEWNS) needs a single-threaded caller, which the forked
    // child is.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)?;
            nix::sched::setns(&mnt, CloneFlags::CLONE_NEWNS)?;
            // setns(CLONE_NEWNS) moves root and cwd to the namespace's root; say "/" anyway.
            nix::unistd::chdir(c"/" as &CStr)?;
            Ok(())
        });
    }
}
