//! `/containers/{name}/attach` and `/containers/{name}/wait`: what `shoal run` without `-d`
//! (and `shoal logs -f`) needs to stay with a standalone task until it ends, as Docker's API has
//! them. Attach streams the task's output in Docker's multiplexed framing, from its first line
//! until the task has ended; wait answers once the task has ended, with its exit code.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use shoal_runtime::{LogFollower, LogLine, Logs, Stream, TaskStatus};
use shoal_scheduler::TaskState;
use tokio::sync::watch;

use super::ApiState;
use super::containers::own_container;
use super::swarm::bad_request;
use crate::engine::records::TaskRecord;

/// Docker's content type for an attach stream of a task without a terminal.
pub const MULTIPLEXED: &str = "application/vnd.docker.multiplexed-stream";

/// How often the handlers look again while a task has not reached this node's runtime yet.
const RUNTIME_RECHECK: Duration = Duration::from_millis(50);
/// How often they ask the store meanwhile.
const STORE_RECHECK: Duration = Duration::from_secs(1);

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/containers/{name}/attach", post(container_attach))
        .route("/containers/{name}/wait", post(container_wait))
}

/// `POST /containers/{name}/wait`: how the task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitResponse {
    /// The task's exit code, or what a shell would have said when it never ran (126, 127) or
    /// was stopped before it started.
    pub status_code: i32,
    /// Why it did not run, when it did not.
    #[serde(default)]
    pub error: Option<String>,
}

/// The exit status `run` returns for a task that ended in `state`: its exit code when it ran;
/// else 127 for a program that does not exist and 126 for one that may not be run (as a shell
/// says), 143 for one stopped before it started (as SIGTERM would), 125 for anything else
/// (Docker's code for "the daemon could not run it").
pub fn exit_status(state: TaskState, exit_code: Option<i32>, error: Option<&str>) -> i32 {
    if let Some(code) = exit_code {
        return code;
    }
    match error {
        Some(e) if e.contains("not found") || e.contains("no such file") => 127,
        Some(e) if e.to_lowercase().contains("permission denied") => 126,
        None if state == TaskState::Shutdown => 143,
        _ => 125,
    }
}

/// One frame of Docker's multiplexed stream: stream byte (1 stdout, 2 stderr), three zero
/// bytes, the payload's length as a big-endian u32, the payload.
pub fn frame(stream: Stream, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.push(match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    });
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Splits a multiplexed stream back into frames, whatever pieces it arrives in.
#[derive(Debug, Default)]
pub struct Demux {
    buf: Vec<u8>,
}

impl Demux {
    /// Adds bytes as they arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived; an unknown stream byte is read as stdout.
    pub fn next_frame(&mut self) -> Option<(Stream, Vec<u8>)> {
        let header: [u8; 8] = self.buf.get(..8)?.try_into().ok()?;
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if self.buf.len() < 8 + len {
            return None;
        }
        let payload = self.buf[8..8 + len].to_vec();
        self.buf.drain(..8 + len);
        let stream = if header[0] == 2 { Stream::Stderr } else { Stream::Stdout };
        Some((stream, payload))
    }

    /// Whether bytes of an unfinished frame are left (the stream was cut short).
    pub fn is_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

fn line_frame(l: &LogLine) -> Bytes {
    let mut payload = l.line.clone().into_bytes();
    payload.push(b'\n');
    frame(l.stream, &payload)
}

/// This node's task called `name` once the runtime has it (`Ok(id)`), or its record if it
/// ended before it got there (`Err`). The runtime is asked often, the store (the leader's, over
/// the network on a worker) once a second: a task waits there only until its addresses are given.
async fn local_task(st: &ApiState, name: &str) -> Result<Result<String, TaskRecord>, Response> {
    let mut t = own_container(st, name).await?.1;
    let mut asked = Instant::now();
    loop {
        let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
        if engine.runtime().inspect(&t.task.id).is_ok() {
            return Ok(Ok(t.task.id));
        }
        if t.task.state.is_terminal() {
            return Ok(Err(t));
        }
        tokio::time::sleep(RUNTIME_RECHECK).await;
        if asked.elapsed() >= STORE_RECHECK {
            t = own_container(st, name).await?.1;
            asked = Instant::now();
        }
    }
}

/// The output of a task as a stream of frames, ending when the task has ended.
struct Output {
    follower: LogFollower,
    logs: Logs,
    status: watch::Receiver<TaskStatus>,
    /// Sequence number of the next line to send.
    next: u64,
    /// Once the task has ended: the lines left to send.
    rest: Option<std::vec::IntoIter<LogLine>>,
}

impl Output {
    /// The next frame, `None` at the end. The log closes when the process's pipes are drained;
    /// a task stopped before it started never opened them, so its ending also ends the stream.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(rest) = self.rest.as_mut() {
                return rest.next().map(|l| line_frame(&l));
            }
            let line = tokio::select! {
                l = self.follower.next() => Some(l),
                _ = self.status.wait_for(|s| s.state.is_terminal()) => None,
            };
            match line {
                Some(l) => {
                    let l = l?;
                    self.next = l.seq + 1;
                    return Some(line_frame(&l));
                }
                None => self.rest = Some(self.logs.since(self.next).into_iter()),
            }
        }
    }
}

