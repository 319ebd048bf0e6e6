//! The routing mesh's kernel path (the default for an ingress port, `mesh=kernel`; see
//! `shoal_return::kernel` and ARCHITECTURE.md): the node DNATs new flows to a task's ingress
//! address, and the userspace mesh keeps its listener on the same port for what the kernel path
//! leaves to it (clients on the node itself, unanswered clients' retries, and ports without a
//! backend).
//!
//! A backend is in a port's map while gossip says its task serves (running, healthy, not
//! withdrawn), its node is not suspected (unless the port's every backend is) and the userspace
//! mesh's checks have not ruled it out; the table is rewritten
//! whenever that set changes, and established flows stay where they are. The flows of a
//! backend that left and that would otherwise keep going to it (UDP, and TCP short of
//! established) are deleted from conntrack (`shoal_return::conntrack`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use shoal_gossip::NodeId;
use shoal_ingress::HealthState;
use shoal_return::conntrack;
use shoal_return::kernel::{self as km, KernelPort, Pick};

use super::applied::LastApplied;
use super::project::KernelMesh;
use super::{Inner, client_addr, lock};
use shoal_model::{LbAlgorithm, MeshPath, Protocol, PublishedPort, Service};

use crate::engine::records::EndpointRecord;

/// What this node has programmed on the kernel path.
#[derive(Default)]
pub(super) struct State {
    /// The ingress subnet the link into the sandbox routes, once it is set up.
    link: LastApplied<(Ipv4Addr, u8)>,
    /// The ports last written to the node's table.
    ports: LastApplied<Vec<KernelPort>>,
    /// The service of each port's flow counter ([`km::counter_name`]), as last written.
    owners: BTreeMap<String, String>,
    /// The conntrack flows deleted because their backend left, per service.
    purged: BTreeMap<String, u64>,
}

impl State {
    /// The ports as this node last wrote them (`None` before this agent's first write).
    pub(super) fn written(&self) -> Option<Vec<KernelPort>> {
        self.ports.get().cloned()
    }
}

