//! The thin tokio driver: one UDP socket and one TCP listener on the gossip port, a task that
//! owns the [`Core`], feeds it datagrams, sync frames, commands and timer ticks, and publishes
//! an arc-swapped [`Snapshot`] and a broadcast stream of [`Event`]s.
//!
//! ```no_run
//! # async fn f() -> Result<(), shoal_gossip::GossipError> {
//! use shoal_gossip::{EntryKey, Gossip, GossipConfig, NodeId};
//! let mut cfg = GossipConfig::new(NodeId::from_name("node1"), "198.18.0.2:7946".parse().unwrap(), [7; 32]);
//! cfg.seeds = vec!["198.18.0.3:7946".parse().unwrap()];
//! let gossip = Gossip::start(cfg).await?;
//! let mut events = gossip.subscribe();
//! gossip.join_network("blue").await?;
//! gossip.write(EntryKey::new("endpoint_table", "blue", "web.1"), b"10.0.1.5".to_vec()).await?;
//! let members = gossip.snapshot().members.clone();
//! # let _ = (events.recv().await, members); Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use rand::RngExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{ConfigError, GossipConfig};
use crate::core::{Core, CoreError, CoreOptions, Event, TableError, Transmit};
use crate::keyring::KeyringError;
use crate::metrics::{DropReason, Metrics};
use crate::snapshot::Snapshot;
use crate::types::{EntryKey, NodeMeta};

/// How long a TCP sync may take end to end (memberlist `TCPTimeout`).
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most inbound TCP syncs answered at once (each reply may hold up to `max_sync_frame` bytes).
/// Only a peer whose request opened under the keyring takes one of these slots.
const MAX_INBOUND_SYNCS: usize = 8;
/// How long a peer has to send its whole sync request. Until it is read and opened the peer is
/// not known to hold the key, so the wait is short and holds no sync slot.
const SYNC_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Inbound connections still sending their request, in all and from one address: a host
/// without the key cannot crowd out the others.
const MAX_UNREAD_SYNCS: usize = 64;
const MAX_UNREAD_SYNCS_PER_ADDR: usize = 4;
/// How often an isolated node retries its seeds.
const REJOIN_EVERY: Duration = Duration::from_secs(5);
/// Longest time between two snapshot refreshes (for the metrics in it).
const SNAPSHOT_EVERY: Duration = Duration::from_millis(500);
/// Shortest time between two snapshot rebuilds caused by entry events (a burst of them costs
/// one rebuild, not one per event; the event stream itself is never delayed). A membership
/// event is published with its snapshot at once.
const SNAPSHOT_MIN_GAP: Duration = Duration::from_millis(50);

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The configuration is invalid; nothing started.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The core refused its options.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Binding the UDP socket or TCP listener failed; nothing started.
    #[error("cannot bind gossip port {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A table operation was refused; nothing changed.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A keyring operation was refused; nothing changed.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The node's generation file could not be read or written; nothing started.
    #[error("gossip generation file {}: {source}", file.as_deref().map_or_else(|| "(none)".into(), |p| p.display().to_string()))]
    Generation {
        /// The file.
        file: Option<std::path::PathBuf>,
        /// The OS error.
        source: std::io::Error,
    },
    /// The driver task has stopped.
    #[error("gossip driver stopped")]
    Stopped,
}

enum Command {
    Write(EntryKey, Bytes, oneshot::Sender<Result<(), TableError>>),
    Delete(EntryKey, oneshot::Sender<Result<(), TableError>>),
    JoinNetwork(String, oneshot::Sender<Result<(), TableError>>),
    LeaveNetwork(String, oneshot::Sender<()>),
    UpdateMeta(NodeMeta, oneshot::Sender<()>),
    Join(Vec<SocketAddr>, oneshot::Sender<()>),
    AddKey([u8; 32], oneshot::Sender<Result<u32, KeyringError>>),
    MakePrimary(u32, oneshot::Sender<Result<(), KeyringError>>),
    RemoveKey(u32, oneshot::Sender<Result<(), KeyringError>>),
    Leave(oneshot::Sender<()>),
}

enum Inbound {
    /// A sync request from a peer; the reply goes back on the connection.
    Request(SocketAddr, Vec<u8>, oneshot::Sender<Option<Vec<u8>>>),
    /// The reply to our own push.
    Reply(SocketAddr, Vec<u8>),
    /// A frame refused before the core saw it.
    Dropped(DropReason),
}

