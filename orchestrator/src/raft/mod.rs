//! Raft for the managers: openraft 0.9 (storage v2) with its log and snapshots in redb.
//!
//! - [`TypeConfig`]: log entries carry a [`Command`]; applying one yields a [`CommandResult`].
//! - [`store`]: the redb-backed log store and the state machine.

pub mod manager;
pub mod network;
pub mod store;

use std::io::Cursor;

use crate::state::{Command, CommandError, Response};

/// What applying one log entry produced: the command's response or why it was refused.
/// Refusals are results, not storage errors: the entry is committed either way.
pub type CommandResult = Result<Response, CommandError>;

/// A manager's Raft id.
pub type ManagerId = u64;

openraft::declare_raft_types!(
    /// The orchestrator's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = ManagerId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
