//! `shoal demo visitor`: the Swarm tutorial's hello-world, built in so the demo needs nothing
//! but this binary and `redis-server`. `GET /visitor` counts visitors with INCR in Redis (by
//! default at `myredis:6379`, which service DNS resolves inside a task) and answers
//! "Hello World, you are visitor number N (from ADDRESS)", ADDRESS being the peer the kernel
//! reports (the routing mesh keeps the client's), or "Hello World, connection to redis error" when
//! Redis cannot be reached within the timeout. Every answer names the task that served it in an
//! `X-Served-By` header, so a reader sees the routing mesh spread requests. Every request is
//! also one line of `info.log` in `--log-dir`, where the tutorial mounts a volume, so the log
//! outlives the task on the node that ran it.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

/// The Redis key the visitor count lives under.
pub const COUNTER_KEY: &str = "visitors";

/// Flags of `shoal demo visitor`.
#[derive(Debug, Clone, clap::Args)]
pub struct VisitorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8100")]
    pub listen: SocketAddr,
    /// Redis to count in, HOST:PORT; the name is resolved on every connect, so a moved Redis is
    /// found again.
    #[arg(long, default_value = "myredis:6379")]
    pub redis: String,
    /// How long to wait for Redis before answering with the error, in milliseconds (the
    /// tutorial's app uses 2 s socket timeouts).
    #[arg(long, default_value_t = 2000)]
    pub redis_timeout_ms: u64,
    /// Directory of `info.log`, one line per request (made if missing).
    #[arg(long, default_value = DEFAULT_LOG_DIR)]
    pub log_dir: PathBuf,
}

/// Where the tutorial's app writes its log, and where the tutorial mounts its volume.
pub const DEFAULT_LOG_DIR: &str = "/opt/applications/helloworld/logs";
/// The log file in `--log-dir`.
pub const LOG_FILE: &str = "info.log";

#[derive(Debug)]
struct App {
    redis: String,
    timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    served_by: HeaderValue,
    /// `info.log`, opened for appending.
    log: std::sync::Mutex<std::fs::File>,
}

impl App {
    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        let addr = tokio::net::lookup_host(&self.redis)
            .await
            .with_context(|| format!("resolving {}", self.redis))?
            .next()
            .with_context(|| format!("{} has no address", self.redis))?;
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    async fn incr(&self) -> anyhow::Result<i64> {
        let mut slot = self.conn.lock().await;
        let mut conn = match slot.take() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let n: i64 = redis::cmd("INCR").arg(COUNTER_KEY).query_async(&mut conn).await?;
        *slot = Some(conn);
        Ok(n)
    }

    /// Appends one line for a request: time, serving task, path and answer.
    fn log(&self, path: &str, answer: &str) {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let by = self.served_by.to_str().unwrap_or("?");
        let line = format!("{now} {by} GET {path}: {}\n", answer.trim_end());
        let mut f = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "writing {LOG_FILE}");
        }
    }
}

async fn visitor(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let from = peer.ip().to_canonical();
    let body = match tokio::time::timeout(app.timeout, app.incr()).await {
        Ok(Ok(n)) => format!("Hello World, you are visitor number {n} (from {from})\n"),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "redis");
            "Hello World, connection to redis error\n".to_owned()
        }
        Err(_) => "Hello World, connection to redis error\n".to_owned(),
    };
    // One line per visit, for `shoal service logs`.
    println!("GET /visitor: {}", body.trim_end());
    app.log("/visitor", &body);
    ([("x-served-by", app.served_by.clone())], body).into_response()
}

async fn hello(State(app): State<Arc<App>>) -> Response {
    let host = app.served_by.to_str().unwrap_or("?").to_owned();
    let body = format!("Hello World from {host}\n");
    app.log("/", &body);
    ([("x-served-by", app.served_by.clone())], body).into_response()
}

/// Serves the demo until the process is stopped.
pub async fn run_visitor(args: VisitorArgs) -> anyhow::Result<()> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("creating {}", args.log_dir.display()))?;
    let log_path = args.log_dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let app = Arc::new(App {
        redis: args.redis,
        timeout: Duration::from_millis(args.redis_timeout_ms),
        conn: Mutex::new(None),
        served_by: HeaderValue::from_str(&host).unwrap_or(HeaderValue::from_static("unknown")),
        log: std::sync::Mutex::new(log),
    });
    let router =
        Router::new().route("/visitor", get(visitor)).route("/", get(hello)).with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("visitor demo listening on {}", args.listen);
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let router = router.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, router).with_graceful_shutdown(stop).await?;
    Ok(())
}
