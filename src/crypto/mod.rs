//! Envelope encryption for everything at rest.
//!
//! * Key material comes only from a [`KeyProvider`]: the [`KeyFile`] in the data directory
//!   (created on first run with mode 0600), holding the material itself (the embedded default)
//!   or only data keys wrapped by AWS KMS ([`kms`], envelope encryption). Key material is never
//!   read from the configuration file, the environment or the source.
//! * Content keys and blind-index keys are derived separately with HKDF-SHA256 from the
//!   provider's material, so rotating content keys never touches the blind-index key.
//! * Ciphertext layout: `key version (u32, big endian) ‖ nonce (12 bytes) ‖ AES-256-GCM(ciphertext ‖ tag)`.
//!   A fresh random nonce is drawn for every encryption.
//! * The AAD binds a ciphertext to its row (table, resource type, logical id, version id), so
//!   a ciphertext copied into another row fails to decrypt.
//!
//! This module knows nothing of HTTP or the database; `store` maps [`Sealed`] onto its column type.

mod keyfile;
pub mod kms;
pub mod stream;

pub use keyfile::{KeyFile, Wrapping};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// Errors of the crypto layer. None of them carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("no key with version {0} is available")]
    UnknownKeyVersion(u32),
    #[error("ciphertext failed authentication (wrong key, wrong row or tampered)")]
    Authentication,
    #[error("key store: {0}")]
    KeyStore(String),
    /// The plaintext is beyond what AES-GCM can encrypt under one nonce (about 64 GiB).
    #[error("plaintext too large to encrypt")]
    TooLarge,
}

/// 32 bytes of key material, wiped from memory when dropped.
pub type KeyMaterial = Zeroizing<[u8; 32]>;

/// The source of key-encryption material. Versions are positive and increase with rotation.
pub trait KeyProvider: Send + Sync {
    /// The version new ciphertexts are written with.
    fn current_version(&self) -> u32;
    /// Every version this provider can still decrypt with, with its material.
    fn versions(&self) -> Vec<(u32, KeyMaterial)>;
    /// The version whose material the blind-index key is derived from. It does not follow
    /// content-key rotation: changing it means rebuilding every blind index.
    fn blind_index_version(&self) -> u32;
}

/// Binds a ciphertext to the row that holds it.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    pub table: &'a str,
    pub resource_type: &'a str,
    pub logical_id: &'a str,
    pub version_id: i64,
}

impl Aad<'_> {
    fn encode(&self) -> Vec<u8> {
        // Length-prefixed fields so that no two different rows can produce the same AAD.
        let mut out = Vec::with_capacity(64);
        for part in [self.table, self.resource_type, self.logical_id] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(&self.version_id.to_be_bytes());
        out
    }
}

/// A ciphertext in the layout described in the module documentation. Only [`Cipher::seal`]
/// makes one from plaintext, so a column typed `Sealed` cannot be given plaintext by mistake.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(Vec<u8>);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed(key v{:?}, {} bytes)", self.key_version(), self.0.len())
    }
}

const HEADER_LEN: usize = 4 + 12;
const TAG_LEN: usize = 16;

