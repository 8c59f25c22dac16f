//! `swarmnet cluster init | join | leave`: this host becomes a node of a cluster (and, for
//! `init` or a manager token, one of its managers), as `docker swarm init/join/leave` do.
//!
//! The CLI starts the node's daemons itself, detached (a session of their own, stdin closed,
//! output appended to a log), and keeps what it started in the data directory `D`
//! (`--data-dir`, default `/var/lib/swarmnet`):
//!
//! ```text
//! D/host.json        what this host runs: node id, address, role, each daemon's pid with its
//!                    start time and program (a pid is signalled only while all three match)
//! D/manager/         the manager's database and certificates (managers only)
//! D/netd/            netd's run directory (its certificate in tls/, status, socket)
//! D/manager.log, D/netd.log
//! ```
//!
//! - `init` starts a manager that bootstraps a one-member Raft group and the cluster CA, creates
//!   the cluster (with its ingress network) naming this host as its first node, starts netd,
//!   writes a context for the CLI (the administrator certificate stays in `D/manager/tls/admin`)
//!   and prints the join commands.
//! - `join` trades the token for this node's certificate first (the manager decides the role
//!   from the token; a wrong token or a CA that does not match it fails here, before anything
//!   starts); with a manager token it starts a manager that joins the Raft group, then netd.
//! - `leave` removes the node from the cluster through the managers (a manager host needs
//!   `--force`, and first leaves the Raft group), has netd stop the tasks and remove everything
//!   it made, ends the daemons it started (by pid, checked), and removes `D`'s state.
//!
//! Nothing is half-applied: a failing `init` or `join` stops what it started and removes the
//! state it wrote, and says which log to read.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use serde::{Deserialize, Serialize};
use swarmnet_api as pb;
use swarmnet_labkit::start_ticks;

use crate::api::Managers;
use crate::context::{Context, ManagerEndpoint};
use crate::error::{CliError, Result};
use crate::lab::{netd_call, netd_call_within, retry, sibling_binary};
use crate::progress::Progress;

/// Default `--data-dir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/swarmnet";
/// The managers' gRPC port when an address names none.
pub const MANAGER_PORT: u16 = 4242;
/// How long `init` and `join` wait for a daemon to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A daemon this CLI started: its pid, when it started (clock ticks since boot, from
/// `/proc/<pid>/stat`) and its program, so that a reused pid is never signalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Daemon {
    pub pid: u32,
    pub start_ticks: u64,
    pub exe: PathBuf,
}

impl Daemon {
    fn of(child: &Child, exe: &Path) -> anyhow::Result<Self> {
        let pid = child.id();
        let start_ticks = start_ticks(pid)
            .ok_or_else(|| anyhow!("{} (pid {pid}) exited at once", exe.display()))?;
        Ok(Self {
            pid,
            start_ticks,
            exe: exe.to_path_buf(),
        })
    }

    /// Whether the process is still the one we started (same pid, same start, not a zombie).
    pub fn running(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// SIGTERM, then SIGKILL after `grace`; waits until it is gone. Only while [`Self::running`].
    pub fn stop(&self, grace: Duration) {
        swarmnet_labkit::terminate(self.pid, grace, || self.running());
    }
}

/// This host's part in a cluster (`D/host.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub node_id: String,
    pub addr: Ipv4Addr,
    /// "manager" | "worker", as the join token (or init) decided.
    pub role: String,
    /// The managers netd follows (host:port).
    pub managers: Vec<String>,
    /// This host's manager: its Raft id and the daemon, when it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<Daemon>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netd: Option<Daemon>,
    /// The context `init` wrote (removed by `leave`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

impl HostState {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("host.json")
    }

    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(data_dir);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is not a host state", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!("reading {}: {e}", path.display())),
        }
    }

    /// Written whole (a temporary file renamed over it), readable by root only.
    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        swarmnet_pki::store::write_private(
            &Self::path(data_dir),
            &serde_json::to_string_pretty(self)?,
        )
        .map_err(anyhow::Error::from)
    }

    fn daemons(&self) -> impl Iterator<Item = &Daemon> {
        self.netd.iter().chain(self.manager.iter())
    }
}

/// Options shared by `init` and `join`.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub data_dir: PathBuf,
    pub advertise_addr: Option<Ipv4Addr>,
    pub listen_addr: Option<String>,
    pub hostname: Option<String>,
    pub cgroup_dir: Option<PathBuf>,
}

