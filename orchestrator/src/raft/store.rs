//! The managers' durable storage: one redb file per manager holding the Raft log, the vote, the
//! committed log id and the latest state-machine snapshot.
//!
//! The state machine itself ([`crate::state::ClusterState`]) lives in memory and is made durable
//! by the log plus snapshots, as etcd does with its WAL and snapshot files: on start the
//! latest snapshot is loaded, and openraft re-applies the committed entries after it (this store
//! saves the committed log id, so that replay happens before the manager serves anything).
//! Writing the whole state on every apply would cost O(state) per write.
//!
//! Durability, deliberately as etcd's WAL: an entry is reported flushed to openraft (which
//! only then counts it towards a quorum or answers a leader) after the redb transaction
//! holding it committed with immediate durability (fdatasync), so an acknowledged write
//! survives a crash of a majority. Appends are group-committed: [`LogStore`]'s `append` keeps
//! the entries in memory (readable at once, as openraft requires) and hands them to one
//! writer thread, which commits everything queued while the previous fsync ran in one
//! transaction, then completes each append's callback. Under load one fsync covers many
//! writes (etcd batches its WAL the same way); a lone write pays one fsync, as before.
//! Truncation and purging go through the same queue, in order. The vote is written and synced
//! before `save_vote` returns. The committed log id rides along with the next group (it is a
//! hint: losing it only lengthens the replay at start).
//!
//! Tables: `log` (index → JSON entry), `meta` (`vote`, `committed`, `purged` → JSON),
//! `snapshot` (`meta` → JSON snapshot meta, `data` → the JSON state).

#![expect(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type of the storage traits"
)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};

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
        LogStore::new(db.clone()),
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

/// The Raft log, vote and committed id in redb, with appends group-committed by a writer
/// thread (see the module docs).
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Entries appended but not yet committed to redb, by index: what readers see first.
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    /// The latest committed log id given by openraft, written with the next group.
    committed: Arc<Mutex<Option<Option<LogId<ManagerId>>>>>,
    writer: Arc<Writer>,
}

/// The writer thread's queue; dropping the last handle stops the thread and waits for it, so
/// the database is closed (and can be opened again) once the store is gone.
#[derive(Debug)]
struct Writer {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    fn send(&self, job: Job) -> StoreResult<()> {
        self.queue
            .lock()
            .expect("writer lock")
            .as_ref()
            .and_then(|q| q.send(job).ok())
            .ok_or_else(|| io_write(std::io::Error::other("the raft log writer stopped")))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.lock().expect("writer lock").take());
        if let Some(t) = self.thread.lock().expect("writer lock").take() {
            let _ = t.join();
        }
    }
}

/// Work for the writer thread, done in order.
enum Job {
    Append(Vec<Entry<TypeConfig>>, LogFlushed<TypeConfig>),
    /// Deletes the entries with index at or after this one, then answers.
    Truncate(u64, tokio::sync::oneshot::Sender<Result<(), redb::Error>>),
    /// Records the purge point, deletes the entries up to it, then answers.
    Purge(
        LogId<ManagerId>,
        tokio::sync::oneshot::Sender<Result<(), redb::Error>>,
    ),
}

/// Largest group committed in one transaction.
const MAX_GROUP: usize = 1024;

impl LogStore {
    fn new(db: Arc<Database>) -> Self {
        let (writer, jobs) = mpsc::channel();
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let committed = Arc::new(Mutex::new(None));
        let (d, p, c) = (db.clone(), pending.clone(), committed.clone());
        let thread = std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || write_loop(&d, &p, &c, &jobs))
            .expect("spawning the raft log writer");
        Self {
            db,
            pending,
            committed,
            writer: Arc::new(Writer {
                queue: Mutex::new(Some(writer)),
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

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

    /// Runs a truncate or purge on the writer thread (after every append queued before it).
    async fn ordered(
        &self,
        job: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), redb::Error>>) -> Job,
    ) -> StoreResult<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.send(job(tx))?;
        rx.await
            .map_err(|e| {
                io_write(std::io::Error::other(format!(
                    "the raft log writer stopped: {e}"
                )))
            })?
            .map_err(io_write)
    }
}

