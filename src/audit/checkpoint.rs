//! Signed checkpoints of every chain's head at once: (chain, seq, hash) for each registered
//! chain and the time, signed with Ed25519, stored in `audit_checkpoints` and appended to a file
//! outside the database, so that cutting a chain's tail, dropping a whole node's chain or
//! rewriting one wholesale is caught even by someone who controls the database. Any node signs
//! them (each its own, on its own schedule); each node appends to its own checkpoint file, and a
//! file several nodes share takes whole lines under an exclusive lock.

use crate::store::audit::{ChainHead, Checkpoint};
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
    if !s.len().is_multiple_of(2) {
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

/// One chain's head as a checkpoint names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedHead {
    pub chain: i64,
    pub seq: i64,
    pub hash: Vec<u8>,
}

/// The `heads` text of a checkpoint: `chain:seq:hash` lines, by chain.
pub fn format_heads(heads: &[(i64, ChainHead)]) -> String {
    let mut sorted: Vec<&(i64, ChainHead)> = heads.iter().collect();
    sorted.sort_by_key(|(c, _)| *c);
    sorted
        .iter()
        .map(|(c, h)| format!("{c}:{}:{}", h.seq, hex(&h.hash)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The heads a checkpoint names; `None` if its text is not well formed.
pub fn parse_heads(text: &str) -> Option<Vec<NamedHead>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut parts = l.split(':');
            let chain = parts.next()?.parse().ok()?;
            let seq = parts.next()?.parse().ok()?;
            let hash = unhex(parts.next()?)?;
            parts.next().is_none().then_some(NamedHead { chain, seq, hash })
        })
        .collect()
}

fn timestamp(t: &NaiveDateTime) -> String {
    t.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The signed message. Format 2: a fixed label, the time and every head. Format 1 (earlier
/// versions, one chain): a fixed label, the sequence number, the hash and the time.
fn message(cp: &Checkpoint) -> Option<Vec<u8>> {
    match cp.format {
        1 => {
            let heads = parse_heads(&cp.heads)?;
            let [h] = heads.as_slice() else { return None };
            Some(
                format!(
                    "fhirvault-audit-checkpoint\n{}\n{}\n{}",
                    h.seq,
                    hex(&h.hash),
                    timestamp(&cp.signed_at)
                )
                .into_bytes(),
            )
        }
        2 => Some(
            format!(
                "fhirvault-audit-checkpoint-v2\n{}\n{}",
                timestamp(&cp.signed_at),
                cp.heads
            )
            .into_bytes(),
        ),
        _ => None,
    }
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

    /// Signs the heads of every chain (format 2).
    pub fn sign(&self, heads: &[(i64, ChainHead)], signed_at: NaiveDateTime) -> Checkpoint {
        let mut cp = Checkpoint {
            id: uuid::Uuid::now_v7().to_string(),
            format: 2,
            signed_at,
            key_id: self.key_id.clone(),
            heads: format_heads(heads),
            signature: Vec::new(),
        };
        if let Some(m) = message(&cp) {
            cp.signature = self.signing.sign(&m).to_bytes().to_vec();
        }
        cp
    }
}

/// Whether `cp` carries a valid signature by `key`.
pub fn signature_valid(key: &VerifyingKey, cp: &Checkpoint) -> bool {
    let Ok(sig) = Signature::from_slice(&cp.signature) else {
        return false;
    };
    message(cp).is_some_and(|m| key.verify(&m, &sig).is_ok())
}

/// The file sink: one JSON line per checkpoint, fsynced after each append.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    id: String,
    format: i32,
    signed_at: String,
    key_id: String,
    heads: String,
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
            id: cp.id.clone(),
            format: cp.format,
            signed_at: timestamp(&cp.signed_at),
            key_id: cp.key_id.clone(),
            heads: cp.heads.clone(),
            signature: hex(&cp.signature),
        };
        let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        text.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        // nodes sharing one file (one data directory) append whole lines, one at a time
        f.lock()?;
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
            parse_heads(&l.heads).ok_or_else(bad)?;
            out.push(Checkpoint {
                id: l.id,
                format: l.format,
                signed_at,
                key_id: l.key_id,
                heads: l.heads,
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
        let head = |seq, b| ChainHead { seq, hash: vec![b; 32] };
        let cp = key.sign(&[(2, head(5, 9)), (1, head(42, 7))], crate::store::now());
        assert!(signature_valid(&key.verifying_key(), &cp));
        let heads = parse_heads(&cp.heads).unwrap();
        assert_eq!(
            heads.iter().map(|h| (h.chain, h.seq)).collect::<Vec<_>>(),
            vec![(1, 42), (2, 5)]
        );
        let mut forged = cp.clone();
        forged.heads = forged.heads.replace("1:42:", "1:41:");
        assert!(!signature_valid(&key.verifying_key(), &forged));
        let mut dropped = cp.clone();
        dropped.heads = dropped.heads.lines().next().unwrap().to_string();
        assert!(
            !signature_valid(&key.verifying_key(), &dropped),
            "a chain left out is caught"
        );
        let file = CheckpointFile::new(dir.path().join("cp.jsonl"));
        file.append(&cp).unwrap();
        assert_eq!(file.read().unwrap(), vec![cp]);
    }
}