/// A running gossip node. Dropping it stops the driver (abruptly; call [`Gossip::leave`]
/// first for a graceful exit).
#[derive(Debug)]
pub struct Gossip {
    cmd: mpsc::UnboundedSender<Command>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    events: broadcast::Sender<Event>,
    task: JoinHandle<()>,
    local: SocketAddr,
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gossip {
    /// Binds UDP and TCP on `config.bind`, starts the driver task and joins `config.seeds`.
    pub async fn start(config: GossipConfig) -> Result<Gossip, GossipError> {
        config.validate()?;
        let udp = UdpSocket::bind(config.bind)
            .await
            .map_err(|source| GossipError::Bind { addr: config.bind, source })?;
        let local =
            udp.local_addr().map_err(|source| GossipError::Bind { addr: config.bind, source })?;
        let tcp = TcpListener::bind(local)
            .await
            .map_err(|source| GossipError::Bind { addr: local, source })?;
        let mut advertise = config.advertise;
        if advertise.port() == 0 {
            advertise.set_port(local.port());
        }
        let generation =
            crate::generation::next(config.generation_file.as_deref()).map_err(|source| {
                GossipError::Generation { file: config.generation_file.clone(), source }
            })?;
        let opts = CoreOptions {
            addr: advertise,
            node: config.node,
            generation,
            meta: config.meta.clone(),
            keys: config.keys.clone(),
            seed: rand::rng().random(),
            config: config.core.clone(),
        };
        let start = Instant::now();
        let mut core = Core::new(opts, start.into_std())?;
        for n in &config.networks {
            core.join_network(start.into_std(), n)?;
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let driver = Driver {
            core,
            udp: Arc::new(udp),
            tcp,
            cmd: cmd_rx,
            events: events.clone(),
            snapshot: snapshot.clone(),
            seeds: config.seeds.clone(),
            max_frame: config.core.max_sync_frame,
            max_datagram: config.core.max_datagram,
            dirty: true,
            published: start,
        };
        let task = tokio::spawn(driver.run());
        Ok(Gossip { cmd: cmd_tx, snapshot, events, task, local })
    }

    /// The bound UDP/TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The latest snapshot (cheap; never blocks the driver).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Current metrics (from the latest snapshot, at most 500 ms old).
    pub fn metrics(&self) -> Metrics {
        self.snapshot.load().metrics.clone()
    }

    /// Registers the gossip metrics (members by state, messages and bytes in/out, drops by
    /// reason, probe RTT, entries) with a Prometheus registry; values are read at scrape time.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(self.collector()));
    }

    /// The same metrics as a collector of its own, for a caller that registers one collector
    /// and forwards to whichever gossip instance is current.
    pub fn collector(&self) -> impl prometheus_client::collector::Collector {
        crate::prom::GossipCollector(self.snapshot.clone())
    }

    /// A stream of membership and entry changes from now on (lagging receivers lose the
    /// oldest events and should resynchronise from [`Gossip::snapshot`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GossipError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).map_err(|_| GossipError::Stopped)?;
        rx.await.map_err(|_| GossipError::Stopped)
    }

    /// Writes an entry owned by this node and gossips it.
    pub async fn write(&self, key: EntryKey, value: impl Into<Bytes>) -> Result<(), GossipError> {
        let value = value.into();
        Ok(self.ask(|tx| Command::Write(key, value, tx)).await??)
    }

    /// Deletes an entry owned by this node.
    pub async fn delete(&self, key: EntryKey) -> Result<(), GossipError> {
        Ok(self.ask(|tx| Command::Delete(key, tx)).await??)
    }

    /// Starts holding `network`'s tables (and pulls them from a peer).
    pub async fn join_network(&self, network: &str) -> Result<(), GossipError> {
        let n = network.to_owned();
        Ok(self.ask(|tx| Command::JoinNetwork(n, tx)).await??)
    }

    /// Deletes our entries in `network` and drops its tables.
    pub async fn leave_network(&self, network: &str) -> Result<(), GossipError> {
        let n = network.to_owned();
        self.ask(|tx| Command::LeaveNetwork(n, tx)).await
    }

    /// Replaces our metadata (role, availability, addresses, WireGuard key) and gossips it.
    pub async fn update_meta(&self, meta: NodeMeta) -> Result<(), GossipError> {
        self.ask(|tx| Command::UpdateMeta(meta, tx)).await
    }

    /// Contacts more seeds (e.g. after `swarm join`).
    pub async fn join(&self, seeds: Vec<SocketAddr>) -> Result<(), GossipError> {
        self.ask(|tx| Command::Join(seeds, tx)).await
    }

    /// Adds a key accepted for opening; returns its id.
    pub async fn add_key(&self, key: [u8; 32]) -> Result<u32, GossipError> {
        Ok(self.ask(|tx| Command::AddKey(key, tx)).await??)
    }

    /// Makes a key the sealing key.
    pub async fn make_primary(&self, id: u32) -> Result<(), GossipError> {
        Ok(self.ask(|tx| Command::MakePrimary(id, tx)).await??)
    }

