//! `shoal network`, `shoal service`, `shoal run` / `ps` / `stop` / `rm` / `logs`: Docker's verbs,
//! flags and columns, over the agent's API.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;

use crate::api::client::{ApiError, Host};
use crate::api::containers::RunRequest;
use crate::api::networks::NetworkView;
use crate::api::services::{ServiceView, TaskView};
use crate::mounts::MountSpec;
use shoal_model::{NetworkCreate, PublishedPort, ServiceCreate, ServiceUpdate};

mod mesh_args;
use mesh_args::MeshArgs;

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create an overlay network.
    Create {
        /// Driver (only `overlay`).
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        /// Driver options: `encrypted` turns on WireGuard between nodes.
        #[arg(short, long = "opt")]
        opt: Vec<String>,
        /// Standalone tasks (`shoal run`) may attach.
        #[arg(long)]
        attachable: bool,
        /// The routing mesh's network (once `network rm ingress` removed the one `swarm init`
        /// made).
        #[arg(long)]
        ingress: bool,
        /// Subnet in CIDR form [default: the next free /24 of the pool].
        #[arg(long)]
        subnet: Option<ipnet::Ipv4Net>,
        /// Label key=value.
        #[arg(long)]
        label: Vec<String>,
        name: String,
    },
    /// List networks.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show networks: subnet, VNI, VIPs, tasks and CNI containers per node, this node's peers
    /// (JSON).
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while in use).
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