/// What `init` and `join` print.
#[derive(Debug, Clone, Serialize)]
pub struct Joined {
    pub cluster_id: String,
    pub node: String,
    pub addr: String,
    pub role: String,
    /// The managers netd follows.
    pub managers: Vec<String>,
    /// `init` only: the join tokens and the context it made current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Tokens>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tokens {
    pub worker: String,
    pub manager: String,
}

pub fn joined_text(j: &Joined) -> String {
    let mut out = if j.tokens.is_some() {
        format!(
            "cluster {} initialized: this node ({}, {}) is its first manager\n",
            j.cluster_id, j.node, j.addr
        )
    } else {
        format!(
            "node {} ({}) joined cluster {} as a {}\n",
            j.node, j.addr, j.cluster_id, j.role
        )
    };
    if let Some(t) = &j.tokens {
        let manager = j.managers.first().cloned().unwrap_or_default();
        out.push_str(&format!(
            "the CLI talks to it through context {:?} (current)\n\n\
             To add a worker to this cluster, run on it:\n\n    \
             swarmnet cluster join --token {} {manager}\n\n\
             To add a manager, run:\n\n    \
             swarmnet cluster join --token {} {manager}\n",
            j.context.as_deref().unwrap_or_default(),
            t.worker,
            t.manager
        ));
    } else if j.role == "manager" {
        out.push_str(
            "manage the cluster from the host that ran `swarmnet cluster init` (its context \
             holds the administrator certificate)\n",
        );
    }
    out
}

fn host_err(hint: impl Into<String>, source: anyhow::Error) -> CliError {
    CliError::Host {
        hint: hint.into(),
        source,
    }
}

/// The node id: `--hostname`, else the host's name. It must be a valid node id.
fn node_id(opts: &HostOptions) -> Result<String> {
    let name = match &opts.hostname {
        Some(h) => h.clone(),
        None => nix::unistd::gethostname()
            .map_err(|e| CliError::io("reading the host name", e.into()))?
            .to_string_lossy()
            .into_owned(),
    };
    swarmnet_model::NodeId::new(name.clone()).map_err(|e| {
        CliError::usage(
            format!("the host name {name:?} cannot be a node id: {e}"),
            "give one with --hostname NAME",
        )
    })?;
    Ok(name)
}

