//! Every node's half of the engine: run the tasks the store assigns here, tell the leader how
//! they are doing, publish them to gossip, and program the data path from what gossip says.
//!
//! One reconcile pass is a function of three views — the store (polled from the leader), the
//! gossip snapshot and the local runtime — and is re-run whenever any of them changes and once a
//! second. It is level-triggered: a report or a gossip write that was lost is made again by the
//! next pass, and a restart of the agent converges from whatever it finds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use shoal_cluster::model::{ClusterState, NetworkRecord, now_ms};
use shoal_cluster::{Cluster, NodeRequest};
use shoal_dns as dns;
use shoal_gossip::{EntryKey, Gossip};
use shoal_ingress as ing;
use shoal_netns::NetNs;
use shoal_runtime::{self as rt, Runtime};
use shoal_scheduler::{DesiredState, TaskState};
use shoal_vip::VipRule;
use shoal_vxlan::{self as vx, Overlay};
use tokio::sync::{Notify, watch};

mod client_addr;
mod confirm;
mod kernel_mesh;

use super::records::{self, ENDPOINT_TABLE, EndpointRecord, Service, TaskRecord};
use super::trust;
use crate::config::AgentConfig;
use crate::volumes::Volumes;

mod cni;
pub use cni::CniState;

/// The node engine's parts; cheap to clone.
#[derive(Clone)]
pub struct NodeEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEngine").field("node", &self.inner.me).finish()
    }
}

struct Inner {
    me: String,
    /// The WireGuard tunnel range: a peer's tunnel address is this plus its data address's bits.
    tunnels: ipnet::Ipv4Net,
    cluster: Cluster,
    gossip: Arc<Gossip>,
    runtime: Runtime,
    overlay: Overlay,
    dns: dns::DnsService,
    mesh: ing::Mesh,
    sandbox: Arc<NetNs>,
    /// This node's named volumes, which tasks' `--mount type=volume` name.
    volumes: Volumes,
    store: watch::Sender<Option<Arc<ClusterState>>>,
    kick: Notify,
    local: Mutex<Local>,
    /// Serialises passes.
    pass: tokio::sync::Mutex<()>,
    /// Tasks started and tasks failed on this node, for `/metrics`.
    starts: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU64,
}

/// What this node has done, so a pass changes only what differs.
#[derive(Default)]
struct Local {
    /// Tasks with a start or stop in flight.
    busy: BTreeSet<String>,
    /// Tasks with things of ours in their namespace (DNS, endpoints): the networks they are on.
    attached: BTreeMap<String, Vec<String>>,
    /// Why a task could not be started.
    errors: BTreeMap<String, String>,
    /// Running tasks without a health command whose published TCP ports accept connections:
    /// only then are they serving (see [`readiness`]).
    ready: BTreeSet<String>,
    /// Tasks whose ports are being tried now.
    probing: BTreeSet<String>,
    /// Tasks an earlier run of the agent started, not yet taken up again by a pass (their DNS
    /// listener and the record of their networks are ours to restore).
    adopted: BTreeSet<String>,
    /// Adopted tasks whose VIP rules (installed by the earlier run) are left alone until
    /// gossip has caught up with the other nodes' endpoints: a view of only some backends
    /// would narrow the rules that still work.
    held_vips: BTreeSet<String>,
    /// When to stop waiting for gossip to catch up, whatever it holds by then.
    held_until: Option<std::time::Instant>,
    /// Our entries in the gossip endpoint tables.
    published: BTreeMap<EntryKey, EndpointRecord>,
    /// VIP rules installed per task.
    vips: BTreeMap<String, Vec<(Ipv4Addr, Vec<Ipv4Addr>)>>,
    /// The ingress sandboxes each task sends mesh replies back through.
    returns: BTreeMap<String, Vec<Ipv4Addr>>,
    mesh: BTreeMap<String, (ing::ServiceSpec, Vec<ing::BackendSpec>)>,
    /// The mesh's kernel path (`kernel_mesh`).
    kernel: kernel_mesh::State,
    dns: Option<dns::ClusterRecords>,
    tables: Option<vx::Tables>,
    sandbox_ip: Option<Ipv4Addr>,
    networks: BTreeSet<String>,
    /// Containers a CNI runtime attached here (see `cni`).
    cni: BTreeMap<String, cni::Attached>,
    /// Gossip claims the store contradicted in the last pass, and how many were dropped so far
    /// by kind (`trust`).
    claims_seen: BTreeSet<trust::Dropped>,
    claims_dropped: BTreeMap<&'static str, u64>,
    /// Changes of our tasks we wait on every node to apply (`confirm`).
    waiting: BTreeSet<String>,
    /// Our record in the gossip table of applied changes, and the network it is in.
    applied: Option<(String, confirm::Applied)>,
}

/// How long a restarted agent waits at most for gossip to show the other nodes' endpoints
/// before it rewrites the VIP rules of the tasks it adopted.
const GOSSIP_CATCH_UP: Duration = Duration::from_secs(10);

