//! Executes a typed search against the index tables: one query for the matching ids (a page,
//! keyset-ordered by id, with the patient compartment applied in SQL for patient-context
//! tokens) and the count, then the current versions of that page.

use super::{Access, DbConnection, Store, StoreError, StoredVersion};
use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Double, Text, Timestamp};

/// One condition on one index table; the `param` is the search parameter's code.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Id(String),
    /// Folded value starts with `prefix` (non-PHI strings).
    StringPrefix {
        param: String,
        prefix: String,
    },
    StringExact {
        param: String,
        value: String,
    },
    StringContains {
        param: String,
        part: String,
    },
    /// PHI strings and tokens: one of these blind indexes.
    StringBlind {
        param: String,
        blind: Vec<u8>,
    },
    TokenBlind {
        param: String,
        blind: Vec<u8>,
    },
    /// `system` None: any system; Some(None): no system (`|code`); code None: any code (`system|`).
    Token {
        param: String,
        system: Option<Option<String>>,
        code: Option<String>,
    },
    /// The indexed range and the searched range: `overlap` for eq-like prefixes, or one of the
    /// comparisons on the bounds.
    Date {
        param: String,
        op: DateOp,
        start: NaiveDateTime,
        end: NaiveDateTime,
    },
    /// PHI dates: the year range that may match (candidates re-checked after decryption).
    DateYear {
        param: String,
        min: i32,
        max: i32,
    },
    Reference {
        param: String,
        target_type: Option<String>,
        id: String,
    },
    Number {
        param: String,
        op: NumOp,
        value: f64,
    },
    Quantity {
        param: String,
        op: NumOp,
        value: f64,
        system: Option<String>,
        code: Option<String>,
    },
    Uri {
        param: String,
        value: String,
    },
    /// `:missing=true|false` on a parameter stored in `table`.
    Missing {
        param: String,
        table: &'static str,
        missing: bool,
    },
    /// None of these holds (`:not`).
    Not(Vec<Cond>),
    /// `uri:below`: the indexed uri starts with `prefix`.
    UriBelow {
        param: String,
        prefix: String,
    },
    /// `uri:above`: the indexed uri is a prefix of `value`.
    UriAbove {
        param: String,
        value: String,
    },
    /// `param:Type.…`: the reference points to a `target_type` resource meeting any of `inner`.
    Chain {
        param: String,
        target_type: String,
        inner: Vec<Cond>,
    },
    /// `_has:Type:param:…`: some `source_type` resource refers to this one through `param` and
    /// meets any of `inner`.
    Has {
        source_type: String,
        param: String,
        inner: Vec<Cond>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateOp {
    /// the indexed range lies within the searched one (eq)
    Within,
    /// not within (ne)
    NotWithin,
    Gt,
    Lt,
    Ge,
    Le,
    /// starts after the searched range ends (sa)
    StartsAfter,
    /// ends before the searched range starts (eb)
    EndsBefore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumOp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

/// A search: every clause must hold (AND); a clause holds when any of its conditions does (OR).
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub resource_type: String,
    pub clauses: Vec<Vec<Cond>>,
    pub count: u32,
    /// Only ids after this one (the paging cursor).
    pub after: Option<String>,
    /// Only resources in this patient's compartment.
    pub patient: Option<String>,
    /// Resources reached through chains and `_has` must lie in this patient's compartment.
    pub nested_patient: Option<String>,
    /// A compartment search: only resources in this patient's compartment.
    pub compartment: Option<String>,
}

pub struct SearchPage {
    pub entries: Vec<StoredVersion>,
    pub total: i64,
    pub next_after: Option<String>,
}

enum Bind {
    Text(String),
    Blob(Vec<u8>),
    Ts(NaiveDateTime),
    Dbl(f64),
    Int(i64),
}

struct Sql {
    pg: bool,
    binds: Vec<Bind>,
    /// Numbers the aliases of nested subqueries so that none shadows another.
    aliases: usize,
    /// Resources reached through chains and `_has` must lie in this patient's compartment.
    patient: Option<String>,
}

impl Sql {
    fn p(&mut self, b: Bind) -> String {
        self.binds.push(b);
        if self.pg {
            format!("${}", self.binds.len())
        } else {
            "?".into()
        }
    }

    fn alias(&mut self, base: &str) -> String {
        self.aliases += 1;
        format!("{base}{}", self.aliases)
    }

    /// The compartment condition on a nested resource row `t` (when the token needs one).
    fn compartment(&mut self, t: &str) -> String {
        match self.patient.clone() {
            Some(p) => {
                let ph = self.p(Bind::Text(p));
                format!(
                    " AND EXISTS (SELECT 1 FROM resource_compartments cc WHERE cc.resource_type = {t}.resource_type \
                     AND cc.logical_id = {t}.logical_id AND cc.version_id = {t}.version_id AND cc.patient_id = {ph})"
                )
            }
            None => String::new(),
        }
    }

    /// SQL for one condition on the resource whose type and id are the expressions `ty`, `id`.
    fn cond(&mut self, c: &Cond, ty: &str, id: &str) -> String {
        let on = |t: &str| format!("{t}.resource_type = {ty} AND {t}.logical_id = {id}");
        let exists = |t: &str, table: &str, extra: String| {
            format!("EXISTS (SELECT 1 FROM {table} {t} WHERE {} AND {extra})", on(t))
        };
        // a fresh alias for each table this condition reads
        let (s_, t_, d_, f_, n_, q_, u_, m_) = (
            self.alias("s"),
            self.alias("t"),
            self.alias("d"),
            self.alias("f"),
            self.alias("n"),
            self.alias("q"),
            self.alias("u"),
            self.alias("m"),
        );
        let _ = (&s_, &t_, &d_, &f_, &n_, &q_, &u_, &m_);
        match c {
            Cond::Id(v) => format!("{id} = {}", self.p(Bind::Text(v.clone()))),
            Cond::Not(inner) => {
                let any: Vec<String> = inner.iter().map(|c| self.cond(c, ty, id)).collect();
                format!("NOT ({})", any.join(" OR "))
            }
            Cond::UriBelow { param, prefix } => {
                let p = self.p(Bind::Text(param.clone()));
                let escaped = prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
                let v = self.p(Bind::Text(format!("{escaped}%")));
                exists(
                    &u_,
                    "search_uri",
                    format!("{u_}.param = {p} AND {u_}.value LIKE {v} ESCAPE '\\'"),
                )
            }
            Cond::UriAbove { param, value } => {
                let p = self.p(Bind::Text(param.clone()));
                let v = self.p(Bind::Text(value.clone()));
                exists(
                    &u_,
                    "search_uri",
                    format!("{u_}.param = {p} AND substr({v}, 1, length({u_}.value)) = {u_}.value"),
                )
            }
            Cond::Chain {
                param,
                target_type,
                inner,
            } => {
                // binds are made in the order their placeholders appear (SQLite counts `?`)
                let target = self.alias("r");
                let tt = self.p(Bind::Text(target_type.clone()));
                let p = self.p(Bind::Text(param.clone()));
                let comp = self.compartment(&target);
                let any: Vec<String> = inner
                    .iter()
                    .map(|c| self.cond(c, &format!("{target}.resource_type"), &format!("{target}.logical_id")))
                    .collect();
                format!(
                    "EXISTS (SELECT 1 FROM search_reference {f_} JOIN resources {target} \
                     ON {target}.resource_type = {tt} AND {target}.logical_id = {f_}.target_id AND {target}.deleted = false \
                     WHERE {f_}.resource_type = {ty} AND {f_}.logical_id = {id} AND {f_}.param = {p} \
                     AND ({f_}.target_type = {target}.resource_type OR {f_}.target_type IS NULL){comp} AND ({}))",
                    any.join(" OR ")
                )
            }
            Cond::Has {
                source_type,
                param,
                inner,
            } => {
                let source = self.alias("r");
                let st = self.p(Bind::Text(source_type.clone()));
                let p = self.p(Bind::Text(param.clone()));
                let comp = self.compartment(&source);
                let any: Vec<String> = inner
                    .iter()
                    .map(|c| self.cond(c, &format!("{source}.resource_type"), &format!("{source}.logical_id")))
                    .collect();
                format!(
                    "EXISTS (SELECT 1 FROM search_reference {f_} JOIN resources {source} \
                     ON {source}.resource_type = {f_}.resource_type AND {source}.logical_id = {f_}.logical_id \
                     AND {source}.deleted = false \
                     WHERE {f_}.resource_type = {st} AND {f_}.param = {p} AND {f_}.target_id = {id} \
                     AND ({f_}.target_type = {ty} OR {f_}.target_type IS NULL){comp} AND ({}))",
                    any.join(" OR ")
                )
            }
            Cond::StringPrefix { param, prefix } => {
                let p = self.p(Bind::Text(param.clone()));
                // LIKE with the pattern characters escaped
                let escaped = prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
                let v = self.p(Bind::Text(format!("{escaped}%")));
                exists(
                    &s_,
                    "search_string",
                    format!("{s_}.param = {p} AND {s_}.value LIKE {v} ESCAPE '\\'"),
                )
            }
            Cond::StringContains { param, part } => {
                let p = self.p(Bind::Text(param.clone()));
                let escaped = part.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
                let v = self.p(Bind::Text(format!("%{escaped}%")));
                exists(
                    &s_,
                    "search_string",
                    format!("{s_}.param = {p} AND {s_}.value LIKE {v} ESCAPE '\\'"),
                )
            }
            Cond::StringExact { param, value } => {
                let p = self.p(Bind::Text(param.clone()));
                let v = self.p(Bind::Text(value.clone()));
                exists(&s_, "search_string", format!("{s_}.param = {p} AND {s_}.value = {v}"))
            }
            Cond::StringBlind { param, blind } | Cond::TokenBlind { param, blind } => {
                let table = if matches!(c, Cond::StringBlind { .. }) {
                    "search_string"
                } else {
                    "search_token"
                };
                let p = self.p(Bind::Text(param.clone()));
                let b = self.p(Bind::Blob(blind.clone()));
                exists(&s_, table, format!("{s_}.param = {p} AND {s_}.blind = {b}"))
            }
            Cond::Token { param, system, code } => {
                let p = self.p(Bind::Text(param.clone()));
                let mut extra = format!("{t_}.param = {p}");
                if let Some(code) = code {
                    extra.push_str(&format!(" AND {t_}.code = {}", self.p(Bind::Text(code.clone()))));
                }
                match system {
                    None => {}
                    Some(None) => extra.push_str(&format!(" AND {t_}.system IS NULL")),
                    Some(Some(s)) => extra.push_str(&format!(" AND {t_}.system = {}", self.p(Bind::Text(s.clone())))),
                }
                exists(&t_, "search_token", extra)
            }
            Cond::Date { param, op, start, end } => {
                let p = self.p(Bind::Text(param.clone()));
                // only the bounds a comparison uses are bound (SQLite counts its `?`)
                let test = match op {
                    DateOp::Within | DateOp::NotWithin => {
                        let (s, e) = (self.p(Bind::Ts(*start)), self.p(Bind::Ts(*end)));
                        let within = format!("{d_}.start_at >= {s} AND {d_}.end_at <= {e}");
                        if *op == DateOp::Within {
                            within
                        } else {
                            format!("NOT ({within})")
                        }
                    }
                    DateOp::Gt => format!("{d_}.end_at > {}", self.p(Bind::Ts(*end))),
                    DateOp::Ge => format!("{d_}.end_at > {}", self.p(Bind::Ts(*start))),
                    DateOp::Lt => format!("{d_}.start_at < {}", self.p(Bind::Ts(*start))),
                    DateOp::Le => format!("{d_}.start_at < {}", self.p(Bind::Ts(*end))),
                    DateOp::StartsAfter => format!("{d_}.start_at >= {}", self.p(Bind::Ts(*end))),
                    DateOp::EndsBefore => format!("{d_}.end_at <= {}", self.p(Bind::Ts(*start))),
                };
                exists(
                    &d_,
                    "search_date",
                    format!("{d_}.param = {p} AND {d_}.start_at IS NOT NULL AND {test}"),
                )
            }
            Cond::DateYear { param, min, max } => {
                let p = self.p(Bind::Text(param.clone()));
                let (a, b) = (self.p(Bind::Int(*min as i64)), self.p(Bind::Int(*max as i64)));
                exists(
                    &d_,
                    "search_date",
                    format!("{d_}.param = {p} AND {d_}.year >= {a} AND {d_}.year <= {b}"),
                )
            }
            Cond::Reference { param, target_type, id } => {
                let p = self.p(Bind::Text(param.clone()));
                let mut extra = format!(
                    "{f_}.param = {p} AND {f_}.target_id = {}",
                    self.p(Bind::Text(id.clone()))
                );
                if let Some(t) = target_type {
                    let tp = self.p(Bind::Text(t.clone()));
                    extra.push_str(&format!(" AND ({f_}.target_type = {tp} OR {f_}.target_type IS NULL)"));
                }
                exists(&f_, "search_reference", extra)
            }
            Cond::Number { param, op, value } => {
                let p = self.p(Bind::Text(param.clone()));
                let v = self.p(Bind::Dbl(*value));
                exists(
                    &n_,
                    "search_number",
                    format!("{n_}.param = {p} AND {n_}.value {} {v}", num_op(*op)),
                )
            }
            Cond::Quantity {
                param,
                op,
                value,
                system,
                code,
            } => {
                let p = self.p(Bind::Text(param.clone()));
                let v = self.p(Bind::Dbl(*value));
                let mut extra = format!("{q_}.param = {p} AND {q_}.value {} {v}", num_op(*op));
                if let Some(c) = code {
                    extra.push_str(&format!(" AND {q_}.code = {}", self.p(Bind::Text(c.clone()))));
                }
                if let Some(s) = system {
                    extra.push_str(&format!(" AND {q_}.system = {}", self.p(Bind::Text(s.clone()))));
                }
                exists(&q_, "search_quantity", extra)
            }
            Cond::Uri { param, value } => {
                let p = self.p(Bind::Text(param.clone()));
                let v = self.p(Bind::Text(value.clone()));
                exists(&u_, "search_uri", format!("{u_}.param = {p} AND {u_}.value = {v}"))
            }
            Cond::Missing { param, table, missing } => {
                let p = self.p(Bind::Text(param.clone()));
                let e = exists(&m_, table, format!("{m_}.param = {p}"));
                if *missing {
                    format!("NOT {e}")
                } else {
                    e
                }
            }
        }
    }
}

fn num_op(op: NumOp) -> &'static str {
    match op {
        NumOp::Eq => "=",
        NumOp::Ne => "<>",
        NumOp::Gt => ">",
        NumOp::Lt => "<",
        NumOp::Ge => ">=",
        NumOp::Le => "<=",
    }
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    logical_id: String,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::Text(v) => q.bind::<Text, _>(v.clone()),
                Bind::Blob(v) => q.bind::<Binary, _>(v.clone()),
                Bind::Ts(v) => q.bind::<Timestamp, _>(*v),
                Bind::Dbl(v) => q.bind::<Double, _>(*v),
                Bind::Int(v) => q.bind::<BigInt, _>(*v),
            };
        }
        q
    }};
}

