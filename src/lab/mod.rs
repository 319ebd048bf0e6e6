//! The lab: a whole cluster on one machine. `up` makes N hosts `node1..nodeN` as network
//! namespaces on an isolated bridge (underlay 198.18.0.0/24 by default, no route out of the
//! machine), gives the host the .254 address on that bridge, and starts one real `shoal agent`
//! per node. `down` removes every namespace, link, process and file the lab made, also for a lab
//! whose agents crashed or whose `up` failed half way.
//!
//! Everything a lab owns is named after it: namespaces `LAB-nodeI`, the bridge `LAB-br`, host
//! veths `LAB-nI`, and the directory `/run/shoal/lab/LAB/` (lab.json, node sockets, data dirs,
//! logs). So labs with different names and subnets coexist.
//!
//! With `--data-subnet` every node also gets `eth1` on a second bridge `LAB-bd` (host veths
//! `LAB-dI`, no host address), to keep data-path traffic apart from the control plane's
//! (`swarm init/join --data-path-addr`).
//!
//! All namespaces share the host's one ARP table: `up` raises its limits and the last `down`
//! restores them (`neigh`).

pub mod demo;
mod down;
mod neigh;
mod up;

use down::is_zombie;
pub use down::{Removed, down, stop_node};
pub use up::{gossip_key_path, start_node, up, up_hosts};

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use shoal_netns::NetNs;

use crate::api::client::Host;
use crate::config::ClusterTuning;

/// Where labs keep their state.
pub const LAB_ROOT: &str = "/run/shoal/lab";
/// The lab used when `--lab` is not given.
pub const DEFAULT_LAB: &str = "shoal";
/// The default underlay subnet.
pub const DEFAULT_SUBNET: &str = "198.18.0.0/24";
/// The host's address on the lab bridge (last octet).
pub const HOST_OCTET: u8 = 254;
/// At most this many nodes per lab (addresses .1 .. .N, below the host's .254).
pub const MAX_NODES: u8 = 64;

/// What a lab looks like on disk (`lab.json`); written before anything is made, so a failed or
/// crashed lab can always be cleaned up from it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabState {
    pub name: String,
    pub subnet: Ipv4Net,
    pub bridge: String,
    pub host_addr: Ipv4Addr,
    pub nodes: Vec<LabNode>,
    /// Agents run standalone gossip from a shared key instead of waiting for a swarm.
    #[serde(default)]
    pub standalone_gossip: bool,
    /// The agents' `--dns-resolv-conf` (upstreams of the tasks' DNS), when set.
    #[serde(default)]
    pub dns_resolv_conf: Option<PathBuf>,
    /// The second underlay (`eth1` of every node on the bridge `LAB-bd`), when asked for.
    #[serde(default)]
    pub data_subnet: Option<Ipv4Net>,
    /// The agents' `--cluster-tuning`: fast by default, so that labs show failover quickly;
    /// `default` runs them with production timings (the benchmarks measure both).
    #[serde(default = "fast_tuning")]
    pub cluster_tuning: ClusterTuning,
}

fn fast_tuning() -> ClusterTuning {
    ClusterTuning::Fast
}

/// One host of the lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Its address on the lab's second underlay (`eth1`), when the lab has one.
    #[serde(default)]
    pub data_addr: Option<Ipv4Addr>,
    pub host_veth: String,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub pid: Option<u32>,
}

/// Checks a lab name: it prefixes link names, which have 15 bytes at most.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=8).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!(
            "invalid lab name {name:?}: use 1-8 lowercase letters and digits, starting with a letter"
        );
    }
    Ok(())
}