    /// Removes a non-primary key.
    pub async fn remove_key(&self, id: u32) -> Result<(), GossipError> {
        Ok(self.ask(|tx| Command::RemoveKey(id, tx)).await??)
    }

    /// Leaves the cluster gracefully and stops the driver.
    pub async fn leave(self) -> Result<(), GossipError> {
        self.ask(Command::Leave).await
    }
}

struct Driver {
    core: Core,
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    cmd: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<Event>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    seeds: Vec<SocketAddr>,
    max_frame: usize,
    max_datagram: usize,
    dirty: bool,
    published: Instant,
}

/// Reads one length-prefixed sync frame of at most `max` bytes; `Err(None)` when the stream ends
/// (or fails) before the length, `Err(Some(_))` when the peer misbehaved after it.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    s: &mut R,
    max: usize,
) -> Result<Vec<u8>, Option<DropReason>> {
    let len = s.read_u32().await.map_err(|_| None)? as usize;
    if len > max {
        return Err(Some(DropReason::TooBig));
    }
    // Grow with what actually arrives: a peer announcing a large frame costs nothing until it
    // sends the bytes (the frame is not authenticated yet).
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *s)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|_| Some(DropReason::Truncated))?;
    if buf.len() != len {
        return Err(Some(DropReason::Truncated));
    }
    Ok(buf)
}

async fn write_frame(s: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    s.write_all(&out).await?;
    s.flush().await
}

impl Driver {
    async fn run(mut self) {
        let (in_tx, mut in_rx) = mpsc::channel::<Inbound>(256);
        let mut buf = vec![0u8; self.max_datagram.max(65_536)];
        let now = Instant::now().into_std();
        let seeds = self.seeds.clone();
        self.core.join(now, &seeds);
        let mut rejoin = tokio::time::interval(REJOIN_EVERY);
        let mut refresh = tokio::time::interval(SNAPSHOT_EVERY);
        let mut catch_up = tokio::time::interval(SNAPSHOT_MIN_GAP);
        let inbound_slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_SYNCS));
        let unread = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
        loop {
            let deadline = self
                .core
                .poll_timeout()
                .map_or_else(|| Instant::now() + Duration::from_secs(3600), Instant::from_std);
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.core.handle_udp(Instant::now().into_std(), from, &buf[..n]),
                    Err(e) => tracing::debug!(error = %e, "gossip udp recv"),
                },
                r = self.tcp.accept() => match r {
                    Ok((stream, from)) => match Unread::take(&unread, from.ip()) {
                        Some(unread) => {
                            let tx = in_tx.clone();
                            let max = self.max_frame;
                            let slots = inbound_slots.clone();
                            tokio::spawn(serve_sync(stream, from, max, tx, unread, slots));
                        }
                        // Too many requests being read: refuse this one; a peer retries later.
                        None => self.core.count_dropped(DropReason::Rejected),
                    },
                    Err(e) => tracing::debug!(error = %e, "gossip tcp accept"),
                },
                Some(inb) = in_rx.recv() => {
                    let now = Instant::now().into_std();
                    match inb {
                        Inbound::Request(from, frame, reply) => {
                            let _ = reply.send(self.core.handle_sync(now, from, &frame));
                        }
                        Inbound::Reply(from, frame) => {
                            let _ = self.core.handle_sync(now, from, &frame);
                        }
                        Inbound::Dropped(reason) => self.core.count_dropped(reason),
                    }
                }
                cmd = self.cmd.recv() => match cmd {
                    Some(Command::Leave(done)) => {
                        self.core.leave(Instant::now().into_std());
                        self.flush(&in_tx).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => self.core.handle_timeout(Instant::now().into_std()),
                _ = rejoin.tick() => {
                    if self.core.active_members().is_empty() && !self.seeds.is_empty() {
                        let seeds = self.seeds.clone();
                        self.core.join(Instant::now().into_std(), &seeds);
                    }
                }
                _ = refresh.tick() => self.publish(),
                _ = catch_up.tick(), if self.dirty => self.publish(),
            }
            self.flush(&in_tx).await;
        }
    }

    fn command(&mut self, c: Command) {
        let now = Instant::now().into_std();
        match c {
            Command::Write(k, v, tx) => {
                let _ = tx.send(self.core.write(now, k, v));
            }
            Command::Delete(k, tx) => {
                let _ = tx.send(self.core.delete(now, &k));
            }
            Command::JoinNetwork(n, tx) => {
                let _ = tx.send(self.core.join_network(now, &n));
            }
            Command::LeaveNetwork(n, tx) => {
                self.core.leave_network(now, &n);
                let _ = tx.send(());
            }
            Command::UpdateMeta(m, tx) => {
                self.core.update_meta(now, m);
                let _ = tx.send(());
            }
            Command::Join(seeds, tx) => {
                self.core.join(now, &seeds);
                self.seeds.extend(seeds);
                let _ = tx.send(());
            }
            Command::AddKey(k, tx) => {
                let _ = tx.send(self.core.keyring_mut().add(&k));
            }
            Command::MakePrimary(id, tx) => {
                let _ = tx.send(self.core.keyring_mut().make_primary(id));
            }
            Command::RemoveKey(id, tx) => {
                let _ = tx.send(self.core.keyring_mut().remove(id));
            }
            Command::Leave(_) => {}
        }
        self.publish();
    }

    async fn flush(&mut self, in_tx: &mpsc::Sender<Inbound>) {
        while let Some(t) = self.core.poll_transmit() {
            match t {
                Transmit::Udp { to, data } => {
                    if let Err(e) = self.udp.send_to(&data, to).await {
                        tracing::debug!(%to, error = %e, "gossip udp send");
                    }
                }
                Transmit::Sync { to, data } => {
                    let tx = in_tx.clone();
                    let max = self.max_frame;
                    tokio::spawn(push_sync(to, data, max, tx));
                }
            }
        }
        let events: Vec<Event> = std::iter::from_fn(|| self.core.poll_event()).collect();
        self.dirty |= !events.is_empty();
        // A member's change is rare and acted on when told (the mesh's kernel path drops a
        // suspect's backends): the snapshot that shows it is out before the event, not up to
        // SNAPSHOT_MIN_GAP after it.
        let membership = events.iter().any(|e| !matches!(e, Event::Entry { .. }));
        if self.dirty && (membership || self.published.elapsed() >= SNAPSHOT_MIN_GAP) {
            self.publish();
        }
        for e in events {
            let _ = self.events.send(e);
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        self.published = Instant::now();
        let snap = Snapshot {
            identity: Some(self.core.identity().clone()),
            members: self.core.members(),
            entries: self.core.entries(),
            networks: self.core.networks(),
            key_ids: self.core.keyring().key_ids(),
            metrics: self.core.metrics(),
        };
        self.snapshot.store(Arc::new(snap));
    }
}

