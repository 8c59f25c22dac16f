//! The command line (clap derive) and the pure parsers of its compound values (`--publish`,
//! `--network`, `--constraint`, `NAME=N`). Parse errors come back as clap usage errors (exit 2)
//! naming the accepted syntax.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::render::Format;

/// swarmnet: overlay networks, service discovery and a routing mesh for a cluster of nodes.
#[derive(Debug, Parser)]
#[command(
    name = "swarmnet",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Output of read commands.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Which cluster to talk to (a context written by `lab up` or `cluster init`); default: the current one.
    #[arg(long, global = true, env = "SWARMNET_CONTEXT")]
    pub context: Option<String>,
    /// Where contexts are kept.
    #[arg(
        long,
        global = true,
        env = "SWARMNET_CONFIG_DIR",
        default_value = "/run/swarmnet-lab/contexts",
        hide = true
    )]
    pub config_dir: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// A local cluster in network namespaces on this machine.
    #[command(subcommand)]
    Lab(LabCmd),
    /// The cluster and its managers.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Services and their tasks.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// One task of a service.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Intent, gossip and kernel state of one object, with drift flagged.
    Inspect(InspectArgs),
    /// Prints a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// Builds the lab: an underlay bridge, N node namespaces, managers and netd on every node.
    Up(LabUp),
    /// What the lab holds and whether its processes run.
    Status(LabName),
    /// Removes every namespace, link, mount, cgroup and process the lab made.
    Down(LabDown),
    /// Every lab on this machine, also those a crashed or interrupted `lab up` left behind.
    Ls,
    /// Builds a 3-node lab with a published demo service and a client, and shows DNS, the VIP
    /// and the routing mesh working from inside it.
    Demo {
        #[command(flatten)]
        lab: LabName,
        /// Remove the lab afterwards.
        #[arg(long)]
        down: bool,
    },
    /// Runs a command in a node's network namespace (as a host on the underlay).
    Exec {
        #[command(flatten)]
        lab: LabName,
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct LabName {
    /// Name of the lab (several can coexist). Default for `lab up` and `lab demo`: `lab`; for
    /// the others: the lab of the current context, else `lab`.
    #[arg(long, value_parser = parse_lab_name)]
    pub name: Option<String>,
}

/// The lab name used when none is given and no context names one.
pub const DEFAULT_LAB: &str = "lab";

impl LabName {
    /// The name given, or [`DEFAULT_LAB`] (`lab up`, `lab demo`: a new lab).
    pub fn or_default(&self) -> String {
        self.name.clone().unwrap_or_else(|| DEFAULT_LAB.into())
    }

    /// The name given, else `current` (the lab of the context the CLI points at), else
    /// [`DEFAULT_LAB`]: `lab status|down|exec` act on the lab the CLI points at.
    pub fn or_current(&self, current: Option<String>) -> String {
        self.name
            .clone()
            .or(current)
            .unwrap_or_else(|| DEFAULT_LAB.into())
    }
}

#[derive(Debug, Args)]
pub struct LabDown {
    #[command(flatten)]
    pub lab: LabName,
    /// Remove every lab found on this machine (see `lab ls`), including half-made ones.
    #[arg(long, conflicts_with = "name")]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct LabUp {
    #[command(flatten)]
    pub lab: LabName,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub nodes: u8,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=7))]
    pub managers: u8,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Makes this host the first manager and node of a new cluster: starts a manager and netd
    /// here (detached), writes a context for the CLI and prints the join commands.
    Init(ClusterInit),
    /// Makes this host a node of an existing cluster: the token decides whether it also
    /// becomes a manager.
    Join(ClusterJoin),
    /// This host leaves its cluster: it is removed through the managers, its tasks stop, the
    /// data plane and the daemons `init`/`join` started go. A manager needs --force.
    Leave {
        /// Leave although this host runs a manager (the last manager ends the cluster).
        #[arg(long)]
        force: bool,
        #[arg(long, env = "SWARMNET_DATA_DIR", default_value = crate::cluster::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// The commands asked of the managers of a context.
    #[command(flatten)]
    Managers(ClusterManagersCmd),
}

