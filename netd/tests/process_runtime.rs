//! Contract suite of the task runtime (`ProcessPort`), run on `FakeProcessPort` and on
//! `LinuxProcessPort`, plus Linux-only checks of what the fake cannot model: the sandbox netns,
//! the cgroup, the resolv.conf bind mount, and adoption from record files.
//!
//! The Linux runs are privileged (gate: `swarmnet_tests_netns::gate`). They never touch the
//! node's network namespace: each test makes a scratch netns (a thread unshares, its namespace is
//! bind-mounted onto a file in a tempdir, unmounted on drop) and a cgroup dir of its own under
//! `<cgroup2>/swarmnet-test/`, killed (only through its `cgroup.kill`) and removed on drop.
//! Everything waits on conditions (20 ms polls, 10 s limit), never on fixed sleeps.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use swarmnet_model::TaskId;
use swarmnet_netd::fake::process::FakeProcessPort;
use swarmnet_netd::linux::process::{LinuxProcessPort, default_cgroup_dir};
use swarmnet_netd::port::{ErrorKind, Exit, ProcessPort, ProcessSpec, ProcessState};

const LONG: Duration = Duration::from_secs(10);

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < LONG,
            "timed out after {LONG:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

fn state(port: &mut dyn ProcessPort, task: &TaskId) -> Option<ProcessState> {
    port.list().unwrap().into_iter().find(|s| &s.task == task)
}

fn wait_exit(port: &mut dyn ProcessPort, task: &TaskId) -> Exit {
    wait_for(&format!("{task} to exit"), || {
        state(port, task).and_then(|s| s.exit)
    })
}

/// What the task's process does, acted out by a real shell or by the fake's helpers.
#[derive(Debug, Clone, Copy)]
enum Script {
    Sleep,
    Exit(i32),
    IgnoreTerm,
}

/// How the suite drives one implementation.
trait Harness {
    fn port(&mut self) -> &mut dyn ProcessPort;
    fn spec(&self, task: &TaskId, script: Script) -> ProcessSpec;
    /// Right after a successful start: lets the script reach its interesting point.
    fn started(&mut self, task: &TaskId, script: Script);
    /// netd dies (`kill -9`) and a new one starts on the same state.
    fn restart(&mut self);
    /// Something outside netd kills the process.
    fn kill_externally(&mut self, task: &TaskId, pid: u32);

    fn start(&mut self, task: &TaskId, script: Script) -> u32 {
        let spec = self.spec(task, script);
        let pid = self.port().start(&spec).unwrap();
        self.started(task, script);
        pid
    }
}

// ---------------------------------------------------------------- the contract suite

fn contract_lifecycle(h: &mut dyn Harness) {
    let t = tid("life");
    let pid = h.start(&t, Script::Sleep);
    assert!(pid > 0);
    let s = state(h.port(), &t).unwrap();
    assert_eq!((s.pid, s.exit, s.stopping), (pid, None, false));

    let spec = h.spec(&t, Script::Sleep);
    let err = h.port().start(&spec).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Exists, "{err}");
    let err = h.port().forget(&t).unwrap_err();
    assert_eq!(
        err.kind,
        ErrorKind::Busy,
        "forget of a running process: {err}"
    );

    h.port().stop(&t, LONG).unwrap();
    assert_eq!(wait_exit(h.port(), &t), Exit::Signal(libc::SIGTERM));
    assert!(
        !state(h.port(), &t).unwrap().stopping,
        "stopping ends with the process"
    );
    // Exited processes stay listed until forgotten; stopping one again is harmless.
    h.port().stop(&t, LONG).unwrap();
    assert_eq!(
        state(h.port(), &t).unwrap().exit,
        Some(Exit::Signal(libc::SIGTERM))
    );

    h.port().forget(&t).unwrap();
    assert!(state(h.port(), &t).is_none());
    assert_eq!(h.port().forget(&t).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(
        h.port().stop(&t, LONG).unwrap_err().kind,
        ErrorKind::NotFound
    );
}