/// The writer thread: takes every queued job, commits consecutive appends in one durable
/// transaction, then completes their callbacks; runs truncations and purges in order between.
fn write_loop(
    db: &Database,
    pending: &Mutex<BTreeMap<u64, Entry<TypeConfig>>>,
    committed: &Mutex<Option<Option<LogId<ManagerId>>>>,
    jobs: &mpsc::Receiver<Job>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP
            && let Ok(j) = jobs.try_recv()
        {
            batch.push(j);
        }
        let mut group: Vec<(Vec<Entry<TypeConfig>>, LogFlushed<TypeConfig>)> = Vec::new();
        for job in batch {
            match job {
                Job::Append(entries, cb) => group.push((entries, cb)),
                Job::Truncate(index, reply) => {
                    flush_group(db, pending, committed, std::mem::take(&mut group));
                    let _ = reply.send(delete_range(db, index..));
                }
                Job::Purge(log_id, reply) => {
                    flush_group(db, pending, committed, std::mem::take(&mut group));
                    let r = (|| {
                        let tx = db.begin_write()?;
                        {
                            let mut t = tx.open_table(META)?;
                            t.insert("purged", encode(&Some(log_id)).as_slice())?;
                        }
                        tx.commit()?;
                        delete_range(db, ..=log_id.index)
                    })();
                    let _ = reply.send(r);
                }
            }
        }
        flush_group(db, pending, committed, group);
    }
}

/// Commits a group of appends (and the latest committed id) in one durable transaction, then
/// reports each append flushed (or failed).
fn flush_group(
    db: &Database,
    pending: &Mutex<BTreeMap<u64, Entry<TypeConfig>>>,
    committed: &Mutex<Option<Option<LogId<ManagerId>>>>,
    group: Vec<(Vec<Entry<TypeConfig>>, LogFlushed<TypeConfig>)>,
) {
    if group.is_empty() {
        return;
    }
    let hint = committed.lock().expect("committed lock").take();
    let result = (|| -> Result<(), redb::Error> {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(LOG)?;
            for (entries, _) in &group {
                for e in entries {
                    t.insert(e.log_id.index, encode(e).as_slice())?;
                }
            }
            if let Some(c) = &hint {
                let mut m = tx.open_table(META)?;
                m.insert("committed", encode(c).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    })();
    if result.is_ok() {
        // Written: readers find them in redb now. An entry replaced in memory meanwhile (a
        // truncation and a new append at the same index) stays.
        let mut p = pending.lock().expect("pending lock");
        for (entries, _) in &group {
            for e in entries {
                if p.get(&e.log_id.index).is_some_and(|q| q.log_id == e.log_id) {
                    p.remove(&e.log_id.index);
                }
            }
        }
    }
    for (_, cb) in group {
        cb.log_io_completed(match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        });
    }
}

/// Deletes the log entries with index in `range`.
fn delete_range(db: &Database, range: impl RangeBounds<u64>) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
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

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        // Pending entries first: one written meanwhile is then found in redb (read after).
        let mut out: BTreeMap<u64, Entry<TypeConfig>> = self
            .pending
            .lock()
            .expect("pending lock")
            .range(range.clone())
            .map(|(k, e)| (*k, e.clone()))
            .collect();
        let tx = self.db.begin_read().map_err(io_read)?;
        let t = tx.open_table(LOG).map_err(io_read)?;
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        for r in t.range(start..).map_err(io_read)? {
            let (k, v) = r.map_err(io_read)?;
            if !range.contains(&k.value()) {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(k.value()) {
                slot.insert(decode(v.value())?);
            }
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let purged: Option<LogId<ManagerId>> = self.get_meta("purged")?;
        let in_memory = self
            .pending
            .lock()
            .expect("pending lock")
            .last_key_value()
            .map(|(_, e)| e.log_id);
        let on_disk = {
            let tx = self.db.begin_read().map_err(io_read)?;
            let t = tx.open_table(LOG).map_err(io_read)?;
            match t.last().map_err(io_read)? {
                Some((_, v)) => Some(decode::<Entry<TypeConfig>>(v.value())?.log_id),
                None => None,
            }
        };
        let last = in_memory.max(on_disk);
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
        // Written with the next group of appends: it only shortens the replay at start, so a
        // lost one means replaying from the snapshot, never a lost write.
        *self.committed.lock().expect("committed lock") = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<ManagerId>>> {
        if let Some(c) = *self.committed.lock().expect("committed lock") {
            return Ok(c);
        }
        Ok(self
            .get_meta::<Option<LogId<ManagerId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        {
            let mut p = self.pending.lock().expect("pending lock");
            for e in &entries {
                p.insert(e.log_id.index, e.clone());
            }
        }
        self.writer.send(Job::Append(entries, callback))
    }

    async fn truncate(&mut self, log_id: LogId<ManagerId>) -> StoreResult<()> {
        self.pending
            .lock()
            .expect("pending lock")
            .retain(|i, _| *i < log_id.index);
        self.ordered(|reply| Job::Truncate(log_id.index, reply))
            .await
    }

    async fn purge(&mut self, log_id: LogId<ManagerId>) -> StoreResult<()> {
        // The purge point is recorded first: a crash between the two writes leaves entries
        // that are merely unused, never a gap that the state claims is present.
        self.pending
            .lock()
            .expect("pending lock")
            .retain(|i, _| *i > log_id.index);
        self.ordered(|reply| Job::Purge(log_id, reply)).await
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
