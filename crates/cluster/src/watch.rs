//! The per-node watch of the store: each node follows the store as changes since a revision, and
//! sees of each entry only what its role lets it see.
//!
//! - The revision is the Raft log index the state machine has applied, so it means the same on
//!   every manager and a node keeps its place across a leader change.
//! - [`ChangeLog`] remembers which entries ([`Slot`]s) the recent revisions changed, not their
//!   values: an answer reads the values from the store as it is now, so an entry changed ten
//!   times since the node last asked is sent once.
//! - [`delta`] answers a node's [`Position`]: the changed entries as the node may see them, or
//!   the whole [`view`] when the node has fallen behind the log (or is new, or changed role).
//! - [`Mirror`] is the node's side: it applies deltas to its copy and says where it stands.
//!
//! What a node may see ([`Reader`]): never the CA key or the join secrets. A worker also does
//! not see how other nodes' tasks run (the command, environment, working directory, mounts and
//! health command of a service it runs no task of, or of another node's standalone task): those
//! fields are blanked to empty values the records still parse with. It does see every node
//! record, network, service name, port and VIP, and every task's node and addresses, because its
//! mesh, DNS and gossip trust check are built from them.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::model::{
    ClusterInfo, ClusterState, Command, NetworkRecord, NetworkSpec, NodeId, Role, Service,
    TaskRecord,
};

/// One entry of the store: the unit a change names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// The cluster's settings ([`ClusterInfo`]).
    Cluster,
    /// The gossip keyring.
    Keyring,
    /// One node record.
    Node(NodeId),
    /// One network record.
    Network(String),
    /// One service.
    Service(String),
    /// One task.
    Task(String),
    /// One held address.
    Address(String),
}

impl Slot {
    /// The entries `cmd` may change; applying it changes nothing else.
    pub fn touched_by(cmd: &Command) -> Vec<Slot> {
        match cmd {
            Command::Init { node, ingress, .. } => vec![
                Slot::Cluster,
                Slot::Keyring,
                Slot::Node(node.id),
                Slot::Network(ingress.id.clone()),
            ],
            Command::AddNode(n) => vec![Slot::Node(n.id)],
            Command::UpdateNode { id, .. }
            | Command::SetRole { id, .. }
            | Command::SetStatus { id, .. }
            | Command::SetAddr { id, .. }
            | Command::SetWgKey { id, .. }
            | Command::RemoveNode(id) => vec![Slot::Node(*id)],
            Command::SetJoinSecret { .. } | Command::Security(_) => vec![Slot::Cluster],
            Command::AddGossipKey(_)
            | Command::SetPrimaryGossipKey(_)
            | Command::RetireGossipKey(_) => vec![Slot::Keyring],
            Command::PutNetwork(NetworkRecord { id, .. })
            | Command::CreateNetwork(NetworkSpec { id, .. }) => vec![Slot::Network(id.clone())],
            Command::RemoveNetwork(id) => vec![Slot::Network(id.clone())],
            Command::PutService(s) => vec![Slot::Service(s.id.clone())],
            Command::RemoveService(id) => vec![Slot::Service(id.clone())],
            Command::PutTask(t) => vec![Slot::Task(t.task.id.clone())],
            Command::RemoveTask(id)
            | Command::ReportTask { key: id, .. }
            | Command::PutStandalone { key: id, .. } => vec![Slot::Task(id.clone())],
            Command::PutAddress { key, .. }
            | Command::AllocateAddress { key, .. }
            | Command::RemoveAddress(key) => {
                vec![Slot::Address(key.clone())]
            }
        }
    }
}

/// How many changed entries the log keeps; a node further behind gets a full resync.
pub const LOG_CAPACITY: usize = 16 * 1024;

/// Which entries the recent revisions changed.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// Every change after this revision is in `recent`.
    floor: u64,
    recent: VecDeque<(u64, Slot)>,
    capacity: usize,
}

impl ChangeLog {
    /// An empty log of a store at `revision`: a node behind it must resync.
    pub fn new(revision: u64) -> ChangeLog {
        ChangeLog::with_capacity(revision, LOG_CAPACITY)
    }

