//! Upstream sockets, made inside the node's ingress sandbox namespace so they reach tasks over
//! the overlay. A socket keeps the namespace it was created in, so the factory makes them in
//! batches on a [`NetNs::run`] helper thread (one thread per batch, not per connection) and
//! the runtime connects and drives them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_netns::NetNs;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::Error;

const BATCH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Tcp4,
    Tcp6,
    Udp4,
    Udp6,
}

impl Kind {
    fn of(addr: SocketAddr, udp: bool) -> Kind {
        match (addr.is_ipv4(), udp) {
            (true, false) => Kind::Tcp4,
            (false, false) => Kind::Tcp6,
            (true, true) => Kind::Udp4,
            (false, true) => Kind::Udp6,
        }
    }
    fn make(self) -> io::Result<Socket> {
        let (d, t, p) = match self {
            Kind::Tcp4 => (Domain::IPV4, Type::STREAM, Protocol::TCP),
            Kind::Tcp6 => (Domain::IPV6, Type::STREAM, Protocol::TCP),
            Kind::Udp4 => (Domain::IPV4, Type::DGRAM, Protocol::UDP),
            Kind::Udp6 => (Domain::IPV6, Type::DGRAM, Protocol::UDP),
        };
        let s = Socket::new(d, t.nonblocking().cloexec(), Some(p))?;
        if t == Type::STREAM {
            s.set_tcp_nodelay(true)?;
        }
        Ok(s)
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Makes upstream sockets in the ingress namespace (or in the caller's, when `None`).
///
/// With a namespace, a dedicated thread that entered it once keeps a pool of spare sockets
/// filled: taking one is a mutex and a pop; the pool is topped up in the background when it
/// runs low, so the runtime never waits for a thread to start or enter the namespace.
#[derive(Debug)]
pub struct Upstream {
    ns: Option<Arc<NetNs>>,
    shared: Arc<Shared>,
    maker: Option<Mutex<std::sync::mpsc::Sender<Req>>>,
}

#[derive(Debug, Default)]
struct Shared {
    spare: [Mutex<Vec<Socket>>; 4],
    refilling: [AtomicBool; 4],
}

#[derive(Debug)]
enum Req {
    Refill(Kind),
    One(Kind, tokio::sync::oneshot::Sender<io::Result<Socket>>),
}

/// Spare sockets below which a refill starts.
const LOW: usize = 16;

fn maker_thread(ns: &NetNs, shared: &Shared, rx: &std::sync::mpsc::Receiver<Req>) {
    if let Err(e) = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
        tracing::error!(ns = ns.name(), error = %e, "upstream socket thread cannot enter namespace");
        return;
    }
    while let Ok(req) = rx.recv() {
        match req {
            Req::Refill(kind) => {
                let made: Vec<Socket> = (0..BATCH).filter_map(|_| kind.make().ok()).collect();
                if let Ok(mut v) = shared.spare[kind.index()].lock() {
                    v.extend(made);
                }
                shared.refilling[kind.index()].store(false, Ordering::Release);
            }
            Req::One(kind, reply) => {
                let _ = reply.send(kind.make());
            }
        }
    }
}

impl Upstream {
    /// A factory for sockets in `ns` (`None`: the current namespace). With a namespace it
    /// starts the socket-making thread and pre-fills TCP/UDP over IPv4.
    pub fn new(ns: Option<Arc<NetNs>>) -> Self {
        let shared = Arc::new(Shared::default());
        let maker = ns.as_ref().and_then(|ns| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (ns, sh) = (ns.clone(), shared.clone());
            std::thread::Builder::new()
                .name("shoal-mesh-ns".into())
                .spawn(move || maker_thread(&ns, &sh, &rx))
                .ok()?;
            Some(Mutex::new(tx))
        });
        let up = Upstream { ns, shared, maker };
        up.refill(Kind::Tcp4);
        up.refill(Kind::Udp4);
        up
    }

    /// The namespace sockets are made in.
    pub fn netns(&self) -> Option<&NetNs> {
        self.ns.as_deref()
    }

    fn send(&self, req: Req) -> bool {
        self.maker.as_ref().and_then(|m| m.lock().ok()).is_some_and(|tx| tx.send(req).is_ok())
    }

    fn refill(&self, kind: Kind) {
        if self.maker.is_some()
            && !self.shared.refilling[kind.index()].swap(true, Ordering::AcqRel)
            && !self.send(Req::Refill(kind))
        {
            self.shared.refilling[kind.index()].store(false, Ordering::Release);
        }
    }

    /// A spare socket if one is ready (and a refill started when running low).
    fn spare(&self, kind: Kind) -> Option<Socket> {
        let (s, left) = {
            let mut v = self.shared.spare[kind.index()].lock().ok()?;
            let s = v.pop();
            (s, v.len())
        };
        if left < LOW {
            self.refill(kind);
        }
        s
    }

    async fn socket(&self, kind: Kind) -> Result<Socket, Error> {
        if self.ns.is_none() {
            return kind.make().map_err(|e| Error::io("socket", e));
        }
        if let Some(s) = self.spare(kind) {
            return Ok(s);
        }
        // Pool empty: ask the namespace thread for one, without blocking the runtime.
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.send(Req::One(kind, tx))
            && let Ok(r) = rx.await
        {
            return r.map_err(|e| Error::io("socket in ingress namespace", e));
        }
        self.socket_blocking(kind)
    }

    /// For synchronous callers (UDP flow set-up): a spare, or a batch made on a helper thread.
    fn socket_blocking(&self, kind: Kind) -> Result<Socket, Error> {
        let Some(ns) = &self.ns else {
            return kind.make().map_err(|e| Error::io("socket", e));
        };
        if let Some(s) = self.spare(kind) {
            return Ok(s);
        }
        let mut batch = ns
            .run(|| (0..BATCH).map(|_| kind.make()).collect::<io::Result<Vec<_>>>())?
            .map_err(|e| Error::io("socket in ingress namespace", e))?;
        let first = batch.pop().ok_or_else(|| Error::io("socket", io::ErrorKind::Other))?;
        if let Ok(mut v) = self.shared.spare[kind.index()].lock() {
            v.append(&mut batch);
        }
        Ok(first)
    }

    /// Connects a TCP socket made in the namespace to `addr`, within `timeout`.
    pub async fn connect_tcp(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.connect_tcp_from(addr, None, timeout).await
    }

    /// Like [`Upstream::connect_tcp`], from the address `from` when given (see `bind_as`).
    pub async fn connect_tcp_from(
        &self,
        addr: SocketAddr,
        from: Option<SocketAddr>,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let s = self.socket(Kind::of(addr, false)).await.map_err(io::Error::other)?;
        if let Some(from) = from {
            bind_as(&s, from)?;
        }
        let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(OwnedFd::from(s)));
        match tokio::time::timeout(timeout, sock.connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// A UDP socket made in the namespace, connected to `addr`.
    pub fn connect_udp(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.connect_udp_from(addr, None)
    }

    /// Like [`Upstream::connect_udp`], from the address `from` when given (see `bind_as`).
    pub fn connect_udp_from(
        &self,
        addr: SocketAddr,
        from: Option<SocketAddr>,
    ) -> io::Result<UdpSocket> {
        let s = self.socket_blocking(Kind::of(addr, true)).map_err(io::Error::other)?;
        if let Some(from) = from {
            bind_as(&s, from)?;
        }
        s.connect(&addr.into())?;
        UdpSocket::from_std(std::net::UdpSocket::from(OwnedFd::from(s)))
    }
}

/// Binds an upstream socket to a client's address, which the namespace does not hold
/// (`IP_TRANSPARENT`; the agent runs with `CAP_NET_ADMIN`). The client's own port is taken when
/// free; when an earlier connection of the same client port still holds it (TIME_WAIT), any
/// port of the client's address is.
fn bind_as(s: &Socket, from: SocketAddr) -> io::Result<()> {
    if from.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_reuse_address(true)?;
    if s.bind(&from.into()).is_ok() {
        return Ok(());
    }
    s.bind(&SocketAddr::new(from.ip(), 0).into())
}
