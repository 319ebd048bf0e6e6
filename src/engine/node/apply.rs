//! Each subsystem takes its part of the projection (`project::DesiredDataPlane`): gossip
//! networks, the ingress sandbox, our gossip endpoints, VXLAN forwarding, DNS, the mesh and its
//! kernel path, mesh replies and VIP rules. Each compares its part with what it last applied
//! (`applied`) and changes only what differs; a failed apply is tried again by the next pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::Context;
use shoal_cluster::model::ClusterState;
use shoal_dns as dns;
use shoal_gossip::EntryKey;
use shoal_vxlan as vx;

use super::project::{self, DesiredDataPlane};
use super::{Inner, client_addr, cni, confirm, kernel_mesh, lock, tasks};
use crate::engine::records::{self, EndpointRecord};
use crate::engine::trust;

/// Joins the gossip networks the node takes part in and leaves the others.
pub(super) async fn networks(inner: &Arc<Inner>, want: BTreeSet<String>) -> anyhow::Result<()> {
    let have = lock(&inner.local).networks.get().cloned().unwrap_or_default();
    if have == want {
        return Ok(());
    }
    for n in want.difference(&have) {
        inner.gossip.join_network(n).await?;
    }
    for n in have.difference(&want) {
        let _ = inner.gossip.leave_network(n).await;
    }
    lock(&inner.local).networks.set(want);
    Ok(())
}

/// The ingress sandbox follows the store's ingress network (ARCHITECTURE.md, "Routing mesh"):
/// it is attached with the address the leader gave this node, moved when the ingress network
/// is replaced (`network rm ingress`, then `network create --ingress`), and taken off a removed
/// one.
pub(super) async fn sandbox(inner: &Arc<Inner>, state: &ClusterState) -> anyhow::Result<()> {
    let ingress = records::ingress(state);
    let want = ingress.zip(project::sandbox(state, &inner.me)).map(|(n, ip)| (n.id.clone(), ip));
    let have = lock(&inner.local).sandbox.get().cloned();
    if want == have {
        return Ok(());
    }
    if let Some((old, _)) = have {
        // A detach that fails leaves an endpoint on a network gone from the store; the next
        // attach still works (its interface name is free once the old network's device is).
        if let Err(e) = inner.overlay.detach(&old, "sbox").await {
            tracing::warn!(network = %old, error = %e, "taking the ingress sandbox off");
        }
        lock(&inner.local).sandbox.clear();
    }
    let (Some(ingress), Some((_, ip))) = (ingress, want) else { return Ok(()) };
    let spec = records::overlay_spec(ingress).context("the ingress network is not IPv4")?;
    let ifname = Some(client_addr::SANDBOX_IFNAME);
    let ep = vx::EndpointSpec { id: "sbox", task: &inner.sandbox, ip, ifname };
    inner.overlay.attach(&spec, &ep).await.context("attaching the ingress sandbox")?;
    client_addr::sandbox_ready(inner, ingress).await;
    lock(&inner.local).sandbox.set((ingress.id.clone(), ip));
    Ok(())
}

/// Our endpoints in the gossip tables, as projected.
pub(super) async fn endpoints(inner: &Arc<Inner>, want: &BTreeMap<EntryKey, EndpointRecord>) {
    for (k, v) in want {
        if lock(&inner.local).published.is(k, v) {
            continue;
        }
        let Ok(b) = serde_json::to_vec(v) else { continue };
        if let Err(e) = inner.gossip.write(k.clone(), b).await {
            tracing::debug!(key = ?k, error = %e, "publishing an endpoint");
            continue;
        }
        lock(&inner.local).published.set(k.clone(), v.clone());
    }
    // A task being stopped keeps its entries until `tasks::withdraw` takes them out (only it
    // waits for every node to let the task go before the task is asked to stop), and one being
    // started keeps its announcement.
    let stale: Vec<EntryKey> = {
        let l = lock(&inner.local);
        let busy = |k: &EntryKey| l.published.get(k).is_some_and(|v| l.busy.contains(&v.task));
        l.published.stale(want).into_iter().filter(|k| !busy(k)).collect()
    };
    for k in stale {
        let _ = inner.gossip.delete(k.clone()).await;
        lock(&inner.local).published.remove(&k);
    }
}

