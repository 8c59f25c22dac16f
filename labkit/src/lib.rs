//! Network-namespace labs on one machine, the machinery shared by `swarmnet lab` (a product
//! feature) and the netns test harness (`tests-netns/src/topo.rs`):
//!
//! - [`netns_add`] / [`netns_del`]: named namespaces under `/run/netns` (serialised: iproute2 makes
//!   `/run/netns` a shared mount on first use, which races between concurrent callers);
//! - [`spawn_in`]: starts a process inside a namespace (`setns(CLONE_NEWNET)` only, so the netns
//!   bind mounts netd makes stay in the shared mount namespace) and inside a cgroup, so one
//!   `cgroup.kill` ends it and everything it started;
//! - [`destroy`]: removes a [`Footprint`] completely (processes by cgroup, then strays found by
//!   namespace identity, mounts, directories, cgroups, namespaces) and says what it had to force;
//! - small observers: [`cgroup2_mount`], [`mounts_under`], [`pids_in_netns`], [`pid_alive`].
//!
//! Invariant: nothing here changes the root network namespace; every change is made inside a
//! namespace the caller named, with `ip -n <ns>` or from a process that entered it.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns add` keeps its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// What went wrong, with the command or path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Command {
        cmdline: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KitError {
    let what = what.into();
    move |source| KitError::Io { what, source }
}

static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn netns_lock() -> MutexGuard<'static, ()> {
    // A panic while holding it poisons nothing we rely on: the guarded state is the kernel's.
    NETNS_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `args` (a short host command such as `ip -n X ...`) and fails with its stderr.
pub fn run(args: &[&str]) -> Result<String, KitError> {
    let cmdline = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io_err(format!("running `{cmdline}`")))?;
    if !out.status.success() {
        return Err(KitError::Command {
            cmdline,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn netns_add(name: &str) -> Result<(), KitError> {
    let _g = netns_lock();
    run(&["ip", "netns", "add", name]).map(drop)
}

pub fn netns_del(name: &str) -> Result<(), KitError> {
    let _g = netns_lock();
    run(&["ip", "netns", "del", name]).map(drop)
}

/// Names in `/run/netns` that start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    list_dir(Path::new(NETNS_DIR))
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

pub fn list_dir(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, KitError> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").map_err(io_err("/proc/self/mountinfo"))?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .ok_or_else(|| KitError::Io {
            what: "no cgroup2 file system is mounted (see /proc/self/mountinfo)".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
}

/// Mount points at or below `dir` in our mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out
}

/// How many times `path` is a mount point (more than 1 means stacked mounts).
pub fn mount_count(path: &Path) -> usize {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.split_whitespace().nth(4).map(Path::new) == Some(path))
        .count()
}

/// `(dev, inode)` of a namespace file.
pub fn ns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Pids of live processes whose network namespace is the one bind-mounted at `netns`.
pub fn pids_in_netns(netns: &Path) -> Vec<u32> {
    ns_id(netns)
        .map(|id| pids_in(&BTreeSet::from([id])))
        .unwrap_or_default()
}

/// Pids (other than ours) whose network namespace is one of `ids`.
pub fn pids_in(ids: &BTreeSet<(u64, u64)>) -> Vec<u32> {
    list_dir(Path::new("/proc"))
        .into_iter()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            ns_id(&Path::new("/proc").join(pid.to_string()).join("ns/net"))
                .is_some_and(|id| ids.contains(&id))
        })
        .collect()
}

