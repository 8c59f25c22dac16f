//! The gRPC server: the services of `proto/swarmnet.proto` over one [`Manager`]. Conversions
//! between wire messages and state types live here; every rule lives in the state machine.
//!
//! Every connection is TLS (`swarmnet_pki::net::incoming`); every call passes
//! [`crate::ca::AuthLayer`] (authorization by the caller's certificate) first.
//!
//! [`serve`] takes the listener and a shutdown future (tests run managers on ephemeral
//! loopback ports and stop them at will).

// tonic's Status is the error type of every handler; boxing it in the helpers would only move
// the allocation.
#![expect(
    clippy::result_large_err,
    reason = "tonic::Status is the handlers' error type"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use swarmnet_model::spec::{NodeRole, ServiceMode};
use swarmnet_model::{IfName, Mtu, Name, NodeId, TaskId};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::dispatch::{AssignmentStream, Feed};
use crate::ipam::PoolConfig;
use crate::pb;
use crate::raft::manager::{Forwarded, Manager, WriteError, hex};
use crate::state::{
    self, ClusterState, Command, CommandError, GossipKey, JoinTokens, NetworkConfig, NodeJoin,
    Publish, ServiceDef, TaskState,
};

type Result<T> = std::result::Result<Response<T>, Status>;

/// Serves every API of `manager` on `listener` until `shutdown` completes.
pub async fn serve(
    manager: Arc<Manager>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::result::Result<(), tonic::transport::Error> {
    let m = manager;
    let incoming = swarmnet_pki::net::incoming(listener, m.tls.server.clone());
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(crate::ca::AuthLayer(m.clone()))
        .add_service(pb::ca_server::CaServer::new(crate::ca::CaApi(m.clone())))
        .add_service(pb::raft_server::RaftServer::new(RaftApi(m.clone())))
        .add_service(pb::cluster_server::ClusterServer::new(ClusterApi(
            m.clone(),
        )))
        .add_service(pb::nodes_server::NodesServer::new(NodesApi(m.clone())))
        .add_service(pb::networks_server::NetworksServer::new(NetworksApi(
            m.clone(),
        )))
        .add_service(pb::services_server::ServicesServer::new(ServicesApi(
            m.clone(),
        )))
        .add_service(pb::dispatcher_server::DispatcherServer::new(DispatcherApi(
            m.clone(),
            Feed::spawn(m.state.clone(), m.stopped()),
        )))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

// ------------------------------------------------------------------------------ conversions

fn status_of(e: WriteError) -> Status {
    match e {
        WriteError::NoQuorum(_) => Status::unavailable(e.to_string()),
        WriteError::Raft(_) => Status::internal(e.to_string()),
        WriteError::Refused(c) => {
            let msg = c.to_string();
            match c {
                CommandError::NotFound { .. } => Status::not_found(msg),
                CommandError::Exists { .. } | CommandError::AlreadyInitialized { .. } => {
                    Status::already_exists(msg)
                }
                CommandError::Invalid { .. } => Status::invalid_argument(msg),
                _ => Status::failed_precondition(msg),
            }
        }
    }
}

fn bad(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

/// Parses one of the snake_case enumeration words; `None` when empty.
fn word<T: DeserializeOwned>(field: &str, s: &str) -> std::result::Result<Option<T>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map(Some)
        .map_err(|e| bad(field, e))
}

fn word_or_default<T: DeserializeOwned + Default>(
    field: &str,
    s: &str,
) -> std::result::Result<T, Status> {
    Ok(word(field, s)?.unwrap_or_default())
}

fn name_of<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn parse<T: std::str::FromStr>(field: &str, s: &str) -> std::result::Result<T, Status>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| bad(field, e))
}

fn opt<T: std::str::FromStr>(field: &str, s: &str) -> std::result::Result<Option<T>, Status>
where
    T::Err: std::fmt::Display,
{
    if s.is_empty() {
        Ok(None)
    } else {
        parse(field, s).map(Some)
    }
}