impl Sealed {
    /// Wraps bytes read back from storage; they are checked when opened.
    pub fn from_stored(bytes: Vec<u8>) -> Self {
        Sealed(bytes)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn key_version(&self) -> Option<u32> {
        self.0.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Length of a blind index value in bytes (truncated HMAC-SHA256).
pub const BLIND_INDEX_LEN: usize = 16;

/// The keys derived from a provider, ready for use. Cheap to share behind an `Arc`.
pub struct Cipher {
    current: u32,
    content: BTreeMap<u32, Aes256Gcm>,
    blind: Zeroizing<[u8; 32]>,
    /// For what sits inside hashed, immutable records (a search's query inside an AuditEvent):
    /// derived, like the blind-index key, from material that content-key rotation leaves alone,
    /// so rotating never strands such ciphertext under a retired key.
    stable: (u32, Aes256Gcm),
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cipher")
            .field("current", &self.current)
            .field("versions", &self.content.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn derive(material: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(b"fhirvault/v1"), material);
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

impl Cipher {
    pub fn from_provider(provider: &dyn KeyProvider) -> Result<Self, CryptoError> {
        let versions = provider.versions();
        let current = provider.current_version();
        let mut content = BTreeMap::new();
        let mut blind = None;
        let mut stable = None;
        for (version, material) in &versions {
            let key = derive(material, b"content-encryption");
            content.insert(*version, Aes256Gcm::new(&(*key).into()));
            if *version == provider.blind_index_version() {
                blind = Some(derive(material, b"blind-index"));
                let s = derive(material, b"stable-encryption");
                stable = Some((*version, Aes256Gcm::new(&(*s).into())));
            }
        }
        if !content.contains_key(&current) {
            return Err(CryptoError::UnknownKeyVersion(current));
        }
        let blind = blind.ok_or(CryptoError::UnknownKeyVersion(provider.blind_index_version()))?;
        let stable = stable.ok_or(CryptoError::UnknownKeyVersion(provider.blind_index_version()))?;
        Ok(Cipher {
            current,
            content,
            blind,
            stable,
        })
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// Seals with the stable key (see the field): for ciphertext inside records that are never
    /// re-encrypted. Same layout as [`Cipher::seal`].
    pub fn seal_stable(&self, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        seal_with(self.stable.0, &self.stable.1, aad, plaintext)
    }

    pub fn open_stable(&self, aad: &Aad<'_>, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        if sealed.key_version() != Some(self.stable.0) {
            return Err(CryptoError::UnknownKeyVersion(sealed.key_version().unwrap_or(0)));
        }
        open_with(&self.stable.1, aad, sealed)
    }

    /// The ciphertext re-sealed under the current key, or `None` if it already is.
    pub fn reseal(&self, aad: &Aad<'_>, sealed: &Sealed) -> Result<Option<Sealed>, CryptoError> {
        if sealed.key_version() == Some(self.current) {
            return Ok(None);
        }
        let plain = Zeroizing::new(self.open(aad, sealed)?);
        self.seal(aad, &plain).map(Some)
    }

    /// The key versions this cipher can open.
    pub fn versions(&self) -> Vec<u32> {
        self.content.keys().copied().collect()
    }

    /// Seals and opens a fixed message with the current key (readiness of the key provider).
    pub fn self_test(&self) -> Result<(), CryptoError> {
        let aad = Aad {
            table: "self-test",
            resource_type: "",
            logical_id: "",
            version_id: 0,
        };
        let sealed = self.seal(&aad, b"fhirvault")?;
        match self.open(&aad, &sealed)?.as_slice() {
            b"fhirvault" => Ok(()),
            _ => Err(CryptoError::Authentication),
        }
    }

    /// Encrypts `plaintext` for the row named by `aad` under the current key, with a fresh nonce.
    pub fn seal(&self, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let key = self
            .content
            .get(&self.current)
            .ok_or(CryptoError::UnknownKeyVersion(self.current))?;
        seal_with(self.current, key, aad, plaintext)
    }

    /// Decrypts a ciphertext read from the row named by `aad`.
    pub fn open(&self, aad: &Aad<'_>, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let version = sealed.key_version().ok_or(CryptoError::Malformed)?;
        let key = self
            .content
            .get(&version)
            .ok_or(CryptoError::UnknownKeyVersion(version))?;
        open_with(key, aad, sealed)
    }

    /// A blind index: truncated HMAC-SHA256 of `value` in the named domain (for example a
    /// search parameter), so equal values can be matched without storing them.
    pub fn blind_index(&self, domain: &str, value: &str) -> [u8; BLIND_INDEX_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.blind.as_ref()).expect("HMAC accepts any key length");
        mac.update(&(domain.len() as u32).to_be_bytes());
        mac.update(domain.as_bytes());
        mac.update(value.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; BLIND_INDEX_LEN];
        out.copy_from_slice(&full[..BLIND_INDEX_LEN]);
        out
    }
}

fn seal_with(version: u32, key: &Aes256Gcm, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
    // A fresh random 96-bit nonce from the thread's CSPRNG (ChaCha12, seeded from the OS and
    // reseeded from it periodically and after a fork): no system call per seal. Random nonces
    // stay unique far beyond what one key version seals (2^32 messages keeps the collision
    // probability under 2^-32; keys rotate long before).
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let aad = aad.encode();
    // one buffer, encrypted in place: header, then the ciphertext, then the tag
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut out[HEADER_LEN..]).into())
        .map_err(|_| CryptoError::TooLarge)?;
    out.extend_from_slice(&tag);
    Ok(Sealed(out))
}

fn open_with(key: &Aes256Gcm, aad: &Aad<'_>, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
    let bytes = sealed.as_bytes();
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(CryptoError::Malformed);
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bytes[4..HEADER_LEN]);
    let (body, tag) = bytes[HEADER_LEN..].split_at(bytes.len() - HEADER_LEN - TAG_LEN);
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag);
    let mut plain = body.to_vec();
    match key.decrypt_inout_detached(
        &Nonce::from(nonce),
        &aad.encode(),
        (&mut plain[..]).into(),
        &Tag::from(tag_bytes),
    ) {
        Ok(()) => Ok(plain),
        Err(_) => {
            // what was decrypted is not authentic: wiped, never returned
            zeroize::Zeroize::zeroize(&mut plain);
            Err(CryptoError::Authentication)
        }
    }
}

