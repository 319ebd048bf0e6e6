//! The tokio driver: [`Runtime`] owns the tasks of one node, their namespaces, state
//! directories, processes, log pumps and health probes.

mod config;
mod probe;
mod task;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use shoal_netns::NetNs;
use tokio::sync::{broadcast, watch};

use crate::error::{Error, Result};
use crate::logs::Logs;
use crate::process::{self};
use crate::shim::{self, Exited, Launch, Running};
use crate::spec::{TaskSpec, short_id};
use crate::state::{EventKind, Health, TaskEvent, TaskState, TaskStatus};
use crate::supervisor::{self, Shim};

pub use self::config::{MAX_PREFIX, RuntimeConfig};
pub use self::probe::ExecOutput;
use self::probe::{InTask, exit_code_of, run_in_task};
use self::task::{
    Ctl, Inner, Task, delete_task_objects, end_state, end_status, follow, lock, prepare,
    private_dir, undo_prepare, wait_terminal, write_files,
};

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

/// The task runner of one node. Cheap to clone; all clones share the tasks.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
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