fn lock(m: &Mutex<Local>) -> std::sync::MutexGuard<'_, Local> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node's WireGuard key, made once and kept in the data directory.
pub(crate) fn node_key(data_dir: &Path) -> anyhow::Result<vx::NodeKey> {
    let path = data_dir.join("overlay.key");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let bytes: [u8; 32] = hex::decode(s.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
            Ok(vx::NodeKey::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = vx::NodeKey::generate()?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            writeln!(f, "{}", hex::encode(key.to_bytes()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl NodeEngine {
    /// Starts the runtime, the overlay, DNS and the mesh of this node and the loops that drive
    /// them. What an earlier run left is taken over, not rebuilt: its tasks keep running
    /// (adopted by the runtime), the overlay adopts its sandboxes and endpoints, and the
    /// ingress sandbox is reused, so traffic through them never stops; leftovers that no task
    /// owns are deleted.
    pub async fn start(
        cfg: &AgentConfig,
        cluster: Cluster,
        gossip: Arc<Gossip>,
    ) -> anyhow::Result<NodeEngine> {
        let me = cluster.info().node.to_string();
        let prefix = cfg.netns_prefix.clone();
        let runtime = Runtime::new(rt::RuntimeConfig {
            prefix: prefix.clone(),
            state_dir: cfg.data_dir.join("runtime"),
            // Each task's supervisor is this binary (`shoal task-shim`); the link stays valid
            // when an upgrade replaces the file.
            shim: "/proc/self/exe".into(),
        })?;
        let adopted = runtime.adopt().await?;
        if !adopted.is_empty() {
            tracing::info!(count = adopted.len(), "adopted the tasks of an earlier run");
        }
        // The swarm's data-path address and port (`swarm init/join --data-path-addr`, `swarm
        // init --data-path-port`), not the agent's: every node sends VXLAN to each peer's
        // data-path address on the swarm's one port.
        let info = cluster.info();
        let IpAddr::V4(underlay) = info.data_addr else {
            anyhow::bail!("the overlay needs an IPv4 data-path address, not {}", info.data_addr);
        };
        let tunnels = cfg.wireguard_tunnel_prefix;
        anyhow::ensure!(
            !tunnels.contains(&underlay),
            "the data-path address {underlay} is inside the WireGuard tunnel range {tunnels} (wireguard_tunnel_prefix)"
        );
        let mut ocfg = vx::OverlayConfig::new(me.clone(), underlay);
        ocfg.name_prefix = format!("{prefix}-");
        ocfg.data_port = info.data_path_port;
        let mut enc = vx::EncryptionConfig::new(node_key(&cfg.data_dir)?, underlay);
        enc.port = cfg.wireguard_port;
        enc.tunnel_addr = vx::tunnel_addr(tunnels, underlay);
        enc.tunnel_prefix = tunnels.prefix_len();
        ocfg.encryption = Some(enc);
        let overlay =
            Overlay::new(vx::NodeNs::Current, ocfg).await.context("starting the overlay")?;
        // From here on a failure takes down what was made, so a node that cannot start keeps
        // no half of a data path.
        let (sandbox, dns, mesh) = match start_services(cfg).await {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(e) = overlay.shutdown().await {
                    tracing::warn!(error = %e, "taking the overlay down after a failed start");
                }
                return Err(e);
            }
        };
        let inner = Arc::new(Inner {
            me,
            tunnels,
            cluster,
            gossip,
            runtime,
            overlay,
            dns,
            mesh,
            sandbox,
            volumes: Volumes::new(&cfg.data_dir, &cfg.node_name),
            store: watch::channel(None).0,
            kick: Notify::new(),
            local: Mutex::new(Local {
                held_vips: adopted.iter().map(|s| s.id.clone()).collect(),
                // They served under the earlier run: an agent restart must not take them out
                // of DNS and VIPs until their ports are tried again.
                ready: adopted.iter().map(|s| s.id.clone()).collect(),
                held_until: Some(std::time::Instant::now() + GOSSIP_CATCH_UP),
                adopted: adopted.into_iter().map(|s| s.id).collect(),
                ..Local::default()
            }),
            pass: tokio::sync::Mutex::new(()),
            starts: Default::default(),
            failures: Default::default(),
        });
        let weak = Arc::downgrade(&inner);
        inner.cluster.set_node_handler(Some(Arc::new(move |req| {
            let inner = weak.upgrade();
            Box::pin(async move {
                match inner {
                    Some(inner) => answer(&inner, req).await,
                    None => Err("this node is leaving the swarm".into()),
                }
            })
        })));
        Ok(NodeEngine { inner })
    }

    /// The loops; they end when the returned handles are aborted.
    pub fn spawn(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut out = Vec::new();
        let inner = self.inner.clone();
        out.push(tokio::spawn(async move {
            // A long poll: the leader answers as soon as the store moves past what we saw.
            let mut seen = 0;
            loop {
                match inner.cluster.task_state_after(seen).await {
                    Ok((index, s)) => {
                        seen = index;
                        let changed = inner.store.send_if_modified(|old| {
                            if old.as_deref() == Some(&s) {
                                false
                            } else {
                                *old = Some(Arc::new(s));
                                true
                            }
                        });
                        if changed {
                            inner.kick.notify_one();
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reading tasks from the managers");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }));
        let inner = self.inner.clone();
        out.push(tokio::spawn(async move {
            let mut rt_events = inner.runtime.subscribe();
            let mut g_events = inner.gossip.subscribe();
            loop {
                tokio::select! {
                    _ = inner.kick.notified() => {}
                    _ = rt_events.recv() => {}
                    _ = g_events.recv() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Err(e) = pass(&inner).await {
                    tracing::warn!(error = %format!("{e:#}"), "node reconcile pass");
                }
            }
        }));
        out
    }

    /// Wakes the reconcile loop (after a local change such as `shoal run`).
    pub fn kick(&self) {
        self.inner.kick.notify_one();
    }

    /// The store as this node last saw it.
    pub fn store(&self) -> Option<Arc<ClusterState>> {
        self.inner.store.borrow().clone()
    }

    /// The local runtime (logs, inspect).
    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    /// Tasks started and failed on this node since the agent started.
    pub fn task_counters(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.inner.starts.load(Relaxed), self.inner.failures.load(Relaxed))
    }

    /// Gossip claims dropped because the store contradicts them, by kind (peer, endpoint).
    pub fn dropped_claims(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.inner.local).claims_dropped.clone()
    }

    /// The local routing mesh (metrics, the visualizer).
    pub fn mesh(&self) -> &ing::Mesh {
        &self.inner.mesh
    }

    /// The local overlay (network inspect).
    pub fn overlay(&self) -> &Overlay {
        &self.inner.overlay
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.me
    }

    /// Stops the engine for an agent restart or upgrade, leaving the node's workloads as they
    /// are: tasks keep running, and their endpoints, VIP rules, the overlay's sandboxes and the
    /// ingress sandbox stay in the kernel for the next run to adopt. Only what lives in this
    /// process goes: the DNS listeners and the mesh's listeners.
    pub async fn stop(self) {
        let inner = &self.inner;
        inner.cluster.set_node_handler(None);
        inner.dns.shutdown().await;
        for s in inner.mesh.services() {
            let _ = inner.mesh.remove_service(&s);
        }
    }

    /// Stops every task, withdraws our gossip entries and takes the data path down (the node
    /// leaves the swarm).
    pub async fn shutdown(self) {
        let inner = &self.inner;
        inner.cluster.set_node_handler(None);
        let published: Vec<EntryKey> = lock(&inner.local).published.keys().cloned().collect();
        for k in published {
            let _ = inner.gossip.delete(k).await;
        }
        if let Err(e) = inner.runtime.remove_all().await {
            tracing::warn!(error = %e, "stopping tasks");
        }
        inner.dns.shutdown().await;
        for s in inner.mesh.services() {
            let _ = inner.mesh.remove_service(&s);
        }
        kernel_mesh::remove().await;
        let _ = NetNs::delete(inner.sandbox.name());
        if let Some(inner) = Arc::into_inner(self.inner)
            && let Err(e) = inner.overlay.shutdown().await
        {
            tracing::warn!(error = %e, "taking the overlay down");
        }
    }
}

/// The ingress sandbox, service DNS and the routing mesh of a starting node, and its WireGuard
/// key in gossip; on an error, whatever of them was made is removed again.
async fn start_services(
    cfg: &AgentConfig,
) -> anyhow::Result<(Arc<NetNs>, dns::DnsService, ing::Mesh)> {
    // A restarted agent keeps the ingress sandbox of its earlier run: the endpoints in it stay,
    // and the mesh listens in it again.
    let sandbox_name = format!("{}-ingress", cfg.netns_prefix);
    let (sandbox, created) = match NetNs::open(&sandbox_name) {
        Ok(ns) => (Arc::new(ns), false),
        Err(_) => (Arc::new(NetNs::create(&sandbox_name)?), true),
    };
    let rest = async {
        let mut dcfg = dns::DnsConfig::default();
        dcfg.forward.resolv_conf = cfg.dns_resolv_conf.clone();
        let dns = dns::DnsService::start(dcfg, dns_metrics().clone())?;
        let more = async {
            let mesh = ing::Mesh::new(ing::MeshConfig {
                ingress_ns: Some(sandbox.clone()),
                ..ing::MeshConfig::default()
            })?;
            // The node's WireGuard public key reaches its peers through its store record,
            // which its heartbeat keeps (`agent::swarm`), read from the same key file as the
            // overlay's.
            anyhow::Ok(mesh)
        };
        match more.await {
            Ok(mesh) => Ok((dns, mesh)),
            Err(e) => {
                dns.shutdown().await;
                Err(e)
            }
        }
    };
    match rest.await {
        Ok((dns, mesh)) => Ok((sandbox, dns, mesh)),
        Err(e) => {
            if created {
                let _ = NetNs::delete(&sandbox_name);
            }
            Err(e)
        }
    }
}

/// The service DNS counters of this agent: one set for its life, so they survive leaving and
/// joining swarms; registered on `/metrics` at start.
pub fn dns_metrics() -> &'static dns::Metrics {
    static METRICS: std::sync::OnceLock<dns::Metrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(dns::Metrics::new)
}

/// What this node tells a manager that asks it directly.
async fn answer(inner: &Inner, req: NodeRequest) -> Result<serde_json::Value, String> {
    match req {
        NodeRequest::TaskLogs { task, since } => {
            let logs = inner.runtime.logs(&task).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({
                "lines": logs.since(since),
                "next": logs.next_seq(),
                "closed": logs.is_closed(),
            }))
        }
        NodeRequest::Diagnostics => Ok(diagnostics(inner).await),
    }
}

/// The node's data path as it is now, for `node inspect --pretty`.
async fn diagnostics(inner: &Inner) -> serde_json::Value {
    let snap = inner.gossip.snapshot();
    let members: Vec<serde_json::Value> = snap
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.meta.as_ref().map(|x| x.name.clone()).unwrap_or_default(),
                "addr": m.id.addr.to_string(),
                "state": format!("{:?}", m.state),
                "incarnation": m.incarnation,
            })
        })
        .collect();
    let (tables, dns_input) = {
        let l = lock(&inner.local);
        (l.tables.clone().unwrap_or_default(), l.dns.clone().unwrap_or_default())
    };
    let networks = inner.overlay.networks().await;
    let store = inner.store.borrow().clone();
    let name_of = |id: &str| {
        store.as_ref().and_then(|s| s.networks.get(id)).map_or(id.to_owned(), |n| n.name.clone())
    };
    let fdb: serde_json::Value = networks
        .iter()
        .map(|n| {
            let remote: Vec<serde_json::Value> = tables
                .endpoints
                .iter()
                .filter(|e| e.network == n.spec.id && e.node != inner.me)
                .map(|e| serde_json::json!({"ip": e.ip, "mac": e.mac.to_string(), "node": e.node}))
                .collect();
            (
                name_of(&n.spec.id),
                serde_json::json!({
                    "vni": n.spec.vni,
                    "subnet": n.spec.subnet,
                    "encrypted": n.spec.encrypted,
                    "local_endpoints": n.endpoints,
                    "remote": remote,
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let mut names: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for svc in &dns_input.services {
        for sn in &svc.networks {
            let per = names.entry(name_of(&sn.network)).or_default();
            let tasks: Vec<String> = svc
                .tasks
                .iter()
                .filter(|t| t.healthy)
                .flat_map(|t| t.attachments.iter().filter(|a| a.network == sn.network))
                .map(|a| a.addr.to_string())
                .collect();
            let own = match sn.vip {
                Some(vip) => vec![vip.to_string()],
                None => tasks.clone(),
            };
            per.insert(svc.name.clone(), own);
            per.insert(format!("tasks.{}", svc.name), tasks);
        }
    }
    for s in &dns_input.standalone {
        for a in &s.attachments {
            names
                .entry(name_of(&a.network))
                .or_default()
                .insert(s.name.clone(), vec![a.addr.to_string()]);
        }
    }
    let mesh: Vec<serde_json::Value> = inner
        .mesh
        .metrics()
        .iter()
        .map(|s| {
            serde_json::json!({
                "service": s.name,
                "no_backend": s.no_backend,
                "client_addr_kept": s.client_kept,
                "client_addr_fallback": s.client_fallback,
                "backends": s.backends.iter().map(|b| serde_json::json!({
                    "id": b.id, "addr": b.addr, "health": b.health.as_str(),
                    "active": b.active, "connections": b.total, "errors": b.errors,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tasks: Vec<serde_json::Value> = inner
        .runtime
        .list()
        .iter()
        .map(|t| {
            serde_json::json!({"id": t.id, "name": t.name, "state": t.state.as_str(),
            "health": t.health.map(|h| h.as_str()), "pid": t.pid, "addresses": t.addresses})
        })
        .collect();
    serde_json::json!({
        "gossip": { "members": members, "entries": snap.entries.len(), "networks": snap.networks },
        "peers": inner.overlay.peer_stats(),
        "networks": fdb,
        "mesh": mesh,
        "kernel_mesh": kernel_mesh::describe(inner),
        "dns": names,
        "tasks": tasks,
    })
}

fn runtime_state(s: rt::TaskState) -> TaskState {
    match s {
        rt::TaskState::New | rt::TaskState::Preparing | rt::TaskState::Ready => {
            TaskState::Preparing
        }
        rt::TaskState::Starting => TaskState::Starting,
        rt::TaskState::Running => TaskState::Running,
        rt::TaskState::Complete => TaskState::Complete,
        rt::TaskState::Shutdown => TaskState::Shutdown,
        rt::TaskState::Failed => TaskState::Failed,
    }
}

async fn pass(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let _one = inner.pass.lock().await;
    let Some(state) = inner.store.borrow().clone() else { return Ok(()) };
    let services = records::services(&state);
    let tasks = records::tasks(&state);
    let mine: BTreeMap<&String, &TaskRecord> = tasks
        .iter()
        .filter(|(_, t)| t.task.node_id.as_deref() == Some(inner.me.as_str()))
        .collect();

    // Gossip networks: every node takes part in every network (the mesh needs ingress
    // everywhere; DNS and VIPs need the networks of local tasks).
    let want: BTreeSet<String> = state.networks.keys().cloned().collect();
    let have = lock(&inner.local).networks.clone();
    for n in want.difference(&have) {
        inner.gossip.join_network(n).await?;
    }
    for n in have.difference(&want) {
        let _ = inner.gossip.leave_network(n).await;
    }
    lock(&inner.local).networks = want;

    sandbox(inner, &state).await?;

    // Tasks an earlier run started: take them up again where the store still wants them.
    let adopted: Vec<String> =
        std::mem::take(&mut lock(&inner.local).adopted).into_iter().collect();
    for id in adopted {
        let Some(t) = mine.get(&id) else {
            // Forgotten by the store: removed below like any unknown task; its endpoints
            // are on networks we no longer know it by, so each one is asked to let it go.
            let all = state.networks.keys().cloned().collect();
            lock(&inner.local).attached.insert(id, all);
            continue;
        };
        let nets: Vec<NetworkRecord> =
            t.networks.iter().filter_map(|n| state.networks.get(n).cloned()).collect();
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

    // Tasks: start what should run, stop what should not, forget what the store forgot. The
    // CNI runtimes' containers are attached by `cni` and count as running tasks from then on.
    cni::reconcile(inner, &state, &mine);
    let statuses: BTreeMap<String, rt::TaskStatus> = inner
        .runtime
        .list()
        .into_iter()
        .chain(cni::statuses(inner))
        .map(|s| (s.id.clone(), s))
        .collect();
    for (id, t) in &mine {
        let busy = lock(&inner.local).busy.contains(*id);
        if busy || t.cni().is_some() {
            continue;
        }
        let status = statuses.get(*id);
        let want_run = t.task.desired == DesiredState::Running;
        if want_run && status.is_none() && !t.task.state.is_terminal() && t.addressed() {
            let svc = services.get(&t.task.service_id).cloned();
            if svc.is_none() && t.standalone.is_none() {
                continue;
            }
            let nets: Vec<NetworkRecord> =
                t.networks.iter().filter_map(|n| state.networks.get(n).cloned()).collect();
            lock(&inner.local).busy.insert((*id).clone());
            let (inner, t) = (inner.clone(), (*t).clone());
            tokio::spawn(async move {
                let id = t.task.id.clone();
                if let Err(e) = start_task(&inner, &t, svc.as_ref(), &nets).await {
                    tracing::warn!(task = %id, error = %format!("{e:#}"), "starting a task");
                    lock(&inner.local).errors.insert(id.clone(), format!("{e:#}"));
                    if inner.runtime.inspect(&id).is_ok_and(|s| !s.state.is_terminal()) {
                        let _ = inner.runtime.stop(&id, Some(Duration::ZERO)).await;
                    }
                }
                lock(&inner.local).busy.remove(&id);
                inner.kick.notify_one();
            });
        } else if !want_run && status.is_some_and(|s| !s.state.is_terminal()) {
            let grace = services
                .get(&t.task.service_id)
                .map_or(rt::DEFAULT_STOP_GRACE, |s| Duration::from_millis(s.stop_grace_ms));
            stop_task(inner, id, grace, false);
        }
    }
    for (id, s) in &statuses {
        let known = mine.contains_key(id);
        let busy = lock(&inner.local).busy.contains(id);
        if busy {
            continue;
        }
        if !known && cni::is_attached(inner, id) {
            cni::release(inner, id);
        } else if !known {
            stop_task(inner, id, rt::DEFAULT_STOP_GRACE, true);
        } else if s.state.is_terminal() && lock(&inner.local).attached.contains_key(id) {
            detach(inner, id).await;
        }
    }

    // Reports: what the runtime says, where the store says otherwise.
    let mut reports = Vec::new();
    for (id, t) in &mine {
        let (observed, message, exit, health) = match statuses.get(*id) {
            Some(s) => (
                runtime_state(s.state),
                s.error.clone().or_else(|| lock(&inner.local).errors.get(*id).cloned()),
                s.exit_code,
                s.health.map(|h| h.as_str().to_owned()),
            ),
            None => match lock(&inner.local).errors.get(*id) {
                Some(e) => (TaskState::Failed, Some(e.clone()), None, None),
                None => continue,
            },
        };
        // A task the store already calls finished is never reported alive again.
        let regress = t.task.state.is_terminal() && !observed.is_terminal();
        let state_changed = observed != t.task.state && !regress;
        if state_changed && observed == TaskState::Failed {
            inner.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if state_changed || (health != t.health && !regress) {
            let started = observed == TaskState::Running && state_changed;
            reports.push((
                (*id).clone(),
                shoal_cluster::model::TaskReport {
                    state: observed,
                    state_since_ms: state_changed.then(now_ms),
                    exit_code: exit,
                    health,
                    message: message.or_else(|| started.then(|| "started".into())),
                },
            ));
        }
    }
    let report = async {
        if !reports.is_empty()
            && let Err(e) = inner.cluster.report_tasks(reports).await
        {
            tracing::debug!(error = %e, "reporting task states");
        }
    };
    // The data path does not wait for the leader to take the reports (a task that now runs is
    // published as serving in the same moment it is reported running).
    let local = async {
        readiness(inner, services, &mine, &statuses);
        publish(inner, &state, services, &mine, &statuses).await;
        dataplane(inner, &state, services, &statuses).await;
    };
    tokio::join!(report, local);
    Ok(())
}

/// The ingress sandbox: attached to the ingress network with the address the leader gave it.
async fn sandbox(inner: &Arc<Inner>, state: &ClusterState) -> anyhow::Result<()> {
    let Some(ingress) = records::ingress(state) else { return Ok(()) };
    let Some(ip) = records::held(state).get(&records::sandbox_key(&inner.me)).copied() else {
        return Ok(());
    };
    if lock(&inner.local).sandbox_ip == Some(ip) {
        return Ok(());
    }
    let spec = records::overlay_spec(ingress).context("the ingress network is not IPv4")?;
    let old = lock(&inner.local).sandbox_ip;
    if old.is_some() {
        let _ = inner.overlay.detach(&ingress.id, "sbox").await;
    }
    let ifname = Some(client_addr::SANDBOX_IFNAME);
    let ep = vx::EndpointSpec { id: "sbox", task: &inner.sandbox, ip, ifname };
    inner.overlay.attach(&spec, &ep).await.context("attaching the ingress sandbox")?;
    client_addr::sandbox_ready(inner, ingress).await;
    lock(&inner.local).sandbox_ip = Some(ip);
    Ok(())
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
        let rules = vip_rules(&vip_table(&state, records::services(&state), &eps), &attached);
        if !rules.is_empty() {
            install_vips(inner, id, Arc::new(inner.runtime.netns(id)?), rules)
                .await
                .context("installing service VIPs")?;
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

async fn detach(inner: &Arc<Inner>, id: &str) {
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
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops a task in Docker's order, after taking it out of service: its endpoints are marked
/// not serving (so every node's mesh, DNS and VIPs drop it), then, once every node confirmed
/// that (waiting at most [`WITHDRAW_TIMEOUT`], and never more than the grace), its stop signal,
/// and SIGKILL once `grace` has passed; then its endpoints leave gossip.
fn stop_task(inner: &Arc<Inner>, id: &str, grace: Duration, remove: bool) {
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
                lock(&inner.local).published.insert(k, rec);
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

/// The published TCP target ports a task of this service must accept connections on before it
/// serves: none when the service has its own health command (that decides) or no such port.
fn awaited_ports(svc: Option<&Service>) -> Vec<u16> {
    match svc {
        Some(s) if s.health.is_none() => s
            .ports
            .iter()
            .filter(|p| p.protocol == records::Protocol::Tcp)
            .map(|p| p.target)
            .collect(),
        _ => Vec::new(),
    }
}

/// Tries, from inside each running task's namespace, the published ports of the tasks that
/// wait for them; a task whose every port accepts a connection is ready (serving from the next
/// pass on). Without this a task would get traffic from its first instant, before its
/// program listens.
fn readiness(
    inner: &Arc<Inner>,
    services: &BTreeMap<String, Service>,
    mine: &BTreeMap<&String, &TaskRecord>,
    statuses: &BTreeMap<String, rt::TaskStatus>,
) {
    for (id, t) in mine {
        let running = statuses.get(*id).is_some_and(|s| s.state == rt::TaskState::Running);
        let ports = awaited_ports(services.get(&t.task.service_id));
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

/// A task's entries in the gossip endpoint tables, one per network it has an address on.
fn endpoint_records(
    inner: &Inner,
    t: &TaskRecord,
    serving: bool,
) -> Vec<(EntryKey, EndpointRecord)> {
    t.addresses
        .iter()
        .map(|(net, ip)| {
            let rec = EndpointRecord {
                node: inner.me.clone(),
                ip: *ip,
                service: t.task.service_id.clone(),
                task: t.task.id.clone(),
                slot: t.slot_label(),
                name: t.standalone.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                serving,
                aliases: t.cni().map(|c| c.aliases.clone()).unwrap_or_default(),
            };
            (EntryKey::new(ENDPOINT_TABLE, net, &t.task.id), rec)
        })
        .collect()
}

/// The longest a new task's process waits for every node to confirm it knows the task's
/// endpoints (`confirm`): a gossip round or two (200 ms each) and the other nodes' passes that
/// put it in their forwarding tables, so the answers to its first packets find their way back.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(1);

/// Publishes a task about to start as not serving (forwarding tables learn it; meshes, DNS and
/// VIPs send it nothing yet). Returns whether there was anything to announce.
async fn announce(inner: &Arc<Inner>, t: &TaskRecord) -> bool {
    let records = endpoint_records(inner, t, false);
    if records.is_empty() {
        return false;
    }
    for (k, v) in records {
        let Ok(bytes) = serde_json::to_vec(&v) else { continue };
        match inner.gossip.write(k.clone(), bytes).await {
            Ok(_) => {
                lock(&inner.local).published.insert(k, v);
            }
            Err(e) => tracing::debug!(key = ?k, error = %e, "announcing an endpoint"),
        }
    }
    true
}

/// Waits until every live node has applied `change`, at most `timeout`; without an ingress
/// network to keep the records in, the whole `timeout`. Returns how long it waited.
async fn wait_confirmed(
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

/// Counts the gossip claims the store contradicts: each once, for as long as it stays.
fn count_dropped(inner: &Inner, now: BTreeSet<trust::Dropped>) {
    let mut guard = lock(&inner.local);
    let l = &mut *guard;
    for d in now.difference(&l.claims_seen) {
        tracing::warn!(kind = d.kind.as_str(), claim = %d.what, "dropped a gossip claim the store contradicts");
        *l.claims_dropped.entry(d.kind.as_str()).or_default() += 1;
    }
    l.claims_seen = now;
}

/// Our endpoints in the gossip tables: running tasks (with whether they serve) and the sandbox.
async fn publish(
    inner: &Arc<Inner>,
    state: &ClusterState,
    services: &BTreeMap<String, Service>,
    mine: &BTreeMap<&String, &TaskRecord>,
    statuses: &BTreeMap<String, rt::TaskStatus>,
) {
    let mut want: BTreeMap<EntryKey, EndpointRecord> = BTreeMap::new();
    if let (Some(ing), Some(ip)) = (records::ingress(state), lock(&inner.local).sandbox_ip) {
        let rec = EndpointRecord {
            node: inner.me.clone(),
            ip,
            service: String::new(),
            task: String::new(),
            slot: String::new(),
            name: String::new(),
            serving: false,
            aliases: Vec::new(),
        };
        want.insert(EntryKey::new(ENDPOINT_TABLE, &ing.id, &format!("sbox-{}", inner.me)), rec);
    }
    for (id, t) in mine {
        let Some(s) = statuses.get(*id) else { continue };
        // A task being started is announced already (not serving): see `announce`.
        let starting = !s.state.is_terminal() && lock(&inner.local).attached.contains_key(*id);
        if t.task.desired != DesiredState::Running
            || !(s.state == rt::TaskState::Running || starting)
        {
            continue;
        }
        let port_ready = awaited_ports(services.get(&t.task.service_id)).is_empty()
            || lock(&inner.local).ready.contains(*id);
        want.extend(endpoint_records(inner, t, s.is_serving() && port_ready));
    }
    let have = lock(&inner.local).published.clone();
    for (k, v) in &want {
        if have.get(k) != Some(v) {
            match serde_json::to_vec(v) {
                Ok(b) => {
                    if let Err(e) = inner.gossip.write(k.clone(), b).await {
                        tracing::debug!(key = ?k, error = %e, "publishing an endpoint");
                        continue;
                    }
                }
                Err(_) => continue,
            }
            lock(&inner.local).published.insert(k.clone(), v.clone());
        }
    }
    // A task being stopped keeps its entries until `withdraw` takes them out (only it waits
    // for every node to let the task go before the task is asked to stop), and one being
    // started keeps its announcement.
    let busy = lock(&inner.local).busy.clone();
    for (k, v) in have.iter().filter(|(k, _)| !want.contains_key(*k)) {
        if !v.task.is_empty() && busy.contains(&v.task) {
            continue;
        }
        let _ = inner.gossip.delete(k.clone()).await;
        lock(&inner.local).published.remove(k);
    }
}

/// The data path from the store and gossip: VXLAN forwarding, DNS, the mesh, VIP rules.
async fn dataplane(
    inner: &Arc<Inner>,
    state: &ClusterState,
    services: &BTreeMap<String, Service>,
    statuses: &BTreeMap<String, rt::TaskStatus>,
) {
    let snap = inner.gossip.snapshot();
    // Only what the store vouches for: any holder of the gossip key can write to gossip.
    let verified = trust::verify(state, &snap, inner.tunnels);
    count_dropped(inner, verified.dropped);
    let eps = verified.endpoints;

    // Overlay: remote endpoints and peers.
    let mut tables = vx::Tables::default();
    for (net, e) in &eps {
        tables.endpoints.push(vx::RemoteEndpoint {
            network: net.clone(),
            ip: e.ip,
            mac: vx::Mac::from_ipv4(e.ip),
            node: e.node.clone(),
        });
    }
    tables.peers = verified.peers;
    tables.endpoints.sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
    let changed = lock(&inner.local).tables.as_ref() != Some(&tables);
    if changed {
        match inner.overlay.set_tables(tables.clone()).await {
            Ok(_) => lock(&inner.local).tables = Some(tables.clone()),
            Err(e) => tracing::warn!(error = %e, "programming the overlay"),
        }
    } else if let Err(e) = inner.overlay.check_guard().await {
        // (set_tables checks it too.) An encrypted network must never run unguarded for long.
        tracing::warn!(error = %e, "the encrypted networks' cleartext guard");
    }

    // DNS: services with their VIPs and serving tasks, standalone tasks by name.
    let held = records::held(state);
    let mut input = dns::ClusterRecords::default();
    for n in state.networks.values().filter(|n| !n.ingress) {
        input.networks.push(dns::NetworkSpec {
            id: n.id.clone(),
            name: n.name.clone(),
            subnets: vec![n.subnet],
        });
    }
    let ingress_id = records::ingress(state).map(|n| n.id.clone()).unwrap_or_default();
    for svc in services.values() {
        let mut by_task: BTreeMap<&str, dns::TaskSpec> = BTreeMap::new();
        for (net, e) in eps
            .iter()
            .filter(|(net, e)| e.service == svc.id && !e.task.is_empty() && *net != ingress_id)
        {
            let t = by_task.entry(&e.task).or_insert_with(|| dns::TaskSpec {
                slot: e.slot.clone(),
                id: e.task.clone(),
                healthy: e.serving,
                attachments: Vec::new(),
            });
            t.attachments.push(dns::Attachment {
                network: net.clone(),
                addr: IpAddr::V4(e.ip),
                aliases: Vec::new(),
            });
        }
        input.services.push(dns::ServiceSpec {
            name: svc.name.clone(),
            mode: crate::from_model::dns_mode(svc),
            networks: svc
                .networks
                .iter()
                .cloned()
                .map(|net| dns::ServiceNetwork {
                    vip: records::vip_of(&held, &svc.id, &net).map(IpAddr::V4),
                    network: net,
                    aliases: Vec::new(),
                })
                .collect(),
            tasks: by_task.into_values().collect(),
        });
    }
    let mut standalone: BTreeMap<&str, dns::StandaloneSpec> = BTreeMap::new();
    for (net, e) in eps.iter().filter(|(_, e)| !e.name.is_empty() && e.serving) {
        standalone
            .entry(&e.task)
            .or_insert_with(|| dns::StandaloneSpec {
                name: e.name.clone(),
                id: e.task.clone(),
                attachments: Vec::new(),
            })
            .attachments
            .push(dns::Attachment {
                network: net.clone(),
                addr: IpAddr::V4(e.ip),
                aliases: e.aliases.clone(),
            });
    }
    input.standalone = standalone.into_values().collect();
    if lock(&inner.local).dns.as_ref() != Some(&input) {
        inner.dns.update(dns::Snapshot::build(&input, dns::RecordsConfig::default()));
        lock(&inner.local).dns = Some(input);
    }

    // The mesh: one entry per service that publishes ports, backends from the ingress table.
    let mut want: BTreeMap<String, (ing::ServiceSpec, Vec<ing::BackendSpec>)> = BTreeMap::new();
    for svc in services.values().filter(|s| !s.ports.is_empty()) {
        let mut spec = crate::from_model::mesh_service(svc);
        // A withdrawn task's open connections may run as long as the task itself may: the
        // withdrawal wait, then its stop grace.
        spec.drain_grace = WITHDRAW_TIMEOUT + Duration::from_millis(svc.stop_grace_ms);
        let mut backends: Vec<ing::BackendSpec> = eps
            .iter()
            .filter(|(net, e)| *net == ingress_id && e.service == svc.id && !e.task.is_empty())
            .map(|(_, e)| ing::BackendSpec {
                id: e.task.clone(),
                addr: IpAddr::V4(e.ip),
                state: if e.serving { ing::TaskState::Healthy } else { ing::TaskState::Starting },
                local: e.node == inner.me,
            })
            .collect();
        backends.sort_by(|a, b| a.id.cmp(&b.id));
        want.insert(svc.name.clone(), (spec, backends));
    }
    let have = lock(&inner.local).mesh.clone();
    for (name, (spec, backends)) in &want {
        if have.get(name) != Some(&(spec.clone(), backends.clone())) {
            match inner.mesh.set_service(spec.clone(), backends.clone()) {
                Ok(()) => {
                    tracing::debug!(
                        service = %name,
                        backends = ?backends.iter().map(|b| (&b.id, b.state)).collect::<Vec<_>>(),
                        "mesh backends"
                    );
                    lock(&inner.local).mesh.insert(name.clone(), (spec.clone(), backends.clone()));
                }
                Err(e) => tracing::warn!(service = %name, error = %e, "publishing ports"),
            }
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        let _ = inner.mesh.remove_service(name);
        lock(&inner.local).mesh.remove(name);
    }

    kernel_mesh::sync(inner, state, services, &eps, &ingress_id).await;

    let sandboxes = client_addr::sandboxes(&eps, &ingress_id);
    client_addr::tasks(inner, &ingress_id, &sandboxes).await;

    // East-west VIPs inside each local running task: every VIP of the task's networks, with the
    // serving tasks behind it (worked out once per pass, then picked per task).
    let vips = vip_table(state, services, &eps);
    let holding = !lock(&inner.local).held_vips.is_empty();
    if holding {
        let deadline = lock(&inner.local).held_until.is_some_and(|t| std::time::Instant::now() > t);
        let seen: BTreeSet<(&str, &str)> =
            eps.iter().map(|(net, e)| (net.as_str(), e.task.as_str())).collect();
        let caught_up = records::tasks(state).values().all(|t| {
            t.task.node_id.as_deref() == Some(inner.me.as_str())
                || t.task.state != TaskState::Running
                || t.task.desired != DesiredState::Running
                || t.addresses.keys().all(|n| seen.contains(&(n.as_str(), t.task.id.as_str())))
        });
        if caught_up || deadline {
            lock(&inner.local).held_vips.clear();
        }
    }
    for (id, s) in statuses.iter().filter(|(_, s)| s.state == rt::TaskState::Running) {
        if lock(&inner.local).held_vips.contains(id) {
            continue;
        }
        // Not attached yet (being started, or adopted and not taken up again): its rules are
        // left as they are until we know its networks.
        let Some(nets) = lock(&inner.local).attached.get(id).cloned() else { continue };
        let rules = vip_rules(&vips, &nets);
        if lock(&inner.local).vips.get(id) == Some(&rules) {
            continue;
        }
        let ns = match cni::netns(inner, &s.id) {
            Some(ns) => ns,
            None => match inner.runtime.netns(&s.id) {
                Ok(ns) => Arc::new(ns),
                Err(_) => continue,
            },
        };
        if let Err(e) = install_vips(inner, id, ns, rules).await {
            tracing::warn!(task = %id, error = %format!("{e:#}"), "installing service VIPs");
        }
    }

    // What this pass applied, for the nodes waiting on their tasks' changes; only once the
    // forwarding tables took it.
    let programmed = lock(&inner.local).tables.as_ref() == Some(&tables);
    if programmed && !ingress_id.is_empty() {
        let tasks = eps.iter().filter(|(_, e)| !e.task.is_empty());
        let known = tasks.clone().map(|(_, e)| e.task.clone()).collect();
        let serving = tasks.filter(|(_, e)| e.serving).map(|(_, e)| e.task.clone()).collect();
        confirm::publish(inner, &ingress_id, &known, &serving).await;
    }
}

/// Every VIP per network, with the serving tasks behind it, from the store and gossip.
fn vip_table(
    state: &ClusterState,
    services: &BTreeMap<String, Service>,
    eps: &[(String, EndpointRecord)],
) -> BTreeMap<String, Vec<(Ipv4Addr, Vec<Ipv4Addr>)>> {
    let held = records::held(state);
    let mut vips: BTreeMap<String, Vec<(Ipv4Addr, Vec<Ipv4Addr>)>> = BTreeMap::new();
    for svc in services.values() {
        for net in &svc.networks {
            let Some(vip) = records::vip_of(&held, &svc.id, net) else { continue };
            let mut backends: Vec<Ipv4Addr> = eps
                .iter()
                .filter(|(n, e)| n == net && e.service == svc.id && e.serving)
                .map(|(_, e)| e.ip)
                .collect();
            backends.sort();
            vips.entry(net.clone()).or_default().push((vip, backends));
        }
    }
    vips
}

/// The VIP rules of a task on `nets`, sorted, as [`Local::vips`] keeps them.
fn vip_rules(
    table: &BTreeMap<String, Vec<(Ipv4Addr, Vec<Ipv4Addr>)>>,
    nets: &[String],
) -> Vec<(Ipv4Addr, Vec<Ipv4Addr>)> {
    let mut rules: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> =
        nets.iter().filter_map(|n| table.get(n.as_str())).flatten().cloned().collect();
    rules.sort();
    rules
}

/// Writes a task's VIP rules into its namespace and records them.
async fn install_vips(
    inner: &Arc<Inner>,
    id: &str,
    ns: Arc<NetNs>,
    rules: Vec<(Ipv4Addr, Vec<Ipv4Addr>)>,
) -> anyhow::Result<()> {
    let vip_rules: Vec<VipRule> =
        rules.iter().map(|(vip, b)| VipRule { vip: *vip, backends: b.clone() }).collect();
    tokio::task::spawn_blocking(move || shoal_vip::apply(&ns, &vip_rules)).await??;
    lock(&inner.local).vips.insert(id.to_owned(), rules);
    Ok(())
}
