//! Signatures over an artifact's manifest digest, in cosign's format.
//!
//! - Keys are ECDSA P-256: the private key as a PKCS#8 PEM file, the public key as an SPKI PEM
//!   file (the same shape as cosign's `cosign.pub`).
//! - The signed payload is cosign's "simple signing" JSON naming the repository and the manifest
//!   digest; the signature is ASN.1 DER over SHA-256 of the payload, base64 in the layer
//!   annotation `dev.cosignproject.cosign/signature`.
//! - The signature artifact is stored next to the plugin under the tag `sha256-<hex>.sig`
//!   (cosign's attached-artifact scheme, which every distribution registry supports).
//!
//! So a plugin signed by `qlayer plugin push --sign` verifies with `cosign verify --key` (without
//! a transparency log), and an artifact signed by `cosign sign --key` verifies here.

use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation that carries the base64 signature on the payload layer.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The `type` cosign writes in the payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// The tag under which the signature of `digest` is stored: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// A private signing key.
pub struct PrivateKey(SigningKey);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey([redacted])")
    }
}

/// A trusted publisher's public key.
#[derive(Clone, Debug)]
pub struct PublicKey {
    key: VerifyingKey,
    /// A name for messages: the file stem it was read from, or the key id.
    pub name: String,
}

impl PrivateKey {
    /// A new random key.
    pub fn generate() -> Self {
        PrivateKey(SigningKey::random(&mut rand_core::OsRng))
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        SigningKey::from_pkcs8_pem(pem).map(PrivateKey).map_err(|e| {
            format!("not an unencrypted PKCS#8 P-256 private key ({e}); create one with `qlayer plugin keygen`")
        })
    }

    /// Reads a key file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::from_pem(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, String> {
        self.0.to_pkcs8_pem(LineEnding::LF).map(|p| p.to_string()).map_err(|e| e.to_string())
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        let key = *self.0.verifying_key();
        let mut public = PublicKey { key, name: String::new() };
        public.name = public.id();
        public
    }

    /// Signs `payload`: DER-encoded ECDSA over SHA-256, base64.
    pub fn sign(&self, payload: &[u8]) -> String {
        let signature: DerSignature = self.0.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(signature.as_bytes())
    }
}

impl PublicKey {
    /// Reads an SPKI PEM public key.
    pub fn from_pem(pem: &str, name: impl Into<String>) -> Result<Self, String> {
        let key = VerifyingKey::from_public_key_pem(pem)
            .map_err(|e| format!("not a P-256 public key in PEM (SPKI) form: {e}"))?;
        Ok(PublicKey { key, name: name.into() })
    }

    /// Reads a public key file; its name is the file stem.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::from_pem(&text, name).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key as SPKI PEM.
    pub fn to_pem(&self) -> Result<String, String> {
        self.key.to_public_key_pem(LineEnding::LF).map_err(|e| e.to_string())
    }

    /// A short, stable id: the first 16 hex digits of SHA-256 over the key's DER.
    pub fn id(&self) -> String {
        let der = self.key.to_public_key_der().map(|d| d.as_bytes().to_vec()).unwrap_or_default();
        hex::encode(&Sha256::digest(der)[..8])
    }

    /// Whether `signature_b64` (DER or fixed-size, base64) is this key's signature of `payload`.
    pub fn verifies(&self, payload: &[u8], signature_b64: &str) -> bool {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(signature_b64.trim()) else { return false };
        let signature = match DerSignature::try_from(raw.as_slice()) {
            Ok(der) => match Signature::try_from(der) {
                Ok(sig) => sig,
                Err(_) => return false,
            },
            Err(_) => match Signature::from_slice(&raw) {
                Ok(sig) => sig,
                Err(_) => return false,
            },
        };
        self.key.verify(payload, &signature).is_ok()
    }
}

/// Cosign's simple-signing payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    /// What is signed.
    pub critical: Critical,
    /// Free-form extras; cosign writes `null` when there are none.
    #[serde(default)]
    pub optional: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The part of the payload a verifier must check.
#[derive(Debug, Serialize, Deserialize)]
pub struct Critical {
    /// The repository signed for.
    pub identity: Identity,
    /// The manifest digest signed.
    pub image: Image,
    /// Always [`PAYLOAD_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
}

