//! The tokio driver: [`Runtime`] owns the tasks of one node, their namespaces, state
//! directories, processes, log pumps and health probes.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use shoal_netns::NetNs;
use tokio::sync::{broadcast, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Error, Result};
use crate::health::{HealthMonitor, ProbeOutcome};
use crate::logs::Logs;
use crate::process::{self, TaskNamespaces};
use crate::shim::{self, Exited, Launch, Running};
use crate::spec::{HealthCheck, TaskSpec, short_id};
use crate::state::{EventKind, Health, TaskEvent, TaskState, TaskStatus};
use crate::supervisor::{self, Shim};

/// Longest accepted node prefix.
pub const MAX_PREFIX: usize = 32;
/// Kept output of one health probe, in bytes (Docker keeps 4096).
pub const PROBE_OUTPUT_CAP: usize = 4096;
/// How long cleanup waits for processes in a task namespace to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long to wait, after SIGKILL, for a process stuck in the kernel.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(30);
/// How long the log copy may take to catch up once the task's shim has exited.
const TAIL_DRAIN: Duration = Duration::from_secs(5);
/// The file whose presence says a stop was asked for (so a later agent reports `shutdown`).
const STOP_MARK: &str = "stop-requested";
/// The task's last health verdict, so an agent that adopts a healthy task keeps it serving.
const HEALTH_FILE: &str = "health.json";

/// Where and under which names a runtime keeps its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Per-node prefix of namespace names (`PREFIX-t-<short id>`), so several nodes on one
    /// machine never collide: 1-32 of `[A-Za-z0-9_-]`, not ending in `-`, without `-t-`.
    pub prefix: String,
    /// Directory for per-task files (`<state_dir>/tasks/<id>/`: the launch record, the
    /// shim's records, logs, `resolv.conf` and `hosts`). A runtime started on the same
    /// directory adopts the tasks found there ([`Runtime::adopt`]).
    pub state_dir: PathBuf,
    /// The program each task's supervisor runs as: it must call [`crate::shim::main`] when its
    /// first argument is [`crate::shim::ARG`]. The agent gives `/proc/self/exe`.
    pub shim: PathBuf,
}

impl RuntimeConfig {
    fn validate(&self) -> Result<()> {
        let p = &self.prefix;
        let ok = !p.is_empty()
            && p.len() <= MAX_PREFIX
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
            && !p.ends_with('-')
            && !p.contains("-t-");
        if !ok {
            return Err(Error::InvalidConfig {
                field: "prefix",
                reason: format!(
                    "{p:?}: use 1-{MAX_PREFIX} of [A-Za-z0-9_-], no trailing '-', no \"-t-\""
                ),
            });
        }
        if !self.shim.is_absolute() {
            return Err(Error::InvalidConfig {
                field: "shim",
                reason: format!("{:?} must be an absolute path", self.shim),
            });
        }
        if !self.state_dir.is_absolute() {
            return Err(Error::InvalidConfig {
                field: "state_dir",
                reason: format!("{:?} must be an absolute path", self.state_dir),
            });
        }
        Ok(())
    }
}

/// The task runner of one node. Cheap to clone; all clones share the tasks.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    prefix: String,
    tasks_dir: PathBuf,
    shim: PathBuf,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    events: broadcast::Sender<TaskEvent>,
}

#[derive(Debug)]
struct Task {
    id: String,
    netns: String,
    dir: PathBuf,
    logs: Logs,
    status: watch::Sender<TaskStatus>,
    ctl: Mutex<Ctl>,
}

/// Mutable control state; every state transition happens with this lock held, so a task's
/// events go out in order.
#[derive(Debug)]
struct Ctl {
    spec: TaskSpec,
    exe: Option<PathBuf>,
    pgid: Option<i32>,
    stop_requested: bool,
    health: Option<AbortHandle>,
    /// The namespace of the ended task was deleted ([`Runtime::release_netns`]).
    released: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Task {
    fn state(&self) -> TaskState {
        self.status.borrow().state
    }

    fn status(&self) -> TaskStatus {
        self.status.borrow().clone()
    }
}

impl Inner {
    /// Applies `f` to the task's status and broadcasts the result. Call with `ctl` held.
    fn update(&self, task: &Task, kind: EventKind, f: impl FnOnce(&mut TaskStatus)) {
        task.status.send_modify(f);
        let _ = self.events.send(TaskEvent { kind, status: task.status() });
    }

