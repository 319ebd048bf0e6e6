//! The kernel's connection tracking table over ctnetlink (`NFNL_SUBSYS_CTNETLINK`, on the same
//! netfilter netlink socket as nftables), for exactly what shoal needs: reading the IPv4 TCP and
//! UDP flows of the calling thread's network namespace ([`flows`]) and deleting chosen ones
//! ([`delete`]). A deleted flow's next packet is a new flow, so it passes the nat chains again.
//!
//! Each flow is parsed from a dump message without trusting its lengths ([`Flow::parse`]); the
//! delete request names the flow by its original tuple and its id, so a flow that ended and was
//! replaced by another with the same tuple in the meantime is left alone.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::socket::{self, Error};
use crate::wire::{self, F_ACK, F_DUMP, F_REQUEST, Writer};

/// `NFNL_SUBSYS_CTNETLINK`: the high byte of every conntrack message type.
const SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_GET` / `IPCTNL_MSG_CT_DELETE`.
const GET: u16 = (SUBSYS_CTNETLINK << 8) | 1;
const DELETE: u16 = (SUBSYS_CTNETLINK << 8) | 2;
/// `AF_INET`: conntrack's IPv4 flows only.
const AF_INET: u8 = 2;

/// `CTA_*` attributes of a flow, `CTA_TUPLE_*`, `CTA_IP_*`, `CTA_PROTO_*`, `CTA_PROTOINFO_*`.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// `IPS_DST_NAT`: the flow's destination was translated.
const IPS_DST_NAT: u32 = 1 << 5;
/// `ENOENT`: the flow is gone already.
const ENOENT: i32 = 2;
/// Delete requests per datagram: their acks (each echoing its request) fit the receive buffer.
const DELETES_PER_SEND: usize = 256;

/// A TCP flow's state as conntrack tracks it (`enum tcp_conntrack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// A SYN went out, no answer yet (also `SYN_SENT2`, a simultaneous open).
    SynSent,
    /// The SYN was answered, the handshake's last ACK not seen yet.
    SynRecv,
    /// The handshake completed.
    Established,
    /// One side or both have closed, or the flow was reset.
    Closing,
    /// Any other value (`NONE`, or one a newer kernel adds).
    Other(u8),
}

impl TcpState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 | 9 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4..=8 => TcpState::Closing,
            v => TcpState::Other(v),
        }
    }
}

/// One IPv4 TCP or UDP flow of the conntrack table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// UDP rather than TCP.
    pub udp: bool,
    /// Source and destination of the original direction (as the client sent it).
    pub original: (SocketAddrV4, SocketAddrV4),
    /// Source and destination of the reply direction (after NAT: the source is where the flow
    /// really goes).
    pub reply: (SocketAddrV4, SocketAddrV4),
    /// Whether the flow's destination was translated (DNAT).
    pub dst_nat: bool,
    /// A TCP flow's state; `None` for UDP.
    pub tcp_state: Option<TcpState>,
    /// Whole seconds until conntrack forgets the flow unless a packet comes (0: under a second),
    /// as the dump gave it; `None` if it gave none.
    pub timeout: Option<u32>,
    /// The flow's id and zone, as the kernel gave them (a delete request names them too).
    id: Option<u32>,
    zone: Option<Vec<u8>>,
}