fn contract_exit_code_and_restart_of_task(h: &mut dyn Harness) {
    let t = tid("exits");
    h.start(&t, Script::Exit(3));
    assert_eq!(wait_exit(h.port(), &t), Exit::Code(3));
    assert!(!Exit::Code(3).success());
    // An exited, not yet forgotten record does not block a new start of the task.
    h.start(&t, Script::Sleep);
    assert_eq!(state(h.port(), &t).unwrap().exit, None);
    h.port().stop(&t, LONG).unwrap();
    wait_exit(h.port(), &t);
    h.port().forget(&t).unwrap();
}

fn contract_grace_then_kill(h: &mut dyn Harness) {
    let t = tid("stubborn");
    let grace = Duration::from_millis(300);
    h.start(&t, Script::IgnoreTerm);
    let asked = Instant::now();
    h.port().stop(&t, grace).unwrap();
    let s = state(h.port(), &t).unwrap();
    if asked.elapsed() < grace {
        assert_eq!(
            (s.exit, s.stopping),
            (None, true),
            "SIGTERM is ignored, so it runs on"
        );
    }
    assert_eq!(wait_exit(h.port(), &t), Exit::Signal(libc::SIGKILL));
    assert!(
        asked.elapsed() >= grace,
        "killed before the grace ran out: {:?}",
        asked.elapsed()
    );
    h.port().forget(&t).unwrap();
}

fn contract_invalid_argv(h: &mut dyn Harness) {
    let t = tid("noargv");
    let mut spec = h.spec(&t, Script::Sleep);
    spec.argv.clear();
    assert_eq!(h.port().start(&spec).unwrap_err().kind, ErrorKind::Invalid);
    assert!(state(h.port(), &t).is_none());
}

fn contract_adoption(h: &mut dyn Harness) {
    let t = tid("adopted");
    let done = tid("done-before");
    let pid = h.start(&t, Script::Sleep);
    h.start(&done, Script::Exit(4));
    assert_eq!(wait_exit(h.port(), &done), Exit::Code(4));

    h.restart();
    let s = state(h.port(), &t).expect("the new port adopts the running process");
    assert_eq!((s.pid, s.exit), (pid, None));
    // An exit the earlier netd saw is not lost.
    assert_eq!(state(h.port(), &done).unwrap().exit, Some(Exit::Code(4)));
    let spec = h.spec(&t, Script::Sleep);
    assert_eq!(h.port().start(&spec).unwrap_err().kind, ErrorKind::Exists);

    h.kill_externally(&t, pid);
    assert_eq!(
        wait_exit(h.port(), &t),
        Exit::Unknown,
        "not our child: the status is unknowable"
    );
    h.port().forget(&t).unwrap();
    h.port().forget(&done).unwrap();
}

fn contract_suite(mut make: impl FnMut() -> Box<dyn Harness>) {
    contract_lifecycle(&mut *make());
    contract_exit_code_and_restart_of_task(&mut *make());
    contract_grace_then_kill(&mut *make());
    contract_invalid_argv(&mut *make());
    contract_adoption(&mut *make());
}

// ---------------------------------------------------------------- fake

struct FakeHarness(FakeProcessPort);

impl Harness for FakeHarness {
    fn port(&mut self) -> &mut dyn ProcessPort {
        &mut self.0
    }
    fn spec(&self, task: &TaskId, _script: Script) -> ProcessSpec {
        ProcessSpec {
            task: task.clone(),
            netns: PathBuf::from("/run/swarmnet/netns/sb-fake"),
            argv: vec!["app".into()],
            env: BTreeMap::new(),
            resolv_conf: None,
            log: PathBuf::from("/dev/null"),
        }
    }
    fn started(&mut self, task: &TaskId, script: Script) {
        match script {
            Script::Sleep => {}
            Script::Exit(code) => assert!(self.0.exit(task, Exit::Code(code))),
            Script::IgnoreTerm => assert!(self.0.ignore_sigterm(task)),
        }
    }
    fn restart(&mut self) {
        self.0.restart();
    }
    fn kill_externally(&mut self, task: &TaskId, _pid: u32) {
        assert!(self.0.exit(task, Exit::Signal(libc::SIGKILL)));
    }
}

