//! Raft for the managers: openraft 0.9 (storage v2) over a redb file per node, and the Raft
//! network over the control plane's QUIC transport.
//!
//! One redb file (`raft.redb`) holds the log, the vote, the committed id, the applied state
//! machine (written in the same transaction as each applied batch) and the current snapshot.
//! After a restart openraft reads back the vote and the log, and the state machine resumes from
//! where it was applied; snapshots let the log be purged (compaction).

// openraft's storage traits fix the error type (`StorageError`, 224 bytes); the helpers share it.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::net::SocketAddr;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::model::{ClusterEvent, ClusterState, Command, CommandResponse, Keyring, now_ms, schema};
use crate::watch::{ChangeLog, Delta, Placement, Position, Reader, Slot};

openraft::declare_raft_types!(
    /// The Raft type configuration of the cluster store.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle type.
pub type Raft = openraft::Raft<TypeConfig>;

const LOGS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const K_VOTE: &str = "vote";
const K_COMMITTED: &str = "committed";
const K_PURGED: &str = "purged";
const K_SM: &str = "state_machine";
const K_SNAPSHOT: &str = "snapshot";

type SErr = StorageError<u64>;

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn io(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    StorageError::IO { source: StorageIOError::new(subject, verb, any(e)) }
}

fn rd(e: impl std::fmt::Display) -> SErr {
    io(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn wr(e: impl std::fmt::Display) -> SErr {
    io(ErrorSubject::Store, ErrorVerb::Write, e)
}

/// Opens (or creates) a node's Raft database, readable by root alone: it holds the CA key, the
/// join secrets and the gossip keyring. (redb initialises an empty file as a new database.)
pub fn open_db(path: &Path) -> Result<Arc<Database>, redb::DatabaseError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .and_then(|_| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
        .map_err(redb::StorageError::Io)?;
    let db = Database::create(path)?;
    Ok(Arc::new(db))
}

fn get_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, SErr> {
    let txn = db.begin_read().map_err(rd)?;
    let table = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(rd(e)),
    };
    match table.get(key).map_err(rd)? {
        Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(rd),
        None => Ok(None),
    }
}

fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), SErr> {
    let bytes = serde_json::to_vec(value).map_err(wr)?;
    let txn = db.begin_write().map_err(wr)?;
    {
        let mut t = txn.open_table(META).map_err(wr)?;
        t.insert(key, bytes.as_slice()).map_err(wr)?;
    }
    txn.commit().map_err(wr)
}

/// The Raft log on redb.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// A log store on `db`.
    pub fn new(db: Arc<Database>) -> LogStore {
        LogStore { db }
    }

    fn last_log_id(&self) -> Result<Option<LogId<u64>>, SErr> {
        let txn = self.db.begin_read().map_err(rd)?;
        let table = match txn.open_table(LOGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(rd(e)),
        };
        match table.last().map_err(rd)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = schema::decode_entry(v.value()).map_err(rd)?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let txn = self.db.begin_read().map_err(rd)?;
        let table = match txn.open_table(LOGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(rd(e)),
        };
        let mut out = Vec::new();
        for item in table.range::<u64>(range).map_err(rd)? {
            let (_, v) = item.map_err(rd)?;
            out.push(schema::decode_entry(v.value()).map_err(rd)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<u64>> = get_meta(&self.db, K_PURGED)?;
        let last = self.last_log_id()?.or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        put_meta(&self.db, K_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        get_meta(&self.db, K_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SErr> {
        put_meta(&self.db, K_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, SErr> {
        Ok(get_meta::<Option<LogId<u64>>>(&self.db, K_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let res = (|| {
            let txn = self.db.begin_write().map_err(wr)?;
            {
                let mut t = txn.open_table(LOGS).map_err(wr)?;
                for e in entries {
                    let bytes = serde_json::to_vec(&e).map_err(wr)?;
                    t.insert(e.log_id.index, bytes.as_slice()).map_err(wr)?;
                }
            }
            txn.commit().map_err(wr)
        })();
        // redb commits are durable (fsync) by default, so the entries are flushed here.
        callback.log_io_completed(
            res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())),
        );
        res
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        remove_logs(&self.db, log_id.index..)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        put_meta(&self.db, K_PURGED, &log_id)?;
        remove_logs(&self.db, ..=log_id.index)
    }
}

fn remove_logs(db: &Database, range: impl RangeBounds<u64>) -> Result<(), SErr> {
    let txn = db.begin_write().map_err(wr)?;
    {
        let mut t = txn.open_table(LOGS).map_err(wr)?;
        t.retain_in::<u64, _>(range, |_, _| false).map_err(wr)?;
    }
    txn.commit().map_err(wr)
}

/// What the state machine persists: the state plus the Raft bookkeeping applied with it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    /// Last applied log id.
    pub last_applied: Option<LogId<u64>>,
    /// Last applied membership.
    pub membership: StoredMembership<u64, BasicNode>,
    /// The cluster store, with its schema version (see `model::schema`).
    #[serde(with = "crate::model::schema")]
    pub state: ClusterState,
    /// Which entries the recent revisions changed (kept in memory only: after a restart, nodes
    /// resync once).
    #[serde(skip)]
    pub changes: ChangeLog,
}

impl Applied {
    /// The revision of the store: the index of the last applied log entry.
    pub fn revision(&self) -> u64 {
        self.last_applied.map_or(0, |l| l.index)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// A [`Placement`] and the revision it was built at.
type PlacementAt = (u64, Arc<Placement>);

/// The state machine: the applied [`ClusterState`], persisted in redb on every applied batch.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    applied: Arc<RwLock<Applied>>,
    events: broadcast::Sender<ClusterEvent>,
    keyring: watch::Sender<Keyring>,
    /// Which services each node runs, at the revision noted (see [`StateMachine::delta`]).
    placement: Arc<Mutex<Option<PlacementAt>>>,
}

impl StateMachine {
    /// Loads the applied state from `db` (empty on a fresh file).
    pub fn open(
        db: Arc<Database>,
        events: broadcast::Sender<ClusterEvent>,
        keyring: watch::Sender<Keyring>,
    ) -> Result<StateMachine, SErr> {
        let mut applied: Applied = get_meta(&db, K_SM)?.unwrap_or_default();
        applied.changes = ChangeLog::new(applied.revision());
        if !applied.state.keyring.keys.is_empty() {
            keyring.send_replace(applied.state.keyring.clone());
        }
        Ok(StateMachine {
            db,
            applied: Arc::new(RwLock::new(applied)),
            events,
            keyring,
            placement: Default::default(),
        })
    }

    /// A copy of the current state.
    pub fn state(&self) -> ClusterState {
        self.applied.read().map(|a| a.state.clone()).unwrap_or_default()
    }

    /// Runs `f` on the current state without copying it.
    pub fn with_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        match self.applied.read() {
            Ok(a) => f(&a.state),
            Err(p) => f(&p.into_inner().state),
        }
    }

    /// The last applied Raft membership (see `authz`).
    pub fn applied_membership(&self) -> openraft::Membership<u64, BasicNode> {
        match self.applied.read() {
            Ok(a) => a.membership.membership().clone(),
            Err(p) => p.into_inner().membership.membership().clone(),
        }
    }

    /// What a node at `pos` reading as `reader` has to learn to be at the current revision.
    pub fn delta(&self, reader: Reader, pos: &Position) -> Delta {
        let f = |a: &Applied| {
            let placement = self.placement(a);
            crate::watch::delta(&a.state, a.revision(), &a.changes, &placement, reader, pos)
        };
        match self.applied.read() {
            Ok(a) => f(&a),
            Err(p) => f(&p.into_inner()),
        }
    }

    /// The placement at `a`'s revision, built by the first node that asks after a change.
    fn placement(&self, a: &Applied) -> Arc<Placement> {
        let mut cached = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((revision, p)) if *revision == a.revision() => p.clone(),
            _ => {
                let p = Arc::new(Placement::of(&a.state));
                *cached = Some((a.revision(), p.clone()));
                p
            }
        }
    }

    fn publish_keyring(&self, state: &ClusterState) {
        let kr = state.keyring.clone();
        self.keyring.send_if_modified(|cur| {
            if *cur != kr {
                *cur = kr;
                true
            } else {
                false
            }
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, last_applied, membership) = {
            let a = self.applied.read().map_err(rd)?;
            (schema::encode(&a.state).map_err(rd)?, a.last_applied, a.membership.clone())
        };
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, now_ms()),
            None => format!("empty-{}", now_ms()),
        };
        let meta =
            SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        put_meta(&self.db, K_SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), SErr> {
        let a = self.applied.read().map_err(rd)?;
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Applied in place: a refused command changes nothing, so no copy is kept to roll back.
        // A failed write to redb below is a storage error, which stops this Raft node; it never
        // goes on from a state that memory has and the disk has not.
        let mut guard = self.applied.write().map_err(wr)?;
        let next = &mut *guard;
        let mut out = Vec::new();
        let mut events = Vec::new();
        let now = now_ms();
        for e in entries {
            next.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(CommandResponse::default()),
                EntryPayload::Normal(cmd) => match next.state.apply(&cmd, now) {
                    Ok(ev) => {
                        next.changes.record(e.log_id.index, Slot::touched_by(&cmd));
                        events.extend(ev);
                        out.push(CommandResponse::default());
                    }
                    Err(msg) => out.push(CommandResponse { error: Some(msg) }),
                },
                EntryPayload::Membership(m) => {
                    next.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(CommandResponse::default());
                }
            }
        }
        put_meta(&self.db, K_SM, &*next)
            .map_err(|e| io(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        self.publish_keyring(&next.state);
        drop(guard);
        for ev in events {
            let _ = self.events.send(ev);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let state = schema::decode(&data)
            .map_err(|e| io(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        let next = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
            // What changed up to the snapshot is not known: nodes behind it resync.
            changes: ChangeLog::new(meta.last_log_id.map_or(0, |l| l.index)),
        };
        put_meta(&self.db, K_SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data })?;
        put_meta(&self.db, K_SM, &next)?;
        self.publish_keyring(&next.state);
        *self.applied.write().map_err(wr)? = next;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let s: Option<StoredSnapshot> = get_meta(&self.db, K_SNAPSHOT)?;
        Ok(s.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// When the leader last heard back from each peer: the source of Reachable/Unreachable.
#[derive(Debug, Clone, Default)]
pub struct PeerContacts {
    inner: Arc<Mutex<HashMap<u64, Instant>>>,
}

impl PeerContacts {
    /// Records a successful RPC to `peer`.
    pub fn touch(&self, peer: u64, now: Instant) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(peer, now);
        }
    }

    /// Whether `peer` answered within `window` before `now`.
    pub fn reachable(&self, peer: u64, now: Instant, window: Duration) -> bool {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(&peer).copied())
            .is_some_and(|t| now.saturating_duration_since(t) <= window)
    }
}

/// Raft settings derived from the cluster tuning.
pub fn raft_config(t: &crate::Tuning) -> Result<Arc<openraft::Config>, openraft::ConfigError> {
    let cfg = openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: t.raft_heartbeat.as_millis() as u64,
        election_timeout_min: t.raft_election_min.as_millis() as u64,
        election_timeout_max: t.raft_election_min.as_millis() as u64 * 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_every),
        max_in_snapshot_log_to_keep: t.snapshot_keep,
        purge_batch_size: 1,
        snapshot_max_chunk_size: 256 * 1024,
        install_snapshot_timeout: 5000,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate()?))
}

/// Parses a manager's control address out of its Raft node record.
pub fn node_addr(node: &BasicNode) -> Option<SocketAddr> {
    node.addr.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Command, NodeId};
    use openraft::{CommittedLeaderId, Membership};
    use std::collections::{BTreeMap, BTreeSet};

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
            let mut sm = StateMachine::open(open_db(&path).expect("db"), ev.clone(), kr.clone())
                .expect("sm");
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
            assert!(
                res[1].error.as_ref().is_some_and(|e| e.to_string().contains("not initialised"))
            );
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
        st.ipam
            .insert("from-snapshot".into(), crate::model::HeldAddress { ip: [10, 0, 0, 1].into() });
        let data = schema::encode(&st).expect("ser");
        sm.install_snapshot(&cur.meta, Box::new(Cursor::new(data))).await.expect("install");
        assert!(sm.state().ipam.contains_key("from-snapshot"));
        assert!(!sm.state().nodes.contains_key(&NodeId(1)));
        // A garbage snapshot is refused and changes nothing.
        let before = sm.applied_state().await.expect("applied");
        assert!(
            sm.install_snapshot(&cur.meta, Box::new(Cursor::new(b"nope".to_vec()))).await.is_err()
        );
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
        put_meta(&db, K_SM, &old).expect("write");
        let (ev, _) = broadcast::channel(1);
        let (kr, _) = watch::channel(Keyring::default());
        let sm = StateMachine::open(db.clone(), ev.clone(), kr.clone()).expect("open");
        assert_eq!(sm.state().ipam["sbox/n1"].ip, std::net::Ipv4Addr::new(10, 0, 0, 2));
        let mut newer = old;
        newer["state"] = serde_json::json!({"schema": 99});
        put_meta(&db, K_SM, &newer).expect("write");
        let e = StateMachine::open(db, ev, kr).expect_err("a newer schema");
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }
}
