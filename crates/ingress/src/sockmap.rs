//! The sockmap forwarder, an experiment measured beside splice ([`ForwardMode::Sockmap`],
//! feature `sockmap`): after the mesh has accepted a client and connected upstream, both
//! sockets go into a BPF SOCKHASH whose sk_skb stream-verdict program (`bpf/redirect.c`)
//! redirects every segment a socket receives to its paired socket's output. The bytes never
//! reach this process; the relay task only watches for end of stream, idle time and reset.
//!
//! What userspace still does, and why:
//! - **Bytes that arrived before the pair was in the map** sit in the socket's receive queue
//!   (a client writes its request as soon as its connect returns). The kernel here (6.18)
//!   runs them through the program when the socket is linked (`tests/sockmap.rs` stalls the
//!   mesh to make them wait); setting `SO_RCVLOWAT` afterwards makes TCP signal "data ready"
//!   once more, so no queued byte depends on that, and any that remain still go through the
//!   program in order, ahead of later arrivals.
//! - **End of stream.** A redirect moves bytes, not FIN. When a side reads EOF, the relay
//!   waits until every byte that side received has been written into its peer (a kernel
//!   worker does those writes after the redirect), then shuts the peer's write side.
//! - **Counting.** Bytes moved are read from `TCP_INFO` (bytes received), not counted per
//!   read; idle time is "no byte received on either side for the timeout".
//!
//! The object file is not built by cargo: [`compile_object`] runs clang on the program's
//! source (kept in this crate as text) where the forwarder is used, and [`install`] loads the
//! bytes (`benches/mesh.rs` and `tests/sockmap.rs` do both). The feature only adds the
//! pure-Rust loader (aya), so building the crate needs no C toolchain.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{MapData, SockHash};
use aya::programs::SkSkb;
use nix::libc;
use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::forward::{RelayEnd, set_reset_on_close};

/// The loaded program and its map, shared by every relay of the process.
struct Redirector {
    /// Owns the attached program: dropping it would detach the verdict program.
    _ebpf: Ebpf,
    /// socket cookie → the socket its bytes go to.
    peers: Mutex<SockHash<MapData, u64>>,
}

static REDIRECTOR: OnceLock<Redirector> = OnceLock::new();

/// How long a side's received bytes may take to reach its peer after EOF before the relay
/// gives up on them and resets both sides (the kernel worker runs within microseconds; this
/// is for a peer whose window stays shut).
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// The verdict program's C source (`bpf/redirect.c`).
pub const SOURCE: &str = include_str!("../bpf/redirect.c");

/// Compiles [`SOURCE`] with `clang -O2 -g -target bpf` (Debian: clang and libbpf-dev, whose
/// `bpf_helpers.h` it includes) and returns the object file's bytes.
pub fn compile_object() -> io::Result<Vec<u8>> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    // linux/types.h includes <asm/types.h>, which Debian keeps under the multiarch directory.
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let mut child = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", &multiarch, "-x", "c", "-c", "-", "-o", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running clang: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(SOURCE.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "clang failed on bpf/redirect.c: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Loads the stream-verdict program `redirect` and its SOCKHASH `peers` from the object
/// file `object` (bpf/redirect.c built with `clang -O2 -g -target bpf`) and attaches them,
/// once per process: later calls return `Ok` without loading again. Needs CAP_BPF and
/// CAP_NET_ADMIN.
pub fn install(object: &[u8]) -> io::Result<()> {
    if REDIRECTOR.get().is_some() {
        return Ok(());
    }
    let other = |e: &dyn std::fmt::Display| io::Error::other(format!("sockmap: {e}"));
    let mut ebpf = Ebpf::load(object).map_err(|e| other(&e))?;
    let map = ebpf.take_map("peers").ok_or_else(|| other(&"no map `peers` in the object"))?;
    let peers: SockHash<MapData, u64> = SockHash::try_from(map).map_err(|e| other(&e))?;
    let prog: &mut SkSkb = ebpf
        .program_mut("redirect")
        .ok_or_else(|| other(&"no program `redirect` in the object"))?
        .try_into()
        .map_err(|e| other(&e))?;
    prog.load().map_err(|e| other(&e))?;
    prog.attach(peers.fd()).map_err(|e| other(&e))?;
    // A racing install loses: its program and map are dropped (detached) here.
    let _ = REDIRECTOR.set(Redirector { _ebpf: ebpf, peers: Mutex::new(peers) });
    Ok(())
}