/// SHA-256 of a byte string (used over canonical plaintext for integrity checks).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A cipher on a fixed key, for unit tests elsewhere in the crate.
#[cfg(test)]
pub fn test_cipher() -> Cipher {
    struct One;
    impl KeyProvider for One {
        fn current_version(&self) -> u32 {
            1
        }
        fn versions(&self) -> Vec<(u32, KeyMaterial)> {
            vec![(1, Zeroizing::new([9u8; 32]))]
        }
        fn blind_index_version(&self) -> u32 {
            1
        }
    }
    Cipher::from_provider(&One).expect("a fixed key derives")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout against an independent AES-GCM (Python's `cryptography`, OpenSSL underneath):
    /// what was sealed before a change of crate version still opens, and a seal opens there.
    #[test]
    fn ciphertext_matches_an_independent_aes_gcm() {
        let key = Aes256Gcm::new(&[7u8; 32].into());
        let aad = Aad {
            table: "resource_versions",
            resource_type: "Patient",
            logical_id: "pt-1",
            version_id: 3,
        };
        let hex = "00000001000102030405060708090a0b63a39b156e66ac3b14d7b1e5923d4ec0c36cd7fa7107194534b32e9b\
                   6522b4deabac303adbf65ed3d28d";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let sealed = Sealed::from_stored(bytes);
        assert_eq!(
            open_with(&key, &aad, &sealed).unwrap(),
            br#"{"resourceType":"Patient"}"#
        );
        // and a fresh seal round-trips, with a nonce of its own each time
        let a = seal_with(1, &key, &aad, b"x").unwrap();
        let b = seal_with(1, &key, &aad, b"x").unwrap();
        assert_ne!(a.as_bytes()[4..16], b.as_bytes()[4..16]);
        assert_eq!(open_with(&key, &aad, &a).unwrap(), b"x");
        let mut tampered = a.as_bytes().to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            open_with(&key, &aad, &Sealed::from_stored(tampered)),
            Err(CryptoError::Authentication)
        ));
    }

    struct Fixed(Vec<(u32, [u8; 32])>, u32);
    impl KeyProvider for Fixed {
        fn current_version(&self) -> u32 {
            self.1
        }
        fn versions(&self) -> Vec<(u32, KeyMaterial)> {
            self.0.iter().map(|(v, k)| (*v, Zeroizing::new(*k))).collect()
        }
        fn blind_index_version(&self) -> u32 {
            1
        }
    }

    fn aad(id: &str, version: i64) -> Aad<'_> {
        Aad {
            table: "resource_versions",
            resource_type: "Patient",
            logical_id: id,
            version_id: version,
        }
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let c = Cipher::from_provider(&Fixed(vec![(1, [7; 32])], 1)).unwrap();
        let a = c.seal(&aad("p1", 1), b"hello").unwrap();
        let b = c.seal(&aad("p1", 1), b"hello").unwrap();
        assert_ne!(a, b, "two encryptions of the same plaintext must differ");
        assert_eq!(c.open(&aad("p1", 1), &a).unwrap(), b"hello");
        assert_eq!(a.key_version(), Some(1));
        assert!(!a.as_bytes().windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn ciphertext_is_bound_to_its_row() {
        let c = Cipher::from_provider(&Fixed(vec![(1, [7; 32])], 1)).unwrap();
        let a = c.seal(&aad("p1", 1), b"hello").unwrap();
        assert!(matches!(c.open(&aad("p2", 1), &a), Err(CryptoError::Authentication)));
        assert!(matches!(c.open(&aad("p1", 2), &a), Err(CryptoError::Authentication)));
        let mut other = aad("p1", 1);
        other.table = "resources";
        assert!(c.open(&other, &a).is_err());
        let mut tampered = a.as_bytes().to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(c.open(&aad("p1", 1), &Sealed::from_stored(tampered)).is_err());
        assert!(matches!(
            c.open(&aad("p1", 1), &Sealed::from_stored(vec![0; 3])),
            Err(CryptoError::Malformed)
        ));
    }

    #[test]
    fn old_versions_still_decrypt_after_rotation() {
        let old = Cipher::from_provider(&Fixed(vec![(1, [7; 32])], 1)).unwrap();
        let sealed = old.seal(&aad("p1", 1), b"x").unwrap();
        let rotated = Cipher::from_provider(&Fixed(vec![(1, [7; 32]), (2, [9; 32])], 2)).unwrap();
        assert_eq!(rotated.open(&aad("p1", 1), &sealed).unwrap(), b"x");
        assert_eq!(rotated.seal(&aad("p1", 1), b"x").unwrap().key_version(), Some(2));
        // The blind-index key follows its own version, not content rotation.
        assert_eq!(old.blind_index("d", "v"), rotated.blind_index("d", "v"));
        assert_ne!(old.blind_index("d", "v"), old.blind_index("e", "v"));
    }
}
