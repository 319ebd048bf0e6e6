//! A service's routing-mesh policy as the store holds it: idle timeout, limits and the mesh's
//! own health check. `service create` and `service update` change it with [`MeshPolicyChange`];
//! every node turns it into the mesh's own spec at the model's edge (`src/from_model.rs`).
//!
//! One health view per task: a task gets new connections through the mesh only while both
//! say yes. Its own `--health-cmd` (run by the node that runs it) decides whether it is
//! *serving*, which every node learns through gossip; a task that is not serving is
//! `not_ready` in every mesh. The mesh check (`--mesh-check`, run by each node's mesh against
//! the task's address) then decides `up` or `down` for that node; a task that comes back to
//! serving must pass the mesh check `rise` times again. `/metrics` shows the one state per
//! backend as `shoal_mesh_backend_health{state=...}`.
//!
//! A policy change reaches every node's running mesh in place: listeners stay bound, open
//! connections keep their backend and the idle timeout they started with.

use serde::{Deserialize, Serialize};

/// The mesh's own active check of a service's tasks.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MeshCheck {
    /// A TCP connect to the first TCP target port (the default).
    #[default]
    Tcp,
    /// `GET PATH` must answer 2xx or 3xx.
    Http(String),
    /// No active check: the task's own state alone decides (and connect failures eject).
    None,
}

impl TryFrom<String> for MeshCheck {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MeshCheck> for String {
    fn from(c: MeshCheck) -> String {
        match c {
            MeshCheck::Tcp => "tcp".into(),
            MeshCheck::Http(p) => format!("http:{p}"),
            MeshCheck::None => "none".into(),
        }
    }
}

impl std::str::FromStr for MeshCheck {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(MeshCheck::Tcp),
            "none" => Ok(MeshCheck::None),
            _ => match s.strip_prefix("http:") {
                Some(path)
                    if path.starts_with('/') && !path.bytes().any(|b| b <= b' ' || b == 0x7f) =>
                {
                    Ok(MeshCheck::Http(path.to_owned()))
                }
                _ => Err(format!(
                    "invalid mesh-check {s:?}: tcp, none or http:PATH (PATH starts with / and has no spaces)"
                )),
            },
        }
    }
}

/// The mesh policy of a service (zero limits mean none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeshPolicy {
    /// A TCP connection without bytes either way for this long is reset (0: never).
    pub idle_timeout_ms: u64,
    /// Open TCP connections per node; more are refused and counted.
    pub max_connections: u32,
    /// The mesh's active check.
    pub check: MeshCheck,
    /// Time between two checks of one task by one node.
    pub check_interval_ms: u64,
    /// Passes in a row that bring a task up.
    pub check_rise: u32,
    /// Failures in a row that take a task down.
    pub check_fall: u32,
    /// UDP flows per node; datagrams that would open more are dropped and counted.
    pub max_udp_flows: u32,
    /// UDP flows per client address and published port on one node.
    pub max_udp_flows_per_source: u32,
}

impl Default for MeshPolicy {
    fn default() -> Self {
        MeshPolicy {
            idle_timeout_ms: 15 * 60 * 1000,
            max_connections: 10_000,
            check: MeshCheck::Tcp,
            check_interval_ms: 2_000,
            check_rise: 2,
            check_fall: 3,
            max_udp_flows: 10_000,
            max_udp_flows_per_source: 256,
        }
    }
}

/// What `service create` / `service update` ask to change (`None`: keep).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeshPolicyChange {
    pub mesh_idle_timeout_ms: Option<u64>,
    pub mesh_max_connections: Option<u32>,
    pub mesh_check: Option<String>,
    pub mesh_check_interval_ms: Option<u64>,
    pub mesh_check_rise: Option<u32>,
    pub mesh_check_fall: Option<u32>,
    pub mesh_max_udp_flows: Option<u32>,
    pub mesh_max_udp_flows_per_source: Option<u32>,
}

/// The shortest check interval: checks from every node to every task add up.
pub const MIN_CHECK_INTERVAL_MS: u64 = 100;
/// Limits on rise and fall that still mean something.
const MAX_RISE_FALL: u32 = 100;

impl MeshPolicy {
    /// This policy with `c` applied, or what is wrong with `c` (naming the flag).
    pub fn changed(&self, c: &MeshPolicyChange) -> Result<MeshPolicy, String> {
        let mut p = self.clone();
        if let Some(ms) = c.mesh_idle_timeout_ms {
            p.idle_timeout_ms = ms;
        }
        if let Some(n) = c.mesh_max_connections {
            p.max_connections = n;
        }
        if let Some(s) = &c.mesh_check {
            p.check = s.parse()?;
        }
        if let Some(ms) = c.mesh_check_interval_ms {
            if ms < MIN_CHECK_INTERVAL_MS {
                return Err(format!(
                    "invalid mesh-check-interval {ms}ms: at least {MIN_CHECK_INTERVAL_MS}ms"
                ));
            }
            p.check_interval_ms = ms;
        }
        for (flag, v, field) in [
            ("mesh-check-rise", c.mesh_check_rise, &mut p.check_rise),
            ("mesh-check-fall", c.mesh_check_fall, &mut p.check_fall),
        ] {
            if let Some(n) = v {
                if n == 0 || n > MAX_RISE_FALL {
                    return Err(format!("invalid {flag} {n}: 1 to {MAX_RISE_FALL}"));
                }
                *field = n;
            }
        }
        if let Some(n) = c.mesh_max_udp_flows {
            p.max_udp_flows = n;
        }
        if let Some(n) = c.mesh_max_udp_flows_per_source {
            p.max_udp_flows_per_source = n;
        }
        Ok(p)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_and_bad_ones_say_why() {
        assert_eq!("tcp".parse(), Ok(MeshCheck::Tcp));
        assert_eq!("none".parse(), Ok(MeshCheck::None));
        assert_eq!("http:/healthz".parse(), Ok(MeshCheck::Http("/healthz".into())));
        for bad in ["http:", "http:healthz", "http:/a b", "udp", ""] {
            let e = bad.parse::<MeshCheck>().unwrap_err();
            assert!(e.contains("mesh-check"), "{e}");
        }
        let s = serde_json::to_string(&MeshCheck::Http("/h".into())).unwrap();
        assert_eq!(s, "\"http:/h\"");
    }

    #[test]
    fn a_change_keeps_what_it_does_not_name_and_refuses_nonsense() {
        let p = MeshPolicy::default();
        let c = MeshPolicyChange { mesh_check_rise: Some(5), ..Default::default() };
        let q = p.changed(&c).unwrap();
        assert_eq!(q, MeshPolicy { check_rise: 5, ..p.clone() });
        for bad in [
            MeshPolicyChange { mesh_check_fall: Some(0), ..Default::default() },
            MeshPolicyChange { mesh_check_interval_ms: Some(10), ..Default::default() },
            MeshPolicyChange { mesh_check: Some("ping".into()), ..Default::default() },
        ] {
            assert!(p.changed(&bad).is_err(), "{bad:?}");
        }
    }
}