    fn set_state(&self, task: &Task, state: TaskState, f: impl FnOnce(&mut TaskStatus)) {
        self.update(task, EventKind::State, |s| {
            s.state = state;
            if state.is_terminal() {
                s.finished_at = Some(SystemTime::now());
                s.pid = None;
            }
            f(s);
        });
    }

    fn is_ours(&self, netns: &str) -> bool {
        netns.strip_prefix(&self.prefix).and_then(|rest| rest.strip_prefix("-t-")).is_some_and(
            |short| !short.is_empty() && short.bytes().all(|b| b.is_ascii_alphanumeric()),
        )
    }
}

impl Runtime {
    /// A runtime with no tasks; creates `<state_dir>/tasks` (mode 0700: launch records hold
    /// the tasks' environments). Call [`Runtime::adopt`] next when the agent (re)starts.
    pub fn new(config: RuntimeConfig) -> Result<Runtime> {
        config.validate()?;
        let tasks_dir = config.state_dir.join("tasks");
        private_dir(&tasks_dir)?;
        let (events, _) = broadcast::channel(1024);
        Ok(Runtime {
            inner: Arc::new(Inner {
                prefix: config.prefix,
                tasks_dir,
                shim: config.shim,
                tasks: Mutex::new(HashMap::new()),
                events,
            }),
        })
    }

    /// The node prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The network namespace name a task with this id gets.
    pub fn netns_name_for(&self, id: &str) -> String {
        format!("{}-t-{}", self.inner.prefix, short_id(id))
    }

    /// Every state and health change of every task, and removals. A receiver that falls more
    /// than 1024 events behind gets `Lagged` and should re-read [`Runtime::list`].
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.inner.events.subscribe()
    }

