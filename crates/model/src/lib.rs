//! The Swarm vocabulary as types: a [`Service`] with its [`PublishedPort`]s, health check and
//! update policy, a [`TaskRecord`], a [`MountSpec`], and the requests that create and change a
//! service. Each rule that parses, defaults or validates them lives here, once; the CLI, the
//! API, the leader and the node engine all hold these types, and the data-plane crates get
//! their own narrow inputs converted from them at one edge in the binary (`src/from_model.rs`).
//!
//! Layers, bottom up:
//! - [`port`], [`mount`]: one user-facing syntax each (`-p`, `--mount`), with `FromStr` and
//!   `Display` that round-trip;
//! - [`service`]: the service as the store keeps it, the policies it carries, and the checks
//!   a service must pass against the rest of the swarm;
//! - [`request`]: `service create` and `service update` as they arrive, turned into a
//!   [`Service`] with Docker's defaults; [`network`]: `network create` as it arrives;
//! - [`task`]: tasks as the store keeps them, and the keys of the addresses no task holds;
//! - [`Error`]: what was wrong, sorted by [`ErrorKind`] so the API can answer with a status.
//!
//! The serde shapes are the store's JSON: a record written by an older agent reads back the
//! same (see `tests/store_json.rs`). The scheduler's own vocabulary (mode, constraints,
//! restart and update policy, the task's life) is reused as it is, not copied.

#![forbid(unsafe_code)]

mod error;
pub mod mesh;
pub mod mount;
pub mod network;
pub mod port;
pub mod request;
pub mod service;
pub mod task;

pub use error::{Error, ErrorKind};
pub use mesh::{MeshCheck, MeshPolicy, MeshPolicyChange};
pub use mount::{MountKind, MountSpec};
pub use network::NetworkCreate;
pub use port::{MeshPath, PortMode, Protocol, ProxyVersion, PublishedPort};
pub use request::{Context, RolloutChange, ServiceCreate, ServiceUpdate};
pub use service::{
    EndpointMode, FailureAction, Health, LbAlgorithm, NetworkRef, Service, UpdateStatus,
};
pub use shoal_scheduler::{
    Constraint, Mode, RestartCondition, RestartPolicy, UpdateOrder, UpdatePolicy,
};
pub use task::{CniAttachment, Standalone, TaskRecord, sandbox_key, vip_key};

/// A DNS label: services and containers are reached by name. `what` names the kind of thing.
pub fn check_name(what: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(Error::InvalidName { what, name: name.to_owned() }) }
}

/// `KEY=VALUE` pairs, as `--env` takes them.
pub fn parse_env(list: &[String]) -> Result<Vec<(String, String)>, Error> {
    list.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(Error::InvalidEnv(e.clone())),
        })
        .collect()
}