#[test]
fn fake_contract() {
    contract_suite(|| Box::new(FakeHarness(FakeProcessPort::new())));
}

#[test]
fn fake_helpers() {
    let mut h = FakeHarness(FakeProcessPort::new());
    let t = tid("crash");
    h.start(&t, Script::Sleep);
    assert!(h.0.running(&t));
    assert_eq!(h.0.spec(&t).unwrap().argv, ["app"]);
    assert!(h.0.exit(&t, Exit::Signal(libc::SIGSEGV)));
    assert!(!h.0.running(&t));
    assert!(
        !h.0.exit(&t, Exit::Code(0)),
        "an exited process cannot exit again"
    );
    assert_eq!(
        state(h.port(), &t).unwrap().exit,
        Some(Exit::Signal(libc::SIGSEGV))
    );
}

// ---------------------------------------------------------------- Linux

/// A network namespace that exists only as a bind mount on a file in a tempdir.
struct ScratchNetns {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ScratchNetns {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netns");
        fs::File::create(&path).unwrap();
        let target = path.clone();
        // The namespace is the thread's; the bind mount keeps it alive after the thread ends.
        std::thread::spawn(move || -> nix::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .join()
        .unwrap()
        .unwrap();
        Self { _dir: dir, path }
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount scratch netns {}: {e}", self.path.display());
        }
    }
}

/// `<cgroup2 mount>/swarmnet-test/<pid>-<n>`, emptied (through cgroup.kill) and removed on drop.
struct ScratchCgroup {
    path: PathBuf,
}

impl ScratchCgroup {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        // default_cgroup_dir gives <mount>/swarmnet/<id>; the test tree sits beside it.
        let mount = default_cgroup_dir("x")
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        let path = mount.join("swarmnet-test").join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        Self { path }
    }

    fn procs(dir: &Path) -> Vec<i32> {
        fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            if !dir.is_dir() {
                continue;
            }
            // Only what our tests started lives here.
            let pids = Self::procs(&dir);
            if !pids.is_empty() {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
                for pid in pids {
                    // Reap the ones that are children of this test process (ECHILD otherwise).
                    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
                }
                let start = Instant::now();
                while !Self::procs(&dir).is_empty() && start.elapsed() < LONG {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if let Err(e) = fs::remove_dir(&dir) {
                eprintln!("cannot remove test cgroup {}: {e}", dir.display());
            }
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cannot remove test cgroup {}: {e}", self.path.display());
        }
        // `swarmnet-test` itself is left in place: the tests-netns topologies create theirs
        // under it concurrently, and removing it could race their mkdir.
    }
}

struct LinuxHarness {
    // Field order is drop order: the port first, then the cgroup (kills leftovers), then the netns.
    port: Option<LinuxProcessPort>,
    cgroup: ScratchCgroup,
    netns: ScratchNetns,
    dir: tempfile::TempDir,
}

impl LinuxHarness {
    fn new() -> Self {
        let cgroup = ScratchCgroup::new();
        let netns = ScratchNetns::new();
        let dir = tempfile::tempdir().unwrap();
        let port = LinuxProcessPort::new(dir.path().join("tasks"), cgroup.path.clone()).unwrap();
        Self {
            port: Some(port),
            cgroup,
            netns,
            dir,
        }
    }
    fn log(&self, task: &TaskId) -> PathBuf {
        self.dir.path().join(format!("{task}.log"))
    }
    fn read_log(&self, task: &TaskId) -> String {
        fs::read_to_string(self.log(task)).unwrap_or_default()
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("tasks")
    }
    fn port_mut(&mut self) -> &mut LinuxProcessPort {
        self.port.as_mut().unwrap()
    }
}