    fn get(&self, id: &str) -> Result<Arc<Task>> {
        lock(&self.inner.tasks).get(id).cloned().ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// The status of one task.
    pub fn inspect(&self, id: &str) -> Result<TaskStatus> {
        Ok(self.get(id)?.status())
    }

    /// The status of every task, by id.
    pub fn list(&self) -> Vec<TaskStatus> {
        let mut v: Vec<TaskStatus> = lock(&self.inner.tasks).values().map(|t| t.status()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// A watch on one task's status (the current value, then every change).
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<TaskStatus>> {
        Ok(self.get(id)?.status.subscribe())
    }

    /// Waits until the task is complete, shut down or failed, and returns that status.
    pub async fn wait(&self, id: &str) -> Result<TaskStatus> {
        let mut rx = self.watch(id)?;
        wait_terminal(&mut rx).await.ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// The task's log (stdout and stderr lines), readable and followable.
    pub fn logs(&self, id: &str) -> Result<Logs> {
        Ok(self.get(id)?.logs.clone())
    }

    /// The spec a task was created with (its addresses as last set).
    pub fn spec(&self, id: &str) -> Result<TaskSpec> {
        Ok(lock(&self.get(id)?.ctl).spec.clone())
    }

    /// Opens the task's network namespace (to attach overlay endpoints, bind DNS sockets, add routes).
    pub fn netns(&self, id: &str) -> Result<NetNs> {
        Ok(NetNs::open(&self.get(id)?.netns)?)
    }

    /// Sets the addresses `/etc/hosts` gives the task's hostname; only before `start`.
    pub fn set_addresses(&self, id: &str, addresses: Vec<IpAddr>) -> Result<()> {
        let task = self.get(id)?;
        let mut ctl = lock(&task.ctl);
        let state = task.state();
        if state > TaskState::Ready {
            return Err(Error::InvalidState { id: id.to_owned(), state, op: "set addresses" });
        }
        ctl.spec.addresses.clone_from(&addresses);
        task.status.send_modify(|s| s.addresses = addresses);
        Ok(())
    }

    /// A task in state `new`, not registered yet.
    fn new_task(&self, spec: TaskSpec, created_at: SystemTime) -> Arc<Task> {
        let netns = self.netns_name_for(&spec.id);
        let status = TaskStatus {
            id: spec.id.clone(),
            name: spec.name.clone(),
            netns: netns.clone(),
            state: TaskState::New,
            health: None,
            failing_streak: 0,
            last_probe_output: None,
            pid: None,
            exit_code: None,
            error: None,
            addresses: spec.addresses.clone(),
            created_at,
            started_at: None,
            finished_at: None,
        };
        Arc::new(Task {
            id: spec.id.clone(),
            netns,
            dir: self.inner.tasks_dir.join(&spec.id),
            logs: Logs::new(spec.log_cap),
            status: watch::channel(status).0,
            ctl: Mutex::new(Ctl {
                spec,
                exe: None,
                pgid: None,
                stop_requested: false,
                health: None,
                released: false,
            }),
        })
    }

    /// Registers a task and makes its network namespace (`PREFIX-t-<short id>`, `lo` up) and
    /// state directory: `new` → `preparing` → `ready`. Between this and [`Runtime::start`] the
    /// caller attaches networks into [`Runtime::netns`] and binds DNS there.
    ///
    /// A program that cannot be executed makes the task `failed` at once, with Docker's
    /// message, before anything is made ([`Error::Executable`]); any other failure is undone
    /// and also leaves the task `failed`. A failed task stays listed until [`Runtime::remove`].
    pub async fn create(&self, spec: TaskSpec) -> Result<TaskStatus> {
        spec.validate()?;
        let inner = &self.inner;
        let netns = self.netns_name_for(&spec.id);
        let task = self.new_task(spec, SystemTime::now());
        {
            let mut tasks = lock(&inner.tasks);
            if tasks.contains_key(&task.id) {
                return Err(Error::Exists(task.id.clone()));
            }
            if tasks.values().any(|t| t.netns == netns) {
                return Err(Error::Exists(netns));
            }
            tasks.insert(task.id.clone(), task.clone());
        }
        {
            let mut ctl = lock(&task.ctl);
            inner.update(&task, EventKind::State, |_| {});
            let resolved = process::resolve_executable(&ctl.spec.argv[0], ctl.spec.path_env());
            match resolved {
                Ok(exe) => ctl.exe = Some(exe),
                Err(reason) => {
                    inner.set_state(&task, TaskState::Failed, |s| s.error = Some(reason.clone()));
                    return Err(Error::Executable { id: task.id.clone(), reason });
                }
            }
            inner.set_state(&task, TaskState::Preparing, |_| {});
        }
        let prepared = prepare(&task).await;
        let _ctl = lock(&task.ctl);
        if let Err(e) = prepared {
            undo_prepare(&task);
            inner.set_state(&task, TaskState::Failed, |s| s.error = Some(e.to_string()));
            return Err(e);
        }
        let state = task.state();
        if state != TaskState::Preparing {
            // Stopped while preparing: stays shut down; `remove` deletes what was made.
            return Err(Error::InvalidState { id: task.id.clone(), state, op: "finish creating" });
        }
        inner.set_state(&task, TaskState::Ready, |_| {});
        Ok(task.status())
    }

    /// Starts a `ready` task's process: `starting` → `running`. Writes its `resolv.conf`,
    /// `hosts` and launch record, starts its shim (which spawns it in its namespaces, in a
    /// session of its own, and keeps its output and exit status on disk), and starts log
    /// copying, supervision and the health probes. On failure the task is `failed` with the
    /// error. The task outlives this runtime; a later one adopts it ([`Runtime::adopt`]).
    pub async fn start(&self, id: &str) -> Result<TaskStatus> {
        let inner = self.inner.clone();
        let task = self.get(id)?;
        let launch = {
            let ctl = lock(&task.ctl);
            let state = task.state();
            if state != TaskState::Ready {
                return Err(Error::InvalidState { id: id.to_owned(), state, op: "start" });
            }
            inner.set_state(&task, TaskState::Starting, |_| {});
            let exe = ctl.exe.clone().unwrap_or_else(|| PathBuf::from(&ctl.spec.argv[0]));
            write_files(&task.dir, &ctl.spec).and_then(|(resolv, hosts)| {
                let launch = Launch {
                    spec: ctl.spec.clone(),
                    exe,
                    netns: task.netns.clone(),
                    resolv,
                    hosts,
                    created_at: task.status.borrow().created_at,
                };
                shim::write_json(&task.dir, shim::LAUNCH, &launch)
                    .map_err(|e| Error::io("write", task.dir.join(shim::LAUNCH), e))?;
                Ok(launch)
            })
        };
        let spawned = match launch {
            Ok(_) => supervisor::spawn(&inner.shim, id, &task.dir).await,
            Err(e) => Err(e),
        };
        let (shim, pid) = match spawned {
            Ok(s) => s,
            Err(e) => {
                let _ctl = lock(&task.ctl);
                inner.set_state(&task, TaskState::Failed, |s| s.error = Some(e.to_string()));
                return Err(e);
            }
        };
        let mut ctl = lock(&task.ctl);
        ctl.pgid = i32::try_from(pid).ok();
        if ctl.stop_requested {
            // Stopped while starting: `stop` signals the group from now on; begin with this.
            if let Some(pg) = ctl.pgid {
                let first =
                    crate::spec::parse_signal(&ctl.spec.stop_signal).unwrap_or(Signal::SIGTERM);
                let _ = nix::sys::signal::killpg(Pid::from_raw(pg), first);
            }
        }
        let started_at = SystemTime::now();
        follow(&inner, &task, &mut ctl, shim, pid, started_at, Instant::now());
        Ok(task.status())
    }

    /// Stops a task: its stop signal (SIGTERM unless the spec names another) to its process
    /// group, SIGKILL after `grace` (the spec's `stop_grace` when `None`), then waits until it
    /// and everything else in its namespace are gone. The task ends `shutdown` with the exit code. A task not started yet becomes
    /// `shutdown` at once; a finished one is returned as is.
    pub async fn stop(&self, id: &str, grace: Option<Duration>) -> Result<TaskStatus> {
        let task = self.get(id)?;
        let mut rx = task.status.subscribe();
        let (grace, first) = {
            let mut ctl = lock(&task.ctl);
            // Validated at create; a spec from an older run without one falls back to SIGTERM.
            let first = crate::spec::parse_signal(&ctl.spec.stop_signal).unwrap_or(Signal::SIGTERM);
            match task.state() {
                s if s.is_terminal() => return Ok(task.status()),
                TaskState::New | TaskState::Preparing | TaskState::Ready => {
                    ctl.stop_requested = true;
                    self.inner.set_state(&task, TaskState::Shutdown, |_| {});
                    return Ok(task.status());
                }
                _ => {
                    ctl.stop_requested = true;
                    // Kept on disk too: an agent that adopts the task reports it shut down.
                    let _ = std::fs::write(task.dir.join(STOP_MARK), b"");
                    (grace.unwrap_or(ctl.spec.stop_grace), first)
                }
            }
        };
        // The group id is read at each signal: once the main process has exited the
        // supervisor clears it (and kills the rest), so a recycled id is never signalled.
        let signal = |sig| {
            if let Some(pg) = lock(&task.ctl).pgid {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pg), sig);
            }
        };
        signal(first);
        let exited = tokio::time::timeout(grace, wait_terminal(&mut rx)).await;
        if let Ok(Some(status)) = exited {
            return Ok(status);
        }
        signal(Signal::SIGKILL);
        match tokio::time::timeout(AFTER_KILL_WAIT, wait_terminal(&mut rx)).await {
            Ok(Some(status)) => Ok(status),
            _ => Err(Error::StopTimeout(id.to_owned())),
        }
    }

    /// Deletes the namespace of an ended task, as a container's sandbox goes when it stops:
    /// the task keeps its status and logs until [`Runtime::remove`], not an empty namespace
    /// per entry of the task history. The caller first takes out what it put in (overlay
    /// endpoints, the DNS listener), so nothing outlives the name. Whatever processes were left
    /// in it were killed when the task ended. Doing it again does nothing.
    pub async fn release_netns(&self, id: &str) -> Result<()> {
        let task = self.get(id)?;
        let state = task.state();
        if !state.is_terminal() {
            return Err(Error::InvalidState { id: id.to_owned(), state, op: "release namespace" });
        }
        if std::mem::replace(&mut lock(&task.ctl).released, true) {
            return Ok(());
        }
        let netns = task.netns.clone();
        tokio::task::spawn_blocking(move || NetNs::delete(&netns))
            .await
            .map_err(|e| Error::io("join release", &task.dir, std::io::Error::other(e)))??;
        Ok(())
    }

    /// Removes a task: stops it if needed (with its grace period), kills anything left in its
    /// namespace, deletes the namespace and its state directory, forgets it, and sends a
    /// [`EventKind::Removed`] event.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let task = self.get(id)?;
        if !task.state().is_terminal() {
            self.stop(id, None).await?;
        }
        let (netns, dir) = (task.netns.clone(), task.dir.clone());
        tokio::task::spawn_blocking(move || delete_task_objects(&netns, &dir))
            .await
            .map_err(|e| Error::io("join cleanup", &task.dir, std::io::Error::other(e)))??;
        lock(&self.inner.tasks).remove(id);
        let _ctl = lock(&task.ctl);
        self.inner.update(&task, EventKind::Removed, |_| {});
        Ok(())
    }

    /// Stops and removes every task (agent shutdown); returns the first error after trying all.
    pub async fn remove_all(&self) -> Result<()> {
        let ids: Vec<String> = lock(&self.inner.tasks).keys().cloned().collect();
        let mut first = Ok(());
        for id in ids {
            if let Err(e) = self.remove(&id).await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Takes over the tasks an earlier runtime on this state directory started (an agent
    /// restart, crash or upgrade), then deletes the rest of what it left ([`Runtime::clean_stale`]):
    ///
    /// - a task whose shim still runs (same pid and start time) is `running` again, with its
    ///   pid, its log (read back from disk and followed), supervision and health probes;
    /// - a task that ended meanwhile gets its real exit code and end time from the shim's
    ///   record (`complete`, `failed`, or `shutdown` if a stop had been asked for), its log
    ///   kept; its namespace stays until [`Runtime::release_netns`];
    /// - a task whose shim was killed before the task ended is `failed` (the code is lost), and
    ///   whatever is left in its namespace is killed;
    /// - a task that was never started is forgotten (its namespace and files deleted).
    ///
    /// Returns the statuses of the adopted tasks. The caller re-attaches what lives outside the
    /// task (DNS listeners; overlay endpoints are found by the overlay itself).
    pub async fn adopt(&self) -> Result<Vec<TaskStatus>> {
        let entries = std::fs::read_dir(&self.inner.tasks_dir)
            .map_err(|e| Error::io("read", &self.inner.tasks_dir, e))?;
        let mut adopted = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let Some(launch) = shim::read_json::<Launch>(&dir, shim::LAUNCH) else { continue };
            let Some(running) = shim::read_json::<Running>(&dir, shim::RUNNING) else { continue };
            if launch.spec.id != id
                || launch.spec.validate().is_err()
                || launch.netns != self.netns_name_for(&id)
                || lock(&self.inner.tasks).contains_key(&id)
            {
                continue;
            }
            let task = self.new_task(launch.spec, launch.created_at);
            lock(&self.inner.tasks).insert(id.clone(), task.clone());
            let mut ctl = lock(&task.ctl);
            ctl.exe = Some(launch.exe);
            ctl.stop_requested = dir.join(STOP_MARK).exists();
            self.inner.update(&task, EventKind::State, |_| {});
            let exited: Option<Exited> = shim::read_json(&dir, shim::EXIT);
            let alive = shim::start_time(running.shim_pid) == Some(running.shim_start);
            if exited.is_none() && alive {
                // Its health start period counts from when it really started.
                let age = SystemTime::now().duration_since(running.started_at).unwrap_or_default();
                let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                let shim = Shim::Adopted { pid: running.shim_pid, start: running.shim_start };
                ctl.pgid = i32::try_from(running.task_pid).ok();
                follow(
                    &self.inner,
                    &task,
                    &mut ctl,
                    shim,
                    running.task_pid,
                    running.started_at,
                    started,
                );
                // A healthy task stays in service; its probes carry on from there.
                if let Some(h) = shim::read_json::<Health>(&dir, HEALTH_FILE)
                    && ctl.spec.health.is_some()
                {
                    self.inner.update(&task, EventKind::Health, |s| s.health = Some(h));
                }
            } else if exited.is_some() {
                let (done, done_rx) = watch::channel(true);
                drop(done);
                tokio::spawn(supervisor::tail(dir.clone(), task.logs.clone(), done_rx));
                let state = end_state(ctl.stop_requested, exited.map(|x| x.code));
                self.inner.set_state(&task, state, |s| {
                    s.started_at = Some(running.started_at);
                    end_status(s, exited);
                });
            } else {
                // Running, but nobody left to tell how it ends: end it now, reported failed.
                // Its pid may be anyone's by now: only its namespace is emptied.
                let gone = Shim::Adopted { pid: running.shim_pid, start: running.shim_start };
                follow(
                    &self.inner,
                    &task,
                    &mut ctl,
                    gone,
                    running.task_pid,
                    running.started_at,
                    Instant::now(),
                );
            }
            drop(ctl);
            tracing::info!(task = %id, state = %task.state(), "adopted a task");
            adopted.push(task.status());
        }
        self.clean_stale().await?;
        Ok(adopted)
    }

    /// Deletes what a previous run of an agent with this prefix left behind: namespaces named
    /// `PREFIX-t-*` that no current task owns (after killing every process in them) and state
    /// directories of unknown tasks. Returns the namespaces removed.
    pub async fn clean_stale(&self) -> Result<Vec<String>> {
        let inner = self.inner.clone();
        let (known_ns, known_ids): (HashSet<String>, HashSet<String>) = {
            let tasks = lock(&inner.tasks);
            (tasks.values().map(|t| t.netns.clone()).collect(), tasks.keys().cloned().collect())
        };
        tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut removed = Vec::new();
            for name in NetNs::list() {
                if inner.is_ours(&name) && !known_ns.contains(&name) {
                    delete_task_objects(&name, Path::new(""))?;
                    removed.push(name);
                }
            }
            let entries = std::fs::read_dir(&inner.tasks_dir)
                .map_err(|e| Error::io("read", &inner.tasks_dir, e))?;
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if !known_ids.contains(&id) {
                    let path = entry.path();
                    std::fs::remove_dir_all(&path).map_err(|e| Error::io("remove", &path, e))?;
                }
            }
            Ok(removed)
        })
        .await
        .map_err(|e| Error::io("join cleanup", PathBuf::new(), std::io::Error::other(e)))?
    }
}