/// The backends that left each port's map between `old` and `new` (a port that is gone loses
/// all of them), with the service that owned the port (`owners`, as of `old`).
fn left(
    old: &[KernelPort],
    new: &[KernelPort],
    owners: &BTreeMap<String, String>,
) -> Vec<(conntrack::Left, String)> {
    let mut out = Vec::new();
    for o in old {
        let now = new.iter().find(|n| (n.udp, n.published) == (o.udp, o.published));
        let Some(service) = owners.get(&km::counter_name(o.udp, o.published)) else { continue };
        for addr in &o.backends {
            let stays = now.is_some_and(|n| n.target == o.target && n.backends.contains(addr));
            if !stays {
                let l = conntrack::Left { addr: *addr, port: o.target, udp: o.udp };
                out.push((l, service.clone()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether a published port of `svc` is forwarded by the kernel (the model decides:
/// [`PublishedPort::path`]).
fn on_kernel_path(svc: &Service, p: &PublishedPort) -> bool {
    p.path(&svc.mesh) == MeshPath::Kernel
}

fn pick(algorithm: LbAlgorithm) -> Pick {
    match algorithm {
        // Least connections needs counts the kernel path does not keep; random is its base.
        LbAlgorithm::P2c => Pick::Random,
        LbAlgorithm::RoundRobin => Pick::RoundRobin,
        LbAlgorithm::Maglev => Pick::ClientHash,
    }
}

/// The kernel-path ports of every service, with the backends new flows may go to. `health`
/// is the userspace mesh's view of each kernel-path service's tasks, from its checks in this
/// node's ingress sandbox. A task enters a port's map only once those checks have seen it up:
/// the kernel, unlike the proxy, does not try another backend, so a flow must not start towards
/// a task this node cannot reach yet (its forwarding entries or its listener not in place).
/// `prior` is the ports as last written: a task already in its port's map stays until a check
/// fails, and before this agent's first write (`None`, after a restart) the map is taken as the
/// last run left it, every serving task on gossip's word, until the checks catch up. A task
/// that leaves the mesh (a partition, a drain) and comes back is checked again before it gets
/// traffic, as it is no longer in the map. The tasks of a node gossip suspects (`suspected`)
/// are left out while others remain: a node that died silently answers no SYN, so its flows
/// must not start there in the second before gossip declares it down. Also returns the service
/// of each port's flow counter.
pub(super) fn ports(
    services: &BTreeMap<String, Arc<Service>>,
    eps: &[(String, EndpointRecord)],
    ingress_id: &str,
    health: &BTreeMap<String, BTreeMap<String, HealthState>>,
    suspected: &BTreeSet<NodeId>,
    prior: Option<&[KernelPort]>,
) -> (Vec<KernelPort>, BTreeMap<String, String>) {
    let mut out = Vec::new();
    let mut owners = BTreeMap::new();
    for svc in services.values().filter(|s| s.ports.iter().any(|p| on_kernel_path(s, p))) {
        let health = health.get(&svc.name);
        // The addresses the service's ports had in their maps as last written.
        let held: Option<BTreeSet<Ipv4Addr>> = prior.map(|prior| {
            let own = |k: &&KernelPort| {
                svc.ports.iter().any(|p| {
                    on_kernel_path(svc, p)
                        && (p.protocol == Protocol::Udp, p.published) == (k.udp, k.published)
                })
            };
            prior.iter().filter(own).flat_map(|k| k.backends.iter().copied()).collect()
        });
        let held = |ip: &Ipv4Addr| held.as_ref().is_none_or(|h| h.contains(ip));
        let mut backends = Vec::new();
        let mut on_suspects = Vec::new();
        for (_, e) in eps.iter().filter(|(net, e)| {
            net == ingress_id && e.service == svc.id && !e.task.is_empty() && e.serving
        }) {
            let usable = match health.and_then(|h| h.get(&e.task)) {
                Some(HealthState::Up) => true,
                // Not checked yet: only where it already was.
                Some(HealthState::Unchecked) | None => held(&e.ip),
                Some(
                    HealthState::Down
                    | HealthState::NotReady
                    | HealthState::Ejected
                    | HealthState::Draining,
                ) => false,
            };
            if !usable {
                continue;
            }
            if suspected.contains(&NodeId::from_name(&e.node)) {
                on_suspects.push(e.ip);
            } else {
                backends.push(e.ip);
            }
        }
        // A port whose every backend is on suspected nodes keeps them: a suspicion may be
        // false, and with no backend the port would refuse every flow.
        if backends.is_empty() {
            backends = on_suspects;
        }
        for p in svc.ports.iter().filter(|p| on_kernel_path(svc, p)) {
            let udp = p.protocol == Protocol::Udp;
            owners.insert(km::counter_name(udp, p.published), svc.name.clone());
            out.push(KernelPort {
                published: p.published,
                target: p.target,
                udp,
                pick: pick(svc.lb_algorithm),
                backends: backends.clone(),
            });
        }
    }
    for p in &mut out {
        p.backends.sort_unstable();
        p.backends.dedup();
    }
    (out, owners)
}

/// The userspace mesh's health of the tasks of each kernel-path service (input of [`ports`]).
pub(super) fn mesh_health(
    inner: &Inner,
    services: &BTreeMap<String, Arc<Service>>,
) -> BTreeMap<String, BTreeMap<String, HealthState>> {
    services
        .values()
        .filter(|s| s.ports.iter().any(|p| on_kernel_path(s, p)))
        .filter_map(|s| {
            let m = inner.mesh.service_metrics(&s.name)?;
            Some((s.name.clone(), m.backends.into_iter().map(|b| (b.id, b.health)).collect()))
        })
        .collect()
}

/// Programs the kernel path as projected: the link into the ingress sandbox once there is a
/// kernel-path port, then the node's DNAT table whenever its ports or backends change.
pub(super) async fn sync(inner: &Arc<Inner>, want: Option<&KernelMesh>) {
    let Some(want) = want else { return };
    if want.ports.is_empty() && lock(&inner.local).kernel.ports.get().is_none() {
        return;
    }
    if !lock(&inner.local).kernel.link.is(&want.subnet) {
        let ifname = client_addr::SANDBOX_IFNAME;
        if let Err(e) = km::apply_link(None, &inner.sandbox, ifname, want.subnet).await {
            tracing::warn!(error = %e, "the mesh's kernel path (the proxy answers meanwhile)");
            return;
        }
        lock(&inner.local).kernel.link.set(want.subnet);
    }
    if lock(&inner.local).kernel.ports.is(&want.ports) {
        return;
    }
    let gone = {
        let local = lock(&inner.local);
        let old = local.kernel.ports.get().map(Vec::as_slice).unwrap_or_default();
        left(old, &want.ports, &local.kernel.owners)
    };
    tracing::debug!(ports = ?want.ports, left = ?gone, "rewriting the kernel path's maps");
    let ports = want.ports.clone();
    let data_port = inner.cluster.info().data_path_port;
    let backends: Vec<conntrack::Left> = gone.iter().map(|(l, _)| *l).collect();
    // The new maps first, then the purge: a flow that starts in between already picks anew.
    let applied = tokio::task::spawn_blocking(move || {
        km::apply_ports(None, data_port, &ports)?;
        Ok::<_, shoal_return::Error>(conntrack::purge(None, &backends))
    })
    .await;
    let purged = match applied {
        Ok(Ok(purged)) => {
            let mut local = lock(&inner.local);
            local.kernel.ports.set(want.ports.clone());
            local.kernel.owners = want.owners.clone();
            purged
        }
        Ok(Err(e)) => return tracing::warn!(error = %e, "programming the mesh's kernel path"),
        Err(e) => return tracing::warn!(error = %e, "programming the mesh's kernel path"),
    };
    match purged {
        Ok(counts) => {
            let mut local = lock(&inner.local);
            for ((l, service), n) in gone.iter().zip(counts) {
                if n > 0 {
                    tracing::debug!(service, backend = %l.addr, flows = n, "purged flows");
                }
                *local.kernel.purged.entry(service.clone()).or_default() += n as u64;
            }
        }
        // The rules are in place; flows of the backends that left time out on their own.
        Err(e) => tracing::warn!(error = %e, "purging the flows of backends that left"),
    }
}

/// The conntrack flows the kernel path deleted because their backend left, per service
/// (`/metrics`).
pub(super) fn purged(inner: &Inner) -> Vec<(String, u64)> {
    lock(&inner.local).kernel.purged.iter().map(|(s, n)| (s.clone(), *n)).collect()
}

/// Takes the kernel path down (the node leaves the swarm).
pub(super) async fn remove() {
    if let Err(e) = km::remove(None).await {
        tracing::warn!(error = %e, "removing the mesh's kernel path");
    }
}

/// The flows the kernel path has forwarded, per service (every one with the client's own
/// address: the kernel path never stands in for a client). Read from the table's counters at
/// the time of asking; a service on the proxy path only is not listed.
pub(super) fn flows(inner: &Inner) -> Vec<(String, u64)> {
    let owners = lock(&inner.local).kernel.owners.clone();
    if owners.is_empty() {
        return Vec::new();
    }
    let counted = match km::flows(None) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "reading the kernel path's counters");
            Vec::new()
        }
    };
    let mut per: BTreeMap<String, u64> = owners.values().map(|s| (s.clone(), 0)).collect();
    for (name, n) in counted {
        if let Some(total) = owners.get(&name).and_then(|svc| per.get_mut(svc)) {
            *total += n;
        }
    }
    per.into_iter().collect()
}

/// The backends of each kernel-path port as last written, for the node's diagnostics.
pub(super) fn describe(inner: &Inner) -> serde_json::Value {
    let local = lock(&inner.local);
    let ports: Vec<serde_json::Value> = local
        .kernel
        .ports
        .get()
        .into_iter()
        .flatten()
        .map(|p| {
            let backends: Vec<IpAddr> = p.backends.iter().map(|a| IpAddr::V4(*a)).collect();
            let protocol = if p.udp { "udp" } else { "tcp" };
            serde_json::json!({"published": p.published, "protocol": protocol, "backends": backends})
        })
        .collect();
    serde_json::Value::Array(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(published: u16, target: u16, backends: &[[u8; 4]]) -> KernelPort {
        KernelPort {
            published,
            target,
            udp: false,
            pick: Pick::Random,
            backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
        }
    }

    #[test]
    fn the_backends_that_left_are_those_no_longer_behind_the_same_port_and_target() {
        let owners: BTreeMap<String, String> = [("tcp-8100", "web"), ("tcp-8200", "api")]
            .into_iter()
            .map(|(c, s)| (c.to_owned(), s.to_owned()))
            .collect();
        let (a, b) = ([10, 0, 0, 5], [10, 0, 0, 6]);
        let old = [port(8100, 80, &[a, b]), port(8200, 80, &[a])];
        let left_of = |new: &[KernelPort]| -> Vec<(Ipv4Addr, u16, String)> {
            left(&old, new, &owners).into_iter().map(|(l, s)| (l.addr, l.port, s)).collect()
        };
        assert!(left_of(&old).is_empty(), "nothing changed");
        // One backend gone from one port.
        let new = [port(8100, 80, &[a]), port(8200, 80, &[a])];
        assert_eq!(left_of(&new), [(b.into(), 80, "web".to_owned())]);
        // A port gone takes all its backends; a new target is a new flow destination.
        let new = [port(8100, 81, &[a, b])];
        assert_eq!(
            left_of(&new),
            [
                (a.into(), 80, "api".to_owned()),
                (a.into(), 80, "web".to_owned()),
                (b.into(), 80, "web".to_owned()),
            ]
        );
    }
}
