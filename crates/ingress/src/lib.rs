//! The routing mesh: every node answers on every published port and forwards each connection
//! (TCP) or flow (UDP) to a healthy task on any node.
//!
//! Layers, bottom up:
//! - **Vocabulary** ([`spec`]): services, published ports, backends, policies — plain data.
//! - **Sans-I/O cores**: [`balancer`] picks a backend from an immutable [`BackendSet`]
//!   (power of two choices on least connections, round robin, or [`maglev`] source affinity)
//!   with a seeded RNG passed in; [`health`] is the per-service health state machine
//!   (task state, active checks with rise/fall, passive ejection with backoff, draining).
//!   [`proxy_protocol`] is the PROXY v1/v2 wire format as a checked view with parse/emit.
//! - **I/O**: [`forward`] moves TCP bytes with splice(2) through pooled, sized pipes (or a
//!   copy for small exchanges), with half-close, idle timeout and RST on reset; [`upstream`]
//!   makes upstream sockets inside the ingress sandbox namespace; `udp` runs per-flow UDP
//!   sessions with recvmmsg/sendmmsg (the `shoal-udp` crate). With the `sockmap` feature,
//!   `sockmap` is an experimental TCP forwarder that leaves the bytes to a BPF sk_skb
//!   redirect (`ForwardMode::Sockmap`; measured beside splice by `benches/mesh.rs`).
//! - **Driver** ([`Mesh`]): listeners per published port, one control task per service that
//!   owns its health core, runs checks and swaps snapshots (arc-swap) that the data path reads
//!   without locks; [`metrics`] per service and backend.
//!
//! Driving it (the agent): create one [`Mesh`] per node inside the tokio runtime with
//! [`MeshConfig`] (`ingress_ns`: the node's ingress sandbox), then call
//! [`Mesh::set_service`] with the full backend set whenever a service or its tasks change
//! (idempotent; missing backends drain), [`Mesh::remove_service`] when it goes, and export
//! [`Mesh::render_prometheus`] on `/metrics`. The mesh spawns its tasks on the runtime that
//! was current at [`Mesh::new`]; a dedicated current-thread runtime on its own thread is what
//! `benches/mesh.rs` measures (BENCH.md). To use several cores, run one current-thread
//! runtime per core, each with its own [`Mesh`] built with [`MeshConfig::reuse_port`] and the
//! same services: the kernel spreads new TCP connections over the listeners (SO_REUSEPORT);
//! metrics are then per mesh (add them up).

#![warn(missing_docs)]

pub mod balancer;
mod control;
mod error;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod maglev;
mod mesh;
pub mod metrics;
pub mod proxy_protocol;
mod service;
#[cfg(feature = "sockmap")]
pub mod sockmap;
pub mod spec;
mod tcp;
mod udp;
pub mod upstream;

pub use balancer::{Backend, BackendSet, BackendStats};
pub use error::Error;
pub use forward::ForwardMode;
pub use health::{HealthCore, HealthEvent, HealthState};
pub use mesh::{ListenerInfo, ListenerKind, Mesh, MeshConfig};
pub use metrics::{BackendMetrics, ServiceMetrics};
pub use spec::{
    Algorithm, BackendSpec, CheckKind, ClientAddr, HealthSpec, PortSpec, Protocol, ProxyProtocol,
    PublishMode, ServiceSpec, TaskState,
};
pub use udp::REPLY_SLOT;
