//! `/networks`, `/services`, `/containers`: the verbs of `shoal network`, `shoal service` and
//! `shoal run`. Every request is checked against the store before anything is written, and a
//! refused one changes nothing; errors use Docker's words where Docker has them.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_cluster::Cluster;
use shoal_cluster::model::{ClusterState, Command, NetworkRecord, now_ms, tables};
use shoal_scheduler::{self as sched, DesiredState, TaskState};

use super::swarm::{bad_request, cluster, cluster_error};
use super::{ApiState, error};
use crate::engine::leader::{self, check_service, new_id};
use crate::engine::mesh_policy::{MeshPolicy, MeshPolicyChange};
use crate::engine::records::{
    self, HealthRecord, LbAlgorithm, PortRecord, Protocol, ProxyVersion, ServiceRecord, Standalone,
    TaskRecord,
};
use crate::mounts::{self, MountSpec};

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/networks", get(network_ls).post(network_create))
        .route("/networks/{id}", get(network_inspect).delete(network_rm))
        .route("/services", get(service_ls).post(service_create))
        .route("/services/{id}", get(service_inspect).delete(service_rm))
        .route("/services/{id}/update", post(service_update))
        .route("/services/{id}/rollback", post(super::rollout::service_rollback))
        .route("/services/{id}/tasks", get(service_ps))
        .route("/services/{id}/logs", post(service_logs))
        .route("/containers", get(container_ls).post(container_run))
        .route("/containers/{name}", get(container_inspect).delete(container_rm))
        .route("/containers/{name}/stop", post(container_stop))
        .route("/containers/{name}/logs", get(container_logs))
}

/// `POST /networks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub subnet: Option<ipnet::Ipv4Net>,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A network with what uses it (`network ls` / `network inspect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkView {
    pub network: NetworkRecord,
    /// Services attached.
    pub services: Vec<String>,
    /// Running task endpoints per node host name: (task name, address).
    pub tasks: BTreeMap<String, Vec<(String, std::net::Ipv4Addr)>>,
    /// Containers a CNI runtime attached (`shoal cni`), per node host name: (container name,
    /// address, the runtime's container id).
    #[serde(default)]
    pub containers: BTreeMap<String, Vec<(String, std::net::Ipv4Addr, String)>>,
    /// VIPs per service name.
    pub vips: BTreeMap<String, std::net::Ipv4Addr>,
    /// This node's view of the network's peers (encryption state), when it hosts the network.
    #[serde(default)]
    pub local: Option<serde_json::Value>,
}

/// `POST /services`: Docker's `service create` flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceCreate {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default 1 (replicated).
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub global: bool,
    #[serde(default)]
    pub networks: Vec<String>,
    /// `8100:8100`, `8100:80/udp`, or `published=8100,target=80,protocol=udp,mode=host`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// `vip` (default) or `dnsrr`.
    #[serde(default)]
    pub endpoint_mode: Option<String>,
    /// How the routing mesh balances: `p2c` (default), `round-robin` or `maglev`.
    #[serde(default)]
    pub lb_algorithm: Option<String>,
    /// `--mesh-*` flags.
    #[serde(flatten)]
    pub mesh: MeshPolicyChange,
    #[serde(default)]
    pub constraints: Vec<String>,
    /// `any` (default), `on-failure`, `none`.
    #[serde(default)]
    pub restart_condition: Option<String>,
    #[serde(default)]
    pub restart_delay_ms: Option<u64>,
    #[serde(default)]
    pub restart_max_attempts: Option<u64>,
    /// `stop-first` (default) or `start-first`.
    #[serde(default)]
    pub update_order: Option<String>,
    #[serde(default)]
    pub health_cmd: Option<String>,
    #[serde(default)]
    pub health_interval_ms: Option<u64>,
    #[serde(default)]
    pub health_timeout_ms: Option<u64>,
    #[serde(default)]
    pub health_retries: Option<u32>,
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
    /// `--stop-signal`: a name (`SIGQUIT`, `QUIT`) or a number.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// `--update-parallelism` (0: all at once).
    #[serde(default)]
    pub update_parallelism: Option<u64>,
    #[serde(default)]
    pub update_delay_ms: Option<u64>,
    /// `pause` (default), `rollback` or `continue`.
    #[serde(default)]
    pub update_failure_action: Option<String>,
    #[serde(default)]
    pub update_monitor_ms: Option<u64>,
    /// `--mount`, parsed by the client; checked again here.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

