//! rustls configurations (ring provider, TLS 1.2 and 1.3, ALPN h2 for gRPC).
//!
//! - [`server_config`]: presents the manager's certificate and the CA; verifies a client
//!   certificate against the CA when one is sent. A client without one is let through the
//!   handshake only so that it can join (swarmkit does the same): every other call is refused
//!   by the server's authorization, which sees no identity. A certificate from another CA,
//!   self-signed or expired fails the handshake.
//! - [`client_config`]: trusts only the cluster CA, checks the name [`SERVER_NAME`] and
//!   presents the node's certificate.
//! - [`join_client_config`]: for a party that holds only a join token: the manager's chain must
//!   contain a certificate whose SHA-256 is the token's CA digest, and the manager's
//!   certificate must verify against it. Otherwise the handshake fails with an error that
//!   says the CA does not match the token, before the token's secret is sent.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::ca::{CertInfo, NodeMaterial, certs_of, digest_der, identity_of_pem};
use crate::{PkiError, SERVER_NAME};

/// The crypto provider every party uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(what: &'static str) -> impl FnOnce(rustls::Error) -> PkiError {
    move |source| PkiError::Rustls { what, source }
}

fn roots_of(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in certs_of(ca_pem)? {
        roots.add(c).map_err(tls("adding the CA as a trust root"))?;
    }
    Ok(roots)
}

fn certified_key(m: &NodeMaterial) -> Result<CertifiedKey, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let mut chain = certs_of(&m.cert_pem)?;
    chain.truncate(1);
    // The CA travels with the certificate: a joining client pins it by digest.
    chain.extend(certs_of(&m.ca_pem)?);
    let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).map_err(|e| PkiError::Pem {
        what: "private key",
        reason: e.to_string(),
    })?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(tls("loading the private key"))?;
    Ok(CertifiedKey::new(chain, key))
}

struct Current {
    material: NodeMaterial,
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

/// A party's certificate and key, replaceable at run time (renewal): handshakes read the
/// current one; established connections keep the one they started with.
pub struct Credentials {
    current: RwLock<Current>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("info", &self.info())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(material: NodeMaterial) -> Result<Arc<Self>, PkiError> {
        let key = Arc::new(certified_key(&material)?);
        let info = identity_of_pem(&material.cert_pem)?;
        Ok(Arc::new(Self {
            current: RwLock::new(Current {
                material,
                key,
                info,
            }),
        }))
    }

    /// Puts a renewed certificate in force. It must come from the same CA (the verifiers were
    /// built with it) and be signed by it.
    pub fn replace(&self, material: NodeMaterial) -> Result<(), PkiError> {
        let ca = self.material().ca_pem;
        if material.ca_pem.trim() != ca.trim() {
            return Err(PkiError::OtherCa {
                reason: "a different CA certificate came with it".into(),
            });
        }
        verify_chain(&material.cert_pem, &ca)?;
        let key = Arc::new(certified_key(&material)?);
        let info = identity_of_pem(&material.cert_pem)?;
        *self.current.write().expect("lock") = Current {
            material,
            key,
            info,
        };
        Ok(())
    }

    pub fn material(&self) -> NodeMaterial {
        self.current.read().expect("lock").material.clone()
    }

    pub fn info(&self) -> CertInfo {
        self.current.read().expect("lock").info.clone()
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("lock").key.clone()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks that `cert_pem` verifies against `ca_pem` as a client certificate.
fn verify_chain(cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots_of(ca_pem)?), provider())
            .build()?;
    let leaf = certs_of(cert_pem)?.remove(0);
    verifier
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| PkiError::OtherCa {
            reason: e.to_string(),
        })
}

/// The server side: `creds` is presented; client certificates are verified against their CA.
pub fn server_config(creds: Arc<Credentials>) -> Result<Arc<ServerConfig>, PkiError> {
    let p = provider();
    let roots = Arc::new(roots_of(&creds.material().ca_pem)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, p.clone())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(tls("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(creds);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client holding a certificate: trusts only its CA, verifies [`SERVER_NAME`].
pub fn client_config(creds: Arc<Credentials>) -> Result<Arc<ClientConfig>, PkiError> {
    let roots = roots_of(&creds.material().ca_pem)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls("protocol versions"))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(creds);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client with only a join token: see the module docs. Sends no certificate.
pub fn join_client_config(ca_digest: &str) -> Result<Arc<ClientConfig>, PkiError> {
    let verifier = PinnedCa {
        digest: ca_digest.to_ascii_lowercase(),
        provider: provider(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls("protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Trusts the CA whose digest a join token pins, taken from the presented chain.
#[derive(Debug)]
struct PinnedCa {
    digest: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| digest_der(c.as_ref()) == self.digest)
        else {
            let presented: Vec<String> = intermediates
                .iter()
                .map(|c| digest_der(c.as_ref()))
                .collect();
            return Err(rustls::Error::General(format!(
                "the manager's CA does not match the join token: the token pins CA sha256:{}, the manager presented {}; check the token (swarmnet cluster join-token) and the manager address",
                self.digest,
                if presented.is_empty() {
                    "no CA".to_string()
                } else {
                    presented
                        .iter()
                        .map(|d| format!("sha256:{d}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
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
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The name every client verifies.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}
