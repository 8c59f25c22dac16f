//! `swarmnet lab`: a whole cluster in network namespaces on this machine.
//!
//! Layout of lab `<name>` (pure: [`LabState::plan`]):
//! - namespace `snl-<name>-ul`: the underlay, bridge `ul0` with one veth port `p<i>` per node;
//! - namespace `snl-<name>-n<i>`: node `n<i>`, `eth0` = `198.19.0.<i>/24` (from the benchmark
//!   range 198.18.0.0/15, never routed anywhere), MTU 1500;
//! - `/run/swarmnet-lab/<name>/`: `lab.json` (this state) and one run dir per node (netd's
//!   `--run-dir`: `netd.sock`, `netd.log`, `netns/`, `tasks/`; managers: `manager/`,
//!   `manager.log`);
//! - `<cgroup2>/swarmnet-lab/<name>/`: `netd-n<i>` holds netd, `manager-n<i>` the manager,
//!   `n<i>` the node's tasks, so one
//!   `cgroup.kill` ends every process of the lab;
//! - a context `<name>` in the CLI's context directory naming the lab's managers, made current.
//!
//! Managers: the first M nodes run `swarmnet-orchestrator` in their namespace, listening on
//! `<addr>:4242`; n1 bootstraps Raft and `Cluster.Init`s the cluster, the others join through it.
//! The CLI reaches them from inside the lab's namespaces (see [`crate::api`]).
//!
//! netd on every node runs in client mode (`--managers <every manager> --join-token T`): it joins
//! the cluster itself (with the manager token on managers, the worker token elsewhere), follows
//! its assignment stream and heartbeats.
//!
//! Nothing is created in the root network namespace: every link is made with `ip -n <ours>`.
//! `lab down` removes the whole [`swarmnet_labkit::Footprint`] and checks that nothing is left.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use serde::{Deserialize, Serialize};
use swarmnet_labkit::{self as kit, Footprint};

use swarmnet_api as pb;

use crate::api::Managers;
use crate::context::ManagerEndpoint;
use crate::error::{CliError, Result};
use crate::progress::Progress;
use crate::render::Table;

/// Parent of every lab's run directory.
pub const LAB_ROOT: &str = "/run/swarmnet-lab";
/// Prefix of every namespace a lab makes.
pub const NETNS_PREFIX: &str = "snl-";
/// Port the managers' gRPC servers listen on, on their node's underlay address.
pub const MANAGER_PORT: u16 = 4242;

/// One node of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNode {
    pub id: String,
    pub addr: Ipv4Addr,
    pub netns: String,
    pub manager: bool,
    /// netd's `--run-dir`.
    pub run_dir: PathBuf,
    /// netd's pid once started.
    pub netd_pid: Option<u32>,
    /// The manager's pid (managers only) once started.
    #[serde(default)]
    pub manager_pid: Option<u32>,
}

impl LabNode {
    pub fn netns_path(&self) -> PathBuf {
        kit::netns_path(&self.netns)
    }

    pub fn netd_socket(&self) -> PathBuf {
        self.run_dir.join("netd.sock")
    }

    /// host:port of its manager's gRPC API (managers only).
    pub fn manager_addr(&self) -> String {
        format!("{}:{MANAGER_PORT}", self.addr)
    }

    /// How the CLI reaches this node's manager.
    pub fn manager_endpoint(&self) -> ManagerEndpoint {
        ManagerEndpoint {
            node: self.id.clone(),
            addr: self.manager_addr(),
            netns: Some(self.netns_path()),
            tls_dir: Some(admin_dir(&self.run_dir)),
        }
    }
}

/// The lab's administrator certificate (`<lab dir>/admin`), copied from the bootstrap
/// manager's `manager/tls/admin`; the lab's context presents it.
pub fn admin_dir(node_run_dir: &Path) -> PathBuf {
    node_run_dir
        .parent()
        .unwrap_or(Path::new(LAB_ROOT))
        .join("admin")
}

/// What `lab.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub dir: PathBuf,
    pub underlay_ns: String,
    pub cgroup: PathBuf,
    pub nodes: Vec<LabNode>,
}

