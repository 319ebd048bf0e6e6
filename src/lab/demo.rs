//! `shoal lab up --demo`: the tutorial, deployed on a fresh lab. node1 initialises the swarm,
//! the others join as workers; the `myhelloworld` volume is created on node1 and the
//! `myhelloworld` service (3 replicas, port 8100, that volume mounted where the app writes
//! `info.log`; nodes without the volume make it) is created, the encrypted
//! attachable `my-overlay` is added to it, and `myredis` runs on the last node as a standalone
//! task on that network (a real `redis-server`, when it is installed).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::LabState;
use crate::api::client::Host;
use crate::api::containers::RunRequest;
use crate::api::services::ServiceView;
use crate::api::swarm::{InitRequest, JoinRequest, JoinToken, SwarmJoined};
use crate::api::volumes::VolumeCreate;
use crate::mounts::MountSpec;
use crate::volumes::Volume;
use shoal_model::{NetworkCreate, PublishedPort, ServiceCreate, ServiceUpdate};

/// The tutorial's volume, mounted where the app writes its log.
pub const VOLUME: &str = "myhelloworld";

/// How long the demo waits for every replica to count a visit in redis, across the encrypted
/// overlay. Usually a second or two; on a loaded two-core machine the first encrypted contact
/// has taken over 30 s.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Where node `i`'s copy of the app's log is: in its volume, under its agent's data dir.
pub fn info_log(state: &LabState, i: usize) -> std::path::PathBuf {
    crate::volumes::Volumes::new(&state.nodes[i].data_dir, &state.nodes[i].name)
        .mountpoint(VOLUME)
        .join(crate::demo::LOG_FILE)
}

/// The file in the lab's directory naming the host directories the demo made for its mount
/// target, deepest first, so that `lab down` takes them away again.
const MADE_DIRS: &str = "demo-made-dirs";

/// Makes the app's log directory (the volume's mount target) on the host before the tasks
/// would, noting which directories were not there.
fn make_log_dir(state: &LabState) -> anyhow::Result<()> {
    let dir = std::path::Path::new(crate::demo::DEFAULT_LOG_DIR);
    let missing: Vec<String> =
        dir.ancestors().take_while(|a| !a.exists()).map(|a| a.display().to_string()).collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let record = super::lab_dir(&state.name).join(MADE_DIRS);
    let mut text = missing.join("\n");
    text.push('\n');
    std::fs::write(&record, text).with_context(|| format!("writing {}", record.display()))
}

/// Whether any process on this machine has a mount at or under `dir`.
fn mounted_anywhere(dir: &str) -> bool {
    let (at, under) = (format!(" {dir} "), format!(" {dir}/"));
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    procs.flatten().any(|p| {
        std::fs::read_to_string(p.path().join("mountinfo"))
            .is_ok_and(|m| m.contains(&at) || m.contains(&under))
    })
}

/// Removes the directories [`make_log_dir`] made, once no task anywhere (another lab's, or
/// this lab's still dying) mounts anything there and they are empty; otherwise leaves them.
pub(super) async fn remove_made_dirs(lab: &str) {
    let Ok(text) = std::fs::read_to_string(super::lab_dir(lab).join(MADE_DIRS)) else { return };
    for dir in text.lines().filter(|d| d.starts_with('/')) {
        let t0 = Instant::now();
        while mounted_anywhere(dir) {
            if t0.elapsed() > Duration::from_secs(3) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if std::fs::remove_dir(dir).is_err() {
            return;
        }
    }
}

/// What the demo made, for the lines it prints.
#[derive(Debug)]
pub struct Deployed {
    /// Whether `myredis` runs (redis-server was found).
    pub redis: bool,
}

fn host(state: &LabState, i: usize) -> Host {
    Host { socket: state.nodes[i].socket.clone() }
}

/// Finds `redis-server` on the PATH.
fn redis_server() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join("redis-server"))
        .find(|p| p.is_file())
}

