//! Lifeguard's refinements around foca's SWIM: suspicions that shrink with each independent
//! accuser and are declared down by the core, checks that let a few members verify a new
//! suspicion at once, local health that slows a node that is itself slow, and probe cycles
//! that end once their indirect probes are overdue. The crate root tells the whole story.
//!
//! [`Lifeguard`] is sans-I/O towards the rest of the core: it is told what foca sent and
//! received and what membership changed, it reads foca's view through a [`Ctx`], it keeps its
//! own timers ([`Lifeguard::poll_timeout`]), and what it wants of foca and the network comes
//! out as [`Order`]s ([`Lifeguard::poll_order`]) that the core carries out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foca::{Foca, Header, Member, Message, PostcardCodec, State as SwimState};
use rand::RngExt;
use rand::rngs::SmallRng;

use super::accusations::Accusations;
use super::handler::Handler;
use super::shared::lock;
use crate::config::CoreConfig;
use crate::metrics::Counters;
use crate::msg::{Check, Suspect};
use crate::types::{Identity, NodeId};

/// Asks per suspicion check, spread over the probe timeout (a lost datagram is not a death).
const CHECK_TRIES: u32 = 3;
/// How long an unanswered probe is remembered for its round-trip time.
const PING_MEMORY: Duration = Duration::from_secs(10);

/// What a Lifeguard call may look at and draw from: foca's view (read only), the core's
/// seeded RNG, the counters, and the core's timer sequence (so that Lifeguard's timers and
/// foca's due at the same instant run in the order they were set).
pub(super) struct Ctx<'a> {
    pub(super) foca: &'a Foca<Identity, PostcardCodec, SmallRng, Handler>,
    pub(super) rng: &'a mut SmallRng,
    pub(super) counters: &'a mut Counters,
    pub(super) timer_seq: &'a mut u64,
}

impl Ctx<'_> {
    /// foca's view of a member: its incarnation and state.
    fn view_of(&self, id: &Identity) -> Option<(u16, SwimState)> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id() == id)
            .map(|m| (m.incarnation(), m.state()))
    }
}

/// What Lifeguard asks the core to do, in the order asked.
#[derive(Debug)]
pub(super) enum Order {
    /// Apply this update to foca and gossip it (a refutation, a suspect, a death); the text
    /// names it in the log if foca refuses.
    Apply(Member<Identity>, &'static str),
    /// Gossip this accusation of ours to a few members at once.
    Accuse(Suspect),
    /// Send a suspicion check (or its answer).
    Check(SocketAddr, Check),
    /// Our probe failed before foca's probe period ended: end foca's probe cycle now.
    EndProbeCycle,
}

/// What one of Lifeguard's timers does when it fires.
#[derive(Debug)]
enum Due {
    /// A suspicion's timeout: the suspect at that incarnation goes down.
    Suspicion(Identity, u16),
    /// The next ask (or the end) of a suspicion check.
    Check(u32),
    /// Looks for refuted or settled suspicions while any is in progress.
    Scan,
    /// The indirect probes of our probe with that number should have been answered by now.
    ProbeOverdue(u8),
}

/// A suspicion check in flight.
#[derive(Debug)]
struct PendingCheck {
    subject: Identity,
    incarnation: u16,
    tries: u32,
}

/// Our probe in progress, as seen in what foca sends and receives.
#[derive(Debug)]
struct ProbeWatch {
    number: u8,
    target: Identity,
    answered: bool,
    overdue_armed: bool,
}

/// This node's Lifeguard: its local health, the accusations it heard, its probes and checks in
/// flight, and its timers.
#[derive(Debug)]
pub(super) struct Lifeguard {
    cfg: CoreConfig,
    me: NodeId,
    /// Local health score: 0 healthy, up to `max_health`.
    health: u32,
    max_health: u32,
    /// The suspicions; foca's broadcast handler holds the other handle, to record accusations.
    accusations: Arc<Mutex<Accusations>>,
    checks: BTreeMap<u32, PendingCheck>,
    /// Our identity and incarnation as last sent (a rise is a refutation).
    incarnation: (Identity, u16),
    scan_armed: bool,
    /// The health multiplier rose: re-arm the open suspicions' timeouts.
    rearm: bool,
    probe: Option<ProbeWatch>,
    /// Our probes by target and number, for their round-trip times.
    pings: HashMap<(SocketAddr, u8), Instant>,
    /// Keyed by due time and the core's timer sequence number (two timers may be due at once).
    timers: BTreeMap<(Instant, u64), Due>,
    orders: VecDeque<Order>,
}

impl Lifeguard {
    pub(super) fn new(me: Identity, cfg: &CoreConfig) -> Lifeguard {
        Lifeguard {
            cfg: cfg.clone(),
            me: me.node,
            health: 0,
            max_health: cfg.awareness_max.saturating_sub(1),
            accusations: Arc::new(Mutex::new(Accusations::new(cfg.lifeguard()))),
            checks: BTreeMap::new(),
            incarnation: (me, 0),
            scan_armed: false,
            rearm: false,
            probe: None,
            pings: HashMap::new(),
            timers: BTreeMap::new(),
            orders: VecDeque::new(),
        }
    }