/// `cluster` commands that talk to the managers of a context (the others act on this host).
#[derive(Debug, Subcommand)]
pub enum ClusterManagersCmd {
    /// The cluster's id, Raft term and index, and every manager's status.
    Info,
    /// The token a node joins with as a worker or a manager (`swarmnet-netd --join-token`).
    JoinToken {
        #[arg(value_parser = ["worker", "manager"])]
        role: String,
        /// Replace the token first (nodes already joined stay).
        #[arg(long)]
        rotate: bool,
    },
    /// The gossip keyring (ids, primary, rotation step). `--rotate` starts a rotation: the new
    /// key is sent to every node, then seals once all hold it, then the old one goes once all
    /// seal with it (the leader also rotates every 12 h).
    GossipKey {
        #[arg(long)]
        rotate: bool,
    },
}

/// Where and as what this host runs its part of a cluster.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// The address other nodes reach this one at [default: the address of the interface of
    /// the default route].
    #[arg(long)]
    pub advertise_addr: Option<Ipv4Addr>,
    /// Where a manager here listens (host[:port]) [default: 0.0.0.0:4242].
    #[arg(long)]
    pub listen_addr: Option<String>,
    /// The node's id and hostname in the cluster [default: the host's name].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Where this host keeps its cluster state, certificates and logs.
    #[arg(long, env = "SWARMNET_DATA_DIR", default_value = crate::cluster::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// cgroup2 directory for this node's tasks [default: netd's, <cgroup2>/swarmnet/<node>].
    #[arg(long)]
    pub cgroup_dir: Option<PathBuf>,
}

