//! Fuzzing entry points (not for the agent): each function is one fuzz target's body, called
//! both by the cargo-fuzz binary in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the
//! committed corpus on stable. Each panics if an invariant breaks.

use crate::JoinToken;
use crate::wire::{MAX_ANON_FRAME, Request, Response, decode_frame, encode_frame};

/// The control-plane frame decoder on hostile bytes (what an anonymous QUIC peer sends): it must
/// never panic, and anything it accepts must re-encode to a frame that decodes again.
pub fn control_frame(data: &[u8]) {
    if let Ok(req) = decode_frame::<Request>(data, MAX_ANON_FRAME) {
        let again = encode_frame(&req);
        assert!(decode_frame::<Request>(&again, usize::MAX).is_ok());
    }
    let _ = decode_frame::<Response>(data, MAX_ANON_FRAME);
}

/// Join-token parsing on hostile text: never panics; accepted tokens print back to an equal
/// token.
pub fn join_token(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(t) = JoinToken::parse(text)
    {
        assert_eq!(JoinToken::parse(&t.to_string()), Ok(t));
    }
}