/// Checks an underlay subnet: a /24 inside 198.18.0.0/15 (RFC 2544, never routed).
pub fn parse_subnet(s: &str) -> anyhow::Result<Ipv4Net> {
    let net: Ipv4Net = s
        .parse()
        .with_context(|| format!("invalid subnet {s:?}: expected a CIDR like 198.18.1.0/24"))?;
    let bench: Ipv4Net = "198.18.0.0/15".parse().context("constant")?;
    if net.prefix_len() != 24 || !bench.contains(&net) || net.network() != net.addr() {
        bail!("invalid subnet {s}: the lab takes a /24 inside 198.18.0.0/15, e.g. 198.18.1.0/24");
    }
    Ok(net)
}

/// The directory of a lab.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// The API socket of a lab node.
pub fn node_socket(lab: &str, node: &str) -> PathBuf {
    lab_dir(lab).join(format!("{node}.sock"))
}

impl LabState {
    /// The plan for a lab: names and addresses, nothing made yet.
    pub fn plan(name: &str, nodes: u8, subnet: Ipv4Net) -> anyhow::Result<LabState> {
        validate_name(name)?;
        if !(1..=MAX_NODES).contains(&nodes) {
            bail!("invalid --nodes {nodes}: a lab has 1 to {MAX_NODES} nodes");
        }
        let dir = lab_dir(name);
        let base = u32::from(subnet.network());
        let nodes = (1..=nodes)
            .map(|i| {
                let node = format!("node{i}");
                LabNode {
                    netns: format!("{name}-{node}"),
                    addr: Ipv4Addr::from(base + u32::from(i)),
                    data_addr: None,
                    host_veth: format!("{name}-n{i}"),
                    socket: dir.join(format!("{node}.sock")),
                    data_dir: dir.join(&node).join("data"),
                    log: dir.join(&node).join("agent.log"),
                    pid: None,
                    name: node,
                }
            })
            .collect();
        Ok(LabState {
            name: name.to_owned(),
            subnet,
            bridge: format!("{name}-br"),
            host_addr: Ipv4Addr::from(base + u32::from(HOST_OCTET)),
            nodes,
            standalone_gossip: false,
            dns_resolv_conf: None,
            cluster_tuning: ClusterTuning::Fast,
            data_subnet: None,
        })
    }

    /// Adds the second underlay: node I gets address .I of `data` on `eth1`.
    pub fn with_data_subnet(mut self, data: Ipv4Net) -> anyhow::Result<LabState> {
        if data == self.subnet {
            bail!("the data subnet {data} is the lab's subnet; pick another /24");
        }
        let base = u32::from(data.network());
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.data_addr = Some(Ipv4Addr::from(base + 1 + i as u32));
        }
        self.data_subnet = Some(data);
        Ok(self)
    }

    /// The second underlay's bridge, `LAB-bd`.
    pub fn data_bridge(&self) -> String {
        format!("{}-bd", self.name)
    }

    /// Reads a lab's `lab.json`.
    pub fn load(name: &str) -> anyhow::Result<LabState> {
        let path = lab_dir(name).join("lab.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("lab {name:?} not found ({})", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
    }

    fn save(&self) -> anyhow::Result<()> {
        let dir = lab_dir(&self.name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join("lab.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, dir.join("lab.json"))?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&LabNode> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let names: Vec<_> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!("lab {:?} has no node {name:?} (it has {})", self.name, names.join(", "))
        })
    }
}

