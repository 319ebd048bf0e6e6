//! The sans-I/O gossip core: foca's SWIM plus node metadata and the replicated tables.
//!
//! Feed it with [`Core::handle_udp`], [`Core::handle_sync`] and [`Core::handle_timeout`];
//! drain [`Core::poll_transmit`] and [`Core::poll_event`]; sleep until [`Core::poll_timeout`].
//! Time is always passed in; randomness comes from the seed in [`CoreOptions`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{Foca, Member, Message, OwnedNotification, PostcardCodec, State as SwimState, Timer};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::config::CoreConfig;
use crate::keyring::{Keyring, KeyringError};
use crate::metrics::{Counters, DropReason, MemberCounts, Metrics};
use crate::msg::{self, Item, NodeRecord, WireEntry};
use crate::table::{Merge, Store};
use crate::types::{EntryKey, Identity, NodeId, NodeMeta, Version};
use crate::wire::Kind;

/// How long a relayed (not held) entry's version is remembered to stop re-relaying it.
const RELAY_MEMORY: Duration = Duration::from_secs(300);
/// Most members accepted in one sync message.
const MAX_SYNC_MEMBERS: usize = 100_000;

/// Who this core is and how it starts.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Address the others reach us at.
    pub addr: SocketAddr,
    /// Stable node id.
    pub node: NodeId,
    /// Process generation: larger than any previous run of this node (wall-clock ms works).
    pub generation: u64,
    /// Initial metadata.
    pub meta: NodeMeta,
    /// Cluster keys, primary first.
    pub keys: Vec<[u8; 32]>,
    /// Seed of every random choice (and of the nonce prefix): use a random one in production.
    pub seed: u64,
    /// Protocol figures.
    pub config: CoreConfig,
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// A sealed SWIM datagram for UDP.
    Udp {
        /// Destination.
        to: SocketAddr,
        /// Sealed frame.
        data: Vec<u8>,
    },
    /// A sealed full-state push for TCP: connect, send it length-prefixed, read the
    /// length-prefixed reply and feed it to [`Core::handle_sync`].
    Sync {
        /// Destination (same port as UDP).
        to: SocketAddr,
        /// Sealed frame.
        data: Vec<u8>,
    },
}

/// SWIM state of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe cycle; will be declared down unless it refutes.
    Suspect,
    /// Declared down (or left).
    Down,
}

/// A member as consumers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Its SWIM identity (address, node id, generation).
    pub id: Identity,
    /// SWIM state.
    pub state: MemberState,
    /// SWIM incarnation (refutation counter).
    pub incarnation: u16,
    /// Metadata, once its record arrived.
    pub meta: Option<NodeMeta>,
    /// Networks it participates in.
    pub networks: Vec<String>,
}

/// A change of a visible table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryChange {
    /// Created, updated, or visible again (its owner came back).
    Upserted {
        /// Owning node.
        owner: NodeId,
        /// New value.
        value: Bytes,
    },
    /// Deleted, or withdrawn because its owner is down or restarted.
    Deleted {
        /// Owning node.
        owner: NodeId,
    },
}

/// What consumers are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member joined or came back.
    MemberUp(MemberView),
    /// A member was declared down or left.
    MemberDown(MemberView),
    /// A live member's metadata or networks changed.
    MemberUpdated(MemberView),
    /// A visible entry changed.
    Entry {
        /// Which entry.
        key: EntryKey,
        /// How.
        change: EntryChange,
    },
}

/// A table operation that was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The node has not joined the entry's network.
    #[error("not a participant of network `{0}`; join it first")]
    NotInNetwork(String),
    /// A name or value over its limit.
    #[error("{field} is {len} bytes, limit {max}")]
    TooLarge {
        /// Which part.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No live entry under that key.
    #[error("no entry {0:?}")]
    NotFound(EntryKey),
    /// Entries are deleted by their owner only.
    #[error("entry {key:?} is owned by node {owner}")]
    NotOwner {
        /// The entry.
        key: EntryKey,
        /// Its owner.
        owner: NodeId,
    },
    /// foca refused the broadcast (should not happen within the limits).
    #[error("broadcast refused: {0}")]
    Broadcast(String),
}

/// Broadcast dedup key: a newer version of the same thing replaces an older one in foca's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BKey {
    Entry(EntryKey, Version),
    Node(NodeId, (u64, u64)),
}

impl foca::Invalidates for BKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (BKey::Entry(k, v), BKey::Entry(ok, ov)) => k == ok && v >= ov,
            (BKey::Node(n, v), BKey::Node(on, ov)) => n == on && v >= ov,
            _ => false,
        }
    }
}

