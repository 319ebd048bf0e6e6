//! The log and the state machine on redb: reopen, snapshots, upgrades of older layouts.

use super::*;
use crate::model::{Command, NodeId};
use openraft::{CommittedLeaderId, Membership};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn open_sm(path: &Path) -> StateMachine {
    let (ev, _) = broadcast::channel(16);
    let (kr, _) = watch::channel(Keyring::default());
    StateMachine::open(open_db(path).expect("db"), ev, kr).expect("state machine")
}

/// A batch of `cmds` from log index `first` on.
fn batch(first: u64, cmds: Vec<Command>) -> Vec<Entry<TypeConfig>> {
    (first..).zip(cmds).map(|(i, c)| entry(i, c)).collect()
}

/// A small simulated swarm: 5 nodes, 10 services, 40 tasks, 3 networks.
fn small_swarm() -> Vec<Command> {
    crate::simulated::swarm(5, 10, 40, 3)
}

fn report(key: &str, owner: NodeId, message: &str) -> Command {
    let report = crate::model::TaskReport {
        state: shoal_scheduler::TaskState::Failed,
        state_since_ms: None,
        exit_code: Some(1),
        health: None,
        message: Some(message.into()),
    };
    Command::ReportTask { owner, key: key.into(), report }
}

fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn put(i: u64) -> Command {
    Command::PutAddress { key: format!("k{i}"), ip: [10, 0, 0, i as u8].into() }
}

#[tokio::test]
async fn log_survives_reopen_and_truncates_and_purges() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("raft.redb");
    {
        let mut ls = LogStore::new(open_db(&path).expect("db"));
        let entries: Vec<_> = (1..=10).map(|i| entry(i, put(i))).collect();
        // Write directly (the flush callback needs a running Raft core).
        let txn = ls.db.begin_write().expect("w");
        {
            let mut t = txn.open_table(LOGS).expect("t");
            for e in &entries {
                t.insert(e.log_id.index, serde_json::to_vec(e).expect("ser").as_slice())
                    .expect("ins");
            }
        }
        txn.commit().expect("commit");
        ls.save_vote(&Vote::new(3, 1)).await.expect("vote");
        ls.truncate(LogId::new(CommittedLeaderId::new(1, 1), 9)).await.expect("truncate");
        ls.purge(LogId::new(CommittedLeaderId::new(1, 1), 3)).await.expect("purge");
    }
    let mut ls = LogStore::new(open_db(&path).expect("db"));
    assert_eq!(ls.read_vote().await.expect("vote"), Some(Vote::new(3, 1)));
    let st = ls.get_log_state().await.expect("state");
    assert_eq!(st.last_log_id.map(|l| l.index), Some(8));
    assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(3));
    let got = ls.try_get_log_entries(0..100).await.expect("read");
    assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
}

#[tokio::test]
async fn state_machine_persists_and_snapshots() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("raft.redb");
    let (ev, _) = broadcast::channel(16);
    let (kr, _) = watch::channel(Keyring::default());
    let snap;
    {
        let mut sm =
            StateMachine::open(open_db(&path).expect("db"), ev.clone(), kr.clone()).expect("sm");
        let mut members = BTreeMap::new();
        members.insert(1u64, BasicNode::new("127.0.0.1:1"));
        let m = Membership::new(vec![BTreeSet::from([1u64])], members);
        let mut batch = vec![Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Membership(m),
        }];
        // Uninitialised store: a put is refused (and reported), the batch still applies.
        batch.push(entry(2, put(2)));
        let res = sm.apply(batch).await.expect("apply");
        assert!(res[1].error.as_ref().is_some_and(|e| e.to_string().contains("not initialised")));
        snap = sm.build_snapshot().await.expect("snapshot");
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
    }
    let mut sm = StateMachine::open(open_db(&path).expect("db"), ev, kr).expect("sm");
    let (applied, membership) = sm.applied_state().await.expect("applied");
    assert_eq!(applied.map(|l| l.index), Some(2));
    assert!(membership.membership().voter_ids().any(|v| v == 1));
    let cur = sm.get_current_snapshot().await.expect("cur").expect("some");
    assert_eq!(cur.meta.snapshot_id, snap.meta.snapshot_id);
    // Installing a snapshot replaces the state.
    let mut st = ClusterState::default();
    st.ipam.insert("from-snapshot".into(), crate::model::HeldAddress { ip: [10, 0, 0, 1].into() });
    let data = schema::encode(&st).expect("ser");
    sm.install_snapshot(&cur.meta, Box::new(Cursor::new(data))).await.expect("install");
    assert!(sm.state().ipam.contains_key("from-snapshot"));
    assert!(!sm.state().nodes.contains_key(&NodeId(1)));
    // A garbage snapshot is refused and changes nothing.
    let before = sm.applied_state().await.expect("applied");
    assert!(sm.install_snapshot(&cur.meta, Box::new(Cursor::new(b"nope".to_vec()))).await.is_err());
    assert_eq!(sm.applied_state().await.expect("applied").0, before.0);
}