impl LabState {
    /// The layout of a lab (pure).
    pub fn plan(name: &str, nodes: u8, managers: u8, cgroup2: &Path) -> Self {
        let dir = Path::new(LAB_ROOT).join(name);
        let nodes = (1..=nodes)
            .map(|i| {
                let id = format!("n{i}");
                LabNode {
                    addr: Ipv4Addr::new(198, 19, 0, i),
                    netns: format!("{NETNS_PREFIX}{name}-{id}"),
                    manager: i <= managers,
                    run_dir: dir.join(&id),
                    netd_pid: None,
                    manager_pid: None,
                    id,
                }
            })
            .collect();
        Self {
            name: name.to_owned(),
            underlay_ns: format!("{NETNS_PREFIX}{name}-ul"),
            cgroup: cgroup2.join("swarmnet-lab").join(name),
            dir,
            nodes,
        }
    }

    pub fn footprint(name: &str) -> Footprint {
        Footprint {
            netns_prefix: format!("{NETNS_PREFIX}{name}-"),
            dir: Path::new(LAB_ROOT).join(name),
            cgroup: kit::cgroup2_mount()
                .ok()
                .map(|m| m.join("swarmnet-lab").join(name)),
        }
    }

    pub fn state_path(name: &str) -> PathBuf {
        Path::new(LAB_ROOT).join(name).join("lab.json")
    }

    pub fn load(name: &str) -> Result<Self> {
        let path = Self::state_path(name);
        let text = fs::read_to_string(&path).map_err(|e| {
            CliError::lab(
                name,
                format!("start it with `swarmnet lab up --name {name}`"),
                anyhow!("{} cannot be read: {e}", path.display()),
            )
        })?;
        serde_json::from_str(&text).map_err(|e| {
            CliError::lab(
                name,
                format!("remove it with `swarmnet lab down --name {name}`"),
                anyhow!("{} is damaged: {e}", path.display()),
            )
        })
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = Self::state_path(&self.name);
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn node(&self, id: &str) -> Result<&LabNode> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
            CliError::usage(
                format!("lab {:?} has no node {id:?}", self.name),
                format!("its nodes are {}", ids.join(", ")),
            )
        })
    }
}

/// A lab's state beside what runs, as `lab status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatusView {
    pub name: String,
    pub dir: PathBuf,
    pub nodes: Vec<LabNodeStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabNodeStatus {
    pub id: String,
    pub addr: String,
    pub role: String,
    pub netns: String,
    /// "running" | "exited" | "not started".
    pub netd: String,
    pub netd_pid: Option<u32>,
    /// Whether netd's local API answered `status`.
    pub netd_api: bool,
    /// Sandboxes netd reports on this node.
    pub tasks: usize,
    /// Managers only: "leader" | "reachable" | "unreachable"; empty for workers.
    pub manager_status: String,
}

pub fn status_table(s: &LabStatusView) -> String {
    let mut t = Table::new(&[
        "NODE",
        "ADDRESS",
        "ROLE",
        "MANAGER STATUS",
        "NETNS",
        "NETD",
        "API",
        "TASKS",
    ]);
    for n in &s.nodes {
        t.row(vec![
            n.id.clone(),
            n.addr.clone(),
            n.role.clone(),
            n.manager_status.clone(),
            n.netns.clone(),
            match n.netd_pid {
                Some(p) => format!("{} (pid {p})", n.netd),
                None => n.netd.clone(),
            },
            if n.netd_api { "ok" } else { "down" }.into(),
            n.tasks.to_string(),
        ]);
    }
    format!("lab {} ({})\n{}", s.name, s.dir.display(), t.render())
}

// ----------------------------------------------------------------------------- netd client

/// Asks netd's local API (`<run_dir>/netd.sock`, one JSON object per line each way).
pub fn netd_call(socket: &Path, request: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    netd_call_within(socket, request, Duration::from_secs(10))
}

