//! Forwarding of names that are not ours to the host's resolvers.
//!
//! The upstream list comes from a resolv.conf path, read at start and re-read whenever its
//! contents change. Upstream sockets are made by the tokio runtime that drives the service, whose
//! threads live in the agent's (host) namespace, so a forwarded query can never come back to a
//! task listener. Each forward gets its own connected UDP socket (random source port and id),
//! falls back to TCP when the reply is truncated, tries the servers in order with a per-attempt
//! timeout, and a bounded number may be in flight. With no usable resolver the caller learns so
//! at once and answers SERVFAIL without waiting.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::metrics::{ForwardResult, Metrics};

/// Like glibc, at most three resolvers are used.
pub const MAX_UPSTREAMS: usize = 3;

/// Our own listening address: never a valid upstream (it would be a loop).
const OWN_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));

/// Why a query could not be forwarded. Every variant is answered SERVFAIL.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The resolv.conf has no usable `nameserver` line (or is missing).
    #[error("no usable upstream resolver")]
    NoUpstream,
    /// The in-flight bound is reached; retrying later can help.
    #[error("too many forwarded queries in flight")]
    Busy,
    /// No upstream answered in time.
    #[error("upstream resolvers timed out")]
    Timeout,
    /// A socket error talking to an upstream.
    #[error("upstream {server}: {source}")]
    Io {
        /// The upstream.
        server: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The upstream's reply was malformed or did not match the question.
    #[error("upstream {server}: unusable reply: {reason}")]
    BadReply {
        /// The upstream.
        server: SocketAddr,
        /// What was wrong with it.
        reason: &'static str,
    },
}

impl ForwardError {
    fn result(&self) -> ForwardResult {
        match self {
            ForwardError::NoUpstream => ForwardResult::NoUpstream,
            ForwardError::Busy => ForwardResult::Busy,
            ForwardError::Timeout => ForwardResult::Timeout,
            ForwardError::Io { .. } | ForwardError::BadReply { .. } => ForwardResult::Error,
        }
    }
}

/// Parses the `nameserver` lines of a resolv.conf into upstream addresses (port 53), skipping
/// comments, unparsable addresses, unspecified addresses and our own 127.0.0.11; at most
/// [`MAX_UPSTREAMS`], in file order, without duplicates.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        // Scoped IPv6 (fe80::1%eth0) is dropped: the scope names an interface of another
        // namespace as often as not.
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        if ip.is_unspecified() || ip == OWN_ADDR || ip.is_multicast() {
            continue;
        }
        let sa = SocketAddr::new(ip, 53);
        if !out.contains(&sa) {
            out.push(sa);
        }
        if out.len() == MAX_UPSTREAMS {
            break;
        }
    }
    out
}

/// Forwarding settings.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// The resolv.conf to read upstreams from.
    pub resolv_conf: PathBuf,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// Timeout of one attempt against one upstream.
    pub attempt_timeout: Duration,
    /// Most forwarded queries in flight at once; beyond it, SERVFAIL at once.
    pub max_in_flight: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            poll: Duration::from_secs(1),
            attempt_timeout: Duration::from_millis(1500),
            max_in_flight: 1024,
        }
    }
}

/// The forwarder: the current upstream list and the in-flight bound.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: ArcSwap<Vec<SocketAddr>>,
    inflight: Semaphore,
    attempt_timeout: Duration,
    metrics: Metrics,
}

/// What a question must look like in the upstream's reply.
#[derive(Debug, Clone)]
pub struct Question {
    /// Name, compared case-insensitively.
    pub name: Name,
    /// Type.
    pub qtype: RecordType,
    /// Class.
    pub qclass: DNSClass,
}

impl Forwarder {
    /// A forwarder with the given upstreams.
    pub fn new(config: &ForwardConfig, upstreams: Vec<SocketAddr>, metrics: Metrics) -> Self {
        Forwarder {
            upstreams: ArcSwap::from_pointee(upstreams),
            inflight: Semaphore::new(config.max_in_flight.max(1)),
            attempt_timeout: config.attempt_timeout,
            metrics,
        }
    }

