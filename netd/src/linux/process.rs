//! The real task runtime: fork/exec of a task's process into its sandbox.
//!
//! Each task gets:
//! - the sandbox's network namespace (`setns` in the child between fork and exec: the child is
//!   single-threaded there, which `setns(CLONE_NEWNET)` needs and the daemon is not);
//! - a private mount namespace, made a recursive slave of the node's mounts so nothing
//!   propagates back, and, when a resolv.conf is given, that file bind-mounted over
//!   `/etc/resolv.conf` (what `ip netns exec` does with `/etc/netns/<name>/resolv.conf`);
//! - a cgroup2 directory of its own, `<cgroup_dir>/<task id>`, which is how `stop` finds every
//!   process the task forked, and the only thing it ever signals besides the recorded pid;
//! - a session of its own (`setsid`), cwd `/`, stdin from `/dev/null`, stdout and stderr
//!   appended to the log file, and an environment of `PATH` plus the spec's variables only.
//!
//! Records: `<state_dir>/<task>.json` holds `{pid, start_time, task, argv, exit}`, written to a
//! temporary file and renamed. `start_time` (field 22 of `/proc/<pid>/stat`) tells a live process
//! from a later one that reuses its pid. A new port on the same state directory (netd restarted
//! after `kill -9`) adopts every record: a live pid with the same start time is running, anything
//! else has exited with [`Exit::Unknown`] (unless an earlier netd saw and recorded the exit).
//!
//! Invariants and choices:
//! - Dropping the port never kills anything: tasks outlive netd, and the next one adopts them.
//! - Exits are observed only when the port is called (`list`, `start`, `stop`, `forget`):
//!   children are reaped there with `waitpid(WNOHANG)`, so an exited child stays a zombie until
//!   the next call. The reconciler lists every round, which bounds that.
//! - `stop` sends SIGTERM at once and the SIGKILL after `grace` from a timer thread that holds
//!   an open fd to the task's `cgroup.kill` (kernel ≥ 5.14). An fd, not a path: if the task is
//!   forgotten and started again meanwhile, the new cgroup is a different kernfs node and the old
//!   fd cannot touch it. The timer is cancelled when the stop state is dropped (forget, restart,
//!   port dropped). Belt and braces, and the only path on kernels without `cgroup.kill`: `list`
//!   also kills what is left once the deadline has passed.
//! - Signals go only to pids read from the task's `cgroup.procs` and to the recorded pid after
//!   checking its start time; never to anything found by name.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use swarmnet_model::TaskId;

use crate::port::{ErrorKind, Exit, PortError, PortResult, ProcessPort, ProcessSpec, ProcessState};

pub use swarmnet_model::DEFAULT_TASK_PATH;

/// What a record file holds. Unknown fields are tolerated so that a downgraded netd can still
/// adopt what a newer one started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot at which the process started.
    start_time: u64,
    task: TaskId,
    argv: Vec<String>,
    /// Set once the exit was observed, so that a restarted netd reports it rather than Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit: Option<Exit>,
}

/// A pending stop.
#[derive(Debug)]
struct Stop {
    deadline: Instant,
    /// The lazy SIGKILL (in `list`) was sent.
    killed: bool,
    /// Dropping it cancels the timer thread.
    _cancel: Option<mpsc::Sender<()>>,
}

#[derive(Debug)]
struct Task {
    record: Record,
    /// Our own child, reaped with `waitpid`; `None` when adopted or already reaped.
    child: Option<Child>,
    stop: Option<Stop>,
}

/// Task processes on this machine. See the module documentation.
#[derive(Debug)]
pub struct LinuxProcessPort {
    state_dir: PathBuf,
    cgroup_dir: PathBuf,
    tasks: BTreeMap<TaskId, Task>,
    /// `PATH` of a task whose spec sets none.
    task_path: String,
}

