//! Sans-I/O health of one service's backends. The driver feeds it the backend set
//! ([`HealthCore::upsert`], [`HealthCore::remove`]), active check results, connect results from
//! real traffic and timeouts; it answers with checks to run ([`HealthCore::poll_check`]), when
//! to wake ([`HealthCore::poll_timeout`]) and events ([`HealthCore::poll_event`]). No sockets, no
//! clock: `now` is always passed in.
//!
//! A backend is *eligible* (gets new connections) when all hold:
//! - its task state is [`TaskState::Healthy`] (running, and healthy if it has its own check);
//! - its active check is up: a backend never checked comes up on its first pass, a down one
//!   after `rise` passes in a row, an up one goes down after `fall` failures in a row;
//! - it is not ejected: `eject_after` connect failures in a row (by default one) eject it for
//!   `eject_base`, doubling per ejection in a row up to `eject_max`; after an ejection one more
//!   failure ejects it again, one success clears the backoff;
//! - a backend that returns (ejected, draining, or not ready before) is up again only once
//!   this node's own active check passes, so a heal or a restart never sends traffic to a
//!   backend nobody here has reached yet (without an active check it is up at once);
//! - it is not draining: a removed or stopped backend gets nothing new at once, and its open
//!   connections are reset when `drain_grace` ends.
//!
//! When the active check takes an up backend down, its open connections are reset at once
//! ([`HealthEvent::Reset`]): a dead backend must not leave clients hanging.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::spec::{BackendSpec, HealthSpec, TaskState};

/// Health of one backend as reported in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Eligible for new connections.
    Up,
    /// Task not running or not healthy per the tables.
    NotReady,
    /// Its first active check has not run yet (a new backend, or one back from draining or
    /// not ready): not eligible, and not known to be down either.
    Unchecked,
    /// Active check has failed (before it ever passed, or `fall` times in a row).
    Down,
    /// Ejected after connect failures until the backoff ends.
    Ejected,
    /// Being removed: open connections finish, nothing new.
    Draining,
}

impl HealthState {
    /// Short lowercase name, used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Up => "up",
            HealthState::NotReady => "not_ready",
            HealthState::Unchecked => "unchecked",
            HealthState::Down => "down",
            HealthState::Ejected => "ejected",
            HealthState::Draining => "draining",
        }
    }
}

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// The eligible set changed: rebuild and swap the snapshot.
    Changed,
    /// Reset every open connection to this backend now.
    Reset(String),
    /// The backend is gone for good: drop its state (after a `Reset`).
    Forget(String),
}

/// An active check to run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    /// Backend id; pass it back to [`HealthCore::handle_check`].
    pub id: String,
    /// Backend address (the port is the service's check port).
    pub addr: IpAddr,
}

#[derive(Debug, Clone)]
struct Entry {
    addr: IpAddr,
    local: bool,
    task: TaskState,
    checked_up: bool,
    ever_checked: bool,
    ok_streak: u32,
    fail_streak: u32,
    next_check: Instant,
    in_flight: bool,
    connect_fails: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    draining_until: Option<Instant>,
}

/// Health state machine for one service.
#[derive(Debug)]
pub struct HealthCore {
    spec: HealthSpec,
    drain_grace: Duration,
    backends: BTreeMap<String, Entry>,
    events: VecDeque<HealthEvent>,
}

impl HealthCore {
    /// A core with no backends.
    pub fn new(spec: HealthSpec, drain_grace: Duration) -> Self {
        HealthCore { spec, drain_grace, backends: BTreeMap::new(), events: VecDeque::new() }
    }

    /// Changes the parameters; streaks and states are kept.
    pub fn set_spec(&mut self, spec: HealthSpec, drain_grace: Duration) {
        if spec.check.is_none() {
            for e in self.backends.values_mut() {
                e.checked_up = true;
            }
        }
        self.spec = spec;
        self.drain_grace = drain_grace;
        self.events.push_back(HealthEvent::Changed);
    }

