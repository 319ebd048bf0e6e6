//! Cluster identity: the CA (ECDSA P-256), node key pairs and CSRs, node certificates that carry
//! the role (`OU=swarm-manager|swarm-worker`, `CN=<node id>`), and the rustls configurations for
//! the QUIC transport (mutual TLS, plus the pinned anonymous client a joiner uses).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::model::security::CA_VALIDITY;
use crate::model::{NodeId, Role};
use crate::token::ca_digest;

/// The TLS server name every node certificate carries and every client asks for.
pub const SERVER_NAME: &str = "shoal-node";
/// ALPN protocol of the control plane.
pub const ALPN: &[u8] = b"shoal-ctl/1";
/// Node certificate validity (Swarm: 90 days).
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates are backdated by this much against clock skew (Swarm: 1 h).
pub const BACKDATE: Duration = Duration::from_secs(3600);

/// Identity and TLS failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not build, parse or sign something.
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),
    /// A PEM or DER blob did not parse.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which object.
        what: &'static str,
        /// Parser detail.
        detail: String,
    },
    /// A certificate lacks the role or node id a cluster certificate must carry.
    #[error("certificate is not a shoal node certificate: {0}")]
    NotNodeCert(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn now_window(validity: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - BACKDATE, now + validity)
}

/// The cluster certificate authority. Managers hold the key (it is replicated in the store).
#[derive(Clone)]
pub struct ClusterCa {
    /// CA certificate, PEM.
    pub cert_pem: String,
    /// CA private key, PKCS#8 PEM.
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("digest", &crate::base36::encode_base36(&self.digest(), 50))
            .finish()
    }
}

impl ClusterCa {
    /// Creates a fresh ECDSA P-256 root, valid 20 years.
    pub fn generate() -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "shoal-cluster-ca");
        dn.push(DnType::OrganizationName, "shoal");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (nb, na) = now_window(CA_VALIDITY);
        params.not_before = nb;
        params.not_after = na;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }

    /// Reloads a CA from its PEMs.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let cert_der = cert_der_from_pem(cert_pem)?;
        KeyPair::from_pem(key_pem)?;
        Ok(ClusterCa { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), cert_der })
    }

    /// SHA-256 of the CA certificate (what join tokens pin).
    pub fn digest(&self) -> [u8; 32] {
        ca_digest(&self.cert_der)
    }

    /// Signs a node's CSR for [`NODE_CERT_VALIDITY`].
    pub fn sign_csr(&self, csr_pem: &str, node: NodeId, role: Role) -> Result<String, PkiError> {
        self.sign_csr_for(csr_pem, node, role, NODE_CERT_VALIDITY)
    }

    /// Signs a node's CSR, valid for `validity` (the swarm's `--cert-expiry`). The subject and
    /// names come from the CA, never from the CSR: only the public key is taken from it.
    pub fn sign_csr_for(
        &self,
        csr_pem: &str,
        node: NodeId,
        role: Role,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = node_params(node, role, validity)?;
        let key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)?;
        Ok(csr.signed_by(&issuer)?.pem())
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

fn node_params(
    node: NodeId,
    role: Role,
    validity: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    params.subject_alt_names.push(SanType::DnsName(format!("{node}.node.shoal").try_into()?));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node.to_string());
    dn.push(DnType::OrganizationalUnitName, role.ou());
    dn.push(DnType::OrganizationName, "shoal");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let (nb, na) = now_window(validity);
    params.not_before = nb;
    params.not_after = na;
    Ok(params)
}

/// A node's private key and a CSR for it (the key never leaves the node).
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "shoal-join-request");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

/// What a node certificate says about its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertInfo {
    /// `CN`.
    pub node: NodeId,
    /// `OU`.
    pub role: Role,
}

/// Reads the node id and role out of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Malformed { what: "certificate", detail: e.to_string() })?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| PkiError::NotNodeCert("no CN".into()))?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| PkiError::NotNodeCert("no OU".into()))?;
    let node = cn
        .parse::<NodeId>()
        .map_err(|_| PkiError::NotNodeCert(format!("CN {cn:?} is not a node id")))?;
    let role = Role::from_ou(ou)
        .ok_or_else(|| PkiError::NotNodeCert(format!("OU {ou:?} is not a swarm role")))?;
    Ok(CertInfo { node, role })
}

/// Parses the first certificate of a PEM blob to DER.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    let mut rd = pem.as_bytes();
    rustls_pem(&mut rd).into_iter().next().ok_or_else(|| PkiError::Malformed {
        what: "certificate PEM",
        detail: "no CERTIFICATE block".into(),
    })
}

/// Every certificate of a PEM blob (a trust bundle), DER.
pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pem(&mut pem.as_bytes())
}

/// Which of `cas` signed `cert` (both DER), by index.
pub fn issuer_index(cert: &[u8], cas: &[CertificateDer<'_>]) -> Option<usize> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    cas.iter().position(|ca| {
        x509_parser::parse_x509_certificate(ca)
            .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
    })
}

