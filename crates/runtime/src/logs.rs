//! A task's stdout and stderr, kept line by line in a size-capped ring.
//!
//! [`LogRing`] is the plain core (push, evict the oldest over the cap, read by sequence number).
//! [`Logs`] shares one ring between the pumps that read the task's pipes and any number of
//! readers; [`Logs::follow`] yields the kept lines and then new ones as they come, ending once the
//! task has exited and its pipes are drained (what `service logs -f` needs).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// Longest line kept whole; longer output is split into lines of this size.
pub const MAX_LINE: usize = 16 * 1024;
/// Bytes charged per line on top of its text (timestamp, tag, bookkeeping).
pub const LINE_OVERHEAD: usize = 32;

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of output, without its newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the task's output, from 0, never reused.
    pub seq: u64,
    /// When the runtime read it.
    pub time: SystemTime,
    /// The pipe it came from.
    pub stream: Stream,
    /// The text (invalid UTF-8 replaced).
    pub line: String,
}

/// Lines in order, at most `cap` bytes of them (text + [`LINE_OVERHEAD`] each); the oldest go
/// first. Always keeps the newest line even if it alone exceeds the cap.
#[derive(Debug, Clone)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    bytes: usize,
    cap: usize,
    next_seq: u64,
}

impl LogRing {
    /// An empty ring holding at most `cap` bytes.
    pub fn new(cap: usize) -> LogRing {
        LogRing { lines: VecDeque::new(), bytes: 0, cap, next_seq: 0 }
    }

    /// Appends a line and returns its sequence number.
    pub fn push(&mut self, time: SystemTime, stream: Stream, line: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += line.len() + LINE_OVERHEAD;
        self.lines.push_back(LogLine { seq, time, stream, line });
        while self.bytes > self.cap && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.line.len() + LINE_OVERHEAD;
            }
        }
        seq
    }

    /// Appends a line numbered `seq` elsewhere (the task's shim numbers the lines it writes to
    /// disk). Lines are kept contiguous: a `seq` past the next one drops the kept lines, as if
    /// the missing ones had come and pushed them out; one below it is ignored.
    pub fn push_numbered(&mut self, seq: u64, time: SystemTime, stream: Stream, line: String) {
        if seq < self.next_seq {
            return;
        }
        if seq > self.next_seq {
            self.lines.clear();
            self.bytes = 0;
            self.next_seq = seq;
        }
        self.push(time, stream, line);
    }

    /// Kept lines with `seq >= from`.
    pub fn since(&self, from: u64) -> Vec<LogLine> {
        let first = self.lines.front().map_or(self.next_seq, |l| l.seq);
        let skip = usize::try_from(from.saturating_sub(first)).unwrap_or(usize::MAX);
        self.lines.iter().skip(skip).cloned().collect()
    }

    /// Bytes charged for the kept lines.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of kept lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Sequence number the next line will get (= lines ever pushed).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[derive(Debug)]
struct Shared {
    ring: Mutex<LogRing>,
    /// (next sequence number, closed); bumped on every push so followers wake up.
    tick: watch::Sender<(u64, bool)>,
}

/// A task's log, shared between the runtime and readers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Logs {
    shared: Arc<Shared>,
}

impl Logs {
    /// An empty, open log capped at `cap` bytes.
    pub fn new(cap: usize) -> Logs {
        let (tick, _) = watch::channel((0, false));
        Logs { shared: Arc::new(Shared { ring: Mutex::new(LogRing::new(cap)), tick }) }
    }

    fn ring(&self) -> MutexGuard<'_, LogRing> {
        self.shared.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a line now.
    pub fn push(&self, stream: Stream, line: String) {
        let next = {
            let mut ring = self.ring();
            ring.push(SystemTime::now(), stream, line);
            ring.next_seq()
        };
        self.shared.tick.send_modify(|t| t.0 = next);
    }

    /// Appends a line read back from the task's log file (see [`LogRing::push_numbered`]).
    pub(crate) fn push_numbered(&self, seq: u64, time: SystemTime, stream: Stream, line: String) {
        let next = {
            let mut ring = self.ring();
            ring.push_numbered(seq, time, stream, line);
            ring.next_seq()
        };
        self.shared.tick.send_modify(|t| t.0 = next);
    }

    /// Marks the log finished: followers end after the last line.
    pub fn close(&self) {
        self.shared.tick.send_modify(|t| t.1 = true);
    }

    /// Whether the task's output is complete.
    pub fn is_closed(&self) -> bool {
        self.shared.tick.borrow().1
    }

