//! shoal's task runner. Without a container engine, a task is a process the agent starts in its
//! own network namespace (`PREFIX-t-<short id>` under `/run/netns`, `lo` up), its own mount
//! namespace (where a private `/etc/resolv.conf` pointing at 127.0.0.11 and a private
//! `/etc/hosts` are bind-mounted over the host's, with propagation made private first so
//! nothing leaks back) and its own UTS namespace (its hostname). Its stdout and stderr are kept
//! line by line in a size-capped log, an optional health command runs inside its namespaces
//! with Docker's semantics, and stop is SIGTERM to its process group, then SIGKILL after the
//! grace period. When the task ends, whatever is left in its namespace is killed; once the
//! agent has taken its endpoints out, `release_netns` deletes the namespace (as a container's
//! sandbox goes), while the task's status and logs stay until it is removed.
//!
//! # Layers
//!
//! - [`spec`]: [`TaskSpec`] and [`HealthCheck`] (plain data, validated, serde), and the text of
//!   the task's `resolv.conf` and `hosts`.
//! - [`state`]: [`TaskState`] (Docker's names: new, preparing, ready, starting, running,
//!   complete, shutdown, failed), [`Health`], the [`TaskStatus`] snapshot and [`TaskEvent`].
//! - [`health`]: the sans-I/O [`HealthMonitor`] (start period, retries, interval; time passed in).
//! - [`logs`]: the sans-I/O [`LogRing`] and the shared, followable [`Logs`].
//! - [`mounts`]: the task's [`Mount`]s (volumes and bind mounts), made in its mount namespace.
//! - `process` (private): the only `unsafe` code, `pre_exec` setup of the child (why not a
//!   re-exec helper, and exactly what the child does, is documented there).
//! - [`Runtime`]: the tokio driver that owns the tasks of one node.
//!
//! # Driving it (the agent)
//!
//! ```no_run
//! # async fn f() -> Result<(), shoal_runtime::Error> {
//! use shoal_runtime::{HealthCheck, Runtime, RuntimeConfig, TaskSpec};
//! let rt = Runtime::new(RuntimeConfig { prefix: "node1".into(), state_dir: "/run/shoal/node1".into() })?;
//! rt.clean_stale().await?; // namespaces and files a crashed agent left
//! let mut events = rt.subscribe(); // state and health changes → gossip, DNS, mesh
//!
//! let mut spec = TaskSpec::new("x7b2k9q0w1e2r3", vec!["python3".into(), "-m".into(), "http.server".into()]);
//! spec.hostname = "web.1".into();
//! spec.health = Some(HealthCheck::shell("curl -fs localhost:8000/"));
//! rt.create(spec).await?;                        // new → preparing → ready
//! let ns = rt.netns("x7b2k9q0w1e2r3")?;           // hook: attach overlay endpoints into `ns`,
//! // dns.attach_netns(id, ns, scope).await?;      // bind 127.0.0.11 in it, …
//! rt.set_addresses("x7b2k9q0w1e2r3", vec!["10.0.1.5".parse().unwrap()])?;
//! rt.start("x7b2k9q0w1e2r3")?;                   // starting → running (health: starting)
//! let _lines = rt.logs("x7b2k9q0w1e2r3")?.follow(); // service logs -f
//! rt.stop("x7b2k9q0w1e2r3", None).await?;        // SIGTERM, SIGKILL after stop_grace → shutdown
//! // hook: detach the endpoints and the DNS listener, then
//! rt.release_netns("x7b2k9q0w1e2r3").await?;     // namespace gone, status and logs kept
//! rt.remove("x7b2k9q0w1e2r3").await?;            // files gone, task forgotten
//! # let _ = events.recv().await; Ok(()) }
//! ```
//!
//! A task should take traffic (DNS answers, mesh backends) while [`TaskStatus::is_serving`]:
//! running, and healthy if it has a health check. Swarm shuts an unhealthy task down; this
//! runtime reports [`Health::Unhealthy`] and leaves that decision (stop, restart policy) to the
//! agent.

#![warn(missing_docs)]

pub mod error;
pub mod health;
pub mod logs;
pub mod mounts;
mod process;
mod runtime;
pub mod spec;
pub mod state;

pub use error::{Error, Result};
pub use health::{HealthMonitor, ProbeOutcome};
pub use logs::{LogFollower, LogLine, LogRing, Logs, Stream};
pub use mounts::Mount;
pub use runtime::{ExecOutput, MAX_PREFIX, PROBE_OUTPUT_CAP, Runtime, RuntimeConfig};
pub use spec::{DEFAULT_RESOLV_CONF, DEFAULT_STOP_GRACE, HealthCheck, TaskSpec, short_id};
pub use state::{EventKind, Health, TaskEvent, TaskState, TaskStatus};
