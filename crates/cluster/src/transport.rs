//! QUIC transport: one endpoint per node (server and client on the same UDP socket), cached
//! connections to peers, one bidirectional stream per RPC, and the Raft network on top.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::pki::{NodeIdentity, PinFailure, SERVER_NAME};
use crate::raft::{PeerContacts, TypeConfig};
use crate::wire::{
    FrameError, MAX_FRAME, RaftRequest, RaftResponse, Request, Response, decode_frame, encode_frame,
};

/// A failed call at the transport level (the peer never answered with a frame).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No connection could be made.
    #[error("cannot reach {addr}: {detail}")]
    Connect {
        /// Peer.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The connection or stream broke.
    #[error("connection to {addr} failed: {detail}")]
    Stream {
        /// Peer.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The answer was not a valid frame.
    #[error("bad answer from {addr}: {source}")]
    Frame {
        /// Peer.
        addr: SocketAddr,
        /// Frame error.
        source: FrameError,
    },
    /// No answer in time.
    #[error("{addr} did not answer within {after:?}")]
    Timeout {
        /// Peer.
        addr: SocketAddr,
        /// The deadline.
        after: Duration,
    },
    /// The server's certificate was refused by the pinned verifier.
    #[error("server certificate refused: {0:?}")]
    Pin(PinFailure),
}

/// A node's QUIC endpoint and its connections.
#[derive(Debug)]
pub struct Transport {
    endpoint: RwLock<Option<quinn::Endpoint>>,
    client: RwLock<quinn::ClientConfig>,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// Peers whose last call failed without an answer: asked last while others may answer.
    suspects: Mutex<HashSet<SocketAddr>>,
}

/// How long a QUIC handshake may take before the peer counts as unreachable: far less than an
/// RPC timeout, so a caller with other peers to ask moves on quickly from a dead one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Transport {
    /// Binds the endpoint on `listen` with `identity` for both directions.
    pub fn bind(listen: SocketAddr, identity: &NodeIdentity) -> Result<Transport, crate::Error> {
        let server = identity.server_config()?;
        let client = identity.client_config()?;
        let endpoint = quinn::Endpoint::server(server, listen).map_err(|e| crate::Error::Io {
            what: format!("binding the control plane on {listen}/udp"),
            source: e,
        })?;
        Ok(Transport {
            endpoint: RwLock::new(Some(endpoint)),
            client: RwLock::new(client),
            conns: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashSet::new()),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint().and_then(|e| e.local_addr().ok())
    }

    /// The endpoint (the server loop accepts on it); `None` once closed.
    pub fn endpoint(&self) -> Option<quinn::Endpoint> {
        self.endpoint.read().ok().and_then(|e| e.clone())
    }

    /// Swaps in a new certificate (after promote/demote); existing connections are dropped so the
    /// peers see the new role.
    pub fn set_identity(&self, identity: &NodeIdentity) -> Result<(), crate::Error> {
        if let Some(e) = self.endpoint() {
            e.set_server_config(Some(identity.server_config()?));
        }
        let client = identity.client_config()?;
        if let Ok(mut c) = self.client.write() {
            *c = client;
        }
        let old: Vec<quinn::Connection> = match self.conns.lock() {
            Ok(mut m) => m.drain().map(|(_, c)| c).collect(),
            Err(_) => Vec::new(),
        };
        for c in old {
            c.close(0u32.into(), b"identity changed");
        }
        Ok(())
    }

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, CallError> {
        if let Some(c) = self.conns.lock().ok().and_then(|m| m.get(&addr).cloned())
            && c.close_reason().is_none()
        {
            return Ok(c);
        }
        let cfg = self
            .client
            .read()
            .map(|c| c.clone())
            .map_err(|_| CallError::Connect { addr, detail: "poisoned".into() })?;
        let endpoint = self.endpoint().ok_or_else(|| CallError::Connect {
            addr,
            detail: "the control plane is shut down".into(),
        })?;
        let connecting = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|e| CallError::Connect { addr, detail: e.to_string() })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(r) => r.map_err(|e| CallError::Connect { addr, detail: e.to_string() })?,
            Err(_) => {
                let detail = format!("no QUIC handshake within {CONNECT_TIMEOUT:?}");
                return Err(CallError::Connect { addr, detail });
            }
        };
        if let Ok(mut m) = self.conns.lock() {
            m.insert(addr, conn.clone());
        }
        Ok(conn)
    }

    fn forget(&self, addr: SocketAddr) {
        if let Ok(mut m) = self.conns.lock() {
            m.remove(&addr);
        }
    }

    /// One RPC with this node's certificate; a broken cached connection is retried once.
    pub async fn call(
        &self,
        addr: SocketAddr,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let frame = encode_frame(req);
        let attempt = async {
            for round in 0..2 {
                let conn = self.connection(addr).await?;
                match rpc(&conn, addr, &frame).await {
                    Err(CallError::Stream { .. }) if round == 0 => {
                        self.forget(addr);
                        continue;
                    }
                    Err(e) => {
                        self.forget(addr);
                        return Err(e);
                    }
                    Ok(r) => return Ok(r),
                }
            }
            Err(CallError::Connect { addr, detail: "connection lost twice".into() })
        };
        let r = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                self.forget(addr);
                Err(CallError::Timeout { addr, after: timeout })
            }
        };
        if let Ok(mut s) = self.suspects.lock() {
            match &r {
                Ok(_) => s.remove(&addr),
                Err(_) => s.insert(addr),
            };
        }
        r
    }

    /// `addrs` in the order to ask them: peers that answered last time (or were never asked)
    /// first, in their order, then the ones whose last call failed.
    pub fn suspects_last(&self, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let Ok(suspects) = self.suspects.lock() else { return addrs };
        let (bad, good): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| suspects.contains(a));
        good.into_iter().chain(bad).collect()
    }

    /// Closes every connection and the endpoint, and waits (up to 2 s) until the UDP socket is
    /// released, so the same address can be bound again in this process.
    pub async fn close(&self) {
        if let Ok(mut m) = self.conns.lock() {
            m.clear();
        }
        let ep = self.endpoint.write().ok().and_then(|mut e| e.take());
        if let Some(ep) = ep {
            ep.close(0u32.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
    }
}

async fn rpc(
    conn: &quinn::Connection,
    addr: SocketAddr,
    frame: &[u8],
) -> Result<Response, CallError> {
    let stream = |e: &dyn std::fmt::Display| CallError::Stream { addr, detail: e.to_string() };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(&e))?;
    send.write_all(frame).await.map_err(|e| stream(&e))?;
    send.finish().map_err(|e| stream(&e))?;
    let buf = match recv.read_to_end(MAX_FRAME + 4).await {
        Ok(b) => b,
        Err(quinn::ReadToEndError::TooLong) => {
            return Err(CallError::Frame {
                addr,
                source: FrameError::TooLarge { len: MAX_FRAME + 5, limit: MAX_FRAME },
            });
        }
        Err(e) => return Err(stream(&e)),
    };
    decode_frame(&buf, MAX_FRAME).map_err(|source| CallError::Frame { addr, source })
}

