//! Loopback integration tests: several nodes in one process on 127.0.0.1, each with its own
//! data dir and port, talking QUIC with mutual TLS and running Raft for real.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_cluster::model::Command;
use shoal_cluster::pki::NodeIdentity;
use shoal_cluster::simulated;
use shoal_cluster::transport::{Transport, call_pinned, call_pinned_raw};
use shoal_cluster::wire::{ErrorKind, ManageRequest, RaftRequest, Request, Response};
use shoal_cluster::{
    Availability, Cluster, ClusterEvent, Error, InitOptions, JoinOptions, JoinToken, ManagerStatus,
    NodeStatus, NodeUpdate, NodeView, Role, Tuning,
};
use tempfile::TempDir;

const PATIENCE: Duration = Duration::from_secs(30);

fn free_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

struct Node {
    dir: TempDir,
    addr: SocketAddr,
    cluster: Cluster,
}

impl Node {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn init_with(name: &str, tuning: Tuning) -> anyhow::Result<Node> {
    logs();
    let dir = tempfile::tempdir()?;
    let addr = free_addr();
    let mut opts = InitOptions::new(dir.path(), name, addr);
    opts.listen_addr = addr;
    opts.tuning = tuning;
    let cluster = Cluster::init(opts).await.context("init")?;
    Ok(Node { dir, addr, cluster })
}

async fn init(name: &str) -> anyhow::Result<Node> {
    init_with(name, Tuning::fast()).await
}

fn join_opts(
    name: &str,
    dir: &TempDir,
    addr: SocketAddr,
    token: &str,
    remote: SocketAddr,
) -> JoinOptions {
    let mut opts = JoinOptions::new(dir.path(), name, addr, token, remote);
    opts.listen_addr = addr;
    opts.tuning = Tuning::fast();
    opts
}

async fn join(name: &str, token: &str, remote: SocketAddr) -> anyhow::Result<Node> {
    let dir = tempfile::tempdir()?;
    let addr = free_addr();
    let cluster = Cluster::join(join_opts(name, &dir, addr, token, remote))
        .await
        .with_context(|| format!("join {name}"))?;
    Ok(Node { dir, addr, cluster })
}

/// Polls `f` until it yields `Some`, or fails after `PATIENCE` with the last state seen.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_owned(),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("{what}: not reached within {PATIENCE:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn by_name<'a>(nodes: &'a [NodeView], name: &str) -> &'a NodeView {
    nodes
        .iter()
        .find(|n| n.record.hostname == name)
        .unwrap_or_else(|| panic!("{name} not in node list {nodes:?}"))
}

fn summary(nodes: &[NodeView]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "{}:{}/{}/{:?}",
                n.record.hostname, n.record.status, n.record.availability, n.manager_status
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn three_nodes() -> anyhow::Result<(Node, Node, Node)> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Worker, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let n3 = join("node3", &token, n1.addr).await?;
    Ok((n1, n2, n3))
}