/// [`netd_call`] waiting up to `timeout` for the answer.
pub fn netd_call_within(
    socket: &Path,
    request: &serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("reading netd's answer")?;
    let v: serde_json::Value = serde_json::from_str(&answer)
        .with_context(|| format!("netd answered something that is not JSON: {answer:?}"))?;
    if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
        let err = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        return Err(anyhow!("netd refused: {err}"));
    }
    Ok(v)
}

// ------------------------------------------------------------------------------- commands

/// `PATH` of the lab's tasks: the directories of the project's binaries first, so a service
/// runs `swarmnet-whoami` (the demo server) by name, then the usual one.
fn task_path(bins: &Binaries) -> String {
    let mut dirs: Vec<String> = Vec::new();
    let whoami = sibling_binary("swarmnet-whoami").ok();
    for bin in [Some(&bins.netd), whoami.as_ref()].into_iter().flatten() {
        if let Some(d) = bin.parent().and_then(|d| d.to_str())
            && d.starts_with('/')
            && !d.contains(':')
            && !dirs.iter().any(|x| x == d)
        {
            dirs.push(d.to_string());
        }
    }
    dirs.push(swarmnet_model::DEFAULT_TASK_PATH.to_string());
    dirs.join(":")
}

/// A program of the project: beside the running CLI, or on PATH.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    // Beside the running CLI first (cargo puts every binary of the workspace there), then PATH.
    let exe = std::env::current_exe()?;
    let mut dirs: Vec<PathBuf> = exe.parent().into_iter().map(Path::to_path_buf).collect();
    // Test binaries live in target/<profile>/deps.
    if let Some(p) = exe.parent().and_then(Path::parent) {
        dirs.push(p.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} is neither beside {} nor on PATH", exe.display()))
}

/// `lab up`.
pub fn up(name: &str, nodes: u8, managers: u8, progress: &mut Progress) -> Result<LabState> {
    let fail = |hint: &str, e: anyhow::Error| CliError::lab(name, hint, e);
    if managers > nodes {
        return Err(CliError::usage(
            format!("--managers {managers} is more than --nodes {nodes}"),
            "managers are the first M nodes: give at most as many managers as nodes",
        ));
    }
    let fp = LabState::footprint(name);
    let left = kit::leftovers(&fp);
    if !left.is_empty() {
        return Err(fail(
            &format!("take it down first with `swarmnet lab down --name {name}`"),
            anyhow!("it is already up (or left behind): {}", left.join(", ")),
        ));
    }
    let cg2 =
        kit::cgroup2_mount().map_err(|e| fail("mount cgroup2 on /sys/fs/cgroup", e.into()))?;
    let bins = Binaries {
        netd: sibling_binary("swarmnet-netd")
            .map_err(|e| fail("build it with `cargo build -p swarmnet-netd`", e))?,
        orchestrator: sibling_binary("swarmnet-orchestrator")
            .map_err(|e| fail("build it with `cargo build -p swarmnet-orchestrator`", e))?,
    };
    let mut lab = LabState::plan(name, nodes, managers, &cg2);
    let built = build(&mut lab, &bins, progress);
    if let Err(e) = built {
        progress.step("failed: removing what was made");
        let notes = kit::destroy(&fp);
        let e = if notes.is_empty() {
            e
        } else {
            e.context(format!("cleanup: {}", notes.join("; ")))
        };
        return Err(fail(
            "see the lab's node logs above; `swarmnet lab down` removes any leftover",
            e,
        ));
    }
    Ok(lab)
}

/// The programs a lab runs.
#[derive(Debug)]
struct Binaries {
    netd: PathBuf,
    orchestrator: PathBuf,
}

fn open_log(path: &Path) -> anyhow::Result<fs::File> {
    Ok(fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?)
}

