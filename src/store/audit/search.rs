//! AuditEvent search in the common search engine: the typed conditions the search parser makes
//! for every resource type ([`Cond`]), answered from the rows derived from each sealed event
//! (`audit_search`, one wide row per event, and `audit_entities`) instead of the generic index
//! tables. The result parameters (`_count`, `_total`, `_summary`, `_elements`, `_sort`,
//! `_include`, paging) are the engine's own, in `api::search`.
//!
//! Why not the generic index tables: a read answers only once its event is durable, and the
//! search rows of every event are derived beside the ledger; the generic extractor would write
//! about fifteen index rows per event (one per parameter and value) where this layout writes
//! one row and one per patient or entity, and the deriver shares the two cores with the reads
//! it records.
//!
//! The parameters answered are those whose values the derived rows hold (see
//! [`AUDIT_SEARCH_PARAMS`]); [`unsupported`] names any other, which the API refuses.

use super::super::search_query::{Bind, Cond, Key, SearchQuery, SortKey, Sql};
use crate::store::{Access, DbConnection, Store, StoreError};

/// The code system of AuditEvent.type for fhirvault's RESTful events.
pub const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
/// The code system of AuditEvent.subtype for RESTful events.
pub const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
/// DICOM: AuditEvent.type of security and administration events, and agent types.
pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// The code system of AuditEvent.subtype for security and administration events.
pub const FHIRVAULT_SUBTYPES: &str = "https://fhirvault.dev/CodeSystem/audit-subtype";
const ACTION_SYSTEM: &str = "http://hl7.org/fhir/audit-event-action";
const OUTCOME_SYSTEM: &str = "http://hl7.org/fhir/audit-event-outcome";

/// Derived entity rows that hold an agent's role (its text, as fhirvault records roles).
pub const AGENT_ROLE_ROW: &str = "agent-role";
/// The derived entity row of a search's query entity (entity-role 24), value [`QUERY_ROLE`].
pub const ENTITY_ROLE_ROW: &str = "entity-role";
pub const QUERY_ROLE: &str = "24";
/// The entity rows that name a resource (the others are facets).
const REFERENCE_ROWS: &str = "('entity', 'patient')";

/// The blind index of a client's network address, as the derived row holds it: a patient
/// app's address may identify the patient, so it is never stored in plaintext.
pub fn address_blind(cipher: &crate::crypto::Cipher, address: &str) -> Vec<u8> {
    cipher
        .blind_index("audit-agent-address", &address.trim().to_lowercase())
        .to_vec()
}

/// The AuditEvent search parameters the derived rows answer (with `_id` and `_lastUpdated`).
pub const AUDIT_SEARCH_PARAMS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "action",
    "address",
    "agent",
    "agent-name",
    "agent-role",
    "altid",
    "date",
    "entity",
    "entity-name",
    "entity-role",
    "entity-type",
    "outcome",
    "patient",
    "policy",
    "site",
    "source",
    "subtype",
    "type",
];

/// Parameters whose elements fhirvault's events never carry (`agent.name`, `agent.altId`,
/// `agent.policy`, `entity.name`, a `source.observer` reference): a value matches no event,
/// `:missing=true` every one.
const NEVER_RECORDED: &[&str] = &["agent-name", "altid", "entity-name", "policy", "source"];
const ENTITY_TYPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/object-role";

/// The code system of an AuditEvent.type code fhirvault records (`audit::event` writes them).
pub fn type_system(code: &str) -> &'static str {
    if code == "rest" {
        AUDIT_EVENT_TYPE
    } else {
        DCM
    }
}