/// A certificate's validity window, Unix seconds.
pub fn validity_of(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn rustls_pem(rd: &mut &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_reader_iter(rd).filter_map(Result::ok).collect()
}

fn key_der_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(PrivateKeyDer::Pkcs8)
        .map_err(|e| PkiError::Malformed { what: "private key PEM", detail: e.to_string() })
}

/// A node's credentials: its key, its certificate and the cluster CA certificate.
#[derive(Clone)]
pub struct NodeIdentity {
    /// Node private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Node certificate, PEM.
    pub cert_pem: String,
    /// The CA certificates this node trusts, PEM: the swarm's CA, and during a CA rotation the
    /// other one too (the one that signs first).
    pub ca_pem: String,
    /// Node id and role read back from the certificate.
    pub info: CertInfo,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("info", &self.info).finish()
    }
}

impl NodeIdentity {
    /// Builds an identity from PEMs, checking the certificate is a node certificate.
    pub fn from_pem(
        key_pem: String,
        cert_pem: String,
        ca_pem: String,
    ) -> Result<NodeIdentity, PkiError> {
        let der = cert_der_from_pem(&cert_pem)?;
        let info = cert_info(&der)?;
        key_der_from_pem(&key_pem)?;
        cert_der_from_pem(&ca_pem)?;
        Ok(NodeIdentity { key_pem, cert_pem, ca_pem, info })
    }

    /// Whether the node certificate should be renewed at `now` (Unix seconds) under the
    /// swarm's `cert_expiry` (see [`renewal_due`]); an unreadable one should.
    pub fn needs_renewal(&self, now: i64, cert_expiry: Duration) -> bool {
        let Ok(der) = cert_der_from_pem(&self.cert_pem) else { return true };
        let Some((from, to)) = validity_of(&der) else { return true };
        renewal_due(from, to, now, cert_expiry)
    }

