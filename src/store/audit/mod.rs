//! SQL of the audit ledger. What the rows mean, how hashes are computed and how the chains are
//! verified lives in `crate::audit`; this module only stores and loads.
//!
//! Tables (see the `audit_ledger_v2` migration):
//! * `audit_events`: the durable event: sealed content, when it was recorded, and the chain
//!   whose node links it. The one row a read must make durable before it answers.
//! * `audit_chains`: one hash chain per node, registered on the node's first start.
//! * `audit_chain`: the links, `(chain_id, seq)` unique: each chain is appended to by the one
//!   process that holds its claim ([`ledger`]), so nodes never contend for a head.
//! * `audit_checkpoints`: signatures over every chain's head at once.
//! * `audit_search`, `audit_entities`: what AuditEvent search filters on, derived from the sealed
//!   events shortly after they are linked ([`index`]), off the request path; `audit_index_progress`
//!   records how far each chain has been derived, so a crash loses none of it.
//! * `audit_archives`: per chain, the prefix exported and removed by `fhirvault audit archive`.

pub mod index;
pub mod ledger;
pub mod search;

use super::encrypted::EncryptedColumn;
use super::schema::audit_events as ev;
use super::schema::{
    audit_archives as ar, audit_chain as ac, audit_chains as chains, audit_checkpoints as ak, audit_entities as ae,
    audit_search as asr,
};
use super::{Access, DbConnection, Store, StoreError};
use crate::crypto::Sealed;
use chrono::NaiveDateTime;
use diesel::prelude::*;

pub use index::{AuditQuery, SearchRow};
pub use ledger::{AuditSession, ChainHead};

/// The table name bound into the AAD of audit event content.
pub const AUDIT_TABLE: &str = "audit_events";

/// The AAD that binds an event's sealed content to its row.
pub fn event_aad(id: &str) -> crate::crypto::Aad<'_> {
    crate::crypto::Aad {
        table: AUDIT_TABLE,
        resource_type: "AuditEvent",
        logical_id: id,
        version_id: 1,
    }
}

/// Genesis: the `prev_hash` of the first event of every chain.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// One AuditEvent ready to store: sealed content, and what its search rows will hold.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: String,
    pub recorded: NaiveDateTime,
    /// The chain whose node links this event (set when it is stored).
    pub chain_id: i64,
    pub type_code: String,
    pub subtype: String,
    pub action: String,
    pub outcome: String,
    pub agent: String,
    pub key_version: i32,
    pub content: Sealed,
    /// Versionless references of what the event touched (`Observation/1`).
    pub entities: Vec<String>,
    /// Ids of the patients whose data the event concerned.
    pub patients: Vec<String>,
    /// `source.site`.
    pub site: String,
    /// The blind index of the client's network address (`search::address_blind`).
    pub address: Option<Vec<u8>>,
    /// Further derived entity rows, (role, value): the agent's roles, a search's query.
    pub facets: Vec<(String, String)>,
}

impl AuditRow {
    /// The search rows this event derives to (what the indexer writes, without decrypting).
    pub fn search_row(&self) -> SearchRow {
        SearchRow {
            event_id: self.id.clone(),
            recorded: self.recorded,
            type_code: self.type_code.clone(),
            subtype: self.subtype.clone(),
            action: self.action.clone(),
            outcome: self.outcome.clone(),
            agent: self.agent.clone(),
            site: self.site.clone(),
            address: self.address.clone(),
            references: self
                .entities
                .iter()
                .map(|e| ("entity".to_string(), e.clone()))
                .chain(
                    self.patients
                        .iter()
                        .map(|p| ("patient".to_string(), format!("Patient/{p}"))),
                )
                .chain(self.facets.iter().cloned())
                .collect(),
        }
    }
}

/// One stored event as loaded back (content still sealed).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = ev)]
pub struct StoredAuditEvent {
    pub id: String,
    pub recorded: NaiveDateTime,
    pub key_version: i32,
    pub content: EncryptedColumn,
    pub chain_id: i64,
}

/// A registered chain: the node that appends to it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = chains)]
pub struct AuditChain {
    pub id: i64,
    pub node: String,
    pub created_at: NaiveDateTime,
}

/// One link of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = ac)]
pub struct ChainLink {
    pub chain_id: i64,
    pub seq: i64,
    pub event_id: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// A signed checkpoint. `heads` lists `chain:seq:hash` (hash in hex), one per line, by chain:
/// every chain's head when it was signed (format 2), or the single chain's (format 1, the
/// checkpoints of earlier versions, signed over `seq` and `hash` alone).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = ak)]
pub struct Checkpoint {
    pub id: String,
    pub format: i32,
    pub signed_at: NaiveDateTime,
    pub key_id: String,
    pub heads: String,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = ar)]