/// `<cgroup2 mount>/swarmnet/<node_id>`, the mount found in `/proc/self/mountinfo`.
pub fn default_cgroup_dir(node_id: &str) -> PortResult<PathBuf> {
    if node_id.is_empty() || node_id.contains('/') || node_id == "." || node_id == ".." {
        return Err(PortError::new(
            "find cgroup dir",
            node_id,
            ErrorKind::Invalid,
            "node id must be a single path component",
        ));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| PortError::io("read", "/proc/self/mountinfo", e))?;
    let mount = cgroup2_mount(&mountinfo).ok_or_else(|| {
        PortError::new(
            "find cgroup2 mount",
            "/proc/self/mountinfo",
            ErrorKind::NotFound,
            "no cgroup2 file system is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) \
             or configure the cgroup directory",
        )
    })?;
    Ok(mount.join("swarmnet").join(node_id))
}

/// The mount point of the first cgroup2 file system in a mountinfo listing.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ')
            .nth(4)
            .map(|m| PathBuf::from(unescape_mountinfo(m)))
    })
}

/// Undoes the octal escapes (`\040` for a space) the kernel writes in mountinfo paths.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl LinuxProcessPort {
    /// Opens (creating) the state and cgroup directories and adopts every record found.
    pub fn new(state_dir: PathBuf, cgroup_dir: PathBuf) -> PortResult<Self> {
        fs::create_dir_all(&state_dir)
            .map_err(|e| PortError::io("create state dir", state_dir.display().to_string(), e))?;
        fs::create_dir_all(&cgroup_dir)
            .map_err(|e| PortError::io("create cgroup dir", cgroup_dir.display().to_string(), e))?;
        let fs_type = nix::sys::statfs::statfs(&cgroup_dir)
            .map_err(|e| PortError::io("statfs", cgroup_dir.display().to_string(), e.into()))?
            .filesystem_type();
        if fs_type != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(PortError::new(
                "open cgroup dir",
                cgroup_dir.display().to_string(),
                ErrorKind::Invalid,
                "not on a cgroup2 file system; use a directory under the cgroup2 mount \
                 (see default_cgroup_dir)",
            ));
        }
        let mut port = Self {
            state_dir,
            cgroup_dir,
            tasks: BTreeMap::new(),
            task_path: DEFAULT_TASK_PATH.to_string(),
        };
        port.adopt()?;
        Ok(port)
    }

    /// `PATH` for tasks whose spec sets none (netd's `--task-path`).
    #[must_use]
    pub fn with_task_path(mut self, path: &str) -> Self {
        self.task_path = path.to_string();
        self
    }

    fn adopt(&mut self) -> PortResult<()> {
        let dir = &self.state_dir;
        let entries = fs::read_dir(dir)
            .map_err(|e| PortError::io("read state dir", dir.display().to_string(), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| PortError::io("read state dir", dir.display().to_string(), e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write that died before its rename: the previous record (if any) is intact.
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove stale temporary record");
                }
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let text = fs::read_to_string(&path)
                .map_err(|e| PortError::io("read process record", path.display().to_string(), e))?;
            // A record that cannot be read must not keep netd from starting: set it aside
            // (kept for the operator) and go on. If its process still runs, its cgroup is not
            // empty and starting the task again reports Busy in the task's status.
            let record = match serde_json::from_str::<Record>(&text) {
                Ok(r) if r.task.as_str() == stem => r,
                Ok(r) => {
                    set_aside(
                        &path,
                        &format!(
                            "holds task {:?}, not the one its file name says",
                            r.task.as_str()
                        ),
                    );
                    continue;
                }
                Err(e) => {
                    set_aside(&path, &e.to_string());
                    continue;
                }
            };
            let mut task = Task {
                record,
                child: None,
                stop: None,
            };
            refresh(&self.state_dir, &mut task)?;
            tracing::info!(task = %task.record.task, pid = task.record.pid, exit = ?task.record.exit, "adopted task process");
            self.tasks.insert(task.record.task.clone(), task);
        }
        Ok(())
    }

    fn task_cgroup(&self, task: &TaskId) -> PathBuf {
        // A TaskId is a DNS label: never '/', '.' or '..', so this is always a child directory.
        self.cgroup_dir.join(task.as_str())
    }

    /// Spawns the process; the caller has checked that nothing of this task is running.
    fn spawn(&self, spec: &ProcessSpec, cgroup: &Path) -> PortResult<Child> {
        let task = spec.task.as_str();
        let netns = File::open(&spec.netns).map_err(|e| {
            PortError::io("open sandbox netns", spec.netns.display().to_string(), e)
        })?;
        let procs_path = cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|e| PortError::io("open task cgroup", procs_path.display().to_string(), e))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| PortError::io("open task log", spec.log.display().to_string(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| PortError::io("dup task log", spec.log.display().to_string(), e))?;
        let resolv = match &spec.resolv_conf {
            None => None,
            Some(p) => Some(CString::new(p.as_os_str().as_bytes()).map_err(|e| {
                PortError::new(
                    "start process",
                    task,
                    ErrorKind::Invalid,
                    format!("resolv.conf path: {e}"),
                )
            })?),
        };
        // The child reports each step it begins on this pipe (close-on-exec), so a failure
        // between fork and exec names the step rather than only an errno.
        let (mut steps_rx, steps_tx) =
            io::pipe().map_err(|e| PortError::io("create pipe", task, e))?;

        let mut cmd = Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .env("PATH", &self.task_path)
            .envs(&spec.env)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        set_pre_exec(
            &mut cmd,
            ChildSetup {
                netns,
                procs,
                resolv,
                steps: steps_tx,
            },
        );

        let spawned = cmd.spawn();
        // Drops our copy of the write end, so that reading below sees EOF once the child is gone.
        drop(cmd);
        spawned.map_err(|err| {
            let mut steps = Vec::new();
            // Diagnostics only: if the pipe cannot be read we still report the spawn error.
            let _ = steps_rx.read_to_end(&mut steps);
            let step = match steps.last().copied() {
                Some(STEP_CGROUP) => format!("join cgroup {}", cgroup.display()),
                Some(STEP_SETSID) => "setsid".to_string(),
                Some(STEP_NETNS) => format!("setns into {}", spec.netns.display()),
                Some(STEP_UNSHARE_NS) => "unshare the mount namespace".to_string(),
                Some(STEP_SLAVE) => "make / a recursive slave mount".to_string(),
                Some(STEP_BIND) => format!(
                    "bind-mount {} over /etc/resolv.conf",
                    spec.resolv_conf
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display()
                ),
                Some(STEP_EXEC) => format!("exec {:?}", spec.argv[0]),
                _ => "fork".to_string(),
            };
            PortError {
                op: "start process",
                object: task.to_string(),
                kind: err
                    .raw_os_error()
                    .map_or(ErrorKind::Other, ErrorKind::from_errno),
                detail: format!("{step}: {err}"),
                source: Some(err),
            }
        })
    }
}

