//! The redb Raft store against openraft's own storage test suite, plus restart durability:
//! what was appended, voted, committed and snapshotted is there after reopening the file.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder,
    StorageError, Vote,
};
use swarmnet_orchestrator::raft::TypeConfig;
use swarmnet_orchestrator::raft::store::{LogStore, StateMachine, open};
use swarmnet_orchestrator::state::{Command, NodeJoin};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm, _) = open(&dir.path().join("manager.redb")).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn init() -> Command {
    Command::Init {
        cluster_id: "c".into(),
        tokens: Default::default(),
        pool: Default::default(),
        ingress_subnet: None,
        node: NodeJoin {
            id: "n1".parse().unwrap(),
            hostname: "n1".into(),
            addr: "198.18.0.1".parse().unwrap(),
            role: swarmnet_model::spec::NodeRole::Manager,
            labels: Default::default(),
            data_interface: None,
        },
    }
}

#[tokio::test]
async fn everything_written_is_there_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    {
        let (mut log, mut sm, shared) = open(&path).unwrap();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        let entries = vec![
            entry(3, 1, init()),
            entry(
                3,
                2,
                Command::CreateNetwork(swarmnet_orchestrator::state::NetworkConfig {
                    name: Some("app".parse().unwrap()),
                    ..Default::default()
                }),
            ),
        ];
        // openraft's own helper: `append` and wait for the flush callback.
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(Some(log_id(3, 2))).await.unwrap();
        let results = sm.apply(entries.clone()).await.unwrap();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        // A snapshot at 2, then a third entry applied after it.
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let third = entry(
            3,
            3,
            Command::CreateNetwork(swarmnet_orchestrator::state::NetworkConfig {
                name: Some("db".parse().unwrap()),
                ..Default::default()
            }),
        );
        log.blocking_append(vec![third.clone()]).await.unwrap();
        sm.apply(vec![third]).await.unwrap();
        assert_eq!(shared.read(|a| a.state.networks.len()), 3);
    }
    let (mut log, mut sm, shared) = open(&path).unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(3, 1))
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3, 2)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(3, 3)));
    assert_eq!(log.try_get_log_entries(1..4).await.unwrap().len(), 3);
    // The state machine restarts from the snapshot; openraft replays entries after it.
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3, 2)));
    let names: Vec<String> =
        shared.read(|a| a.state.networks.keys().map(|k| k.to_string()).collect());
    assert_eq!(names, ["app", "ingress"]);
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}