fn join_of(r: &pb::JoinNodeRequest) -> std::result::Result<NodeJoin, Status> {
    let id: NodeId = parse("id", &r.id)?;
    Ok(NodeJoin {
        hostname: if r.hostname.is_empty() {
            id.to_string()
        } else {
            r.hostname.clone()
        },
        id,
        addr: parse("addr", &r.addr)?,
        role: word_or_default::<NodeRole>("role", &r.role)?,
        labels: r.labels.clone().into_iter().collect(),
        data_interface: opt::<IfName>("data_interface", &r.data_interface)?,
    })
}

fn node_msg(n: &state::Node) -> pb::Node {
    pb::Node {
        id: n.id.to_string(),
        hostname: n.hostname.clone(),
        addr: n.addr.to_string(),
        role: name_of(&n.role),
        labels: n.labels.clone().into_iter().collect(),
        availability: name_of(&n.availability),
        status: name_of(&n.status),
        ingress_ip: n.ingress_ip.map(|i| i.to_string()).unwrap_or_default(),
        data_interface: n
            .data_interface
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
    }
}

fn network_msg(n: &state::Network) -> pb::Network {
    pb::Network {
        name: n.name.to_string(),
        subnet: n.subnet.to_string(),
        gateway: n.gateway.to_string(),
        vni: n.vni.get(),
        mtu: n.mtu.map(|m| u32::from(m.get())).unwrap_or(0),
        internal: n.internal,
        attachable: n.attachable,
        ingress: n.ingress,
        addresses_in_use: n.addresses.in_use() as u32,
        addresses_total: n.addresses.capacity(),
    }
}

fn def_of(s: &pb::ServiceSpec) -> std::result::Result<ServiceDef, Status> {
    let mode = match s.mode.as_str() {
        "" | "replicated" => ServiceMode::Replicated {
            replicas: s.replicas,
        },
        "global" => ServiceMode::Global,
        other => {
            return Err(bad(
                "mode",
                format!("{other:?}; expected \"replicated\" or \"global\""),
            ));
        }
    };
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = |x: &str| format!("ports[{i}].{x}");
            let publish = match p.publish.as_str() {
                "" | "no" => Publish::No,
                "auto" => Publish::Auto,
                n => Publish::Port(parse(&f("publish"), n)?),
            };
            Ok(state::PortConfig {
                name: opt(&f("name"), &p.name)?,
                protocol: word(&f("protocol"), &p.protocol)?
                    .unwrap_or(swarmnet_model::spec::Protocol::Tcp),
                target: u16::try_from(p.target).map_err(|e| bad(&f("target"), e))?,
                publish,
                publish_mode: word_or_default(&f("publish_mode"), &p.publish_mode)?,
                traffic_policy: word_or_default(&f("traffic_policy"), &p.traffic_policy)?,
            })
        })
        .collect::<std::result::Result<Vec<_>, Status>>()?;
    let networks = s
        .networks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Ok(state::ServiceNetworkConfig {
                network: parse(&format!("networks[{i}].network"), &n.network)?,
                aliases: n
                    .aliases
                    .iter()
                    .map(|a| parse::<Name>(&format!("networks[{i}].aliases"), a))
                    .collect::<std::result::Result<_, _>>()?,
            })
        })
        .collect::<std::result::Result<Vec<_>, Status>>()?;
    let update = s.update.clone().unwrap_or_default();
    let health = health_of(s.health.as_ref())?;
    Ok(ServiceDef {
        name: parse("name", &s.name)?,
        mode,
        endpoint_mode: word_or_default("endpoint_mode", &s.endpoint_mode)?,
        ports,
        networks,
        restart: word_or_default("restart", &s.restart)?,
        restart_delay_ms: if s.restart_delay.is_empty() {
            state::DEFAULT_RESTART_DELAY_MS
        } else {
            let d: swarmnet_model::HumanDuration = parse("restart_delay", &s.restart_delay)?;
            u64::try_from(d.get().as_millis()).unwrap_or(u64::MAX)
        },
        affinity: word_or_default("affinity", &s.affinity)?,
        task: state::TaskTemplate {
            argv: s.argv.clone(),
            env: s.env.clone().into_iter().collect(),
            runtime: word_or_default("runtime", &s.runtime)?,
        },
        constraints: s
            .constraints
            .iter()
            .map(|c| parse("constraints", c))
            .collect::<std::result::Result<_, _>>()?,
        update: state::UpdateConfig {
            parallelism: update.parallelism,
            delay_ms: update.delay_ms,
            failure_action: word_or_default("update.failure_action", &update.failure_action)?,
        },
        health: health.map(Box::new),
    })
}

