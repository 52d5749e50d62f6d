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
    /// Every group holds, one condition of each (a granular scope's filter inside a clause).
    All(Vec<Vec<Cond>>),
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
    /// PHI values: a row of `table` (string, token or date) holds one of these blind indexes.
    Blind {
        table: &'static str,
        param: String,
        blinds: Vec<Vec<u8>>,
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
    Reference {
        param: String,
        target_type: Option<String>,
        id: String,
    },
    Number {
        param: String,
        test: NumTest,
    },
    Quantity {
        param: String,
        test: NumTest,
        system: Option<String>,
        code: Option<String>,
    },
    /// `:text` on a non-PHI token: a display or text (folded) starts with `prefix`.
    TokenText {
        param: String,
        prefix: String,
    },
    /// A composite parameter: its first component a code (`system` as for `Token`), the
    /// second (and for a few, a third number) on the same element.
    Composite {
        param: String,
        system: Option<Option<String>>,
        code: String,
        second: CompositePart,
        third: Option<NumTest>,
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
    /// The resource is not of one of these types (a filter that applies to some types only).
    TypeNotIn(Vec<String>),
    /// PHI values: rows of `table` hold every one of these blind indexes (the three-character
    /// pieces of a blind `:contains`), found in one pass over the index.
    BlindAll {
        table: &'static str,
        param: String,
        blinds: Vec<Vec<u8>>,
    },
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
    /// the ranges overlap (ap, with the searched range already widened)
    Overlaps,
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
    /// approximately: within 10% of the value
    Ap,
}

/// A comparison of a number with a searched value. `eq` and `ne` compare with the range the
/// value's precision implies (`100` is `[99.5, 100.5)`), `ap` with `[lo, hi]` (±10%).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumTest {
    pub op: NumOp,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The second component of a composite search.
#[derive(Debug, Clone, PartialEq)]
pub enum CompositePart {
    Token {
        system: Option<Option<String>>,
        code: Option<String>,
    },
    Number(NumTest),
    Quantity {
        test: NumTest,
        system: Option<String>,
        code: Option<String>,
    },
    Date {
        op: DateOp,
        start: NaiveDateTime,
        end: NaiveDateTime,
    },
    StringPrefix(String),
}

/// A sort key SQL can order by (parameters stored in plaintext).
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub param: String,
    /// The index table and the column whose least (greatest, descending) value orders.
    pub table: &'static str,
    pub column: &'static str,
    pub descending: bool,
}

/// A search: every clause must hold (AND); a clause holds when any of its conditions does (OR).
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub resource_type: String,
    /// A system search (`_type`): these types instead of `resource_type` alone.
    pub types: Vec<String>,
    pub clauses: Vec<Vec<Cond>>,
    pub count: u32,
    /// Only resources after this (type, id) (the paging cursor).
    pub after: Option<(String, String)>,
    /// Only resources before this (type, id) (a previous page).
    pub before: Option<(String, String)>,
    /// The order for `search_keys` (then type and id); keyset pages are in (type, id) order.
    pub sort: Vec<SortKey>,
    /// Whether to count the matches (`_total` other than `none`).
    pub total: bool,
    /// Only resources in this patient's compartment.
    pub patient: Option<String>,
    /// Resources reached through chains and `_has` must lie in this patient's compartment.
    pub nested_patient: Option<String>,
    /// With `patient` or `nested_patient`: resources of these types that lie in no patient's
    /// compartment match too (the shared resources a patient-context token reads).
    pub shared_types: Vec<String>,
    /// A compartment search: only resources in this patient's compartment.
    pub compartment: Option<String>,
    /// Bulk export at Patient or Group level: only resources in the compartment of one of
    /// these patients, or of any patient when the list is empty.
    pub any_compartment: Option<Vec<String>>,
    /// Only resources whose current version was written after this (exclusive) and up to that
    /// (inclusive) instant: Bulk export's `_since` and transaction time, on the `resources`
    /// row itself rather than through the `_lastUpdated` index.
    pub updated_after: Option<NaiveDateTime>,
    pub updated_until: Option<NaiveDateTime>,
    /// Only resources in no patient's compartment (the shared resources a Patient or Group
    /// level Bulk export adds when `_type` names a shared type).
    pub outside_compartments: bool,
}

/// The type whose searches the audit log's own rows answer (`store::audit::search`).
const AUDIT_EVENT: &str = "AuditEvent";

impl SearchQuery {
    /// A search of every resource of `resource_type`, one default page, counted.
    pub fn of_type(resource_type: &str) -> SearchQuery {
        SearchQuery {
            resource_type: resource_type.to_string(),
            types: Vec::new(),
            clauses: Vec::new(),
            count: 0,
            after: None,
            before: None,
            sort: Vec::new(),
            total: true,
            patient: None,
            nested_patient: None,
            shared_types: Vec::new(),
            compartment: None,
            any_compartment: None,
            updated_after: None,
            updated_until: None,
            outside_compartments: false,
        }
    }

    /// A search of the audit log (AuditEvent alone).
    pub fn is_audit_log(&self) -> bool {
        self.resource_type == AUDIT_EVENT && self.types.iter().all(|t| t == AUDIT_EVENT)
    }
}

pub struct SearchPage {
    pub entries: Vec<StoredVersion>,
    /// The matches (when counted).
    pub total: Option<i64>,
    /// The (type, id) of the page, in order (the page cursors are its first and last).
    pub keys: Vec<(String, String)>,
    /// Whether more lie beyond the page in the direction it was read.
    pub more: bool,
}

#[derive(Clone)]
pub(super) enum Bind {
    Text(String),
    Blob(Vec<u8>),
    Ts(NaiveDateTime),
    Dbl(f64),
    Int(i64),
}