impl Harness for LinuxHarness {
    fn port(&mut self) -> &mut dyn ProcessPort {
        self.port_mut()
    }
    fn spec(&self, task: &TaskId, script: Script) -> ProcessSpec {
        let sh = |s: String| vec!["sh".to_string(), "-c".to_string(), s];
        ProcessSpec {
            task: task.clone(),
            netns: self.netns.path.clone(),
            argv: match script {
                Script::Sleep => vec!["sleep".into(), "100".into()],
                Script::Exit(code) => sh(format!("exit {code}")),
                // The marker tells the test that the trap is in place, so the stop cannot win
                // the race against it. An ignored signal stays ignored across exec, so `sleep`
                // ignores it too.
                Script::IgnoreTerm => sh("trap '' TERM; echo trap-set; sleep 100".into()),
            },
            env: BTreeMap::new(),
            resolv_conf: None,
            log: self.log(task),
        }
    }
    fn started(&mut self, task: &TaskId, script: Script) {
        if let Script::IgnoreTerm = script {
            wait_for("the TERM trap", || {
                self.read_log(task).contains("trap-set").then_some(())
            });
        }
    }
    fn restart(&mut self) {
        // Dropping the port must leave its children running, as a netd killed with -9 would.
        drop(self.port.take());
        self.port =
            Some(LinuxProcessPort::new(self.state_dir(), self.cgroup.path.clone()).unwrap());
    }
    fn kill_externally(&mut self, _task: &TaskId, pid: u32) {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGKILL).unwrap();
        // The test process is still its parent (the first port's Child handle is gone): reap it,
        // as init would reap an orphan of a dead netd.
        nix::sys::wait::waitpid(pid, None).unwrap();
    }
}

fn netns_inode(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

#[test]
fn linux_contract() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_contract") {
        return;
    }
    contract_suite(|| Box::new(LinuxHarness::new()));
}

#[test]
fn linux_task_runs_in_sandbox_netns_and_own_cgroup() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_netns_cgroup") {
        return;
    }
    let mut h = LinuxHarness::new();
    let t = tid("placed");
    let mut spec = h.spec(&t, Script::Sleep);
    spec.argv = vec![
        "sh".into(),
        "-c".into(),
        "ip -o link; echo env=$FOO; sleep 100".into(),
    ];
    spec.env.insert("FOO".into(), "bar".into());
    let pid = h.port_mut().start(&spec).unwrap();

    wait_for("the task's output", || {
        h.read_log(&t).contains("env=").then_some(())
    });
    assert_eq!(
        netns_inode(Path::new(&format!("/proc/{pid}/ns/net"))),
        netns_inode(&h.netns.path),
        "the task runs in the sandbox netns"
    );
    assert_ne!(
        netns_inode(Path::new("/proc/self/ns/net")),
        netns_inode(&h.netns.path)
    );
    assert_ne!(
        netns_inode(Path::new(&format!("/proc/{pid}/ns/mnt"))),
        netns_inode(Path::new("/proc/self/ns/mnt")),
        "the task has a private mount namespace even without a resolv.conf"
    );
    let log = h.read_log(&t);
    let links: Vec<&str> = log.lines().filter(|l| l.contains("link/")).collect();
    assert!(
        links.len() == 1 && links[0].contains(": lo:"),
        "a fresh netns has only lo: {log}"
    );
    assert!(
        log.contains("env=bar"),
        "the spec's env reaches the task: {log}"
    );

    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mount = h.cgroup.path.ancestors().nth(2).unwrap();
    let want = Path::new("/").join(h.cgroup.path.join(t.as_str()).strip_prefix(mount).unwrap());
    assert!(
        cgroup
            .lines()
            .any(|l| l.strip_prefix("0::").map(Path::new) == Some(&want)),
        "pid {pid} should be in {}: {cgroup}",
        want.display()
    );
    // Its own session.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let sid: i32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sid, pid as i32, "the task leads its own session");

    h.port_mut().stop(&t, LONG).unwrap();
    wait_exit(h.port(), &t);
    h.port_mut().forget(&t).unwrap();
    assert!(
        !h.cgroup.path.join(t.as_str()).exists(),
        "forget removes the task's cgroup"
    );
}

#[test]
fn linux_grace_timer_kills_without_anyone_listing() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_grace_timer") {
        return;
    }
    let mut h = LinuxHarness::new();
    let t = tid("unlisted");
    let pid = h.start(&t, Script::IgnoreTerm);
    h.port_mut().stop(&t, Duration::from_millis(200)).unwrap();
    // No list() calls here: only the timer thread can deliver the SIGKILL. Our unreaped child
    // shows up as a zombie once dead.
    wait_for("the timer's SIGKILL", || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        (stat.rsplit_once(')').unwrap().1.split_whitespace().next() == Some("Z")).then_some(())
    });
    assert_eq!(
        state(h.port(), &t).unwrap().exit,
        Some(Exit::Signal(libc::SIGKILL))
    );
    h.port_mut().forget(&t).unwrap();
}