async fn wait_terminal(rx: &mut watch::Receiver<TaskStatus>) -> Option<TaskStatus> {
    rx.wait_for(|s| s.state.is_terminal()).await.ok().map(|s| s.clone())
}

/// Makes the state directory and the namespace with `lo` up.
async fn prepare(task: &Task) -> Result<()> {
    let dir = task.dir.clone();
    private_dir(&dir)?;
    let name = task.netns.clone();
    let ns = tokio::task::spawn_blocking(move || NetNs::create(&name))
        .await
        .map_err(|e| Error::io("join", &dir, std::io::Error::other(e)))??;
    let handle = ns.netlink()?;
    let lo = shoal_netns::link_index(&handle, "lo").await.ok_or_else(|| {
        Error::io(
            "find lo in",
            shoal_netns::path_of(&task.netns),
            std::io::ErrorKind::NotFound.into(),
        )
    })?;
    handle
        .link()
        .set(rtnetlink::LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(|source| Error::Netlink { op: "set lo up", source })
}

fn undo_prepare(task: &Task) {
    if let Err(e) = delete_task_objects(&task.netns, &task.dir) {
        tracing::warn!(task = %task.id, "cleanup after failed create: {e}");
    }
}

/// Kills every process in the namespace, deletes it and removes `dir` (if not empty).
fn delete_task_objects(netns: &str, dir: &Path) -> Result<()> {
    if let Ok(ns) = NetNs::open(netns) {
        shoal_netns::kill_all_in(&ns, KILL_WAIT);
    }
    NetNs::delete(netns)?;
    if !dir.as_os_str().is_empty() {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", dir, e)),
        }
    }
    Ok(())
}