fn tuple(value: &[u8]) -> Option<(u8, SocketAddrV4, SocketAddrV4)> {
    let ip = wire::attr(value, CTA_TUPLE_IP)?;
    let proto = wire::attr(value, CTA_TUPLE_PROTO)?;
    let addr = |ty| -> Option<Ipv4Addr> {
        let b: [u8; 4] = wire::attr(ip, ty)?.get(..4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    let port = |ty| -> Option<u16> {
        let b: [u8; 2] = wire::attr(proto, ty)?.get(..2)?.try_into().ok()?;
        Some(u16::from_be_bytes(b))
    };
    let num = *wire::attr(proto, CTA_PROTO_NUM)?.first()?;
    let src = SocketAddrV4::new(addr(CTA_IP_V4_SRC)?, port(CTA_PROTO_SRC_PORT)?);
    let dst = SocketAddrV4::new(addr(CTA_IP_V4_DST)?, port(CTA_PROTO_DST_PORT)?);
    Some((num, src, dst))
}

impl Flow {
    /// Parses one message of a conntrack dump (what follows the `nlmsghdr`); `None` for what
    /// is not a complete IPv4 TCP or UDP flow.
    pub fn parse(payload: &[u8]) -> Option<Flow> {
        let attrs = payload.get(4..)?;
        let orig_tuple = wire::attr(attrs, CTA_TUPLE_ORIG)?;
        let (num, o_src, o_dst) = tuple(orig_tuple)?;
        let (_, r_src, r_dst) = tuple(wire::attr(attrs, CTA_TUPLE_REPLY)?)?;
        let udp = match num {
            6 => false,
            17 => true,
            _ => return None,
        };
        let be32 = |v: &[u8]| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?));
        let status = wire::attr(attrs, CTA_STATUS).and_then(be32).unwrap_or(0);
        let tcp_state = if udp {
            None
        } else {
            let state = wire::attr(attrs, CTA_PROTOINFO)
                .and_then(|p| wire::attr(p, CTA_PROTOINFO_TCP))
                .and_then(|t| wire::attr(t, CTA_PROTOINFO_TCP_STATE))
                .and_then(|s| s.first().copied());
            Some(state.map_or(TcpState::Other(0), TcpState::from_u8))
        };
        Some(Flow {
            udp,
            original: (o_src, o_dst),
            reply: (r_src, r_dst),
            dst_nat: status & IPS_DST_NAT != 0,
            tcp_state,
            timeout: wire::attr(attrs, CTA_TIMEOUT).and_then(be32),
            id: wire::attr(attrs, CTA_ID).and_then(be32),
            zone: wire::attr(attrs, CTA_ZONE).map(<[u8]>::to_vec),
        })
    }

    /// A flow with these tuples, as a dump would give it without a timeout, id or zone (for
    /// filters and their tests; deleting it deletes whatever flow has its original tuple).
    pub fn new(
        udp: bool,
        original: (SocketAddrV4, SocketAddrV4),
        reply: (SocketAddrV4, SocketAddrV4),
        dst_nat: bool,
        tcp_state: Option<TcpState>,
    ) -> Flow {
        Flow { udp, original, reply, dst_nat, tcp_state, timeout: None, id: None, zone: None }
    }

    /// Appends the request that deletes this flow.
    fn write_delete(&self, w: &mut Writer, seq: u32) {
        w.begin_msg(DELETE, F_REQUEST | F_ACK, seq, AF_INET, 0);
        let (src, dst) = self.original;
        w.begin_nest(CTA_TUPLE_ORIG);
        w.begin_nest(CTA_TUPLE_IP);
        w.attr(CTA_IP_V4_SRC, &src.ip().octets());
        w.attr(CTA_IP_V4_DST, &dst.ip().octets());
        w.end_nest();
        w.begin_nest(CTA_TUPLE_PROTO);
        w.attr(CTA_PROTO_NUM, &[if self.udp { 17 } else { 6 }]);
        w.attr(CTA_PROTO_SRC_PORT, &src.port().to_be_bytes());
        w.attr(CTA_PROTO_DST_PORT, &dst.port().to_be_bytes());
        w.end_nest();
        w.end_nest();
        if let Some(id) = self.id {
            w.u32(CTA_ID, id);
        }
        if let Some(zone) = &self.zone {
            w.attr(CTA_ZONE, zone);
        }
        w.end_msg();
    }
}

/// The IPv4 TCP and UDP flows of the calling thread's network namespace.
pub fn flows() -> Result<Vec<Flow>, Error> {
    let mut w = Writer::default();
    w.begin_msg(GET, F_REQUEST | F_DUMP, 1, AF_INET, 0);
    w.end_msg();
    socket::dump(w.bytes(), "list the conntrack table", Flow::parse)
}

