//! The few system calls std and nix do not wrap: opening a TUN device (`TUNSETIFF`), its
//! virtio-net header and offloads (`TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`), and batched UDP I/O
//! (`recvmmsg`/`sendmmsg`). Everything unsafe in the crate is here.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Most datagrams (or GRO buffers) one `recvmmsg` moves.
pub(crate) const BATCH: usize = 32;
/// Most datagrams one `sendmmsg` moves: enough for a full UDP GSO message of 64 KB.
pub(crate) const SEND_BATCH: usize = 64;
/// `UDP_SEGMENT` (linux/udp.h): send one buffer as equal-sized datagrams (UDP GSO).
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams with their segment size.
const UDP_GRO: libc::c_int = 104;
/// Largest buffer a UDP GRO receive can fill.
pub(crate) const GRO_BUF: usize = 65536;
/// Most segments the kernel accepts in one UDP GSO send.
const GSO_MAX_SEGMENTS: usize = 64;

fn set_int_opt(fd: &impl AsRawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Whether the kernel does UDP GSO on this socket (probed by setting a zero segment size).
pub(crate) fn probe_gso(fd: &impl AsRawFd) -> bool {
    set_int_opt(fd, libc::SOL_UDP, UDP_SEGMENT, 0)
}

/// Turns on UDP GRO for the socket; false if the kernel lacks it.
pub(crate) fn enable_gro(fd: &impl AsRawFd) -> bool {
    set_int_opt(fd, libc::SOL_UDP, UDP_GRO, 1)
}

/// Creates (or attaches to) the TUN device `name` in the calling thread's network namespace:
/// layer 3, no packet-info header, non-blocking, with a 24-byte virtio-net header (the UDP
/// tunnel variant) before every packet (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), so writes can hand
/// the kernel UDP GSO super-packets. Returns the fd and whether the send-side offloads are on
/// (`TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO[_CSUM]`, Linux 6.17+): then reads may return
/// 64 KB TCP or VXLAN-over-TCP GSO packets with partial checksums, which the caller segments.
pub(crate) fn open_tun(name: &str) -> io::Result<(OwnedFd, bool)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad TUN name"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // IFF_NAPI hands our writes to the stack through the device's NAPI context (softirq
    // with GRO) instead of the generic backlog. Kernels without it get the plain device.
    let base = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    for flags in [base | libc::IFF_NAPI, base] {
        // SAFETY: ifreq is a plain C struct (arrays and a union of integers/pointers); all-zero
        // bytes are a valid value of it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: the fd is an open /dev/net/tun; TUNSETIFF reads and writes one ifreq, which
        // `req` is and which lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if rc == 0 {
            let fd: OwnedFd = file.into();
            let offload = set_vnet(&fd)?;
            return Ok((fd, offload));
        }
        if flags & libc::IFF_NAPI == 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let fd: OwnedFd = file.into();
    let offload = set_vnet(&fd)?;
    Ok((fd, offload))
}

/// `TUN_F_UDP_TUNNEL_GSO` (linux/if_tun.h, 6.17+): GSO packets inside a UDP tunnel.
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x080;
/// `TUN_F_UDP_TUNNEL_GSO_CSUM`: the same for tunnels with outer UDP checksums (VXLAN devices
/// made by iproute2 or rtnetlink default to `udpcsum`).
const TUN_F_UDP_TUNNEL_GSO_CSUM: libc::c_uint = 0x100;

/// Sets the virtio-net header size and tries to turn the send-side offloads on.
fn set_vnet(fd: &OwnedFd) -> io::Result<bool> {
    let size = super::gro::VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which points at `size`
    // and lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let flags =
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM;
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    let rc =
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD as _, flags as libc::c_ulong) };
    if rc == 0 {
        return Ok(true);
    }
    // Older kernels: no offloads, the kernel segments and checksums before the TUN.
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD as _, 0 as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(false)
}

fn sockaddr_of(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn addr_of(s: &libc::sockaddr_in) -> Option<SocketAddrV4> {
    if i32::from(s.sin_family) != libc::AF_INET {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    ))
}

/// Fixed buffers for one `recvmmsg` batch; allocated once, reused for every call.
pub(crate) struct RecvBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: [usize; BATCH],
    pub from: [Option<SocketAddrV4>; BATCH],
    /// Segment size of a GRO-coalesced buffer (0: one datagram).
    pub seg: [usize; BATCH],
    names: [libc::sockaddr_in; BATCH],
    control: [[u64; 8]; BATCH],
}

