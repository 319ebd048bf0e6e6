//! A service as the store keeps it (table `services`, key = id), the policies it carries, and
//! the rules it must keep: alone ([`Service::validate`]) and among the swarm's other services
//! and networks ([`Service::check_against`]). The API runs both before every write, so the
//! leader and the nodes read only services that passed them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use shoal_scheduler::{Constraint, Mode, RestartPolicy, UpdateOrder, UpdatePolicy};

use crate::{Error, MeshPath, MeshPolicy, MountSpec, PublishedPort};

/// The most replicas a service may ask for.
pub const MAX_REPLICAS: u64 = 10_000;

/// The longest `--stop-grace-period` (the runtime's bound).
pub const MAX_STOP_GRACE_MS: u64 = 3_600_000;

/// How the routing mesh picks a task for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbAlgorithm {
    /// Power of two random choices, fewer open connections wins.
    #[default]
    P2c,
    /// Strict rotation.
    RoundRobin,
    /// Client-address affinity, the same on every node (every node builds the same Maglev
    /// table from the same backends).
    Maglev,
}

/// How a service's name resolves: to one virtual IP, or to every task's address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    #[default]
    Vip,
    /// DNS round robin; no VIP, so no routing mesh in front of it.
    Dnsrr,
}

/// A health command run inside each task (Docker's HEALTHCHECK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Shell command; exit 0 is healthy.
    pub cmd: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
}

/// Docker's `--update-failure-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Replace no more tasks until the next update (Docker's default).
    #[default]
    Pause,
    /// Put the previous spec back.
    Rollback,
    /// Go on as if nothing failed.
    Continue,
}

/// Why a rolling update stopped, as `service inspect` shows it (Docker's `UpdateStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// `paused` or `rollback_started`.
    pub state: String,
    pub message: String,
}

impl UpdateStatus {
    /// A status with its message.
    pub fn new(state: &str, message: String) -> UpdateStatus {
        UpdateStatus { state: state.to_owned(), message }
    }
}

/// A service as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: String,
    /// Bumped on every change that needs new tasks (command, env, networks, …).
    pub version: u64,
    pub mode: Mode,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Network ids (not including ingress, which ports imply).
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    /// DNS round robin instead of a virtual IP ([`EndpointMode::Dnsrr`]).
    #[serde(default)]
    pub dnsrr: bool,
    /// How the routing mesh balances connections to the published ports.
    #[serde(default)]
    pub lb_algorithm: LbAlgorithm,
    /// Idle timeout, limits and health check of the routing mesh.
    #[serde(default)]
    pub mesh: MeshPolicy,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    pub restart: RestartPolicy,
    #[serde(default)]
    pub update_order: UpdateOrder,
    /// `--update-parallelism`, `--update-delay` and `--update-monitor`.
    #[serde(default)]
    pub update: UpdatePolicy,
    /// `--update-failure-action`: what a task of a new spec failing during an update does.
    #[serde(default)]
    pub update_failure_action: FailureAction,
    /// Set when a failure stopped the last rolling update; cleared by the next update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
    #[serde(default)]
    pub health: Option<Health>,
    /// Volumes and bind mounts of each task (`--mount`), checked when the request came in.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    pub stop_grace_ms: u64,
    /// The signal a stop sends first (`--stop-signal`); SIGTERM when `None`.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// The spec before the last update, which `service rollback` puts back (without its own
    /// previous: one level, as in Docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<Service>>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// What [`Service::check_against`] needs to know of a network.
#[derive(Debug, Clone, Copy)]
pub struct NetworkRef<'a> {
    pub name: &'a str,
    /// The routing mesh's network, which ports imply and no service attaches to by name.
    pub ingress: bool,
}

impl Service {
    /// How its name resolves.
    pub fn endpoint_mode(&self) -> EndpointMode {
        if self.dnsrr { EndpointMode::Dnsrr } else { EndpointMode::Vip }
    }

