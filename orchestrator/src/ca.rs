//! The managers' side of the cluster PKI: their own credentials, the `Ca` service (join with a
//! token, renew), the authorization of every call by the caller's certificate, and the
//! renewal of a manager's own certificate.
//!
//! Key material on a manager (`<data-dir>`, see `swarmnet-orchestrator --help`):
//! - `tls/node.key`, `tls/node.crt`, `tls/ca.crt`: the manager's own key and certificate
//!   (OU `swarm-manager`), files 0600 in a 0700 directory;
//! - `tls/ca.key` + `tls/ca.pem`: the root CA, only on the manager that created the cluster and
//!   only until `Cluster.Init` has committed it to the Raft state (then the files are removed);
//! - `manager.redb` (0600): the Raft log and state, which hold the root CA's key from then on,
//!   on managers only (assignments sent to nodes never contain it);
//! - `tls/admin/`: the first administrator certificate (OU `swarm-admin`), written at bootstrap
//!   for the operator's CLI (`swarmnet cluster init` and `lab up` copy it into a context).
//!
//! Authorization ([`authorize`], pure): `Ca.IssueNodeCertificate` is open (the token is the
//! credential); every other call needs a certificate of the cluster CA; `Raft` is for
//! managers only; the Dispatcher, `Cluster.JoinNode` and renewal are for every node; the
//! rest of the control API is for managers and administrators.

// tonic::Status is the error of every handler and of the helpers they call.
#![expect(
    clippy::result_large_err,
    reason = "tonic::Status is the handlers' error type"
)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use swarmnet_model::spec::NodeRole;
use swarmnet_pki::ca::{NodeMaterial, RootCa, renew_at};
use swarmnet_pki::net::{Peer, peer};
use swarmnet_pki::tls::Credentials;
use swarmnet_pki::{Identity, PkiError, Role, store};
use tonic::{Request, Response, Status};

use crate::pb;
use crate::raft::manager::Manager;
use crate::state::Command;

/// Default lifetime of the administrator certificate written at bootstrap (the CLI renews it
/// at half its life, as netd renews a node's).
pub const ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The TLS state of one manager.
#[derive(Debug, Clone)]
pub struct ManagerTls {
    pub credentials: Arc<Credentials>,
    pub client: Arc<swarmnet_pki::rustls::ClientConfig>,
    pub server: Arc<swarmnet_pki::rustls::ServerConfig>,
}

impl ManagerTls {
    pub fn new(credentials: Arc<Credentials>) -> Result<Self, PkiError> {
        Ok(Self {
            client: swarmnet_pki::tls::client_config(credentials.clone())?,
            server: swarmnet_pki::tls::server_config(credentials.clone())?,
            credentials,
        })
    }
}

/// Why a manager could not get its credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Join(#[from] swarmnet_pki::join::JoinError),
    #[error(
        "the token given is a {role} token; a manager joins with the manager token (swarmnet cluster join-token manager)"
    )]
    NotManagerToken { role: Role },
    #[error(
        "{dir} holds no certificate: start the first manager with --bootstrap, the others with --join ADDR --join-token TOKEN"
    )]
    None { dir: String },
}

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The administrator material written at bootstrap.
pub fn admin_dir(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("admin")
}

fn pending_ca_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let d = tls_dir(data_dir);
    (d.join("ca.pem"), d.join("ca.key"))
}

/// An mTLS client configuration with the material stored in `dir` (for example
/// [`admin_dir`]).
pub fn client_config_from(
    dir: &Path,
) -> Result<Arc<swarmnet_pki::rustls::ClientConfig>, CredentialsError> {
    let m = store::load(dir)?.ok_or_else(|| CredentialsError::None {
        dir: dir.display().to_string(),
    })?;
    Ok(swarmnet_pki::tls::client_config(Credentials::new(m)?)?)
}

/// The stored credentials, if any.
pub fn stored(data_dir: &Path) -> Result<Option<Arc<Credentials>>, PkiError> {
    store::load(&tls_dir(data_dir))?
        .map(Credentials::new)
        .transpose()
}

/// The first manager: a new root CA, this manager's certificate (CN `name`) and an
/// administrator certificate, unless they exist already (a restart).
pub fn bootstrap(
    data_dir: &Path,
    name: &str,
    lifetime: Duration,
) -> Result<Arc<Credentials>, PkiError> {
    bootstrap_with_admin(data_dir, name, lifetime, ADMIN_LIFETIME)
}

