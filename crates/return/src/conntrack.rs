//! The kernel path's conntrack flows leave with their backend.
//!
//! Only a flow's first packet passes the node's nat chain ([`crate::kernel`]), so conntrack
//! keeps sending a flow where it first went even after its backend has left the port's map.
//! That is right for an established TCP connection (a draining backend finishes it), but wrong
//! for two kinds of flow:
//!
//! - a TCP flow whose handshake never completed (its backend's node was cut off or killed):
//!   the node's timeout policy lets one in `SYN_SENT` go a second after its SYN
//!   ([`crate::kernel::SYN_TIMEOUT`]), but one in `SYN_RECV` stays a minute, and until it goes
//!   a client that connects again from the same address and port sends a SYN that conntrack
//!   takes for a retransmission of the old one, and sends to the backend that left;
//! - a UDP flow: it has no close, so a client that keeps sending never reaches another backend.
//!
//! So when backends leave a port's map, the node deletes those of their flows over ctnetlink
//! ([`purge`]): the next packet of such a flow is a new flow, and the nat chain picks again.

use std::net::Ipv4Addr;

use shoal_netns::NetNs;
use shoal_nft::conntrack::{self, Flow, TcpState};

use crate::Error;
use crate::kernel::{nsname, run_in};

/// A backend that left a port's map: the task's ingress address and port, TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Left {
    /// The task's ingress address.
    pub addr: Ipv4Addr,
    /// The task's port (the port's target).
    pub port: u16,
    /// UDP rather than TCP.
    pub udp: bool,
}

/// Whether `flow` leaves with the backend `left`: a flow the node DNAT-ed to it that is UDP,
/// or TCP not (or no longer) past its handshake. Established and closing TCP flows stay.
pub fn leaves_with(flow: &Flow, left: &Left) -> bool {
    let to_it = flow.dst_nat
        && flow.udp == left.udp
        && *flow.reply.0.ip() == left.addr
        && flow.reply.0.port() == left.port;
    let unfinished = match flow.tcp_state {
        None => true,
        Some(TcpState::SynSent | TcpState::SynRecv | TcpState::Other(_)) => true,
        Some(TcpState::Established | TcpState::Closing) => false,
    };
    to_it && unfinished
}

/// Deletes, in `node` (`None` for the calling process's namespace), the flows that leave with
/// each backend of `left`, and returns how many went for each (in `left`'s order). Blocking:
/// call it off the async runtime.
pub fn purge(node: Option<&NetNs>, left: &[Left]) -> Result<Vec<usize>, Error> {
    let err = |source| Error::Conntrack { ns: nsname(node), source };
    if left.is_empty() {
        return Ok(Vec::new());
    }
    run_in(node, || {
        let flows = conntrack::flows()?;
        left.iter()
            .map(|l| {
                let doomed: Vec<Flow> =
                    flows.iter().filter(|f| leaves_with(f, l)).cloned().collect();
                conntrack::delete(&doomed)
            })
            .collect::<Result<Vec<usize>, shoal_nft::Error>>()
    })?
    .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().expect("test literal")
    }

    /// A client's flow to node port 8100, DNAT-ed to `backend`.
    fn flow(udp: bool, backend: &str, state: Option<TcpState>) -> Flow {
        let client = sa("10.1.0.9:40000");
        Flow::new(udp, (client, sa("192.168.5.2:8100")), (sa(backend), client), true, state)
    }

    #[test]
    fn unfinished_tcp_and_all_udp_leave_established_tcp_stays() {
        let left = Left { addr: "10.0.0.5".parse().expect("literal"), port: 8000, udp: false };
        let udp_left = Left { udp: true, ..left };
        for (state, leaves) in [
            (TcpState::SynSent, true),
            (TcpState::SynRecv, true),
            (TcpState::Other(0), true),
            (TcpState::Established, false),
            (TcpState::Closing, false),
        ] {
            assert_eq!(leaves_with(&flow(false, "10.0.0.5:8000", Some(state)), &left), leaves);
        }
        assert!(leaves_with(&flow(true, "10.0.0.5:8000", None), &udp_left));
        // Another backend, another port, the other protocol, or a flow the node did not DNAT.
        let syn = Some(TcpState::SynSent);
        assert!(!leaves_with(&flow(false, "10.0.0.7:8000", syn), &left));
        assert!(!leaves_with(&flow(false, "10.0.0.5:8001", syn), &left));
        assert!(!leaves_with(&flow(true, "10.0.0.5:8000", None), &left));
        assert!(!leaves_with(&flow(false, "10.0.0.5:8000", syn), &udp_left));
        let mut plain = flow(false, "10.0.0.5:8000", syn);
        plain.dst_nat = false;
        assert!(!leaves_with(&plain, &left));
    }
}
