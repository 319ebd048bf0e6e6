//! TCP forwarding between two connected sockets: splice(2) through a pooled, sized pipe (no
//! bytes cross into userspace), or a plain copy for small request/response traffic, with
//! half-close, an optional idle timeout and prompt reset.
//!
//! The splice loop: each direction reads into its pipe only when the
//! pipe is empty, so `EAGAIN` on the read always means "socket empty", then drains the pipe
//! completely into the other socket. Readiness comes from tokio (`readable`/`writable` +
//! `try_io`); the pipe ends are never registered with the reactor.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How a connection's bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardMode {
    /// splice(2) through a pipe from the first byte.
    Splice,
    /// read/write through a userspace buffer.
    Copy,
    /// Copy while reads are small; switch a direction to splice once a read fills the buffer
    /// (bulk transfer). The default.
    #[default]
    Auto,
    /// The kernel moves the bytes: both sockets go into a sockmap whose sk_skb program
    /// redirects each one's input to the other's output ([`crate::sockmap`]; an experiment,
    /// measured beside splice by `benches/mesh.rs`).
    #[cfg(feature = "sockmap")]
    Sockmap,
}

/// Size of the copy buffer of one direction (also the Auto threshold).
pub const COPY_BUF: usize = 16 * 1024;

/// A pipe sized for splicing; both ends non-blocking.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// A new pipe resized to `size` bytes (the kernel caps it at `fs.pipe-max-size`; the
    /// real capacity is read back).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let want = i32::try_from(size).unwrap_or(i32::MAX);
        let cap = match fcntl(&w, FcntlArg::F_SETPIPE_SZ(want)) {
            Ok(n) => n,
            Err(_) => fcntl(&w, FcntlArg::F_GETPIPE_SZ)?,
        };
        Ok(Pipe { r, w, cap: usize::try_from(cap).unwrap_or(65536) })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

/// Reusable pipes (and copy buffers) shared by all connections: taking one costs a mutex and
/// a pop, not two syscalls and four fds (or an allocation). Only empty pipes come back.
#[derive(Debug)]
pub struct PipePool {
    size: usize,
    max_idle: usize,
    idle: Mutex<Vec<Pipe>>,
    bufs: Mutex<Vec<Box<[u8]>>>,
    created: AtomicU64,
}

impl PipePool {
    /// A pool of pipes of `size` bytes keeping at most `max_idle` spare.
    pub fn new(size: usize, max_idle: usize) -> Self {
        PipePool {
            size,
            max_idle,
            idle: Mutex::new(Vec::new()),
            bufs: Mutex::new(Vec::new()),
            created: AtomicU64::new(0),
        }
    }

    /// A pipe from the pool, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        if let Some(p) = self.idle.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(p);
        }
        self.created.fetch_add(1, Ordering::Relaxed);
        Pipe::new(self.size)
    }

    /// Returns an empty pipe for reuse.
    pub fn put(&self, p: Pipe) {
        if let Ok(mut v) = self.idle.lock()
            && v.len() < self.max_idle
        {
            v.push(p);
        }
    }

    /// A copy buffer of [`COPY_BUF`] bytes from the pool, or a new one.
    pub fn take_buf(&self) -> Box<[u8]> {
        self.bufs
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice())
    }

    /// Returns a copy buffer for reuse.
    pub fn put_buf(&self, b: Box<[u8]>) {
        if let Ok(mut v) = self.bufs.lock()
            && v.len() < self.max_idle
        {
            v.push(b);
        }
    }

    /// Pipes ever created (reuse shows as a number far below connections served).
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// Spare pipes now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished with FIN.
    Closed,
    /// No bytes for the idle timeout; both sides were reset.
    IdleTimeout,
    /// The reset token fired (backend died or its drain ended); both sides were reset.
    Reset,
}

/// Resets a socket: SO_LINGER 0 makes the close send RST instead of FIN.
pub fn set_reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

fn shutdown_write(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
}

/// End-of-stream bookkeeping of the two directions of one relay.
#[derive(Debug)]
struct Eof<'a> {
    mine: &'a AtomicBool,
    other: &'a AtomicBool,
}

impl Eof<'_> {
    /// `from` sent FIN: pass it on as a half-close, unless the other direction is done too,
    /// in which case both sockets are closed right away (close sends the FIN; saves a syscall).
    fn reached(&self, to: &TcpStream) {
        if !self.other.load(Ordering::Relaxed) {
            shutdown_write(to);
        }
        self.mine.store(true, Ordering::Relaxed);
    }
}

