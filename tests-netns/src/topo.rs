//! Multi-node topologies built out of network namespaces, with one real `swarmnet-netd` per node.
//!
//! Layout of one [`Topology`] named `snt<pid>x<seq>` (`pid` = the creating test process, `seq` a
//! per-process counter):
//! - namespace `<topo>-ul`: the underlay, a bridge `ul0` with one veth port `p<i>` per node;
//! - namespace `<topo>-n<i>`: node `n<i>`, `eth0` = `198.18.<k>.<i>/24`, MTU 1500, `lo` up
//!   (`k` differs between topologies; the underlays are isolated anyway, it only keeps logs clear);
//! - `/run/swarmnet-test/<topo>/cluster.json`: the one intent file every netd of the topology watches;
//! - `/run/swarmnet-test/<topo>/<node>/`: that node's `--run-dir` (`netd.log`, `status.json`,
//!   `netns/`, `tasks/`);
//! - `<cgroup2>/swarmnet-test/<topo>/<node>`: that node's `--cgroup-dir`; netd itself runs in the
//!   sibling `netd-<node>`, so one `cgroup.kill` on `<topo>` ends every process of the topology.
//!
//! The namespace, process and teardown machinery is `swarmnet-labkit`, shared with `swarmnet lab`.
//!
//! netd is started with `setns(CLONE_NEWNET)` only (no `ip netns exec`): the netns bind mounts it
//! makes under its run dir must live in the shared mount namespace, or they would vanish with it.
//!
//! Invariants: nothing here touches the root network namespace (links, addresses, routes and
//! sysctls are only ever changed with `ip -n <ours>` or inside our namespaces); everything made
//! carries the `snt<pid>` prefix; [`Drop`] removes all of it (processes by pid or `cgroup.kill`,
//! mounts, dirs, cgroups, namespaces); [`Topology::new`] first sweeps leftovers of dead processes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};
use swarmnet_labkit as kit;

/// Every name this harness creates starts with this.
pub const PREFIX: &str = "snt";
/// Parent of every topology's run directory.
pub const RUN_ROOT: &str = "/run/swarmnet-test";
/// Where `ip netns add` keeps its namespace files.
pub const NETNS_DIR: &str = "/run/netns";
/// The `--full-reconcile-interval` passed to netd unless a test overrides it.
pub const FULL_RECONCILE: Duration = Duration::from_secs(2);
/// Default limit for one short command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for a topology to converge after an intent change.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

static SEQ: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// Commands

/// What a command did. `code` is `None` when it was killed (by a signal or for timing out).
#[derive(Debug, Clone)]
pub struct Output {
    pub cmdline: String,
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The output if the command exited 0, else an error showing everything it printed.
    pub fn check(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow!("{self}"))
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match (self.timed_out, self.code) {
            (true, _) => "timed out".to_string(),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "killed by a signal".to_string(),
        };
        write!(f, "`{}`: {how}", self.cmdline)?;
        if !self.stdout.trim().is_empty() {
            write!(f, "\n  stdout: {}", self.stdout.trim_end())?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "\n  stderr: {}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command running in the background, its output collected as it comes. Dropping it kills the
/// process (by pid) if it is still running.
#[derive(Debug)]
pub struct Bg {
    cmdline: String,
    child: Child,
    exit: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(&buf[..n]);
        }
    })
}

