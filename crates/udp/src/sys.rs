//! The system calls behind the batches: `recvmmsg`/`sendmmsg` headers over the caller's
//! buffers, socket addresses in and out of their C form, and the UDP GRO/GSO control messages.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use crate::{MAX_BATCH, Message, RecvBatch};

/// `UDP_SEGMENT` (linux/udp.h): send one buffer as equal-sized datagrams (UDP GSO).
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams with their segment size.
pub(crate) const UDP_GRO: libc::c_int = 104;

/// Room for an IPv4 or an IPv6 socket address (a `sockaddr_in` fits in a `sockaddr_in6`, both
/// start with the family and are 4-byte aligned).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Name(libc::sockaddr_in6);

impl Default for Name {
    fn default() -> Name {
        Name(libc::sockaddr_in6 {
            sin6_family: libc::AF_UNSPEC as libc::sa_family_t,
            sin6_port: 0,
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
            sin6_scope_id: 0,
        })
    }
}

impl Name {
    /// Stores `addr`; returns the length of its C form.
    fn set(&mut self, addr: SocketAddr) -> libc::socklen_t {
        match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                // SAFETY: a sockaddr_in (16 bytes, 4-aligned) fits in the sockaddr_in6 (28
                // bytes, 4-aligned) this points at; the write is unaligned-tolerant anyway.
                unsafe {
                    std::ptr::write_unaligned((&mut self.0 as *mut libc::sockaddr_in6).cast(), sin);
                }
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                self.0 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                };
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    /// The address stored, if it is IPv4 or IPv6.
    pub(crate) fn get(&self) -> Option<SocketAddr> {
        match i32::from(self.0.sin6_family) {
            libc::AF_INET => {
                // SAFETY: the family says the bytes hold a sockaddr_in, which is smaller than
                // the sockaddr_in6 they live in; read unaligned.
                let sin: libc::sockaddr_in = unsafe {
                    std::ptr::read_unaligned((&self.0 as *const libc::sockaddr_in6).cast())
                };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.0.sin6_addr.s6_addr),
                u16::from_be(self.0.sin6_port),
                self.0.sin6_flowinfo,
                self.0.sin6_scope_id,
            ))),
            _ => None,
        }
    }
}

/// Control space of one received message: room for the UDP GRO segment size and a little more.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct RecvControl([u64; 8]);

/// Control space of one sent message: one UDP GSO segment size.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct SendControl([u64; 4]);

/// One `recvmmsg` into `batch`'s slots (non-blocking); fills its lengths, flags and names.
pub(crate) fn recv(batch: &mut RecvBatch, fd: RawFd) -> io::Result<usize> {
    let count = batch.count;
    let slot = batch.slot;
    // SAFETY: iovec and mmsghdr are plain C structs; all-zero is a valid value (null
    // pointers, zero lengths) and every field the kernel reads is set below.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for (i, chunk) in batch.buf.chunks_mut(slot.max(1)).take(count).enumerate() {
        batch.names[i] = Name::default();
        iovs[i].iov_base = chunk.as_mut_ptr().cast();
        iovs[i].iov_len = chunk.len();
        let h = &mut hdrs[i].msg_hdr;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_name = (&mut batch.names[i] as *mut Name).cast();
        h.msg_namelen = std::mem::size_of::<Name>() as libc::socklen_t;
        h.msg_control = batch.control[i].0.as_mut_ptr().cast();
        h.msg_controllen = std::mem::size_of::<RecvControl>();
    }
    // SAFETY: the first `count` headers point at live iovecs over distinct chunks of
    // `batch.buf`, at live names and at live control buffers of the stated lengths; all
    // outlive the call and the kernel writes at most those lengths.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = r as usize;
    for (i, h) in hdrs.iter().enumerate().take(n) {
        batch.lens[i] = h.msg_len as usize;
        batch.trunc[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        batch.seg[i] = gro_segment(&h.msg_hdr);
        if h.msg_hdr.msg_namelen == 0 {
            batch.names[i] = Name::default();
        }
    }
    Ok(n)
}

/// The UDP_GRO segment size the kernel reported in a received message's control data.
fn gro_segment(hdr: &libc::msghdr) -> usize {
    // SAFETY: `hdr` is a msghdr the kernel just filled: msg_control points at a live control
    // buffer and msg_controllen says how much of it holds cmsgs; the CMSG_* macros stay within
    // that length, and the payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    0
}

/// One `sendmmsg` of `msgs` (at most [`MAX_BATCH`]).
pub(crate) fn send(fd: RawFd, msgs: &[Message<'_>], block: bool) -> io::Result<usize> {
    let mut names = [Name::default(); MAX_BATCH];
    let mut control = [SendControl::default(); MAX_BATCH];
    // SAFETY: a plain C struct; all-zero is valid and the used fields are set below.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for (i, m) in msgs.iter().enumerate().take(MAX_BATCH) {
        let h = &mut hdrs[i].msg_hdr;
        // `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; the kernel only reads
        // through these pointers for a send.
        h.msg_iov = m.iov.as_ptr().cast::<libc::iovec>().cast_mut();
        h.msg_iovlen = m.iov.len();
        if let Some(to) = m.to {
            h.msg_namelen = names[i].set(to);
            h.msg_name = (&mut names[i] as *mut Name).cast();
        }
        if let Some(seg) = m.segment {
            h.msg_control = control[i].0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
            // SAFETY: msg_control points at 32 live, 8-aligned bytes, more than CMSG_SPACE(2);
            // CMSG_FIRSTHDR returns its start and the u16 payload fits.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    let n = msgs.len().min(MAX_BATCH);
    let flags = if block { 0 } else { libc::MSG_DONTWAIT };
    // SAFETY: the first `n` headers point at the callers' live iovec slices (over live
    // buffers), at live names and control buffers; all outlive the call.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Sets an int `SOL_UDP` option; false if the kernel refuses it.
pub(crate) fn set_udp_opt(fd: RawFd, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}