    /// The book foca's broadcast handler records accusations in.
    pub(super) fn accusations(&self) -> Arc<Mutex<Accusations>> {
        self.accusations.clone()
    }

    /// Whether there is something to act on: accusations heard or suspicions to re-arm (the
    /// core's flush loop runs on for them).
    pub(super) fn has_news(&self) -> bool {
        self.rearm || lock(&self.accusations).has_news()
    }

    /// When [`Lifeguard::handle_timeout`] wants to run next, and the timer's sequence number.
    pub(super) fn poll_timeout(&self) -> Option<(Instant, u64)> {
        self.timers.keys().next().copied()
    }

    /// The next thing Lifeguard asks of the core.
    pub(super) fn poll_order(&mut self) -> Option<Order> {
        self.orders.pop_front()
    }

    /// Runs the first of Lifeguard's timers if it is due at `now`.
    pub(super) fn handle_timeout(&mut self, cx: &mut Ctx<'_>, now: Instant) {
        let Some(entry) = self.timers.first_entry() else { return };
        if entry.key().0 > now {
            return;
        }
        match entry.remove() {
            Due::Suspicion(subject, incarnation) => self.expire(cx, now, &subject, incarnation),
            Due::Check(nonce) => self.check_step(cx, now, nonce),
            Due::Scan => self.scan(cx, now),
            Due::ProbeOverdue(number) => self.probe_overdue(number),
        }
    }

    fn schedule(&mut self, cx: &mut Ctx<'_>, at: Instant, due: Due) {
        *cx.timer_seq += 1;
        self.timers.insert((at, *cx.timer_seq), due);
    }

    /// foca sent a message: follow our probe and our own incarnation.
    pub(super) fn sent(&mut self, cx: &mut Ctx<'_>, now: Instant, h: &Header<Identity>) {
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
            Message::PingReq { probe_number, .. } => self.indirect_started(cx, now, probe_number),
            _ => {}
        }
        self.track_incarnation(cx, &h.src, h.src_incarnation);
    }

    /// foca received a message: answers to our probe, and their round-trip time.
    pub(super) fn received(&mut self, cx: &mut Ctx<'_>, now: Instant, h: &Header<Identity>) {
        if let Some(p) = self.probe.as_mut() {
            match &h.message {
                Message::Ack(n) if *n == p.number && h.src == p.target => p.answered = true,
                Message::ForwardedAck { probe_number, .. } if *probe_number == p.number => {
                    p.answered = true;
                }
                _ => {}
            }
        }
        if let Message::Ack(n) = h.message
            && let Some(sent) = self.pings.remove(&(h.src.addr, n))
        {
            let rtt = now.saturating_duration_since(sent);
            cx.counters.rtt(rtt);
            // A timely answer to our own probe: evidence that we are healthy.
            if rtt <= self.cfg.probe_timeout * self.health_mult() {
                self.health = self.health.saturating_sub(1);
            }
        }
    }

