//! The managers' gRPC API (the orchestrator's `proto/swarmnet.proto`, its generated client types)
//! with failover, and the conversions from its messages to the CLI's views.
//!
//! Connections: a context names each manager by `addr` and, for a lab, the network namespace to
//! reach it from. The lab's managers listen on underlay addresses that exist only inside the lab,
//! so the TCP connection is made by a short-lived thread that entered that namespace (namespaces
//! are per thread: the socket keeps the namespace it was created in, and the thread that entered
//! it dies right after, so no other work ever runs there); the socket is then handed to tokio.
//! Nothing is added to the root namespace.
//!
//! Failover: [`Managers::call`] tries the managers in order, starting with the last one that
//! answered; a manager that cannot be connected to, or answers UNAVAILABLE or times out, is
//! skipped; any other refusal is final ([`CliError::Refused`]). A write retried on a second manager
//! after the first one committed it but died before answering comes back as ALREADY_EXISTS (or
//! is a no-op for idempotent updates), never as a double effect.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use swarmnet_api as pb;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::context::ManagerEndpoint;
use crate::error::{CliError, RefusalKind, Result};
use crate::render::{
    ClusterView, ManagerView, NetworkView, NodeView, PortView, ServiceView, TaskView,
};

/// How long to wait for a TCP connection to one manager.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one call may take (writes wait for a quorum: the managers give up after 3 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` from inside the network namespace at `netns` (see the module docs).
async fn connect_in_netns(netns: PathBuf, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let std_stream = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> io::Result<std::net::TcpStream> {
            let ns = std::fs::File::open(&netns)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", netns.display())))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("setns {}: {e}", netns.display())))?;
            let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .join()
        .map_err(|_panic| io::Error::other("the connecting thread panicked"))?
    })
    .await
    .map_err(io::Error::other)??;
    tokio::net::TcpStream::from_std(std_stream)
}

/// The mTLS client configuration of an endpoint (its `tls_dir`).
fn tls_of(
    ep: &ManagerEndpoint,
) -> Result<std::sync::Arc<swarmnet_pki::rustls::ClientConfig>, String> {
    let dir = ep.tls_dir.as_ref().ok_or_else(|| {
        format!(
            "the context names no client certificate for {} (tls_dir); the managers accept only mTLS",
            ep.addr
        )
    })?;
    let material = swarmnet_pki::store::load(dir)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no client certificate in {}", dir.display()))?;
    let creds = swarmnet_pki::tls::Credentials::new(material).map_err(|e| e.to_string())?;
    swarmnet_pki::tls::client_config(creds).map_err(|e| e.to_string())
}

/// A channel to one manager, over mTLS.
pub async fn connect(ep: &ManagerEndpoint) -> Result<Channel, String> {
    let addr: SocketAddr = ep
        .addr
        .parse()
        .map_err(|e| format!("{:?} is not host:port: {e}", ep.addr))?;
    let tls = tls_of(ep)?;
    // The scheme stays http: the connector does TLS itself.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let netns = ep.netns.clone();
    let res = endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let ns = netns.clone();
            let tls = tls.clone();
            async move {
                let tcp = match ns {
                    Some(ns) => connect_in_netns(ns, addr).await?,
                    None => {
                        let s = tokio::time::timeout(
                            CONNECT_TIMEOUT,
                            tokio::net::TcpStream::connect(addr),
                        )
                        .await
                        .map_err(|_elapsed| {
                            io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}"))
                        })??;
                        s.set_nodelay(true)?;
                        s
                    }
                };
                swarmnet_pki::net::tls_connect(tls, tcp).await
            }
        }))
        .await;
    res.map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    })
}

fn refusal(s: &Status) -> RefusalKind {
    match s.code() {
        Code::NotFound => RefusalKind::NotFound,
        Code::AlreadyExists => RefusalKind::AlreadyExists,
        Code::InvalidArgument => RefusalKind::InvalidArgument,
        Code::FailedPrecondition => RefusalKind::FailedPrecondition,
        _ => RefusalKind::Other,
    }
}

