//! Typed, validated configuration of the gossip core and driver.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use crate::wire::OVERHEAD;

/// Default gossip port (UDP for SWIM, TCP for full-state sync), as Swarm's memberlist.
pub const DEFAULT_PORT: u16 = 7946;

/// Everything the core needs. The default ([`GossipConfig::new`], `Default`) is
/// [`CoreConfig::lan`]: memberlist's LAN figures with Lifeguard's suspicion and local health.
/// [`CoreConfig::lan_fixed_suspicion`] and [`CoreConfig::plain_swim`] are the references it
/// is measured against.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Time between two probes of a random member (memberlist `ProbeInterval`).
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others (memberlist `ProbeTimeout`);
    /// also how long a suspicion check waits for the suspect's answer.
    pub probe_timeout: Duration,
    /// Members asked to probe indirectly (memberlist `IndirectChecks`); also the gossip fanout
    /// of on-demand gossip.
    pub indirect_probes: usize,
    /// Time between two gossip rounds (memberlist `GossipInterval`).
    pub gossip_interval: Duration,
    /// Members gossiped to per round (memberlist `GossipNodes`).
    pub gossip_fanout: usize,
    /// Timeout of a suspicion nobody confirms = `suspicion_mult` × max(1, log10 N) × probe
    /// period (memberlist `SuspicionMult`); 0 turns suspicion off (plain SWIM: a failed probe
    /// cycle is death).
    pub suspicion_mult: u32,
    /// Lifeguard: independent suspicions of the same member (beyond the first) after which its
    /// suspicion timeout has shrunk to [`Self::suspicion_min`] (memberlist's `k`); 0 keeps the
    /// timeout fixed (foca's own suspicion).
    pub suspicion_confirmations: u32,
    /// Lifeguard: the suspicion timeout once fully confirmed, per max(1, log10 N).
    pub suspicion_min: Duration,
    /// How many members (in expectation) verify a new suspicion themselves at once, by asking
    /// the suspect directly, instead of waiting for their next regular probe of it. The ask
    /// also tells the suspect it is suspected, so a live one refutes at once (Lifeguard's
    /// buddy system). 0: only regular probes confirm.
    pub suspicion_checkers: usize,
    /// Lifeguard's local health: the most a node's probe period and timeouts stretch when it
    /// sees signs that it, not its peers, is slow (memberlist `AwarenessMaxMultiplier`); 1 is off.
    pub awareness_max: u32,
    /// Retransmissions per update = `retransmit_mult` × ceil(log10(N + 1)) (memberlist
    /// `RetransmitMult`).
    pub retransmit_mult: u32,
    /// Largest UDP payload sent, including the sealing overhead (memberlist `UDPBufferSize`).
    pub max_datagram: usize,
    /// Period of the full-state anti-entropy exchange with one random peer over TCP.
    pub sync_interval: Duration,
    /// How long a deleted entry's tombstone lives before it is reaped.
    pub tombstone_reap: Duration,
    /// How often tombstones and relay state are reaped.
    pub reap_interval: Duration,
    /// Period of announcing ourselves to one random down member (heals partitions).
    pub announce_to_down_interval: Duration,
    /// Period of announcing ourselves to one random live member.
    pub announce_interval: Duration,
    /// How long a down member is remembered before it is forgotten.
    pub remove_down_after: Duration,
    /// Largest table value accepted (it must fit one datagram with its key).
    pub max_value_len: usize,
    /// Largest table, network or key name accepted.
    pub max_name_len: usize,
    /// Largest full-state sync frame accepted over TCP.
    pub max_sync_frame: usize,
    /// Most live table entries one member may own; more are refused (a member's own writes
    /// with an error, others' dropped and counted).
    pub max_entries_per_owner: usize,
}

