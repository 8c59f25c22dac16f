//! The cluster's root CA and the certificates it issues.
//!
//! - [`RootCa::generate`] makes a self-signed ECDSA P-256 root (10 years). Its certificate is
//!   public (every node keeps it to verify peers); its key signs every node certificate and is
//!   kept only by managers: in the Raft state (replicated to managers only, in
//!   `manager.redb`, mode 0600) and, on the manager that created the cluster, in
//!   `<data-dir>/tls/ca.key` (0600) until the state holds it.
//! - [`RootCa::issue`] signs a node certificate for a public key taken from a CSR. The CSR only
//!   proves possession of the key: subject, SANs, key usages and validity are decided here,
//!   never copied from the request (a node cannot ask for a role).
//! - Node certificates carry the role as the subject's OU (`swarm-manager`, `swarm-worker`,
//!   `swarm-admin`) and the node id as its CN, like swarmkit's. Managers' certificates also
//!   carry the DNS name [`crate::SERVER_NAME`], which every client verifies instead of an
//!   address (managers are reached at addresses that change; the CA is what is trusted).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use serde::{Deserialize, Serialize};

use crate::{Identity, PkiError, Role, SERVER_NAME};

/// Lifetime of the root CA.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a node certificate (renewed at half of it).
pub const DEFAULT_NODE_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates start up to this much in the past (at most a quarter of their lifetime, so
/// that renewal at half life stays ahead), so a node whose clock lags a little still accepts a
/// fresh one.
const BACKDATE: Duration = Duration::from_secs(60);

fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 4)
}

/// The root CA: certificate and private key, PEM. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("digest", &digest_pem(&self.cert_pem).unwrap_or_default())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate issued to a node, with the CA that issued it (all PEM).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMaterial {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for NodeMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMaterial")
            .field("identity", &identity_of_pem(&self.cert_pem).ok())
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

