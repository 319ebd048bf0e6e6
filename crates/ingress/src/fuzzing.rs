//! Fuzzing entry points (not for the agent): each function is one fuzz target's body, called
//! both by the cargo-fuzz binary in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the
//! committed corpus on stable. Each panics if an invariant breaks.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::control::{http_status_ok, read_check_response};
use crate::proxy_protocol::{self, Command, Header, MAX_EMIT_LEN};

/// The PROXY protocol parser on arbitrary bytes: never panics, never claims more bytes than it
/// got, and whatever it accepts re-emits to bytes that parse to the same header.
pub fn proxy_header(data: &[u8]) {
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
}

/// What a backend answers to the mesh's HTTP health check: the first byte sets how many bytes
/// each read returns (a backend may dribble its answer), the rest is the answer. The check's
/// read loop must never panic and must judge only the status line, however it was split.
pub fn health_response(data: &[u8]) {
    let Some((&step, answer)) = data.split_first() else {
        return;
    };
    let mut backend = Dribble { data: answer, step: usize::from(step).max(1) };
    let verdict = runtime().block_on(read_check_response(&mut backend));
    assert_eq!(verdict, Some(http_status_ok(answer)));
}

/// One runtime for every input: building one per input would dominate a fuzzing run.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().build().expect("current-thread runtime")
    })
}

/// A peer that hands over at most `step` bytes per read, then EOF.
struct Dribble<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Dribble<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}
