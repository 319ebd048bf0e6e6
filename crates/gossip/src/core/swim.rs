//! foca and the plumbing every part of the core shares: the state foca's handler writes, what
//! foca asked for during a call, the timers, the keyring and the outbox of sealed messages;
//! and the foca calls Lifeguard's orders and this node's own writes ask for.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foca::{Foca, OwnedNotification, PostcardCodec, State as SwimState, Timer};
use rand::rngs::SmallRng;

use super::handler::Handler;
use super::lifeguard::Order;
use super::shared::{State, lock};
use super::vocab::{Event, MemberState, Transmit};
use crate::config::CoreConfig;
use crate::keyring::Keyring;
use crate::metrics::DropReason;
use crate::msg::{self, Item};
use crate::types::Identity;
use crate::wire::Kind;

/// Collects what foca asks for during one call.
#[derive(Default)]
pub(super) struct Rt {
    pub(super) send: Vec<(Identity, Vec<u8>)>,
    pub(super) timers: Vec<(Duration, Timer<Identity>)>,
    pub(super) notes: Vec<OwnedNotification<Identity>>,
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

/// What a timer of the core does when it fires.
#[derive(Debug)]
pub(super) enum Tick {
    Foca(Timer<Identity>),
    Sync,
    Reap,
    /// Our own entry changes written since the last spread go out (`Core::spread_soon`).
    Spread,
}

/// foca as the core runs it, with our broadcast handler.
pub(super) type SwimFoca = Foca<Identity, PostcardCodec, SmallRng, Handler>;

/// foca with its runtime requests, the shared state, timers, keys and outbox.
pub(super) struct Swim {
    pub(super) cfg: CoreConfig,
    pub(super) foca: SwimFoca,
    pub(super) state: Arc<Mutex<State>>,
    pub(super) rt: Rt,
    /// Keyed by due time and a sequence number (two timers may be due at once).
    pub(super) timers: BTreeMap<(Instant, u64), Tick>,
    pub(super) timer_seq: u64,
    pub(super) keyring: Keyring,
    pub(super) rng: SmallRng,
    /// Restoring a saved view: nothing learned is gossiped on.
    pub(super) quiet: bool,
    pub(super) outbox: VecDeque<Transmit>,
    /// Cluster size figures foca's config was last sized for.
    pub(super) sized_for: (u8, Duration),
    /// How much earlier than planned the last probe cycle ended: added to the next one, so
    /// the probe rate stays one per probe period.
    pub(super) probe_debt: Duration,
    /// Our own entry changes go out at once rather than on the next gossip round (see
    /// [`Swim::spread_soon`]); this is when the next such spread may go.
    pub(super) next_spread: Instant,
    /// A [`Tick::Spread`] is scheduled: writes until then go with it.
    pub(super) spread_due: bool,
    /// The members foca held suspect when [`Swim::note_suspicions`] last looked, sorted.
    pub(super) suspected: Vec<Identity>,
}

impl Swim {
    pub(super) fn set_now(&mut self, now: Instant) {
        lock(&self.state).now = now;
    }

    pub(super) fn count_drop(&mut self, reason: DropReason) {
        lock(&self.state).counters.drop(reason);
    }

    pub(super) fn schedule(&mut self, at: Instant, tick: Tick) {
        self.timer_seq += 1;
        self.timers.insert((at, self.timer_seq), tick);
    }

    /// Seals `plain` as a `kind` datagram to `to`, counts it and queues it.
    pub(super) fn send_udp(&mut self, to: SocketAddr, kind: Kind, plain: &[u8]) {
        let sealed = self.keyring.seal(kind, plain);
        let mut st = lock(&self.state);
        st.counters.udp_out += 1;
        st.counters.udp_bytes_out += sealed.len() as u64;
        self.outbox.push_back(Transmit::Udp { to, data: sealed });
    }