impl CoreConfig {
    /// The default: memberlist's `DefaultLANConfig` figures (probe 1 s / 500 ms, 3 indirect
    /// probes, gossip 200 ms to 3, retransmit ×4) and NetworkDB's timers, with Lifeguard's
    /// refinements on top of foca's SWIM:
    ///
    /// - suspicion that shrinks with independent confirmations: a lone suspicion waits
    ///   4 × max(1, log10 N) probe periods (4 s up to 10 members) for the suspect to refute;
    ///   each member that independently finds it unresponsive shortens that, logarithmically,
    ///   down to 0.5 s × max(1, log10 N) after 3 confirmations (memberlist `suspicion.go`);
    /// - up to 8 members verify a new suspicion at once (3 asks within the probe timeout)
    ///   rather than at their next regular probe, and their ask tells the suspect so that a
    ///   live one refutes within a round trip;
    /// - local health: a node whose accusations are refuted, or that must refute suspicions
    ///   of itself, stretches its probe period and timeouts up to 8× and decays back with each
    ///   successful probe, so a slow node stops accusing healthy ones;
    /// - a probe whose indirect probes go unanswered for a few round trips fails then, not at
    ///   the end of the probe period (the next period is longer by as much, so the probe rate
    ///   is unchanged), and a death is passed on at once rather than at the next gossip round.
    ///
    /// A crash is then seen by everyone about one probe period (the first probe of it, on
    /// average) plus one probe timeout (the probe's) plus one probe timeout (the checks) after
    /// it happens: about a third of memberlist's and serf's time at 8 and 16 members, while a
    /// false suspicion (loss, a pause) is refuted long before its 4 s. Nothing is added at
    /// rest: checks run only while someone is suspected. The periodic announce runs every
    /// 60 s: the 30 s full-state sync already exchanges the membership.
    /// Figures: `tests/sim_scale.rs` and `cargo bench -p shoal --bench gossip`.
    pub fn lan() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            indirect_probes: 3,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            suspicion_mult: 4,
            suspicion_confirmations: 3,
            suspicion_min: Duration::from_millis(500),
            suspicion_checkers: 8,
            awareness_max: 8,
            retransmit_mult: 4,
            max_datagram: 1400,
            sync_interval: Duration::from_secs(30),
            tombstone_reap: Duration::from_secs(30 * 60),
            reap_interval: Duration::from_secs(5),
            announce_to_down_interval: Duration::from_secs(10),
            announce_interval: Duration::from_secs(60),
            remove_down_after: Duration::from_secs(24 * 3600),
            max_value_len: 900,
            max_name_len: 64,
            max_sync_frame: 32 << 20,
            max_entries_per_owner: 10_000,
        }
    }

    /// The previous default, for comparison: [`CoreConfig::lan`] without Lifeguard (foca's
    /// fixed suspicion timeout of 4 × max(1, log10 N) probe periods, no checks, no local
    /// health) and the periodic announce every 30 s. It detects a crash in about serf's time.
    pub fn lan_fixed_suspicion() -> Self {
        Self {
            suspicion_confirmations: 0,
            suspicion_checkers: 0,
            awareness_max: 1,
            announce_interval: Duration::from_secs(30),
            ..Self::lan()
        }
    }

    /// Plain SWIM, the reference for false positives: no suspicion (a member that fails one
    /// probe cycle is declared down at once), no Lifeguard; the rest as [`CoreConfig::lan`].
    pub fn plain_swim() -> Self {
        Self { suspicion_mult: 0, ..Self::lan_fixed_suspicion() }
    }

    /// Whether suspicion timeouts follow Lifeguard (shrink with confirmations) rather than
    /// foca's fixed timer.
    pub fn lifeguard(&self) -> bool {
        self.suspicion_mult > 0 && self.suspicion_confirmations > 0
    }

    /// Checks the figures; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("probe_period", self.probe_period),
            ("probe_timeout", self.probe_timeout),
            ("gossip_interval", self.gossip_interval),
            ("sync_interval", self.sync_interval),
            ("reap_interval", self.reap_interval),
            ("announce_to_down_interval", self.announce_to_down_interval),
            ("announce_interval", self.announce_interval),
            ("remove_down_after", self.remove_down_after),
        ];
        for (field, d) in nonzero {
            if d.is_zero() {
                return Err(ConfigError::new(field, "must be greater than zero"));
            }
        }
        if self.probe_timeout >= self.probe_period {
            return Err(ConfigError::new("probe_timeout", "must be shorter than probe_period"));
        }
        if self.indirect_probes == 0 {
            return Err(ConfigError::new("indirect_probes", "must be at least 1"));
        }
        if self.gossip_fanout == 0 {
            return Err(ConfigError::new("gossip_fanout", "must be at least 1"));
        }
        if self.lifeguard()
            && (self.suspicion_min.is_zero()
                || self.suspicion_min > self.probe_period * self.suspicion_mult)
        {
            return Err(ConfigError::new(
                "suspicion_min",
                "must be greater than zero and at most suspicion_mult probe periods",
            ));
        }
        if self.suspicion_confirmations > 64 {
            return Err(ConfigError::new("suspicion_confirmations", "must be at most 64"));
        }
        if self.suspicion_checkers > 64 {
            return Err(ConfigError::new("suspicion_checkers", "must be at most 64"));
        }
        if self.awareness_max == 0 || self.awareness_max > 64 {
            return Err(ConfigError::new("awareness_max", "must be within 1..=64"));
        }
        if self.retransmit_mult == 0 {
            return Err(ConfigError::new("retransmit_mult", "must be at least 1"));
        }
        if self.max_datagram < 512 || self.max_datagram > 65_000 {
            return Err(ConfigError::new("max_datagram", "must be within 512..=65000"));
        }
        if self.max_value_len + 3 * self.max_name_len + 64 > self.max_datagram - OVERHEAD - 128 {
            return Err(ConfigError::new(
                "max_value_len",
                "a value with its names must fit one datagram",
            ));
        }
        if self.max_name_len == 0 || self.max_name_len > 255 {
            return Err(ConfigError::new("max_name_len", "must be within 1..=255"));
        }
        if self.max_entries_per_owner == 0 {
            return Err(ConfigError::new("max_entries_per_owner", "must be at least 1"));
        }
        if self.max_sync_frame < 64 << 10 {
            return Err(ConfigError::new("max_sync_frame", "must be at least 64 KiB"));
        }
        Ok(())
    }

    /// Timeout of an unconfirmed suspicion in a cluster of `n` members (memberlist
    /// `suspicionTimeout`; with Lifeguard, the longest a suspicion waits).
    pub fn suspicion_timeout(&self, n: usize) -> Duration {
        if self.suspicion_mult == 0 {
            // foca needs a non-zero timer; one millisecond is "at once" next to any RTT.
            return Duration::from_millis(1);
        }
        self.probe_period.mul_f64(f64::from(self.suspicion_mult) * log_scale(n))
    }

    /// Lifeguard: the shortest suspicion timeout in a cluster of `n` members, reached with
    /// [`Self::suspicion_confirmations`] confirmations.
    pub fn suspicion_min_timeout(&self, n: usize) -> Duration {
        if !self.lifeguard() {
            return self.suspicion_timeout(n);
        }
        self.suspicion_min.mul_f64(log_scale(n)).min(self.suspicion_timeout(n))
    }

    /// Confirmations that bring a suspicion down to its shortest timeout in a cluster of `n`:
    /// [`Self::suspicion_confirmations`], but no more than the `n - 2` members that can
    /// confirm (neither the suspect nor the first accuser); 0 when nobody can.
    pub fn expected_confirmations(&self, n: usize) -> u32 {
        let others = u32::try_from(n.saturating_sub(2)).unwrap_or(u32::MAX);
        self.suspicion_confirmations.min(others)
    }

    /// Lifeguard's suspicion timeout (memberlist `suspicion.go`) after `confirmations`
    /// independent confirmations in a cluster of `n`: max − (max − min) · log(C + 1) / log(K + 1),
    /// never below min. Without Lifeguard, or when nobody can confirm, the fixed timeout.
    pub fn suspicion_timeout_confirmed(&self, n: usize, confirmations: u32) -> Duration {
        let max = self.suspicion_timeout(n);
        let k = self.expected_confirmations(n);
        if !self.lifeguard() || k == 0 {
            return max;
        }
        let min = self.suspicion_min_timeout(n);
        let c = confirmations.min(k);
        let frac = f64::from(c + 1).ln() / f64::from(k + 1).ln();
        let span = max.saturating_sub(min);
        max.saturating_sub(span.mul_f64(frac)).max(min)
    }

    /// Probability that a member verifies a new suspicion itself, with `candidates` members
    /// able to (neither the suspect nor ourselves).
    pub(crate) fn check_probability(&self, candidates: usize) -> f64 {
        if !self.lifeguard() || self.suspicion_checkers == 0 || candidates == 0 {
            return 0.0;
        }
        (self.suspicion_checkers as f64 / candidates as f64).min(1.0)
    }

    /// Retransmissions of each update for a cluster of `n` members (memberlist `retransmitLimit`).
    pub fn retransmits(&self, n: usize) -> u8 {
        let scale = ((n as f64) + 1.0).log10().ceil().max(1.0);
        let tx = f64::from(self.retransmit_mult) * scale;
        tx.clamp(1.0, 255.0) as u8
    }

    /// The foca configuration for a cluster of `n` members.
    pub(crate) fn foca(&self, n: usize) -> foca::Config {
        let mut c = foca::Config::simple();
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_timeout;
        c.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes).unwrap_or(NonZeroUsize::MIN);
        c.max_transmissions = NonZeroU8::new(self.retransmits(n)).unwrap_or(NonZeroU8::MIN);
        c.suspect_to_down_after = self.suspicion_timeout(n);
        c.remove_down_after = Some(self.remove_down_after);
        c.max_packet_size =
            NonZeroUsize::new(self.max_datagram - OVERHEAD).unwrap_or(NonZeroUsize::MIN);
        c.notify_down_members = true;
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_interval,
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.announce_to_down_interval,
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_interval,
            num_members: NonZeroUsize::new(self.gossip_fanout).unwrap_or(NonZeroUsize::MIN),
        });
        c
    }
}

