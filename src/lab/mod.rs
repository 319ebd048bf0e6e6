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
mod neigh;

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};
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

/// Brings a lab up; on any failure, removes whatever it had made and returns the error.
#[allow(clippy::too_many_arguments)]
pub async fn up(
    name: &str,
    nodes: u8,
    subnet: Ipv4Net,
    data_subnet: Option<Ipv4Net>,
    gossip: bool,
    dns_resolv_conf: Option<PathBuf>,
    cluster_tuning: ClusterTuning,
    agent_exe: &Path,
) -> anyhow::Result<LabState> {
    let agents = Some((agent_exe, cluster_tuning));
    make(name, nodes, subnet, data_subnet, gossip, dns_resolv_conf, agents).await
}

/// Brings up the hosts of a lab (namespaces on the bridge) without agents, for installing shoal
/// on them as on real machines; `down` removes them and every process left inside.
pub async fn up_hosts(name: &str, nodes: u8, subnet: Ipv4Net) -> anyhow::Result<LabState> {
    make(name, nodes, subnet, None, false, None, None).await
}

async fn make(
    name: &str,
    nodes: u8,
    subnet: Ipv4Net,
    data_subnet: Option<Ipv4Net>,
    gossip: bool,
    dns_resolv_conf: Option<PathBuf>,
    agents: Option<(&Path, ClusterTuning)>,
) -> anyhow::Result<LabState> {
    let mut state = LabState::plan(name, nodes, subnet)?;
    if let Some((_, tuning)) = agents {
        state.cluster_tuning = tuning;
    }
    let agent_exe = agents.map(|(exe, _)| exe);
    if let Some(d) = data_subnet {
        state = state.with_data_subnet(d)?;
    }
    state.standalone_gossip = gossip;
    state.dns_resolv_conf = dns_resolv_conf;
    if lab_dir(name).exists() || NetNs::list().iter().any(|n| is_lab_netns(name, n)) {
        bail!("lab {name:?} already exists; run `shoal lab down --lab {name}` first");
    }
    for other in list_labs() {
        let Ok(o) = LabState::load(&other) else { continue };
        let theirs = [Some(o.subnet), o.data_subnet];
        for ours in [Some(subnet), data_subnet].into_iter().flatten() {
            if theirs.contains(&Some(ours)) {
                bail!(
                    "subnet {ours} is already used by lab {other:?}; pick another with --subnet or --data-subnet"
                );
            }
        }
    }
    let host_ip = IpAddr::V4(state.host_addr);
    if nix::ifaddrs::getifaddrs()?
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
        .any(|a| a == host_ip)
    {
        bail!("{host_ip} is already assigned on this host; pick another --subnet");
    }
    state.save()?;
    if let Err(e) = neigh::raise() {
        tracing::warn!(error = %e, "could not raise the host's neighbour thresholds");
    }
    if gossip {
        write_gossip_key(name)?;
    }
    match build(&mut state, agent_exe).await {
        Ok(()) => Ok(state),
        Err(e) => {
            if let Err(clean) = down(name).await {
                tracing::warn!(error = %clean, "cleaning up the failed lab");
            }
            Err(e.context(format!("bringing lab {name:?} up (removed what was made)")))
        }
    }
}

