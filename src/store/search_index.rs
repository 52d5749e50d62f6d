//! Storage of search index rows (one table per parameter type, see migrations
//! `…000006_search_index`): on every write the rows of the resource's current version replace
//! the previous ones, in the write's transaction. On PostgreSQL that is one statement (data-
//! modifying CTEs), so indexing costs one round trip whatever the number of rows.

use super::{DbConnection, StoreError};
use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{Binary, Double, Nullable, Text, Timestamp};

/// One index row, built by `crate::search` (values already normalized, PHI already blinded).
#[derive(Debug, Clone, PartialEq)]
pub enum SearchRow {
    String {
        param: String,
        /// Folded (prefix and contains searches) and as written (`:exact`); non-PHI only.
        value: Option<String>,
        exact: Option<String>,
        blind: Option<Vec<u8>>,
    },
    Token {
        param: String,
        system: Option<String>,
        code: Option<String>,
        /// A display or text, folded (`:text`), on a row of its own.
        text: Option<String>,
        blind: Option<Vec<u8>>,
    },
    Date {
        param: String,
        start: Option<NaiveDateTime>,
        end: Option<NaiveDateTime>,
        blind: Option<Vec<u8>>,
    },
    Reference {
        param: String,
        target_type: Option<String>,
        target_id: String,
    },
    Number {
        param: String,
        value: f64,
    },
    Quantity {
        param: String,
        value: f64,
        system: Option<String>,
        code: Option<String>,
    },
    Uri {
        param: String,
        value: String,
    },
    Composite {
        param: String,
        c1_system: Option<String>,
        c1_code: String,
        c2_system: Option<String>,
        c2_code: Option<String>,
        c2_number: Option<f64>,
        c2_start: Option<NaiveDateTime>,
        c2_end: Option<NaiveDateTime>,
        c2_text: Option<String>,
        c3_number: Option<f64>,
    },
}

/// Resources per reindex transaction.
const PAGE: i64 = 500;

/// The index tables, in a fixed order.
pub const TABLES: &[&str] = &[
    "search_string",
    "search_token",
    "search_date",
    "search_reference",
    "search_number",
    "search_quantity",
    "search_uri",
    "search_composite",
];

enum Bind {
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
    Ts(Option<NaiveDateTime>),
    Dbl(f64),
    OptDbl(Option<f64>),
}

impl SearchRow {
    /// The index table the row belongs in.
    pub fn table(&self) -> &'static str {
        match self {
            SearchRow::String { .. } => "search_string",
            SearchRow::Token { .. } => "search_token",
            SearchRow::Date { .. } => "search_date",
            SearchRow::Reference { .. } => "search_reference",
            SearchRow::Number { .. } => "search_number",
            SearchRow::Quantity { .. } => "search_quantity",
            SearchRow::Uri { .. } => "search_uri",
            SearchRow::Composite { .. } => "search_composite",
        }
    }

    /// Columns after `resource_type, logical_id`, and their values.
    fn columns(&self) -> (&'static str, Vec<Bind>) {
        use Bind::*;
        match self.clone() {
            SearchRow::String {
                param,
                value,
                exact,
                blind,
            } => (
                "param, value, exact, blind",
                vec![Text(Some(param)), Text(value), Text(exact), Blob(blind)],
            ),
            SearchRow::Token {
                param,
                system,
                code,
                text,
                blind,
            } => (
                "param, system, code, text, blind",
                vec![Text(Some(param)), Text(system), Text(code), Text(text), Blob(blind)],
            ),
            SearchRow::Date {
                param,
                start,
                end,
                blind,
            } => (
                "param, start_at, end_at, blind",
                vec![Text(Some(param)), Ts(start), Ts(end), Blob(blind)],
            ),
            SearchRow::Reference {
                param,
                target_type,
                target_id,
            } => (
                "param, target_type, target_id",
                vec![Text(Some(param)), Text(target_type), Text(Some(target_id))],
            ),
            SearchRow::Number { param, value } => ("param, value", vec![Text(Some(param)), Dbl(value)]),
            SearchRow::Quantity {
                param,
                value,
                system,
                code,
            } => (
                "param, value, system, code",
                vec![Text(Some(param)), Dbl(value), Text(system), Text(code)],
            ),
            SearchRow::Uri { param, value } => ("param, value", vec![Text(Some(param)), Text(Some(value))]),
            SearchRow::Composite {
                param,
                c1_system,
                c1_code,
                c2_system,
                c2_code,
                c2_number,
                c2_start,
                c2_end,
                c2_text,
                c3_number,
            } => (
                "param, c1_system, c1_code, c2_system, c2_code, c2_number, c2_start, c2_end, c2_text, c3_number",
                vec![
                    Text(Some(param)),
                    Text(c1_system),
                    Text(Some(c1_code)),
                    Text(c2_system),
                    Text(c2_code),
                    OptDbl(c2_number),
                    Ts(c2_start),
                    Ts(c2_end),
                    Text(c2_text),
                    OptDbl(c3_number),
                ],
            ),
        }
    }
}

macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::Text(v) => q.bind::<Nullable<Text>, _>(v),
                Bind::Blob(v) => q.bind::<Nullable<Binary>, _>(v),
                Bind::Ts(v) => q.bind::<Nullable<Timestamp>, _>(v),
                Bind::Dbl(v) => q.bind::<Double, _>(v),
                Bind::OptDbl(v) => q.bind::<Nullable<Double>, _>(v),
            };
        }
        q
    }};
}

/// Replaces the index rows of one resource (`fresh`: it has none yet). Public for the benches'
/// raw baseline, which inserts the same rows with the same statements.
pub fn replace(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
    rows: &[SearchRow],
    fresh: bool,
) -> Result<(), StoreError> {
    match conn {
        DbConnection::Pg(pg) => {
            let mut parts = Vec::new();
            let mut binds: Vec<Bind> = vec![Bind::Text(Some(resource_type.into())), Bind::Text(Some(id.into()))];
            if !fresh {
                for t in TABLES {
                    parts.push(format!("DELETE FROM {t} WHERE resource_type = $1 AND logical_id = $2"));
                }
            }
            for table in TABLES {
                let mine: Vec<&SearchRow> = rows.iter().filter(|r| r.table() == *table).collect();
                let Some(first) = mine.first() else { continue };
                let (cols, _) = first.columns();
                let mut values = Vec::new();
                for r in mine {
                    let (_, vs) = r.columns();
                    let mut ph = vec!["$1".to_string(), "$2".to_string()];
                    for v in vs {
                        binds.push(v);
                        ph.push(format!("${}", binds.len()));
                    }
                    values.push(format!("({})", ph.join(", ")));
                }
                parts.push(format!(
                    "INSERT INTO {table} (resource_type, logical_id, {cols}) VALUES {}",
                    values.join(", ")
                ));
            }
            if parts.is_empty() {
                return Ok(());
            }
            let ctes: Vec<String> = parts
                .iter()
                .enumerate()
                .map(|(i, p)| format!("s{i} AS ({p})"))
                .collect();
            let sql = format!("WITH {} SELECT 1", ctes.join(", "));
            let q = bind_all!(diesel::sql_query(sql).into_boxed::<diesel::pg::Pg>(), binds);
            q.execute(pg)?;
        }
        DbConnection::Sqlite(c) => {
            if !fresh {
                for t in TABLES {
                    diesel::sql_query(format!("DELETE FROM {t} WHERE resource_type = ? AND logical_id = ?"))
                        .bind::<Text, _>(resource_type)
                        .bind::<Text, _>(id)
                        .execute(c)?;
                }
            }
            // one multi-row INSERT per table (a statement per row costs a preparation each)
            insert_many(conn, &[(resource_type, id, rows)])?;
        }
    }
    Ok(())
}

