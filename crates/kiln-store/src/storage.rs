//! Durable storage of one server's Raft replica in one redb file: the log,
//! the vote, the committed index, the last purged log id, and the state
//! machine's checkpoint (which is also the current snapshot).
//!
//! Invariants:
//! - Every write that Raft relies on is durable (fsync) before Raft is told
//!   it happened: vote, truncate, purge and snapshot are redb transactions
//!   committed with `Durability::Immediate`; log appends are committed
//!   without fsync and acknowledged (`LogFlushed`) only after the next
//!   durable commit, which one flusher thread shares among every append
//!   queued meanwhile (group commit). The committed index rides along
//!   with the next durable commit (it is a hint for replay, see below).
//! - The applied state is durable as *checkpoint + committed log*: applying
//!   entries only changes memory; a snapshot (built or installed) is written
//!   as the checkpoint, and opening the database replays the committed log
//!   entries after it. Raft purges only entries covered by a snapshot, so
//!   every entry the replay needs is still in the log.
//! - The database records its schema version; a newer one is refused.

// openraft's `StorageError` is the error type its traits dictate.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::command::{ApplyMeta, Response};
use crate::state::{LoadStateError, SCHEMA_VERSION, State};
use crate::{ServerId, ServerNode, TypeConfig};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const K_SCHEMA: &str = "schema_version";
const K_VOTE: &str = "vote";
const K_COMMITTED: &str = "committed";
const K_PURGED: &str = "last_purged";
const K_SNAP_META: &str = "meta";
const K_SNAP_DATA: &str = "data";

type StorageResult<T> = Result<T, StorageError<ServerId>>;

/// A database that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("cannot open the database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot read or initialise the database {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("database {path} has schema version {found}; this build understands up to {supported}")]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the checkpoint in {path} cannot be loaded")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: LoadStateError,
    },
    #[error("log entry {index} in {path} is corrupt")]
    Entry {
        path: PathBuf,
        index: u64,
        #[source]
        source: serde_json::Error,
    },
}

/// The state machine's data: what a checkpoint/snapshot holds.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub last_applied: Option<LogId<ServerId>>,
    pub last_membership: StoredMembership<ServerId, ServerNode>,
    pub state: State,
}

#[derive(Serialize)]
struct CheckpointOut<'a> {
    schema_version: u32,
    last_applied: &'a Option<LogId<ServerId>>,
    last_membership: &'a StoredMembership<ServerId, ServerNode>,
    state: &'a State,
}

#[derive(Deserialize)]
struct CheckpointIn {
    schema_version: u32,
    last_applied: Option<LogId<ServerId>>,
    last_membership: StoredMembership<ServerId, ServerNode>,
    state: State,
}

