//! The routing mesh keeps the client's address (see `shoal_return` and ARCHITECTURE.md): the
//! ingress sandbox delivers replies to the mesh's transparent sockets, and every local task on
//! the ingress network sends its replies back through the sandbox of the node that received the
//! connection.

use std::net::Ipv4Addr;
use std::sync::Arc;

use shoal_cluster::model::NetworkRecord;
use shoal_ingress as ing;

use super::{Inner, lock};
use crate::engine::records::EndpointRecord;

/// The ingress sandbox's interface on the ingress network.
pub(super) const SANDBOX_IFNAME: &str = "eth0";

/// Once the sandbox is on the ingress network: local delivery of replies in it, then the mesh
/// connects from clients' addresses. Clients on the ingress subnet itself keep the sandbox's
/// address (the tasks reach those directly), and so does every client if the sandbox cannot be
/// set up.
pub(super) async fn sandbox_ready(inner: &Arc<Inner>, ingress: &NetworkRecord) {
    let ipnet::IpNet::V4(subnet) = ingress.subnet else { return };
    match shoal_return::apply_sandbox(&inner.sandbox, SANDBOX_IFNAME).await {
        Ok(()) => inner.mesh.set_client_addr(ing::ClientAddr::Keep { except: vec![subnet] }),
        Err(e) => {
            tracing::warn!(error = %e, "the mesh cannot keep clients' addresses");
            inner.mesh.set_client_addr(ing::ClientAddr::Sandbox);
        }
    }
}

/// Every node's ingress sandbox address, from the ingress endpoint table (sandboxes are the
/// entries without a task), sorted.
pub(super) fn sandboxes(eps: &[(String, EndpointRecord)], ingress_id: &str) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = eps
        .iter()
        .filter(|(net, e)| net == ingress_id && e.task.is_empty())
        .map(|(_, e)| e.ip)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Steers the replies of each running local task on the ingress network to the sandbox its
/// connection came from, when the set of sandboxes differs from what the task has.
pub(super) async fn tasks(inner: &Arc<Inner>, ingress_id: &str, sandboxes: &[Ipv4Addr]) {
    let on_ingress: Vec<String> = lock(&inner.local)
        .attached
        .iter()
        .filter(|(_, nets)| nets.iter().any(|n| n == ingress_id))
        .map(|(id, _)| id.clone())
        .collect();
    for id in on_ingress {
        if lock(&inner.local).returns.get(&id).is_some_and(|have| have == sandboxes) {
            continue;
        }
        let Ok(ns) = inner.runtime.netns(&id) else { continue };
        match shoal_return::apply_task(&ns, sandboxes).await {
            Ok(()) => {
                lock(&inner.local).returns.insert(id, sandboxes.to_vec());
            }
            Err(e) => tracing::warn!(task = %id, error = %e, "steering mesh replies"),
        }
    }
}