const STEP_CGROUP: u8 = 1;
const STEP_SETSID: u8 = 2;
const STEP_NETNS: u8 = 3;
const STEP_UNSHARE_NS: u8 = 4;
const STEP_SLAVE: u8 = 5;
const STEP_BIND: u8 = 6;
const STEP_EXEC: u8 = 7;

/// Everything the child needs between fork and exec, opened by the parent beforehand.
struct ChildSetup {
    netns: File,
    procs: File,
    resolv: Option<CString>,
    steps: io::PipeWriter,
}

impl ChildSetup {
    /// Runs in the forked child. Only plain syscalls on fds and C strings prepared before the
    /// fork: no allocation, no locks (nix's wrappers on `&CStr` and fds do neither, and turning
    /// an `Errno` into an `io::Error` is a plain integer).
    fn run(&self) -> io::Result<()> {
        let step = |s: u8| {
            // Diagnostics only; a failed write must not stop the task from starting.
            let _ = nix::unistd::write(&self.steps, &[s]);
        };
        step(STEP_CGROUP);
        // "0" moves the writing process itself.
        nix::unistd::write(&self.procs, b"0")?;
        step(STEP_SETSID);
        nix::unistd::setsid()?;
        step(STEP_NETNS);
        nix::sched::setns(&self.netns, CloneFlags::CLONE_NEWNET)?;
        // Always a private mount namespace (the port's contract), so nothing the task mounts
        // reaches the node, and the resolv.conf bind mount stays the task's own.
        step(STEP_UNSHARE_NS);
        nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
        // Without this, mounts would still propagate to the node's mount namespace (/ is
        // usually a shared mount, and unshare copies that). Slave: the node's later mounts
        // still show up in the task, as with `ip netns exec`.
        step(STEP_SLAVE);
        nix::mount::mount(
            None::<&CStr>,
            c"/",
            None::<&CStr>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&CStr>,
        )?;
        if let Some(src) = &self.resolv {
            step(STEP_BIND);
            nix::mount::mount(
                Some(src.as_c_str()),
                c"/etc/resolv.conf",
                None::<&CStr>,
                MsFlags::MS_BIND,
                None::<&CStr>,
            )?;
        }
        step(STEP_EXEC);
        Ok(())
    }
}