/// [`bootstrap`] with the administrator certificate's lifetime given (the CLI renews it at
/// half its life).
pub fn bootstrap_with_admin(
    data_dir: &Path,
    name: &str,
    lifetime: Duration,
    admin_lifetime: Duration,
) -> Result<Arc<Credentials>, PkiError> {
    if let Some(c) = stored(data_dir)? {
        return Ok(c);
    }
    let ca = RootCa::generate(name)?;
    let dir = tls_dir(data_dir);
    store::private_dir(&dir)?;
    let (cert, key) = pending_ca_paths(data_dir);
    store::write_private(&key, &ca.key_pem)?;
    store::write_private(&cert, &ca.cert_pem)?;
    store::save(
        &admin_dir(data_dir),
        &ca.issue_local("admin", Role::Admin, admin_lifetime)?,
    )?;
    let own = ca.issue_local(name, Role::Manager, lifetime)?;
    store::save(&dir, &own)?;
    Credentials::new(own)
}

/// A manager that joins: a certificate for the manager token from the manager at `seed`.
pub async fn join(
    data_dir: &Path,
    seed: &str,
    token: &str,
    name: &str,
) -> Result<Arc<Credentials>, CredentialsError> {
    if let Some(c) = stored(data_dir)? {
        return Ok(c);
    }
    let (material, role) =
        swarmnet_pki::join::request_certificate(seed, token, name, Duration::from_secs(5)).await?;
    if role != Role::Manager {
        return Err(CredentialsError::NotManagerToken { role });
    }
    store::save(&tls_dir(data_dir), &material)?;
    Ok(Credentials::new(material)?)
}

/// The stored credentials of a manager restarted without --bootstrap or --join.
pub fn existing(data_dir: &Path) -> Result<Arc<Credentials>, CredentialsError> {
    stored(data_dir)?.ok_or_else(|| CredentialsError::None {
        dir: tls_dir(data_dir).display().to_string(),
    })
}

/// The root CA made at bootstrap and not yet in the Raft state.
pub fn pending_root_ca(data_dir: &Path) -> Option<RootCa> {
    let (cert, key) = pending_ca_paths(data_dir);
    Some(RootCa {
        cert_pem: std::fs::read_to_string(cert).ok()?,
        key_pem: std::fs::read_to_string(key).ok()?,
    })
}

/// Commits the bootstrap CA to the Raft state (if it is not there), then removes the local
/// copy: from then on the key lives in the replicated state only.
pub async fn install_root_ca(m: &Manager) -> Result<(), Status> {
    if m.state.read(|a| a.state.root_ca.is_some()) {
        return Ok(());
    }
    let ca = pending_root_ca(&m.config.data_dir).ok_or_else(|| {
        Status::failed_precondition(
            "this manager holds no root CA: initialize the cluster on the manager started with --bootstrap",
        )
    })?;
    m.write(Command::SetRootCa(ca))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (cert, key) = pending_ca_paths(&m.config.data_dir);
    let _ = std::fs::remove_file(key);
    let _ = std::fs::remove_file(cert);
    Ok(())
}

/// The CA that signs: the replicated one, or before `Init` the bootstrap one.
fn signing_ca(m: &Manager) -> Option<RootCa> {
    m.state
        .read(|a| a.state.root_ca.clone())
        .or_else(|| pending_root_ca(&m.config.data_dir))
}

/// The digest of the cluster's CA (what join tokens pin).
pub fn ca_digest(m: &Manager) -> Result<String, Status> {
    signing_ca(m)
        .ok_or_else(|| Status::failed_precondition("the cluster has no root CA yet"))?
        .digest()
        .map_err(|e| Status::internal(e.to_string()))
}

/// A new join token pinning the cluster's CA.
pub fn new_token(m: &Manager) -> Result<String, Status> {
    swarmnet_pki::token::JoinToken::generate(&ca_digest(m)?)
        .map(|t| t.to_string())
        .map_err(|e| Status::internal(e.to_string()))
}

// ------------------------------------------------------------------------------ authorization

