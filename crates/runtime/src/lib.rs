//! shoal's task runner. Without a container engine, a task is a process the agent starts in its
//! own network namespace (`PREFIX-t-<short id>` under `/run/netns`, `lo` up), its own mount
//! namespace (where a private `/etc/resolv.conf` pointing at 127.0.0.11 and a private
//! `/etc/hosts` are bind-mounted over the host's, with propagation made private first so
//! nothing leaks back) and its own UTS namespace (its hostname). Its stdout and stderr are kept
//! line by line in a size-capped log, an optional health command runs inside its namespaces
//! with Docker's semantics, and stop is its stop signal (SIGTERM by default) to its process
//! group, then SIGKILL after the grace period. When the task ends, whatever is left in its namespace is killed; once the
//! agent has taken its endpoints out, `release_netns` deletes the namespace (as a container's
//! sandbox goes), while the task's status and logs stay until it is removed.
//!
//! # Tasks outlive the agent (Docker's live-restore)
//!
//! Each task is started through its own supervisor, the [`shim`]: the agent's binary
//! re-executed in a session of its own, which spawns the task, writes its output to log files
//! and its exit status to a file, and exits when the task has ended. Nothing ties a task to the
//! agent's process: stopping the agent (SIGTERM), killing it (`kill -9`) or replacing its binary
//! leaves the task running. Each task's directory (`<state_dir>/tasks/<id>/`, mode 0700, files
//! 0600) holds what a later agent needs: the launch record (spec, namespace), the shim's pid
//! and start time (never mistaken for a reused pid) and the task's pid, the logs, and, once it
//! ended, its exit code. [`Runtime::adopt`] reads them back: running tasks are followed again
//! (pid, logs, health, stop), ended ones report their real exit code. Stopping a task is always
//! explicit ([`Runtime::stop`], [`Runtime::remove`], [`Runtime::remove_all`]); dropping a
//! `Runtime` stops nothing.

//! # Layers
//!
//! - [`spec`]: [`TaskSpec`] and [`HealthCheck`] (plain data, validated, serde), and the text of
//!   the task's `resolv.conf` and `hosts`.
//! - [`state`]: [`TaskState`] (Docker's names: new, preparing, ready, starting, running,
//!   complete, shutdown, failed), [`Health`], the [`TaskStatus`] snapshot and [`TaskEvent`].
//! - [`health`]: the sans-I/O [`HealthMonitor`] (start period, retries, interval; time passed in).
//! - [`logs`]: the sans-I/O [`LogRing`] and the shared, followable [`Logs`].
//! - [`mounts`]: the task's [`Mount`]s (volumes and bind mounts), made in its mount namespace.
//! - `process` (private): the `unsafe` `pre_exec` setup of the task's process, run by its
//!   shim (exactly what the child does is documented there).
//! - [`shim`]: the per-task supervisor process and the files it shares with the agent;
//!   `supervisor` (private): the agent's side (start a shim, wait for it, follow its log file).
//! - [`Runtime`]: the tokio driver that owns the tasks of one node.
//!
//! # Driving it (the agent)
//!
//! ```no_run
//! # async fn f() -> Result<(), shoal_runtime::Error> {
//! use shoal_runtime::{HealthCheck, Runtime, RuntimeConfig, TaskSpec};
//! let rt = Runtime::new(RuntimeConfig {
//!     prefix: "node1".into(),
//!     state_dir: "/var/lib/shoal/runtime".into(),
//!     shim: "/proc/self/exe".into(), // this binary answers `task-shim` (see `shim`)
//! })?;
//! let _adopted = rt.adopt().await?; // tasks an earlier agent started, still running or ended
//! let mut events = rt.subscribe(); // state and health changes → gossip, DNS, mesh
//!
//! let mut spec = TaskSpec::new("x7b2k9q0w1e2r3", vec!["python3".into(), "-m".into(), "http.server".into()]);
//! spec.hostname = "web.1".into();
//! spec.health = Some(HealthCheck::shell("curl -fs localhost:8000/"));
//! rt.create(spec).await?;                        // new → preparing → ready
//! let ns = rt.netns("x7b2k9q0w1e2r3")?;           // hook: attach overlay endpoints into `ns`,
//! // dns.attach_netns(id, ns, scope).await?;      // bind 127.0.0.11 in it, …
//! rt.set_addresses("x7b2k9q0w1e2r3", vec!["10.0.1.5".parse().unwrap()])?;
//! rt.start("x7b2k9q0w1e2r3").await?;             // starting → running (health: starting)
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
pub mod shim;
pub mod spec;
pub mod state;
mod supervisor;

pub use error::{Error, Result};
pub use health::{HealthMonitor, ProbeOutcome};
pub use logs::{LogFollower, LogLine, LogRing, Logs, Stream};
pub use mounts::Mount;
pub use runtime::{ExecOutput, MAX_PREFIX, PROBE_OUTPUT_CAP, Runtime, RuntimeConfig};
pub use spec::{
    DEFAULT_RESOLV_CONF, DEFAULT_STOP_GRACE, DEFAULT_STOP_SIGNAL, HealthCheck, TaskSpec,
    parse_signal, short_id,
};
pub use state::{EventKind, Health, TaskEvent, TaskState, TaskStatus};