#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to setns/unshare in the child before exec"
)]
fn set_pre_exec(cmd: &mut Command, setup: ChildSetup) {
    // SAFETY: the closure runs in the child after fork, where only async-signal-safe work is
    // allowed. `ChildSetup::run` makes plain syscalls (write, setsid, setns, unshare, mount) on
    // fds and C strings that were opened and built before the fork; it neither allocates nor
    // takes locks, and its errors are raw errnos.
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
}

/// State and start time from `/proc/<pid>/stat`; `None` when there is no such process.
fn proc_stat(pid: u32) -> io::Result<Option<(char, u64)>> {
    let text = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {text:?}"),
        )
    };
    let rest = text.rsplit_once(')').ok_or_else(bad)?.1;
    let mut fields = rest.split_whitespace();
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or_else(bad)?;
    // Field 3 is the state, so field 22 is 19 further.
    let start = fields
        .nth(18)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Some((state, start)))
}

/// Whether the recorded process still runs: same pid, same start time, not a zombie.
fn alive(record: &Record) -> PortResult<bool> {
    match proc_stat(record.pid) {
        Ok(Some((state, start))) => Ok(start == record.start_time && state != 'Z' && state != 'X'),
        Ok(None) => Ok(false),
        Err(e) => Err(PortError::io(
            "read process state",
            format!("pid {}", record.pid),
            e,
        )),
    }
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(sig)) => Exit::Signal(sig),
        (None, None) => Exit::Unknown,
    }
}

/// Observes whether a running task has exited, reaping our child, and records the exit.
fn refresh(state_dir: &Path, task: &mut Task) -> PortResult<()> {
    if task.record.exit.is_some() {
        return Ok(());
    }
    let exit = match &mut task.child {
        Some(child) => match child.try_wait() {
            Ok(status) => status.map(exit_of),
            // Someone else reaped it (SIGCHLD ignored, a stray waitpid(-1)): gone, status lost.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Some(Exit::Unknown),
            Err(e) => {
                return Err(PortError::io(
                    "wait for process",
                    task.record.task.to_string(),
                    e,
                ));
            }
        },
        None => (!alive(&task.record)?).then_some(Exit::Unknown),
    };
    if let Some(exit) = exit {
        tracing::info!(task = %task.record.task, pid = task.record.pid, ?exit, "task process exited");
        task.record.exit = Some(exit);
        task.child = None;
        // The in-memory state is right either way; a stale file only costs a restarted netd
        // the exit code (it will say Unknown), so this must not fail the call.
        if let Err(e) = write_record(state_dir, &task.record) {
            tracing::warn!(task = %task.record.task, error = %e, "cannot record the exit");
        }
    }
    Ok(())
}

