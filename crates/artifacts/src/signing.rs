//! Publisher keys: ed25519 (ring), stored as a PKCS#8 PEM private key.
//!
//! A key's id is the first 16 hex digits of the sha256 of its 32-byte
//! public key; signatures are written as 128 hex digits. What is signed is
//! the canonical statement of `yunbian_api::artifact::signing_statement`
//! (name, version, platform, blob digest and size); this module signs and
//! verifies bytes and does not know the statement's shape.

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::{sha256, ArtifactError, Result};

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// An ed25519 private key of a publisher.
pub struct PublisherKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for PublisherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl PublisherKey {
    /// A new random key.
    pub fn generate() -> Result<PublisherKey> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| ArtifactError::Signature("key generation failed".into()))?;
        PublisherKey::from_pkcs8(doc.as_ref())
    }

    /// A key from its PKCS#8 DER encoding.
    pub fn from_pkcs8(der: &[u8]) -> Result<PublisherKey> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| ArtifactError::Signature(format!("not an ed25519 PKCS#8 private key: {e}")))?;
        Ok(PublisherKey { pair, pkcs8: der.to_vec() })
    }

    /// A key from PEM text (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<PublisherKey> {
        let body = pem
            .trim()
            .strip_prefix(PEM_BEGIN)
            .and_then(|r| r.trim_end().strip_suffix(PEM_END))
            .ok_or_else(|| ArtifactError::Signature("not a PEM private key (BEGIN PRIVATE KEY)".into()))?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ArtifactError::Signature(format!("private key PEM: {e}")))?;
        PublisherKey::from_pkcs8(&der)
    }

    /// The PEM text of the private key.
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        let lines: Vec<&str> =
            b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
        format!("{PEM_BEGIN}\n{}\n{PEM_END}\n", lines.join("\n"))
    }

    /// The 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as 64 hex digits.
    pub fn public_key_hex(&self) -> String {
        hex(&self.public_key())
    }

    /// The key id.
    pub fn key_id(&self) -> String {
        key_id(&self.public_key())
    }

    /// Signs `message`; the signature as 128 hex digits.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex(self.pair.sign(message).as_ref())
    }
}

/// The id of a public key: the first 16 hex digits of its sha256.
pub fn key_id(public_key: &[u8]) -> String {
    sha256(public_key).hex()[..16].to_string()
}

/// Checks a hex signature of `message` by the hex public key.
pub fn verify_hex(public_key_hex: &str, message: &[u8], signature_hex: &str) -> Result<()> {
    let pk = unhex(public_key_hex)
        .filter(|k| k.len() == 32)
        .ok_or_else(|| ArtifactError::Signature("public key must be 64 hex digits".into()))?;
    let sig = unhex(signature_hex)
        .filter(|s| s.len() == 64)
        .ok_or_else(|| ArtifactError::Signature("signature must be 128 hex digits".into()))?;
    UnparsedPublicKey::new(&ED25519, pk).verify(message, &sig).map_err(|_| {
        ArtifactError::Signature(format!(
            "signature does not verify with key {}",
            key_id(&unhex(public_key_hex).unwrap_or_default())
        ))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_pem_round_trip() {
        let k = PublisherKey::generate().expect("key");
        let again = PublisherKey::from_pem(&k.to_pem()).expect("pem");
        assert_eq!(again.public_key(), k.public_key());
        assert_eq!(k.key_id().len(), 16);
        let sig = k.sign_hex(b"statement");
        verify_hex(&k.public_key_hex(), b"statement", &sig).expect("verifies");
        assert!(verify_hex(&k.public_key_hex(), b"statement2", &sig).is_err());
        let other = PublisherKey::generate().expect("key");
        assert!(verify_hex(&other.public_key_hex(), b"statement", &sig).is_err());
        assert!(verify_hex("zz", b"statement", &sig).is_err());
        assert!(PublisherKey::from_pem("garbage").is_err());
    }
}