/// One RPC from a client without a certificate (a joiner), pinning the CA by `digest`.
pub async fn call_pinned(
    addr: SocketAddr,
    digest: [u8; 32],
    req: &Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    call_pinned_raw(addr, digest, encode_frame(req), timeout).await
}

/// Like [`call_pinned`] with the request bytes given as they are (tests send malformed frames).
pub async fn call_pinned_raw(
    addr: SocketAddr,
    digest: [u8; 32],
    frame: Vec<u8>,
    timeout: Duration,
) -> Result<Response, CallError> {
    let (cfg, failure) = crate::pki::pinned_client_config(digest)
        .map_err(|e| CallError::Connect { addr, detail: e.to_string() })?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| CallError::Connect { addr, detail: e.to_string() })?;
    let pin_failure = || failure.lock().ok().and_then(|g| g.clone());
    let attempt = async {
        let connecting = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|e| CallError::Connect { addr, detail: e.to_string() })?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                return Err(match pin_failure() {
                    Some(p) => CallError::Pin(p),
                    None => CallError::Connect { addr, detail: e.to_string() },
                });
            }
        };
        let r = rpc(&conn, addr, &frame).await;
        conn.close(0u32.into(), b"done");
        r
    };
    let res = match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Timeout { addr, after: timeout }),
    };
    endpoint.close(0u32.into(), b"done");
    res.map_err(|e| match pin_failure() {
        Some(p) => CallError::Pin(p),
        None => e,
    })
}

/// Builds Raft clients over the transport.
#[derive(Debug, Clone)]
pub struct RaftNet {
    /// The node's transport.
    pub transport: Arc<Transport>,
    /// Where successful contacts are recorded.
    pub contacts: PeerContacts,
}

impl RaftNetworkFactory<TypeConfig> for RaftNet {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> RaftPeer {
        RaftPeer {
            target,
            addr: crate::raft::node_addr(node),
            transport: self.transport.clone(),
            contacts: self.contacts.clone(),
        }
    }
}

/// A Raft client to one peer.
#[derive(Debug)]
pub struct RaftPeer {
    target: u64,
    addr: Option<SocketAddr>,
    transport: Arc<Transport>,
    contacts: PeerContacts,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl RaftPeer {
    async fn send<E: std::error::Error>(
        &self,
        req: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftResponse, RPCError<u64, BasicNode, E>> {
        let Some(addr) = self.addr else {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "node {} has no valid address",
                self.target
            )))));
        };
        let timeout = option.hard_ttl().max(Duration::from_millis(200));
        match self.transport.call(addr, &Request::Raft(req), timeout).await {
            Ok(Response::Raft(r)) => {
                self.contacts.touch(self.target, Instant::now());
                Ok(r)
            }
            Ok(Response::Error(e)) => Err(RPCError::Network(NetworkError::new(&Msg(e.message)))),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&Msg(
                "unexpected answer to a Raft request".into(),
            )))),
            Err(e @ (CallError::Connect { .. } | CallError::Timeout { .. })) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.send(RaftRequest::Append(rpc), &option).await? {
            RaftResponse::Append(Ok(r)) => Ok(r),
            RaftResponse::Append(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(RPCError::Network(NetworkError::new(&Msg("mismatched Raft answer".into())))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.send(RaftRequest::Snapshot(rpc), &option).await? {
            RaftResponse::Snapshot(Ok(r)) => Ok(r),
            RaftResponse::Snapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(RPCError::Network(NetworkError::new(&Msg("mismatched Raft answer".into())))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.send(RaftRequest::Vote(rpc), &option).await? {
            RaftResponse::Vote(Ok(r)) => Ok(r),
            RaftResponse::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(RPCError::Network(NetworkError::new(&Msg("mismatched Raft answer".into())))),
        }
    }
}