pub(super) struct Sql {
    pub(super) pg: bool,
    pub(super) binds: Vec<Bind>,
    /// Numbers the aliases of nested subqueries so that none shadows another.
    aliases: usize,
    /// Resources reached through chains and `_has` must lie in this patient's compartment.
    patient: Option<String>,
    /// ... or be of these shared types and in no patient's compartment.
    shared: Vec<String>,
}

impl Sql {
    /// The SQL being built for a search's filter (its placeholders numbered for `pg`).
    pub(super) fn for_query(pg: bool, q: &SearchQuery) -> Sql {
        Sql {
            pg,
            binds: Vec::new(),
            aliases: 0,
            patient: q.nested_patient.clone(),
            shared: q.shared_types.clone(),
        }
    }
}

impl Sql {
    pub(super) fn p(&mut self, b: Bind) -> String {
        self.binds.push(b);
        if self.pg {
            format!("${}", self.binds.len())
        } else {
            "?".into()
        }
    }

    pub(super) fn alias(&mut self, base: &str) -> String {
        self.aliases += 1;
        format!("{base}{}", self.aliases)
    }

    /// The compartment condition on a nested resource row `t` (when the token needs one).
    fn compartment(&mut self, t: &str) -> String {
        match self.patient.clone() {
            Some(p) => {
                let shared = self.shared.clone();
                format!(" AND {}", self.in_compartment(t, &p, &shared))
            }
            None => String::new(),
        }
    }

    /// The resource row `r` lies in `patient`'s compartment, or is of one of the `shared`
    /// types and lies in nobody's (its current version, as the row names it).
    fn in_compartment(&mut self, r: &str, patient: &str, shared: &[String]) -> String {
        let alias = self.alias("cc");
        let ph = self.p(Bind::Text(patient.to_string()));
        let own = format!(
            "EXISTS (SELECT 1 FROM resource_compartments {alias} WHERE {alias}.resource_type = {r}.resource_type \
             AND {alias}.logical_id = {r}.logical_id AND {alias}.version_id = {r}.version_id AND {alias}.patient_id = {ph})"
        );
        if shared.is_empty() {
            return own;
        }
        let alias = self.alias("cc");
        let list: Vec<String> = shared.iter().map(|t| self.p(Bind::Text(t.clone()))).collect();
        format!(
            "({own} OR ({r}.resource_type IN ({}) AND NOT EXISTS (SELECT 1 FROM resource_compartments {alias} \
             WHERE {alias}.resource_type = {r}.resource_type AND {alias}.logical_id = {r}.logical_id \
             AND {alias}.version_id = {r}.version_id)))",
            list.join(", ")
        )
    }

    /// A number comparison on `col` (binds made in textual order).
    fn num(&mut self, col: &str, t: &NumTest) -> String {
        match t.op {
            NumOp::Eq | NumOp::Ne | NumOp::Ap => {
                let (lo, hi) = (self.p(Bind::Dbl(t.lo)), self.p(Bind::Dbl(t.hi)));
                let within = if t.op == NumOp::Ap {
                    format!("{col} >= {lo} AND {col} <= {hi}")
                } else {
                    format!("{col} >= {lo} AND {col} < {hi}")
                };
                if t.op == NumOp::Ne {
                    format!("NOT ({within})")
                } else {
                    format!("({within})")
                }
            }
            op => format!("{col} {} {}", num_op(op), self.p(Bind::Dbl(t.value))),
        }
    }

    /// A date comparison of the indexed range `[s, e)` with the searched one.
    pub(super) fn date_test(
        &mut self,
        s: &str,
        e: &str,
        op: DateOp,
        start: NaiveDateTime,
        end: NaiveDateTime,
    ) -> String {
        // only the bounds a comparison uses are bound (SQLite counts its `?`)
        match op {
            DateOp::Within | DateOp::NotWithin => {
                let (a, b) = (self.p(Bind::Ts(start)), self.p(Bind::Ts(end)));
                let within = format!("{s} >= {a} AND {e} <= {b}");
                if op == DateOp::Within {
                    format!("({within})")
                } else {
                    format!("NOT ({within})")
                }
            }
            DateOp::Overlaps => {
                let (b, a) = (self.p(Bind::Ts(end)), self.p(Bind::Ts(start)));
                format!("({s} < {b} AND {e} > {a})")
            }
            DateOp::Gt => format!("{e} > {}", self.p(Bind::Ts(end))),
            DateOp::Ge => format!("{e} > {}", self.p(Bind::Ts(start))),
            DateOp::Lt => format!("{s} < {}", self.p(Bind::Ts(start))),
            DateOp::Le => format!("{s} < {}", self.p(Bind::Ts(end))),
            DateOp::StartsAfter => format!("{s} >= {}", self.p(Bind::Ts(end))),
            DateOp::EndsBefore => format!("{e} <= {}", self.p(Bind::Ts(start))),
        }
    }