    /// Forgets probes that were never answered and suspicions that ended long ago.
    pub(super) fn reap(&mut self, now: Instant) {
        self.pings.retain(|_, t| now.saturating_duration_since(*t) < PING_MEMORY);
        lock(&self.accusations).reap(now);
    }

    /// The indirect stage of probe `number` began: if nobody answers within a few round
    /// trips, the probe has failed, and waiting out the rest of the probe period (as foca
    /// does) only delays the suspicion.
    fn indirect_started(&mut self, cx: &mut Ctx<'_>, now: Instant, number: u8) {
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
        let timeout = self.cfg.probe_timeout;
        let rtt = cx.counters.probe_rtt_mean().unwrap_or(timeout);
        let wait = (rtt * 4).clamp(timeout / 10, timeout / 2) * self.health_mult();
        self.schedule(cx, now + wait, Due::ProbeOverdue(number));
    }

    /// Nobody answered probe `number`, directly or indirectly, in time: have the core end
    /// foca's probe cycle now (foca then suspects the target and starts the next probe).
    fn probe_overdue(&mut self, number: u8) {
        if self.probe.as_ref().is_some_and(|p| p.number == number && !p.answered) {
            self.orders.push_back(Order::EndProbeCycle);
        }
    }

    /// Lifeguard's local health multiplier of probe period and timeouts.
    pub(super) fn health_mult(&self) -> u32 {
        self.health + 1
    }

    /// One more sign that we are slow: stretch our probing, and our open suspicions' timeouts
    /// at the next occasion (Lifeguard scales local timeouts by the multiplier).
    pub(super) fn health_up(&mut self) {
        let before = self.health;
        self.health = (self.health + 1).min(self.max_health);
        self.rearm |= self.health != before;
    }

    /// Drops every suspicion in progress and every check (foca voided our timers).
    pub(super) fn forget_suspicions(&mut self) {
        let open = std::mem::take(&mut lock(&self.accusations).open);
        for r in open.into_values() {
            if let Some(k) = r.timer {
                self.timers.remove(&k);
            }
        }
        self.checks.clear();
    }

    /// Follows our incarnation in what foca sends: a rise means we refuted a suspicion of
    /// ourselves, a sign that we may be the slow one.
    fn track_incarnation(&mut self, cx: &mut Ctx<'_>, id: &Identity, incarnation: u16) {
        if *id != self.incarnation.0 {
            self.incarnation = (id.clone(), incarnation);
        } else if incarnation > self.incarnation.1 {
            self.incarnation.1 = incarnation;
            cx.counters.refutations += 1;
            self.health_up();
        }
    }

    /// This node accuses `subject`: the accusation is gossiped (to a few members at once) and
    /// counted like anyone else's.
    pub(super) fn accuse(&mut self, subject: Identity, incarnation: u16) {
        self.orders.push_back(Order::Accuse(Suspect { subject, incarnation, accuser: self.me }));
    }

    /// Acts on accusations that arrived during the last foca call.
    pub(super) fn process_suspicions(&mut self, cx: &mut Ctx<'_>, now: Instant) {
        let (mut news, me, stale) = {
            let mut book = lock(&self.accusations);
            (
                std::mem::take(&mut book.news),
                book.self_suspected.take(),
                std::mem::take(&mut book.stale_timers),
            )
        };
        for k in stale {
            self.timers.remove(&k);
        }
        if let Some(incarnation) = me {
            self.refute(cx, incarnation);
        }
        if std::mem::take(&mut self.rearm) {
            news.extend(lock(&self.accusations).open.keys().cloned());
        }
        news.sort();
        news.dedup();
        for subject in news {
            self.review(cx, now, &subject);
        }
    }

