//! The one edge where the model's types become the narrow inputs of the crates that act on
//! them: the scheduler's service, the mesh's published service, the DNS endpoint mode. Each
//! crate keeps its own small vocabulary; only this file knows both sides.

use shoal_dns as dns;
use shoal_ingress as ing;
use std::time::Duration;

use shoal_model::mesh::MIN_CHECK_INTERVAL_MS;
use shoal_model::{
    EndpointMode, LbAlgorithm, MeshCheck, MeshPolicy, PortMode, Protocol, ProxyVersion,
    PublishedPort, Service,
};
use shoal_scheduler as sched;

/// What the scheduler needs of a service.
pub fn sched_service(svc: &Service) -> sched::Service {
    sched::Service {
        id: svc.id.clone(),
        spec: sched::ServiceSpec {
            name: svc.name.clone(),
            mode: svc.mode,
            constraints: svc.constraints.clone(),
            restart: svc.restart,
            update_order: svc.update_order,
            update: svc.update,
            update_paused: svc.update_paused(),
            version: svc.version,
            host_ports: svc
                .ports
                .iter()
                .filter(|p| p.mode == PortMode::Host)
                .map(|p| sched::HostPort { port: p.published, udp: p.protocol == Protocol::Udp })
                .collect(),
        },
    }
}

/// A published port as the mesh listens on it.
pub fn mesh_port(p: &PublishedPort) -> ing::PortSpec {
    let mut ps = match p.protocol {
        Protocol::Tcp => ing::PortSpec::tcp(p.published, p.target),
        Protocol::Udp => ing::PortSpec::udp(p.published, p.target),
    };
    ps.mode = match p.mode {
        PortMode::Ingress => ing::PublishMode::Ingress,
        PortMode::Host => ing::PublishMode::Host,
    };
    ps.proxy_protocol = match p.proxy_protocol {
        None => ing::ProxyProtocol::Off,
        Some(ProxyVersion::V1) => ing::ProxyProtocol::V1,
        Some(ProxyVersion::V2) => ing::ProxyProtocol::V2,
    };
    ps
}

/// A service with published ports as the mesh serves it (its drain grace is the node's to
/// set: it depends on how long the node waits after withdrawing a task).
pub fn mesh_service(svc: &Service) -> ing::ServiceSpec {
    let mut spec =
        ing::ServiceSpec::new(svc.name.clone(), svc.ports.iter().map(mesh_port).collect());
    spec.algorithm = match svc.lb_algorithm {
        LbAlgorithm::P2c => ing::Algorithm::P2cLeastConn,
        LbAlgorithm::RoundRobin => ing::Algorithm::RoundRobin,
        LbAlgorithm::Maglev => ing::Algorithm::SourceHash,
    };
    apply_mesh_policy(&svc.mesh, &mut spec);
    spec
}

/// Sets the mesh's spec of a service to its policy: idle timeout, limits and the mesh check.
fn apply_mesh_policy(policy: &MeshPolicy, spec: &mut ing::ServiceSpec) {
    let limit = |n: u32| (n > 0).then_some(n);
    spec.idle_timeout =
        (policy.idle_timeout_ms > 0).then(|| Duration::from_millis(policy.idle_timeout_ms));
    spec.max_connections = limit(policy.max_connections);
    spec.max_udp_flows = limit(policy.max_udp_flows);
    spec.max_udp_flows_per_source = limit(policy.max_udp_flows_per_source);
    let h = &mut spec.health;
    h.check = match &policy.check {
        MeshCheck::Tcp => Some(ing::CheckKind::Tcp),
        MeshCheck::Http(path) => Some(ing::CheckKind::Http { path: path.clone() }),
        MeshCheck::None => None,
    };
    h.interval = Duration::from_millis(policy.check_interval_ms.max(MIN_CHECK_INTERVAL_MS));
    // A check may take up to its interval, never more than a second: a task slower than that
    // to accept is not one to send clients to.
    h.timeout = h.interval.min(Duration::from_secs(1));
    h.rise = policy.check_rise.max(1);
    h.fall = policy.check_fall.max(1);
}

/// How DNS answers for a service's name.
pub fn dns_mode(svc: &Service) -> dns::EndpointMode {
    match svc.endpoint_mode() {
        EndpointMode::Vip => dns::EndpointMode::Vip,
        EndpointMode::Dnsrr => dns::EndpointMode::Dnsrr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_port_field_reaches_the_mesh() {
        let p: PublishedPort = "published=8100,target=80,mode=host,proxy-protocol=v2"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let ps = mesh_port(&p);
        assert_eq!(ps.mode, ing::PublishMode::Host);
        assert_eq!(ps.proxy_protocol, ing::ProxyProtocol::V2);
        let udp: PublishedPort = "53:5353/udp".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mesh_port(&udp), ing::PortSpec::udp(53, 5353));
    }

    #[test]
    fn the_policy_becomes_a_valid_mesh_spec() {
        let mut spec = ing::ServiceSpec::new("s", vec![ing::PortSpec::tcp(80, 8000)]);
        let none = MeshPolicy { idle_timeout_ms: 0, max_connections: 0, ..Default::default() };
        apply_mesh_policy(&none, &mut spec);
        assert_eq!((spec.idle_timeout, spec.max_connections), (None, None));
        spec.validate().unwrap();
        apply_mesh_policy(&MeshPolicy::default(), &mut spec);
        assert_eq!(spec.idle_timeout, Some(Duration::from_secs(900)));
        assert_eq!(spec.max_connections, Some(10_000));
        spec.validate().unwrap();
    }
}