/// Deletes `flows` from the calling thread's namespace and returns how many it deleted. A flow
/// that is gone already (it ended, or was replaced by another with the same tuple) is not
/// counted and is no error; the first other refusal is, after every request was tried.
pub fn delete(flows: &[Flow]) -> Result<usize, Error> {
    let mut deleted = 0;
    let mut refused = None;
    for chunk in flows.chunks(DELETES_PER_SEND) {
        let mut w = Writer::default();
        for (seq, f) in (1u32..).zip(chunk) {
            f.write_delete(&mut w, seq);
        }
        for (_, code) in socket::requests(w.bytes())? {
            match code {
                0 => deleted += 1,
                ENOENT => {}
                code => {
                    refused.get_or_insert(code);
                }
            }
        }
    }
    match refused {
        None => Ok(deleted),
        Some(code) => Err(Error::Rejected {
            what: "delete a conntrack flow".to_owned(),
            errno: nix::errno::Errno::from_raw(code),
            hint: "",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conntrack dump message's payload as the kernel writes it: nfgenmsg, then the flow of
    /// 10.1.0.9:40000 → 192.168.5.2:8100, DNAT-ed to 10.0.0.5:8000, TCP in SYN_SENT, 118 s
    /// left, id 7.
    fn dumped_syn_sent() -> Vec<u8> {
        let mut w = Writer::default();
        w.begin_msg(GET, 0, 1, AF_INET, 0);
        let tuple = |w: &mut Writer, ty, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            w.begin_nest(ty);
            w.begin_nest(CTA_TUPLE_IP);
            w.attr(CTA_IP_V4_SRC, &src);
            w.attr(CTA_IP_V4_DST, &dst);
            w.end_nest();
            w.begin_nest(CTA_TUPLE_PROTO);
            w.attr(CTA_PROTO_NUM, &[6]);
            w.attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
            w.attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
            w.end_nest();
            w.end_nest();
        };
        tuple(&mut w, CTA_TUPLE_ORIG, [10, 1, 0, 9], [192, 168, 5, 2], 40000, 8100);
        tuple(&mut w, CTA_TUPLE_REPLY, [10, 0, 0, 5], [10, 1, 0, 9], 8000, 40000);
        w.u32(CTA_STATUS, 0x188 | IPS_DST_NAT);
        w.begin_nest(CTA_PROTOINFO);
        w.begin_nest(CTA_PROTOINFO_TCP);
        w.attr(CTA_PROTOINFO_TCP_STATE, &[1]);
        w.end_nest();
        w.end_nest();
        w.u32(CTA_TIMEOUT, 118);
        w.u32(CTA_ID, 7);
        w.end_msg();
        w.bytes()[wire::NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn a_dumped_flow_is_read_with_its_nat_and_state() {
        let f = Flow::parse(&dumped_syn_sent()).expect("a flow");
        let sa = |s: &str| s.parse::<SocketAddrV4>().expect("literal");
        assert!(!f.udp);
        assert_eq!(f.original, (sa("10.1.0.9:40000"), sa("192.168.5.2:8100")));
        assert_eq!(f.reply, (sa("10.0.0.5:8000"), sa("10.1.0.9:40000")));
        assert!(f.dst_nat);
        assert_eq!(f.tcp_state, Some(TcpState::SynSent));
        assert_eq!(f.timeout, Some(118));
        assert_eq!(f.id, Some(7));
    }

    #[test]
    fn the_delete_request_names_the_original_tuple_and_the_id() {
        let f = Flow::parse(&dumped_syn_sent()).expect("a flow");
        let mut w = Writer::default();
        f.write_delete(&mut w, 3);
        let b = w.bytes();
        let m = wire::messages(b).next().expect("one message");
        assert_eq!((m.ty, m.seq), (0x0102, 3));
        // nlmsg_flags: request and ack; nfgenmsg: AF_INET, version 0, res_id 0.
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), F_REQUEST | F_ACK);
        assert_eq!(&m.payload[..4], &[2, 0, 0, 0]);
        let attrs = &m.payload[4..];
        // The tuple is the dump's original one, nested (flag 0x8000 on its type).
        assert_eq!(u16::from_ne_bytes([attrs[2], attrs[3]]), CTA_TUPLE_ORIG | 0x8000);
        let orig = wire::attr(attrs, CTA_TUPLE_ORIG).expect("tuple");
        let dumped = dumped_syn_sent();
        let dumped = wire::attr(&dumped[4..], CTA_TUPLE_ORIG).expect("tuple");
        assert_eq!(orig, dumped);
        assert_eq!(wire::attr(attrs, CTA_ID), Some(&7u32.to_be_bytes()[..]));
        assert_eq!(wire::attrs(attrs).count(), 2);
    }

    #[test]
    fn what_is_not_a_whole_tcp_or_udp_flow_is_skipped() {
        let whole = dumped_syn_sent();
        for cut in 0..whole.len() {
            // A truncated message never panics; most cuts lose the reply tuple.
            let _ = Flow::parse(&whole[..cut]);
        }
        assert!(Flow::parse(&whole[..whole.len() / 2]).is_none());
        let mut icmp = whole.clone();
        // The protocol number of both tuples: 6 → 1.
        for i in 0..icmp.len() - 8 {
            if icmp[i..i + 5] == [5, 0, 1, 0, 6] {
                icmp[i + 4] = 1;
            }
        }
        assert!(Flow::parse(&icmp).is_none());
    }
}
