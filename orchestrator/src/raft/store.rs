//! The managers' durable storage: one redb file per manager holding the Raft log, the vote, the
//! committed log id and the latest state-machine snapshot.
//!
//! The state machine itself ([`crate::state::ClusterState`]) lives in memory and is made durable
//! by the log plus snapshots, as etcd does with its WAL and snapshot files: on start the
//! latest snapshot is loaded, and openraft re-applies the committed entries after it (this store
//! saves the committed log id, so that replay happens before the manager serves anything).
//! Writing the whole state on every apply would cost O(state) per write.
//!
//! Every write is one redb transaction committed with immediate durability (fsync) before
//! openraft is told it is done, so an acknowledged entry survives a crash.
//!
//! Tables: `log` (index → JSON entry), `meta` (`vote`, `committed`, `purged` → JSON),
//! `snapshot` (`meta` → JSON snapshot meta, `data` → the JSON state).

#![expect(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type of the storage traits"
)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::watch;

use super::{CommandResult, ManagerId, TypeConfig};
use crate::state::{ClusterState, Response};

const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");

type StoreResult<T> = Result<T, StorageError<ManagerId>>;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the manager database {path}: {source}")]
    Database {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("the manager database {path} holds a snapshot that does not decode: {source}")]
    Snapshot {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_read(e: impl std::error::Error + 'static) -> StorageError<ManagerId> {
    StorageIOError::read(&e).into()
}

fn io_write(e: impl std::error::Error + 'static) -> StorageError<ManagerId> {
    StorageIOError::write(&e).into()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft types serialize")
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(b).map_err(io_read)
}

/// What the state machine holds, shared with the API (reads) and the assignment streams.
#[derive(Debug, Default)]
pub struct Applied {
    pub state: ClusterState,
    pub last_applied: Option<LogId<ManagerId>>,
    pub membership: StoredMembership<ManagerId, openraft::BasicNode>,
}

/// The stored snapshot: its meta and the serialized [`Applied`] parts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SnapshotBody {
    state: ClusterState,
}

/// Opens (or creates) a manager's database and returns the log store, the state machine, and
/// a handle to read what was applied.
pub fn open(path: &Path) -> Result<(LogStore, StateMachine, SharedState), OpenError> {
    let db_err = |source: redb::Error| OpenError::Database {
        path: path.display().to_string(),
        source: Box::new(source),
    };
    let db = Database::create(path).map_err(|e| db_err(e.into()))?;
    // Create the tables so that readers never meet a missing one.
    let tx = db.begin_write().map_err(|e| db_err(e.into()))?;
    tx.open_table(LOG).map_err(|e| db_err(e.into()))?;
    tx.open_table(META).map_err(|e| db_err(e.into()))?;
    tx.open_table(SNAPSHOT).map_err(|e| db_err(e.into()))?;
    tx.commit().map_err(|e| db_err(e.into()))?;
    let db = Arc::new(db);

    let mut applied = Applied::default();
    let snapshot = read_snapshot(&db).map_err(db_err)?;
    if let Some((meta, data)) = &snapshot {
        let body: SnapshotBody =
            serde_json::from_slice(data).map_err(|source| OpenError::Snapshot {
                path: path.display().to_string(),
                source,
            })?;
        applied.state = body.state;
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
    }
    let (tx, _) = watch::channel(applied.last_applied);
    let shared = SharedState {
        inner: Arc::new(RwLock::new(applied)),
        applied: tx,
    };
    Ok((
        LogStore { db: db.clone() },
        StateMachine {
            db,
            shared: shared.clone(),
            snapshot_seq: Arc::default(),
        },
        shared,
    ))
}

type StoredSnapshot = (SnapshotMeta<ManagerId, openraft::BasicNode>, Vec<u8>);

fn read_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, redb::Error> {
    let tx = db.begin_read()?;
    let t = tx.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (t.get("meta")?, t.get("data")?) else {
        return Ok(None);
    };
    let meta = serde_json::from_slice(meta.value())
        .map_err(|e| redb::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    Ok(Some((meta, data.value().to_vec())))
}

/// Read access to the applied state, and a signal on every applied entry.
#[derive(Debug, Clone)]
pub struct SharedState {
    inner: Arc<RwLock<Applied>>,
    applied: watch::Sender<Option<LogId<ManagerId>>>,
}

impl SharedState {
    /// Runs `f` on the applied state under a read lock.
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        f(&self.inner.read().expect("state lock"))
    }

    /// Wakes on every change of the last applied log id.
    pub fn subscribe(&self) -> watch::Receiver<Option<LogId<ManagerId>>> {
        self.applied.subscribe()
    }
}

