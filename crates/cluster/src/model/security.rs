//! The swarm's security settings as store data, and how the store changes them: how long node
//! certificates live (`--cert-expiry`), how often the gossip key turns over
//! (`--gossip-key-rotation`), and where a CA rotation stands (`crate::ca` drives its steps).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ClusterInfo;

/// The swarm CA certificate's life (20 years); no node certificate may outlive it.
pub const CA_VALIDITY: Duration = Duration::from_secs(630_720_000);

/// Node certificate validity unless `--cert-expiry` says otherwise (Swarm: 90 days).
pub const DEFAULT_CERT_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);
/// The shortest `--cert-expiry` (Swarm's minimum).
pub const MIN_CERT_EXPIRY: Duration = Duration::from_secs(3600);
/// The longest `--cert-expiry`: no node certificate outlives the CA's 20 years.
pub const MAX_CERT_EXPIRY: Duration = CA_VALIDITY;
/// The shortest `--gossip-key-rotation`: one rotation waits for every node to confirm each of
/// its steps, which takes a few heartbeats.
pub const MIN_GOSSIP_KEY_ROTATION: Duration = Duration::from_secs(60);

/// The swarm-wide settings `swarm init` and `swarm update` set, kept in [`ClusterInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityConfig {
    /// Validity of node certificates, seconds (`--cert-expiry`).
    pub cert_expiry_secs: u64,
    /// How often the leader replaces the gossip key, seconds (`--gossip-key-rotation`); `None`
    /// leaves it to each manager's agent configuration.
    #[serde(default)]
    pub gossip_key_rotation_secs: Option<u64>,
    /// A CA rotation under way.
    #[serde(default)]
    pub ca_rotation: Option<CaRotation>,
}

impl Default for SecurityConfig {
    fn default() -> SecurityConfig {
        SecurityConfig {
            cert_expiry_secs: DEFAULT_CERT_EXPIRY.as_secs(),
            gossip_key_rotation_secs: None,
            ca_rotation: None,
        }
    }
}

impl SecurityConfig {
    /// Validity of node certificates.
    pub fn cert_expiry(&self) -> Duration {
        Duration::from_secs(self.cert_expiry_secs)
    }
}

/// Where a CA rotation is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaRotation {
    /// Step 1: nodes add the new CA to what they trust; the current CA still signs.
    Trust {
        /// The new CA's certificate, PEM.
        cert_pem: String,
        /// The new CA's key, PEM (only managers hold the store).
        key_pem: String,
    },
    /// Step 2: the new CA signs (it is the current one now); nodes still trust the old one
    /// while they renew.
    Renew {
        /// The old CA's certificate, PEM.
        old_cert_pem: String,
    },
}

/// `swarm update`: the settings to change (`None` keeps one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmUpdate {
    /// `--cert-expiry`, seconds.
    pub cert_expiry_secs: Option<u64>,
    /// `--gossip-key-rotation`, seconds.
    pub gossip_key_rotation_secs: Option<u64>,
}

/// A change to the security settings; the payload of `Command::Security`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaStep {
    /// `swarm update`.
    Update(SwarmUpdate),
    /// Rotation step 1: trust a new CA.
    Trust {
        /// Its certificate, PEM.
        cert_pem: String,
        /// Its key, PEM.
        key_pem: String,
    },
    /// Rotation step 2: sign with it.
    Renew,
    /// Rotation step 3: stop trusting the old CA.
    Finish,
}

/// Checks a `--cert-expiry`; the error names the flag and the bounds.
pub fn check_cert_expiry(d: Duration) -> Result<(), String> {
    if d < MIN_CERT_EXPIRY || d > MAX_CERT_EXPIRY {
        return Err(format!(
            "--cert-expiry {} is out of range: it must be between 1h and 175200h (20 years, the CA's validity)",
            format_duration(d)
        ));
    }
    Ok(())
}

/// Checks a `--gossip-key-rotation`.
pub fn check_gossip_key_rotation(d: Duration) -> Result<(), String> {
    if d < MIN_GOSSIP_KEY_ROTATION {
        return Err(format!(
            "--gossip-key-rotation {} is too short: it must be at least 1m",
            format_duration(d)
        ));
    }
    Ok(())
}

/// Applies a step to the cluster settings (inside the state machine, so every manager agrees);
/// a step out of order is refused and changes nothing.
pub fn apply(info: &mut ClusterInfo, step: &CaStep) -> Result<(), String> {
    let sec = &mut info.security;
    match step {
        CaStep::Update(u) => {
            if let Some(s) = u.cert_expiry_secs {
                check_cert_expiry(Duration::from_secs(s))?;
            }
            if let Some(s) = u.gossip_key_rotation_secs {
                check_gossip_key_rotation(Duration::from_secs(s))?;
            }
            sec.cert_expiry_secs = u.cert_expiry_secs.unwrap_or(sec.cert_expiry_secs);
            sec.gossip_key_rotation_secs =
                u.gossip_key_rotation_secs.or(sec.gossip_key_rotation_secs);
        }
        CaStep::Trust { cert_pem, key_pem } => {
            if sec.ca_rotation.is_some() {
                return Err("a CA rotation is already under way".into());
            }
            sec.ca_rotation =
                Some(CaRotation::Trust { cert_pem: cert_pem.clone(), key_pem: key_pem.clone() });
        }
        CaStep::Renew => {
            let Some(CaRotation::Trust { cert_pem, key_pem }) = sec.ca_rotation.take() else {
                return Err("no CA rotation is at its trust step".into());
            };
            let old_cert_pem = std::mem::replace(&mut info.ca_cert_pem, cert_pem);
            info.ca_key_pem = key_pem;
            info.security.ca_rotation = Some(CaRotation::Renew { old_cert_pem });
        }
        CaStep::Finish => {
            if !matches!(sec.ca_rotation, Some(CaRotation::Renew { .. })) {
                return Err("no CA rotation is at its renew step".into());
            }
            sec.ca_rotation = None;
        }
    }
    Ok(())
}

/// Parses a duration as Docker takes one (Go's syntax): `2160h`, `90m`, `1h30m`, `45s`, `1.5h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {text:?}: use a number and a unit (h, m, s, ms), e.g. 2160h or 1h30m"
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad()),
        };
        rest = &rest[u..];
        total += value * unit;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Writes a duration the way [`parse_duration`] reads it, in whole hours, minutes and seconds.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_docker() {
        assert_eq!(parse_duration("2160h"), Ok(Duration::from_secs(2160 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        for bad in ["", "h", "10", "10d", "-1h", "1h-", "abc", "1e3h"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("invalid duration"), "{e}");
        }
        assert_eq!(format_duration(Duration::from_secs(2160 * 3600)), "2160h");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(0)), "0s");
    }

    #[test]
    fn bounds_name_the_flag() {
        assert!(check_cert_expiry(Duration::from_secs(3600)).is_ok());
        assert!(
            check_cert_expiry(Duration::from_secs(59 * 60))
                .unwrap_err()
                .contains("--cert-expiry 59m")
        );
        assert!(check_cert_expiry(MAX_CERT_EXPIRY + Duration::from_secs(1)).is_err());
        assert!(
            check_gossip_key_rotation(Duration::from_secs(30)).unwrap_err().contains("at least 1m")
        );
    }
}