/// State shared by the core and foca's broadcast handler (foca owns the handler and offers no
/// access to it, so both hold this; the core never holds the lock across a foca call).
#[derive(Debug)]
struct State {
    me: Identity,
    cfg: CoreConfig,
    now: Instant,
    clock: u64,
    store: Store,
    networks: BTreeSet<String>,
    relay: BTreeMap<EntryKey, (Version, Instant)>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    live: BTreeMap<NodeId, Identity>,
    latest_gen: BTreeMap<NodeId, u64>,
    was_down: BTreeSet<NodeId>,
    events: VecDeque<Event>,
    counters: Counters,
}

impl State {
    fn owner_live(&self, node: NodeId, generation: u64) -> bool {
        if node == self.me.node {
            generation == self.me.generation
        } else {
            self.live.get(&node).is_some_and(|id| id.generation == generation)
        }
    }

    fn view(&self, key: &EntryKey) -> Option<(NodeId, Bytes)> {
        let e = self.store.get(key)?;
        let v = e.value.as_ref()?;
        self.owner_live(e.version.owner, e.version.generation).then(|| (e.version.owner, v.clone()))
    }

    fn diff(&mut self, key: &EntryKey, before: Option<(NodeId, Bytes)>) {
        let after = self.view(key);
        if before == after {
            return;
        }
        let change = match (after, before) {
            (Some((owner, value)), _) => EntryChange::Upserted { owner, value },
            (None, Some((owner, _))) => EntryChange::Deleted { owner },
            (None, None) => return,
        };
        self.events.push_back(Event::Entry { key: key.clone(), change });
    }

    /// Runs `f` and emits events for the visible changes of `node`'s entries.
    fn around_owner(&mut self, node: NodeId, f: impl FnOnce(&mut State)) {
        let keys = self.store.keys_owned_by(node);
        let before: Vec<_> = keys.iter().map(|k| self.view(k)).collect();
        f(self);
        for (k, b) in keys.iter().zip(before) {
            self.diff(k, b);
        }
    }

    /// A newer process generation of `node` exists: its older entries die with the old process.
    fn learn_generation(&mut self, node: NodeId, generation: u64) {
        if node == self.me.node {
            return;
        }
        let known = self.latest_gen.get(&node).copied();
        if known.is_some_and(|g| g >= generation) {
            return;
        }
        self.latest_gen.insert(node, generation);
        let old = self
            .store
            .remove_where(|_, e| e.version.owner == node && e.version.generation < generation);
        for (key, e) in old {
            if e.value.is_some() && self.owner_live(node, e.version.generation) {
                self.events
                    .push_back(Event::Entry { key, change: EntryChange::Deleted { owner: node } });
            }
        }
        self.relay.retain(|_, (v, _)| !(v.owner == node && v.generation < generation));
    }

    fn stale_generation(&self, node: NodeId, generation: u64) -> bool {
        if node == self.me.node {
            return generation != self.me.generation;
        }
        self.latest_gen.get(&node).is_some_and(|g| *g > generation)
    }

    fn valid_entry(&self, e: &WireEntry) -> bool {
        let n = self.cfg.max_name_len;
        e.key.table.len() <= n
            && e.key.network.len() <= n
            && e.key.key.len() <= n
            && !e.key.table.is_empty()
            && !e.key.network.is_empty()
            && e.value.as_ref().is_none_or(|v| v.len() <= self.cfg.max_value_len)
    }

    fn valid_record(&self, r: &NodeRecord) -> bool {
        r.meta.name.len() <= 255
            && r.meta.id.len() <= 255
            && r.networks.len() <= 4096
            && r.networks.iter().all(|n| !n.is_empty() && n.len() <= self.cfg.max_name_len)
    }

    /// Applies a table event; `Some` when it is new and should be relayed.
    fn apply_entry(&mut self, e: WireEntry, relay: bool) -> Option<BKey> {
        if !self.valid_entry(&e) {
            self.counters.drop(DropReason::Malformed);
            return None;
        }
        self.clock = self.clock.max(e.version.ltime);
        self.learn_generation(e.version.owner, e.version.generation);
        if self.stale_generation(e.version.owner, e.version.generation) {
            self.counters.drop(DropReason::Stale);
            return None;
        }
        let bkey = BKey::Entry(e.key.clone(), e.version);
        if !self.networks.contains(&e.key.network) {
            if !relay {
                return None;
            }
            match self.relay.get(&e.key) {
                Some((v, _)) if *v == e.version => {
                    self.counters.duplicates += 1;
                    None
                }
                Some((v, _)) if *v > e.version => {
                    self.counters.drop(DropReason::Stale);
                    None
                }
                _ => {
                    self.relay.insert(e.key, (e.version, self.now));
                    Some(bkey)
                }
            }
        } else {
            let before = self.view(&e.key);
            match self.store.merge(&e.key, e.version, e.value.map(Bytes::from), self.now) {
                Merge::Applied => {
                    self.diff(&e.key, before);
                    Some(bkey)
                }
                Merge::Duplicate => {
                    self.counters.duplicates += 1;
                    None
                }
                Merge::Stale => {
                    self.counters.drop(DropReason::Stale);
                    None
                }
            }
        }
    }

