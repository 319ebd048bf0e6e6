//! One task as the runtime holds it (its control state and status channel) and the steps of
//! its life the runtime runs: preparing its namespace and directory, following its shim,
//! supervising it to its end, and cleaning up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use shoal_netns::NetNs;
use tokio::sync::{broadcast, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Error, Result};
use crate::logs::Logs;
use crate::shim::{self, Exited};
use crate::spec::TaskSpec;
use crate::state::{EventKind, Health, TaskEvent, TaskState, TaskStatus};
use crate::supervisor::{self, Shim};

use super::probe::health_loop;
use super::{KILL_WAIT, TAIL_DRAIN};

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) prefix: String,
    pub(super) tasks_dir: PathBuf,
    pub(super) shim: PathBuf,
    pub(super) tasks: Mutex<HashMap<String, Arc<Task>>>,
    pub(super) events: broadcast::Sender<TaskEvent>,
}

#[derive(Debug)]
pub(super) struct Task {
    pub(super) id: String,
    pub(super) netns: String,
    pub(super) dir: PathBuf,
    pub(super) logs: Logs,
    pub(super) status: watch::Sender<TaskStatus>,
    pub(super) ctl: Mutex<Ctl>,
}

/// Mutable control state; every state transition happens with this lock held, so a task's
/// events go out in order.
#[derive(Debug)]
pub(super) struct Ctl {
    pub(super) spec: TaskSpec,
    pub(super) exe: Option<PathBuf>,
    pub(super) pgid: Option<i32>,
    pub(super) stop_requested: bool,
    pub(super) health: Option<AbortHandle>,
    /// The namespace of the ended task was deleted ([`Runtime::release_netns`](super::Runtime::release_netns)).
    pub(super) released: bool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Task {
    pub(super) fn state(&self) -> TaskState {
        self.status.borrow().state
    }

    pub(super) fn status(&self) -> TaskStatus {
        self.status.borrow().clone()
    }
}

impl Inner {
    /// Applies `f` to the task's status and broadcasts the result. Call with `ctl` held.
    pub(super) fn update(&self, task: &Task, kind: EventKind, f: impl FnOnce(&mut TaskStatus)) {
        task.status.send_modify(f);
        let _ = self.events.send(TaskEvent { kind, status: task.status() });
    }

    pub(super) fn set_state(&self, task: &Task, state: TaskState, f: impl FnOnce(&mut TaskStatus)) {
        self.update(task, EventKind::State, |s| {
            s.state = state;
            if state.is_terminal() {
                s.finished_at = Some(SystemTime::now());
                s.pid = None;
            }
            f(s);
        });
    }

    pub(super) fn is_ours(&self, netns: &str) -> bool {
        netns.strip_prefix(&self.prefix).and_then(|rest| rest.strip_prefix("-t-")).is_some_and(
            |short| !short.is_empty() && short.bytes().all(|b| b.is_ascii_alphanumeric()),
        )
    }
}

pub(super) async fn wait_terminal(rx: &mut watch::Receiver<TaskStatus>) -> Option<TaskStatus> {
    rx.wait_for(|s| s.state.is_terminal()).await.ok().map(|s| s.clone())
}

/// Makes the state directory and the namespace with `lo` up.
pub(super) async fn prepare(task: &Task) -> Result<()> {
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

pub(super) fn undo_prepare(task: &Task) {
    if let Err(e) = delete_task_objects(&task.netns, &task.dir) {
        tracing::warn!(task = %task.id, "cleanup after failed create: {e}");
    }
}

/// Kills every process in the namespace, deletes it and removes `dir` (if not empty).
pub(super) fn delete_task_objects(netns: &str, dir: &Path) -> Result<()> {
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
pub(super) fn write_files(dir: &Path, spec: &TaskSpec) -> Result<(PathBuf, PathBuf)> {
    let resolv = dir.join("resolv.conf");
    let hosts = dir.join("hosts");
    std::fs::write(&resolv, spec.resolv_conf_text()).map_err(|e| Error::io("write", &resolv, e))?;
    std::fs::write(&hosts, spec.hosts_text()).map_err(|e| Error::io("write", &hosts, e))?;
    Ok((resolv, hosts))
}

/// Marks a task whose shim runs `running` with the task's `pid`, and starts copying its log,
/// waiting for its end and (with a health check) probing it. Call with `ctl` held.
pub(super) fn follow(
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
pub(super) async fn supervise(
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
pub(super) fn end_state(stop_requested: bool, code: Option<i32>) -> TaskState {
    match code {
        _ if stop_requested => TaskState::Shutdown,
        Some(0) => TaskState::Complete,
        _ => TaskState::Failed,
    }
}

/// Fills in how the task ended (after [`Inner::set_state`] set its state).
pub(super) fn end_status(s: &mut TaskStatus, exited: Option<Exited>) {
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
pub(super) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("chmod", dir, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