    /// As [`ChangeLog::new`], keeping at most `capacity` changes.
    pub fn with_capacity(revision: u64, capacity: usize) -> ChangeLog {
        ChangeLog { floor: revision, recent: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Notes that `revision` changed `slots`, forgetting the oldest revisions beyond capacity.
    pub fn record(&mut self, revision: u64, slots: Vec<Slot>) {
        self.recent.extend(slots.into_iter().map(|s| (revision, s)));
        while self.recent.len() > self.capacity {
            // A revision is forgotten whole, so the floor never splits one.
            let Some((oldest, _)) = self.recent.pop_front() else { break };
            while self.recent.front().is_some_and(|(r, _)| *r == oldest) {
                self.recent.pop_front();
            }
            self.floor = oldest;
        }
    }

    /// The entries changed after `revision`, or `None` when the log no longer reaches back.
    pub fn since(&self, revision: u64) -> Option<BTreeSet<&Slot>> {
        if revision < self.floor {
            return None;
        }
        // Revisions rise along the log: a node that is nearly caught up reads only its tail.
        let first = self.recent.partition_point(|(r, _)| *r <= revision);
        Some(self.recent.range(first..).map(|(_, s)| s).collect())
    }
}

/// Who reads the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// Sees everything but the CA key and the join secrets.
    Manager,
    /// Sees also how only its own tasks run.
    Worker(NodeId),
}

impl Reader {
    /// The reader a node in `role` is.
    pub fn new(node: NodeId, role: Role) -> Reader {
        match role {
            Role::Manager => Reader::Manager,
            Role::Worker => Reader::Worker(node),
        }
    }

    fn role(self) -> Role {
        match self {
            Reader::Manager => Role::Manager,
            Reader::Worker(_) => Role::Worker,
        }
    }
}

/// Where a node stands: what it tells the leader when it asks for changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The revision its copy reflects (0: it has none).
    pub revision: u64,
    /// The role it was last answered as (a different one now means a resync).
    pub role: Option<Role>,
    /// Services it holds whole (it runs a task of). The leader only ever sends a service whole
    /// to a node that runs a task of it now, so a node that lies here gains nothing.
    pub whole: BTreeSet<String>,
}

/// One changed entry as the reader may see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Which entry.
    pub slot: Slot,
    /// Its value now; `None` when it is gone.
    pub value: Option<serde_json::Value>,
}

/// The answer to a [`Position`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The revision the node is at once it applied this.
    pub revision: u64,
    /// The role it was answered as.
    pub role: Role,
    /// What changed.
    pub body: DeltaBody,
}

/// Changes or a whole copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeltaBody {
    /// The entries that changed since the node's revision.
    Changes(Vec<Change>),
    /// The whole store as the node may see it: it had fallen behind the log.
    Resync(Box<ClusterState>),
}

/// Which services each node runs a task of: what a worker sees whole. Built once per revision
/// and shared by every node's answer, so a pass over 100 nodes reads the tasks once.
#[derive(Debug, Clone, Default)]
pub struct Placement(BTreeMap<String, BTreeSet<String>>);

impl Placement {
    /// The placement in store `s`.
    pub fn of(s: &ClusterState) -> Placement {
        let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for t in s.tasks.values() {
            if let Some(node) = &t.task.node_id
                && !t.task.service_id.is_empty()
            {
                by_node.entry(node.clone()).or_default().insert(t.task.service_id.clone());
            }
        }
        Placement(by_node)
    }

    /// The services that have a task on `node`.
    pub fn whole(&self, node: NodeId) -> BTreeSet<String> {
        self.0.get(&node.to_string()).cloned().unwrap_or_default()
    }
}

/// The services that have a task on `node` in store `s`: a worker sees these whole.
pub fn whole_services(s: &ClusterState, node: NodeId) -> BTreeSet<String> {
    Placement::of(s).whole(node)
}