/// Flags of `service create` and the command after `--`.
/// Docker's rolling-update flags, the same on `service create` and `service update`.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// Tasks replaced at a time in a rolling update (default 1; 0: all at once).
    #[arg(long)]
    pub update_parallelism: Option<u64>,
    /// Wait between replacing tasks in a rolling update, e.g. `10s`.
    #[arg(long, value_parser = parse_duration)]
    pub update_delay: Option<Duration>,
    /// What a new task failing during an update does: `pause` (default), `rollback`, `continue`.
    #[arg(long, value_parser = ["pause", "rollback", "continue"])]
    pub update_failure_action: Option<String>,
    /// How long after its creation a new task's failure counts (default 5s).
    #[arg(long, value_parser = parse_duration)]
    pub update_monitor: Option<Duration>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    #[arg(long)]
    name: String,
    /// Number of tasks [default: 1].
    #[arg(long)]
    replicas: Option<u64>,
    /// `replicated` or `global`.
    #[arg(long, default_value = "replicated", value_parser = ["replicated", "global"])]
    mode: String,
    /// Publish a port: `8100:8100`, `53:53/udp`, or
    /// `published=8100,target=80,protocol=tcp,mode=ingress,proxy-protocol=v1|v2,mesh=kernel|proxy`.
    #[arg(short, long)]
    publish: Vec<PublishedPort>,
    /// Attach to a network.
    #[arg(long)]
    network: Vec<String>,
    /// Environment KEY=VALUE.
    #[arg(short, long)]
    env: Vec<String>,
    /// Working directory.
    #[arg(short, long)]
    workdir: Option<String>,
    /// `node.role==manager`, `node.hostname!=node1`, `node.labels.zone==a`.
    #[arg(long)]
    constraint: Vec<String>,
    /// `vip` or `dnsrr`.
    #[arg(long, value_parser = ["vip", "dnsrr"])]
    endpoint_mode: Option<String>,
    /// How the routing mesh balances: `p2c` (default), `round-robin`, or `maglev` (the same
    /// client address reaches the same task through every node).
    #[arg(long, value_parser = ["p2c", "round-robin", "maglev"])]
    lb_algorithm: Option<String>,
    /// `any`, `on-failure` or `none`.
    #[arg(long, value_parser = ["any", "on-failure", "none"])]
    restart_condition: Option<String>,
    /// Delay between restarts, e.g. `5s`, `500ms`.
    #[arg(long, value_parser = parse_duration)]
    restart_delay: Option<Duration>,
    /// Give up restarting a slot after this many attempts (0: never).
    #[arg(long)]
    restart_max_attempts: Option<u64>,
    /// `stop-first` or `start-first`.
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    update_order: Option<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    mesh: Box<MeshArgs>,
    /// Health command run inside each task (exit 0 = healthy).
    #[arg(long)]
    health_cmd: Option<String>,
    #[arg(long, value_parser = parse_duration)]
    health_interval: Option<Duration>,
    #[arg(long, value_parser = parse_duration)]
    health_timeout: Option<Duration>,
    #[arg(long)]
    health_retries: Option<u32>,
    /// Time between the stop signal and SIGKILL (default 10s).
    #[arg(long, value_parser = parse_duration)]
    stop_grace_period: Option<Duration>,
    /// The signal that asks a task to stop (default SIGTERM), e.g. `SIGQUIT` for nginx.
    #[arg(long)]
    stop_signal: Option<String>,
    /// Return at once instead of showing progress.
    #[arg(short, long)]
    detach: bool,
    /// `type=volume,src=NAME,dst=PATH[,readonly]` or `type=bind,src=HOSTPATH,dst=PATH`.
    #[arg(long)]
    mount: Vec<MountSpec>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service.
    Create(CreateArgs),
    /// List services.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// List services' tasks, with history.
    Ps {
        /// Print task ids only.
        #[arg(short, long)]
        quiet: bool,
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show services (JSON).
    Inspect {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Change a service: replicas, networks, environment, command, ports, constraints.
    Update {
        #[arg(long)]
        replicas: Option<u64>,
        #[arg(long)]
        network_add: Vec<String>,
        #[arg(long)]
        network_rm: Vec<String>,
        #[arg(long)]
        env_add: Vec<String>,
        #[arg(long)]
        env_rm: Vec<String>,
        #[arg(long)]
        publish_add: Vec<PublishedPort>,
        #[arg(long)]
        publish_rm: Vec<u16>,
        #[arg(long)]
        constraint_add: Vec<String>,
        #[arg(long)]
        constraint_rm: Vec<String>,
        #[arg(long, value_parser = ["stop-first", "start-first"])]
        update_order: Option<String>,
        #[command(flatten)]
        rollout: RolloutArgs,
        /// How the routing mesh balances: `p2c`, `round-robin` or `maglev`.
        #[arg(long, value_parser = ["p2c", "round-robin", "maglev"])]
        lb_algorithm: Option<String>,
        #[command(flatten)]
        mesh: Box<MeshArgs>,
        /// Time between the stop signal and SIGKILL.
        #[arg(long, value_parser = parse_duration)]
        stop_grace_period: Option<Duration>,
        /// The signal that asks a task to stop, e.g. `SIGQUIT`.
        #[arg(long)]
        stop_signal: Option<String>,
        /// Replace the tasks even if nothing changed.
        #[arg(long)]
        force: bool,
        /// Add or replace (by target) a mount: `type=volume,src=NAME,dst=PATH`.
        #[arg(long)]
        mount_add: Vec<MountSpec>,
        /// Remove the mount at this target path.
        #[arg(long)]
        mount_rm: Vec<String>,
        #[arg(short, long)]
        detach: bool,
        service: String,
        /// A new command, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Put back the spec a service had before its last update (a second rollback undoes it).
    Rollback {
        #[arg(short, long)]
        detach: bool,
        service: String,
    },
    /// Set replica counts: `shoal service scale web=5 api=2`.
    Scale {
        #[arg(short, long)]
        detach: bool,
        #[arg(required = true)]
        scales: Vec<String>,
    },
    /// Remove services.
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Print a service's output, from every node that runs its tasks.
    Logs {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Print lines without the task prefix.
        #[arg(long)]
        no_task_ids: bool,
        service: String,
    },
}

/// `shoal run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Print the task's id and return at once; without it the task's output is shown until it
    /// ends, Ctrl-C stops it, and `run` exits with the task's exit code.
    #[arg(short, long)]
    detach: bool,
    /// Remove the task when it exits.
    #[arg(long)]
    rm: bool,
    #[arg(long)]
    name: String,
    /// An attachable overlay network.
    #[arg(long)]
    network: String,
    #[arg(short, long)]
    env: Vec<String>,
    /// `type=volume,src=NAME,dst=PATH[,readonly]` or `type=bind,src=HOSTPATH,dst=PATH`.
    #[arg(long)]
    mount: Vec<MountSpec>,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A duration as Docker's flags take it: `5s`, `500ms`, `1m30s` (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 5s, 500ms, 1m30s)"))
}

/// How an error reads on stderr, in Docker's words: `Error: No such service: x` for a name the
/// agent does not know, `Error response from daemon: ...` for any other refusal.
pub fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<ApiError>() {
        Some(a)
            if e.chain().count() == 1 && a.is_not_found() && a.message.starts_with("No such ") =>
        {
            format!("Error: {}", a.message)
        }
        Some(a) if e.chain().count() == 1 => format!("Error response from daemon: {}", a.message),
        _ => format!("Error: {e:#}"),
    }
}

