//! Every node's half of the engine: run the tasks the store assigns here, tell the leader how
//! they are doing, publish them to gossip, and program the data path from what gossip says.
//!
//! One reconcile pass is a function of three views — the store (polled from the leader), the
//! gossip snapshot and the local runtime — and is re-run whenever any of them changes and once a
//! second. It is level-triggered: a report or a gossip write that was lost is made again by the
//! next pass, and a restart of the agent converges from whatever it finds.
//!
//! A pass gathers those views and what the node holds of its own tasks, calls the pure
//! `project::project` for the whole desired state, and lets each subsystem apply its part
//! against what it last applied (`apply`, `tasks`, `kernel_mesh`, `client_addr`, `confirm`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use shoal_cluster::Cluster;
use shoal_cluster::model::{ClusterState, now_ms};
use shoal_dns as dns;
use shoal_gossip::{EntryKey, Gossip};
use shoal_ingress as ing;
use shoal_netns::NetNs;
use shoal_runtime::{self as rt, Runtime};
use shoal_vxlan::{self as vx, Overlay};
use tokio::sync::{Notify, watch};

mod applied;
mod apply;
mod client_addr;
mod confirm;
mod diagnostics;
mod kernel_mesh;
mod project;
mod tasks;

use applied::{LastApplied, LastAppliedMap};
use project::VipRules;

use super::records::{self, EndpointRecord, Service, TaskRecord};
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

/// What this node has done: its tasks' local state, and what each subsystem last applied
/// (`applied`), so a pass changes only what differs.
#[derive(Default)]
struct Local {
    /// Tasks with a start or stop in flight.
    busy: BTreeSet<String>,
    /// Tasks with things of ours in their namespace (DNS, endpoints): the networks they are on.
    attached: BTreeMap<String, Vec<String>>,
    /// Why a task could not be started.
    errors: BTreeMap<String, String>,
    /// Running tasks without a health command whose published TCP ports accept connections:
    /// only then are they serving (see [`tasks::readiness`]).
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
    published: LastAppliedMap<EntryKey, EndpointRecord>,
    /// VIP rules installed per task.
    vips: LastAppliedMap<String, VipRules>,
    /// The ingress sandboxes each task sends mesh replies back through.
    returns: LastAppliedMap<String, Vec<Ipv4Addr>>,
    /// The mesh's services with their backends.
    mesh: LastAppliedMap<String, (ing::ServiceSpec, Vec<ing::BackendSpec>)>,
    /// The mesh's kernel path (`kernel_mesh`).
    kernel: kernel_mesh::State,
    /// What service DNS, the overlay's forwarding tables, the ingress sandbox and gossip's
    /// networks last took.
    dns: LastApplied<dns::ClusterRecords>,
    tables: LastApplied<vx::Tables>,
    /// The ingress network the sandbox is on, and its address there (`apply::sandbox`).
    sandbox: LastApplied<(String, Ipv4Addr)>,
    networks: LastApplied<BTreeSet<String>>,
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

/// The least time between two reconcile passes, so that a burst of store, runtime and gossip
/// events is applied in a few passes rather than one per event.
const PASS_SPACING: Duration = Duration::from_millis(50);

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
                    Some(inner) => diagnostics::answer(&inner, req).await,
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
            // The kernel path's maps follow the mesh's checks (`kernel_mesh::ports`).
            let mut health = inner.mesh.health_changes();
            let mut last_pass = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = inner.kick.notified() => {}
                    _ = rt_events.recv() => {}
                    _ = g_events.recv() => {}
                    Ok(()) = health.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // A change after a quiet spell is applied at once; a burst of changes is taken
                // in passes at most PASS_SPACING apart, each covering everything before it.
                tokio::time::sleep_until(last_pass + PASS_SPACING).await;
                last_pass = tokio::time::Instant::now();
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

    /// The flows the mesh's kernel path forwarded, per service (`/metrics`).
    pub fn kernel_flows(&self) -> Vec<(String, u64)> {
        kernel_mesh::flows(&self.inner)
    }

    /// The conntrack flows the kernel path deleted with their backend, per service (`/metrics`).
    pub fn kernel_purged(&self) -> Vec<(String, u64)> {
        kernel_mesh::purged(&self.inner)
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
            // which its heartbeat keeps (`crate::swarm`), read from the same key file as the
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

/// One reconcile pass: gather the inputs, project them, and let each subsystem apply its part.
async fn pass(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let _one = inner.pass.lock().await;
    let Some(state) = inner.store.borrow().clone() else { return Ok(()) };
    let services = records::services(&state);
    let tasks = records::tasks(&state);
    let mine: BTreeMap<&String, &TaskRecord> = tasks
        .iter()
        .filter(|(_, t)| t.task.node_id.as_deref() == Some(inner.me.as_str()))
        .map(|(id, t)| (id, t.as_ref()))
        .collect();

    // What the rest of the data path stands on: the gossip networks and the ingress sandbox.
    apply::networks(inner, project::networks(&state)).await?;
    apply::sandbox(inner, &state).await?;
    tasks::take_up_adopted(inner, &state, &mine);
    cni::reconcile(inner, &state, &mine);
    let statuses: BTreeMap<String, rt::TaskStatus> = inner
        .runtime
        .list()
        .into_iter()
        .chain(cni::statuses(inner))
        .map(|s| (s.id.clone(), s))
        .collect();

    let local = local_inputs(inner, services);
    let gossip = inner.gossip.snapshot();
    let desired = project::project(&project::Inputs {
        me: &inner.me,
        tunnels: inner.tunnels,
        state: &state,
        services,
        tasks,
        gossip: &gossip,
        statuses: &statuses,
        local: &local,
        now: std::time::Instant::now(),
        now_ms: now_ms(),
    });

    tasks::apply(inner, &state, services, tasks, &desired.tasks).await;
    let failed = desired.reports.iter().filter(|r| r.failed).count() as u64;
    inner.failures.fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
    let reports: Vec<_> =
        desired.reports.iter().map(|r| (r.task.clone(), r.report.clone())).collect();
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
        tasks::readiness(inner, services, &mine, &statuses);
        apply::endpoints(inner, &desired.endpoints).await;
        apply::dataplane(inner, &desired).await;
    };
    tokio::join!(report, local);
    Ok(())
}

/// What the projection needs of this node's own state, taken in one look.
fn local_inputs(inner: &Inner, services: &BTreeMap<String, Arc<Service>>) -> project::LocalView {
    let mesh_health = kernel_mesh::mesh_health(inner, services);
    let l = lock(&inner.local);
    project::LocalView {
        busy: l.busy.clone(),
        attached: l.attached.clone(),
        cni: l.cni.keys().cloned().collect(),
        errors: l.errors.clone(),
        ready: l.ready.clone(),
        held_vips: l.held_vips.clone(),
        held_until: l.held_until,
        sandbox_ip: l.sandbox.get().map(|(_, ip)| *ip),
        mesh_health,
        kernel_written: l.kernel.written(),
    }
}
