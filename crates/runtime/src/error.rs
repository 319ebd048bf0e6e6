//! The runtime's error type. Each variant says what failed; where state changed, it says how.

use std::io;
use std::path::PathBuf;

use crate::state::TaskState;

/// What went wrong in a runtime call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime's configuration is invalid; nothing was made.
    #[error("invalid runtime config: {field}: {reason}")]
    InvalidConfig {
        /// Offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The task spec is invalid; nothing was made.
    #[error("invalid task spec: {field}: {reason}")]
    InvalidSpec {
        /// Offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A task with this id (or namespace name) exists already; nothing was made.
    #[error("task {0:?} already exists")]
    Exists(String),
    /// No task with this id.
    #[error("no such task {0:?}")]
    NotFound(String),
    /// The operation does not apply in the task's current state; nothing changed.
    #[error("task {id:?} is {state}: cannot {op}")]
    InvalidState {
        /// Task id.
        id: String,
        /// Its state.
        state: TaskState,
        /// What was asked.
        op: &'static str,
    },
    /// The task's program cannot be executed; the task is `failed` and nothing was left behind.
    #[error("task {id:?} failed: {reason}")]
    Executable {
        /// Task id.
        id: String,
        /// Why, in Docker's words (e.g. `executable file not found in $PATH`).
        reason: String,
    },
    /// Starting the process failed (namespace setup or exec in the child); the task is `failed`.
    #[error("task {id:?} failed to start {program:?}: {source}")]
    Spawn {
        /// Task id.
        id: String,
        /// Program path.
        program: PathBuf,
        /// The error the child reported.
        source: io::Error,
    },
    /// A namespace operation failed.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
    /// A netlink request in the task's namespace failed.
    #[error("netlink: {op}: {source}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// The netlink error.
        source: rtnetlink::Error,
    },
    /// A file operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A command run in a task with `exec` could not be started there; nothing changed.
    #[error("exec in task {id:?}: {reason}")]
    Exec {
        /// Task id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A command run in a task with `exec` took too long and was killed.
    #[error("exec in task {id:?}: killed after {timeout:?}")]
    ExecTimeout {
        /// Task id.
        id: String,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// The process did not exit even after SIGKILL (stuck in the kernel); retrying may help.
    #[error("task {0:?} did not exit after SIGKILL")]
    StopTimeout(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { op, path: path.into(), source }
    }
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