/// `critical.identity`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Identity {
    /// `registry/repository`.
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

/// `critical.image`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:<hex>` of the signed manifest.
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload to sign for `repository` (`registry/repo`) at `digest`.
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    let payload = Payload {
        critical: Critical {
            identity: Identity { docker_reference: repository.to_string() },
            image: Image { docker_manifest_digest: digest.to_string() },
            kind: PAYLOAD_TYPE.to_string(),
        },
        optional: None,
    };
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// The outcome of checking an artifact's signatures against the trusted keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// A trusted key signed this digest.
    Verified {
        /// The key's name.
        key: String,
    },
    /// No signature is attached to this digest.
    Unsigned,
    /// Signatures exist, but no trusted key made any of them.
    WrongKey {
        /// How many signatures were found.
        signatures: usize,
    },
    /// A trusted key's signature is attached, but it signs another digest.
    OtherDigest {
        /// The digest the signature names.
        signed: String,
    },
    /// The signature artifact could not be read as one.
    Malformed(String),
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verification::Verified { key } => write!(f, "signed by trusted key `{key}`"),
            Verification::Unsigned => f.write_str("not signed (no signature is attached to this digest)"),
            Verification::WrongKey { signatures } => {
                write!(f, "signed, but none of its {signatures} signature(s) is by a trusted key")
            }
            Verification::OtherDigest { signed } => {
                write!(f, "the attached signature is for another digest ({signed}), not for this artifact")
            }
            Verification::Malformed(why) => write!(f, "the attached signature is malformed: {why}"),
        }
    }
}

/// Checks one signature (payload bytes and base64 signature) for `digest` against `keys`.
pub fn check(payload_bytes: &[u8], signature_b64: &str, digest: &str, keys: &[PublicKey]) -> Verification {
    let Some(key) = keys.iter().find(|k| k.verifies(payload_bytes, signature_b64)) else {
        return Verification::WrongKey { signatures: 1 };
    };
    let payload: Payload = match serde_json::from_slice(payload_bytes) {
        Ok(p) => p,
        Err(e) => return Verification::Malformed(format!("the signed payload is not cosign's JSON: {e}")),
    };
    if payload.critical.image.docker_manifest_digest != digest {
        return Verification::OtherDigest { signed: payload.critical.image.docker_manifest_digest };
    }
    Verification::Verified { key: key.name.clone() }
}

/// What to do with an artifact whose signature does not verify.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignaturePolicy {
    /// Refuse it.
    Require,
    /// Install it, with a warning that says why.
    #[default]
    Warn,
    /// Do not check signatures.
    Off,
}

impl std::str::FromStr for SignaturePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "require" => Ok(SignaturePolicy::Require),
            "warn" => Ok(SignaturePolicy::Warn),
            "off" => Ok(SignaturePolicy::Off),
            other => Err(format!("unknown signature policy `{other}`: expected require, warn or off")),
        }
    }
}

impl std::fmt::Display for SignaturePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignaturePolicy::Require => "require",
            SignaturePolicy::Warn => "warn",
            SignaturePolicy::Off => "off",
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sign_and_verify_round_trip_through_pem() {
        let key = PrivateKey::from_pem(&PrivateKey::generate().to_pem().unwrap()).unwrap();
        let public = PublicKey::from_pem(&key.public().to_pem().unwrap(), "alice").unwrap();
        let digest = format!("sha256:{}", "a".repeat(64));
        let body = payload("127.0.0.1:5000/tools/x", &digest);
        let sig = key.sign(&body);
        assert_eq!(
            check(&body, &sig, &digest, std::slice::from_ref(&public)),
            Verification::Verified { key: "alice".into() }
        );
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(matches!(check(&body, &sig, &other, std::slice::from_ref(&public)), Verification::OtherDigest { .. }));
        let stranger = PrivateKey::generate().public();
        assert_eq!(check(&body, &sig, &digest, &[stranger]), Verification::WrongKey { signatures: 1 });
        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert_eq!(check(&tampered, &sig, &digest, &[public]), Verification::WrongKey { signatures: 1 });
        assert_eq!(signature_tag(&digest), format!("sha256-{}.sig", "a".repeat(64)));
    }
}
