//! The sans-I/O gossip core: foca's SWIM plus node metadata and the replicated tables.
//!
//! Feed it with [`Core::handle_udp`], [`Core::handle_sync`] and [`Core::handle_timeout`];
//! drain [`Core::poll_transmit`] and [`Core::poll_event`]; sleep until [`Core::poll_timeout`].
//! Time is always passed in; randomness comes from the seed in [`CoreOptions`].
//!
//! Its rooms: [`vocab`] (what it takes and gives), `shared` (the tables and records foca's
//! broadcast handler merges into), `handler` (that handler), `swim` (foca and the plumbing the
//! other rooms share), `lifeguard` (suspicions, checks, local health; told what happens, it
//! answers with orders), `accusations` (Lifeguard's book of suspicions, which the handler also
//! writes) and `sync` (push-pull).

mod accusations;
mod handler;
mod lifeguard;
mod shared;
mod swim;
mod sync;
pub(crate) mod vocab;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{Foca, Member, OwnedNotification, PostcardCodec, State as SwimState, Timer};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use self::handler::Handler;
use self::lifeguard::{Ctx, Lifeguard};
use self::shared::{State, lock};
use self::swim::{Rt, Swim, Tick};
pub use self::vocab::{
    CoreError, CoreOptions, EntryChange, Event, MemberState, MemberView, TableError, Transmit,
};
use crate::keyring::Keyring;
use crate::metrics::{Counters, DropReason, MemberCounts, Metrics};
use crate::msg::{self, Check, Item, MemberRecord, WireEntry};
use crate::types::{EntryKey, Identity, NodeId, NodeMeta, Version};
use crate::wire::Kind;

/// The gossip state machine of one node: foca and what it shares with its handler, plus
/// this node's Lifeguard, which keeps its own state and timers and acts through `Order`s.
pub struct Core {
    swim: Swim,
    lifeguard: Lifeguard,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("id", self.swim.foca.identity()).finish_non_exhaustive()
    }
}

impl Core {
    /// A core that has joined nobody yet.
    pub fn new(opts: CoreOptions, now: Instant) -> Result<Core, CoreError> {
        opts.config.validate()?;
        let mut rng = SmallRng::seed_from_u64(opts.seed);
        let keyring = Keyring::new(&opts.keys, rng.random())?;
        let me =
            Identity { addr: opts.addr, node: opts.node, generation: opts.generation, bump: 0 };
        let state = Arc::new(Mutex::new(State::new(me.clone(), opts.config.clone(), now)));
        let lifeguard = Lifeguard::new(me.clone(), &opts.config);
        let foca = Foca::with_custom_broadcast(
            me,
            opts.config.foca(1),
            SmallRng::seed_from_u64(rng.random()),
            PostcardCodec,
            Handler { state: state.clone(), accusations: lifeguard.accusations() },
        );
        let cfg = opts.config;
        let sized_for = (cfg.retransmits(1), cfg.suspicion_timeout(1));
        let mut core = Core {
            lifeguard,
            swim: Swim {
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
                probe_debt: Duration::ZERO,
                next_spread: now,
                spread_due: false,
                suspected: Vec::new(),
                cfg,
            },
        };
        let first_sync =
            core.swim.cfg.sync_interval.mul_f64(0.5 + core.swim.rng.random::<f64>() * 0.5);
        core.swim.schedule(now + first_sync, Tick::Sync);
        core.swim.schedule(now + core.swim.cfg.reap_interval, Tick::Reap);
        core.publish_record(now, opts.meta, Vec::new());
        Ok(core)
    }

    /// Our current SWIM identity.
    pub fn identity(&self) -> &Identity {
        self.swim.foca.identity()
    }