/// `POST /services/{id}/update`: Docker's `service update` / `scale` flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceUpdate {
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env_add: Vec<String>,
    #[serde(default)]
    pub env_rm: Vec<String>,
    #[serde(default)]
    pub network_add: Vec<String>,
    #[serde(default)]
    pub network_rm: Vec<String>,
    #[serde(default)]
    pub publish_add: Vec<String>,
    /// Published ports to remove.
    #[serde(default)]
    pub publish_rm: Vec<u16>,
    #[serde(default)]
    pub constraint_add: Vec<String>,
    #[serde(default)]
    pub constraint_rm: Vec<String>,
    #[serde(default)]
    pub update_order: Option<String>,
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub update_parallelism: Option<u64>,
    #[serde(default)]
    pub update_delay_ms: Option<u64>,
    #[serde(default)]
    pub update_failure_action: Option<String>,
    #[serde(default)]
    pub update_monitor_ms: Option<u64>,
    /// Replace every task even if nothing changed.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub mount_add: Vec<MountSpec>,
    /// Targets of mounts to remove (`--mount-rm PATH`).
    #[serde(default)]
    pub mount_rm: Vec<String>,
    /// How the routing mesh balances: `p2c`, `round-robin` or `maglev`.
    #[serde(default)]
    pub lb_algorithm: Option<String>,
    /// `--mesh-*` flags.
    #[serde(flatten)]
    pub mesh: MeshPolicyChange,
}

/// A service as `service ls` / `inspect` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: ServiceRecord,
    /// Running tasks of the current spec.
    pub running: u64,
    /// Tasks wanted (replicas, or eligible nodes for global services).
    pub desired: u64,
    /// VIP per network name.
    pub vips: BTreeMap<String, std::net::Ipv4Addr>,
    /// Network names.
    pub networks: Vec<String>,
    /// What its tasks see as the peer of a connection to an ingress-mode published port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
}

/// One row of `service ps` / `ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub task: TaskRecord,
    pub name: String,
    pub node: String,
    /// Address per network name.
    pub addresses: BTreeMap<String, std::net::Ipv4Addr>,
}

/// `POST /services/{id}/logs`: where each task's output was read up to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Task id → next position to read.
    #[serde(default)]
    pub cursors: BTreeMap<String, u64>,
}

/// One line of a service's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    /// `myhelloworld.1.<id prefix>@node1`, as Docker prefixes lines.
    pub source: String,
    pub stream: String,
    pub time_ms: u64,
    pub line: String,
}

/// The answer: new lines and the cursors to ask with next time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsResponse {
    pub entries: Vec<LogEntry>,
    pub cursors: BTreeMap<String, u64>,
    /// Nodes that did not answer.
    pub unreachable: Vec<String>,
}

/// `POST /containers`: `shoal run`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRequest {
    pub name: String,
    pub network: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub auto_remove: bool,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

pub(super) async fn store(c: &Cluster) -> Result<ClusterState, Response> {
    c.store().await.map_err(cluster_error)
}

async fn write(c: &Cluster, cmd: Command) -> Result<(), Response> {
    c.write(cmd).await.map_err(cluster_error)
}

fn not_found(what: &str, name: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("No such {what}: {name}"))
}

/// A DNS label: services and containers are reached by name.
fn check_name(what: &str, name: &str) -> Result<(), Response> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(bad_request(format!(
            "invalid {what} name {name:?}: 1-63 of [a-zA-Z0-9_-], starting with a letter or digit"
        )))
    }
}

/// Docker's lookup: the exact id, else the one item whose name is `what` or whose id starts
/// with it (3 characters at least); none or several is an error naming `kind`.
fn find_one<'a, T>(
    kind: &str,
    what: &str,
    items: &'a BTreeMap<String, T>,
    name_of: impl Fn(&T) -> &str,
) -> Result<&'a T, Response> {
    if let Some(x) = items.get(what) {
        return Ok(x);
    }
    let matches: Vec<&T> = items
        .iter()
        .filter(|(id, x)| name_of(x) == what || (what.len() >= 3 && id.starts_with(what)))
        .map(|(_, x)| x)
        .collect();
    match matches[..] {
        [x] => Ok(x),
        [] => Err(not_found(kind, what)),
        _ => Err(bad_request(format!("{kind} {what} is ambiguous ({} matches)", matches.len()))),
    }
}

fn find_network<'a>(state: &'a ClusterState, what: &str) -> Result<&'a NetworkRecord, Response> {
    find_one("network", what, &state.networks, |n| &n.name)
}

pub(super) fn find_service(state: &ClusterState, what: &str) -> Result<ServiceRecord, Response> {
    find_one("service", what, &records::services(state), |s| &s.name).cloned()
}

// ---- networks ----

/// How often `network create` reads the store again after losing a race for a subnet or VNI
/// (each round of a race has one winner, so this covers that many creates at once).
const MAX_CREATE_ATTEMPTS: u32 = 32;