#[test]
fn a_state_machine_written_before_typed_tables_opens_upgraded() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = open_db(&dir.path().join("raft.redb")).expect("db");
    // `Applied` as the agent before schema 2 wrote it: the tables under `entries`.
    let old = serde_json::json!({
        "last_applied": null,
        "membership": StoredMembership::<u64, BasicNode>::default(),
        "state": {
            "cluster": null, "nodes": {}, "networks": {},
            "keyring": {"keys": [], "primary": 0, "version": 0},
            "entries": {"ipam": {"sbox/n1": {"ip": "10.0.0.2"}}},
        }
    });
    put_meta(&db, tables::K_BLOB, &old).expect("write");
    let (ev, _) = broadcast::channel(1);
    let (kr, _) = watch::channel(Keyring::default());
    let sm = StateMachine::open(db.clone(), ev.clone(), kr.clone()).expect("open");
    assert_eq!(sm.state().ipam["sbox/n1"].ip, std::net::Ipv4Addr::new(10, 0, 0, 2));
    let mut newer = old;
    newer["state"] = serde_json::json!({"schema": 99});
    put_meta(&db, tables::K_BLOB, &newer).expect("write");
    let e = StateMachine::open(db, ev, kr).expect_err("a newer schema");
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

#[tokio::test]
async fn a_crash_between_batches_reopens_at_the_last_batch() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("raft.redb");
    let cmds = small_swarm();
    let n = cmds.len() as u64;
    let (want, task, owner) = {
        let mut sm = open_sm(&path);
        sm.apply(batch(1, cmds)).await.expect("swarm");
        let (key, t) = sm
            .state()
            .tasks
            .first_key_value()
            .map(|(k, t)| (k.clone(), t.clone()))
            .expect("a task");
        let owner: NodeId = t.task.node_id.as_deref().and_then(|o| o.parse().ok()).expect("owner");
        // A task removed, a service removed, an address released, a node changed, a report.
        let more = vec![
            Command::RemoveTask(sm.state().tasks.keys().nth(1).expect("task").clone()),
            Command::RemoveService("svc00009".into()),
            Command::RemoveAddress(sm.state().ipam.keys().next().expect("ipam").clone()),
            Command::SetStatus {
                id: owner,
                status: crate::model::NodeStatus::Down,
                message: "gone".into(),
            },
            report(&key, owner, "exit status 1"),
        ];
        let res = sm.apply(batch(n + 1, more)).await.expect("more");
        assert!(res.iter().all(|r| r.error.is_none()), "{res:?}");
        (sm.state(), key, owner)
        // Dropped here without any shutdown, as a crash would leave it.
    };
    let mut sm = open_sm(&path);
    assert_eq!(sm.state(), want);
    assert_eq!(sm.state().tasks[&task].message, "exit status 1");
    assert_eq!(sm.state().nodes[&owner].status, crate::model::NodeStatus::Down);
    let (applied, _) = sm.applied_state().await.expect("applied");
    assert_eq!(applied.map(|l| l.index), Some(n + 5));
}

