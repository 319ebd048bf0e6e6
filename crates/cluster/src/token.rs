//! Join tokens in Docker's format: `SWMTKN-1-<CA digest>-<secret>`.
//!
//! The digest is the SHA-256 of the cluster CA certificate (DER) in base36, zero-padded to 50
//! characters; the secret is 128 random bits in base36, zero-padded to 25. A joiner pins the CA by
//! the digest; the manager checks the secret against the current one for the token's role.

use std::fmt;

use crate::base36::{decode_base36, encode_base36};
use crate::model::Role;

/// Prefix of every version-1 token.
pub const TOKEN_PREFIX: &str = "SWMTKN-1-";
/// Length of the CA digest part (base36 of 256 bits).
pub const DIGEST_LEN: usize = 50;
/// Length of the secret part (base36 of 128 bits).
pub const SECRET_LEN: usize = 25;

/// Why a token string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token does not start with `SWMTKN-1-`.
    #[error("invalid join token: it must start with {TOKEN_PREFIX}")]
    Prefix,
    /// The token does not have the `<digest>-<secret>` shape.
    #[error("invalid join token: expected SWMTKN-1-<50-char CA digest>-<25-char secret>")]
    Shape,
    /// The CA digest part is not 50 base36 characters of a 256-bit number.
    #[error("invalid join token: the CA digest must be {DIGEST_LEN} base36 characters")]
    Digest,
    /// The secret part is not 25 base36 characters of a 128-bit number.
    #[error("invalid join token: the secret must be {SECRET_LEN} base36 characters")]
    Secret,
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the CA certificate's DER.
    pub ca_digest: [u8; 32],
    /// The role secret.
    pub secret: [u8; 16],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret grants membership; keep it out of logs.
        write!(f, "JoinToken({}…)", &encode_base36(&self.ca_digest, DIGEST_LEN)[..8])
    }
}

impl JoinToken {
    /// Parses `SWMTKN-1-<digest>-<secret>`; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<JoinToken, TokenError> {
        let rest = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let (digest, secret) = rest.split_once('-').ok_or(TokenError::Shape)?;
        if digest.len() != DIGEST_LEN {
            return Err(TokenError::Digest);
        }
        if secret.len() != SECRET_LEN {
            return Err(TokenError::Secret);
        }
        let ca_digest = decode_base36::<32>(digest).ok_or(TokenError::Digest)?;
        let secret = decode_base36::<16>(secret).ok_or(TokenError::Secret)?;
        Ok(JoinToken { ca_digest, secret })
    }

    /// The CA digest as it appears in the token.
    pub fn digest_text(&self) -> String {
        encode_base36(&self.ca_digest, DIGEST_LEN)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}{}-{}",
            encode_base36(&self.ca_digest, DIGEST_LEN),
            encode_base36(&self.secret, SECRET_LEN)
        )
    }
}

/// SHA-256 of a DER certificate, the digest a token pins.
pub fn ca_digest(ca_der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, ca_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A fresh 128-bit secret from the system RNG.
pub fn new_secret() -> [u8; 16] {
    use ring::rand::SecureRandom;
    let mut s = [0u8; 16];
    // The system RNG does not fail on Linux; a zero secret would still be rejected by nobody,
    // so fall back to a time-seeded hash only if it ever does.
    if ring::rand::SystemRandom::new().fill(&mut s).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, &t.to_le_bytes());
        s.copy_from_slice(&d.as_ref()[..16]);
    }
    s
}

/// Which role a secret belongs to, compared in constant time; `None` when it matches neither.
pub fn role_of_secret(secret: &[u8; 16], worker: &[u8; 16], manager: &[u8; 16]) -> Option<Role> {
    let w = ring_eq(secret, worker);
    let m = ring_eq(secret, manager);
    if m {
        Some(Role::Manager)
    } else if w {
        Some(Role::Worker)
    } else {
        None
    }
}

fn ring_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn format_matches_docker_shape() {
        let t = JoinToken { ca_digest: [0xff; 32], secret: [0xff; 16] };
        let s = t.to_string();
        assert!(s.starts_with("SWMTKN-1-"));
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[2].len(), DIGEST_LEN);
        assert_eq!(parts[3].len(), SECRET_LEN);
        assert_eq!(JoinToken::parse(&s), Ok(t));
    }

    #[test]
    fn small_values_are_zero_padded() {
        let mut d = [0u8; 32];
        d[31] = 35;
        assert_eq!(encode_base36(&d, 50), format!("{}z", "0".repeat(49)));
        let mut s = [0u8; 16];
        s[15] = 36;
        assert_eq!(encode_base36(&s, 25), format!("{}10", "0".repeat(23)));
    }

    #[test]
    fn parse_errors_name_the_part() {
        assert_eq!(JoinToken::parse("SWMTKN-2-abc"), Err(TokenError::Prefix));
        assert_eq!(JoinToken::parse("SWMTKN-1-abc"), Err(TokenError::Shape));
        assert_eq!(
            JoinToken::parse(&format!("SWMTKN-1-{}-{}", "0".repeat(49), "0".repeat(25))),
            Err(TokenError::Digest)
        );
        assert_eq!(
            JoinToken::parse(&format!("SWMTKN-1-{}-{}", "0".repeat(50), "0".repeat(24))),
            Err(TokenError::Secret)
        );
        assert_eq!(
            JoinToken::parse(&format!("SWMTKN-1-{}-{}", "!".repeat(50), "0".repeat(25))),
            Err(TokenError::Digest)
        );
        // 36^25 - 1 is more than 128 bits.
        assert_eq!(
            JoinToken::parse(&format!("SWMTKN-1-{}-{}", "0".repeat(50), "z".repeat(25))),
            Err(TokenError::Secret)
        );
        assert!(TokenError::Digest.to_string().contains("CA digest"));
    }

    #[test]
    fn secrets_map_to_roles() {
        let w = [1u8; 16];
        let m = [2u8; 16];
        assert_eq!(role_of_secret(&w, &w, &m), Some(Role::Worker));
        assert_eq!(role_of_secret(&m, &w, &m), Some(Role::Manager));
        assert_eq!(role_of_secret(&[3u8; 16], &w, &m), None);
    }

    proptest! {
        #[test]
        fn roundtrip(d in proptest::array::uniform32(any::<u8>()), s in proptest::array::uniform16(any::<u8>())) {
            let t = JoinToken { ca_digest: d, secret: s };
            prop_assert_eq!(JoinToken::parse(&t.to_string()), Ok(t));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,120}") {
            let _ = JoinToken::parse(&text);
        }
    }
}
