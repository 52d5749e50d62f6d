//! Break-glass uses: one row per emergency-access token, written when it is issued, with its
//! reason sealed (bound to the token id) and, once an officer has looked at it, who reviewed it
//! and when. The requests made under a use are in the audit log (their events carry purpose of
//! use BTG and the user); this table is what makes the uses themselves listable and reviewable.

use super::schema::break_glass_uses as bg;
use super::{Access, Store, StoreError};
use crate::crypto::{Aad, Cipher, Sealed};
use chrono::NaiveDateTime;
use diesel::prelude::*;

/// One break-glass use as stored (the reason still sealed).
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = bg)]
pub struct BreakGlassRow {
    pub token_id: String,
    pub issued_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
    pub subject: String,
    pub fhir_user: String,
    pub client_id: Option<String>,
    pub reason: Vec<u8>,
    pub reviewed_at: Option<NaiveDateTime>,
    pub reviewed_by: Option<String>,
}

/// The AAD of a sealed reason: bound to its token, so a reason cannot be moved to another use.
fn reason_aad(token_id: &str) -> Aad<'_> {
    Aad {
        table: "break_glass_uses",
        resource_type: "reason",
        logical_id: token_id,
        version_id: 0,
    }
}

/// Seals the stated reason of a break-glass token.
pub fn seal_reason(cipher: &Cipher, token_id: &str, reason: &str) -> Result<Vec<u8>, crate::crypto::CryptoError> {
    Ok(cipher
        .seal(&reason_aad(token_id), reason.as_bytes())?
        .as_bytes()
        .to_vec())
}

impl BreakGlassRow {
    /// The reason as stated, for the officer's eyes (`None` if it does not open: reported, not
    /// guessed).
    pub fn reason(&self, cipher: &Cipher) -> Option<String> {
        let plain = cipher
            .open(&reason_aad(&self.token_id), &Sealed::from_stored(self.reason.clone()))
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

impl Store {
    /// Records a break-glass token as it is issued.
    pub fn break_glass_add(&self, row: &BreakGlassRow) -> Result<(), StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::insert_into(bg::table)
            .values(row)
            .execute(&mut conn.conn)
            .map(|_| ())
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// The uses issued in `[from, to)`, newest first.
    pub fn break_glass_uses(&self, from: NaiveDateTime, to: NaiveDateTime) -> Result<Vec<BreakGlassRow>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = bg::table
            .filter(bg::issued_at.ge(from).and(bg::issued_at.lt(to)))
            .order((bg::issued_at.desc(), bg::token_id.desc()))
            .select(BreakGlassRow::as_select())
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// One use by its token id.
    pub fn break_glass_use(&self, token_id: &str) -> Result<Option<BreakGlassRow>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = bg::table
            .find(token_id)
            .select(BreakGlassRow::as_select())
            .first(&mut conn.conn)
            .optional()
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Marks a use reviewed by `reviewer`, once: false if there is no such use or it was
    /// reviewed already (the first review stands).
    pub fn break_glass_review(&self, token_id: &str, reviewer: &str) -> Result<bool, StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(bg::table.find(token_id).filter(bg::reviewed_at.is_null()))
            .set((bg::reviewed_at.eq(super::now()), bg::reviewed_by.eq(reviewer)))
            .execute(&mut conn.conn)
            .map(|n| n == 1)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// The requests made under a use: its user's events within its window that declare purpose
    /// of use BTG (the audit log records purpose of use only while break-glass is in effect).
    /// At most `limit` of the user's events are examined; `true` with the count when there were
    /// more.
    pub fn break_glass_requests(&self, row: &BreakGlassRow, limit: i64) -> Result<(usize, bool), StoreError> {
        let events = self.audit_events_of_agent(&row.fhir_user, row.issued_at, row.expires_at, limit + 1)?;
        let more = events.len() as i64 > limit;
        let n = events
            .iter()
            .take(limit as usize)
            .filter(|e| {
                e.pointer("/purposeOfEvent/0/coding/0/code")
                    .and_then(serde_json::Value::as_str)
                    == Some("BTG")
            })
            .count();
        Ok((n, more))
    }

    /// Re-seals every reason under the current key (key rotation); the number re-sealed.
    pub fn break_glass_reencrypt(&self) -> Result<u64, StoreError> {
        let cipher = self.cipher();
        let rows: Vec<(String, Vec<u8>)> = {
            let mut conn = self.checkout(&Access::All)?;
            let result = bg::table
                .select((bg::token_id, bg::reason))
                .load(&mut conn.conn)
                .map_err(StoreError::from);
            super::note(&mut conn, result)?
        };
        let mut done = 0;
        for (id, old) in rows {
            let Some(new) = cipher.reseal(&reason_aad(&id), &Sealed::from_stored(old.clone()))? else {
                continue;
            };
            let _guard = self.sqlite_write_guard();
            let mut conn = self.checkout(&Access::All)?;
            let result = diesel::update(bg::table.find(&id).filter(bg::reason.eq(&old)))
                .set(bg::reason.eq(new.as_bytes()))
                .execute(&mut conn.conn)
                .map_err(StoreError::from);
            done += super::note(&mut conn, result)? as u64;
        }
        Ok(done)
    }
}
