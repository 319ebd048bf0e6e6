//! Batched datagram I/O: recvmmsg(2)/sendmmsg(2) on non-blocking sockets. The headers and
//! iovecs point into caller-owned buffers and live only for one call, so nothing holding raw
//! pointers crosses an `.await`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most datagrams one call moves.
pub const MAX_BATCH: usize = 32;

/// Received datagrams: lengths, sources and truncation flags of the first `n` slots.
#[derive(Debug)]
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    lens: [usize; MAX_BATCH],
    from: [Option<SocketAddr>; MAX_BATCH],
    trunc: [bool; MAX_BATCH],
    n: usize,
    count: usize,
}

impl RecvBatch {
    /// `count` (≤ [`MAX_BATCH`]) slots of `slot` bytes each.
    pub fn new(count: usize, slot: usize) -> Self {
        let count = count.clamp(1, MAX_BATCH);
        RecvBatch {
            buf: vec![0; count * slot],
            slot,
            lens: [0; MAX_BATCH],
            from: [None; MAX_BATCH],
            trunc: [false; MAX_BATCH],
            n: 0,
            count,
        }
    }

    /// Datagrams of the last receive: (payload, source, truncated).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Option<SocketAddr>, bool)> + '_ {
        (0..self.n).map(|i| {
            let start = i * self.slot;
            (&self.buf[start..start + self.lens[i].min(self.slot)], self.from[i], self.trunc[i])
        })
    }

    /// Receives up to `count` datagrams without blocking (`WouldBlock` when none is queued).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut iovs: [libc::iovec; MAX_BATCH] =
            [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_BATCH];
        // SAFETY: an all-zero sockaddr_storage and mmsghdr are valid (plain C structs).
        let mut names: [libc::sockaddr_storage; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, chunk) in self.buf.chunks_mut(self.slot).take(self.count).enumerate() {
            iovs[i].iov_base = chunk.as_mut_ptr().cast();
            iovs[i].iov_len = chunk.len();
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        }
        // SAFETY: `hdrs[..count]` point at iovecs and names that outlive the call, each iovec
        // covers a distinct chunk of `self.buf`, and the kernel writes at most those lengths.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                self.count as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = r as usize;
        for i in 0..self.n {
            self.lens[i] = hdrs[i].msg_len as usize;
            self.trunc[i] = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.from[i] = from_storage(&names[i]);
        }
        Ok(self.n)
    }
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; sockaddr_storage is
            // larger and at least as aligned.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `msgs` (all to `to`, or on a connected socket when `None`) in one sendmmsg call;
/// returns how many were sent (`WouldBlock` when the socket buffer is full).
pub fn send_batch(fd: BorrowedFd<'_>, msgs: &[&[u8]], to: Option<SocketAddr>) -> io::Result<usize> {
    let n = msgs.len().min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let addr = to.map(socket2::SockAddr::from);
    let mut iovs: [libc::iovec; MAX_BATCH] =
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_BATCH];
    // SAFETY: an all-zero mmsghdr is valid.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i].iov_base = msgs[i].as_ptr() as *mut libc::c_void;
        iovs[i].iov_len = msgs[i].len();
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        if let Some(a) = &addr {
            hdrs[i].msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
            hdrs[i].msg_hdr.msg_namelen = a.len();
        }
    }
    // SAFETY: every header points at an iovec over a live slice (read only by the kernel for
    // sendmmsg) and at `addr`, all of which outlive the call.
    let r =
        unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn batch_roundtrip_on_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        assert_eq!(send_batch(a.as_fd(), &refs, Some(to)).unwrap(), 5);
        let mut batch = RecvBatch::new(8, 102);
        let n = batch.recv(b.as_fd()).unwrap();
        assert_eq!(n, 5);
        let got: Vec<_> = batch.iter().collect();
        for (i, (data, from, trunc)) in got.iter().enumerate() {
            assert_eq!(*from, Some(a.local_addr().unwrap()));
            assert_eq!(*trunc, i > 2, "slot of 102 bytes truncates the 103+ byte datagrams");
            assert_eq!(data.len(), (100 + i).min(102));
            assert!(data.iter().all(|&x| x == i as u8));
        }
        let e = batch.recv(b.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
