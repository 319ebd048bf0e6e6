//! Fuzzing the rx thread (not for the agent): what peers send, through the steps of
//! `rx_loop` and `receive_one` without the sockets and the TUN: the GRO split into datagrams,
//! the oversize check, boringtun's decryption, [`check_decrypted`], and the train that
//! coalesces decrypted packets.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::gro;
use super::rx::{check_decrypted, datagrams};

/// The peer's underlay and tunnel addresses, as the rx thread would know them.
const PEER_ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PEER_TUNNEL: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const OUR_TUNNEL: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const OUR_ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// An rx slot at the default MTU: `buf_size` is at least 2048, slots are 32 bytes more.
const SLOT: usize = 2048 + 32;
/// The one encrypted network here.
const VNI: u32 = 4097;
const DATA_PORT: u16 = crate::DEFAULT_DATA_PORT;

/// One receive buffer from the peer. The first byte's low bit picks what the rest is: 0, the
/// datagrams as they arrive (hostile ciphertext, handshakes, cookies) into a fresh session; 1,
/// plaintext packets the peer encrypts after a real handshake, so they reach everything after
/// decryption. Its upper bits times 8 are the GRO segment size (0: the buffer is one datagram).
/// Nothing may panic, and only packets that pass the checks may join a train.
pub fn receive(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let seg = usize::from(first >> 1) * 8;
    let (mut ours, mut theirs) = pair();
    let from = IpAddr::V4(PEER_ENDPOINT);
    let mut out = vec![0u8; SLOT];
    let mut vnis = BTreeSet::new();
    vnis.insert(VNI);
    let mut train = Train::default();
    if first & 1 == 0 {
        for datagram in datagrams(rest, seg) {
            if let Some((len, src)) = decrypt(&mut ours, from, datagram, &mut out) {
                train.offer(&out[..len], src, &vnis);
            }
        }
    } else {
        let mut wire = vec![0u8; rest.len().max(SLOT) + 256];
        handshake(&mut ours, &mut theirs, &mut out, &mut wire);
        for pkt in datagrams(rest, seg) {
            let TunnResult::WriteToNetwork(datagram) = theirs.encapsulate(pkt, &mut wire) else {
                continue;
            };
            if let Some((len, src)) = decrypt(&mut ours, from, datagram, &mut out) {
                train.offer(&out[..len], src, &vnis);
            }
        }
    }
    train.finish();
}

/// Our session with the peer and the peer's with us, from fixed keys.
fn pair() -> (Tunn, Tunn) {
    let our_secret = StaticSecret::from([0x11; 32]);
    let their_secret = StaticSecret::from([0x22; 32]);
    let our_public = PublicKey::from(&our_secret);
    let their_public = PublicKey::from(&their_secret);
    let ours = Tunn::new(our_secret, their_public, None, None, 1, None);
    let theirs = Tunn::new(their_secret, our_public, None, None, 2, None);
    (ours, theirs)
}

/// The peer initiates, we answer, the peer completes: both sides then have a session.
fn handshake(ours: &mut Tunn, theirs: &mut Tunn, out: &mut [u8], wire: &mut [u8]) {
    let TunnResult::WriteToNetwork(init) = theirs.format_handshake_initiation(wire, false) else {
        panic!("the peer makes no handshake initiation");
    };
    let init = init.to_vec();
    let TunnResult::WriteToNetwork(resp) = ours.decapsulate(Some(PEER_ENDPOINT.into()), &init, out)
    else {
        panic!("no handshake response to a valid initiation");
    };
    let resp = resp.to_vec();
    let _ = theirs.decapsulate(Some(OUR_ENDPOINT.into()), &resp, out);
}

/// One datagram as `receive_one` handles it: the decrypted packet's length in `out` and its
/// source, or `None` when there is nothing for the TUN.
fn decrypt(
    ours: &mut Tunn,
    from: IpAddr,
    datagram: &[u8],
    out: &mut [u8],
) -> Option<(usize, Ipv4Addr)> {
    // boringtun panics when the output is smaller than the ciphertext; receive_one drops these.
    if datagram.len() > out.len() {
        return None;
    }
    match ours.decapsulate(Some(from), datagram, out) {
        TunnResult::WriteToNetwork(_) => {
            while let TunnResult::WriteToNetwork(_) = ours.decapsulate(None, &[], out) {}
            None
        }
        TunnResult::WriteToTunnelV4(pkt, src) => Some((pkt.len(), src)),
        _ => None,
    }
}

/// The coalescing decisions of `RxTrain`, on copies of the packets.
#[derive(Default)]
struct Train {
    head: Vec<u8>,
    train: Option<gro::Train>,
    count: usize,
}

impl Train {
    /// A decrypted packet: dropped unless it passes the rx checks, then joins the train or
    /// starts the next one.
    fn offer(&mut self, pkt: &[u8], src: Ipv4Addr, vnis: &BTreeSet<u32>) {
        if check_decrypted(pkt, src, PEER_TUNNEL, OUR_TUNNEL, DATA_PORT, vnis).is_err() {
            return;
        }
        assert_eq!(src, PEER_TUNNEL);
        let seg = gro::segment(pkt, DATA_PORT);
        if let (Some(t), Some(s)) = (&mut self.train, seg)
            && gro::same_flow(&self.head, pkt)
            && t.push(s)
        {
            self.count += 1;
            assert!(self.count <= gro::MAX_SEGMENTS);
            return;
        }
        self.finish();
        self.head = pkt.to_vec();
        self.count = 1;
        self.train = seg.map(gro::Train::start);
    }

    /// Writes the train's headers as `RxTrain::flush` does.
    fn finish(&mut self) {
        if let Some(t) = self.train.take()
            && self.count > 1
        {
            assert_eq!(t.count, self.count);
            let _ = gro::finish(&mut self.head[..gro::HDR_LEN], &t);
        }
        self.count = 0;
    }
}
