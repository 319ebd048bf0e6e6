//! The agent's side of a task shim (see [`crate::shim`]): starting one, waiting for it (as its
//! parent, or by pid and start time once adopted from an earlier agent), and copying the task's
//! log file into its in-memory [`Logs`].

use std::io::{BufRead, BufReader, Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::logs::Logs;
use crate::shim::{self, FileLine, Hello, LOG, OLD_LOG};

/// How often an adopted shim is checked for, and the log file for new lines.
const POLL: Duration = Duration::from_millis(100);
/// How long a shim may take to start the task and say so.
const HELLO_WAIT: Duration = Duration::from_secs(30);

/// A task's shim: our child, or one an earlier agent started.
#[derive(Debug)]
pub(crate) enum Shim {
    Child(tokio::process::Child),
    Adopted { pid: u32, start: u64 },
}

impl Shim {
    /// Waits until the shim has exited (and so the task has ended and its status is on disk,
    /// unless the shim itself was killed).
    pub(crate) async fn wait(self) {
        match self {
            Shim::Child(mut c) => {
                let _ = c.wait().await;
            }
            Shim::Adopted { pid, start } => {
                while shim::start_time(pid) == Some(start) {
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }
}

/// Starts `<program> task-shim <dir>` (where `launch.json` waits) and waits for its word:
/// the task's pid, or why it could not start.
pub(crate) async fn spawn(program: &Path, id: &str, dir: &Path) -> Result<(Shim, u32)> {
    let spawn_err = |source| Error::Spawn { id: id.to_owned(), program: program.into(), source };
    let mut child = tokio::process::Command::new(program)
        .arg(shim::ARG)
        .arg(dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(spawn_err)?;
    let Some(out) = child.stdout.take() else {
        return Err(spawn_err(std::io::Error::other("the task shim has no stdout")));
    };
    let mut line = String::new();
    let mut out = tokio::io::BufReader::new(out);
    let read = out.read_line(&mut line);
    let said = match tokio::time::timeout(HELLO_WAIT, read).await {
        Ok(Ok(_)) => serde_json::from_str::<Hello>(line.trim()).ok(),
        _ => None,
    };
    match said {
        Some(Hello::Started(pid)) => Ok((Shim::Child(child), pid)),
        Some(Hello::Failed(errno, msg)) => {
            let _ = child.wait().await;
            Err(spawn_err(match errno {
                Some(n) => std::io::Error::from_raw_os_error(n),
                None => std::io::Error::other(msg),
            }))
        }
        None => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(spawn_err(std::io::Error::other(format!(
                "the task shim {} did not report the task's start",
                program.display()
            ))))
        }
    }
}

/// Copies the lines of the task's log files in `dir` into `logs` as the shim writes them, the
/// older file first; once `done` is true (the shim has exited) it reads to the end, closes
/// `logs` and returns.
pub(crate) async fn tail(dir: PathBuf, logs: Logs, mut done: watch::Receiver<bool>) {
    let mut partial = Vec::new();
    if let Ok(f) = std::fs::File::open(dir.join(OLD_LOG)) {
        read_lines(&mut BufReader::new(f), &logs, &mut partial);
        partial.clear();
    }
    let mut cur: Option<(BufReader<std::fs::File>, u64)> = None;
    loop {
        let finished = *done.borrow_and_update();
        if cur.is_none() {
            cur = std::fs::File::open(dir.join(LOG))
                .and_then(|f| Ok((f.metadata()?.ino(), f)))
                .ok()
                .map(|(ino, f)| (BufReader::new(f), ino));
        }
        if let Some((reader, ino)) = &mut cur {
            read_lines(reader, &logs, &mut partial);
            let now = std::fs::metadata(dir.join(LOG)).map(|m| m.ino()).ok();
            if now.is_some() && now != Some(*ino) {
                // Rotated: what was written to the old file before the rename is read first.
                read_lines(reader, &logs, &mut partial);
                partial.clear();
                cur = None;
                continue;
            }
        }
        if finished {
            break;
        }
        tokio::select! {
            _ = done.changed() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    logs.close();
}

/// Pushes every whole line `reader` has now; a line still being written stays in `partial`.
fn read_lines(reader: &mut BufReader<impl Read + Seek>, logs: &Logs, partial: &mut Vec<u8>) {
    loop {
        match reader.read_until(b'\n', partial) {
            Ok(0) | Err(_) => return,
            Ok(_) if partial.last() == Some(&b'\n') => {
                if let Ok(l) = serde_json::from_slice::<FileLine>(partial) {
                    logs.push_numbered(l.seq, l.time, l.stream, l.line);
                }
                partial.clear();
            }
            Ok(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;
    use std::time::SystemTime;

    use super::*;
    use crate::logs::Stream;

    fn line(text: &str) -> Vec<u8> {
        let mut v = serde_json::to_vec(&FileLine {
            seq: u64::from(text.as_bytes()[0] - b'a'),
            time: SystemTime::now(),
            stream: Stream::Stdout,
            line: text.into(),
        })
        .unwrap();
        v.push(b'\n');
        v
    }

    #[tokio::test]
    async fn tail_follows_rotation_and_half_written_lines() {
        let dir = std::env::temp_dir().join(format!("shoal-tail-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(OLD_LOG), line("a")).unwrap();
        let mut f = std::fs::File::create(dir.join(LOG)).unwrap();
        f.write_all(&line("b")).unwrap();
        let half = line("c");
        f.write_all(&half[..4]).unwrap();
        let logs = Logs::new(1 << 20);
        let (done, rx) = watch::channel(false);
        let h = tokio::spawn(tail(dir.clone(), logs.clone(), rx));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = |l: &Logs| l.lines().into_iter().map(|l| l.line).collect::<Vec<_>>();
        assert_eq!(text(&logs), ["a", "b"], "the half line waits");
        f.write_all(&half[4..]).unwrap();
        std::fs::rename(dir.join(LOG), dir.join(OLD_LOG)).unwrap();
        std::fs::write(dir.join(LOG), line("d")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        done.send(true).unwrap();
        h.await.unwrap();
        assert_eq!(text(&logs), ["a", "b", "c", "d"]);
        assert!(logs.is_closed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
