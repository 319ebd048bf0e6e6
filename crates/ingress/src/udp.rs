//! UDP through the mesh: per-client-flow sessions. The listener task owns the flow table (no
//! lock): a datagram from a new client picks a backend and opens a connected upstream socket
//! in the ingress namespace; each flow has a reply task that reads its socket in batches
//! (recvmmsg) and answers the client from the published port in one sendmmsg. A flow ends
//! after the idle timeout, or at once when its backend leaves the eligible set (the next
//! datagram re-picks), or when the backend refuses (ICMP port unreachable). A datagram that
//! would open a flow past the service's `max_udp_flows` (over all its ports) or the port's
//! `max_udp_flows_per_source` is dropped and counted.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_udp::{Received, RecvBatch};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::balancer::{Backend, BackendSet};
use crate::service::{Ctx, Service};
use crate::spec::{PortSpec, PublishMode};

/// Slot size of the listener's receive batch: any datagram fits.
const IN_SLOT: usize = 65536;
/// Slot size of a flow's reply batch; larger replies are dropped and counted as errors.
pub const REPLY_SLOT: usize = 9216;
const IN_BATCH: usize = 16;
const REPLY_BATCH: usize = 8;

struct UdpFlow {
    sock: Arc<UdpSocket>,
    backend: Arc<Backend>,
    /// The snapshot against which the backend was last found eligible.
    checked: Arc<BackendSet>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: Arc<AtomicU64>,
    /// Set by the reply task when the backend refused (flow must be re-picked).
    dead: Arc<std::sync::atomic::AtomicBool>,
    reply: AbortHandle,
    /// The service, whose count of open flows this flow is part of.
    svc: Arc<Service>,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.reply.abort();
        self.backend.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.svc.udp_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The flows of one UDP listener by client, with a count per client address for the
/// per-source limit.
#[derive(Default)]
struct Flows {
    by_client: HashMap<SocketAddr, UdpFlow>,
    per_source: HashMap<IpAddr, u32>,
}

impl Flows {
    fn remove(&mut self, client: &SocketAddr) {
        if self.by_client.remove(client).is_some() {
            self.forget_source(client.ip());
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&UdpFlow) -> bool) {
        let mut gone = Vec::new();
        self.by_client.retain(|client, f| {
            let k = keep(f);
            if !k {
                gone.push(client.ip());
            }
            k
        });
        for ip in gone {
            self.forget_source(ip);
        }
    }