async fn build(state: &mut LabState, agent_exe: Option<&Path>) -> anyhow::Result<()> {
    let (conn, host, _) = rtnetlink::new_connection().context("netlink socket")?;
    tokio::spawn(conn);

    host.link()
        .add(LinkBridge::new(&state.bridge).build())
        .execute()
        .await
        .with_context(|| format!("creating bridge {}", state.bridge))?;
    let br = shoal_netns::link_index(&host, &state.bridge).await.context("bridge vanished")?;
    host.address()
        .add(br, IpAddr::V4(state.host_addr), state.subnet.prefix_len())
        .execute()
        .await
        .with_context(|| format!("adding {} to {}", state.host_addr, state.bridge))?;
    host.link().set(LinkUnspec::new_with_index(br).up().build()).execute().await?;

    for node in &state.nodes {
        let ns = NetNs::create(&node.netns)?;
        // The peer end is born inside the node's namespace, already named eth0.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth0")
            .setns_by_fd(ns.as_fd().as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(node.host_veth.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        host.link()
            .add(veth)
            .execute()
            .await
            .with_context(|| format!("creating veth {}", node.host_veth))?;
        let hv = shoal_netns::link_index(&host, &node.host_veth).await.context("veth vanished")?;
        host.link()
            .set(LinkUnspec::new_with_index(hv).controller(br).up().build())
            .execute()
            .await?;

        let inner = ns.netlink()?;
        for (link, addr) in [("lo", None), ("eth0", Some(node.addr))] {
            let idx = shoal_netns::link_index(&inner, link)
                .await
                .with_context(|| format!("{link} in {}", node.netns))?;
            if let Some(a) = addr {
                inner
                    .address()
                    .add(idx, IpAddr::V4(a), state.subnet.prefix_len())
                    .execute()
                    .await?;
            }
            inner.link().set(LinkUnspec::new_with_index(idx).up().build()).execute().await?;
        }
    }
    if let Some(data) = state.data_subnet {
        build_data_underlay(state, &host, data).await?;
    }

    let Some(agent_exe) = agent_exe else {
        return Ok(());
    };
    let seed = state.standalone_gossip.then_some(state.nodes[0].addr);
    for i in 0..state.nodes.len() {
        let pid = spawn_agent(
            &state.nodes[i],
            seed,
            state.dns_resolv_conf.as_deref(),
            state.cluster_tuning,
            agent_exe,
        )?;
        state.nodes[i].pid = Some(pid);
        state.save()?;
    }
    for node in &state.nodes {
        wait_for_agent(node, Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// The second underlay: a bridge with no host address, and `eth1` in every node on it.
async fn build_data_underlay(
    state: &LabState,
    host: &rtnetlink::Handle,
    data: Ipv4Net,
) -> anyhow::Result<()> {
    let bridge = state.data_bridge();
    host.link()
        .add(LinkBridge::new(&bridge).build())
        .execute()
        .await
        .with_context(|| format!("creating bridge {bridge}"))?;
    let br = shoal_netns::link_index(host, &bridge).await.context("bridge vanished")?;
    host.link().set(LinkUnspec::new_with_index(br).up().build()).execute().await?;
    for (i, node) in state.nodes.iter().enumerate() {
        let addr = node.data_addr.context("a node of a lab with a data subnet has no address")?;
        let ns = NetNs::open(&node.netns)?;
        let veth_name = format!("{}-d{}", state.name, i + 1);
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth1")
            .setns_by_fd(ns.as_fd().as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(veth_name.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        host.link()
            .add(veth)
            .execute()
            .await
            .with_context(|| format!("creating veth {veth_name}"))?;
        let hv = shoal_netns::link_index(host, &veth_name).await.context("veth vanished")?;
        host.link()
            .set(LinkUnspec::new_with_index(hv).controller(br).up().build())
            .execute()
            .await?;
        let inner = ns.netlink()?;
        let idx = shoal_netns::link_index(&inner, "eth1")
            .await
            .with_context(|| format!("eth1 in {}", node.netns))?;
        inner.address().add(idx, IpAddr::V4(addr), data.prefix_len()).execute().await?;
        inner.link().set(LinkUnspec::new_with_index(idx).up().build()).execute().await?;
    }
    Ok(())
}

/// The lab's gossip key, shared by its agents (mode 0600).
pub fn gossip_key_path(lab: &str) -> PathBuf {
    lab_dir(lab).join("gossip.key")
}

fn write_gossip_key(lab: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key: [u8; 32] = rand::random();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(gossip_key_path(lab))?;
    writeln!(f, "{}", hex::encode(key))?;
    Ok(())
}

/// How a lab's agents gossip: standalone through a seed, or as the swarm says (None).
fn spawn_agent(
    node: &LabNode,
    gossip_seed: Option<Ipv4Addr>,
    dns_resolv_conf: Option<&Path>,
    cluster_tuning: ClusterTuning,
    agent_exe: &Path,
) -> anyhow::Result<u32> {
    let lab_dir = node.socket.parent().context("lab node socket has no directory")?;
    fs::create_dir_all(&node.data_dir)?;
    let log = fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
    let mut cmd = Command::new(agent_exe);
    cmd.arg("agent")
        .args(["--node-name", &node.name])
        .arg("--data-dir")
        .arg(&node.data_dir)
        .arg("--socket")
        .arg(&node.socket)
        .args(["--advertise-addr", &node.addr.to_string()])
        // Each manager's page at its lab address, where the host can open it.
        .args(["--ui-addr", &format!("{}:{}", node.addr, crate::config::DEFAULT_UI_PORT)])
        .args(["--log-format", "json"])
        // Labs are for seeing things happen: Raft and heartbeats on short timers, unless the
        // lab was asked for production ones.
        .args(["--cluster-tuning", cluster_tuning.as_arg()])
        // The namespaces it makes for tasks and networks carry the node's name, so `lab down`
        // finds them and two labs never collide.
        .args(["--netns-prefix", &node.netns])
        .env_remove("SHOAL_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own session: the agent outlives `lab up` and ignores the terminal's ^C.
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("SHOAL_") && k != "SHOAL_LOG_LEVEL") {
            cmd.env_remove(k);
        }
    }
    if let Some(path) = dns_resolv_conf {
        cmd.arg("--dns-resolv-conf").arg(path);
    }
    if let Some(seed) = gossip_seed {
        cmd.arg("--gossip-key-file")
            .arg(lab_dir.join("gossip.key"))
            .args(["--gossip-seed", &format!("{seed}:7946")]);
    }
    let ns = NetNs::open(&node.netns)?;
    let child =
        ns.run(|| cmd.spawn())?.with_context(|| format!("starting the agent of {}", node.name))?;
    Ok(child.id())
}

async fn wait_for_agent(node: &LabNode, timeout: Duration) -> anyhow::Result<()> {
    let host = Host { socket: node.socket.clone() };
    let deadline = Instant::now() + timeout;
    loop {
        match host.get_json::<crate::api::NodeInfo>("/info").await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                let tail = fs::read_to_string(&node.log).unwrap_or_default();
                let tail: Vec<_> = tail.lines().rev().take(5).collect();
                bail!(
                    "agent of {} did not answer within {timeout:?}: {e}\nlast log lines: {tail:?}",
                    node.name
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A node's namespace (`LAB-nodeN`) or one its agent made (`LAB-nodeN-…`: tasks, sandboxes).
fn is_lab_netns(lab: &str, ns: &str) -> bool {
    ns.strip_prefix(lab).and_then(|r| r.strip_prefix("-node")).is_some_and(|r| {
        let n = r.split_once('-').map_or(r, |(n, _)| n);
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

fn is_lab_link(lab: &str, link: &str) -> bool {
    link == format!("{lab}-br")
        || link == format!("{lab}-bd")
        || link
            .strip_prefix(lab)
            .and_then(|r| r.strip_prefix("-n").or_else(|| r.strip_prefix("-d")))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub dir: bool,
}

/// Tears a lab down: agents (SIGTERM, then SIGKILL after 5 s), every process left in its
/// namespaces, the namespaces, the bridge and host veths, and its directory. Works from the
/// names alone when `lab.json` is missing or the agents are already dead.
pub async fn down(name: &str) -> anyhow::Result<Removed> {
    validate_name(name)?;
    let mut removed = Removed::default();
    let state = LabState::load(name).ok();
    let mut namespaces: Vec<String> =
        NetNs::list().into_iter().filter(|n| is_lab_netns(name, n)).collect();
    // A namespace file that lost its mount still has to go.
    if let Some(s) = &state {
        for n in &s.nodes {
            if !namespaces.contains(&n.netns) && shoal_netns::path_of(&n.netns).exists() {
                namespaces.push(n.netns.clone());
            }
        }
    }

    let mut pids: Vec<i32> = Vec::new();
    for ns in namespaces.iter().filter_map(|n| NetNs::open(n).ok()) {
        pids.extend(ns.pids());
    }
    if let Some(s) = &state {
        // An agent that somehow left its namespace is still ours if it is a shoal agent.
        for pid in s.nodes.iter().filter_map(|n| n.pid) {
            let pid = pid as i32;
            let is_agent = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice()))
                .unwrap_or(false);
            if is_agent && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    removed.processes = pids.len();
    stop_processes(&pids, Duration::from_secs(5)).await;
    // An agent still starting up when it was stopped may have made namespaces (and started
    // tasks in them) after the list above, and a stopped agent leaves its sandboxes for the
    // next run to adopt: take those too.
    for _ in 0..3 {
        let late: Vec<String> = NetNs::list()
            .into_iter()
            .filter(|n| is_lab_netns(name, n) && !namespaces.contains(n))
            .collect();
        if late.is_empty() {
            break;
        }
        let pids: Vec<i32> =
            late.iter().filter_map(|n| NetNs::open(n).ok()).flat_map(|ns| ns.pids()).collect();
        removed.processes += pids.len();
        stop_processes(&pids, Duration::from_secs(5)).await;
        namespaces.extend(late);
    }

    for ns in &namespaces {
        NetNs::delete(ns)?;
        removed.namespaces.push(ns.clone());
    }

    let (conn, host, _) = rtnetlink::new_connection().context("netlink socket")?;
    tokio::spawn(conn);
    let mut links = host.link().get().execute();
    let mut doomed = Vec::new();
    while let Some(msg) = links.try_next().await? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(n) = attr
                && is_lab_link(name, n)
            {
                doomed.push((msg.header.index, n.clone()));
            }
        }
    }
    for (idx, n) in doomed {
        match host.link().del(idx).execute().await {
            Ok(()) => removed.links.push(n),
            // A veth disappears with its peer's namespace; that is fine.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(e).with_context(|| format!("deleting link {n}")),
        }
    }

    demo::remove_made_dirs(name).await;
    let dir = lab_dir(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.dir = true;
    }
    if let Err(e) = neigh::restore_if_last(list_labs().len()) {
        tracing::warn!(error = %e, "restoring the host's neighbour thresholds");
    }
    Ok(removed)
}

async fn stop_processes(pids: &[i32], grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let alive = |pid: i32| kill(Pid::from_raw(pid), None).is_ok() && !is_zombie(pid);
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Stops one node's agent: SIGTERM (or SIGKILL with `kill`, to simulate a crash), then waits
/// for it to exit. The node's namespace and links stay.
pub async fn stop_node(lab: &str, node: &str, kill: bool) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    let n = state.node(node)?;
    let pid = n
        .pid
        .filter(|p| !is_zombie(*p as i32))
        .with_context(|| format!("the agent of {node} is not running"))?;
    use nix::sys::signal::{Signal, kill as send};
    send(
        nix::unistd::Pid::from_raw(pid as i32),
        if kill { Signal::SIGKILL } else { Signal::SIGTERM },
    )?;
    stop_processes(&[pid as i32], Duration::from_secs(10)).await;
    Ok(())
}

/// Starts one node's agent again (after `stop_node` or a crash), with the same data dir.
pub async fn start_node(lab: &str, node: &str, agent_exe: &Path) -> anyhow::Result<u32> {
    let mut state = LabState::load(lab)?;
    let idx = state
        .nodes
        .iter()
        .position(|n| n.name == node)
        .with_context(|| format!("lab {lab:?} has no node {node:?}"))?;
    if let Some(p) = state.nodes[idx].pid
        && !is_zombie(p as i32)
    {
        bail!("the agent of {node} is already running (pid {p})");
    }
    // Join through node1, or through node2 when node1 itself comes back.
    let seed =
        state.nodes.iter().find(|n| n.name != node).map_or(state.nodes[idx].addr, |n| n.addr);
    let pid = spawn_agent(
        &state.nodes[idx],
        state.standalone_gossip.then_some(seed),
        state.dns_resolv_conf.as_deref(),
        state.cluster_tuning,
        agent_exe,
    )?;
    state.nodes[idx].pid = Some(pid);
    state.save()?;
    wait_for_agent(&state.nodes[idx], Duration::from_secs(30)).await?;
    Ok(pid)
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
