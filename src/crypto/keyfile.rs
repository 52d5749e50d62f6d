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
}

/// Key material in a local file (mode 0600). Created on first use with one random 256-bit key.
pub struct LocalKeyFile {
    path: PathBuf,
    current: u32,
    blind_index: u32,
    keys: BTreeMap<u32, KeyMaterial>,
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
        })
    }
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
    fn refuses_a_world_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        LocalKeyFile::open_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalKeyFile::open_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"));
    }
}
