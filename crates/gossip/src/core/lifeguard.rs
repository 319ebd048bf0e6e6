//! Lifeguard's refinements around foca's SWIM: suspicions that shrink with each independent
//! accuser and are declared down by the core, checks that let a few members verify a new
//! suspicion at once, local health that slows a node that is itself slow, and probe cycles
//! that end once their indirect probes are overdue. The crate root tells the whole story.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use foca::{Header, Member, Message, State as SwimState, Timer};
use rand::RngExt;

use super::shared::lock;
use super::swim::{Swim, Tick};
use crate::config::CoreConfig;
use crate::metrics::DropReason;
use crate::msg::{self, Check, Item, Suspect};
use crate::types::Identity;
use crate::wire::Kind;

/// Asks per suspicion check, spread over the probe timeout (a lost datagram is not a death).
const CHECK_TRIES: u32 = 3;
/// How long an unanswered probe is remembered for its round-trip time.
const PING_MEMORY: Duration = Duration::from_secs(10);

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

/// This node's Lifeguard: its local health, its probes and checks in flight. The suspicions
/// themselves live in the shared state, where foca's handler records accusations.
#[derive(Debug)]
pub(super) struct Lifeguard {
    /// Local health score: 0 healthy, up to `max_health`.
    health: u32,
    max_health: u32,
    checks: BTreeMap<u32, PendingCheck>,
    /// Our identity and incarnation as last sent (a rise is a refutation).
    incarnation: (Identity, u16),
    scan_armed: bool,
    /// The health multiplier rose: re-arm the open suspicions' timeouts.
    rearm: bool,
    probe: Option<ProbeWatch>,
    /// How much earlier than planned the last probe cycle ended: added to the next one, so
    /// the probe rate stays one per probe period.
    probe_debt: Duration,
    /// Our probes by target and number, for their round-trip times.
    pings: HashMap<(SocketAddr, u8), Instant>,
}

impl Lifeguard {
    pub(super) fn new(me: Identity, cfg: &CoreConfig) -> Lifeguard {
        Lifeguard {
            health: 0,
            max_health: cfg.awareness_max.saturating_sub(1),
            checks: BTreeMap::new(),
            incarnation: (me, 0),
            scan_armed: false,
            rearm: false,
            probe: None,
            probe_debt: Duration::ZERO,
            pings: HashMap::new(),
        }
    }

    /// Whether open suspicions wait to be re-armed (the core's flush loop runs on for them).
    pub(super) fn rearm_pending(&self) -> bool {
        self.rearm
    }

    /// How much later the next probe cycle starts, to make up for the one cut short.
    pub(super) fn take_probe_debt(&mut self) -> Duration {
        std::mem::take(&mut self.probe_debt)
    }