impl Applied {
    /// Serializes with the schema version (the snapshot payload).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&CheckpointOut {
            schema_version: SCHEMA_VERSION,
            last_applied: &self.last_applied,
            last_membership: &self.last_membership,
            state: &self.state,
        })
    }

    /// Loads a payload, refusing a newer schema; rebuilds the indexes.
    pub fn decode(bytes: &[u8]) -> Result<Applied, LoadStateError> {
        #[derive(Deserialize)]
        struct Head {
            schema_version: u32,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(LoadStateError::Decode)?;
        if head.schema_version > SCHEMA_VERSION {
            return Err(LoadStateError::NewerSchema {
                found: head.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        let c: CheckpointIn = serde_json::from_slice(bytes).map_err(LoadStateError::Decode)?;
        debug_assert!(c.schema_version <= SCHEMA_VERSION);
        let mut state = c.state;
        state.rebuild_indexes();
        Ok(Applied {
            last_applied: c.last_applied,
            last_membership: c.last_membership,
            state,
        })
    }

    /// Applies one log entry (Raft's own entries answer `Done`).
    pub fn apply_entry(&mut self, entry: &Entry<TypeConfig>) -> Response {
        self.last_applied = Some(entry.log_id);
        match &entry.payload {
            EntryPayload::Blank => Response::Done,
            EntryPayload::Normal(cmd) => crate::apply::apply(
                &mut self.state,
                cmd,
                ApplyMeta {
                    index: entry.log_id.index,
                    term: entry.log_id.leader_id.term,
                },
            ),
            EntryPayload::Membership(m) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                Response::Done
            }
        }
    }
}

/// Opens (or creates) the database at `path` and returns the two halves
/// Raft needs. The state machine is recovered: checkpoint + committed log.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), OpenStoreError> {
    let io = |source: redb::Error| OpenStoreError::Io {
        path: path.to_owned(),
        source,
    };
    let db = Database::create(path).map_err(|source| OpenStoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    // Create the tables and check/record the schema version.
    let tx = db.begin_write().map_err(|e| io(e.into()))?;
    {
        let mut meta = tx.open_table(META).map_err(|e| io(e.into()))?;
        let found = meta
            .get(K_SCHEMA)
            .map_err(|e| io(e.into()))?
            .and_then(|v| serde_json::from_slice::<u32>(v.value()).ok());
        match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(OpenStoreError::NewerSchema {
                    path: path.to_owned(),
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(_) => {}
            None => {
                let v = SCHEMA_VERSION.to_string();
                meta.insert(K_SCHEMA, v.as_bytes())
                    .map_err(|e| io(e.into()))?;
            }
        }
        tx.open_table(LOG).map_err(|e| io(e.into()))?;
        tx.open_table(SNAPSHOT).map_err(|e| io(e.into()))?;
    }
    tx.commit().map_err(|e| io(e.into()))?;

    let db = Arc::new(db);
    // Recover the state machine.
    let rtx = db.begin_read().map_err(|e| io(e.into()))?;
    let snap = rtx.open_table(SNAPSHOT).map_err(|e| io(e.into()))?;
    let mut applied = match snap.get(K_SNAP_DATA).map_err(|e| io(e.into()))? {
        Some(data) => {
            Applied::decode(data.value()).map_err(|source| OpenStoreError::Checkpoint {
                path: path.to_owned(),
                source,
            })?
        }
        None => Applied::default(),
    };
    let meta = rtx.open_table(META).map_err(|e| io(e.into()))?;
    let committed: Option<LogId<ServerId>> = meta
        .get(K_COMMITTED)
        .map_err(|e| io(e.into()))?
        .and_then(|v| serde_json::from_slice(v.value()).ok())
        .flatten();
    if let Some(committed) = committed {
        let from = applied.last_applied.map_or(0, |l| l.index + 1);
        let log = rtx.open_table(LOG).map_err(|e| io(e.into()))?;
        let mut expect = from;
        for item in log
            .range(from..=committed.index)
            .map_err(|e| io(e.into()))?
        {
            let (k, v) = item.map_err(|e| io(e.into()))?;
            if k.value() != expect {
                break;
            }
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(v.value()).map_err(|source| OpenStoreError::Entry {
                    path: path.to_owned(),
                    index: k.value(),
                    source,
                })?;
            applied.apply_entry(&entry);
            expect += 1;
        }
        if expect > from {
            tracing::info!(
                from,
                to = expect - 1,
                "replayed committed log entries past the checkpoint"
            );
        }
    }
    drop((snap, meta, rtx));
    let sm = StateMachineStore {
        db: db.clone(),
        applied_tx: Arc::new(tokio::sync::watch::Sender::new(
            applied.last_applied.map_or(0, |l| l.index),
        )),
        data: Arc::new(RwLock::new(applied)),
    };
    let flusher = Flusher::start(&db).map_err(|e| io(redb::Error::Io(e)))?;
    Ok((LogStore { db, flusher }, sm))
}

fn read_err(e: impl Into<redb::Error>) -> StorageError<ServerId> {
    StorageIOError::read(&e.into()).into()
}
fn write_err(e: impl Into<redb::Error>) -> StorageError<ServerId> {
    StorageIOError::write(&e.into()).into()
}
fn decode_err(e: serde_json::Error) -> StorageError<ServerId> {
    StorageIOError::read(&e).into()
}
fn encode_err(e: serde_json::Error) -> StorageError<ServerId> {
    StorageIOError::write(&e).into()
}

/// Runs a durable write transaction off the async threads.
async fn write_txn<T: Send + 'static>(
    db: &Arc<Database>,
    durability: Durability,
    f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StorageError<ServerId>> + Send + 'static,
) -> StorageResult<T> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut tx = db.begin_write().map_err(write_err)?;
        tx.set_durability(durability)
            .map_err(|e| StorageError::from(StorageIOError::write(&e)))?;
        let out = f(&tx)?;
        tx.commit().map_err(write_err)?;
        Ok(out)
    })
    .await
    .map_err(|e| StorageError::from(StorageIOError::write(&e)))?
}

