//! Files that hold secrets (the key file, the token signing key, the SQLite database): created
//! readable by their owner only and never overwritten; read only while nobody else can read them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::Zeroizing;

/// The file's bytes, `None` if it does not exist, or an error naming the file (including when
/// its mode lets anyone but the owner read or write it).
pub fn read_private(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:o}; files holding secrets must be readable by their owner only (chmod 600)",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(Zeroizing::new(bytes)))
}

/// Creates the file with mode 0600 and writes `contents` durably. Fails with `AlreadyExists`
/// rather than overwrite: a concurrent creator's file wins.
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Opens (creating it with mode 0600, empty) a file that only serves as a lock: an exclusive
/// `flock` on it is held while the file stays open, and ends with the process.
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_owner_only_never_overwritten_refused_when_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert!(read_private(&p).unwrap().is_none());
        create_private(&p, b"one").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            create_private(&p, b"two").unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(read_private(&p).unwrap().unwrap().as_slice(), b"one");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_private(&p).unwrap_err().contains("chmod 600"));
    }
}
