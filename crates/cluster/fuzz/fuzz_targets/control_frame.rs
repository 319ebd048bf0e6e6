//! The control-plane frame decoder on hostile bytes: it must never panic, and anything it accepts
//! must re-encode to a frame that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_cluster::wire::{MAX_ANON_FRAME, Request, Response, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_frame::<Request>(data, MAX_ANON_FRAME) {
        let again = encode_frame(&req);
        assert!(decode_frame::<Request>(&again, usize::MAX).is_ok());
    }
    let _ = decode_frame::<Response>(data, MAX_ANON_FRAME);
});