#[test]
fn linux_resolv_conf_is_private_to_the_task() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_resolv_conf") {
        return;
    }
    let mut h = LinuxHarness::new();
    let t = tid("dns");
    let marker = format!("snt-resolv-{}", std::process::id());
    let resolv = h.dir.path().join("resolv.conf");
    fs::write(&resolv, format!("nameserver 127.0.0.11\n# {marker}\n")).unwrap();
    let host_before = fs::read(Path::new("/etc/resolv.conf")).unwrap();

    let mut spec = h.spec(&t, Script::Sleep);
    spec.argv = vec!["cat".into(), "/etc/resolv.conf".into()];
    spec.resolv_conf = Some(resolv);
    h.port_mut().start(&spec).unwrap();
    assert_eq!(wait_exit(h.port(), &t), Exit::Code(0));

    let log = h.read_log(&t);
    assert!(
        log.contains(&marker),
        "the task sees our resolv.conf: {log:?}"
    );
    assert_eq!(
        fs::read(Path::new("/etc/resolv.conf")).unwrap(),
        host_before,
        "the host's is unchanged"
    );
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/etc/resolv.conf")),
        "the bind mount must not propagate to the node"
    );
    h.port_mut().forget(&t).unwrap();
}

#[test]
fn linux_start_errors_name_the_cause() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_start_errors") {
        return;
    }
    let mut h = LinuxHarness::new();
    let t = tid("broken");

    let mut spec = h.spec(&t, Script::Sleep);
    spec.netns = h.dir.path().join("no-such-netns");
    let err = h.port_mut().start(&spec).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("netns"), "{err}");

    let mut spec = h.spec(&t, Script::Sleep);
    spec.argv = vec!["/nonexistent/snt-binary".into()];
    let err = h.port_mut().start(&spec).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(
        err.to_string().contains("exec"),
        "the failing step is named: {err}"
    );

    let mut spec = h.spec(&t, Script::Sleep);
    spec.resolv_conf = Some(h.dir.path().join("no-such-resolv.conf"));
    let err = h.port_mut().start(&spec).unwrap_err();
    assert!(
        err.to_string().contains("/etc/resolv.conf"),
        "the failing step is named: {err}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );

    assert!(
        state(h.port(), &t).is_none(),
        "a failed start leaves no record"
    );
}

/// A program named without a path is found on the configured task PATH (`--task-path`, the
/// lab puts the project's binaries there), and a spec's own PATH still wins.
#[test]
fn linux_task_path_finds_programs_by_name() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_task_path") {
        return;
    }
    let mut h = LinuxHarness::new();
    let bin = h.dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let tool = bin.join("snt-tool");
    fs::write(&tool, "#!/bin/sh\necho found-by-name\n").unwrap();
    fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), swarmnet_model::DEFAULT_TASK_PATH);
    let port = h.port.take().unwrap().with_task_path(&path);
    h.port = Some(port);

    let t = tid("byname");
    let mut spec = h.spec(&t, Script::Sleep);
    spec.argv = vec!["snt-tool".into()];
    h.port_mut().start(&spec).unwrap();
    assert_eq!(wait_exit(h.port(), &t), Exit::Code(0));
    assert!(
        h.read_log(&t).contains("found-by-name"),
        "{}",
        h.read_log(&t)
    );

    // The spec's PATH replaces the configured one: the tool is not found any more.
    let t2 = tid("ownpath");
    let mut spec = h.spec(&t2, Script::Sleep);
    spec.argv = vec!["snt-tool".into()];
    spec.env.insert("PATH".into(), "/usr/bin:/bin".into());
    let err = h.port_mut().start(&spec).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
}