impl RecvBatch {
    pub fn new(buf_size: usize) -> Self {
        RecvBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; buf_size]).collect(),
            lens: [0; BATCH],
            from: [None; BATCH],
            seg: [0; BATCH],
            names: [sockaddr_of(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
            control: [[0; 8]; BATCH],
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: &impl AsRawFd) -> io::Result<usize> {
        // SAFETY: iovec/mmsghdr are plain C structs; zero is a valid value (null pointers,
        // zero lengths) and every field used is set below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iovs[i].iov_len = self.bufs[i].len();
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            hdrs[i].msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
        }
        // SAFETY: every header points at a live iovec over a live buffer of the stated length,
        // at a live sockaddr_in and at a live control buffer of the stated length; all of them
        // outlive the call, and the kernel writes at most the stated lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = (h.msg_len as usize).min(self.bufs[i].len());
            self.from[i] = addr_of(&self.names[i]);
            self.seg[i] = gro_segment(&h.msg_hdr);
        }
        Ok(n)
    }
}

/// The UDP_GRO segment size the kernel reported in a received message's control data.
fn gro_segment(hdr: &libc::msghdr) -> usize {
    // SAFETY: `hdr` is a msghdr the kernel just filled: msg_control points at our live control
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

    /// Sends the queued datagrams (blocking socket: the kernel applies back-pressure) and
    /// empties the batch. With `gso`, runs of equal-sized datagrams to one peer go out as one
    /// UDP GSO message (one trip through the stack for up to 64 datagrams). Returns how many
    /// datagrams the kernel refused and whether GSO failed (the caller then turns it off).
    pub fn flush(&mut self, fd: &impl AsRawFd, gso: bool) -> (usize, bool) {
        if !gso {
            let r = self.send_plain(fd, 0, self.count);
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
        let mut names = [sockaddr_of(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); SEND_BATCH];
        let mut control = [[0u64; 4]; SEND_BATCH];
        // SAFETY: plain C structs; zero is valid and the used fields are set below.
        let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for ((iov, buf), len) in
            iovs.iter_mut().zip(self.bufs.iter_mut()).zip(self.lens).take(self.count)
        {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = len;
        }
        for (g, &(start, n, seg)) in groups.iter().enumerate().take(ng) {
            names[g] = sockaddr_of(self.to[start]);
            let h = &mut hdrs[g].msg_hdr;
            h.msg_iov = &mut iovs[start];
            h.msg_iovlen = n;
            h.msg_name = (&mut names[g] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            if n > 1 {
                h.msg_control = control[g].as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE/LEN are pure size computations.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
                // SAFETY: msg_control points at 32 live, aligned bytes, more than
                // CMSG_SPACE(2); CMSG_FIRSTHDR returns its start and the u16 payload fits.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                }
            }
        }
        let mut done = 0;
        while done < ng {
            // SAFETY: headers done..ng point at live iovecs (over live buffers of the stated
            // lengths), addresses and control buffers, all outliving the call.
            let k = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    hdrs[done..].as_mut_ptr(),
                    (ng - done) as libc::c_uint,
                    0,
                )
            };
            if k <= 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // This group failed as a GSO message: send its datagrams one by one.
                let (start, n, _) = groups[done];
                if n > 1 {
                    gso_failed = true;
                }
                refused += self.send_plain(fd, start, start + n);
                done += 1;
                continue;
            }
            done += k as usize;
        }
        self.count = 0;
        (refused, gso_failed)
    }

    fn send_plain(&mut self, fd: &impl AsRawFd, from: usize, to: usize) -> usize {
        let mut sent = from;
        let mut refused = 0;
        while sent < to {
            let k = to - sent;
            let mut names = [sockaddr_of(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); SEND_BATCH];
            // SAFETY: plain C structs; zero is valid and the used fields are set below.
            let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
            for j in 0..k {
                let i = sent + j;
                names[j] = sockaddr_of(self.to[i]);
                iovs[j].iov_base = self.bufs[i].as_mut_ptr().cast();
                iovs[j].iov_len = self.lens[i];
                hdrs[j].msg_hdr.msg_iov = &mut iovs[j];
                hdrs[j].msg_hdr.msg_iovlen = 1;
                hdrs[j].msg_hdr.msg_name = (&mut names[j] as *mut libc::sockaddr_in).cast();
                hdrs[j].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            }
            // SAFETY: the first k headers point at live iovecs over live buffers of at least
            // the stated lengths and at live addresses; all outlive the call.
            let n =
                unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), k as libc::c_uint, 0) };
            if n <= 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Skip the datagram the kernel refused (e.g. no route) and go on.
                refused += 1;
                sent += 1;
                continue;
            }
            sent += n as usize;
        }
        refused
    }
}
