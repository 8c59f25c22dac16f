//! The orchestrator: Raft managers that hold the cluster's intent and push each node its share.
//!
//! Layout:
//! - [`ipam`]: pure allocation of subnets (pool carving, overlap), VNIs, addresses, ports.
//! - [`constraint`]: placement constraints (`node.labels.zone==east`).
//! - [`state`]: the cluster state and [`state::Command`]s; `apply` is deterministic and runs
//!   the scheduler (spread, global, constraints, rescheduling, rolling updates) after every
//!   command. This is the Raft state machine's content.
//! - [`ca`]: the cluster PKI on the managers: credentials, the `Ca` service, authorization by
//!   certificate role, renewal of a manager's own certificate.
//! - [`project`]: the state as the `model::spec::ClusterSpec` netd consumes.
//! - [`dispatch`]: the assignment feed: that projection once per change, sent to every node as
//!   a snapshot, then deltas stamped with Raft (term, index).
//!
//! Invariants: nothing here does I/O except the Raft storage and server modules; the state
//! machine reads no clock and draws no random numbers (the leader puts both into commands).
//! This crate depends on `model`, never on netd.

pub mod api;
pub mod ca;
pub mod constraint;
pub mod dispatch;
pub mod ipam;
pub mod project;
pub mod raft;
pub mod state;

/// The gRPC wire types (the `swarmnet-api` crate).
pub use swarmnet_api as pb;