/// Inserts index rows of one or many resources (a write on SQLite; a reindex page, after the
/// tables were emptied): per table multi-row INSERTs of at most `MAX_BINDS` values, instead of a
/// statement per row or per resource. Public for the benches' raw baselines.
pub fn insert_many(conn: &mut DbConnection, items: &[(&str, &str, &[SearchRow])]) -> Result<(), StoreError> {
    const MAX_BINDS: usize = 20_000;
    let pg = matches!(conn, DbConnection::Pg(_));
    let ph = |n: usize| if pg { format!("${n}") } else { "?".to_string() };
    let run = |conn: &mut DbConnection, sql: String, binds: Vec<Bind>| -> Result<(), StoreError> {
        match conn {
            DbConnection::Pg(c) => {
                bind_all!(diesel::sql_query(sql).into_boxed::<diesel::pg::Pg>(), binds).execute(c)?;
            }
            DbConnection::Sqlite(c) => {
                bind_all!(diesel::sql_query(sql).into_boxed::<diesel::sqlite::Sqlite>(), binds).execute(c)?;
            }
        }
        Ok(())
    };
    for table in TABLES {
        let mut cols = None;
        let mut values: Vec<String> = Vec::new();
        let mut binds: Vec<Bind> = Vec::new();
        for (t, id, rows) in items {
            for r in rows.iter().filter(|r| r.table() == *table) {
                let (c, vs) = r.columns();
                cols = Some(c);
                let mut row_ph = Vec::with_capacity(vs.len() + 2);
                binds.push(Bind::Text(Some(t.to_string())));
                row_ph.push(ph(binds.len()));
                binds.push(Bind::Text(Some(id.to_string())));
                row_ph.push(ph(binds.len()));
                for v in vs {
                    binds.push(v);
                    row_ph.push(ph(binds.len()));
                }
                values.push(format!("({})", row_ph.join(", ")));
                if binds.len() >= MAX_BINDS {
                    let sql = format!(
                        "INSERT INTO {table} (resource_type, logical_id, {}) VALUES {}",
                        c,
                        values.join(", ")
                    );
                    run(conn, sql, std::mem::take(&mut binds))?;
                    values.clear();
                }
            }
        }
        if let (Some(c), false) = (cols, values.is_empty()) {
            let sql = format!(
                "INSERT INTO {table} (resource_type, logical_id, {c}) VALUES {}",
                values.join(", ")
            );
            run(conn, sql, binds)?;
        }
    }
    Ok(())
}

