//! Bringing a lab up: the bridge, the node namespaces and their veths, and one agent per node.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};
use shoal_netns::NetNs;

use super::down::{is_lab_netns, is_zombie};
use super::*;

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