    /// Someone says we are suspect at `incarnation`: let foca refute it (it raises our
    /// incarnation and gossips).
    fn refute(&mut self, cx: &Ctx<'_>, incarnation: u16) {
        let me = cx.foca.identity().clone();
        if me != self.incarnation.0 || incarnation < self.incarnation.1 {
            return;
        }
        let update = Member::new(me, incarnation, SwimState::Suspect);
        self.orders.push_back(Order::Apply(update, "refutation"));
    }

    /// Brings a suspicion in line with foca's view and its accusers: drops it if settled,
    /// marks the suspect in foca, re-arms its timeout, and maybe checks the suspect.
    fn review(&mut self, cx: &mut Ctx<'_>, now: Instant, subject: &Identity) {
        let me = self.me;
        let Some((incarnation, accused, reviewed)) = lock(&self.accusations)
            .open
            .get(subject)
            .map(|r| (r.incarnation, r.accusers.contains(&me), r.reviewed))
        else {
            return;
        };
        match cx.view_of(subject) {
            None => {
                // Not a member we know: nothing to suspect.
                let gone = lock(&self.accusations).open.remove(subject);
                if let Some(k) = gone.and_then(|r| r.timer) {
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
                    self.orders.push_back(Order::Apply(update, "marking a suspect"));
                }
            }
        }
        self.arm(cx, now, subject);
        if !reviewed {
            if let Some(r) = lock(&self.accusations).open.get_mut(subject) {
                r.reviewed = true;
            }
            // Candidates: every active member but the suspect and ourselves.
            let candidates = cx.foca.num_members().saturating_sub(1);
            let p = self.cfg.check_probability(candidates);
            if !accused && p > 0.0 && cx.rng.random::<f64>() < p {
                self.start_check(cx, now, subject.clone(), incarnation);
            }
        }
        if !self.scan_armed {
            self.scan_armed = true;
            self.schedule(cx, now + self.cfg.gossip_interval, Due::Scan);
        }
    }

