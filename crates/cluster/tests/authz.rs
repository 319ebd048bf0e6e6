//! Loopback tests of what a certificate alone no longer buys: Raft messages only from Raft's
//! membership, direct requests only from the store's managers, and after `swarm ca --rotate`
//! nothing for a certificate from the old CA. Several nodes in one process on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_cluster::model::security::SwarmUpdate;
use shoal_cluster::pki::{NodeIdentity, cert_der_from_pem, certs_from_pem, issuer_index};
use shoal_cluster::transport::Transport;
use shoal_cluster::wire::{ErrorKind, NodeRequest, RaftRequest, Request, Response, TaskRequest};
use shoal_cluster::{Cluster, Error, InitOptions, JoinOptions, NodeHandler, NodeId, Role, Tuning};
use tempfile::TempDir;

const PATIENCE: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(5);

struct Node {
    dir: TempDir,
    addr: SocketAddr,
    cluster: Cluster,
}

fn free_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

async fn init(name: &str) -> anyhow::Result<Node> {
    let dir = tempfile::tempdir()?;
    let addr = free_addr();
    let mut opts = InitOptions::new(dir.path(), name, addr);
    opts.listen_addr = addr;
    opts.tuning = Tuning::fast();
    let cluster = Cluster::init(opts).await.context("init")?;
    Ok(Node { dir, addr, cluster })
}

async fn join(name: &str, token: &str, remote: SocketAddr) -> anyhow::Result<Node> {
    let dir = tempfile::tempdir()?;
    let addr = free_addr();
    let mut opts = JoinOptions::new(dir.path(), name, addr, token, remote);
    opts.listen_addr = addr;
    opts.tuning = Tuning::fast();
    let cluster = Cluster::join(opts).await.with_context(|| format!("join {name}"))?;
    Ok(Node { dir, addr, cluster })
}