fn record_path(state_dir: &Path, task: &TaskId) -> PathBuf {
    state_dir.join(format!("{task}.json"))
}

fn write_record(state_dir: &Path, record: &Record) -> PortResult<()> {
    let path = record_path(state_dir, &record.task);
    let tmp = state_dir.join(format!(".{}.json.tmp", record.task));
    let text = serde_json::to_vec_pretty(record).map_err(|e| PortError {
        op: "encode process record",
        object: record.task.to_string(),
        kind: ErrorKind::Other,
        detail: e.to_string(),
        source: Some(io::Error::other(e)),
    })?;
    let io_err = |e| PortError::io("write process record", tmp.display().to_string(), e);
    let mut f = File::create(&tmp).map_err(io_err)?;
    f.write_all(&text).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    fs::rename(&tmp, &path)
        .map_err(|e| PortError::io("write process record", path.display().to_string(), e))
}

/// Pids in a cgroup; a missing cgroup holds none.
fn cgroup_pids(cgroup: &Path) -> PortResult<Vec<u32>> {
    let path = cgroup.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(PortError::io(
            "read task cgroup",
            path.display().to_string(),
            e,
        )),
    }
}

/// Sends `sig` to one pid; a process that is already gone is fine.
fn signal(pid: u32, sig: Signal, task: &TaskId) -> PortResult<()> {
    let Ok(raw) = i32::try_from(pid) else {
        return Ok(());
    };
    match kill(Pid::from_raw(raw), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(PortError::io(
            "signal task process",
            format!("{task} pid {pid}"),
            e.into(),
        )),
    }
}

/// SIGKILLs everything in the cgroup: atomically through `cgroup.kill` where the kernel has it,
/// otherwise pid by pid (which can miss a process forked meanwhile; the next call catches it).
fn kill_cgroup(cgroup: &Path, task: &TaskId) -> PortResult<()> {
    let kill_file = cgroup.join("cgroup.kill");
    match OpenOptions::new().write(true).open(&kill_file) {
        Ok(mut f) => f
            .write_all(b"1")
            .map_err(|e| PortError::io("kill task cgroup", kill_file.display().to_string(), e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for pid in cgroup_pids(cgroup)? {
                signal(pid, Signal::SIGKILL, task)?;
            }
            Ok(())
        }
        Err(e) => Err(PortError::io(
            "kill task cgroup",
            kill_file.display().to_string(),
            e,
        )),
    }
}

/// Signals the recorded process itself, when it still is the one we started.
fn signal_recorded(task: &Task, sig: Signal) -> PortResult<()> {
    if task.record.exit.is_some() {
        return Ok(());
    }
    // An unreaped child cannot have its pid reused; an adopted pid is checked by start time.
    if task.child.is_some() || alive(&task.record)? {
        signal(task.record.pid, sig, &task.record.task)?;
    }
    Ok(())
}

/// Starts the grace timer: SIGKILL through `cgroup.kill` after `grace` unless cancelled.
/// `None` when the kernel has no `cgroup.kill` (then only the lazy kill in `list` applies).
fn spawn_killer(
    cgroup: &Path,
    grace: Duration,
    task: &TaskId,
) -> PortResult<Option<mpsc::Sender<()>>> {
    let kill_file = cgroup.join("cgroup.kill");
    let mut f = match OpenOptions::new().write(true).open(&kill_file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PortError::io(
                "open cgroup.kill",
                kill_file.display().to_string(),
                e,
            ));
        }
    };
    let (tx, rx) = mpsc::channel::<()>();
    let task = task.clone();
    let events = cgroup.join("cgroup.events");
    std::thread::Builder::new()
        .name("sn-stop-timer".into())
        .spawn(move || {
            if rx.recv_timeout(grace) == Err(mpsc::RecvTimeoutError::Timeout) {
                // Most tasks leave on SIGTERM well within the grace: then there is nothing to
                // kill and nothing to say.
                let emptied = std::fs::read_to_string(&events)
                    .map(|e| e.lines().any(|l| l == "populated 0"))
                    .unwrap_or(true);
                if emptied {
                    return;
                }
                match f.write_all(b"1") {
                    Ok(()) => {
                        tracing::info!(task = %task, "grace expired, killed the task's cgroup")
                    }
                    // ENODEV: the cgroup was removed meanwhile, so there is nothing left to kill.
                    Err(e) => {
                        tracing::warn!(task = %task, error = %e, "cannot kill the task's cgroup")
                    }
                }
            }
        })
        .map_err(|e| PortError::io("spawn stop timer", cgroup.display().to_string(), e))?;
    Ok(Some(tx))
}