/// Names of the labs that have a state directory.
pub fn list_labs() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(LAB_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("lab.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Runs a command inside a lab node's namespace with this terminal's stdio; returns its exit code.
pub fn exec(lab: &str, node: &str, argv: &[String]) -> anyhow::Result<i32> {
    let state = LabState::load(lab)?;
    let node = state.node(node)?;
    let (prog, args) = argv.split_first().context("lab exec needs a command after --")?;
    let ns =
        NetNs::open(&node.netns).with_context(|| format!("node {} of lab {lab}", node.name))?;
    let mut cmd = Command::new(prog);
    cmd.args(args).env("SHOAL_HOST", format!("unix://{}", node.socket.display()));
    let mut child =
        ns.run(|| cmd.spawn())?.with_context(|| format!("running {prog:?} in {}", node.name))?;
    let status = child.wait()?;
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

/// One line per node for `lab status`.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub addr: Ipv4Addr,
    pub netns: bool,
    pub pid: Option<u32>,
    pub agent: String,
}

/// The state of each node of a lab: namespace present, agent process alive, agent answering.
pub async fn status(lab: &str) -> anyhow::Result<(LabState, Vec<NodeStatus>)> {
    let state = LabState::load(lab)?;
    let mut out = Vec::new();
    for n in &state.nodes {
        let alive = n.pid.is_some_and(|p| !is_zombie(p as i32));
        let host = Host { socket: n.socket.clone() };
        let agent = match tokio::time::timeout(
            Duration::from_secs(2),
            host.get_json::<crate::api::NodeInfo>("/info"),
        )
        .await
        {
            Ok(Ok(info)) => format!("up {:.0}s", info.uptime_seconds),
            Ok(Err(_)) | Err(_) if !alive => "dead".to_owned(),
            Ok(Err(e)) => format!("not answering: {e}"),
            Err(_) => "not answering (timeout)".to_owned(),
        };
        out.push(NodeStatus {
            node: n.name.clone(),
            addr: n.addr,
            netns: NetNs::exists(&n.netns),
            pid: n.pid.filter(|_| alive),
            agent,
        });
    }
    Ok((state, out))
}

#[cfg(test)]
mod tests {
    use super::down::{is_lab_link, is_lab_netns};
    use super::*;

    #[test]
    fn names_and_subnets() {
        assert!(validate_name("shoal").is_ok());
        assert!(validate_name("Shoal").is_err());
        assert!(validate_name("toolongname").is_err());
        assert!(validate_name("1lab").is_err());
        assert!(parse_subnet("198.18.0.0/24").is_ok());
        assert!(parse_subnet("198.19.200.0/24").is_ok());
        assert!(parse_subnet("10.0.0.0/24").is_err(), "outside the benchmark range");
        assert!(parse_subnet("198.18.0.0/16").is_err(), "not a /24");
        assert!(parse_subnet("198.18.0.5/24").is_err(), "host bits set");
    }

    #[test]
    fn plan_names_everything_after_the_lab() {
        let s = LabState::plan("ab", 3, parse_subnet("198.18.7.0/24").unwrap()).unwrap();
        assert_eq!(s.bridge, "ab-br");
        assert_eq!(s.host_addr, Ipv4Addr::new(198, 18, 7, 254));
        assert_eq!(s.nodes[2].addr, Ipv4Addr::new(198, 18, 7, 3));
        assert_eq!(s.nodes[2].netns, "ab-node3");
        assert!(is_lab_netns("ab", "ab-node3"));
        assert!(!is_lab_netns("ab", "abc-node3"));
        assert!(!is_lab_netns("a", "ab-node3"));
        assert!(is_lab_netns("ab", "ab-node3-t-0123456789ab"));
        assert!(is_lab_netns("ab", "ab-node12-ingress"));
        assert!(!is_lab_netns("ab", "ab-nodex-ingress"));
        assert!(is_lab_link("ab", "ab-n12") && is_lab_link("ab", "ab-br"));
        assert!(is_lab_link("ab", "ab-d3") && is_lab_link("ab", "ab-bd"));
        assert!(!is_lab_link("ab", "ab-dx"));
        let d = s.clone().with_data_subnet(parse_subnet("198.19.7.0/24").unwrap()).unwrap();
        assert_eq!(d.nodes[2].data_addr, Some(Ipv4Addr::new(198, 19, 7, 3)));
        assert_eq!(d.data_bridge(), "ab-bd");
        assert!(s.clone().with_data_subnet(s.subnet).is_err());
        assert!(!is_lab_link("ab", "abx-n1"));
        assert!(LabState::plan("ab", 0, s.subnet).is_err());
        assert!(LabState::plan("ab", 65, s.subnet).is_err());
    }
}
