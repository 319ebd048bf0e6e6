//! The RPC edge: serving QUIC streams, who the caller is (its certificate, checked against the
//! store), dispatching a request to this node, to Raft or to the leader, sending this node's
//! own requests (riding out leader elections), and the mapping of errors to and from the wire.

use super::*;

pub(super) fn rpc_err(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(RpcError { kind, message: message.into() })
}

pub(super) fn to_rpc(e: Error) -> Response {
    let kind = match &e {
        Error::Token(_) | Error::WrongToken(_) | Error::CaMismatch => ErrorKind::WrongToken,
        Error::RotatedToken(_) => ErrorKind::RotatedToken,
        Error::NotManager(_) => ErrorKind::NotManager,
        Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
        Error::NotFound(_) => ErrorKind::NotFound,
        Error::Refused(_) | Error::AlreadyInSwarm(_) => ErrorKind::Refused,
        Error::Conflict(_) => ErrorKind::Conflict,
        Error::NoLeader(_) | Error::Transport(_) => ErrorKind::NoLeader,
        Error::BadRequest(_) | Error::Pki(_) => ErrorKind::BadRequest,
        Error::Io { .. } | Error::Store(_) => ErrorKind::Internal,
    };
    let message = match e {
        Error::PermissionDenied(m) => m,
        other => other.to_string(),
    };
    Response::Error(RpcError { kind, message })
}

pub(super) fn from_rpc(e: RpcError) -> Error {
    match e.kind {
        ErrorKind::NotManager => Error::NotManager(e.message),
        ErrorKind::PermissionDenied => Error::PermissionDenied(e.message),
        ErrorKind::WrongToken => Error::WrongToken(e.message),
        ErrorKind::RotatedToken => Error::RotatedToken(e.message),
        ErrorKind::NotFound => Error::NotFound(e.message),
        ErrorKind::Refused => Error::Refused(e.message),
        ErrorKind::Conflict => Error::Conflict(e.message),
        ErrorKind::NoLeader => Error::NoLeader(e.message),
        ErrorKind::BadRequest => Error::BadRequest(e.message),
        ErrorKind::Internal => Error::Store(e.message),
    }
}

pub(super) fn unexpected(r: &Response) -> Error {
    Error::BadRequest(format!(
        "unexpected answer: {}",
        match r {
            Response::Joined(_) => "Joined",
            Response::Session(_) => "Session",
            Response::Cert { .. } => "Cert",
            Response::Nodes(_) => "Nodes",
            Response::Node(_) => "Node",
            Response::Token(_) => "Token",
            Response::Done { .. } => "Done",
            Response::State(_) => "State",
            Response::Delta(_) => "Delta",
            Response::Raft(_) => "Raft",
            Response::Value(_) => "Value",
            Response::Probe { .. } => "Probe",
            Response::Error(_) => "Error",
        }
    ))
}

pub(super) async fn serve(inner: Arc<Inner>) {
    let Some(endpoint) = inner.transport.endpoint() else { return };
    while let Some(incoming) = endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "control handshake failed");
                    return;
                }
            };
            let caller = caller_of(&conn);
            let peer_ca = peer_cert(&conn)
                .and_then(|c| inner.identity.read().ok().and_then(|i| security::peer_ca(&i, &c)));
            while let Ok((mut send, recv)) = conn.accept_bi().await {
                if let Some(refused) = inner.check_peer_ca(caller, peer_ca) {
                    let _ = send.write_all(&encode_frame(&refused)).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                    conn.close(0u32.into(), b"certificate from a CA no longer trusted");
                    return;
                }
                let inner = inner.clone();
                tokio::spawn(async move { handle_stream(inner, caller, send, recv).await });
            }
        });
    }
}

