//! The key file in the data directory, behind both key providers: with [`Wrapping::Local`] (the
//! embedded default) it holds the key versions' material itself; with [`Wrapping::Kms`] only
//! KMS-wrapped data keys (envelope encryption), unwrapped by KMS when the file is opened.

use super::kms::KmsClient;
use super::{CryptoError, KeyMaterial, KeyProvider};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const FORMAT: &str = "fhirvault-keyfile-v1";
const KMS_FORMAT: &str = "fhirvault-kms-keyfile-v1";

#[derive(Serialize, Deserialize)]
struct KeyFileContents {
    format: String,
    current: u32,
    blind_index: u32,
    /// Per version: the material (base64), or with KMS the wrapped data key (its CiphertextBlob).
    keys: BTreeMap<u32, String>,
    /// When each version was created (RFC 3339); absent in files written before rotation existed.
    #[serde(default)]
    created: BTreeMap<u32, String>,
    /// The KMS key that wraps the data keys (KMS files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_key_id: Option<String>,
}

/// How the key file keeps its keys.
#[derive(Debug, Clone)]
pub enum Wrapping {
    /// The material itself, in a file only its owner may read (the embedded default).
    Local,
    /// Data keys from AWS KMS, kept wrapped: the material is only ever in memory.
    Kms(KmsClient),
}

impl Wrapping {
    fn format(&self) -> &'static str {
        match self {
            Wrapping::Local => FORMAT,
            Wrapping::Kms(_) => KMS_FORMAT,
        }
    }

    /// New material for `version`, and what the file stores for it.
    fn new_key(&self, version: u32) -> Result<(KeyMaterial, String), CryptoError> {
        match self {
            Wrapping::Local => {
                let mut key = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(key.as_mut());
                let stored = B64.encode(key.as_ref());
                Ok((key, stored))
            }
            Wrapping::Kms(kms) => kms.generate_data_key(version),
        }
    }

    /// The material of `version` from what the file stores for it.
    fn material(&self, version: u32, stored: &str) -> Result<KeyMaterial, CryptoError> {
        match self {
            Wrapping::Local => {
                let bytes = Zeroizing::new(
                    B64.decode(stored)
                        .map_err(|_| err(format!("key version {version} is not base64")))?,
                );
                if bytes.len() != 32 {
                    return Err(err(format!("key version {version} is not a 256-bit key")));
                }
                let mut k = Zeroizing::new([0u8; 32]);
                k.copy_from_slice(&bytes);
                Ok(k)
            }
            Wrapping::Kms(kms) => kms.decrypt(version, stored),
        }
    }
}

/// The key versions (mode 0600 file). Created on first use with one 256-bit key.
pub struct KeyFile {
    path: PathBuf,
    current: u32,
    blind_index: u32,
    keys: BTreeMap<u32, KeyMaterial>,
    /// What the file stores per version (the material, or the wrapped data key).
    stored: BTreeMap<u32, String>,
    created: BTreeMap<u32, String>,
    wrapping: Wrapping,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("path", &self.path)
            .field("current", &self.current)
            .field("wrapping", &self.wrapping)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl Into<String>) -> CryptoError {
    CryptoError::KeyStore(msg.into())
}

impl KeyFile {
    /// Opens the local key file, creating it (and a first key) if it does not exist yet.
    /// Refuses a file that anyone but its owner can read or write.
    pub fn open_or_create(path: &Path) -> Result<Self, CryptoError> {
        Self::open_with(path, Wrapping::Local)
    }

