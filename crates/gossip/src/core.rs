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
use crate::msg::{self, Check, Item, NodeRecord, Suspect, WireEntry};
use crate::table::{Merge, Store};
use crate::types::{EntryKey, Identity, NodeId, NodeMeta, Version};
use crate::wire::Kind;

/// How long a relayed (not held) entry's version is remembered to stop re-relaying it.
const RELAY_MEMORY: Duration = Duration::from_secs(300);
/// Most members accepted in one sync message.
const MAX_SYNC_MEMBERS: usize = 100_000;
/// Asks per suspicion check, spread over the probe timeout (a lost datagram is not a death).
const CHECK_TRIES: u32 = 3;

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
    /// This node owns as many entries as a member may.
    #[error("this node owns {max} table entries already, the most a member may")]
    TooMany {
        /// The limit (`max_entries_per_owner`).
        max: usize,
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
    Suspect(Identity, u16, NodeId),
}

impl foca::Invalidates for BKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (BKey::Entry(k, v), BKey::Entry(ok, ov)) => k == ok && v >= ov,
            (BKey::Node(n, v), BKey::Node(on, ov)) => n == on && v >= ov,
            (BKey::Suspect(s, i, a), BKey::Suspect(os, oi, oa)) => s == os && a == oa && i >= oi,
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
    /// Lifeguard suspicions in progress, by suspect.
    suspicions: BTreeMap<Identity, Suspicion>,
    /// Suspicions that ended (refuted at that incarnation, or `u16::MAX`: down): accusations
    /// at or below it are stale.
    settled: BTreeMap<Identity, (u16, Instant)>,
    /// Suspects with new accusations, for the core to act on after the current foca call.
    suspect_news: Vec<Identity>,
    /// The highest incarnation at which someone accused us (we refute it).
    self_suspected: Option<u16>,
    /// Timers of replaced suspicions, for the core to cancel.
    stale_timers: Vec<(Instant, u64)>,
}

/// What this node knows of one suspicion: its incarnation, since when, who accuses.
#[derive(Debug)]
struct Suspicion {
    incarnation: u16,
    started: Instant,
    accusers: BTreeSet<NodeId>,
    /// The key of its timeout in the core's timers.
    timer: Option<(Instant, u64)>,
    /// Whether this node already decided to check it (or not).
    reviewed: bool,
}

/// A suspicion check in flight.
#[derive(Debug)]
struct PendingCheck {
    subject: Identity,
    incarnation: u16,
    tries: u32,
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
            // An entry belongs to the node that wrote it while that node lives: a write or delete
            // by another member (anyone holding the key can send one) is refused, so it can
            // neither replace nor hide the owner's record. Once the owner is gone, the key is free.
            // (Our own writes are our caller's business; the others refuse them the same way.)
            if let Some((owner, _)) = &before
                && *owner != e.version.owner
                && e.version.owner != self.me.node
            {
                self.counters.drop(DropReason::NotOwner);
                return None;
            }
            if e.value.is_some()
                && before.as_ref().is_none_or(|(owner, _)| *owner != e.version.owner)
                && self.store.live_owned_by(e.version.owner) >= self.cfg.max_entries_per_owner
            {
                self.counters.drop(DropReason::TooMany);
                return None;
            }
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
            Item::Suspect(s) => self.apply_suspect(s),
        }
    }

    /// Records an accusation; `Some` when it is new and should be relayed.
    fn apply_suspect(&mut self, s: Suspect) -> Option<BKey> {
        if !self.cfg.lifeguard() {
            return None;
        }
        if s.subject == self.me {
            // Someone suspects us: refute (foca also does when its own update arrives).
            self.self_suspected =
                Some(self.self_suspected.map_or(s.incarnation, |i| i.max(s.incarnation)));
            return None;
        }
        // Late copies of accusations about settled suspicions are normal in epidemic
        // dissemination: counted as duplicates, not dropped.
        if self.settled.get(&s.subject).is_some_and(|(i, _)| *i >= s.incarnation) {
            self.counters.duplicates += 1;
            return None;
        }
        let key = BKey::Suspect(s.subject.clone(), s.incarnation, s.accuser);
        let now = self.now;
        match self.suspicions.get_mut(&s.subject) {
            Some(r) if r.incarnation > s.incarnation => {
                self.counters.duplicates += 1;
                return None;
            }
            Some(r) if r.incarnation == s.incarnation => {
                if !r.accusers.insert(s.accuser) {
                    self.counters.duplicates += 1;
                    return None;
                }
            }
            _ => {
                // A newer incarnation replaces an older suspicion; the core cancels its timer.
                let r = Suspicion {
                    incarnation: s.incarnation,
                    started: now,
                    accusers: BTreeSet::from([s.accuser]),
                    timer: None,
                    reviewed: false,
                };
                if let Some(old) = self.suspicions.insert(s.subject.clone(), r)
                    && let Some(k) = old.timer
                {
                    self.stale_timers.push(k);
                }
            }
        }
        self.suspect_news.push(s.subject);
        Some(key)
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
    /// A suspicion's (Lifeguard) timeout: the suspect at that incarnation goes down.
    Suspicion(Identity, u16),
    /// The next ask (or the end) of a suspicion check.
    Check(u32),
    /// Looks for refuted or settled suspicions while any is in progress.
    Scan,
    /// The indirect probes of our probe with that number should have been answered by now.
    ProbeOverdue(u8),
}