    /// Adds a backend or updates its task state. A backend that was draining and comes back is
    /// revived. A task that stops starts draining.
    pub fn upsert(&mut self, now: Instant, b: &BackendSpec) {
        let before = self.state(&b.id);
        let has_check = self.spec.check.is_some();
        let e = self.backends.entry(b.id.clone()).or_insert_with(|| Entry {
            addr: b.addr,
            local: b.local,
            task: b.state,
            checked_up: !has_check,
            ever_checked: false,
            ok_streak: 0,
            fail_streak: 0,
            next_check: now,
            in_flight: false,
            connect_fails: 0,
            ejections: 0,
            ejected_until: None,
            draining_until: None,
        });
        // Back from draining or from a task state that served nothing: it proves itself to our
        // active check again before it gets traffic.
        let returning = before.is_some()
            && (e.draining_until.is_some() || e.task != TaskState::Healthy)
            && b.state == TaskState::Healthy;
        if returning && has_check {
            e.checked_up = false;
            e.ever_checked = false;
            e.ok_streak = 0;
            e.next_check = now;
        }
        e.addr = b.addr;
        e.local = b.local;
        e.task = b.state;
        if b.state == TaskState::Stopped {
            if e.draining_until.is_none() {
                e.draining_until = Some(now + self.drain_grace);
            }
        } else {
            e.draining_until = None;
        }
        if self.state(&b.id) != before {
            self.events.push_back(HealthEvent::Changed);
        }
    }

    /// Starts draining a backend that left the service: no new connections from now, open ones
    /// are reset after the drain grace. Unknown ids are ignored.
    pub fn remove(&mut self, now: Instant, id: &str) {
        if let Some(e) = self.backends.get_mut(id)
            && e.draining_until.is_none()
        {
            e.draining_until = Some(now + self.drain_grace);
            self.events.push_back(HealthEvent::Changed);
        }
    }

    /// The health of a backend; `None` if unknown.
    pub fn state(&self, id: &str) -> Option<HealthState> {
        let e = self.backends.get(id)?;
        Some(if e.draining_until.is_some() {
            HealthState::Draining
        } else if e.task != TaskState::Healthy {
            HealthState::NotReady
        } else if !e.checked_up && !e.ever_checked {
            HealthState::Unchecked
        } else if !e.checked_up {
            HealthState::Down
        } else if e.ejected_until.is_some() {
            HealthState::Ejected
        } else {
            HealthState::Up
        })
    }

    /// Whether a backend gets new connections.
    pub fn eligible(&self, id: &str) -> bool {
        self.state(id) == Some(HealthState::Up)
    }

