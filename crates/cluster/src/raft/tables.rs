//! The applied state machine in redb: a table per record kind, keyed by the record's key, and
//! one `sm` table for the Raft bookkeeping applied with it (last applied id, membership), the
//! schema version, the cluster settings and the keyring.
//!
//! An applied batch rewrites only the records its commands touched ([`Slot::touched_by`]) and
//! deletes the ones they removed, together with the bookkeeping, in one transaction: after a
//! crash the tables hold the state of the last committed batch, never half of one.
//!
//! Each value is the record's JSON (its serde shape, as in a snapshot). Agents before this layout
//! kept the whole state machine as one JSON blob under `meta`/`state_machine` (schema 1 or 2, see
//! `model::schema`); [`upgrade_blob`] rewrites it into the tables on open.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, LogId, StoredMembership};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{META, SErr, rd, wr};
use crate::model::{ClusterState, NodeId, schema};
use crate::watch::Slot;

type Table<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Def = TableDefinition<'static, &'static str, &'static [u8]>;

const SM: Def = TableDefinition::new("sm");
const NODES: Def = TableDefinition::new("sm_nodes");
const NETWORKS: Def = TableDefinition::new("sm_networks");
const SERVICES: Def = TableDefinition::new("sm_services");
const TASKS: Def = TableDefinition::new("sm_tasks");
const IPAM: Def = TableDefinition::new("sm_ipam");
const ALL: [Def; 6] = [SM, NODES, NETWORKS, SERVICES, TASKS, IPAM];

const K_APPLIED: &str = "applied";
const K_SCHEMA: &str = "schema";
const K_CLUSTER: &str = "cluster";
const K_KEYRING: &str = "keyring";

/// Where the state machine kept its whole state before it had tables (in `META`).
pub(super) const K_BLOB: &str = "state_machine";

/// The Raft bookkeeping persisted with the state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Bookkeeping {
    /// Last applied log id.
    pub last_applied: Option<LogId<u64>>,
    /// Last applied membership.
    pub membership: StoredMembership<u64, BasicNode>,
}

/// The state machine as the agent before tables wrote it.
#[derive(Deserialize)]
struct Blob {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    #[serde(with = "crate::model::schema")]
    state: ClusterState,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, SErr> {
    serde_json::to_vec(v).map_err(wr)
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, SErr> {
    serde_json::from_slice(bytes).map_err(|e| rd(format!("the store's {what}: {e}")))
}

/// The state machine's tables, open in one write transaction.
struct Tables<'t> {
    sm: Table<'t>,
    nodes: Table<'t>,
    networks: Table<'t>,
    services: Table<'t>,
    tasks: Table<'t>,
    ipam: Table<'t>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, SErr> {
        let open = |t: Def| txn.open_table(t).map_err(wr);
        Ok(Tables {
            sm: open(SM)?,
            nodes: open(NODES)?,
            networks: open(NETWORKS)?,
            services: open(SERVICES)?,
            tasks: open(TASKS)?,
            ipam: open(IPAM)?,
        })
    }

    /// Writes `value` under `key` in `table`, or deletes the key when there is no value.
    /// Returns the bytes written.
    fn put(table: &mut Table<'t>, key: &str, value: Option<Vec<u8>>) -> Result<usize, SErr> {
        match value {
            Some(v) => table.insert(key, v.as_slice()).map(|_| v.len()).map_err(wr),
            None => table.remove(key).map(|_| 0).map_err(wr),
        }
    }

    /// Writes `slot` as `state` has it now.
    fn write(&mut self, state: &ClusterState, slot: &Slot) -> Result<usize, SErr> {
        fn row<T: Serialize>(v: Option<&T>) -> Result<Option<Vec<u8>>, SErr> {
            v.map(json).transpose()
        }
        match slot {
            Slot::Cluster => Self::put(&mut self.sm, K_CLUSTER, Some(json(&state.cluster)?)),
            Slot::Keyring => Self::put(&mut self.sm, K_KEYRING, Some(json(&state.keyring)?)),
            Slot::Node(id) => {
                Self::put(&mut self.nodes, &id.to_string(), row(state.nodes.get(id))?)
            }
            Slot::Network(id) => Self::put(&mut self.networks, id, row(state.networks.get(id))?),
            Slot::Service(id) => Self::put(&mut self.services, id, row(state.services.get(id))?),
            Slot::Task(id) => Self::put(&mut self.tasks, id, row(state.tasks.get(id))?),
            Slot::Address(key) => Self::put(&mut self.ipam, key, row(state.ipam.get(key))?),
        }
    }
}