/// Writes the task's `resolv.conf` and `hosts`; returns their paths.
fn write_files(dir: &Path, spec: &TaskSpec) -> Result<(PathBuf, PathBuf)> {
    let resolv = dir.join("resolv.conf");
    let hosts = dir.join("hosts");
    std::fs::write(&resolv, spec.resolv_conf_text()).map_err(|e| Error::io("write", &resolv, e))?;
    std::fs::write(&hosts, spec.hosts_text()).map_err(|e| Error::io("write", &hosts, e))?;
    Ok((resolv, hosts))
}

/// Marks a task whose shim runs `running` with the task's `pid`, and starts copying its log,
/// waiting for its end and (with a health check) probing it. Call with `ctl` held.
fn follow(
    inner: &Arc<Inner>,
    task: &Arc<Task>,
    ctl: &mut Ctl,
    shim: Shim,
    pid: u32,
    started_at: SystemTime,
    started: Instant,
) {
    let health = ctl.spec.health.clone();
    inner.set_state(task, TaskState::Running, |s| {
        s.pid = Some(pid);
        s.started_at = Some(started_at);
        s.health = health.as_ref().map(|_| Health::Starting);
    });
    let (done, done_rx) = watch::channel(false);
    let tail = tokio::spawn(supervisor::tail(task.dir.clone(), task.logs.clone(), done_rx));
    if let Some(check) = health {
        let h = tokio::spawn(health_loop(
            inner.clone(),
            task.clone(),
            ctl.spec.clone(),
            check,
            pid,
            started,
        ));
        ctl.health = Some(h.abort_handle());
    }
    tokio::spawn(supervise(inner.clone(), task.clone(), shim, done, tail));
}

