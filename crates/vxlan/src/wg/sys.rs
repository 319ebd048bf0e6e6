//! The few system calls std and nix do not wrap: opening a TUN device (`TUNSETIFF`) and its
//! virtio-net header and offloads (`TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`). Everything unsafe in
//! the crate is here (batched UDP I/O is the `shoal-udp` crate's).
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

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
