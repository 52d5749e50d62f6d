//! Server-side paging state of searches (`search_pages`): the query of a search with more than
//! one page, sealed like resource content, under a random token that page links carry. What a
//! token names expires; expired rows go when the next state is saved.

use super::{Access, DbConnection, Store, StoreError};
use crate::crypto::{Aad, Sealed};
use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{Binary, Text, Timestamp};

const TABLE: &str = "search_pages";

#[derive(QueryableByName)]
struct StateRow {
    #[diesel(sql_type = Binary)]
    state: Vec<u8>,
}

fn aad(token: &str) -> Aad<'_> {
    Aad {
        table: TABLE,
        resource_type: "",
        logical_id: token,
        version_id: 0,
    }
}

impl Store {
    /// Keeps `state` (sealed) under `token` until `expires`.
    pub fn save_page_state(&self, token: &str, expires: NaiveDateTime, state: &[u8]) -> Result<(), StoreError> {
        let sealed = self.cipher.seal(&aad(token), state)?;
        let now = super::now();
        self.write_tx(&Access::All, |conn| {
            match conn {
                DbConnection::Pg(c) => {
                    // a lost page token costs a re-run search, not data: no need to wait for
                    // the WAL flush
                    diesel::sql_query("SET LOCAL synchronous_commit = off").execute(c)?;
                    diesel::sql_query("DELETE FROM search_pages WHERE expires_at < $1")
                        .bind::<Timestamp, _>(now)
                        .execute(c)?;
                    diesel::sql_query("INSERT INTO search_pages (token, expires_at, state) VALUES ($1, $2, $3)")
                        .bind::<Text, _>(token)
                        .bind::<Timestamp, _>(expires)
                        .bind::<Binary, _>(sealed.as_bytes())
                        .execute(c)?;
                }
                DbConnection::Sqlite(c) => {
                    diesel::sql_query("DELETE FROM search_pages WHERE expires_at < ?")
                        .bind::<Timestamp, _>(now)
                        .execute(c)?;
                    diesel::sql_query("INSERT INTO search_pages (token, expires_at, state) VALUES (?, ?, ?)")
                        .bind::<Text, _>(token)
                        .bind::<Timestamp, _>(expires)
                        .bind::<Binary, _>(sealed.as_bytes())
                        .execute(c)?;
                }
            }
            Ok(())
        })
    }

    /// The state saved under `token`, unless it expired.
    pub fn load_page_state(&self, token: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = super::now();
        let mut conn = self.checkout(&Access::All)?;
        let rows: Result<Vec<StateRow>, StoreError> = match &mut conn.conn {
            DbConnection::Pg(c) => {
                diesel::sql_query("SELECT state FROM search_pages WHERE token = $1 AND expires_at >= $2")
                    .bind::<Text, _>(token)
                    .bind::<Timestamp, _>(now)
                    .load(c)
                    .map_err(StoreError::from)
            }
            DbConnection::Sqlite(c) => {
                diesel::sql_query("SELECT state FROM search_pages WHERE token = ? AND expires_at >= ?")
                    .bind::<Text, _>(token)
                    .bind::<Timestamp, _>(now)
                    .load(c)
                    .map_err(StoreError::from)
            }
        };
        let rows = super::note(&mut conn, rows)?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some(self.cipher.open(&aad(token), &Sealed::from_stored(row.state))?)),
            None => Ok(None),
        }
    }
}
