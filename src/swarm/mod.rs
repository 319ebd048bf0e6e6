//! This node's part in a swarm, started by `swarm init/join` (or by the agent, for a node that
//! was in one when it stopped) and stopped by `swarm leave`: the control plane, its gossip, and
//! the node engine, tied together. While the node is in a swarm its gossip runs with the
//! cluster's keyring (kept in step as the leader rotates keys) and reports members up and down
//! back to the control plane, which marks nodes Ready or Down from it. `addr` chooses the
//! addresses `swarm init/join` use.
//!
//! The agent (`crate::agent`) and the API (`crate::api`) both hold a [`Swarm`]; this module
//! imports neither.

pub mod addr;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_cluster::{Cluster, Error as ClusterError, NodeId};
use shoal_gossip::{Event, Gossip, NodeMeta};
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::engine::{NodeEngine, leader};

/// How long a member may be gone from gossip before the control plane hears that it is down
/// (and moves its tasks away): an agent restart, crash or upgrade comes back within it, and its
/// tasks, which kept running, stay where they are.
const DOWN_GRACE: Duration = Duration::from_secs(5);

/// Whether gossip has node `id` (a cluster node id) up, in any run of it.
fn is_up(g: &Gossip, id: &str) -> bool {
    g.snapshot().members.iter().any(|m| {
        m.state != shoal_gossip::MemberState::Down && m.meta.as_ref().is_some_and(|x| x.id == id)
    })
}

/// A node in a swarm: the control plane, its gossip, and the tasks that tie them together.
#[derive(Debug)]
pub struct Swarm {
    pub cluster: Cluster,
    pub gossip: Arc<Gossip>,
    /// Tasks, networks and the data path of this node.
    pub engine: NodeEngine,
    tasks: Vec<JoinHandle<()>>,
}

/// The gossip id and metadata of a swarm node: its cluster node id is its gossip identity. As in
/// Docker, gossip binds to the control plane's listen address and advertises its advertise
/// address (gossip is control traffic); the metadata carries the data-path address and the
/// swarm's data-path port, which every peer sends VXLAN and WireGuard to.
fn gossip_config(
    cfg: &AgentConfig,
    cluster: &Cluster,
) -> anyhow::Result<shoal_gossip::GossipConfig> {
    let info = cluster.info();
    let keyring = cluster.gossip_keys().borrow().clone();
    let mut keys: Vec<[u8; 32]> = Vec::new();
    if let Some(p) = keyring.primary_key() {
        keys.push(p.key);
    }
    keys.extend(keyring.keys.iter().filter(|k| k.id != keyring.primary).map(|k| k.key));
    anyhow::ensure!(!keys.is_empty(), "the swarm has no gossip key yet");
    let advertise = SocketAddr::new(info.advertise_addr.ip(), cfg.gossip_port);
    let mut g = cfg.gossip(advertise.ip(), keys[0]);
    g.bind = SocketAddr::new(info.listen_addr.ip(), cfg.gossip_port);
    g.keys = keys;
    g.node = shoal_gossip::NodeId::from_name(&info.node.to_string());
    g.meta = NodeMeta {
        id: info.node.to_string(),
        name: info.hostname.clone(),
        role: match info.role {
            shoal_cluster::Role::Manager => shoal_gossip::Role::Manager,
            shoal_cluster::Role::Worker => shoal_gossip::Role::Worker,
        },
        underlay: Some(info.data_addr),
        data_port: info.data_path_port,
        // Peers use the key in this node's store record; the copy here only lets them see a
        // member whose claim disagrees with it (`engine::trust`).
        wg_public_key: Some(crate::engine::node::node_key(&cfg.data_dir)?.public()),
        ..NodeMeta::default()
    };
    // Managers are alive whenever the swarm is; join gossip through them.
    g.seeds = info
        .managers
        .iter()
        .map(|m| SocketAddr::new(m.ip(), cfg.gossip_port))
        .filter(|s| *s != advertise)
        .collect();
    Ok(g)
}