/// The parameter of the first condition the derived rows cannot answer: an AuditEvent
/// parameter outside [`AUDIT_SEARCH_PARAMS`], a chain, `_has`, `:text`, or a string search.
pub fn unsupported(clauses: &[Vec<Cond>]) -> Option<String> {
    fn check(c: &Cond) -> Result<(), String> {
        let known = |p: &str| {
            if AUDIT_SEARCH_PARAMS.contains(&p) {
                Ok(())
            } else {
                Err(p.to_string())
            }
        };
        match c {
            Cond::Id(_) => Ok(()),
            Cond::Date { param, .. } if matches!(param.as_str(), "date" | "_lastUpdated") => Ok(()),
            Cond::Token { param, .. }
                if matches!(
                    param.as_str(),
                    "action" | "outcome" | "type" | "subtype" | "site" | "agent-role" | "entity-role" | "entity-type"
                ) =>
            {
                Ok(())
            }
            Cond::Reference { param, .. } if matches!(param.as_str(), "agent" | "entity" | "patient") => Ok(()),
            // the address: its blind index holds whole values (a prefix or exact search of a
            // whole address); `:contains` cannot be answered
            Cond::StringPrefix { param, .. } | Cond::StringExact { param, .. } if param == "address" => Ok(()),
            Cond::StringContains { param, .. } if param == "address" => Err("address:contains".into()),
            c if never_recorded(c) => Ok(()),
            Cond::Missing { param, .. } => known(param),
            Cond::Not(inner) => inner.iter().try_for_each(check),
            Cond::All(groups) => groups.iter().flatten().try_for_each(check),
            Cond::Chain { param, .. } => Err(param.clone()),
            Cond::Has { source_type, .. } => Err(format!("_has:{source_type}")),
            Cond::StringPrefix { param, .. }
            | Cond::StringExact { param, .. }
            | Cond::StringContains { param, .. }
            | Cond::Blind { param, .. }
            | Cond::BlindAll { param, .. }
            | Cond::Token { param, .. }
            | Cond::Date { param, .. }
            | Cond::Reference { param, .. }
            | Cond::Number { param, .. }
            | Cond::Quantity { param, .. }
            | Cond::TokenText { param, .. }
            | Cond::Composite { param, .. }
            | Cond::Uri { param, .. }
            | Cond::UriBelow { param, .. }
            | Cond::UriAbove { param, .. } => Err(param.clone()),
            Cond::TypeNotIn(_) => Err("_type".into()),
        }
    }
    clauses.iter().flatten().find_map(|c| check(c).err())
}

/// A condition on a parameter whose element fhirvault's events never carry.
fn never_recorded(c: &Cond) -> bool {
    let param = match c {
        Cond::StringPrefix { param, .. }
        | Cond::StringExact { param, .. }
        | Cond::StringContains { param, .. }
        | Cond::Token { param, .. }
        | Cond::Reference { param, .. }
        | Cond::Uri { param, .. }
        | Cond::UriBelow { param, .. }
        | Cond::UriAbove { param, .. }
        | Cond::TokenText { param, .. } => param,
        _ => return false,
    };
    NEVER_RECORDED.contains(&param.as_str())
}

/// The `audit_search` column a sort key orders by, for the parameters that have one.
pub fn sort_column(param: &str) -> Option<&'static str> {
    Some(match param {
        "date" | "_lastUpdated" => "r.recorded",
        "_id" => "r.event_id",
        "action" => "r.action",
        "outcome" => "r.outcome",
        "type" => "r.type_code",
        "subtype" => "r.subtype",
        "agent" => "r.agent",
        "site" => "r.site",
        _ => return None,
    })
}

