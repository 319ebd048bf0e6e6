//! TCP through the mesh: the accept loop of one published port, the `max_connections` slot,
//! and one task per connection that picks a backend (retrying others on connect failure),
//! sends the PROXY header if the port asks for one, and relays bytes until either side ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};

use crate::balancer::{Backend, BackendSet};
use crate::forward;
use crate::proxy_protocol::{Header, MAX_EMIT_LEN};
use crate::service::{Ctx, Service};
use crate::spec::{PortSpec, ProxyProtocol, PublishMode};

pub(crate) async fn accept(
    listener: TcpListener,
    svc: Arc<Service>,
    port: Arc<ArcSwap<PortSpec>>,
    ctx: Arc<Ctx>,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of fds or a transient error: back off briefly rather than spin.
                tracing::warn!(service = %svc.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(slot) = OpenSlot::take(&svc) else {
            // At the service's limit: refuse at once (RST) rather than queue.
            svc.refused_connections.fetch_add(1, Ordering::Relaxed);
            forward::set_reset_on_close(&client);
            continue;
        };
        let p = port.load_full();
        let snap = svc.snapshot.load_full();
        let local_only = p.mode == PublishMode::Host;
        let first = snap.pick(peer.ip(), local_only, None, &mut rng);
        let retry_seed = rng.next_u64();
        tokio::spawn(handle_tcp(
            client,
            peer,
            first,
            snap,
            p,
            svc.clone(),
            ctx.clone(),
            retry_seed,
            slot,
        ));
    }
}

/// One of a service's `max_connections`, held for the life of a connection.
struct OpenSlot(Arc<Service>);

impl OpenSlot {
    /// A slot, or `None` if the service has `max_connections` open already.
    fn take(svc: &Arc<Service>) -> Option<OpenSlot> {
        let limit = svc.spec.load().max_connections.map_or(u64::MAX, u64::from);
        let open = &svc.open_connections;
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| OpenSlot(svc.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle_tcp(
    client: TcpStream,
    peer: SocketAddr,
    mut choice: Option<Arc<Backend>>,
    snap: Arc<BackendSet>,
    port: Arc<PortSpec>,
    svc: Arc<Service>,
    ctx: Arc<Ctx>,
    seed: u64,
    slot: OpenSlot,
) {
    let _ = client.set_nodelay(true);
    let spec = svc.spec.load_full();
    let local_only = port.mode == PublishMode::Host;
    let mut rng: Option<SmallRng> = None;
    let mut attempt = 0;
    let from = ctx.source_for(&svc, peer);
    let (backend, upstream) = loop {
        let Some(b) = choice.take() else {
            svc.no_backend.fetch_add(1, Ordering::Relaxed);
            forward::set_reset_on_close(&client);
            return;
        };
        attempt += 1;
        let target = SocketAddr::new(b.addr, port.target);
        match ctx.upstream.connect_tcp_from(target, from, spec.connect_timeout).await {
            Ok(s) => {
                svc.report_connect(&b, true);
                break (b, s);
            }
            Err(e) => {
                tracing::debug!(service = %svc.name, backend = %b.id, error = %e, "connect failed");
                svc.report_connect(&b, false);
                if attempt >= ctx.attempts {
                    forward::set_reset_on_close(&client);
                    return;
                }
                let r = rng.get_or_insert_with(|| SmallRng::seed_from_u64(seed));
                // The newest snapshot may already lack the failed backend.
                let now_snap = svc.snapshot.load_full();
                let s = if Arc::ptr_eq(&now_snap, &snap) { &snap } else { &now_snap };
                choice = s.pick(peer.ip(), local_only, Some(&b.id), r);
            }
        }
    };
    let stats = &backend.stats;
    stats.active.fetch_add(1, Ordering::Relaxed);
    stats.total.fetch_add(1, Ordering::Relaxed);
    let result = async {
        if port.proxy_protocol != ProxyProtocol::Off {
            let local = client.local_addr()?;
            let h = Header::tcp(peer, local);
            let mut buf = [0u8; 128];
            let n = match port.proxy_protocol {
                ProxyProtocol::V2 => h.emit_v2(&mut buf[..MAX_EMIT_LEN]).unwrap_or(0),
                _ => {
                    let line = h.to_v1();
                    buf[..line.len()].copy_from_slice(line.as_bytes());
                    line.len()
                }
            };
            // One write: a fresh connection's send buffer takes 107 bytes whole.
            forward::write_all(&upstream, &buf[..n]).await?;
        }
        forward::relay(
            &client,
            &upstream,
            ctx.forward,
            &ctx.pipes,
            spec.idle_timeout,
            &backend.reset,
            &stats.bytes_in,
            &stats.bytes_out,
        )
        .await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(service = %svc.name, backend = %backend.id, error = %e, "relay ended");
        stats.errors.fetch_add(1, Ordering::Relaxed);
        forward::set_reset_on_close(&client);
        forward::set_reset_on_close(&upstream);
    }
    // The slot first: whoever sees the connection gone from `active` may take its slot.
    drop(slot);
    stats.active.fetch_sub(1, Ordering::Relaxed);
}
