//! The hash chain: `hash = SHA-256(prev_hash || canonical event bytes)`.

use sha2::{Digest, Sha256};

pub fn link_hash(prev_hash: &[u8], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(canonical);
    h.finalize().into()
}
