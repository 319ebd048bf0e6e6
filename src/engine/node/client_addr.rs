//! The routing mesh keeps the client's address (see `shoal_return` and ARCHITECTURE.md): the
//! ingress sandbox delivers replies to the mesh's transparent sockets, and every local task on
//! the ingress network sends its replies back through the sandbox of the node that received the
//! connection.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use shoal_cluster::model::NetworkRecord;
use shoal_ingress as ing;

use super::{Inner, lock};

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

/// Steers the replies of each running local task on the ingress network to the sandbox its
/// connection came from (`want`: per task, every node's sandbox), when the set of sandboxes
/// differs from what the task has.
pub(super) async fn tasks(inner: &Arc<Inner>, want: &BTreeMap<String, Vec<Ipv4Addr>>) {
    for (id, sandboxes) in want {
        if lock(&inner.local).returns.is(id, sandboxes) {
            continue;
        }
        let Ok(ns) = inner.runtime.netns(id) else { continue };
        match shoal_return::apply_task(&ns, sandboxes).await {
            Ok(()) => lock(&inner.local).returns.set(id.clone(), sandboxes.clone()),
            Err(e) => tracing::warn!(task = %id, error = %e, "steering mesh replies"),
        }
    }
}