    /// Opens (or creates) the key file kept the way `wrapping` says. A file kept another way is
    /// refused: switching providers is a migration, not a configuration change.
    pub fn open_with(path: &Path, wrapping: Wrapping) -> Result<Self, CryptoError> {
        if let Some(raw) = crate::secret_file::read_private(path).map_err(err)? {
            return Self::parse(path, &raw, wrapping);
        }
        let (_, stored) = wrapping.new_key(1)?;
        let contents = KeyFileContents {
            format: wrapping.format().into(),
            current: 1,
            blind_index: 1,
            keys: BTreeMap::from([(1, stored)]),
            created: BTreeMap::from([(1, now_rfc3339())]),
            kms_key_id: match &wrapping {
                Wrapping::Kms(kms) => Some(kms.key_id().to_string()),
                Wrapping::Local => None,
            },
        };
        let json = Zeroizing::new(serde_json::to_vec_pretty(&contents).map_err(|e| err(e.to_string()))?);
        match crate::secret_file::create_private(path, &json) {
            Ok(()) => tracing::info!(path = %path.display(), "created a new key file"),
            // another process created it in the meantime: use theirs
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(format!("cannot create {}: {e}", path.display()))),
        }
        let raw = crate::secret_file::read_private(path)
            .map_err(err)?
            .ok_or_else(|| err(format!("{} vanished after creation", path.display())))?;
        Self::parse(path, &raw, wrapping)
    }

    fn parse(path: &Path, raw: &[u8], wrapping: Wrapping) -> Result<Self, CryptoError> {
        let contents: KeyFileContents =
            serde_json::from_slice(raw).map_err(|_| err(format!("{} is not a fhirvault key file", path.display())))?;
        if contents.format != wrapping.format() {
            let held = match contents.format.as_str() {
                FORMAT => "local keys",
                KMS_FORMAT => "KMS-wrapped keys",
                _ => return Err(err(format!("{} has unknown format", path.display()))),
            };
            return Err(err(format!(
                "{} holds {held}, but another key provider is configured",
                path.display()
            )));
        }
        let mut keys = BTreeMap::new();
        for (version, stored) in &contents.keys {
            if *version == 0 {
                return Err(err("key version 0 is not valid"));
            }
            keys.insert(*version, wrapping.material(*version, stored)?);
        }
        for needed in [contents.current, contents.blind_index] {
            if !keys.contains_key(&needed) {
                return Err(CryptoError::UnknownKeyVersion(needed));
            }
        }
        Ok(KeyFile {
            path: path.to_path_buf(),
            current: contents.current,
            blind_index: contents.blind_index,
            keys,
            stored: contents.keys,
            created: contents.created,
            wrapping,
        })
    }

    /// Where the keys are kept: `local`, or `aws-kms <key id>`.
    pub fn provider(&self) -> String {
        match &self.wrapping {
            Wrapping::Local => "local key file".into(),
            Wrapping::Kms(kms) => format!("AWS KMS key {}", kms.key_id()),
        }
    }

    /// When a version was created, if the file says.
    pub fn created(&self, version: u32) -> Option<&str> {
        self.created.get(&version).map(String::as_str)
    }

    /// Adds a new random key and makes it the one new ciphertext is written with. The file is
    /// replaced atomically (written beside it, synced, renamed over it).
    pub fn rotate(&mut self) -> Result<u32, CryptoError> {
        let version = self.keys.keys().max().copied().unwrap_or(0) + 1;
        let (key, stored) = self.wrapping.new_key(version)?;
        self.keys.insert(version, key);
        self.stored.insert(version, stored);
        self.created.insert(version, now_rfc3339());
        self.current = version;
        self.persist()?;
        Ok(version)
    }

    /// Removes a version no ciphertext uses any more. Its material is kept in a separate file
    /// beside the key file (`….retired-v<N>`, mode 0600), for restoring older backups.
    pub fn retire(&mut self, version: u32) -> Result<(), CryptoError> {
        if version == self.current || version == self.blind_index {
            return Err(err(format!("key version {version} is in use and cannot be retired")));
        }
        let Some(stored) = self.stored.get(&version) else {
            return Ok(());
        };
        let retired = KeyFileContents {
            format: self.wrapping.format().into(),
            current: version,
            blind_index: version,
            keys: BTreeMap::from([(version, stored.clone())]),
            kms_key_id: self.kms_key_id(),
            created: self
                .created
                .get(&version)
                .map(|c| (version, c.clone()))
                .into_iter()
                .collect(),
        };
        let json = Zeroizing::new(serde_json::to_vec_pretty(&retired).map_err(|e| err(e.to_string()))?);
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".retired-v{version}"));
        match crate::secret_file::create_private(Path::new(&name), &json) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(format!("cannot keep the retired key: {e}"))),
        }
        self.keys.remove(&version);
        self.stored.remove(&version);
        self.persist()
    }

    fn kms_key_id(&self) -> Option<String> {
        match &self.wrapping {
            Wrapping::Kms(kms) => Some(kms.key_id().to_string()),
            Wrapping::Local => None,
        }
    }

    fn persist(&self) -> Result<(), CryptoError> {
        let contents = KeyFileContents {
            format: self.wrapping.format().into(),
            current: self.current,
            blind_index: self.blind_index,
            keys: self.stored.clone(),
            created: self.created.clone(),
            kms_key_id: self.kms_key_id(),
        };
        let json = Zeroizing::new(serde_json::to_vec_pretty(&contents).map_err(|e| err(e.to_string()))?);
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".new-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        crate::secret_file::create_private(&tmp, &json).map_err(|e| err(format!("cannot write the key file: {e}")))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| err(format!("cannot replace the key file: {e}")))
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl KeyProvider for KeyFile {
    fn current_version(&self) -> u32 {
        self.current
    }
    fn versions(&self) -> Vec<(u32, KeyMaterial)> {
        self.keys.iter().map(|(v, k)| (*v, k.clone())).collect()
    }
    fn blind_index_version(&self) -> u32 {
        self.blind_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_with_mode_0600_and_reopened_with_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let a = KeyFile::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = KeyFile::open_or_create(&path).unwrap();
        assert_eq!(a.versions()[0].1.as_ref(), b.versions()[0].1.as_ref());
    }

    #[test]
    fn rotation_adds_a_current_version_and_retirement_keeps_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let mut k = KeyFile::open_or_create(&path).unwrap();
        assert_eq!(k.rotate().unwrap(), 2);
        let reopened = KeyFile::open_or_create(&path).unwrap();
        assert_eq!(reopened.current_version(), 2);
        assert_eq!(reopened.versions().len(), 2);
        assert_eq!(
            reopened.blind_index_version(),
            1,
            "blind indexes do not follow rotation"
        );
        assert!(reopened.created(2).is_some());
        assert!(
            k.retire(2).is_err() && k.retire(1).is_err(),
            "current and blind-index keys stay"
        );
        k.rotate().unwrap();
        k.retire(2).unwrap();
        let reopened = KeyFile::open_or_create(&path).unwrap();
        assert_eq!(reopened.versions().iter().map(|v| v.0).collect::<Vec<_>>(), vec![1, 3]);
        let kept = KeyFile::open_or_create(&dir.path().join("k.json.retired-v2")).unwrap();
        assert_eq!(kept.current_version(), 2);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn refuses_a_world_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        KeyFile::open_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyFile::open_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"));
    }
}
