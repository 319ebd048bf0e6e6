//! The task supervisor ("shim"): one small process per task, so a task outlives the agent that
//! started it (a clean stop, `kill -9`, an upgrade) and a restarted agent adopts it.
//!
//! The shim is the agent's own binary re-executed as `<binary> task-shim <task dir>`
//! ([`ARG`]; the agent re-executes `/proc/self/exe`, which stays valid when the file on disk is
//! replaced by an upgrade). It is a fresh, single-threaded process, so the namespace setup of
//! `crate::process::task_command` runs in its forked child exactly as it did in the agent's.
//!
//! # The task directory (the whole protocol between agent and shim)
//!
//! Everything lives in `<state_dir>/tasks/<id>/` (mode 0700, files 0600):
//!
//! - `launch.json` (`Launch`), written by the agent before it starts the shim: the spec,
//!   the resolved program, the namespace name and the files to bind-mount;
//! - `running.json` (`Running`), written by the shim once the task runs: its own pid and start
//!   time (so a reused pid is never taken for it) and the task's pid, which leads the task's
//!   process group (stop signals go there, whoever sends them);
//! - `log.json` and `log.1.json`: the task's stdout and stderr, one JSON `FileLine` per line;
//!   when `log.json` passes the spec's `log_cap` it is renamed to `log.1.json` (replacing the
//!   older one) and a new one begun, so the disk holds at most about two caps;
//! - `exit.json` (`Exited`), written (atomically) when the task has ended, everything left in
//!   its namespace is killed and its output is on disk; then the shim exits.
//!
//! The shim tells the agent that started it the task's pid (or why it could not start) in one
//! JSON line on its stdout, then never writes there again, so an agent that is gone costs it
//! nothing. It runs in its own session (`setsid`), so signals to the agent's process group or
//! session do not reach it, and it ignores SIGTERM/SIGINT/SIGHUP: only the task's end ends it
//! (and SIGKILL, e.g. `lab down`).

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use shoal_netns::NetNs;
use tokio::signal::unix::{SignalKind, signal};

use crate::logs::{self, Stream};
use crate::spec::TaskSpec;

/// The first argument that makes the binary a task shim.
pub const ARG: &str = "task-shim";

pub(crate) const LAUNCH: &str = "launch.json";
pub(crate) const RUNNING: &str = "running.json";
pub(crate) const EXIT: &str = "exit.json";
pub(crate) const LOG: &str = "log.json";
pub(crate) const OLD_LOG: &str = "log.1.json";

/// How long the shim waits for processes in the namespace to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the output pumps may take to drain after the task's processes are gone.
const PUMP_DRAIN: Duration = Duration::from_secs(2);

/// What the agent hands the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Launch {
    pub spec: TaskSpec,
    pub exe: PathBuf,
    pub netns: String,
    pub resolv: PathBuf,
    pub hosts: PathBuf,
    pub created_at: SystemTime,
}

/// A running task, as its shim records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Running {
    pub shim_pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): with the pid, names one process.
    pub shim_start: u64,
    pub task_pid: u32,
    pub started_at: SystemTime,
}

/// How the task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Exited {
    /// Exit code, 128 + signal when killed by one.
    pub code: i32,
    pub finished_at: SystemTime,
}

/// One line of output on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileLine {
    /// Position in the task's output, from 0.
    pub seq: u64,
    pub time: SystemTime,
    pub stream: Stream,
    pub line: String,
}

/// The shim's one line to the agent that started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Hello {
    /// The task runs with this pid.
    Started(u32),
    /// It could not be started: the OS error number (when there is one) and the message.
    Failed(Option<i32>, String),
}

/// The start time of process `pid` (see [`Running::shim_start`]), if it exists.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    if fields.next() == Some("Z") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Writes `value` as JSON to `dir/name` through a temporary file and a rename, mode 0600, so a
/// reader sees the whole file or none.
pub(crate) fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Reads `dir/name` as JSON; `None` when it is missing or unreadable.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Option<T> {
    let bytes = std::fs::read(dir.join(name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The task's log on disk, rotated at the cap.
struct LogFile {
    dir: PathBuf,
    file: std::fs::File,
    /// What the lines in `file` count against the cap (text plus the per-line overhead).
    size: u64,
    cap: u64,
    next_seq: u64,
}

impl LogFile {
    fn open(dir: &Path, cap: usize) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(LOG))?;
        Ok(LogFile { dir: dir.to_owned(), file, size: 0, cap: cap as u64, next_seq: 0 })
    }

    fn push(&mut self, stream: Stream, line: String) {
        // Counted as the in-memory log counts it, so the two files always hold a full log.
        let charge = (line.len() + logs::LINE_OVERHEAD) as u64;
        let rec = FileLine { seq: self.next_seq, time: SystemTime::now(), stream, line };
        self.next_seq += 1;
        let Ok(mut bytes) = serde_json::to_vec(&rec) else { return };
        bytes.push(b'\n');
        if self.size > 0 && self.size + charge > self.cap {
            let rotated = std::fs::rename(self.dir.join(LOG), self.dir.join(OLD_LOG))
                .and_then(|()| LogFile::open(&self.dir, self.cap as usize));
            if let Ok(fresh) = rotated {
                *self = LogFile { next_seq: self.next_seq, ..fresh };
            }
        }
        // One write per line on an O_APPEND file: a reader never sees two lines interleaved.
        if self.file.write_all(&bytes).is_ok() {
            self.size += charge;
        }
    }
}

/// The shim's entry point: `args` are what follows [`ARG`] (the task directory). Returns the
/// process exit code.
pub fn main(mut args: impl Iterator<Item = OsString>) -> std::process::ExitCode {
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: shoal {ARG} TASK_DIR");
        return std::process::ExitCode::from(64);
    };
    // Not the agent's session or process group: nothing aimed at those reaches the task.
    let _ = nix::unistd::setsid();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            hello(&Hello::Failed(e.raw_os_error(), format!("starting the task supervisor: {e}")));
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        // Handled (and never acted on) rather than ignored: an ignored signal would stay ignored
        // in the task across exec, a handled one is reset to its default there.
        let _held: Vec<_> =
            [SignalKind::terminate(), SignalKind::interrupt(), SignalKind::hangup()]
                .into_iter()
                .filter_map(|k| signal(k).ok())
                .collect();
        supervise(&dir).await
    })
}

