//! The sans-I/O health state machine, with Docker's semantics (`daemon/health.go`):
//!
//! - the status starts as [`Health::Starting`];
//! - a passing probe makes it [`Health::Healthy`] and resets the failing streak;
//! - a failing (or timed-out) probe while still `Starting` inside the start period is ignored;
//!   otherwise it extends the streak, and `retries` failures in a row make it
//!   [`Health::Unhealthy`] (a later pass makes it healthy again);
//! - probes run every `start_interval` while in the start period and still starting, every
//!   `interval` after that; the first one is one such period after start.
//!
//! The driver asks [`HealthMonitor::poll_probe`] whether to start a probe, runs it with the
//! returned timeout, and hands the result to [`HealthMonitor::handle_result`].

use std::time::{Duration, Instant};

use crate::spec::HealthCheck;
use crate::state::Health;

/// How one probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Exit code 0.
    Passed,
    /// Non-zero exit, or the probe could not run.
    Failed,
    /// Killed after the timeout; counts as a failure.
    TimedOut,
}

/// Health state of one task; time is passed in, nothing here sleeps or spawns.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    interval: Duration,
    start_interval: Duration,
    timeout: Duration,
    retries: u32,
    start_period_end: Instant,
    status: Health,
    failing_streak: u32,
    next_probe: Option<Instant>,
}

impl HealthMonitor {
    /// A monitor for a task whose process started at `started`.
    pub fn new(check: &HealthCheck, started: Instant) -> HealthMonitor {
        let mut m = HealthMonitor {
            interval: check.interval,
            start_interval: check.start_interval.min(check.interval),
            timeout: check.timeout,
            retries: check.retries.max(1),
            start_period_end: started + check.start_period,
            status: Health::Starting,
            failing_streak: 0,
            next_probe: None,
        };
        m.next_probe = Some(started + m.period(started));
        m
    }

    fn in_start_period(&self, now: Instant) -> bool {
        self.status == Health::Starting && now < self.start_period_end
    }

    fn period(&self, now: Instant) -> Duration {
        if self.in_start_period(now) { self.start_interval } else { self.interval }
    }

    /// Current status.
    pub fn status(&self) -> Health {
        self.status
    }

    /// Failed probes in a row.
    pub fn failing_streak(&self) -> u32 {
        self.failing_streak
    }

    /// When the next probe is due; `None` while one is running.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_probe
    }

    /// If a probe is due at `now`, marks it running and returns its timeout.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Duration> {
        match self.next_probe {
            Some(t) if t <= now => {
                self.next_probe = None;
                Some(self.timeout)
            }
            _ => None,
        }
    }

    /// Feeds the result of the running probe; returns the new status if it changed.
    pub fn handle_result(&mut self, now: Instant, outcome: ProbeOutcome) -> Option<Health> {
        let before = self.status;
        if outcome == ProbeOutcome::Passed {
            self.failing_streak = 0;
            self.status = Health::Healthy;
        } else if !self.in_start_period(now) {
            self.failing_streak = self.failing_streak.saturating_add(1);
            if self.failing_streak >= self.retries {
                self.status = Health::Unhealthy;
            }
        }
        self.next_probe = Some(now + self.period(now));
        (self.status != before).then_some(self.status)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(retries: u32, start_period: u64) -> HealthCheck {
        let mut c = HealthCheck::shell("true");
        c.interval = Duration::from_secs(10);
        c.start_interval = Duration::from_secs(2);
        c.timeout = Duration::from_secs(3);
        c.retries = retries;
        c.start_period = Duration::from_secs(start_period);
        c
    }

    /// Runs one probe at `at` (which must be due) with `outcome`.
    fn probe(m: &mut HealthMonitor, at: Instant, outcome: ProbeOutcome) -> Option<Health> {
        assert_eq!(m.poll_probe(at), Some(Duration::from_secs(3)));
        assert_eq!(m.poll_timeout(), None, "no second probe while one runs");
        m.handle_result(at, outcome)
    }

    #[test]
    fn starting_then_healthy_then_unhealthy_after_retries() {
        let t0 = Instant::now();
        let mut m = HealthMonitor::new(&check(3, 0), t0);
        assert_eq!(m.status(), Health::Starting);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(m.poll_probe(t0 + Duration::from_secs(9)), None);
        let mut t = t0 + Duration::from_secs(10);
        assert_eq!(probe(&mut m, t, ProbeOutcome::Passed), Some(Health::Healthy));
        for i in 1..=3 {
            t += Duration::from_secs(10);
            let change = probe(&mut m, t, ProbeOutcome::Failed);
            assert_eq!(m.failing_streak(), i);
            assert_eq!(change, (i == 3).then_some(Health::Unhealthy), "failure {i}");
        }
        t += Duration::from_secs(10);
        assert_eq!(probe(&mut m, t, ProbeOutcome::Passed), Some(Health::Healthy));
        assert_eq!(m.failing_streak(), 0);
    }

    #[test]
    fn start_period_ignores_failures_until_first_pass() {
        let t0 = Instant::now();
        let mut m = HealthMonitor::new(&check(1, 20), t0);
        // During the start period probes come every start_interval and failures are ignored.
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        let mut t = t0;
        for _ in 0..5 {
            t += Duration::from_secs(2);
            assert_eq!(probe(&mut m, t, ProbeOutcome::TimedOut), None);
            assert_eq!((m.status(), m.failing_streak()), (Health::Starting, 0));
        }
        // One pass inside the start period: started; the next failure counts at once.
        t += Duration::from_secs(2);
        assert_eq!(probe(&mut m, t, ProbeOutcome::Passed), Some(Health::Healthy));
        assert_eq!(m.poll_timeout(), Some(t + Duration::from_secs(10)), "interval after start");
        t += Duration::from_secs(10);
        assert_eq!(probe(&mut m, t, ProbeOutcome::Failed), Some(Health::Unhealthy));
    }

    #[test]
    fn failures_after_start_period_count() {
        let t0 = Instant::now();
        let mut m = HealthMonitor::new(&check(2, 5), t0);
        let t = t0 + Duration::from_secs(6);
        assert!(m.poll_probe(t).is_some());
        assert_eq!(m.handle_result(t, ProbeOutcome::Failed), None);
        assert_eq!(m.failing_streak(), 1);
        let t = t + Duration::from_secs(10);
        assert!(m.poll_probe(t).is_some());
        assert_eq!(m.handle_result(t, ProbeOutcome::Failed), Some(Health::Unhealthy));
    }

    #[test]
    fn zero_retries_means_one() {
        let t0 = Instant::now();
        let mut m = HealthMonitor::new(&check(0, 0), t0);
        let t = t0 + Duration::from_secs(10);
        assert_eq!(probe(&mut m, t, ProbeOutcome::Failed), Some(Health::Unhealthy));
    }
}
