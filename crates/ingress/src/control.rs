//! The control task of one service: owns its health core, runs active checks, and turns
//! health events into snapshot swaps (read lock-free by the data path) and resets.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::balancer::{Backend, BackendSet};
use crate::health::{HealthCore, HealthEvent, HealthState};
use crate::service::{Ctl, Ctx, Service};
use crate::spec::{CheckKind, ServiceSpec};

/// The control task of one service: owns the health core, runs active checks, turns health
/// events into snapshot swaps and resets.
pub(crate) async fn control(
    svc: Arc<Service>,
    mut rx: mpsc::UnboundedReceiver<Ctl>,
    ctx: Arc<Ctx>,
) {
    let spec0 = svc.spec.load_full();
    let mut core = HealthCore::new(spec0.health.clone(), spec0.drain_grace);
    let mut spec = spec0;
    let mut backends: HashMap<String, Arc<Backend>> = HashMap::new();
    let rr = Arc::new(AtomicUsize::new(0));
    let (check_tx, mut check_rx) = mpsc::unbounded_channel::<(String, bool)>();
    let mut shutting_down = false;
    loop {
        let now = Instant::now().into_std();
        while let Some(req) = core.poll_check(now) {
            let tx = check_tx.clone();
            let ctx = ctx.clone();
            let spec = spec.clone();
            tokio::spawn(async move {
                let ok = run_check(&ctx, &spec, req.addr).await;
                let _ = tx.send((req.id, ok));
            });
        }
        let mut changed = false;
        while let Some(ev) = core.poll_event() {
            match ev {
                HealthEvent::Changed => changed = true,
                HealthEvent::Reset(id) => {
                    if let Some(b) = backends.get_mut(&id) {
                        b.reset.cancel();
                        // A fresh token for connections made if it comes back; same counters.
                        let mut nb = Backend::new(b.id.clone(), b.addr, b.local);
                        nb.stats = b.stats.clone();
                        *b = Arc::new(nb);
                        changed = true;
                    }
                }
                HealthEvent::Forget(id) => {
                    backends.remove(&id);
                    changed = true;
                }
            }
        }
        if changed {
            let eligible: Vec<Arc<Backend>> =
                backends.values().filter(|b| core.eligible(&b.id)).cloned().collect();
            svc.snapshot.store(Arc::new(BackendSet::new(spec.algorithm, eligible, rr.clone())));
            let view: Vec<(Arc<Backend>, HealthState)> = core
                .backends()
                .filter_map(|(id, _, _, h)| backends.get(id).map(|b| (b.clone(), h)))
                .collect();
            svc.view.store(Arc::new(view));
            ctx.health_changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        if shutting_down && backends.is_empty() {
            return;
        }
        let wake = core.poll_timeout().map(Instant::from_std);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ctl::Update(new_spec, list)) => {
                    let now = Instant::now().into_std();
                    if new_spec.health != spec.health
                        || new_spec.drain_grace != spec.drain_grace
                        || new_spec.algorithm != spec.algorithm
                    {
                        // Also forces a snapshot rebuild (a new algorithm needs one).
                        core.set_spec(new_spec.health.clone(), new_spec.drain_grace);
                    }
                    spec = Arc::new(*new_spec);
                    let listed: HashSet<&str> = list.iter().map(|b| b.id.as_str()).collect();
                    for id in backends.keys() {
                        if !listed.contains(id.as_str()) {
                            core.remove(now, id);
                        }
                    }
                    for b in &list {
                        let replace = backends.get(&b.id).is_none_or(|x| x.addr != b.addr || x.local != b.local);
                        if replace {
                            if let Some(old) = backends.get(&b.id) {
                                old.reset.cancel();
                            }
                            let stats = backends.get(&b.id).map(|x| x.stats.clone());
                            let mut nb = Backend::new(b.id.clone(), b.addr, b.local);
                            if let Some(s) = stats {
                                nb.stats = s;
                            }
                            backends.insert(b.id.clone(), Arc::new(nb));
                        }
                        core.upsert(now, b);
                    }
                }
                Some(Ctl::Connect(id, ok)) => core.handle_connect(Instant::now().into_std(), &id, ok),
                Some(Ctl::Shutdown) | None => {
                    if !shutting_down {
                        shutting_down = true;
                        let now = Instant::now().into_std();
                        for id in backends.keys() {
                            core.remove(now, id);
                        }
                    }
                    if backends.is_empty() {
                        return;
                    }
                }
            },
            Some((id, ok)) = check_rx.recv() => core.handle_check(Instant::now().into_std(), &id, ok),
            () = sleep_until(wake) => core.handle_timeout(Instant::now().into_std()),
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One active check; the port is the first TCP port's target (UDP-only services pass).
async fn run_check(ctx: &Ctx, spec: &ServiceSpec, addr: IpAddr) -> bool {
    let Some(port) = spec.ports.iter().find(|p| p.protocol.tcp()).map(|p| p.target) else {
        return true;
    };
    let target = SocketAddr::new(addr, port);
    let timeout = spec.health.timeout;
    let work = async {
        let mut s = ctx.upstream.connect_tcp(target, timeout).await.ok()?;
        match &spec.health.check {
            None | Some(CheckKind::Tcp) => Some(true),
            Some(CheckKind::Http { path }) => {
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: shoal-mesh-check\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.ok()?;
                read_check_response(&mut s).await
            }
        }
    };
    tokio::time::timeout(timeout, work).await.ok().flatten().unwrap_or(false)
}

/// Reads the head of a backend's answer to an HTTP check, however it is split into reads, and
/// judges its status line; `None` if the read fails.
pub(crate) async fn read_check_response<R: AsyncRead + Unpin>(s: &mut R) -> Option<bool> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let m = s.read(&mut buf[n..]).await.ok()?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Some(http_status_ok(&buf[..n]))
}

/// Whether an HTTP response starts with a 2xx or 3xx status line.
pub(crate) fn http_status_ok(head: &[u8]) -> bool {
    let ok_prefix = head.starts_with(b"HTTP/1.1 ") || head.starts_with(b"HTTP/1.0 ");
    ok_prefix
        && head.len() >= 12
        && matches!(head[9], b'2' | b'3')
        && head[10..12].iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_lines() {
        assert!(http_status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(http_status_ok(b"HTTP/1.0 301 Moved"));
        assert!(!http_status_ok(b"HTTP/1.1 503 Service Unavailable"));
        assert!(!http_status_ok(b"HTTP/1.1 2"));
        assert!(!http_status_ok(b"SSH-2.0-OpenSSH"));
    }
}