/// Blanks what says how a service's tasks run (command, environment, working directory,
/// mounts, health command), here and in the spec it keeps for a rollback.
fn blank_service(s: &mut Service) {
    s.argv.clear();
    s.env.clear();
    s.workdir = None;
    s.mounts.clear();
    s.health = None;
    if let Some(p) = s.previous.as_mut() {
        blank_service(p);
    }
}

/// Blanks what says how a standalone task runs.
fn blank_standalone(s: &mut shoal_model::Standalone) {
    s.argv.clear();
    s.env.clear();
    s.mounts.clear();
}

fn without_secrets(c: &mut ClusterInfo) {
    c.ca_key_pem.clear();
    if let Some(crate::model::security::CaRotation::Trust { key_pem, .. }) =
        &mut c.security.ca_rotation
    {
        key_pem.clear();
    }
    c.worker_secret = [0; 16];
    c.manager_secret = [0; 16];
    c.retired_secrets.clear();
}

/// What `reader` may see of a service (`whole`: the services it sees whole). The record is
/// copied only when something is blanked; otherwise the copy shares it with the store.
fn redact_service(reader: Reader, whole: &BTreeSet<String>, s: &mut Arc<Service>) {
    if matches!(reader, Reader::Worker(_)) && !whole.contains(&s.id) {
        blank_service(Arc::make_mut(s));
    }
}

/// What `reader` may see of a task: a worker sees how only its own standalone tasks run.
fn redact_task(reader: Reader, t: &mut Arc<TaskRecord>) {
    let Reader::Worker(me) = reader else { return };
    if t.task.node_id.as_deref() != Some(me.to_string().as_str())
        && t.standalone.is_some()
        && let Some(s) = Arc::make_mut(t).standalone.as_mut()
    {
        blank_standalone(s);
    }
}

/// The whole store as `reader` may see it.
pub fn view(mut s: ClusterState, reader: Reader) -> ClusterState {
    if let Some(c) = s.cluster.as_mut() {
        without_secrets(c);
    }
    let whole = match reader {
        Reader::Worker(me) => whole_services(&s, me),
        Reader::Manager => BTreeSet::new(),
    };
    for svc in s.services.values_mut() {
        redact_service(reader, &whole, svc);
    }
    for t in s.tasks.values_mut() {
        redact_task(reader, t);
    }
    s
}

fn to_json<T: Serialize>(v: &T) -> Option<serde_json::Value> {
    // Our own types always serialise.
    serde_json::to_value(v).ok()
}

/// One entry as `reader` may see it, `None` if the store has no such entry.
fn project(
    s: &ClusterState,
    slot: &Slot,
    reader: Reader,
    whole: &BTreeSet<String>,
) -> Option<serde_json::Value> {
    match slot {
        Slot::Cluster => s.cluster.clone().and_then(|mut c| {
            without_secrets(&mut c);
            to_json(&c)
        }),
        Slot::Keyring => to_json(&s.keyring),
        Slot::Node(id) => s.nodes.get(id).and_then(to_json),
        Slot::Network(id) => s.networks.get(id).and_then(to_json),
        Slot::Service(id) => s.services.get(id).and_then(|v| {
            let mut v = v.clone();
            redact_service(reader, whole, &mut v);
            to_json(&v)
        }),
        Slot::Task(id) => s.tasks.get(id).and_then(|v| {
            let mut v = v.clone();
            redact_task(reader, &mut v);
            to_json(&v)
        }),
        Slot::Address(key) => s.ipam.get(key).and_then(to_json),
    }
}