async fn shutdown_all(nodes: &[&Node]) {
    for n in nodes {
        n.cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_two_joins_then_node_ls_and_worker_is_refused() -> anyhow::Result<()> {
    let (n1, n2, n3) = three_nodes().await?;
    let cmd = n1.cluster.join_command(Role::Worker).await?;
    assert!(cmd.starts_with("shoal swarm join --token SWMTKN-1-"), "{cmd}");
    assert!(cmd.ends_with(&n1.addr.to_string()), "{cmd}");

    let nodes = n1.cluster.nodes().await?;
    assert_eq!(nodes.len(), 3, "{}", summary(&nodes));
    for n in &nodes {
        assert_eq!(n.record.status, NodeStatus::Ready, "{}", summary(&nodes));
        assert_eq!(n.record.availability, Availability::Active, "{}", summary(&nodes));
    }
    assert_eq!(by_name(&nodes, "node1").manager_status, Some(ManagerStatus::Leader));
    assert_eq!(by_name(&nodes, "node2").manager_status, None);
    assert_eq!(by_name(&nodes, "node2").record.role, Role::Worker);
    assert_eq!(n2.cluster.info().role, Role::Worker);
    assert!(n1.cluster.info().leader == Some(n1.cluster.info().node));

    // A worker is refused by the manager (authorised by the role in the worker's certificate).
    for res in [
        n2.cluster.nodes().await.map(|_| ()),
        n3.cluster.promote("node3").await.map(|_| ()),
        n2.cluster.join_token(Role::Manager, false).await.map(|_| ()),
    ] {
        match res {
            Err(Error::NotManager(m)) => {
                assert!(m.contains("This node is not a swarm manager"), "{m}")
            }
            other => bail!("worker request not refused as expected: {other:?}"),
        }
    }
    // The refusal changed nothing.
    assert_eq!(by_name(&n1.cluster.nodes().await?, "node3").record.role, Role::Worker);
    // init made the ingress network from the default pool; the API never hands out the CA key.
    let store = n1.cluster.store().await?;
    let ingress = store.networks.values().find(|n| n.ingress).context("ingress network")?;
    assert_eq!(
        (ingress.name.as_str(), ingress.subnet.to_string(), ingress.vni),
        ("ingress", "10.0.0.0/24".into(), 4096)
    );
    let info = store.cluster.as_ref().context("cluster info")?;
    assert!(info.ca_key_pem.is_empty() && info.ca_cert_pem.contains("BEGIN CERTIFICATE"));
    assert_eq!(info.data_path_port, 4789);
    // Workers got the keyring at join.
    assert_eq!(n2.cluster.gossip_keys().borrow().keys.len(), 1);
    assert_eq!(*n2.cluster.gossip_keys().borrow(), *n1.cluster.gossip_keys().borrow());
    shutdown_all(&[&n1, &n2, &n3]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_failover_and_restart() -> anyhow::Result<()> {
    let (n1, n2, n3) = three_nodes().await?;
    let w = n1.cluster.promote("node2").await?;
    assert!(w.iter().any(|w| w.contains("even number of managers (2)")), "{w:?}");
    let w = n1.cluster.promote("node3").await?;
    assert!(w.is_empty(), "{w:?}");
    let nodes = eventually("node2 and node3 Reachable", || async {
        let nodes = n1.cluster.nodes().await.map_err(|e| e.to_string())?;
        let ok = ["node2", "node3"]
            .iter()
            .all(|h| by_name(&nodes, h).manager_status == Some(ManagerStatus::Reachable));
        if ok { Ok(Some(nodes)) } else { Err(summary(&nodes)) }
    })
    .await?;
    assert_eq!(by_name(&nodes, "node1").manager_status, Some(ManagerStatus::Leader));
    assert_eq!(n2.cluster.info().role, Role::Manager, "node2's certificate follows the promotion");
    // node2 learns of node3's promotion through replication, a moment after the leader.
    eventually("node2 sees three voters", || async {
        Ok((n2.cluster.raft_status().map(|r| r.voters.len()) == Some(3)).then_some(()))
    })
    .await?;

    // A write before the kill.
    let mut upd = NodeUpdate::default();
    upd.label_add.push(("zone".into(), "a".into()));
    n2.cluster.node_update("node3", upd).await?;
    n3.cluster.write(Command::PutService(Box::new(simulated::service(3, 4)))).await?;

    let old_leader = n1.cluster.info().node;
    n1.cluster.shutdown().await;
    let killed = Instant::now();
    let new_leader = eventually("a new leader", || async {
        let l = n2.cluster.raft_status().and_then(|r| r.leader).filter(|l| *l != old_leader);
        Ok(l)
    })
    .await?;
    let elapsed = killed.elapsed();
    eprintln!("failover: new leader {elapsed:?} after the leader was stopped");
    assert!(elapsed < Duration::from_secs(5), "new leader after {elapsed:?}");
    assert!(new_leader == n2.cluster.info().node || new_leader == n3.cluster.info().node);

    let nodes = eventually("old leader Unreachable and Down", || async {
        let nodes = n3.cluster.nodes().await.map_err(|e| e.to_string())?;
        let n = by_name(&nodes, "node1");
        Ok((n.manager_status == Some(ManagerStatus::Unreachable)
            && n.record.status == NodeStatus::Down)
            .then_some(nodes))
    })
    .await?;
    assert_eq!(by_name(&nodes, "node3").record.labels.get("zone").map(String::as_str), Some("a"));
    let store = n2.cluster.store().await?;
    assert_eq!(store.services["svc00003"].name, "web-3");

    // Restart node1 from its data dir: it comes back as a Reachable manager.
    let dir = n1.data_dir();
    let restarted = Cluster::open(&dir, Tuning::fast()).await?.context("node1 state present")?;
    eventually("node1 Reachable and Ready again", || async {
        let nodes = n2.cluster.nodes().await.map_err(|e| e.to_string())?;
        let n = by_name(&nodes, "node1");
        Ok((n.manager_status == Some(ManagerStatus::Reachable)
            && n.record.status == NodeStatus::Ready)
            .then_some(()))
    })
    .await?;
    // Its own store caught up, including the write made before the kill.
    let seen = restarted.store().await?;
    assert_eq!(seen.services["svc00003"].name, "web-3");
    restarted.shutdown().await;
    shutdown_all(&[&n2, &n3]).await;
    drop(n1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_the_reason() -> anyhow::Result<()> {
    let a = init("alpha").await?;
    let b = init("bravo").await?;
    let a_token = a.cluster.join_token(Role::Worker, false).await?;
    let b_token = b.cluster.join_token(Role::Worker, false).await?;

    // A token from another swarm: the joiner refuses the manager's CA (digest mismatch).
    let err = join("x1", &b_token, a.addr).await.err().context("foreign token accepted")?;
    match err.downcast_ref::<Error>() {
        Some(Error::CaMismatch) => {
            assert!(err.root_cause().to_string().contains("different swarm"))
        }
        _ => bail!("expected CaMismatch, got {err:#}"),
    }
    // Right CA digest, wrong secret.
    let mut wrong = JoinToken::parse(&a_token)?;
    wrong.secret[0] ^= 0xff;
    let err =
        join("x2", &wrong.to_string(), a.addr).await.err().context("wrong secret accepted")?;
    match err.downcast_ref::<Error>() {
        Some(Error::WrongToken(m)) => assert!(m.contains("secret"), "{m}"),
        _ => bail!("expected WrongToken, got {err:#}"),
    }
    // Rotated out.
    let new_token = a.cluster.join_token(Role::Worker, true).await?;
    assert_ne!(new_token, a_token);
    assert_eq!(JoinToken::parse(&new_token)?.ca_digest, JoinToken::parse(&a_token)?.ca_digest);
    let err = join("x3", &a_token, a.addr).await.err().context("rotated token accepted")?;
    match err.downcast_ref::<Error>() {
        Some(Error::RotatedToken(m)) => assert!(m.contains("rotated"), "{m}"),
        _ => bail!("expected RotatedToken, got {err:#}"),
    }
    // Malformed.
    let err = join("x4", "SWMTKN-1-nope", a.addr).await.err().context("junk token accepted")?;
    assert!(matches!(err.downcast_ref::<Error>(), Some(Error::Token(_))), "{err:#}");
    // None of that changed anything; the new token works.
    assert_eq!(a.cluster.nodes().await?.len(), 1);
    let ok = join("x5", &new_token, a.addr).await?;
    assert_eq!(a.cluster.nodes().await?.len(), 2);
    // The manager token makes a manager.
    let mgr = a.cluster.join_token(Role::Manager, false).await?;
    let m = join("x6", &mgr, a.addr).await?;
    m.cluster.wait_voter(PATIENCE).await?;
    assert_eq!(m.cluster.info().role, Role::Manager);
    // Joining twice from the same data dir is refused.
    let again = Cluster::join(join_opts("x5", &ok.dir, ok.addr, &new_token, a.addr)).await;
    assert!(matches!(again, Err(Error::AlreadyInSwarm(_))), "{again:?}");
    shutdown_all(&[&a, &b, &ok, &m]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_authorisation() -> anyhow::Result<()> {
    let a = init("alpha").await?;
    let b = init("bravo").await?;
    let token = a.cluster.join_token(Role::Worker, false).await?;
    let w = join("worker", &token, a.addr).await?;
    let timeout = Duration::from_secs(5);
    let load = |n: &Node| -> anyhow::Result<NodeIdentity> {
        let d = n.dir.path().join("swarm");
        Ok(NodeIdentity::from_pem(
            std::fs::read_to_string(d.join("node-key.pem"))?,
            std::fs::read_to_string(d.join("node-cert.pem"))?,
            std::fs::read_to_string(d.join("ca.pem"))?,
        )?)
    };

    // A client certificate from a foreign CA fails the handshake: no answer at all.
    let foreign = Transport::bind("127.0.0.1:0".parse()?, &load(&b)?)?;
    let r = foreign.call(a.addr, &Request::Manage(ManageRequest::NodeList), timeout).await;
    assert!(r.is_err(), "foreign certificate got an answer: {r:?}");
    foreign.close().await;

    // A worker certificate of this swarm: manager API and Raft refused by role.
    let worker = Transport::bind("127.0.0.1:0".parse()?, &load(&w)?)?;
    match worker.call(a.addr, &Request::Manage(ManageRequest::NodeList), timeout).await? {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::NotManager);
            assert!(e.message.contains("not a swarm manager"));
        }
        other => bail!("worker got {other:?}"),
    }
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, 1), None);
    match worker.call(a.addr, &Request::Raft(RaftRequest::Vote(vote)), timeout).await? {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied),
        other => bail!("worker took part in Raft: {other:?}"),
    }
    // A worker cannot forward on someone's behalf.
    let fwd = Request::Forwarded {
        origin: shoal_cluster::wire::Caller::Member {
            node: a.cluster.info().node,
            role: Role::Manager,
        },
        request: Box::new(Request::Manage(ManageRequest::NodeList)),
    };
    match worker.call(a.addr, &fwd, timeout).await? {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied),
        other => bail!("worker forwarded: {other:?}"),
    }
    worker.close().await;

    // Without a certificate only Join is allowed; malformed and oversized frames are refused.
    let digest = JoinToken::parse(&token)?.ca_digest;
    match call_pinned(a.addr, digest, &Request::Manage(ManageRequest::NodeList), timeout).await? {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied),
        other => bail!("anonymous got {other:?}"),
    }
    match call_pinned_raw(a.addr, digest, b"\x00\x00\x00\x05hello".to_vec(), timeout).await? {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains("malformed control message"), "{}", e.message);
        }
        other => bail!("garbage got {other:?}"),
    }
    let mut big = (200_000u32).to_be_bytes().to_vec();
    big.extend(std::iter::repeat_n(b' ', 200_000));
    match call_pinned_raw(a.addr, digest, big, timeout).await? {
        Response::Error(e) => assert!(e.message.contains("too large"), "{}", e.message),
        other => bail!("oversized got {other:?}"),
    }
    assert_eq!(a.cluster.nodes().await?.len(), 2, "bad requests changed nothing");
    shutdown_all(&[&a, &b, &w]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_last_manager_is_refused_and_availability_round_trips() -> anyhow::Result<()> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Worker, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let mut events = n1.cluster.events();
    let before = n1.cluster.nodes().await?;
    match n1.cluster.demote("node1").await {
        Err(Error::Refused(m)) => assert!(m.contains("last manager"), "{m}"),
        other => bail!("demoting the last manager: {other:?}"),
    }
    let after = n1.cluster.nodes().await?;
    assert_eq!(before, after, "the refused demote changed nothing");
    assert_eq!(n1.cluster.raft_status().map(|r| r.voters.len()), Some(1));
    match n1.cluster.node_rm("node1", true).await {
        Err(Error::Refused(m)) => assert!(m.contains("must be demoted"), "{m}"),
        other => bail!("removing a manager: {other:?}"),
    }
    match n1.cluster.node_rm("node2", false).await {
        Err(Error::Refused(m)) => assert!(m.contains("not down"), "{m}"),
        other => bail!("removing a Ready node: {other:?}"),
    }
    match n1.cluster.leave(false).await {
        Err(Error::Refused(m)) => assert!(m.contains("last manager"), "{m}"),
        other => bail!("last manager leaving: {other:?}"),
    }

    for (a, want) in [
        ("drain", Availability::Drain),
        ("pause", Availability::Pause),
        ("active", Availability::Active),
    ] {
        let upd = NodeUpdate {
            availability: Some(a.parse().map_err(anyhow::Error::msg)?),
            ..Default::default()
        };
        n1.cluster.node_update("node2", upd).await?;
        assert_eq!(n1.cluster.node("node2").await?.record.availability, want);
        let ev = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Ok(ClusterEvent::NodeAvailability { availability, .. }) = events.recv().await
                {
                    return availability;
                }
            }
        })
        .await?;
        assert_eq!(ev, want);
    }
    assert!("sideways".parse::<Availability>().is_err());
    match n1.cluster.node_update("nosuch", NodeUpdate::default()).await {
        Err(Error::NotFound(m)) => assert!(m.contains("nosuch")),
        other => bail!("unknown node: {other:?}"),
    }
    shutdown_all(&[&n1, &n2]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_keys_rotate_twice_and_liveness_input() -> anyhow::Result<()> {
    let (n1, n2, n3) = three_nodes().await?;
    let first = n1.cluster.gossip_keys().borrow().clone();
    let mut prev = first.primary;
    for round in 0..2 {
        let warnings = n1.cluster.rotate_gossip_key().await?;
        assert!(warnings.is_empty(), "round {round}: {warnings:?}");
        let kr = n1.cluster.gossip_keys().borrow().clone();
        assert_ne!(kr.primary, prev, "round {round}: a new primary");
        assert_eq!(kr.keys.len(), 1, "round {round}: the old key is retired");
        assert!(kr.primary_key().is_some());
        for n in [&n2, &n3] {
            let mut rx = n.cluster.gossip_keys();
            tokio::time::timeout(PATIENCE, rx.wait_for(|k| *k == kr))
                .await?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        prev = kr.primary;
        // Membership stayed stable.
        let nodes = n1.cluster.nodes().await?;
        assert!(nodes.iter().all(|n| n.record.status == NodeStatus::Ready), "{}", summary(&nodes));
    }

    // Liveness from gossip: down, then up again, each with an event. Only managers report it;
    // a worker's word would move another node's tasks.
    let mut events = n1.cluster.events();
    let id2 = n2.cluster.info().node;
    match n3.cluster.member_status(id2, false).await {
        Err(Error::NotManager(_)) => {}
        other => bail!("a worker marked another node down: {other:?}"),
    }
    assert_eq!(n1.cluster.node("node2").await?.record.status, NodeStatus::Ready);
    n1.cluster.member_status(id2, false).await?;
    assert_eq!(n1.cluster.node("node2").await?.record.status, NodeStatus::Down);
    let ev = tokio::time::timeout(PATIENCE, events.recv()).await??;
    assert!(
        matches!(ev, ClusterEvent::NodeStatus { id, to: NodeStatus::Down, .. } if id == id2),
        "{ev:?}"
    );
    n1.cluster.member_status(id2, true).await?;
    assert_eq!(n1.cluster.node("node2").await?.record.status, NodeStatus::Ready);

    // A worker leaves: it shows Down and can then be removed.
    n3.cluster.leave(false).await?;
    let n = n1.cluster.node("node3").await?;
    assert_eq!(n.record.status, NodeStatus::Down);
    n1.cluster.node_rm("node3", false).await?;
    assert_eq!(n1.cluster.nodes().await?.len(), 2);
    assert!(!n3.dir.path().join("swarm").exists(), "leave removed the swarm state");
    shutdown_all(&[&n1, &n2]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_directory_is_readable_by_root_alone() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let n1 = init("node1").await?;
    let dir = n1.dir.path().join("swarm");
    let mode = |p: &std::path::Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p).with_context(|| p.display().to_string())?.permissions().mode()
            & 0o777)
    };
    assert_eq!(mode(&dir)?, 0o700);
    let mut files = 0;
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        assert_eq!(mode(&p)?, 0o600, "{}", p.display());
        files += 1;
    }
    assert!(dir.join("raft.redb").exists() && files >= 5, "{files} files");
    shutdown_all(&[&n1]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_rotates_the_gossip_key_on_its_schedule() -> anyhow::Result<()> {
    let mut tuning = Tuning::fast();
    tuning.gossip_key_rotation = Duration::from_secs(2);
    let n1 = init_with("node1", tuning).await?;
    let token = n1.cluster.join_token(Role::Worker, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let first = n1.cluster.gossip_keys().borrow().primary;
    // Nobody asks; the leader replaces the key, and the member follows.
    let next = eventually("a scheduled rotation", || async {
        let kr = n1.cluster.gossip_keys().borrow().clone();
        Ok((kr.primary != first).then_some(kr.primary))
    })
    .await?;
    eventually("the member has the new key", || async {
        Ok(n2.cluster.gossip_keys().borrow().keys.iter().any(|k| k.id == next).then_some(()))
    })
    .await?;
    shutdown_all(&[&n1, &n2]).await;
    Ok(())
}

/// The identity a node holds on disk, as a client that keeps its certificate would use it.
fn identity_of(n: &Node) -> anyhow::Result<NodeIdentity> {
    let d = n.dir.path().join("swarm");
    Ok(NodeIdentity::from_pem(
        std::fs::read_to_string(d.join("node-key.pem"))?,
        std::fs::read_to_string(d.join("node-cert.pem"))?,
        std::fs::read_to_string(d.join("ca.pem"))?,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_and_demoted_nodes_lose_their_rights_at_once() -> anyhow::Result<()> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Manager, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    n2.cluster.wait_voter(PATIENCE).await?;
    let worker_token = n1.cluster.join_token(Role::Worker, false).await?;
    let n3 = join("node3", &worker_token, n1.addr).await?;
    let timeout = Duration::from_secs(5);
    // Both keep the certificates they hold now, as a node that never renews would.
    let old_manager = Transport::bind("127.0.0.1:0".parse()?, &identity_of(&n2)?)?;
    let removed = Transport::bind("127.0.0.1:0".parse()?, &identity_of(&n3)?)?;
    match old_manager.call(n1.addr, &Request::Manage(ManageRequest::NodeList), timeout).await? {
        Response::Nodes(n) => assert_eq!(n.len(), 3),
        other => bail!("a manager's certificate while it is a manager: {other:?}"),
    }

    // Demoted: its manager certificate no longer opens the manager API, nor forwarding.
    n1.cluster.demote("node2").await?;
    match old_manager.call(n1.addr, &Request::Manage(ManageRequest::NodeList), timeout).await? {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::NotManager, "{}", e.message),
        other => bail!("a demoted manager still lists nodes: {other:?}"),
    }
    let fwd = Request::Forwarded {
        origin: shoal_cluster::wire::Caller::Member {
            node: n1.cluster.info().node,
            role: Role::Manager,
        },
        request: Box::new(Request::Manage(ManageRequest::NodeList)),
    };
    match old_manager.call(n1.addr, &fwd, timeout).await? {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied, "{}", e.message),
        other => bail!("a demoted manager forwarded as node1: {other:?}"),
    }

    // Removed: its next call is refused, reads included (the store holds the gossip keyring).
    let state = Request::Tasks(shoal_cluster::wire::TaskRequest::State);
    match removed.call(n1.addr, &state, timeout).await? {
        Response::State(_) => {}
        other => bail!("a member reading its state: {other:?}"),
    }
    // The demotion replaced the key too; wait until that rotation is over everywhere.
    let settled = eventually("the demotion's key rotation, everywhere", || async {
        let kr = n1.cluster.gossip_keys().borrow().clone();
        let done = kr.version > 1 && kr.keys.len() == 1 && *n3.cluster.gossip_keys().borrow() == kr;
        Ok(done.then_some(kr))
    })
    .await?;
    let (key_before, known_to_removed) = (settled.primary, settled);
    n1.cluster.node_rm("node3", true).await?;
    // The key it knew is replaced at once, and the new one never reaches it.
    eventually("a new gossip key after the removal", || async {
        let kr = n1.cluster.gossip_keys().borrow().clone();
        Ok((kr.primary != key_before && kr.keys.len() == 1).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        *n3.cluster.gossip_keys().borrow(),
        known_to_removed,
        "the removed node got the new key"
    );
    match removed.call(n1.addr, &state, timeout).await? {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::PermissionDenied);
            assert!(e.message.contains("removed"), "{}", e.message);
        }
        other => bail!("a removed node read the store: {other:?}"),
    }
    old_manager.close().await;
    removed.close().await;
    shutdown_all(&[&n1, &n2, &n3]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_ship_to_new_managers() -> anyhow::Result<()> {
    let mut tuning = Tuning::fast();
    tuning.snapshot_every = 20;
    tuning.snapshot_keep = 5;
    let n1 = init_with("node1", tuning).await?;
    for i in 0..60 {
        n1.cluster
            .write(Command::PutAddress { key: format!("k{i}"), ip: [10, 0, 0, i].into() })
            .await?;
    }
    let st = eventually("a snapshot and a purge", || async {
        let s = n1.cluster.raft_status().ok_or("no raft")?;
        if s.snapshot.is_some() && s.purged.is_some() { Ok(Some(s)) } else { Err(format!("{s:?}")) }
    })
    .await?;
    assert!(st.purged.unwrap_or(0) > 0, "{st:?}");

    // Restart: the state comes back from the state machine and what is left of the log.
    let dir = n1.data_dir();
    n1.cluster.shutdown().await;
    let n1b = Cluster::open(&dir, Tuning::fast()).await?.context("state present")?;
    n1b.wait_voter(PATIENCE).await?;
    let store = n1b.store().await?;
    assert_eq!(store.ipam.len(), 60);

    // Two managers join after compaction: they can only catch up from the snapshot.
    let token = n1b.join_token(Role::Manager, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let n3 = join("node3", &token, n1.addr).await?;
    n2.cluster.wait_voter(PATIENCE).await?;
    n3.cluster.wait_voter(PATIENCE).await?;
    eventually("three voters", || async {
        Ok((n1b.raft_status().map(|r| r.voters.len()) == Some(3)).then_some(()))
    })
    .await?;
    n1b.shutdown().await;
    let store = eventually("the store on the new leader", || async {
        n2.cluster.store().await.map(Some).map_err(|e| e.to_string())
    })
    .await?;
    assert_eq!(store.ipam.len(), 60);
    assert_eq!(store.ipam["k59"].ip, std::net::Ipv4Addr::new(10, 0, 0, 59));
    shutdown_all(&[&n2, &n3]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_back_to_worker_and_quorum_guard() -> anyhow::Result<()> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Manager, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let n3 = join("node3", &token, n1.addr).await?;
    n2.cluster.wait_voter(PATIENCE).await?;
    n3.cluster.wait_voter(PATIENCE).await?;
    eventually("three voters", || async {
        Ok((n1.cluster.raft_status().map(|r| r.voters.len()) == Some(3)).then_some(()))
    })
    .await?;

    // Demote node3: it leaves Raft, its certificate becomes a worker's, its Raft file goes.
    let w = n1.cluster.demote("node3").await?;
    assert!(w.iter().any(|w| w.contains("even number of managers (2)")), "{w:?}");
    eventually("node3 back to a worker", || async {
        let done = n3.cluster.info().role == Role::Worker
            && n3.cluster.raft_status().is_none()
            && !n3.dir.path().join("swarm/raft.redb").exists();
        Ok(done.then_some(()))
    })
    .await?;
    assert_eq!(n1.cluster.raft_status().map(|r| r.voters.len()), Some(2));
    assert_eq!(by_name(&n1.cluster.nodes().await?, "node3").manager_status, None);
    match n3.cluster.nodes().await {
        Err(Error::NotManager(_)) => {}
        other => bail!("demoted node still acts as a manager: {other:?}"),
    }

    // With node2 gone node1 has no quorum: it stops leading (check-quorum), so it answers that
    // there is no leader, a demote is refused, and nothing changes.
    let before = n1.cluster.raft_status().map(|r| r.voters);
    n2.cluster.shutdown().await;
    eventually("node1 answering that there is no leader", || async {
        Ok(matches!(n1.cluster.nodes().await, Err(Error::NoLeader(_))).then_some(()))
    })
    .await?;
    match n1.cluster.demote("node1").await {
        Err(Error::NoLeader(_)) => {}
        other => bail!("demote without a quorum: {other:?}"),
    }
    assert_eq!(n1.cluster.raft_status().map(|r| r.voters), before);
    shutdown_all(&[&n1, &n3]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_leave_and_the_last_one_needs_force() -> anyhow::Result<()> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Manager, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let n3 = join("node3", &token, n1.addr).await?;
    n2.cluster.wait_voter(PATIENCE).await?;
    n3.cluster.wait_voter(PATIENCE).await?;
    eventually("three voters", || async {
        Ok((n1.cluster.raft_status().map(|r| r.voters.len()) == Some(3)).then_some(()))
    })
    .await?;

    n3.cluster.leave(false).await?;
    assert!(!n3.dir.path().join("swarm").exists());
    assert_eq!(n1.cluster.raft_status().map(|r| r.voters.len()), Some(2));
    let n = n1.cluster.node("node3").await?;
    assert_eq!((n.record.role, n.record.status), (Role::Worker, NodeStatus::Down));
    n2.cluster.leave(false).await?;
    assert_eq!(n1.cluster.raft_status().map(|r| r.voters.len()), Some(1));

    match n1.cluster.leave(false).await {
        Err(Error::Refused(m)) => assert!(m.contains("Use `--force`"), "{m}"),
        other => bail!("last manager left without force: {other:?}"),
    }
    assert!(n1.dir.path().join("swarm/raft.redb").exists(), "the refused leave kept the state");
    n1.cluster.leave(true).await?;
    assert!(!n1.dir.path().join("swarm").exists());

    // Everything was released: a new swarm can be created in the same place right away.
    let mut opts = InitOptions::new(n1.dir.path(), "node1", n1.addr);
    opts.listen_addr = n1.addr;
    opts.tuning = Tuning::fast();
    let again = Cluster::init(opts).await?;
    assert_eq!(again.nodes().await?.len(), 1);
    again.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_tuning_fails_over_within_5s() -> anyhow::Result<()> {
    let n1 = init_with("node1", Tuning::default()).await?;
    let token = n1.cluster.join_token(Role::Manager, false).await?;
    let mut joined = Vec::new();
    for name in ["node2", "node3"] {
        let dir = tempfile::tempdir()?;
        let addr = free_addr();
        let mut opts = join_opts(name, &dir, addr, &token, n1.addr);
        opts.tuning = Tuning::default();
        let cluster = Cluster::join(opts).await?;
        cluster.wait_voter(PATIENCE).await?;
        joined.push(Node { dir, addr, cluster });
    }
    let old = n1.cluster.info().node;
    n1.cluster.shutdown().await;
    let killed = Instant::now();
    eventually("a new leader", || async {
        Ok(joined[0].cluster.raft_status().and_then(|r| r.leader).filter(|l| *l != old))
    })
    .await?;
    let elapsed = killed.elapsed();
    eprintln!("failover with default tuning: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "new leader after {elapsed:?}");
    for n in &joined {
        n.cluster.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_failed_init_or_join_leaves_no_swarm_state() -> anyhow::Result<()> {
    logs();
    let dir = tempfile::tempdir()?;
    let swarm = dir.path().join("swarm");
    // Options refused before anything is made.
    let mut opts = InitOptions::new(dir.path(), "x", free_addr());
    opts.subnet_size = 4;
    let err = Cluster::init(opts).await.err().context("a /4 subnet size accepted")?;
    assert!(err.to_string().contains("subnet size"), "{err}");
    assert!(!swarm.exists(), "a refused init left {}", swarm.display());
    // A listen address another socket holds: the certificates were written, then removed.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let mut opts = InitOptions::new(dir.path(), "x", addr);
    opts.listen_addr = addr;
    opts.tuning = Tuning::fast();
    let err = Cluster::init(opts).await.err().context("init on a taken port")?;
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(!swarm.exists(), "a failed init left {}", swarm.display());
    // The same for a join the manager admitted.
    let a = init("alpha").await?;
    let token = a.cluster.join_token(Role::Worker, false).await?;
    let err = Cluster::join(join_opts("x", &dir, addr, &token, a.addr)).await;
    assert!(err.is_err(), "join on a taken port");
    assert!(!swarm.exists(), "a failed join left {}", swarm.display());
    // Corrected, the join works from the same data dir.
    drop(taken);
    let ok = Cluster::join(join_opts("x", &dir, free_addr(), &token, a.addr)).await?;
    assert!(swarm.join("node.json").exists());
    ok.shutdown().await;
    shutdown_all(&[&a]).await;
    Ok(())
}

/// A node's WireGuard key reaches its store record over its own session, and a worker reads how
/// only its own tasks run, while a manager reads the whole store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_keys_come_from_each_node_and_workers_read_only_their_tasks() -> anyhow::Result<()>
{
    let m = init("keys-m").await?;
    let token = m.cluster.join_token(Role::Worker, false).await?;
    let w = join("keys-w", &token, m.addr).await?;
    let wid = w.cluster.info().node;
    w.cluster.set_wg_public_key([7; 32]).await?;
    let rec = m.cluster.node("keys-w").await?.record;
    assert_eq!(rec.wg_public_key, Some([7; 32]));
    assert_eq!(m.cluster.node("keys-m").await?.record.wg_public_key, None);

    let env = vec![("PASSWORD".to_owned(), "hunter2".to_owned())];
    for (i, (svc, node)) in
        [("mine", wid), ("theirs", shoal_cluster::NodeId(7))].into_iter().enumerate()
    {
        let mut s = simulated::service(i + 1, 4);
        (s.id, s.name, s.env) = (svc.into(), svc.into(), env.clone());
        m.cluster.write(Command::PutService(Box::new(s))).await?;
        let mut t = simulated::task(i + 1, 1, node, 4);
        (t.task.id, t.task.service_id) = (format!("t-{svc}"), svc.into());
        m.cluster.write(Command::PutTask(Box::new(t))).await?;
    }
    let seen = w.cluster.task_state().await?;
    let svc = |s: &shoal_cluster::model::ClusterState, id: &str| s.services[id].env.clone();
    assert_eq!(svc(&seen, "mine"), env, "a worker reads its own service whole");
    assert_eq!(svc(&seen, "theirs"), [], "and not how others run");
    assert!(seen.services["theirs"].argv.is_empty());
    assert_eq!(svc(&m.cluster.task_state().await?, "theirs"), env, "a manager reads it all");
    w.cluster.shutdown().await;
    m.cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_before_a_leader_kill_survive_it() -> anyhow::Result<()> {
    let n1 = init("node1").await?;
    let token = n1.cluster.join_token(Role::Manager, false).await?;
    let n2 = join("node2", &token, n1.addr).await?;
    let n3 = join("node3", &token, n1.addr).await?;
    n2.cluster.wait_voter(PATIENCE).await?;
    n3.cluster.wait_voter(PATIENCE).await?;
    let old = n1.cluster.info().node;

    // node3 writes one key after another, forwarded to the leader, while the leader is killed.
    let writer = n3.cluster.clone();
    let stop = Instant::now() + Duration::from_secs(6);
    let writes = tokio::spawn(async move {
        let (mut acked, mut failed) = (Vec::new(), Vec::new());
        for i in 0.. {
            if Instant::now() >= stop {
                break;
            }
            let cmd = Command::PutAddress { key: format!("k{i}"), ip: [10, 0, 0, 1].into() };
            match writer.write(cmd).await {
                Ok(()) => acked.push((format!("k{i}"), Instant::now())),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (acked, failed)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    n1.cluster.shutdown().await;
    let killed = Instant::now();
    eventually("a new leader", || async {
        Ok(n2.cluster.raft_status().and_then(|r| r.leader).filter(|l| *l != old))
    })
    .await?;
    let failover = killed.elapsed();
    let (acked, failed) = writes.await?;
    eprintln!(
        "failover {failover:?}; {} writes acknowledged ({} after the kill), {} failed",
        acked.len(),
        acked.iter().filter(|(_, t)| *t > killed).count(),
        failed.len()
    );
    assert!(failover <= Duration::from_secs(2), "new leader after {failover:?}");
    assert!(failed.is_empty(), "writes failed across the failover: {failed:?}");
    assert!(acked.iter().any(|(_, t)| *t > killed), "no write went through after the kill");
    let store = n2.cluster.store().await?;
    let missing: Vec<&String> =
        acked.iter().map(|(k, _)| k).filter(|k| !store.ipam.contains_key(*k)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    shutdown_all(&[&n2, &n3]).await;
    Ok(())
}

/// A worker follows the store through the leader's deltas: a copy first, then only what
/// changed, never a secret; the agent's `task_state_after` rides on the same watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_the_store_by_deltas_without_secrets() -> anyhow::Result<()> {
    use shoal_cluster::watch::{DeltaBody, Mirror, Slot};
    use shoal_cluster::wire::TaskRequest;

    let m = init("watch-m").await?;
    let token = m.cluster.join_token(Role::Worker, false).await?;
    let w = join("watch-w", &token, m.addr).await?;
    let wid = w.cluster.info().node;
    let client = Transport::bind("127.0.0.1:0".parse()?, &identity_of(&w)?)?;
    let timeout = Duration::from_secs(10);
    let mut mirror = Mirror::default();
    let watch = |mirror: &Mirror| Request::Tasks(TaskRequest::Watch(mirror.position(wid)));
    let Response::Delta(first) = client.call(m.addr, &watch(&mirror), timeout).await? else {
        bail!("no delta")
    };
    let text = serde_json::to_string(&first)?;
    assert!(matches!(first.body, DeltaBody::Resync(_)), "a new follower gets a copy");
    assert!(!text.contains("PRIVATE KEY"), "the CA key reached a worker");
    mirror.apply(first)?;
    let info = mirror.state().cluster.clone().context("cluster info")?;
    assert_eq!((info.worker_secret, info.manager_secret), ([0; 16], [0; 16]));

    let mut t1 = simulated::task(1, 1, shoal_cluster::NodeId(7), 4);
    (t1.task.id, t1.task.service_id) = ("t1".into(), String::new());
    t1.standalone = Some(serde_json::from_value(serde_json::json!(
        {"name": "t1", "argv": ["secret-command"], "env": [["K", "hunter2"]]}
    ))?);
    let write = Command::PutTask(Box::new(t1));
    m.cluster.write(write).await?;
    m.cluster.join_token(Role::Worker, true).await?;
    let changes = eventually("the write and the rotation as changes", || async {
        let r = client.call(m.addr, &watch(&mirror), timeout).await.map_err(|e| e.to_string())?;
        let Response::Delta(d) = r else { return Err(format!("not a delta: {r:?}")) };
        let DeltaBody::Changes(c) = &d.body else {
            return Err(format!("a copy, not changes: {:?}", d.body));
        };
        let slots: Vec<Slot> = c.iter().map(|c| c.slot.clone()).collect();
        Ok(slots.contains(&Slot::Cluster).then_some(d))
    })
    .await?;
    assert!(!serde_json::to_string(&changes)?.contains("PRIVATE KEY"));
    mirror.apply(changes)?;
    let info = mirror.state().cluster.clone().context("cluster info")?;
    assert_eq!(info.worker_secret, [0; 16], "a rotated join secret reached a worker");
    assert!(info.retired_secrets.is_empty());
    let t1 = &mirror.state().tasks["t1"];
    assert_eq!(t1.task.node_id.as_deref(), Some(shoal_cluster::NodeId(7).to_string().as_str()));
    assert!(t1.standalone.as_ref().is_some_and(|s| s.env.is_empty()), "another node's standalone");

    let (rev, seen) = w.cluster.task_state_after(0).await?;
    assert!(rev >= mirror.revision(), "{rev} < {}", mirror.revision());
    assert!(seen.cluster.as_ref().is_some_and(|c| c.ca_key_pem.is_empty()));
    assert_eq!(seen.tasks["t1"], mirror.state().tasks["t1"]);
    client.close().await;
    shutdown_all(&[&m, &w]).await;
    Ok(())
}
