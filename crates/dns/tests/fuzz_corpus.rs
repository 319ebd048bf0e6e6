//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through the function its fuzz
//! target calls, so the corpora run in an ordinary `cargo test` on stable; a longer search is
//! `cargo +nightly fuzz run <target>` in `fuzz/`.

fn replay(name: &str, target: fn(&[u8])) {
    shoal_netns::testing::replay_corpus(env!("CARGO_MANIFEST_DIR"), name, target);
}

#[test]
fn request() {
    replay("request", shoal_dns::fuzzing::request);
}

#[test]
fn forward_reply() {
    replay("forward_reply", shoal_dns::fuzzing::forward_reply);
}
