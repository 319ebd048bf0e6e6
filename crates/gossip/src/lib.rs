//! shoal's gossip: SWIM membership with node metadata, and NetworkDB-like replicated tables,
//! over UDP and TCP sealed with AES-256-GCM.
//!
//! # Layers
//!
//! - [`wire`]: the sealed frame, a checked view over bytes; [`keyring`]: AES-256-GCM keys
//!   (one primary for sealing, all accepted, rotated at runtime); [`msg`]: the postcard
//!   messages inside frames.
//! - [`table`]: the last-writer-wins store, ordered by Lamport [`Version`]s, with tombstones.
//! - [`Core`]: the sans-I/O state machine. It wraps [foca](https://docs.rs/foca) (SWIM with
//!   suspicion, unmodified) and carries member records and table events as foca custom
//!   broadcasts (piggybacked on probes and gossip; this node's own entry changes also start a
//!   gossip round at once), plus a periodic full-state push-pull with a
//!   random peer over TCP (on join, on network join, every `sync_interval`). Entries of a node
//!   that is down are withdrawn from consumers and come back with it; a restarted node (larger
//!   generation) replaces its previous run's entries.
//!   Lifeguard's refinements are added around foca, not inside it: the core takes over foca's
//!   suspicion timer (delivering timers is the runtime's job) and gossips each accusation as a
//!   [`msg::Suspect`] item naming its accuser; a suspicion's timeout starts long
//!   ([`CoreConfig::suspicion_timeout`]) and shrinks logarithmically with each independent
//!   accuser ([`CoreConfig::suspicion_timeout_confirmed`]), after which the core declares the
//!   suspect down through `Foca::apply_many`. A few members verify each new suspicion at once
//!   with a sealed [`msg::Check`] datagram that also tells the suspect to refute, and a node
//!   whose accusations are refuted or that must refute suspicions of itself stretches its
//!   probe period and timeouts (local health), so a slow node stops accusing healthy ones.
//!   The core also ends a probe cycle early once its indirect probes are overdue (it delivers
//!   foca's next probe timer sooner and the one after later) and passes deaths on at once.
//! - [`sim`]: N cores on virtual time with per-link latency, loss, partitions, seeded.
//! - [`driver`]: the thin tokio driver, [`Gossip::start`], one UDP socket and one TCP listener.
//!
//! # Driving the core
//!
//! ```text
//! datagram  -> core.handle_udp(now, from, bytes)
//! tcp frame -> core.handle_sync(now, from, bytes) -> Option<reply to write back>
//! timer     -> core.handle_timeout(now)         (sleep until core.poll_timeout())
//! then drain core.poll_transmit() (Udp / Sync) and core.poll_event() (members, entries)
//! ```
//!
//! # Using the driver (what the agent does)
//!
//! Build a [`GossipConfig`] (node id, advertise address, keys, seeds, metadata, networks;
//! [`CoreConfig::lan`] figures, the default), call [`Gossip::start`], then:
//! [`Gossip::snapshot`] for members, entries and metrics without blocking the driver;
//! [`Gossip::subscribe`] for a stream of [`Event`]s; [`Gossip::write`] / [`Gossip::delete`]
//! for this node's entries; [`Gossip::join_network`] / [`Gossip::leave_network`];
//! [`Gossip::update_meta`]; [`Gossip::join`] for more seeds; [`Gossip::add_key`],
//! [`Gossip::make_primary`], [`Gossip::remove_key`] for rotation;
//! [`Gossip::register_metrics`] for Prometheus; [`Gossip::leave`] to exit gracefully
//! (dropping the handle stops the driver abruptly).
//!
//! # Wire and security
//!
//! Every UDP datagram and TCP frame is a [`wire::Frame`] sealed by the [`Keyring`]; anything
//! that does not open, does not decode, is too large, is sent on the wrong transport, or
//! carries state older than ours is dropped and counted by [`DropReason`].
#![forbid(unsafe_code)]

pub mod config;
mod core;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod generation;
pub mod keyring;
pub mod metrics;
pub mod msg;
mod prom;
pub mod replay;
pub mod sim;
mod snapshot;
pub mod table;
mod types;
pub mod wire;

pub use crate::config::{ConfigError, CoreConfig, DEFAULT_PORT, GossipConfig};
pub use crate::core::{
    Core, CoreError, CoreOptions, EntryChange, Event, MemberState, MemberView, TableError, Transmit,
};
pub use crate::driver::{Gossip, GossipError};
pub use crate::keyring::{Keyring, KeyringError, key_id};
pub use crate::metrics::{Counters, DropReason, MemberCounts, Metrics};
pub use crate::snapshot::Snapshot;
pub use crate::types::{Availability, EntryKey, Identity, NodeId, NodeMeta, Role, Version};