    /// All kept lines, oldest first.
    pub fn lines(&self) -> Vec<LogLine> {
        self.ring().since(0)
    }

    /// Kept lines with `seq >= from`.
    pub fn since(&self, from: u64) -> Vec<LogLine> {
        self.ring().since(from)
    }

    /// The newest `n` kept lines (`logs --tail n`).
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let ring = self.ring();
        ring.since(ring.next_seq().saturating_sub(n as u64))
    }

    /// Sequence number the next line will get; `follow_from(next_seq())` skips the past.
    pub fn next_seq(&self) -> u64 {
        self.ring().next_seq()
    }

    /// Bytes charged for the kept lines (never above the cap, unless one line alone is).
    pub fn bytes(&self) -> usize {
        self.ring().bytes()
    }

    /// A reader of every kept line and then of new lines as they arrive.
    pub fn follow(&self) -> LogFollower {
        self.follow_from(0)
    }

    /// A reader starting at sequence number `from` (or the oldest kept line after it).
    pub fn follow_from(&self, from: u64) -> LogFollower {
        LogFollower {
            logs: self.clone(),
            next: from,
            pending: VecDeque::new(),
            tick: self.shared.tick.subscribe(),
        }
    }
}

/// Follows a [`Logs`]: see [`LogFollower::next`].
#[derive(Debug)]
pub struct LogFollower {
    logs: Logs,
    next: u64,
    pending: VecDeque<LogLine>,
    tick: watch::Receiver<(u64, bool)>,
}

impl LogFollower {
    /// The next line, waiting for one if needed; `None` once the log is closed and read.
    /// Lines evicted before this reader got to them are skipped.
    pub async fn next(&mut self) -> Option<LogLine> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                self.next = line.seq + 1;
                return Some(line);
            }
            // Mark the current tick seen before reading, so a push after the read wakes us.
            let closed = self.tick.borrow_and_update().1;
            self.pending.extend(self.logs.since(self.next));
            if !self.pending.is_empty() {
                continue;
            }
            if closed || self.tick.changed().await.is_err() {
                self.pending.extend(self.logs.since(self.next));
                if self.pending.is_empty() {
                    return None;
                }
            }
        }
    }

    /// The same as a `futures::Stream`.
    pub fn into_stream(self) -> impl futures::Stream<Item = LogLine> + Send + 'static {
        futures::stream::unfold(self, |mut f| async move { f.next().await.map(|l| (l, f)) })
    }
}

/// Reads `pipe` to its end and pushes its lines into `logs`; lines longer than [`MAX_LINE`]
/// are split, a trailing `\r` is dropped, a last line without newline is kept.
#[cfg(test)]
pub(crate) async fn pump(pipe: impl AsyncRead + Unpin, stream: Stream, logs: Logs) {
    pump_with(pipe, |line| logs.push(stream, line)).await;
}

