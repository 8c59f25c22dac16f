//! Join tokens: `SWMTKN-1-<sha256 of the CA certificate, hex>-<secret, hex>`, as swarmkit's.
//!
//! The digest lets a joining party check that the manager it reached belongs to the cluster
//! before it reveals the secret (see [`crate::tls::join_client_config`]); the secret, checked by
//! the manager against the replicated state, decides the role the node gets. Rotating a token
//! keeps the digest and replaces the secret: nodes that joined keep their certificates.

use crate::PkiError;

const PREFIX: &str = "SWMTKN-1-";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Lowercase hex SHA-256 of the CA certificate (64 digits).
    pub ca_digest: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    /// A new token pinning the CA with `ca_digest`, with a fresh 192-bit secret.
    pub fn generate(ca_digest: &str) -> Result<Self, PkiError> {
        let mut b = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_unspecified| PkiError::Random)?;
        Ok(Self {
            ca_digest: ca_digest.to_string(),
            secret: crate::ca::hex(&b),
        })
    }

    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let bad = |reason: &str| PkiError::BadToken {
            reason: reason.to_string(),
        };
        let rest = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("it does not start with SWMTKN-1-"))?;
        let (digest, secret) = rest
            .split_once('-')
            .ok_or_else(|| bad("expected SWMTKN-1-<CA digest>-<secret>"))?;
        let is_hex = |x: &str| x.bytes().all(|c| c.is_ascii_hexdigit());
        if digest.len() != 64 || !is_hex(digest) {
            return Err(bad("the CA digest is not 64 hex digits"));
        }
        if secret.len() < 32 || !is_hex(secret) {
            return Err(bad("the secret is not at least 32 hex digits"));
        }
        Ok(Self {
            ca_digest: digest.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}-{}", self.ca_digest, self.secret)
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let d = "ab".repeat(32);
        let t = JoinToken::generate(&d).unwrap();
        let s = t.to_string();
        assert!(s.starts_with(&format!("SWMTKN-1-{d}-")), "{s}");
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_ne!(JoinToken::generate(&d).unwrap().secret, t.secret);
        for (bad, why) in [
            ("SWMTKN-2-x-y", "SWMTKN-1-"),
            ("SWMTKN-1-abc", "expected"),
            (
                &format!("SWMTKN-1-{}-{}", "z".repeat(64), t.secret),
                "CA digest",
            ),
            (&format!("SWMTKN-1-{d}-abc"), "secret"),
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!(secrets_equal("abc", "abc") && !secrets_equal("abc", "abd"));
    }
}