/// The data path: VXLAN forwarding, DNS, the mesh and its kernel path, mesh replies, VIP
/// rules; then what was applied, for the nodes waiting on their tasks' changes.
pub(super) async fn dataplane(inner: &Arc<Inner>, d: &DesiredDataPlane) {
    count_dropped(inner, &d.dropped);
    let programmed = overlay(inner, &d.overlay).await;
    if !lock(&inner.local).dns.is(&d.dns) {
        inner.dns.update(dns::Zone::build(&d.dns, dns::RecordsConfig::default()));
        lock(&inner.local).dns.set(d.dns.clone());
    }
    mesh(inner, d);
    kernel_mesh::sync(inner, d.kernel.as_ref()).await;
    client_addr::tasks(inner, &d.returns).await;
    vips(inner, d).await;
    // Only once the forwarding tables took this pass's endpoints.
    if programmed && let Some(c) = &d.confirm {
        confirm::publish(inner, &c.network, &c.known, &c.serving).await;
    }
}

/// Counts the gossip claims the store contradicts: each once, for as long as it stays.
fn count_dropped(inner: &Inner, now: &BTreeSet<trust::Dropped>) {
    let mut guard = lock(&inner.local);
    let l = &mut *guard;
    for d in now.difference(&l.claims_seen) {
        tracing::warn!(kind = d.kind.as_str(), claim = %d.what, "dropped a gossip claim the store contradicts");
        *l.claims_dropped.entry(d.kind.as_str()).or_default() += 1;
    }
    l.claims_seen = now.clone();
}

/// VXLAN forwarding: remote endpoints and peers. Returns whether the overlay holds `want`.
async fn overlay(inner: &Arc<Inner>, want: &vx::Tables) -> bool {
    if lock(&inner.local).tables.is(want) {
        // (set_tables checks it too.) An encrypted network must never run unguarded for long.
        if let Err(e) = inner.overlay.check_guard().await {
            tracing::warn!(error = %e, "the encrypted networks' cleartext guard");
        }
        return true;
    }
    match inner.overlay.set_tables(want.clone()).await {
        Ok(_) => {
            lock(&inner.local).tables.set(want.clone());
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "programming the overlay");
            false
        }
    }
}

/// The routing mesh: each service that publishes ports with its backends.
fn mesh(inner: &Arc<Inner>, d: &DesiredDataPlane) {
    for (name, (spec, backends)) in &d.mesh {
        let want = (spec.clone(), backends.clone());
        if lock(&inner.local).mesh.is(name, &want) {
            continue;
        }
        match inner.mesh.set_service(spec.clone(), backends.clone()) {
            Ok(()) => {
                tracing::debug!(
                    service = %name,
                    backends = ?backends.iter().map(|b| (&b.id, b.state)).collect::<Vec<_>>(),
                    "mesh backends"
                );
                lock(&inner.local).mesh.set(name.clone(), want);
            }
            Err(e) => tracing::warn!(service = %name, error = %e, "publishing ports"),
        }
    }
    let stale = lock(&inner.local).mesh.stale(&d.mesh);
    for name in stale {
        let _ = inner.mesh.remove_service(&name);
        lock(&inner.local).mesh.remove(&name);
    }
}

/// East-west VIP rules inside each local running task; adopted tasks' rules stay as the
/// earlier run left them while the projection holds them.
async fn vips(inner: &Arc<Inner>, d: &DesiredDataPlane) {
    if !d.hold_vips {
        lock(&inner.local).held_vips.clear();
    }
    for (id, rules) in &d.vips {
        if lock(&inner.local).vips.is(id, rules) {
            continue;
        }
        let ns = match cni::netns(inner, id) {
            Some(ns) => ns,
            None => match inner.runtime.netns(id) {
                Ok(ns) => Arc::new(ns),
                Err(_) => continue,
            },
        };
        if let Err(e) = tasks::install_vips(inner, id, ns, rules.clone()).await {
            tracing::warn!(task = %id, error = %format!("{e:#}"), "installing service VIPs");
        }
    }
}