    /// (Re)schedules a suspicion's timeout from its start and its confirmations so far.
    fn arm(&mut self, cx: &mut Ctx<'_>, now: Instant, subject: &Identity) {
        let n = cx.foca.num_members() + 1;
        let mult = self.health_mult();
        let mut book = lock(&self.accusations);
        let Some(r) = book.open.get_mut(subject) else { return };
        let confirmations = u32::try_from(r.accusers.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let timeout = self.cfg.suspicion_timeout_confirmed(n, confirmations) * mult;
        let at = (r.started + timeout).max(now);
        if r.timer.is_some_and(|(t, _)| t == at) {
            return;
        }
        if let Some(k) = r.timer.take() {
            self.timers.remove(&k);
        }
        *cx.timer_seq += 1;
        let key = (at, *cx.timer_seq);
        r.timer = Some(key);
        let incarnation = r.incarnation;
        drop(book);
        self.timers.insert(key, Due::Suspicion(subject.clone(), incarnation));
    }

    /// Ends a suspicion: refuted at `incarnation` (`refuted`), or moot (`u16::MAX`: down).
    fn settle(&mut self, now: Instant, subject: &Identity, incarnation: u16, refuted: bool) {
        let wrong = {
            let mut book = lock(&self.accusations);
            book.settled.insert(subject.clone(), (incarnation, now));
            match book.open.remove(subject) {
                Some(r) => {
                    if let Some(k) = r.timer {
                        self.timers.remove(&k);
                    }
                    refuted && r.accusers.contains(&self.me)
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
    fn expire(&mut self, cx: &Ctx<'_>, now: Instant, subject: &Identity, incarnation: u16) {
        let current = lock(&self.accusations).open.get(subject).map(|r| r.incarnation);
        if current != Some(incarnation) {
            return;
        }
        match cx.view_of(subject) {
            Some((known, state)) if known == incarnation && state != SwimState::Down => {
                let down = Member::new(subject.clone(), incarnation, SwimState::Down);
                self.orders.push_back(Order::Apply(down, "declaring a suspect down"));
                self.settle(now, subject, u16::MAX, false);
            }
            Some((known, state)) if known > incarnation && state != SwimState::Down => {
                self.settle(now, subject, incarnation, true);
            }
            _ => self.settle(now, subject, u16::MAX, false),
        }
    }

    /// Periodically ends suspicions that foca's view shows refuted or down.
    fn scan(&mut self, cx: &mut Ctx<'_>, now: Instant) {
        let open: Vec<(Identity, u16)> =
            lock(&self.accusations).open.iter().map(|(k, r)| (k.clone(), r.incarnation)).collect();
        if open.is_empty() {
            self.scan_armed = false;
            return;
        }
        let wanted: BTreeSet<&Identity> = open.iter().map(|(k, _)| k).collect();
        let views: BTreeMap<Identity, (u16, SwimState)> = cx
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
        self.schedule(cx, now + self.cfg.gossip_interval, Due::Scan);
    }

    /// Time between two asks of a suspicion check.
    fn check_interval(&self) -> Duration {
        self.cfg.probe_timeout * self.health_mult() / CHECK_TRIES
    }

    /// Asks the suspect directly whether it is there (and tells it it is suspected).
    fn start_check(&mut self, cx: &mut Ctx<'_>, now: Instant, subject: Identity, incarnation: u16) {
        let nonce: u32 = cx.rng.random();
        let ping = Check::Ping { nonce, target: subject.clone(), incarnation };
        self.orders.push_back(Order::Check(subject.addr, ping));
        self.checks.insert(nonce, PendingCheck { subject, incarnation, tries: 1 });
        cx.counters.checks_sent += 1;
        let at = now + self.check_interval();
        self.schedule(cx, at, Due::Check(nonce));
    }

    /// The next ask of a check, or, after the last one went unanswered, our own accusation.
    fn check_step(&mut self, cx: &mut Ctx<'_>, now: Instant, nonce: u32) {
        let interval = self.check_interval();
        let Some(c) = self.checks.get_mut(&nonce) else { return };
        if c.tries < CHECK_TRIES {
            c.tries += 1;
            let ping = Check::Ping { nonce, target: c.subject.clone(), incarnation: c.incarnation };
            self.orders.push_back(Order::Check(c.subject.addr, ping));
            self.schedule(cx, now + interval, Due::Check(nonce));
            return;
        }
        let Some(c) = self.checks.remove(&nonce) else { return };
        let open = lock(&self.accusations)
            .open
            .get(&c.subject)
            .is_some_and(|r| r.incarnation == c.incarnation);
        if open {
            self.accuse(c.subject, c.incarnation);
        }
    }

    /// A suspicion check (or its answer) arrived; the core has dropped pings about anyone but
    /// our current identity. A ping returns its nonce: the core lets foca's refutation out
    /// first, then [`Lifeguard::answer`]s with our new incarnation.
    pub(super) fn handle_check(
        &mut self,
        cx: &mut Ctx<'_>,
        now: Instant,
        check: Check,
    ) -> Option<u32> {
        match check {
            Check::Ping { nonce, incarnation, .. } => {
                self.refute(cx, incarnation);
                Some(nonce)
            }
            Check::Ack { nonce, from: who, incarnation } => {
                if self.checks.get(&nonce).is_none_or(|c| c.subject != who) {
                    // Late (after the check ended) or unknown.
                    cx.counters.duplicates += 1;
                    return None;
                }
                let c = self.checks.remove(&nonce)?;
                if incarnation > c.incarnation {
                    // The suspect itself says it refuted: apply (and spread) it now.
                    let alive = Member::new(who.clone(), incarnation, SwimState::Alive);
                    self.orders.push_back(Order::Apply(alive, "applying a refutation"));
                    self.settle(now, &who, c.incarnation, true);
                }
                None
            }
        }
    }

    /// Answers a check of us with our current identity and incarnation.
    pub(super) fn answer(&mut self, to: SocketAddr, nonce: u32) {
        let (me, incarnation) = self.incarnation.clone();
        self.orders.push_back(Order::Check(to, Check::Ack { nonce, from: me, incarnation }));
    }
}
