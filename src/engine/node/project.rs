//! The node engine's pure half: from the store, the gossip tables and what this node holds
//! locally, what its data plane should be. No I/O, no locks, no clock (time comes in with the
//! inputs): the same [`Inputs`] give the same [`DesiredDataPlane`], and the tests below run a
//! whole swarm's worth of nodes through it without a kernel.
//!
//! The node's pass (`node.rs`) gathers the inputs, calls [`project`], and hands each part of
//! the result to the subsystem that applies it (`apply.rs`, `tasks.rs`), each of which compares
//! it with what it last applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_cluster::model::{ClusterState, TaskReport};
use shoal_dns as dns;
use shoal_gossip::{EntryKey, Snapshot};
use shoal_ingress::{self as ing, HealthState};
use shoal_return::kernel::KernelPort;
use shoal_runtime as rt;
use shoal_scheduler::{DesiredState, TaskState};
use shoal_vxlan as vx;

use super::kernel_mesh;
use crate::engine::records::{self, ENDPOINT_TABLE, EndpointRecord, Service, TaskRecord};
use crate::engine::trust;

/// A service's VIP rules as one task's namespace holds them: each VIP with its backends.
pub(crate) type VipRules = Vec<(Ipv4Addr, Vec<Ipv4Addr>)>;

/// What this node holds that the store and gossip do not say: the state of its own tasks and
/// of what it set up for them.
#[derive(Debug, Clone, Default)]
pub(crate) struct LocalView {
    /// Tasks with a start or stop in flight: no new action is taken on them.
    pub busy: BTreeSet<String>,
    /// Tasks with things of ours in their namespace, and the networks they are on.
    pub attached: BTreeMap<String, Vec<String>>,
    /// Containers a CNI runtime attached here.
    pub cni: BTreeSet<String>,
    /// Why a task could not be started.
    pub errors: BTreeMap<String, String>,
    /// Tasks whose published TCP ports accepted connections.
    pub ready: BTreeSet<String>,
    /// Adopted tasks whose VIP rules and reply steering stay as the earlier run left them until
    /// gossip caught up, and until when at most.
    pub held_vips: BTreeSet<String>,
    pub held_until: Option<Instant>,
    /// The ingress sandbox's address, once it is attached.
    pub sandbox_ip: Option<Ipv4Addr>,
    /// Per kernel-path service name, the userspace mesh's health of each task.
    pub mesh_health: BTreeMap<String, BTreeMap<String, HealthState>>,
    /// The kernel path's ports as last written (`None` before this agent's first write).
    pub kernel_written: Option<Vec<KernelPort>>,
}

/// Everything one projection reads.
pub(crate) struct Inputs<'a> {
    /// This node's id.
    pub me: &'a str,
    /// The WireGuard tunnel range (peers' tunnel addresses are made in it).
    pub tunnels: ipnet::Ipv4Net,
    pub state: &'a ClusterState,
    pub services: &'a BTreeMap<String, Arc<Service>>,
    pub tasks: &'a BTreeMap<String, Arc<TaskRecord>>,
    pub gossip: &'a Snapshot,
    /// The local runtime's and the CNI containers' tasks.
    pub statuses: &'a BTreeMap<String, rt::TaskStatus>,
    pub local: &'a LocalView,
    pub now: Instant,
    /// Wall-clock milliseconds, for the state times in reports.
    pub now_ms: u64,
}