async fn network_create(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<NetworkCreate>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        check_name("network", &req.name)?;
        if let Some(d) = req.driver.as_deref().filter(|d| *d != "overlay") {
            return Err(bad_request(format!(
                "driver {d:?} is not supported: shoal networks are overlay networks"
            )));
        }
        // The store refuses a subnet or VNI another create took after we read it; then the
        // next attempt reads again and picks past it (a name taken meanwhile is a conflict).
        let mut attempts = 0;
        loop {
            attempts += 1;
            let state = store(&c).await?;
            if state.networks.values().any(|n| n.name == req.name) {
                return Err(error(
                    StatusCode::CONFLICT,
                    format!("network with name {} already exists", req.name),
                ));
            }
            let mut ipam = leader::ipam_of(&state).map_err(|e| bad_request(format!("{e:#}")))?;
            let id = new_id();
            let subnet =
                ipam.add_network(&id, req.subnet).map_err(|e| bad_request(e.to_string()))?;
            let rec = NetworkRecord {
                id: id.clone(),
                name: req.name.clone(),
                driver: "overlay".into(),
                subnet: ipnet::IpNet::V4(subnet),
                gateway: leader::gateway_of(subnet),
                vni: leader::next_vni(&state),
                ingress: false,
                attachable: req.attachable,
                encrypted: req.encrypted,
                labels: req.labels.clone(),
            };
            match c.write(Command::PutNetwork(rec)).await {
                Ok(()) => {
                    let body = axum::Json(serde_json::json!({ "id": id }));
                    return Ok((StatusCode::CREATED, body).into_response());
                }
                Err(shoal_cluster::Error::Refused(_)) if attempts < MAX_CREATE_ATTEMPTS => {
                    // Spread the losers of a race so they do not collide again at once.
                    let ms = 5 + rand::random::<u64>() % 45;
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(cluster_error(e)),
            }
        }
    };
    run.await.unwrap_or_else(|r| r)
}

fn network_view(state: &ClusterState, n: &NetworkRecord) -> NetworkView {
    let services = records::services(state);
    let held = records::held(state);
    let hostname = |id: &str| {
        state
            .nodes
            .values()
            .find(|x| x.id.to_string() == id)
            .map_or_else(|| id.to_owned(), |x| x.hostname.clone())
    };
    let mut tasks: BTreeMap<String, Vec<(String, std::net::Ipv4Addr)>> = BTreeMap::new();
    let mut containers: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for t in records::tasks(state).values() {
        if t.task.state != TaskState::Running {
            continue;
        }
        if let (Some(ip), Some(node)) = (t.addresses.get(&n.id), &t.task.node_id) {
            let name = t.display_name(services.get(&t.task.service_id));
            match t.cni() {
                Some(c) => containers.entry(hostname(node)).or_default().push((
                    name,
                    *ip,
                    c.container_id.clone(),
                )),
                None => tasks.entry(hostname(node)).or_default().push((name, *ip)),
            }
        }
    }
    NetworkView {
        network: n.clone(),
        services: services
            .values()
            .filter(|s| s.task_networks(state).contains(&n.id))
            .map(|s| s.name.clone())
            .collect(),
        tasks,
        containers,
        vips: services
            .values()
            .filter_map(|s| records::vip_of(&held, &s.id, &n.id).map(|ip| (s.name.clone(), ip)))
            .collect(),
        local: None,
    }
}