fn peer_cert(conn: &quinn::Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let chain =
        conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

pub(super) fn caller_of(conn: &quinn::Connection) -> Caller {
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

/// The caller as the store knows it now: a node of the swarm, with the role the store gives it.
/// The certificate names the node, but its role is only what the node was when the certificate
/// was issued, and it outlives a removal or a demotion.
pub(super) fn authorize(m: &ManagerParts, caller: Caller) -> Result<(NodeId, Role), Error> {
    let Caller::Member { node, .. } = caller else {
        return Err(Error::PermissionDenied("this request needs a cluster certificate".into()));
    };
    m.sm.with_state(|s| s.nodes.get(&node).map(|n| n.role)).map(|role| (node, role)).ok_or_else(
        || {
            Error::PermissionDenied(format!(
                "node {node} is not a member of this swarm (it was removed); join again"
            ))
        },
    )
}

pub(super) async fn handle_stream(
    inner: Arc<Inner>,
    caller: Caller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let limit = if caller == Caller::Anonymous { MAX_ANON_FRAME } else { MAX_FRAME };
    let resp = match recv.read_to_end(limit + 4).await {
        Ok(buf) => match decode_frame::<Request>(&buf, limit) {
            Ok(req) => inner.dispatch(caller, req).await,
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

impl Inner {
    /// The Raft leader as this manager sees it; `None` while there is none, and on a leader that
    /// lost its quorum (check-quorum, see `failover`).
    pub(super) fn leader_of(m: &ManagerParts) -> Option<(u64, Option<SocketAddr>)> {
        let metrics = m.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let voters = metrics.membership_config.membership().voter_ids().count();
        if leader == metrics.id
            && failover::deposed(voters, metrics.millis_since_quorum_ack, lease(&m.raft))
        {
            return None;
        }
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .and_then(crate::raft::node_addr);
        Some((leader, addr))
    }

    pub(super) fn timeout_for(&self, req: &Request) -> Duration {
        match req {
            Request::Manage(ManageRequest::RotateGossipKey)
            | Request::Manage(ManageRequest::Ca { rotate: true }) => {
                self.tuning.rpc_timeout * 2 + self.tuning.heartbeat * 24
            }
            Request::Manage(ManageRequest::JoinRaft)
            | Request::Manage(ManageRequest::Demote(_))
            | Request::Leave => self.tuning.rpc_timeout * 5,
            Request::Forwarded { request, .. } => self.timeout_for(request),
            _ => self.tuning.rpc_timeout,
        }
    }

    /// A request from this node's own API: handled locally on a manager (which forwards to the
    /// leader), otherwise sent to a known manager.
    ///
    /// A leader election is ridden out: while there is no leader (or it cannot be reached), the
    /// request is tried again for up to [`Tuning::failover_window`]. Requests are reads or
    /// writes that set state, so sending one again after a dying leader took it is harmless (at
    /// worst a repeated `node rm` says the node is gone).
    pub(super) async fn request(self: &Arc<Self>, req: Request) -> Result<Response, Error> {
        let deadline = Instant::now() + self.tuning.failover_window();
        loop {
            let r = match self.call_leader(req.clone()).await {
                Ok(Response::Error(e)) => Err(from_rpc(e)),
                r => r,
            };
            match r {
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "no leader; trying again");
                    tokio::time::sleep(self.tuning.raft_heartbeat).await;
                }
                r => return r,
            }
        }
    }

    pub(super) async fn call_leader(self: &Arc<Self>, req: Request) -> Result<Response, Error> {
        // A node just demoted still runs Raft until its session notices, but its worker
        // certificate may no longer forward: it asks the managers as the worker it is.
        if self.manager().is_some() && self.cert_role() == Role::Manager {
            let caller = Caller::Member { node: self.me(), role: self.cert_role() };
            let r = self.dispatch(caller, req.clone()).await;
            // A manager that lost track of the leader (e.g. just demoted) asks the others; a
            // voter learns of the next leader itself (and `request` tries again), where asking
            // the others could mean waiting on the one that just died.
            // And a manager demoted in the store but not told yet may no longer forward: the
            // leader refuses it, and the others relay for it as for a worker.
            match &r {
                Response::Error(RpcError { kind: ErrorKind::NoLeader, .. }) if !self.is_voter() => {
                }
                Response::Error(RpcError { kind: ErrorKind::PermissionDenied, .. }) => {}
                _ => return Ok(r),
            }
        }
        let managers = self.local().managers;
        let own = self.local().advertise_addr;
        let mut last = Error::NoLeader("no manager is known to this node".into());
        let managers = self.transport.suspects_last(managers);
        for addr in managers.into_iter().filter(|a| *a != own) {
            match self.transport.call(addr, &req, self.timeout_for(&req)).await {
                // A manager still starting Raft (or just demoted) says it is not a manager; with a
                // manager certificate that is about the peer, not us: ask the next one.
                Ok(Response::Error(e))
                    if e.kind == ErrorKind::NoLeader
                        || (e.kind == ErrorKind::NotManager
                            && self.cert_role() == Role::Manager) =>
                {
                    last = from_rpc(e)
                }
                Ok(r) => return Ok(r),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    pub(super) async fn dispatch(self: &Arc<Self>, caller: Caller, req: Request) -> Response {
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
                if let Some(m) = self.manager()
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
                match self.manager() {
                    Some(m) if Inner::leader_of(&m).map(|l| l.0) == Some(self.me().0) => {
                        // The origin is the forwarder's word: only a current manager's counts.
                        match authorize(&m, caller) {
                            Ok((_, Role::Manager)) => {}
                            Ok(_) => {
                                return rpc_err(
                                    ErrorKind::PermissionDenied,
                                    "only managers forward requests",
                                );
                            }
                            Err(e) => return to_rpc(e),
                        }
                        self.handle_leader(&m, origin, *request).await
                    }
                    _ => rpc_err(
                        ErrorKind::NoLeader,
                        "leadership moved while the request was forwarded; retry",
                    ),
                }
            }
            (Caller::Member { role: Role::Manager, .. }, Request::Probe) => match self.manager() {
                Some(m) => Response::Probe { leader_alive: leader_alive(&m) },
                None => rpc_err(ErrorKind::NotManager, NOT_MANAGER),
            },
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

    pub(super) async fn route(self: &Arc<Self>, caller: Caller, req: Request) -> Response {
        let Some(m) = self.manager() else {
            // Only a peer gets here (a node's own requests go straight to the managers when it
            // runs no Raft): the caller should ask another manager.
            return rpc_err(
                ErrorKind::NoLeader,
                "this node does not run Raft (yet); ask another manager",
            );
        };
        match Inner::leader_of(&m) {
            Some((l, _)) if l == self.me().0 => self.handle_leader(&m, caller, req).await,
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
                    r = self.transport.call(addr, &fwd, timeout) => match r {
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
        let handler = self.node_handler.read().unwrap_or_else(|e| e.into_inner()).0.clone();
        let Some(h) = handler else {
            return Err(Error::BadRequest("this node answers no node requests".into()));
        };
        h(r).await.map(Response::Value).map_err(Error::BadRequest)
    }

    pub(super) async fn handle_raft(&self, r: RaftRequest) -> Response {
        let Some(m) = self.manager() else { return rpc_err(ErrorKind::NotManager, NOT_MANAGER) };
        Response::Raft(match r {
            RaftRequest::Append(a) => {
                let r = m.raft.append_entries(a).await;
                // Anything but a higher vote means the sender is the current leader.
                if matches!(&r, Ok(resp) if !matches!(resp, AppendEntriesResponse::HigherVote(_))) {
                    *lock(&m.leader_seen) = Some(Instant::now());
                }
                RaftResponse::Append(r)
            }
            RaftRequest::Vote(v) => RaftResponse::Vote(m.raft.vote(v).await),
            RaftRequest::Snapshot(s) => RaftResponse::Snapshot(m.raft.install_snapshot(s).await),
        })
    }

    // Boxed to break the async recursion through `call_leader` → `dispatch`.
    pub(super) fn call_leader_plain(
        self: &Arc<Self>,
        req: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Error>> + Send + '_>>
    {
        Box::pin(self.call_leader(req))
    }
}
