//! swarmnet's PKI and mTLS, shared by the orchestrator, netd and the CLI.
//!
//! Layout:
//! - [`ca`]: the root CA ([`ca::RootCa`]), node certificates issued over a CSR with the role
//!   in the subject's OU and the node id in its CN, identities read back from certificates.
//! - [`token`]: join tokens `SWMTKN-1-<CA digest>-<secret>` that pin the CA.
//! - [`tls`]: rustls (ring provider) configurations: a server that verifies client
//!   certificates against the CA (and lets an anonymous client reach only what
//!   [`Role`]-based authorization allows: joining), an mTLS client, and a joining client that
//!   trusts a manager only if its chain holds the CA whose digest the token pins.
//!   Certificates are read through [`tls::Credentials`] at every handshake, so a renewed one
//!   takes effect without restarting anything.
//! - [`net`]: tonic glue: a TLS listener stream whose connections carry the peer's
//!   [`Identity`] as a request extension, and TLS channels.
//! - [`join`]: the client side of joining (a certificate for a join token) and of renewal.
//! - [`store`]: a node's key, certificate and CA on disk (directory 0700, files 0600).
//!
//! Invariants: the CA decides every name in a certificate; a request's subject is ignored. The
//! identity of a peer is read only from a certificate the handshake verified.

pub mod ca;
pub mod join;
pub mod net;
pub mod store;
pub mod tls;
pub mod token;

/// The rustls crate this one is built with (its config types appear in the API).
pub use rustls;

/// The DNS name in every manager certificate; clients verify it instead of an address.
pub const SERVER_NAME: &str = "swarm-manager";

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A manager (orchestrator) or a manager node's netd: every API, Raft included.
    Manager,
    /// A worker node's netd: the Dispatcher and certificate renewal only.
    Worker,
    /// The CLI of an operator: the control API (cluster, nodes, networks, services).
    Admin,
}

impl Role {
    /// The subject OU naming the role.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Manager => "swarm-manager",
            Role::Worker => "swarm-worker",
            Role::Admin => "swarm-admin",
        }
    }

    pub fn from_ou(ou: &str) -> Option<Self> {
        [Role::Manager, Role::Worker, Role::Admin]
            .into_iter()
            .find(|r| r.ou() == ou)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.ou())
    }
}

/// Who a verified certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    /// The node id (CN).
    pub id: String,
    /// The cluster's certificate epoch when it was issued (a SAN URI
    /// `urn:swarmnet:cert-epoch:<n>`; 0 when absent). Removing a node from the cluster moves
    /// the epoch on and revokes that node's certificates of earlier epochs.
    pub epoch: u64,
}

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid PEM {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("the system's random source failed")]
    Random,
    #[error("invalid join token: {reason}")]
    BadToken { reason: String },
    #[error("{id:?} cannot name a certificate (1 to 64 characters)")]
    BadId { id: String },
    #[error("the certificate's OU {ou:?} names no swarmnet role")]
    NoRole { ou: String },
    #[error("the new certificate is not signed by the CA in force ({reason})")]
    OtherCa { reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