/// Docker's way with several names: act on each, report each failure on stderr and go on;
/// the command fails (exit 1) if any did.
#[derive(Debug, Default)]
pub struct EachName {
    failed: bool,
}

impl EachName {
    /// The value of a success; a failure is reported and remembered.
    pub fn check<T>(&mut self, r: anyhow::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("{}", describe(&e));
                self.failed = true;
                None
            }
        }
    }

    /// Exit 1 if any name failed.
    pub fn exit_code(&self) -> ExitCode {
        if self.failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
    }
}

fn segment(what: &str, s: &str) -> anyhow::Result<String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        bail!("invalid {what} {s:?}");
    }
    Ok(s.to_owned())
}

pub async fn run_network(host: &Host, cmd: &NetworkCmd) -> anyhow::Result<ExitCode> {
    let mut each = EachName::default();
    match cmd {
        NetworkCmd::Create { driver, opt, attachable, ingress, subnet, label, name } => {
            let mut req = NetworkCreate {
                name: name.clone(),
                driver: Some(driver.clone()),
                subnet: *subnet,
                attachable: *attachable,
                ingress: *ingress,
                ..NetworkCreate::default()
            };
            for o in opt {
                match o.as_str() {
                    "encrypted" | "encrypted=true" | "encrypted=" => req.encrypted = true,
                    _ => bail!("unknown network option {o:?}: shoal overlays take 'encrypted'"),
                }
            }
            for l in label {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                req.labels.insert(k.to_owned(), v.to_owned());
            }
            let r: serde_json::Value = host.post_json("/networks", &req).await?;
            println!("{}", r["id"].as_str().unwrap_or_default());
        }
        NetworkCmd::Ls { quiet } => {
            let nets: Vec<NetworkView> = host.get_json("/networks").await?;
            if !quiet {
                println!(
                    "{:<26} {:<16} {:<8} {:<8} {:<18} {:<6} FLAGS",
                    "NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI"
                );
            }
            for v in nets {
                let n = &v.network;
                if *quiet {
                    println!("{}", n.id);
                    continue;
                }
                let mut flags = Vec::new();
                if n.ingress {
                    flags.push("ingress");
                }
                if n.attachable {
                    flags.push("attachable");
                }
                if n.encrypted {
                    flags.push("encrypted");
                }
                println!(
                    "{:<26} {:<16} {:<8} {:<8} {:<18} {:<6} {}",
                    n.id,
                    n.name,
                    n.driver,
                    "swarm",
                    n.subnet.to_string(),
                    n.vni,
                    flags.join(",")
                );
            }
        }
        NetworkCmd::Inspect { networks } => {
            let mut found = Vec::new();
            for n in networks {
                let v = async {
                    host.get_json::<serde_json::Value>(&format!(
                        "/networks/{}",
                        segment("network", n)?
                    ))
                    .await
                };
                found.extend(each.check(v.await));
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
        }
        NetworkCmd::Rm { networks } => {
            for n in networks {
                let r =
                    async { host.delete(&format!("/networks/{}", segment("network", n)?)).await };
                if each.check(r.await).is_some() {
                    println!("{n}");
                }
            }
        }
    }
    Ok(each.exit_code())
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis() as u64)
}