    /// The upstreams in use.
    pub fn upstreams(&self) -> Arc<Vec<SocketAddr>> {
        self.upstreams.load_full()
    }

    /// Replaces the upstreams.
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.upstreams.store(Arc::new(upstreams));
    }

    /// Forwards the raw `query` (as the client sent it) and returns the upstream's reply, whose
    /// id is ours, not the client's: the caller relays it under the client's id.
    pub async fn forward(
        &self,
        query: &[u8],
        question: &Question,
    ) -> Result<Message, ForwardError> {
        let r = self.forward_inner(query, question).await;
        self.metrics.forward(match &r {
            Ok(_) => ForwardResult::Ok,
            Err(e) => e.result(),
        });
        r
    }

    async fn forward_inner(
        &self,
        query: &[u8],
        question: &Question,
    ) -> Result<Message, ForwardError> {
        let servers = self.upstreams.load_full();
        if servers.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let _permit = self.inflight.try_acquire().map_err(|_| ForwardError::Busy)?;
        if query.len() < 12 {
            return Err(ForwardError::BadReply {
                server: servers[0],
                reason: "query shorter than a header",
            });
        }
        let id: u16 = rand::random();
        let mut bytes = query.to_vec();
        bytes[..2].copy_from_slice(&id.to_be_bytes());

        let mut last = ForwardError::Timeout;
        for &server in servers.iter() {
            let attempt = async {
                let reply = udp_exchange(server, &bytes, id, question).await?;
                if reply.metadata.truncation {
                    tcp_exchange(server, &bytes, id, question).await
                } else {
                    Ok(reply)
                }
            };
            match tokio::time::timeout(self.attempt_timeout, attempt).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => {
                    tracing::debug!(%server, error = %e, "upstream failed");
                    last = e;
                }
                Err(_) => {
                    tracing::debug!(%server, "upstream timed out");
                    last = ForwardError::Timeout;
                }
            }
        }
        Err(last)
    }
}

/// An upstream's reply to our query `id` for `question`: `Ok(None)` if it answers something else
/// (late or spoofed: keep waiting), an error if it is malformed or asks another question.
pub(crate) fn check_reply(
    server: SocketAddr,
    buf: &[u8],
    id: u16,
    question: &Question,
) -> Result<Option<Message>, ForwardError> {
    let Ok(msg) = Message::from_vec(buf) else {
        return Err(ForwardError::BadReply { server, reason: "malformed" });
    };
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        // Not the reply to our query (late or spoofed): keep waiting.
        return Ok(None);
    }
    // Name equality in hickory is case-insensitive.
    let matches = msg.queries.len() == 1
        && msg.queries[0].name() == &question.name
        && msg.queries[0].query_type() == question.qtype
        && msg.queries[0].query_class() == question.qclass;
    if !matches {
        return Err(ForwardError::BadReply { server, reason: "question does not match" });
    }
    Ok(Some(msg))
}

fn unspecified_for(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

async fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Question,
) -> Result<Message, ForwardError> {
    let io = |source| ForwardError::Io { server, source };
    let sock = tokio::net::UdpSocket::bind(unspecified_for(server)).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    sock.send(bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        if let Some(msg) = check_reply(server, &buf[..n], id, question)? {
            return Ok(msg);
        }
    }
}

async fn tcp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Question,
) -> Result<Message, ForwardError> {
    let io = |source| ForwardError::Io { server, source };
    let mut s = tokio::net::TcpStream::connect(server).await.map_err(io)?;
    let len = u16::try_from(bytes.len())
        .map_err(|_| ForwardError::BadReply { server, reason: "query too long for TCP" })?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    s.write_all(&out).await.map_err(io)?;
    let mut lenb = [0u8; 2];
    s.read_exact(&mut lenb).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(lenb))];
    s.read_exact(&mut buf).await.map_err(io)?;
    check_reply(server, &buf, id, question)?
        .ok_or(ForwardError::BadReply { server, reason: "id mismatch over TCP" })
}

