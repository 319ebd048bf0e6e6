//! The node's tasks, one at a time: start (announced to every node before its process runs),
//! take up again after an agent restart, stop (withdrawn from every node's traffic first),
//! detach, and the probes that tell when a task's published ports accept connections. The
//! pass decides which tasks get which action (`project::TaskPlan`); each runs here, marked busy
//! until it is done.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_cluster::model::{ClusterState, NetworkRecord};
use shoal_dns as dns;
use shoal_gossip::EntryKey;
use shoal_netns::NetNs;
use shoal_runtime as rt;
use shoal_vip::VipRule;
use shoal_vxlan as vx;

use super::project::{self, TaskPlan, VipRules};
use super::{Inner, cni, confirm, lock};
use crate::engine::records::{self, EndpointRecord, Service, TaskRecord};
use crate::engine::trust;

/// Runs the pass's task actions: starts and stops in the background (each task busy until it
/// is done), detaching ended tasks before the data path is applied.
pub(super) async fn apply(
    inner: &Arc<Inner>,
    state: &ClusterState,
    services: &BTreeMap<String, Arc<Service>>,
    tasks: &BTreeMap<String, Arc<TaskRecord>>,
    plan: &TaskPlan,
) {
    for id in &plan.start {
        let Some(t) = tasks.get(id) else { continue };
        let svc = services.get(&t.task.service_id).cloned();
        let nets = networks_of(state, t);
        lock(&inner.local).busy.insert(id.clone());
        let (inner, t) = (inner.clone(), t.clone());
        tokio::spawn(async move {
            let id = t.task.id.clone();
            if let Err(e) = start_task(&inner, &t, svc.as_deref(), &nets).await {
                tracing::warn!(task = %id, error = %format!("{e:#}"), "starting a task");
                lock(&inner.local).errors.insert(id.clone(), format!("{e:#}"));
                if inner.runtime.inspect(&id).is_ok_and(|s| !s.state.is_terminal()) {
                    let _ = inner.runtime.stop(&id, Some(Duration::ZERO)).await;
                }
            }
            lock(&inner.local).busy.remove(&id);
            inner.kick.notify_one();
        });
    }
    for (id, grace) in &plan.stop {
        stop_task(inner, id, *grace, false);
    }
    for id in &plan.release {
        cni::release(inner, id);
    }
    for id in &plan.remove {
        stop_task(inner, id, rt::DEFAULT_STOP_GRACE, true);
    }
    for id in &plan.detach {
        detach(inner, id).await;
    }
}

/// Tasks an earlier run started: take them up again where the store still wants them.
pub(super) fn take_up_adopted(
    inner: &Arc<Inner>,
    state: &ClusterState,
    mine: &BTreeMap<&String, &TaskRecord>,
) {
    let adopted: Vec<String> =
        std::mem::take(&mut lock(&inner.local).adopted).into_iter().collect();
    for id in adopted {
        let Some(t) = mine.get(&id) else {
            // Forgotten by the store: removed like any unknown task; its endpoints are on
            // networks we no longer know it by, so each one is asked to let it go.
            let all = state.networks.keys().cloned().collect();
            lock(&inner.local).attached.insert(id, all);
            continue;
        };
        let nets = networks_of(state, t);
        lock(&inner.local).busy.insert(id.clone());
        let (inner, t) = (inner.clone(), (*t).clone());
        tokio::spawn(async move {
            if let Err(e) = readopt_task(&inner, &t, &nets).await {
                tracing::warn!(task = %id, error = %format!("{e:#}"), "taking up an adopted task");
            }
            lock(&inner.local).busy.remove(&id);
            inner.kick.notify_one();
        });
    }
}

fn runtime_spec(t: &TaskRecord, svc: Option<&Service>) -> rt::TaskSpec {
    let (argv, env, workdir) = match (&t.standalone, svc) {
        (Some(s), _) => (s.argv.clone(), s.env.clone(), None),
        (None, Some(s)) => (s.argv.clone(), s.env.clone(), s.workdir.clone()),
        (None, None) => (Vec::new(), Vec::new(), None),
    };
    let mut spec = rt::TaskSpec::new(t.task.id.clone(), argv);
    spec.name = t.display_name(svc);
    spec.env = env;
    spec.workdir = workdir.map(Into::into);
    spec.addresses = t.addresses.values().map(|ip| IpAddr::V4(*ip)).collect();
    if let Some(s) = svc {
        spec.stop_grace = Duration::from_millis(s.stop_grace_ms);
        if let Some(sig) = &s.stop_signal {
            spec.stop_signal = sig.clone();
        }
        if let Some(h) = &s.health {
            let mut hc = rt::HealthCheck::shell(&h.cmd);
            hc.interval = Duration::from_millis(h.interval_ms);
            hc.timeout = Duration::from_millis(h.timeout_ms);
            hc.retries = h.retries;
            spec.health = Some(hc);
        }
    }
    spec
}