    /// foca sent a message: follow our probe and our own incarnation.
    pub(super) fn sent(&mut self, sw: &mut Swim, now: Instant, h: &Header<Identity>) {
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
            Message::PingReq { probe_number, .. } => self.indirect_started(sw, now, probe_number),
            _ => {}
        }
        self.track_incarnation(sw, &h.src, h.src_incarnation);
    }

    /// foca received a message: answers to our probe, and their round-trip time.
    pub(super) fn received(&mut self, sw: &mut Swim, now: Instant, h: &Header<Identity>) {
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
            lock(&sw.state).counters.rtt(rtt);
            // A timely answer to our own probe: evidence that we are healthy.
            if rtt <= sw.cfg.probe_timeout * self.health_mult() {
                self.health = self.health.saturating_sub(1);
            }
        }
    }

    /// Forgets probes that were never answered.
    pub(super) fn reap(&mut self, now: Instant) {
        self.pings.retain(|_, t| now.saturating_duration_since(*t) < PING_MEMORY);
    }

    /// The indirect stage of probe `number` began: if nobody answers within a few round
    /// trips, the probe has failed, and waiting out the rest of the probe period (as foca
    /// does) only delays the suspicion.
    pub(super) fn indirect_started(&mut self, sw: &mut Swim, now: Instant, number: u8) {
        if !sw.cfg.lifeguard() {
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
        let rtt = lock(&sw.state).counters.probe_rtt_mean().unwrap_or(sw.cfg.probe_timeout);
        let wait = (rtt * 4).clamp(sw.cfg.probe_timeout / 10, sw.cfg.probe_timeout / 2)
            * self.health_mult();
        sw.schedule(now + wait, Tick::ProbeOverdue(number));
    }

    /// Nobody answered probe `number`, directly or indirectly, in time: end the probe cycle
    /// now (foca then suspects the target and starts the next probe); the next cycle is made
    /// longer by as much, so the probe rate does not change.
    pub(super) fn probe_overdue(&mut self, sw: &mut Swim, now: Instant, number: u8) {
        if !self.probe.as_ref().is_some_and(|p| p.number == number && !p.answered) {
            return;
        }
        let pending = sw
            .timers
            .iter()
            .find(|(_, t)| matches!(t, Tick::Foca(Timer::ProbeRandomMember(_))))
            .map(|(k, _)| *k);
        let Some(key) = pending else { return };
        if key.0 <= now {
            return;
        }
        if let Some(tick) = sw.timers.remove(&key) {
            self.probe_debt = key.0 - now;
            sw.schedule(now, tick);
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
    pub(super) fn forget_suspicions(&mut self, sw: &mut Swim) {
        let open = std::mem::take(&mut lock(&sw.state).suspicions);
        for r in open.into_values() {
            if let Some(k) = r.timer {
                sw.timers.remove(&k);
            }
        }
        self.checks.clear();
    }

    /// Follows our incarnation in what foca sends: a rise means we refuted a suspicion of
    /// ourselves, a sign that we may be the slow one.
    fn track_incarnation(&mut self, sw: &mut Swim, id: &Identity, incarnation: u16) {
        if *id != self.incarnation.0 {
            self.incarnation = (id.clone(), incarnation);
        } else if incarnation > self.incarnation.1 {
            self.incarnation.1 = incarnation;
            lock(&sw.state).counters.refutations += 1;
            self.health_up();
        }
    }

    /// This node accuses `subject`: the accusation is gossiped (to a few members at once) and
    /// counted like anyone else's.
    pub(super) fn accuse(&mut self, sw: &mut Swim, subject: Identity, incarnation: u16) {
        let accuser = lock(&sw.state).me.node;
        let item = Item::Suspect(Suspect { subject, incarnation, accuser });
        if let Ok(true) = sw.foca.add_broadcast(&msg::encode(&item)) {
            lock(&sw.state).counters.suspicions_raised += 1;
            if let Err(e) = sw.foca.gossip(&mut sw.rt) {
                tracing::debug!(error = %e, "gossip of an accusation failed");
            }
        }
    }

    /// Acts on accusations that arrived during the last foca call.
    pub(super) fn process_suspicions(&mut self, sw: &mut Swim, now: Instant) {
        let (mut news, me, stale) = {
            let mut st = lock(&sw.state);
            (
                std::mem::take(&mut st.suspect_news),
                st.self_suspected.take(),
                std::mem::take(&mut st.stale_timers),
            )
        };
        for k in stale {
            sw.timers.remove(&k);
        }
        if let Some(incarnation) = me {
            self.refute(sw, incarnation);
        }
        if std::mem::take(&mut self.rearm) {
            news.extend(lock(&sw.state).suspicions.keys().cloned());
        }
        news.sort();
        news.dedup();
        for subject in news {
            self.review(sw, now, &subject);
        }
    }

    /// Someone says we are suspect at `incarnation`: let foca refute it (it raises our
    /// incarnation and gossips).
    pub(super) fn refute(&mut self, sw: &mut Swim, incarnation: u16) {
        let me = sw.foca.identity().clone();
        if me != self.incarnation.0 || incarnation < self.incarnation.1 {
            return;
        }
        let update = Member::new(me, incarnation, SwimState::Suspect);
        if let Err(e) = sw.foca.apply_many(std::iter::once(update), true, &mut sw.rt) {
            tracing::debug!(error = %e, "refutation failed");
        }
    }

    /// Brings a suspicion in line with foca's view and its accusers: drops it if settled,
    /// marks the suspect in foca, re-arms its timeout, and maybe checks the suspect.
    pub(super) fn review(&mut self, sw: &mut Swim, now: Instant, subject: &Identity) {
        let Some((incarnation, accused, reviewed)) = ({
            let st = lock(&sw.state);
            st.suspicions
                .get(subject)
                .map(|r| (r.incarnation, r.accusers.contains(&st.me.node), r.reviewed))
        }) else {
            return;
        };
        match sw.view_of(subject) {
            None => {
                // Not a member we know: nothing to suspect.
                if let Some(r) = lock(&sw.state).suspicions.remove(subject)
                    && let Some(k) = r.timer
                {
                    sw.timers.remove(&k);
                }
                return;
            }
            Some((_, SwimState::Down)) => return self.settle(sw, now, subject, u16::MAX, false),
            Some((known, _)) if known > incarnation => {
                return self.settle(sw, now, subject, incarnation, true);
            }
            Some((known, state)) => {
                if known < incarnation || state == SwimState::Alive {
                    let update = Member::new(subject.clone(), incarnation, SwimState::Suspect);
                    if let Err(e) = sw.foca.apply_many(std::iter::once(update), true, &mut sw.rt) {
                        tracing::debug!(error = %e, "marking a suspect failed");
                    }
                }
            }
        }
        self.arm(sw, now, subject);
        if !reviewed {
            if let Some(r) = lock(&sw.state).suspicions.get_mut(subject) {
                r.reviewed = true;
            }
            // Candidates: every active member but the suspect and ourselves.
            let candidates = sw.foca.num_members().saturating_sub(1);
            let p = sw.cfg.check_probability(candidates);
            if !accused && p > 0.0 && sw.rng.random::<f64>() < p {
                self.start_check(sw, now, subject.clone(), incarnation);
            }
        }
        if !self.scan_armed {
            self.scan_armed = true;
            sw.schedule(now + sw.cfg.gossip_interval, Tick::Scan);
        }
    }

    /// (Re)schedules a suspicion's timeout from its start and its confirmations so far.
    pub(super) fn arm(&mut self, sw: &mut Swim, now: Instant, subject: &Identity) {
        let n = sw.foca.num_members() + 1;
        let mult = self.health_mult();
        let mut st = lock(&sw.state);
        let Some(r) = st.suspicions.get_mut(subject) else { return };
        let confirmations = u32::try_from(r.accusers.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let timeout = sw.cfg.suspicion_timeout_confirmed(n, confirmations) * mult;
        let at = (r.started + timeout).max(now);
        if r.timer.is_some_and(|(t, _)| t == at) {
            return;
        }
        if let Some(k) = r.timer.take() {
            sw.timers.remove(&k);
        }
        sw.timer_seq += 1;
        let key = (at, sw.timer_seq);
        r.timer = Some(key);
        let incarnation = r.incarnation;
        drop(st);
        sw.timers.insert(key, Tick::Suspicion(subject.clone(), incarnation));
    }

    /// Ends a suspicion: refuted at `incarnation` (`refuted`), or moot (`u16::MAX`: down).
    pub(super) fn settle(
        &mut self,
        sw: &mut Swim,
        now: Instant,
        subject: &Identity,
        incarnation: u16,
        refuted: bool,
    ) {
        let wrong = {
            let mut st = lock(&sw.state);
            st.settled.insert(subject.clone(), (incarnation, now));
            let me = st.me.node;
            match st.suspicions.remove(subject) {
                Some(r) => {
                    if let Some(k) = r.timer {
                        sw.timers.remove(&k);
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
    pub(super) fn expire(
        &mut self,
        sw: &mut Swim,
        now: Instant,
        subject: &Identity,
        incarnation: u16,
    ) {
        let current = lock(&sw.state).suspicions.get(subject).map(|r| r.incarnation);
        if current != Some(incarnation) {
            return;
        }
        match sw.view_of(subject) {
            Some((known, state)) if known == incarnation && state != SwimState::Down => {
                let down = Member::new(subject.clone(), incarnation, SwimState::Down);
                if let Err(e) = sw.foca.apply_many(std::iter::once(down), true, &mut sw.rt) {
                    tracing::debug!(error = %e, "declaring a suspect down failed");
                }
                self.settle(sw, now, subject, u16::MAX, false);
            }
            Some((known, state)) if known > incarnation && state != SwimState::Down => {
                self.settle(sw, now, subject, incarnation, true);
            }
            _ => self.settle(sw, now, subject, u16::MAX, false),
        }
    }

    /// Periodically ends suspicions that foca's view shows refuted or down.
    pub(super) fn scan(&mut self, sw: &mut Swim, now: Instant) {
        let open: Vec<(Identity, u16)> =
            lock(&sw.state).suspicions.iter().map(|(k, r)| (k.clone(), r.incarnation)).collect();
        if open.is_empty() {
            self.scan_armed = false;
            return;
        }
        let wanted: BTreeSet<&Identity> = open.iter().map(|(k, _)| k).collect();
        let views: BTreeMap<Identity, (u16, SwimState)> = sw
            .foca
            .iter_membership_state()
            .filter(|m| wanted.contains(m.id()))
            .map(|m| (m.id().clone(), (m.incarnation(), m.state())))
            .collect();
        for (subject, incarnation) in open {
            match views.get(&subject) {
                Some((_, SwimState::Down)) | None => {
                    self.settle(sw, now, &subject, u16::MAX, false)
                }
                Some((known, _)) if *known > incarnation => {
                    self.settle(sw, now, &subject, incarnation, true);
                }
                Some(_) => {}
            }
        }
        sw.schedule(now + sw.cfg.gossip_interval, Tick::Scan);
    }

    /// Time between two asks of a suspicion check.
    fn check_interval(&self, cfg: &CoreConfig) -> Duration {
        cfg.probe_timeout * self.health_mult() / CHECK_TRIES
    }

    /// Asks the suspect directly whether it is there (and tells it it is suspected).
    pub(super) fn start_check(
        &mut self,
        sw: &mut Swim,
        now: Instant,
        subject: Identity,
        incarnation: u16,
    ) {
        let nonce: u32 = sw.rng.random();
        let ping = Check::Ping { nonce, target: subject.clone(), incarnation };
        Self::send_check(sw, subject.addr, &ping);
        self.checks.insert(nonce, PendingCheck { subject, incarnation, tries: 1 });
        lock(&sw.state).counters.checks_sent += 1;
        sw.schedule(now + self.check_interval(&sw.cfg), Tick::Check(nonce));
    }

    fn send_check(sw: &mut Swim, to: SocketAddr, check: &Check) {
        sw.send_udp(to, Kind::Check, &msg::encode(check));
    }

    /// The next ask of a check, or, after the last one went unanswered, our own accusation.
    pub(super) fn check_step(&mut self, sw: &mut Swim, now: Instant, nonce: u32) {
        let Some(c) = self.checks.get_mut(&nonce) else { return };
        if c.tries < CHECK_TRIES {
            c.tries += 1;
            let ping = Check::Ping { nonce, target: c.subject.clone(), incarnation: c.incarnation };
            let to = c.subject.addr;
            Self::send_check(sw, to, &ping);
            sw.schedule(now + self.check_interval(&sw.cfg), Tick::Check(nonce));
            return;
        }
        let Some(c) = self.checks.remove(&nonce) else { return };
        let open = lock(&sw.state)
            .suspicions
            .get(&c.subject)
            .is_some_and(|r| r.incarnation == c.incarnation);
        if open {
            self.accuse(sw, c.subject, c.incarnation);
        }
    }

    /// A suspicion check (or its answer) arrived. A ping about us returns its nonce: the core
    /// lets foca's refutation out first, then [`Lifeguard::answer`]s with our new incarnation.
    pub(super) fn handle_check(
        &mut self,
        sw: &mut Swim,
        now: Instant,
        from: SocketAddr,
        plain: &[u8],
    ) -> Option<u32> {
        let check = match msg::decode_check(plain, sw.cfg.max_datagram) {
            Ok(c) => c,
            Err(e) => {
                tracing::trace!(%from, error = %e, "malformed check");
                sw.count_drop(DropReason::Malformed);
                return None;
            }
        };
        match check {
            Check::Ping { nonce, target, incarnation } => {
                if target != *sw.foca.identity() {
                    // About a previous identity of ours (or not us at all): that one is gone.
                    sw.count_drop(DropReason::Rejected);
                    return None;
                }
                self.refute(sw, incarnation);
                return Some(nonce);
            }
            Check::Ack { nonce, from: who, incarnation } => {
                if self.checks.get(&nonce).is_none_or(|c| c.subject != who) {
                    // Late (after the check ended) or unknown.
                    lock(&sw.state).counters.duplicates += 1;
                    return None;
                }
                let c = self.checks.remove(&nonce)?;
                if incarnation > c.incarnation {
                    // The suspect itself says it refuted: apply (and spread) it now.
                    let alive = Member::new(who.clone(), incarnation, SwimState::Alive);
                    if let Err(e) = sw.foca.apply_many(std::iter::once(alive), true, &mut sw.rt) {
                        tracing::debug!(error = %e, "applying a refutation failed");
                    }
                    self.settle(sw, now, &who, c.incarnation, true);
                }
            }
        }
        None
    }

    /// Answers a check of us with our current identity and incarnation.
    pub(super) fn answer(&self, sw: &mut Swim, to: SocketAddr, nonce: u32) {
        let (me, incarnation) = self.incarnation.clone();
        Self::send_check(sw, to, &Check::Ack { nonce, from: me, incarnation });
    }
}
