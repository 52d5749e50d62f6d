//! SQL of the audit ledger: event rows (sealed content plus the columns AuditEvent search
//! filters on), the hash chain, signed checkpoints and archive runs. What the rows mean, how
//! hashes are computed and how the chain is verified lives in `crate::audit`; this module only
//! stores and loads.

use super::encrypted::EncryptedColumn;
use super::schema::audit_events as ev;
use super::schema::{audit_archives as ar, audit_chain as ac, audit_checkpoints as ak, audit_entities as ae};
use super::{Access, DbConnection, Store, StoreError};
use crate::crypto::Sealed;
use chrono::NaiveDateTime;
use diesel::prelude::*;

/// The table name bound into the AAD of audit event content.
pub const AUDIT_TABLE: &str = "audit_events";

/// Genesis: the `prev_hash` of the first event ever recorded.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// One AuditEvent ready to store: sealed content and its search columns.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: String,
    pub recorded: NaiveDateTime,
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
}

/// One stored event as loaded back (content still sealed).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = ev)]
pub struct StoredAuditEvent {
    pub id: String,
    pub recorded: NaiveDateTime,
    pub type_code: String,
    pub subtype: String,
    pub action: String,
    pub outcome: String,
    pub agent: String,
    pub key_version: i32,
    pub content: EncryptedColumn,
}

/// The audit writer's own connection, outside the pool: its page cache stays warm with the
/// ledger's hot pages (SQLite), and readers never wait for it (or it for them). Opened on first
/// use and again after the connection is lost.
#[derive(Default)]
pub struct AuditSession {
    conn: Option<DbConnection>,
}

/// One link of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = ac)]
pub struct ChainLink {
    pub seq: i64,
    pub event_id: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The last link: where the next one attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: i64,
    pub hash: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = ak)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: Vec<u8>,
    pub signed_at: NaiveDateTime,
    pub key_id: String,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = ar)]
pub struct ArchiveRun {
    pub up_to_seq: i64,
    pub last_hash: Vec<u8>,
    pub archived_at: NaiveDateTime,
    pub cutoff: NaiveDateTime,
    pub events: i64,
    pub file_sha256: Vec<u8>,
}

/// What the writer appends in one batch: new events (stored and linked) and events already
/// stored by write transactions (linked only).
pub struct ChainBatch<'a> {
    pub new_rows: &'a [AuditRow],
    /// Links for `new_rows` and the already stored events, in chain order, built by the
    /// caller once the head is known.
    pub links: Vec<ChainLink>,
    pub checkpoint: Option<Checkpoint>,
}

/// Filters of an AuditEvent search (all ANDed; values within one filter ORed).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub recorded_from: Option<NaiveDateTime>,
    pub recorded_before: Option<NaiveDateTime>,
    pub agents: Vec<String>,
    pub entities: Vec<String>,
    pub patients: Vec<String>,
    pub types: Vec<String>,
    pub subtypes: Vec<String>,
    pub actions: Vec<String>,
    pub outcomes: Vec<String>,
    /// Newest first; only rows strictly older than this (recorded, id) cursor.
    pub before: Option<(NaiveDateTime, String)>,
    pub count: u32,
}

/// The entity rows of an event: (role, versionless reference), without duplicates.
fn entity_rows(r: &AuditRow) -> std::collections::BTreeSet<(&'static str, String)> {
    r.entities
        .iter()
        .map(|e| ("entity", e.clone()))
        .chain(r.patients.iter().map(|p| ("patient", format!("Patient/{p}"))))
        .collect()
}

/// Inserts event rows and their entity rows (one multi-row INSERT each).
pub(super) fn insert_events(conn: &mut DbConnection, rows: &[AuditRow]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let events: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                ev::id.eq(&r.id),
                ev::recorded.eq(r.recorded),
                ev::type_code.eq(&r.type_code),
                ev::subtype.eq(&r.subtype),
                ev::action.eq(&r.action),
                ev::outcome.eq(&r.outcome),
                ev::agent.eq(&r.agent),
                ev::key_version.eq(r.key_version),
                ev::content.eq(EncryptedColumn(r.content.clone())),
            )
        })
        .collect();
    let entities: Vec<_> = rows
        .iter()
        .flat_map(|r| {
            entity_rows(r)
                .into_iter()
                .map(move |(role, reference)| (ae::event_id.eq(&r.id), ae::role.eq(role), ae::reference.eq(reference)))
        })
        .collect();
    match conn {
        DbConnection::Pg(c) => {
            diesel::insert_into(ev::table).values(&events).execute(c)?;
            if !entities.is_empty() {
                diesel::insert_into(ae::table).values(&entities).execute(c)?;
            }
        }
        // SQLite has no round trips to save: one cached single-row statement per table beats a
        // multi-row statement whose SQL (and so its preparation) changes with the batch size.
        DbConnection::Sqlite(c) => {
            for e in &events {
                diesel::insert_into(ev::table).values(e).execute(c)?;
            }
            for e in &entities {
                diesel::insert_into(ae::table).values(e).execute(c)?;
            }
        }
    }
    Ok(())
}