/// max(1, log10 n): how memberlist scales timeouts with the cluster.
fn log_scale(n: usize) -> f64 {
    (n.max(1) as f64).log10().max(1.0)
}

impl Default for CoreConfig {
    /// [`CoreConfig::lan`].
    fn default() -> Self {
        Self::lan()
    }
}

/// Configuration of the tokio driver: where to listen, who we are, whom to join.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// Address for the UDP socket and the TCP listener (default `0.0.0.0:7946`).
    pub bind: SocketAddr,
    /// Address the others reach us at; a concrete IP. Port 0 means the port `bind` got
    /// (tests binding port 0).
    pub advertise: SocketAddr,
    /// This node's stable gossip id (derive it from the node's cluster id).
    pub node: crate::NodeId,
    /// Metadata announced with our membership.
    pub meta: crate::NodeMeta,
    /// Seeds to join at start (may be empty: the first node of a cluster).
    pub seeds: Vec<SocketAddr>,
    /// Cluster keys: the first is the primary (sending) key; all are accepted.
    pub keys: Vec<[u8; 32]>,
    /// Networks joined at start.
    pub networks: Vec<String>,
    /// Protocol figures.
    pub core: CoreConfig,
    /// Where this node keeps its last process generation (see `generation`); `None` only for
    /// tests and simulations, which then count within the process.
    pub generation_file: Option<std::path::PathBuf>,
}

