//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through the function its fuzz
//! target calls, so the corpora run in an ordinary `cargo test` on stable; a longer search is
//! `cargo +nightly fuzz run <target>` in `fuzz/`.

fn replay(name: &str, target: fn(&[u8])) {
    shoal_netns::testing::replay_corpus(env!("CARGO_MANIFEST_DIR"), name, target);
}

#[test]
fn vxlan_wire() {
    replay("vxlan_wire", shoal_vxlan::fuzzing::vxlan_wire);
}

#[test]
fn tun_offload() {
    replay("tun_offload", shoal_vxlan::fuzzing::tun_offload);
}

#[test]
fn wg_receive() {
    replay("wg_receive", shoal_vxlan::fuzzing::wg_receive);
}