impl Sql {
    /// SQL for one condition on the event row `r` of `audit_search`.
    fn audit_cond(&mut self, c: &Cond, cipher: &crate::crypto::Cipher) -> String {
        match c {
            c if never_recorded(c) => "1 = 0".to_string(),
            Cond::StringPrefix { prefix: value, .. } | Cond::StringExact { value, .. } => {
                format!("r.address = {}", self.p(Bind::Blob(address_blind(cipher, value))))
            }
            // source.site is a string: no system
            Cond::Token { param, system, code } if param == "site" => match (system, code) {
                (None | Some(None), Some(code)) => format!("r.site = {}", self.p(Bind::Text(code.clone()))),
                (None | Some(None), None) => "1 = 1".into(),
                (Some(Some(_)), _) => "1 = 0".into(),
            },
            // fhirvault records the role names it grants as the roles' text, without a system
            Cond::Token { param, system, code } if param == "agent-role" => match system {
                None | Some(None) => self.facet_exists(AGENT_ROLE_ROW, code.clone()),
                Some(Some(_)) => "1 = 0".into(),
            },
            Cond::Token { param, system, code } if param == "entity-role" || param == "entity-type" => {
                self.entity_code(param, system.as_ref(), code.as_deref())
            }
            Cond::Id(v) => format!("r.event_id = {}", self.p(Bind::Text(v.clone()))),
            // an event's time is an instant: the range [recorded, recorded]
            Cond::Date { op, start, end, .. } => self.date_test("r.recorded", "r.recorded", *op, *start, *end),
            Cond::Token { param, system, code } => self.audit_token(param, system.as_ref(), code.as_deref()),
            Cond::Reference {
                param, target_type, id, ..
            } => self.audit_reference(param, target_type.as_deref(), id),
            Cond::Missing { param, missing, .. } => {
                let present = match param.as_str() {
                    "entity" | "patient" => self.entity_exists(param, None),
                    "address" => "r.address IS NOT NULL".to_string(),
                    "agent-role" => self.facet_exists(AGENT_ROLE_ROW, None),
                    // every event has an entity: a resource, a patient or a query
                    "entity-role" => format!(
                        "({} OR {})",
                        self.entity_exists("patient", None),
                        self.facet_exists(ENTITY_ROLE_ROW, Some(QUERY_ROLE.into()))
                    ),
                    p if NEVER_RECORDED.contains(&p) => "1 = 0".to_string(),
                    // every event has an id, a time, a type, a subtype, an action, an outcome
                    // and an agent
                    _ => "1 = 1".to_string(),
                };
                if *missing {
                    format!("NOT ({present})")
                } else {
                    present
                }
            }
            Cond::Not(inner) => {
                let any: Vec<String> = inner.iter().map(|c| self.audit_cond(c, cipher)).collect();
                format!("NOT ({})", any.join(" OR "))
            }
            Cond::All(groups) if groups.is_empty() => "1 = 1".to_string(),
            Cond::All(groups) => {
                let all: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        let any: Vec<String> = g.iter().map(|c| self.audit_cond(c, cipher)).collect();
                        format!("({})", any.join(" OR "))
                    })
                    .collect();
                format!("({})", all.join(" AND "))
            }
            // refused before the query is built (`unsupported`): matches nothing, never all
            _ => "1 = 0".to_string(),
        }
    }

    /// A token on a code column. The columns hold codes; the system a code has is fixed by
    /// what fhirvault records, so `system|code` is the code with its system checked.
    fn audit_token(&mut self, param: &str, system: Option<&Option<String>>, code: Option<&str>) -> String {
        let column = match param {
            "action" => "r.action",
            "outcome" => "r.outcome",
            "type" => "r.type_code",
            _ => "r.subtype",
        };
        let mut tests = Vec::new();
        if let Some(code) = code {
            tests.push(format!("{column} = {}", self.p(Bind::Text(code.to_string()))));
        }
        match (param, system) {
            // any system
            (_, None) => {}
            // `|code`: codes without a system; these columns' codes all have one (action and
            // outcome are `code` elements whose system their binding implies)
            (_, Some(None)) => tests.push("1 = 0".into()),
            (_, Some(Some(s))) => tests.push(match (param, s.as_str()) {
                ("action", ACTION_SYSTEM) | ("outcome", OUTCOME_SYSTEM) => "1 = 1".into(),
                ("type", AUDIT_EVENT_TYPE) => "r.type_code = 'rest'".into(),
                ("type", DCM) => "r.type_code <> 'rest'".into(),
                ("subtype", RESTFUL_INTERACTION) => "r.type_code = 'rest'".into(),
                ("subtype", FHIRVAULT_SUBTYPES) => "r.type_code <> 'rest'".into(),
                _ => "1 = 0".into(),
            }),
        }
        if tests.is_empty() {
            return "1 = 1".into();
        }
        format!("({})", tests.join(" AND "))
    }

    /// `agent`: the user's reference, else the client id or token subject as recorded (a bare
    /// value matches those too); `entity` and `patient`: the events' entity rows.
    fn audit_reference(&mut self, param: &str, target_type: Option<&str>, id: &str) -> String {
        match param {
            "agent" => match target_type {
                Some(t) => format!("r.agent = {}", self.p(Bind::Text(format!("{t}/{id}")))),
                None => {
                    let exact = self.p(Bind::Text(id.to_string()));
                    let suffix = self.p(Bind::Text(format!("%/{}", super::super::search_query::like_escape(id))));
                    format!("(r.agent = {exact} OR r.agent LIKE {suffix} ESCAPE '\\')")
                }
            },
            "patient" if target_type.is_some_and(|t| t != "Patient") => "1 = 0".into(),
            _ => {
                let reference = match target_type {
                    Some(t) => format!("{t}/{id}"),
                    None if param == "patient" => format!("Patient/{id}"),
                    None => format!("%/{}", super::super::search_query::like_escape(id)),
                };
                self.entity_exists(param, Some(reference))
            }
        }
    }

    /// The event has an entity row of `param`'s role (`patient`: the patients; `entity`: any),
    /// naming `reference` (a LIKE pattern when it starts with `%`) when given.
    fn entity_exists(&mut self, param: &str, reference: Option<String>) -> String {
        let e = self.alias("e");
        let role = if param == "patient" {
            format!(" AND {e}.role = 'patient'")
        } else {
            format!(" AND {e}.role IN {REFERENCE_ROWS}")
        };
        let of = match reference {
            Some(r) if r.starts_with('%') => format!(" AND {e}.reference LIKE {} ESCAPE '\\'", self.p(Bind::Text(r))),
            Some(r) => format!(" AND {e}.reference = {}", self.p(Bind::Text(r))),
            None => String::new(),
        };
        format!("EXISTS (SELECT 1 FROM audit_entities {e} WHERE {e}.event_id = r.event_id{role}{of})")
    }

    /// The event has a facet row of `role` (with `value`, when given).
    fn facet_exists(&mut self, role: &str, value: Option<String>) -> String {
        let e = self.alias("e");
        let role = self.p(Bind::Text(role.to_string()));
        let of = match value {
            Some(v) => format!(" AND {e}.reference = {}", self.p(Bind::Text(v))),
            None => String::new(),
        };
        format!("EXISTS (SELECT 1 FROM audit_entities {e} WHERE {e}.event_id = r.event_id AND {e}.role = {role}{of})")
    }

    /// `entity-type` and `entity-role`, as fhirvault's events set them (pinned by a test of
    /// `audit::event`): a patient is type 1 (person) and role 1 (patient); another resource
    /// type 2 (system object) without a role; a search's query type 2 and role 24 (query).
    fn entity_code(&mut self, param: &str, system: Option<&Option<String>>, code: Option<&str>) -> String {
        let expected = if param == "entity-type" {
            ENTITY_TYPE_SYSTEM
        } else {
            OBJECT_ROLE_SYSTEM
        };
        if system.is_some_and(|s| s.as_deref() != Some(expected)) {
            return "1 = 0".into();
        }
        let patient = |sql: &mut Sql| sql.entity_exists("patient", None);
        let query = |sql: &mut Sql| sql.facet_exists(ENTITY_ROLE_ROW, Some(QUERY_ROLE.into()));
        match (param, code) {
            ("entity-type", Some("1")) | ("entity-role", Some("1")) => patient(self),
            ("entity-type", Some("2")) => {
                let e = self.alias("e");
                let q = query(self);
                format!("(EXISTS (SELECT 1 FROM audit_entities {e} WHERE {e}.event_id = r.event_id AND {e}.role = 'entity') OR {q})")
            }
            ("entity-role", Some(QUERY_ROLE)) => query(self),
            (_, None) => {
                let (p, q) = (patient(self), query(self));
                let e = self.alias("e");
                format!("({p} OR {q} OR EXISTS (SELECT 1 FROM audit_entities {e} WHERE {e}.event_id = r.event_id AND {e}.role = 'entity'))")
            }
            _ => "1 = 0".into(),
        }
    }

    /// Every clause of `q` on `r` (AND of ORs), and its restrictions: a compartment (or a
    /// patient-context restriction) is the patient's events; a restriction the log cannot
    /// apply matches nothing (fail closed).
    fn audit_filter(&mut self, q: &SearchQuery, cipher: &crate::crypto::Cipher) -> String {
        let mut wheres = vec!["1 = 1".to_string()];
        for patient in [&q.compartment, &q.patient].into_iter().flatten() {
            let own = self.entity_exists("patient", Some(format!("Patient/{patient}")));
            wheres.push(own);
        }
        if q.any_compartment.is_some() || q.nested_patient.is_some() || q.outside_compartments {
            wheres.push("1 = 0".into());
        }
        if let Some(after) = q.updated_after {
            wheres.push(format!("r.recorded > {}", self.p(Bind::Ts(after))));
        }
        if let Some(until) = q.updated_until {
            wheres.push(format!("r.recorded <= {}", self.p(Bind::Ts(until))));
        }
        for clause in &q.clauses {
            let any: Vec<String> = clause.iter().map(|c| self.audit_cond(c, cipher)).collect();
            if !any.is_empty() {
                wheres.push(format!("({})", any.join(" OR ")));
            }
        }
        wheres.join(" AND ")
    }
}