/// The Raft log, vote and committed id in redb.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        let tx = self.db.begin_read().map_err(io_read)?;
        let t = tx.open_table(META).map_err(io_read)?;
        match t.get(key).map_err(io_read)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> StoreResult<()> {
        let tx = self.db.begin_write().map_err(io_write)?;
        {
            let mut t = tx.open_table(META).map_err(io_write)?;
            t.insert(key, encode(v).as_slice()).map_err(io_write)?;
        }
        tx.commit().map_err(io_write)
    }

    /// Deletes the log entries with index in `range`.
    fn delete_range(&self, range: impl RangeBounds<u64>) -> Result<(), redb::Error> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(LOG)?;
            let keys: Vec<u64> = t
                .range(range)?
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for k in keys {
                t.remove(k)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(io_read)?;
        let t = tx.open_table(LOG).map_err(io_read)?;
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for r in t.range(start..).map_err(io_read)? {
            let (k, v) = r.map_err(io_read)?;
            if !range.contains(&k.value()) {
                break;
            }
            out.push(decode(v.value())?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let purged: Option<LogId<ManagerId>> = self.get_meta("purged")?;
        let last = {
            let tx = self.db.begin_read().map_err(io_read)?;
            let t = tx.open_table(LOG).map_err(io_read)?;
            match t.last().map_err(io_read)? {
                Some((_, v)) => Some(decode::<Entry<TypeConfig>>(v.value())?.log_id),
                None => None,
            }
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<ManagerId>) -> StoreResult<()> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<ManagerId>>> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<ManagerId>>) -> StoreResult<()> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<ManagerId>>> {
        Ok(self
            .get_meta::<Option<LogId<ManagerId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = (|| -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(LOG)?;
                for e in entries {
                    t.insert(e.log_id.index, encode(&e).as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_write(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<ManagerId>) -> StoreResult<()> {
        self.delete_range(log_id.index..).map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId<ManagerId>) -> StoreResult<()> {
        // Record the purge point first: a crash between the two writes leaves entries that
        // are merely unused, never a gap that the state claims is present.
        self.put_meta("purged", &Some(log_id))?;
        self.delete_range(..=log_id.index).map_err(io_write)
    }
}

/// The state machine: [`ClusterState`] in memory, snapshots in redb.
#[derive(Debug)]
pub struct StateMachine {
    db: Arc<Database>,
    shared: SharedState,
    /// Makes snapshot ids unique within this process.
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachine {
    fn store_snapshot(
        &self,
        meta: &SnapshotMeta<ManagerId, openraft::BasicNode>,
        data: &[u8],
    ) -> StoreResult<()> {
        let err = |e: redb::Error| -> StorageError<ManagerId> {
            StorageIOError::write_snapshot(Some(meta.signature()), &e).into()
        };
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut t = tx.open_table(SNAPSHOT).map_err(|e| err(e.into()))?;
            t.insert("meta", encode(meta).as_slice())
                .map_err(|e| err(e.into()))?;
            t.insert("data", data).map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = self.shared.read(|a| {
            (
                encode(&SnapshotBody {
                    state: a.state.clone(),
                }),
                a.last_applied,
                a.membership.clone(),
            )
        });
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.store_snapshot(&meta, &data)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(
        Option<LogId<ManagerId>>,
        StoredMembership<ManagerId, openraft::BasicNode>,
    )> {
        Ok(self.shared.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let last = {
            let mut a = self.shared.inner.write().expect("state lock");
            for e in entries {
                a.last_applied = Some(e.log_id);
                out.push(match e.payload {
                    EntryPayload::Blank => Ok(Response::Done),
                    EntryPayload::Normal(cmd) => a.state.apply(&cmd),
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(e.log_id), m);
                        Ok(Response::Done)
                    }
                });
            }
            a.last_applied
        };
        self.shared.applied.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            db: self.db.clone(),
            shared: self.shared.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ManagerId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        self.store_snapshot(meta, &data)?;
        {
            let mut a = self.shared.inner.write().expect("state lock");
            a.state = body.state;
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
        }
        self.shared.applied.send_replace(meta.last_log_id);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let stored = read_snapshot(&self.db).map_err(io_read)?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