/// Starts the manager of `lab.nodes[i]` in its node's namespace (Raft id `i + 1`): the first
/// bootstraps a one-member Raft group (and the cluster CA), the others join through `seed`
/// with the manager token (`seed` = (address, token)).
fn start_manager(
    lab: &mut LabState,
    i: usize,
    orchestrator: &Path,
    seed: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let node = &lab.nodes[i];
    let data = node.run_dir.join("manager");
    fs::create_dir_all(&data)?;
    let log = open_log(&node.run_dir.join("manager.log"))?;
    let mut cmd = Command::new(orchestrator);
    cmd.arg("--id")
        .arg((i + 1).to_string())
        .arg("--listen")
        .arg(node.manager_addr())
        .arg("--data-dir")
        .arg(&data);
    match seed {
        None => cmd.arg("--bootstrap"),
        Some((addr, token)) => cmd.arg("--join").arg(addr).arg("--join-token").arg(token),
    };
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = kit::spawn_in(
        cmd,
        &node.netns_path(),
        &lab.cgroup.join(format!("manager-{}", node.id)),
    )?;
    lab.nodes[i].manager_pid = Some(child.id());
    // Like netd, the manager outlives this command; `lab down` ends it through the cgroup.
    drop(child);
    lab.save()
}

/// `node promote` in a lab: starts the node's manager (Raft id = its index + 1, a fresh data
/// directory), which joins through a running manager of the lab with the manager token.
/// Answers its Raft id; nothing is started when one runs there already.
pub fn start_promoted_manager(name: &str, node: &str, token: &str) -> Result<u64> {
    let fail = |hint: &str, e: anyhow::Error| CliError::lab(name, hint, e);
    let mut lab = LabState::load(name)?;
    let i = lab
        .nodes
        .iter()
        .position(|n| n.id == node)
        .ok_or_else(|| fail("see `swarmnet lab status`", anyhow!("no node {node:?}")))?;
    let id = i as u64 + 1;
    if lab.nodes[i].manager_pid.is_some_and(kit::pid_alive) {
        return Ok(id);
    }
    let seed = lab
        .nodes
        .iter()
        .find(|n| n.manager && n.id != node && n.manager_pid.is_some_and(kit::pid_alive))
        .map(LabNode::manager_addr)
        .ok_or_else(|| {
            fail(
                "start the lab's managers again (`swarmnet lab down` and `lab up`)",
                anyhow!("no running manager to join through"),
            )
        })?;
    let orchestrator = sibling_binary("swarmnet-orchestrator")
        .map_err(|e| fail("build it with `cargo build -p swarmnet-orchestrator`", e))?;
    // A manager this node ran before it was demoted left its Raft log: it starts afresh.
    let data = lab.nodes[i].run_dir.join("manager");
    if data.exists() {
        fs::remove_dir_all(&data)
            .map_err(|e| CliError::io(format!("removing {}", data.display()), e))?;
    }
    start_manager(&mut lab, i, &orchestrator, Some((&seed, token)))
        .map_err(|e| fail("see the node's manager.log", e))?;
    lab.nodes[i].manager = true;
    lab.save()
        .map_err(|e| fail("check the lab's run directory", e))?;
    Ok(id)
}

/// `node demote` in a lab, once the managers removed its manager from the Raft group: ends
/// that manager process (ours, by pid) and removes its data. Answers its Raft id, if it ran.
pub fn stop_demoted_manager(name: &str, node: &str) -> Result<Option<u64>> {
    let mut lab = LabState::load(name)?;
    let Some(i) = lab.nodes.iter().position(|n| n.id == node) else {
        return Ok(None);
    };
    let Some(pid) = lab.nodes[i].manager_pid.take() else {
        return Ok(None);
    };
    // The lab's own process (its pid, in the lab's cgroup).
    kit::terminate(pid, Duration::from_secs(10), || kit::pid_alive(pid));
    drop(fs::remove_dir_all(lab.nodes[i].run_dir.join("manager")));
    lab.nodes[i].manager = false;
    lab.save()
        .map_err(|e| CliError::lab(name, "check the lab's run directory", e))?;
    Ok(Some(i as u64 + 1))
}