fn hello(h: &Hello) {
    let mut out = std::io::stdout().lock();
    if let Ok(mut line) = serde_json::to_vec(h) {
        line.push(b'\n');
        let _ = out.write_all(&line).and_then(|()| out.flush());
    }
}

async fn supervise(dir: &Path) -> std::process::ExitCode {
    let fail = |errno: Option<i32>, msg: String| {
        hello(&Hello::Failed(errno, msg));
        std::process::ExitCode::FAILURE
    };
    let Some(launch) = read_json::<Launch>(dir, LAUNCH) else {
        return fail(None, format!("reading {}", dir.join(LAUNCH).display()));
    };
    let log = match LogFile::open(dir, launch.spec.log_cap) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(e) => return fail(e.raw_os_error(), format!("opening the task's log: {e}")),
    };
    let spawned = NetNs::open(&launch.netns)
        .map_err(std::io::Error::other)
        .and_then(|ns| ns.as_fd().try_clone_to_owned())
        .and_then(|fd| {
            crate::process::task_command(
                &launch.spec,
                &launch.exe,
                fd,
                &launch.resolv,
                &launch.hosts,
            )
        })
        .and_then(|mut cmd| cmd.spawn());
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(e.raw_os_error(), e.to_string()),
    };
    let task_pid = child.id().unwrap_or(0);
    let me = std::process::id();
    let running = Running {
        shim_pid: me,
        shim_start: start_time(me).unwrap_or(0),
        task_pid,
        started_at: SystemTime::now(),
    };
    if let Err(e) = write_json(dir, RUNNING, &running) {
        // Without the record no later agent could find the task: do not leave it running.
        if let Ok(pg) = i32::try_from(task_pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pg),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait().await;
        return fail(e.raw_os_error(), format!("recording the running task: {e}"));
    }
    hello(&Hello::Started(task_pid));

    let pumps: Vec<_> = [
        child.stdout.take().map(|p| spawn_pump(p, Stream::Stdout, log.clone())),
        child.stderr.take().map(|p| spawn_pump(p, Stream::Stderr, log.clone())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let code = match child.wait().await {
        Ok(status) => status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        Err(_) => -1,
    };
    // Nothing of a task outlives its main process, as when a container's PID namespace goes.
    if let Ok(pg) = i32::try_from(task_pid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pg),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let netns = launch.netns.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(ns) = NetNs::open(&netns) {
            shoal_netns::kill_all_in(&ns, KILL_WAIT);
        }
    })
    .await;
    for mut p in pumps {
        if tokio::time::timeout(PUMP_DRAIN, &mut p).await.is_err() {
            p.abort();
        }
    }
    let _ = log.lock().unwrap_or_else(|e| e.into_inner()).file.sync_all();
    let _ = write_json(dir, EXIT, &Exited { code, finished_at: SystemTime::now() });
    std::process::ExitCode::SUCCESS
}

fn spawn_pump(
    pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    stream: Stream,
    log: Arc<Mutex<LogFile>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(logs::pump_with(pipe, move |line| {
        log.lock().unwrap_or_else(|e| e.into_inner()).push(stream, line);
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn own_start_time_is_read() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t), "stable for one process");
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn log_file_rotates_at_the_cap() {
        let dir = std::env::temp_dir().join(format!("shoal-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = LogFile::open(&dir, 1024).unwrap();
        for i in 0..40 {
            log.push(Stream::Stdout, format!("line {i:03} {}", "x".repeat(40)));
        }
        let cur = std::fs::read_to_string(dir.join(LOG)).unwrap();
        let old = std::fs::read_to_string(dir.join(OLD_LOG)).unwrap();
        let charged = |t: &str| {
            t.lines()
                .map(|l| {
                    serde_json::from_str::<FileLine>(l).unwrap().line.len() + logs::LINE_OVERHEAD
                })
                .sum::<usize>()
        };
        assert!(charged(&cur) <= 1024 && charged(&old) <= 1024);
        assert!(charged(&cur) + charged(&old) >= 1024, "a full log is on disk");
        let last: FileLine = serde_json::from_str(cur.lines().last().unwrap()).unwrap();
        assert!(last.line.starts_with("line 039"));
        let first_old: FileLine = serde_json::from_str(old.lines().next().unwrap()).unwrap();
        let first_cur: FileLine = serde_json::from_str(cur.lines().next().unwrap()).unwrap();
        let n = |l: &FileLine| l.line[5..8].parse::<u32>().unwrap();
        assert_eq!(n(&first_old) + old.lines().count() as u32, n(&first_cur), "no line lost");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