/// `forward::relay` for [`crate::ForwardMode::Sockmap`]: puts `a` and `b` into the map as
/// each other's peer and waits for both ends of stream, the idle timeout or `reset`, with
/// the same results and counters. `Ok(None)`: the pair could not be linked (only an
/// established socket can join a sockmap, and a client may have closed already) and nothing
/// was changed: the caller relays it itself.
pub(crate) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    idle: Option<Duration>,
    reset: &CancellationToken,
    ab: &AtomicU64,
    ba: &AtomicU64,
) -> io::Result<Option<RelayEnd>> {
    let Some(r) = REDIRECTOR.get() else {
        return Err(io::Error::other("sockmap forwarding asked for, but not installed"));
    };
    // Baselines: what each socket had been given before the kernel took over (a PROXY
    // header). Nothing has read from either socket, so every byte they ever received is
    // relayed: bytes that arrived before the link wait in the queue and go through the
    // program after `kick`.
    let (a0, b0) = (Counters::read(a)?, Counters::read(b)?);
    let (ka, kb) = (socket2::SockRef::from(a).cookie()?, socket2::SockRef::from(b).cookie()?);
    {
        let mut peers = r.peers.lock().map_err(|_| io::Error::other("sockmap map poisoned"))?;
        if peers.insert(ka, b.as_raw_fd(), 0).is_err() {
            return Ok(None);
        }
        if peers.insert(kb, a.as_raw_fd(), 0).is_err() {
            // Unlinking `b` from its only map entry detaches the program from it again.
            peers.remove(&ka).map_err(|e| io::Error::other(e.to_string()))?;
            return Ok(None);
        }
    }
    kick(a)?;
    kick(b)?;
    let (a_done, b_done) = (AtomicBool::new(false), AtomicBool::new(false));
    let both = async {
        tokio::try_join!(one_way(a, b, &b0, ab, &a_done), one_way(b, a, &a0, ba, &b_done))
    };
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending::<()>().await;
        };
        let received = || {
            let a = Counters::read(a).map(|c| c.received).unwrap_or(0);
            let b = Counters::read(b).map(|c| c.received).unwrap_or(0);
            a.wrapping_add(b)
        };
        let mut seen = received();
        loop {
            tokio::time::sleep(idle).await;
            let now = received();
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    let end: io::Result<RelayEnd> = tokio::select! {
        r = both => r.map(|_| RelayEnd::Closed),
        () = watchdog => Ok(RelayEnd::IdleTimeout),
        () = reset.cancelled() => Ok(RelayEnd::Reset),
    };
    if !matches!(end, Ok(RelayEnd::Closed)) {
        // Closing the sockets also takes them out of the map (the kernel unlinks a socket
        // from every sockmap when it closes).
        set_reset_on_close(a);
        set_reset_on_close(b);
        // A direction that reached its EOF has counted its bytes; count the others now.
        for (from, count, done) in [(a, ab, &a_done), (b, ba, &b_done)] {
            if !done.load(Ordering::Relaxed)
                && let Ok(c) = Counters::read(from)
            {
                count.fetch_add(c.received, Ordering::Relaxed);
            }
        }
    }
    end.map(Some)
}

/// One direction: waits for `from`'s EOF, then for its bytes to be in `to`, then shuts
/// `to`'s write side. Adds the bytes to `count` and sets `done` when it got that far.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    to0: &Counters,
    count: &AtomicU64,
    done: &AtomicBool,
) -> io::Result<()> {
    let mut probe = [0u8; 1];
    loop {
        from.readable().await?;
        // Peek, never take: the verdict program owns the bytes. The socket is readable for
        // every arrival (the kernel wakes readers after the program ran) and at EOF.
        let r = from.try_io(Interest::READABLE, || {
            nix::sys::socket::recv(
                from.as_raw_fd(),
                &mut probe,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
            Ok(0) => break,
            Ok(_) => {
                // Bytes the program has not taken yet (arrived while the pair was being
                // linked): make TCP signal them again, then look later.
                kick(from)?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    // The FIN takes one sequence number, which TCP counts as a byte received.
    let received = Counters::read(from)?.received.saturating_sub(1);
    let deadline = tokio::time::Instant::now() + FLUSH_LIMIT;
    loop {
        let given = Counters::read(to)?.given.saturating_sub(to0.given);
        if given >= received {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("sockmap: {} of {received} bytes reached the peer", given),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    count.fetch_add(received, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// What TCP says a socket has moved since it was created.
#[derive(Debug, Clone, Copy)]
struct Counters {
    /// Payload bytes received (`tcpi_bytes_received`).
    received: u64,
    /// Payload bytes written into the socket: acknowledged plus still queued to send.
    given: u64,
}

impl Counters {
    fn read(s: &TcpStream) -> io::Result<Counters> {
        let fd = s.as_raw_fd();
        let info = tcp_info(fd)?;
        let mut outq: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int through the pointer, which points at
        // a live local of that type; `fd` is open for the duration of the borrow of `s`.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq as *mut libc::c_int) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let outq = u64::try_from(outq).unwrap_or(0);
        Ok(Counters {
            received: info.tcpi_bytes_received,
            given: info.tcpi_bytes_acked.saturating_add(outq),
        })
    }
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is a plain C struct of integers, for which all-zero bytes are valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| io::Error::other("tcp_info size"))?;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is `len` bytes long
    // and lives across the call; `len` is a live local it may shorten.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Makes TCP signal "data ready" now if the socket holds unread bytes: setting SO_RCVLOWAT
/// runs the socket's data-ready hook, which for a socket in the map is the verdict path.
fn kick(s: &TcpStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::other("c_int size"))?;
    // SAFETY: the kernel reads `len` bytes from a live c_int local; the fd is open for the
    // duration of the borrow of `s`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