fn ago(ms: u64) -> String {
    let now = shoal_cluster::model::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=1 => "Less than a second".into(),
        2..=59 => format!("{s} seconds"),
        60..=3599 => format!("{} minutes", s / 60),
        _ => format!("{} hours", s / 3600),
    }
}

/// A keyword flag (`--endpoint-mode dnsrr`) as the model's type: clap has already held it to
/// the model's words, which are the type's serde names.
fn keyword<T: serde::de::DeserializeOwned>(v: &Option<String>) -> anyhow::Result<Option<T>> {
    Ok(v.as_ref().map(|s| serde_json::from_value(serde_json::json!(s))).transpose()?)
}

pub async fn run_service(host: &Host, cmd: &ServiceCmd) -> anyhow::Result<ExitCode> {
    let mut each = EachName::default();
    match cmd {
        ServiceCmd::Create(a) => {
            let req = ServiceCreate {
                name: a.name.clone(),
                argv: a.command.clone(),
                env: a.env.clone(),
                workdir: a.workdir.clone(),
                replicas: a.replicas,
                global: a.mode == "global",
                networks: a.network.clone(),
                publish: a.publish.clone(),
                endpoint_mode: keyword(&a.endpoint_mode)?,
                lb_algorithm: keyword(&a.lb_algorithm)?,
                mesh: a.mesh.change(),
                constraints: a.constraint.clone(),
                restart_condition: keyword(&a.restart_condition)?,
                restart_delay_ms: ms(a.restart_delay),
                restart_max_attempts: a.restart_max_attempts,
                update_order: keyword(&a.update_order)?,
                update_parallelism: a.rollout.update_parallelism,
                update_delay_ms: ms(a.rollout.update_delay),
                update_failure_action: keyword(&a.rollout.update_failure_action)?,
                update_monitor_ms: ms(a.rollout.update_monitor),
                health_cmd: a.health_cmd.clone(),
                health_interval_ms: ms(a.health_interval),
                health_timeout_ms: ms(a.health_timeout),
                health_retries: a.health_retries,
                stop_grace_ms: ms(a.stop_grace_period),
                stop_signal: a.stop_signal.clone(),
                mounts: a.mount.clone(),
            };
            let r: serde_json::Value = host.post_json("/services", &req).await?;
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            println!("{id}");
            if !a.detach {
                converge(host, &id).await?;
            }
        }
        ServiceCmd::Ls { quiet } => {
            let svcs: Vec<ServiceView> = host.get_json("/services").await?;
            if !quiet {
                println!(
                    "{:<26} {:<20} {:<11} {:<9} {:<20} PORTS",
                    "ID", "NAME", "MODE", "REPLICAS", "IMAGE"
                );
            }
            for v in svcs {
                let s = &v.service;
                if *quiet {
                    println!("{}", s.id);
                    continue;
                }
                let mode = match s.mode {
                    shoal_scheduler::Mode::Replicated { .. } => "replicated",
                    shoal_scheduler::Mode::Global => "global",
                };
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|p| format!("*:{}->{}/{}", p.published, p.target, p.protocol.as_str()))
                    .collect();
                println!(
                    "{:<26} {:<20} {:<11} {:<9} {:<20} {}",
                    s.id,
                    s.name,
                    mode,
                    format!("{}/{}", v.running, v.desired),
                    image(&s.argv),
                    ports.join(", ")
                );
            }
        }
        ServiceCmd::Ps { quiet, services } => {
            let mut tasks = Vec::new();
            let mut extras = BTreeMap::new();
            for s in services {
                let v = async {
                    host.get_json::<ServiceView>(&format!("/services/{}", segment("service", s)?))
                        .await
                };
                if let Ok(v) = v.await {
                    extras.insert(v.service.id.clone(), TaskExtras::of(&v.service));
                }
                let t = async {
                    host.get_json::<Vec<TaskView>>(&format!(
                        "/services/{}/tasks",
                        segment("service", s)?
                    ))
                    .await
                };
                tasks.extend(each.check(t.await).into_iter().flatten());
            }
            // Docker prints no table when no service was found.
            if *quiet {
                tasks.iter().for_each(|t| println!("{}", t.task.task.id));
            } else if !tasks.is_empty() || !each.failed {
                print_tasks(&tasks, &extras);
            }
        }
        ServiceCmd::Inspect { services } => {
            let mut found = Vec::new();
            for s in services {
                let v = async {
                    host.get_json::<serde_json::Value>(&format!(
                        "/services/{}",
                        segment("service", s)?
                    ))
                    .await
                };
                found.extend(each.check(v.await));
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
        }
        ServiceCmd::Update {
            replicas,
            network_add,
            network_rm,
            env_add,
            env_rm,
            publish_add,
            publish_rm,
            constraint_add,
            constraint_rm,
            update_order,
            rollout,
            lb_algorithm,
            mesh,
            stop_grace_period,
            stop_signal,
            force,
            mount_add,
            mount_rm,
            detach,
            service,
            command,
        } => {
            let req = ServiceUpdate {
                replicas: *replicas,
                argv: (!command.is_empty()).then(|| command.clone()),
                env_add: env_add.clone(),
                env_rm: env_rm.clone(),
                network_add: network_add.clone(),
                network_rm: network_rm.clone(),
                publish_add: publish_add.clone(),
                publish_rm: publish_rm.clone(),
                constraint_add: constraint_add.clone(),
                constraint_rm: constraint_rm.clone(),
                update_order: keyword(update_order)?,
                update_parallelism: rollout.update_parallelism,
                update_delay_ms: ms(rollout.update_delay),
                update_failure_action: keyword(&rollout.update_failure_action)?,
                update_monitor_ms: ms(rollout.update_monitor),
                stop_grace_ms: ms(*stop_grace_period),
                stop_signal: stop_signal.clone(),
                force: *force,
                mount_add: mount_add.clone(),
                mount_rm: mount_rm.clone(),
                lb_algorithm: keyword(lb_algorithm)?,
                mesh: mesh.change(),
            };
            let v: ServiceView = host
                .post_json(&format!("/services/{}/update", segment("service", service)?), &req)
                .await?;
            println!("{service}");
            if !detach {
                converge(host, &v.service.id).await?;
            }
        }
        ServiceCmd::Rollback { detach, service } => {
            let v: ServiceView = host
                .post_json(&format!("/services/{}/rollback", segment("service", service)?), &())
                .await?;
            println!("{service}");
            if !detach {
                converge(host, &v.service.id).await?;
            }
        }
        ServiceCmd::Scale { detach, scales } => {
            let mut parsed = Vec::new();
            for s in scales {
                let Some((name, n)) = s.split_once('=') else {
                    bail!("invalid scale specifier {s:?}: want SERVICE=REPLICAS");
                };
                let n: u64 = n.parse().map_err(|_| {
                    anyhow::anyhow!("invalid replicas value for service {name}: {n:?}")
                })?;
                parsed.push((segment("service", name)?, n));
            }
            for (name, n) in parsed {
                let req = ServiceUpdate { replicas: Some(n), ..ServiceUpdate::default() };
                let path = format!("/services/{name}/update");
                let Some(v) = each.check(host.post_json::<_, ServiceView>(&path, &req).await)
                else {
                    continue;
                };
                println!("{name} scaled to {n}");
                if !detach {
                    converge(host, &v.service.id).await?;
                }
            }
        }
        ServiceCmd::Logs { follow, no_task_ids, service } => {
            use crate::api::services::{LogsRequest, LogsResponse};
            let path = format!("/services/{}/logs", segment("service", service)?);
            let mut req = LogsRequest::default();
            let mut warned = std::collections::BTreeSet::new();
            loop {
                let r: LogsResponse = host.post_json(&path, &req).await?;
                for e in &r.entries {
                    if *no_task_ids {
                        println!("{}", e.line);
                    } else {
                        println!("{}    | {}", e.source, e.line);
                    }
                }
                for n in r.unreachable {
                    if warned.insert(n.clone()) {
                        eprintln!("WARNING: node {n} did not answer; its tasks' lines are missing");
                    }
                }
                req.cursors.extend(r.cursors);
                if !follow {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        ServiceCmd::Rm { services } => {
            for s in services {
                let r =
                    async { host.delete(&format!("/services/{}", segment("service", s)?)).await };
                if each.check(r.await).is_some() {
                    println!("{s}");
                }
            }
        }
    }
    Ok(each.exit_code())
}

/// Docker's IMAGE column: what the tasks run, here the program of the command.
fn image(argv: &[String]) -> &str {
    argv.first().map_or("", String::as_str)
}

/// What `service ps` shows of a task's service besides the task: Docker's IMAGE (the program)
/// and PORTS (the host-mode ports, served on the nodes that run a task).
struct TaskExtras {
    image: String,
    ports: String,
}

impl TaskExtras {
    fn of(s: &crate::engine::records::Service) -> TaskExtras {
        let ports: Vec<String> = s
            .ports
            .iter()
            .filter(|p| !p.is_ingress())
            .map(|p| format!("*:{}->{}/{}", p.published, p.target, p.protocol.as_str()))
            .collect();
        TaskExtras { image: image(&s.argv).to_owned(), ports: ports.join(",") }
    }
}

/// Docker's `service ps` columns (IMAGE, PORTS from `extras` by service id), plus ADDRESSES.
fn print_tasks(tasks: &[TaskView], extras: &BTreeMap<String, TaskExtras>) {
    println!(
        "{:<26} {:<24} {:<10} {:<14} {:<28} {:<28} {:<20} {:<10} PORTS",
        "ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "ADDRESSES", "IMAGE", "ERROR"
    );
    let mut last_slot = None;
    for t in tasks {
        let slot = (t.task.task.service_id.clone(), t.task.task.slot, t.task.task.node_id.clone());
        // Standalone tasks have no service and no slot: each is its own row.
        let history = !slot.0.is_empty() && last_slot.as_ref() == Some(&slot);
        last_slot = Some(slot);
        let name = if history { format!(" \\_ {}", t.name) } else { t.name.clone() };
        let desired = match t.task.task.desired {
            shoal_scheduler::DesiredState::Running => "Running",
            shoal_scheduler::DesiredState::Shutdown => "Shutdown",
        };
        let state = t.task.task.state.as_str();
        let current = format!(
            "{}{} {} ago",
            state[..1].to_uppercase(),
            &state[1..],
            ago(t.task.task.state_since_ms)
        );
        let addrs: Vec<String> = t.addresses.iter().map(|(n, ip)| format!("{n}={ip}")).collect();
        let err = if matches!(
            t.task.task.state,
            shoal_scheduler::TaskState::Failed
                | shoal_scheduler::TaskState::Rejected
                | shoal_scheduler::TaskState::Pending
        ) {
            t.task.message.as_str()
        } else {
            ""
        };
        let extra = extras.get(&t.task.task.service_id);
        println!(
            "{:<26} {:<24} {:<10} {:<14} {:<28} {:<28} {:<20} {:<10} {}",
            t.task.task.id,
            name,
            t.node,
            desired,
            current,
            addrs.join(","),
            extra.map_or("", |e| e.image.as_str()),
            err,
            extra.map_or("", |e| e.ports.as_str())
        );
    }
}

/// How far along Docker's task lifecycle a state is, for the per-task bars.
fn progress_of(state: shoal_scheduler::TaskState) -> u64 {
    use shoal_scheduler::TaskState as S;
    match state {
        S::New => 1,
        S::Pending => 2,
        S::Assigned => 3,
        S::Preparing => 5,
        S::Starting => 7,
        S::Running => 8,
        _ => 0,
    }
}

/// Docker's progress display: one bar per task of the current spec ("2/3: running [====>]")
/// and the overall count; waits until every task runs and stays up a moment, and gives up
/// (exit 1) after 120 s without progress.
async fn converge(host: &Host, id: &str) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let bar_style = ProgressStyle::with_template("{prefix}: {msg:<10} [{bar:40}]")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let overall = multi.add(ProgressBar::new_spinner());
    overall.set_style(
        ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let mut last_change = Instant::now();
    let mut last = (u64::MAX, u64::MAX);
    let mut stable = 0;
    loop {
        let v: ServiceView = host.get_json(&format!("/services/{id}")).await?;
        let tasks: Vec<TaskView> = host.get_json(&format!("/services/{id}/tasks")).await?;
        for t in tasks.iter().filter(|t| {
            t.task.task.desired == shoal_scheduler::DesiredState::Running
                && t.task.task.spec_version == v.service.version
        }) {
            let key = t.task.slot_label();
            let bar = bars.entry(key.clone()).or_insert_with(|| {
                let b = multi.insert_before(&overall, ProgressBar::new(8));
                b.set_style(bar_style.clone());
                b.set_prefix(match v.service.mode {
                    shoal_scheduler::Mode::Replicated { replicas } => format!("{key}/{replicas}"),
                    shoal_scheduler::Mode::Global => t.node.clone(),
                });
                b
            });
            bar.set_message(t.task.task.state.as_str());
            bar.set_position(progress_of(t.task.task.state));
        }
        overall.set_message(format!("overall progress: {} out of {} tasks", v.running, v.desired));
        if (v.running, v.desired) != last {
            last = (v.running, v.desired);
            last_change = Instant::now();
        }
        if let Some(s) = v.service.update_status.as_ref().filter(|s| s.state == "paused") {
            overall.abandon();
            bail!("{}: {}", v.service.name, s.message);
        }
        if v.running == v.desired {
            // Docker waits for the tasks to stay up a moment: "verify: Service converged".
            stable += 1;
            if stable >= 3 {
                let done = format!(
                    "overall progress: {} out of {} tasks\nverify: Service {} converged",
                    v.running, v.desired, v.service.name
                );
                if overall.is_hidden() {
                    // Not a terminal: no bars, just the outcome.
                    println!("{done}");
                } else {
                    for b in bars.values() {
                        b.finish();
                    }
                    overall.finish_with_message(done);
                }
                return Ok(());
            }
        } else {
            stable = 0;
        }
        if last_change.elapsed() > Duration::from_secs(120) {
            overall.abandon();
            bail!(
                "service {} did not converge: {} of {} tasks running (see `shoal service ps {}`)",
                v.service.name,
                v.running,
                v.desired,
                v.service.name
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `run`'s exit code when the agent refused to make the task (Docker's 125).
pub const EXIT_NOT_RUN: u8 = 125;

pub async fn run_container(host: &Host, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let req = RunRequest {
        name: args.name.clone(),
        network: args.network.clone(),
        argv: args.command.clone(),
        env: args.env.clone(),
        // Attached, `run` removes the task itself once it has its exit code and output.
        auto_remove: args.rm && args.detach,
        mounts: args.mount.clone(),
    };
    // As `docker run`: 125 when the task could not even be made, so scripts can tell that
    // from the task's own exit code.
    let r: serde_json::Value = match host.post_json("/containers", &req).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", describe(&e));
            return Ok(ExitCode::from(EXIT_NOT_RUN));
        }
    };
    if args.detach {
        println!("{}", r["id"].as_str().unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    crate::attach::run_attached(host, &args.name, args.rm).await
}

/// `shoal ps`: standalone tasks that run (or are being started); with `all`, ended ones too.
pub async fn ps(host: &Host, all: bool, quiet: bool) -> anyhow::Result<()> {
    let mut tasks: Vec<TaskView> = host.get_json("/containers").await?;
    if !all {
        tasks.retain(|t| !t.task.task.state.is_terminal());
    }
    if quiet {
        tasks.iter().for_each(|t| println!("{}", t.task.task.id));
    } else {
        print_tasks(&tasks, &BTreeMap::new());
    }
    Ok(())
}

/// `node inspect --pretty`: the node record, then its data path as the node sees it.
pub fn print_node_pretty(n: &shoal_cluster::NodeView, d: &serde_json::Value) {
    let r = &n.record;
    println!("ID:                 {}", r.id);
    println!("Hostname:           {}", r.hostname);
    println!("Status:             {} {}", r.status, r.status_message);
    println!("Availability:       {}", r.availability);
    println!("Role:               {}", r.role);
    if let Some(m) = &n.manager_status {
        println!("Manager Status:     {m}");
    }
    println!("Address:            {} (control {})", r.data_addr, r.addr);
    if !r.labels.is_empty() {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Labels:             {}", labels.join(", "));
    }
    println!("Engine Version:     {}", r.engine_version);
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    let members = d["gossip"]["members"].as_array().cloned().unwrap_or_default();
    println!("\nGossip ({} members, {} entries):", members.len(), s(&d["gossip"]["entries"]));
    for m in &members {
        println!(
            "  {:<14} {:<22} {:<8} incarnation {}",
            s(&m["name"]),
            s(&m["addr"]),
            s(&m["state"]),
            s(&m["incarnation"])
        );
    }
    let peers = d["peers"].as_array().cloned().unwrap_or_default();
    println!("\nWireGuard peers ({}):", peers.len());
    for p in &peers {
        let age =
            p["handshake_age_secs"].as_f64().map_or("never".into(), |a| format!("{a:.0}s ago"));
        println!(
            "  {:<14} {:<22} {:<12} handshake {:<10} tx {} B rx {} B",
            s(&p["node"]),
            s(&p["endpoint"]),
            if p["established"] == true { "established" } else { "down" },
            age,
            s(&p["tx_bytes"]),
            s(&p["rx_bytes"])
        );
    }
    println!("\nNetworks and forwarding entries:");
    if let Some(nets) = d["networks"].as_object() {
        for (name, n) in nets {
            println!(
                "  {name} (VNI {}, {}{}): {} local endpoint(s)",
                s(&n["vni"]),
                s(&n["subnet"]),
                if n["encrypted"] == true { ", encrypted" } else { "" },
                n["local_endpoints"].as_array().map_or(0, Vec::len)
            );
            for e in n["remote"].as_array().into_iter().flatten() {
                println!("    {:<16} {}  -> {}", s(&e["ip"]), s(&e["mac"]), s(&e["node"]));
            }
        }
    }
    println!("\nRouting mesh:");
    for svc in d["mesh"].as_array().into_iter().flatten() {
        println!(
            "  {} (refused for want of a backend: {}; client address kept {}, fallen back {})",
            s(&svc["service"]),
            s(&svc["no_backend"]),
            s(&svc["client_addr_kept"]),
            s(&svc["client_addr_fallback"])
        );
        for b in svc["backends"].as_array().into_iter().flatten() {
            println!(
                "    {:<16} {:<6} active {} total {} errors {}",
                s(&b["addr"]),
                s(&b["health"]),
                s(&b["active"]),
                s(&b["connections"]),
                s(&b["errors"])
            );
        }
    }
    println!("\nDNS names by network:");
    if let Some(nets) = d["dns"].as_object() {
        for (net, names) in nets {
            println!("  {net}:");
            for (name, addrs) in names.as_object().into_iter().flatten() {
                let a: Vec<String> = addrs.as_array().into_iter().flatten().map(&s).collect();
                println!("    {name:<28} {}", a.join(" "));
            }
        }
    }
    let tasks = d["tasks"].as_array().cloned().unwrap_or_default();
    println!("\nTasks on this node ({}):", tasks.len());
    for t in &tasks {
        println!("  {:<28} {:<10} pid {}", s(&t["name"]), s(&t["state"]), s(&t["pid"]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_dockers() {
        let api = |status, message: &str| {
            anyhow::Error::new(ApiError { status, message: message.to_owned() })
        };
        assert_eq!(describe(&api(404, "No such service: x")), "Error: No such service: x");
        assert_eq!(
            describe(&api(409, "network with name n already exists")),
            "Error response from daemon: network with name n already exists"
        );
        assert_eq!(
            describe(&api(404, "no such endpoint: GET /x")),
            "Error response from daemon: no such endpoint: GET /x"
        );
        assert_eq!(
            describe(&anyhow::anyhow!("invalid service \"a/b\"")),
            "Error: invalid service \"a/b\""
        );
        let wrapped = api(404, "No such service: x").context("asking");
        assert_eq!(describe(&wrapped), "Error: asking: No such service: x");
    }
}
