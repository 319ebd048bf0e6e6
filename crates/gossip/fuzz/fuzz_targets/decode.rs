//! Hostile bytes into every decoder of the gossip core: the frame view, the keyring, the
//! postcard messages (items, syncs, suspicion checks), and the whole receive path (raw, and sealed with the cluster key so the
//! bytes reach foca's and our decoders behind the AEAD). Nothing may panic.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_gossip::wire::{Frame, FrameRepr, Kind};
use shoal_gossip::{Core, CoreConfig, CoreOptions, Keyring, NodeId, NodeMeta, msg};

const KEY: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if let Ok(f) = Frame::new_checked(rest) {
        let _ = FrameRepr::parse(&f);
    }
    let _ = msg::decode_item(rest, 1400);
    let _ = msg::decode_sync(rest, 1 << 20);
    let _ = msg::decode_check(rest, 1400);

    let now = Instant::now();
    let from: SocketAddr = "10.0.0.2:7946".parse().expect("literal");
    let opts = CoreOptions {
        addr: "10.0.0.1:7946".parse().expect("literal"),
        node: NodeId(1),
        generation: 1,
        meta: NodeMeta::default(),
        keys: vec![KEY],
        seed: 1,
        config: CoreConfig::lan(),
    };
    let Ok(mut core) = Core::new(opts, now) else { return };
    let _ = core.join_network(now, "net");
    let mut ring = Keyring::new(&[KEY], 2).expect("valid key");
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
    core.handle_timeout(now + Duration::from_secs(2));
    while core.poll_transmit().is_some() {}
    while core.poll_event().is_some() {}
    let _ = core.metrics();
});