    fn forget_source(&mut self, ip: IpAddr) {
        if let Entry::Occupied(mut o) = self.per_source.entry(ip) {
            *o.get_mut() -= 1;
            if *o.get() == 0 {
                o.remove();
            }
        }
    }
}

/// Why a datagram found no flow.
enum NoFlow {
    /// No eligible backend, or none could be connected.
    NoBackend,
    /// The service's flow limit.
    ServiceLimit,
    /// The client address's flow limit.
    SourceLimit,
}

fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

pub(crate) async fn serve(
    sock: Arc<UdpSocket>,
    svc: Arc<Service>,
    port: Arc<ArcSwap<PortSpec>>,
    ctx: Arc<Ctx>,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let epoch = Instant::now();
    let mut flows = Flows::default();
    let mut batch = RecvBatch::new(IN_BATCH, IN_SLOT);
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = sock.readable() => {
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                match sock.try_io(Interest::READABLE, || batch.recv(sock.as_fd())) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => continue,
                }
                let p = port.load_full();
                let snap = svc.snapshot.load_full();
                for Received { data, from, truncated: trunc, .. } in batch.iter() {
                    let Some(client) = from else { continue };
                    if trunc {
                        continue;
                    }
                    let flow = match flow_for(&mut flows, client, &snap, &p, &svc, &ctx, &sock, epoch, &mut rng) {
                        Ok(f) => f,
                        Err(why) => {
                            let counter = match why {
                                NoFlow::NoBackend => &svc.no_backend,
                                NoFlow::ServiceLimit => &svc.refused_flows_service,
                                NoFlow::SourceLimit => &svc.refused_flows_source,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    flow.last.store(ms_since(epoch), Ordering::Relaxed);
                    // Connected socket: a plain send; on a full buffer the datagram is dropped
                    // (UDP semantics) rather than stalling every other flow.
                    // Straight to the syscall: tokio's readiness of a socket registered a
                    // moment ago is not known yet, and a non-blocking send needs none.
                    match socket2::SockRef::from(&*flow.sock).send(data) {
                        Ok(n) => {
                            flow.backend.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            flow.dead.store(true, Ordering::Relaxed);
                        }
                        Err(_) => {
                            flow.backend.stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            _ = sweep.tick() => {
                let idle = svc.spec.load().udp_idle_timeout.as_millis() as u64;
                let now = ms_since(epoch);
                let snap = svc.snapshot.load_full();
                flows.retain(|f| {
                    let fresh = now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle;
                    let alive = !f.dead.load(Ordering::Relaxed) && !f.backend.reset.is_cancelled();
                    let eligible = Arc::ptr_eq(&f.checked, &snap) || snap.all().backends().iter().any(|b| Arc::ptr_eq(b, &f.backend));
                    fresh && alive && eligible
                });
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn flow_for<'a>(
    flows: &'a mut Flows,
    client: SocketAddr,
    snap: &Arc<BackendSet>,
    port: &PortSpec,
    svc: &Arc<Service>,
    ctx: &Arc<Ctx>,
    listener: &Arc<UdpSocket>,
    epoch: Instant,
    rng: &mut SmallRng,
) -> Result<&'a mut UdpFlow, NoFlow> {
    let mut exclude: Option<String> = None;
    if let Some(f) = flows.by_client.get_mut(&client) {
        let mut ok = !f.dead.load(Ordering::Relaxed) && !f.backend.reset.is_cancelled();
        if ok && !Arc::ptr_eq(&f.checked, snap) {
            ok = snap.all().backends().iter().any(|b| Arc::ptr_eq(b, &f.backend));
            if ok {
                f.checked = snap.clone();
            }
        }
        if !ok {
            // Its backend is gone or refused: purge at once and re-pick below.
            if f.dead.load(Ordering::Relaxed) {
                // Refused (ICMP port unreachable): tell health, and do not pick it again now.
                svc.report_connect(&f.backend, false);
                exclude = Some(f.backend.id.clone());
            }
            flows.remove(&client);
        }
    }
    if flows.by_client.contains_key(&client) {
        return flows.by_client.get_mut(&client).ok_or(NoFlow::NoBackend);
    }
    let spec = svc.spec.load();
    let held = flows.per_source.get(&client.ip()).copied().unwrap_or(0);
    if spec.max_udp_flows_per_source.is_some_and(|m| held >= m) {
        return Err(NoFlow::SourceLimit);
    }
    let limit = spec.max_udp_flows.map_or(u64::MAX, u64::from);
    let open = &svc.udp_flows;
    if open
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
        .is_err()
    {
        return Err(NoFlow::ServiceLimit);
    }
    // From here on the flow's count is taken: a failure gives it back.
    let give_back = || {
        open.fetch_sub(1, Ordering::Relaxed);
        NoFlow::NoBackend
    };
    {
        let local_only = port.mode == PublishMode::Host;
        let mut made = None;
        let from = ctx.source_for(svc, client);
        for _ in 0..ctx.attempts {
            let Some(b) = snap.pick(client.ip(), local_only, exclude.as_deref(), rng) else {
                break;
            };
            match ctx.upstream.connect_udp_from(SocketAddr::new(b.addr, port.target), from) {
                Ok(s) => {
                    made = Some((b, s));
                    break;
                }
                Err(_) => {
                    svc.report_connect(&b, false);
                    exclude = Some(b.id.clone());
                }
            }
        }
        let (backend, sock) = made.ok_or_else(give_back)?;
        backend.stats.active.fetch_add(1, Ordering::Relaxed);
        backend.stats.total.fetch_add(1, Ordering::Relaxed);
        let sock = Arc::new(sock);
        let last = Arc::new(AtomicU64::new(ms_since(epoch)));
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reply = tokio::spawn(reply_task(
            sock.clone(),
            listener.clone(),
            client,
            backend.clone(),
            last.clone(),
            dead.clone(),
            epoch,
        ))
        .abort_handle();
        *flows.per_source.entry(client.ip()).or_insert(0) += 1;
        let flow =
            UdpFlow { sock, backend, checked: snap.clone(), last, dead, reply, svc: svc.clone() };
        Ok(flows.by_client.entry(client).or_insert(flow))
    }
}

async fn reply_task(
    up: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    backend: Arc<Backend>,
    last: Arc<AtomicU64>,
    dead: Arc<std::sync::atomic::AtomicBool>,
    epoch: Instant,
) {
    let mut batch = RecvBatch::new(REPLY_BATCH, REPLY_SLOT);
    loop {
        if up.readable().await.is_err() {
            return;
        }
        match up.try_io(Interest::READABLE, || batch.recv(up.as_fd())) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                dead.store(true, Ordering::Relaxed);
                return;
            }
            Err(_) => continue,
        }
        let mut msgs: [&[u8]; REPLY_BATCH] = [&[]; REPLY_BATCH];
        let mut n = 0;
        let mut bytes = 0u64;
        for Received { data, truncated: trunc, .. } in batch.iter() {
            if trunc {
                backend.stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            msgs[n] = data;
            bytes += data.len() as u64;
            n += 1;
        }
        let mut sent = 0;
        while sent < n {
            let r = listener
                .async_io(Interest::WRITABLE, || {
                    shoal_udp::send_to(listener.as_fd(), &msgs[sent..n], Some(client))
                })
                .await;
            match r {
                Ok(k) => sent += k.max(1),
                Err(_) => break,
            }
        }
        backend.stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        last.store(ms_since(epoch), Ordering::Relaxed);
    }
}