/// The identity a node holds on disk now, as a client that keeps it would use it.
fn identity_of(n: &Node) -> anyhow::Result<NodeIdentity> {
    let d = n.dir.path().join("swarm");
    Ok(NodeIdentity::from_pem(
        std::fs::read_to_string(d.join("node-key.pem"))?,
        std::fs::read_to_string(d.join("node-cert.pem"))?,
        std::fs::read_to_string(d.join("ca.pem"))?,
    )?)
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not reached within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn vote_from(node: NodeId, term: u64) -> Request {
    Request::Raft(RaftRequest::Vote(openraft::raft::VoteRequest::new(
        openraft::Vote::new(term, node.0),
        None,
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_and_direct_requests_follow_the_membership_not_the_certificate() -> anyhow::Result<()>
{
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Manager, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    n2.cluster.wait_voter(PATIENCE).await?;
    let worker_token = n1.cluster.join_token(Role::Worker, false).await?;
    let n3 = join("node3", &worker_token, n1.addr).await?;
    let handler: NodeHandler =
        Arc::new(|_| Box::pin(async { Ok(serde_json::json!("diagnostics")) }));
    n3.cluster.set_node_handler(Some(handler));
    let n2_id = n2.cluster.info().node;
    // node2's manager certificate, kept as a node that never renews would keep it.
    let old_manager = Transport::bind("127.0.0.1:0".parse()?, &identity_of(&n2)?)?;

    // While node2 is a voter, Raft hears it (a stale vote is answered, not refused), and
    // node3 answers its direct requests once its session knows the managers.
    match old_manager.call(n1.addr, &vote_from(n2_id, 0), CALL).await? {
        Response::Raft(_) => {}
        other => bail!("a voter's vote was not answered by Raft: {other:?}"),
    }
    let diag = Request::Node(NodeRequest::Diagnostics);
    match old_manager.call(n3.addr, &diag, CALL).await? {
        Response::Value(v) => assert_eq!(v, "diagnostics"),
        other => bail!("a manager asking a worker directly: {other:?}"),
    }

    n1.cluster.demote("node2").await?;
    until("node2 out of node1's Raft membership", || {
        let r = n1.cluster.raft_status()?;
        (!r.voters.contains(&n2_id)).then_some(())
    })
    .await?;

    // A vote with a term far ahead would depose the leader were it heard; it is refused.
    let before = n1.cluster.refusals().raft;
    match old_manager.call(n1.addr, &vote_from(n2_id, 1_000), CALL).await? {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{}", e.message);
            assert!(e.message.contains("Vote refused"), "{}", e.message);
            assert!(e.message.contains("not a voter or learner"), "{}", e.message);
        }
        other => bail!("a demoted manager's vote reached Raft: {other:?}"),
    }
    assert_eq!(n1.cluster.refusals().raft, before + 1, "the refusal is counted");
    let term = n1.cluster.raft_status().context("raft")?.term;
    assert!(term < 1_000, "the refused vote moved the term to {term}");

    // node3's next session tells it node2 is no manager: its direct request is refused.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match old_manager.call(n3.addr, &diag, CALL).await? {
            Response::Error(e) if e.kind == ErrorKind::PermissionDenied => {
                assert!(e.message.contains("only managers ask nodes directly"), "{}", e.message);
                break;
            }
            Response::Value(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => bail!("a demoted manager still asks node3 directly: {other:?}"),
        }
    }
    assert!(n3.cluster.refusals().node_requests >= 1, "the refusal is counted");
    for n in [&n1, &n2, &n3] {
        n.cluster.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_refuses_certificates_of_the_old_one() -> anyhow::Result<()> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Worker, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let old = identity_of(&n2)?;
    let old_client = Transport::bind("127.0.0.1:0".parse()?, &old)?;
    let state = Request::Tasks(TaskRequest::State);
    match old_client.call(n1.addr, &state, CALL).await? {
        Response::State(_) => {}
        other => bail!("a member reading its state: {other:?}"),
    }

    // Bad settings change nothing.
    let short = SwarmUpdate { cert_expiry_secs: Some(60), ..Default::default() };
    match n1.cluster.update_swarm(short).await {
        Err(Error::BadRequest(m)) => assert!(m.contains("--cert-expiry 1m is out of range"), "{m}"),
        other => bail!("a one-minute expiry: {other:?}"),
    }
    let expiry = n1.cluster.security_config().context("settings")?.cert_expiry_secs;
    assert_eq!(expiry, 90 * 24 * 3600);
    let update =
        SwarmUpdate { cert_expiry_secs: Some(24 * 3600), gossip_key_rotation_secs: Some(120) };
    n1.cluster.update_swarm(update).await?;
    let settings = n1.cluster.security_config().context("settings")?;
    assert_eq!(settings.cert_expiry_secs, 24 * 3600);
    assert_eq!(settings.gossip_key_rotation_secs, Some(120));

    let answer = n1.cluster.ca(true).await?;
    assert!(answer.warnings.is_empty(), "{:?}", answer.warnings);
    let new_ca = cert_der_from_pem(&answer.cert_pem)?;
    assert_ne!(new_ca, cert_der_from_pem(&old.ca_pem)?, "a new CA");
    assert!(n1.cluster.security_config().context("settings")?.ca_rotation.is_none());
    // Both nodes end up with a certificate from the new CA, and trust it alone.
    for n in [&n1, &n2] {
        until("the node trusts only the new CA, and holds a certificate from it", || {
            let id = identity_of(n).ok()?;
            let cas = certs_from_pem(&id.ca_pem);
            let cert = cert_der_from_pem(&id.cert_pem).ok()?;
            (cas == [new_ca.clone()] && issuer_index(&cert, &cas) == Some(0)).then_some(())
        })
        .await?;
    }
    // The connection opened before the rotation is refused on its next request...
    match old_client.call(n1.addr, &state, CALL).await {
        Ok(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{}", e.message);
            assert!(e.message.contains("no longer trusts"), "{}", e.message);
        }
        Err(_) => {}
        Ok(other) => bail!("the old certificate still reads the store: {other:?}"),
    }
    // ...and a new one fails the handshake.
    let fresh = Transport::bind("127.0.0.1:0".parse()?, &old)?;
    assert!(fresh.call(n1.addr, &state, CALL).await.is_err(), "a handshake with the old CA");
    // The member keeps working with its new certificate.
    let current = Transport::bind("127.0.0.1:0".parse()?, &identity_of(&n2)?)?;
    match current.call(n1.addr, &state, CALL).await? {
        Response::State(_) => {}
        other => bail!("the renewed certificate reading its state: {other:?}"),
    }
    let new_token = n1.cluster.join_token(Role::Worker, false).await?;
    assert_ne!(new_token, token, "the join token names the new CA");
    let n3 = join("node3", &new_token, n1.addr).await?;
    assert_eq!(n1.cluster.nodes().await?.len(), 3);
    for n in [&n1, &n2, &n3] {
        n.cluster.shutdown().await;
    }
    Ok(())
}