/// The chain's last link, or where an archive run left it, or genesis.
fn head(conn: &mut DbConnection) -> Result<ChainHead, StoreError> {
    let last: Option<(i64, Vec<u8>)> = ac::table
        .order(ac::seq.desc())
        .select((ac::seq, ac::hash))
        .first(conn)
        .optional()?;
    if let Some((seq, hash)) = last {
        return Ok(ChainHead { seq, hash });
    }
    let archived: Option<(i64, Vec<u8>)> = ar::table
        .order(ar::up_to_seq.desc())
        .select((ar::up_to_seq, ar::last_hash))
        .first(conn)
        .optional()?;
    Ok(match archived {
        Some((seq, hash)) => ChainHead { seq, hash },
        None => ChainHead {
            seq: 0,
            hash: GENESIS_HASH.to_vec(),
        },
    })
}

/// Inserts a batch through Diesel's query builder (SQLite: no round trips to save).
fn insert_batch(conn: &mut DbConnection, batch: &ChainBatch<'_>) -> Result<(), StoreError> {
    insert_events(conn, batch.new_rows)?;
    let link_rows: Vec<_> = batch
        .links
        .iter()
        .map(|l| {
            (
                ac::seq.eq(l.seq),
                ac::event_id.eq(&l.event_id),
                ac::prev_hash.eq(&l.prev_hash),
                ac::hash.eq(&l.hash),
            )
        })
        .collect();
    match conn {
        DbConnection::Pg(c) if !link_rows.is_empty() => {
            diesel::insert_into(ac::table).values(&link_rows).execute(c)?;
        }
        DbConnection::Pg(_) => {}
        DbConnection::Sqlite(c) => {
            for l in &link_rows {
                diesel::insert_into(ac::table).values(l).execute(c)?;
            }
        }
    }
    if let Some(cp) = &batch.checkpoint {
        diesel::insert_into(ak::table).values(cp).execute(conn)?;
    }
    Ok(())
}

/// Inserts a batch on PostgreSQL as one statement (data-modifying CTEs): events, their entity
/// rows, the chain links and the checkpoint travel in a single round trip, which under load
/// costs far less than the five statements it replaces.
fn insert_batch_pg(pg: &mut diesel::PgConnection, batch: &ChainBatch<'_>) -> Result<(), StoreError> {
    use diesel::pg::Pg;
    use diesel::sql_types::{BigInt, Binary, Integer, Text, Timestamp};
    let mut parts: Vec<String> = Vec::new();
    let mut n = 0usize;
    let mut next = |count: usize| {
        let ps: Vec<String> = (0..count)
            .map(|_| {
                n += 1;
                format!("${n}")
            })
            .collect();
        format!("({})", ps.join(","))
    };
    let entity_rows: Vec<(&str, &'static str, String)> = batch
        .new_rows
        .iter()
        .flat_map(|r| {
            entity_rows(r)
                .into_iter()
                .map(move |(role, reference)| (r.id.as_str(), role, reference))
        })
        .collect();
    if !batch.new_rows.is_empty() {
        let values: Vec<String> = batch.new_rows.iter().map(|_| next(9)).collect();
        parts.push(format!(
            "INSERT INTO audit_events (id, recorded, type_code, subtype, action, outcome, agent, key_version, content) VALUES {}",
            values.join(",")
        ));
    }
    if !entity_rows.is_empty() {
        let values: Vec<String> = entity_rows.iter().map(|_| next(3)).collect();
        parts.push(format!(
            "INSERT INTO audit_entities (event_id, role, reference) VALUES {}",
            values.join(",")
        ));
    }
    if !batch.links.is_empty() {
        let values: Vec<String> = batch.links.iter().map(|_| next(4)).collect();
        parts.push(format!(
            "INSERT INTO audit_chain (seq, event_id, prev_hash, hash) VALUES {}",
            values.join(",")
        ));
    }
    if batch.checkpoint.is_some() {
        parts.push(format!(
            "INSERT INTO audit_checkpoints (seq, hash, signed_at, key_id, signature) VALUES {}",
            next(5)
        ));
    }
    let Some(last) = parts.pop() else { return Ok(()) };
    let sql = if parts.is_empty() {
        last
    } else {
        let ctes: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| format!("w{i} AS ({p})"))
            .collect();
        format!("WITH {} {last}", ctes.join(", "))
    };
    let mut q = diesel::sql_query(sql).into_boxed::<Pg>();
    for r in batch.new_rows {
        q = q
            .bind::<Text, _>(r.id.clone())
            .bind::<Timestamp, _>(r.recorded)
            .bind::<Text, _>(r.type_code.clone())
            .bind::<Text, _>(r.subtype.clone())
            .bind::<Text, _>(r.action.clone())
            .bind::<Text, _>(r.outcome.clone())
            .bind::<Text, _>(r.agent.clone())
            .bind::<Integer, _>(r.key_version)
            .bind::<Binary, _>(r.content.as_bytes().to_vec());
    }
    for (id, role, reference) in entity_rows {
        q = q
            .bind::<Text, _>(id.to_string())
            .bind::<Text, _>(role)
            .bind::<Text, _>(reference);
    }
    for l in &batch.links {
        q = q
            .bind::<BigInt, _>(l.seq)
            .bind::<Text, _>(l.event_id.clone())
            .bind::<Binary, _>(l.prev_hash.clone())
            .bind::<Binary, _>(l.hash.clone());
    }
    if let Some(cp) = &batch.checkpoint {
        q = q
            .bind::<BigInt, _>(cp.seq)
            .bind::<Binary, _>(cp.hash.clone())
            .bind::<Timestamp, _>(cp.signed_at)
            .bind::<Text, _>(cp.key_id.clone())
            .bind::<Binary, _>(cp.signature.clone());
    }
    q.execute(pg)?;
    Ok(())
}

