//! `shoal run` without `-d` and `shoal logs -f`: the CLI stays with a standalone task, its
//! output on this terminal (the task's stdout on stdout, its stderr on stderr), until it ends.
//! The agent's side is `api::attach`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use shoal_runtime::Stream;
use std::io::Write;

use tokio::signal::unix::{SignalKind, signal};

use crate::api::attach::{Demux, WaitResponse};
use crate::api::client::Host;

/// How long the output may trail the task's end: the agent closes the stream once the task's
/// pipes are drained, which is before it reports the end, so this is only for a stream cut.
const OUTPUT_TRAIL: Duration = Duration::from_secs(5);

/// Shows the task's output until it ends and returns its exit code, as `docker run` does.
/// SIGINT or SIGTERM (Ctrl-C) stops the task and `run` still waits for its end; a second one
/// leaves at once, the agent stopping the task on its own. With `rm` the task is removed once
/// it ended (by `run` itself, so its exit code and output are read before it goes).
pub async fn run_attached(host: &Host, name: &str, rm: bool) -> anyhow::Result<ExitCode> {
    let output = tokio::spawn(copy_output(host.clone(), format!("/containers/{name}/attach")));
    let wait_path = format!("/containers/{name}/wait");
    let wait = host.post_json::<_, WaitResponse>(&wait_path, &());
    tokio::pin!(wait);
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut stopping = false;
    let ended = loop {
        let sig = tokio::select! {
            r = &mut wait => break r,
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        if stopping {
            output.abort();
            return Ok(ExitCode::from(sig));
        }
        stopping = true;
        let stop = host.post_json::<_, ()>(&format!("/containers/{name}/stop"), &()).await;
        if let Err(e) = stop {
            eprintln!("{}", crate::cli::describe(&e));
        }
    };
    let ended = match ended {
        Ok(w) => w,
        Err(e) => {
            output.abort();
            return Err(e);
        }
    };
    match tokio::time::timeout(OUTPUT_TRAIL, output).await {
        Ok(Ok(Err(e))) => eprintln!("{}", crate::cli::describe(&e)),
        Ok(_) => {}
        Err(_) => eprintln!("Error: the task's output did not end with it; some may be missing"),
    }
    if rm && let Err(e) = host.delete(&format!("/containers/{name}?force=true")).await {
        eprintln!("{}", crate::cli::describe(&e));
    }
    if let Some(error) = &ended.error {
        eprintln!("Error response from daemon: {error}");
    }
    Ok(ExitCode::from(u8::try_from(ended.status_code).unwrap_or(255)))
}

/// `shoal logs -f`: the task's output so far, then as it comes, until the task ends.
pub async fn follow_logs(host: &Host, name: &str) -> anyhow::Result<()> {
    copy_output(host.clone(), format!("/containers/{name}/attach")).await
}

/// Copies a multiplexed output stream to stdout and stderr until it ends.
async fn copy_output(host: Host, path: String) -> anyhow::Result<()> {
    let mut body = host.post_stream(&path).await?;
    let mut demux = Demux::default();
    // Plain blocking writes: a terminal takes a line at once, and the order stays the task's.
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the task's output")?;
        let Ok(data) = frame.into_data() else { continue };
        demux.push(&data);
        while let Some((stream, payload)) = demux.next_frame() {
            let out: &mut dyn Write = match stream {
                Stream::Stdout => &mut stdout,
                Stream::Stderr => &mut stderr,
            };
            out.write_all(&payload)?;
            out.flush()?;
        }
    }
    if demux.is_partial() {
        anyhow::bail!("the task's output was cut short");
    }
    Ok(())
}