    /// The networks its tasks attach to: `ingress` (the ingress network's id) first when it
    /// publishes ports. A host-mode port is served by the node's mesh too, to the node's own
    /// tasks only, through the same ingress endpoint that keeps the client's address.
    pub fn task_networks(&self, ingress: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ports.is_empty()
            && let Some(ing) = ingress
        {
            out.push(ing.to_owned());
        }
        for n in &self.networks {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
        out
    }

    /// The networks that get a VIP: every task network but ingress, in vip mode. (The routing
    /// mesh balances ingress itself, and ingress takes no part in service discovery, as in
    /// Swarm: a name resolves on the networks a task shares with the service.)
    pub fn vip_networks(&self) -> Vec<String> {
        if self.dnsrr { Vec::new() } else { self.networks.clone() }
    }

    /// Whether the last rolling update stopped on a failure and waits for the next update.
    pub fn update_paused(&self) -> bool {
        self.update_status.as_ref().is_some_and(|s| s.state == "paused")
    }

    /// The rules a service keeps on its own.
    pub fn validate(&self) -> Result<(), Error> {
        crate::check_name("service", &self.name)?;
        if self.argv.first().is_none_or(String::is_empty) {
            return Err(Error::EmptyCommand);
        }
        if let Mode::Replicated { replicas } = self.mode
            && replicas > MAX_REPLICAS
        {
            return Err(Error::TooManyReplicas(replicas));
        }
        if self.health.as_ref().is_some_and(|h| h.cmd.trim().is_empty()) {
            return Err(Error::EmptyHealthCommand);
        }
        if self.stop_grace_ms > MAX_STOP_GRACE_MS {
            return Err(Error::StopGrace(self.stop_grace_ms));
        }
        // The mesh reaches a dnsrr service through no VIP, so only a host-mode port can work.
        if self.dnsrr && self.ports.iter().any(PublishedPort::is_ingress) {
            return Err(Error::DnsrrWithIngress);
        }
        let mut seen = BTreeSet::new();
        for p in &self.ports {
            if !seen.insert((p.published, p.protocol)) {
                return Err(Error::PublishedTwice(p.published));
            }
            // A port that names the kernel path would silently lose what only the proxy does.
            if p.mesh == Some(MeshPath::Kernel) && !p.kernel_can(&self.mesh) {
                return Err(Error::KernelPathPolicy(p.published));
            }
        }
        Ok(())
    }

    /// The rules a service keeps among the swarm's others (`others` may include its own older
    /// self): a name and each published port belong to one service, and it attaches only to
    /// networks that exist (`network` looks one up by id) and are not ingress.
    pub fn check_against<'a, 'n>(
        &self,
        others: impl IntoIterator<Item = &'a Service>,
        network: impl Fn(&str) -> Option<NetworkRef<'n>>,
    ) -> Result<(), Error> {
        let others: Vec<&Service> = others.into_iter().filter(|s| s.id != self.id).collect();
        if others.iter().any(|s| s.name == self.name) {
            return Err(Error::NameInUse(self.name.clone()));
        }
        for n in &self.networks {
            match network(n) {
                None => return Err(Error::NetworkNotFound(n.clone())),
                Some(net) if net.ingress => {
                    return Err(Error::IngressAttached(net.name.to_owned()));
                }
                Some(_) => {}
            }
        }
        for p in &self.ports {
            // The mesh holds an ingress port on every node; two host-mode ports of the same
            // number are kept on different nodes by the scheduler instead.
            let taken = |q: &PublishedPort| {
                q.published == p.published
                    && q.protocol == p.protocol
                    && (p.is_ingress() || q.is_ingress())
            };
            if let Some(other) = others.iter().find(|o| o.ports.iter().any(taken)) {
                return Err(Error::PortInUse {
                    port: p.published,
                    service: other.name.clone(),
                    id: other.id.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, Protocol};

    fn service(id: &str, name: &str, ports: Vec<PublishedPort>) -> Service {
        Service {
            id: id.into(),
            name: name.into(),
            version: 1,
            mode: Mode::Replicated { replicas: 1 },
            argv: vec!["true".into()],
            env: vec![],
            workdir: None,
            networks: vec![],
            ports,
            dnsrr: false,
            lb_algorithm: LbAlgorithm::default(),
            mesh: MeshPolicy::default(),
            constraints: vec![],
            restart: RestartPolicy::default(),
            update_order: UpdateOrder::default(),
            update: UpdatePolicy::default(),
            update_failure_action: FailureAction::default(),
            update_status: None,
            health: None,
            mounts: vec![],
            stop_grace_ms: 10_000,
            stop_signal: None,
            previous: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn networks(id: &str) -> Option<NetworkRef<'static>> {
        match id {
            "ing" => Some(NetworkRef { name: "ingress", ingress: true }),
            "net1" => Some(NetworkRef { name: "my-overlay", ingress: false }),
            _ => None,
        }
    }

    #[test]
    fn a_service_alone_keeps_its_rules() {
        let tcp = PublishedPort::tcp;
        assert_eq!(service("s", "web", vec![tcp(80, 80)]).validate(), Ok(()));
        let mut rr = service("s", "rr", vec![tcp(9000, 80)]);
        rr.dnsrr = true;
        assert_eq!(rr.validate(), Err(Error::DnsrrWithIngress));
        rr.ports[0].mode = crate::PortMode::Host;
        assert_eq!(rr.validate(), Ok(()), "a host-mode port needs no VIP");
        let twice = service("s", "web", vec![tcp(80, 80), tcp(80, 81)]);
        assert_eq!(twice.validate(), Err(Error::PublishedTwice(80)));
        let mut both = service("s", "dns", vec![tcp(53, 53), tcp(53, 53)]);
        both.ports[1].protocol = Protocol::Udp;
        assert_eq!(both.validate(), Ok(()), "udp 53 is another port than tcp 53");
        let mut big = service("s", "big", vec![]);
        big.mode = Mode::Replicated { replicas: MAX_REPLICAS + 1 };
        assert_eq!(big.validate(), Err(Error::TooManyReplicas(MAX_REPLICAS + 1)));
        let mut slow = service("s", "slow", vec![]);
        slow.stop_grace_ms = MAX_STOP_GRACE_MS + 1;
        assert!(matches!(slow.validate(), Err(Error::StopGrace(_))));
        let bad = service("s", "-web", vec![]);
        assert!(matches!(bad.validate(), Err(Error::InvalidName { .. })));
        let mut empty = service("s", "web", vec![]);
        empty.argv = vec![String::new()];
        assert_eq!(empty.validate(), Err(Error::EmptyCommand));
        let mut capped = service("s", "capped", vec![tcp(80, 80)]);
        capped.mesh.max_connections = 2;
        assert_eq!(capped.validate(), Ok(()), "a plain port takes the proxy");
        capped.ports[0].mesh = Some(MeshPath::Kernel);
        assert_eq!(capped.validate(), Err(Error::KernelPathPolicy(80)));
        capped.ports[0].mesh = Some(MeshPath::Proxy);
        assert_eq!(capped.validate(), Ok(()));
    }

    #[test]
    fn a_service_is_checked_against_the_others() {
        let web = service("s1", "web", vec![PublishedPort::tcp(8100, 80)]);
        let others = [web.clone()];
        assert_eq!(web.check_against(&others, networks), Ok(()), "not against its own self");
        let e = service("s2", "web", vec![]).check_against(&others, networks).unwrap_err();
        assert_eq!(
            (e.to_string().as_str(), e.kind()),
            ("service web already exists", ErrorKind::Conflict)
        );
        let api = service("s2", "api", vec![PublishedPort::tcp(8100, 8100)]);
        let e = api.check_against(&others, networks).unwrap_err();
        assert_eq!(e.to_string(), "port '8100' is already in use by service 'web' (s1)");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        let mut udp = api.clone();
        udp.ports[0].protocol = Protocol::Udp;
        assert_eq!(udp.check_against(&others, networks), Ok(()));
        // Host-mode ports of one number may be shared (the scheduler keeps their tasks apart),
        // never with an ingress port, which the mesh holds on every node.
        let mut host = api.clone();
        host.ports[0].mode = crate::PortMode::Host;
        assert!(matches!(host.check_against(&others, networks), Err(Error::PortInUse { .. })));
        let mut web_host = web.clone();
        web_host.ports[0].mode = crate::PortMode::Host;
        assert_eq!(host.check_against(&[web_host], networks), Ok(()));
        let mut on_ingress = service("s4", "x", vec![]);
        on_ingress.networks = vec!["ing".into()];
        let e = on_ingress.check_against(&others, networks).unwrap_err();
        assert!(e.to_string().contains("routing mesh"), "{e}");
        let mut unknown = service("s5", "y", vec![]);
        unknown.networks = vec!["nope".into()];
        let e = unknown.check_against(&others, networks).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::NotFound, "network nope not found")
        );
    }

    #[test]
    fn ingress_comes_first_among_the_task_networks_when_ports_are_published() {
        let mut s = service("s", "web", vec![PublishedPort::tcp(80, 80)]);
        s.networks = vec!["net1".into()];
        assert_eq!(s.task_networks(Some("ing")), ["ing", "net1"]);
        assert_eq!(s.vip_networks(), ["net1"]);
        s.ports.clear();
        assert_eq!(s.task_networks(Some("ing")), ["net1"]);
        s.dnsrr = true;
        assert!(s.vip_networks().is_empty());
    }
}