/// A connection counted against the limits on requests being read; released when dropped.
struct Unread {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Unread {
    fn take(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Unread> {
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = m.values().sum();
        let mine = m.entry(ip).or_default();
        if total >= MAX_UNREAD_SYNCS || *mine >= MAX_UNREAD_SYNCS_PER_ADDR {
            return None;
        }
        *mine += 1;
        Some(Unread { map: map.clone(), ip })
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

async fn serve_sync(
    mut stream: TcpStream,
    from: SocketAddr,
    max: usize,
    tx: mpsc::Sender<Inbound>,
    unread: Unread,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let request = tokio::time::timeout(SYNC_REQUEST_TIMEOUT, read_frame(&mut stream, max)).await;
    drop(unread);
    let frame = match request {
        Ok(Ok(frame)) => frame,
        Ok(Err(Some(reason))) => {
            let _ = tx.send(Inbound::Dropped(reason)).await;
            return;
        }
        Ok(Err(None)) => return,
        Err(_) => {
            tracing::debug!(%from, "sync request not sent in time");
            let _ = tx.send(Inbound::Dropped(DropReason::Rejected)).await;
            return;
        }
    };
    // The core opens the request under the keyring; only a key holder's gets a reply.
    let (rtx, rrx) = oneshot::channel();
    if tx.send(Inbound::Request(from, frame, rtx)).await.is_err() {
        return;
    }
    let Ok(Some(reply)) = rrx.await else { return };
    let Ok(_slot) = slots.try_acquire_owned() else {
        // Too many replies in flight: the peer retries later.
        let _ = tx.send(Inbound::Dropped(DropReason::Rejected)).await;
        return;
    };
    match tokio::time::timeout(TCP_TIMEOUT, write_frame(&mut stream, &reply)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%from, error = %e, "sync reply"),
        Err(_) => tracing::debug!(%from, "sync reply timed out"),
    }
}

async fn push_sync(to: SocketAddr, frame: Vec<u8>, max: usize, tx: mpsc::Sender<Inbound>) {
    let work = async {
        let mut s = TcpStream::connect(to).await.ok()?;
        write_frame(&mut s, &frame).await.ok()?;
        match read_frame(&mut s, max).await {
            Ok(reply) => Some(Inbound::Reply(to, reply)),
            Err(Some(reason)) => Some(Inbound::Dropped(reason)),
            Err(None) => None,
        }
    };
    match tokio::time::timeout(TCP_TIMEOUT, work).await {
        Ok(Some(inb)) => {
            let _ = tx.send(inb).await;
        }
        Ok(None) => tracing::debug!(%to, "sync push failed"),
        Err(_) => tracing::debug!(%to, "sync push timed out"),
    }
}
