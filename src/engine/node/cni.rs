//! Containers a CNI runtime attaches (`shoal cni`, through `api::cni`): the node's half.
//!
//! Such a container is a standalone task record whose `cni` field names the runtime's network
//! namespace; the leader gives it its address like any standalone task. It has no process of
//! ours, so the runtime never hears of it: this module attaches its namespace (overlay
//! endpoint, DNS at 127.0.0.11) and hands the pass a running status for it, and from there
//! the pass treats it as a task: it reports it, publishes its endpoint to gossip (its name in
//! every node's DNS) and writes its VIP rules. Attaching is level-triggered like the rest of
//! the pass: an agent restarted, or crashed halfway through an ADD, attaches again what the
//! store still holds, and drops a record whose namespace is gone.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use shoal_cluster::model::{ClusterState, NetworkRecord};
use shoal_dns as dns;
use shoal_netns::NetNs;
use shoal_runtime as rt;
use shoal_scheduler::DesiredState;
use shoal_vxlan as vx;

use super::tasks::detach;
use super::{Inner, NodeEngine, lock};
use crate::engine::records::{self, TaskRecord};

/// A container attached here: its namespace, held open.
pub(super) struct Attached {
    ns: Arc<NetNs>,
    since: SystemTime,
}

/// Where ADD's attachment stands on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CniState {
    /// Not attached yet: the address or the node's pass is still to come.
    Pending,
    /// Attached: its interface, address and DNS listener are in its namespace.
    Attached,
    /// The attachment failed; the message says why.
    Failed(String),
}

/// The namespace of an attached container.
pub(super) fn netns(inner: &Inner, id: &str) -> Option<Arc<NetNs>> {
    lock(&inner.local).cni.get(id).map(|a| a.ns.clone())
}

/// A running status for each attached container, so the pass reports it, publishes it and
/// writes its VIP rules as it does for a task of the runtime.
pub(super) fn statuses(inner: &Inner) -> Vec<rt::TaskStatus> {
    let l = lock(&inner.local);
    l.cni
        .iter()
        .map(|(id, a)| rt::TaskStatus {
            id: id.clone(),
            name: String::new(),
            netns: a.ns.name().to_owned(),
            state: rt::TaskState::Running,
            health: None,
            failing_streak: 0,
            last_probe_output: None,
            pid: None,
            exit_code: None,
            error: None,
            addresses: Vec::new(),
            created_at: a.since,
            started_at: Some(a.since),
            finished_at: None,
        })
        .collect()
}

