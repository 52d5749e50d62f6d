//! The rows AuditEvent search filters on (`audit_search`, `audit_entities`), derived from the
//! chained events after they are durable, and the search itself.
//!
//! Deriving happens off the request path, chain by chain in `seq` order; each batch of rows
//! and the chain's new `audit_index_progress` position commit together, and the position only
//! moves from the value the deriver read (so two derivers of one chain never both apply a batch).
//! After a crash, the events past a chain's position are derived again from the durable rows.

use super::super::schema::audit_events as ev;
use super::super::schema::{audit_chain as ac, audit_entities as ae, audit_index_progress as ip, audit_search as asr};
use super::{ChainLink, StoredAuditEvent};
use crate::store::{Access, DbConnection, Store, StoreError};
use chrono::NaiveDateTime;
use diesel::prelude::*;

/// What one event derives to: its search columns and its entity rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRow {
    pub event_id: String,
    pub recorded: NaiveDateTime,
    pub type_code: String,
    pub subtype: String,
    pub action: String,
    pub outcome: String,
    pub agent: String,
    /// `source.site`.
    pub site: String,
    /// The blind index of the client's network address.
    pub address: Option<Vec<u8>>,
    /// (role, versionless reference): `patient` for the patients, `entity` for the rest; and
    /// (role, value) of the facets `search::FACET_ROLES` names.
    pub references: std::collections::BTreeSet<(String, String)>,
}

/// `$access-report`: the events naming one of these patients, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub patients: Vec<String>,
    /// Newest first; only rows strictly older than this (recorded, id) cursor.
    pub before: Option<(NaiveDateTime, String)>,
    pub count: u32,
}

type DerivedColumns = (
    String,
    NaiveDateTime,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<Vec<u8>>,
);

/// The search rows of these events (entity rows not filled in).
pub(super) fn search_rows_by_id(conn: &mut DbConnection, ids: &[String]) -> Result<Vec<SearchRow>, StoreError> {
    Ok(asr::table
        .filter(asr::event_id.eq_any(ids))
        .select((
            asr::event_id,
            asr::recorded,
            asr::type_code,
            asr::subtype,
            asr::action,
            asr::outcome,
            asr::agent,
            asr::site,
            asr::address,
        ))
        .load::<DerivedColumns>(conn)?
        .into_iter()
        .map(
            |(event_id, recorded, type_code, subtype, action, outcome, agent, site, address)| SearchRow {
                event_id,
                recorded,
                type_code,
                subtype,
                action,
                outcome,
                agent,
                site,
                address,
                references: Default::default(),
            },
        )
        .collect())
}

/// Stores the derived rows of `chain`'s links `(from, to]` and moves its position from `from`
/// to `to`, in the transaction the caller opened. False (nothing stored) if the position was no
/// longer `from`: someone else derived them.
pub(super) fn index_batch(
    conn: &mut DbConnection,
    chain: i64,
    from: i64,
    to: i64,
    rows: &[SearchRow],
) -> Result<bool, StoreError> {
    let moved = diesel::update(ip::table.filter(ip::chain_id.eq(chain).and(ip::indexed_seq.eq(from))))
        .set(ip::indexed_seq.eq(to))
        .execute(conn)?;
    if moved == 0 {
        let present: Option<i64> = ip::table
            .filter(ip::chain_id.eq(chain))
            .select(ip::indexed_seq)
            .first(conn)
            .optional()?;
        if present.is_some() || from != 0 {
            return Ok(false);
        }
        diesel::insert_into(ip::table)
            .values((ip::chain_id.eq(chain), ip::indexed_seq.eq(to)))
            .execute(conn)?;
    }
    insert_ignoring_present(conn, rows)?;
    Ok(true)
}

/// Inserts search and entity rows, leaving any already there (a batch derived again after a
/// crash between its commit and the caller learning of it).
fn insert_ignoring_present(conn: &mut DbConnection, rows: &[SearchRow]) -> Result<(), StoreError> {
    let c = match conn {
        DbConnection::Pg(c) => {
            DerivePg::new(rows).execute(c)?;
            return Ok(());
        }
        DbConnection::Sqlite(c) => c,
    };
    // SQLite: one cached single-row statement per row (no round trips to save)
    for r in rows {
        diesel::insert_or_ignore_into(asr::table)
            .values((
                asr::event_id.eq(&r.event_id),
                asr::recorded.eq(r.recorded),
                asr::type_code.eq(&r.type_code),
                asr::subtype.eq(&r.subtype),
                asr::action.eq(&r.action),
                asr::outcome.eq(&r.outcome),
                asr::agent.eq(&r.agent),
                asr::site.eq(&r.site),
                asr::address.eq(&r.address),
            ))
            .execute(c)?;
        for (role, reference) in &r.references {
            diesel::insert_or_ignore_into(ae::table)
                .values((
                    ae::event_id.eq(&r.event_id),
                    ae::role.eq(role),
                    ae::reference.eq(reference),
                ))
                .execute(c)?;
        }
    }
    Ok(())
}