/// Waits for the task's shim to exit, then takes its exit status and makes sure nothing of the
/// task is left, like a container whose PID namespace goes away: nothing of a task outlives
/// its main process. A shim that died without an exit status (killed) fails the task.
async fn supervise(
    inner: Arc<Inner>,
    task: Arc<Task>,
    shim: Shim,
    done: watch::Sender<bool>,
    mut tail: JoinHandle<()>,
) {
    shim.wait().await;
    let exited: Option<Exited> = shim::read_json(&task.dir, shim::EXIT);
    let pgid = {
        let mut ctl = lock(&task.ctl);
        if let Some(h) = ctl.health.take() {
            h.abort();
        }
        ctl.pgid.take()
    };
    // The shim reaped the task and killed its group; only without it may the group still live.
    if exited.is_none()
        && let Some(pg) = pgid
    {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pg), Signal::SIGKILL);
    }
    let netns = task.netns.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(ns) = NetNs::open(&netns) {
            shoal_netns::kill_all_in(&ns, KILL_WAIT);
        }
    })
    .await;
    let _ = done.send(true);
    if tokio::time::timeout(TAIL_DRAIN, &mut tail).await.is_err() {
        tail.abort();
    }
    task.logs.close();
    let ctl = lock(&task.ctl);
    inner.set_state(&task, end_state(ctl.stop_requested, exited.map(|x| x.code)), |s| {
        end_status(s, exited);
    });
}