impl Store {
    pub fn search(&self, access: &Access, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        let mut conn = self.checkout(access)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql {
            pg,
            binds: Vec::new(),
            aliases: 0,
            patient: q.nested_patient.clone(),
        };
        let mut wheres = vec![
            format!("r.resource_type = {}", sql.p(Bind::Text(q.resource_type.clone()))),
            "r.deleted = false".to_string(),
        ];
        for patient in q.patient.iter().chain(q.compartment.iter()) {
            let p = sql.p(Bind::Text(patient.clone()));
            wheres.push(format!(
                "EXISTS (SELECT 1 FROM resource_compartments c WHERE c.resource_type = r.resource_type \
                 AND c.logical_id = r.logical_id AND c.version_id = r.version_id AND c.patient_id = {p})"
            ));
        }
        for clause in &q.clauses {
            let any: Vec<String> = clause
                .iter()
                .map(|c| sql.cond(c, "r.resource_type", "r.logical_id"))
                .collect();
            if !any.is_empty() {
                wheres.push(format!("({})", any.join(" OR ")));
            }
        }
        let filter = wheres.join(" AND ");
        let count_sql = format!("SELECT COUNT(*) AS n FROM resources r WHERE {filter}");
        let mut page_filter = filter.clone();
        let mut page_binds_extra = Vec::new();
        if let Some(after) = &q.after {
            page_binds_extra.push(Bind::Text(after.clone()));
            let ph = if pg {
                format!("${}", sql.binds.len() + 1)
            } else {
                "?".into()
            };
            page_filter.push_str(&format!(" AND r.logical_id > {ph}"));
        }
        let limit = i64::from(q.count) + 1;
        let limit_ph = if pg {
            format!("${}", sql.binds.len() + page_binds_extra.len() + 1)
        } else {
            "?".into()
        };
        let page_sql =
            format!("SELECT r.logical_id FROM resources r WHERE {page_filter} ORDER BY r.logical_id LIMIT {limit_ph}");
        let result = (|| -> Result<(i64, Vec<String>), StoreError> {
            match &mut conn.conn {
                DbConnection::Pg(c) => {
                    let total: CountRow =
                        bind_all!(diesel::sql_query(&count_sql).into_boxed::<diesel::pg::Pg>(), &sql.binds)
                            .get_result(c)?;
                    let q2 = bind_all!(diesel::sql_query(&page_sql).into_boxed::<diesel::pg::Pg>(), &sql.binds);
                    let q2 = bind_all!(q2, &page_binds_extra).bind::<BigInt, _>(limit);
                    let ids: Vec<IdRow> = q2.load(c)?;
                    Ok((total.n, ids.into_iter().map(|r| r.logical_id).collect()))
                }
                DbConnection::Sqlite(c) => {
                    let total: CountRow = bind_all!(
                        diesel::sql_query(&count_sql).into_boxed::<diesel::sqlite::Sqlite>(),
                        &sql.binds
                    )
                    .get_result(c)?;
                    let q2 = bind_all!(
                        diesel::sql_query(&page_sql).into_boxed::<diesel::sqlite::Sqlite>(),
                        &sql.binds
                    );
                    let q2 = bind_all!(q2, &page_binds_extra).bind::<BigInt, _>(limit);
                    let ids: Vec<IdRow> = q2.load(c)?;
                    Ok((total.n, ids.into_iter().map(|r| r.logical_id).collect()))
                }
            }
        })();
        let (total, mut ids) = super::note(&mut conn, result)?;
        drop(conn);
        let has_more = ids.len() > q.count as usize;
        ids.truncate(q.count as usize);
        // the page's versions in one query (deleted or hidden since the first: left out)
        let entries = self.read_many(access, &q.resource_type, &ids)?;
        Ok(SearchPage {
            entries,
            total,
            next_after: if has_more { ids.last().cloned() } else { None },
        })
    }
}