async fn container_attach(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let empty = || ([(header::CONTENT_TYPE, MULTIPLEXED)], Body::empty()).into_response();
        let Ok(id) = local_task(&st, &name).await? else { return Ok(empty()) };
        let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
        let rt = engine.runtime();
        // Removed just now: nothing more to show.
        let (Ok(logs), Ok(status)) = (rt.logs(&id), rt.watch(&id)) else { return Ok(empty()) };
        let output = Output { follower: logs.follow(), logs, status, next: 0, rest: None };
        let frames = futures::stream::unfold(output, |mut o| async move {
            o.next_frame().await.map(|f| (Ok::<_, Infallible>(f), o))
        });
        Ok(([(header::CONTENT_TYPE, MULTIPLEXED)], Body::from_stream(frames)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

fn ended(t: TaskRecord) -> Response {
    let error = (t.exit_code.is_none() && !t.message.is_empty()).then_some(t.message);
    let status_code = exit_status(t.task.state, t.exit_code, error.as_deref());
    axum::Json(WaitResponse { status_code, error }).into_response()
}

async fn container_wait(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        loop {
            let id = match local_task(&st, &name).await? {
                Ok(id) => id,
                Err(t) => return Ok(ended(t)),
            };
            // The engine is not held while waiting: an agent leaving the swarm drops it.
            let watched = st.engine.load_full().map(|e| e.runtime().watch(&id));
            if let Some(Ok(mut rx)) = watched {
                // Err: removed meanwhile; the next lookup says so.
                if let Ok(s) = rx.wait_for(|s| s.state.is_terminal()).await
                    && (s.exit_code.is_some() || s.error.is_some())
                {
                    let resp = WaitResponse {
                        status_code: exit_status(
                            TaskState::Failed,
                            s.exit_code,
                            s.error.as_deref(),
                        ),
                        error: s.exit_code.is_none().then(|| s.error.clone()).flatten(),
                    };
                    return Ok(axum::Json(resp).into_response());
                }
            }
            // Stopped before it ran, or removed: the record has the reason, or is gone.
            let (_, t) = own_container(&st, &name).await?;
            if t.task.state.is_terminal() {
                return Ok(ended(t));
            }
            tokio::time::sleep(STORE_RECHECK).await;
        }
    };
    run.await.unwrap_or_else(|r: Response| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&frame(Stream::Stdout, b"out\n"));
        wire.extend_from_slice(&frame(Stream::Stderr, b"err\n"));
        wire.extend_from_slice(&frame(Stream::Stdout, b""));
        assert_eq!(&wire[..8], &[1, 0, 0, 0, 0, 0, 0, 4]);
        for cut in 0..wire.len() {
            let mut d = Demux::default();
            let mut got = Vec::new();
            d.push(&wire[..cut]);
            while let Some(f) = d.next_frame() {
                got.push(f);
            }
            d.push(&wire[cut..]);
            while let Some(f) = d.next_frame() {
                got.push(f);
            }
            assert_eq!(
                got,
                vec![
                    (Stream::Stdout, b"out\n".to_vec()),
                    (Stream::Stderr, b"err\n".to_vec()),
                    (Stream::Stdout, Vec::new())
                ],
                "cut at {cut}"
            );
            assert!(!d.is_partial());
        }
        let mut d = Demux::default();
        d.push(&wire[..10]);
        d.next_frame();
        assert!(d.is_partial());
    }

    #[test]
    fn exit_status_is_the_code_or_what_a_shell_would_say() {
        assert_eq!(exit_status(TaskState::Failed, Some(3), Some("task: non-zero exit (3)")), 3);
        assert_eq!(exit_status(TaskState::Complete, Some(0), None), 0);
        assert_eq!(
            exit_status(TaskState::Failed, None, Some("executable file not found in $PATH")),
            127
        );
        assert_eq!(exit_status(TaskState::Failed, None, Some("permission denied")), 126);
        assert_eq!(exit_status(TaskState::Shutdown, None, None), 143);
        assert_eq!(exit_status(TaskState::Failed, None, Some("attaching to n: boom")), 125);
    }
}
