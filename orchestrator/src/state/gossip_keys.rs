//! Gossip key rotation in three steps, so that no node is ever sent frames it cannot open:
//!
//! 1. **distribute**: a new key joins the keyring *accepted only*; the primary (the key every
//!    node seals with) stays. Nodes that have it open frames sealed with either key.
//! 2. **switch**: once every ready node's running gossip holds the new key (they say so in
//!    their heartbeats), the leader makes it primary: nodes seal with it, and a node that
//!    switches first is understood by all the others.
//! 3. **retire**: once every ready node seals with the new key, the leader drops the old one.
//!
//! A node that is down does not hold a rotation up: it gets the whole keyring when it comes
//! back. A ready node that never confirms (its key file unwritable, say) holds the rotation at
//! its step, safely, and `cluster info` shows the step; the leader logs who it waits for.
//! Swarm instead makes the newest key primary one rotation period after it was sent (12 h),
//! trusting the period; here a rotation completes within a few heartbeats and never on trust.
//!
//! Everything here is pure: the state machine's commands, and [`next_step`], which the leader
//! runs on the acknowledgements it holds in memory (heartbeats are not replicated).

use std::collections::HashMap;

use swarmnet_model::NodeId;

use super::{ClusterState, Command, CommandError, GossipKey, NodeStatus, Response};

/// What a node's running gossip holds (manager key ids), from its last heartbeat.
///
/// The leader keeps one `Option<KeyAck>` per node that heartbeated since it took office:
/// `None` when the node's gossip is not running (off, or not started: it reads the whole
/// keyring when it starts), and such a node is not waited for. A ready node not heard from
/// yet is waited for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyAck {
    pub accepted: Vec<u64>,
    pub sealing: u64,
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// One key: nothing in progress.
    Idle,
    /// The newest key is accepted only, waiting for every ready node to hold it.
    Distributing,
    /// The newest key is primary, waiting for every ready node to seal with it.
    Retiring,
}

impl Rotation {
    /// The word in `cluster info` ("" when idle).
    pub fn word(self) -> &'static str {
        match self {
            Rotation::Idle => "",
            Rotation::Distributing => "distributing",
            Rotation::Retiring => "retiring",
        }
    }
}

impl ClusterState {
    /// The key nodes seal with: the one named primary, else (state from before primaries were
    /// recorded) the newest.
    pub fn primary_gossip_key(&self) -> Option<&GossipKey> {
        self.gossip_primary
            .and_then(|id| self.keyring.iter().find(|k| k.id == id))
            .or(self.keyring.last())
    }

    /// The keyring as the nodes get it: the primary last (it seals), the others before it.
    pub fn keyring_for_nodes(&self) -> Vec<&GossipKey> {
        let primary = self.primary_gossip_key().map(|k| k.id);
        let mut keys: Vec<&GossipKey> = self
            .keyring
            .iter()
            .filter(|k| Some(k.id) != primary)
            .collect();
        keys.extend(self.primary_gossip_key());
        keys
    }

    pub fn gossip_rotation(&self) -> Rotation {
        match (self.keyring.last(), self.primary_gossip_key()) {
            _ if self.keyring.len() <= 1 => Rotation::Idle,
            (Some(newest), Some(primary)) if newest.id != primary.id => Rotation::Distributing,
            _ => Rotation::Retiring,
        }
    }

    /// Step 1: `key` joins as accepted only (the very first key is primary at once).
    pub(super) fn add_gossip_key(&mut self, key: &GossipKey) -> Result<Response, CommandError> {
        if key.key.len() != 64 || !key.key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(super::invalid("gossip key", "expected 32 bytes in hex"));
        }
        if self.keyring.iter().any(|k| k.id == key.id) {
            return Err(super::invalid(
                "gossip key",
                format!("id {} is in the keyring already", key.id),
            ));
        }
        match self.gossip_rotation() {
            Rotation::Idle => {}
            step => {
                return Err(CommandError::RotationInProgress {
                    step: step.word().to_string(),
                });
            }
        }
        self.keyring.push(key.clone());
        if self.keyring.len() == 1 {
            self.gossip_primary = Some(key.id);
        }
        Ok(Response::Done)
    }

    /// Step 2: `id` (the newest key) becomes primary. Idempotent.
    pub(super) fn promote_gossip_key(&mut self, id: u64) -> Result<Response, CommandError> {
        if self.primary_gossip_key().is_some_and(|k| k.id == id) {
            return Ok(Response::Done);
        }
        if self.keyring.last().is_none_or(|k| k.id != id) {
            return Err(super::invalid(
                "gossip key",
                format!("{id} is not the newest key of the keyring"),
            ));
        }
        self.gossip_primary = Some(id);
        Ok(Response::Done)
    }

    /// Step 3: every key but the primary `id` goes. Idempotent; refused unless `id` is
    /// primary (a stale leader's decision after another rotation started).
    pub(super) fn retire_gossip_keys(&mut self, id: u64) -> Result<Response, CommandError> {
        if self.primary_gossip_key().is_none_or(|k| k.id != id) {
            return Err(super::invalid(
                "gossip key",
                format!("{id} is not the primary key; nothing retired"),
            ));
        }
        self.keyring.retain(|k| k.id == id);
        Ok(Response::Done)
    }

    /// Ready nodes whose acknowledgement does not (yet) allow the rotation's next step.
    pub fn rotation_waits_for(&self, acks: &HashMap<NodeId, Option<KeyAck>>) -> Vec<NodeId> {
        let step = self.gossip_rotation();
        let (Some(newest), Some(primary)) = (self.keyring.last(), self.primary_gossip_key()) else {
            return Vec::new();
        };
        self.nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready)
            .filter(|n| {
                let ack = match acks.get(&n.id) {
                    None => return step != Rotation::Idle,
                    Some(None) => return false,
                    Some(Some(a)) => a,
                };
                match step {
                    Rotation::Idle => false,
                    Rotation::Distributing => !ack.accepted.contains(&newest.id),
                    Rotation::Retiring => ack.sealing != primary.id,
                }
            })
            .map(|n| n.id.clone())
            .collect()
    }
}

/// The command that moves a rotation on, if every ready node allows it (see [`KeyAck`]).
pub fn next_step(state: &ClusterState, acks: &HashMap<NodeId, Option<KeyAck>>) -> Option<Command> {
    if state.rotation_waits_for(acks).is_empty() {
        state.rotation_step()
    } else {
        None
    }
}

impl ClusterState {
    /// The command of the rotation's next step, whoever it waits for (`None` when idle).
    pub fn rotation_step(&self) -> Option<Command> {
        match self.gossip_rotation() {
            Rotation::Idle => None,
            Rotation::Distributing => self
                .keyring
                .last()
                .map(|k| Command::PromoteGossipKey { id: k.id }),
            Rotation::Retiring => self
                .primary_gossip_key()
                .map(|k| Command::RetireGossipKeys { keep: k.id }),
        }
    }
}