pub struct ArchiveRun {
    pub chain_id: i64,
    pub up_to_seq: i64,
    pub last_hash: Vec<u8>,
    pub archived_at: NaiveDateTime,
    pub cutoff: NaiveDateTime,
    pub events: i64,
    pub file_sha256: Vec<u8>,
}

/// Inserts events a write transaction records (their links come later, from the writer).
pub(in crate::store) fn insert_events(conn: &mut DbConnection, rows: &[AuditRow]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let values: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                ev::id.eq(&r.id),
                ev::recorded.eq(r.recorded),
                ev::key_version.eq(r.key_version),
                ev::content.eq(EncryptedColumn(r.content.clone())),
                ev::chain_id.eq(r.chain_id),
            )
        })
        .collect();
    match conn {
        DbConnection::Pg(c) => {
            diesel::insert_into(ev::table).values(&values).execute(c)?;
        }
        // SQLite: one cached single-row statement per row (no round trips to save)
        DbConnection::Sqlite(c) => {
            for v in &values {
                diesel::insert_into(ev::table).values(v).execute(c)?;
            }
        }
    }
    Ok(())
}

impl Store {
    /// Every registered chain, by id.
    pub fn audit_chains(&self) -> Result<Vec<AuditChain>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(chains::table
            .order(chains::id.asc())
            .select(AuditChain::as_select())
            .load(&mut conn.conn)?)
    }

    /// The chain ids that have links (a link whose chain is not registered was put there).
    pub fn audit_linked_chain_ids(&self) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ac::table
            .select(ac::chain_id)
            .distinct()
            .order(ac::chain_id.asc())
            .load(&mut conn.conn)?)
    }

    /// A chain's last link (or where archiving left it, or genesis).
    pub fn audit_chain_head(&self, chain: i64) -> Result<ChainHead, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        ledger::head(&mut conn.conn, chain)
    }

    /// Links of `chain` with `seq` in `(after, to]`, in order, at most `limit`.
    pub fn audit_chain_page(
        &self,
        chain: i64,
        after: i64,
        to: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ChainLink>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let mut q = ac::table
            .filter(ac::chain_id.eq(chain))
            .filter(ac::seq.gt(after))
            .into_boxed();
        if let Some(to) = to {
            q = q.filter(ac::seq.le(to));
        }
        Ok(q.order(ac::seq.asc())
            .limit(limit)
            .select(ChainLink::as_select())
            .load(&mut conn.conn)?)
    }

    /// The link of `chain` at `seq`, if there is one.
    pub fn audit_link_at(&self, chain: i64, seq: i64) -> Result<Option<ChainLink>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ac::table
            .filter(ac::chain_id.eq(chain).and(ac::seq.eq(seq)))
            .select(ChainLink::as_select())
            .first(&mut conn.conn)
            .optional()?)
    }

    /// Stored events that no link names yet, oldest first: all of them, or those of one chain
    /// recorded before `before` (what a node adopting that chain links).
    pub fn unchained_audit_events(
        &self,
        chain: Option<i64>,
        before: Option<NaiveDateTime>,
        limit: i64,
    ) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let mut q = ev::table
            .filter(diesel::dsl::not(diesel::dsl::exists(
                ac::table.filter(ac::event_id.eq(ev::id)),
            )))
            .into_boxed();
        if let Some(c) = chain {
            q = q.filter(ev::chain_id.eq(c));
        }
        if let Some(b) = before {
            q = q.filter(ev::recorded.lt(b));
        }
        Ok(q.order((ev::recorded.asc(), ev::id.asc()))
            .limit(limit)
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?)
    }

    /// The events with these ids (any order) and their entity rows `(event_id, role, reference)`.
    #[allow(clippy::type_complexity)]
    pub fn audit_events_by_id(
        &self,
        ids: &[String],
    ) -> Result<(Vec<StoredAuditEvent>, Vec<(String, String, String)>), StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let events = ev::table
            .filter(ev::id.eq_any(ids))
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?;
        let entities = ae::table
            .filter(ae::event_id.eq_any(ids))
            .select((ae::event_id, ae::role, ae::reference))
            .load(&mut conn.conn)?;
        Ok((events, entities))
    }

    /// The search rows of these events (their entity rows not filled in).
    pub fn audit_search_rows_by_id(&self, ids: &[String]) -> Result<Vec<SearchRow>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        index::search_rows_by_id(&mut conn.conn, ids)
    }

    /// When the oldest stored event was recorded (none: an empty log), and how many were
    /// recorded at or after `since`.
    pub fn audit_oldest_and_since(&self, since: NaiveDateTime) -> Result<(Option<NaiveDateTime>, i64), StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let oldest: Option<NaiveDateTime> = ev::table.select(diesel::dsl::min(ev::recorded)).first(&mut conn.conn)?;
        let recent: i64 = ev::table
            .filter(ev::recorded.ge(since))
            .count()
            .get_result(&mut conn.conn)?;
        Ok((oldest, recent))
    }

    /// The events of one subtype recorded at or after `since`, oldest first, at most `limit`,
    /// decrypted (from the derived rows: a server's events are there within a second of their
    /// commit).
    pub fn audit_events_of_subtype(
        &self,
        subtype: &str,
        since: NaiveDateTime,
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let stored: Vec<StoredAuditEvent> = ev::table
            .inner_join(asr::table.on(asr::event_id.eq(ev::id)))
            .filter(asr::subtype.eq(subtype).and(asr::recorded.ge(since)))
            .order(asr::event_id.asc())
            .limit(limit)
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?;
        Ok(self.open_events(&stored))
    }

    fn open_events(&self, stored: &[StoredAuditEvent]) -> Vec<serde_json::Value> {
        let cipher = self.cipher();
        stored
            .iter()
            .filter_map(|e| {
                let plain = cipher.open(&event_aad(&e.id), &e.content.0).ok()?;
                serde_json::from_slice(&plain).ok()
            })
            .collect()
    }

    /// The events of one agent (the search key: a user's reference) recorded in `[from, to]`,
    /// oldest first, at most `limit`, decrypted.
    pub fn audit_events_of_agent(
        &self,
        agent: &str,
        from: NaiveDateTime,
        to: NaiveDateTime,
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let stored: Vec<StoredAuditEvent> = ev::table
            .inner_join(asr::table.on(asr::event_id.eq(ev::id)))
            .filter(
                asr::agent
                    .eq(agent)
                    .and(asr::recorded.ge(from))
                    .and(asr::recorded.le(to)),
            )
            .order(asr::event_id.asc())
            .limit(limit)
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?;
        Ok(self.open_events(&stored))
    }

    /// The number of stored events (chained or not).
    pub fn audit_event_count(&self) -> Result<i64, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ev::table.count().get_result(&mut conn.conn)?)
    }

    pub fn audit_checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ak::table
            .order((ak::signed_at.asc(), ak::id.asc()))
            .select(Checkpoint::as_select())
            .load(&mut conn.conn)?)
    }

    pub fn audit_archive_runs(&self) -> Result<Vec<ArchiveRun>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ar::table
            .order((ar::chain_id.asc(), ar::up_to_seq.asc()))
            .select(ArchiveRun::as_select())
            .load(&mut conn.conn)?)
    }

    /// The last seq of `chain` whose event was recorded before `cutoff`, counting only the
    /// unbroken run from the chain's start (an archive never leaves a younger event behind a gap).
    pub fn audit_archivable_up_to(&self, chain: i64, cutoff: NaiveDateTime) -> Result<Option<i64>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        // the first linked event at or after the cutoff bounds the archivable prefix
        let first_young: Option<i64> = ac::table
            .inner_join(ev::table.on(ev::id.eq(ac::event_id)))
            .filter(ac::chain_id.eq(chain))
            .filter(ev::recorded.ge(cutoff))
            .select(diesel::dsl::min(ac::seq))
            .first(&mut conn.conn)?;
        let mine = ac::table.filter(ac::chain_id.eq(chain));
        let last: Option<i64> = match first_young {
            Some(young) => mine
                .filter(ac::seq.lt(young))
                .select(diesel::dsl::max(ac::seq))
                .first(&mut conn.conn)?,
            None => mine.select(diesel::dsl::max(ac::seq)).first(&mut conn.conn)?,
        };
        Ok(last)
    }

    /// Records archive runs (one per chain) and removes what they cover, in one transaction
    /// (the triggers let DELETE through only for rows a recorded run covers, and checkpoints
    /// signed before its cut-off). On PostgreSQL this needs the tables' owner: the server's
    /// role cannot delete audit rows.
    pub fn audit_remove_archived(&self, runs: &[ArchiveRun]) -> Result<u64, StoreError> {
        self.write_tx(&Access::All, |conn| {
            let mut removed = 0;
            for run in runs {
                diesel::insert_into(ar::table).values(run).execute(conn)?;
                let covered = || {
                    ac::table
                        .filter(ac::chain_id.eq(run.chain_id).and(ac::seq.le(run.up_to_seq)))
                        .select(ac::event_id)
                };
                diesel::delete(ae::table.filter(ae::event_id.eq_any(covered()))).execute(conn)?;
                diesel::delete(asr::table.filter(asr::event_id.eq_any(covered()))).execute(conn)?;
                removed += diesel::delete(ev::table.filter(ev::id.eq_any(covered()))).execute(conn)? as u64;
                diesel::delete(ac::table.filter(ac::chain_id.eq(run.chain_id).and(ac::seq.le(run.up_to_seq))))
                    .execute(conn)?;
            }
            if let Some(cutoff) = runs.iter().map(|r| r.cutoff).max() {
                diesel::delete(ak::table.filter(ak::signed_at.lt(cutoff))).execute(conn)?;
            }
            Ok(removed)
        })
    }
}