async fn converge(h: &Host, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let v: ServiceView = h.get_json(&format!("/services/{id}")).await?;
        if v.running == v.desired {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            bail!(
                "{}: {} of {} tasks running after {timeout:?}",
                v.service.name,
                v.running,
                v.desired
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Builds the swarm and deploys the tutorial's services on a lab that is up.
pub async fn deploy(state: &LabState, exe: &std::path::Path) -> anyhow::Result<Deployed> {
    anyhow::ensure!(!state.nodes.is_empty(), "the lab has no nodes");
    let first = host(state, 0);
    let _: SwarmJoined =
        first.post_json("/swarm/init", &InitRequest::default()).await.context("swarm init")?;
    let token: JoinToken = first.get_json("/swarm/join-token/worker").await?;
    for i in 1..state.nodes.len() {
        let req = JoinRequest {
            token: token.token.clone(),
            remote_addr: format!("{}:2377", state.nodes[0].addr),
            advertise_addr: None,
            listen_addr: None,
            data_path_addr: None,
        };
        let _: SwarmJoined = host(state, i)
            .post_json("/swarm/join", &req)
            .await
            .with_context(|| format!("{} joining", state.nodes[i].name))?;
    }
    make_log_dir(state)?;
    let vol = VolumeCreate { name: VOLUME.into(), ..VolumeCreate::default() };
    let _: Volume = first.post_json("/volumes", &vol).await.context("volume create")?;
    let mount = format!("type=volume,src={VOLUME},dst={}", crate::demo::DEFAULT_LOG_DIR);
    let svc = ServiceCreate {
        name: "myhelloworld".into(),
        argv: vec![exe.display().to_string(), "demo".into(), "visitor".into()],
        replicas: Some(state.nodes.len().min(3) as u64),
        publish: vec![PublishedPort::tcp(8100, 8100)],
        mounts: vec![mount.parse::<MountSpec>().map_err(anyhow::Error::msg)?],
        ..ServiceCreate::default()
    };
    let r: serde_json::Value =
        first.post_json("/services", &svc).await.context("service create")?;
    let id = r["id"].as_str().unwrap_or_default().to_owned();
    converge(&first, &id, Duration::from_secs(60)).await?;
    let net = NetworkCreate {
        name: "my-overlay".into(),
        attachable: true,
        encrypted: true,
        ..NetworkCreate::default()
    };
    let _: serde_json::Value =
        first.post_json("/networks", &net).await.context("network create")?;
    let up = ServiceUpdate { network_add: vec!["my-overlay".into()], ..ServiceUpdate::default() };
    let _: ServiceView = first.post_json(&format!("/services/{id}/update"), &up).await?;
    converge(&first, &id, Duration::from_secs(90)).await?;
    let Some(redis) = redis_server() else { return Ok(Deployed { redis: false }) };
    let last = host(state, state.nodes.len() - 1);
    let run = RunRequest {
        name: "myredis".into(),
        network: "my-overlay".into(),
        argv: vec![
            redis.display().to_string(),
            "--protected-mode".into(),
            "no".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
        ],
        ..RunRequest::default()
    };
    let _: serde_json::Value = last.post_json("/containers", &run).await.context("run myredis")?;
    // Ready when every replica counts and every node's port answers with a count: redis runs,
    // its name has reached every task by gossip and the encrypted tunnels have their first
    // handshakes behind them. The mesh picks a replica per connection (at first perhaps the
    // same one every time), so visits go round the nodes until each replica (told apart by
    // `x-served-by`) has counted once.
    let replicas = state.nodes.len().min(3);
    let nodes = &state.nodes[..replicas];
    let mut counted = std::collections::BTreeSet::new();
    let mut answered = vec![false; nodes.len()];
    let t0 = Instant::now();
    for (i, node) in nodes.iter().enumerate().cycle() {
        let (by, page) = visit((node.addr, 8100).into()).await.unwrap_or_default();
        let counts = page.contains("visitor number");
        if counts {
            answered[i] = true;
            counted.extend(by);
            if counted.len() >= replicas && answered.iter().all(|a| *a) {
                break;
            }
        }
        if t0.elapsed() > READY_WITHIN {
            bail!(
                "myredis is not reachable from every replica after {} s: {} of {replicas} \
                 counted; {} last answered {page:?}",
                READY_WITHIN.as_secs(),
                counted.len(),
                node.name
            );
        }
        let pause = if counts { 50 } else { 300 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Ok(Deployed { redis: true })
}

/// One `GET /visitor`: the replica that answered (its `x-served-by`) and the page.
async fn visit(addr: std::net::SocketAddr) -> anyhow::Result<(Option<String>, String)> {
    use http_body_util::{BodyExt, Empty};
    let io = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/visitor")
            .header(hyper::header::HOST, "demo")
            .body(Empty::<hyper::body::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let by = resp.headers().get("x-served-by").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let page = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((by, String::from_utf8_lossy(&page).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(3), io).await?
}