impl GossipConfig {
    /// A config with the LAN profile ([`CoreConfig::lan`]) for `node` advertised
    /// at `advertise` with one key.
    pub fn new(node: crate::NodeId, advertise: SocketAddr, key: [u8; 32]) -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), advertise.port()),
            advertise,
            node,
            meta: crate::NodeMeta::default(),
            seeds: Vec::new(),
            keys: vec![key],
            networks: Vec::new(),
            core: CoreConfig::lan(),
            generation_file: None,
        }
    }

    /// Checks the figures; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.core.validate()?;
        if self.advertise.ip().is_unspecified() {
            return Err(ConfigError::new("advertise", "must be a concrete address"));
        }
        if self.advertise.port() == 0 && self.bind.port() != 0 {
            return Err(ConfigError::new(
                "advertise",
                "port 0 (\"the bound port\") needs bind port 0 too",
            ));
        }
        if self.keys.is_empty() {
            return Err(ConfigError::new("keys", "at least one key is needed"));
        }
        Ok(())
    }
}

/// A configuration field that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid gossip config `{field}`: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ConfigError {
    fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_defaults_match_memberlist() {
        let c = CoreConfig::lan();
        c.validate().expect("defaults are valid");
        assert_eq!(c.probe_period, Duration::from_secs(1));
        assert_eq!(c.probe_timeout, Duration::from_millis(500));
        assert_eq!(c.indirect_probes, 3);
        assert_eq!((c.gossip_interval, c.gossip_fanout), (Duration::from_millis(200), 3));
        assert_eq!(c.suspicion_timeout(10), Duration::from_secs(4));
        assert_eq!(c.suspicion_timeout(1000), Duration::from_secs(12));
        assert_eq!(c.retransmits(10), 8);
        assert_eq!(c.retransmits(1000), 16);
        assert_eq!(c.tombstone_reap, Duration::from_secs(1800));
    }

    #[test]
    fn lifeguard_suspicion_shrinks_logarithmically_with_confirmations() {
        let c = CoreConfig::lan();
        assert!(c.lifeguard());
        let ms = |d: Duration| d.as_millis();
        // 8 members: 4 s alone, 0.5 s with 3 confirmations, in between on memberlist's curve.
        assert_eq!(ms(c.suspicion_timeout_confirmed(8, 0)), 4000);
        assert_eq!(ms(c.suspicion_timeout_confirmed(8, 1)), 4000 - 3500 / 2);
        assert_eq!(ms(c.suspicion_timeout_confirmed(8, 2)), 1226);
        assert_eq!(ms(c.suspicion_timeout_confirmed(8, 3)), 500);
        assert_eq!(ms(c.suspicion_timeout_confirmed(8, 30)), 500);
        // Scaled by log10 N like memberlist: 100 members wait 8 s alone, 1 s confirmed.
        assert_eq!(ms(c.suspicion_timeout_confirmed(100, 0)), 8000);
        assert_eq!(ms(c.suspicion_timeout_confirmed(100, 3)), 1000);
        // Too few members to confirm: the fixed timeout, never the short one.
        assert_eq!(c.expected_confirmations(2), 0);
        assert_eq!(ms(c.suspicion_timeout_confirmed(2, 5)), 4000);
        assert_eq!(c.expected_confirmations(4), 2);
        assert_eq!(ms(c.suspicion_timeout_confirmed(4, 2)), 500);
        // Without Lifeguard the timeout ignores confirmations.
        let f = CoreConfig::lan_fixed_suspicion();
        assert!(!f.lifeguard());
        assert_eq!(ms(f.suspicion_timeout_confirmed(8, 3)), 4000);
        assert!(!CoreConfig::plain_swim().lifeguard());
        assert_eq!(CoreConfig::plain_swim().suspicion_timeout(8), Duration::from_millis(1));
    }

    #[test]
    fn checkers_are_a_bounded_expected_number() {
        let c = CoreConfig::lan();
        assert_eq!(c.check_probability(6), 1.0);
        assert!((c.check_probability(98) - 8.0 / 98.0).abs() < 1e-12);
        assert_eq!(c.check_probability(0), 0.0);
        assert_eq!(CoreConfig::lan_fixed_suspicion().check_probability(6), 0.0);
    }

    #[test]
    fn the_agent_gets_the_lifeguard_profile() {
        let g =
            GossipConfig::new(crate::NodeId(1), "198.18.0.1:7946".parse().expect("addr"), [7; 32]);
        assert!(g.core.lifeguard());
        assert_eq!(g.core.suspicion_confirmations, 3);
        assert_eq!(g.core.awareness_max, 8);
        for c in [CoreConfig::lan_fixed_suspicion(), CoreConfig::plain_swim()] {
            c.validate().expect("reference profiles are valid");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = CoreConfig::lan();
        c.probe_timeout = Duration::from_secs(2);
        assert_eq!(c.validate().unwrap_err().field, "probe_timeout");
        let mut c = CoreConfig::lan();
        c.max_value_len = 5000;
        assert_eq!(c.validate().unwrap_err().field, "max_value_len");
        let mut c = CoreConfig::lan();
        c.suspicion_min = Duration::from_secs(5);
        assert_eq!(c.validate().unwrap_err().field, "suspicion_min");
        let mut c = CoreConfig::lan();
        c.awareness_max = 0;
        assert_eq!(c.validate().unwrap_err().field, "awareness_max");
    }
}
