//! Batched UDP I/O for Linux: many datagrams per system call with `recvmmsg(2)` and
//! `sendmmsg(2)`, the UDP GRO segment size of each received buffer, and UDP GSO on send.
//! The ingress UDP proxy, the DNS server and the WireGuard data path use it.
//!
//! # Layers
//!
//! - [`RecvBatch`]: fixed buffers for one receive, allocated once and reused; read the last
//!   batch with [`RecvBatch::get`] or [`RecvBatch::iter`] as [`Received`] views.
//! - [`send`]: one `sendmmsg` of [`Message`]s (each one or more slices, a destination and an
//!   optional UDP GSO segment size); [`send_to`] for plain datagrams to one destination.
//! - [`enable_gro`] and [`probe_gso`]: the socket options the two offloads need.
//!
//! Headers and iovecs hold raw pointers into the caller's buffers and live for one call only,
//! so nothing holding a pointer crosses an `.await` or a thread. Everything unsafe is in this
//! crate's two files, each block with the reason it is sound.

mod sys;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most datagrams (or GRO buffers) one call moves.
pub const MAX_BATCH: usize = 64;

/// One received datagram (or, with UDP GRO, a buffer of several) in a [`RecvBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received<'a> {
    /// The payload, cut at the slot size.
    pub data: &'a [u8],
    /// The sender, when it is an IPv4 or IPv6 address.
    pub from: Option<SocketAddr>,
    /// The datagram was longer than the slot and arrived cut.
    pub truncated: bool,
    /// With UDP GRO on: `data` holds datagrams of this many bytes (the last may be shorter);
    /// 0 means it is one datagram.
    pub segment: usize,
}

/// Buffers for receiving up to `count` datagrams of up to `slot` bytes each in one call.
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    count: usize,
    n: usize,
    lens: [usize; MAX_BATCH],
    trunc: [bool; MAX_BATCH],
    seg: [usize; MAX_BATCH],
    names: Vec<sys::Name>,
    control: Vec<sys::RecvControl>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.count)
            .field("slot", &self.slot)
            .field("received", &self.n)
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// `count` (clamped to 1..=[`MAX_BATCH`]) slots of `slot` bytes each.
    pub fn new(count: usize, slot: usize) -> RecvBatch {
        let count = count.clamp(1, MAX_BATCH);
        RecvBatch {
            buf: vec![0; count * slot],
            slot,
            count,
            n: 0,
            lens: [0; MAX_BATCH],
            trunc: [false; MAX_BATCH],
            seg: [0; MAX_BATCH],
            names: vec![sys::Name::default(); count],
            control: vec![sys::RecvControl::default(); count],
        }
    }

    /// Receives up to `count` datagrams without blocking (`WouldBlock` when none is queued);
    /// returns how many.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.n = 0;
        self.n = sys::recv(self, fd.as_raw_fd())?;
        Ok(self.n)
    }

    /// How many datagrams the last receive got.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the last receive got none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i` of the last receive (panics unless `i < len()`).
    pub fn get(&self, i: usize) -> Received<'_> {
        assert!(i < self.n, "datagram {i} of a batch of {}", self.n);
        let start = i * self.slot;
        Received {
            data: &self.buf[start..start + self.lens[i].min(self.slot)],
            from: self.names[i].get(),
            truncated: self.trunc[i],
            segment: self.seg[i],
        }
    }

    /// The datagrams of the last receive, in order.
    pub fn iter(&self) -> impl Iterator<Item = Received<'_>> + '_ {
        (0..self.n).map(|i| self.get(i))
    }
}

/// One message for [`send`]: its slices go out as one datagram, or, with `segment`, as UDP GSO
/// datagrams of `segment` bytes each (the last may be shorter).
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The payload, gathered from these slices.
    pub iov: &'a [IoSlice<'a>],
    /// The destination; `None` on a connected socket.
    pub to: Option<SocketAddr>,
    /// UDP GSO segment size (needs [`probe_gso`]).
    pub segment: Option<u16>,
}

/// Sends the first [`MAX_BATCH`] of `msgs` in one `sendmmsg`; returns how many messages went.
/// With `block` false the call never waits (`WouldBlock` when the socket buffer is full and
/// nothing went); with `block` true a blocking socket applies back-pressure. An error is about
/// the first message (the kernel reports a later one's failure as a short count).
pub fn send(fd: BorrowedFd<'_>, msgs: &[Message<'_>], block: bool) -> io::Result<usize> {
    let msgs = &msgs[..msgs.len().min(MAX_BATCH)];
    if msgs.is_empty() {
        return Ok(0);
    }
    sys::send(fd.as_raw_fd(), msgs, block)
}

/// Sends plain datagrams, all to `to` (or on a connected socket when `None`), in one
/// non-blocking `sendmmsg`; returns how many were sent (`WouldBlock` when none could be).
pub fn send_to(
    fd: BorrowedFd<'_>,
    datagrams: &[&[u8]],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let n = datagrams.len().min(MAX_BATCH);
    let iovs: [IoSlice<'_>; MAX_BATCH] =
        std::array::from_fn(|i| IoSlice::new(datagrams.get(i).copied().unwrap_or_default()));
    let msgs: [Message<'_>; MAX_BATCH] =
        std::array::from_fn(|i| Message { iov: std::slice::from_ref(&iovs[i]), to, segment: None });
    send(fd, &msgs[..n], false)
}

/// Turns on UDP GRO for the socket (received buffers may then hold many datagrams, see
/// [`Received::segment`]); false if the kernel lacks it.
pub fn enable_gro(fd: BorrowedFd<'_>) -> bool {
    sys::set_udp_opt(fd.as_raw_fd(), sys::UDP_GRO, 1)
}

/// Whether the kernel does UDP GSO on this socket (probed by setting a zero segment size).
pub fn probe_gso(fd: BorrowedFd<'_>) -> bool {
    sys::set_udp_opt(fd.as_raw_fd(), sys::UDP_SEGMENT, 0)
}

#[cfg(test)]
mod tests;
