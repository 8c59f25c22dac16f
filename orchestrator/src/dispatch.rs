//! The assignment feed of one manager: the cluster intent projected once per change and sent
//! to every connected node as a snapshot first, then deltas.
//!
//! - One task per manager ([`Feed::spawn`]) wakes on every applied log entry, projects the
//!   state ([`crate::project::project`]) and diffs it against the last one it published
//!   ([`swarmnet_model::delta::diff`]). A change that alters the intent or the keyring becomes
//!   one [`Update`] (stamped with the applied (term, index) and the stamp it applies on top of),
//!   encoded once and broadcast to every stream. A change that alters neither sends nothing,
//!   and the published stamp stays where it was (so the next delta's base is one the nodes
//!   hold). Bursts coalesce: the task diffs whatever is applied when it gets to run.
//! - A stream ([`Feed::subscribe`]) starts with a snapshot of what was last published, then
//!   forwards the updates whose base is what it sent last. A stream that fell behind the
//!   broadcast buffer, or met a gap, sends a fresh snapshot instead.
//! - With no stream connected nothing is projected: the feed forgets its snapshot and the next
//!   subscriber projects one.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use swarmnet_model::delta::{self, SpecDelta, Stamp};
use swarmnet_model::spec::ClusterSpec;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::pb;
use crate::project::project;
use crate::raft::store::SharedState;

/// Updates buffered per stream before a slow one is resynchronized with a snapshot.
const BUFFER: usize = 256;

/// What was last published: the stamp, the intent and the keyring at that stamp.
#[derive(Debug, Clone)]
struct Published {
    stamp: Stamp,
    spec: Arc<ClusterSpec>,
    keyring: Arc<Vec<pb::GossipKey>>,
}

/// One change, as broadcast to the streams: the encoded delta message.
#[derive(Debug)]
pub struct Update {
    pub base: Stamp,
    pub stamp: Stamp,
    message: pb::Assignment,
}

/// The feed shared by a manager's assignment streams.
#[derive(Debug)]
pub struct Feed {
    state: SharedState,
    current: Mutex<Option<Published>>,
    tx: broadcast::Sender<Arc<Update>>,
}

/// The keyring as nodes take it: the primary last (see `ClusterState::keyring_for_nodes`).
fn keyring(state: &crate::state::ClusterState) -> Vec<pb::GossipKey> {
    state
        .keyring_for_nodes()
        .into_iter()
        .map(|k| pb::GossipKey {
            id: k.id,
            key: unhex(&k.key),
        })
        .collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// The applied state's projection, keyring and stamp.
fn read(state: &SharedState) -> Published {
    state.read(|a| Published {
        stamp: a
            .last_applied
            .map(|l| (l.leader_id.term, l.index))
            .unwrap_or((0, 0)),
        spec: Arc::new(project(&a.state)),
        keyring: Arc::new(keyring(&a.state)),
    })
}

/// The snapshot message for `p`.
fn snapshot(p: &Published) -> pb::Assignment {
    pb::Assignment {
        term: p.stamp.0,
        index: p.stamp.1,
        intent_json: serde_json::to_vec(&*p.spec).expect("intent serializes"),
        keyring: p.keyring.to_vec(),
        ..Default::default()
    }
}

/// The delta message turning `base` into `next` (`None` when nothing the nodes see changed).
fn update(base: &Published, next: &Published) -> Option<Update> {
    let d: SpecDelta = delta::diff(&base.spec, &next.spec);
    if d.is_empty() && base.keyring == next.keyring {
        return None;
    }
    Some(Update {
        base: base.stamp,
        stamp: next.stamp,
        message: pb::Assignment {
            term: next.stamp.0,
            index: next.stamp.1,
            keyring: next.keyring.to_vec(),
            delta: true,
            base_term: base.stamp.0,
            base_index: base.stamp.1,
            delta_json: serde_json::to_vec(&d).expect("delta serializes"),
            ..Default::default()
        },
    })
}

pub type AssignmentStream =
    Pin<Box<dyn Stream<Item = Result<pb::Assignment, tonic::Status>> + Send>>;

impl Feed {
    /// Starts the feed over `state`; it ends when `stopped` fires.
    pub fn spawn(state: SharedState, mut stopped: watch::Receiver<bool>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(BUFFER);
        let feed = Arc::new(Self {
            state,
            current: Mutex::new(None),
            tx,
        });
        let f = feed.clone();
        let mut applied = f.state.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = applied.changed() => if r.is_err() { return },
                    _ = stopped.changed() => return,
                }
                f.publish();
            }
        });
        feed
    }

    /// Projects the applied state and broadcasts what changed since the last publish.
    fn publish(&self) {
        let mut cur = self.current.lock().expect("feed lock");
        if self.tx.receiver_count() == 0 {
            *cur = None;
            return;
        }
        let next = read(&self.state);
        match cur.as_ref() {
            Some(base) if next.stamp <= base.stamp => {}
            Some(base) => {
                if let Some(u) = update(base, &next) {
                    tracing::debug!(base = ?u.base, stamp = ?u.stamp, "assignment delta");
                    let _ = self.tx.send(Arc::new(u));
                    *cur = Some(next);
                }
            }
            None => *cur = Some(next),
        }
    }

    /// The last published state (projected now if nothing is published) and a receiver of
    /// every update after it.
    fn start(&self) -> (Published, broadcast::Receiver<Arc<Update>>) {
        let mut cur = self.current.lock().expect("feed lock");
        let rx = self.tx.subscribe();
        let p = cur.get_or_insert_with(|| read(&self.state)).clone();
        (p, rx)
    }

    /// A node's stream: a snapshot, then deltas. Ends when the receiver goes or `stopped`
    /// fires (the node reconnects, to this manager or another, and gets a snapshot).
    pub fn subscribe(self: &Arc<Self>, mut stopped: watch::Receiver<bool>) -> AssignmentStream {
        let (tx, rx) = mpsc::channel(4);
        let feed = self.clone();
        tokio::spawn(async move {
            let (first, mut updates) = feed.start();
            let mut sent = first.stamp;
            if tx.send(Ok(snapshot(&first))).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    u = updates.recv() => u,
                    _ = stopped.changed() => return,
                    _ = tx.closed() => return,
                };
                let msg = match next {
                    Ok(u) if u.base == sent => {
                        sent = u.stamp;
                        u.message.clone()
                    }
                    // Already contained in what was sent.
                    Ok(u) if u.stamp <= sent => continue,
                    // A gap, or this stream fell behind: start over from a snapshot.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let (p, rx) = feed.start();
                        updates = rx;
                        sent = p.stamp;
                        snapshot(&p)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}
