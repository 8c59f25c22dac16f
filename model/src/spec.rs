//! The cluster intent file format (JSON). Every struct refuses unknown fields, so a typo is an
//! error that names the field rather than a setting silently ignored. See `docs/intent-format.md`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::types::{HumanDuration, IfName, MacAddr, Mtu, Name, NodeId, TaskId, Vni};

/// The whole cluster's intent: what should exist, as the orchestrator (or an operator writing
/// the file by hand) declares it. Nodes project their own share of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Format version; only 1 exists.
    pub version: u32,
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: NodeId,
    /// Defaults to the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Underlay (advertise) address: VXLAN traffic to this node goes here, and leaves it from here.
    pub addr: Ipv4Addr,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub role: NodeRole,
    #[serde(default)]
    pub availability: Availability,
    /// Underlay interface; when absent, the interface holding `addr` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_interface: Option<IfName>,
    /// The node's address on the ingress network (its ingress sandbox, through which published
    /// ports reach the routing mesh). Required on every node when an ingress network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Manager,
    #[default]
    Worker,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    #[default]
    Active,
    Pause,
    Drain,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Stable identifier; defaults to the name. Kernel objects are keyed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Name>,
    pub name: Name,
    pub subnet: Ipv4Net,
    /// Defaults to the first host address of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    pub vni: Vni,
    /// Overrides the MTU derived from the underlay (underlay MTU − 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<Mtu>,
    /// No traffic leaves the overlay: no gateway bridge, no DNS forwarding.
    #[serde(default)]
    pub internal: bool,
    /// Containers not started by the orchestrator may attach.
    #[serde(default)]
    pub attachable: bool,
    /// The routing-mesh network; at most one.
    #[serde(default)]
    pub ingress: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Stable identifier; defaults to the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Name>,
    pub name: Name,
    #[serde(default)]
    pub mode: ServiceMode,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub networks: Vec<ServiceNetwork>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Client-IP session affinity of the service's VIP.
    #[serde(default)]
    pub affinity: Affinity,
    /// A command run inside each task's sandbox: a task is a backend and a DNS answer only
    /// while it passes. Without one, a task counts as healthy once its process runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

/// A service's health check (Docker's `HEALTHCHECK`): `cmd` runs in the task's network and
/// mount namespaces every `interval`; exit 0 passes. A check that runs longer than `timeout`
/// is killed and fails. `retries` consecutive failures make the task unhealthy; failures
/// during `start_period` do not count, and the first pass ends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// argv; `["/bin/sh", "-c", "..."]` for a shell command.
    pub cmd: Vec<String>,
    #[serde(default = "HealthCheck::default_interval")]
    pub interval: HumanDuration,
    #[serde(default = "HealthCheck::default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default = "HealthCheck::default_retries")]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "HumanDuration::is_zero")]
    pub start_period: HumanDuration,
}

impl HealthCheck {
    /// Docker's defaults: every 30 s, 30 s to answer, unhealthy after 3 failures in a row.
    pub const DEFAULT_INTERVAL: HumanDuration = HumanDuration::from_millis(30_000);
    pub const DEFAULT_TIMEOUT: HumanDuration = HumanDuration::from_millis(30_000);
    pub const DEFAULT_RETRIES: u32 = 3;
    /// The shortest interval and timeout accepted: a check is a process start each time.
    pub const MIN_PERIOD: HumanDuration = HumanDuration::from_millis(10);

    fn default_interval() -> HumanDuration {
        Self::DEFAULT_INTERVAL
    }
    fn default_timeout() -> HumanDuration {
        Self::DEFAULT_TIMEOUT
    }
    fn default_retries() -> u32 {
        Self::DEFAULT_RETRIES
    }

    /// Every problem of this check, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.cmd.is_empty() || self.cmd[0].is_empty() {
            out.push(("cmd", "must name a program to run".to_string()));
        }
        for (field, d) in [("interval", self.interval), ("timeout", self.timeout)] {
            if d < Self::MIN_PERIOD {
                out.push((
                    field,
                    format!("{d} is too short; the minimum is {}", Self::MIN_PERIOD),
                ));
            }
        }
        if self.retries == 0 {
            out.push((
                "retries",
                "must be at least 1 (the number of failures in a row that make a task unhealthy)"
                    .to_string(),
            ));
        }
        out
    }
}