/// Our probe in progress, as seen in what foca sends and receives.
#[derive(Debug)]
struct ProbeWatch {
    number: u8,
    target: Identity,
    answered: bool,
    overdue_armed: bool,
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
    checks: BTreeMap<u32, PendingCheck>,
    /// Lifeguard's local health score: 0 healthy, up to `awareness_max - 1`.
    health: u32,
    /// Our identity and incarnation as last sent (a rise is a refutation).
    incarnation: (Identity, u16),
    scan_armed: bool,
    /// The health multiplier rose: re-arm the open suspicions' timeouts.
    rearm: bool,
    probe: Option<ProbeWatch>,
    /// How much earlier than planned the last probe cycle ended: added to the next one, so
    /// the probe rate stays one per probe period.
    probe_debt: Duration,
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
            suspicions: BTreeMap::new(),
            settled: BTreeMap::new(),
            suspect_news: Vec::new(),
            self_suspected: None,
            stale_timers: Vec::new(),
        }));
        let foca = Foca::with_custom_broadcast(
            me.clone(),
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
            checks: BTreeMap::new(),
            health: 0,
            incarnation: (me, 0),
            scan_armed: false,
            rearm: false,
            probe: None,
            probe_debt: Duration::ZERO,
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
            Ok((Kind::Check, plain)) => return self.handle_check(now, from, &plain),
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
                Tick::Suspicion(subject, incarnation) => self.expire(now, &subject, incarnation),
                Tick::Check(nonce) => self.check_step(now, nonce),
                Tick::Scan => self.scan(now),
                Tick::ProbeOverdue(number) => self.probe_overdue(now, number),
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
        {
            let st = lock(&self.state);
            let max = self.cfg.max_entries_per_owner;
            let mine = st.view(&key).is_some_and(|(owner, _)| owner == st.me.node);
            if !mine && st.store.live_owned_by(st.me.node) >= max {
                return Err(TableError::TooMany { max });
            }
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
        Metrics {
            members: self.member_counts(),
            counters: st.counters.clone(),
            entries,
            health_multiplier: self.health + 1,
        }
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
        st.settled.retain(|_, (_, t)| now.saturating_duration_since(*t) < RELAY_MEMORY);
        self.pings.retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(10));
    }

    /// Turns what foca asked for into transmits, timers and state changes, and acts on new
    /// accusations, until neither leaves more to do.
    fn flush(&mut self, now: Instant) {
        loop {
            let rt = std::mem::take(&mut self.rt);
            let news = self.rearm || {
                let st = lock(&self.state);
                !st.suspect_news.is_empty()
                    || st.self_suspected.is_some()
                    || !st.stale_timers.is_empty()
            };
            if rt.send.is_empty() && rt.timers.is_empty() && rt.notes.is_empty() && !news {
                return;
            }
            self.absorb(now, rt);
            self.process_suspicions(now);
        }
    }

    fn absorb(&mut self, now: Instant, rt: Rt) {
        let mut accusations = Vec::new();
        for (after, t) in rt.timers {
            match t {
                // With Lifeguard the core owns the suspicion timeout: foca's fixed one becomes
                // our accusation, and its timeout shrinks as others confirm.
                Timer::ChangeSuspectToDown { member_id, incarnation, .. }
                    if self.cfg.lifeguard() =>
                {
                    accusations.push((member_id, incarnation));
                }
                // Local health: a node that is slow itself probes less often and waits longer.
                t @ Timer::ProbeRandomMember(_) => {
                    let at =
                        now + after * self.health_mult() + std::mem::take(&mut self.probe_debt);
                    self.schedule(at, Tick::Foca(t));
                }
                t @ Timer::SendIndirectProbe { .. } => {
                    self.schedule(now + after * self.health_mult(), Tick::Foca(t));
                }
                t => self.schedule(now + after, Tick::Foca(t)),
            }
        }
        let mut membership_changed = false;
        let mut republish = false;
        let mut spread = false;
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
                    // Pass a death on at once instead of at the next gossip round: the cluster
                    // then learns it in a few round trips (one datagram per member and death).
                    spread = self.cfg.lifeguard();
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
                    // Declared dead: the strongest sign that we are the slow one. As foca voids
                    // its timers on a new identity, our suspicions go too: the peers ignored
                    // what we said while they held us dead, so our lone accusations were never
                    // checked, and our view of who refuted is stale.
                    self.health_up();
                    self.forget_suspicions();
                }
                OwnedNotification::Idle | OwnedNotification::Defunct => self.forget_suspicions(),
                // Joined: now that foca knows the cluster's size, spread our record again with
                // a retransmit count sized for it.
                OwnedNotification::Active => republish = true,
                OwnedNotification::DataSent(h) => {
                    match h.message {
                        Message::Ping(n) => {
                            self.pings.insert((h.dst.addr, n), now);
                            self.probe = Some(ProbeWatch {
                                number: n,
                                target: h.dst.clone(),
                                answered: false,
                                overdue_armed: false,
                            });
                        }
                        // The direct probe went unanswered: foca asks others to probe.
                        Message::PingReq { probe_number, .. } => {
                            self.indirect_started(now, probe_number);
                        }
                        _ => {}
                    }
                    self.track_incarnation(&h.src, h.src_incarnation);
                }
                OwnedNotification::DataReceived(h) => {
                    if let Some(p) = self.probe.as_mut() {
                        match &h.message {
                            Message::Ack(n) if *n == p.number && h.src == p.target => {
                                p.answered = true;
                            }
                            Message::ForwardedAck { probe_number, .. }
                                if *probe_number == p.number =>
                            {
                                p.answered = true;
                            }
                            _ => {}
                        }
                    }
                    if let Message::Ack(n) = h.message
                        && let Some(sent) = self.pings.remove(&(h.src.addr, n))
                    {
                        let rtt = now.saturating_duration_since(sent);
                        lock(&self.state).counters.rtt(rtt);
                        // A timely answer to our own probe: evidence that we are healthy.
                        if rtt <= self.cfg.probe_timeout * self.health_mult() {
                            self.health = self.health.saturating_sub(1);
                        }
                    }
                }
                OwnedNotification::ProbeFailed(..) => {}
            }
        }
        if membership_changed {
            self.resize();
        }
        if republish && !self.quiet {
            let (meta, nets) = self.own_record();
            self.publish_record(now, meta, nets);
        }
        if spread
            && !self.quiet
            && let Err(e) = self.foca.gossip(&mut self.rt)
        {
            tracing::debug!(error = %e, "gossip of a death failed");
        }
        {
            let mut st = lock(&self.state);
            for (to, data) in rt.send {
                let sealed = self.keyring.seal(Kind::Swim, &data);
                st.counters.udp_out += 1;
                st.counters.udp_bytes_out += sealed.len() as u64;
                self.outbox.push_back(Transmit::Udp { to: to.addr, data: sealed });
            }
        }
        for (subject, incarnation) in accusations {
            self.accuse(subject, incarnation);
        }
    }

    /// The indirect stage of probe `number` began: if nobody answers within a few round
    /// trips, the probe has failed, and waiting out the rest of the probe period (as foca
    /// does) only delays the suspicion.
    fn indirect_started(&mut self, now: Instant, number: u8) {
        if !self.cfg.lifeguard() {
            return;
        }
        let Some(p) = self.probe.as_mut() else { return };
        if p.number != number || p.overdue_armed {
            return;
        }
        p.overdue_armed = true;
        // Four one-way trips (to a helper, to the target and back twice), with room for
        // scheduling: four mean round trips, at least a tenth of the probe timeout and at most
        // half of it; stretched by the local health multiplier like every timeout.
        let rtt = lock(&self.state).counters.probe_rtt_mean().unwrap_or(self.cfg.probe_timeout);
        let wait = (rtt * 4).clamp(self.cfg.probe_timeout / 10, self.cfg.probe_timeout / 2)
            * self.health_mult();
        self.schedule(now + wait, Tick::ProbeOverdue(number));
    }

    /// Nobody answered probe `number`, directly or indirectly, in time: end the probe cycle
    /// now (foca then suspects the target and starts the next probe); the next cycle is made
    /// longer by as much, so the probe rate does not change.
    fn probe_overdue(&mut self, now: Instant, number: u8) {
        if !self.probe.as_ref().is_some_and(|p| p.number == number && !p.answered) {
            return;
        }
        let pending = self
            .timers
            .iter()
            .find(|(_, t)| matches!(t, Tick::Foca(Timer::ProbeRandomMember(_))))
            .map(|(k, _)| *k);
        let Some(key) = pending else { return };
        if key.0 <= now {
            return;
        }
        if let Some(tick) = self.timers.remove(&key) {
            self.probe_debt = key.0 - now;
            self.schedule(now, tick);
        }
    }

    /// Lifeguard's local health multiplier of probe period and timeouts.
    fn health_mult(&self) -> u32 {
        self.health + 1
    }

    /// One more sign that we are slow: stretch our probing, and our open suspicions' timeouts
    /// at the next occasion (Lifeguard scales local timeouts by the multiplier).
    fn health_up(&mut self) {
        let before = self.health;
        self.health = (self.health + 1).min(self.cfg.awareness_max.saturating_sub(1));
        self.rearm |= self.health != before;
    }

    /// Drops every suspicion in progress and every check (foca voided our timers).
    fn forget_suspicions(&mut self) {
        let open = std::mem::take(&mut lock(&self.state).suspicions);
        for r in open.into_values() {
            if let Some(k) = r.timer {
                self.timers.remove(&k);
            }
        }
        self.checks.clear();
    }

    /// Follows our incarnation in what foca sends: a rise means we refuted a suspicion of
    /// ourselves, a sign that we may be the slow one.
    fn track_incarnation(&mut self, id: &Identity, incarnation: u16) {
        if *id != self.incarnation.0 {
            self.incarnation = (id.clone(), incarnation);
        } else if incarnation > self.incarnation.1 {
            self.incarnation.1 = incarnation;
            lock(&self.state).counters.refutations += 1;
            self.health_up();
        }
    }

    /// This node accuses `subject`: the accusation is gossiped (to a few members at once) and
    /// counted like anyone else's.
    fn accuse(&mut self, subject: Identity, incarnation: u16) {
        let accuser = lock(&self.state).me.node;
        let item = Item::Suspect(Suspect { subject, incarnation, accuser });
        if let Ok(true) = self.foca.add_broadcast(&msg::encode(&item)) {
            lock(&self.state).counters.suspicions_raised += 1;
            if let Err(e) = self.foca.gossip(&mut self.rt) {
                tracing::debug!(error = %e, "gossip of an accusation failed");
            }
        }
    }

    /// foca's view of a member: its incarnation and state.
    fn view_of(&self, id: &Identity) -> Option<(u16, SwimState)> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id() == id)
            .map(|m| (m.incarnation(), m.state()))
    }

    /// Acts on accusations that arrived during the last foca call.
    fn process_suspicions(&mut self, now: Instant) {
        let (mut news, me, stale) = {
            let mut st = lock(&self.state);
            (
                std::mem::take(&mut st.suspect_news),
                st.self_suspected.take(),
                std::mem::take(&mut st.stale_timers),
            )
        };
        for k in stale {
            self.timers.remove(&k);
        }
        if let Some(incarnation) = me {
            self.refute(incarnation);
        }
        if std::mem::take(&mut self.rearm) {
            news.extend(lock(&self.state).suspicions.keys().cloned());
        }
        news.sort();
        news.dedup();
        for subject in news {
            self.review(now, &subject);
        }
    }

    /// Someone says we are suspect at `incarnation`: let foca refute it (it raises our
    /// incarnation and gossips).
    fn refute(&mut self, incarnation: u16) {
        let me = self.foca.identity().clone();
        if me != self.incarnation.0 || incarnation < self.incarnation.1 {
            return;
        }
        let update = Member::new(me, incarnation, SwimState::Suspect);
        if let Err(e) = self.foca.apply_many(std::iter::once(update), true, &mut self.rt) {
            tracing::debug!(error = %e, "refutation failed");
        }
    }

    /// Brings a suspicion in line with foca's view and its accusers: drops it if settled,
    /// marks the suspect in foca, re-arms its timeout, and maybe checks the suspect.
    fn review(&mut self, now: Instant, subject: &Identity) {
        let Some((incarnation, accused, reviewed)) = ({
            let st = lock(&self.state);
            st.suspicions
                .get(subject)
                .map(|r| (r.incarnation, r.accusers.contains(&st.me.node), r.reviewed))
        }) else {
            return;
        };
        match self.view_of(subject) {
            None => {
                // Not a member we know: nothing to suspect.
                if let Some(r) = lock(&self.state).suspicions.remove(subject)
                    && let Some(k) = r.timer
                {
                    self.timers.remove(&k);
                }
                return;
            }
            Some((_, SwimState::Down)) => return self.settle(now, subject, u16::MAX, false),
            Some((known, _)) if known > incarnation => {
                return self.settle(now, subject, incarnation, true);
            }
            Some((known, state)) => {
                if known < incarnation || state == SwimState::Alive {
                    let update = Member::new(subject.clone(), incarnation, SwimState::Suspect);
                    if let Err(e) =
                        self.foca.apply_many(std::iter::once(update), true, &mut self.rt)
                    {
                        tracing::debug!(error = %e, "marking a suspect failed");
                    }
                }
            }
        }
        self.arm(now, subject);
        if !reviewed {
            if let Some(r) = lock(&self.state).suspicions.get_mut(subject) {
                r.reviewed = true;
            }
            // Candidates: every active member but the suspect and ourselves.
            let candidates = self.foca.num_members().saturating_sub(1);
            let p = self.cfg.check_probability(candidates);
            if !accused && p > 0.0 && self.rng.random::<f64>() < p {
                self.start_check(now, subject.clone(), incarnation);
            }
        }
        if !self.scan_armed {
            self.scan_armed = true;
            self.schedule(now + self.cfg.gossip_interval, Tick::Scan);
        }
    }

    /// (Re)schedules a suspicion's timeout from its start and its confirmations so far.
    fn arm(&mut self, now: Instant, subject: &Identity) {
        let n = self.foca.num_members() + 1;
        let mult = self.health_mult();
        let mut st = lock(&self.state);
        let Some(r) = st.suspicions.get_mut(subject) else { return };
        let confirmations = u32::try_from(r.accusers.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let timeout = self.cfg.suspicion_timeout_confirmed(n, confirmations) * mult;
        let at = (r.started + timeout).max(now);
        if r.timer.is_some_and(|(t, _)| t == at) {
            return;
        }
        if let Some(k) = r.timer.take() {
            self.timers.remove(&k);
        }
        self.timer_seq += 1;
        let key = (at, self.timer_seq);
        r.timer = Some(key);
        let incarnation = r.incarnation;
        drop(st);
        self.timers.insert(key, Tick::Suspicion(subject.clone(), incarnation));
    }

    /// Ends a suspicion: refuted at `incarnation` (`refuted`), or moot (`u16::MAX`: down).
    fn settle(&mut self, now: Instant, subject: &Identity, incarnation: u16, refuted: bool) {
        let wrong = {
            let mut st = lock(&self.state);
            st.settled.insert(subject.clone(), (incarnation, now));
            let me = st.me.node;
            match st.suspicions.remove(subject) {
                Some(r) => {
                    if let Some(k) = r.timer {
                        self.timers.remove(&k);
                    }
                    refuted && r.accusers.contains(&me)
                }
                None => false,
            }
        };
        self.checks.retain(|_, c| c.subject != *subject);
        // Our accusation was refuted: we may be the slow one.
        if wrong {
            self.health_up();
        }
    }

    /// A suspicion timed out: declare the suspect down unless it refuted meanwhile.
    fn expire(&mut self, now: Instant, subject: &Identity, incarnation: u16) {
        let current = lock(&self.state).suspicions.get(subject).map(|r| r.incarnation);
        if current != Some(incarnation) {
            return;
        }
        match self.view_of(subject) {
            Some((known, state)) if known == incarnation && state != SwimState::Down => {
                let down = Member::new(subject.clone(), incarnation, SwimState::Down);
                if let Err(e) = self.foca.apply_many(std::iter::once(down), true, &mut self.rt) {
                    tracing::debug!(error = %e, "declaring a suspect down failed");
                }
                self.settle(now, subject, u16::MAX, false);
            }
            Some((known, state)) if known > incarnation && state != SwimState::Down => {
                self.settle(now, subject, incarnation, true);
            }
            _ => self.settle(now, subject, u16::MAX, false),
        }
    }

    /// Periodically ends suspicions that foca's view shows refuted or down.
    fn scan(&mut self, now: Instant) {
        let open: Vec<(Identity, u16)> =
            lock(&self.state).suspicions.iter().map(|(k, r)| (k.clone(), r.incarnation)).collect();
        if open.is_empty() {
            self.scan_armed = false;
            return;
        }
        let wanted: BTreeSet<&Identity> = open.iter().map(|(k, _)| k).collect();
        let views: BTreeMap<Identity, (u16, SwimState)> = self
            .foca
            .iter_membership_state()
            .filter(|m| wanted.contains(m.id()))
            .map(|m| (m.id().clone(), (m.incarnation(), m.state())))
            .collect();
        for (subject, incarnation) in open {
            match views.get(&subject) {
                Some((_, SwimState::Down)) | None => self.settle(now, &subject, u16::MAX, false),
                Some((known, _)) if *known > incarnation => {
                    self.settle(now, &subject, incarnation, true);
                }
                Some(_) => {}
            }
        }
        self.schedule(now + self.cfg.gossip_interval, Tick::Scan);
    }

    /// Time between two asks of a suspicion check.
    fn check_interval(&self) -> Duration {
        self.cfg.probe_timeout * self.health_mult() / CHECK_TRIES
    }

    /// Asks the suspect directly whether it is there (and tells it it is suspected).
    fn start_check(&mut self, now: Instant, subject: Identity, incarnation: u16) {
        let nonce: u32 = self.rng.random();
        let ping = Check::Ping { nonce, target: subject.clone(), incarnation };
        self.send_check(subject.addr, &ping);
        self.checks.insert(nonce, PendingCheck { subject, incarnation, tries: 1 });
        lock(&self.state).counters.checks_sent += 1;
        self.schedule(now + self.check_interval(), Tick::Check(nonce));
    }

    fn send_check(&mut self, to: SocketAddr, check: &Check) {
        let sealed = self.keyring.seal(Kind::Check, &msg::encode(check));
        let mut st = lock(&self.state);
        st.counters.udp_out += 1;
        st.counters.udp_bytes_out += sealed.len() as u64;
        self.outbox.push_back(Transmit::Udp { to, data: sealed });
    }

    /// The next ask of a check, or, after the last one went unanswered, our own accusation.
    fn check_step(&mut self, now: Instant, nonce: u32) {
        let Some(c) = self.checks.get_mut(&nonce) else { return };
        if c.tries < CHECK_TRIES {
            c.tries += 1;
            let ping = Check::Ping { nonce, target: c.subject.clone(), incarnation: c.incarnation };
            let to = c.subject.addr;
            self.send_check(to, &ping);
            self.schedule(now + self.check_interval(), Tick::Check(nonce));
            return;
        }
        let Some(c) = self.checks.remove(&nonce) else { return };
        let open = lock(&self.state)
            .suspicions
            .get(&c.subject)
            .is_some_and(|r| r.incarnation == c.incarnation);
        if open {
            self.accuse(c.subject, c.incarnation);
        }
    }

    /// A suspicion check (or its answer) arrived.
    fn handle_check(&mut self, now: Instant, from: SocketAddr, plain: &[u8]) {
        let check = match msg::decode_check(plain, self.cfg.max_datagram) {
            Ok(c) => c,
            Err(e) => {
                tracing::trace!(%from, error = %e, "malformed check");
                return self.count_drop(DropReason::Malformed);
            }
        };
        match check {
            Check::Ping { nonce, target, incarnation } => {
                if target != *self.foca.identity() {
                    // About a previous identity of ours (or not us at all): that one is gone.
                    return self.count_drop(DropReason::Rejected);
                }
                self.refute(incarnation);
                self.flush(now);
                let (me, incarnation) = self.incarnation.clone();
                self.send_check(from, &Check::Ack { nonce, from: me, incarnation });
            }
            Check::Ack { nonce, from: who, incarnation } => {
                if self.checks.get(&nonce).is_none_or(|c| c.subject != who) {
                    // Late (after the check ended) or unknown.
                    lock(&self.state).counters.duplicates += 1;
                    return;
                }
                let Some(c) = self.checks.remove(&nonce) else { return };
                if incarnation > c.incarnation {
                    // The suspect itself says it refuted: apply (and spread) it now.
                    let alive = Member::new(who.clone(), incarnation, SwimState::Alive);
                    if let Err(e) = self.foca.apply_many(std::iter::once(alive), true, &mut self.rt)
                    {
                        tracing::debug!(error = %e, "applying a refutation failed");
                    }
                    self.settle(now, &who, c.incarnation, true);
                }
            }
        }
        self.flush(now);
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