fn get_meta<T: for<'a> Deserialize<'a>>(db: &Database, key: &str) -> StorageResult<Option<T>> {
    let tx = db.begin_read().map_err(read_err)?;
    let t = tx.open_table(META).map_err(read_err)?;
    match t.get(key).map_err(read_err)? {
        Some(v) => serde_json::from_slice(v.value()).map_err(decode_err),
        None => Ok(None),
    }
}

fn put_meta(tx: &redb::WriteTransaction, key: &str, value: &impl Serialize) -> StorageResult<()> {
    let bytes = serde_json::to_vec(value).map_err(encode_err)?;
    let mut t = tx.open_table(META).map_err(write_err)?;
    t.insert(key, bytes.as_slice()).map_err(write_err)?;
    Ok(())
}

/// The Raft log, vote and committed index.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    flusher: Flusher,
}

/// Group commit: a thread that makes non-durable log writes durable with
/// one fsync for all appends queued while the previous one ran, then
/// completes their callbacks. It holds the database weakly, so dropping
/// the stores closes the file.
#[derive(Clone)]
struct Flusher {
    tx: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl Flusher {
    fn start(db: &Arc<Database>) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
        let weak = Arc::downgrade(db);
        std::thread::Builder::new()
            .name("kiln-raft-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let res = match weak.upgrade() {
                        Some(db) => durable_barrier(&db),
                        None => Err(std::io::Error::other("the database was closed")),
                    };
                    for cb in batch {
                        cb.log_io_completed(match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        });
                    }
                }
            })?;
        Ok(Flusher { tx })
    }

    fn flush(&self, cb: LogFlushed<TypeConfig>) {
        if let Err(std::sync::mpsc::SendError(cb)) = self.tx.send(cb) {
            cb.log_io_completed(Err(std::io::Error::other("the log flusher stopped")));
        }
    }
}