/// A task's health as netd observes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// It has a check that has not passed yet.
    Starting,
    Healthy,
    Unhealthy,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "starting" => Some(Self::Starting),
            "healthy" => Some(Self::Healthy),
            "unhealthy" => Some(Self::Unhealthy),
            _ => None,
        }
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// Every new connection picks a backend at random.
    #[default]
    None,
    /// New connections from one client address go to one backend (while the set of healthy
    /// backends is unchanged).
    ClientIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceMode {
    Replicated { replicas: u32 },
    Global,
}

impl Default for ServiceMode {
    fn default() -> Self {
        Self::Replicated { replicas: 1 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointMode {
    /// One virtual IP per network, load-balanced to the tasks.
    #[default]
    Vip,
    /// DNS round robin: the name resolves to the task addresses.
    Dnsrr,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Restart whenever the process exits.
    #[default]
    Always,
    /// Restart only after a non-zero exit or a signal.
    OnFailure,
    /// Never restart.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// Routing mesh: the port answers on every node.
    #[default]
    Ingress,
    /// The port answers only on nodes running a task, straight to that task.
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Used for SRV records `_<name>._<proto>.<service>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    pub target: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
    #[serde(default)]
    pub publish_mode: PublishMode,
    /// Which tasks serve an ingress-published port (Kubernetes' `externalTrafficPolicy`).
    #[serde(default, skip_serializing_if = "TrafficPolicy::is_cluster")]
    pub traffic_policy: TrafficPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficPolicy {
    /// Every healthy task on every node, through the routing mesh; the task sees the entry
    /// node's ingress address as the client.
    #[default]
    Cluster,
    /// Only the tasks on the node the client reached; the task sees the client's own address,
    /// and a node without a local task refuses at once.
    Local,
}

impl TrafficPolicy {
    pub fn is_cluster(&self) -> bool {
        *self == Self::Cluster
    }
}

/// Ports a node's own cluster traffic uses by default: publishing them would capture that
/// traffic (a published 4789/udp would swallow every VXLAN packet sent to the node).
pub const RESERVED_PORTS: &[(u16, Protocol, &str)] = &[
    (2377, Protocol::Tcp, "the orchestrator's cluster API"),
    (4789, Protocol::Udp, "VXLAN, the overlay data path"),
    (7946, Protocol::Tcp, "gossip"),
    (7946, Protocol::Udp, "gossip"),
];

/// Why `port/proto` cannot be published, when it is reserved.
pub fn reserved_port(port: u16, proto: Protocol) -> Option<&'static str> {
    RESERVED_PORTS
        .iter()
        .find(|(p, pr, _)| *p == port && *pr == proto)
        .map(|(_, _, why)| *why)
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceNetwork {
    /// Network name.
    pub network: Name,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Name>,
    /// The service's virtual IP on this network (endpoint mode vip), allocated by the orchestrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub id: TaskId,
    /// Service name.
    pub service: Name,
    #[serde(default)]
    pub slot: u32,
    pub node: NodeId,
    #[serde(default)]
    pub networks: Vec<TaskAttachment>,
    /// The command to run inside the sandbox. Empty with `runtime: external`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub desired_state: DesiredState,
    #[serde(default)]
    pub runtime: TaskRuntime,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    #[default]
    Running,
    /// Placed and being set up: its node creates the sandbox and starts the task, but no node
    /// balances to it or answers for it yet. The orchestrator makes it `running` once its node
    /// reports it running, so a new task never gets connections before its process exists.
    Starting,
    /// Leaving (the first phase of a two-phase removal): the task keeps running on its node so
    /// connections already open to it finish, but it is no longer a load-balancer backend, a
    /// DNS answer or a published-port target on any node. The orchestrator stops it (removes
    /// it from the intent) after a grace period.
    Draining,
    Shutdown,
}

impl DesiredState {
    /// Whether the task's sandbox and process exist on its node (starting, running or
    /// draining). Only a running task is an endpoint (LB backend, DNS answer).
    pub fn keeps_sandbox(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Draining)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskRuntime {
    /// netd creates the sandbox and runs `argv` in it.
    #[default]
    Netd,
    /// A container runtime owns the sandbox and attaches it through netd's local API.
    External,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskAttachment {
    /// Network name.
    pub network: Name,
    pub ip: Ipv4Addr,
    /// Defaults to `02:42` followed by the IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Name>,
    /// Interface name inside the sandbox; defaults to `eth<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<IfName>,
}