async fn start_task(
    inner: &Arc<Inner>,
    t: &TaskRecord,
    svc: Option<&Service>,
    nets: &[NetworkRecord],
) -> anyhow::Result<()> {
    let id = &t.task.id;
    let mut spec = runtime_spec(t, svc);
    let mounts = t.standalone.as_ref().map(|s| &s.mounts).or(svc.map(|s| &s.mounts));
    for m in mounts.into_iter().flatten() {
        spec.mounts.push(crate::mounts::resolve(m, &inner.volumes).map_err(anyhow::Error::msg)?);
    }
    let t0 = std::time::Instant::now();
    // The other nodes learn the task while its namespace is made (its entries stay while it is
    // busy starting; a failed start leaves them to the next pass to delete).
    let announced = announce(inner, t).await;
    inner.runtime.create(spec).await?;
    let ns = inner.runtime.netns(id)?;
    // From here on the task has things of ours in its namespace: `detach` takes them out.
    lock(&inner.local).attached.insert(id.clone(), Vec::new());
    let mut attached = Vec::new();
    for n in nets {
        let spec = records::overlay_spec(n).context("an IPv6 network")?;
        let ip = t.addresses[&n.id];
        let ep = vx::EndpointSpec { id, task: &ns, ip, ifname: None };
        inner
            .overlay
            .attach(&spec, &ep)
            .await
            .with_context(|| format!("attaching to {}", n.name))?;
        attached.push(n.id.clone());
        lock(&inner.local).attached.insert(id.clone(), attached.clone());
    }
    let scope = dns::Scope::new(nets.iter().filter(|n| !n.ingress).map(|n| n.id.as_str()));
    inner.dns.attach_netns(id, &ns, scope).await?;
    // The process's first instant already reaches every service VIP of its networks: the
    // rules go in now rather than on the first pass that sees it running.
    let state = inner.store.borrow().clone();
    if let Some(state) = state {
        let eps = trust::verify(&state, &inner.gossip.snapshot(), inner.tunnels).endpoints;
        let table = project::vip_table(&state, records::services(&state), &eps);
        let rules = project::vip_rules(&table, &attached);
        if !rules.is_empty() {
            install_vips(inner, id, Arc::new(inner.runtime.netns(id)?), rules)
                .await
                .context("installing service VIPs")?;
        }
        // Its replies to the mesh's clients find their way back from the first connection: a
        // node's kernel path may send it a flow as soon as it serves.
        if let Some(ingress) = records::ingress(&state).filter(|n| attached.contains(&n.id)) {
            let sandboxes = project::sandboxes(&eps, &ingress.id);
            shoal_return::apply_task(&ns, &sandboxes).await.context("steering mesh replies")?;
            lock(&inner.local).returns.set(id.clone(), sandboxes);
        }
    }
    let prepared = t0.elapsed();
    let waited = match announced {
        true => wait_confirmed(inner, confirm::Change::Announced(id), ANNOUNCE_TIMEOUT).await,
        false => Duration::ZERO,
    };
    inner.runtime.start(id).await?;
    tracing::debug!(
        task = %id,
        prepared_ms = prepared.as_millis(),
        announce_wait_ms = waited.as_millis(),
        total_ms = t0.elapsed().as_millis(),
        "task started"
    );
    inner.starts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Restores what a task an earlier run started had of ours: its endpoints (the overlay adopted
/// them; attaching again only confirms them, or rebuilds one that went missing), the record of
/// its networks, and its DNS listener at 127.0.0.11 (which lived in the old process). A task
/// that ended meanwhile only gets the record, so the next pass releases its namespace.
async fn readopt_task(
    inner: &Arc<Inner>,
    t: &TaskRecord,
    nets: &[NetworkRecord],
) -> anyhow::Result<()> {
    let id = &t.task.id;
    let ids: Vec<String> = nets.iter().map(|n| n.id.clone()).collect();
    lock(&inner.local).attached.insert(id.clone(), ids);
    if inner.runtime.inspect(id)?.state != rt::TaskState::Running {
        return Ok(());
    }
    let ns = inner.runtime.netns(id)?;
    for n in nets {
        let spec = records::overlay_spec(n).context("an IPv6 network")?;
        let Some(&ip) = t.addresses.get(&n.id) else { continue };
        let ep = vx::EndpointSpec { id, task: &ns, ip, ifname: None };
        inner
            .overlay
            .attach(&spec, &ep)
            .await
            .with_context(|| format!("attaching to {}", n.name))?;
    }
    let scope = dns::Scope::new(nets.iter().filter(|n| !n.ingress).map(|n| n.id.as_str()));
    inner.dns.attach_netns(id, &ns, scope).await?;
    Ok(())
}

pub(super) async fn detach(inner: &Arc<Inner>, id: &str) {
    let nets = lock(&inner.local).attached.remove(id).unwrap_or_default();
    for n in nets {
        if let Err(e) = inner.overlay.detach(&n, id).await {
            tracing::debug!(task = id, network = %n, error = %e, "detaching");
        }
    }
    let _ = inner.dns.detach(id).await;
    lock(&inner.local).vips.remove(id);
    lock(&inner.local).returns.remove(id);
    lock(&inner.local).ready.remove(id);
    // Nothing of ours is left in an ended task's namespace: it goes (its logs stay). One
    // still running (its stop failed) keeps it until it is removed; one gone has none.
    match inner.runtime.release_netns(id).await {
        Ok(()) | Err(rt::Error::InvalidState { .. } | rt::Error::NotFound(_)) => {}
        Err(e) => tracing::warn!(task = id, error = %e, "deleting the namespace of an ended task"),
    }
}

/// The longest a stopping task stays up after it was marked not serving, waiting for every
/// node to confirm it took the task out of its mesh, DNS and VIP rules (`confirm`) before the
/// process is asked to stop. Usually a few gossip rounds (200 ms each) and a pass; the bound
/// leaves room for a busy machine, since a node that applies the withdrawal late still sends
/// the task new connections, which a stopping server drops.
pub(super) const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops a task in Docker's order, after taking it out of service: its endpoints are marked
/// not serving (so every node's mesh, DNS and VIPs drop it), then, once every node confirmed
/// that (waiting at most [`WITHDRAW_TIMEOUT`], and never more than the grace), its stop signal,
/// and SIGKILL once `grace` has passed; then its endpoints leave gossip.
pub(super) fn stop_task(inner: &Arc<Inner>, id: &str, grace: Duration, remove: bool) {
    lock(&inner.local).busy.insert(id.to_owned());
    let (inner, id) = (inner.clone(), id.to_owned());
    tokio::spawn(async move {
        if inner.runtime.inspect(&id).is_ok_and(|s| !s.state.is_terminal()) {
            let waited = withdraw(&inner, &id, WITHDRAW_TIMEOUT.min(grace)).await;
            if let Err(e) = inner.runtime.stop(&id, Some(grace.saturating_sub(waited))).await {
                tracing::warn!(task = %id, error = %e, "stopping a task");
            }
        }
        unpublish(&inner, &id).await;
        detach(&inner, &id).await;
        if remove {
            if let Err(e) = inner.runtime.remove(&id).await {
                tracing::warn!(task = %id, error = %e, "removing a task");
            }
            lock(&inner.local).errors.remove(&id);
        }
        lock(&inner.local).busy.remove(&id);
        inner.kick.notify_one();
    });
}

/// Takes a task out of service and waits up to `timeout` for every node to apply that; returns
/// how long it waited. Its endpoints stay in gossip, marked not serving: meshes, DNS and VIPs
/// send it nothing new, while every node's forwarding tables keep reaching it, so connections
/// already on their way (a handshake, a request not yet read) finish. [`unpublish`] takes the
/// endpoints out once the process has stopped. A task with nothing published has nothing to
/// wait for.
async fn withdraw(inner: &Arc<Inner>, id: &str, timeout: Duration) -> Duration {
    let entries: Vec<(EntryKey, EndpointRecord)> = lock(&inner.local)
        .published
        .iter()
        .filter(|(_, e)| e.task == id)
        .map(|(k, e)| (k.clone(), e.clone()))
        .collect();
    if entries.is_empty() {
        return Duration::ZERO;
    }
    for (k, rec) in entries.into_iter().filter(|(_, e)| e.serving) {
        let rec = EndpointRecord { serving: false, ..rec };
        let Ok(bytes) = serde_json::to_vec(&rec) else { continue };
        match inner.gossip.write(k.clone(), bytes).await {
            Ok(()) => {
                lock(&inner.local).published.set(k, rec);
            }
            Err(e) => tracing::debug!(task = id, key = ?k, error = %e, "withdrawing an endpoint"),
        }
    }
    // This node's own mesh, DNS and VIP rules follow on the next pass.
    inner.kick.notify_one();
    let waited = wait_confirmed(inner, confirm::Change::Withdrawn(id), timeout).await;
    tracing::debug!(task = id, waited_ms = waited.as_millis(), "task withdrawn");
    waited
}

/// Deletes a stopped task's endpoints from gossip (and so from every node's tables).
async fn unpublish(inner: &Arc<Inner>, id: &str) {
    let keys: Vec<EntryKey> = lock(&inner.local)
        .published
        .iter()
        .filter(|(_, e)| e.task == id)
        .map(|(k, _)| k.clone())
        .collect();
    for k in keys {
        if let Err(e) = inner.gossip.delete(k.clone()).await {
            tracing::debug!(task = id, key = ?k, error = %e, "deleting an endpoint");
        }
        lock(&inner.local).published.remove(&k);
    }
}

/// Tries, from inside each running task's namespace, the published ports of the tasks that
/// wait for them; a task whose every port accepts a connection is ready (serving from the next
/// pass on). Without this a task would get traffic from its first instant, before its
/// program listens.
pub(super) fn readiness(
    inner: &Arc<Inner>,
    services: &BTreeMap<String, Arc<Service>>,
    mine: &BTreeMap<&String, &TaskRecord>,
    statuses: &BTreeMap<String, rt::TaskStatus>,
) {
    for (id, t) in mine {
        let running = statuses.get(*id).is_some_and(|s| s.state == rt::TaskState::Running);
        let ports = project::awaited_ports(services.get(&t.task.service_id).map(Arc::as_ref));
        {
            let mut l = lock(&inner.local);
            if !running {
                l.ready.remove(*id);
            }
            let nothing_to_try = ports.is_empty() || t.addresses.is_empty();
            if !running || nothing_to_try || l.ready.contains(*id) || l.probing.contains(*id) {
                continue;
            }
            l.probing.insert((*id).clone());
        }
        let Ok(ns) = inner.runtime.netns(id) else {
            lock(&inner.local).probing.remove(*id);
            continue;
        };
        // Its own addresses, where the meshes and VIPs will send traffic.
        let addrs: Vec<Ipv4Addr> = t.addresses.values().copied().collect();
        let (inner, id) = (inner.clone(), (*id).clone());
        tokio::spawn(async move {
            let accepts = tokio::task::spawn_blocking(move || {
                ns.run(|| {
                    ports.iter().all(|&p| {
                        addrs.iter().any(|&ip| {
                            let to = std::net::SocketAddr::from((ip, p));
                            std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500))
                                .is_ok()
                        })
                    })
                })
                .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            let mut l = lock(&inner.local);
            l.probing.remove(&id);
            if accepts {
                l.ready.insert(id);
                drop(l);
                inner.kick.notify_one();
            }
        });
    }
}

/// The longest a new task's process waits for every node to confirm it knows the task's
/// endpoints (`confirm`): a gossip round or two (200 ms each) and the other nodes' passes that
/// put it in their forwarding tables, so the answers to its first packets find their way back.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(1);

/// Publishes a task about to start as not serving (forwarding tables learn it; meshes, DNS and
/// VIPs send it nothing yet). Returns whether there was anything to announce.
async fn announce(inner: &Arc<Inner>, t: &TaskRecord) -> bool {
    let records = project::endpoint_records(&inner.me, t, false);
    if records.is_empty() {
        return false;
    }
    for (k, v) in records {
        let Ok(bytes) = serde_json::to_vec(&v) else { continue };
        match inner.gossip.write(k.clone(), bytes).await {
            Ok(_) => {
                lock(&inner.local).published.set(k, v);
            }
            Err(e) => tracing::debug!(key = ?k, error = %e, "announcing an endpoint"),
        }
    }
    true
}

/// Waits until every live node has applied `change`, at most `timeout`; without an ingress
/// network to keep the records in, the whole `timeout`. Returns how long it waited.
pub(super) async fn wait_confirmed(
    inner: &Arc<Inner>,
    change: confirm::Change<'_>,
    timeout: Duration,
) -> Duration {
    let state = inner.store.borrow().clone();
    match state.as_deref().and_then(records::ingress).map(|n| n.id.clone()) {
        Some(network) => confirm::wait(inner, &network, change, timeout).await,
        None => {
            tokio::time::sleep(timeout).await;
            timeout
        }
    }
}

/// Writes a task's VIP rules into its namespace and records them.
pub(super) async fn install_vips(
    inner: &Arc<Inner>,
    id: &str,
    ns: Arc<NetNs>,
    rules: VipRules,
) -> anyhow::Result<()> {
    let vip_rules: Vec<VipRule> =
        rules.iter().map(|(vip, b)| VipRule { vip: *vip, backends: b.clone() }).collect();
    tokio::task::spawn_blocking(move || shoal_vip::apply(&ns, &vip_rules)).await??;
    lock(&inner.local).vips.set(id.to_owned(), rules);
    Ok(())
}

/// The records of the networks a task is attached to, as the store has them.
pub(super) fn networks_of(state: &ClusterState, t: &TaskRecord) -> Vec<NetworkRecord> {
    t.networks.iter().filter_map(|n| state.networks.get(n)).map(|n| (**n).clone()).collect()
}