/// The PostgreSQL insert of derived rows: one statement of fixed text (arrays through
/// `unnest`), prepared once per connection whatever the batch size.
#[derive(diesel::query_builder::QueryId)]
struct DerivePg {
    ids: Vec<String>,
    recorded: Vec<NaiveDateTime>,
    type_codes: Vec<String>,
    subtypes: Vec<String>,
    actions: Vec<String>,
    outcomes: Vec<String>,
    agents: Vec<String>,
    sites: Vec<String>,
    addresses: Vec<Option<Vec<u8>>>,
    entity_ids: Vec<String>,
    roles: Vec<String>,
    references: Vec<String>,
}

impl DerivePg {
    fn new(rows: &[SearchRow]) -> DerivePg {
        let refs = || rows.iter().flat_map(|r| r.references.iter().map(move |x| (r, x)));
        DerivePg {
            ids: rows.iter().map(|r| r.event_id.clone()).collect(),
            recorded: rows.iter().map(|r| r.recorded).collect(),
            type_codes: rows.iter().map(|r| r.type_code.clone()).collect(),
            subtypes: rows.iter().map(|r| r.subtype.clone()).collect(),
            actions: rows.iter().map(|r| r.action.clone()).collect(),
            outcomes: rows.iter().map(|r| r.outcome.clone()).collect(),
            agents: rows.iter().map(|r| r.agent.clone()).collect(),
            sites: rows.iter().map(|r| r.site.clone()).collect(),
            addresses: rows.iter().map(|r| r.address.clone()).collect(),
            entity_ids: refs().map(|(r, _)| r.event_id.clone()).collect(),
            roles: refs().map(|(_, (role, _))| role.clone()).collect(),
            references: refs().map(|(_, (_, reference))| reference.clone()).collect(),
        }
    }
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for DerivePg {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Bytea, Nullable, Text, Timestamp};
        out.push_sql(
            "WITH s AS (INSERT INTO audit_search (event_id, recorded, type_code, subtype, action, outcome, agent, \
             site, address) SELECT * FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&self.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamp>, _>(&self.recorded)?;
        for texts in [
            &self.type_codes,
            &self.subtypes,
            &self.actions,
            &self.outcomes,
            &self.agents,
            &self.sites,
        ] {
            out.push_sql(", ");
            out.push_bind_param::<Array<Text>, _>(texts)?;
        }
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Bytea>>, _>(&self.addresses)?;
        out.push_sql(
            ") ON CONFLICT DO NOTHING) INSERT INTO audit_entities (event_id, role, reference) SELECT * FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&self.entity_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.roles)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.references)?;
        out.push_sql(") ON CONFLICT DO NOTHING");
        Ok(())
    }
}

impl RunQueryDsl<diesel::PgConnection> for DerivePg {}

impl Store {
    /// How far `chain` has been derived (0: nothing yet).
    pub fn audit_indexed_seq(&self, chain: i64) -> Result<i64, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ip::table
            .filter(ip::chain_id.eq(chain))
            .select(ip::indexed_seq)
            .first(&mut conn.conn)
            .optional()?
            .unwrap_or(0))
    }

    /// The links of `chain` after `after` (at most `limit`) with their events, for deriving
    /// what the deriver did not see being appended.
    pub fn audit_links_with_events(
        &self,
        chain: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(ChainLink, Option<StoredAuditEvent>)>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        Ok(ac::table
            .left_join(ev::table.on(ev::id.eq(ac::event_id)))
            .filter(ac::chain_id.eq(chain).and(ac::seq.gt(after)))
            .order(ac::seq.asc())
            .limit(limit)
            .select((ChainLink::as_select(), Option::<StoredAuditEvent>::as_select()))
            .load(&mut conn.conn)?)
    }

    /// `$access-report`'s page: newest first, one page plus one row (to tell whether more
    /// follow). AuditEvent search is the common engine's (`store::audit::search`).
    pub fn search_audit(&self, q: &AuditQuery) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let mut b = asr::table
            .inner_join(ev::table.on(ev::id.eq(asr::event_id)))
            .into_boxed();
        b = b.filter(diesel::dsl::exists(
            ae::table.filter(
                ae::event_id
                    .eq(asr::event_id)
                    .and(ae::role.eq("patient"))
                    .and(ae::reference.eq_any(q.patients.clone())),
            ),
        ));
        if let Some((ts, id)) = &q.before {
            b = b.filter(
                asr::recorded
                    .lt(*ts)
                    .or(asr::recorded.eq(*ts).and(asr::event_id.lt(id.clone()))),
            );
        }
        Ok(b.order((asr::recorded.desc(), asr::event_id.desc()))
            .limit(i64::from(q.count) + 1)
            .select(StoredAuditEvent::as_select())
            .load(&mut conn.conn)?)
    }
}
