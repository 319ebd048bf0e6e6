//! The routing-mesh policy flags, the same on `service create` and `service update`.

use std::time::Duration;

use shoal_model::MeshPolicyChange;

use super::parse_duration;

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
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
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