/// An empty `Immediate` commit: persists every earlier non-durable one.
fn durable_barrier(db: &Database) -> std::io::Result<()> {
    let mut tx = db.begin_write().map_err(std::io::Error::other)?;
    tx.set_durability(Durability::Immediate)
        .map_err(std::io::Error::other)?;
    tx.commit().map_err(std::io::Error::other)
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in t.range(bounds).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(decode_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<ServerId>> = get_meta(&self.db, K_PURGED)?.flatten();
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let last = match t.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(decode_err)?;
                Some(e.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<ServerId>) -> StorageResult<()> {
        let vote = *vote;
        write_txn(&self.db, Durability::Immediate, move |tx| {
            put_meta(tx, K_VOTE, &vote)
        })
        .await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<ServerId>>> {
        get_meta(&self.db, K_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<ServerId>>) -> StorageResult<()> {
        // Not fsynced on its own: the next durable commit (an append's
        // flush, a vote) carries it. Losing it in a crash only shortens
        // the replay on open; Raft re-applies the rest once it knows the
        // commit index again.
        write_txn(&self.db, Durability::None, move |tx| {
            put_meta(tx, K_COMMITTED, &committed)
        })
        .await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<ServerId>>> {
        Ok(get_meta::<Option<LogId<ServerId>>>(&self.db, K_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, serde_json::to_vec(&e).map_err(encode_err)?));
        }
        // Written without fsync; the flusher makes it durable (one fsync
        // for every append queued meanwhile: group commit) and only then
        // tells Raft, through `callback`, that the entries are on disk.
        let res = write_txn(&self.db, Durability::None, move |tx| {
            let mut t = tx.open_table(LOG).map_err(write_err)?;
            for (i, bytes) in &rows {
                t.insert(*i, bytes.as_slice()).map_err(write_err)?;
            }
            Ok(())
        })
        .await;
        match res {
            Ok(()) => {
                self.flusher.flush(callback);
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<ServerId>) -> StorageResult<()> {
        write_txn(&self.db, Durability::Immediate, move |tx| {
            let mut t = tx.open_table(LOG).map_err(write_err)?;
            t.retain_in(log_id.index.., |_, _| false)
                .map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<ServerId>) -> StorageResult<()> {
        write_txn(&self.db, Durability::Immediate, move |tx| {
            put_meta(tx, K_PURGED, &Some(log_id))?;
            let mut t = tx.open_table(LOG).map_err(write_err)?;
            t.retain_in(..=log_id.index, |_, _| false)
                .map_err(write_err)?;
            Ok(())
        })
        .await
    }
}

/// The state machine: applied state in memory, checkpointed as snapshots.
/// Cloning shares it (the snapshot builder and [`crate::RaftNode`]'s
/// readers use clones).
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    data: Arc<RwLock<Applied>>,
    /// The last applied log index, for watchers (the node watch wakes on
    /// it instead of polling).
    applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateMachineStore")
    }
}

impl StateMachineStore {
    /// Reads the applied state (not linearizable on its own; see
    /// `RaftNode::read`).
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        let guard = self.data.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// A receiver that changes whenever entries are applied or a snapshot
    /// is installed; its value is the last applied log index.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn write_checkpoint(
        &self,
        meta: SnapshotMeta<ServerId, ServerNode>,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = StorageResult<()>> + use<> {
        let db = self.db.clone();
        async move {
            let m = serde_json::to_vec(&meta).map_err(encode_err)?;
            write_txn(&db, Durability::Immediate, move |tx| {
                let mut t = tx.open_table(SNAPSHOT).map_err(write_err)?;
                t.insert(K_SNAP_META, m.as_slice()).map_err(write_err)?;
                t.insert(K_SNAP_DATA, data.as_slice()).map_err(write_err)?;
                Ok(())
            })
            .await
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, last_applied, last_membership) =
            self.read(|a| (a.encode(), a.last_applied, a.last_membership.clone()));
        let data = data.map_err(encode_err)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let snapshot_id = match &last_applied {
            Some(l) => format!("{}-{}-{stamp}", l.leader_id.term, l.index),
            None => format!("0-0-{stamp}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        self.write_checkpoint(meta.clone(), data.clone()).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<ServerId>>,
        StoredMembership<ServerId, ServerNode>,
    )> {
        Ok(self.read(|a| (a.last_applied, a.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut guard = self.data.write().unwrap_or_else(|p| p.into_inner());
        let out: Vec<Response> = entries.into_iter().map(|e| guard.apply_entry(&e)).collect();
        let index = guard.last_applied.map_or(0, |l| l.index);
        drop(guard);
        self.applied_tx.send_replace(index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ServerId, ServerNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let mut applied = Applied::decode(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        // The meta is authoritative for where the snapshot stands.
        applied.last_applied = meta.last_log_id;
        applied.last_membership = meta.last_membership.clone();
        self.write_checkpoint(meta.clone(), data).await?;
        let index = applied.last_applied.map_or(0, |l| l.index);
        *self.data.write().unwrap_or_else(|p| p.into_inner()) = applied;
        self.applied_tx.send_replace(index);
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(SNAPSHOT).map_err(read_err)?;
        let (Some(m), Some(d)) = (
            t.get(K_SNAP_META).map_err(read_err)?,
            t.get(K_SNAP_DATA).map_err(read_err)?,
        ) else {
            return Ok(None);
        };
        let meta: SnapshotMeta<ServerId, ServerNode> =
            serde_json::from_slice(m.value()).map_err(decode_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(d.value().to_vec())),
        }))
    }
}