/// The service's health check from the wire: durations as in the intent file, defaults for
/// what is unset, every problem refused with the field named.
fn health_of(
    h: Option<&pb::HealthConfig>,
) -> std::result::Result<Option<swarmnet_model::spec::HealthCheck>, Status> {
    use swarmnet_model::spec::HealthCheck;
    let Some(h) = h else { return Ok(None) };
    if h.cmd.is_empty() {
        if *h == pb::HealthConfig::default() {
            return Ok(None);
        }
        return Err(bad(
            "health.cmd",
            "settings without a command; give the check's command (swarmnet: --health-cmd)",
        ));
    }
    let dur = |field: &str, v: &str, default| -> std::result::Result<_, Status> {
        if v.is_empty() {
            Ok(default)
        } else {
            parse(&format!("health.{field}"), v)
        }
    };
    let check = HealthCheck {
        cmd: h.cmd.clone(),
        interval: dur("interval", &h.interval, HealthCheck::DEFAULT_INTERVAL)?,
        timeout: dur("timeout", &h.timeout, HealthCheck::DEFAULT_TIMEOUT)?,
        retries: h.retries.unwrap_or(HealthCheck::DEFAULT_RETRIES),
        start_period: dur("start_period", &h.start_period, Default::default())?,
    };
    if let Some((field, why)) = check.problems().into_iter().next() {
        return Err(bad(&format!("health.{field}"), why));
    }
    Ok(Some(check))
}

fn health_msg(h: &swarmnet_model::spec::HealthCheck) -> pb::HealthConfig {
    pb::HealthConfig {
        cmd: h.cmd.clone(),
        interval: h.interval.to_string(),
        timeout: h.timeout.to_string(),
        retries: Some(h.retries),
        start_period: h.start_period.to_string(),
    }
}

fn service_msg(st: &ClusterState, s: &state::Service) -> pb::Service {
    let d = &s.def;
    let (mode, replicas) = match d.mode {
        ServiceMode::Replicated { replicas } => ("replicated", replicas),
        ServiceMode::Global => ("global", 0),
    };
    let tasks: Vec<&state::Task> = st.tasks.values().filter(|t| t.service == d.name).collect();
    pb::Service {
        spec: Some(pb::ServiceSpec {
            name: d.name.to_string(),
            mode: mode.into(),
            replicas,
            endpoint_mode: name_of(&d.endpoint_mode),
            ports: d
                .ports
                .iter()
                .zip(&s.ports)
                .map(|(p, r)| pb::Port {
                    name: p.name.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                    protocol: name_of(&p.protocol),
                    target: u32::from(p.target),
                    publish: match p.publish {
                        Publish::No => "no".into(),
                        Publish::Auto => "auto".into(),
                        Publish::Port(n) => n.to_string(),
                    },
                    publish_mode: name_of(&p.publish_mode),
                    published: r.published.map(u32::from).unwrap_or(0),
                    traffic_policy: name_of(&p.traffic_policy),
                })
                .collect(),
            networks: d
                .networks
                .iter()
                .map(|n| pb::ServiceNetwork {
                    network: n.network.to_string(),
                    aliases: n.aliases.iter().map(|a| a.to_string()).collect(),
                })
                .collect(),
            restart: name_of(&d.restart),
            restart_delay: swarmnet_model::HumanDuration::from_millis(d.restart_delay_ms)
                .to_string(),
            affinity: name_of(&d.affinity),
            argv: d.task.argv.clone(),
            env: d.task.env.clone().into_iter().collect(),
            runtime: name_of(&d.task.runtime),
            constraints: d.constraints.iter().map(|c| c.to_string()).collect(),
            update: Some(pb::UpdateConfig {
                parallelism: d.update.parallelism,
                delay_ms: d.update.delay_ms,
                failure_action: name_of(&d.update.failure_action),
            }),
            health: d.health.as_deref().map(health_msg),
        }),
        version: s.version,
        vips: s
            .vips
            .iter()
            .map(|(n, ip)| (n.to_string(), ip.to_string()))
            .collect(),
        update_state: s
            .update
            .as_ref()
            .map(|u| name_of(&u.state))
            .unwrap_or_default(),
        update_message: s
            .update
            .as_ref()
            .map(|u| u.message.clone())
            .unwrap_or_default(),
        // Draining tasks are leaving: they count neither as running nor as desired.
        tasks_running: tasks
            .iter()
            .filter(|t| t.is_active() && t.status.state == TaskState::Running)
            .count() as u32,
        tasks_desired: match d.mode {
            ServiceMode::Replicated { replicas } => replicas,
            ServiceMode::Global => tasks.iter().filter(|t| t.is_active()).count() as u32,
        },
    }
}

