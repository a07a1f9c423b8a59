//! The redb storage against openraft's conformance suite, and durability
//! across reopening the database file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use kiln_api::cluster::{Quotas, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxSpec};
use kiln_store::storage::{self, LogStore, StateMachineStore};
use kiln_store::{Command, Response, ServerNode, TypeConfig};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder,
    StorageError, Vote,
};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = storage::open(&dir.path().join("raft.redb")).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).expect("the redb store passes openraft's storage suite");
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload,
    }
}

fn create(i: u64) -> Command {
    Command::CreateSandbox {
        id: SandboxId::from_random(i.to_be_bytes()),
        tenant: TenantName::new("acme").expect("name"),
        spec: SandboxSpec::for_image("busybox"),
        idempotency_key: Some(format!("key-{i}")),
        node: None,
        now_ms: i,
    }
}

/// Vote, log, committed index, snapshot and applied state survive closing
/// and reopening the file; the applied state past the snapshot is rebuilt
/// from the committed log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_reopening_the_database() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    let members = BTreeMap::from([(
        1u64,
        ServerNode {
            raft_addr: "127.0.0.1:1".into(),
            api_addr: String::new(),
        },
    )]);
    let mut entries = vec![
        entry(
            1,
            1,
            EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1])], members)),
        ),
        entry(
            1,
            2,
            EntryPayload::Normal(Command::CreateTenant {
                name: TenantName::new("acme")?,
                quotas: Quotas::default(),
                now_ms: 0,
            }),
        ),
    ];
    for i in 3..=20 {
        entries.push(entry(1, i, EntryPayload::Normal(create(i))));
    }
    {
        let (mut log, mut sm) = storage::open(&path)?;
        log.save_vote(&Vote::new(1, 1)).await?;
        log.blocking_append(entries.clone()).await?;
        // Apply up to 10 and snapshot there; apply the rest; commit up to 15.
        let r = sm.apply(entries[..10].to_vec()).await?;
        assert_eq!(r.len(), 10);
        assert!(matches!(
            r[2],
            Response::SandboxCreated { created: true, .. }
        ));
        let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 10)));
        sm.apply(entries[10..15].to_vec()).await?;
        log.save_committed(Some(log_id(1, 15))).await?;
        log.purge(log_id(1, 5)).await?;
    }
    // Reopen: the file lock was released by dropping both halves.
    let (mut log, mut sm) = storage::open(&path)?;
    assert_eq!(log.read_vote().await?, Some(Vote::new(1, 1)));
    assert_eq!(log.read_committed().await?, Some(log_id(1, 15)));
    let st = log.get_log_state().await?;
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 5)));
    assert_eq!(st.last_log_id, Some(log_id(1, 20)));
    let got = log.try_get_log_entries(6..=20).await?;
    assert_eq!(got.len(), 15);
    assert_eq!(got[0].log_id, log_id(1, 6));
    // Applied state = snapshot (10) + committed replay (11..=15).
    let (applied, membership) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(1, 15)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    let n = sm.read(|a| a.state.sandboxes.len());
    assert_eq!(n, 13, "entries 3..=15 created one sandbox each");
    let snap = sm.get_current_snapshot().await?.expect("snapshot kept");
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 10)));
    // Truncation is durable too.
    log.truncate(log_id(1, 18)).await?;
    drop((log, sm));
    let (mut log, _sm) = storage::open(&path)?;
    assert_eq!(log.get_log_state().await?.last_log_id, Some(log_id(1, 17)));
    Ok(())
}

/// A snapshot from a newer schema, or garbage, is refused on install; a
/// database stamped with a newer schema is refused on open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_or_corrupt_state_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    let (_log, mut sm) = storage::open(&path)?;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
    let mut v: serde_json::Value = serde_json::from_slice(snap.snapshot.get_ref())?;
    v["schema_version"] = 999.into();
    let bad = Box::new(Cursor::new(serde_json::to_vec(&v)?));
    assert!(sm.install_snapshot(&snap.meta, bad).await.is_err());
    let garbage = Box::new(Cursor::new(b"not json".to_vec()));
    assert!(sm.install_snapshot(&snap.meta, garbage).await.is_err());
    drop((_log, sm));

    // Stamp the file with a newer schema version.
    {
        let db = redb::Database::create(&path)?;
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))?;
            t.insert("schema_version", b"999".as_slice())?;
        }
        tx.commit()?;
    }
    match storage::open(&path) {
        Err(storage::OpenStoreError::NewerSchema { found: 999, .. }) => Ok(()),
        Err(e) => anyhow::bail!("wrong error: {e}"),
        Ok(_) => anyhow::bail!("a newer schema was accepted"),
    }
}