async fn network_ls(State(st): State<Arc<ApiState>>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let views: Vec<NetworkView> =
            state.networks.values().map(|n| network_view(&state, n)).collect();
        Ok(axum::Json(views).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn network_inspect(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let n = find_network(&state, &id)?;
        let mut view = network_view(&state, n);
        if let Some(engine) = st.engine.load_full() {
            let local = engine.overlay().networks().await;
            let peers = engine.overlay().peer_stats();
            if let Some(l) = local.into_iter().find(|l| l.spec.id == n.id) {
                view.local = Some(serde_json::json!({
                    "sandbox": l.sandbox,
                    "endpoints": l.endpoints,
                    "encrypted_peers": if n.encrypted {
                        serde_json::to_value(&peers).unwrap_or_default()
                    } else {
                        serde_json::Value::Null
                    },
                }));
            }
        }
        Ok(axum::Json(view).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn network_rm(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let n = find_network(&state, &id)?.clone();
        if n.ingress {
            return Err(bad_request("the ingress network cannot be removed"));
        }
        let view = network_view(&state, &n);
        let in_use = records::tasks(&state)
            .values()
            .any(|t| t.holds_addresses() && t.addresses.contains_key(&n.id));
        if !view.services.is_empty() || in_use {
            return Err(error(
                StatusCode::CONFLICT,
                format!(
                    "network {} is in use by {}",
                    n.name,
                    if view.services.is_empty() {
                        "tasks".to_owned()
                    } else {
                        format!("service(s) {}", view.services.join(", "))
                    }
                ),
            ));
        }
        write(&c, Command::RemoveNetwork(n.id)).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

// ---- services ----

fn parse_env(list: &[String]) -> Result<Vec<(String, String)>, Response> {
    list.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(bad_request(format!("invalid environment variable {e:?}: want KEY=VALUE"))),
        })
        .collect()
}

/// `8100:8100`, `8100:80/udp`, or the long form
/// `published=8100,target=80,protocol=tcp,mode=ingress,proxy-protocol=v2`.
pub fn parse_port(s: &str) -> Result<PortRecord, String> {
    let bad = || format!("invalid published port {s:?}: want PUBLISHED:TARGET[/tcp|udp]");
    let port = |v: &str| match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("invalid port {v:?} in {s:?}")),
    };
    let proto = |v: &str| match v {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("invalid protocol {v:?} in {s:?}: tcp or udp")),
    };
    if s.contains('=') {
        let (mut published, mut target, mut protocol, mut host_mode, mut proxy_protocol) =
            (None, None, Protocol::Tcp, false, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("published", v)) => published = Some(port(v)?),
                Some(("target", v)) => target = Some(port(v)?),
                Some(("protocol", v)) => protocol = proto(v)?,
                Some(("mode", "host")) => host_mode = true,
                Some(("mode", "ingress")) => host_mode = false,
                Some(("proxy-protocol", "v1")) => proxy_protocol = Some(ProxyVersion::V1),
                Some(("proxy-protocol", "v2")) => proxy_protocol = Some(ProxyVersion::V2),
                Some(("proxy-protocol", v)) => {
                    return Err(format!("invalid proxy-protocol {v:?} in {s:?}: v1 or v2"));
                }
                _ => return Err(format!("invalid field {part:?} in {s:?}")),
            }
        }
        let target = target.ok_or_else(|| format!("{s:?}: target is required"))?;
        if proxy_protocol.is_some() && protocol != Protocol::Tcp {
            return Err(format!("{s:?}: proxy-protocol is for TCP ports"));
        }
        return Ok(PortRecord {
            published: published.unwrap_or(target),
            target,
            protocol,
            host_mode,
            proxy_protocol,
        });
    }
    let (ports, protocol) = match s.split_once('/') {
        Some((p, pr)) => (p, proto(pr)?),
        None => (s, Protocol::Tcp),
    };
    let (published, target) = ports.split_once(':').ok_or_else(bad)?;
    Ok(PortRecord {
        published: port(published)?,
        target: port(target)?,
        protocol,
        host_mode: false,
        proxy_protocol: None,
    })
}

fn network_ids(state: &ClusterState, names: &[String]) -> Result<Vec<String>, Response> {
    let mut out = Vec::new();
    for n in names {
        let id = find_network(state, n)?.id.clone();
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

fn service_from(state: &ClusterState, req: &ServiceCreate) -> Result<ServiceRecord, Response> {
    check_name("service", &req.name)?;
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(bad_request(
            "a service needs a command: shoal service create ... -- CMD [ARG...]",
        ));
    }
    let mode = match (req.global, req.replicas) {
        (true, Some(_)) => {
            return Err(bad_request("replicas can only be used with replicated mode"));
        }
        (true, None) => sched::Mode::Global,
        (false, r) => {
            let replicas = r.unwrap_or(1);
            if replicas > 10_000 {
                return Err(bad_request(format!(
                    "invalid replicas value {replicas}: at most 10000"
                )));
            }
            sched::Mode::Replicated { replicas }
        }
    };
    let ports = req
        .publish
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad_request)?;
    let constraints = req
        .constraints
        .iter()
        .map(|c| c.parse::<sched::Constraint>().map_err(|e| bad_request(e.0)))
        .collect::<Result<Vec<_>, _>>()?;
    let restart = sched::RestartPolicy {
        condition: match req.restart_condition.as_deref() {
            None | Some("any") => sched::RestartCondition::Any,
            Some("on-failure") => sched::RestartCondition::OnFailure,
            Some("none") => sched::RestartCondition::None,
            Some(x) => {
                return Err(bad_request(format!(
                    "invalid restart condition {x:?}: any, on-failure or none"
                )));
            }
        },
        delay_ms: req.restart_delay_ms.unwrap_or(5_000),
        max_attempts: req.restart_max_attempts.unwrap_or(0),
    };
    let dnsrr = match req.endpoint_mode.as_deref() {
        None | Some("vip") => false,
        Some("dnsrr") => true,
        Some(x) => return Err(bad_request(format!("invalid endpoint mode {x:?}: vip or dnsrr"))),
    };
    let lb_algorithm = match req.lb_algorithm.as_deref() {
        None => LbAlgorithm::P2c,
        Some(x) => lb_algorithm(x)?,
    };
    let mesh = MeshPolicy::default().changed(&req.mesh).map_err(bad_request)?;
    let health = match &req.health_cmd {
        None => None,
        Some(cmd) if cmd.trim().is_empty() => return Err(bad_request("empty health command")),
        Some(cmd) => Some(HealthRecord {
            cmd: cmd.clone(),
            interval_ms: req.health_interval_ms.unwrap_or(30_000).max(100),
            timeout_ms: req.health_timeout_ms.unwrap_or(30_000).max(100),
            retries: req.health_retries.unwrap_or(3),
        }),
    };
    let now = now_ms();
    Ok(ServiceRecord {
        id: new_id(),
        name: req.name.clone(),
        version: 1,
        mode,
        argv: req.argv.clone(),
        env: parse_env(&req.env)?,
        workdir: req.workdir.clone(),
        networks: network_ids(state, &req.networks)?,
        ports,
        dnsrr,
        lb_algorithm,
        mesh,
        constraints,
        restart,
        update_order: parse_order(req.update_order.as_deref())?,
        update: sched::UpdatePolicy {
            parallelism: req.update_parallelism.unwrap_or(1),
            delay_ms: req.update_delay_ms.unwrap_or(0),
            monitor_ms: req.update_monitor_ms.unwrap_or(sched::DEFAULT_UPDATE_MONITOR_MS),
        },
        update_failure_action: failure_action(req.update_failure_action.as_deref())?
            .unwrap_or_default(),
        update_status: None,
        health,
        mounts: mounts::check_all(&req.mounts).map_err(bad_request)?,
        stop_grace_ms: stop_grace(req.stop_grace_ms)?.unwrap_or(10_000),
        stop_signal: stop_signal(req.stop_signal.as_deref())?,
        previous: None,
        created_ms: now,
        updated_ms: now,
    })
}