    /// Ids, addresses, locality and states of all known backends, sorted by id.
    pub fn backends(&self) -> impl Iterator<Item = (&str, IpAddr, bool, HealthState)> + '_ {
        self.backends
            .iter()
            .filter_map(|(id, e)| Some((id.as_str(), e.addr, e.local, self.state(id)?)))
    }

    /// The next active check that is due at `now`, if any. The driver runs it and reports back
    /// with [`HealthCore::handle_check`]; the next one for that backend is one interval later.
    pub fn poll_check(&mut self, now: Instant) -> Option<CheckRequest> {
        self.spec.check.as_ref()?;
        let interval = self.spec.interval;
        let (id, e) = self.backends.iter_mut().find(|(_, e)| {
            !e.in_flight
                && e.draining_until.is_none()
                && e.task == TaskState::Healthy
                && e.next_check <= now
        })?;
        e.in_flight = true;
        e.next_check = now + interval;
        Some(CheckRequest { id: id.clone(), addr: e.addr })
    }

    /// Records an active check result.
    pub fn handle_check(&mut self, _now: Instant, id: &str, passed: bool) {
        let (rise, fall) = (self.spec.rise, self.spec.fall);
        let before = self.state(id);
        let Some(e) = self.backends.get_mut(id) else {
            return;
        };
        e.in_flight = false;
        let was_up = e.checked_up;
        if passed {
            e.ok_streak += 1;
            e.fail_streak = 0;
            if !e.checked_up && (!e.ever_checked || e.ok_streak >= rise) {
                e.checked_up = true;
            }
        } else {
            e.fail_streak += 1;
            e.ok_streak = 0;
            if e.checked_up && (e.fail_streak >= fall || !e.ever_checked) {
                e.checked_up = false;
            }
        }
        e.ever_checked = true;
        if was_up && !e.checked_up && e.ever_checked {
            self.events.push_back(HealthEvent::Reset(id.to_owned()));
        }
        if self.state(id) != before {
            self.events.push_back(HealthEvent::Changed);
        }
    }

    /// Records the outcome of a connect attempt made for real traffic (passive check).
    pub fn handle_connect(&mut self, now: Instant, id: &str, ok: bool) {
        let (after, base, max) = (self.spec.eject_after, self.spec.eject_base, self.spec.eject_max);
        let Some(e) = self.backends.get_mut(id) else {
            return;
        };
        if ok {
            e.connect_fails = 0;
            if e.ejected_until.is_none() {
                e.ejections = 0;
            }
            return;
        }
        e.connect_fails += 1;
        if after == 0 || e.connect_fails < after || e.ejected_until.is_some() {
            return;
        }
        let shift = e.ejections.min(16);
        let backoff = base.saturating_mul(1u32 << shift).min(max);
        e.ejections += 1;
        e.ejected_until = Some(now + backoff);
        self.events.push_back(HealthEvent::Changed);
    }

    /// When the driver must call [`HealthCore::handle_timeout`] (or poll checks) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let checks = self.spec.check.is_some();
        self.backends
            .values()
            .flat_map(|e| {
                let check = (checks
                    && !e.in_flight
                    && e.draining_until.is_none()
                    && e.task == TaskState::Healthy)
                    .then_some(e.next_check);
                [check, e.ejected_until, e.draining_until]
            })
            .flatten()
            .min()
    }

    /// Ends ejections and drains whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        let after = self.spec.eject_after;
        let has_check = self.spec.check.is_some();
        let mut gone = Vec::new();
        let mut changed = false;
        for (id, e) in self.backends.iter_mut() {
            if e.ejected_until.is_some_and(|t| t <= now) {
                e.ejected_until = None;
                // Half-open: one more failure ejects again, with a longer backoff.
                e.connect_fails = after.saturating_sub(1);
                if has_check {
                    // And it is back only once a check of ours reaches it.
                    e.checked_up = false;
                    e.ever_checked = false;
                    e.ok_streak = 0;
                    e.next_check = now;
                }
                changed = true;
            }
            if e.draining_until.is_some_and(|t| t <= now) {
                gone.push(id.clone());
            }
        }
        for id in gone {
            self.backends.remove(&id);
            self.events.push_back(HealthEvent::Reset(id.clone()));
            self.events.push_back(HealthEvent::Forget(id));
            changed = true;
        }
        if changed {
            self.events.push_back(HealthEvent::Changed);
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<HealthEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::CheckKind;
    use std::net::Ipv4Addr;

    fn spec() -> HealthSpec {
        HealthSpec { check: Some(CheckKind::Tcp), ..HealthSpec::default() }
    }

    fn b(id: &str) -> BackendSpec {
        BackendSpec::new(id, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)))
    }

    fn drain(core: &mut HealthCore) -> Vec<HealthEvent> {
        std::iter::from_fn(|| core.poll_event()).collect()
    }

    /// Runs every due check at `now` with `pass`, returns how many ran.
    fn run_checks(core: &mut HealthCore, now: Instant, pass: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        while let Some(req) = core.poll_check(now) {
            core.handle_check(now, &req.id, pass(&req.id));
            n += 1;
        }
        n
    }

    #[test]
    fn unhealthy_gets_nothing_after_fall_and_returns_after_rise() {
        let t0 = Instant::now();
        let mut core = HealthCore::new(spec(), Duration::from_secs(10));
        core.upsert(t0, &b("a"));
        assert!(!core.eligible("a"), "unchecked backend gets no traffic");
        assert_eq!(run_checks(&mut core, t0, |_| true), 1);
        assert!(core.eligible("a"), "first pass brings a new backend up");
        drain(&mut core);
        let step = Duration::from_secs(2);
        let mut now = t0;
        for i in 1..=3 {
            now += step;
            assert_eq!(core.poll_timeout(), Some(now));
            assert_eq!(run_checks(&mut core, now, |_| false), 1);
            assert_eq!(core.eligible("a"), i < 3, "down exactly after fall=3 failures");
        }
        assert_eq!(core.state("a"), Some(HealthState::Down));
        let ev = drain(&mut core);
        assert!(ev.contains(&HealthEvent::Reset("a".into())), "dead backend's conns reset: {ev:?}");
        assert!(ev.contains(&HealthEvent::Changed));
        for i in 1..=2 {
            now += step;
            run_checks(&mut core, now, |_| true);
            assert_eq!(core.eligible("a"), i == 2, "up exactly after rise=2 passes");
        }
        // A single failure in a rise streak restarts it.
        for pass in [false, false, false, true, false, true, true] {
            now += step;
            run_checks(&mut core, now, |_| pass);
        }
        assert!(core.eligible("a"));
    }

    #[test]
    fn no_check_until_due_and_none_in_flight_twice() {
        let t0 = Instant::now();
        let mut core = HealthCore::new(spec(), Duration::from_secs(10));
        core.upsert(t0, &b("a"));
        let req = core.poll_check(t0).unwrap();
        assert_eq!(req.id, "a");
        assert!(core.poll_check(t0 + Duration::from_secs(5)).is_none(), "in flight");
        core.handle_check(t0, "a", true);
        assert!(core.poll_check(t0 + Duration::from_millis(1999)).is_none());
        assert!(core.poll_check(t0 + Duration::from_secs(2)).is_some());
    }

    #[test]
    fn task_state_gates_eligibility() {
        let t0 = Instant::now();
        let mut core =
            HealthCore::new(HealthSpec { check: None, ..spec() }, Duration::from_secs(1));
        let mut s = b("a");
        s.state = TaskState::Starting;
        core.upsert(t0, &s);
        assert_eq!(core.state("a"), Some(HealthState::NotReady));
        s.state = TaskState::Healthy;
        core.upsert(t0, &s);
        assert!(core.eligible("a"), "without an active check, task state decides");
        s.state = TaskState::Unhealthy;
        core.upsert(t0, &s);
        assert_eq!(core.state("a"), Some(HealthState::NotReady));
        s.state = TaskState::Stopped;
        core.upsert(t0, &s);
        assert_eq!(core.state("a"), Some(HealthState::Draining));
    }

    #[test]
    fn passive_ejection_backs_off_and_recovers() {
        let t0 = Instant::now();
        let mut core = HealthCore::new(
            HealthSpec { check: None, eject_after: 3, ..spec() },
            Duration::from_secs(1),
        );
        core.upsert(t0, &b("a"));
        drain(&mut core);
        core.handle_connect(t0, "a", false);
        core.handle_connect(t0, "a", false);
        assert!(core.eligible("a"));
        core.handle_connect(t0, "a", false);
        assert_eq!(core.state("a"), Some(HealthState::Ejected));
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        core.handle_timeout(t1);
        assert!(core.eligible("a"), "re-admitted after the backoff");
        core.handle_connect(t1, "a", false);
        assert_eq!(core.state("a"), Some(HealthState::Ejected), "half-open: one failure");
        assert_eq!(core.poll_timeout(), Some(t1 + Duration::from_secs(2)), "backoff doubles");
        let t2 = t1 + Duration::from_secs(2);
        core.handle_timeout(t2);
        core.handle_connect(t2, "a", true);
        core.handle_connect(t2, "a", false);
        core.handle_connect(t2, "a", false);
        assert!(core.eligible("a"), "a success clears the streak");
        core.handle_connect(t2, "a", false);
        assert_eq!(core.poll_timeout(), Some(t2 + Duration::from_secs(1)), "and the backoff");
    }

    #[test]
    fn one_failed_connect_ejects_and_only_a_check_brings_it_back() {
        let t0 = Instant::now();
        let mut core = HealthCore::new(spec(), Duration::from_secs(10));
        core.upsert(t0, &b("a"));
        run_checks(&mut core, t0, |_| true);
        assert!(core.eligible("a"));
        core.handle_connect(t0, "a", false);
        assert_eq!(core.state("a"), Some(HealthState::Ejected), "ejected at once");
        let t1 = t0 + Duration::from_secs(1);
        core.handle_timeout(t1);
        assert_eq!(
            core.state("a"),
            Some(HealthState::Unchecked),
            "the backoff alone is not enough"
        );
        assert_eq!(run_checks(&mut core, t1, |_| false), 1, "checked as soon as the backoff ends");
        assert!(!core.eligible("a"));
        // Having failed one, it needs `rise` passes in a row, like any down backend.
        let t2 = t1 + Duration::from_secs(2);
        run_checks(&mut core, t2, |_| true);
        assert!(!core.eligible("a"));
        run_checks(&mut core, t2 + Duration::from_secs(2), |_| true);
        assert!(core.eligible("a"), "passing checks of ours re-admit it");
    }

    #[test]
    fn a_returning_backend_waits_for_our_check() {
        let t0 = Instant::now();
        let mut core = HealthCore::new(spec(), Duration::from_secs(10));
        core.upsert(t0, &b("a"));
        run_checks(&mut core, t0, |_| true);
        assert!(core.eligible("a"));
        // Gone from the tables (its node cut off), then back before the drain ended.
        core.remove(t0, "a");
        let t1 = t0 + Duration::from_secs(3);
        core.upsert(t1, &b("a"));
        assert_eq!(
            core.state("a"),
            Some(HealthState::Unchecked),
            "not trusted on the tables' word"
        );
        assert_eq!(run_checks(&mut core, t1, |_| true), 1);
        assert!(core.eligible("a"));
        // A task that restarts in place: not ready, then healthy again.
        let mut s = b("a");
        s.state = TaskState::Starting;
        core.upsert(t1, &s);
        s.state = TaskState::Healthy;
        core.upsert(t1, &s);
        assert_eq!(core.state("a"), Some(HealthState::Unchecked));
        run_checks(&mut core, t1 + Duration::from_secs(2), |_| true);
        assert!(core.eligible("a"));
    }

    #[test]
    fn removal_drains_then_resets_and_forgets() {
        let t0 = Instant::now();
        let mut core =
            HealthCore::new(HealthSpec { check: None, ..spec() }, Duration::from_secs(5));
        core.upsert(t0, &b("a"));
        core.upsert(t0, &b("b"));
        drain(&mut core);
        core.remove(t0, "a");
        assert_eq!(core.state("a"), Some(HealthState::Draining));
        assert!(!core.eligible("a"), "no new connections at once");
        assert_eq!(drain(&mut core), vec![HealthEvent::Changed]);
        core.handle_timeout(t0 + Duration::from_secs(4));
        assert!(drain(&mut core).is_empty(), "open connections may finish within the grace");
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        core.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(
            drain(&mut core),
            vec![
                HealthEvent::Reset("a".into()),
                HealthEvent::Forget("a".into()),
                HealthEvent::Changed
            ]
        );
        assert_eq!(core.state("a"), None);
        assert!(core.eligible("b"));
    }
}