    /// SQL for one condition on the resource whose type and id are the expressions `ty`, `id`.
    ///
    /// `lit`: the resource type when it is one known type (a checked name, written into the
    /// SQL): each condition is then an uncorrelated `id IN (SELECT … FROM index WHERE …)` that
    /// both planners drive from the index table; otherwise a correlated `EXISTS`.
    fn cond(&mut self, c: &Cond, ty: &str, id: &str, lit: Option<&str>) -> String {
        let lit = lit.filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()));
        let exists = |t: &str, table: &str, extra: String| {
            match lit {
            Some(rt) => format!("{id} IN (SELECT {t}.logical_id FROM {table} {t} WHERE {t}.resource_type = '{rt}' AND {extra})"),
            None => format!(
                "EXISTS (SELECT 1 FROM {table} {t} WHERE {t}.resource_type = {ty} AND {t}.logical_id = {id} AND {extra})"
            ),
        }
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
            Cond::TypeNotIn(types) if types.is_empty() => "1 = 1".to_string(),
            Cond::TypeNotIn(types) => {
                let list: Vec<String> = types.iter().map(|t| self.p(Bind::Text(t.clone()))).collect();
                format!("{ty} NOT IN ({})", list.join(", "))
            }
            Cond::All(groups) if groups.is_empty() => "1 = 1".to_string(),
            Cond::All(groups) => {
                let all: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        let any: Vec<String> = g.iter().map(|c| self.cond(c, ty, id, lit)).collect();
                        format!("({})", any.join(" OR "))
                    })
                    .collect();
                format!("({})", all.join(" AND "))
            }
            Cond::Not(inner) => {
                let any: Vec<String> = inner.iter().map(|c| self.cond(c, ty, id, lit)).collect();
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
                    .map(|c| {
                        self.cond(
                            c,
                            &format!("{target}.resource_type"),
                            &format!("{target}.logical_id"),
                            Some(target_type),
                        )
                    })
                    .collect();
                let join = format!(
                    "FROM search_reference {f_} JOIN resources {target} \
                     ON {target}.resource_type = {tt} AND {target}.logical_id = {f_}.target_id AND {target}.deleted = false"
                );
                let rest = format!(
                    "{f_}.param = {p} AND ({f_}.target_type = {target}.resource_type OR {f_}.target_type IS NULL)\
                     {comp} AND ({})",
                    any.join(" OR ")
                );
                match lit {
                    Some(rt) => {
                        format!("{id} IN (SELECT {f_}.logical_id {join} WHERE {f_}.resource_type = '{rt}' AND {rest})")
                    }
                    None => format!(
                        "EXISTS (SELECT 1 {join} WHERE {f_}.resource_type = {ty} AND {f_}.logical_id = {id} AND {rest})"
                    ),
                }
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
                    .map(|c| {
                        self.cond(
                            c,
                            &format!("{source}.resource_type"),
                            &format!("{source}.logical_id"),
                            Some(source_type),
                        )
                    })
                    .collect();
                let join = format!(
                    "FROM search_reference {f_} JOIN resources {source} \
                     ON {source}.resource_type = {f_}.resource_type AND {source}.logical_id = {f_}.logical_id \
                     AND {source}.deleted = false \
                     WHERE {f_}.resource_type = {st} AND {f_}.param = {p}"
                );
                let inner = any.join(" OR ");
                match lit {
                    Some(rt) => format!(
                        "{id} IN (SELECT {f_}.target_id {join} \
                         AND ({f_}.target_type = '{rt}' OR {f_}.target_type IS NULL){comp} AND ({inner}))"
                    ),
                    None => format!(
                        "EXISTS (SELECT 1 {join} AND {f_}.target_id = {id} \
                         AND ({f_}.target_type = {ty} OR {f_}.target_type IS NULL){comp} AND ({inner}))"
                    ),
                }
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
                exists(&s_, "search_string", format!("{s_}.param = {p} AND {s_}.exact = {v}"))
            }
            Cond::BlindAll { table, param, blinds } if !self.pg => {
                // SQLite plans one membership test per piece well, and the grouped pass below
                // badly (it measured 60 times slower); PostgreSQL the other way round
                let all: Vec<String> = blinds
                    .iter()
                    .map(|b| {
                        self.cond(
                            &Cond::Blind {
                                table,
                                param: param.clone(),
                                blinds: vec![b.clone()],
                            },
                            ty,
                            id,
                            lit,
                        )
                    })
                    .collect();
                format!("({})", all.join(" AND "))
            }
            Cond::BlindAll { table, param, blinds } => {
                let p = self.p(Bind::Text(param.clone()));
                let list: Vec<String> = blinds.iter().map(|b| self.p(Bind::Blob(b.clone()))).collect();
                let n = blinds.len();
                let select = format!(
                    "SELECT {s_}.logical_id FROM {table} {s_} WHERE {s_}.resource_type = {{ty}} AND {s_}.param = {p} \
                     AND {s_}.blind IN ({}) GROUP BY {s_}.logical_id HAVING COUNT(DISTINCT {s_}.blind) = {n}",
                    list.join(", ")
                );
                match lit {
                    Some(rt) => format!("{id} IN ({})", select.replace("{ty}", &format!("'{rt}'"))),
                    None => format!("{id} IN ({})", select.replace("{ty}", ty)),
                }
            }
            Cond::Blind { table, param, blinds } => {
                let p = self.p(Bind::Text(param.clone()));
                let list: Vec<String> = blinds.iter().map(|b| self.p(Bind::Blob(b.clone()))).collect();
                let test = if list.len() == 1 {
                    format!("{s_}.blind = {}", list[0])
                } else {
                    format!("{s_}.blind IN ({})", list.join(", "))
                };
                exists(&s_, table, format!("{s_}.param = {p} AND {test}"))
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
                let test = self.date_test(&format!("{d_}.start_at"), &format!("{d_}.end_at"), *op, *start, *end);
                exists(
                    &d_,
                    "search_date",
                    format!("{d_}.param = {p} AND {d_}.start_at IS NOT NULL AND {test}"),
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
            Cond::Number { param, test } => {
                let p = self.p(Bind::Text(param.clone()));
                let t = self.num(&format!("{n_}.value"), test);
                exists(&n_, "search_number", format!("{n_}.param = {p} AND {t}"))
            }
            Cond::Quantity {
                param,
                test,
                system,
                code,
            } => {
                let p = self.p(Bind::Text(param.clone()));
                let mut extra = format!("{q_}.param = {p}");
                if let Some(c) = code {
                    extra.push_str(&format!(" AND {q_}.code = {}", self.p(Bind::Text(c.clone()))));
                }
                if let Some(s) = system {
                    extra.push_str(&format!(" AND {q_}.system = {}", self.p(Bind::Text(s.clone()))));
                }
                let t = self.num(&format!("{q_}.value"), test);
                exists(&q_, "search_quantity", format!("{extra} AND {t}"))
            }
            Cond::TokenText { param, prefix } => {
                let p = self.p(Bind::Text(param.clone()));
                let v = self.p(Bind::Text(format!("{}%", like_escape(prefix))));
                exists(
                    &t_,
                    "search_token",
                    format!("{t_}.param = {p} AND {t_}.text LIKE {v} ESCAPE '\\'"),
                )
            }
            Cond::Composite {
                param,
                system,
                code,
                second,
                third,
            } => {
                let c_ = self.alias("c");
                let p = self.p(Bind::Text(param.clone()));
                let mut extra = format!(
                    "{c_}.param = {p} AND {c_}.c1_code = {}",
                    self.p(Bind::Text(code.clone()))
                );
                match system {
                    None => {}
                    Some(None) => extra.push_str(&format!(" AND {c_}.c1_system IS NULL")),
                    Some(Some(s)) => {
                        extra.push_str(&format!(" AND {c_}.c1_system = {}", self.p(Bind::Text(s.clone()))))
                    }
                }
                let second = match second {
                    CompositePart::Token { system, code } => {
                        let mut t = format!("{c_}.c2_code IS NOT NULL");
                        if let Some(code) = code {
                            t.push_str(&format!(" AND {c_}.c2_code = {}", self.p(Bind::Text(code.clone()))));
                        }
                        match system {
                            None => {}
                            Some(None) => t.push_str(&format!(" AND {c_}.c2_system IS NULL")),
                            Some(Some(s)) => {
                                t.push_str(&format!(" AND {c_}.c2_system = {}", self.p(Bind::Text(s.clone()))))
                            }
                        }
                        t
                    }
                    CompositePart::Number(test) => self.num(&format!("{c_}.c2_number"), test),
                    CompositePart::Quantity { test, system, code } => {
                        let mut t = self.num(&format!("{c_}.c2_number"), test);
                        if let Some(c) = code {
                            t.push_str(&format!(" AND {c_}.c2_code = {}", self.p(Bind::Text(c.clone()))));
                        }
                        if let Some(s) = system {
                            t.push_str(&format!(" AND {c_}.c2_system = {}", self.p(Bind::Text(s.clone()))));
                        }
                        t
                    }
                    CompositePart::Date { op, start, end } => {
                        let t = self.date_test(&format!("{c_}.c2_start"), &format!("{c_}.c2_end"), *op, *start, *end);
                        format!("{c_}.c2_start IS NOT NULL AND {t}")
                    }
                    CompositePart::StringPrefix(prefix) => {
                        let v = self.p(Bind::Text(format!("{}%", like_escape(prefix))));
                        format!("{c_}.c2_text LIKE {v} ESCAPE '\\'")
                    }
                };
                extra.push_str(&format!(" AND {second}"));
                if let Some(test) = third {
                    let t = self.num(&format!("{c_}.c3_number"), test);
                    extra.push_str(&format!(" AND {t}"));
                }
                exists(&c_, "search_composite", extra)
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
        NumOp::Eq | NumOp::Ap => "=",
        NumOp::Ne => "<>",
        NumOp::Gt => ">",
        NumOp::Lt => "<",
        NumOp::Ge => ">=",
        NumOp::Le => "<=",
    }
}

/// A LIKE pattern matching `text` literally (used with `ESCAPE '\'`).
pub(super) fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
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

/// Runs `text` with `binds` on either backend, for rows of `T`.
pub(super) fn load_rows<T>(conn: &mut DbConnection, text: &str, binds: &[Bind]) -> Result<Vec<T>, StoreError>
where
    T: QueryableByName<diesel::pg::Pg> + QueryableByName<diesel::sqlite::Sqlite> + 'static,
{
    Ok(match conn {
        DbConnection::Pg(c) => bind_all!(diesel::sql_query(text).into_boxed::<diesel::pg::Pg>(), binds).load(c)?,
        DbConnection::Sqlite(c) => SqlitePrepared::of(
            text,
            bind_all!(diesel::sql_query(text).into_boxed::<diesel::sqlite::Sqlite>(), binds),
        )
        .load(c)?,
    })
}

/// How many shapes of search statement SQLite keeps prepared (see [`SqlitePrepared`]).
const MAX_PREPARED_SHAPES: usize = 128;

/// A search statement SQLite keeps prepared on its connection. Its text repeats for every search
/// of one shape (which parameters, modifiers, how many values; the values are binds), and parsing
/// and planning it anew was a fifth of a search's time. Diesel keeps every statement it may cache
/// for the connection's life, so only the first [`MAX_PREPARED_SHAPES`] shapes this process
/// meets are kept: a client sending endless new shapes cannot grow memory (those are parsed each
/// time, as all were before). PostgreSQL is left as it was: a kept statement there would also
/// keep a generic plan, chosen without the values.
struct SqlitePrepared<Q> {
    query: Q,
    keep: bool,
}

impl<Q> SqlitePrepared<Q> {
    fn of(text: &str, query: Q) -> SqlitePrepared<Q> {
        use std::hash::{Hash, Hasher};
        static SHAPES: std::sync::Mutex<Option<std::collections::HashSet<u64>>> = std::sync::Mutex::new(None);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        let shape = hasher.finish();
        let mut shapes = SHAPES.lock().unwrap_or_else(|p| p.into_inner());
        let shapes = shapes.get_or_insert_with(Default::default);
        let keep = shapes.contains(&shape) || (shapes.len() < MAX_PREPARED_SHAPES && shapes.insert(shape));
        SqlitePrepared { query, keep }
    }
}

impl<Q> diesel::query_builder::QueryId for SqlitePrepared<Q> {
    type QueryId = ();
    // keyed by its text in the statement cache
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q> diesel::query_builder::Query for SqlitePrepared<Q> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<Q: diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite>>
    diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for SqlitePrepared<Q>
{
    fn walk_ast<'b>(&'b self, out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>) -> QueryResult<()> {
        self.query.walk_ast(out)
    }

    fn is_safe_to_cache_prepared(&self, _: &diesel::sqlite::Sqlite) -> QueryResult<bool> {
        Ok(self.keep)
    }
}

impl<Q, Conn> RunQueryDsl<Conn> for SqlitePrepared<Q> {}

/// Ids of current resources of `resource_type` meeting every clause, in id order, at most
/// `limit`: a conditional write's search, on the write transaction's connection.
pub(super) fn matching_ids(
    conn: &mut DbConnection,
    resource_type: &str,
    clauses: &[Vec<Cond>],
    limit: Option<usize>,
) -> Result<Vec<String>, StoreError> {
    let pg = matches!(conn, DbConnection::Pg(_));
    let mut sql = Sql {
        pg,
        binds: Vec::new(),
        aliases: 0,
        patient: None,
        shared: Vec::new(),
    };
    let mut wheres = vec![
        format!("r.resource_type = {}", sql.p(Bind::Text(resource_type.to_string()))),
        "r.deleted = false".to_string(),
    ];
    for clause in clauses {
        let any: Vec<String> = clause
            .iter()
            .map(|c| sql.cond(c, "r.resource_type", "r.logical_id", Some(resource_type)))
            .collect();
        if !any.is_empty() {
            wheres.push(format!("({})", any.join(" OR ")));
        }
    }
    let mut text = format!(
        "SELECT r.resource_type, r.logical_id FROM resources r WHERE {} ORDER BY r.logical_id",
        wheres.join(" AND ")
    );
    if let Some(n) = limit {
        text.push_str(&format!(" LIMIT {}", sql.p(Bind::Int(n as i64))));
    }
    Ok(Store::key_rows(conn, &text, &sql.binds)?
        .into_iter()
        .map(|(_, id)| id)
        .collect())
}

/// The count of a one-condition search of one type, from the index table alone: index rows
/// exist only for current, not deleted, versions, so the join with `resources` adds nothing
/// there, and skipping it turns a count of thousands of matches into an index-only scan.
/// `None` where that does not hold (several conditions, compartments, negations, chains). On
/// SQLite the count names the index to read: left to itself, its planner answers
/// `COUNT(DISTINCT …)` by walking the index that yields the ids in order, all of the type's rows
/// (measured: 7 counts per second instead of 3,500).
fn index_count(pg: bool, q: &SearchQuery) -> Option<(String, Vec<Bind>)> {
    let single_type = q.types.len() <= 1 && q.types.first().is_none_or(|t| *t == q.resource_type);
    if !single_type
        || q.patient.is_some()
        || q.compartment.is_some()
        || q.nested_patient.is_some()
        || q.any_compartment.is_some()
        || q.updated_after.is_some()
        || q.updated_until.is_some()
    {
        return None;
    }
    let [clause] = q.clauses.as_slice() else { return None };
    let [cond] = clause.as_slice() else { return None };
    let plain = matches!(
        cond,
        Cond::Blind { .. }
            | Cond::Token { .. }
            | Cond::TokenText { .. }
            | Cond::Reference { .. }
            | Cond::Date { .. }
            | Cond::StringPrefix { .. }
            | Cond::StringExact { .. }
            | Cond::StringContains { .. }
            | Cond::Number { .. }
            | Cond::Quantity { .. }
            | Cond::Uri { .. }
            | Cond::UriBelow { .. }
            | Cond::Composite { .. }
    );
    if !plain {
        return None;
    }
    // SQLite: the count is index-only only if it reads the index that serves the condition,
    // which it must be told (a partial index only where the condition implies its WHERE)
    let sqlite_index = match cond {
        Cond::Blind { table, .. } => Some((*table, format!("{table}_blind"))),
        Cond::Token { code: Some(_), .. } => Some(("search_token", "search_token_code".to_string())),
        Cond::Reference { .. } => Some(("search_reference", "search_reference_target".to_string())),
        Cond::Date { .. } => Some(("search_date", "search_date_range".to_string())),
        _ => None,
    };
    if !pg && sqlite_index.is_none() {
        return None;
    }
    let mut sql = Sql {
        pg,
        binds: Vec::new(),
        aliases: 0,
        patient: None,
        shared: Vec::new(),
    };
    let member = sql.cond(cond, "r.resource_type", "r.logical_id", Some(&q.resource_type));
    // `r.logical_id IN (SELECT x.logical_id FROM …)`: its subquery
    let mut sub = member.strip_prefix("r.logical_id IN (")?.strip_suffix(')')?.to_string();
    if let (false, Some((table, index))) = (pg, sqlite_index) {
        // the alias follows the table name in `FROM {table} {alias} WHERE`
        let from = format!("FROM {table} ");
        let at = sub.find(&from)? + from.len();
        let alias_end = at + sub[at..].find(' ')?;
        sub.insert_str(alias_end, &format!(" INDEXED BY {index}"));
    }
    Some((
        format!("SELECT COUNT(DISTINCT c.logical_id) AS n FROM ({sub}) c"),
        sql.binds,
    ))
}

/// A resource's (type, id).
pub type Key = (String, String);

#[derive(QueryableByName)]
struct ContentRow {
    #[diesel(sql_type = Text)]
    resource_type: String,
    #[diesel(sql_type = Text)]
    logical_id: String,
    #[diesel(sql_type = BigInt)]
    version_id: i64,
    #[diesel(sql_type = Binary)]
    content: Vec<u8>,
    #[diesel(sql_type = Binary)]
    content_sha256: Vec<u8>,
}

#[derive(QueryableByName)]
struct KeyRow {
    #[diesel(sql_type = Text)]
    resource_type: String,
    #[diesel(sql_type = Text)]
    logical_id: String,
}

impl Store {
    /// The filter of a search (every clause, the compartments) on `resources r`, its binds in
    /// `sql`.
    fn search_filter(&self, sql: &mut Sql, q: &SearchQuery) -> String {
        let types: Vec<String> = if q.types.is_empty() {
            vec![q.resource_type.clone()]
        } else {
            q.types.clone()
        };
        let list: Vec<String> = types.iter().map(|t| sql.p(Bind::Text(t.clone()))).collect();
        let mut wheres = vec![
            if list.len() == 1 {
                format!("r.resource_type = {}", list[0])
            } else {
                format!("r.resource_type IN ({})", list.join(", "))
            },
            "r.deleted = false".to_string(),
        ];
        if let Some(patient) = &q.patient {
            wheres.push(sql.in_compartment("r", patient, &q.shared_types));
        }
        if let Some(patient) = &q.compartment {
            wheres.push(sql.in_compartment("r", patient, &[]));
        }
        if let Some(after) = q.updated_after {
            let p = sql.p(Bind::Ts(after));
            wheres.push(format!("r.last_updated > {p}"));
        }
        if let Some(until) = q.updated_until {
            let p = sql.p(Bind::Ts(until));
            wheres.push(format!("r.last_updated <= {p}"));
        }
        if q.outside_compartments {
            wheres.push(
                "NOT EXISTS (SELECT 1 FROM resource_compartments c WHERE c.resource_type = r.resource_type \
                 AND c.logical_id = r.logical_id AND c.version_id = r.version_id)"
                    .to_string(),
            );
        }
        if let Some(patients) = &q.any_compartment {
            let of = if patients.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = patients.iter().map(|p| sql.p(Bind::Text(p.clone()))).collect();
                format!(" AND c.patient_id IN ({})", list.join(", "))
            };
            wheres.push(format!(
                "EXISTS (SELECT 1 FROM resource_compartments c WHERE c.resource_type = r.resource_type \
                 AND c.logical_id = r.logical_id AND c.version_id = r.version_id{of})"
            ));
        }
        let lit = (types.len() == 1).then(|| types[0].clone());
        for clause in &q.clauses {
            let any: Vec<String> = clause
                .iter()
                .map(|c| sql.cond(c, "r.resource_type", "r.logical_id", lit.as_deref()))
                .collect();
            if !any.is_empty() {
                wheres.push(format!("({})", any.join(" OR ")));
            }
        }
        wheres.join(" AND ")
    }

    /// Runs `text` with `binds` for (type, id) rows.
    pub(super) fn key_rows(
        conn: &mut DbConnection,
        text: &str,
        binds: &[Bind],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<KeyRow> = load_rows(conn, text, binds)?;
        Ok(rows.into_iter().map(|r| (r.resource_type, r.logical_id)).collect())
    }

    pub(super) fn count_rows(conn: &mut DbConnection, text: &str, binds: &[Bind]) -> Result<i64, StoreError> {
        let n: CountRow = match conn {
            DbConnection::Pg(c) => {
                bind_all!(diesel::sql_query(text).into_boxed::<diesel::pg::Pg>(), binds).get_result(c)?
            }
            DbConnection::Sqlite(c) => SqlitePrepared::of(
                text,
                bind_all!(diesel::sql_query(text).into_boxed::<diesel::sqlite::Sqlite>(), binds),
            )
            .get_result(c)?,
        };
        Ok(n.n)
    }

    /// One page of a search in (type, id) order: after `q.after`, or before `q.before` (a
    /// previous page), with the count when `q.total`. Keyset paging: a page neither repeats nor
    /// skips what was there when the search began, whatever is written meanwhile.
    pub fn search(&self, access: &Access, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        let (total, mut keys) = self.search_page_keys(access, q)?;
        let more = keys.len() > q.count as usize;
        keys.truncate(q.count as usize);
        if matches!((&q.after, &q.before), (None, Some(_))) {
            keys.reverse();
        }
        let entries = self.read_keys(access, &keys)?;
        Ok(SearchPage {
            entries,
            total,
            keys,
            more,
        })
    }

    /// The SQL of a search page: the count, its binds (a prefix of the page's), the page.
    fn page_statements(&self, pg: bool, q: &SearchQuery) -> (String, Vec<Bind>, String, Vec<Bind>) {
        let mut sql = Sql::for_query(pg, q);
        let filter = self.search_filter(&mut sql, q);
        let (count_sql, count_binds) = match index_count(pg, q) {
            Some(counted) => counted,
            None => (
                format!("SELECT COUNT(*) AS n FROM resources r WHERE {filter}"),
                sql.binds.clone(),
            ),
        };
        let (cursor, backward) = match (&q.after, &q.before) {
            (Some(c), _) => (Some(c), false),
            (None, Some(c)) => (Some(c), true),
            (None, None) => (None, false),
        };
        let mut page_filter = filter;
        if let Some((t, id)) = cursor {
            let (a, b) = (sql.p(Bind::Text(t.clone())), sql.p(Bind::Text(id.clone())));
            let cmp = if backward { "<" } else { ">" };
            page_filter.push_str(&format!(" AND (r.resource_type, r.logical_id) {cmp} ({a}, {b})"));
        }
        let limit = sql.p(Bind::Int(i64::from(q.count) + 1));
        let dir = if backward { "DESC" } else { "ASC" };
        let page_sql = format!(
            "SELECT r.resource_type, r.logical_id FROM resources r WHERE {page_filter} \
             ORDER BY r.resource_type {dir}, r.logical_id {dir} LIMIT {limit}"
        );
        (count_sql, count_binds, page_sql, sql.binds)
    }

    /// The next `q.count` matches after `q.after`, in (type, id) order, as (id, decrypted
    /// content): the rows read in the same statement that selects them, without the compartment
    /// list (Bulk Data export, where one round trip per page is most of the cost).
    pub fn search_contents(&self, access: &Access, q: &SearchQuery) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut conn = self.checkout_read(access)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql::for_query(pg, q);
        let mut filter = self.search_filter(&mut sql, q);
        if let Some((t, id)) = &q.after {
            let (a, b) = (sql.p(Bind::Text(t.clone())), sql.p(Bind::Text(id.clone())));
            filter.push_str(&format!(" AND (r.resource_type, r.logical_id) > ({a}, {b})"));
        }
        let limit = sql.p(Bind::Int(i64::from(q.count)));
        let text = format!(
            "SELECT v.resource_type, v.logical_id, v.version_id, v.content, v.content_sha256 FROM resources r \
             JOIN resource_versions v ON v.resource_type = r.resource_type AND v.logical_id = r.logical_id \
             AND v.version_id = r.version_id WHERE {filter} ORDER BY r.resource_type, r.logical_id LIMIT {limit}"
        );
        let rows: Result<Vec<ContentRow>, StoreError> = load_rows(&mut conn.conn, &text, &sql.binds);
        let rows = super::note(&mut conn, rows)?;
        drop(conn);
        rows.into_iter()
            .map(|r| {
                let sealed = crate::crypto::Sealed::from_stored(r.content);
                let plain = self.open_version(
                    &r.resource_type,
                    &r.logical_id,
                    r.version_id,
                    &sealed,
                    &r.content_sha256,
                )?;
                Ok((r.logical_id, plain))
            })
            .collect()
    }

    /// The SQL of a search page run on its own (the count when asked, and up to `count + 1`
    /// keys in page order): what `search` costs in the database, without reading or
    /// decrypting the resources. The benches' baseline.
    pub fn search_page_keys(&self, access: &Access, q: &SearchQuery) -> Result<(Option<i64>, Vec<Key>), StoreError> {
        if q.is_audit_log() {
            return self.audit_page_keys(q);
        }
        let mut conn = self.checkout_read(access)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let (count_sql, count_binds, page_sql, binds) = self.page_statements(pg, q);
        let result = (|| -> Result<(Option<i64>, Vec<Key>), StoreError> {
            let total = if q.total {
                Some(Self::count_rows(&mut conn.conn, &count_sql, &count_binds)?)
            } else {
                None
            };
            let keys = Self::key_rows(&mut conn.conn, &page_sql, &binds)?;
            Ok((total, keys))
        })();
        super::note(&mut conn, result)
    }

    /// PostgreSQL's plan for a search page (EXPLAIN, or EXPLAIN ANALYZE), one line per row;
    /// empty on SQLite. `no_seq_scan`: planned with sequential scans disabled, which shows
    /// whether an index path exists whatever the size of the tables (tests).
    pub fn explain_search(
        &self,
        access: &Access,
        q: &SearchQuery,
        analyze: bool,
        no_seq_scan: bool,
    ) -> Result<Vec<String>, StoreError> {
        #[derive(QueryableByName)]
        struct PlanRow {
            #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
            line: String,
        }
        let mut conn = self.checkout(access)?;
        let DbConnection::Pg(c) = &mut conn.conn else {
            return Ok(Vec::new());
        };
        let (_, _, page_sql, binds) = self.page_statements(true, q);
        let verb = if analyze { "EXPLAIN ANALYZE" } else { "EXPLAIN" };
        let rows: Result<Vec<PlanRow>, StoreError> = c.transaction(|c| -> Result<Vec<PlanRow>, StoreError> {
            if no_seq_scan {
                diesel::sql_query("SET LOCAL enable_seqscan = off").execute(c)?;
            }
            Ok(bind_all!(
                diesel::sql_query(format!("{verb} {page_sql}")).into_boxed::<diesel::pg::Pg>(),
                &binds
            )
            .load(c)?)
        });
        Ok(super::note(&mut conn, rows)?.into_iter().map(|r| r.line).collect())
    }

    /// The (type, id) of the first `limit` matches in `q.sort` order (then type and id), and
    /// the number of matches: a sorted search's snapshot, paged from memory.
    pub fn search_keys(
        &self,
        access: &Access,
        q: &SearchQuery,
        limit: u32,
    ) -> Result<(i64, Vec<(String, String)>), StoreError> {
        if q.is_audit_log() {
            return self.audit_sorted_keys(q, limit);
        }
        let mut conn = self.checkout_read(access)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql::for_query(pg, q);
        let mut order = Vec::new();
        let mut select_binds = Vec::new();
        // sort keys are subqueries in the ORDER BY, after the filter's placeholders in the text
        for key in &q.sort {
            let ph = if pg {
                format!("${}", 1000 + select_binds.len())
            } else {
                "?".to_string()
            };
            select_binds.push(Bind::Text(key.param.clone()));
            let agg = if key.descending { "MAX" } else { "MIN" };
            let dir = if key.descending { "DESC" } else { "ASC" };
            order.push(format!(
                "(SELECT {agg}(k.{col}) FROM {table} k WHERE k.resource_type = r.resource_type \
                 AND k.logical_id = r.logical_id AND k.param = {ph} AND k.{col} IS NOT NULL) {dir} NULLS LAST",
                col = key.column,
                table = key.table,
            ));
        }
        let filter = self.search_filter(&mut sql, q);
        let count_sql = format!("SELECT COUNT(*) AS n FROM resources r WHERE {filter}");
        let count_binds = sql.binds.len();
        // now number the sort placeholders after the filter's (PostgreSQL)
        let mut order_text = order.join(", ");
        if pg {
            for i in 0..select_binds.len() {
                order_text = order_text.replace(&format!("${}", 1000 + i), &format!("${}", count_binds + i + 1));
            }
        }
        sql.binds.extend(select_binds);
        let limit_ph = sql.p(Bind::Int(i64::from(limit)));
        let sep = if order_text.is_empty() { "" } else { ", " };
        let keys_sql = format!(
            "SELECT r.resource_type, r.logical_id FROM resources r WHERE {filter} \
             ORDER BY {order_text}{sep}r.resource_type, r.logical_id LIMIT {limit_ph}"
        );
        let result = (|| -> Result<(i64, Vec<(String, String)>), StoreError> {
            let total = Self::count_rows(&mut conn.conn, &count_sql, &sql.binds[..count_binds])?;
            Ok((total, Self::key_rows(&mut conn.conn, &keys_sql, &sql.binds)?))
        })();
        super::note(&mut conn, result)
    }

    /// The current versions of `keys` in their order (one query per type); deleted or hidden
    /// ones are left out.
    pub fn read_keys(&self, access: &Access, keys: &[(String, String)]) -> Result<Vec<StoredVersion>, StoreError> {
        let mut by_type: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (t, id) in keys {
            by_type.entry(t.as_str()).or_default().push(id.clone());
        }
        let mut found: std::collections::HashMap<(String, String), StoredVersion> = Default::default();
        for (t, ids) in by_type {
            let versions = if t == AUDIT_EVENT {
                self.audit_versions(&ids)?
            } else {
                self.read_many(access, t, &ids)?
            };
            for v in versions {
                found.insert((v.resource_type.clone(), v.logical_id.clone()), v);
            }
        }
        Ok(keys.iter().filter_map(|k| found.remove(k)).collect())
    }
}

