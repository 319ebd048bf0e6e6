//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through the function its fuzz
//! target calls, so the corpora run in an ordinary `cargo test` on stable; a longer search is
//! `cargo +nightly fuzz run <target>` in `fuzz/`.

fn replay(name: &str, target: fn(&[u8])) {
    shoal_netns::testing::replay_corpus(env!("CARGO_MANIFEST_DIR"), name, target);
}

#[test]
fn control_frame() {
    replay("control_frame", shoal_cluster::fuzzing::control_frame);
}

#[test]
fn join_token() {
    replay("join_token", shoal_cluster::fuzzing::join_token);
}

#[test]
fn cert_and_csr() {
    replay("cert_and_csr", shoal_cluster::fuzzing::cert_and_csr);
}