impl Store {
    /// Appends a batch to the ledger in one transaction (on PostgreSQL, one statement: a single
    /// round trip): `build` turns the chain head into links (and maybe a checkpoint), and
    /// everything is inserted before one commit. Returns the new head.
    ///
    /// `head` is the head as the caller last saw it (the writer keeps it, saving a query per
    /// batch); `None` reads it. If another process appended meanwhile, the insert of an existing
    /// `seq` fails on the primary key and the caller retries with `None`: the unique `seq` is
    /// what keeps the chain linear, across processes and server instances.
    pub fn append_audit_batch(
        &self,
        session: &mut AuditSession,
        new_rows: &[AuditRow],
        head: Option<&ChainHead>,
        build: impl FnOnce(&ChainHead) -> (Vec<ChainLink>, Option<Checkpoint>),
    ) -> Result<ChainHead, StoreError> {
        let run = |conn: &mut DbConnection| {
            let head = match head {
                Some(h) => h.clone(),
                None => self::head(conn)?,
            };
            let (links, checkpoint) = build(&head);
            let batch = ChainBatch {
                new_rows,
                links,
                checkpoint,
            };
            match conn {
                DbConnection::Pg(pg) => insert_batch_pg(pg, &batch)?,
                DbConnection::Sqlite(_) => insert_batch(conn, &batch)?,
            }
            Ok(batch.links.last().map_or(head, |l| ChainHead {
                seq: l.seq,
                hash: l.hash.clone(),
            }))
        };
        let conn = match &mut session.conn {
            Some(c) => c,
            None => session.conn.insert(self.manager.connect()?),
        };
        let result = match self.backend() {
            // One statement is atomic by itself: no BEGIN and COMMIT round trips around it.
            super::Backend::Postgres => run(conn),
            super::Backend::Sqlite => {
                let _guard = self.sqlite_write_guard();
                conn.transaction(run)
            }
        };
        if result.as_ref().is_err_and(StoreError::is_lost_connection) {
            session.conn = None;
        }
        result
    }