#[tokio::test]
async fn an_applied_batch_rewrites_only_the_records_it_touched() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("raft.redb");
    let cmds = small_swarm();
    let n = cmds.len() as u64;
    let mut sm = open_sm(&path);
    sm.apply(batch(1, cmds)).await.expect("swarm");
    let state = sm.state();
    let mut tasks = state.tasks.values();
    let (a, b) = (tasks.next().expect("a"), tasks.next().expect("b"));
    // Task b's row is changed behind the state machine's back; a batch that touches a alone
    // must leave that row as it is.
    let mut marked = (**b).clone();
    marked.message = "written behind the store's back".into();
    let txn = sm.db.begin_write().expect("w");
    {
        let mut t = txn.open_table(TableDefinition::<&str, &[u8]>::new("sm_tasks")).expect("t");
        t.insert(b.task.id.as_str(), serde_json::to_vec(&marked).expect("json").as_slice())
            .expect("ins");
    }
    txn.commit().expect("commit");
    let owner: NodeId = a.task.node_id.as_deref().and_then(|o| o.parse().ok()).expect("owner");
    let res =
        sm.apply(batch(n + 1, vec![report(&a.task.id, owner, "touched")])).await.expect("apply");
    assert!(res[0].error.is_none(), "{res:?}");
    // What such a batch writes: one task record and the bookkeeping, not the store.
    let bytes = {
        let applied = sm.applied.read().expect("lock");
        sm.persist(&applied, &BTreeSet::from([Slot::Task(a.task.id.clone())])).expect("persist")
    };
    assert!(bytes < 2048, "a single-task batch wrote {bytes} B");
    drop(sm);
    let sm = open_sm(&path);
    assert_eq!(sm.state().tasks[&a.task.id].message, "touched");
    assert_eq!(sm.state().tasks[&b.task.id].message, "written behind the store's back");
    assert_eq!(sm.state().tasks.len(), state.tasks.len());
}

#[tokio::test]
async fn a_whole_blob_of_schema_2_opens_as_tables() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("raft.redb");
    let state = crate::simulated::build(&small_swarm());
    let mut members = BTreeMap::new();
    members.insert(1u64, BasicNode::new("127.0.0.1:1"));
    let membership = StoredMembership::new(
        Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
        Membership::new(vec![BTreeSet::from([1u64])], members),
    );
    // `Applied` as the agent before tables wrote it: one JSON blob with the schema-2 state.
    let blob = serde_json::json!({
        "last_applied": LogId::new(CommittedLeaderId::new(1, 1), 77),
        "membership": membership,
        "state": serde_json::from_slice::<serde_json::Value>(&schema::encode(&state).expect("encode")).expect("json"),
    });
    assert_eq!(blob["state"]["schema"], 2);
    put_meta(&open_db(&path).expect("db"), tables::K_BLOB, &blob).expect("write");
    for _ in 0..2 {
        // Upgraded on the first open; the second reads the tables alone.
        let mut sm = open_sm(&path);
        assert_eq!(sm.state(), state);
        let (applied, m) = sm.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(77));
        assert!(m.membership().voter_ids().any(|v| v == 1));
        let blob: Option<serde_json::Value> = get_meta(&sm.db, tables::K_BLOB).expect("read");
        assert!(blob.is_none(), "the blob is gone once the tables hold the state");
    }
}

#[test]
fn tables_of_a_newer_schema_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("raft.redb");
    let db = open_db(&path).expect("db");
    let txn = db.begin_write().expect("w");
    {
        let mut t = txn.open_table(TableDefinition::<&str, &[u8]>::new("sm")).expect("t");
        t.insert("schema", b"99".as_slice()).expect("ins");
    }
    txn.commit().expect("commit");
    let (ev, _) = broadcast::channel(1);
    let (kr, _) = watch::channel(Keyring::default());
    let e = StateMachine::open(db, ev, kr).expect_err("a newer schema");
    assert!(e.to_string().contains("schema version 99"), "{e}");
}
