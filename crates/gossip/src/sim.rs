//! Deterministic simulation: N [`Core`]s on virtual time, with per-link latency, jitter and
//! loss, partitions, slow nodes, crashes and restarts, all driven by one seed.
//!
//! UDP datagrams may be lost; sync exchanges (TCP) are reliable but cut by partitions. Every
//! frame is really sealed and opened, so the figures include the crypto and framing overhead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::config::CoreConfig;
use crate::core::{Core, CoreOptions, Event, Transmit};
use crate::types::{Identity, NodeId, NodeMeta};

/// IPv4 + UDP header bytes, counted on every simulated datagram.
pub const UDP_IP_OVERHEAD: u64 = 28;

/// Delay and loss of a link.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// One-way base latency.
    pub latency: Duration,
    /// Extra uniformly random latency, up to this.
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
}

impl Default for Link {
    fn default() -> Self {
        Self { latency: Duration::from_millis(1), jitter: Duration::from_millis(1), loss: 0.0 }
    }
}

#[derive(Debug)]
enum Packet {
    Udp { from: usize, to: usize, data: Vec<u8> },
    SyncRequest { from: usize, to: usize, data: Vec<u8> },
    SyncReply { from: usize, to: usize, data: Vec<u8> },
}

/// Per-node traffic seen by the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeTraffic {
    /// UDP bytes sent, IP/UDP headers included.
    pub udp_bytes_out: u64,
    /// UDP datagrams sent.
    pub udp_out: u64,
    /// TCP sync bytes sent (payload).
    pub sync_bytes_out: u64,
}

/// A `MemberDown` seen by a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownEvent {
    /// When.
    pub at: Duration,
    /// Which node saw it.
    pub observer: usize,
    /// Who was declared down.
    pub subject: Identity,
    /// Whether the subject's process was running at that moment (a false positive).
    pub subject_running: bool,
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Sim {
    base: Instant,
    now: Instant,
    rng: SmallRng,
    seq: u64,
    config: CoreConfig,
    keys: Vec<[u8; 32]>,
    cores: Vec<Option<Core>>,
    generations: Vec<u64>,
    addrs: Vec<SocketAddr>,
    by_addr: HashMap<SocketAddr, usize>,
    queue: BTreeMap<(Instant, u64), Packet>,
    timers: BTreeSet<(Instant, usize)>,
    deadline: Vec<Option<Instant>>,
    /// The default link between any two nodes.
    pub link: Link,
    links: HashMap<(usize, usize), Link>,
    groups: Option<Vec<u8>>,
    slow: HashMap<usize, Duration>,
    traffic: Vec<NodeTraffic>,
    downs: Vec<DownEvent>,
    log: Option<Vec<(Duration, usize, Event)>>,
}

impl Sim {
    /// An empty cluster; every core uses `config` and `seed`-derived randomness.
    pub fn new(seed: u64, config: CoreConfig) -> Self {
        let base = Instant::now();
        Self {
            base,
            now: base,
            rng: SmallRng::seed_from_u64(seed),
            seq: 0,
            config,
            keys: vec![[0x5a; 32]],
            cores: Vec::new(),
            generations: Vec::new(),
            addrs: Vec::new(),
            by_addr: HashMap::new(),
            queue: BTreeMap::new(),
            timers: BTreeSet::new(),
            deadline: Vec::new(),
            link: Link::default(),
            links: HashMap::new(),
            groups: None,
            slow: HashMap::new(),
            traffic: Vec::new(),
            downs: Vec::new(),
            log: None,
        }
    }

    /// Keeps every event of every node (only for small clusters).
    pub fn record_events(&mut self) {
        self.log = Some(Vec::new());
    }

    /// Recorded events: (time, node, event).
    pub fn events(&self) -> &[(Duration, usize, Event)] {
        self.log.as_deref().unwrap_or(&[])
    }

