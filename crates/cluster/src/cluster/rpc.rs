//! The RPC edge, [`Router`]: serving QUIC streams, who the caller is (its certificate, checked
//! against the store), the checks on Raft messages, direct requests and connections whose CA is
//! no longer trusted (see `authz`), dispatching a request to this node, to Raft or to the
//! leader, and sending this node's own requests (riding out leader elections).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::authz::{RefusalCounts, Refusals};
use crate::model::{NodeId, Role};
use crate::wire::{
    Caller, ErrorKind, FrameError, MAX_ANON_FRAME, MAX_FRAME, ManageRequest, NodeRequest,
    RaftRequest, Request, Response, RpcError, decode_frame, encode_frame,
};
use crate::{Error, NOT_MANAGER};

use super::errors::{from_rpc, rpc_err, to_rpc};
use super::leader::Leader;
use super::manager::ManagerParts;
use super::node::Node;
use super::{NodeHandler, lock, security};

const NO_LEADER: &str = "The swarm does not have a leader. It's possible that too few managers are online. Make sure more than half of the managers are online.";

#[derive(Clone, Default)]
struct HandlerSlot(Option<NodeHandler>);

impl std::fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "NodeHandler" } else { "NoNodeHandler" })
    }
}

/// Where every request meets this node: its own (the node API, the session) and its peers'.
/// It owns who may ask what: the refusal counters, the managers its last session named (who
/// may ask it directly) and what answers direct requests; a request for the leader goes to
/// [`Leader`] while this node leads, and is forwarded to the leader otherwise.
#[derive(Debug)]
pub(super) struct Router {
    node: Arc<Node>,
    leader: Arc<Leader>,
    refusals: Refusals,
    /// The store's managers as the last session round said (empty before the first one).
    managers: Mutex<Vec<NodeId>>,
    handler: RwLock<HandlerSlot>,
}

impl Router {
    pub(super) fn new(node: Arc<Node>, leader: Arc<Leader>) -> Router {
        Router {
            node,
            leader,
            refusals: Refusals::default(),
            managers: Mutex::default(),
            handler: RwLock::default(),
        }
    }

