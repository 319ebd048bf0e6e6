//! The flags of `service create` and `service update`, and the model's requests they make
//! (`shoal_model::ServiceCreate`, `ServiceUpdate`).

use std::time::Duration;

use shoal_model::{MeshPolicyChange, PublishedPort, RolloutChange, ServiceCreate, ServiceUpdate};

use crate::mounts::MountSpec;

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

impl RolloutArgs {
    /// The change these flags ask for.
    pub fn change(&self) -> anyhow::Result<RolloutChange> {
        Ok(RolloutChange {
            update_parallelism: self.update_parallelism,
            update_delay_ms: ms(self.update_delay),
            update_failure_action: keyword(&self.update_failure_action)?,
            update_monitor_ms: ms(self.update_monitor),
        })
    }
}

/// Flags of `service create` and the command after `--`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub name: String,
    /// Number of tasks [default: 1].
    #[arg(long)]
    pub replicas: Option<u64>,
    /// `replicated` or `global`.
    #[arg(long, default_value = "replicated", value_parser = ["replicated", "global"])]
    pub mode: String,
    /// Publish a port: `8100:8100`, `53:53/udp`, or
    /// `published=8100,target=80,protocol=tcp,mode=ingress,proxy-protocol=v1|v2,mesh=kernel|proxy`.
    #[arg(short, long)]
    pub publish: Vec<PublishedPort>,
    /// Attach to a network.
    #[arg(long)]
    pub network: Vec<String>,
    /// Environment KEY=VALUE.
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// `node.role==manager`, `node.hostname!=node1`, `node.labels.zone==a`.
    #[arg(long)]
    pub constraint: Vec<String>,
    /// `vip` or `dnsrr`.
    #[arg(long, value_parser = ["vip", "dnsrr"])]
    pub endpoint_mode: Option<String>,
    /// How the routing mesh balances: `p2c` (default), `round-robin`, or `maglev` (the same
    /// client address reaches the same task through every node).
    #[arg(long, value_parser = ["p2c", "round-robin", "maglev"])]
    pub lb_algorithm: Option<String>,
    /// `any`, `on-failure` or `none`.
    #[arg(long, value_parser = ["any", "on-failure", "none"])]
    pub restart_condition: Option<String>,
    /// Delay between restarts, e.g. `5s`, `500ms`.
    #[arg(long, value_parser = parse_duration)]
    pub restart_delay: Option<Duration>,
    /// Give up restarting a slot after this many attempts (0: never).
    #[arg(long)]
    pub restart_max_attempts: Option<u64>,
    /// `stop-first` or `start-first`.
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    pub update_order: Option<String>,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub mesh: Box<MeshArgs>,
    /// Health command run inside each task (exit 0 = healthy).
    #[arg(long)]
    pub health_cmd: Option<String>,
    #[arg(long, value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    #[arg(long, value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    #[arg(long)]
    pub health_retries: Option<u32>,
    /// Time between the stop signal and SIGKILL (default 10s).
    #[arg(long, value_parser = parse_duration)]
    pub stop_grace_period: Option<Duration>,
    /// The signal that asks a task to stop (default SIGTERM), e.g. `SIGQUIT` for nginx.
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Return at once instead of showing progress.
    #[arg(short, long)]
    pub detach: bool,
    /// `type=volume,src=NAME,dst=PATH[,readonly]` or `type=bind,src=HOSTPATH,dst=PATH`.
    #[arg(long)]
    pub mount: Vec<MountSpec>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl CreateArgs {
    /// The request these flags make.
    pub fn request(&self) -> anyhow::Result<ServiceCreate> {
        Ok(ServiceCreate {
            name: self.name.clone(),
            argv: self.command.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            replicas: self.replicas,
            global: self.mode == "global",
            networks: self.network.clone(),
            publish: self.publish.clone(),
            endpoint_mode: keyword(&self.endpoint_mode)?,
            lb_algorithm: keyword(&self.lb_algorithm)?,
            mesh: self.mesh.change(),
            constraints: self.constraint.clone(),
            restart_condition: keyword(&self.restart_condition)?,
            restart_delay_ms: ms(self.restart_delay),
            restart_max_attempts: self.restart_max_attempts,
            update_order: keyword(&self.update_order)?,
            rollout: self.rollout.change()?,
            health_cmd: self.health_cmd.clone(),
            health_interval_ms: ms(self.health_interval),
            health_timeout_ms: ms(self.health_timeout),
            health_retries: self.health_retries,
            stop_grace_ms: ms(self.stop_grace_period),
            stop_signal: self.stop_signal.clone(),
            mounts: self.mount.clone(),
        })
    }
}