    /// Current virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// Current virtual instant.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The address of node `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// Number of nodes (running or crashed).
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// Adds a node (not joined to anyone); returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.cores.len();
        let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let addr = SocketAddr::new(IpAddr::V4(ip), 7946);
        self.addrs.push(addr);
        self.by_addr.insert(addr, i);
        self.cores.push(None);
        self.generations.push(0);
        self.deadline.push(None);
        self.traffic.push(NodeTraffic::default());
        self.start(i);
        i
    }

    fn start(&mut self, i: usize) {
        self.generations[i] += 1;
        let opts = CoreOptions {
            addr: self.addrs[i],
            node: NodeId(i as u64 + 1),
            generation: self.generations[i],
            meta: NodeMeta { name: format!("node{i}"), ..NodeMeta::default() },
            keys: self.keys.clone(),
            seed: self.rng.random(),
            config: self.config.clone(),
        };
        // The sim's config was validated by the caller's first node; a bad one is a test bug.
        let core = Core::new(opts, self.now).unwrap_or_else(|e| panic!("simulated core: {e}"));
        self.cores[i] = Some(core);
        self.after(i);
    }

    /// A formed cluster of `n` nodes that all know each other, each in `networks`.
    pub fn formed(n: usize, seed: u64, config: CoreConfig, networks: &[&str]) -> Self {
        let mut sim = Sim::new(seed, config);
        for _ in 0..n {
            sim.add_node();
        }
        let ids: Vec<Identity> =
            (0..n).filter_map(|i| sim.core(i).map(|c| c.identity().clone())).collect();
        for i in 0..n {
            let now = sim.now;
            if let Some(c) = sim.cores[i].as_mut() {
                // Networks first, while alone: no pull is sent and the record stays local;
                // records are then restored everywhere, so the formed cluster starts quiet.
                for net in networks {
                    let _ = c.join_network(now, net);
                }
                c.restore_members(
                    now,
                    ids.iter().filter(|id| id.node != NodeId(i as u64 + 1)).cloned(),
                );
            }
            sim.after(i);
        }
        let records: Vec<_> =
            (0..n).filter_map(|i| sim.core(i).and_then(Core::own_member_record)).collect();
        for i in 0..n {
            sim.with(i, |c, now| c.restore_records(now, records.iter().cloned()));
        }
        sim
    }

    /// Node `i`'s core, if running.
    pub fn core(&self, i: usize) -> Option<&Core> {
        self.cores[i].as_ref()
    }

    /// Runs `f` on node `i`'s core at the current time (then collects its output).
    pub fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut Core, Instant) -> R) -> Option<R> {
        let now = self.now;
        let r = self.cores[i].as_mut().map(|c| f(c, now));
        self.after(i);
        r
    }

    /// Node `i` joins via `seed`.
    pub fn join(&mut self, i: usize, seed: usize) {
        let s = self.addrs[seed];
        self.with(i, |c, now| c.join(now, &[s]));
    }

    /// Kills node `i` (its state is lost; the others must detect it).
    pub fn crash(&mut self, i: usize) {
        self.cores[i] = None;
        self.deadline[i] = None;
    }

    /// Restarts a crashed node with a larger generation, joining via `seed`.
    pub fn restart(&mut self, i: usize, seed: usize) {
        self.start(i);
        self.join(i, seed);
    }

    /// Whether node `i` runs.
    pub fn running(&self, i: usize) -> bool {
        self.cores[i].is_some()
    }

    /// Overrides the link from `a` to `b` (one direction).
    pub fn set_link(&mut self, a: usize, b: usize, link: Link) {
        self.links.insert((a, b), link);
    }

    /// Delays everything node `i` receives by `delay` (a node whose processing lags).
    pub fn set_slow(&mut self, i: usize, delay: Duration) {
        self.slow.insert(i, delay);
    }

    /// Splits the cluster: nodes in different groups cannot reach each other.
    pub fn partition(&mut self, group_of: impl Fn(usize) -> u8) {
        self.groups = Some((0..self.len()).map(group_of).collect());
    }

    /// Removes the partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Per-node traffic so far.
    pub fn traffic(&self) -> &[NodeTraffic] {
        &self.traffic
    }

    /// Every `MemberDown` seen so far.
    pub fn downs(&self) -> &[DownEvent] {
        &self.downs
    }

    /// Advances virtual time by `d`, delivering packets and firing timers.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Advances virtual time to `until`.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let next_pkt = self.queue.keys().next().map(|(t, _)| *t);
            let next_timer = self.timers.iter().next().map(|(t, _)| *t);
            let next = match (next_pkt, next_timer) {
                (Some(p), Some(t)) => p.min(t),
                (Some(p), None) => p,
                (None, Some(t)) => t,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = next;
            if next_pkt == Some(next) {
                if let Some((_, pkt)) = self.queue.pop_first() {
                    self.deliver(pkt);
                }
            } else if let Some((at, i)) = self.timers.pop_first()
                && self.deadline[i] == Some(at)
            {
                self.deadline[i] = None;
                let now = self.now;
                if let Some(c) = self.cores[i].as_mut() {
                    c.handle_timeout(now);
                }
                self.after(i);
            }
        }
        self.now = until;
    }

    /// Runs until `pred` holds (checked every `step`) or `limit` passes; returns the elapsed
    /// virtual time when it held.
    pub fn run_until_pred(
        &mut self,
        step: Duration,
        limit: Duration,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        loop {
            if pred(self) {
                return Some(self.now - start);
            }
            if self.now - start >= limit {
                return None;
            }
            self.run_for(step);
        }
    }

    fn deliver(&mut self, pkt: Packet) {
        let now = self.now;
        match pkt {
            Packet::Udp { from, to, data } => {
                let src = self.addrs[from];
                if let Some(c) = self.cores[to].as_mut() {
                    c.handle_udp(now, src, &data);
                    self.after(to);
                }
            }
            Packet::SyncRequest { from, to, data } => {
                let src = self.addrs[from];
                let reply = self.cores[to].as_mut().and_then(|c| c.handle_sync(now, src, &data));
                self.after(to);
                if let Some(r) = reply {
                    self.send(to, from, r, true, true);
                }
            }
            Packet::SyncReply { from, to, data } => {
                let src = self.addrs[from];
                if let Some(c) = self.cores[to].as_mut() {
                    let _ = c.handle_sync(now, src, &data);
                    self.after(to);
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, data: Vec<u8>, reliable: bool, reply: bool) {
        if let Some(g) = &self.groups
            && g[from] != g[to]
        {
            return;
        }
        let link = self.links.get(&(from, to)).copied().unwrap_or(self.link);
        if !reliable && link.loss > 0.0 && self.rng.random::<f64>() < link.loss {
            return;
        }
        let jitter = link.jitter.mul_f64(self.rng.random::<f64>());
        let extra = self.slow.get(&to).copied().unwrap_or_default();
        let at = self.now + link.latency + jitter + extra;
        self.seq += 1;
        let pkt = match (reliable, reply) {
            (false, _) => Packet::Udp { from, to, data },
            (true, false) => Packet::SyncRequest { from, to, data },
            (true, true) => Packet::SyncReply { from, to, data },
        };
        self.queue.insert((at, self.seq), pkt);
    }

    /// Collects node `i`'s transmits and events and re-arms its timer.
    fn after(&mut self, i: usize) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        let deadline = match self.cores[i].as_mut() {
            Some(c) => {
                while let Some(t) = c.poll_transmit() {
                    out.push(t);
                }
                while let Some(e) = c.poll_event() {
                    events.push(e);
                }
                c.poll_timeout()
            }
            None => None,
        };
        for t in out {
            match t {
                Transmit::Udp { to, data } => {
                    self.traffic[i].udp_out += 1;
                    self.traffic[i].udp_bytes_out += data.len() as u64 + UDP_IP_OVERHEAD;
                    if let Some(&j) = self.by_addr.get(&to) {
                        self.send(i, j, data, false, false);
                    }
                }
                Transmit::Sync { to, data } => {
                    self.traffic[i].sync_bytes_out += data.len() as u64;
                    if let Some(&j) = self.by_addr.get(&to) {
                        self.send(i, j, data, true, false);
                    }
                }
            }
        }
        let at = self.now - self.base;
        for e in events {
            if let Event::MemberDown(v) = &e {
                let subject_running = self
                    .by_addr
                    .get(&v.id.addr)
                    .and_then(|&j| self.cores[j].as_ref())
                    .is_some_and(|c| c.identity().generation == v.id.generation);
                self.downs.push(DownEvent {
                    at,
                    observer: i,
                    subject: v.id.clone(),
                    subject_running,
                });
            }
            if let Some(log) = self.log.as_mut() {
                log.push((at, i, e));
            }
        }
        if self.deadline[i] != deadline {
            if let Some(old) = self.deadline[i] {
                self.timers.remove(&(old, i));
            }
            if let Some(new) = deadline {
                self.timers.insert((new, i));
            }
            self.deadline[i] = deadline;
        }
    }
}