impl HostArgs {
    pub fn options(&self) -> crate::cluster::HostOptions {
        crate::cluster::HostOptions {
            data_dir: self.data_dir.clone(),
            advertise_addr: self.advertise_addr,
            listen_addr: self.listen_addr.clone(),
            hostname: self.hostname.clone(),
            cgroup_dir: self.cgroup_dir.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ClusterInit {
    #[command(flatten)]
    pub host: HostArgs,
    /// Name of the CLI context written for this cluster (made current).
    #[arg(long, default_value = "default")]
    pub context_name: String,
}

#[derive(Debug, Args)]
pub struct ClusterJoin {
    #[command(flatten)]
    pub host: HostArgs,
    /// A worker or manager join token (`swarmnet cluster join-token worker|manager`).
    #[arg(long, env = "SWARMNET_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// A manager's address, host[:port] (port 4242 when absent).
    pub manager: String,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Lists nodes with address and manager status.
    Ls,
    /// Changes a node's availability or labels.
    Update(NodeUpdate),
    /// Makes a worker a manager.
    Promote { node: String },
    /// Makes a manager a worker.
    Demote { node: String },
    /// Removes a node from the cluster.
    Rm {
        node: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct NodeUpdate {
    #[arg(long, value_parser = ["active", "pause", "drain"])]
    pub availability: Option<String>,
    /// K=V; repeatable.
    #[arg(long = "label-add", value_parser = parse_kv)]
    pub label_add: Vec<(String, String)>,
    /// K; repeatable.
    #[arg(long = "label-rm")]
    pub label_rm: Vec<String>,
    pub node: String,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Creates an overlay network.
    Create(NetworkCreate),
    /// Lists networks with subnet, VNI and address pool usage.
    Ls,
    /// Removes a network no service uses.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct NetworkCreate {
    /// CIDR; carved from the cluster's pool when absent.
    #[arg(long)]
    pub subnet: Option<ipnet::Ipv4Net>,
    #[arg(long)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// No traffic leaves the network (and no DNS forwarding).
    #[arg(long)]
    pub internal: bool,
    #[arg(long)]
    pub attachable: bool,
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Creates a service and (unless --detach) waits, showing progress, until its tasks run.
    Create(ServiceCreate),
    /// Lists services with running/desired replicas and published ports.
    Ls,
    /// The tasks of a service.
    Ps { name: String },
    /// NAME=N; several at once.
    Scale {
        #[arg(required = true, value_parser = parse_scale)]
        targets: Vec<(String, u32)>,
        #[arg(long)]
        detach: bool,
    },
    /// Changes a service; a change beyond the replica count rolls its tasks.
    Update(ServiceUpdate),
    /// Removes a service and its tasks.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct ServiceUpdate {
    pub name: String,
    #[arg(long)]
    pub replicas: Option<u32>,
    /// K=V; repeatable.
    #[arg(long = "env-add", value_parser = parse_kv)]
    pub env_add: Vec<(String, String)>,
    /// K; repeatable.
    #[arg(long = "env-rm")]
    pub env_rm: Vec<String>,
    #[arg(long = "constraint-add", value_parser = parse_constraint)]
    pub constraint_add: Vec<String>,
    #[arg(long = "constraint-rm")]
    pub constraint_rm: Vec<String>,
    #[arg(long = "publish-add", value_parser = parse_publish)]
    pub publish_add: Vec<Publish>,
    /// PUBLISHED port to stop publishing; repeatable.
    #[arg(long = "publish-rm")]
    pub publish_rm: Vec<u16>,
    /// Tasks replaced at once during the rolling update.
    #[arg(long)]
    pub update_parallelism: Option<u32>,
    #[command(flatten)]
    pub health: Box<HealthFlags>,
    #[command(flatten)]
    pub restart: RestartFlags,
    /// Remove the service's health check.
    #[arg(long = "no-healthcheck", conflicts_with = "health_cmd")]
    pub no_healthcheck: bool,
    /// Return once the manager accepted the change.
    #[arg(long)]
    pub detach: bool,
    /// The new command, if it changes.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServiceCreate {
    #[arg(long)]
    pub name: String,
    #[arg(long, conflicts_with = "mode")]
    pub replicas: Option<u32>,
    #[arg(long, value_parser = ["replicated", "global"])]
    pub mode: Option<String>,
    /// NET[,alias=A]...; repeatable.
    #[arg(long = "network", value_parser = parse_network)]
    pub networks: Vec<NetworkAttach>,
    /// [mode=host,]PUBLISHED:TARGET[/udp]; repeatable.
    #[arg(long = "publish", short = 'p', value_parser = parse_publish)]
    pub publish: Vec<Publish>,
    #[arg(long, value_parser = ["vip", "dnsrr"])]
    pub endpoint_mode: Option<String>,
    /// node.hostname==H, node.role==R, node.labels.K==V, node.id==I (or !=); repeatable.
    #[arg(long = "constraint", value_parser = parse_constraint)]
    pub constraints: Vec<String>,
    /// K=V; repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    #[command(flatten)]
    pub health: Box<HealthFlags>,
    #[command(flatten)]
    pub restart: RestartFlags,
    /// Return once the manager accepted the service, without waiting for tasks.
    #[arg(long)]
    pub detach: bool,
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// What happens when a task's process ends (Docker's flags and words).
#[derive(Debug, Clone, Default, Args)]
pub struct RestartFlags {
    /// Replace a task that ended: any (also after a clean exit), on-failure, none [default: any].
    #[arg(long = "restart-condition", value_parser = ["any", "on-failure", "none"])]
    pub restart_condition: Option<String>,
    /// Time between a task ending and its replacement, e.g. 0s, 5s, 1m [default: 5s].
    #[arg(long = "restart-delay", value_parser = parse_duration)]
    pub restart_delay: Option<String>,
}

impl RestartFlags {
    /// The restart policy word the managers take.
    pub fn policy(&self) -> Option<&'static str> {
        self.restart_condition.as_deref().map(|c| match c {
            "on-failure" => "on_failure",
            "none" => "never",
            _ => "always",
        })
    }
}

/// A health check run in each task's network and mount namespaces; a task is a backend and a
/// DNS answer only while it passes, and an unhealthy task is replaced.
#[derive(Debug, Clone, Default, Args)]
pub struct HealthFlags {
    /// Shell command (`/bin/sh -c CMD`); exit 0 is healthy.
    #[arg(long = "health-cmd")]
    pub health_cmd: Option<String>,
    /// Time between checks, e.g. 500ms, 5s, 1m30s [default: 30s].
    #[arg(long = "health-interval", value_parser = parse_duration)]
    pub health_interval: Option<String>,
    /// A check still running after this fails (and is killed) [default: 30s].
    #[arg(long = "health-timeout", value_parser = parse_duration)]
    pub health_timeout: Option<String>,
    /// Failures in a row that make a task unhealthy, at least 1 [default: 3].
    #[arg(long = "health-retries", value_parser = parse_retries)]
    pub health_retries: Option<u32>,
    /// Failures during this time after the task starts do not count [default: 0s].
    #[arg(long = "health-start-period", value_parser = parse_duration)]
    pub health_start_period: Option<String>,
}

impl HealthFlags {
    pub fn any(&self) -> bool {
        self.health_cmd.is_some()
            || self.health_interval.is_some()
            || self.health_timeout.is_some()
            || self.health_retries.is_some()
            || self.health_start_period.is_some()
    }
}

/// A duration as the intent file writes it (500ms, 5s, 1m30s), normalized.
pub fn parse_duration(s: &str) -> Result<String, String> {
    s.parse::<swarmnet_model::HumanDuration>()
        .map(|d| d.to_string())
        .map_err(|e| e.to_string())
}

pub fn parse_retries(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1 (failures in a row that make a task unhealthy)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number of at least 1: {e}")),
    }
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Runs CMD inside a task's network and mount namespaces (its resolv.conf).
    Exec {
        /// `<service>.<slot>` or a task id.
        task: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[arg(value_enum)]
    pub kind: InspectKind,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InspectKind {
    Node,
    Network,
    Service,
    Task,
}

// ------------------------------------------------------------------------- value parsers

/// `--network NET[,alias=A]...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttach {
    pub network: String,
    pub aliases: Vec<String>,
}

/// `--publish [mode=host|ingress,][policy=local|cluster,]PUBLISHED:TARGET[/udp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub published: u16,
    pub target: u16,
    /// "tcp" | "udp".
    pub protocol: String,
    /// "ingress" | "host".
    pub mode: String,
    /// "cluster" | "local" (ingress mode only: only the tasks on the node the client reached
    /// serve, and they see the client's own address).
    pub policy: String,
}

pub fn parse_lab_name(s: &str) -> Result<String, String> {
    // It becomes part of namespace names (`<name>-n12`) and interface-free paths.
    if s.is_empty()
        || s.len() > 12
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err("1 to 12 lower-case letters or digits".into());
    }
    if s == "contexts" {
        return Err("\"contexts\" is where contexts are kept; pick another name".into());
    }
    Ok(s.to_owned())
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

pub fn parse_scale(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .ok_or_else(|| format!("expected SERVICE=REPLICAS, got {s:?}"))?;
    let n = n
        .parse()
        .map_err(|e| format!("replicas in {s:?} must be a number: {e}"))?;
    Ok((name.to_owned(), n))
}

pub fn parse_network(s: &str) -> Result<NetworkAttach, String> {
    let mut parts = s.split(',');
    let network = parts.next().unwrap_or_default();
    if network.is_empty() {
        return Err(format!("expected NET[,alias=A], got {s:?}"));
    }
    let mut aliases = Vec::new();
    for p in parts {
        match p.split_once('=') {
            Some(("alias", a)) if !a.is_empty() => aliases.push(a.to_owned()),
            _ => return Err(format!("unknown network option {p:?} (only alias=A)")),
        }
    }
    Ok(NetworkAttach {
        network: network.to_owned(),
        aliases,
    })
}

pub fn parse_publish(s: &str) -> Result<Publish, String> {
    let syntax = "expected [mode=host|ingress,][policy=local|cluster,]PUBLISHED:TARGET[/udp], \
                  e.g. 8080:80";
    let (mut mode, mut policy) = ("ingress", "cluster");
    let mut rest = s;
    while let Some((opt, tail)) = rest.split_once(',') {
        match opt.split_once('=') {
            Some(("mode", m @ ("host" | "ingress"))) => mode = m,
            Some(("policy", p @ ("local" | "cluster"))) => policy = p,
            _ => return Err(format!("{s:?}: unknown option {opt:?}; {syntax}")),
        }
        rest = tail;
    }
    if mode == "host" && policy == "local" {
        return Err(format!(
            "{s:?}: policy=local applies to ingress mode (mode=host always serves from the \
             local task only)"
        ));
    }
    let (ports, protocol) = match rest.split_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some((_, other)) => return Err(format!("{s:?}: protocol {other:?} is not tcp or udp")),
        None => (rest, "tcp"),
    };
    let (published, target) = ports
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: {syntax}"))?;
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{s:?}: {p:?} is not a port (1-65535)")),
        }
    };
    Ok(Publish {
        published: port(published)?,
        target: port(target)?,
        protocol: protocol.to_owned(),
        mode: mode.to_owned(),
        policy: policy.to_owned(),
    })
}

pub fn parse_constraint(s: &str) -> Result<String, String> {
    let (key, value) = s
        .split_once("==")
        .or_else(|| s.split_once("!="))
        .ok_or_else(|| format!("{s:?}: expected KEY==VALUE or KEY!=VALUE"))?;
    let known = matches!(key.trim(), "node.id" | "node.hostname" | "node.role")
        || key
            .trim()
            .strip_prefix("node.labels.")
            .is_some_and(|k| !k.is_empty());
    if !known {
        return Err(format!(
            "{s:?}: unknown key {key:?} (node.id, node.hostname, node.role, node.labels.K)"
        ));
    }
    if value.trim().is_empty() {
        return Err(format!("{s:?}: empty value"));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