#[derive(QueryableByName)]
struct RefRow {
    #[diesel(sql_type = Text)]
    source_type: String,
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
        if resource_type == AUDIT_EVENT {
            return self.audit_references_of(ids, param);
        }
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

    /// For `_revinclude=*`: every resource referring to one of `ids` (of `target_type`), as
    /// (source type, source id).
    pub fn all_referrers_of(&self, target_type: &str, ids: &[String]) -> Result<Vec<Key>, StoreError> {
        Ok(self
            .reference_rows_full(true, None, ids, None, Some(target_type))?
            .into_iter()
            .map(|r| (r.source_type, r.source_id))
            .collect())
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
        Ok(self
            .reference_rows_full(reverse, Some(resource_type), ids, param, target_type)?
            .into_iter()
            .map(|r| (r.source_id, r.target_type, r.target_id))
            .collect())
    }

    /// Reference rows from `resource_type` (any, with `None`), by source id or (`reverse`) by
    /// target id.
    fn reference_rows_full(
        &self,
        reverse: bool,
        resource_type: Option<&str>,
        ids: &[String],
        param: Option<&str>,
        target_type: Option<&str>,
    ) -> Result<Vec<RefRow>, StoreError> {
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
            shared: Vec::new(),
        };
        let rt = match resource_type {
            Some(t) => format!("f.resource_type = {} AND ", sql.p(Bind::Text(t.to_string()))),
            None => String::new(),
        };
        let id_col = if reverse { "f.target_id" } else { "f.logical_id" };
        let list: Vec<String> = ids.iter().map(|i| sql.p(Bind::Text(i.clone()))).collect();
        let mut text = format!(
            "SELECT f.resource_type AS source_type, f.logical_id AS source_id, f.target_type, f.target_id \
             FROM search_reference f \
             JOIN resources r ON r.resource_type = f.resource_type AND r.logical_id = f.logical_id AND r.deleted = false \
             WHERE {rt}{id_col} IN ({})",
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
        let rows: Result<Vec<RefRow>, StoreError> = load_rows(&mut conn.conn, &text, &sql.binds);
        super::note(&mut conn, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::query_builder::QueryFragment;

    /// Search statements are kept prepared on SQLite, but only so many shapes of them: a client
    /// inventing new ones cannot make every connection keep more.
    #[test]
    fn sqlite_keeps_a_bounded_number_of_search_shapes_prepared() {
        let sqlite = diesel::sqlite::Sqlite;
        let first = SqlitePrepared::of("SELECT 1 AS kept_shape", ());
        assert!(first.keep);
        let kept = (0..MAX_PREPARED_SHAPES + 10)
            .filter(|i| SqlitePrepared::of(&format!("SELECT {i} AS invented_shape"), ()).keep)
            .count();
        assert!(kept <= MAX_PREPARED_SHAPES, "{kept} shapes kept");
        assert!(!SqlitePrepared::of("SELECT 2 AS one_too_many", ()).keep);
        // what was kept stays kept
        let again = SqlitePrepared::of("SELECT 1 AS kept_shape", diesel::sql_query("SELECT 1 AS kept_shape"));
        assert!(again.keep);
        assert!(QueryFragment::<diesel::sqlite::Sqlite>::is_safe_to_cache_prepared(&again, &sqlite).unwrap());
        // a raw query by itself is never cached
        assert!(!QueryFragment::<diesel::sqlite::Sqlite>::is_safe_to_cache_prepared(&again.query, &sqlite).unwrap());
    }
}