    /// Ends foca's probe cycle now rather than when its timer says (Lifeguard saw the probe
    /// fail early); the next cycle is made longer by as much, so the probe rate does not change.
    pub(super) fn end_probe_cycle(&mut self, now: Instant) {
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

    /// Scales retransmissions and the suspicion timeout with the cluster, as memberlist does.
    pub(super) fn resize(&mut self) {
        let n = self.foca.num_members() + 1;
        let want = (self.cfg.retransmits(n), self.cfg.suspicion_timeout(n));
        if want != self.sized_for {
            self.sized_for = want;
            if let Err(e) = self.foca.set_config(self.cfg.foca(n)) {
                tracing::warn!(error = %e, "foca refused resized config");
            }
        }
    }

    /// Sends our pending broadcasts to `gossip_fanout` members now instead of on the next
    /// gossip round: a node's own changes (a task's endpoints, what its data path applied) are
    /// what other nodes wait on, and a round is up to `gossip_interval` away. A burst of writes
    /// costs at most one extra round every tenth of `gossip_interval`; the rounds that follow
    /// carry the changes on as before, so each one still goes out its retransmit budget's
    /// number of times.
    pub(super) fn spread_soon(&mut self, now: Instant) {
        if self.quiet || self.spread_due {
            return;
        }
        if now >= self.next_spread {
            self.spread(now);
        } else {
            self.spread_due = true;
            self.schedule(self.next_spread, Tick::Spread);
        }
    }

    /// Starts a gossip round now with what foca has queued.
    pub(super) fn spread(&mut self, now: Instant) {
        self.spread_due = false;
        self.next_spread = now + self.cfg.gossip_interval / 10;
        if self.foca.num_members() > 0
            && let Err(e) = self.foca.gossip(&mut self.rt)
        {
            tracing::debug!(error = %e, "spreading our own changes");
        }
    }

    /// Tells consumers who became suspect and who refuted since the last look. A suspect that
    /// went down or was replaced by a new identity needs no word here: `MemberDown` or
    /// `MemberUp` says it. Cheap when nobody is suspect: one pass over foca's members.
    pub(super) fn note_suspicions(&mut self) {
        let mut now: Vec<Identity> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == SwimState::Suspect)
            .map(|m| m.id().clone())
            .collect();
        if now.is_empty() && self.suspected.is_empty() {
            return;
        }
        now.sort();
        if now == self.suspected {
            return;
        }
        let before = std::mem::replace(&mut self.suspected, now);
        let mut st = lock(&self.state);
        for m in self.foca.iter_membership_state() {
            let (was, is) = (before.binary_search(m.id()).is_ok(), m.state());
            let event = match is {
                SwimState::Suspect if !was => Event::MemberSuspected,
                SwimState::Alive if was => Event::MemberRefuted,
                _ => continue,
            };
            let state =
                if is == SwimState::Suspect { MemberState::Suspect } else { MemberState::Alive };
            let view = st.member_view(m.id(), state, m.incarnation());
            st.events.push_back(event(view));
        }
    }

    /// Carries out one of Lifeguard's orders.
    pub(super) fn carry_out(&mut self, now: Instant, order: Order) {
        match order {
            Order::Apply(update, what) => {
                let rt = &mut self.rt;
                if let Err(e) = self.foca.apply_many(std::iter::once(update), true, rt) {
                    tracing::debug!(error = %e, "{what} failed");
                }
            }
            Order::Accuse(suspect) => {
                let item = msg::encode(&Item::Suspect(suspect));
                if let Ok(true) = self.foca.add_broadcast(&item) {
                    lock(&self.state).counters.suspicions_raised += 1;
                    if let Err(e) = self.foca.gossip(&mut self.rt) {
                        tracing::debug!(error = %e, "gossip of an accusation failed");
                    }
                }
            }
            Order::Check(to, check) => {
                self.send_udp(to, Kind::Check, &msg::encode(&check));
            }
            Order::EndProbeCycle => self.end_probe_cycle(now),
        }
    }
}