impl Swarm {
    /// Starts gossip and the data path for a node that is in a swarm and ties them to the
    /// control plane. On an error nothing of this node's swarm keeps running (gossip has said
    /// goodbye, the data path is down); the control plane is the caller's to stop or undo.
    pub async fn start(cfg: &AgentConfig, cluster: Cluster) -> anyhow::Result<Swarm> {
        let gossip =
            Gossip::start(gossip_config(cfg, &cluster)?).await.context("starting gossip")?;
        let gossip = Arc::new(gossip);
        // The data path first: it is what fails on a host that cannot carry the overlay, and
        // until it is up nothing else has started that would have to be stopped again.
        let engine = match NodeEngine::start(cfg, cluster.clone(), gossip.clone()).await {
            Ok(e) => e,
            Err(e) => {
                if let Some(g) = Arc::into_inner(gossip) {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(2), g.leave()).await;
                }
                return Err(e.context("starting the data path"));
            }
        };
        let mut tasks = engine.spawn();
        // Peers take this node's WireGuard key from its store record, not from gossip: say it
        // to the leader now (every heartbeat repeats it).
        let (c, data_dir) = (cluster.clone(), cfg.data_dir.clone());
        tasks.push(tokio::spawn(async move {
            let key = crate::engine::node::node_key(&data_dir).map(|k| k.public());
            let r = match key {
                Ok(key) => c.set_wg_public_key(key).await.map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "recording this node's WireGuard key in the swarm");
            }
        }));

        // Keyring: the leader adds a key, makes it primary, retires the old one; follow it.
        let (g, mut keys) = (gossip.clone(), cluster.gossip_keys());
        tasks.push(tokio::spawn(async move {
            loop {
                let ring = keys.borrow_and_update().clone();
                if let Err(e) = sync_keyring(&g, &ring).await {
                    tracing::warn!(error = %e, "applying the swarm's gossip keyring");
                }
                if keys.changed().await.is_err() {
                    return;
                }
            }
        }));

        // Liveness: gossip's view of members is the control plane's Ready/Down.
        let (g, c) = (gossip.clone(), cluster.clone());
        let mut events = g.subscribe();
        tasks.push(tokio::spawn(async move {
            for m in &g.snapshot().members {
                report(&c, m, m.state != shoal_gossip::MemberState::Down).await;
            }
            loop {
                match events.recv().await {
                    Ok(Event::MemberUp(m)) => report(&c, &m, true).await,
                    Ok(Event::MemberDown(m)) => {
                        // Said only if it is still down after the grace (a restarted agent is
                        // a new member of the same node, up again by then).
                        let (g, c) = (Arc::downgrade(&g), c.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(DOWN_GRACE).await;
                            let id = m.meta.as_ref().map(|x| x.id.clone()).unwrap_or_default();
                            if let Some(g) = Weak::upgrade(&g)
                                && !is_up(&g, &id)
                            {
                                drop(g);
                                report(&c, &m, false).await;
                            }
                        });
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for m in &g.snapshot().members {
                            report(&c, m, m.state != shoal_gossip::MemberState::Down).await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }));
        // Seeds: a node that finds itself alone (a restart after the others moved on, a manager
        // list that predates promotions) asks the control plane who is out there and joins them.
        let (g, c) = (gossip.clone(), cluster.clone());
        let port = cfg.gossip_port;
        let me = SocketAddr::new(cluster.info().advertise_addr.ip(), port);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(3));
            let mut gone_since: HashMap<String, Instant> = HashMap::new();
            loop {
                tick.tick().await;
                let snap = g.snapshot();
                // Only managers hold the node list; a worker asking would cost a refused
                // round trip to a manager every tick.
                let nodes = if c.info().raft { c.nodes().await.ok() } else { None };
                // A manager also repairs liveness that a race between reports got wrong (a late
                // "down" of a node's previous run after its new run said "up").
                for n in nodes.iter().flatten() {
                    let id = n.record.id.to_string();
                    let up = is_up(&g, &id);
                    let since = *gone_since.entry(id.clone()).or_insert_with(Instant::now);
                    if up {
                        gone_since.remove(&id);
                    }
                    let ready = n.record.status == shoal_cluster::NodeStatus::Ready;
                    if up != ready && (up || since.elapsed() >= DOWN_GRACE) {
                        let _ = c.member_status(n.record.id, up).await;
                    }
                }
                let alive = snap
                    .members
                    .iter()
                    .filter(|m| m.state == shoal_gossip::MemberState::Alive)
                    .count();
                if alive >= 2 {
                    continue;
                }
                let mut seeds: Vec<SocketAddr> =
                    c.info().managers.iter().map(|m| SocketAddr::new(m.ip(), port)).collect();
                seeds.extend(
                    nodes.iter().flatten().map(|n| SocketAddr::new(n.record.addr.ip(), port)),
                );
                seeds.retain(|s| *s != me);
                seeds.sort();
                seeds.dedup();
                if !seeds.is_empty() {
                    let _ = g.join(seeds).await;
                }
            }
        }));
        let wake = Arc::new(tokio::sync::Notify::new());
        tasks.push(tokio::spawn(leader::run(cluster.clone(), wake)));
        Ok(Swarm { cluster, gossip, engine, tasks })
    }

    /// Leaves: stops the node's tasks and takes its data path down, then stops gossip (saying
    /// goodbye) and the control plane's tasks.
    pub async fn stop(self) {
        self.stop_with(true).await;
    }

    /// Stops the agent's part for a restart or upgrade: the node's tasks and its data path stay
    /// (the next run adopts them); gossip says goodbye and the control plane stops.
    pub async fn stop_keeping_tasks(self) {
        self.stop_with(false).await;
    }

    async fn stop_with(self, remove_tasks: bool) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        if remove_tasks {
            self.engine.shutdown().await;
        } else {
            self.engine.stop().await;
        }
        if let Some(g) = Arc::into_inner(self.gossip) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), g.leave()).await;
        }
        self.cluster.shutdown().await;
    }
}

async fn report(c: &Cluster, m: &shoal_gossip::MemberView, up: bool) {
    let Some(id) = m.meta.as_ref().and_then(|meta| meta.id.parse::<NodeId>().ok()) else {
        return;
    };
    match c.member_status(id, up).await {
        // Workers have no say; only managers record liveness.
        Ok(()) | Err(ClusterError::NotManager(_)) => {}
        Err(e) => tracing::debug!(node = %id, up, error = %e, "reporting gossip liveness"),
    }
}

/// Makes gossip's keyring equal to the swarm's: add new keys, switch the primary, drop old ones.
async fn sync_keyring(g: &Gossip, ring: &shoal_cluster::Keyring) -> anyhow::Result<()> {
    let have = g.snapshot().key_ids.clone();
    let want: Vec<(u32, [u8; 32])> =
        ring.keys.iter().map(|k| (shoal_gossip::key_id(&k.key), k.key)).collect();
    for (id, key) in &want {
        if !have.contains(id) {
            g.add_key(*key).await?;
        }
    }
    if let Some(p) = ring.primary_key() {
        g.make_primary(shoal_gossip::key_id(&p.key)).await?;
    }
    for id in have {
        if !want.iter().any(|(w, _)| *w == id) {
            g.remove_key(id).await?;
        }
    }
    Ok(())
}