/// What the node's data plane and tasks should be after this pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DesiredDataPlane {
    /// The gossip networks this node takes part in: all of them (the mesh needs ingress
    /// everywhere; DNS and VIPs need the networks of local tasks).
    pub networks: BTreeSet<String>,
    /// The ingress sandbox's address on the ingress network.
    pub sandbox: Option<Ipv4Addr>,
    /// Task actions.
    pub tasks: TaskPlan,
    /// Task states to report to the leader.
    pub reports: Vec<Report>,
    /// Our entries in the gossip endpoint tables.
    pub endpoints: BTreeMap<EntryKey, EndpointRecord>,
    /// VXLAN forwarding: remote endpoints per network, and the peers.
    pub overlay: vx::Tables,
    /// What service DNS answers from.
    pub dns: dns::ClusterRecords,
    /// The routing mesh: per service name, its spec and backends.
    pub mesh: BTreeMap<String, (ing::ServiceSpec, Vec<ing::BackendSpec>)>,
    /// The mesh's kernel path, once the ingress sandbox is up.
    pub kernel: Option<KernelMesh>,
    /// Per local running task, its VIP rules (tasks whose rules are held are left out).
    pub vips: BTreeMap<String, VipRules>,
    /// Whether adopted tasks' VIP rules are still held (gossip has not caught up yet).
    pub hold_vips: bool,
    /// Per local task on the ingress network, the sandboxes its mesh replies go back through
    /// (adopted tasks are left out while their VIP rules are held).
    pub returns: BTreeMap<String, Vec<Ipv4Addr>>,
    /// What this pass applies, for the nodes waiting on their tasks' changes (`confirm`).
    pub confirm: Option<Confirm>,
    /// Gossip claims the store contradicts.
    pub dropped: BTreeSet<trust::Dropped>,
}

/// The mesh's kernel path: the ingress subnet the sandbox link routes, and the ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelMesh {
    pub subnet: (Ipv4Addr, u8),
    pub ports: Vec<KernelPort>,
    /// The service of each port's flow counter.
    pub owners: BTreeMap<String, String>,
}

/// What to do with the local tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TaskPlan {
    /// Assigned here, to run, not running yet.
    pub start: Vec<String>,
    /// Running here, no longer to run: with the stop grace.
    pub stop: Vec<(String, Duration)>,
    /// Running here, unknown to the store: stopped and removed.
    pub remove: Vec<String>,
    /// CNI containers the store forgot: released.
    pub release: Vec<String>,
    /// Ended tasks with things of ours in their namespace: taken out.
    pub detach: Vec<String>,
}

/// One task's report to the leader.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub task: String,
    pub report: TaskReport,
    /// Whether it reports a new failure (counted on `/metrics`).
    pub failed: bool,
}

/// What the data path applied this pass: the tasks it knows and those it sends traffic to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Confirm {
    pub network: String,
    pub known: BTreeSet<String>,
    pub serving: BTreeSet<String>,
}

/// The whole desired state of one node.
pub(crate) fn project(i: &Inputs<'_>) -> DesiredDataPlane {
    let mine: BTreeMap<&String, &TaskRecord> = i
        .tasks
        .iter()
        .filter(|(_, t)| t.task.node_id.as_deref() == Some(i.me))
        .map(|(id, t)| (id, t.as_ref()))
        .collect();
    let tasks = task_plan(i, &mine);
    // Ended tasks detached this pass have nothing of ours left for the data path to set.
    let mut attached = i.local.attached.clone();
    for id in &tasks.detach {
        attached.remove(id);
    }
    let verified = trust::verify(i.state, i.gossip, i.tunnels);
    let eps = &verified.endpoints;
    let ingress_id = records::ingress(i.state).map(|n| n.id.clone()).unwrap_or_default();
    let overlay = overlay(eps, verified.peers);
    let kernel = kernel(i, eps, &ingress_id);
    let (vips, hold_vips) = vips(i, eps, &attached);
    let sandboxes = sandboxes(eps, &ingress_id);
    // An adopted task's reply steering waits for gossip like its VIP rules: written from a
    // gossip view that lacks a sandbox, it would strand the replies of the connections that
    // came through that sandbox.
    let returns = attached
        .iter()
        .filter(|(id, nets)| {
            nets.contains(&ingress_id) && !(hold_vips && i.local.held_vips.contains(*id))
        })
        .map(|(id, _)| (id.clone(), sandboxes.clone()))
        .collect();
    let confirm = (!ingress_id.is_empty()).then(|| {
        let tasks = eps.iter().filter(|(_, e)| !e.task.is_empty());
        Confirm {
            network: ingress_id.clone(),
            known: tasks.clone().map(|(_, e)| e.task.clone()).collect(),
            serving: tasks.filter(|(_, e)| e.serving).map(|(_, e)| e.task.clone()).collect(),
        }
    });
    DesiredDataPlane {
        networks: networks(i.state),
        sandbox: sandbox(i.state, i.me),
        reports: reports(i, &mine),
        endpoints: endpoints(i, &mine, &attached),
        dns: dns_records(i, eps, &ingress_id),
        mesh: mesh(i, eps, &ingress_id),
        tasks,
        overlay,
        kernel,
        vips,
        hold_vips,
        returns,
        confirm,
        dropped: verified.dropped,
    }
}

