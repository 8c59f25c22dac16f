//! The client side of the `Ca` service: trade a join token for a certificate
//! ([`request_certificate`]) and renew one over an mTLS channel ([`renew`]). netd, a joining
//! manager and `swarmnet cluster join` use these.

use std::time::Duration;

use swarmnet_api as pb;
use tonic::transport::Channel;

use crate::Role;
use crate::ca::{Csr, NodeMaterial, digest_pem, identity_of_pem};
use crate::token::JoinToken;

/// Why joining or renewing failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Pki(#[from] crate::PkiError),
    /// The TLS connection failed; a CA that does not match the token shows here.
    #[error("cannot reach the manager at {addr} over TLS: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the manager at {addr} refused ({code:?}): {message}")]
    Refused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the manager answered with a certificate that does not fit: {reason}")]
    BadAnswer { reason: String },
}

impl JoinError {
    /// Whether trying again (later, or at another manager) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            JoinError::Connect { reason, .. } => !reason.contains("does not match the join token"),
            JoinError::Refused { code, .. } => matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            _ => false,
        }
    }
}

fn role_of(word: &str) -> Result<Role, JoinError> {
    match word {
        "manager" => Ok(Role::Manager),
        "worker" => Ok(Role::Worker),
        other => Err(JoinError::BadAnswer {
            reason: format!("unknown role {other:?}"),
        }),
    }
}

/// Joins through the manager at `addr`: checks its CA against the token's digest, then sends
/// the token and a CSR for `node_id`. Answers the node's new key, certificate and CA.
pub async fn request_certificate(
    addr: &str,
    token: &str,
    node_id: &str,
    timeout: Duration,
) -> Result<(NodeMaterial, Role), JoinError> {
    let parsed = JoinToken::parse(token)?;
    let config = crate::tls::join_client_config(&parsed.ca_digest)?;
    let channel = crate::net::channel(addr, config, timeout).map_err(|e| JoinError::Connect {
        addr: addr.to_string(),
        reason: crate::net::error_chain(&e),
    })?;
    let csr = Csr::generate(node_id)?;
    let mut request = tonic::Request::new(pb::IssueRequest {
        token: token.to_string(),
        node_id: node_id.to_string(),
        csr: csr.der.clone(),
    });
    request.set_timeout(timeout);
    let answer = pb::ca_client::CaClient::new(channel)
        .issue_node_certificate(request)
        .await
        .map_err(|s| status_error(addr, s))?
        .into_inner();
    let role = role_of(&answer.role)?;
    if digest_pem(&answer.ca_pem)? != parsed.ca_digest {
        return Err(JoinError::BadAnswer {
            reason: "the CA sent is not the one the token pins".into(),
        });
    }
    let material = NodeMaterial {
        key_pem: csr.key_pem,
        cert_pem: answer.cert_pem,
        ca_pem: answer.ca_pem,
    };
    check(&material, node_id)?;
    Ok((material, role))
}

/// A transport error from tonic carries the TLS reason deep in its sources.
fn status_error(addr: &str, s: tonic::Status) -> JoinError {
    if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
        let reason = std::error::Error::source(&s)
            .map(crate::net::error_chain)
            .unwrap_or_else(|| s.message().to_string());
        return JoinError::Connect {
            addr: addr.to_string(),
            reason,
        };
    }
    JoinError::Refused {
        addr: addr.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

fn check(m: &NodeMaterial, node_id: &str) -> Result<(), JoinError> {
    let info = identity_of_pem(&m.cert_pem)?;
    if info.identity.id != node_id {
        return Err(JoinError::BadAnswer {
            reason: format!("it names {:?}, not {node_id:?}", info.identity.id.as_str()),
        });
    }
    Ok(())
}

/// Renews the certificate of `current` over `channel` (an mTLS channel that presents it).
pub async fn renew(
    channel: Channel,
    addr: &str,
    current: &NodeMaterial,
    timeout: Duration,
) -> Result<NodeMaterial, JoinError> {
    let id = identity_of_pem(&current.cert_pem)?.identity.id;
    let csr = Csr::generate(&id)?;
    let mut request = tonic::Request::new(pb::RenewRequest {
        csr: csr.der.clone(),
    });
    request.set_timeout(timeout);
    let answer = pb::ca_client::CaClient::new(channel)
        .renew_node_certificate(request)
        .await
        .map_err(|s| status_error(addr, s))?
        .into_inner();
    let material = NodeMaterial {
        key_pem: csr.key_pem,
        cert_pem: answer.cert_pem,
        ca_pem: answer.ca_pem,
    };
    check(&material, &id)?;
    Ok(material)
}