/// Retries `f` every 200 ms for up to `timeout`, returning its last error.
pub(crate) async fn retry<T, Fut>(
    timeout: Duration,
    mut f: impl FnMut() -> Fut,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > timeout => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn join_request(node: &LabNode) -> pb::JoinNodeRequest {
    pb::JoinNodeRequest {
        id: node.id.clone(),
        hostname: node.id.clone(),
        addr: node.addr.to_string(),
        role: if node.manager { "manager" } else { "worker" }.into(),
        labels: Default::default(),
        data_interface: "eth0".into(),
        // Init's own node needs none; every other node joins through netd with a token.
        token: String::new(),
    }
}

/// Starts the managers and creates the cluster: manager 1 bootstraps and `Cluster.Init`s it with
/// node n1, the others join through it. Answers the join tokens the nodes' netd join with.
fn start_cluster(
    lab: &mut LabState,
    orchestrator: &Path,
    progress: &mut Progress,
) -> anyhow::Result<pb::JoinTokensResponse> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let wait = Duration::from_secs(30);
    progress.step("manager on n1 (bootstrap)");
    start_manager(lab, 0, orchestrator, None)?;
    let first = lab.nodes[0].clone();
    // The bootstrap manager writes the administrator certificate; the lab's context uses a
    // copy.
    let written = first.run_dir.join("manager").join("tls").join("admin");
    let ready = kit::wait_until(wait, || {
        swarmnet_pki::store::load(&written).is_ok_and(|m| m.is_some())
    });
    anyhow::ensure!(
        ready,
        "the manager on n1 wrote no administrator certificate in {} (see {})",
        written.display(),
        first.run_dir.join("manager.log").display()
    );
    let admin = swarmnet_pki::store::load(&written)?.context("admin certificate")?;
    swarmnet_pki::store::save(&admin_dir(&first.run_dir), &admin)?;
    let init = pb::InitRequest {
        cluster_id: lab.name.clone(),
        pool: String::new(),
        pool_size: 0,
        ingress_subnet: String::new(),
        node: Some(join_request(&first)),
    };
    rt.block_on(retry(wait, || {
        let init = init.clone();
        let ep = first.manager_endpoint();
        async move {
            let mut m = Managers::new(vec![ep]);
            crate::commands::init(&mut m, init).await?;
            anyhow::Ok(())
        }
    }))
    .with_context(|| {
        format!(
            "initialising the cluster on n1 (see {})",
            first.run_dir.join("manager.log").display()
        )
    })?;
    let seed = first.manager_addr();
    let manager_token = rt
        .block_on(async {
            Managers::new(vec![first.manager_endpoint()])
                .call(|ch| async move {
                    pb::cluster_client::ClusterClient::new(ch)
                        .join_tokens(pb::Empty {})
                        .await
                })
                .await
        })?
        .manager;
    let managers: Vec<usize> = (1..lab.nodes.len())
        .filter(|&i| lab.nodes[i].manager)
        .collect();
    for &i in &managers {
        progress.step(&format!(
            "manager on {} (joins through n1)",
            lab.nodes[i].id
        ));
        start_manager(lab, i, orchestrator, Some((&seed, &manager_token)))?;
    }
    let endpoints: Vec<ManagerEndpoint> = lab
        .nodes
        .iter()
        .filter(|n| n.manager)
        .map(LabNode::manager_endpoint)
        .collect();
    let want = endpoints.len();
    progress.step(&format!(
        "waiting for {want} manager(s) to answer with a leader"
    ));
    rt.block_on(retry(wait, || {
        let endpoints = endpoints.clone();
        async move {
            let mut m = Managers::new(endpoints);
            let c = m.cluster().await?;
            let up = c
                .managers
                .iter()
                .filter(|m| m.status != "unreachable")
                .count();
            anyhow::ensure!(
                c.leader != 0 && c.managers.len() == want && up == want,
                "{up} of {want} managers answer (leader {})",
                c.leader
            );
            Ok(())
        }
    }))?;
    let tokens = rt.block_on(async move {
        let mut m = Managers::new(endpoints);
        m.call(|ch| async move {
            pb::cluster_client::ClusterClient::new(ch)
                .join_tokens(pb::Empty {})
                .await
        })
        .await
    })?;
    Ok(tokens)
}