    /// Serves the control plane's QUIC endpoint until it closes.
    pub(super) async fn serve(self: Arc<Self>) {
        let Some(endpoint) = self.node.transport.endpoint() else { return };
        while let Some(incoming) = endpoint.accept().await {
            let router = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "control handshake failed");
                        return;
                    }
                };
                let caller = caller_of(&conn);
                let peer_ca = peer_cert(&conn).and_then(|c| {
                    router.node.identity.read().ok().and_then(|i| security::peer_ca(&i, &c))
                });
                while let Ok((mut send, recv)) = conn.accept_bi().await {
                    if let Some(refused) = router.check_peer_ca(caller, peer_ca) {
                        let _ = send.write_all(&encode_frame(&refused)).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                        conn.close(0u32.into(), b"certificate from a CA no longer trusted");
                        return;
                    }
                    let router = router.clone();
                    tokio::spawn(async move { router.handle_stream(caller, send, recv).await });
                }
            });
        }
    }

    async fn handle_stream(
        &self,
        caller: Caller,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let limit = if caller == Caller::Anonymous { MAX_ANON_FRAME } else { MAX_FRAME };
        let resp = match recv.read_to_end(limit + 4).await {
            Ok(buf) => match decode_frame::<Request>(&buf, limit) {
                Ok(req) => self.dispatch(caller, req).await,
                Err(e) => rpc_err(ErrorKind::BadRequest, e.to_string()),
            },
            Err(quinn::ReadToEndError::TooLong) => rpc_err(
                ErrorKind::BadRequest,
                FrameError::TooLarge { len: limit + 5, limit }.to_string(),
            ),
            Err(_) => return,
        };
        let _ = send.write_all(&encode_frame(&resp)).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }

    fn timeout_for(&self, req: &Request) -> Duration {
        match req {
            Request::Manage(ManageRequest::RotateGossipKey)
            | Request::Manage(ManageRequest::Ca { rotate: true }) => {
                self.node.tuning.rpc_timeout * 2 + self.node.tuning.heartbeat * 24
            }
            Request::Manage(ManageRequest::JoinRaft)
            | Request::Manage(ManageRequest::Demote(_))
            | Request::Leave => self.node.tuning.rpc_timeout * 5,
            Request::Forwarded { request, .. } => self.timeout_for(request),
            _ => self.node.tuning.rpc_timeout,
        }
    }

    /// A request from this node's own API: handled locally on a manager (which forwards to the
    /// leader), otherwise sent to a known manager.
    ///
    /// A leader election is ridden out: while there is no leader (or it cannot be reached), the
    /// request is tried again for up to [`Tuning::failover_window`]. Requests are reads or
    /// writes that set state, so sending one again after a dying leader took it is harmless (at
    /// worst a repeated `node rm` says the node is gone).
    pub(super) async fn request(&self, req: Request) -> Result<Response, Error> {
        let deadline = Instant::now() + self.node.tuning.failover_window();
        loop {
            let r = match self.call_leader(req.clone()).await {
                Ok(Response::Error(e)) => Err(from_rpc(e)),
                r => r,
            };
            match r {
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "no leader; trying again");
                    tokio::time::sleep(self.node.tuning.raft_heartbeat).await;
                }
                r => return r,
            }
        }
    }

    /// A request to the leader, once: through this manager, or else to the known managers.
    pub(super) async fn call_leader(&self, req: Request) -> Result<Response, Error> {
        // A node just demoted still runs Raft until its session notices, but its worker
        // certificate may no longer forward: it asks the managers as the worker it is.
        if self.node.manager().is_some() && self.node.cert_role() == Role::Manager {
            let caller = Caller::Member { node: self.node.me(), role: self.node.cert_role() };
            let r = self.dispatch(caller, req.clone()).await;
            // A manager that lost track of the leader (e.g. just demoted) asks the others; a
            // voter learns of the next leader itself (and `request` tries again), where asking
            // the others could mean waiting on the one that just died.
            // And a manager demoted in the store but not told yet may no longer forward: the
            // leader refuses it, and the others relay for it as for a worker.
            match &r {
                Response::Error(RpcError { kind: ErrorKind::NoLeader, .. })
                    if !self.node.is_voter() => {}
                Response::Error(RpcError { kind: ErrorKind::PermissionDenied, .. }) => {}
                _ => return Ok(r),
            }
        }
        let managers = self.node.local().managers;
        let own = self.node.local().advertise_addr;
        let mut last = Error::NoLeader("no manager is known to this node".into());
        let managers = self.node.transport.suspects_last(managers);
        for addr in managers.into_iter().filter(|a| *a != own) {
            match self.node.transport.call(addr, &req, self.timeout_for(&req)).await {
                // A manager still starting Raft (or just demoted) says it is not a manager; with a
                // manager certificate that is about the peer, not us: ask the next one.
                Ok(Response::Error(e))
                    if e.kind == ErrorKind::NoLeader
                        || (e.kind == ErrorKind::NotManager
                            && self.node.cert_role() == Role::Manager) =>
                {
                    last = from_rpc(e)
                }
                Ok(r) => return Ok(r),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    async fn dispatch(&self, caller: Caller, req: Request) -> Response {
        match (caller, req) {
            (Caller::Anonymous, Request::Join(j)) => self.route(caller, Request::Join(j)).await,
            (Caller::Anonymous, _) => rpc_err(
                ErrorKind::PermissionDenied,
                "a client without a cluster certificate may only join",
            ),
            (Caller::Member { node, role }, Request::Raft(r)) => {
                if role != Role::Manager {
                    return rpc_err(
                        ErrorKind::PermissionDenied,
                        format!("a {role} certificate cannot take part in Raft"),
                    );
                }
                if let Some(m) = self.node.manager()
                    && let Some(refused) = self.check_raft(&m, node, &r)
                {
                    return refused;
                }
                self.handle_raft(r).await
            }
            (
                Caller::Member { role: Role::Manager, .. },
                Request::Forwarded { origin, request },
            ) => {
                if matches!(*request, Request::Forwarded { .. } | Request::Raft(_)) {
                    return rpc_err(ErrorKind::BadRequest, "nested forwarding");
                }
                match self.node.manager() {
                    Some(m) if m.leads() => {
                        // The origin is the forwarder's word: only a current manager's counts.
                        match m.authorize(caller) {
                            Ok((_, Role::Manager)) => {}
                            Ok(_) => {
                                return rpc_err(
                                    ErrorKind::PermissionDenied,
                                    "only managers forward requests",
                                );
                            }
                            Err(e) => return to_rpc(e),
                        }
                        self.leader.handle(&m, origin, *request).await
                    }
                    _ => rpc_err(
                        ErrorKind::NoLeader,
                        "leadership moved while the request was forwarded; retry",
                    ),
                }
            }
            (Caller::Member { role: Role::Manager, .. }, Request::Probe) => {
                match self.node.manager() {
                    Some(m) => Response::Probe { leader_alive: m.leader_alive() },
                    None => rpc_err(ErrorKind::NotManager, NOT_MANAGER),
                }
            }
            (Caller::Member { .. }, Request::Probe) => {
                rpc_err(ErrorKind::PermissionDenied, "only managers probe managers")
            }
            (Caller::Member { node, role: Role::Manager }, Request::Node(r)) => {
                if let Some(refused) = self.check_node_request(node, &r) {
                    return refused;
                }
                self.node_request(r).await.unwrap_or_else(to_rpc)
            }
            (Caller::Member { .. }, Request::Node(_)) => {
                rpc_err(ErrorKind::PermissionDenied, "only managers ask nodes directly")
            }
            (Caller::Member { .. }, Request::Forwarded { .. }) => {
                rpc_err(ErrorKind::PermissionDenied, "only managers forward requests")
            }
            (Caller::Member { role, .. }, req) => {
                if role == Role::Worker && matches!(req, Request::Manage(_)) {
                    return rpc_err(ErrorKind::NotManager, NOT_MANAGER);
                }
                self.route(caller, req).await
            }
        }
    }

    async fn route(&self, caller: Caller, req: Request) -> Response {
        let Some(m) = self.node.manager() else {
            // Only a peer gets here (a node's own requests go straight to the managers when it
            // runs no Raft): the caller should ask another manager.
            return rpc_err(
                ErrorKind::NoLeader,
                "this node does not run Raft (yet); ask another manager",
            );
        };
        match m.leader() {
            Some((l, _)) if l == self.node.me().0 => self.leader.handle(&m, caller, req).await,
            Some((leader, Some(addr))) => {
                let timeout = self.timeout_for(&req);
                let fwd = Request::Forwarded { origin: caller, request: Box::new(req) };
                // A leader that dies holds a forwarded request until its timeout; give up on it
                // as soon as Raft has moved on, so the caller can retry with the new leader.
                let mut metrics = m.raft.metrics();
                let moved = async {
                    loop {
                        if metrics.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        if metrics.borrow().current_leader != Some(leader) {
                            return;
                        }
                    }
                };
                tokio::select! {
                    r = self.node.transport.call(addr, &fwd, timeout) => match r {
                        Ok(r) => r,
                        Err(e) => {
                            rpc_err(ErrorKind::NoLeader, format!("cannot reach the leader: {e}"))
                        }
                    },
                    () = moved => rpc_err(
                        ErrorKind::NoLeader,
                        "the leader changed while the request was forwarded; retry",
                    ),
                }
            }
            _ => rpc_err(ErrorKind::NoLeader, NO_LEADER),
        }
    }

    pub(super) async fn node_request(&self, r: NodeRequest) -> Result<Response, Error> {
        let handler = self.handler.read().unwrap_or_else(|e| e.into_inner()).0.clone();
        let Some(h) = handler else {
            return Err(Error::BadRequest("this node answers no node requests".into()));
        };
        h(r).await.map(Response::Value).map_err(Error::BadRequest)
    }

    async fn handle_raft(&self, r: RaftRequest) -> Response {
        match self.node.manager() {
            Some(m) => Response::Raft(m.handle_raft(r).await),
            None => rpc_err(ErrorKind::NotManager, NOT_MANAGER),
        }
    }

    /// Raft messages only from Raft's own membership (see `authz`).
    fn check_raft(&self, m: &ManagerParts, caller: NodeId, r: &RaftRequest) -> Option<Response> {
        let what = match r {
            RaftRequest::Append(_) => "AppendEntries",
            RaftRequest::Vote(_) => "Vote",
            RaftRequest::Snapshot(_) => "InstallSnapshot",
        };
        let effective = m.raft.metrics().borrow().membership_config.membership().clone();
        let applied = m.sm.applied_membership();
        let e = crate::authz::check_raft_sender(caller, what, &effective, &applied).err()?;
        self.refusals.raft();
        tracing::warn!(node = %caller, "{e}");
        Some(rpc_err(ErrorKind::PermissionDenied, e))
    }

    /// Direct requests only from the store's managers: this manager's store, or on a worker the
    /// list its last session brought (before the first one, the certificate's role stands).
    fn check_node_request(&self, caller: NodeId, r: &NodeRequest) -> Option<Response> {
        let manager = match self.node.manager() {
            Some(m) => {
                m.sm.with_state(|s| s.nodes.get(&caller).map(|n| n.role)) == Some(Role::Manager)
            }
            None => {
                let ids = lock(&self.managers);
                ids.is_empty() || ids.contains(&caller)
            }
        };
        if manager {
            return None;
        }
        self.refusals.node_request();
        tracing::warn!(node = %caller, request = ?r, "a direct request from a node that is not a manager");
        Some(rpc_err(
            ErrorKind::PermissionDenied,
            format!(
                "node {caller} is not a manager of this swarm; only managers ask nodes directly"
            ),
        ))
    }

    /// A request over a connection whose client certificate a CA this node no longer trusts
    /// signed (opened before a CA rotation finished) is refused: `Some` answer.
    fn check_peer_ca(&self, caller: Caller, peer_ca: Option<[u8; 32]>) -> Option<Response> {
        let Caller::Member { node, .. } = caller else { return None };
        let trusted = self.node.identity.read().map(|i| i.trusted_digests()).unwrap_or_default();
        if peer_ca.is_some_and(|d| trusted.contains(&d)) {
            return None;
        }
        self.refusals.untrusted_ca();
        Some(rpc_err(
            ErrorKind::PermissionDenied,
            format!(
                "node {node}'s certificate is from a CA this swarm no longer trusts; join the swarm again"
            ),
        ))
    }

    /// Registers what answers [`NodeRequest`]s from managers on this node.
    pub(super) fn set_handler(&self, handler: Option<NodeHandler>) {
        *self.handler.write().unwrap_or_else(|e| e.into_inner()) = HandlerSlot(handler);
    }

    /// The store's managers as a session round named them: who may ask this node directly.
    pub(super) fn set_managers(&self, ids: &[NodeId]) {
        if !ids.is_empty() {
            *lock(&self.managers) = ids.to_vec();
        }
    }

    /// Requests this node refused since it started (see `authz`).
    pub(super) fn refusals(&self) -> RefusalCounts {
        self.refusals.counts()
    }
}

fn peer_cert(conn: &quinn::Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let chain =
        conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

fn caller_of(conn: &quinn::Connection) -> Caller {
    let Some(any) = conn.peer_identity() else { return Caller::Anonymous };
    let Ok(chain) = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>() else {
        return Caller::Anonymous;
    };
    match chain.first().map(|c| crate::pki::cert_info(c)) {
        Some(Ok(info)) => Caller::Member { node: info.node, role: info.role },
        // A certificate from our CA that is not a node certificate gets no rights.
        _ => Caller::Anonymous,
    }
}