/// Whether another manager may answer where this one did not.
fn worth_failover(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// The managers of a context, with failover.
#[derive(Debug)]
pub struct Managers {
    endpoints: Vec<ManagerEndpoint>,
    /// Index of the manager that answered last: tried first.
    preferred: usize,
    channels: Vec<Option<Channel>>,
}

impl Managers {
    pub fn new(endpoints: Vec<ManagerEndpoint>) -> Self {
        let n = endpoints.len();
        Self {
            endpoints,
            preferred: 0,
            channels: vec![None; n],
        }
    }

    /// Renews the administrator certificate of the context when it is past half its life,
    /// as netd renews a node's: through any manager that answers, written back where the
    /// context keeps it (every endpoint naming that directory uses the new one). Answers what
    /// happened, for a line on stderr; `None` when nothing was due. A failure is not an error
    /// of the command: the old certificate still works until it expires, and the next command
    /// tries again.
    pub async fn renew_admin_if_due(&mut self, now: std::time::SystemTime) -> Option<String> {
        let dir = self.endpoints.iter().find_map(|e| e.tls_dir.clone())?;
        let material = swarmnet_pki::store::load(&dir).ok()??;
        let info = swarmnet_pki::ca::identity_of_pem(&material.cert_pem).ok()?;
        if info.identity.role != swarmnet_pki::Role::Admin
            || now < swarmnet_pki::ca::renew_at(info.not_before, info.not_after)
        {
            return None;
        }
        let addr = self
            .endpoints
            .first()
            .map(|e| e.addr.clone())
            .unwrap_or_default();
        let renewed = self
            .call(|ch| {
                let material = material.clone();
                let addr = addr.clone();
                async move {
                    swarmnet_pki::join::renew(ch, &addr, &material, CALL_TIMEOUT)
                        .await
                        .map(tonic::Response::new)
                        .map_err(|e| Status::unavailable(e.to_string()))
                }
            })
            .await;
        let expires = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        Some(match renewed {
            Ok(m) => match swarmnet_pki::store::save(&dir, &m) {
                Ok(()) => {
                    // Connections made with the old certificate stay valid; new ones use
                    // the new one.
                    self.channels.iter_mut().for_each(|c| *c = None);
                    let until = swarmnet_pki::ca::identity_of_pem(&m.cert_pem)
                        .map(|i| crate::render::utc(expires(i.not_after)))
                        .unwrap_or_default();
                    format!(
                        "renewed the administrator certificate in {} (valid until {until})",
                        dir.display()
                    )
                }
                Err(e) => format!("cannot write the renewed administrator certificate: {e}"),
            },
            Err(e) => format!(
                "the administrator certificate (valid until {}) is due for renewal and was not \
                 renewed: {e}",
                crate::render::utc(expires(info.not_after))
            ),
        })
    }

    /// The namespace the last answering manager was reached from (for probing its peers).
    pub fn netns(&self) -> Option<&Path> {
        self.endpoints
            .get(self.preferred)
            .and_then(|e| e.netns.as_deref())
    }

    /// Runs `f` on the first manager that answers.
    pub async fn call<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.endpoints.len();
        let mut failures = Vec::new();
        for k in 0..n {
            let i = (self.preferred + k) % n;
            let ep = self.endpoints[i].clone();
            let ch = match self.channels[i].clone() {
                Some(c) => c,
                None => match connect(&ep).await {
                    Ok(c) => {
                        self.channels[i] = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        failures.push(format!("{} ({}): {e}", ep.node, ep.addr));
                        continue;
                    }
                },
            };
            match f(ch).await {
                Ok(r) => {
                    self.preferred = i;
                    return Ok(r.into_inner());
                }
                Err(s) if worth_failover(&s) => {
                    self.channels[i] = None;
                    failures.push(format!("{} ({}): {}", ep.node, ep.addr, s.message()));
                }
                Err(s) => {
                    return Err(CliError::Refused {
                        code: refusal(&s),
                        message: if s.message().is_empty() {
                            // e.g. UNIMPLEMENTED from a manager older than this CLI.
                            format!("{} answered {:?}", ep.node, s.code())
                        } else {
                            s.message().to_owned()
                        },
                    });
                }
            }
        }
        if n == 0 {
            return Err(CliError::NoContext {
                why: "the context names no manager".into(),
            });
        }
        Err(CliError::Unavailable {
            tried: self
                .endpoints
                .iter()
                .map(|e| e.node.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            last: failures.join("; "),
        })
    }

    /// Every manager's status as seen from here: the leader, or whether it answers at all.
    /// The cluster's id, Raft position and managers, from the first manager that answers.
    pub async fn info(&mut self) -> Result<pb::ClusterInfo> {
        self.call(|ch| async move {
            pb::cluster_client::ClusterClient::new(ch)
                .info(pb::Empty {})
                .await
        })
        .await
    }

    /// Whether the Raft group lists manager `id` as a voter.
    pub async fn votes(&mut self, id: u64) -> Result<bool> {
        Ok(self
            .info()
            .await?
            .managers
            .iter()
            .any(|m| m.id == id && m.voter))
    }

    pub async fn cluster(&mut self) -> Result<ClusterView> {
        let info = self.info().await?;
        let netns = self.netns().map(Path::to_path_buf);
        let tls_dir = self
            .endpoints
            .get(self.preferred)
            .and_then(|e| e.tls_dir.clone());
        let mut managers = Vec::new();
        for m in &info.managers {
            let ep = ManagerEndpoint {
                node: m.id.to_string(),
                addr: m.addr.clone(),
                netns: netns.clone(),
                tls_dir: tls_dir.clone(),
            };
            let answered = match connect(&ep).await {
                Ok(ch) => pb::cluster_client::ClusterClient::new(ch)
                    .info(pb::Empty {})
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            managers.push(ManagerView {
                id: m.id,
                addr: m.addr.clone(),
                voter: m.voter,
                status: manager_status(answered, m.id == info.leader),
            });
        }
        Ok(ClusterView {
            cluster_id: info.cluster_id,
            leader: info.leader,
            term: info.term,
            index: info.index,
            managers,
            gossip_keys: info
                .gossip_keys
                .iter()
                .map(|k| crate::render::GossipKeyView {
                    id: format!("{:016x}", k.id),
                    primary: k.primary,
                    created_ms: k.created_ms,
                })
                .collect(),
            gossip_rotation: info.gossip_rotation.clone(),
        })
    }
}

/// "leader" | "reachable" | "unreachable".
pub fn manager_status(answered: bool, is_leader: bool) -> String {
    match (answered, is_leader) {
        (false, _) => "unreachable",
        (true, true) => "leader",
        (true, false) => "reachable",
    }
    .into()
}

// ------------------------------------------------------------------------------ conversions

/// A node, with its manager status looked up by underlay address in `cluster`.
pub fn node_view(n: pb::Node, cluster: &ClusterView) -> NodeView {
    let manager_status = cluster
        .managers
        .iter()
        .find(|m| m.addr.rsplit_once(':').map(|(h, _)| h) == Some(n.addr.as_str()))
        .map(|m| m.status.clone())
        .unwrap_or_default();
    NodeView {
        id: n.id,
        hostname: n.hostname,
        addr: n.addr,
        role: n.role,
        availability: n.availability,
        status: n.status,
        manager_status,
        labels: n.labels.into_iter().collect(),
    }
}

pub fn network_view(n: pb::Network) -> NetworkView {
    NetworkView {
        name: n.name,
        subnet: n.subnet,
        gateway: n.gateway,
        vni: n.vni,
        mtu: n.mtu,
        internal: n.internal,
        attachable: n.attachable,
        ingress: n.ingress,
        addresses_in_use: n.addresses_in_use,
        addresses_total: n.addresses_total,
    }
}

pub fn service_view(s: pb::Service) -> ServiceView {
    let spec = s.spec.unwrap_or_default();
    ServiceView {
        mode: if spec.mode.is_empty() {
            "replicated".into()
        } else {
            spec.mode
        },
        replicas_running: s.tasks_running,
        replicas_desired: s.tasks_desired,
        endpoint_mode: if spec.endpoint_mode.is_empty() {
            "vip".into()
        } else {
            spec.endpoint_mode
        },
        ports: spec
            .ports
            .into_iter()
            .map(|p| PortView {
                target: p.target,
                published: p.published,
                protocol: if p.protocol.is_empty() {
                    "tcp".into()
                } else {
                    p.protocol
                },
                mode: if p.publish_mode.is_empty() {
                    "ingress".into()
                } else {
                    p.publish_mode
                },
                traffic_policy: if p.traffic_policy == "local" {
                    p.traffic_policy
                } else {
                    String::new()
                },
            })
            .collect(),
        vips: s.vips.into_iter().collect(),
        networks: spec.networks.into_iter().map(|n| n.network).collect(),
        argv: spec.argv,
        name: spec.name,
        update_state: s.update_state,
        update_message: s.update_message,
    }
}

pub fn task_view(t: pb::Task) -> TaskView {
    TaskView {
        name: format!("{}.{}", t.service, t.slot),
        addresses: t
            .addresses
            .into_iter()
            .map(|a| (a.network, a.ip))
            .collect::<BTreeMap<_, _>>(),
        id: t.id,
        service: t.service,
        slot: t.slot,
        node: t.node,
        state: t.state,
        desired_state: if t.desired_state.is_empty() {
            "running".into()
        } else {
            t.desired_state
        },
        health: t.health,
        message: t.message,
    }
}