impl Bg {
    /// Starts `cmd` with piped output; `input` (if any) is written to its stdin, which is then
    /// closed. Without input, stdin is `/dev/null`.
    pub fn spawn(mut cmd: Command, input: Option<Vec<u8>>) -> Result<Self> {
        let line = cmdline(&cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().with_context(|| format!("spawning `{line}`"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut threads = vec![
            collect(child.stdout.take().expect("piped"), stdout.clone()),
            collect(child.stderr.take().expect("piped"), stderr.clone()),
        ];
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            // A reader that stops early gives EPIPE here; that is the command's business.
            threads.push(std::thread::spawn(move || drop(stdin.write_all(&data))));
        }
        Ok(Self {
            cmdline: line,
            child,
            exit: None,
            stdout,
            stderr,
            threads,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the command has written to stdout so far.
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stdout
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit.is_some()
    }

    /// Waits for the process to exit; after `timeout` it is killed and the output marked
    /// `timed_out`. Output written by grandchildren that keep the pipes open is cut off 2 s after
    /// the process exits.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        while !self.exited() {
            if Instant::now() >= deadline {
                timed_out = true;
                drop(self.child.kill());
                self.exit = Some(self.child.wait().context("waiting for a killed command")?);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let drain = Instant::now() + Duration::from_secs(2);
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < drain {
            std::thread::sleep(Duration::from_millis(5));
        }
        let take = |b: &Arc<Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&b.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                .into_owned()
        };
        Ok(Output {
            cmdline: self.cmdline.clone(),
            code: self.exit.and_then(|s| s.code()),
            timed_out,
            stdout: take(&self.stdout),
            stderr: take(&self.stderr),
        })
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if !self.exited() {
            drop(self.child.kill());
            drop(self.child.wait());
        }
    }
}

/// Runs `cmd` to completion (at most `timeout`), stdin from `input` or `/dev/null`.
pub fn run(cmd: Command, input: Option<Vec<u8>>, timeout: Duration) -> Result<Output> {
    Bg::spawn(cmd, input)?.wait(timeout)
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

/// Runs a command in the current (test process) namespaces; for tools like `ip -n <ns>` that
/// act on our namespaces only.
pub fn host_cmd(args: &[&str]) -> Result<Output> {
    run(command(args), None, CMD_TIMEOUT)
}

/// `nsenter --net=<netns file> -- args...`, for namespaces bind-mounted anywhere (netd's run dir).
pub fn nsenter_cmd(netns: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args);
    c
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `cond` every 100 ms until it holds; errors with `desc` after `timeout`. Returns how long
/// it took.
pub fn wait_until(
    desc: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    retry(desc, timeout, || {
        if cond() {
            Ok(())
        } else {
            Err(anyhow!("condition still false"))
        }
    })
}

/// Polls `f` every 100 ms until it returns `Ok`; after `timeout` errors with `desc` and the last
/// error `f` returned. Returns how long it took.
pub fn retry(desc: &str, timeout: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() >= timeout => {
                bail!("timed out after {timeout:?} waiting for: {desc}\nlast error: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// netd status

/// netd's `status.json`, written after every reconcile round.
#[derive(Debug, Clone, Deserialize)]
pub struct NetdStatus {
    pub node: String,
    pub pid: u32,
    pub round: u64,
    #[serde(default)]
    pub full: bool,
    pub intent_generation: u64,
    #[serde(default)]
    pub intent_error: Option<String>,
    pub converged: bool,
    #[serde(default)]
    pub objects: BTreeMap<String, ObjectStatus>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ObjectStatus {
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub attempts: Option<u64>,
}

impl NetdStatus {
    /// `key: error` for every object not `ok`.
    pub fn failed_objects(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter(|(_, o)| o.state != "ok")
            .map(|(k, o)| format!("{k} [{}]: {}", o.state, o.error.as_deref().unwrap_or("-")))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One node: a network namespace on the underlay, and the netd that runs in it.
#[derive(Debug)]
pub struct Node {
    /// The node id used in the intent (`n1`, `n2`, ...).
    pub id: String,
    /// Underlay address on `eth0`.
    pub addr: Ipv4Addr,
    /// Network namespace name (in `/run/netns`).
    pub netns: String,
    /// netd's `--run-dir`.
    pub run_dir: PathBuf,
    /// netd's `--cgroup-dir`.
    pub cgroup_dir: PathBuf,
    netd_cgroup: PathBuf,
    netd: Option<Child>,
    netd_intent: Option<PathBuf>,
    netd_bin: Option<PathBuf>,
    netd_extra: Vec<String>,
    /// Extra environment for netd (e.g. `RUST_LOG`), kept across restarts.
    netd_env: Vec<(String, String)>,
    starts: u32,
    /// Smallest `intent_generation` the current netd must report before its status counts as
    /// reflecting the latest valid intent written.
    expect_generation: u64,
}

impl Node {
    /// Runs a short command inside the node namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(args);
        run(c, None, CMD_TIMEOUT)
    }

    /// [`Node::exec`], failing unless the command exits 0; returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        Ok(self.exec(args)?.check()?.stdout)
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// netd's namespace file for overlay network `id`.
    pub fn network_netns(&self, network_id: &str) -> PathBuf {
        self.run_dir.join("netns").join(format!("net-{network_id}"))
    }

    /// netd's namespace file for the sandbox of task `id`.
    pub fn sandbox_netns(&self, task_id: &str) -> PathBuf {
        self.run_dir.join("netns").join(format!("sb-{task_id}"))
    }

    /// The names of the files in netd's `netns/` directory, sorted.
    pub fn netns_files(&self) -> Result<Vec<String>> {
        let dir = self.run_dir.join("netns");
        let mut names = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<_>>>()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        names.sort();
        Ok(names)
    }

    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join("netd.log")
    }

    /// The last `lines` lines of netd's log (all its runs on this node).
    pub fn log_tail(&self, lines: usize) -> String {
        match fs::read_to_string(self.log_path()) {
            Ok(s) => {
                let all: Vec<&str> = s.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no log: {e})"),
        }
    }

    pub fn netd_pid(&self) -> Option<u32> {
        self.netd.as_ref().map(Child::id)
    }

    /// The parsed `status.json`, `None` if netd has not written one yet.
    pub fn status(&self) -> Result<Option<NetdStatus>> {
        let path = self.run_dir.join("status.json");
        match fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s)
                .map(Some)
                .with_context(|| format!("{} is not a valid status: {s}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn status_text(&self) -> String {
        fs::read_to_string(self.run_dir.join("status.json"))
            .unwrap_or_else(|e| format!("(no status.json: {e})"))
    }

    /// The status if it was written by the netd running now, else an error saying why not.
    fn current_status(&mut self) -> Result<NetdStatus> {
        let pid = self.check_netd_alive()?;
        match self.status()? {
            None => bail!("no status.json yet"),
            Some(s) if s.pid != pid => {
                bail!("status.json is from pid {}, netd now runs as {pid}", s.pid)
            }
            Some(s) => Ok(s),
        }
    }

    /// The running netd's pid; an error (with the log tail) if it has exited.
    fn check_netd_alive(&mut self) -> Result<u32> {
        let Some(child) = self.netd.as_mut() else {
            bail!("netd is not running on {}", self.id)
        };
        if let Some(st) = child.try_wait().context("checking netd")? {
            // The Child stays: every later check fails the same way until a restart.
            return Err(NetdExited(format!(
                "netd on {} (pid {}) exited: {st}\n--- log tail:\n{}",
                self.id,
                child.id(),
                self.log_tail(40)
            ))
            .into());
        }
        Ok(child.id())
    }

    /// Starts netd in this node's namespace: `--full-reconcile-interval 2s` unless `extra` sets it.
    pub fn spawn_netd(&mut self, intent: &Path, extra: &[&str]) -> Result<()> {
        self.spawn_netd_bin(&netd_binary()?, intent, extra)
    }

    /// [`Node::spawn_netd`] with another binary (the harness's own tests use a fake netd).
    pub fn spawn_netd_bin(&mut self, bin: &Path, intent: &Path, extra: &[&str]) -> Result<()> {
        ensure!(self.netd.is_none(), "netd already runs on {}", self.id);
        // With `--managers`, intent comes from the orchestrator and the file is not used.
        let from_managers = extra.contains(&"--managers");
        ensure!(
            from_managers || intent.exists(),
            "write the intent before starting netd ({} is missing)",
            intent.display()
        );
        fs::create_dir_all(&self.run_dir)?;
        for d in [&self.cgroup_dir, &self.netd_cgroup] {
            fs::create_dir_all(d).with_context(|| format!("creating cgroup {}", d.display()))?;
        }
        self.starts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        writeln!(
            log,
            "===== harness: netd start #{} on {} =====",
            self.starts, self.id
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("--node-id").arg(&self.id);
        if !from_managers {
            cmd.arg("--intent").arg(intent);
        }
        cmd.arg("--run-dir").arg(&self.run_dir);
        cmd.arg("--cgroup-dir").arg(&self.cgroup_dir);
        if !extra
            .iter()
            .any(|a| a.starts_with("--full-reconcile-interval"))
        {
            cmd.args([
                "--full-reconcile-interval",
                &format!("{}s", FULL_RECONCILE.as_secs()),
            ]);
        }
        cmd.args(extra);
        cmd.env("RUST_BACKTRACE", "1").env("NO_COLOR", "1");
        // Only netd's environment: the test process's own is never changed.
        cmd.envs(self.netd_env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = kit::spawn_in(cmd, &self.netns_path(), &self.netd_cgroup)
            .with_context(|| format!("starting {}", bin.display()))?;
        self.netd = Some(child);
        self.netd_intent = Some(intent.to_path_buf());
        self.netd_bin = Some(bin.to_path_buf());
        self.netd_extra = extra.iter().map(|s| s.to_string()).collect();
        // A fresh netd loads the file once at start.
        self.expect_generation = 1;
        Ok(())
    }

    /// Sends `signal` to netd (by pid) and waits up to 10 s for it to exit.
    pub fn kill_netd(&mut self, signal: Signal) -> Result<()> {
        let Some(mut child) = self.netd.take() else {
            bail!("netd is not running on {}", self.id)
        };
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        if child.try_wait()?.is_none() {
            kill(pid, signal).with_context(|| format!("kill -{signal} {pid}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                drop(child.kill());
                drop(child.wait());
                bail!(
                    "netd {pid} on {} ignored {signal} for 10 s; killed it",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 netd (if running) and start it again with the same intent and arguments.
    pub fn restart_netd(&mut self) -> Result<()> {
        if self.netd.is_some() {
            self.kill_netd(Signal::SIGKILL)?;
        }
        let intent = self
            .netd_intent
            .clone()
            .context("netd was never started on this node")?;
        let bin = self
            .netd_bin
            .clone()
            .context("netd was never started on this node")?;
        let extra = self.netd_extra.clone();
        self.spawn_netd_bin(
            &bin,
            &intent,
            &extra.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }
}

/// netd died under a test: waiting for it is pointless, so waits fail at once with this.
#[derive(Debug)]
pub struct NetdExited(pub String);

impl std::fmt::Display for NetdExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetdExited {}

/// The demo server `swarmnet-whoami` (package swarmnet-cli), built beside netd by
/// `cargo build --workspace`.
pub fn whoami_binary() -> Result<PathBuf> {
    let beside_netd = netd_binary()?.with_file_name("swarmnet-whoami");
    if beside_netd.is_file() {
        return Ok(beside_netd);
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .map(|d| d.join("swarmnet-whoami"))
        .find(|p| p.is_file())
        .context("swarmnet-whoami not found: build it first with `cargo build --workspace`")
}

/// A task argv running the demo server on port 80.
pub fn whoami_argv() -> Result<Vec<String>> {
    Ok(vec![
        whoami_binary()?.to_string_lossy().into_owned(),
        "--port".into(),
        "80".into(),
    ])
}

/// What one answer of a backend said (`swarmnet-whoami`, or the tests' Python servers, which
/// greet the same way): the task that answered and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub task: String,
    pub client_ip: String,
}

/// Parses `task: X` and `client: ip:port` out of one answer (the multi-line whoami body or a
/// one-line greeting).
pub fn parse_answer(text: &str) -> Option<Answer> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    let task = after("task:")?;
    let client = after("client:")?;
    let client_ip = client.rsplit_once(':').map(|(ip, _)| ip.to_string())?;
    Some(Answer { task, client_ip })
}

/// A shell script that runs `cmd` (reading `$T`, the target) `n` times, each followed by a
/// `== rc=<exit code>` marker line; [`parse_many`] reads its output.
pub fn many_script(n: usize, cmd: &str, target: &str) -> String {
    format!(
        "T={target}; i=0; while [ $i -lt {n} ]; do i=$((i+1)); \
         {cmd} 2>&1; echo \"== rc=$?\"; done"
    )
}

/// Splits the output of a [`many_script`] run into parsed answers (exit 0 and an answer) and
/// the raw text of the runs that failed.
pub fn parse_many(stdout: &str) -> (Vec<Answer>, Vec<String>) {
    let mut answers = Vec::new();
    let mut failed = Vec::new();
    let mut cur = String::new();
    for line in stdout.lines() {
        if let Some(rc) = line.strip_prefix("== rc=") {
            match parse_answer(&cur) {
                Some(a) if rc == "0" => answers.push(a),
                _ => failed.push(format!("rc={rc}: {}", cur.trim())),
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    (answers, failed)
}

/// The netd binary the tests run: `SWARMNET_NETD_BIN`, or the one built beside the test binary.
pub fn netd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SWARMNET_NETD_BIN") {
        return Ok(PathBuf::from(p));
    }
    // Test binaries live in target/<profile>/deps/; netd is built to target/<profile>/.
    let exe = std::env::current_exe()?;
    let candidate = exe
        .ancestors()
        .skip(1)
        .map(|d| d.join("swarmnet-netd"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "swarmnet-netd not found next to {}; build it first: `cargo build -p swarmnet-netd` \
                 (or set SWARMNET_NETD_BIN)",
                exe.display()
            )
        })?;
    Ok(candidate)
}

// ---------------------------------------------------------------------------------------------
// Topology

/// Anything [`Topology::write_intent`] accepts: a JSON value or raw text (for malformed intents).
pub trait IntentText {
    fn intent_text(self) -> String;
}
impl IntentText for &Value {
    fn intent_text(self) -> String {
        serde_json::to_string_pretty(self).expect("a Value serializes")
    }
}
impl IntentText for Value {
    fn intent_text(self) -> String {
        (&self).intent_text()
    }
}
impl IntentText for &str {
    fn intent_text(self) -> String {
        self.to_string()
    }
}
impl IntentText for String {
    fn intent_text(self) -> String {
        self
    }
}

/// An underlay bridge, N node namespaces, their netds and the shared intent file. Dropping it
/// removes everything it made.
#[derive(Debug)]
pub struct Topology {
    /// `snt<pid>x<seq>`: prefix of every namespace, dir and cgroup of this topology.
    pub name: String,
    /// Third octet of the underlay addresses (`198.18.<k>.0/24`).
    pub k: u8,
    pub underlay_ns: String,
    pub nodes: Vec<Node>,
    /// `/run/swarmnet-test/<name>`.
    pub dir: PathBuf,
    pub intent_path: PathBuf,
    cgroup_root: PathBuf,
    writes: u64,
    cleaned: bool,
}

impl Topology {
    /// Builds the underlay and `nodes` node namespaces (no netd yet: see [`Topology::start`]).
    pub fn new(nodes: usize) -> Result<Self> {
        ensure!((1..=250).contains(&nodes), "1..=250 nodes, not {nodes}");
        let swept = sweep();
        for s in &swept {
            eprintln!("swarmnet-test sweep: {s}");
        }
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}x{seq}");
        let k = u8::try_from((pid.wrapping_mul(17).wrapping_add(seq)) % 256).expect("< 256");
        let cg2 = cgroup2_mount()?;
        let dir = Path::new(RUN_ROOT).join(&name);
        let cgroup_root = cg2.join("swarmnet-test").join(&name);
        let mut topo = Self {
            underlay_ns: format!("{name}-ul"),
            intent_path: dir.join("cluster.json"),
            name,
            k,
            nodes: Vec::new(),
            dir,
            cgroup_root,
            writes: 0,
            cleaned: false,
        };
        // From here on, an error drops `topo`, which removes whatever was made.
        topo.build(nodes)?;
        Ok(topo)
    }

    fn build(&mut self, nodes: usize) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::create_dir_all(&self.cgroup_root)?;
        let ul = self.underlay_ns.clone();
        netns_add(&ul)?;
        for args in [
            vec!["ip", "-n", &ul, "link", "set", "lo", "up"],
            vec!["ip", "-n", &ul, "link", "add", "ul0", "type", "bridge"],
            vec!["ip", "-n", &ul, "link", "set", "ul0", "mtu", "1500", "up"],
        ] {
            host_cmd(&args)?.check()?;
        }
        for i in 1..=nodes {
            let id = format!("n{i}");
            let netns = format!("{}-{id}", self.name);
            let addr = Ipv4Addr::new(198, 18, self.k, u8::try_from(i)?);
            netns_add(&netns)?;
            let port = format!("p{i}");
            let cidr = format!("{addr}/24");
            let node = Node {
                run_dir: self.dir.join(&id),
                cgroup_dir: self.cgroup_root.join(&id),
                netd_cgroup: self.cgroup_root.join(format!("netd-{id}")),
                id,
                addr,
                netns: netns.clone(),
                netd: None,
                netd_intent: None,
                netd_bin: None,
                netd_extra: Vec::new(),
                netd_env: Vec::new(),
                starts: 0,
                expect_generation: 0,
            };
            self.nodes.push(node);
            for args in [
                vec![
                    "ip", "-n", &ul, "link", "add", &port, "mtu", "1500", "type", "veth", "peer",
                    "name", "eth0", "netns", &netns,
                ],
                vec!["ip", "-n", &ul, "link", "set", &port, "master", "ul0", "up"],
                vec!["ip", "-n", &netns, "link", "set", "lo", "up"],
                vec![
                    "ip", "-n", &netns, "link", "set", "eth0", "mtu", "1500", "up",
                ],
                vec!["ip", "-n", &netns, "addr", "add", &cidr, "dev", "eth0"],
            ] {
                host_cmd(&args)?.check()?;
            }
        }
        Ok(())
    }

    /// Builds the topology, writes `intent`, starts netd on every node and waits for convergence.
    pub fn start(nodes: usize, intent: &Value) -> Result<Self> {
        let mut topo = Self::new(nodes)?;
        topo.write_intent(intent)?;
        topo.start_netd(&[])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        Ok(topo)
    }

    /// Sets extra environment variables for every netd started from now on (and restarts), such
    /// as `RUST_LOG=swarmnet_netd=debug`; the test process's environment stays as it is.
    pub fn set_netd_env(&mut self, env: &[(&str, &str)]) {
        for n in &mut self.nodes {
            n.netd_env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
    }

    /// Starts netd on every node with the shared intent file.
    pub fn start_netd(&mut self, extra: &[&str]) -> Result<()> {
        let intent = self.intent_path.clone();
        for n in &mut self.nodes {
            n.spawn_netd(&intent, extra)?;
        }
        Ok(())
    }

    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in {}", self.name))
    }

    pub fn node_mut(&mut self, id: &str) -> &mut Node {
        let name = self.name.clone();
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in {name}"))
    }

    /// Runs a command in the underlay namespace.
    pub fn underlay_exec(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.underlay_ns]).args(args);
        run(c, None, CMD_TIMEOUT)
    }

    /// Runs a short command inside the sandbox netns of `task` on `node`.
    pub fn sandbox_exec(&self, node: &str, task: &str, args: &[&str]) -> Result<Output> {
        self.sandbox_exec_timeout(node, task, args, CMD_TIMEOUT)
    }

    pub fn sandbox_exec_timeout(
        &self,
        node: &str,
        task: &str,
        args: &[&str],
        t: Duration,
    ) -> Result<Output> {
        let path = self.existing(self.node(node).sandbox_netns(task))?;
        run(nsenter_cmd(&path, args), None, t)
    }

    /// Starts a long command inside the sandbox of `task` on `node`; killed when dropped.
    pub fn sandbox_spawn(&self, node: &str, task: &str, args: &[&str]) -> Result<Bg> {
        let path = self.existing(self.node(node).sandbox_netns(task))?;
        Bg::spawn(nsenter_cmd(&path, args), None)
    }

    /// Runs a short command inside netd's namespace of overlay network `network_id` on `node`.
    pub fn network_exec(&self, node: &str, network_id: &str, args: &[&str]) -> Result<Output> {
        let path = self.existing(self.node(node).network_netns(network_id))?;
        run(nsenter_cmd(&path, args), None, CMD_TIMEOUT)
    }

    fn existing(&self, path: PathBuf) -> Result<PathBuf> {
        ensure!(
            path.exists(),
            "{} does not exist (netd has not made it, or removed it)",
            path.display()
        );
        Ok(path)
    }

    /// Atomically replaces the shared intent file (temp file + rename). Returns the model's
    /// verdict: `None` if the intent is valid, else the validation error. A valid write raises
    /// the intent generation that [`Topology::wait_converged`] expects from every running netd.
    pub fn write_intent(&mut self, intent: impl IntentText) -> Result<Option<String>> {
        let text = intent.intent_text();
        let verdict = swarmnet_model::Intent::from_json(&text)
            .err()
            .map(|e| e.to_string());
        if verdict.is_none() {
            // Baseline: each running netd must have loaded the previous valid write, so that the
            // generation it reports next can only come from this one (writes are not coalesced
            // into an ambiguous count).
            let mut baselines = Vec::new();
            for n in self.nodes.iter_mut().filter(|n| n.netd.is_some()) {
                let want = n.expect_generation;
                let mut got = 0;
                retry(
                    &format!(
                        "netd on {} to load the previous intent (generation >= {want})",
                        n.id
                    ),
                    CONVERGE_TIMEOUT,
                    || {
                        let s = n.current_status()?;
                        got = s.intent_generation;
                        ensure!(got >= want, "intent_generation {got}");
                        Ok(())
                    },
                )?;
                baselines.push((n.id.clone(), got));
            }
            for (id, got) in baselines {
                self.node_mut(&id).expect_generation = got + 1;
            }
        }
        self.writes += 1;
        let tmp = self.dir.join(format!(".cluster.json.tmp{}", self.writes));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.intent_path).with_context(|| {
            format!(
                "renaming {} to {}",
                tmp.display(),
                self.intent_path.display()
            )
        })?;
        Ok(verdict)
    }

    /// Waits until every running netd reports, in a status it wrote itself (its pid), the
    /// generation of the last valid intent written (or later), `converged: true` and no
    /// `intent_error`. On timeout the error lists every node's status and log tail.
    pub fn wait_converged(&mut self, timeout: Duration) -> Result<BTreeMap<String, NetdStatus>> {
        let start = Instant::now();
        loop {
            let mut done = BTreeMap::new();
            let mut pending = Vec::new();
            for n in self.nodes.iter_mut().filter(|n| n.netd.is_some()) {
                let want = n.expect_generation;
                let verdict = n.current_status().and_then(|s| {
                    ensure!(
                        s.intent_generation >= want,
                        "intent_generation {} < {want}",
                        s.intent_generation
                    );
                    if let Some(e) = &s.intent_error {
                        bail!("intent_error: {e}");
                    }
                    ensure!(
                        s.converged,
                        "converged: false; failed objects: {:?}",
                        s.failed_objects()
                    );
                    Ok(s)
                });
                match verdict {
                    Ok(s) => {
                        done.insert(n.id.clone(), s);
                    }
                    Err(e) if e.is::<NetdExited>() => return Err(e),
                    Err(e) => pending.push(format!("{}: {e:#}", n.id)),
                }
            }
            if pending.is_empty() {
                return Ok(done);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "topology {} did not converge within {timeout:?}:\n  {}\n{}",
                    self.name,
                    pending.join("\n  "),
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running netd reports an `intent_error` containing `needle`; returns the
    /// errors by node.
    pub fn wait_intent_error(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<BTreeMap<String, String>> {
        let start = Instant::now();
        loop {
            let mut errors = BTreeMap::new();
            let mut pending = Vec::new();
            for n in self.nodes.iter_mut().filter(|n| n.netd.is_some()) {
                match n.current_status() {
                    Ok(s) => match s.intent_error {
                        Some(e) if e.contains(needle) => {
                            errors.insert(n.id.clone(), e);
                        }
                        other => pending.push(format!("{}: intent_error = {other:?}", n.id)),
                    },
                    Err(e) if e.is::<NetdExited>() => return Err(e),
                    Err(e) => pending.push(format!("{}: {e:#}", n.id)),
                }
            }
            if pending.is_empty() {
                return Ok(errors);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "no intent_error containing {needle:?} within {timeout:?}:\n  {}\n{}",
                    pending.join("\n  "),
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's status.json and netd log tail, for failure messages.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s += &format!(
                "===== {} ({}, netd pid {:?})\n--- status.json:\n{}\n--- netd.log (tail):\n{}\n",
                n.id,
                n.netns,
                n.netd_pid(),
                n.status_text(),
                n.log_tail(30)
            );
        }
        s
    }

    /// An intent builder with this topology's nodes already listed.
    pub fn cluster_intent(&self) -> IntentBuilder {
        IntentBuilder {
            nodes: self
                .nodes
                .iter()
                .map(|n| json!({"id": n.id, "addr": n.addr.to_string()}))
                .collect(),
            ..IntentBuilder::default()
        }
    }

    /// Removes everything now; returns what had to be forced (stray processes).
    pub fn cleanup(&mut self) -> Vec<String> {
        if self.cleaned {
            return Vec::new();
        }
        self.cleaned = true;
        for n in &mut self.nodes {
            if let Some(mut c) = n.netd.take() {
                drop(c.kill());
                drop(c.wait());
            }
        }
        destroy(&self.name)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.cleaned {
            eprintln!(
                "\n######## topology {} at the time of failure\n{}",
                self.name,
                self.report()
            );
        }
        for note in self.cleanup() {
            eprintln!("swarmnet-test cleanup of {}: {note}", self.name);
        }
    }
}

/// Builds a topology of `nodes` nodes and runs `test` on it. A failure panics while the
/// topology is still up, so its [`Drop`] prints every node's status and netd log tail; after a
/// success, teardown must not have had to force anything (stray processes are a netd bug).
pub fn with_topology(nodes: usize, test: impl FnOnce(&mut Topology) -> Result<()>) {
    let mut topo = match Topology::new(nodes) {
        Ok(t) => t,
        Err(e) => panic!("building a {nodes}-node topology: {e:?}"),
    };
    if let Err(e) = test(&mut topo) {
        panic!("{e:?}");
    }
    let name = topo.name.clone();
    let notes = topo.cleanup();
    assert!(
        notes.is_empty(),
        "teardown of {name} had to force things: {notes:#?}"
    );
    let left = leftovers(&name);
    assert!(left.is_empty(), "teardown of {name} left {left:?}");
}

/// What is still on the machine for topology `name`: namespaces, run dir, cgroup dir, mounts.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut left = Vec::new();
    let prefix = format!("{name}-");
    for ns in list_dir(Path::new(NETNS_DIR)) {
        if ns.starts_with(&prefix) {
            left.push(format!("netns {ns}"));
        }
    }
    let dir = Path::new(RUN_ROOT).join(name);
    if dir.exists() {
        left.push(format!("dir {}", dir.display()));
    }
    if let Ok(cg) = cgroup2_mount() {
        let cg = cg.join("swarmnet-test").join(name);
        if cg.exists() {
            left.push(format!("cgroup {}", cg.display()));
        }
    }
    for m in mounts_under(&dir) {
        left.push(format!("mount {}", m.display()));
    }
    left
}

// ---------------------------------------------------------------------------------------------
// Intent builder

/// Builds cluster intent JSON tersely. Services are created (or extended) from the networks of
/// their tasks unless declared with [`IntentBuilder::service`].
#[derive(Debug, Clone, Default)]
pub struct IntentBuilder {
    nodes: Vec<Value>,
    networks: Vec<Value>,
    services: Vec<Value>,
    tasks: Vec<Value>,
}

impl IntentBuilder {
    /// An overlay network (id = name).
    pub fn network(mut self, name: &str, subnet: &str, vni: u32) -> Self {
        self.networks
            .push(json!({"name": name, "subnet": subnet, "vni": vni}));
        self
    }

    /// A network given in full.
    pub fn network_json(mut self, spec: Value) -> Self {
        self.networks.push(spec);
        self
    }

    /// A service given in full (endpoint mode, VIPs, aliases, ports).
    pub fn service_json(mut self, spec: Value) -> Self {
        self.services.push(spec);
        self
    }

    /// A task given in full (slot, aliases, desired state).
    pub fn task_json(mut self, spec: Value) -> Self {
        self.tasks.push(spec);
        self
    }

    pub fn service(mut self, name: &str, networks: &[&str]) -> Self {
        let nets: Vec<Value> = networks.iter().map(|n| json!({"network": n})).collect();
        self.services.push(json!({"name": name, "networks": nets}));
        self
    }

    /// A task of `service` on `node`, attached to `(network, ip)` pairs in order (`eth0`, ...).
    pub fn task(
        mut self,
        id: &str,
        service: &str,
        node: &str,
        attach: &[(&str, &str)],
        argv: &[&str],
    ) -> Self {
        let nets: Vec<Value> = attach
            .iter()
            .map(|(n, ip)| json!({"network": n, "ip": ip}))
            .collect();
        self.tasks.push(
            json!({"id": id, "service": service, "node": node, "networks": nets, "argv": argv}),
        );
        self
    }

    pub fn build(&self) -> Value {
        let mut services = self.services.clone();
        let mut implied: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for t in &self.tasks {
            let svc = t["service"].as_str().unwrap_or_default().to_string();
            if services.iter().any(|s| s["name"] == t["service"]) {
                continue;
            }
            let nets = implied.entry(svc).or_default();
            for a in t["networks"].as_array().into_iter().flatten() {
                nets.insert(a["network"].as_str().unwrap_or_default().to_string());
            }
        }
        for (name, nets) in implied {
            let nets: Vec<Value> = nets.into_iter().map(|n| json!({"network": n})).collect();
            services.push(json!({"name": name, "networks": nets}));
        }
        json!({
            "version": 1,
            "nodes": self.nodes,
            "networks": self.networks,
            "services": services,
            "tasks": self.tasks,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Machine-level helpers: netns files, mounts, cgroups, processes, the sweep.

/// `ip netns add`, serialised with the harness's other `ip netns` calls.
pub fn netns_add(name: &str) -> Result<()> {
    Ok(kit::netns_add(name)?)
}

fn list_dir(dir: &Path) -> Vec<String> {
    kit::list_dir(dir)
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    Ok(kit::cgroup2_mount()?)
}

pub use kit::{mount_count, mounts_under, pid_alive, pids_in_netns};

/// Removes everything of topology `name` (see [`kit::destroy`]); returns notes on what had to be
/// forced or failed.
fn destroy(name: &str) -> Vec<String> {
    let fp = kit::Footprint {
        netns_prefix: format!("{name}-"),
        dir: Path::new(RUN_ROOT).join(name),
        cgroup: cgroup2_mount()
            .ok()
            .map(|m| m.join("swarmnet-test").join(name)),
    };
    let notes = kit::destroy(&fp);
    // The shared parents go when empty (another topology may be using them: then they stay).
    drop(fs::remove_dir(RUN_ROOT));
    if let Some(parent) = fp.cgroup.as_ref().and_then(|c| c.parent()) {
        drop(fs::remove_dir(parent));
    }
    notes
}

/// Parses `snt<pid>x<seq>` (optionally followed by `-...`) into the creating pid.
fn topology_pid(name: &str) -> Option<u32> {
    let topo = name.split('-').next()?;
    let (pid, seq) = topo.strip_prefix(PREFIX)?.split_once('x')?;
    if pid.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the leftovers of topologies whose creating process is gone: namespaces, run dirs and
/// cgroups named `snt<pid>x<seq>...` with a dead `<pid>`. Anything else is never touched.
/// Returns what was removed.
pub fn sweep() -> Vec<String> {
    let mut names = BTreeSet::new();
    let cg_parent = cgroup2_mount().ok().map(|m| m.join("swarmnet-test"));
    let mut sources = vec![
        list_dir(Path::new(NETNS_DIR)),
        list_dir(Path::new(RUN_ROOT)),
    ];
    sources.extend(cg_parent.as_deref().map(list_dir));
    for entry in sources.into_iter().flatten() {
        if let Some(pid) = topology_pid(&entry)
            && pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            names.insert(entry.split('-').next().unwrap_or_default().to_string());
        }
    }
    let mut out = Vec::new();
    for name in names {
        let notes = destroy(&name);
        out.push(format!(
            "removed leftovers of {name} (creator gone){}",
            if notes.is_empty() {
                String::new()
            } else {
                format!(": {}", notes.join("; "))
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_names_parse() {
        assert_eq!(topology_pid("snt123x0"), Some(123));
        assert_eq!(topology_pid("snt123x45-n1"), Some(123));
        assert_eq!(topology_pid("snt123x4-ul"), Some(123));
        assert_eq!(topology_pid("sntx1-n1"), None);
        assert_eq!(topology_pid("snt12"), None);
        assert_eq!(topology_pid("snt12xa-n1"), None);
        assert_eq!(topology_pid("sn123x1-n1"), None);
        assert_eq!(topology_pid("other"), None);
    }

    #[test]
    fn builder_implies_services() {
        let v = IntentBuilder::default()
            .network("app", "10.10.0.0/24", 4097)
            .task(
                "a1",
                "web",
                "n1",
                &[("app", "10.10.0.2")],
                &["sleep", "infinity"],
            )
            .build();
        assert_eq!(
            v["services"],
            json!([{"name": "web", "networks": [{"network": "app"}]}])
        );
    }
}
