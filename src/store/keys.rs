//! What key rotation needs from storage: how many rows each key version protects, and
//! re-encryption of the rows under older versions with the current key. Re-encryption changes
//! only the ciphertext and its key version (the triggers allow nothing else), checks each
//! version's plaintext digest on the way, and is resumable: it always works on what is still
//! under an old key.

use super::encrypted::EncryptedColumn;
use super::schema::{audit_events as ev, resource_versions as rv};
use super::{Access, Store, StoreError, VERSIONS_TABLE};
use crate::crypto::{sha256, Aad};
use crate::store::audit::AUDIT_TABLE;
use diesel::prelude::*;
use std::collections::BTreeMap;

const BATCH: i64 = 500;

/// Rows per key version, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub resource_versions: BTreeMap<i32, i64>,
    pub audit_events: BTreeMap<i32, i64>,
}

impl KeyUsage {
    pub fn uses(&self, version: u32) -> bool {
        let v = version as i32;
        self.resource_versions.get(&v).copied().unwrap_or(0) > 0 || self.audit_events.get(&v).copied().unwrap_or(0) > 0
    }
}

impl Store {
    pub fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let versions: Vec<(Option<i32>, i64)> = rv::table
            .filter(rv::content.is_not_null())
            .group_by(rv::key_version)
            .select((rv::key_version, diesel::dsl::count_star()))
            .load(&mut conn.conn)?;
        let events: Vec<(i32, i64)> = ev::table
            .group_by(ev::key_version)
            .select((ev::key_version, diesel::dsl::count_star()))
            .load(&mut conn.conn)?;
        Ok(KeyUsage {
            resource_versions: versions.into_iter().filter_map(|(v, n)| v.map(|v| (v, n))).collect(),
            audit_events: events.into_iter().collect(),
        })
    }

    /// Re-encrypts every row under a key version other than the current one, in batches (one
    /// transaction each); `progress(rows done)`. Returns the rows re-encrypted.
    pub fn reencrypt(&self, mut progress: impl FnMut(u64)) -> Result<u64, StoreError> {
        let current = self.cipher.current_version() as i32;
        let mut done = 0u64;
        loop {
            let n = self.write_tx(&Access::All, |conn| {
                #[allow(clippy::type_complexity)]
                let rows: Vec<(i64, String, String, i64, Option<EncryptedColumn>, Option<Vec<u8>>)> = rv::table
                    .filter(rv::content.is_not_null().and(rv::key_version.ne(current)))
                    .order(rv::id)
                    .limit(BATCH)
                    .select((
                        rv::id,
                        rv::resource_type,
                        rv::logical_id,
                        rv::version_id,
                        rv::content,
                        rv::content_sha256,
                    ))
                    .load(conn)?;
                for (id, t, logical, version, content, digest) in &rows {
                    let (Some(sealed), Some(digest)) = (content, digest) else {
                        return Err(StoreError::Integrity);
                    };
                    let aad = Aad {
                        table: VERSIONS_TABLE,
                        resource_type: t,
                        logical_id: logical,
                        version_id: *version,
                    };
                    let plain = zeroize::Zeroizing::new(self.cipher.open(&aad, &sealed.0)?);
                    if sha256(&plain).as_slice() != digest.as_slice() {
                        return Err(StoreError::Integrity);
                    }
                    let resealed = self.cipher.seal(&aad, &plain)?;
                    diesel::update(rv::table.filter(rv::id.eq(id)))
                        .set((
                            rv::content.eq(Some(EncryptedColumn(resealed))),
                            rv::key_version.eq(Some(current)),
                        ))
                        .execute(conn)?;
                }
                Ok(rows.len())
            })?;
            done += n as u64;
            progress(done);
            if (n as i64) < BATCH {
                break;
            }
        }
        loop {
            let n = self.write_tx(&Access::All, |conn| {
                let rows: Vec<(String, EncryptedColumn)> = ev::table
                    .filter(ev::key_version.ne(current))
                    .order(ev::id)
                    .limit(BATCH)
                    .select((ev::id, ev::content))
                    .load(conn)?;
                for (id, sealed) in &rows {
                    let aad = Aad {
                        table: AUDIT_TABLE,
                        resource_type: "AuditEvent",
                        logical_id: id,
                        version_id: 1,
                    };
                    // the event's plaintext (what the chain hashes) is unchanged
                    let Some(resealed) = self.cipher.reseal(&aad, &sealed.0)? else {
                        continue;
                    };
                    diesel::update(ev::table.filter(ev::id.eq(id)))
                        .set((ev::content.eq(EncryptedColumn(resealed)), ev::key_version.eq(current)))
                        .execute(conn)?;
                }
                Ok(rows.len())
            })?;
            done += n as u64;
            progress(done);
            if (n as i64) < BATCH {
                break;
            }
        }
        Ok(done)
    }
}