    /// Applies a node record; `Some` when it is new.
    fn apply_record(&mut self, r: NodeRecord, local: bool) -> Option<BKey> {
        if !self.valid_record(&r) {
            self.counters.drop(DropReason::Malformed);
            return None;
        }
        if r.node == self.me.node && !local {
            // Our own record echoed back, or a previous run's: ours is authoritative.
            return None;
        }
        self.learn_generation(r.node, r.generation);
        if let Some(cur) = self.nodes.get(&r.node) {
            if cur.order() == r.order() {
                self.counters.duplicates += 1;
                return None;
            }
            if cur.order() > r.order() {
                self.counters.drop(DropReason::Stale);
                return None;
            }
        }
        let key = BKey::Node(r.node, r.order());
        let node = r.node;
        self.nodes.insert(node, r);
        if let Some(id) = self.live.get(&node).cloned() {
            let view = self.member_view(&id, MemberState::Alive, 0);
            self.events.push_back(Event::MemberUpdated(view));
        }
        Some(key)
    }

    fn apply_item(&mut self, item: Item, local: bool) -> Option<BKey> {
        match item {
            Item::Entry(e) => self.apply_entry(e, true),
            Item::Node(r) => self.apply_record(r, local),
        }
    }

    fn member_view(&self, id: &Identity, state: MemberState, incarnation: u16) -> MemberView {
        let rec = self.nodes.get(&id.node).filter(|r| r.generation == id.generation);
        MemberView {
            id: id.clone(),
            state,
            incarnation,
            meta: rec.map(|r| r.meta.clone()),
            networks: rec.map(|r| r.networks.clone()).unwrap_or_default(),
        }
    }

    fn member_up(&mut self, id: &Identity) {
        self.learn_generation(id.node, id.generation);
        if self.stale_generation(id.node, id.generation) || id.node == self.me.node {
            return;
        }
        if self.live.get(&id.node) == Some(id) {
            return;
        }
        let node = id.node;
        let new = id.clone();
        self.around_owner(node, |s| {
            s.live.insert(node, new);
        });
        let view = self.member_view(id, MemberState::Alive, 0);
        self.events.push_back(Event::MemberUp(view));
    }

    fn member_down(&mut self, id: &Identity) {
        if self.live.get(&id.node) != Some(id) {
            return;
        }
        self.around_owner(id.node, |s| {
            s.live.remove(&id.node);
        });
        self.was_down.insert(id.node);
        let view = self.member_view(id, MemberState::Down, 0);
        self.events.push_back(Event::MemberDown(view));
    }
}

/// foca's custom broadcast handler: decodes items and merges them into the shared state.
struct Handler(Arc<Mutex<State>>);

/// Never returned: malformed items are counted and skipped so the rest of a packet still counts.
#[derive(Debug, thiserror::Error)]
#[error("unreachable broadcast error")]
struct NoError;

