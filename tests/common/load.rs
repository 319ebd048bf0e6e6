//! Requests as a user's client sends them, and a load loop that keeps sending them while a test
//! restarts, rolls or breaks the cluster, counting what failed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `curl -s -m SECS URL` from this host: the body, "" when nothing answers in time.
pub fn curl(url: &str, secs: u32) -> String {
    let out = Command::new("curl").args(["-s", "-m", &secs.to_string(), url]).output();
    out.map(|o| super::lossy(&o.stdout)).unwrap_or_default()
}

/// One `GET /` on a fresh connection with `Connection: close`: the whole answer if it is a
/// 200, else what went wrong. Each step waits at most `limit`.
pub fn get_ok(to: SocketAddr, host: &str, limit: Duration) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect_timeout(&to, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(answer)
    } else {
        Err(format!("answer: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(60)])))
    }
}

/// Requests sent and failed so far, and the first failures (time into the run, what went wrong).
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// A client loop running until stopped or dropped: `clients` threads, each sending one request
/// after another with `pause` between them.
pub struct Load {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts the loop. `request(n)` sends the `n`th request (counted over all clients) and
    /// says whether it was answered as it should be.
    pub fn start<F>(clients: usize, pause: Duration, request: F) -> Load
    where
        F: Fn(u64) -> Result<(), String> + Send + Sync + 'static,
    {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let request = Arc::new(request);
        let t0 = Instant::now();
        eprintln!(
            "load started at {:?} (errors say seconds from then)",
            std::time::SystemTime::now()
        );
        let threads = (0..clients)
            .map(|_| {
                let (counts, stop, request) = (counts.clone(), stop.clone(), request.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let n = counts.sent.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = request(n) {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            let mut errs = counts.errors.lock().unwrap_or_else(|p| p.into_inner());
                            if errs.len() < 20 {
                                errs.push(format!("{:.2}s: {e}", t0.elapsed().as_secs_f64()));
                            }
                        }
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load { counts, stop, threads }
    }

    /// (sent, failed) so far.
    pub fn now(&self) -> (u64, u64) {
        (self.counts.sent.load(Ordering::Relaxed), self.counts.failed.load(Ordering::Relaxed))
    }

    /// The first failures, each with its time into the run.
    pub fn errors(&self) -> Vec<String> {
        self.counts.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the clients, waits for their last request; (sent, failed) in all.
    pub fn finish(mut self) -> (u64, u64) {
        self.join();
        self.now()
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.join();
    }
}
