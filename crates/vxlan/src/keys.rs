//! Node keys for encrypted overlays: X25519 (boringtun's x25519-dalek 2 re-export), written the
//! way WireGuard tools write them (base64 of the 32 bytes), so `wg` and wireguard-go interoperate.

use boringtun::x25519::{PublicKey, StaticSecret};

/// A node's WireGuard private key.
#[derive(Clone)]
pub struct NodeKey(StaticSecret);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey(public={})", encode_key(&self.public()))
    }
}

/// A key that is not 32 bytes of base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid WireGuard key (want 44 characters of base64 encoding 32 bytes) or no entropy to make one"
)]
pub struct KeyError;

impl NodeKey {
    /// A fresh random key from the system RNG (fails only if the OS has no entropy source).
    pub fn generate() -> Result<NodeKey, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let bytes: [u8; 32] = ring::rand::generate(&rng).map_err(|_| KeyError)?.expose();
        Ok(NodeKey(StaticSecret::from(bytes)))
    }

    /// A key from its 32 secret bytes (as stored in the agent's state).
    pub fn from_bytes(bytes: [u8; 32]) -> NodeKey {
        NodeKey(StaticSecret::from(bytes))
    }

    /// Parses the base64 text form `wg genkey` prints.
    pub fn from_base64(s: &str) -> Result<NodeKey, KeyError> {
        decode_key(s).map(NodeKey::from_bytes)
    }

    /// The secret bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key (what goes into gossip metadata).
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }

    pub(crate) fn secret(&self) -> StaticSecret {
        self.0.clone()
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 text of a 32-byte key (44 characters with one `=`).
pub fn encode_key(key: &[u8; 32]) -> String {
    let mut out = String::with_capacity(44);
    for chunk in key.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parses the base64 text of a 32-byte key.
pub fn decode_key(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.trim().as_bytes();
    if s.len() != 44 || s[43] != b'=' {
        return Err(KeyError);
    }
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = [0u8; 32];
    let mut n = 0;
    for &c in &s[..43] {
        let v = B64.iter().position(|&x| x == c).ok_or(KeyError)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            if n == 32 {
                return Err(KeyError);
            }
            out[n] = (bits >> nbits) as u8;
            n += 1;
        }
    }
    // 43 chars carry 258 bits: the last 2 must be zero in a canonical encoding.
    if n != 32 || bits & ((1 << nbits) - 1) != 0 {
        return Err(KeyError);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 7748 §6.1: Alice's private and public keys.
        let sk = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let k = NodeKey::from_bytes(sk);
        assert_eq!(
            k.public()[..4],
            [0x85, 0x20, 0xf0, 0x09],
            "X25519 public key of RFC 7748 Alice"
        );
        let text = encode_key(&sk);
        assert_eq!(text, "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=");
        assert_eq!(decode_key(&text), Ok(sk));
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(decode_key("short="), Err(KeyError));
        assert_eq!(decode_key("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LC!="), Err(KeyError));
        assert_eq!(
            decode_key("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCp="),
            Err(KeyError),
            "non-canonical trailing bits"
        );
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let a = NodeKey::generate().expect("entropy");
        let b = NodeKey::generate().expect("entropy");
        assert_ne!(a.public(), b.public());
        let t = encode_key(&a.to_bytes());
        assert_eq!(NodeKey::from_base64(&t).map(|k| k.public()), Ok(a.public()));
    }

    proptest::proptest! {
        #[test]
        fn base64_round_trips(k in proptest::array::uniform32(proptest::prelude::any::<u8>())) {
            proptest::prop_assert_eq!(decode_key(&encode_key(&k)), Ok(k));
        }
    }
}
