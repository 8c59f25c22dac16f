//! swarmnet's intent model: the cluster's desired networks, services, tasks and nodes.
//!
//! Layout:
//! - [`types`]: validated newtypes (`Vni`, `IfName`, `MacAddr`, `Name`, ...).
//! - [`spec`]: the serde form of the intent file (JSON, unknown fields refused).
//! - [`delta`]: per-object differences between two intents (the assignment stream's deltas).
//! - [`intent`]: [`Intent`], a [`spec::ClusterSpec`] that passed every cross-object check.
//!
//! Invariants: this crate does no I/O and knows nothing of the kernel; the orchestrator, netd
//! and the CLI all depend on it, and it depends on none of them.

pub mod delta;
pub mod intent;
pub mod spec;
pub mod types;

pub use intent::{Attachment, Intent, IntentError, IntentIssue, Network};
pub use types::{HumanDuration, IfName, MacAddr, Mtu, Name, NodeId, TaskId, ValueError, Vni};

/// `PATH` of task processes and health checks unless their environment sets one or netd is
/// configured with another (`swarmnet-netd --task-path`; the lab puts the project's binaries
/// first, so `swarmnet-whoami` is found).
pub const DEFAULT_TASK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