/// `--update-failure-action`.
fn lb_algorithm(s: &str) -> Result<LbAlgorithm, Response> {
    match s {
        "p2c" => Ok(LbAlgorithm::P2c),
        "round-robin" => Ok(LbAlgorithm::RoundRobin),
        "maglev" => Ok(LbAlgorithm::Maglev),
        x => Err(bad_request(format!("invalid lb-algorithm {x:?}: p2c, round-robin or maglev"))),
    }
}

fn failure_action(s: Option<&str>) -> Result<Option<records::FailureAction>, Response> {
    use records::FailureAction as A;
    match s {
        None => Ok(None),
        Some("pause") => Ok(Some(A::Pause)),
        Some("rollback") => Ok(Some(A::Rollback)),
        Some("continue") => Ok(Some(A::Continue)),
        Some(x) => Err(bad_request(format!(
            "invalid update failure action {x:?}: pause, rollback or continue"
        ))),
    }
}

/// `--stop-grace-period`, at most an hour (the runtime's bound).
fn stop_grace(ms: Option<u64>) -> Result<Option<u64>, Response> {
    match ms {
        Some(ms) if ms > 3_600_000 => {
            Err(bad_request(format!("invalid stop grace period {ms} ms: at most one hour")))
        }
        _ => Ok(ms),
    }
}

/// `--stop-signal`, kept as given once it names a signal.
fn stop_signal(s: Option<&str>) -> Result<Option<String>, Response> {
    match s {
        None => Ok(None),
        Some(s) => match shoal_runtime::parse_signal(s) {
            Ok(_) => Ok(Some(s.trim().to_owned())),
            Err(why) => Err(bad_request(format!("invalid stop signal: {why}"))),
        },
    }
}

fn parse_order(s: Option<&str>) -> Result<sched::UpdateOrder, Response> {
    match s {
        None | Some("stop-first") => Ok(sched::UpdateOrder::StopFirst),
        Some("start-first") => Ok(sched::UpdateOrder::StartFirst),
        Some(x) => {
            Err(bad_request(format!("invalid update order {x:?}: stop-first or start-first")))
        }
    }
}

pub(super) async fn put_service(
    c: &Cluster,
    state: &ClusterState,
    svc: &ServiceRecord,
) -> Result<(), Response> {
    check_service(state, svc).map_err(|e| {
        if e.contains("already") { error(StatusCode::CONFLICT, e) } else { bad_request(e) }
    })?;
    let cmd = Command::PutEntry {
        table: tables::SERVICES.into(),
        key: svc.id.clone(),
        value: records::to_value(svc),
    };
    write(c, cmd).await
}