fn serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_unspecified| PkiError::Random)?;
    // Positive: the top bit clear.
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The lowercase hex SHA-256 of a DER certificate: what a join token pins.
pub fn digest_der(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// [`digest_der`] of the first certificate in `pem`.
pub fn digest_pem(pem: &str) -> Result<String, PkiError> {
    Ok(digest_der(first_cert(pem)?.as_ref()))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every certificate in a PEM text, in order.
pub fn certs_of(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: "certificate",
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn first_cert(pem: &str) -> Result<rustls_pki_types::CertificateDer<'static>, PkiError> {
    Ok(certs_of(pem)?.remove(0))
}

impl RootCa {
    /// A new root CA named after the cluster.
    pub fn generate(cluster: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("swarmnet-root-ca {cluster}"));
        dn.push(DnType::OrganizationName, "swarmnet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + ROOT_LIFETIME);
        params.serial_number = Some(serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(rc("self-signing the CA"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// What a join token pins: the SHA-256 of the CA certificate.
    pub fn digest(&self) -> Result<String, PkiError> {
        digest_pem(&self.cert_pem)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(rc("reading the CA key"))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(rc("reading the CA certificate"))
    }

    /// Signs a certificate for `id` in `role` over the public key of `csr_der` (whose own
    /// signature proves possession of the key), valid for `lifetime`.
    pub fn issue(
        &self,
        csr_der: &[u8],
        id: &str,
        role: Role,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        self.issue_at_epoch(csr_der, id, role, lifetime, 0)
    }

    /// [`RootCa::issue`] of a certificate that carries the cluster's certificate `epoch` (see
    /// [`Identity::epoch`]): node certificates, which a node's removal revokes.
    pub fn issue_at_epoch(
        &self,
        csr_der: &[u8],
        id: &str,
        role: Role,
        lifetime: Duration,
        epoch: u64,
    ) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(rc("reading the certificate signing request"))?;
        let params = node_params(id, role, lifetime, epoch)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(rc("signing the node certificate"))?;
        Ok(cert.pem())
    }

    /// A key and a certificate for `id` in `role`, made and signed here (a manager's own, the
    /// admin's): no CSR travels.
    pub fn issue_local(
        &self,
        id: &str,
        role: Role,
        lifetime: Duration,
    ) -> Result<NodeMaterial, PkiError> {
        let csr = Csr::generate(id)?;
        let cert_pem = self.issue(&csr.der, id, role, lifetime)?;
        Ok(NodeMaterial {
            key_pem: csr.key_pem,
            cert_pem,
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// The SAN URI prefix that carries [`Identity::epoch`].
const EPOCH_URI: &str = "urn:swarmnet:cert-epoch:";

fn node_params(
    id: &str,
    role: Role,
    lifetime: Duration,
    epoch: u64,
) -> Result<CertificateParams, PkiError> {
    if id.is_empty() || id.len() > 64 {
        return Err(PkiError::BadId { id: id.to_string() });
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    dn.push(DnType::OrganizationalUnitName, role.ou());
    dn.push(DnType::OrganizationName, "swarmnet");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // Only managers serve: only their certificates carry the name clients verify.
    let mut sans = vec![SanType::DnsName(
        role.ou().try_into().map_err(rc("naming the certificate"))?,
    )];
    if role == Role::Manager {
        sans.push(SanType::DnsName(
            SERVER_NAME
                .try_into()
                .map_err(rc("naming the certificate"))?,
        ));
    }
    sans.dedup();
    if epoch > 0 {
        sans.push(SanType::URI(
            format!("{EPOCH_URI}{epoch}")
                .try_into()
                .map_err(rc("naming the certificate"))?,
        ));
    }
    params.subject_alt_names = sans;
    let now = SystemTime::now();
    params.not_before = to_offset(now - backdate(lifetime));
    params.not_after = to_offset(now + lifetime);
    params.serial_number = Some(serial()?);
    Ok(params)
}

/// A fresh key and a CSR over it (the subject is informative only).
#[derive(Clone)]
pub struct Csr {
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Csr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr").finish_non_exhaustive()
    }
}

impl Csr {
    pub fn generate(id: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(rc("generating a node key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id);
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&key)
            .map_err(rc("making the certificate signing request"))?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            der: csr.der().to_vec(),
        })
    }
}

/// Who a certificate names and when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Reads the role (OU) and id (CN) of a certificate. Call it on certificates a verifier has
/// already checked against the CA: it checks nothing but the names.
pub fn identity_of_der(der: &[u8]) -> Result<CertInfo, PkiError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| PkiError::Pem {
            what: "certificate",
            reason: e.to_string(),
        })?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let id = first(&mut subject.iter_common_name()).unwrap_or_default();
    let ou = first(&mut subject.iter_organizational_unit()).unwrap_or_default();
    let role = Role::from_ou(&ou).ok_or_else(|| PkiError::NoRole { ou: ou.clone() })?;
    let epoch = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => {
                u.strip_prefix(EPOCH_URI).and_then(|e| e.parse().ok())
            }
            _ => None,
        })
        .unwrap_or(0);
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(CertInfo {
        identity: Identity { role, id, epoch },
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
    })
}

/// [`identity_of_der`] of the first certificate in `pem`.
pub fn identity_of_pem(pem: &str) -> Result<CertInfo, PkiError> {
    identity_of_der(first_cert(pem)?.as_ref())
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: at half its
/// life (swarmkit renews between 50 % and 80 %; half leaves the most room for a manager outage).
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_role_and_id_from_the_ca_not_from_the_request() {
        let ca = RootCa::generate("t").unwrap();
        // The CSR asks for "admin"; the CA names it after the id it was given.
        let csr = Csr::generate("admin").unwrap();
        let pem = ca
            .issue(&csr.der, "n7", Role::Worker, Duration::from_secs(3600))
            .unwrap();
        let info = identity_of_pem(&pem).unwrap();
        assert_eq!(
            info.identity,
            Identity {
                role: Role::Worker,
                id: "n7".into(),
                epoch: 0,
            }
        );
        let csr = Csr::generate("n7").unwrap();
        let pem = ca
            .issue_at_epoch(&csr.der, "n7", Role::Worker, Duration::from_secs(3600), 42)
            .unwrap();
        assert_eq!(identity_of_pem(&pem).unwrap().identity.epoch, 42);
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(3600) + BACKDATE);
        // The CA's digest is stable and 64 hex digits.
        assert_eq!(ca.digest().unwrap().len(), 64);
        assert_eq!(ca.digest().unwrap(), ca.clone().digest().unwrap());
        assert_ne!(
            ca.digest().unwrap(),
            RootCa::generate("t").unwrap().digest().unwrap()
        );
        assert!(
            !format!("{ca:?}").contains("PRIVATE"),
            "Debug hides the key"
        );
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let ca = RootCa::generate("t").unwrap();
        let mut csr = Csr::generate("n1").unwrap();
        let last = csr.der.len() - 1;
        csr.der[last] ^= 0xff;
        let e = ca
            .issue(&csr.der, "n1", Role::Worker, DEFAULT_NODE_LIFETIME)
            .unwrap_err();
        assert!(e.to_string().contains("certificate signing request"), "{e}");
    }

    #[test]
    fn renewal_is_due_at_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(90)),
            t0 + Duration::from_secs(45)
        );
        assert_eq!(renew_at(t0, t0), t0);
    }
}