    /// Contacts seeds: a SWIM announce over UDP and a full-state push over TCP to each.
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) {
        self.swim.set_now(now);
        for &addr in seeds {
            if addr == self.identity().addr {
                continue;
            }
            let placeholder = Identity { addr, node: NodeId(0), generation: 0, bump: 0 };
            // Announce is accepted by whoever holds that address, whatever its node id.
            if let Err(e) = self.swim.foca.announce(placeholder, &mut self.swim.rt) {
                tracing::debug!(%addr, error = %e, "announce failed");
            }
            sync::push(&mut self.swim, addr, None);
        }
        self.flush(now);
    }

    /// Restores membership knowledge without gossiping it (a saved view, or a simulation that
    /// starts from a formed cluster).
    pub fn restore_members(&mut self, now: Instant, ids: impl IntoIterator<Item = Identity>) {
        self.swim.set_now(now);
        let members = ids.into_iter().map(Member::alive);
        if let Err(e) = self.swim.foca.apply_many(members, false, &mut self.swim.rt) {
            tracing::debug!(error = %e, "restore_members failed");
        }
        self.swim.quiet = true;
        self.flush(now);
        self.swim.quiet = false;
    }

    /// Restores member records without gossiping them (a saved view, or a simulation that starts
    /// from a formed cluster).
    pub fn restore_records(
        &mut self,
        now: Instant,
        records: impl IntoIterator<Item = MemberRecord>,
    ) {
        self.swim.set_now(now);
        let mut st = lock(&self.swim.state);
        for r in records {
            st.apply_record(r, false);
        }
    }

    /// Our own current member record.
    pub fn own_member_record(&self) -> Option<MemberRecord> {
        let st = lock(&self.swim.state);
        st.nodes.get(&st.me.node).cloned()
    }

    /// Leaves the cluster gracefully (the others see us down at once).
    pub fn leave(&mut self, now: Instant) {
        self.swim.set_now(now);
        if let Err(e) = self.swim.foca.leave_cluster(&mut self.swim.rt) {
            tracing::debug!(error = %e, "leave failed");
        }
        self.flush(now);
    }

    /// A datagram arrived on the gossip UDP socket.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.swim.set_now(now);
        {
            let mut st = lock(&self.swim.state);
            st.counters.udp_in += 1;
            st.counters.udp_bytes_in += data.len() as u64;
            if data.len() > self.swim.cfg.max_datagram {
                st.counters.drop(DropReason::TooBig);
                return;
            }
        }
        let plain = match self.swim.keyring.open(data) {
            Ok((Kind::Swim, plain)) => plain,
            Ok((Kind::Check, plain)) => return self.handle_check(now, from, &plain),
            Ok(_) => return self.swim.count_drop(DropReason::WrongKind),
            Err(e) => {
                tracing::trace!(%from, error = %e, "dropped datagram");
                return self.swim.count_drop(e.into());
            }
        };
        if let Err(e) = self.swim.foca.handle_data(&plain, &mut self.swim.rt) {
            let reason = match e {
                foca::Error::DataTooBig => DropReason::TooBig,
                foca::Error::MalformedPacket
                | foca::Error::Decode(_)
                | foca::Error::CustomBroadcast(_) => DropReason::Malformed,
                _ => DropReason::Rejected,
            };
            tracing::trace!(%from, error = %e, "foca refused datagram");
            self.swim.count_drop(reason);
        }
        self.flush(now);
    }

    /// A sealed sync frame arrived over TCP: a request (returns the sealed reply to send back)
    /// or the reply to our own push (returns `None`).
    pub fn handle_sync(&mut self, now: Instant, from: SocketAddr, frame: &[u8]) -> Option<Vec<u8>> {
        self.swim.set_now(now);
        let reply = sync::handle(&mut self.swim, from, frame);
        self.flush(now);
        reply
    }

    /// Runs every timer due at `now`, foca's and Lifeguard's, in the order they are due and
    /// were set.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.swim.set_now(now);
        loop {
            // Both sets of timers are keyed by due time and one sequence: the earlier key runs.
            let swim_next = self.swim.timers.keys().next().copied();
            match (swim_next, self.lifeguard.poll_timeout()) {
                (_, Some(key)) if key.0 <= now && swim_next.is_none_or(|s| key < s) => {
                    self.with_lifeguard(now, |lg, cx| lg.handle_timeout(cx, now));
                }
                (Some(key), _) if key.0 <= now => {
                    let Some((_, tick)) = self.swim.timers.pop_first() else { break };
                    self.run_tick(now, tick);
                }
                _ => break,
            }
            self.flush(now);
        }
    }

    fn run_tick(&mut self, now: Instant, tick: Tick) {
        match tick {
            Tick::Foca(t) => {
                if let Err(e) = self.swim.foca.handle_timer(t, &mut self.swim.rt) {
                    tracing::trace!(error = %e, "foca timer");
                }
            }
            Tick::Sync => {
                if let Some(peer) = sync::pick_peer(&mut self.swim) {
                    sync::push(&mut self.swim, peer, None);
                }
                self.swim.schedule(now + self.swim.cfg.sync_interval, Tick::Sync);
            }
            Tick::Reap => {
                self.reap(now);
                self.swim.schedule(now + self.swim.cfg.reap_interval, Tick::Reap);
            }
            Tick::Spread => self.swim.spread(now),
        }
    }

    /// When [`Core::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let swim_at = self.swim.timers.keys().next().map(|(t, _)| *t);
        match (swim_at, self.lifeguard.poll_timeout().map(|(t, _)| t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.swim.outbox.pop_front()
    }

    /// The next event for consumers.
    pub fn poll_event(&mut self) -> Option<Event> {
        lock(&self.swim.state).events.pop_front()
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
        if value.len() > self.swim.cfg.max_value_len {
            return Err(TableError::TooLarge {
                field: "value",
                len: value.len(),
                max: self.swim.cfg.max_value_len,
            });
        }
        {
            let st = lock(&self.swim.state);
            let max = self.swim.cfg.max_entries_per_owner;
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
            let st = lock(&self.swim.state);
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
        if network.is_empty() || network.len() > self.swim.cfg.max_name_len {
            return Err(TableError::TooLarge {
                field: "network",
                len: network.len(),
                max: self.swim.cfg.max_name_len,
            });
        }
        let (meta, mut nets) = self.own_record();
        if !lock(&self.swim.state).networks.insert(network.to_owned()) {
            return Ok(());
        }
        nets.push(network.to_owned());
        self.publish_record(now, meta, nets);
        let peers = sync::peers_in(&self.swim, network);
        let peer = if peers.is_empty() {
            sync::pick_peer(&mut self.swim)
        } else {
            Some(peers[self.swim.rng.random_range(0..peers.len())])
        };
        if let Some(p) = peer {
            sync::push(&mut self.swim, p, None);
        }
        self.flush(now);
        Ok(())
    }

    /// Stops participating in `network`: deletes our entries there and drops its tables.
    pub fn leave_network(&mut self, now: Instant, network: &str) {
        let Some(own) = lock(&self.swim.state).own_entries_in(network) else { return };
        for k in own {
            let _ = self.local_entry(now, k, None);
        }
        lock(&self.swim.state).forget_network(network);
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
        lock(&self.swim.state).view(key)
    }

    /// All visible entries (live, owner alive), in key order.
    pub fn entries(&self) -> Vec<(EntryKey, NodeId, Bytes)> {
        let st = lock(&self.swim.state);
        st.store.iter().filter_map(|(k, _)| st.view(k).map(|(o, v)| (k.clone(), o, v))).collect()
    }

    /// Every stored entry with its version, tombstones and hidden ones included (diagnostics).
    pub fn stored(&self) -> Vec<(EntryKey, Version, Option<Bytes>)> {
        lock(&self.swim.state).store.digest()
    }

    /// Networks this node participates in.
    pub fn networks(&self) -> Vec<String> {
        lock(&self.swim.state).networks.iter().cloned().collect()
    }

    /// All members foca remembers, plus ourselves first.
    pub fn members(&self) -> Vec<MemberView> {
        let st = lock(&self.swim.state);
        let mut out = vec![st.member_view(&st.me, MemberState::Alive, 0)];
        for m in self.swim.foca.iter_membership_state() {
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
        for m in self.swim.foca.iter_membership_state() {
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
        self.swim.foca.iter_members().map(|m| m.id().clone()).collect()
    }

    /// A copy of every metric.
    pub fn metrics(&self) -> Metrics {
        let st = lock(&self.swim.state);
        let entries = st.store.iter().filter(|(k, _)| st.view(k).is_some()).count();
        Metrics {
            members: self.member_counts(),
            counters: st.counters.clone(),
            entries,
            health_multiplier: self.lifeguard.health_mult(),
        }
    }

    /// The traffic and drop counters alone (cheap).
    pub fn counters(&self) -> Counters {
        lock(&self.swim.state).counters.clone()
    }

    /// The keyring, to add, promote or remove keys at runtime.
    pub fn keyring_mut(&mut self) -> &mut Keyring {
        &mut self.swim.keyring
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.swim.keyring
    }

    /// Counts a message the driver refused before the core saw it (e.g. an oversized TCP frame).
    pub fn count_dropped(&mut self, reason: DropReason) {
        self.swim.count_drop(reason);
    }

    fn check_key(&self, key: &EntryKey) -> Result<(), TableError> {
        let max = self.swim.cfg.max_name_len;
        for (field, s) in [("table", &key.table), ("network", &key.network), ("key", &key.key)] {
            if s.len() > max || (field != "key" && s.is_empty()) {
                return Err(TableError::TooLarge { field, len: s.len(), max });
            }
        }
        if !lock(&self.swim.state).networks.contains(&key.network) {
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
        self.swim.set_now(now);
        let item = {
            let mut st = lock(&self.swim.state);
            st.clock += 1;
            let version =
                Version { ltime: st.clock, owner: st.me.node, generation: st.me.generation };
            Item::Entry(WireEntry { key, version, value })
        };
        let bytes = msg::encode(&item);
        // The handler merges it (sender None) and foca queues it for dissemination.
        self.swim.foca.add_broadcast(&bytes).map_err(|e| TableError::Broadcast(e.to_string()))?;
        self.swim.spread_soon(now);
        self.flush(now);
        Ok(())
    }

    fn own_record(&self) -> (NodeMeta, Vec<String>) {
        lock(&self.swim.state).own_record()
    }

    fn publish_record(&mut self, now: Instant, meta: NodeMeta, networks: Vec<String>) {
        self.swim.set_now(now);
        let rec = lock(&self.swim.state).next_record(meta, networks);
        if self.swim.foca.num_members() == 0 {
            // Alone: nobody to tell. The join's push-pull carries it, and becoming active
            // republishes it with a retransmit budget sized for the cluster we joined.
            lock(&self.swim.state).apply_record(rec, true);
            return;
        }
        if let Err(e) = self.swim.foca.add_broadcast(&msg::encode(&Item::Node(rec))) {
            tracing::warn!(error = %e, "member record too large to gossip");
        }
    }

    fn reap(&mut self, now: Instant) {
        lock(&self.swim.state).reap(now);
        self.lifeguard.reap(now);
    }

    /// Turns what foca asked for into transmits, timers and state changes, and acts on new
    /// accusations, until neither leaves more to do.
    fn flush(&mut self, now: Instant) {
        loop {
            let rt = std::mem::take(&mut self.swim.rt);
            let news = self.lifeguard.has_news();
            if rt.send.is_empty() && rt.timers.is_empty() && rt.notes.is_empty() && !news {
                return self.swim.note_suspicions();
            }
            self.absorb(now, rt);
            self.with_lifeguard(now, |lg, cx| lg.process_suspicions(cx, now));
        }
    }

    fn absorb(&mut self, now: Instant, rt: Rt) {
        let mut accusations = Vec::new();
        for (after, t) in rt.timers {
            match t {
                // With Lifeguard the core owns the suspicion timeout: foca's fixed one becomes
                // our accusation, and its timeout shrinks as others confirm.
                Timer::ChangeSuspectToDown { member_id, incarnation, .. }
                    if self.swim.cfg.lifeguard() =>
                {
                    accusations.push((member_id, incarnation));
                }
                // Local health: a node that is slow itself probes less often and waits longer.
                t @ Timer::ProbeRandomMember(_) => {
                    let at = now
                        + after * self.lifeguard.health_mult()
                        + std::mem::take(&mut self.swim.probe_debt);
                    self.swim.schedule(at, Tick::Foca(t));
                }
                t @ Timer::SendIndirectProbe { .. } => {
                    self.swim.schedule(now + after * self.lifeguard.health_mult(), Tick::Foca(t));
                }
                t => self.swim.schedule(now + after, Tick::Foca(t)),
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
                        let mut st = lock(&self.swim.state);
                        let back = st.was_down.remove(&id.node);
                        st.member_up(&id);
                        back && !self.swim.quiet
                    };
                    // A member back from a partition or a false death: exchange full state with
                    // it now rather than at the next periodic sync (NetworkDB's reconnect sync).
                    if returning {
                        sync::push(&mut self.swim, id.addr, None);
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    membership_changed = true;
                    lock(&self.swim.state).member_down(&id);
                    // Pass a death on at once instead of at the next gossip round: the cluster
                    // then learns it in a few round trips (one datagram per member and death).
                    spread = self.swim.cfg.lifeguard();
                }
                OwnedNotification::Rename(old, new) => {
                    membership_changed = true;
                    let mut st = lock(&self.swim.state);
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
                    lock(&self.swim.state).me = new;
                    republish = true;
                    // Declared dead: the strongest sign that we are the slow one. As foca voids
                    // its timers on a new identity, our suspicions go too: the peers ignored
                    // what we said while they held us dead, so our lone accusations were never
                    // checked, and our view of who refuted is stale.
                    self.lifeguard.health_up();
                    self.lifeguard.forget_suspicions();
                }
                OwnedNotification::Idle | OwnedNotification::Defunct => {
                    self.lifeguard.forget_suspicions();
                }
                // Joined: now that foca knows the cluster's size, spread our record again with
                // a retransmit count sized for it.
                OwnedNotification::Active => republish = true,
                OwnedNotification::DataSent(h) => {
                    self.with_lifeguard(now, |lg, cx| lg.sent(cx, now, &h));
                }
                OwnedNotification::DataReceived(h) => {
                    self.with_lifeguard(now, |lg, cx| lg.received(cx, now, &h));
                }
                OwnedNotification::ProbeFailed(..) => {}
            }
        }
        if membership_changed {
            self.swim.resize();
        }
        if republish && !self.swim.quiet {
            let (meta, nets) = self.own_record();
            self.publish_record(now, meta, nets);
        }
        if spread
            && !self.swim.quiet
            && let Err(e) = self.swim.foca.gossip(&mut self.swim.rt)
        {
            tracing::debug!(error = %e, "gossip of a death failed");
        }
        for (to, data) in rt.send {
            self.swim.send_udp(to.addr, Kind::Swim, &data);
        }
        for (subject, incarnation) in accusations {
            self.lifeguard.accuse(subject, incarnation);
        }
        self.run_orders(now);
    }

    /// A suspicion check (or its answer) arrived.
    fn handle_check(&mut self, now: Instant, from: SocketAddr, plain: &[u8]) {
        let check = match msg::decode_check(plain, self.swim.cfg.max_datagram) {
            Ok(Check::Ping { target, .. }) if target != *self.swim.foca.identity() => {
                // About a previous identity of ours (or not us at all): that one is gone.
                self.swim.count_drop(DropReason::Rejected);
                None
            }
            Ok(c) => Some(c),
            Err(e) => {
                tracing::trace!(%from, error = %e, "malformed check");
                self.swim.count_drop(DropReason::Malformed);
                None
            }
        };
        let ping =
            check.and_then(|c| self.with_lifeguard(now, |lg, cx| lg.handle_check(cx, now, c)));
        if let Some(nonce) = ping {
            // foca's refutation goes out first, so the answer carries our new incarnation.
            self.flush(now);
            self.lifeguard.answer(from, nonce);
            self.run_orders(now);
        }
        self.flush(now);
    }

    /// Runs `f` on Lifeguard with foca's view, the RNG and the counters, then carries out
    /// what it ordered. Lifeguard calls nothing of foca's, so the state's lock may be held.
    fn with_lifeguard<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut Lifeguard, &mut Ctx<'_>) -> R,
    ) -> R {
        let out = {
            let mut st = lock(&self.swim.state);
            let mut cx = Ctx {
                foca: &self.swim.foca,
                rng: &mut self.swim.rng,
                counters: &mut st.counters,
                timer_seq: &mut self.swim.timer_seq,
            };
            f(&mut self.lifeguard, &mut cx)
        };
        self.run_orders(now);
        out
    }

    /// Carries out Lifeguard's orders, in the order given.
    fn run_orders(&mut self, now: Instant) {
        while let Some(order) = self.lifeguard.poll_order() {
            self.swim.carry_out(now, order);
        }
    }
}