async fn service_create(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<ServiceCreate>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let svc = service_from(&state, &req)?;
        put_service(&c, &state, &svc).await?;
        Ok((StatusCode::CREATED, axum::Json(serde_json::json!({ "id": svc.id }))).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

pub(super) fn service_view(state: &ClusterState, svc: &ServiceRecord) -> ServiceView {
    let held = records::held(state);
    let tasks = records::tasks(state);
    let running = tasks
        .values()
        .filter(|t| {
            t.task.service_id == svc.id
                && t.task.state == TaskState::Running
                && t.task.desired == DesiredState::Running
                && t.task.spec_version == svc.version
        })
        .count() as u64;
    let desired = match svc.mode {
        sched::Mode::Replicated { replicas } => replicas,
        // One per node that may run it: Ready, not draining, meeting the constraints.
        sched::Mode::Global => records::sched_state(state)
            .nodes
            .iter()
            .filter(|n| {
                n.status == sched::NodeStatus::Ready
                    && n.availability != sched::Availability::Drain
                    && svc.constraints.iter().all(|c| c.matches(n))
            })
            .count() as u64,
    };
    let name_of = |id: &str| state.networks.get(id).map_or(id.to_owned(), |n| n.name.clone());
    ServiceView {
        running,
        desired,
        vips: svc
            .task_networks(state)
            .iter()
            .filter_map(|n| records::vip_of(&held, &svc.id, n).map(|ip| (name_of(n), ip)))
            .collect(),
        networks: svc.task_networks(state).iter().map(|n| name_of(n)).collect(),
        client_address: client_address(state, svc),
        service: svc.clone(),
    }
}

/// How the routing mesh presents clients to the service's tasks (`None`: no published port).
fn client_address(state: &ClusterState, svc: &ServiceRecord) -> Option<String> {
    if svc.ports.is_empty() {
        return None;
    }
    let subnet =
        records::ingress(state).map_or("the ingress subnet".into(), |n| n.subnet.to_string());
    Some(format!(
        "kept: tasks see the client's own address and port (TCP and UDP); clients on {subnet}, \
         loopback and IPv6 clients arrive from the receiving node's ingress address instead \
         (counted in /metrics as shoal_mesh_client_addr_fallback_total)"
    ))
}

async fn service_ls(State(st): State<Arc<ApiState>>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let views: Vec<ServiceView> =
            records::services(&state).values().map(|s| service_view(&state, s)).collect();
        Ok(axum::Json(views).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn service_inspect(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let svc = find_service(&state, &id)?;
        Ok(axum::Json(service_view(&state, &svc)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

fn task_views(state: &ClusterState, filter: impl Fn(&TaskRecord) -> bool) -> Vec<TaskView> {
    let services = records::services(state);
    let mut out: Vec<TaskView> = records::tasks(state)
        .into_values()
        .filter(|t| filter(t))
        .map(|t| TaskView {
            name: t.display_name(services.get(&t.task.service_id)),
            node: t
                .task
                .node_id
                .as_ref()
                .and_then(|n| state.nodes.values().find(|x| x.id.to_string() == *n))
                .map(|n| n.hostname.clone())
                .unwrap_or_default(),
            addresses: t
                .addresses
                .iter()
                .map(|(n, ip)| (state.networks.get(n).map_or(n.clone(), |x| x.name.clone()), *ip))
                .collect(),
            task: t,
        })
        .collect();
    // Docker's order: by slot, the current task first, then newest history first.
    out.sort_by_cached_key(|v| {
        let t = &v.task.task;
        (
            t.slot,
            t.node_id.clone(),
            t.desired != DesiredState::Running,
            std::cmp::Reverse(t.created_ms),
        )
    });
    out
}

async fn service_ps(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let svc = find_service(&state, &id)?;
        Ok(axum::Json(task_views(&state, |t| t.task.service_id == svc.id)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

/// Collects the service's output from every node that runs (or ran) its tasks, through this
/// manager: each node is asked directly over the control plane.
async fn service_logs(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::Json(req): axum::Json<LogsRequest>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let svc = find_service(&state, &id)?;
        let mut out = LogsResponse::default();
        let mut per_time: Vec<(u64, LogEntry)> = Vec::new();
        for t in records::tasks(&state).into_values().filter(|t| t.task.service_id == svc.id) {
            let Some(node) = t
                .task
                .node_id
                .as_ref()
                .and_then(|n| state.nodes.values().find(|x| x.id.to_string() == *n))
            else {
                continue;
            };
            let since = req.cursors.get(&t.task.id).copied().unwrap_or(0);
            let ask = shoal_cluster::NodeRequest::TaskLogs { task: t.task.id.clone(), since };
            let v = match c.ask_node(node.addr, ask).await {
                Ok(v) => v,
                Err(shoal_cluster::Error::BadRequest(_)) => continue, // no longer on that node
                Err(_) => {
                    if !out.unreachable.contains(&node.hostname) {
                        out.unreachable.push(node.hostname.clone());
                    }
                    continue;
                }
            };
            let source = format!(
                "{}.{}@{}",
                t.display_name(Some(&svc)),
                &t.task.id[..t.task.id.len().min(12)],
                node.hostname
            );
            let lines: Vec<shoal_runtime::LogLine> =
                serde_json::from_value(v["lines"].clone()).unwrap_or_default();
            for l in lines {
                let time_ms = l
                    .time
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
                let stream = serde_json::to_value(l.stream)
                    .ok()
                    .and_then(|s| s.as_str().map(str::to_owned))
                    .unwrap_or_default();
                per_time.push((
                    time_ms,
                    LogEntry { source: source.clone(), stream, time_ms, line: l.line },
                ));
            }
            out.cursors.insert(t.task.id.clone(), v["next"].as_u64().unwrap_or(since));
        }
        per_time.sort_by_key(|(t, _)| *t);
        out.entries = per_time.into_iter().map(|(_, e)| e).collect();
        Ok(axum::Json(out).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn service_update(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::Json(req): axum::Json<ServiceUpdate>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let old = find_service(&state, &id)?;
        let mut svc = old.clone();
        if let Some(r) = req.replicas {
            match &mut svc.mode {
                sched::Mode::Replicated { replicas } => {
                    if r > 10_000 {
                        return Err(bad_request(format!(
                            "invalid replicas value {r}: at most 10000"
                        )));
                    }
                    *replicas = r;
                }
                sched::Mode::Global => {
                    return Err(bad_request(format!(
                        "{}: scale can only be used with replicated mode",
                        svc.name
                    )));
                }
            }
        }
        if let Some(argv) = &req.argv {
            if argv.is_empty() {
                return Err(bad_request("an empty command"));
            }
            svc.argv = argv.clone();
        }
        let env_rm: BTreeSet<&str> = req.env_rm.iter().map(String::as_str).collect();
        svc.env.retain(|(k, _)| !env_rm.contains(k.as_str()));
        for (k, v) in parse_env(&req.env_add)? {
            svc.env.retain(|(x, _)| *x != k);
            svc.env.push((k, v));
        }
        for id in network_ids(&state, &req.network_rm)? {
            if !svc.networks.contains(&id) {
                return Err(bad_request(format!(
                    "service {} is not attached to network {id}",
                    svc.name
                )));
            }
            svc.networks.retain(|n| *n != id);
        }
        for id in network_ids(&state, &req.network_add)? {
            if svc.networks.contains(&id) {
                return Err(bad_request(format!(
                    "service {} is already attached to network {id}",
                    svc.name
                )));
            }
            svc.networks.push(id);
        }
        for p in &req.publish_rm {
            if !svc.ports.iter().any(|x| x.published == *p) {
                return Err(bad_request(format!("port {p} is not published by {}", svc.name)));
            }
            svc.ports.retain(|x| x.published != *p);
        }
        for p in &req.publish_add {
            svc.ports.push(parse_port(p).map_err(bad_request)?);
        }
        for c in &req.constraint_rm {
            let c: sched::Constraint =
                c.parse().map_err(|e: sched::ConstraintError| bad_request(e.0))?;
            svc.constraints.retain(|x| *x != c);
        }
        for c in &req.constraint_add {
            svc.constraints.push(c.parse().map_err(|e: sched::ConstraintError| bad_request(e.0))?);
        }
        if let Some(o) = req.update_order.as_deref() {
            svc.update_order = parse_order(Some(o))?;
        }
        if let Some(n) = req.update_parallelism {
            svc.update.parallelism = n;
        }
        if let Some(ms) = req.update_delay_ms {
            svc.update.delay_ms = ms;
        }
        if let Some(a) = failure_action(req.update_failure_action.as_deref())? {
            svc.update_failure_action = a;
        }
        if let Some(ms) = req.update_monitor_ms {
            svc.update.monitor_ms = ms;
        }
        // A new update starts afresh, whatever stopped the last one.
        svc.update_status = None;
        if let Some(ms) = stop_grace(req.stop_grace_ms)? {
            svc.stop_grace_ms = ms;
        }
        if let Some(s) = stop_signal(req.stop_signal.as_deref())? {
            svc.stop_signal = Some(s);
        }
        if let Some(a) = req.lb_algorithm.as_deref() {
            svc.lb_algorithm = lb_algorithm(a)?;
        }
        svc.mesh = svc.mesh.changed(&req.mesh).map_err(bad_request)?;
        svc.mounts =
            mounts::updated(&svc.mounts, &req.mount_rm, &req.mount_add).map_err(bad_request)?;
        if svc.dnsrr && svc.ports.iter().any(|p| !p.host_mode) {
            return Err(bad_request(
                "port published with ingress mode can't be used with dnsrr mode",
            ));
        }
        // Anything but the replica count needs new tasks: a rolling update.
        if !crate::engine::rollout::same_tasks(&svc, &old) || req.force {
            svc.version += 1;
        }
        // What `service rollback` goes back to: the spec before any change, a scale included.
        if svc != old || req.force {
            svc.previous = Some(Box::new(ServiceRecord { previous: None, ..old.clone() }));
        }
        svc.updated_ms = now_ms();
        put_service(&c, &state, &svc).await?;
        Ok(axum::Json(service_view(&state, &svc)).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn service_rm(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let svc = find_service(&state, &id)?;
        write(&c, Command::DeleteEntry { table: tables::SERVICES.into(), key: svc.id }).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

// ---- standalone tasks (`shoal run`) ----

async fn container_run(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<RunRequest>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
        check_name("container", &req.name)?;
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(bad_request(
                "shoal run needs a command: shoal run --name N --network NET -- CMD",
            ));
        }
        let state = c.task_state().await.map_err(cluster_error)?;
        let net = find_network(&state, &req.network)?;
        if !net.attachable {
            return Err(bad_request(format!(
                "Could not attach to network {}: rpc error: code = PermissionDenied desc = network {} not manually attachable",
                req.network, net.name
            )));
        }
        if records::name_taken(&state, &req.name) {
            return Err(error(
                StatusCode::CONFLICT,
                format!("Conflict. The container name \"/{}\" is already in use", req.name),
            ));
        }
        let id = new_id();
        let standalone = Standalone {
            name: req.name.clone(),
            argv: req.argv.clone(),
            env: parse_env(&req.env)?,
            auto_remove: req.auto_remove,
            mounts: mounts::check_all(&req.mounts).map_err(bad_request)?,
            cni: None,
        };
        let rec = TaskRecord::standalone(&id, engine.node_id(), &net.id, standalone, now_ms());
        c.put_standalone(&id, Some(records::to_value(&rec))).await.map_err(cluster_error)?;
        engine.kick();
        Ok((StatusCode::CREATED, axum::Json(serde_json::json!({ "id": id }))).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

/// This node's standalone task called `name`.
pub(super) async fn own_container(
    st: &ApiState,
    name: &str,
) -> Result<(Arc<Cluster>, TaskRecord), Response> {
    let c = cluster(st)?;
    let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
    let state = c.task_state().await.map_err(cluster_error)?;
    let t = records::tasks(&state)
        .into_values()
        .find(|t| {
            t.standalone.as_ref().is_some_and(|s| s.name == name)
                && t.task.node_id.as_deref() == Some(engine.node_id())
        })
        .ok_or_else(|| not_found("container", name))?;
    Ok((c, t))
}

/// This node's standalone tasks, as `docker ps` lists one engine's containers: the ones that
/// `stop`, `rm` and `logs` here can reach.
async fn container_ls(State(st): State<Arc<ApiState>>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = c.task_state().await.map_err(cluster_error)?;
        let me = st.engine.load_full().map(|e| e.node_id().to_owned());
        let mine = |t: &TaskRecord| {
            t.standalone.is_some() && t.task.node_id.is_some() && t.task.node_id == me
        };
        Ok(axum::Json(task_views(&state, mine)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn container_inspect(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = c.task_state().await.map_err(cluster_error)?;
        let v = task_views(&state, |t| t.standalone.as_ref().is_some_and(|s| s.name == name));
        match v.into_iter().next() {
            Some(v) => Ok(axum::Json(v).into_response()),
            None => Err(not_found("container", &name)),
        }
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn container_stop(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let (c, mut t) = own_container(&st, &name).await?;
        t.task.desired = DesiredState::Shutdown;
        c.put_standalone(&t.task.id, Some(records::to_value(&t))).await.map_err(cluster_error)?;
        if let Some(e) = st.engine.load_full() {
            e.kick();
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn container_rm(
    State(st): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Response {
    let run = async {
        let (c, t) = own_container(&st, &name).await?;
        if !t.task.state.is_terminal() && !q.force {
            return Err(error(
                StatusCode::CONFLICT,
                format!(
                    "You cannot remove a running container {name}. Stop the container before attempting removal or force remove"
                ),
            ));
        }
        c.put_standalone(&t.task.id, None).await.map_err(cluster_error)?;
        if let Some(e) = st.engine.load_full() {
            e.kick();
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn container_logs(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let (_, t) = own_container(&st, &name).await?;
        let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
        let logs = engine.runtime().logs(&t.task.id).map_err(|e| bad_request(e.to_string()))?;
        let text: String = logs.lines().into_iter().map(|l| l.line + "\n").collect();
        Ok(text.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_in_both_forms_and_bad_ones_say_why() {
        let p = parse_port("8100:8100").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.host_mode),
            (8100, 8100, Protocol::Tcp, false)
        );
        let p = parse_port("53:5353/udp").unwrap();
        assert_eq!((p.published, p.target, p.protocol), (53, 5353, Protocol::Udp));
        let p = parse_port("published=8080,target=80,protocol=udp,mode=host").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.host_mode),
            (8080, 80, Protocol::Udp, true)
        );
        let p = parse_port("target=80").unwrap();
        assert_eq!(p.published, 80);
        let p = parse_port("published=8100,target=80,protocol=tcp,mode=ingress,proxy-protocol=v2")
            .unwrap();
        assert_eq!((p.published, p.proxy_protocol), (8100, Some(ProxyVersion::V2)));
        let p = parse_port("published=8100,target=80,proxy-protocol=v1").unwrap();
        assert_eq!(p.proxy_protocol, Some(ProxyVersion::V1));
        for (bad, why) in [
            ("8100", "PUBLISHED:TARGET"),
            ("0:80", "invalid port \"0\""),
            ("70000:80", "invalid port \"70000\""),
            ("80:80/sctp", "invalid protocol"),
            ("published=80", "target is required"),
            ("published=80,target=80,mode=bridge", "invalid field"),
            ("published=80,target=80,proxy-protocol=v3", "v1 or v2"),
            ("published=53,target=53,protocol=udp,proxy-protocol=v2", "for TCP ports"),
        ] {
            let e = parse_port(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