    /// The chain's last link (or where archiving left it, or genesis).
    pub fn audit_chain_head(&self) -> Result<ChainHead, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        head(&mut conn.conn)
    }

    /// Stored events that no chain link names yet (written by a transaction whose link the
    /// writer has not appended, e.g. across a crash), oldest first.
    pub fn unchained_audit_events(&self, limit: i64) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ev::table
            .filter(diesel::dsl::not(diesel::dsl::exists(
                ac::table.filter(ac::event_id.eq(ev::id)),
            )))
            .order((ev::recorded.asc(), ev::id.asc()))
            .limit(limit)
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?)
    }

    /// Chain links with `seq` in `(after, to]`, in order, at most `limit`.
    pub fn audit_chain_page(&self, after: i64, to: Option<i64>, limit: i64) -> Result<Vec<ChainLink>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let mut q = ac::table.filter(ac::seq.gt(after)).into_boxed();
        if let Some(to) = to {
            q = q.filter(ac::seq.le(to));
        }
        Ok(q.order(ac::seq.asc())
            .limit(limit)
            .select(ChainLink::as_select())
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

    /// The number of stored events (chained or not).
    pub fn audit_event_count(&self) -> Result<i64, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ev::table.count().get_result(&mut conn.conn)?)
    }

    pub fn audit_checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ak::table
            .order(ak::seq.asc())
            .select(Checkpoint::as_select())
            .load(&mut conn.conn)?)
    }

    pub fn audit_archive_runs(&self) -> Result<Vec<ArchiveRun>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ar::table
            .order(ar::up_to_seq.asc())
            .select(ArchiveRun::as_select())
            .load(&mut conn.conn)?)
    }

    /// The last chain seq whose event was recorded before `cutoff`, counting only the unbroken
    /// run from the start of the chain (an archive never leaves a younger event behind a gap).
    pub fn audit_archivable_up_to(&self, cutoff: NaiveDateTime) -> Result<Option<i64>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        // the first chained event at or after the cutoff bounds the archivable prefix
        let first_young: Option<i64> = ac::table
            .inner_join(ev::table.on(ev::id.eq(ac::event_id)))
            .filter(ev::recorded.ge(cutoff))
            .select(diesel::dsl::min(ac::seq))
            .first(&mut conn.conn)?;
        let last: Option<i64> = match first_young {
            Some(young) => ac::table
                .filter(ac::seq.lt(young))
                .select(diesel::dsl::max(ac::seq))
                .first(&mut conn.conn)?,
            None => ac::table.select(diesel::dsl::max(ac::seq)).first(&mut conn.conn)?,
        };
        Ok(last)
    }

    /// Records an archive run and removes what it covers, in one transaction (the triggers let
    /// DELETE through only for rows at or below a recorded run). On PostgreSQL this needs the
    /// tables' owner: the server's role cannot delete audit rows.
    pub fn audit_remove_archived(&self, run: &ArchiveRun) -> Result<u64, StoreError> {
        self.write_tx(&Access::All, |conn| {
            diesel::insert_into(ar::table).values(run).execute(conn)?;
            let ids = ac::table.filter(ac::seq.le(run.up_to_seq)).select(ac::event_id);
            diesel::delete(ae::table.filter(ae::event_id.eq_any(ids))).execute(conn)?;
            let ids = ac::table.filter(ac::seq.le(run.up_to_seq)).select(ac::event_id);
            let removed = diesel::delete(ev::table.filter(ev::id.eq_any(ids))).execute(conn)?;
            diesel::delete(ak::table.filter(ak::seq.le(run.up_to_seq))).execute(conn)?;
            diesel::delete(ac::table.filter(ac::seq.le(run.up_to_seq))).execute(conn)?;
            Ok(removed as u64)
        })
    }

    /// AuditEvent search: newest first, one page plus one row (to tell whether more follow).
    pub fn search_audit(&self, q: &AuditQuery) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let mut b = ev::table.into_boxed();
        if let Some(from) = q.recorded_from {
            b = b.filter(ev::recorded.ge(from));
        }
        if let Some(before) = q.recorded_before {
            b = b.filter(ev::recorded.lt(before));
        }
        if !q.agents.is_empty() {
            b = b.filter(ev::agent.eq_any(q.agents.clone()));
        }
        if !q.types.is_empty() {
            b = b.filter(ev::type_code.eq_any(q.types.clone()));
        }
        if !q.subtypes.is_empty() {
            b = b.filter(ev::subtype.eq_any(q.subtypes.clone()));
        }
        if !q.actions.is_empty() {
            b = b.filter(ev::action.eq_any(q.actions.clone()));
        }
        if !q.outcomes.is_empty() {
            b = b.filter(ev::outcome.eq_any(q.outcomes.clone()));
        }
        for (role, refs) in [("entity", &q.entities), ("patient", &q.patients)] {
            if !refs.is_empty() {
                b = b.filter(diesel::dsl::exists(
                    ae::table.filter(
                        ae::event_id
                            .eq(ev::id)
                            .and(ae::role.eq(role))
                            .and(ae::reference.eq_any(refs.clone())),
                    ),
                ));
            }
        }
        if let Some((ts, id)) = &q.before {
            b = b.filter(ev::recorded.lt(*ts).or(ev::recorded.eq(*ts).and(ev::id.lt(id.clone()))));
        }
        Ok(b.order((ev::recorded.desc(), ev::id.desc()))
            .limit(i64::from(q.count) + 1)
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?)
    }
}