/// Reads `path` once: its bytes (`None` when missing or unreadable) and its upstreams.
pub fn read_resolv_conf(path: &Path) -> (Option<Vec<u8>>, Vec<SocketAddr>) {
    match std::fs::read(path) {
        Ok(bytes) => {
            let ups = parse_resolv_conf(&String::from_utf8_lossy(&bytes));
            (Some(bytes), ups)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read resolv.conf: no upstream");
            (None, Vec::new())
        }
    }
}

/// Re-reads `path` every `poll` and swaps in its upstreams when its contents differ from what
/// was last seen (`initial`, read by the caller when it set the first upstreams, so a change
/// right after start is never missed). Runs until the returned task is aborted.
pub(crate) fn spawn_watcher(
    path: PathBuf,
    poll: Duration,
    forwarder: Arc<Forwarder>,
    initial: Option<Vec<u8>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = initial;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::fs::read(&path).await.ok();
            if now != last {
                let ups = now
                    .as_deref()
                    .map(|b| parse_resolv_conf(&String::from_utf8_lossy(b)))
                    .unwrap_or_default();
                tracing::info!(path = %path.display(), upstreams = ?ups, "resolv.conf changed");
                forwarder.set_upstreams(ups);
                last = now;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_parsing() {
        let text = "# generated\nsearch example.com\nnameserver 192.0.2.1\n\
                    nameserver   2001:db8::1 \n; comment\nnameserver 127.0.0.11\n\
                    nameserver 0.0.0.0\nnameserver fe80::1%eth0\nnameserver bogus\n\
                    nameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\n";
        let got = parse_resolv_conf(text);
        let want: Vec<SocketAddr> = ["192.0.2.1:53", "[2001:db8::1]:53", "192.0.2.2:53"]
            .iter()
            .map(|s| s.parse().expect("addr"))
            .collect();
        assert_eq!(got, want);
        assert!(parse_resolv_conf("").is_empty());
        assert!(parse_resolv_conf("nameserver 127.0.0.11\n").is_empty());
    }

    proptest::proptest! {
        /// Any file: at most three distinct upstreams on port 53, never our own address.
        #[test]
        fn resolv_conf_parsing_is_total(text in "((nameserver|search|options|#)[ \t]+[0-9a-f.:% ]{0,20}\n){0,8}|\\PC{0,200}") {
            let ups = parse_resolv_conf(&text);
            proptest::prop_assert!(ups.len() <= MAX_UPSTREAMS);
            for (i, u) in ups.iter().enumerate() {
                proptest::prop_assert_eq!(u.port(), 53);
                proptest::prop_assert!(u.ip() != OWN_ADDR && !u.ip().is_unspecified());
                proptest::prop_assert!(!ups[..i].contains(u));
            }
        }
    }

    #[tokio::test]
    async fn in_flight_bound_answers_busy_at_once() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let config = ForwardConfig {
            max_in_flight: 1,
            attempt_timeout: Duration::from_secs(2),
            ..ForwardConfig::default()
        };
        let f = Arc::new(Forwarder::new(
            &config,
            vec![silent.local_addr().expect("addr")],
            Metrics::new(),
        ));
        let q = Question {
            name: Name::from_ascii("example.com.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let query = [0u8; 17];
        let first = {
            let (f, q) = (f.clone(), q.clone());
            tokio::spawn(async move { f.forward(&query, &q).await })
        };
        // Let the first one take the only slot.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        let r = f.forward(&query, &q).await;
        assert!(matches!(r, Err(ForwardError::Busy)), "{r:?}");
        assert!(t.elapsed() < Duration::from_millis(100));
        first.abort();
    }

    #[tokio::test]
    async fn no_upstream_fails_at_once() {
        let f = Forwarder::new(&ForwardConfig::default(), vec![], Metrics::new());
        let q = Question {
            name: Name::from_ascii("example.com.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let t = std::time::Instant::now();
        let r = f.forward(&[0u8; 17], &q).await;
        assert!(matches!(r, Err(ForwardError::NoUpstream)), "{r:?}");
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
