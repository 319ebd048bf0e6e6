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

/// Certificate handling on hostile bytes, the first byte picking the path: a CSR the leader is
/// asked to sign (what a joiner or a renewing node sends), a certificate PEM, or the DER a QUIC
/// peer presents. Nothing panics; a signed CSR yields a certificate that names exactly the node
/// and role the CA chose, never what the CSR asked for.
pub fn cert_and_csr(data: &[u8]) {
    use crate::model::{NodeId, Role};
    use crate::pki::{ClusterCa, cert_der_from_pem, cert_info};
    static CA: std::sync::OnceLock<Option<ClusterCa>> = std::sync::OnceLock::new();
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            let Ok(csr) = std::str::from_utf8(rest) else { return };
            let Some(ca) = CA.get_or_init(|| ClusterCa::generate().ok()) else { return };
            let node = NodeId(0x5eed);
            if let Ok(pem) = ca.sign_csr(csr, node, Role::Worker) {
                let der = cert_der_from_pem(&pem).expect("a certificate the CA just signed");
                let info = cert_info(&der).expect("a node certificate");
                assert_eq!((info.node, info.role), (node, Role::Worker));
            }
        }
        1 => {
            if let Ok(pem) = std::str::from_utf8(rest)
                && let Ok(der) = cert_der_from_pem(pem)
            {
                let _ = cert_info(&der);
            }
        }
        _ => {
            let _ = cert_info(rest);
        }
    }
}