/// Whether `who` may call the gRPC method at `path` (`/swarmnet.v1.Service/Method`).
pub fn authorize(path: &str, who: Option<&Identity>) -> Result<(), Status> {
    if path == "/swarmnet.v1.Ca/IssueNodeCertificate" {
        return Ok(());
    }
    let Some(who) = who else {
        return Err(Status::unauthenticated(format!(
            "{path} needs a client certificate issued by the cluster CA: join with a token first (swarmnet cluster join), or use a context with the cluster's admin certificate"
        )));
    };
    let service = path
        .strip_prefix("/swarmnet.v1.")
        .and_then(|p| p.split('/').next())
        .unwrap_or("");
    let allowed: &[Role] = match (service, path) {
        ("Raft", _) => &[Role::Manager],
        // A node may read the cluster's id and managers (it learns the managers from its
        // heartbeats anyway).
        ("Dispatcher" | "Ca", _)
        | (_, "/swarmnet.v1.Cluster/JoinNode" | "/swarmnet.v1.Cluster/Info") => {
            &[Role::Manager, Role::Worker, Role::Admin]
        }
        _ => &[Role::Manager, Role::Admin],
    };
    if allowed.contains(&who.role) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "a {} certificate ({:?}) may not call {path}",
            who.role, who.id
        )))
    }
}

/// A node certificate (worker or manager node) may act only for the node it names.
pub fn check_node<T>(req: &Request<T>, node_id: &str) -> Result<(), Status> {
    match peer(req).and_then(|p| p.identity.as_ref()) {
        Some(i) if i.role == Role::Worker && i.id != node_id => {
            Err(Status::permission_denied(format!(
                "the certificate of {:?} cannot act for node {node_id:?}",
                i.id
            )))
        }
        _ => Ok(()),
    }
}

/// The caller's identity, when it presented a certificate.
pub fn identity<T>(req: &Request<T>) -> Option<Identity> {
    peer(req).and_then(|p| p.identity.clone())
}

/// The tower layer applying [`authorize`] to every call before it reaches a service, and
/// refusing certificates revoked by a node's removal (read from `manager`'s state per call).
#[derive(Debug, Clone)]
pub struct AuthLayer(pub Arc<Manager>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth(inner, self.0.clone())
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S>(S, Arc<Manager>);

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::BoxBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let who = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.identity.as_ref());
        let revoked = who.filter(|w| w.role != Role::Admin).and_then(|w| {
            self.1
                .state
                .read(|a| a.state.revoked(&w.id, w.epoch))
                .map(Status::unauthenticated)
        });
        match revoked.map_or_else(|| authorize(req.uri().path(), who), Err) {
            Ok(()) => Box::pin(self.0.call(req)),
            Err(status) => {
                tracing::info!(
                    path = req.uri().path(),
                    reason = status.message(),
                    "call refused"
                );
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

// ------------------------------------------------------------------------------ Ca service

#[derive(Debug)]
pub struct CaApi(pub Arc<Manager>);

fn role_word(r: Role) -> &'static str {
    match r {
        Role::Manager => "manager",
        _ => "worker",
    }
}

impl CaApi {
    fn sign(&self, csr: &[u8], id: &str, role: Role) -> Result<pb::IssuedCertificate, Status> {
        let ca = signing_ca(&self.0)
            .ok_or_else(|| Status::failed_precondition("the cluster is not initialized yet"))?;
        // Admin certificates are not node certificates: no node removal revokes them.
        let epoch = if role == Role::Admin {
            0
        } else {
            self.0.state.read(|a| a.state.cert_epoch)
        };
        let cert_pem = ca
            .issue_at_epoch(csr, id, role, self.0.config.cert_lifetime, epoch)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(pb::IssuedCertificate {
            cert_pem,
            ca_pem: ca.cert_pem,
            role: role_word(role).into(),
        })
    }
}

#[tonic::async_trait]
impl pb::ca_server::Ca for CaApi {
    async fn issue_node_certificate(
        &self,
        r: Request<pb::IssueRequest>,
    ) -> std::result::Result<Response<pb::IssuedCertificate>, Status> {
        let r = r.into_inner();
        let role = self
            .0
            .state
            .read(|a| a.state.cluster.as_ref().map(|c| c.tokens.role_of(&r.token)))
            .ok_or_else(|| Status::failed_precondition("the cluster is not initialized yet"))?
            .ok_or_else(|| {
                Status::permission_denied(
                    "invalid join token (wrong or rotated secret): ask a manager for `swarmnet cluster join-token worker|manager`",
                )
            })?;
        let id: swarmnet_model::NodeId = r
            .node_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("node_id: {e}")))?;
        let role = if role == NodeRole::Manager {
            Role::Manager
        } else {
            Role::Worker
        };
        tracing::info!(node = %id, %role, "issuing a node certificate for a join token");
        self.sign(&r.csr, id.as_str(), role).map(Response::new)
    }

    async fn renew_node_certificate(
        &self,
        r: Request<pb::RenewRequest>,
    ) -> std::result::Result<Response<pb::IssuedCertificate>, Status> {
        let who = identity(&r).ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        // A node's role follows the state (promote, demote); others keep theirs.
        let role = match who.role {
            Role::Admin => Role::Admin,
            held => self
                .0
                .state
                .read(|a| {
                    let id: swarmnet_model::NodeId = who.id.parse().ok()?;
                    a.state.nodes.get(&id).map(|n| n.role)
                })
                .map(|r| {
                    if r == NodeRole::Manager {
                        Role::Manager
                    } else {
                        Role::Worker
                    }
                })
                .unwrap_or(held),
        };
        let mut answer = self.sign(&r.into_inner().csr, &who.id, role)?;
        if role == Role::Admin {
            answer.role = "admin".into();
        }
        Ok(Response::new(answer))
    }
}