    /// The CA that signed this node's certificate, DER (the bundle's first if none did).
    fn issuer(&self) -> Result<CertificateDer<'static>, PkiError> {
        let cas = certs_from_pem(&self.ca_pem);
        let cert = cert_der_from_pem(&self.cert_pem)?;
        let i = issuer_index(&cert, &cas).unwrap_or(0);
        cas.into_iter().nth(i).ok_or_else(|| PkiError::Malformed {
            what: "CA certificate PEM",
            detail: "no CERTIFICATE block".into(),
        })
    }

    /// SHA-256 of the CA that signed this node's certificate (what join tokens pin).
    pub fn ca_digest(&self) -> Result<[u8; 32], PkiError> {
        Ok(ca_digest(&self.issuer()?))
    }

    /// SHA-256 of every CA this node trusts.
    pub fn trusted_digests(&self) -> Vec<[u8; 32]> {
        certs_from_pem(&self.ca_pem).iter().map(|c| ca_digest(c)).collect()
    }

    /// This identity with another trust bundle (a CA rotation's step).
    pub fn with_cas(&self, ca_pem: String) -> Result<NodeIdentity, PkiError> {
        NodeIdentity::from_pem(self.key_pem.clone(), self.cert_pem.clone(), ca_pem)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        // The issuing CA goes last in the chain so that an anonymous joiner can pin it by digest.
        Ok(vec![cert_der_from_pem(&self.cert_pem)?, self.issuer()?])
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, PkiError> {
        let mut roots = RootCertStore::empty();
        for ca in certs_from_pem(&self.ca_pem) {
            roots.add(ca).map_err(|e| PkiError::Malformed {
                what: "CA certificate",
                detail: e.to_string(),
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// Server side: clients with a certificate must chain to the cluster CA (a foreign CA fails
    /// the handshake); clients without one are let in, and the RPC layer lets them call only Join.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, PkiError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Malformed { what: "client verifier", detail: e.to_string() })?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, key_der_from_pem(&self.key_pem)?)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| {
            PkiError::Malformed { what: "QUIC server config", detail: e.to_string() }
        })?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(transport());
        Ok(cfg)
    }

    /// Client side with this node's certificate; the server must chain to the cluster CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, PkiError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain()?, key_der_from_pem(&self.key_pem)?)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        finish_client(tls)
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

fn finish_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, PkiError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PkiError::Malformed { what: "QUIC client config", detail: e.to_string() })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Why a pinned handshake failed, recorded by the verifier so the joiner can say which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinFailure {
    /// The server's CA is not the one the token names.
    DigestMismatch,
    /// The server sent no CA certificate, or its certificate does not chain to it.
    BadChain(String),
}

/// Where the pinned verifier records why it refused a server.
pub type PinSlot = Arc<Mutex<Option<PinFailure>>>;

/// Client config for a joiner: no client certificate; the server's chain must end in a CA whose
/// SHA-256 equals the token's digest, and the server certificate must verify against that CA.
pub fn pinned_client_config(digest: [u8; 32]) -> Result<(quinn::ClientConfig, PinSlot), PkiError> {
    let failure = Arc::new(Mutex::new(None));
    let verifier =
        Arc::new(PinnedVerifier { digest, failure: failure.clone(), provider: provider() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok((finish_client(tls)?, failure))
}

#[derive(Debug)]
struct PinnedVerifier {
    digest: [u8; 32],
    failure: Arc<Mutex<Option<PinFailure>>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    fn fail(&self, f: PinFailure) -> rustls::Error {
        let msg = format!("{f:?}");
        if let Ok(mut g) = self.failure.lock() {
            *g = Some(f);
        }
        rustls::Error::General(msg)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.last() else {
            return Err(self.fail(PinFailure::BadChain("the server sent no CA certificate".into())));
        };
        if ca_digest(ca) != self.digest {
            return Err(self.fail(PinFailure::DigestMismatch));
        }
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| self.fail(PinFailure::BadChain(e.to_string())))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| self.fail(PinFailure::BadChain(e.to_string())))?;
        inner
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
            .map_err(|e| self.fail(PinFailure::BadChain(e.to_string())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
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
    let allowed = cert_expiry.as_secs() as i64 + (BACKDATE.as_secs() * 2) as i64;
    life > allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_flow_puts_role_and_id_in_the_cert() {
        let ca = ClusterCa::generate().expect("ca");
        let (key, csr) = new_key_and_csr().expect("csr");
        let node = NodeId(0x1234_5678_9abc);
        let cert = ca.sign_csr(&csr, node, Role::Worker).expect("sign");
        let id = NodeIdentity::from_pem(key, cert, ca.cert_pem.clone()).expect("identity");
        assert_eq!(id.info, CertInfo { node, role: Role::Worker });
        assert_eq!(id.ca_digest().expect("digest"), ca.digest());
        id.server_config().expect("server config");
        id.client_config().expect("client config");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let expiry = NODE_CERT_VALIDITY;
        assert!(!id.needs_renewal(now, expiry));
        assert!(id.needs_renewal(now + 61 * 24 * 3600, expiry));
        // Under a one-day expiry the 90-day certificate is renewed at once.
        assert!(id.needs_renewal(now, Duration::from_secs(24 * 3600)));
    }

    #[test]
    fn ca_reloads_and_still_signs() {
        let ca = ClusterCa::generate().expect("ca");
        let again = ClusterCa::from_pem(&ca.cert_pem, &ca.key_pem).expect("reload");
        assert_eq!(again.digest(), ca.digest());
        let (_, csr) = new_key_and_csr().expect("csr");
        let pem = again.sign_csr(&csr, NodeId(7), Role::Manager).expect("sign");
        let info = cert_info(&cert_der_from_pem(&pem).expect("der")).expect("info");
        assert_eq!(info.role, Role::Manager);
    }

    #[test]
    fn certificates_carry_the_configured_validity() {
        let ca = ClusterCa::generate().expect("ca");
        let (_, csr) = new_key_and_csr().expect("csr");
        let day = Duration::from_secs(24 * 3600);
        let pem = ca.sign_csr_for(&csr, NodeId(7), Role::Worker, day).expect("sign");
        let (from, to) = validity_of(&cert_der_from_pem(&pem).expect("der")).expect("validity");
        assert_eq!(to - from, (day + BACKDATE).as_secs() as i64);
    }

    #[test]
    fn a_bundle_trusts_both_cas_and_the_chain_names_the_issuer() {
        let (old, new) = (ClusterCa::generate().expect("ca"), ClusterCa::generate().expect("ca"));
        let (key, csr) = new_key_and_csr().expect("csr");
        let cert = old.sign_csr(&csr, NodeId(9), Role::Worker).expect("sign");
        let id = NodeIdentity::from_pem(key, cert, format!("{}{}", new.cert_pem, old.cert_pem))
            .expect("identity");
        assert_eq!(id.ca_digest().expect("digest"), old.digest());
        assert_eq!(id.trusted_digests(), vec![new.digest(), old.digest()]);
        assert_eq!(id.roots().expect("roots").len(), 2);
        let cas = certs_from_pem(&id.ca_pem);
        let der = cert_der_from_pem(&id.cert_pem).expect("der");
        assert_eq!(issuer_index(&der, &cas), Some(1));
        assert_eq!(issuer_index(&der, &cas[..1]), None);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let ca = ClusterCa::generate().expect("ca");
        assert!(ca.sign_csr("not a csr", NodeId(1), Role::Worker).is_err());
        assert!(cert_der_from_pem("junk").is_err());
        // The CA certificate itself is no node certificate.
        assert!(matches!(cert_info(ca.cert_der()), Err(PkiError::NotNodeCert(_))));
    }

    const DAY: i64 = 24 * 3600;

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