fn task_msg(t: &state::Task) -> pb::Task {
    task_msg_as(t, "running")
}

/// A task as `ps` shows it; `desired` is `shutdown` for a replaced task from the history.
fn task_msg_as(t: &state::Task, desired: &str) -> pb::Task {
    pb::Task {
        health: t.health.map(|h| h.to_string()).unwrap_or_default(),
        desired_state: desired.into(),
        id: t.id.to_string(),
        service: t.service.to_string(),
        slot: t.slot,
        node: t.node.as_ref().map(|n| n.to_string()).unwrap_or_default(),
        // A draining task is shown as such: it is leaving (no traffic), then stops.
        state: if t.draining {
            "draining".into()
        } else {
            name_of(&t.status.state)
        },
        message: t.status.message.clone(),
        version: t.version,
        addresses: t
            .networks
            .iter()
            .filter_map(|a| {
                a.ip.map(|ip| pb::TaskAddress {
                    network: a.network.to_string(),
                    ip: ip.to_string(),
                })
            })
            .collect(),
    }
}

fn cluster_info(m: &Manager) -> pb::ClusterInfo {
    let metrics = m.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let (cluster_id, index, gossip_keys, gossip_rotation) = m.state.read(|a| {
        let primary = a.state.primary_gossip_key().map(|k| k.id);
        (
            a.state
                .cluster
                .as_ref()
                .map(|c| c.id.clone())
                .unwrap_or_default(),
            a.last_applied.map(|l| l.index).unwrap_or(0),
            a.state
                .keyring
                .iter()
                .map(|k| pb::GossipKeyInfo {
                    id: k.id,
                    primary: Some(k.id) == primary,
                    created_ms: k.created_ms,
                })
                .collect(),
            a.state.gossip_rotation().word().to_string(),
        )
    });
    pb::ClusterInfo {
        cluster_id,
        leader: metrics.current_leader.unwrap_or(0),
        term: metrics.current_term,
        index,
        managers: membership
            .nodes()
            .map(|(id, n)| pb::Manager {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect(),
        self_id: m.id,
        gossip_keys,
        gossip_rotation,
    }
}

/// 32 random bytes from the kernel (for gossip keys and cluster ids).
fn random_bytes() -> std::result::Result<[u8; 32], Status> {
    crate::raft::manager::random_bytes().map_err(|e| Status::internal(e.to_string()))
}

fn new_gossip_key() -> std::result::Result<GossipKey, Status> {
    crate::raft::manager::new_gossip_key().map_err(|e| Status::internal(e.to_string()))
}

// ------------------------------------------------------------------------------ services

#[derive(Debug)]
pub struct RaftApi(Arc<Manager>);

fn json_reply<T: Serialize>(v: &T) -> Result<pb::Json> {
    Ok(Response::new(pb::Json {
        data: serde_json::to_vec(v).expect("serializes"),
    }))
}

fn json_req<T: DeserializeOwned>(r: Request<pb::Json>) -> std::result::Result<T, Status> {
    serde_json::from_slice(&r.into_inner().data).map_err(|e| bad("body", e))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftApi {
    async fn append_entries(&self, r: Request<pb::Json>) -> Result<pb::Json> {
        let req = json_req(r)?;
        json_reply(&self.0.raft.append_entries(req).await)
    }
    async fn vote(&self, r: Request<pb::Json>) -> Result<pb::Json> {
        let req = json_req(r)?;
        json_reply(&self.0.raft.vote(req).await)
    }
    async fn install_snapshot(&self, r: Request<pb::Json>) -> Result<pb::Json> {
        let req = json_req(r)?;
        json_reply(&self.0.raft.install_snapshot(req).await)
    }
    async fn forward(&self, r: Request<pb::Json>) -> Result<pb::Json> {
        let req: Forwarded = json_req(r)?;
        json_reply(&self.0.handle_forward(req).await)
    }
}

#[derive(Debug)]
pub struct ClusterApi(Arc<Manager>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterApi {
    async fn init(&self, r: Request<pb::InitRequest>) -> Result<pb::ClusterInfo> {
        let r = r.into_inner();
        let node = join_of(&r.node.unwrap_or_default())?;
        let mut pool = PoolConfig::default();
        if !r.pool.is_empty() {
            pool.base = parse("pool", &r.pool)?;
        }
        if r.pool_size != 0 {
            pool.size = u8::try_from(r.pool_size).map_err(|e| bad("pool_size", e))?;
        }
        let cluster_id = if r.cluster_id.is_empty() {
            hex(&random_bytes()?[..12])
        } else {
            r.cluster_id
        };
        self.0.bootstrap().await.map_err(status_of)?;
        // The CA first: the tokens pin it.
        crate::ca::install_root_ca(&self.0).await?;
        let tokens = JoinTokens {
            worker: crate::ca::new_token(&self.0)?,
            manager: crate::ca::new_token(&self.0)?,
        };
        self.0
            .write(Command::Init {
                cluster_id,
                pool,
                tokens,
                ingress_subnet: opt("ingress_subnet", &r.ingress_subnet)?,
                node,
            })
            .await
            .map_err(status_of)?;
        // The cluster's first gossip key.
        self.0
            .write(Command::RotateGossipKey(new_gossip_key()?))
            .await
            .map_err(status_of)?;
        Ok(Response::new(cluster_info(&self.0)))
    }

    async fn info(&self, _: Request<pb::Empty>) -> Result<pb::ClusterInfo> {
        Ok(Response::new(cluster_info(&self.0)))
    }

    async fn join_node(&self, r: Request<pb::JoinNodeRequest>) -> Result<pb::Node> {
        let caller = crate::ca::identity(&r);
        let r = r.into_inner();
        let role = match caller {
            // A node's certificate (issued for a token) decides its role and its id.
            Some(who) if who.role != swarmnet_pki::Role::Admin && who.id == r.id => {
                if who.role == swarmnet_pki::Role::Manager {
                    NodeRole::Manager
                } else {
                    NodeRole::Worker
                }
            }
            Some(who) if who.role == swarmnet_pki::Role::Worker => {
                return Err(Status::permission_denied(format!(
                    "the certificate of {:?} cannot join node {:?}",
                    who.id, r.id
                )));
            }
            // An administrator or a manager joins a node on its behalf with a token.
            _ => self
                .0
                .state
                .read(|a| a.state.cluster.as_ref().map(|c| c.tokens.role_of(&r.token)))
                .ok_or_else(|| Status::failed_precondition("the cluster is not initialized yet"))?
                .ok_or_else(|| {
                    Status::permission_denied(
                        "invalid join token: ask a manager for `swarmnet cluster join-token worker`",
                    )
                })?,
        };
        let mut join = join_of(&r)?;
        // The token, not the request, decides the role.
        join.role = role;
        let id = join.id.clone();
        self.0
            .write(Command::JoinNode(join))
            .await
            .map_err(status_of)?;
        node_reply(&self.0, &id)
    }

    async fn add_manager(&self, r: Request<pb::AddManagerRequest>) -> Result<pb::ClusterInfo> {
        let r = r.into_inner();
        self.0.add_manager(r.id, r.addr).await.map_err(status_of)?;
        Ok(Response::new(cluster_info(&self.0)))
    }

    async fn remove_manager(
        &self,
        r: Request<pb::RemoveManagerRequest>,
    ) -> Result<pb::ClusterInfo> {
        self.0
            .remove_manager(r.into_inner().id)
            .await
            .map_err(status_of)?;
        Ok(Response::new(cluster_info(&self.0)))
    }

    async fn join_tokens(&self, _: Request<pb::Empty>) -> Result<pb::JoinTokensResponse> {
        tokens_reply(&self.0)
    }

    async fn rotate_join_token(
        &self,
        r: Request<pb::RotateJoinTokenRequest>,
    ) -> Result<pb::JoinTokensResponse> {
        let role: NodeRole =
            word("role", &r.into_inner().role)?.ok_or_else(|| bad("role", "required"))?;
        if self.0.state.read(|a| a.state.cluster.is_none()) {
            return Err(Status::failed_precondition(
                "the cluster is not initialized yet",
            ));
        }
        self.0
            .write(Command::RotateJoinToken {
                role,
                token: crate::ca::new_token(&self.0)?,
            })
            .await
            .map_err(status_of)?;
        tokens_reply(&self.0)
    }

    /// Starts a rotation (step 1); the leader completes it as the nodes confirm.
    async fn rotate_gossip_key(&self, _: Request<pb::Empty>) -> Result<pb::ClusterInfo> {
        self.0
            .write(Command::RotateGossipKey(new_gossip_key()?))
            .await
            .map_err(status_of)?;
        Ok(Response::new(cluster_info(&self.0)))
    }
}

fn tokens_reply(m: &Manager) -> Result<pb::JoinTokensResponse> {
    m.state
        .read(|a| {
            a.state.cluster.as_ref().map(|c| pb::JoinTokensResponse {
                worker: c.tokens.worker.clone(),
                manager: c.tokens.manager.clone(),
            })
        })
        .map(Response::new)
        .ok_or_else(|| Status::failed_precondition("the cluster is not initialized yet"))
}

fn node_reply(m: &Manager, id: &NodeId) -> Result<pb::Node> {
    m.state
        .read(|a| a.state.nodes.get(id).map(node_msg))
        .map(Response::new)
        .ok_or_else(|| Status::not_found(format!("no node named {:?}", id.as_str())))
}

#[derive(Debug)]
pub struct NodesApi(Arc<Manager>);

#[tonic::async_trait]
impl pb::nodes_server::Nodes for NodesApi {
    async fn list(&self, _: Request<pb::Empty>) -> Result<pb::NodeList> {
        Ok(Response::new(pb::NodeList {
            nodes: self
                .0
                .state
                .read(|a| a.state.nodes.values().map(node_msg).collect()),
        }))
    }

    async fn inspect(&self, r: Request<pb::NodeRef>) -> Result<pb::Node> {
        node_reply(&self.0, &parse("id", &r.into_inner().id)?)
    }

    async fn update(&self, r: Request<pb::UpdateNodeRequest>) -> Result<pb::Node> {
        let r = r.into_inner();
        let id: NodeId = parse("id", &r.id)?;
        self.0
            .write(Command::UpdateNode {
                id: id.clone(),
                labels: r
                    .set_labels
                    .then(|| r.labels.into_iter().collect::<BTreeMap<_, _>>()),
                availability: word("availability", &r.availability)?,
            })
            .await
            .map_err(status_of)?;
        node_reply(&self.0, &id)
    }

    async fn promote(&self, r: Request<pb::NodeRef>) -> Result<pb::Node> {
        let id: NodeId = parse("id", &r.into_inner().id)?;
        self.0
            .write(Command::SetNodeRole {
                id: id.clone(),
                role: NodeRole::Manager,
            })
            .await
            .map_err(status_of)?;
        node_reply(&self.0, &id)
    }

    async fn demote(&self, r: Request<pb::NodeRef>) -> Result<pb::Node> {
        let id: NodeId = parse("id", &r.into_inner().id)?;
        self.0
            .write(Command::SetNodeRole {
                id: id.clone(),
                role: NodeRole::Worker,
            })
            .await
            .map_err(status_of)?;
        node_reply(&self.0, &id)
    }

    async fn remove(&self, r: Request<pb::RemoveNodeRequest>) -> Result<pb::Empty> {
        let r = r.into_inner();
        self.0
            .write(Command::RemoveNode {
                id: parse("id", &r.id)?,
                force: r.force,
            })
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }
}

#[derive(Debug)]
pub struct NetworksApi(Arc<Manager>);

fn network_reply(m: &Manager, name: &Name) -> Result<pb::Network> {
    m.state
        .read(|a| a.state.networks.get(name).map(network_msg))
        .map(Response::new)
        .ok_or_else(|| Status::not_found(format!("no network named {:?}", name.as_str())))
}

#[tonic::async_trait]
impl pb::networks_server::Networks for NetworksApi {
    async fn create(&self, r: Request<pb::NetworkCreate>) -> Result<pb::Network> {
        let r = r.into_inner();
        let name: Name = parse("name", &r.name)?;
        let mtu = if r.mtu == 0 {
            None
        } else {
            Some(Mtu::new(r.mtu).map_err(|e| bad("mtu", e))?)
        };
        self.0
            .write(Command::CreateNetwork(NetworkConfig {
                name: Some(name.clone()),
                subnet: opt("subnet", &r.subnet)?,
                gateway: opt::<Ipv4Addr>("gateway", &r.gateway)?,
                mtu,
                internal: r.internal,
                attachable: r.attachable,
            }))
            .await
            .map_err(status_of)?;
        network_reply(&self.0, &name)
    }

    async fn list(&self, _: Request<pb::Empty>) -> Result<pb::NetworkList> {
        Ok(Response::new(pb::NetworkList {
            networks: self
                .0
                .state
                .read(|a| a.state.networks.values().map(network_msg).collect()),
        }))
    }

    async fn inspect(&self, r: Request<pb::NameRef>) -> Result<pb::Network> {
        network_reply(&self.0, &parse("name", &r.into_inner().name)?)
    }

    async fn remove(&self, r: Request<pb::NameRef>) -> Result<pb::Empty> {
        self.0
            .write(Command::RemoveNetwork {
                name: parse("name", &r.into_inner().name)?,
            })
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }
}

#[derive(Debug)]
pub struct ServicesApi(Arc<Manager>);

fn service_reply(m: &Manager, name: &Name) -> Result<pb::Service> {
    m.state
        .read(|a| a.state.services.get(name).map(|s| service_msg(&a.state, s)))
        .map(Response::new)
        .ok_or_else(|| Status::not_found(format!("no service named {:?}", name.as_str())))
}

#[tonic::async_trait]
impl pb::services_server::Services for ServicesApi {
    async fn create(&self, r: Request<pb::ServiceSpec>) -> Result<pb::Service> {
        let def = def_of(&r.into_inner())?;
        let name = def.name.clone();
        self.0
            .write(Command::CreateService(def))
            .await
            .map_err(status_of)?;
        service_reply(&self.0, &name)
    }

    async fn update(&self, r: Request<pb::ServiceSpec>) -> Result<pb::Service> {
        let def = def_of(&r.into_inner())?;
        let name = def.name.clone();
        self.0
            .write(Command::UpdateService(def))
            .await
            .map_err(status_of)?;
        service_reply(&self.0, &name)
    }

    async fn scale(&self, r: Request<pb::ScaleRequest>) -> Result<pb::Service> {
        let r = r.into_inner();
        let name: Name = parse("name", &r.name)?;
        self.0
            .write(Command::ScaleService {
                name: name.clone(),
                replicas: r.replicas,
            })
            .await
            .map_err(status_of)?;
        service_reply(&self.0, &name)
    }

    async fn remove(&self, r: Request<pb::NameRef>) -> Result<pb::Empty> {
        self.0
            .write(Command::RemoveService {
                name: parse("name", &r.into_inner().name)?,
            })
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn inspect(&self, r: Request<pb::NameRef>) -> Result<pb::Service> {
        service_reply(&self.0, &parse("name", &r.into_inner().name)?)
    }

    async fn list(&self, _: Request<pb::Empty>) -> Result<pb::ServiceList> {
        Ok(Response::new(pb::ServiceList {
            services: self.0.state.read(|a| {
                a.state
                    .services
                    .values()
                    .map(|s| service_msg(&a.state, s))
                    .collect()
            }),
        }))
    }

    async fn ps(&self, r: Request<pb::NameRef>) -> Result<pb::TaskList> {
        let name = r.into_inner().name;
        let tasks = self.0.state.read(|a| {
            if !name.is_empty() && !a.state.services.keys().any(|s| s.as_str() == name) {
                return None;
            }
            Some(
                a.state
                    .tasks
                    .values()
                    .filter(|t| name.is_empty() || t.service.as_str() == name)
                    .map(|t| {
                        let mut m = task_msg(t);
                        // An ended task waiting for its replacement says so.
                        if let Some(delay) = a.state.restart_due(&t.id) {
                            let d = swarmnet_model::HumanDuration::from_millis(delay);
                            m.message = if m.message.is_empty() {
                                format!("replaced after the {d} restart delay")
                            } else {
                                format!("{}; replaced after the {d} restart delay", m.message)
                            };
                        }
                        m
                    })
                    .chain(
                        a.state
                            .history
                            .iter()
                            .filter(|(s, _)| name.is_empty() || s.as_str() == name)
                            .flat_map(|(_, h)| h.iter().rev())
                            .map(|t| task_msg_as(t, "shutdown")),
                    )
                    .collect(),
            )
        });
        tasks
            .map(|tasks| Response::new(pb::TaskList { tasks }))
            .ok_or_else(|| Status::not_found(format!("no service named {name:?}")))
    }
}

/// The node-facing API: the assignment streams (see [`crate::dispatch`]), task reports and
/// heartbeats.
#[derive(Debug)]
pub struct DispatcherApi(Arc<Manager>, Arc<Feed>);

#[tonic::async_trait]
impl pb::dispatcher_server::Dispatcher for DispatcherApi {
    type AssignmentsStream = AssignmentStream;

    async fn assignments(
        &self,
        r: Request<pb::AssignmentsRequest>,
    ) -> Result<Self::AssignmentsStream> {
        crate::ca::check_node(&r, &r.get_ref().node_id)?;
        let node: NodeId = parse("node_id", &r.into_inner().node_id)?;
        if !self.0.state.read(|a| a.state.nodes.contains_key(&node)) {
            return Err(Status::not_found(format!(
                "node {:?} has not joined the cluster",
                node.as_str()
            )));
        }
        Ok(Response::new(self.1.subscribe(self.0.stopped())))
    }

    async fn report_task(&self, r: Request<pb::TaskReport>) -> Result<pb::Empty> {
        crate::ca::check_node(&r, &r.get_ref().node_id)?;
        let r = r.into_inner();
        let state: TaskState = word("state", &r.state)?.ok_or_else(|| bad("state", "required"))?;
        let node = parse("node_id", &r.node_id)?;
        let task = parse::<TaskId>("task_id", &r.task_id)?;
        let health = if r.health.is_empty() {
            None
        } else {
            Some(
                swarmnet_model::spec::HealthStatus::parse(&r.health)
                    .ok_or_else(|| bad("health", "expected starting, healthy or unhealthy"))?,
            )
        };
        let cmd = Command::ReportTask {
            node,
            task,
            state,
            message: r.message,
            health,
        };
        self.0.write(cmd).await.map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn leave(&self, r: Request<pb::LeaveRequest>) -> Result<pb::Empty> {
        crate::ca::check_node(&r, &r.get_ref().node_id)?;
        let id: NodeId = parse("node_id", &r.into_inner().node_id)?;
        self.0
            .write(Command::RemoveNode { id, force: true })
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Result<pb::HeartbeatResponse> {
        crate::ca::check_node(&r, &r.get_ref().node_id)?;
        let r = r.into_inner();
        let node: NodeId = parse("node_id", &r.node_id)?;
        let gossip = r.gossip.map(|g| crate::state::KeyAck {
            accepted: g.accepted,
            sealing: g.sealing,
        });
        self.0.heartbeat(node, gossip).await.map_err(status_of)?;
        let managers = self
            .0
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect();
        Ok(Response::new(pb::HeartbeatResponse {
            period_ms: self.0.config.node_heartbeat_period.as_millis() as u64,
            managers,
        }))
    }
}