/// The same, handing each line to `sink` (the task shim writes them to the task's log file).
pub(crate) async fn pump_with(pipe: impl AsyncRead + Unpin, mut sink: impl FnMut(String)) {
    let mut reader = BufReader::new(pipe);
    let mut line: Vec<u8> = Vec::new();
    let mut emit = |line: &mut Vec<u8>| {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        sink(String::from_utf8_lossy(line).into_owned());
        line.clear();
    };
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let room = MAX_LINE - line.len();
        let window = &buf[..buf.len().min(room)];
        let used = match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&window[..i]);
                emit(&mut line);
                i + 1
            }
            None => {
                line.extend_from_slice(window);
                if line.len() >= MAX_LINE {
                    emit(&mut line);
                }
                window.len()
            }
        };
        reader.consume(used);
    }
    if !line.is_empty() {
        emit(&mut line);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ring_evicts_oldest_over_cap() {
        let mut r = LogRing::new(10 * (LINE_OVERHEAD + 4));
        for i in 0..25 {
            r.push(SystemTime::now(), Stream::Stdout, format!("l{i:03}"));
        }
        assert_eq!(r.len(), 10);
        let all = r.since(0);
        assert_eq!(all.first().unwrap().line, "l015");
        assert_eq!(all.last().unwrap().line, "l024");
        assert_eq!(r.since(20).len(), 5);
        assert_eq!(r.since(20)[0].seq, 20);
        assert!(r.since(99).is_empty());
    }

    #[test]
    fn numbered_lines_stay_contiguous() {
        let mut r = LogRing::new(1 << 20);
        let t = SystemTime::now();
        r.push_numbered(0, t, Stream::Stdout, "a".into());
        r.push_numbered(0, t, Stream::Stdout, "again".into());
        r.push_numbered(5, t, Stream::Stdout, "f".into());
        r.push_numbered(6, t, Stream::Stdout, "g".into());
        let kept: Vec<(u64, String)> = r.since(0).into_iter().map(|l| (l.seq, l.line)).collect();
        assert_eq!(kept, [(5, "f".to_string()), (6, "g".to_string())]);
        assert_eq!(r.since(6).len(), 1);
        assert_eq!(r.next_seq(), 7);
    }

    #[test]
    fn ring_keeps_one_oversized_line() {
        let mut r = LogRing::new(40);
        r.push(SystemTime::now(), Stream::Stderr, "x".repeat(100));
        assert_eq!(r.len(), 1);
        r.push(SystemTime::now(), Stream::Stderr, "y".into());
        assert_eq!(r.since(0).iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["y"]);
    }

    proptest! {
        #[test]
        fn ring_respects_cap_and_order(lens in proptest::collection::vec(0usize..200, 1..300), cap in 64usize..4000) {
            let mut r = LogRing::new(cap);
            for (i, n) in lens.iter().enumerate() {
                r.push(SystemTime::now(), Stream::Stdout, "a".repeat(*n));
                prop_assert_eq!(r.next_seq(), i as u64 + 1);
            }
            prop_assert!(r.bytes() <= cap || r.len() == 1);
            let kept = r.since(0);
            prop_assert_eq!(kept.last().unwrap().seq, lens.len() as u64 - 1);
            prop_assert!(kept.windows(2).all(|w| w[1].seq == w[0].seq + 1));
            prop_assert_eq!(kept.iter().map(|l| l.line.len() + LINE_OVERHEAD).sum::<usize>(), r.bytes());
        }
    }

    proptest! {
        #[test]
        fn pump_keeps_every_byte(chunks in proptest::collection::vec((0usize..(MAX_LINE + 100), any::<bool>()), 0..6)) {
            let mut input = Vec::new();
            for (n, newline) in &chunks {
                input.extend(std::iter::repeat_n(b'q', *n));
                if *newline {
                    input.push(b'\n');
                }
            }
            let logs = Logs::new(1 << 24);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(pump(&input[..], Stream::Stdout, logs.clone()));
            let lines = logs.lines();
            prop_assert!(lines.iter().all(|l| l.line.len() <= MAX_LINE && !l.line.contains('\n')));
            let text: usize = lines.iter().map(|l| l.line.len()).sum();
            let newlines = input.iter().filter(|&&b| b == b'\n').count();
            prop_assert_eq!(text, input.len() - newlines);
        }
    }

    #[tokio::test]
    async fn pump_splits_lines() {
        let logs = Logs::new(1 << 20);
        let mut input = b"one\r\ntwo\n\nthree".to_vec();
        input.extend(std::iter::repeat_n(b'z', MAX_LINE + 5));
        input.extend_from_slice(b"\n\xff\xfeend");
        pump(&input[..], Stream::Stdout, logs.clone()).await;
        let lines: Vec<String> = logs.lines().into_iter().map(|l| l.line).collect();
        assert_eq!(lines[..3], ["one", "two", ""]);
        assert_eq!(lines[3].len(), MAX_LINE);
        assert!(lines[3].starts_with("threezz"));
        assert_eq!(lines[4], "z".repeat(10));
        assert_eq!(lines[5], "\u{fffd}\u{fffd}end");
        assert_eq!(lines.len(), 6);
    }

    #[tokio::test]
    async fn follower_sees_old_then_new_then_ends() {
        let logs = Logs::new(1 << 20);
        logs.push(Stream::Stdout, "a".into());
        let mut f = logs.follow();
        assert_eq!(f.next().await.unwrap().line, "a");
        assert_eq!(logs.tail(5).len(), 1);
        assert_eq!(logs.tail(0).len(), 0);
        let writer = logs.clone();
        let h = tokio::spawn(async move {
            for s in ["b", "c"] {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                writer.push(Stream::Stderr, s.into());
            }
            writer.close();
        });
        let b = f.next().await.unwrap();
        assert_eq!((b.line.as_str(), b.stream, b.seq), ("b", Stream::Stderr, 1));
        assert_eq!(f.next().await.unwrap().line, "c");
        assert_eq!(f.next().await, None);
        h.await.unwrap();
        assert_eq!(logs.tail(2).iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        let mut late = logs.follow_from(logs.next_seq());
        assert_eq!(late.next().await, None, "closed and nothing new");
    }
}