/// The gossip networks a node takes part in: every network (the mesh needs ingress everywhere;
/// DNS and VIPs need the networks of local tasks).
pub(crate) fn networks(state: &ClusterState) -> BTreeSet<String> {
    state.networks.keys().cloned().collect()
}

/// The address the store holds for this node's ingress sandbox, if there is an ingress network.
pub(crate) fn sandbox(state: &ClusterState, me: &str) -> Option<Ipv4Addr> {
    let ingress = records::ingress(state)?;
    let ip = records::held(state).get(&records::sandbox_key(me)).copied()?;
    // An address the leader gave on an earlier ingress network is not one to attach with.
    ingress.subnet.contains(&std::net::IpAddr::V4(ip)).then_some(ip)
}

/// Start what should run, stop what should not, forget what the store forgot. The CNI
/// runtimes' containers are attached by `cni` and count as running tasks from then on.
fn task_plan(i: &Inputs<'_>, mine: &BTreeMap<&String, &TaskRecord>) -> TaskPlan {
    let mut plan = TaskPlan::default();
    for (id, t) in mine {
        if i.local.busy.contains(*id) || t.cni().is_some() {
            continue;
        }
        let status = i.statuses.get(*id);
        let want_run = t.task.desired == DesiredState::Running;
        // A pending task here is a global one waiting for a host-mode port (the scheduler's).
        let placed = t.task.state != TaskState::Pending;
        if want_run && placed && status.is_none() && !t.task.state.is_terminal() && t.addressed() {
            if i.services.contains_key(&t.task.service_id) || t.standalone.is_some() {
                plan.start.push((*id).clone());
            }
        } else if !want_run && status.is_some_and(|s| !s.state.is_terminal()) {
            let grace = i
                .services
                .get(&t.task.service_id)
                .map_or(rt::DEFAULT_STOP_GRACE, |s| Duration::from_millis(s.stop_grace_ms));
            plan.stop.push(((*id).clone(), grace));
        }
    }
    for (id, s) in i.statuses {
        let known = mine.contains_key(id);
        if i.local.busy.contains(id) {
            continue;
        }
        if !known && i.local.cni.contains(id) {
            plan.release.push(id.clone());
        } else if !known {
            plan.remove.push(id.clone());
        } else if s.state.is_terminal() && i.local.attached.contains_key(id) {
            plan.detach.push(id.clone());
        }
    }
    plan
}