/// Flags of `service update` and the new command after `--`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    #[arg(long)]
    pub replicas: Option<u64>,
    #[arg(long)]
    pub network_add: Vec<String>,
    #[arg(long)]
    pub network_rm: Vec<String>,
    #[arg(long)]
    pub env_add: Vec<String>,
    #[arg(long)]
    pub env_rm: Vec<String>,
    #[arg(long)]
    pub publish_add: Vec<PublishedPort>,
    #[arg(long)]
    pub publish_rm: Vec<u16>,
    #[arg(long)]
    pub constraint_add: Vec<String>,
    #[arg(long)]
    pub constraint_rm: Vec<String>,
    #[arg(long, value_parser = ["stop-first", "start-first"])]
    pub update_order: Option<String>,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    /// How the routing mesh balances: `p2c`, `round-robin` or `maglev`.
    #[arg(long, value_parser = ["p2c", "round-robin", "maglev"])]
    pub lb_algorithm: Option<String>,
    #[command(flatten)]
    pub mesh: Box<MeshArgs>,
    /// Time between the stop signal and SIGKILL.
    #[arg(long, value_parser = parse_duration)]
    pub stop_grace_period: Option<Duration>,
    /// The signal that asks a task to stop, e.g. `SIGQUIT`.
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Replace the tasks even if nothing changed.
    #[arg(long)]
    pub force: bool,
    /// Add or replace (by target) a mount: `type=volume,src=NAME,dst=PATH`.
    #[arg(long)]
    pub mount_add: Vec<MountSpec>,
    /// Remove the mount at this target path.
    #[arg(long)]
    pub mount_rm: Vec<String>,
    #[arg(short, long)]
    pub detach: bool,
    pub service: String,
    /// A new command, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl UpdateArgs {
    /// The request these flags make.
    pub fn request(&self) -> anyhow::Result<ServiceUpdate> {
        Ok(ServiceUpdate {
            replicas: self.replicas,
            argv: (!self.command.is_empty()).then(|| self.command.clone()),
            env_add: self.env_add.clone(),
            env_rm: self.env_rm.clone(),
            network_add: self.network_add.clone(),
            network_rm: self.network_rm.clone(),
            publish_add: self.publish_add.clone(),
            publish_rm: self.publish_rm.clone(),
            constraint_add: self.constraint_add.clone(),
            constraint_rm: self.constraint_rm.clone(),
            update_order: keyword(&self.update_order)?,
            rollout: self.rollout.change()?,
            stop_grace_ms: ms(self.stop_grace_period),
            stop_signal: self.stop_signal.clone(),
            force: self.force,
            mount_add: self.mount_add.clone(),
            mount_rm: self.mount_rm.clone(),
            lb_algorithm: keyword(&self.lb_algorithm)?,
            mesh: self.mesh.change(),
        })
    }
}

/// The routing-mesh policy flags, the same on `service create` and `service update`.
#[derive(Debug, Clone, clap::Args)]
pub struct MeshArgs {
    /// Reset a mesh TCP connection idle this long, e.g. `15m` (the default); `0s`: never.
    #[arg(long, value_parser = parse_duration)]
    pub mesh_idle_timeout: Option<Duration>,
    /// Open mesh connections per node (default 10000; 0: no limit); more are refused.
    #[arg(long)]
    pub mesh_max_connections: Option<u32>,
    /// The mesh's own check of each task: `tcp` (default), `http:PATH` or `none`. A task gets
    /// traffic while its `--health-cmd` (if any) and this check both pass.
    #[arg(long)]
    pub mesh_check: Option<String>,
    /// Time between two mesh checks of a task, e.g. `2s` (the default).
    #[arg(long, value_parser = parse_duration)]
    pub mesh_check_interval: Option<Duration>,
    /// Passes in a row that bring a task up (default 2).
    #[arg(long)]
    pub mesh_check_rise: Option<u32>,
    /// Failures in a row that take a task down (default 3).
    #[arg(long)]
    pub mesh_check_fall: Option<u32>,
    /// UDP flows per node (default 10000; 0: no limit).
    #[arg(long)]
    pub mesh_max_udp_flows: Option<u32>,
    /// UDP flows per client address and published port on a node (default 256; 0: no limit).
    #[arg(long)]
    pub mesh_max_udp_flows_per_source: Option<u32>,
}

impl MeshArgs {
    /// The change these flags ask for.
    pub fn change(&self) -> MeshPolicyChange {
        MeshPolicyChange {
            mesh_idle_timeout_ms: ms(self.mesh_idle_timeout),
            mesh_max_connections: self.mesh_max_connections,
            mesh_check: self.mesh_check.clone(),
            mesh_check_interval_ms: ms(self.mesh_check_interval),
            mesh_check_rise: self.mesh_check_rise,
            mesh_check_fall: self.mesh_check_fall,
            mesh_max_udp_flows: self.mesh_max_udp_flows,
            mesh_max_udp_flows_per_source: self.mesh_max_udp_flows_per_source,
        }
    }
}

/// A duration as Docker's flags take it: `5s`, `500ms`, `1m30s` (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 5s, 500ms, 1m30s)"))
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis() as u64)
}

/// A keyword flag (`--endpoint-mode dnsrr`) as the model's type: clap has already held it to
/// the model's words, which are the type's serde names.
fn keyword<T: serde::de::DeserializeOwned>(v: &Option<String>) -> anyhow::Result<Option<T>> {
    Ok(v.as_ref().map(|s| serde_json::from_value(serde_json::json!(s))).transpose()?)
}
