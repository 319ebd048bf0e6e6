//! Service-name DNS for shoal tasks: what Docker's embedded resolver at 127.0.0.11 does, with
//! short TTLs, per-network scoping, PTR records for tasks and VIPs, and no internal names
//! leaking upstream.
//!
//! # Layers
//!
//! - [`records`]: the sans-I/O core. Plain input types ([`ClusterRecords`]: networks, services
//!   with their tasks, standalone tasks, aliases) are built into an immutable [`Zone`];
//!   [`Zone::lookup`] answers one question for one [`Scope`] (the networks the asking task is
//!   attached to) with a caller-supplied RNG for the per-reply shuffle. No sockets, no clock.
//! - [`forward`]: forwarding of names that are not ours to the resolvers of a resolv.conf
//!   (re-read on change), with a per-attempt timeout, TCP fallback and an in-flight bound.
//! - [`server`]: the tokio driver. [`DnsService`] runs one hickory-server `Server` per task
//!   namespace, on UDP and TCP sockets bound to 127.0.0.11:53 *inside* that namespace, all
//!   answering from one arc-swapped snapshot; `handler` plans and answers one request (the
//!   fast path, our records, or a forward); `udp` reads and answers datagrams in batches
//!   (recvmmsg/sendmmsg through the `shoal-udp` crate).
//! - [`wire`]: the UDP fast path's view of a plain A/AAAA query and its answer, written into a
//!   reused buffer; every other query goes through hickory.
//! - [`metrics`]: Prometheus counters and a latency histogram.
//!
//! # Driving it (the agent)
//!
//! ```no_run
//! # async fn f(ns: &shoal_netns::NetNs) -> Result<(), shoal_dns::DnsError> {
//! use shoal_dns::{ClusterRecords, DnsConfig, DnsService, Metrics, RecordsConfig, Scope, Zone};
//! let metrics = Metrics::new();
//! // metrics.register(&mut registry);
//! let dns = DnsService::start(DnsConfig::default(), metrics)?;
//! // Whenever the endpoint tables change:
//! let view = ClusterRecords::default();
//! dns.update(Zone::build(&view, RecordsConfig::default()));
//! // When a task's namespace is ready (lo up), and when it goes away:
//! dns.attach_netns("task-id", ns, Scope::new(["net-id"])).await?;
//! dns.detach("task-id").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod handler;
pub mod metrics;
pub mod records;
pub mod server;
mod udp;
pub mod wire;

pub use forward::{ForwardConfig, ForwardError, parse_resolv_conf};
pub use metrics::Metrics;
pub use records::{
    Attachment, BuildProblem, ClusterRecords, DEFAULT_TTL, EndpointMode, Lookup, NetworkSpec,
    RecordsConfig, Scope, ServiceNetwork, ServiceSpec, StandaloneSpec, TaskSpec, Zone,
};
pub use server::{DnsConfig, DnsError, DnsService, TASK_DNS_ADDR};
