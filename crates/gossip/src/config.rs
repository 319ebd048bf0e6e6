//! Typed, validated configuration of the gossip core and driver.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use crate::wire::OVERHEAD;

/// Default gossip port (UDP for SWIM, TCP for full-state sync), as Swarm's memberlist.
pub const DEFAULT_PORT: u16 = 7946;

/// Everything the core needs. The default ([`GossipConfig::new`], `Default`) is
/// [`CoreConfig::lan`], memberlist's LAN profile; [`CoreConfig::fast_detect`] detects failures
/// in about half the time at less bandwidth than serf, at the price of many more false deaths
/// under heavy loss.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Time between two probes of a random member (memberlist `ProbeInterval`).
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others (memberlist `ProbeTimeout`).
    pub probe_timeout: Duration,
    /// Members asked to probe indirectly (memberlist `IndirectChecks`); also the gossip fanout
    /// of on-demand gossip.
    pub indirect_probes: usize,
    /// Time between two gossip rounds (memberlist `GossipInterval`).
    pub gossip_interval: Duration,
    /// Members gossiped to per round (memberlist `GossipNodes`).
    pub gossip_fanout: usize,
    /// Suspicion timeout = `suspicion_mult` × max(1, log10 N) × probe period (memberlist
    /// `SuspicionMult`); 0 turns suspicion off (plain SWIM: a failed probe cycle is death).
    pub suspicion_mult: u32,
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
}

impl CoreConfig {
    /// A faster-detecting profile: memberlist's LAN figures ([`CoreConfig::lan`]) with a suspicion
    /// timeout of one probe period per log10 N (`suspicion_mult` 1 instead of 4), and the
    /// periodic full-state sync and self-announce every 60 s instead of 30 s.
    ///
    /// Why: a crash is seen by everyone after about (1.58 + `suspicion_mult` · max(1, log10 N))
    /// probe periods plus a few gossip rounds, while the traffic at rest is mostly probes, so
    /// it scales with 1 / `probe_period`. Keeping memberlist's 1 s probe keeps that traffic
    /// and shortening the suspicion cuts the detection time (simulation, 8 nodes: 2.25 s
    /// against 5.25 s for LAN; in the lab against serf 0.8 `-profile lan`, 8 nodes: about
    /// 0.6x serf's time, short of issue 3's 0.5x). The sync and announce traffic grows with
    /// the cluster (full state, member feeds): at 16 nodes it brought the LAN profile to
    /// 414 B/s sent per node against serf's 400-469, so they run half as often; lost
    /// broadcasts are still repaired by the next sync (and on join).
    /// Figures: `cargo bench -p shoal --bench gossip`.
    ///
    /// The price: a member that answers nothing for longer than the suspicion timeout (1 s up
    /// to 10 members, 2 s at 100, 3 s at 1,000) is declared down, and its entries are
    /// withdrawn until it refutes. In the simulation (100 nodes, 60 s) that is 0 false deaths
    /// at 3 % loss (as LAN), and under 10 % loss with a node 2 s slow 1,248 false
    /// deaths (891 of them about the slow node) against 1 for LAN and 3,356 for plain SWIM.
    /// Clusters on lossy or overloaded links should use [`CoreConfig::lan`].
    pub fn fast_detect() -> Self {
        Self {
            suspicion_mult: 1,
            sync_interval: Duration::from_secs(60),
            announce_interval: Duration::from_secs(60),
            ..Self::lan()
        }
    }

    /// memberlist's `DefaultLANConfig` figures and NetworkDB's timers.
    pub fn lan() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            indirect_probes: 3,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            suspicion_mult: 4,
            retransmit_mult: 4,
            max_datagram: 1400,
            sync_interval: Duration::from_secs(30),
            tombstone_reap: Duration::from_secs(30 * 60),
            reap_interval: Duration::from_secs(5),
            announce_to_down_interval: Duration::from_secs(10),
            announce_interval: Duration::from_secs(30),
            remove_down_after: Duration::from_secs(24 * 3600),
            max_value_len: 900,
            max_name_len: 64,
            max_sync_frame: 32 << 20,
        }
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
        if self.max_sync_frame < 64 << 10 {
            return Err(ConfigError::new("max_sync_frame", "must be at least 64 KiB"));
        }
        Ok(())
    }

    /// Suspicion timeout for a cluster of `n` members (memberlist `suspicionTimeout`).
    pub fn suspicion_timeout(&self, n: usize) -> Duration {
        if self.suspicion_mult == 0 {
            // foca needs a non-zero timer; one millisecond is "at once" next to any RTT.
            return Duration::from_millis(1);
        }
        let scale = (n.max(1) as f64).log10().max(1.0);
        self.probe_period.mul_f64(f64::from(self.suspicion_mult) * scale)
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
    fn fast_detect_is_lan_with_short_suspicion() {
        let c = CoreConfig::fast_detect();
        c.validate().expect("defaults are valid");
        let lan = CoreConfig::lan();
        assert_eq!((c.probe_period, c.probe_timeout), (lan.probe_period, lan.probe_timeout));
        assert_eq!((c.gossip_interval, c.gossip_fanout), (lan.gossip_interval, lan.gossip_fanout));
        assert_eq!(c.suspicion_timeout(8), Duration::from_secs(1));
        assert_eq!(c.suspicion_timeout(100), Duration::from_secs(2));
        assert_eq!(c.suspicion_timeout(1000), Duration::from_secs(3));
        assert_eq!(c.retransmits(10), lan.retransmits(10));
        assert_eq!(
            (c.sync_interval, c.announce_interval),
            (Duration::from_secs(60), Duration::from_secs(60))
        );
        let g =
            GossipConfig::new(crate::NodeId(1), "198.18.0.1:7946".parse().expect("addr"), [7; 32]);
        assert_eq!(
            g.core.suspicion_mult,
            CoreConfig::lan().suspicion_mult,
            "the agent gets the LAN profile"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = CoreConfig::lan();
        c.probe_timeout = Duration::from_secs(2);
        assert_eq!(c.validate().unwrap_err().field, "probe_timeout");
        let mut c = CoreConfig::lan();
        c.max_value_len = 5000;
        assert_eq!(c.validate().unwrap_err().field, "max_value_len");
    }
}