#[test]
fn linux_leftover_processes_keep_the_cgroup_busy_until_stopped() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_leftovers") {
        return;
    }
    let mut h = LinuxHarness::new();
    let t = tid("forker");
    let mut spec = h.spec(&t, Script::Sleep);
    // The main process exits at once, leaving a background child in the task's cgroup.
    spec.argv = vec![
        "sh".into(),
        "-c".into(),
        "sleep 100 >/dev/null 2>&1 & exit 0".into(),
    ];
    h.port_mut().start(&spec).unwrap();
    assert_eq!(wait_exit(h.port(), &t), Exit::Code(0));

    let cg = h.cgroup.path.join(t.as_str());
    let err = h.port_mut().forget(&t).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Busy, "{err}");
    let err = h.port_mut().start(&spec).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Busy, "{err}");

    h.port_mut().stop(&t, LONG).unwrap();
    wait_for("the cgroup to empty", || {
        ScratchCgroup::procs(&cg).is_empty().then_some(())
    });
    h.port_mut().forget(&t).unwrap();
}

#[test]
fn linux_stale_records_are_reported_exited() {
    if !swarmnet_tests_netns::gate::privileged("process_runtime::linux_stale_records") {
        return;
    }
    let h = LinuxHarness::new();
    let state_dir = h.state_dir();
    // A live pid (this test process) with another start time: the pid was reused.
    let reused = serde_json::json!({
        "pid": std::process::id(), "start_time": 1, "task": "reused", "argv": ["sleep", "100"]
    });
    // A pid that cannot exist (above the kernel's PID_MAX_LIMIT).
    let dead = serde_json::json!({
        "pid": 4_194_305 + 1000, "start_time": 1, "task": "dead", "argv": ["sleep", "100"]
    });
    fs::write(state_dir.join("reused.json"), reused.to_string()).unwrap();
    fs::write(state_dir.join("dead.json"), dead.to_string()).unwrap();
    fs::write(state_dir.join(".half.json.tmp"), "{").unwrap();

    let mut port = LinuxProcessPort::new(state_dir.clone(), h.cgroup.path.clone()).unwrap();
    let states = port.list().unwrap();
    assert_eq!(states.len(), 2, "{states:?}");
    assert!(
        states
            .iter()
            .all(|s| s.exit == Some(Exit::Unknown) && !s.stopping),
        "{states:?}"
    );
    // Nothing is signalled for a record that is not ours any more (this process survives).
    port.stop(&tid("reused"), Duration::ZERO).unwrap();
    port.list().unwrap();
    port.forget(&tid("reused")).unwrap();
    port.forget(&tid("dead")).unwrap();
    assert!(
        !state_dir.join(".half.json.tmp").exists(),
        "leftover temp files are cleaned up"
    );
    assert_eq!(fs::read_dir(&state_dir).unwrap().count(), 0);
    drop(port);

    // A corrupt record does not keep netd from starting: it is set aside for the operator.
    fs::write(state_dir.join("bad.json"), "{not json").unwrap();
    let mut port = LinuxProcessPort::new(state_dir.clone(), h.cgroup.path.clone()).unwrap();
    assert!(port.list().unwrap().is_empty());
    assert!(state_dir.join("bad.json.corrupt").exists());
    assert!(!state_dir.join("bad.json").exists());
    fs::remove_file(state_dir.join("bad.json.corrupt")).unwrap();
}

#[test]
fn default_cgroup_dir_is_under_a_cgroup2_mount() {
    // The same gate as every privileged test: where task processes can run (and always under
    // CI), a cgroup2 mount must be found.
    if !swarmnet_tests_netns::gate::privileged("default_cgroup_dir_is_under_a_cgroup2_mount") {
        return;
    }
    let dir = default_cgroup_dir("node-1").expect("a cgroup2 mount for task cgroups");
    assert!(dir.ends_with("swarmnet/node-1"), "{}", dir.display());
    let mount = dir.parent().unwrap().parent().unwrap();
    assert!(
        mount.join("cgroup.procs").exists(),
        "{} is a cgroup2 root",
        mount.display()
    );
    assert_eq!(
        default_cgroup_dir("../x").unwrap_err().kind,
        ErrorKind::Invalid
    );
}