/// The start time of live process `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` when it does not exist or is a zombie. With the pid it names one
/// process for good: a recycled pid has another start time.
pub fn start_ticks(pid: u32) -> Option<u64> {
    parse_start_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/<pid>/stat` line, `None` for a zombie (pure). The name (field 2) may
/// hold spaces and parentheses: the fields that follow start after its last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // `rest` starts with field 3 (state).
    if fields.next()? == "Z" {
        return None;
    }
    // Field 22 is the 19th after the state.
    fields.nth(18)?.parse().ok()
}

/// Ends process `pid`: SIGTERM, then SIGKILL if it still runs after `grace`; waits (5 s more
/// at most) until it is gone. Signals only while `ours()` holds, so a pid recycled by another
/// process meanwhile is left alone (callers check a start time, or know the pid is theirs).
pub fn terminate(pid: u32, grace: Duration, ours: impl Fn() -> bool) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if !ours() {
        return;
    }
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    if wait_until(grace, || !ours()) {
        return;
    }
    if ours() {
        let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    }
    wait_until(Duration::from_secs(5), || !ours());
}

/// Whether `pid` is a live process (zombies count as dead).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `dir` and its subdirectories bottom-up (for cgroup trees, which refuse
/// `remove_dir_all`: their control files cannot be unlinked).
pub fn rmdir_tree(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            rmdir_tree(&e.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// Starts `cmd` inside the network namespace at `netns` and inside the cgroup `cgroup` (created
/// if missing). Its stdio is whatever the caller set on `cmd`.
pub fn spawn_in(mut cmd: Command, netns: &Path, cgroup: &Path) -> Result<Child, KitError> {
    fs::create_dir_all(cgroup).map_err(io_err(format!("creating cgroup {}", cgroup.display())))?;
    let ns = fs::File::open(netns).map_err(io_err(format!("opening {}", netns.display())))?;
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(io_err(format!("opening {}/cgroup.procs", cgroup.display())))?;
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    #[expect(
        unsafe_code,
        reason = "pre_exec is the only way to setns the child before exec"
    )]
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe syscalls (setns, write) on fds the parent keeps open until spawn()
    // returns; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writing process itself into the cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.spawn().map_err(io_err(format!("starting {program}")))?;
    drop((ns, procs));
    Ok(child)
}

/// Everything one lab (or test topology) owns, by name.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// Every namespace in `/run/netns` starting with this belongs to it.
    pub netns_prefix: String,
    /// Its run directory (mounts below it are unmounted, then it is removed).
    pub dir: PathBuf,
    /// Its cgroup (every process inside is killed, then the tree removed).
    pub cgroup: Option<PathBuf>,
}

/// Removes everything of `fp`; returns notes on what had to be forced or failed (empty when it
/// all went cleanly).
pub fn destroy(fp: &Footprint) -> Vec<String> {
    let mut notes = Vec::new();
    let namespaces = netns_with_prefix(&fp.netns_prefix);

    // 1. Every process in the cgroup tree.
    if let Some(cg) = fp.cgroup.as_ref().filter(|c| c.exists()) {
        if let Err(e) = fs::write(cg.join("cgroup.kill"), "1") {
            notes.push(format!("cgroup.kill in {}: {e}", cg.display()));
        }
        let emptied = wait_until(Duration::from_secs(10), || {
            fs::read_to_string(cg.join("cgroup.events"))
                .map(|s| s.contains("populated 0"))
                .unwrap_or(true)
        });
        if !emptied {
            notes.push(format!("{} did not empty within 10 s", cg.display()));
        }
    }

    // 2. Stray processes still inside one of our namespaces (escaped the cgroup).
    let mut ids: BTreeSet<(u64, u64)> = namespaces
        .iter()
        .filter_map(|n| ns_id(&netns_path(n)))
        .collect();
    for m in mounts_under(&fp.dir) {
        ids.extend(ns_id(&m));
    }
    for round in 0..50 {
        let strays = pids_in(&ids);
        if strays.is_empty() {
            break;
        }
        for pid in strays {
            if round == 0 {
                let comm = fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ");
                notes.push(format!(
                    "killed stray process {pid} ({}) left in a lab namespace",
                    comm.trim()
                ));
            }
            if let Ok(p) = i32::try_from(pid) {
                kill(Pid::from_raw(p), Signal::SIGKILL).ok();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // 3. Mounts under the run dir (netd's netns bind mounts), then the dir itself.
    for m in mounts_under(&fp.dir) {
        for _ in 0..16 {
            if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
    if fp.dir.exists()
        && let Err(e) = fs::remove_dir_all(&fp.dir)
    {
        notes.push(format!("removing {}: {e}", fp.dir.display()));
    }

    // 4. The cgroup tree, bottom-up.
    if let Some(cg) = fp.cgroup.as_ref().filter(|c| c.exists())
        && let Err(e) = rmdir_tree(cg)
    {
        notes.push(format!("removing cgroup {}: {e}", cg.display()));
    }

    // 5. The namespaces (their links go with them).
    for ns in &namespaces {
        if let Err(e) = netns_del(ns) {
            notes.push(format!("ip netns del {ns}: {e}"));
        }
    }
    notes
}

/// What of `fp` still exists: namespaces, mounts, the run dir, the cgroup, live processes in it.
/// Empty after a clean [`destroy`].
pub fn leftovers(fp: &Footprint) -> Vec<String> {
    let mut out: Vec<String> = netns_with_prefix(&fp.netns_prefix)
        .into_iter()
        .map(|n| format!("namespace {n}"))
        .collect();
    out.extend(
        mounts_under(&fp.dir)
            .into_iter()
            .map(|m| format!("mount {}", m.display())),
    );
    if fp.dir.exists() {
        out.push(format!("directory {}", fp.dir.display()));
    }
    if let Some(cg) = fp.cgroup.as_ref().filter(|c| c.exists()) {
        out.push(format!("cgroup {}", cg.display()));
    }
    out
}
