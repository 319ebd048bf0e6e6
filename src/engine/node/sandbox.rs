//! The node's ingress sandbox follows the store's ingress network (ARCHITECTURE.md, "Routing
//! mesh"): it is attached with the address the leader gave this node, moved when the ingress
//! network is replaced (`network rm ingress`, then `network create --ingress`), and taken off
//! a removed one.

use std::sync::Arc;

use anyhow::Context;
use shoal_cluster::model::ClusterState;
use shoal_vxlan as vx;

use super::{Inner, client_addr, lock};
use crate::engine::records;

/// Brings the sandbox's ingress endpoint to what the store says: nothing without an ingress
/// network or before the leader gave this node an address on it.
pub(super) async fn sync(inner: &Arc<Inner>, state: &ClusterState) -> anyhow::Result<()> {
    let ingress = records::ingress(state);
    let held = records::held(state).get(&records::sandbox_key(&inner.me)).copied();
    // An address the leader gave on an earlier ingress network is not one to attach with.
    let want = ingress
        .zip(held)
        .filter(|(n, ip)| n.subnet.contains(&std::net::IpAddr::V4(*ip)))
        .map(|(n, ip)| (n.id.clone(), ip));
    let have = {
        let l = lock(&inner.local);
        l.sandbox_net.clone().zip(l.sandbox_ip)
    };
    if want == have {
        return Ok(());
    }
    if let Some((old, _)) = have {
        // A detach that fails leaves an endpoint on a network gone from the store; the next
        // attach still works (its interface name is free once the old network's device is).
        if let Err(e) = inner.overlay.detach(&old, "sbox").await {
            tracing::warn!(network = %old, error = %e, "taking the ingress sandbox off");
        }
        let mut l = lock(&inner.local);
        l.sandbox_ip = None;
        l.sandbox_net = None;
    }
    let (Some(ingress), Some((_, ip))) = (ingress, want) else { return Ok(()) };
    let spec = records::overlay_spec(ingress).context("the ingress network is not IPv4")?;
    let ifname = Some(client_addr::SANDBOX_IFNAME);
    let ep = vx::EndpointSpec { id: "sbox", task: &inner.sandbox, ip, ifname };
    inner.overlay.attach(&spec, &ep).await.context("attaching the ingress sandbox")?;
    client_addr::sandbox_ready(inner, ingress).await;
    let mut l = lock(&inner.local);
    l.sandbox_ip = Some(ip);
    l.sandbox_net = Some(ingress.id.clone());
    Ok(())
}
