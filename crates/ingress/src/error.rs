//! The crate's typed errors.

use std::io;
use std::net::SocketAddr;

/// What went wrong at the mesh's edge. Every error leaves the mesh as it was before the call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A service spec failed validation; nothing changed.
    #[error("service {service:?}: invalid {field}: {why}")]
    InvalidSpec {
        /// The service.
        service: String,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Another service already publishes this port; nothing changed.
    #[error("port {port}/{proto} is already published by service {owner:?}")]
    PortTaken {
        /// The published port.
        port: u16,
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The service that has it.
        owner: String,
    },
    /// Binding a listener failed (address in use, not local...); nothing changed.
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The system's answer.
        source: io::Error,
    },
    /// No such service.
    #[error("no service named {0:?}")]
    UnknownService(String),
    /// Making a socket inside a namespace failed; retrying may help.
    #[error("namespace: {0}")]
    Netns(#[from] shoal_netns::Error),
    /// A system call failed; retrying may help.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The system's answer.
        source: io::Error,
    },
    /// `Mesh` was used outside a tokio runtime.
    #[error("the mesh needs a tokio runtime")]
    NoRuntime,
}

impl Error {
    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io { op, source: source.into() }
    }
}