impl foca::BroadcastHandler<Identity> for Handler {
    type Key = BKey;
    type Error = NoError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Identity>,
    ) -> Result<Option<BKey>, NoError> {
        let mut st = lock(&self.0);
        let max = st.cfg.max_datagram;
        match msg::decode_item(data, max) {
            Ok(item) => Ok(st.apply_item(item, sender.is_none())),
            Err(_) => {
                st.counters.drop(DropReason::Malformed);
                Ok(None)
            }
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Only this thread ever holds the lock and no code path panics while holding it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Collects what foca asks for during one call.
#[derive(Default)]
struct Rt {
    send: Vec<(Identity, Vec<u8>)>,
    timers: Vec<(Duration, Timer<Identity>)>,
    notes: Vec<OwnedNotification<Identity>>,
}

impl foca::Runtime<Identity> for Rt {
    fn notify(&mut self, n: foca::Notification<'_, Identity>) {
        self.notes.push(n.to_owned());
    }
    fn send_to(&mut self, to: Identity, data: &[u8]) {
        self.send.push((to, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<Identity>, after: Duration) {
        self.timers.push((after, event));
    }
}

#[derive(Debug)]
enum Tick {
    Foca(Timer<Identity>),
    Sync,
    Reap,
}

/// The gossip state machine of one node.
pub struct Core {
    cfg: CoreConfig,
    foca: Foca<Identity, PostcardCodec, SmallRng, Handler>,
    state: Arc<Mutex<State>>,
    rt: Rt,
    timers: BTreeMap<(Instant, u64), Tick>,
    timer_seq: u64,
    keyring: Keyring,
    rng: SmallRng,
    quiet: bool,
    outbox: VecDeque<Transmit>,
    sized_for: (u8, Duration),
    pings: HashMap<(SocketAddr, u8), Instant>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("id", self.foca.identity()).finish_non_exhaustive()
    }
}

/// Why a core could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A config field is out of range.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The keyring is unusable.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl Core {
    /// A core that has joined nobody yet.
    pub fn new(opts: CoreOptions, now: Instant) -> Result<Core, CoreError> {
        opts.config.validate()?;
        let mut rng = SmallRng::seed_from_u64(opts.seed);
        let keyring = Keyring::new(&opts.keys, rng.random())?;
        let me =
            Identity { addr: opts.addr, node: opts.node, generation: opts.generation, bump: 0 };
        let state = Arc::new(Mutex::new(State {
            me: me.clone(),
            cfg: opts.config.clone(),
            now,
            clock: 0,
            store: Store::new(),
            networks: BTreeSet::new(),
            relay: BTreeMap::new(),
            nodes: BTreeMap::new(),
            live: BTreeMap::new(),
            latest_gen: BTreeMap::new(),
            was_down: BTreeSet::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
        }));
        let foca = Foca::with_custom_broadcast(
            me,
            opts.config.foca(1),
            SmallRng::seed_from_u64(rng.random()),
            PostcardCodec,
            Handler(state.clone()),
        );
        let cfg = opts.config;
        let sized_for = (cfg.retransmits(1), cfg.suspicion_timeout(1));
        let mut core = Core {
            foca,
            state,
            rt: Rt::default(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            keyring,
            rng,
            quiet: false,
            outbox: VecDeque::new(),
            sized_for,
            pings: HashMap::new(),
            cfg,
        };
        let first_sync = core.cfg.sync_interval.mul_f64(0.5 + core.rng.random::<f64>() * 0.5);
        core.schedule(now + first_sync, Tick::Sync);
        core.schedule(now + core.cfg.reap_interval, Tick::Reap);
        core.publish_record(now, opts.meta, Vec::new());
        Ok(core)
    }

    /// Our current SWIM identity.
    pub fn identity(&self) -> &Identity {
        self.foca.identity()
    }

    /// Contacts seeds: a SWIM announce over UDP and a full-state push over TCP to each.
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) {
        self.set_now(now);
        for &addr in seeds {
            if addr == self.identity().addr {
                continue;
            }
            let placeholder = Identity { addr, node: NodeId(0), generation: 0, bump: 0 };
            // Announce is accepted by whoever holds that address, whatever its node id.
            if let Err(e) = self.foca.announce(placeholder, &mut self.rt) {
                tracing::debug!(%addr, error = %e, "announce failed");
            }
            self.push_sync(addr, None);
        }
        self.flush(now);
    }

    /// Restores membership knowledge without gossiping it (a saved view, or a simulation that
    /// starts from a formed cluster).
    pub fn restore_members(&mut self, now: Instant, ids: impl IntoIterator<Item = Identity>) {
        self.set_now(now);
        let members = ids.into_iter().map(Member::alive);
        if let Err(e) = self.foca.apply_many(members, false, &mut self.rt) {
            tracing::debug!(error = %e, "restore_members failed");
        }
        self.quiet = true;
        self.flush(now);
        self.quiet = false;
    }

    /// Restores node records without gossiping them (a saved view, or a simulation that starts
    /// from a formed cluster).
    pub fn restore_records(&mut self, now: Instant, records: impl IntoIterator<Item = NodeRecord>) {
        self.set_now(now);
        let mut st = lock(&self.state);
        for r in records {
            st.apply_record(r, false);
        }
    }

    /// Our own current node record.
    pub fn own_node_record(&self) -> Option<NodeRecord> {
        let st = lock(&self.state);
        st.nodes.get(&st.me.node).cloned()
    }

    /// Leaves the cluster gracefully (the others see us down at once).
    pub fn leave(&mut self, now: Instant) {
        self.set_now(now);
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "leave failed");
        }
        self.flush(now);
    }

    /// A datagram arrived on the gossip UDP socket.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.set_now(now);
        {
            let mut st = lock(&self.state);
            st.counters.udp_in += 1;
            st.counters.udp_bytes_in += data.len() as u64;
            if data.len() > self.cfg.max_datagram {
                st.counters.drop(DropReason::TooBig);
                return;
            }
        }
        let plain = match self.keyring.open(data) {
            Ok((Kind::Swim, plain)) => plain,
            Ok(_) => return self.count_drop(DropReason::WrongKind),
            Err(e) => {
                tracing::trace!(%from, error = %e, "dropped datagram");
                return self.count_drop(e.into());
            }
        };
        if let Err(e) = self.foca.handle_data(&plain, &mut self.rt) {
            let reason = match e {
                foca::Error::DataTooBig => DropReason::TooBig,
                foca::Error::MalformedPacket
                | foca::Error::Decode(_)
                | foca::Error::CustomBroadcast(_) => DropReason::Malformed,
                _ => DropReason::Rejected,
            };
            tracing::trace!(%from, error = %e, "foca refused datagram");
            self.count_drop(reason);
        }
        self.flush(now);
    }

    /// A sealed sync frame arrived over TCP: a request (returns the sealed reply to send back)
    /// or the reply to our own push (returns `None`).
    pub fn handle_sync(&mut self, now: Instant, from: SocketAddr, frame: &[u8]) -> Option<Vec<u8>> {
        self.set_now(now);
        {
            let mut st = lock(&self.state);
            st.counters.sync_in += 1;
            st.counters.sync_bytes_in += frame.len() as u64;
            if frame.len() > self.cfg.max_sync_frame {
                st.counters.drop(DropReason::TooBig);
                return None;
            }
        }
        let (kind, plain) = match self.keyring.open(frame) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(%from, error = %e, "dropped sync frame");
                self.count_drop(e.into());
                return None;
            }
        };
        if kind == Kind::Swim {
            self.count_drop(DropReason::WrongKind);
            return None;
        }
        let sync = match msg::decode_sync(&plain, self.cfg.max_sync_frame) {
            Ok(s) if s.members.len() <= MAX_SYNC_MEMBERS => s,
            Ok(_) => {
                self.count_drop(DropReason::TooBig);
                return None;
            }
            Err(e) => {
                tracing::debug!(%from, error = %e, "malformed sync");
                self.count_drop(DropReason::Malformed);
                return None;
            }
        };
        // foca finds members by a linear scan, so hand it only what differs from our view:
        // a sync of a large, quiet cluster then costs O(N) instead of O(N^2).
        let changed: Vec<Member<Identity>> = {
            let known: HashMap<&Identity, (u16, SwimState)> = self
                .foca
                .iter_membership_state()
                .map(|m| (m.id(), (m.incarnation(), m.state())))
                .collect();
            let me = self.foca.identity();
            sync.members
                .into_iter()
                .chain(std::iter::once(Member::alive(sync.from.clone())))
                .filter(|m| {
                    m.id() == me || known.get(m.id()) != Some(&(m.incarnation(), m.state()))
                })
                .collect()
        };
        if let Err(e) = self.foca.apply_many(changed.into_iter(), true, &mut self.rt) {
            tracing::debug!(%from, error = %e, "sync membership refused");
        }
        {
            let mut st = lock(&self.state);
            for r in sync.nodes {
                st.apply_record(r, false);
            }
            for e in sync.entries {
                st.apply_entry(e, false);
            }
        }
        let reply = (kind == Kind::SyncRequest).then(|| {
            let plain = self.build_sync(Some(&sync.networks));
            let sealed = self.keyring.seal(Kind::SyncReply, &plain);
            let mut st = lock(&self.state);
            st.counters.sync_out += 1;
            st.counters.sync_bytes_out += sealed.len() as u64;
            sealed
        });
        self.flush(now);
        reply
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.set_now(now);
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let tick = entry.remove();
            match tick {
                Tick::Foca(t) => {
                    if let Err(e) = self.foca.handle_timer(t, &mut self.rt) {
                        tracing::trace!(error = %e, "foca timer");
                    }
                }
                Tick::Sync => {
                    if let Some(peer) = self.pick_sync_peer() {
                        self.push_sync(peer, None);
                    }
                    self.schedule(now + self.cfg.sync_interval, Tick::Sync);
                }
                Tick::Reap => {
                    self.reap(now);
                    self.schedule(now + self.cfg.reap_interval, Tick::Reap);
                }
            }
            self.flush(now);
        }
    }

    /// When [`Core::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(t, _)| *t)
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// The next event for consumers.
    pub fn poll_event(&mut self) -> Option<Event> {
        lock(&self.state).events.pop_front()
    }

    /// Writes `value` under `key` (owned by this node) and gossips it.
    pub fn write(
        &mut self,
        now: Instant,
        key: EntryKey,
        value: impl Into<Bytes>,
    ) -> Result<(), TableError> {
        let value = value.into();
        self.check_key(&key)?;
        if value.len() > self.cfg.max_value_len {
            return Err(TableError::TooLarge {
                field: "value",
                len: value.len(),
                max: self.cfg.max_value_len,
            });
        }
        self.local_entry(now, key, Some(value.to_vec()))
    }

    /// Deletes our entry under `key` (a tombstone, reaped later).
    pub fn delete(&mut self, now: Instant, key: &EntryKey) -> Result<(), TableError> {
        self.check_key(key)?;
        {
            let st = lock(&self.state);
            match st.store.get(key) {
                Some(e) if e.value.is_some() => {
                    if e.version.owner != st.me.node {
                        return Err(TableError::NotOwner {
                            key: key.clone(),
                            owner: e.version.owner,
                        });
                    }
                }
                _ => return Err(TableError::NotFound(key.clone())),
            }
        }
        self.local_entry(now, key.clone(), None)
    }

    /// Starts participating in `network`: holds its tables and pulls them from a peer.
    pub fn join_network(&mut self, now: Instant, network: &str) -> Result<(), TableError> {
        if network.is_empty() || network.len() > self.cfg.max_name_len {
            return Err(TableError::TooLarge {
                field: "network",
                len: network.len(),
                max: self.cfg.max_name_len,
            });
        }
        let (meta, mut nets) = self.own_record();
        if !lock(&self.state).networks.insert(network.to_owned()) {
            return Ok(());
        }
        nets.push(network.to_owned());
        self.publish_record(now, meta, nets);
        let peers = self.peers_in(network);
        let peer = if peers.is_empty() {
            self.pick_sync_peer()
        } else {
            Some(peers[self.rng.random_range(0..peers.len())])
        };
        if let Some(p) = peer {
            self.push_sync(p, None);
        }
        self.flush(now);
        Ok(())
    }

    /// Stops participating in `network`: deletes our entries there and drops its tables.
    pub fn leave_network(&mut self, now: Instant, network: &str) {
        let own: Vec<EntryKey> = {
            let st = lock(&self.state);
            if !st.networks.contains(network) {
                return;
            }
            st.store
                .iter()
                .filter(|(k, e)| {
                    k.network == network && e.version.owner == st.me.node && e.value.is_some()
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in own {
            let _ = self.local_entry(now, k, None);
        }
        {
            let mut st = lock(&self.state);
            st.networks.remove(network);
            let gone = st.store.remove_where(|k, _| k.network == network);
            for (key, e) in gone {
                if e.value.is_some() && st.owner_live(e.version.owner, e.version.generation) {
                    let change = EntryChange::Deleted { owner: e.version.owner };
                    st.events.push_back(Event::Entry { key, change });
                }
            }
        }
        let (meta, nets) = self.own_record();
        let nets = nets.into_iter().filter(|n| n != network).collect();
        self.publish_record(now, meta, nets);
        self.flush(now);
    }

    /// Replaces our metadata and gossips it.
    pub fn update_meta(&mut self, now: Instant, meta: NodeMeta) {
        let (_, nets) = self.own_record();
        self.publish_record(now, meta, nets);
        self.flush(now);
    }

    /// The visible value under `key` and its owner.
    pub fn get(&self, key: &EntryKey) -> Option<(NodeId, Bytes)> {
        lock(&self.state).view(key)
    }

    /// All visible entries (live, owner alive), in key order.
    pub fn entries(&self) -> Vec<(EntryKey, NodeId, Bytes)> {
        let st = lock(&self.state);
        st.store.iter().filter_map(|(k, _)| st.view(k).map(|(o, v)| (k.clone(), o, v))).collect()
    }

    /// Every stored entry with its version, tombstones and hidden ones included (diagnostics).
    pub fn stored(&self) -> Vec<(EntryKey, Version, Option<Bytes>)> {
        lock(&self.state).store.digest()
    }

    /// Networks this node participates in.
    pub fn networks(&self) -> Vec<String> {
        lock(&self.state).networks.iter().cloned().collect()
    }

    /// All members foca remembers, plus ourselves first.
    pub fn members(&self) -> Vec<MemberView> {
        let st = lock(&self.state);
        let mut out = vec![st.member_view(&st.me, MemberState::Alive, 0)];
        for m in self.foca.iter_membership_state() {
            let state = match m.state() {
                SwimState::Alive => MemberState::Alive,
                SwimState::Suspect => MemberState::Suspect,
                SwimState::Down => MemberState::Down,
            };
            out.push(st.member_view(m.id(), state, m.incarnation()));
        }
        out
    }

    /// Members by state (self counted alive).
    pub fn member_counts(&self) -> MemberCounts {
        let mut c = MemberCounts { alive: 1, ..MemberCounts::default() };
        for m in self.foca.iter_membership_state() {
            match m.state() {
                SwimState::Alive => c.alive += 1,
                SwimState::Suspect => c.suspect += 1,
                SwimState::Down => c.down += 1,
            }
        }
        c
    }

    /// Ids of the active (alive or suspect) members, ourselves excluded.
    pub fn active_members(&self) -> Vec<Identity> {
        self.foca.iter_members().map(|m| m.id().clone()).collect()
    }

    /// A copy of every metric.
    pub fn metrics(&self) -> Metrics {
        let st = lock(&self.state);
        let entries = st.store.iter().filter(|(k, _)| st.view(k).is_some()).count();
        Metrics { members: self.member_counts(), counters: st.counters.clone(), entries }
    }

    /// The traffic and drop counters alone (cheap).
    pub fn counters(&self) -> Counters {
        lock(&self.state).counters.clone()
    }

    /// The keyring, to add, promote or remove keys at runtime.
    pub fn keyring_mut(&mut self) -> &mut Keyring {
        &mut self.keyring
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn set_now(&mut self, now: Instant) {
        lock(&self.state).now = now;
    }

    /// Counts a message the driver refused before the core saw it (e.g. an oversized TCP frame).
    pub fn count_dropped(&mut self, reason: DropReason) {
        self.count_drop(reason);
    }

    fn count_drop(&mut self, reason: DropReason) {
        lock(&self.state).counters.drop(reason);
    }

    fn schedule(&mut self, at: Instant, tick: Tick) {
        self.timer_seq += 1;
        self.timers.insert((at, self.timer_seq), tick);
    }

    fn check_key(&self, key: &EntryKey) -> Result<(), TableError> {
        let max = self.cfg.max_name_len;
        for (field, s) in [("table", &key.table), ("network", &key.network), ("key", &key.key)] {
            if s.len() > max || (field != "key" && s.is_empty()) {
                return Err(TableError::TooLarge { field, len: s.len(), max });
            }
        }
        if !lock(&self.state).networks.contains(&key.network) {
            return Err(TableError::NotInNetwork(key.network.clone()));
        }
        Ok(())
    }

    fn local_entry(
        &mut self,
        now: Instant,
        key: EntryKey,
        value: Option<Vec<u8>>,
    ) -> Result<(), TableError> {
        self.set_now(now);
        let item = {
            let mut st = lock(&self.state);
            st.clock += 1;
            let version =
                Version { ltime: st.clock, owner: st.me.node, generation: st.me.generation };
            Item::Entry(WireEntry { key, version, value })
        };
        let bytes = msg::encode(&item);
        // The handler merges it (sender None) and foca queues it for dissemination.
        self.foca.add_broadcast(&bytes).map_err(|e| TableError::Broadcast(e.to_string()))?;
        self.flush(now);
        Ok(())
    }

    fn own_record(&self) -> (NodeMeta, Vec<String>) {
        let st = lock(&self.state);
        match st.nodes.get(&st.me.node) {
            Some(r) => (r.meta.clone(), r.networks.clone()),
            None => (NodeMeta::default(), st.networks.iter().cloned().collect()),
        }
    }

    fn publish_record(&mut self, now: Instant, meta: NodeMeta, networks: Vec<String>) {
        self.set_now(now);
        let rec = {
            let st = lock(&self.state);
            let version = st.nodes.get(&st.me.node).map_or(1, |r| r.version + 1);
            NodeRecord { node: st.me.node, generation: st.me.generation, version, meta, networks }
        };
        if self.foca.num_members() == 0 {
            // Alone: nobody to tell. The join's push-pull carries it, and becoming active
            // republishes it with a retransmit budget sized for the cluster we joined.
            lock(&self.state).apply_record(rec, true);
            return;
        }
        if let Err(e) = self.foca.add_broadcast(&msg::encode(&Item::Node(rec))) {
            tracing::warn!(error = %e, "node record too large to gossip");
        }
    }

    fn peers_in(&self, network: &str) -> Vec<SocketAddr> {
        let st = lock(&self.state);
        st.live
            .values()
            .filter(|id| {
                st.nodes.get(&id.node).is_some_and(|r| r.networks.iter().any(|n| n == network))
            })
            .map(|id| id.addr)
            .collect()
    }

    fn pick_sync_peer(&mut self) -> Option<SocketAddr> {
        let mine: Vec<String> = lock(&self.state).networks.iter().cloned().collect();
        let mut sharing: Vec<SocketAddr> = Vec::new();
        for n in &mine {
            sharing.extend(self.peers_in(n));
        }
        sharing.sort();
        sharing.dedup();
        let pool = if sharing.is_empty() {
            self.foca.iter_members().map(|m| m.id().addr).collect()
        } else {
            sharing
        };
        if pool.is_empty() {
            return None;
        }
        Some(pool[self.rng.random_range(0..pool.len())])
    }

    fn build_sync(&self, only: Option<&[String]>) -> Vec<u8> {
        let members: Vec<Member<Identity>> = self.foca.iter_membership_state().cloned().collect();
        let st = lock(&self.state);
        let wanted = |net: &str| only.is_none_or(|o| o.iter().any(|n| n == net));
        let entries = st
            .store
            .iter()
            .filter(|(k, _)| wanted(&k.network))
            .map(|(k, e)| WireEntry {
                key: k.clone(),
                version: e.version,
                value: e.value.as_ref().map(|v| v.to_vec()),
            })
            .collect();
        let sync = msg::Sync {
            from: st.me.clone(),
            members,
            nodes: st.nodes.values().cloned().collect(),
            networks: st.networks.iter().cloned().collect(),
            entries,
        };
        msg::encode(&sync)
    }

    fn push_sync(&mut self, to: SocketAddr, only: Option<&[String]>) {
        let plain = self.build_sync(only);
        let data = self.keyring.seal(Kind::SyncRequest, &plain);
        {
            let mut st = lock(&self.state);
            st.counters.sync_out += 1;
            st.counters.sync_bytes_out += data.len() as u64;
        }
        self.outbox.push_back(Transmit::Sync { to, data });
    }

    fn reap(&mut self, now: Instant) {
        let mut st = lock(&self.state);
        let age = st.cfg.tombstone_reap;
        st.store.reap(now, age);
        st.relay.retain(|_, (_, t)| now.saturating_duration_since(*t) < RELAY_MEMORY);
        self.pings.retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(10));
    }

    /// Turns what foca asked for into transmits, timers and state changes.
    fn flush(&mut self, now: Instant) {
        let rt = std::mem::take(&mut self.rt);
        for (after, t) in rt.timers {
            self.schedule(now + after, Tick::Foca(t));
        }
        let mut membership_changed = false;
        let mut republish = false;
        for n in rt.notes {
            match n {
                OwnedNotification::MemberUp(id) => {
                    membership_changed = true;
                    let returning = {
                        let mut st = lock(&self.state);
                        let back = st.was_down.remove(&id.node);
                        st.member_up(&id);
                        back && !self.quiet
                    };
                    // A member back from a partition or a false death: exchange full state with
                    // it now rather than at the next periodic sync (NetworkDB's reconnect sync).
                    if returning {
                        self.push_sync(id.addr, None);
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    membership_changed = true;
                    lock(&self.state).member_down(&id);
                }
                OwnedNotification::Rename(old, new) => {
                    membership_changed = true;
                    let mut st = lock(&self.state);
                    if old.node != new.node {
                        st.member_down(&old);
                    }
                    st.member_up(&new);
                }
                OwnedNotification::Rejoin(new) => {
                    tracing::info!(
                        bump = new.bump,
                        "declared down by peers; rejoined with a renewed identity"
                    );
                    lock(&self.state).me = new;
                    republish = true;
                }
                // Joined: now that foca knows the cluster's size, spread our record again with
                // a retransmit count sized for it.
                OwnedNotification::Active => republish = true,
                OwnedNotification::DataSent(h) => {
                    if let Message::Ping(n) = h.message {
                        self.pings.insert((h.dst.addr, n), now);
                    }
                }
                OwnedNotification::DataReceived(h) => {
                    if let Message::Ack(n) = h.message
                        && let Some(sent) = self.pings.remove(&(h.src.addr, n))
                    {
                        lock(&self.state).counters.rtt(now.saturating_duration_since(sent));
                    }
                }
                OwnedNotification::Idle
                | OwnedNotification::Defunct
                | OwnedNotification::ProbeFailed(..) => {}
            }
        }
        if membership_changed {
            self.resize();
        }
        if republish && !self.quiet {
            let (meta, nets) = self.own_record();
            self.publish_record(now, meta, nets);
        }
        let rt_left = std::mem::take(&mut self.rt);
        let mut sends = rt.send;
        sends.extend(rt_left.send);
        for (after, t) in rt_left.timers {
            self.schedule(now + after, Tick::Foca(t));
        }
        let mut st = lock(&self.state);
        for (to, data) in sends {
            let sealed = self.keyring.seal(Kind::Swim, &data);
            st.counters.udp_out += 1;
            st.counters.udp_bytes_out += sealed.len() as u64;
            self.outbox.push_back(Transmit::Udp { to: to.addr, data: sealed });
        }
    }

    /// Scales retransmissions and the suspicion timeout with the cluster, as memberlist does.
    fn resize(&mut self) {
        let n = self.foca.num_members() + 1;
        let want = (self.cfg.retransmits(n), self.cfg.suspicion_timeout(n));
        if want != self.sized_for {
            self.sized_for = want;
            if let Err(e) = self.foca.set_config(self.cfg.foca(n)) {
                tracing::warn!(error = %e, "foca refused resized config");
            }
        }
    }
}