/// The state a task ends in: `shutdown` when asked to stop, else by its exit code.
fn end_state(stop_requested: bool, code: Option<i32>) -> TaskState {
    match code {
        _ if stop_requested => TaskState::Shutdown,
        Some(0) => TaskState::Complete,
        _ => TaskState::Failed,
    }
}

/// Fills in how the task ended (after [`Inner::set_state`] set its state).
fn end_status(s: &mut TaskStatus, exited: Option<Exited>) {
    match exited {
        Some(x) => {
            s.exit_code = Some(x.code);
            s.finished_at = Some(x.finished_at);
            if s.state == TaskState::Failed {
                s.error = Some(format!("task: non-zero exit ({})", x.code));
            }
        }
        None => {
            s.error = Some("task: its supervisor was killed; the exit code is lost".into());
        }
    }
}

/// Makes `dir` (and its parents) and restricts it to its owner.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("chmod", dir, e))
}

/// Runs the health probes of a running task until it stops (the supervisor aborts this).
async fn health_loop(
    inner: Arc<Inner>,
    task: Arc<Task>,
    spec: TaskSpec,
    check: HealthCheck,
    pid: u32,
    started: Instant,
) {
    let mut monitor = HealthMonitor::new(&check, started);
    while let Some(due) = monitor.poll_timeout() {
        tokio::time::sleep_until(due.into()).await;
        let Some(timeout) = monitor.poll_probe(Instant::now()) else { continue };
        let (outcome, output) = run_probe(&spec, &check.argv, pid, timeout).await;
        let change = monitor.handle_result(Instant::now(), outcome);
        let _ctl = lock(&task.ctl);
        if task.state() != TaskState::Running {
            return;
        }
        let streak = monitor.failing_streak();
        let apply = |s: &mut TaskStatus| {
            s.failing_streak = streak;
            s.last_probe_output = Some(output);
            if let Some(h) = change {
                s.health = Some(h);
            }
        };
        if let Some(h) = change {
            let _ = shim::write_json(&task.dir, HEALTH_FILE, &h);
            inner.update(&task, EventKind::Health, apply);
        } else {
            task.status.send_modify(apply);
        }
    }
}

/// How a command run inside a task's namespaces ended.
enum InTask {
    Done(std::process::Output),
    TimedOut,
    Failed(String),
}

