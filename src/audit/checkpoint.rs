//! Signed checkpoints of the chain head: (sequence number, hash, time) signed with Ed25519,
//! stored in `audit_checkpoints` and appended to a file outside the database, so that cutting
//! the chain's tail or rewriting it wholesale is caught even by someone who controls the database.

use crate::store::audit::Checkpoint;
use chrono::NaiveDateTime;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::AuditError;

/// The checkpoint signing key (a 32-byte Ed25519 seed in a 0600 file).
pub struct CheckpointKey {
    signing: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The identifier of a verifying key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

/// The signed message: a fixed label, the sequence number, the hash and the time.
fn message(seq: i64, hash: &[u8], signed_at: &NaiveDateTime) -> Vec<u8> {
    format!(
        "fhirvault-audit-checkpoint\n{seq}\n{}\n{}",
        hex(hash),
        signed_at.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ")
    )
    .into_bytes()
}

impl CheckpointKey {
    /// Opens the key file, creating it (mode 0600) with a fresh key on first use.
    pub fn open_or_create(path: &Path) -> Result<CheckpointKey, AuditError> {
        let seed: [u8; 32] = match crate::secret_file::read_private(path).map_err(AuditError::Key)? {
            Some(bytes) => bytes
                .as_slice()
                .try_into()
                .map_err(|_| AuditError::Key(format!("{} must hold 32 bytes", path.display())))?,
            None => {
                let mut seed = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
                match crate::secret_file::create_private(path, &seed) {
                    Ok(()) => seed,
                    // another process created it first: use theirs
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return CheckpointKey::open_or_create(path);
                    }
                    Err(e) => return Err(AuditError::Key(format!("creating {}: {e}", path.display()))),
                }
            }
        };
        let signing = SigningKey::from_bytes(&seed);
        let key_id = key_id(&signing.verifying_key());
        Ok(CheckpointKey { signing, key_id })
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn sign(&self, seq: i64, hash: &[u8], signed_at: NaiveDateTime) -> Checkpoint {
        let signature = self.signing.sign(&message(seq, hash, &signed_at));
        Checkpoint {
            seq,
            hash: hash.to_vec(),
            signed_at,
            key_id: self.key_id.clone(),
            signature: signature.to_bytes().to_vec(),
        }
    }
}

/// Whether `cp` carries a valid signature by `key`.
pub fn signature_valid(key: &VerifyingKey, cp: &Checkpoint) -> bool {
    let Ok(sig) = Signature::from_slice(&cp.signature) else {
        return false;
    };
    key.verify(&message(cp.seq, &cp.hash, &cp.signed_at), &sig).is_ok()
}

/// The file sink: one JSON line per checkpoint, fsynced after each append.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    seq: i64,
    hash: String,
    signed_at: String,
    key_id: String,
    signature: String,
}

impl CheckpointFile {
    pub fn new(path: PathBuf) -> CheckpointFile {
        CheckpointFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&self, cp: &Checkpoint) -> std::io::Result<()> {
        let line = Line {
            seq: cp.seq,
            hash: hex(&cp.hash),
            signed_at: cp.signed_at.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            key_id: cp.key_id.clone(),
            signature: hex(&cp.signature),
        };
        let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        text.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(text.as_bytes())?;
        f.sync_data()
    }

    /// Every checkpoint in the file; a line that does not parse is an error (the file was edited).
    pub fn read(&self) -> Result<Vec<Checkpoint>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("reading {}: {e}", self.path.display())),
        };
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = || format!("{} line {}: not a checkpoint", self.path.display(), n + 1);
            let l: Line = serde_json::from_str(line).map_err(|_| bad())?;
            let signed_at = chrono::DateTime::parse_from_rfc3339(&l.signed_at)
                .map_err(|_| bad())?
                .naive_utc();
            out.push(Checkpoint {
                seq: l.seq,
                hash: unhex(&l.hash).ok_or_else(bad)?,
                signed_at,
                key_id: l.key_id,
                signature: unhex(&l.signature).ok_or_else(bad)?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_sign_verify_and_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = CheckpointKey::open_or_create(&dir.path().join("k")).unwrap();
        let again = CheckpointKey::open_or_create(&dir.path().join("k")).unwrap();
        assert_eq!(key.key_id(), again.key_id());
        let cp = key.sign(42, &[7u8; 32], crate::store::now());
        assert!(signature_valid(&key.verifying_key(), &cp));
        let mut forged = cp.clone();
        forged.seq = 43;
        assert!(!signature_valid(&key.verifying_key(), &forged));
        let file = CheckpointFile::new(dir.path().join("cp.jsonl"));
        file.append(&cp).unwrap();
        assert_eq!(file.read().unwrap(), vec![cp]);
    }
}