#[derive(diesel::QueryableByName)]
struct EventKey {
    #[diesel(sql_type = diesel::sql_types::Text)]
    event_id: String,
}

#[derive(diesel::QueryableByName)]
struct EventReference {
    #[diesel(sql_type = diesel::sql_types::Text)]
    event_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    reference: String,
}

fn keys(rows: Vec<EventKey>) -> Vec<Key> {
    rows.into_iter()
        .map(|r| ("AuditEvent".to_string(), r.event_id))
        .collect()
}

impl Store {
    /// A page of an AuditEvent search, newest first (event ids are time-ordered UUIDv7s): the
    /// count when asked, and up to `count + 1` keys after `q.after` (or before `q.before`, in
    /// the reverse order) in page order.
    pub(in crate::store) fn audit_page_keys(&self, q: &SearchQuery) -> Result<(Option<i64>, Vec<Key>), StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql::for_query(pg, q);
        let filter = sql.audit_filter(q, self.cipher());
        let count_binds = sql.binds.clone();
        let count_sql = format!("SELECT COUNT(*) AS n FROM audit_search r WHERE {filter}");
        // page order is descending: "after" a key is an older event
        let (cursor, backward) = match (&q.after, &q.before) {
            (Some((_, id)), _) => (Some(id), false),
            (None, Some((_, id))) => (Some(id), true),
            (None, None) => (None, false),
        };
        let mut page_filter = filter;
        if let Some(id) = cursor {
            let cmp = if backward { ">" } else { "<" };
            page_filter.push_str(&format!(" AND r.event_id {cmp} {}", sql.p(Bind::Text(id.clone()))));
        }
        let dir = if backward { "ASC" } else { "DESC" };
        let limit = sql.p(Bind::Int(i64::from(q.count) + 1));
        let page_sql = format!(
            "SELECT r.event_id FROM audit_search r WHERE {page_filter} ORDER BY r.event_id {dir} LIMIT {limit}"
        );
        let result = (|| -> Result<(Option<i64>, Vec<Key>), StoreError> {
            let total = if q.total {
                Some(Self::count_rows(&mut conn.conn, &count_sql, &count_binds)?)
            } else {
                None
            };
            let rows: Vec<EventKey> = super::super::search_query::load_rows(&mut conn.conn, &page_sql, &sql.binds)?;
            Ok((total, keys(rows)))
        })();
        super::super::note(&mut conn, result)
    }

    /// The count of an AuditEvent search and up to `limit` keys in `q.sort`'s order (then
    /// newest first): the sorted snapshot a sorted search pages through.
    pub(in crate::store) fn audit_sorted_keys(
        &self,
        q: &SearchQuery,
        limit: u32,
    ) -> Result<(i64, Vec<Key>), StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql::for_query(pg, q);
        let filter = sql.audit_filter(q, self.cipher());
        let count_binds = sql.binds.clone();
        let mut order: Vec<String> = q
            .sort
            .iter()
            .filter_map(|k: &SortKey| {
                let dir = if k.descending { "DESC" } else { "ASC" };
                sort_column(&k.param).map(|c| format!("{c} {dir}"))
            })
            .collect();
        order.push("r.event_id DESC".into());
        let limit = sql.p(Bind::Int(i64::from(limit)));
        let text = format!(
            "SELECT r.event_id FROM audit_search r WHERE {filter} ORDER BY {} LIMIT {limit}",
            order.join(", ")
        );
        let count_sql = format!("SELECT COUNT(*) AS n FROM audit_search r WHERE {filter}");
        let result = (|| -> Result<(i64, Vec<Key>), StoreError> {
            let total = Self::count_rows(&mut conn.conn, &count_sql, &count_binds)?;
            let rows: Vec<EventKey> = super::super::search_query::load_rows(&mut conn.conn, &text, &sql.binds)?;
            Ok((total, keys(rows)))
        })();
        super::super::note(&mut conn, result)
    }

    /// The events of `ids` as stored versions (their content decrypted and checked: the
    /// canonical JSON the chain hashes; a sealed query stays sealed), in no particular order.
    pub(in crate::store) fn audit_versions(
        &self,
        ids: &[String],
    ) -> Result<Vec<super::super::StoredVersion>, StoreError> {
        let (events, _) = self.audit_events_by_id(ids)?;
        events
            .into_iter()
            .map(|ev| {
                let plain = self
                    .cipher()
                    .open(&super::event_aad(&ev.id), &ev.content.0)
                    .map_err(|_| StoreError::Integrity)?;
                Ok(super::super::StoredVersion {
                    row_id: 0,
                    resource_type: "AuditEvent".into(),
                    logical_id: ev.id,
                    version_id: 1,
                    last_updated: ev.recorded,
                    deleted: false,
                    method: "POST".into(),
                    content: Some(plain),
                    patients: Vec::new(),
                })
            })
            .collect()
    }

    /// For `_include` from AuditEvents: the references their `param` (`agent`, `entity`,
    /// `patient`; any with `None`) makes, as (event id, target type, target id).
    #[allow(clippy::type_complexity)]
    pub(in crate::store) fn audit_references_of(
        &self,
        ids: &[String],
        param: Option<&str>,
    ) -> Result<Vec<(String, Option<String>, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.checkout(&Access::All)?;
        let pg = matches!(conn.conn, DbConnection::Pg(_));
        let mut sql = Sql::for_query(pg, &SearchQuery::of_type("AuditEvent"));
        let mut parts = Vec::new();
        if matches!(param, None | Some("entity") | Some("patient")) {
            let list: Vec<String> = ids.iter().map(|i| sql.p(Bind::Text(i.clone()))).collect();
            let role = if param == Some("patient") {
                " AND e.role = 'patient'".to_string()
            } else {
                format!(" AND e.role IN {REFERENCE_ROWS}")
            };
            parts.push(format!(
                "SELECT e.event_id, e.reference FROM audit_entities e WHERE e.event_id IN ({}){role}",
                list.join(", ")
            ));
        }
        if matches!(param, None | Some("agent")) {
            let list: Vec<String> = ids.iter().map(|i| sql.p(Bind::Text(i.clone()))).collect();
            parts.push(format!(
                "SELECT r.event_id, r.agent AS reference FROM audit_search r WHERE r.event_id IN ({})",
                list.join(", ")
            ));
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let text = parts.join(" UNION ALL ");
        let rows: Result<Vec<EventReference>, StoreError> =
            super::super::search_query::load_rows(&mut conn.conn, &text, &sql.binds);
        let rows = super::super::note(&mut conn, rows)?;
        // an agent recorded by client id or subject is no reference: nothing to include
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let (t, id) = r.reference.split_once('/')?;
                let typed = t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !id.contains('/');
                typed.then(|| (r.event_id, Some(t.to_string()), id.to_string()))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::search_query::DateOp;

    fn instant(s: &str) -> chrono::NaiveDateTime {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().naive_utc()
    }

    #[test]
    fn the_parameters_the_rows_hold_are_answered_and_the_rest_named() {
        let token = |p: &str| Cond::Token {
            param: p.into(),
            system: None,
            code: Some("x".into()),
        };
        assert_eq!(unsupported(&[vec![token("type")], vec![token("action")]]), None);
        assert_eq!(unsupported(&[vec![token("type"), token("entity-role")]]), None);
        assert_eq!(
            unsupported(&[vec![token("type"), token("agent-nickname")]]),
            Some("agent-nickname".into())
        );
        let contains = Cond::StringContains {
            param: "address".into(),
            part: "10".into(),
        };
        assert_eq!(
            unsupported(&[vec![Cond::Not(vec![contains])]]),
            Some("address:contains".into())
        );
        let chain = Cond::Chain {
            param: "patient".into(),
            target_type: "Patient".into(),
            inner: Vec::new(),
        };
        assert_eq!(unsupported(&[vec![chain]]), Some("patient".into()));
        let date = Cond::Date {
            param: "date".into(),
            op: DateOp::Ge,
            start: instant("2026-12-01T00:00:00Z"),
            end: instant("2026-12-02T00:00:00Z"),
        };
        assert_eq!(unsupported(&[vec![date]]), None);
    }

    #[test]
    fn systems_narrow_codes_to_the_events_that_carry_them() {
        let mut sql = Sql::for_query(true, &SearchQuery::of_type("AuditEvent"));
        let text = sql.audit_token("subtype", Some(&Some(RESTFUL_INTERACTION.into())), Some("read"));
        assert_eq!(text, "(r.subtype = $1 AND r.type_code = 'rest')");
        let text = sql.audit_token("type", Some(&Some("http://elsewhere".into())), Some("rest"));
        assert!(text.ends_with("AND 1 = 0)"), "{text}");
        assert_eq!(sql.audit_token("action", None, None), "1 = 1");
    }
}