/// Runs `argv` inside the namespaces of process `pid` with the task's environment; kills its
/// process group after `timeout`.
async fn run_in_task(spec: &TaskSpec, argv: &[String], pid: u32, timeout: Duration) -> InTask {
    let ns = match TaskNamespaces::of_pid(pid) {
        Ok(ns) => ns,
        Err(e) => return InTask::Failed(format!("entering the task's namespaces: {e}")),
    };
    let child = match process::probe_command(spec, argv, ns).spawn() {
        Ok(child) => child,
        Err(e) => return InTask::Failed(format!("{:?}: {e}", argv[0])),
    };
    let child_pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => InTask::Done(out),
        Ok(Err(e)) => InTask::Failed(format!("{:?}: {e}", argv[0])),
        Err(_) => {
            if let Some(p) = child_pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(Pid::from_raw(p), Signal::SIGKILL);
            }
            InTask::TimedOut
        }
    }
}

/// Runs one health probe; returns its outcome and (capped) output.
async fn run_probe(
    spec: &TaskSpec,
    argv: &[String],
    pid: u32,
    timeout: Duration,
) -> (ProbeOutcome, String) {
    match run_in_task(spec, argv, pid, timeout).await {
        InTask::Done(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            if text.len() > PROBE_OUTPUT_CAP {
                let mut cut = PROBE_OUTPUT_CAP;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            let outcome =
                if out.status.success() { ProbeOutcome::Passed } else { ProbeOutcome::Failed };
            (outcome, text)
        }
        InTask::Failed(e) => (ProbeOutcome::Failed, format!("health command {e}")),
        InTask::TimedOut => {
            (ProbeOutcome::TimedOut, format!("Health check exceeded timeout ({timeout:?})"))
        }
    }
}

/// What [`Runtime::exec`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed by one).
    pub exit_code: i32,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

impl Runtime {
    /// Runs `argv` in a running task's network, mount and UTS namespaces with its environment
    /// (like `docker exec`, for `lab exec` and diagnostics); its output is kept in memory. The
    /// command's process group is killed after `timeout`.
    pub async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutput> {
        if argv.first().is_none_or(|p| p.is_empty()) || argv.iter().any(|a| a.contains('\0')) {
            return Err(Error::InvalidSpec {
                field: "argv",
                reason: "empty or contains NUL".into(),
            });
        }
        let task = self.get(id)?;
        let (spec, pid) = {
            let ctl = lock(&task.ctl);
            let st = task.status.borrow();
            match (st.state, st.pid) {
                (TaskState::Running, Some(pid)) => (ctl.spec.clone(), pid),
                (state, _) => {
                    return Err(Error::InvalidState { id: id.to_owned(), state, op: "exec" });
                }
            }
        };
        match run_in_task(&spec, argv, pid, timeout).await {
            InTask::Done(out) => Ok(ExecOutput {
                exit_code: exit_code_of(out.status),
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            InTask::TimedOut => Err(Error::ExecTimeout { id: id.to_owned(), timeout }),
            InTask::Failed(reason) => Err(Error::Exec { id: id.to_owned(), reason }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(prefix: &str) -> RuntimeConfig {
        RuntimeConfig { prefix: prefix.into(), state_dir: "/tmp/x".into(), shim: "/bin/x".into() }
    }

    #[test]
    fn prefix_rules() {
        for bad in ["", "a-", "a-t-b", "has space", &"p".repeat(33)] {
            assert!(
                matches!(config(bad).validate(), Err(Error::InvalidConfig { field: "prefix", .. })),
                "{bad:?}"
            );
        }
        for good in ["n1", "lab-node1", "x_y"] {
            config(good).validate().unwrap();
        }
        let rel = RuntimeConfig { state_dir: "rel".into(), ..config("n1") };
        assert!(matches!(rel.validate(), Err(Error::InvalidConfig { field: "state_dir", .. })));
        let rel = RuntimeConfig { shim: "shoal".into(), ..config("n1") };
        assert!(matches!(rel.validate(), Err(Error::InvalidConfig { field: "shim", .. })));
    }

    #[test]
    fn owns_only_its_namespaces() {
        let inner = Inner {
            prefix: "a".into(),
            tasks_dir: PathBuf::new(),
            shim: PathBuf::new(),
            tasks: Mutex::new(HashMap::new()),
            events: broadcast::channel(1).0,
        };
        assert!(inner.is_ours("a-t-abc123"));
        assert!(!inner.is_ours("a-t-"));
        assert!(!inner.is_ours("ab-t-abc"));
        assert!(!inner.is_ours("a-t-t-abc"), "belongs to a node prefixed a-t");
        assert!(!inner.is_ours("b-t-abc"));
    }
}