impl super::Store {
    /// Rebuilds the search index rows of every current resource from its stored content (after
    /// the registry changed, or a restore); `rows(type, json)` builds them; `progress(done)`.
    /// Works in pages of `PAGE` resources, one transaction each; returns the resources indexed.
    pub fn reindex(
        &self,
        rows: impl Fn(&str, &serde_json::Value) -> Vec<SearchRow> + Sync,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, StoreError> {
        // a rebuild: every row goes first (one statement per table), then pages only insert,
        // which halves the index maintenance of replacing row by row
        self.write_tx(&super::Access::All, |conn| {
            for table in TABLES {
                diesel::sql_query(format!("DELETE FROM {table}")).execute(conn)?;
            }
            Ok(())
        })?;
        // a writer thread inserts page k while this one reads and builds page k + 1
        let (pages, incoming) = std::sync::mpsc::sync_channel::<Vec<(String, String, Vec<SearchRow>)>>(1);
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || -> Result<(), StoreError> {
                for built in incoming {
                    self.write_tx(&super::Access::All, |conn| {
                        let items: Vec<(&str, &str, &[SearchRow])> = built
                            .iter()
                            .map(|(t, id, rows)| (t.as_str(), id.as_str(), rows.as_slice()))
                            .collect();
                        insert_many(conn, &items)
                    })?;
                }
                Ok(())
            });
            let read = self.reindex_pages(&rows, &mut progress, &pages);
            drop(pages);
            let written = writer.join().unwrap_or(Err(StoreError::Integrity));
            // the writer's error first: a failed send only says that the writer stopped
            written.and(read)
        })
    }

    /// Reads and builds the pages of a reindex, handing each to the writer; returns the count.
    fn reindex_pages(
        &self,
        rows: &(impl Fn(&str, &serde_json::Value) -> Vec<SearchRow> + Sync),
        progress: &mut impl FnMut(u64),
        pages: &std::sync::mpsc::SyncSender<Vec<(String, String, Vec<SearchRow>)>>,
    ) -> Result<u64, StoreError> {
        use super::schema::resources as cur;
        let mut after: Option<(String, String)> = None;
        let mut done = 0u64;
        loop {
            let mut conn = self.checkout(&super::Access::All)?;
            let mut q = cur::table
                .filter(cur::deleted.eq(false))
                .select((cur::resource_type, cur::logical_id))
                .order((cur::resource_type, cur::logical_id))
                .limit(PAGE)
                .into_boxed();
            if let Some((t, id)) = &after {
                q = q.filter(
                    cur::resource_type
                        .gt(t.clone())
                        .or(cur::resource_type.eq(t.clone()).and(cur::logical_id.gt(id.clone()))),
                );
            }
            let page: Vec<(String, String)> = q.load(&mut conn.conn)?;
            drop(conn);
            if page.is_empty() {
                break;
            }
            let mut by_type: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
            for (t, id) in &page {
                by_type.entry(t.as_str()).or_default().push(id.clone());
            }
            let mut versions = Vec::with_capacity(page.len());
            for (t, ids) in by_type {
                versions.extend(self.read_many(&super::Access::All, t, &ids)?);
            }
            // the rows are CPU work (FHIRPath over every parameter): on every core
            let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let chunk = versions.len().div_ceil(threads).max(1);
            let built: Vec<(String, String, Vec<SearchRow>)> = std::thread::scope(|scope| {
                let handles: Vec<_> = versions
                    .chunks(chunk)
                    .map(|part| {
                        let rows = &rows;
                        scope.spawn(move || -> Result<Vec<_>, StoreError> {
                            part.iter()
                                .map(|v| {
                                    let json: serde_json::Value =
                                        serde_json::from_slice(v.content.as_deref().unwrap_or(b"{}"))
                                            .map_err(|_| StoreError::Integrity)?;
                                    Ok((
                                        v.resource_type.clone(),
                                        v.logical_id.clone(),
                                        rows(&v.resource_type, &json),
                                    ))
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(Err(StoreError::Integrity)))
                    .collect::<Result<Vec<Vec<_>>, _>>()
                    .map(|v| v.into_iter().flatten().collect())
            })?;
            if pages.send(built).is_err() {
                // the writer stopped on an error, which the caller reports
                return Ok(done);
            }
            done += page.len() as u64;
            progress(done);
            after = page.last().cloned();
        }
        Ok(done)
    }

    /// The fingerprint the search index was built under, if recorded.
    pub fn search_fingerprint(&self) -> Result<Option<String>, StoreError> {
        #[derive(QueryableByName)]
        struct V {
            #[diesel(sql_type = Text)]
            value: String,
        }
        let mut conn = self.checkout(&super::Access::All)?;
        let rows: Result<Vec<V>, StoreError> = match &mut conn.conn {
            DbConnection::Pg(c) => diesel::sql_query("SELECT value FROM search_settings WHERE name = 'fingerprint'")
                .load(c)
                .map_err(StoreError::from),
            DbConnection::Sqlite(c) => {
                diesel::sql_query("SELECT value FROM search_settings WHERE name = 'fingerprint'")
                    .load(c)
                    .map_err(StoreError::from)
            }
        };
        Ok(super::note(&mut conn, rows)?.into_iter().next().map(|v| v.value))
    }

    /// Records the fingerprint the search index is now built under.
    pub fn set_search_fingerprint(&self, fingerprint: &str) -> Result<(), StoreError> {
        self.write_tx(&super::Access::All, |conn| {
            let sql = "INSERT INTO search_settings (name, value) VALUES ('fingerprint', $1) \
                       ON CONFLICT (name) DO UPDATE SET value = excluded.value";
            match conn {
                DbConnection::Pg(c) => diesel::sql_query(sql).bind::<Text, _>(fingerprint).execute(c)?,
                DbConnection::Sqlite(c) => diesel::sql_query(sql.replace("$1", "?"))
                    .bind::<Text, _>(fingerprint)
                    .execute(c)?,
            };
            Ok(())
        })
    }

    /// Whether any resource is stored (deleted ones included: their history is searchable
    /// again once they come back).
    pub fn has_resources(&self) -> Result<bool, StoreError> {
        use super::schema::resources as cur;
        let mut conn = self.checkout(&super::Access::All)?;
        let found: Result<Option<String>, StoreError> = cur::table
            .select(cur::logical_id)
            .first(&mut conn.conn)
            .optional()
            .map_err(StoreError::from);
        Ok(super::note(&mut conn, found)?.is_some())
    }

    /// Index rows per table (for status and tests).
    pub fn search_index_counts(&self) -> Result<Vec<(&'static str, i64)>, StoreError> {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.checkout(&super::Access::All)?;
        let mut out = Vec::new();
        for t in TABLES {
            let n: N = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {t}")).get_result(&mut conn.conn)?;
            out.push((*t, n.n));
        }
        Ok(out)
    }
}
