//! Counters kept by the core, as plain numbers the agent exports (Prometheus or `/info`).

use std::time::Duration;

use crate::keyring::OpenError;
use crate::wire::WireError;

/// Why an incoming message (or an item inside one) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than a frame header and tag.
    Truncated,
    /// Wrong magic, version or kind byte.
    BadHeader,
    /// Sealed with a key not in the keyring.
    UnknownKey,
    /// The AEAD tag did not verify.
    AuthFailed,
    /// Larger than the configured limit.
    TooBig,
    /// Opened, but the content does not decode or breaks a limit.
    Malformed,
    /// A frame kind that does not belong on this transport.
    WrongKind,
    /// Older than what we hold (a replay or a late copy).
    Stale,
    /// A sealed frame opened before (see `replay`).
    Replayed,
    /// Refused by the SWIM layer (not addressed to us, from ourselves, ...).
    Rejected,
    /// A table write over an entry another live node owns (see `Core`'s `apply_entry`).
    NotOwner,
    /// A new entry of a member that owns `max_entries_per_owner` already.
    TooMany,
}

impl DropReason {
    /// Every reason, in a fixed order.
    pub const ALL: [DropReason; 12] = [
        DropReason::Truncated,
        DropReason::BadHeader,
        DropReason::UnknownKey,
        DropReason::AuthFailed,
        DropReason::TooBig,
        DropReason::Malformed,
        DropReason::WrongKind,
        DropReason::Stale,
        DropReason::Replayed,
        DropReason::Rejected,
        DropReason::NotOwner,
        DropReason::TooMany,
    ];

    /// A label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadHeader => "bad_header",
            DropReason::UnknownKey => "unknown_key",
            DropReason::AuthFailed => "auth_failed",
            DropReason::TooBig => "too_big",
            DropReason::Malformed => "malformed",
            DropReason::WrongKind => "wrong_kind",
            DropReason::Stale => "stale",
            DropReason::Replayed => "replayed",
            DropReason::Rejected => "rejected",
            DropReason::NotOwner => "not_owner",
            DropReason::TooMany => "too_many",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl From<OpenError> for DropReason {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Wire(WireError::Truncated) => DropReason::Truncated,
            OpenError::Wire(_) => DropReason::BadHeader,
            OpenError::UnknownKey(_) => DropReason::UnknownKey,
            OpenError::AuthFailed => DropReason::AuthFailed,
            OpenError::Replayed => DropReason::Replayed,
        }
    }
}

/// Message, byte, drop and probe counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// UDP datagrams received.
    pub udp_in: u64,
    /// UDP bytes received.
    pub udp_bytes_in: u64,
    /// UDP datagrams sent.
    pub udp_out: u64,
    /// UDP bytes sent.
    pub udp_bytes_out: u64,
    /// Sync frames received (requests and replies).
    pub sync_in: u64,
    /// Sync bytes received.
    pub sync_bytes_in: u64,
    /// Sync frames sent.
    pub sync_out: u64,
    /// Sync bytes sent.
    pub sync_bytes_out: u64,
    /// Drops by [`DropReason`] (index = position in [`DropReason::ALL`]).
    pub dropped: [u64; DropReason::ALL.len()],
    /// Broadcast items we already had (normal in epidemic dissemination).
    pub duplicates: u64,
    /// Probe round trips measured.
    pub probe_rtt_count: u64,
    /// Sum of probe round trips, microseconds.
    pub probe_rtt_sum_us: u64,
    /// Largest probe round trip, microseconds.
    pub probe_rtt_max_us: u64,
    /// Last probe round trip, microseconds.
    pub probe_rtt_last_us: u64,
    /// Accusations this node made (failed probes and failed suspicion checks).
    pub suspicions_raised: u64,
    /// Suspicion checks this node started (each up to three asks of the suspect).
    pub checks_sent: u64,
    /// Times this node refuted a suspicion of itself.
    pub refutations: u64,
}

impl Counters {
    /// Counts one drop.
    pub fn drop(&mut self, reason: DropReason) {
        self.dropped[reason.index()] += 1;
    }

    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    pub(crate) fn rtt(&mut self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.probe_rtt_count += 1;
        self.probe_rtt_sum_us = self.probe_rtt_sum_us.saturating_add(us);
        self.probe_rtt_max_us = self.probe_rtt_max_us.max(us);
        self.probe_rtt_last_us = us;
    }

    /// Mean probe round trip.
    pub fn probe_rtt_mean(&self) -> Option<Duration> {
        (self.probe_rtt_count > 0)
            .then(|| Duration::from_micros(self.probe_rtt_sum_us / self.probe_rtt_count))
    }
}

/// Members by SWIM state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberCounts {
    /// Alive (self included).
    pub alive: usize,
    /// Suspected.
    pub suspect: usize,
    /// Declared down, still remembered.
    pub down: usize,
}

/// A point-in-time copy of all metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Members by state.
    pub members: MemberCounts,
    /// Traffic and drop counters.
    pub counters: Counters,
    /// Visible table entries.
    pub entries: usize,
    /// Lifeguard's local health multiplier (1 healthy, up to `awareness_max`).
    pub health_multiplier: u32,
}
