//! `shoal agent`: the host daemon. It owns the data directory (an exclusive lock), serves the API
//! on its unix socket, and shuts down cleanly on SIGTERM/SIGINT, removing the socket. It also
//! runs the overlay, DNS, the mesh and the control plane.

pub mod access;
pub mod observe;
pub mod preflight;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{self, ApiState};
use crate::config::AgentConfig;
use crate::metrics::Metrics;
use crate::swarm::{self, addr};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "agent.lock";

/// Holds the data directory for the life of the agent; the kernel drops the lock if we die.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
}

impl DataDirLock {
    /// Takes the data directory's lock or says who holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
        // It holds the node's keys and the swarm's secrets: root alone may look inside.
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", data_dir.display()))?;
        let path = data_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another shoal agent (pid {}) holds the data dir {}; refusing to start",
                    holder.trim(),
                    data_dir.display()
                );
            }
            Err((_, e)) => bail!("locking {}: {e}", path.display()),
        };
        lock.set_len(0)?;
        write!(lock, "{}", std::process::id())?;
        Ok(DataDirLock { _lock: lock })
    }
}

/// Binds the API socket (its mode as `access` says), replacing a stale socket file left by a
/// dead agent.
async fn bind_socket(path: &Path, access: &access::Access) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another agent is serving on {}; refusing to start", path.display());
        }
        fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    access.restrict(path)?;
    Ok(listener)
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    preflight::at_start().await?;
    let access = Arc::new(access::Access::new(config.api_group.as_deref())?);
    let listener = bind_socket(&config.socket, &access).await?;
    let socket_path = config.socket.clone();
    let metrics_addr = config.metrics_addr;
    let mut metrics = Metrics::new(&config.node_name);
    let current_gossip = Arc::new(arc_swap::ArcSwapOption::<shoal_gossip::Gossip>::empty());
    metrics
        .registry_mut()
        .register_collector(Box::new(observe::CurrentGossip(current_gossip.clone())));
    if let Some(path) = &config.gossip_key_file {
        let key = crate::config::load_gossip_key(path).map_err(anyhow::Error::msg)?;
        let ifaces = addr::Interfaces::read();
        let ip = match config.advertise_addr {
            Some(ip) => ip,
            None => addr::system_addr(&ifaces).map_err(|e| {
                anyhow::anyhow!("standalone gossip needs an address: {e}; set advertise_addr")
            })?,
        };
        let g = shoal_gossip::Gossip::start(config.gossip(ip, key)).await?;
        tracing::info!(addr = %g.local_addr(), seeds = ?config.gossip_seeds, "standalone gossip started");
        current_gossip.store(Some(Arc::new(g)));
    }
    // A node that was in a swarm when it stopped is in it again.
    let mut swarm = None;
    if config.gossip_key_file.is_none()
        && let Some(c) = shoal_cluster::Cluster::open(&config.data_dir, config.tuning()).await?
    {
        // Exiting lets a supervisor retry, which heals a cause that goes away (a link not up
        // yet); the message says what else there is to do.
        let s = swarm::Swarm::start(&config, c).await.with_context(|| {
            format!(
                "this node is in a swarm but cannot start its part of it; fix the cause and \
                 start the agent again, or take the node out of the swarm by removing {}",
                config.data_dir.join("swarm").display()
            )
        })?;
        tracing::info!(node = %s.cluster.info().node, "rejoined the swarm");
        current_gossip.store(Some(s.gossip.clone()));
        swarm = Some(s);
    }
    let cluster =
        Arc::new(arc_swap::ArcSwapOption::new(swarm.as_ref().map(|s| Arc::new(s.cluster.clone()))));
    metrics.registry_mut().register_collector(Box::new(observe::RaftCollector(cluster.clone())));
    let engine =
        Arc::new(arc_swap::ArcSwapOption::new(swarm.as_ref().map(|s| Arc::new(s.engine.clone()))));
    metrics.registry_mut().register_collector(Box::new(observe::EngineCollector(engine.clone())));
    crate::engine::node::dns_metrics().register(metrics.registry_mut());
    let state = Arc::new(ApiState {
        engine,
        metrics,
        started: Instant::now(),
        cluster: cluster.clone(),
        swarm: tokio::sync::Mutex::new(swarm),
        gossip: current_gossip,
        config,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics_server = None;
    if let Some(addr) = metrics_addr {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics address {addr}"))?;
        let mut rx = stop_rx.clone();
        let app = api::metrics_router(state.clone());
        metrics_server = Some(tokio::spawn(async move {
            let _ = axum::serve(tcp, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        }));
    }

    tracing::info!(
        node = %state.config.node_name,
        socket = %socket_path.display(),
        advertise = ?state.config.advertise_addr,
        "shoal agent started"
    );
    if let Some(addr) = state.config.ui_addr {
        tokio::spawn(observe::serve_ui_on_managers(
            addr,
            cluster.clone(),
            state.engine.clone(),
            stop_rx.clone(),
        ));
    }
    let mut rx = stop_rx.clone();
    let app = api::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(access, access::check))
        .into_make_service_with_connect_info::<access::Peer>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = rx.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = sig, "shutting down");
    let _ = stop_tx.send(true);
    // Connections that never close must not hold the agent up.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    if let Some(m) = metrics_server {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), m).await;
    }
    // Say goodbye so the others mark us left at once instead of suspecting us for seconds. The
    // node's tasks keep running (a restart adopts them); `swarm leave` is what stops them.
    if let Some(sw) = state.swarm.lock().await.take() {
        state.gossip.store(None);
        state.engine.store(None);
        sw.stop_keeping_tasks().await;
    } else if let Some(g) = state.gossip.swap(None).and_then(Arc::into_inner) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), g.leave()).await;
    }
    if let Err(e) = fs::remove_file(&socket_path) {
        tracing::warn!(error = %e, "removing the API socket");
    }
    tracing::info!("stopped");
    Ok(())
}
