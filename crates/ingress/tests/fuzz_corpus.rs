//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through the function its fuzz
//! target calls, so the corpora run in an ordinary `cargo test` on stable; a longer search is
//! `cargo +nightly fuzz run <target>` in `fuzz/`.

use std::path::Path;

/// Runs `target` on each file of its corpus; fails if the corpus is missing or empty.
fn replay(name: &str, target: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(name);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Printed only when the test fails: names the input that broke an invariant.
        eprintln!("replaying {}", path.display());
        target(&data);
        count += 1;
    }
    assert!(count > 0, "{} holds no inputs", dir.display());
}

#[test]
fn proxy_header() {
    replay("proxy_header", shoal_ingress::fuzzing::proxy_header);
}

#[test]
fn health_response() {
    replay("health_response", shoal_ingress::fuzzing::health_response);
}