/// Writes what `slots` name as `state` has them now (a record that is gone is deleted), and
/// the bookkeeping. Returns the bytes of the values written.
pub(super) fn write_slots<'a>(
    txn: &WriteTransaction,
    book: &Bookkeeping,
    state: &ClusterState,
    slots: impl IntoIterator<Item = &'a Slot>,
) -> Result<usize, SErr> {
    let mut tables = Tables::open(txn)?;
    let mut bytes = 0;
    for slot in slots {
        bytes += tables.write(state, slot)?;
    }
    bytes += Tables::put(&mut tables.sm, K_APPLIED, Some(json(book)?))?;
    bytes += Tables::put(&mut tables.sm, K_SCHEMA, Some(json(&schema::SCHEMA)?))?;
    Ok(bytes)
}

/// Every slot of `state`.
fn all_slots(state: &ClusterState) -> BTreeSet<Slot> {
    let mut slots = BTreeSet::from([Slot::Cluster, Slot::Keyring]);
    slots.extend(state.nodes.keys().map(|id| Slot::Node(*id)));
    slots.extend(state.networks.keys().map(|id| Slot::Network(id.clone())));
    slots.extend(state.services.keys().map(|id| Slot::Service(id.clone())));
    slots.extend(state.tasks.keys().map(|id| Slot::Task(id.clone())));
    slots.extend(state.ipam.keys().map(|key| Slot::Address(key.clone())));
    slots
}

/// Replaces the whole persisted state with `state` (an installed snapshot, an upgrade).
pub(super) fn write_all(
    txn: &WriteTransaction,
    book: &Bookkeeping,
    state: &ClusterState,
) -> Result<(), SErr> {
    for t in ALL {
        txn.delete_table(t).map_err(wr)?;
    }
    write_slots(txn, book, state, &all_slots(state)).map(|_| ())
}

/// Rewrites a state machine kept as one blob (an older agent's) into the tables, in one
/// transaction. Nothing is done when there is no blob.
pub(super) fn upgrade_blob(db: &Database) -> Result<(), SErr> {
    let Some(blob) = super::get_meta::<Blob>(db, K_BLOB)? else { return Ok(()) };
    let book = Bookkeeping { last_applied: blob.last_applied, membership: blob.membership };
    let txn = db.begin_write().map_err(wr)?;
    write_all(&txn, &book, &blob.state)?;
    txn.open_table(META).map_err(wr)?.remove(K_BLOB).map_err(wr)?;
    txn.commit().map_err(wr)
}

/// Reads the persisted state machine; the default (empty) one on a fresh file.
pub(super) fn load(db: &Database) -> Result<(Bookkeeping, ClusterState), SErr> {
    let txn = db.begin_read().map_err(rd)?;
    let sm = match txn.open_table(SM) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
        Err(e) => return Err(rd(e)),
    };
    let get = |key: &str| sm.get(key).map_err(rd).map(|v| v.map(|v| v.value().to_vec()));
    if let Some(v) = get(K_SCHEMA)? {
        let version: u32 = parse("schema version", &v)?;
        if version > schema::SCHEMA {
            return Err(rd(format!(
                "the store was written with schema version {version}, newer than this agent's \
                 {}: run a newer agent",
                schema::SCHEMA
            )));
        }
    }
    let book = get(K_APPLIED)?.map(|v| parse("applied state", &v)).transpose()?.unwrap_or_default();
    let mut state = ClusterState::default();
    state.cluster = get(K_CLUSTER)?.map(|v| parse("cluster settings", &v)).transpose()?.flatten();
    state.keyring = get(K_KEYRING)?.map(|v| parse("keyring", &v)).transpose()?.unwrap_or_default();
    fn rows<K: Ord, T: for<'de> Deserialize<'de>>(
        txn: &redb::ReadTransaction,
        table: Def,
        what: &str,
        key: impl Fn(&str) -> Option<K>,
    ) -> Result<BTreeMap<K, T>, SErr> {
        let mut out = BTreeMap::new();
        for row in txn.open_table(table).map_err(rd)?.iter().map_err(rd)? {
            let (k, v) = row.map_err(rd)?;
            let k = key(k.value()).ok_or_else(|| {
                rd(format!("the store has a {what} under a malformed key {:?}", k.value()))
            })?;
            out.insert(k, parse(what, v.value())?);
        }
        Ok(out)
    }
    let id = |k: &str| Some(k.to_owned());
    state.nodes = rows(&txn, NODES, "node record", |k| k.parse::<NodeId>().ok())?;
    state.networks = rows(&txn, NETWORKS, "network record", id)?;
    state.services = rows(&txn, SERVICES, "service record", id)?;
    state.tasks = rows(&txn, TASKS, "task record", id)?;
    state.ipam = rows(&txn, IPAM, "held address", id)?;
    Ok((book, state))
}
