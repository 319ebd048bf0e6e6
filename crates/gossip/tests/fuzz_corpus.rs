//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through the function its fuzz
//! target calls, so the corpora run in an ordinary `cargo test` on stable; a longer search is
//! `cargo +nightly fuzz run <target>` in `fuzz/`.

fn replay(name: &str, target: fn(&[u8])) {
    shoal_netns::testing::replay_corpus(env!("CARGO_MANIFEST_DIR"), name, target);
}

#[test]
fn decode() {
    replay("decode", shoal_gossip::fuzzing::decode);
}

#[test]
fn sync_stream() {
    replay("sync_stream", shoal_gossip::fuzzing::sync_stream);
}