#[derive(QueryableByName)]
struct RefRow {
    #[diesel(sql_type = Text)]
    source_id: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    target_type: Option<String>,
    #[diesel(sql_type = Text)]
    target_id: String,
}

impl Store {
    /// For `_include`: the references `param` (any, with `None`) of these resources makes,
    /// as (source id, target type, target id).
    #[allow(clippy::type_complexity)]
    pub fn references_of(
        &self,
        resource_type: &str,
        ids: &[String],
        param: Option<&str>,
    ) -> Result<Vec<(String, Option<String>, String)>, StoreError> {
        self.reference_rows(false, resource_type, ids, param, None)
    }

    /// For `_revinclude`: the `source_type` resources whose `param` refers to one of `ids` (of
    /// `target_type`), as (source id, target type, target id).
    #[allow(clippy::type_complexity)]
    pub fn referrers_of(
        &self,
        source_type: &str,
        param: Option<&str>,
        target_type: &str,
        ids: &[String],
    ) -> Result<Vec<(String, Option<String>, String)>, StoreError> {
        self.reference_rows(true, source_type, ids, param, Some(target_type))
    }

    #[allow(clippy::type_complexity)]
    fn reference_rows(
        &self,
        reverse: bool,
        resource_type: &str,
        ids: &[String],
        param: Option<&str>,
        target_type: Option<&str>,
    ) -> Result<Vec<(String, Option<String>, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.checkout(&Access::All)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql {
            pg,
            binds: Vec::new(),
            aliases: 0,
            patient: None,
        };
        let rt = sql.p(Bind::Text(resource_type.to_string()));
        let id_col = if reverse { "f.target_id" } else { "f.logical_id" };
        let list: Vec<String> = ids.iter().map(|i| sql.p(Bind::Text(i.clone()))).collect();
        let mut text = format!(
            "SELECT f.logical_id AS source_id, f.target_type, f.target_id FROM search_reference f \
             JOIN resources r ON r.resource_type = f.resource_type AND r.logical_id = f.logical_id AND r.deleted = false \
             WHERE f.resource_type = {rt} AND {id_col} IN ({})",
            list.join(", ")
        );
        if let Some(p) = param {
            text.push_str(&format!(" AND f.param = {}", sql.p(Bind::Text(p.to_string()))));
        }
        if let Some(t) = target_type {
            text.push_str(&format!(
                " AND (f.target_type = {} OR f.target_type IS NULL)",
                sql.p(Bind::Text(t.to_string()))
            ));
        }
        let rows: Result<Vec<RefRow>, StoreError> = match &mut conn.conn {
            DbConnection::Pg(c) => bind_all!(diesel::sql_query(&text).into_boxed::<diesel::pg::Pg>(), &sql.binds)
                .load(c)
                .map_err(StoreError::from),
            DbConnection::Sqlite(c) => bind_all!(
                diesel::sql_query(&text).into_boxed::<diesel::sqlite::Sqlite>(),
                &sql.binds
            )
            .load(c)
            .map_err(StoreError::from),
        };
        let rows = super::note(&mut conn, rows)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.source_id, r.target_type, r.target_id))
            .collect())
    }
}