fn build(lab: &mut LabState, bins: &Binaries, progress: &mut Progress) -> anyhow::Result<()> {
    fs::create_dir_all(&lab.dir)?;
    fs::create_dir_all(&lab.cgroup)?;
    lab.save()?;
    let ul = lab.underlay_ns.clone();
    progress.step(&format!("underlay namespace {ul}"));
    kit::netns_add(&ul)?;
    for args in [
        vec!["ip", "-n", &ul, "link", "set", "lo", "up"],
        vec!["ip", "-n", &ul, "link", "add", "ul0", "type", "bridge"],
        vec!["ip", "-n", &ul, "link", "set", "ul0", "mtu", "1500", "up"],
    ] {
        kit::run(&args)?;
    }
    for (i, node) in lab.nodes.iter().enumerate() {
        progress.step(&format!("node {} ({})", node.id, node.addr));
        kit::netns_add(&node.netns)?;
        let port = format!("p{}", i + 1);
        let cidr = format!("{}/24", node.addr);
        let ns = node.netns.as_str();
        for args in [
            vec![
                "ip", "-n", &ul, "link", "add", &port, "mtu", "1500", "type", "veth", "peer",
                "name", "eth0", "netns", ns,
            ],
            vec!["ip", "-n", &ul, "link", "set", &port, "master", "ul0", "up"],
            vec!["ip", "-n", ns, "link", "set", "lo", "up"],
            vec!["ip", "-n", ns, "link", "set", "eth0", "mtu", "1500", "up"],
            vec!["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0"],
        ] {
            kit::run(&args)?;
        }
        // The node's hostname is its id for processes started in it through `lab exec`; the
        // UTS namespace is not ours to make here, so tools read it from the state instead.
    }
    let tokens = start_cluster(lab, &bins.orchestrator, progress)?;
    let managers: Vec<String> = lab
        .nodes
        .iter()
        .filter(|n| n.manager)
        .map(LabNode::manager_addr)
        .collect();
    let managers = managers.join(",");
    for node in &mut lab.nodes {
        progress.step(&format!("netd on {}", node.id));
        fs::create_dir_all(&node.run_dir)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.run_dir.join("netd.log"))?;
        let mut cmd = Command::new(&bins.netd);
        let token = if node.manager {
            &tokens.manager
        } else {
            &tokens.worker
        };
        cmd.arg("--node-id")
            .arg(&node.id)
            .arg("--managers")
            .arg(&managers)
            .arg("--join-token")
            .arg(token)
            .arg("--advertise-addr")
            .arg(node.addr.to_string())
            .arg("--run-dir")
            .arg(&node.run_dir)
            .arg("--cgroup-dir")
            .arg(lab.cgroup.join(&node.id))
            .arg("--task-path")
            .arg(task_path(bins))
            // The lab's nodes have no way out of their namespaces (by design: nothing is
            // routed through the root namespace), so the host's resolvers are unreachable
            // from them: names outside the cluster get SERVFAIL at once, not after timeouts.
            .arg("--dns-upstreams")
            .arg("none");
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = kit::spawn_in(
            cmd,
            &node.netns_path(),
            &lab.cgroup.join(format!("netd-{}", node.id)),
        )?;
        node.netd_pid = Some(child.id());
        // netd outlives this command: it is reaped by init once we exit, and ended by
        // `lab down` through the cgroup.
        drop(child);
    }
    lab.save()?;
    for node in &lab.nodes {
        progress.step(&format!("waiting for netd on {}", node.id));
        let sock = node.netd_socket();
        let ready = kit::wait_until(Duration::from_secs(30), || {
            netd_call(&sock, &serde_json::json!({"op": "status"})).is_ok()
        });
        if !ready {
            let log = fs::read_to_string(node.run_dir.join("netd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>();
            return Err(anyhow!(
                "netd on {} did not answer on {} within 30 s; its log ends:\n{}",
                node.id,
                sock.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    Ok(())
}

/// The tasks netd reports objects for (`sandbox/<task>`; the routing mesh's own sandbox is
/// not a task).
fn task_sandboxes(objects: &serde_json::Value) -> usize {
    let ingress = format!("sandbox/{}", swarmnet_model::intent::RESERVED_TASK);
    objects.as_object().map_or(0, |o| {
        o.keys()
            .filter(|k| k.starts_with("sandbox/") && **k != ingress)
            .count()
    })
}

/// `lab status`.
pub fn status(name: &str) -> Result<LabStatusView> {
    let lab = LabState::load(name)?;
    let cluster = manager_statuses(&lab);
    let nodes = lab
        .nodes
        .iter()
        .map(|n| {
            let alive = n.netd_pid.is_some_and(kit::pid_alive);
            let answer = netd_call(&n.netd_socket(), &serde_json::json!({"op": "status"})).ok();
            let tasks = answer
                .as_ref()
                .and_then(|a| a.pointer("/status/objects"))
                .map_or(0, task_sandboxes);
            LabNodeStatus {
                id: n.id.clone(),
                addr: n.addr.to_string(),
                role: if n.manager { "manager" } else { "worker" }.into(),
                netns: n.netns.clone(),
                netd: match (n.netd_pid, alive) {
                    (None, _) => "not started",
                    (Some(_), true) => "running",
                    (Some(_), false) => "exited",
                }
                .into(),
                netd_pid: n.netd_pid.filter(|_| alive),
                netd_api: answer.is_some(),
                tasks,
                manager_status: if n.manager {
                    cluster
                        .get(&n.manager_addr())
                        .cloned()
                        .unwrap_or_else(|| "unreachable".into())
                } else {
                    String::new()
                },
            }
        })
        .collect();
    Ok(LabStatusView {
        name: lab.name,
        dir: lab.dir,
        nodes,
    })
}

/// Manager address -> "leader" | "reachable" | "unreachable", as the managers see it; empty
/// when none answers.
fn manager_statuses(lab: &LabState) -> std::collections::BTreeMap<String, String> {
    let endpoints: Vec<ManagerEndpoint> = lab
        .nodes
        .iter()
        .filter(|n| n.manager)
        .map(LabNode::manager_endpoint)
        .collect();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Default::default();
    };
    rt.block_on(async move { Managers::new(endpoints).cluster().await })
        .map(|c| c.managers.into_iter().map(|m| (m.addr, m.status)).collect())
        .unwrap_or_default()
}

/// `lab down`: removes everything; fails if anything is left.
pub fn down(name: &str, progress: &mut Progress) -> Result<Vec<String>> {
    let fp = LabState::footprint(name);
    if kit::leftovers(&fp).is_empty() {
        return Err(CliError::lab(
            name,
            "see which labs exist with `swarmnet lab ls`",
            anyhow!("there is no such lab"),
        ));
    }
    progress.step("stopping processes, removing namespaces, mounts and cgroups");
    let notes = kit::destroy(&fp);
    let left = kit::leftovers(&fp);
    if !left.is_empty() {
        return Err(CliError::lab(
            name,
            "run `swarmnet lab down` again; if it persists, remove these by hand",
            anyhow!("left behind: {} ({})", left.join(", "), notes.join("; ")),
        ));
    }
    Ok(notes)
}

/// Removes the labs' shared parents (run root, cgroup parent) when they are empty: another lab
/// (or the context directory) may still use them, and then they stay.
pub fn remove_empty_parents() {
    drop(fs::remove_dir(LAB_ROOT));
    if let Ok(m) = kit::cgroup2_mount() {
        drop(fs::remove_dir(m.join("swarmnet-lab")));
    }
}

/// `lab exec`: runs `cmd` in the node's network namespace with our stdio; returns its exit code.
pub fn exec(name: &str, node: &str, cmd: &[String]) -> Result<i32> {
    let lab = LabState::load(name)?;
    let node = lab.node(node)?;
    let status = Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .arg("--")
        .args(cmd)
        .status()
        .map_err(|e| CliError::io("running nsenter (apt-get install util-linux)", e))?;
    // A command killed by a signal exits 128+n, as shells report it.
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

#[cfg(test)]
mod status_tests {
    #[test]
    fn tasks_are_the_task_sandboxes() {
        let objects = serde_json::json!({
            "network/ingress": {}, "node": {}, "sandbox/ingress-sbox": {},
            "sandbox/t1": {}, "sandbox/t2": {}
        });
        assert_eq!(super::task_sandboxes(&objects), 2);
        assert_eq!(super::task_sandboxes(&serde_json::json!(null)), 0);
    }
}