fn state_of(task: &Task) -> ProcessState {
    ProcessState {
        task: task.record.task.clone(),
        pid: task.record.pid,
        exit: task.record.exit,
        stopping: task.stop.is_some() && task.record.exit.is_none(),
    }
}

impl ProcessPort for LinuxProcessPort {
    fn list(&mut self) -> PortResult<Vec<ProcessState>> {
        let now = Instant::now();
        for (id, task) in &mut self.tasks {
            refresh(&self.state_dir, task)?;
            let due = task
                .stop
                .as_ref()
                .is_some_and(|s| !s.killed && now >= s.deadline);
            if due {
                // Usually the timer thread did this already; repeating it is harmless.
                kill_cgroup(&self.cgroup_dir.join(id.as_str()), id)?;
                signal_recorded(task, Signal::SIGKILL)?;
                if let Some(stop) = &mut task.stop {
                    stop.killed = true;
                }
            }
        }
        Ok(self.tasks.values().map(state_of).collect())
    }

    fn start(&mut self, spec: &ProcessSpec) -> PortResult<u32> {
        let id = &spec.task;
        if spec.argv.is_empty() {
            return Err(PortError::new(
                "start process",
                id.as_str(),
                ErrorKind::Invalid,
                "argv is empty; give the command to run",
            ));
        }
        if let Some(task) = self.tasks.get_mut(id) {
            refresh(&self.state_dir, task)?;
            if task.record.exit.is_none() {
                return Err(PortError::new(
                    "start process",
                    id.as_str(),
                    ErrorKind::Exists,
                    format!("already running as pid {}; stop it first", task.record.pid),
                ));
            }
        }
        let cgroup = self.task_cgroup(id);
        match fs::create_dir(&cgroup) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(PortError::io(
                    "create task cgroup",
                    cgroup.display().to_string(),
                    e,
                ));
            }
        }
        let left = cgroup_pids(&cgroup)?;
        if !left.is_empty() {
            return Err(PortError::new(
                "start process",
                id.as_str(),
                ErrorKind::Busy,
                format!(
                    "cgroup {} still holds pids {left:?} of an earlier run; stop the task first",
                    cgroup.display()
                ),
            ));
        }

        let mut child = self.spawn(spec, &cgroup)?;
        let pid = child.id();
        // Until we reap it the pid cannot be reused, so this reads our child even if it exited.
        let recorded = match proc_stat(pid) {
            Ok(Some((_, start_time))) => {
                let record = Record {
                    pid,
                    start_time,
                    task: id.clone(),
                    argv: spec.argv.clone(),
                    exit: None,
                };
                write_record(&self.state_dir, &record).map(|()| record)
            }
            Ok(None) => Err(PortError::new(
                "read process state",
                format!("pid {pid}"),
                ErrorKind::Other,
                "vanished",
            )),
            Err(e) => Err(PortError::io("read process state", format!("pid {pid}"), e)),
        };
        let record = match recorded {
            Ok(r) => r,
            Err(e) => {
                // Untracked processes are worse than a failed start: take it down again.
                if let Err(k) = kill_cgroup(&cgroup, id) {
                    tracing::warn!(task = %id, error = %k, "cannot kill the task after a failed start");
                }
                if let Err(w) = child.wait() {
                    tracing::warn!(task = %id, error = %w, "cannot reap the task after a failed start");
                }
                return Err(e);
            }
        };
        tracing::info!(task = %id, pid, argv = ?spec.argv, "started task process");
        self.tasks.insert(
            id.clone(),
            Task {
                record,
                child: Some(child),
                stop: None,
            },
        );
        Ok(pid)
    }

    fn stop(&mut self, id: &TaskId, grace: Duration) -> PortResult<()> {
        let cgroup = self.task_cgroup(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return Err(PortError::new(
                "stop process",
                id.as_str(),
                ErrorKind::NotFound,
                "no such task process",
            ));
        };
        refresh(&self.state_dir, task)?;
        let pids = cgroup_pids(&cgroup)?;
        for &pid in &pids {
            signal(pid, Signal::SIGTERM, id)?;
        }
        if !pids.contains(&task.record.pid) {
            signal_recorded(task, Signal::SIGTERM)?;
        }
        if task.record.exit.is_some() && pids.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + grace;
        // A second stop may shorten the grace, never extend it.
        if task.stop.as_ref().is_some_and(|s| s.deadline <= deadline) {
            return Ok(());
        }
        let cancel = match spawn_killer(&cgroup, grace, id) {
            Ok(cancel) => cancel,
            // The lazy kill in `list` still applies, so the stop itself has not failed.
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "no stop timer; will kill on the next list");
                None
            }
        };
        // Replacing an earlier stop drops its sender, which cancels its timer.
        task.stop = Some(Stop {
            deadline,
            killed: false,
            _cancel: cancel,
        });
        Ok(())
    }

    fn forget(&mut self, id: &TaskId) -> PortResult<()> {
        let cgroup = self.task_cgroup(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return Err(PortError::new(
                "forget process",
                id.as_str(),
                ErrorKind::NotFound,
                "no such task process",
            ));
        };
        refresh(&self.state_dir, task)?;
        if task.record.exit.is_none() {
            return Err(PortError::new(
                "forget process",
                id.as_str(),
                ErrorKind::Busy,
                format!("still running as pid {}; stop it first", task.record.pid),
            ));
        }
        match fs::remove_dir(&cgroup) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let mut err = PortError::io("remove task cgroup", cgroup.display().to_string(), e);
                if err.kind == ErrorKind::Busy {
                    err.detail
                        .push_str("; processes of the task are left in it: stop the task");
                }
                return Err(err);
            }
        }
        let path = record_path(&self.state_dir, id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PortError::io(
                    "remove process record",
                    path.display().to_string(),
                    e,
                ));
            }
        }
        self.tasks.remove(id);
        Ok(())
    }
}

/// Renames an unreadable process record to `<name>.corrupt` and says so in the log.
fn set_aside(path: &Path, why: &str) {
    let aside = path.with_extension("json.corrupt");
    tracing::error!(path = %path.display(), moved_to = %aside.display(), reason = why, "unreadable process record set aside; its task will be started anew");
    if let Err(e) = fs::rename(path, &aside) {
        tracing::error!(path = %path.display(), error = %e, "cannot set the record aside");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:7 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("31 23 0:28 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }

    #[test]
    fn record_round_trips_and_tolerates_new_fields() {
        let text =
            r#"{"pid":7,"start_time":99,"task":"t1","argv":["sh"],"exit":{"code":3},"later":1}"#;
        let r: Record = serde_json::from_str(text).unwrap();
        assert_eq!(r.exit, Some(Exit::Code(3)));
        let again: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }
}