async fn splice_dir(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    count: &AtomicU64,
    activity: &AtomicU64,
    eof: &Eof<'_>,
) -> io::Result<()> {
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(
                    from,
                    None,
                    &pipe.w,
                    None,
                    pipe.cap,
                    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
                )
                .map_err(io::Error::from)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        if n == 0 {
            eof.reached(to);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(
                    &pipe.r,
                    None,
                    to,
                    None,
                    left,
                    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
                )
                .map_err(io::Error::from)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes all of `buf` (one write when the send buffer has room, as for a PROXY header).
pub(crate) async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => buf = &buf[m..],
        }
    }
    Ok(())
}

/// One direction. Returns once `from` sent FIN and `to` got its shutdown.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    mode: ForwardMode,
    pool: &PipePool,
    count: &AtomicU64,
    activity: &AtomicU64,
    eof: Eof<'_>,
) -> io::Result<()> {
    if mode != ForwardMode::Splice {
        let mut buf = pool.take_buf();
        let copied = copy_phase(from, to, mode, &mut buf, count, activity, &eof).await;
        pool.put_buf(buf);
        if !copied? {
            return Ok(());
        }
    }
    let pipe = pool.take()?;
    let r = splice_dir(from, to, &pipe, count, activity, &eof).await;
    if r.is_ok() {
        // Finished cleanly: the pipe was drained, it can serve another connection.
        pool.put(pipe);
    }
    r
}

/// Copies until EOF (`Ok(false)`), or in Auto mode until a read fills the buffer
/// (`Ok(true)`: bulk transfer, continue with splice).
async fn copy_phase(
    from: &TcpStream,
    to: &TcpStream,
    mode: ForwardMode,
    buf: &mut [u8],
    count: &AtomicU64,
    activity: &AtomicU64,
    eof: &Eof<'_>,
) -> io::Result<bool> {
    {
        loop {
            from.readable().await?;
            // A short read drained the socket: report WouldBlock to tokio with the bytes in
            // hand, so it clears the readiness now instead of after one more empty read.
            // (A new arrival carries a new readiness tick, so no wake-up is lost.)
            let mut got = 0;
            let r = from.try_io(Interest::READABLE, || {
                let n = nix::sys::socket::recv(from.as_raw_fd(), buf, MsgFlags::empty())?;
                got = n;
                if n > 0 && n < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
            });
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got == 0 {
                        continue;
                    }
                    got
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                eof.reached(to);
                return Ok(false);
            }
            write_all(to, &buf[..n]).await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
            activity.fetch_add(1, Ordering::Relaxed);
            if mode == ForwardMode::Auto && n == buf.len() {
                return Ok(true);
            }
        }
    }
}

/// Relays `a` ⇄ `b` until both directions closed, the idle timeout passed (closed between
/// one and two timeouts after the last byte), or `reset` fired. Bytes a → b are added to
/// `ab`, b → a to `ba` as they move. On timeout, reset or error both sockets are set to send
/// RST when dropped.
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    mode: ForwardMode,
    pool: &PipePool,
    idle: Option<Duration>,
    reset: &CancellationToken,
    ab: &AtomicU64,
    ba: &AtomicU64,
) -> io::Result<RelayEnd> {
    #[cfg(feature = "sockmap")]
    let mode = match mode {
        ForwardMode::Sockmap => match crate::sockmap::relay(a, b, idle, reset, ab, ba).await? {
            Some(end) => return Ok(end),
            // Not linked (a side is no longer established): the bytes take the usual path.
            None => ForwardMode::Auto,
        },
        m => m,
    };
    let activity = AtomicU64::new(0);
    let (a_done, b_done) = (AtomicBool::new(false), AtomicBool::new(false));
    let flow = &activity;
    let both = async {
        tokio::try_join!(
            one_way(a, b, mode, pool, ab, flow, Eof { mine: &a_done, other: &b_done }),
            one_way(b, a, mode, pool, ba, flow, Eof { mine: &b_done, other: &a_done })
        )
    };
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending::<()>().await;
        };
        let mut seen = flow.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(idle).await;
            let now = flow.load(Ordering::Relaxed);
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    let end = tokio::select! {
        r = both => r.map(|_| RelayEnd::Closed),
        () = watchdog => Ok(RelayEnd::IdleTimeout),
        () = reset.cancelled() => Ok(RelayEnd::Reset),
    };
    if !matches!(end, Ok(RelayEnd::Closed)) {
        // RST both ways: never leave a peer waiting on a connection we gave up.
        set_reset_on_close(a);
        set_reset_on_close(b);
    }
    end
}
