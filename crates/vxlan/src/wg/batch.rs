//! The tx thread's outgoing batch: encrypted datagrams queued per slot, sent with one
//! `sendmmsg` (through `shoal-udp`), runs to one peer of equal size as one UDP GSO message.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;

use shoal_udp::Message;

/// Most datagrams (or GRO buffers) one receive moves.
pub(crate) const RECV_BATCH: usize = 32;
/// Most datagrams one `sendmmsg` moves: enough for a full UDP GSO message of 64 KB.
pub(crate) const SEND_BATCH: usize = shoal_udp::MAX_BATCH;
/// Largest buffer a UDP GRO receive can fill.
pub(crate) const GRO_BUF: usize = 65536;
/// Most segments the kernel accepts in one UDP GSO send.
const GSO_MAX_SEGMENTS: usize = 64;

/// Fixed buffers for one `sendmmsg` batch.
pub(crate) struct SendBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: [usize; SEND_BATCH],
    pub to: [SocketAddrV4; SEND_BATCH],
    pub count: usize,
}

impl SendBatch {
    pub fn new(buf_size: usize) -> Self {
        SendBatch {
            bufs: (0..SEND_BATCH).map(|_| vec![0u8; buf_size]).collect(),
            lens: [0; SEND_BATCH],
            to: [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); SEND_BATCH],
            count: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.count == SEND_BATCH
    }

    /// The payload of slot `i` (an empty slice past the queued ones).
    fn slice(&self, i: usize) -> IoSlice<'_> {
        if i < self.count { IoSlice::new(&self.bufs[i][..self.lens[i]]) } else { IoSlice::new(&[]) }
    }

    /// Sends the queued datagrams (blocking socket: the kernel applies back-pressure) and
    /// empties the batch. With `gso`, runs of equal-sized datagrams to one peer go out as one
    /// UDP GSO message (one trip through the stack for up to 64 datagrams). Returns how many
    /// datagrams the kernel refused and whether GSO failed (the caller then turns it off).
    pub fn flush(&mut self, udp: &UdpSocket, gso: bool) -> (usize, bool) {
        if !gso {
            let r = self.send_plain(udp, 0, self.count);
            self.count = 0;
            return (r, false);
        }
        // Group consecutive slots: same peer, same size (the last of a group may be shorter).
        let mut groups = [(0usize, 0usize, 0usize); SEND_BATCH];
        let mut ng = 0;
        let mut i = 0;
        while i < self.count {
            let (start, seg, to) = (i, self.lens[i], self.to[i]);
            let mut total = seg;
            i += 1;
            while i < self.count
                && self.to[i] == to
                && self.lens[i] <= seg
                && i - start < GSO_MAX_SEGMENTS
                && total + self.lens[i] <= GRO_BUF - 1024
            {
                total += self.lens[i];
                i += 1;
                if self.lens[i - 1] < seg {
                    break;
                }
            }
            groups[ng] = (start, i - start, seg);
            ng += 1;
        }
        let mut refused = 0;
        let mut gso_failed = false;
        let iovs: [IoSlice<'_>; SEND_BATCH] = std::array::from_fn(|i| self.slice(i));
        let msgs: [Message<'_>; SEND_BATCH] = std::array::from_fn(|g| {
            let (start, n, seg) = groups[g];
            Message {
                iov: &iovs[start..start + n],
                to: Some(SocketAddr::V4(self.to[start])),
                segment: (n > 1).then_some(seg as u16),
            }
        });
        let mut done = 0;
        while done < ng {
            match shoal_udp::send(udp.as_fd(), &msgs[done..ng], true) {
                Ok(k) if k > 0 => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // This group failed as a GSO message: send its datagrams one by one.
                    let (start, n, _) = groups[done];
                    if n > 1 {
                        gso_failed = true;
                    }
                    refused += self.send_plain(udp, start, start + n);
                    done += 1;
                }
            }
        }
        self.count = 0;
        (refused, gso_failed)
    }

    /// Sends slots `from..to` one datagram each; returns how many the kernel refused.
    fn send_plain(&self, udp: &UdpSocket, from: usize, to: usize) -> usize {
        let iovs: [IoSlice<'_>; SEND_BATCH] = std::array::from_fn(|i| self.slice(i));
        let msgs: [Message<'_>; SEND_BATCH] = std::array::from_fn(|i| Message {
            iov: std::slice::from_ref(&iovs[i]),
            to: Some(SocketAddr::V4(self.to[i])),
            segment: None,
        });
        let mut sent = from;
        let mut refused = 0;
        while sent < to {
            match shoal_udp::send(udp.as_fd(), &msgs[sent..to], true) {
                Ok(n) if n > 0 => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // Skip the datagram the kernel refused (e.g. no route) and go on.
                    refused += 1;
                    sent += 1;
                }
            }
        }
        refused
    }
}