/// `--advertise-addr`, else the IPv4 address of the interface the default route leaves by
/// (Docker's rule). Fails when there is none or it is ambiguous.
fn advertise_addr(opts: &HostOptions) -> Result<Ipv4Addr> {
    if let Some(a) = opts.advertise_addr {
        return Ok(a);
    }
    let hint = "give the address other nodes reach this one at with --advertise-addr A";
    let routes = fs::read_to_string("/proc/net/route")
        .map_err(|e| CliError::io("reading /proc/net/route", e))?;
    let Some(dev) = default_route_dev(&routes) else {
        return Err(CliError::usage(
            "cannot pick an advertise address: this host has no IPv4 default route",
            hint,
        ));
    };
    let addrs: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map_err(|e| CliError::io("listing the host's addresses", e.into()))?
        .filter(|i| i.interface_name == dev)
        .filter_map(|i| i.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect();
    match addrs.as_slice() {
        [one] => Ok(*one),
        [] => Err(CliError::usage(
            format!(
                "cannot pick an advertise address: {dev} (the default route's) has no IPv4 address"
            ),
            hint,
        )),
        many => Err(CliError::usage(
            format!(
                "cannot pick an advertise address: {dev} has several ({})",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            hint,
        )),
    }
}

/// The interface of the IPv4 default route in a `/proc/net/route` listing.
pub fn default_route_dev(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// `host:port` with the managers' port added when absent.
pub fn with_port(addr: &str) -> String {
    if addr.parse::<std::net::SocketAddr>().is_ok()
        || addr
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        addr.to_string()
    } else {
        format!("{addr}:{MANAGER_PORT}")
    }
}

/// Refuses when `D` already holds a node of a cluster (running or not).
fn check_free(data_dir: &Path) -> Result<()> {
    match HostState::load(data_dir) {
        Ok(None) => Ok(()),
        Ok(Some(h)) => {
            let running: Vec<String> = h
                .daemons()
                .filter(|d| d.running())
                .map(|d| format!("{} (pid {})", d.exe.display(), d.pid))
                .collect();
            Err(host_err(
                "run `swarmnet cluster leave` first (add --force on a manager)",
                anyhow!(
                    "this host is already node {:?} of a cluster ({}; {})",
                    h.node_id,
                    data_dir.join("host.json").display(),
                    if running.is_empty() {
                        "its daemons are not running".to_string()
                    } else {
                        format!("running: {}", running.join(", "))
                    }
                ),
            ))
        }
        Err(e) => Err(host_err(
            format!("remove {} by hand", data_dir.join("host.json").display()),
            e,
        )),
    }
}

/// Starts `exe args` detached: its own session, stdin closed, output appended to `log`. A join
/// token goes in the environment (`SWARMNET_JOIN_TOKEN`), where `ps` does not show it.
fn spawn_detached(
    exe: &Path,
    args: &[String],
    token: Option<&str>,
    log: &Path,
) -> anyhow::Result<(Child, Daemon)> {
    use std::os::unix::process::CommandExt as _;
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    if let Some(t) = token {
        cmd.env("SWARMNET_JOIN_TOKEN", t);
    }
    #[expect(unsafe_code, reason = "setsid must run in the child before exec")]
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own: the daemon outlives this command and its terminal, and
            // a ^C there does not reach it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let daemon = Daemon::of(&child, exe)?;
    Ok((child, daemon))
}

/// Waits for `ready`, failing early when `child` exits; the error names the log.
fn wait_ready(
    what: &str,
    child: &mut Child,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(anyhow!(
                "{what} exited ({status}) before it was ready:\n{}",
                log_tail(log)
            ));
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(anyhow!(
                "{what} was not ready after {}s:\n{}",
                START_TIMEOUT.as_secs(),
                log_tail(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of a log, indented, for an error message.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    format!(
        "  (last lines of {})\n{}",
        log.display(),
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// What `init`/`join` started and wrote so far: stopped and removed when they fail (what
/// was there before the command stays).
struct Started {
    data_dir: PathBuf,
    daemons: Vec<Daemon>,
    /// Directories this command created.
    created: Vec<PathBuf>,
    /// `host.json` did not exist before this command wrote it.
    wrote_host: bool,
    context: Option<(PathBuf, String)>,
}

impl Started {
    fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            daemons: Vec::new(),
            created: Vec::new(),
            wrote_host: false,
            context: None,
        }
    }

    /// Writes `host.json`, remembering whether this command made it.
    fn save_host(&mut self, host: &HostState) -> anyhow::Result<()> {
        self.wrote_host |= !HostState::path(&self.data_dir).exists();
        host.save(&self.data_dir)
    }

    fn undo(&self) {
        for d in self.daemons.iter().rev() {
            d.stop(STOP_GRACE);
        }
        for dir in &self.created {
            drop(fs::remove_dir_all(dir));
        }
        if self.wrote_host {
            drop(fs::remove_file(HostState::path(&self.data_dir)));
        }
        if let Some((dir, name)) = &self.context {
            Context::remove(dir, name);
        }
    }
}

fn make_dir(started: &mut Started, dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        started.created.push(dir.to_path_buf());
    }
    Ok(())
}

/// Starts netd following `managers` with `token`, and waits until it answers.
fn start_netd(
    started: &mut Started,
    opts: &HostOptions,
    node: &str,
    addr: Ipv4Addr,
    managers: &[String],
    token: &str,
    progress: &mut Progress,
) -> anyhow::Result<Daemon> {
    let d = &opts.data_dir;
    let run_dir = d.join("netd");
    make_dir(started, &run_dir)?;
    let netd = sibling_binary("swarmnet-netd")?;
    let mut args = vec![
        "--node-id".to_string(),
        node.to_string(),
        "--managers".into(),
        managers.join(","),
        "--advertise-addr".into(),
        addr.to_string(),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ];
    if let Some(cg) = &opts.cgroup_dir {
        args.push("--cgroup-dir".into());
        args.push(cg.display().to_string());
    }
    progress.step("starting netd");
    let log = d.join("netd.log");
    let (mut child, daemon) = spawn_detached(&netd, &args, Some(token), &log)?;
    started.daemons.push(daemon.clone());
    progress.step("waiting for netd to take the cluster's intent");
    let sock = run_dir.join("netd.sock");
    wait_ready("netd", &mut child, &log, || {
        netd_call(&sock, &serde_json::json!({"op": "status"})).is_ok_and(|v| {
            v.pointer("/status/intent_generation")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|g| g > 0)
        })
    })?;
    Ok(daemon)
}

/// The manager's arguments common to init and join.
fn manager_args(opts: &HostOptions, id: u64, node: &str, addr: Ipv4Addr) -> (Vec<String>, String) {
    let listen = opts
        .listen_addr
        .clone()
        .map_or_else(|| format!("0.0.0.0:{MANAGER_PORT}"), |l| with_port(&l));
    let port = listen
        .rsplit_once(':')
        .map_or(MANAGER_PORT.to_string(), |(_, p)| p.to_string());
    let advertise = format!("{addr}:{port}");
    (
        vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            listen,
            "--advertise".into(),
            advertise.clone(),
            "--data-dir".into(),
            opts.data_dir.join("manager").display().to_string(),
            "--name".into(),
            node.to_string(),
        ],
        advertise,
    )
}

/// `cluster init`.
pub fn init(
    opts: &HostOptions,
    config_dir: &Path,
    context_name: &str,
    progress: &mut Progress,
) -> Result<Joined> {
    let node = node_id(opts)?;
    let addr = advertise_addr(opts)?;
    check_free(&opts.data_dir)?;
    let mut started = Started::new(&opts.data_dir);
    let r = init_inner(
        opts,
        config_dir,
        context_name,
        &node,
        addr,
        &mut started,
        progress,
    );
    r.map_err(|e| {
        started.undo();
        host_err(
            format!(
                "nothing was left running; see {} and {}",
                opts.data_dir.join("manager.log").display(),
                opts.data_dir.join("netd.log").display()
            ),
            e,
        )
    })
}

fn init_inner(
    opts: &HostOptions,
    config_dir: &Path,
    context_name: &str,
    node: &str,
    addr: Ipv4Addr,
    started: &mut Started,
    progress: &mut Progress,
) -> anyhow::Result<Joined> {
    let d = &opts.data_dir;
    make_dir(started, d)?;
    let manager_dir = d.join("manager");
    make_dir(started, &manager_dir)?;
    let orchestrator = sibling_binary("swarmnet-orchestrator")?;
    let (mut args, advertise) = manager_args(opts, 1, node, addr);
    args.push("--bootstrap".into());
    progress.step("starting the manager (a new Raft group and cluster CA)");
    let log = d.join("manager.log");
    let (mut child, manager) = spawn_detached(&orchestrator, &args, None, &log)?;
    started.daemons.push(manager.clone());
    let mut host = HostState {
        node_id: node.to_string(),
        addr,
        role: "manager".into(),
        managers: vec![advertise.clone()],
        raft_id: Some(1),
        manager: Some(manager),
        netd: None,
        context: None,
    };
    started.save_host(&host)?;
    let admin = manager_dir.join("tls").join("admin");
    wait_ready("the manager", &mut child, &log, || {
        swarmnet_pki::store::load(&admin).is_ok_and(|m| m.is_some())
    })?;
    progress.step("creating the cluster");
    let endpoint = ManagerEndpoint {
        node: node.to_string(),
        addr: advertise.clone(),
        netns: None,
        tls_dir: Some(admin.clone()),
    };
    let rt = crate::runtime().map_err(|e| anyhow!("{e}"))?;
    let init = pb::InitRequest {
        cluster_id: String::new(),
        node: Some(pb::JoinNodeRequest {
            id: node.to_string(),
            hostname: node.to_string(),
            addr: addr.to_string(),
            role: "manager".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The manager answers once its Raft group has elected it: retried until then.
    let info = rt.block_on(retry(START_TIMEOUT, || {
        let (init, endpoint) = (init.clone(), endpoint.clone());
        async move {
            Managers::new(vec![endpoint])
                .call(|ch| {
                    let init = init.clone();
                    async move { pb::cluster_client::ClusterClient::new(ch).init(init).await }
                })
                .await
                .map_err(|e| anyhow!("creating the cluster: {e}"))
        }
    }))?;
    let tokens = rt
        .block_on(Managers::new(vec![endpoint.clone()]).call(|ch| async move {
            pb::cluster_client::ClusterClient::new(ch)
                .join_tokens(pb::Empty {})
                .await
        }))
        .map_err(|e| anyhow!("{e}"))?;
    let netd = start_netd(
        started,
        opts,
        node,
        addr,
        &host.managers,
        &tokens.manager,
        progress,
    )?;
    host.netd = Some(netd);
    let ctx = Context {
        name: context_name.to_string(),
        managers: vec![endpoint],
        lab: None,
    };
    ctx.save_current(config_dir).map_err(|e| anyhow!("{e}"))?;
    started.context = Some((config_dir.to_path_buf(), context_name.to_string()));
    host.context = Some(context_name.to_string());
    started.save_host(&host)?;
    Ok(Joined {
        cluster_id: info.cluster_id,
        node: node.to_string(),
        addr: addr.to_string(),
        role: "manager".into(),
        managers: host.managers,
        tokens: Some(Tokens {
            worker: tokens.worker,
            manager: tokens.manager,
        }),
        context: Some(context_name.to_string()),
    })
}

/// A Raft id for a joining manager: random, non-zero, kept in `D/manager/raft-id` so that a
/// retried join uses the same one.
fn raft_id(manager_dir: &Path) -> anyhow::Result<u64> {
    let path = manager_dir.join("raft-id");
    if let Ok(text) = fs::read_to_string(&path)
        && let Ok(id) = text.trim().parse::<u64>()
    {
        return Ok(id);
    }
    let mut b = [0u8; 4];
    use std::io::Read as _;
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    // Small enough to read in `cluster info`; 2 and up (1 is the cluster's first manager).
    let id = u64::from(u32::from_le_bytes(b) % 1_000_000_000) + 2;
    fs::write(&path, id.to_string()).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// `cluster join`.
pub fn join(
    opts: &HostOptions,
    token: &str,
    manager: &str,
    progress: &mut Progress,
) -> Result<Joined> {
    swarmnet_pki::token::JoinToken::parse(token).map_err(|e| {
        CliError::usage(
            format!("--token: {e}"),
            "copy the token `swarmnet cluster join-token worker|manager` prints on a manager",
        )
    })?;
    let manager = with_port(manager);
    // A worker of this very cluster given a manager token: its manager is started in place.
    if let Ok(Some(host)) = HostState::load(&opts.data_dir)
        && host.manager.is_none()
        && same_cluster(&opts.data_dir, token)
    {
        return upgrade_to_manager(opts, host, token, &manager, progress);
    }
    let node = node_id(opts)?;
    let addr = advertise_addr(opts)?;
    check_free(&opts.data_dir)?;
    let mut started = Started::new(&opts.data_dir);
    let r = join_inner(opts, token, &manager, &node, addr, &mut started, progress);
    r.map_err(|e| {
        started.undo();
        host_err(
            format!(
                "nothing was left running; check the token and that {manager} is reachable from here (logs in {})",
                opts.data_dir.display()
            ),
            e,
        )
    })
}

fn join_inner(
    opts: &HostOptions,
    token: &str,
    seed: &str,
    node: &str,
    addr: Ipv4Addr,
    started: &mut Started,
    progress: &mut Progress,
) -> anyhow::Result<Joined> {
    let d = &opts.data_dir;
    make_dir(started, d)?;
    let netd_dir = d.join("netd");
    make_dir(started, &netd_dir)?;
    // The node's certificate first: the token and the manager's CA are checked before anything
    // starts, and the answer says which role the token gives. netd finds it in its run
    // directory and joins with it.
    progress.step(&format!("joining through {seed}"));
    let rt = crate::runtime().map_err(|e| anyhow!("{e}"))?;
    let (material, role) = rt
        .block_on(swarmnet_pki::join::request_certificate(
            seed,
            token,
            node,
            Duration::from_secs(10),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    swarmnet_pki::store::save(&netd_dir.join("tls"), &material)?;
    let role = match role {
        swarmnet_pki::Role::Manager => "manager",
        _ => "worker",
    }
    .to_string();
    let mut host = HostState {
        node_id: node.to_string(),
        addr,
        role: role.clone(),
        managers: vec![seed.to_string()],
        raft_id: None,
        manager: None,
        netd: None,
        context: None,
    };
    if role == "manager" {
        let (daemon, id, advertise) =
            start_joining_manager(started, opts, node, addr, token, seed, &rt, progress)?;
        host.manager = Some(daemon);
        host.raft_id = Some(id);
        host.managers.insert(0, advertise);
    }
    started.save_host(&host)?;
    let netd = start_netd(started, opts, node, addr, &host.managers, token, progress)?;
    host.netd = Some(netd);
    started.save_host(&host)?;
    let cluster_id = cluster_id_of(&rt, &host, &netd_dir).unwrap_or_default();
    Ok(Joined {
        cluster_id,
        node: node.to_string(),
        addr: addr.to_string(),
        role,
        managers: host.managers,
        tokens: None,
        context: None,
    })
}

/// Starts a manager that joins the Raft group through `seed` with the manager token, and
/// waits until the group lists it as a voter. Answers the daemon, its Raft id and the address
/// it advertises.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per kind of join, all named"
)]
fn start_joining_manager(
    started: &mut Started,
    opts: &HostOptions,
    node: &str,
    addr: Ipv4Addr,
    token: &str,
    seed: &str,
    rt: &tokio::runtime::Runtime,
    progress: &mut Progress,
) -> anyhow::Result<(Daemon, u64, String)> {
    let d = &opts.data_dir;
    let manager_dir = d.join("manager");
    make_dir(started, &manager_dir)?;
    let id = raft_id(&manager_dir)?;
    let orchestrator = sibling_binary("swarmnet-orchestrator")?;
    let (mut args, advertise) = manager_args(opts, id, node, addr);
    args.extend(["--join".into(), seed.to_string()]);
    progress.step(&format!(
        "starting a manager (Raft id {id}) that joins the managers"
    ));
    let log = d.join("manager.log");
    let (mut child, daemon) = spawn_detached(&orchestrator, &args, Some(token), &log)?;
    started.daemons.push(daemon.clone());
    // Asked with the new manager's own certificate, which its join writes (the node's may
    // still be a worker's, and workers may not read the Raft group).
    let mut managers = Managers::new(vec![ManagerEndpoint {
        node: node.to_string(),
        addr: seed.to_string(),
        netns: None,
        tls_dir: Some(manager_dir.join("tls")),
    }]);
    wait_ready("the manager", &mut child, &log, || {
        rt.block_on(managers.votes(id)).unwrap_or(false)
    })?;
    Ok((daemon, id, advertise))
}

/// Whether `token` pins the CA this host's node certificate was issued by.
fn same_cluster(data_dir: &Path, token: &str) -> bool {
    let Ok(parsed) = swarmnet_pki::token::JoinToken::parse(token) else {
        return false;
    };
    swarmnet_pki::store::load(&data_dir.join("netd").join("tls"))
        .ok()
        .flatten()
        .and_then(|m| swarmnet_pki::ca::digest_pem(&m.ca_pem).ok())
        .is_some_and(|d| d == parsed.ca_digest)
}

/// `cluster join --token <manager token>` on a worker of the same cluster (after `node
/// promote`, or instead of it): starts this host's manager, which joins the Raft group; netd
/// and the tasks stay as they are.
fn upgrade_to_manager(
    opts: &HostOptions,
    mut host: HostState,
    token: &str,
    seed: &str,
    progress: &mut Progress,
) -> Result<Joined> {
    let d = &opts.data_dir;
    let mut started = Started::new(d);
    let r = (|| -> anyhow::Result<Joined> {
        progress.step(&format!("checking the token with {seed}"));
        let rt = crate::runtime().map_err(|e| anyhow!("{e}"))?;
        // The token must be a manager token (a worker token makes no manager).
        let (_, role) = rt
            .block_on(swarmnet_pki::join::request_certificate(
                seed,
                token,
                &host.node_id,
                Duration::from_secs(10),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        if role != swarmnet_pki::Role::Manager {
            return Err(anyhow!(
                "this host is already a worker of this cluster; a manager token makes it a manager"
            ));
        }
        let (daemon, id, advertise) = start_joining_manager(
            &mut started,
            opts,
            &host.node_id,
            host.addr,
            token,
            seed,
            &rt,
            progress,
        )?;
        host.role = "manager".into();
        host.raft_id = Some(id);
        host.manager = Some(daemon);
        if !host.managers.contains(&advertise) {
            host.managers.insert(0, advertise);
        }
        started.save_host(&host)?;
        let cluster_id = cluster_id_of(&rt, &host, &d.join("manager")).unwrap_or_default();
        Ok(Joined {
            cluster_id,
            node: host.node_id.clone(),
            addr: host.addr.to_string(),
            role: "manager".into(),
            managers: host.managers.clone(),
            tokens: None,
            context: None,
        })
    })();
    r.map_err(|e| {
        // Only the manager this command started goes; the node stays a worker.
        started.undo();
        host_err(
            "the node stays a worker; check the token (a manager token)",
            e,
        )
    })
}

/// The managers `host` follows, asked with the certificate in `tls_dir`.
fn host_managers(host: &HostState, tls_dir: &Path) -> Managers {
    Managers::new(
        host.managers
            .iter()
            .map(|m| ManagerEndpoint {
                node: m.clone(),
                addr: m.clone(),
                netns: None,
                tls_dir: Some(tls_dir.to_path_buf()),
            })
            .collect(),
    )
}

/// The cluster's id, asked with the certificate in `dir/tls` (the node's, or its manager's).
fn cluster_id_of(rt: &tokio::runtime::Runtime, host: &HostState, dir: &Path) -> Option<String> {
    rt.block_on(host_managers(host, &dir.join("tls")).info())
        .ok()
        .map(|i| i.cluster_id)
}

/// What `leave` did.
#[derive(Debug, Clone, Serialize)]
pub struct Left {
    pub node: String,
    pub role: String,
    /// Removed from the cluster by the managers.
    pub removed: bool,
    /// It ran the last manager: the cluster ended with it.
    pub cluster_ended: bool,
    pub notes: Vec<String>,
}

pub fn left_text(l: &Left) -> String {
    let mut out = format!(
        "node {} left the cluster{}\n",
        l.node,
        if l.cluster_ended {
            "; it ran the last manager, so the cluster ended with it"
        } else if l.removed {
            ""
        } else {
            " (no manager removed it: see the notes)"
        }
    );
    for n in &l.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

/// `cluster leave`.
pub fn leave(
    data_dir: &Path,
    force: bool,
    config_dir: &Path,
    progress: &mut Progress,
) -> Result<Left> {
    let host = HostState::load(data_dir)
        .map_err(|e| {
            host_err(
                format!("remove {} by hand", data_dir.join("host.json").display()),
                e,
            )
        })?
        .ok_or_else(|| {
            host_err(
                "nothing to leave; `swarmnet cluster init` or `join` make this host a node",
                anyhow!(
                    "this host is not in a cluster (no {})",
                    data_dir.join("host.json").display()
                ),
            )
        })?;
    // A manager host asks with its manager's certificate (a manager's); a worker with its
    // node's. (A worker promoted in place holds a worker node certificate until its renewal.)
    let tls = if host.manager.is_some() && data_dir.join("manager").join("tls").exists() {
        data_dir.join("manager").join("tls")
    } else {
        data_dir.join("netd").join("tls")
    };
    let rt = crate::runtime()?;
    let mut managers = host_managers(&host, &tls);
    let mut notes = Vec::new();
    let mut removed = false;
    // A manager host: refused without --force; with it, it leaves the Raft group first (the
    // last manager cannot: the cluster ends with it).
    let mut last_manager = false;
    if let (Some(id), Some(_)) = (host.raft_id, &host.manager) {
        let info = rt.block_on(managers.info());
        // No manager answering (this one included): how many there are is unknown; it is
        // treated as one of several (the removals are tried and noted when they fail).
        let voters = info
            .as_ref()
            .map(|i| i.managers.iter().filter(|m| m.voter).count())
            .unwrap_or(0);
        last_manager = voters == 1;
        if !force && last_manager {
            return Err(host_err(
                "run it again with --force to end the cluster (its state is deleted here)",
                anyhow!("this host runs the cluster's last manager: leaving ends the cluster"),
            ));
        }
        if !force {
            return Err(host_err(
                if voters == 0 {
                    "run it again with --force (no manager answered: the cluster may not learn \
                     that it left; then remove it with `swarmnet node rm --force`)"
                        .to_string()
                } else {
                    format!(
                        "run it again with --force; the {} other manager{} go on, and a majority \
                         of them must stay up",
                        voters - 1,
                        if voters == 2 { "" } else { "s" }
                    )
                },
                anyhow!("this host runs a manager (Raft id {id})"),
            ));
        }
        if !last_manager {
            progress.step(&format!("leaving the Raft group (manager {id})"));
            match rt.block_on(managers.call(|ch| async move {
                pb::cluster_client::ClusterClient::new(ch)
                    .remove_manager(pb::RemoveManagerRequest { id })
                    .await
            })) {
                Ok(_) => {}
                Err(e) => notes.push(format!("the managers did not remove manager {id}: {e}")),
            }
        }
    }
    if !last_manager {
        progress.step("removing the node from the cluster");
        let node_id = host.node_id.clone();
        match rt.block_on(managers.call(|ch| {
            let node_id = node_id.clone();
            async move {
                pb::dispatcher_client::DispatcherClient::new(ch)
                    .leave(pb::LeaveRequest { node_id })
                    .await
            }
        })) {
            Ok(_) => removed = true,
            Err(e) => notes.push(format!(
                "the managers did not remove the node ({e}); remove it with `swarmnet node rm --force {}`",
                host.node_id
            )),
        }
    }
    // netd stops the tasks and removes everything it made, then exits.
    if let Some(netd) = host.netd.as_ref().filter(|d| d.running()) {
        progress.step("stopping tasks and removing the data plane");
        let sock = data_dir.join("netd").join("netd.sock");
        // netd answers once its objects are gone (it gives up on them after 60 s).
        let asked = netd_call_within(
            &sock,
            &serde_json::json!({"op": "leave"}),
            Duration::from_secs(120),
        );
        if let Err(e) = asked {
            notes.push(format!("netd: {e:#}"));
        }
        swarmnet_labkit::wait_until(Duration::from_secs(10), || !netd.running());
    } else if !swarmnet_labkit::mounts_under(&data_dir.join("netd")).is_empty() {
        // netd died: nobody can take its data plane down but netd (it alone knows what it
        // made); its state stays for that.
        notes.push(format!(
            "netd was not running, so its data plane stays: start it again with its run \
             directory {} (see netd.log for its command line) and run `swarmnet-netd leave \
             --run-dir {}`",
            data_dir.join("netd").display(),
            data_dir.join("netd").display()
        ));
    }
    progress.step("stopping this host's daemons");
    for d in host.daemons() {
        d.stop(STOP_GRACE);
    }
    let still: Vec<String> = host
        .daemons()
        .filter(|d| d.running())
        .map(|d| format!("{} (pid {})", d.exe.display(), d.pid))
        .collect();
    if !still.is_empty() {
        return Err(host_err(
            "end them by hand, then run `swarmnet cluster leave` again",
            anyhow!("still running: {}", still.join(", ")),
        ));
    }
    // The state goes with the membership (certificates, the manager's database); logs stay.
    for dir in ["manager", "netd"] {
        let p = data_dir.join(dir);
        // A directory with namespaces still mounted under it is netd's unfinished business
        // (see the note above): left whole.
        if p.exists()
            && swarmnet_labkit::mounts_under(&p).is_empty()
            && let Err(e) = fs::remove_dir_all(&p)
        {
            notes.push(format!("cannot remove {}: {e}", p.display()));
        }
    }
    drop(fs::remove_file(HostState::path(data_dir)));
    if let Some(ctx) = &host.context {
        Context::remove(config_dir, ctx);
    }
    Ok(Left {
        node: host.node_id,
        role: host.role,
        removed,
        cluster_ended: last_manager,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_after_a_name_with_spaces_and_parens() {
        use swarmnet_labkit::parse_start_ticks;
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        let zombie = stat.replace(") S ", ") Z ");
        assert_eq!(parse_start_ticks(&zombie), None);
        assert_eq!(parse_start_ticks("garbage"), None);
        assert!(start_ticks(std::process::id()).is_some());
        assert!(start_ticks(u32::MAX).is_none());
    }

    #[test]
    fn default_route_interface() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      eth1\t0012A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                      eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_dev(routes).as_deref(), Some("eth0"));
        assert_eq!(default_route_dev("Iface\tDestination\n"), None);
    }

    #[test]
    fn manager_port_added_when_missing() {
        assert_eq!(with_port("198.18.0.1"), "198.18.0.1:4242");
        assert_eq!(with_port("198.18.0.1:5000"), "198.18.0.1:5000");
        assert_eq!(with_port("mgr.example"), "mgr.example:4242");
        assert_eq!(with_port("mgr.example:4243"), "mgr.example:4243");
    }

    #[test]
    fn a_reused_pid_is_not_ours() {
        let me = Daemon {
            pid: std::process::id(),
            start_ticks: start_ticks(std::process::id()).unwrap(),
            exe: "/proc/self/exe".into(),
        };
        assert!(me.running());
        let other = Daemon {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert!(!other.running(), "same pid, another start: not ours");
    }

    #[test]
    fn host_state_round_trips_and_refuses_a_second_cluster() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_free(dir.path()).is_ok());
        let h = HostState {
            node_id: "h1".into(),
            addr: "198.18.0.1".parse().unwrap(),
            role: "worker".into(),
            managers: vec!["198.18.0.2:4242".into()],
            raft_id: None,
            manager: None,
            netd: Some(Daemon {
                pid: u32::MAX - 1,
                start_ticks: 1,
                exe: "/usr/bin/swarmnet-netd".into(),
            }),
            context: None,
        };
        h.save(dir.path()).unwrap();
        assert_eq!(HostState::load(dir.path()).unwrap(), Some(h));
        let e = check_free(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("already node \"h1\"") && e.contains("not running"),
            "{e}"
        );
        assert!(e.contains("cluster leave"), "{e}");
    }
}
