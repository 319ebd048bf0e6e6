//! Fuzzing entry points (not for the agent): each function is one fuzz target's body, called
//! both by the cargo-fuzz binary in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the
//! committed corpus on stable. Each panics if an invariant breaks.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::driver::read_frame;
use crate::wire::{Frame, FrameRepr, Kind};
use crate::{Core, CoreConfig, CoreOptions, Keyring, NodeId, NodeMeta, msg};

const KEY: [u8; 32] = [0x5a; 32];

/// A core that has joined one network, with a keyring sealing under its cluster key.
fn core(now: Instant) -> Option<(Core, Keyring)> {
    let opts = CoreOptions {
        addr: "10.0.0.1:7946".parse().expect("literal"),
        node: NodeId(1),
        generation: 1,
        meta: NodeMeta::default(),
        keys: vec![KEY],
        seed: 1,
        config: CoreConfig::lan(),
    };
    let mut core = Core::new(opts, now).ok()?;
    let _ = core.join_network(now, "net");
    Some((core, Keyring::new(&[KEY], 2).expect("valid key")))
}

fn peer() -> SocketAddr {
    "10.0.0.2:7946".parse().expect("literal")
}

/// Lets the core run its timers and drains everything it produced.
fn settle(core: &mut Core, now: Instant) {
    core.handle_timeout(now + Duration::from_secs(2));
    while core.poll_transmit().is_some() {}
    while core.poll_event().is_some() {}
    let _ = core.metrics();
}

/// Hostile bytes into every decoder of the gossip core: the frame view, the keyring, the
/// postcard messages (items, syncs, suspicion checks), and the whole receive path (raw, and
/// sealed with the cluster key so the bytes reach foca's and our decoders behind the AEAD).
/// The first byte picks the path. Nothing may panic.
pub fn decode(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if let Ok(f) = Frame::new_checked(rest) {
        let _ = FrameRepr::parse(&f);
    }
    let _ = msg::decode_item(rest, 1400);
    let _ = msg::decode_sync(rest, 1 << 20);
    let _ = msg::decode_check(rest, 1400);

    let now = Instant::now();
    let Some((mut core, mut ring)) = core(now) else {
        return;
    };
    let from = peer();
    match mode % 5 {
        0 => core.handle_udp(now, from, rest),
        1 => core.handle_udp(now, from, &ring.seal(Kind::Swim, rest)),
        2 => {
            let _ = core.handle_sync(now, from, &ring.seal(Kind::SyncRequest, rest));
        }
        3 => core.handle_udp(now, from, &ring.seal(Kind::Check, rest)),
        _ => {
            let _ = core.handle_sync(now, from, rest);
        }
    }
    settle(&mut core, now);
}

/// What a peer sends on a gossip TCP sync connection: length-prefixed frames read by the
/// driver's framing, each handed to the core as it arrives and again sealed with the cluster
/// key (so it reaches the sync decoders). Every frame read must be exactly the length its
/// prefix announced and within the limit; nothing may panic.
pub fn sync_stream(data: &[u8]) {
    let max = CoreConfig::lan().max_sync_frame;
    let now = Instant::now();
    let Some((mut core, mut ring)) = core(now) else {
        return;
    };
    let from = peer();
    let mut stream = data;
    loop {
        let before = stream.len();
        let Ok(frame) = runtime().block_on(read_frame(&mut stream, max)) else {
            break;
        };
        assert!(frame.len() <= max);
        assert_eq!(before - stream.len(), 4 + frame.len());
        let _ = core.handle_sync(now, from, &frame);
        let _ = core.handle_sync(now, from, &ring.seal(Kind::SyncRequest, &frame));
    }
    settle(&mut core, now);
}

/// One runtime for every input: building one per input would dominate a fuzzing run.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().build().expect("current-thread runtime")
    })
}
