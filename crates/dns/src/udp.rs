//! The UDP side of a listener: datagrams read a batch at a time, plain A/AAAA queries for our
//! names answered by the fast path and sent together, everything else parsed and answered by
//! the [`Handler`], forwarded queries in a task of their own.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::MessageType;
use hickory_proto::rr::RecordType;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use shoal_udp::{Message, RecvBatch};
use tokio::io::Interest;

use crate::handler::{Handler, Plan, UdpReply};
use crate::metrics::Outcome;
use crate::wire::{self};

/// A FORMERR header for bytes that carry a query header but do not parse; `None` when not even
/// that, or when it is a response (never answer those).
fn formerr(query: &[u8]) -> Option<[u8; 12]> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut r = [0u8; 12];
    r[..2].copy_from_slice(&query[..2]);
    // QR, the request's opcode and RD; then RA and rcode 1 (FORMERR).
    r[2] = 0x80 | (query[2] & 0x79);
    r[3] = 0x80 | 0x01;
    Some(r)
}

/// Datagrams read (and fast-path replies sent) per system call.
const BATCH: usize = 32;
/// Largest datagram read; longer ones arrive cut and fail to parse (FORMERR).
const RX_MAX: usize = 4096;

/// The loop's buffers, allocated once per listener: nothing on the per-packet path allocates
/// (the slow hickory path aside).
struct Buffers {
    rx: RecvBatch,
    /// Fast-path replies of this batch, and where they go.
    replies: Vec<Vec<u8>>,
    dst: [Option<SocketAddr>; BATCH],
    /// Query type of each reply, for the metrics.
    qtypes: [u16; BATCH],
    scratch: Vec<IpAddr>,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            rx: RecvBatch::new(BATCH, RX_MAX),
            replies: (0..BATCH).map(|_| Vec::with_capacity(wire::UDP_MAX)).collect(),
            dst: [None; BATCH],
            qtypes: [0; BATCH],
            scratch: Vec::with_capacity(wire::UDP_MAX / 16),
        }
    }
}

/// Sends replies `off..k` with one `sendmmsg`, without waiting; how many went.
fn send_replies(
    sock: &tokio::net::UdpSocket,
    b: &Buffers,
    off: usize,
    k: usize,
) -> io::Result<usize> {
    let iovs: [IoSlice<'_>; BATCH] =
        std::array::from_fn(|i| IoSlice::new(b.replies.get(i).map_or(&[][..], |r| r)));
    let msgs: [Message<'_>; BATCH] = std::array::from_fn(|i| Message {
        iov: std::slice::from_ref(&iovs[i]),
        to: b.dst[i],
        segment: None,
    });
    shoal_udp::send(sock.as_fd(), &msgs[off..k], false)
}

/// Sends the first `k` replies with `sendmmsg`, falling back to one awaited `send_to` for a
/// reply the socket has no room for; a reply that cannot be sent is dropped (the client asks
/// again), as a failed `send_to` was before.
async fn send_batch(sock: &tokio::net::UdpSocket, b: &Buffers, k: usize) {
    let mut off = 0;
    while off < k {
        match send_replies(sock, b, off, k) {
            Ok(n) if n > 0 => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(dst) = b.dst[off] {
                    let _ = sock.send_to(&b.replies[off], dst).await;
                }
                off += 1;
            }
            // The first reply failed (its destination, say): skip it.
            _ => off += 1,
        }
    }
}

/// The UDP side of a listener. hickory's `Server` spawns a task per datagram and passes each
/// reply through a channel to the socket's task; here datagrams are read [`BATCH`] at a time
/// (`recvmmsg`), plain A/AAAA queries for our names are answered by the fast path into reused
/// buffers and sent together (`sendmmsg`), anything else is parsed (hickory's `Request`),
/// answered by the same handler and sent inline, and only a forwarded one gets a task.
pub(crate) async fn udp_loop(
    sock: tokio::net::UdpSocket,
    handler: Arc<Handler>,
    stop: Arc<tokio::sync::Notify>,
) {
    let sock = Arc::new(sock);
    let mut b = Buffers::new();
    let mut rng = handler.rng();
    let mut forwards = tokio::task::JoinSet::new();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let metrics = &handler.inner.metrics;
    'serve: loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = sock.readable() => if let Err(e) = r {
                tracing::warn!(error = %e, "DNS UDP socket closed");
                break;
            },
        }
        // A few batches per wake-up, then back through `select!`: the stop signal is seen and
        // `readable()` spends the task's cooperative budget, so a flood cannot starve the
        // runtime's other tasks.
        for _ in 0..4 {
            let n = match sock.try_io(Interest::READABLE, || b.rx.recv(sock.as_fd())) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // As hickory's loop does: these mean the socket is gone for good.
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotConnected | std::io::ErrorKind::ConnectionAborted
                    ) {
                        tracing::warn!(error = %e, "DNS UDP socket closed");
                        break 'serve;
                    }
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    break;
                }
            };
            while forwards.try_join_next().is_some() {}
            let start = Instant::now();
            let mut k = 0;
            for i in 0..n {
                let datagram = b.rx.get(i);
                let Some(src) = datagram.from else { continue };
                if src.port() == 0 {
                    continue;
                }
                let bytes = datagram.data;
                if handler.answer_fast(bytes, &mut b.replies[k], &mut b.scratch, &mut rng) {
                    b.dst[k] = Some(src);
                    // The fast path only takes queries that end in type and class.
                    let t = bytes.len() - 4;
                    b.qtypes[k] = u16::from_be_bytes([bytes[t], bytes[t + 1]]);
                    k += 1;
                    continue;
                }
                serve_slow(&sock, &handler, &mut forwards, bytes, src, start).await;
            }
            if k > 0 {
                send_batch(&sock, &b, k).await;
                let took = start.elapsed();
                for &t in &b.qtypes[..k] {
                    metrics.query(RecordType::from(t), Outcome::Answer, took);
                }
            }
            if n < BATCH {
                // Drained: wait for readiness (the next read clears it if this one did not).
                break;
            }
        }
    }
}

/// Everything but the fast path: parse with hickory, answer inline, forward in a task.
async fn serve_slow(
    sock: &Arc<tokio::net::UdpSocket>,
    handler: &Arc<Handler>,
    forwards: &mut tokio::task::JoinSet<()>,
    bytes: &[u8],
    src: SocketAddr,
    start: Instant,
) {
    let request = match Request::from_bytes(bytes.to_vec(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(_) => {
            if let Some(reply) = formerr(bytes) {
                let _ = sock.send_to(&reply, src).await;
                let metrics = &handler.inner.metrics;
                metrics.query(RecordType::Unknown(0), Outcome::FormErr, Duration::ZERO);
            }
            return;
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return;
    }
    let rh = UdpReply::Client { sock: sock.clone(), dst: src };
    match handler.plan(&request) {
        Plan::Forward => {
            let handler = handler.clone();
            forwards.spawn(async move {
                let (_, qtype, outcome) = handler.execute(&request, Plan::Forward, rh).await;
                handler.inner.metrics.query(qtype, outcome, start.elapsed());
            });
        }
        plan => {
            let (_, qtype, outcome) = handler.execute(&request, plan, rh).await;
            handler.inner.metrics.query(qtype, outcome, start.elapsed());
        }
    }
}