/// The answer to a node at `pos` reading as `reader`, from the store `s` at `revision`, the log
/// of its recent changes and its [`Placement`].
pub fn delta(
    s: &ClusterState,
    revision: u64,
    log: &ChangeLog,
    placement: &Placement,
    reader: Reader,
    pos: &Position,
) -> Delta {
    let role = reader.role();
    let changed = match log.since(pos.revision) {
        Some(changed) if pos.role == Some(role) && pos.revision <= revision => changed,
        _ => {
            let state = Box::new(view(s.clone(), reader));
            return Delta { revision, role, body: DeltaBody::Resync(state) };
        }
    };
    let whole = match reader {
        Reader::Worker(me) => placement.whole(me),
        Reader::Manager => BTreeSet::new(),
    };
    let mut slots: BTreeSet<Slot> = changed.into_iter().cloned().collect();
    if matches!(reader, Reader::Worker(_)) {
        // A service the node started or stopped running a task of is resent whole or blanked.
        let moved = whole.symmetric_difference(&pos.whole);
        slots.extend(moved.map(|id| Slot::Service(id.clone())));
    }
    let changes = slots
        .into_iter()
        .map(|slot| Change { value: project(s, &slot, reader, &whole), slot })
        .collect();
    Delta { revision, role, body: DeltaBody::Changes(changes) }
}

/// Why a delta could not be applied; the mirror starts over with a resync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The delta is older than the copy.
    #[error("store delta for revision {got} is behind the copy at {have}")]
    Stale {
        /// The delta's revision.
        got: u64,
        /// The copy's.
        have: u64,
    },
    /// A value does not parse as its entry's type.
    #[error("store delta has a malformed {slot:?}: {reason}")]
    Malformed {
        /// Which entry.
        slot: Slot,
        /// The parser's complaint.
        reason: String,
    },
}

/// A node's copy of the store, kept up to date by deltas.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    revision: u64,
    role: Option<Role>,
    state: ClusterState,
}

impl Mirror {
    /// What to ask the leader with.
    pub fn position(&self, me: NodeId) -> Position {
        Position {
            revision: self.revision,
            role: self.role,
            whole: whole_services(&self.state, me),
        }
    }

    /// The revision the copy reflects (0: none yet).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The copy.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Applies `d`. On error the copy is dropped, so the next position asks for a resync.
    pub fn apply(&mut self, d: Delta) -> Result<(), WatchError> {
        let r = self.try_apply(d);
        if r.is_err() {
            *self = Mirror::default();
        }
        r
    }

    fn try_apply(&mut self, d: Delta) -> Result<(), WatchError> {
        match d.body {
            DeltaBody::Resync(state) => self.state = *state,
            DeltaBody::Changes(changes) => {
                if d.revision < self.revision || self.role != Some(d.role) {
                    return Err(WatchError::Stale { got: d.revision, have: self.revision });
                }
                for c in changes {
                    set(&mut self.state, c)?;
                }
            }
        }
        self.revision = d.revision;
        self.role = Some(d.role);
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    slot: &Slot,
    v: serde_json::Value,
) -> Result<T, WatchError> {
    serde_json::from_value(v)
        .map_err(|e| WatchError::Malformed { slot: slot.clone(), reason: e.to_string() })
}

fn put_or_remove<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// Writes one change into a copy of the store.
fn set(s: &mut ClusterState, c: Change) -> Result<(), WatchError> {
    let Change { slot, value } = c;
    match &slot {
        Slot::Cluster => s.cluster = value.map(|v| parse(&slot, v)).transpose()?,
        Slot::Keyring => {
            s.keyring = value.map(|v| parse(&slot, v)).transpose()?.unwrap_or_default();
        }
        Slot::Node(id) => {
            let v = value.map(|v| parse(&slot, v)).transpose()?;
            put_or_remove(&mut s.nodes, *id, v);
        }
        Slot::Network(id) => {
            let v = value.map(|v| parse(&slot, v)).transpose()?;
            put_or_remove(&mut s.networks, id.clone(), v);
        }
        Slot::Service(id) => {
            let v = value.map(|v| parse(&slot, v)).transpose()?;
            put_or_remove(&mut s.services, id.clone(), v);
        }
        Slot::Task(id) => {
            let v = value.map(|v| parse(&slot, v)).transpose()?;
            put_or_remove(&mut s.tasks, id.clone(), v);
        }
        Slot::Address(key) => {
            let v = value.map(|v| parse(&slot, v)).transpose()?;
            put_or_remove(&mut s.ipam, key.clone(), v);
        }
    }
    Ok(())
}
