//! What a request got wrong, in Docker's words where Docker has them.

use crate::port::PortError;

/// How the API answers an [`Error`]: nothing was changed in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (400); the same request will fail again.
    Invalid,
    /// It clashes with what the swarm holds (409): a name or port another service has.
    Conflict,
    /// It names something the swarm does not hold (404).
    NotFound,
}

/// Why a service, port or mount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Constraint(#[from] shoal_scheduler::ConstraintError),
    #[error("invalid {what} name {name:?}: 1-63 of [a-zA-Z0-9_-], starting with a letter or digit")]
    InvalidName { what: &'static str, name: String },
    #[error("driver {0:?} is not supported: shoal networks are overlay networks")]
    UnsupportedDriver(String),
    #[error("invalid environment variable {0:?}: want KEY=VALUE")]
    InvalidEnv(String),
    #[error("a service needs a command: shoal service create ... -- CMD [ARG...]")]
    EmptyCommand,
    #[error("replicas can only be used with replicated mode")]
    ReplicasWithGlobal,
    #[error("{0}: scale can only be used with replicated mode")]
    ScaleGlobal(String),
    #[error("invalid replicas value {0}: at most 10000")]
    TooManyReplicas(u64),
    /// A `--mesh-*` value the policy refused (the message names the flag).
    #[error("{0}")]
    MeshPolicy(String),
    #[error("empty health command")]
    EmptyHealthCommand,
    #[error("invalid stop grace period {0} ms: at most one hour")]
    StopGrace(u64),
    #[error("invalid stop signal: {0}")]
    StopSignal(String),
    /// A `--mount` the node refused (the message is Docker's).
    #[error("{0}")]
    Mount(String),
    #[error("port published with ingress mode can't be used with dnsrr mode")]
    DnsrrWithIngress,
    #[error("port {0} is published twice")]
    PublishedTwice(u16),
    #[error(
        "port {0} asks for mesh=kernel, which cannot enforce the service's connection limit, \
         idle timeout or UDP flow limits: leave mesh= out (the proxy then takes the port) or \
         keep those at their defaults"
    )]
    KernelPathPolicy(u16),
    #[error("port {0} is not published by {1}")]
    NotPublished(u16, String),
    #[error("port '{port}' is already in use by service '{service}' ({id})")]
    PortInUse { port: u16, service: String, id: String },
    #[error("service {0} already exists")]
    NameInUse(String),
    #[error("No such {kind}: {name}")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} is ambiguous ({matches} matches)")]
    Ambiguous { kind: &'static str, name: String, matches: usize },
    #[error("network {0} not found")]
    NetworkNotFound(String),
    #[error("network {0} is the routing mesh's; publish a port instead of attaching to it")]
    IngressAttached(String),
    #[error(
        "an ingress network cannot be attachable: standalone tasks do not join the routing mesh"
    )]
    IngressAttachable,
    #[error("service needs ingress network, but no ingress network is present")]
    NoIngress,
    #[error("service {service} is not attached to network {network}")]
    NotAttached { service: String, network: String },
    #[error("service {service} is already attached to network {network}")]
    AlreadyAttached { service: String, network: String },
}

impl Error {
    /// Which status the API answers with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::PortInUse { .. } | Error::NameInUse(_) => ErrorKind::Conflict,
            Error::NetworkNotFound(_) | Error::NotFound { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Invalid,
        }
    }
}
