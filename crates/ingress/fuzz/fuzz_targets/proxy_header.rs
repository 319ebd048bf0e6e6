//! PROXY protocol parser on arbitrary bytes: never panics, never claims more bytes than it got,
//! and whatever it accepts re-emits to bytes that parse to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_ingress::proxy_protocol::{self, Command, Header, MAX_EMIT_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok((h, n)) = proxy_protocol::parse(data) else {
        return;
    };
    assert!(n <= data.len());
    if let (Command::Proxy, Some((src, dst))) = (h.command, h.addrs) {
        let again = Header { addrs: Some((src, dst)), ..h };
        let mut buf = [0u8; MAX_EMIT_LEN];
        let len = again.emit_v2(&mut buf).expect("fits");
        let (back, used) = proxy_protocol::parse(&buf[..len]).expect("own output parses");
        assert_eq!(used, len);
        assert_eq!(back.addrs.map(|(s, d)| (s.port(), d.port())), Some((src.port(), dst.port())));
    }
});
