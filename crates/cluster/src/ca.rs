//! The swarm's certificate settings and CA rotation, pure: how long node certificates live
//! (`--cert-expiry`), when a node renews its own, how often the gossip key turns over
//! (`--gossip-key-rotation`), and the three steps of `swarm ca --rotate`.
//!
//! A CA rotation never leaves two nodes unable to talk:
//! 1. **trust**: the new CA is added to every node's trust bundle; the old CA still signs.
//! 2. **renew**: once every Ready node trusts both, the new CA signs; every node's session sees
//!    its certificate is from the old one and renews it.
//! 3. **finish**: once every Ready node holds a certificate from the new CA, the old one leaves
//!    the bundle, and a certificate it signed is refused at the handshake (and on connections
//!    opened before).
//!
//! The leader drives the steps (`Cluster::rotate_ca`) and learns where each node is from its
//! heartbeats ([`CaBook`]); the steps themselves are store commands ([`CaStep`]), so a new
//! leader picks a rotation up where the old one left it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{ClusterInfo, ClusterState, NodeId, NodeStatus};
use crate::pki::{ClusterCa, PkiError, cert_der_from_pem};
use crate::token::ca_digest;

/// Node certificate validity unless `--cert-expiry` says otherwise (Swarm: 90 days).
pub const DEFAULT_CERT_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);
/// The shortest `--cert-expiry` (Swarm's minimum).
pub const MIN_CERT_EXPIRY: Duration = Duration::from_secs(3600);
/// The longest `--cert-expiry`: no node certificate outlives the CA's 20 years.
pub const MAX_CERT_EXPIRY: Duration = crate::pki::CA_VALIDITY;
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

/// The answer to `swarm ca [--rotate]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaAnswer {
    /// The swarm's CA certificate, PEM (the new one after a rotation).
    pub cert_pem: String,
    /// Nodes that did not confirm a rotation step in time, and the like.
    pub warnings: Vec<String>,
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

/// The CA certificates every node must trust now, PEM, the one that signs first.
pub fn trusted_ca_pems(info: &ClusterInfo) -> Vec<String> {
    let mut v = vec![info.ca_cert_pem.clone()];
    match &info.security.ca_rotation {
        Some(CaRotation::Trust { cert_pem, .. }) => v.push(cert_pem.clone()),
        Some(CaRotation::Renew { old_cert_pem }) => v.push(old_cert_pem.clone()),
        None => {}
    }
    v
}

/// The CA that signs node certificates now.
pub fn signer(info: &ClusterInfo) -> Result<ClusterCa, PkiError> {
    ClusterCa::from_pem(&info.ca_cert_pem, &info.ca_key_pem)
}

/// SHA-256 of a CA certificate PEM (what join tokens and heartbeats name a CA by).
pub fn pem_digest(pem: &str) -> Result<[u8; 32], PkiError> {
    Ok(ca_digest(&cert_der_from_pem(pem)?))
}

/// Whether a node should renew a certificate valid from `not_before` to `not_after` (Unix
/// seconds) at `now`: past two thirds of its life (Swarm renews at a random point in 50–80 %),
/// or issued for longer than the swarm's `cert_expiry` now allows (after `swarm update`), so a
/// shorter expiry takes effect at the next heartbeat rather than months later.
pub fn renewal_due(not_before: i64, not_after: i64, now: i64, cert_expiry: Duration) -> bool {
    let life = not_after - not_before;
    if now >= not_before + life * 2 / 3 {
        return true;
    }
    // Certificates are backdated; an hour of slack on top absorbs clock skew.
    let allowed = cert_expiry.as_secs() as i64 + (crate::pki::BACKDATE.as_secs() * 2) as i64;
    life > allowed
}

/// What the leader last heard from each node about its certificate: the CAs it trusts and
/// the CA that signed its certificate (both by digest), from its heartbeats.
#[derive(Debug, Default)]
pub struct CaBook {
    nodes: BTreeMap<NodeId, CaReport>,
}

/// One node's word on its certificate, carried by every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaReport {
    /// Digests of the CAs the node trusts.
    pub trusts: Vec<[u8; 32]>,
    /// Digest of the CA that signed its certificate.
    pub signed_by: Option<[u8; 32]>,
}

impl CaBook {
    /// Records a heartbeat's report.
    pub fn handle_report(&mut self, node: NodeId, report: CaReport) {
        self.nodes.insert(node, report);
    }

    /// Host names of the Ready nodes whose last report does not satisfy `done`.
    pub fn lagging(&self, state: &ClusterState, done: impl Fn(&CaReport) -> bool) -> Vec<String> {
        state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready)
            .filter(|n| !self.nodes.get(&n.id).is_some_and(&done))
            .map(|n| n.hostname.clone())
            .collect()
    }
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

    const DAY: i64 = 24 * 3600;

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

    #[test]
    fn renewal_at_two_thirds_of_the_configured_life() {
        let expiry = Duration::from_secs(90 * DAY as u64);
        let (nb, na) = (0, 90 * DAY);
        assert!(!renewal_due(nb, na, 59 * DAY, expiry));
        assert!(renewal_due(nb, na, 60 * DAY, expiry));
        // A 1 h certificate renews after 40 minutes.
        let hour = Duration::from_secs(3600);
        assert!(!renewal_due(0, 3600, 39 * 60, hour));
        assert!(renewal_due(0, 3600, 40 * 60, hour));
    }

    #[test]
    fn a_shorter_expiry_renews_longer_certificates_at_once() {
        // Issued for 90 days (plus the hour it is backdated), the swarm now says 24 h.
        let (nb, na) = (0, 90 * DAY + 3600);
        assert!(!renewal_due(nb, na, 10, Duration::from_secs(90 * DAY as u64)));
        assert!(renewal_due(nb, na, 10, Duration::from_secs(DAY as u64)));
        // A 24 h certificate (backdated 1 h) under a 24 h expiry is fine.
        assert!(!renewal_due(0, DAY + 3600, 10, Duration::from_secs(DAY as u64)));
    }
}
