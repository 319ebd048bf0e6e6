//! Gossip in the agent: the configuration it starts with and what `/info` shows of it. (Its
//! Prometheus metrics come from the crate itself, read from the driver's snapshot at scrape time.)

use std::net::{IpAddr, SocketAddr};

use shoal_gossip::{GossipConfig, MemberState, NodeId, NodeMeta, Role, Snapshot};

use crate::api::{GossipInfo, MemberInfo};
use crate::config::AgentConfig;

/// The file in the data dir holding this node's last gossip generation.
pub const GENERATION_FILE: &str = "gossip-generation";

/// The gossip configuration of this agent at address `addr`, with one key.
pub fn config(cfg: &AgentConfig, addr: IpAddr, key: [u8; 32]) -> GossipConfig {
    let advertise = SocketAddr::new(addr, cfg.gossip_port);
    let mut g = GossipConfig::new(NodeId::from_name(&cfg.node_name), advertise, key);
    g.seeds = cfg.gossip_seeds.iter().copied().filter(|s| *s != advertise).collect();
    g.generation_file = Some(cfg.data_dir.join(GENERATION_FILE));
    g.meta = NodeMeta {
        id: cfg.node_name.clone(),
        name: cfg.node_name.clone(),
        role: Role::Worker,
        underlay: Some(addr),
        data_port: cfg.data_path_port,
        ..NodeMeta::default()
    };
    g
}

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

/// What `/info` shows of gossip.
pub fn info(snap: &Snapshot) -> GossipInfo {
    GossipInfo {
        members: snap
            .members
            .iter()
            .map(|m| MemberInfo {
                name: m.meta.as_ref().map(|x| x.name.clone()).unwrap_or_default(),
                addr: m.id.addr,
                state: state_name(m.state).to_owned(),
                incarnation: m.incarnation,
                generation: m.id.generation,
            })
            .collect(),
        networks: snap.networks.clone(),
        key_ids: snap.key_ids.clone(),
        entries: snap.entries.len(),
    }
}

/// Forwards a scrape to whichever gossip instance runs now (standalone or the swarm's), so the
/// registry holds one collector however often the node joins and leaves swarms.
#[derive(Debug)]
pub struct CurrentGossip(pub std::sync::Arc<arc_swap::ArcSwapOption<shoal_gossip::Gossip>>);

impl prometheus_client::collector::Collector for CurrentGossip {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        match self.0.load().as_ref() {
            Some(g) => g.collector().encode(encoder),
            None => Ok(()),
        }
    }
}