/// The scheduler's task state for a runtime state.
fn observed_state(s: rt::TaskState) -> TaskState {
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

/// What the runtime says of each local task, where the store says otherwise.
fn reports(i: &Inputs<'_>, mine: &BTreeMap<&String, &TaskRecord>) -> Vec<Report> {
    let mut reports = Vec::new();
    for (id, t) in mine {
        let (observed, message, exit, health) = match i.statuses.get(*id) {
            Some(s) => (
                observed_state(s.state),
                s.error.clone().or_else(|| i.local.errors.get(*id).cloned()),
                s.exit_code,
                s.health.map(|h| h.as_str().to_owned()),
            ),
            None => match i.local.errors.get(*id) {
                Some(e) => (TaskState::Failed, Some(e.clone()), None, None),
                None => continue,
            },
        };
        // A task the store already calls finished is never reported alive again.
        let regress = t.task.state.is_terminal() && !observed.is_terminal();
        let state_changed = observed != t.task.state && !regress;
        if state_changed || (health != t.health && !regress) {
            let started = observed == TaskState::Running && state_changed;
            let f = TaskReport {
                state: observed,
                state_since_ms: state_changed.then_some(i.now_ms),
                exit_code: exit,
                health,
                message: message.or_else(|| started.then(|| "started".into())),
            };
            let failed = state_changed && observed == TaskState::Failed;
            reports.push(Report { task: (*id).clone(), report: f, failed });
        }
    }
    reports
}

/// The published TCP target ports a task of this service must accept connections on before it
/// serves: none when the service has its own health command (that decides) or no such port.
pub(crate) fn awaited_ports(svc: Option<&Service>) -> Vec<u16> {
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

/// A task's entries in the gossip endpoint tables, one per network it has an address on.
pub(crate) fn endpoint_records(
    me: &str,
    t: &TaskRecord,
    serving: bool,
) -> Vec<(EntryKey, EndpointRecord)> {
    t.addresses
        .iter()
        .map(|(net, ip)| {
            let rec = EndpointRecord {
                node: me.to_owned(),
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

/// Our endpoints in the gossip tables: running tasks (with whether they serve) and the sandbox.
fn endpoints(
    i: &Inputs<'_>,
    mine: &BTreeMap<&String, &TaskRecord>,
    attached: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<EntryKey, EndpointRecord> {
    let mut want = BTreeMap::new();
    if let (Some(ing), Some(ip)) = (records::ingress(i.state), i.local.sandbox_ip) {
        let rec = EndpointRecord {
            node: i.me.to_owned(),
            ip,
            service: String::new(),
            task: String::new(),
            slot: String::new(),
            name: String::new(),
            serving: false,
            aliases: Vec::new(),
        };
        want.insert(EntryKey::new(ENDPOINT_TABLE, &ing.id, &format!("sbox-{}", i.me)), rec);
    }
    for (id, t) in mine {
        let Some(s) = i.statuses.get(*id) else { continue };
        // A task being started is announced already (not serving): see `tasks::announce`.
        let starting = !s.state.is_terminal() && attached.contains_key(*id);
        let running = s.state == rt::TaskState::Running;
        if t.task.desired != DesiredState::Running || !(running || starting) {
            continue;
        }
        // Readiness holds only while the task runs.
        let port_ready = awaited_ports(i.services.get(&t.task.service_id).map(Arc::as_ref))
            .is_empty()
            || (running && i.local.ready.contains(*id));
        want.extend(endpoint_records(i.me, t, s.is_serving() && port_ready));
    }
    want
}

/// The overlay's forwarding tables: remote endpoints, sorted, and the live peers.
fn overlay(eps: &[(String, EndpointRecord)], peers: Vec<vx::PeerRecord>) -> vx::Tables {
    let mut tables = vx::Tables::default();
    for (net, e) in eps {
        tables.endpoints.push(vx::RemoteEndpoint {
            network: net.clone(),
            ip: e.ip,
            mac: vx::Mac::from_ipv4(e.ip),
            node: e.node.clone(),
        });
    }
    tables.peers = peers;
    tables.endpoints.sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
    tables
}

/// DNS: services with their VIPs and serving tasks, standalone tasks by name.
fn dns_records(
    i: &Inputs<'_>,
    eps: &[(String, EndpointRecord)],
    ingress_id: &str,
) -> dns::ClusterRecords {
    let held = records::held(i.state);
    let mut out = dns::ClusterRecords::default();
    for n in i.state.networks.values().filter(|n| !n.ingress) {
        out.networks.push(dns::NetworkSpec {
            id: n.id.clone(),
            name: n.name.clone(),
            subnets: vec![n.subnet],
        });
    }
    for svc in i.services.values() {
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
        out.services.push(dns::ServiceSpec {
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
    out.standalone = standalone.into_values().collect();
    out
}

/// The mesh: one entry per service that publishes ports, backends from the ingress table.
fn mesh(
    i: &Inputs<'_>,
    eps: &[(String, EndpointRecord)],
    ingress_id: &str,
) -> BTreeMap<String, (ing::ServiceSpec, Vec<ing::BackendSpec>)> {
    let mut want = BTreeMap::new();
    for svc in i.services.values().filter(|s| !s.ports.is_empty()) {
        let mut spec = crate::from_model::mesh_service(svc);
        // A withdrawn task's open connections may run as long as the task itself may: the
        // withdrawal wait, then its stop grace.
        spec.drain_grace =
            super::tasks::WITHDRAW_TIMEOUT + Duration::from_millis(svc.stop_grace_ms);
        let mut backends: Vec<ing::BackendSpec> = eps
            .iter()
            .filter(|(net, e)| *net == ingress_id && e.service == svc.id && !e.task.is_empty())
            .map(|(_, e)| ing::BackendSpec {
                id: e.task.clone(),
                addr: IpAddr::V4(e.ip),
                state: if e.serving { ing::TaskState::Healthy } else { ing::TaskState::Starting },
                local: e.node == i.me,
            })
            .collect();
        backends.sort_by(|a, b| a.id.cmp(&b.id));
        want.insert(svc.name.clone(), (spec, backends));
    }
    want
}

/// The kernel path, once there is an IPv4 ingress network and the sandbox is on it.
fn kernel(
    i: &Inputs<'_>,
    eps: &[(String, EndpointRecord)],
    ingress_id: &str,
) -> Option<KernelMesh> {
    let Some(ipnet::IpNet::V4(subnet)) = records::ingress(i.state).map(|n| n.subnet) else {
        return None;
    };
    i.local.sandbox_ip?;
    let health = &i.local.mesh_health;
    let suspected = i.gossip.suspected();
    let prior = i.local.kernel_written.as_deref();
    let (ports, owners) =
        kernel_mesh::ports(i.services, eps, ingress_id, health, &suspected, prior);
    let subnet = (subnet.network(), subnet.prefix_len());
    Some(KernelMesh { subnet, ports, owners })
}

/// Every node's ingress sandbox address, from the ingress endpoint table (sandboxes are the
/// entries without a task), sorted.
pub(crate) fn sandboxes(eps: &[(String, EndpointRecord)], ingress_id: &str) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = eps
        .iter()
        .filter(|(net, e)| net == ingress_id && e.task.is_empty())
        .map(|(_, e)| e.ip)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// East-west VIPs inside each local running task: every VIP of the task's networks, with the
/// serving tasks behind it; and whether adopted tasks' rules are still held.
fn vips(
    i: &Inputs<'_>,
    eps: &[(String, EndpointRecord)],
    attached: &BTreeMap<String, Vec<String>>,
) -> (BTreeMap<String, VipRules>, bool) {
    let table = vip_table(i.state, i.services, eps);
    let mut hold = !i.local.held_vips.is_empty();
    if hold {
        let deadline = i.local.held_until.is_some_and(|t| i.now > t);
        let seen: BTreeSet<(&str, &str)> =
            eps.iter().map(|(net, e)| (net.as_str(), e.task.as_str())).collect();
        let caught_up = i.tasks.values().all(|t| {
            t.task.node_id.as_deref() == Some(i.me)
                || t.task.state != TaskState::Running
                || t.task.desired != DesiredState::Running
                || t.addresses.keys().all(|n| seen.contains(&(n.as_str(), t.task.id.as_str())))
        });
        hold = !(caught_up || deadline);
    }
    let mut out = BTreeMap::new();
    for (id, _) in i.statuses.iter().filter(|(_, s)| s.state == rt::TaskState::Running) {
        if hold && i.local.held_vips.contains(id) {
            continue;
        }
        // Not attached yet (being started, or adopted and not taken up again): its rules are
        // left as they are until we know its networks.
        let Some(nets) = attached.get(id) else { continue };
        out.insert(id.clone(), vip_rules(&table, nets));
    }
    (out, hold)
}

/// Every VIP per network, with the serving tasks behind it, from the store and gossip.
pub(crate) fn vip_table(
    state: &ClusterState,
    services: &BTreeMap<String, Arc<Service>>,
    eps: &[(String, EndpointRecord)],
) -> BTreeMap<String, VipRules> {
    let held = records::held(state);
    let mut vips: BTreeMap<String, VipRules> = BTreeMap::new();
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

/// The VIP rules of a task on `nets`, sorted.
pub(crate) fn vip_rules(table: &BTreeMap<String, VipRules>, nets: &[String]) -> VipRules {
    let mut rules: VipRules =
        nets.iter().filter_map(|n| table.get(n.as_str())).flatten().cloned().collect();
    rules.sort();
    rules
}

#[cfg(test)]
mod tests;
