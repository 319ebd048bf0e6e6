//! Join-token parsing on hostile text: never panics; accepted tokens print back to an equal token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_cluster::JoinToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = JoinToken::parse(text) {
            assert_eq!(JoinToken::parse(&t.to_string()), Ok(t));
        }
    }
});