/// Attaches this node's containers that the store holds and that are not attached yet, and
/// lets go of those it no longer wants running.
pub(super) fn reconcile(
    inner: &Arc<Inner>,
    state: &ClusterState,
    mine: &BTreeMap<&String, &TaskRecord>,
) {
    for (id, t) in mine {
        let Some(cni) = t.cni() else { continue };
        let (busy, attached, failed) = {
            let l = lock(&inner.local);
            (l.busy.contains(*id), l.cni.contains_key(*id), l.errors.contains_key(*id))
        };
        if busy {
            continue;
        }
        if attached && t.task.desired != DesiredState::Running {
            release(inner, id);
        } else if !attached && !failed && t.task.desired == DesiredState::Running && t.addressed() {
            let nets = super::tasks::networks_of(state, t);
            lock(&inner.local).busy.insert((*id).clone());
            let (inner, t, cni) = (inner.clone(), (*t).clone(), cni.clone());
            tokio::spawn(async move {
                let id = t.task.id.clone();
                match attach(&inner, &t, &cni, &nets).await {
                    Ok(()) => {}
                    Err(e) if !shoal_netns::path_of(&cni.netns).exists() => {
                        // The container went while nobody told us (its runtime's DEL never
                        // reached us): nothing is left to attach, so the record goes too.
                        tracing::info!(task = %id, error = %format!("{e:#}"), "forgetting a CNI container whose namespace is gone");
                        detach(&inner, &id).await;
                        if let Err(e) = inner.cluster.put_standalone(&id, None).await {
                            tracing::warn!(task = %id, error = %e, "removing a CNI container's record");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(task = %id, error = %format!("{e:#}"), "attaching a CNI container");
                        lock(&inner.local).errors.insert(id.clone(), format!("{e:#}"));
                        detach(&inner, &id).await;
                    }
                }
                lock(&inner.local).busy.remove(&id);
                inner.kick.notify_one();
            });
        }
    }
}

/// Lets go of an attached container in the background (the pass's way).
pub(super) fn release(inner: &Arc<Inner>, id: &str) {
    lock(&inner.local).busy.insert(id.to_owned());
    let (inner, id) = (inner.clone(), id.to_owned());
    tokio::spawn(async move {
        withdraw(&inner, &id).await;
        lock(&inner.local).busy.remove(&id);
        inner.kick.notify_one();
    });
}

/// Takes out of the container's namespace what we put there and withdraws its endpoints from
/// gossip at once, so every node drops its DNS name within a gossip round.
async fn withdraw(inner: &Arc<Inner>, id: &str) {
    lock(&inner.local).cni.remove(id);
    let keys: Vec<shoal_gossip::EntryKey> =
        lock(&inner.local).published.keys().filter(|k| k.key == id).cloned().collect();
    for k in keys {
        if let Err(e) = inner.gossip.delete(k.clone()).await {
            tracing::debug!(task = id, error = %e, "withdrawing a CNI container's endpoint");
        }
        lock(&inner.local).published.remove(&k);
    }
    detach(inner, id).await;
    lock(&inner.local).errors.remove(id);
}

async fn attach(
    inner: &Arc<Inner>,
    t: &TaskRecord,
    cni: &records::CniAttachment,
    nets: &[NetworkRecord],
) -> anyhow::Result<()> {
    let id = &t.task.id;
    let ns = NetNs::open(&cni.netns)
        .with_context(|| format!("opening the container's namespace {}", cni.netns))?;
    let nl = ns.netlink()?;
    let lo =
        shoal_netns::link_index(&nl, "lo").await.context("the container's namespace has no lo")?;
    nl.link()
        .set(rtnetlink::LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .context("setting lo up in the container's namespace")?;
    // From here on the container has things of ours in its namespace: `detach` takes them out.
    lock(&inner.local).attached.insert(id.clone(), Vec::new());
    let mut attached = Vec::new();
    for n in nets {
        let spec = records::overlay_spec(n).context("an IPv6 network")?;
        let ip = t.addresses[&n.id];
        let ep = vx::EndpointSpec { id, task: &ns, ip, ifname: Some(&cni.ifname) };
        inner
            .overlay
            .attach(&spec, &ep)
            .await
            .with_context(|| format!("attaching to {}", n.name))?;
        attached.push(n.id.clone());
        lock(&inner.local).attached.insert(id.clone(), attached.clone());
    }
    // A listener left by an attempt that failed later would block this one.
    let _ = inner.dns.detach(id).await;
    let scope = dns::Scope::new(nets.iter().filter(|n| !n.ingress).map(|n| n.id.as_str()));
    inner.dns.attach_netns(id, &ns, scope).await?;
    let since = SystemTime::now();
    lock(&inner.local).cni.insert(id.clone(), Attached { ns: Arc::new(ns), since });
    inner.starts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

impl NodeEngine {
    /// Where the attachment of the CNI container with task id `id` stands here.
    pub fn cni_state(&self, id: &str) -> CniState {
        let l = lock(&self.inner.local);
        if l.cni.contains_key(id) && !l.busy.contains(id) {
            CniState::Attached
        } else if let Some(e) = l.errors.get(id) {
            CniState::Failed(e.clone())
        } else {
            CniState::Pending
        }
    }

    /// Lets go of the CNI container with task id `id` now (DEL): its endpoints leave gossip
    /// and its interface and DNS listener leave its namespace. The caller then removes the
    /// record; until the store says it is gone, the pass does not attach it again.
    pub async fn cni_release(&self, id: &str) {
        let inner = &self.inner;
        lock(&inner.local).busy.insert(id.to_owned());
        withdraw(inner, id).await;
    }

    /// Ends what `cni_release` began, once the record is gone (or could not be removed).
    pub fn cni_released(&self, id: &str) {
        lock(&self.inner.local).busy.remove(id);
        self.kick();
    }

    /// CHECK: whether the container's namespace still holds the interface ADD gave it, with
    /// its address, and this node still serves it.
    pub async fn cni_check(&self, id: &str, ifname: &str, ip: Ipv4Addr) -> Result<(), String> {
        let Some(ns) = netns(&self.inner, id) else {
            return Err("the container is not attached on this node".into());
        };
        let nl = ns.netlink().map_err(|e| e.to_string())?;
        let Some(index) = shoal_netns::link_index(&nl, ifname).await else {
            return Err(format!("interface {ifname} is gone from the container's namespace"));
        };
        use futures::TryStreamExt;
        let mut addrs = nl.address().get().set_link_index_filter(index).execute();
        while let Some(m) = addrs.try_next().await.map_err(|e| e.to_string())? {
            use rtnetlink::packet_route::address::AddressAttribute;
            let has = m.attributes.iter().any(
                |a| matches!(a, AddressAttribute::Address(std::net::IpAddr::V4(v)) if *v == ip),
            );
            if has {
                return Ok(());
            }
        }
        Err(format!("interface {ifname} lost its address {ip}"))
    }
}