// ------------------------------------------------------------------------------ own renewal

/// When a certificate is due for renewal.
pub fn due(c: &Credentials) -> SystemTime {
    let info = c.info();
    renew_at(info.not_before, info.not_after)
}

/// Renews the manager's own certificate at half its life, signing it itself with the
/// cluster's CA (a manager holds it); new connections use the new one at once.
pub async fn renew_own(m: Arc<Manager>) {
    let mut stop = m.stopped();
    loop {
        let wait = due(&m.tls.credentials)
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            // Checked at least every minute: the clock may jump.
            .min(Duration::from_secs(60))
            .max(Duration::from_millis(200));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if SystemTime::now() < due(&m.tls.credentials) {
            continue;
        }
        let Some(ca) = signing_ca(&m) else {
            continue;
        };
        let id = m.tls.credentials.info().identity.id;
        let renewed: Result<NodeMaterial, PkiError> = ca
            .issue_local(&id, Role::Manager, m.config.cert_lifetime)
            .and_then(|mat| {
                m.tls.credentials.replace(mat.clone())?;
                store::save(&tls_dir(&m.config.data_dir), &mat)?;
                Ok(mat)
            });
        match renewed {
            Ok(_) => tracing::info!(manager = m.id, "renewed this manager's certificate"),
            Err(e) => {
                tracing::warn!(error = %e, "renewing this manager's certificate failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role) -> Identity {
        Identity {
            role,
            id: "n1".into(),
            epoch: 0,
        }
    }

    #[test]
    fn authorization_by_role() {
        let join = "/swarmnet.v1.Ca/IssueNodeCertificate";
        assert!(authorize(join, None).is_ok());
        for path in [
            "/swarmnet.v1.Nodes/List",
            "/swarmnet.v1.Dispatcher/Heartbeat",
            "/swarmnet.v1.Ca/RenewNodeCertificate",
            "/swarmnet.v1.Raft/Vote",
        ] {
            let e = authorize(path, None).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{path}");
            assert!(e.message().contains("client certificate"), "{e}");
        }
        let worker = who(Role::Worker);
        for ok in [
            "/swarmnet.v1.Dispatcher/Assignments",
            "/swarmnet.v1.Ca/RenewNodeCertificate",
            "/swarmnet.v1.Cluster/JoinNode",
            "/swarmnet.v1.Cluster/Info",
        ] {
            assert!(authorize(ok, Some(&worker)).is_ok(), "{ok}");
        }
        for refused in [
            "/swarmnet.v1.Raft/AppendEntries",
            "/swarmnet.v1.Services/Create",
            "/swarmnet.v1.Cluster/JoinTokens",
            "/swarmnet.v1.Cluster/RotateGossipKey",
            "/swarmnet.v1.Cluster/RemoveManager",
        ] {
            let e = authorize(refused, Some(&worker)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{refused}");
            assert!(e.message().contains("swarm-worker"), "{e}");
        }
        let admin = who(Role::Admin);
        assert!(authorize("/swarmnet.v1.Services/Create", Some(&admin)).is_ok());
        assert!(authorize("/swarmnet.v1.Raft/Vote", Some(&admin)).is_err());
        let manager = who(Role::Manager);
        assert!(authorize("/swarmnet.v1.Raft/Vote", Some(&manager)).is_ok());
        assert!(authorize("/swarmnet.v1.Cluster/RotateJoinToken", Some(&manager)).is_ok());
    }
}
