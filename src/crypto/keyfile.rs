//! The embedded default key provider: a key file in the data directory.

use super::{CryptoError, KeyMaterial, KeyProvider};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const FORMAT: &str = "fhirvault-keyfile-v1";

#[derive(Serialize, Deserialize)]
struct KeyFileContents {
    format: String,
    current: u32,
    blind_index: u32,
    keys: BTreeMap<u32, String>,
    /// When each version was created (RFC 3339); absent in files written before rotation existed.
    #[serde(default)]
    created: BTreeMap<u32, String>,
}

/// Key material in a local file (mode 0600). Created on first use with one random 256-bit key.
pub struct LocalKeyFile {
    path: PathBuf,
    current: u32,
    blind_index: u32,
    keys: BTreeMap<u32, KeyMaterial>,
    created: BTreeMap<u32, String>,
}

impl std::fmt::Debug for LocalKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyFile")
            .field("path", &self.path)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl Into<String>) -> CryptoError {
    CryptoError::KeyStore(msg.into())
}

impl LocalKeyFile {
    /// Opens the key file, creating it (and a first key) if it does not exist yet.
    /// Refuses a file that anyone but its owner can read or write.
    pub fn open_or_create(path: &Path) -> Result<Self, CryptoError> {
        if let Some(raw) = crate::secret_file::read_private(path).map_err(err)? {
            return Self::parse(path, &raw);
        }
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        let contents = KeyFileContents {
            format: FORMAT.into(),
            current: 1,
            blind_index: 1,
            keys: BTreeMap::from([(1, B64.encode(key.as_ref()))]),
            created: BTreeMap::from([(1, now_rfc3339())]),
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
        Self::parse(path, &raw)
    }

    fn parse(path: &Path, raw: &[u8]) -> Result<Self, CryptoError> {
        let contents: KeyFileContents =
            serde_json::from_slice(raw).map_err(|_| err(format!("{} is not a fhirvault key file", path.display())))?;
        if contents.format != FORMAT {
            return Err(err(format!("{} has unknown format", path.display())));
        }
        let mut keys = BTreeMap::new();
        for (version, b64) in &contents.keys {
            let bytes = Zeroizing::new(
                B64.decode(b64)
                    .map_err(|_| err(format!("key version {version} is not base64")))?,
            );
            if bytes.len() != 32 || *version == 0 {
                return Err(err(format!("key version {version} is not a 256-bit key")));
            }
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&bytes);
            keys.insert(*version, k);
        }
        for needed in [contents.current, contents.blind_index] {
            if !keys.contains_key(&needed) {
                return Err(CryptoError::UnknownKeyVersion(needed));
            }
        }
        Ok(LocalKeyFile {
            path: path.to_path_buf(),
            current: contents.current,
            blind_index: contents.blind_index,
            keys,
            created: contents.created,
        })
    }

    /// When a version was created, if the file says.
    pub fn created(&self, version: u32) -> Option<&str> {
        self.created.get(&version).map(String::as_str)
    }

    /// Adds a new random key and makes it the one new ciphertext is written with. The file is
    /// replaced atomically (written beside it, synced, renamed over it).
    pub fn rotate(&mut self) -> Result<u32, CryptoError> {
        let version = self.keys.keys().max().copied().unwrap_or(0) + 1;
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        self.keys.insert(version, key);
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
        let Some(key) = self.keys.get(&version) else {
            return Ok(());
        };
        let retired = KeyFileContents {
            format: FORMAT.into(),
            current: version,
            blind_index: version,
            keys: BTreeMap::from([(version, B64.encode(key.as_ref()))]),
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
        self.persist()
    }

    fn persist(&self) -> Result<(), CryptoError> {
        let contents = KeyFileContents {
            format: FORMAT.into(),
            current: self.current,
            blind_index: self.blind_index,
            keys: self.keys.iter().map(|(v, k)| (*v, B64.encode(k.as_ref()))).collect(),
            created: self.created.clone(),
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

impl KeyProvider for LocalKeyFile {
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
        let a = LocalKeyFile::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = LocalKeyFile::open_or_create(&path).unwrap();
        assert_eq!(a.versions()[0].1.as_ref(), b.versions()[0].1.as_ref());
    }

    #[test]
    fn rotation_adds_a_current_version_and_retirement_keeps_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let mut k = LocalKeyFile::open_or_create(&path).unwrap();
        assert_eq!(k.rotate().unwrap(), 2);
        let reopened = LocalKeyFile::open_or_create(&path).unwrap();
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
        let reopened = LocalKeyFile::open_or_create(&path).unwrap();
        assert_eq!(reopened.versions().iter().map(|v| v.0).collect::<Vec<_>>(), vec![1, 3]);
        let kept = LocalKeyFile::open_or_create(&dir.path().join("k.json.retired-v2")).unwrap();
        assert_eq!(kept.current_version(), 2);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn refuses_a_world_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        LocalKeyFile::open_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalKeyFile::open_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"));
    }
}
