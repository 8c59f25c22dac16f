//! openraft's network over gRPC: each Raft RPC is one unary call of the internal `Raft` service
//! carrying openraft's own request and `Result<response, RaftError>` as JSON.
//!
//! Every connection is mTLS: the manager presents its own certificate and trusts only the
//! cluster CA (peers' certificates must carry the manager role, see `ca::authorize`).
//!
//! Connections are lazy (tonic channels), so a manager that is down costs a failed connect per
//! RPC, reported to openraft as `Unreachable` (it backs off) rather than as a hang.

use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

use swarmnet_pki::rustls::ClientConfig;
use tonic::transport::Channel;

use super::{ManagerId, TypeConfig};
use crate::pb;
use crate::pb::raft_client::RaftClient;

/// How long to wait for a connection to another manager before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Opens a lazy mTLS channel to a manager's gRPC address (`host:port`).
pub fn channel(addr: &str, tls: &Arc<ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    swarmnet_pki::net::channel(addr, tls.clone(), CONNECT_TIMEOUT)
}

/// Makes one client per peer.
#[derive(Debug, Clone)]
pub struct Network {
    pub tls: Arc<ClientConfig>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: ManagerId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: channel(&node.addr, &self.tls).ok().map(RaftClient::new),
            addr: node.addr.clone(),
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct Peer {
    target: ManagerId,
    addr: String,
    client: Option<RaftClient<Channel>>,
}

/// Why a call to a peer failed before it produced an answer.
#[derive(Debug, thiserror::Error)]
#[error("manager {target} at {addr}: {message}")]
struct CallError {
    target: ManagerId,
    addr: String,
    message: String,
}

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<ManagerId, BasicNode, RaftError<ManagerId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let err = |message: String| CallError {
            target: self.target,
            addr: self.addr.clone(),
            message,
        };
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&err(
                "invalid address".into(),
            ))));
        };
        let mut request = tonic::Request::new(pb::Json {
            data: serde_json::to_vec(req).expect("raft messages serialize"),
        });
        request.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::Append => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = err(format!("{}: {}", status.code(), status.message()));
                // A refused or reset connection: the peer is down; openraft backs off.
                return Err(match status.code() {
                    tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&e)),
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let result: Result<Resp, RaftError<ManagerId, E>> = serde_json::from_slice(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Debug, Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<ManagerId>,
        RPCError<ManagerId, BasicNode, RaftError<ManagerId>>,
    > {
        self.call(Method::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<ManagerId>,
        RPCError<ManagerId, BasicNode, RaftError<ManagerId, InstallSnapshotError>>,
    > {
        self.call(Method::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ManagerId>,
        option: RPCOption,
    ) -> Result<VoteResponse<ManagerId>, RPCError<ManagerId, BasicNode, RaftError<ManagerId>>> {
        self.call(Method::Vote, &rpc, &option).await
    }
}
