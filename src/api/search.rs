//! `GET [type]?…`: search over the index tables (see `crate::search`), as a paged searchset
//! Bundle. Authorized like any read of the type; a patient-context token searches only its
//! compartment (filtered in the query, so counts and pages hold nothing else). Audited as one
//! event with the query (sealed) and the patients whose data the page returned.

use super::trail::Trail;
use super::{blocking, ApiError, AppState, Format};
use crate::auth::policy::{authorize, authorize_audit_search};
use crate::auth::{Permission, Principal};
use crate::fhir::resource::instant;
use crate::fhir::IssueType;
use crate::search::query::{parse_confirming_chains, QueryError};
use crate::store::search_query::{Cond, DateOp};
use crate::store::{now, StoredVersion};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::sync::Arc;

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        match e {
            QueryError::UnknownParameter => ApiError::bad_request(
                IssueType::NotSupported,
                "unknown search parameter for this resource type",
            ),
            QueryError::NotSupported(text) => ApiError::bad_request(IssueType::NotSupported, text),
            QueryError::Invalid(text) => ApiError::bad_request(IssueType::Invalid, text),
            e @ QueryError::InvalidValue(..) => {
                ApiError::BadRequest(vec![crate::fhir::Issue::error(IssueType::Invalid, e.to_string())])
            }
        }
    }
}

/// What a search runs over.
pub enum Target {
    /// `[type]?…`
    Type(String),
    /// `Patient/[id]/[type]?…`: the patient and the type.
    Compartment(String, String),
    /// `?_type=…` at the base.
    System,
    /// `Patient/[id]/$everything`: the patient's compartment, every type the token may search.
    Everything(String),
}

impl Target {
    /// The path searched, relative to the base (what a page token is bound to).
    fn path(&self) -> String {
        match self {
            Target::Type(t) => t.clone(),
            Target::Compartment(pid, t) => format!("Patient/{pid}/{t}"),
            Target::System => String::new(),
            Target::Everything(pid) => format!("Patient/{pid}/$everything"),
        }
    }
}

/// How long a search's pages can be followed.
const PAGE_STATE_SECS: i64 = 3600;
/// A sorted search keeps the order of at most this many matches (the pages of its snapshot).
pub const SORT_SNAPSHOT_MAX: u32 = 10_000;

/// The query of a search with more than one page, kept server-side (sealed) under a token.
#[derive(serde::Serialize, serde::Deserialize)]
struct PageState {
    subject: String,
    path: String,
    pairs: Vec<(String, String)>,
    /// A sorted search: the matches in order (paged by offset).
    snapshot: Option<Vec<(String, String)>>,
}

/// Where a page starts.
#[derive(Clone, PartialEq, Debug)]
enum Cursor {
    Start,
    After(String, String),
    Before(String, String),
    Offset(usize),
}

impl Cursor {
    fn encode(&self, token: &str) -> String {
        use base64::Engine;
        let c = match self {
            Cursor::Start => "s".to_string(),
            Cursor::After(t, id) => format!("a{t}/{id}"),
            Cursor::Before(t, id) => format!("b{t}/{id}"),
            Cursor::Offset(n) => format!("o{n}"),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{token}~{c}"))
    }

    fn decode(raw: &str) -> Option<(String, Cursor)> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (token, c) = text.split_once('~')?;
        let key = |rest: &str| rest.split_once('/').map(|(t, id)| (t.to_string(), id.to_string()));
        let cursor = match c.split_at_checked(1)? {
            ("s", "") => Cursor::Start,
            ("a", rest) => key(rest).map(|(t, id)| Cursor::After(t, id))?,
            ("b", rest) => key(rest).map(|(t, id)| Cursor::Before(t, id))?,
            ("o", n) => Cursor::Offset(n.parse().ok()?),
            _ => return None,
        };
        Some((token.to_string(), cursor))
    }
}

/// The types `_type` lists (comma-separated, repeatable).
fn listed_types(pairs: &[(String, String)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == "_type")
        .flat_map(|(_, v)| v.split(',').map(str::trim).map(str::to_string))
        .filter(|t| !t.is_empty())
        .collect()
}

fn expired_page() -> ApiError {
    ApiError::bad_request(
        IssueType::Invalid,
        "invalid or expired page token: run the search again",
    )
}

/// A search: `[type]`, `Patient/[id]/[type]` or the base with `_type`, as a paged searchset
/// Bundle. Pages after the first come from `_page` tokens naming the query kept server-side.
pub async fn search(
    req: HttpRequest,
    p: Arc<Principal>,
    target: Target,
    mut pairs: Vec<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(&req)?;
    let path = target.path();
    let mut cursor = Cursor::Start;
    let mut page_token: Option<String> = None;
    let mut snapshot: Option<Vec<(String, String)>> = None;
    if let Some((_, raw)) = pairs.iter().find(|(k, _)| k == "_page") {
        let (token, c) = Cursor::decode(raw).ok_or_else(expired_page)?;
        let st = state.clone();
        let t = token.clone();
        let saved = blocking(move || st.store.load_page_state(&t).map_err(ApiError::from))
            .await?
            .ok_or_else(expired_page)?;
        let saved: PageState = serde_json::from_slice(&saved).map_err(|_| ApiError::Internal)?;
        // a token is its holder's, for the path it was made on
        if saved.subject != p.subject || saved.path != path {
            return Err(expired_page());
        }
        pairs = saved.pairs;
        snapshot = saved.snapshot;
        cursor = c;
        page_token = Some(token);
    }
    // $everything: its own parameters, turned into a search of the compartment
    let mut care_dates: Vec<(DateOp, String)> = Vec::new();
    // what the search engine parses (the pairs as received are what is audited and kept for
    // the next pages)
    let mut search_pairs = pairs.clone();
    if matches!(target, Target::Everything(_)) {
        let mut translated = Vec::new();
        for (k, v) in pairs.iter().cloned() {
            match k.as_str() {
                "_since" => translated.push(("_lastUpdated".to_string(), format!("ge{v}"))),
                "start" => care_dates.push((DateOp::Ge, v)),
                "end" => care_dates.push((DateOp::Le, v)),
                "_type" | "_count" | "_page" | "_format" | "_pretty" => translated.push((k, v)),
                _ => {
                    return Err(ApiError::bad_request(
                        IssueType::NotSupported,
                        "$everything takes start, end, _since, _type and _count",
                    ))
                }
            }
        }
        search_pairs = translated;
    }
    let types: Vec<String> = match &target {
        Target::Type(t) | Target::Compartment(_, t) => vec![t.clone()],
        Target::Everything(_) => {
            let all = state.compartment.types();
            let listed = listed_types(&pairs);
            if listed.iter().any(|t| !all.contains(t)) {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "_type names a type outside the patient compartment",
                ));
            }
            // every type asked for (or in the compartment) that the token may search
            let wanted = if listed.is_empty() { all } else { listed };
            let mine: Vec<String> = wanted
                .into_iter()
                .filter(|t| t != "AuditEvent" && authorize(&p, t, Permission::Search).is_ok())
                .collect();
            if mine.is_empty() {
                return Err(ApiError::Forbidden);
            }
            mine
        }
        Target::System => {
            let listed = listed_types(&pairs);
            if listed.is_empty() {
                return Err(ApiError::bad_request(
                    IssueType::Required,
                    "a search at the base needs _type (the resource types to search)",
                ));
            }
            if listed
                .iter()
                .any(|t| !state.resource_types.contains(t.as_str()) || t == "AuditEvent")
            {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "_type names a resource type this server does not search",
                ));
            }
            let mut unique = listed;
            unique.sort();
            unique.dedup();
            unique
        }
    };
    // the audit log: its own access rule, and its own rows answer the search
    let audit_log = types.iter().any(|t| t == AUDIT_EVENT);
    let mut decisions = std::collections::HashMap::new();
    for t in &types {
        let decision = if t == AUDIT_EVENT {
            authorize_audit_search(&p, Permission::Search)?
        } else {
            authorize(&p, t, Permission::Search)?
        };
        decisions.insert(t.clone(), decision);
    }
    // where any type is limited to a compartment, the whole search is (fail closed)
    let restricted = decisions.values().find(|d| d.patient.is_some()).cloned();
    let access = restricted
        .as_ref()
        .map(|d| d.access())
        .unwrap_or_else(|| decisions[&types[0]].access());
    let mut count = state.config.default_page_size;
    let mut summary = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "_count" => {
                let n: u32 = v.parse().map_err(|_| {
                    ApiError::bad_request(IssueType::Invalid, "_count must be a non-negative whole number")
                })?;
                count = n.min(state.config.max_page_size);
            }
            "_total" if !matches!(v.as_str(), "none" | "estimate" | "accurate") => {
                return Err(ApiError::bad_request(
                    IssueType::Invalid,
                    "_total takes none, estimate or accurate",
                ))
            }
            "_summary" if v != "count" => {
                summary = crate::fhir::summary::Summary::parse(v).ok_or_else(|| {
                    ApiError::bad_request(IssueType::Invalid, "_summary takes true, text, data, count or false")
                })?;
            }
            _ => {}
        }
    }
    let no_total = pairs.iter().any(|(k, v)| k == "_total" && v == "none");
    let count_only = pairs.iter().any(|(k, v)| k == "_summary" && v == "count");
    if count_only {
        count = 0;
    }
    // `_elements`: the top-level elements to keep (plus the mandatory ones)
    let elements: Option<Vec<String>> = pairs.iter().find(|(k, _)| k == "_elements").map(|(_, v)| {
        v.split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect()
    });
    let trail = Trail::of(&req)?;
    // the query as the search received it (a POST's body, or a page's saved query, included),
    // sealed in the audit event
    trail.query(
        &form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter())
            .finish(),
    );
    let strict = super::negotiate::strict_handling(&req);
    let cipher = state.store.cipher();
    let mut parsed = parse_confirming_chains(&state.search.current(), cipher, &types[0], &search_pairs, count, strict)?;
    for other in &types[1..] {
        // every parameter must mean something on every type searched
        parse_confirming_chains(&state.search.current(), cipher, other, &search_pairs, count, strict)?;
    }
    if matches!(target, Target::System | Target::Everything(_)) {
        parsed.query.types = types.clone();
    }
    if audit_log {
        audit_log_supports(&parsed)?;
    }
    if let Target::Everything(pid) = &target {
        parsed.query.compartment = Some(pid.clone());
        // start/end bound the care date of the types that have one (`date`); the others stay
        let dated: Vec<String> = types
            .iter()
            .filter(|t| {
                state
                    .search
                    .current()
                    .get(t, "date")
                    .is_some_and(|d| d.kind == crate::search::ParamType::Date)
            })
            .cloned()
            .collect();
        for (op, v) in &care_dates {
            let (start, end) = crate::search::extract::date_range(v)
                .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "start and end are dates"))?;
            parsed.query.clauses.push(vec![
                Cond::Date {
                    param: "date".into(),
                    op: *op,
                    start,
                    end,
                },
                Cond::TypeNotIn(dated.clone()),
            ]);
        }
    }
    if let Some(d) = &restricted {
        parsed.query.patient = d.patient.clone();
    }
    if let Target::Compartment(pid, _) = &target {
        parsed.query.compartment = Some(pid.clone());
    }
    parsed.query.total = !no_total;
    // Chains and `_has` read other types: the token must be allowed to search each, and what
    // they reach is held to its compartment where that is all the token may see.
    for other in &parsed.types {
        let d = authorize(&p, other, Permission::Search)?;
        // a chain or `_has` through a type the token reaches only by granular scopes would
        // test resources their filters do not admit: refused (fail closed)
        if !d.filters.is_empty() {
            return Err(ApiError::Forbidden);
        }
        if !d.unrestricted {
            parsed.query.nested_patient = d.patient.clone();
        }
    }
    // granular scopes: each type searched holds only what one of its filters admits, in the
    // query (counts and pages included) and again on the content
    for t in &types {
        if let Some(clause) = decisions[t].filter_clause(t) {
            parsed.query.clauses.push(clause);
        }
    }
    // in a patient's context, the shared types (practitioners, organizations …) searched or
    // reached also match where they lie in no patient's compartment
    let reached: Vec<String> = types.iter().chain(parsed.types.iter()).cloned().collect();
    if let Some(d) = restricted.as_ref().or_else(|| decisions.values().next()) {
        parsed.query.shared_types = d.shared_among(&state.compartment, &reached);
    }
    // Chains through an identifying parameter whose blind index only narrows: the chained
    // type's candidates are loaded, confirmed after decryption as an unchained search confirms
    // its own, and the confirmed ids become the chain's condition (a blind index never decides
    // alone).
    for check in std::mem::take(&mut parsed.chain_checks) {
        let confirmed = confirm_chain(&state, &access, &parsed.query, &check).await?;
        if let Some(Cond::Chain { inner, .. }) = parsed.query.clauses.get_mut(check.clause).and_then(|c| c.first_mut())
        {
            *inner = crate::search::query::ChainCheck::confirmed(confirmed);
        } else {
            return Err(ApiError::Internal);
        }
    }
    if audit_log {
        // search rows are derived off the request path: wait for this node's own (other
        // nodes' events are searchable within a second of their commit)
        super::audit::own_events_settled(&state).await?;
    }
    let labels_bind = state.attributes.label_rules_bind(&p);
    // what the token may see of a stored version: re-checks, compartment, labels and hidden
    // elements, as for every read
    let visible = |v: &StoredVersion| -> Result<Option<Value>, ApiError> {
        let Some(mut json) = v.content.clone() else {
            return Ok(None);
        };
        let t = &v.resource_type;
        if t == AUDIT_EVENT {
            // the search's sealed query, opened for whoever may read the log
            let mut value: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
            crate::audit::event::reveal_query(&mut value, cipher);
            json = serde_json::to_vec(&value).map_err(|_| ApiError::Internal)?;
        }
        let Some(decision) = decisions.get(t) else {
            return Ok(None);
        };
        if !parsed.rechecks.is_empty() || !decision.unrestricted {
            let value: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
            if !parsed.rechecks.iter().all(|r| r.holds(&value, cipher)) {
                return Ok(None);
            }
            if !decision.admits(&state.compartment, t, &v.logical_id, Some(&value)) {
                return Ok(None);
            }
        }
        let Some(shaped) = state.attributes.shape_stored(&p, t, json) else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(&shaped).map_err(|_| ApiError::Internal)?))
    };
    let sorted = !parsed.sort.is_empty() || !parsed.memory_sort.is_empty();
    let mut total: Option<i64> = None;
    let mut truncated = false;
    let (versions, next, previous) = if sorted {
        let snap = match snapshot.take() {
            Some(s) => s,
            None => {
                let (n, snap) = sorted_snapshot(&state, &access, &parsed, &visible).await?;
                total = Some(n);
                truncated = n > snap.len() as i64 && parsed.memory_sort.is_empty();
                snap
            }
        };
        let offset = match &cursor {
            Cursor::Offset(n) => (*n).min(snap.len()),
            _ => 0,
        };
        let end = (offset + count as usize).min(snap.len());
        let keys = snap[offset..end].to_vec();
        let st = state.clone();
        let acc = access.clone();
        let versions = blocking(move || st.store.read_keys(&acc, &keys).map_err(ApiError::from)).await?;
        snapshot = Some(snap.clone());
        let next = (end < snap.len() && !count_only).then_some(Cursor::Offset(end));
        let previous = (offset > 0).then(|| Cursor::Offset(offset.saturating_sub(count as usize)));
        (versions, next, previous)
    } else {
        match &cursor {
            Cursor::After(t, id) => parsed.query.after = Some((t.clone(), id.clone())),
            Cursor::Before(t, id) => parsed.query.before = Some((t.clone(), id.clone())),
            _ => {}
        }
        let st = state.clone();
        let query = parsed.query.clone();
        let acc = access.clone();
        let mut page = blocking(move || st.store.search(&acc, &query).map_err(ApiError::from)).await?;
        total = page.total;
        let backward = matches!(cursor, Cursor::Before(..));
        if !backward && !count_only && !parsed.rechecks.is_empty() {
            page = fill_page(&state, &access, parsed.query.clone(), page, count as usize, &visible).await?;
        }
        let first = page.keys.first().cloned();
        let last = page.keys.last().cloned();
        let next = match (&last, backward || page.more) {
            (Some((t, id)), true) if !count_only => Some(Cursor::After(t.clone(), id.clone())),
            _ => None,
        };
        let came_from_later = matches!(cursor, Cursor::After(..));
        let previous = match (&first, (backward && page.more) || came_from_later) {
            (Some((t, id)), true) => Some(Cursor::Before(t.clone(), id.clone())),
            _ => None,
        };
        (page.entries, next, previous)
    };
    let mut entries = Vec::new();
    let mut patients = Vec::new();
    let mut matched: Vec<(String, String)> = Vec::new();
    let base = state.base_url(&req);
    for v in &versions {
        let Some(mut resource) = visible(v)? else { continue };
        if let Some(mode) = summary {
            crate::fhir::summary::summarize(&mut resource, mode);
        }
        if let Some(keep) = &elements {
            crate::fhir::summary::elements(&mut resource, keep);
        }
        patients.extend(v.patients.iter().cloned());
        matched.push((v.resource_type.clone(), v.logical_id.clone()));
        entries.push(json!({
            "fullUrl": format!("{base}/{}/{}", v.resource_type, v.logical_id),
            "resource": resource,
            "search": {"mode": "match"}
        }));
    }
    // `_include` / `_revinclude` (`:iterate` follows what was included, a few rounds deep)
    let specs = include_specs(&state, &pairs)?;
    if !specs.is_empty() {
        let mut seen: std::collections::HashSet<(String, String)> = matched.iter().cloned().collect();
        let mut frontier = matched.clone();
        for round in 0..4 {
            let mut next_round = Vec::new();
            for spec in specs.iter().filter(|s| round == 0 || s.iterate) {
                let fresh: Vec<(String, String)> = included(&state, spec, &frontier)
                    .await?
                    .into_iter()
                    .filter(|key| seen.insert(key.clone()))
                    .collect();
                for (rt, id, resource, pats) in fetch_visible(&state, &p, &fresh).await? {
                    patients.extend(pats);
                    entries.push(json!({
                        "fullUrl": format!("{base}/{rt}/{id}"),
                        "resource": resource,
                        "search": {"mode": "include"}
                    }));
                    next_round.push((rt, id));
                }
            }
            if next_round.is_empty() {
                break;
            }
            frontier = next_round;
        }
    }
    trail.returned_patients(patients.iter());
    // more than one page: keep the query server-side, under a token the links carry
    if page_token.is_none() && (next.is_some() || previous.is_some()) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let saved = serde_json::to_vec(&PageState {
            subject: p.subject.clone(),
            path: path.clone(),
            pairs: pairs.clone(),
            snapshot: snapshot.clone().filter(|_| sorted),
        })
        .map_err(|_| ApiError::Internal)?;
        let expires = now() + chrono::Duration::seconds(PAGE_STATE_SECS);
        let st = state.clone();
        let t = token.clone();
        blocking(move || st.store.save_page_state(&t, expires, &saved).map_err(ApiError::from)).await?;
        page_token = Some(token);
    }
    let endpoint = if path.is_empty() {
        base.clone()
    } else {
        format!("{base}/{path}")
    };
    let link = |relation: &str, c: &Cursor, token: &str| json!({"relation": relation, "url": format!("{endpoint}?_page={}", c.encode(token))});
    let links = match &page_token {
        Some(token) => {
            let mut links = vec![link("self", &cursor, token), link("first", &Cursor::Start, token)];
            if let Some(c) = &previous {
                links.push(link("previous", c, token));
            }
            if let Some(c) = &next {
                links.push(link("next", c, token));
            }
            links
        }
        // one page: the endpoint alone (the query's values stay out of every URL)
        None => vec![json!({"relation": "self", "url": endpoint})],
    };
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": instant(&now())},
        "type": "searchset",
        "link": links,
    });
    // a total that counts what re-checks or labels hide would say too much
    // (a confirmation only fails on a stale or colliding index row: the count stands)
    let exact = parsed.rechecks.iter().all(|r| !r.narrows()) || !parsed.memory_sort.is_empty();
    if let (Some(n), true) = (total, exact && !labels_bind && !no_total) {
        bundle["total"] = json!(n);
    }
    let mut issues: Vec<Value> = parsed
        .ignored
        .iter()
        .map(|(name, e)| {
            // names only: values may be PHI
            json!({"severity": "warning", "code": "not-supported",
                   "diagnostics": format!("parameter {} ignored: {e}", name.chars().filter(|c| c.is_ascii_alphanumeric() || "-_:.".contains(*c)).collect::<String>())})
        })
        .collect();
    if truncated {
        issues.push(json!({"severity": "information", "code": "too-costly",
            "diagnostics": format!("sorted results are paged over the first {SORT_SNAPSHOT_MAX} matches")}));
    }
    if !issues.is_empty() {
        entries.push(json!({
            "resource": {"resourceType": "OperationOutcome", "issue": issues},
            "search": {"mode": "outcome"}
        }));
    }
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&bundle)))
}

const AUDIT_EVENT: &str = "AuditEvent";

/// The most candidates one page of a re-checked search reads on to fill itself.
const FILL_CANDIDATES_MAX: usize = 1_000;

/// A page of a search whose candidates are re-checked after decryption (a name longer than its
/// blind prefixes, `:contains`, …): some candidates do not match, so a page of candidates may
/// hold fewer matches than asked, or none while matches lie further on. Reads on after the page's
/// last candidate until it holds `count` matches, the candidates run out, or
/// [`FILL_CANDIDATES_MAX`] were read; the page then ends at its last match (or, when the bound
/// stopped it, at the last candidate read), so the next page starts right after.
async fn fill_page(
    state: &web::Data<AppState>,
    access: &crate::store::Access,
    mut query: crate::store::search_query::SearchQuery,
    mut page: crate::store::search_query::SearchPage,
    count: usize,
    visible: &impl Fn(&StoredVersion) -> Result<Option<Value>, ApiError>,
) -> Result<crate::store::search_query::SearchPage, ApiError> {
    let mut entries = Vec::new();
    let mut matches = 0;
    let mut read = 0;
    loop {
        let mut taken = page.entries.len();
        for (i, v) in page.entries.iter().enumerate() {
            if visible(v)?.is_some() {
                matches += 1;
                if matches == count {
                    taken = i + 1;
                    break;
                }
            }
        }
        read += page.entries.len();
        let rest = page.entries.split_off(taken);
        entries.append(&mut page.entries);
        let more = page.more || !rest.is_empty();
        if matches == count || !page.more || read >= FILL_CANDIDATES_MAX {
            let keys = entries
                .iter()
                .map(|v| (v.resource_type.clone(), v.logical_id.clone()))
                .collect();
            return Ok(crate::store::search_query::SearchPage {
                entries,
                total: page.total,
                keys,
                more,
            });
        }
        query.after = entries.last().map(|v| (v.resource_type.clone(), v.logical_id.clone()));
        query.total = false;
        let (st, q, acc) = (state.clone(), query.clone(), access.clone());
        let total = page.total;
        page = blocking(move || st.store.search(&acc, &q).map_err(ApiError::from)).await?;
        page.total = total;
    }
}

/// AuditEvent search answers the parameters the audit log's derived rows hold: anything else
/// is refused (400) by name rather than answered from other rows or ignored.
fn audit_log_supports(parsed: &crate::search::query::ParsedSearch) -> Result<(), ApiError> {
    use crate::store::audit::search::{sort_column, unsupported, AUDIT_SEARCH_PARAMS};
    let refuse = |param: &str| {
        let name: String = param
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_:".contains(*c))
            .collect();
        ApiError::BadRequest(vec![crate::fhir::Issue::error(
            IssueType::NotSupported,
            format!(
                "AuditEvent search does not support {name}; it supports {}",
                AUDIT_SEARCH_PARAMS.join(", ")
            ),
        )])
    };
    if let Some(param) = unsupported(&parsed.query.clauses) {
        return Err(refuse(&param));
    }
    if let Some((param, _)) = parsed.memory_sort.first() {
        return Err(refuse(&param.code));
    }
    if let Some(key) = parsed.sort.iter().find(|k| sort_column(&k.param).is_none()) {
        return Err(refuse(&key.param));
    }
    Ok(())
}

/// The most candidates a chain through an identifying parameter confirms (each is read and
/// decrypted): past it the search is refused as too costly, not answered in part.
const CHAIN_CANDIDATES_MAX: u32 = 1_000;

/// The ids of `check`'s target type that its condition holds for, on the decrypted resources:
/// the candidates its blind index finds (within the compartment the token may search), each
/// confirmed.
async fn confirm_chain(
    state: &web::Data<AppState>,
    access: &crate::store::Access,
    query: &crate::store::search_query::SearchQuery,
    check: &crate::search::query::ChainCheck,
) -> Result<Vec<String>, ApiError> {
    let mut q = query.clone();
    q.resource_type = check.target_type.clone();
    q.types = Vec::new();
    q.clauses = vec![check.candidates.clone()];
    q.count = CHAIN_CANDIDATES_MAX;
    (q.after, q.before, q.sort, q.total) = (None, None, Vec::new(), false);
    // what the chain may reach is what the token may search of the target type
    (q.patient, q.nested_patient) = (query.nested_patient.clone(), None);
    (q.compartment, q.any_compartment, q.updated_after, q.updated_until) = (None, None, None, None);
    let (st, acc) = (state.clone(), access.clone());
    let page = blocking(move || st.store.search(&acc, &q).map_err(ApiError::from)).await?;
    if page.more {
        return Err(ApiError::BadRequest(vec![crate::fhir::Issue::error(
            IssueType::TooCostly,
            "the chained value of an identifying parameter matches too many candidates to confirm: \
             make it longer or exact",
        )]));
    }
    let cipher = state.store.cipher();
    let mut ids = Vec::new();
    for v in page.entries {
        let Some(json) = v.content else { continue };
        let value: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
        if check.recheck.holds(&value, cipher) {
            ids.push(v.logical_id);
        }
    }
    Ok(ids)
}

/// The matches of a sorted search, in order: by SQL on plaintext keys, or (a key that is an
/// identifying parameter, stored only blind) by the decrypted values, which bounds it.
async fn sorted_snapshot(
    state: &web::Data<AppState>,
    access: &crate::store::Access,
    parsed: &crate::search::query::ParsedSearch,
    visible: &(dyn Fn(&StoredVersion) -> Result<Option<Value>, ApiError> + Sync),
) -> Result<(i64, Vec<(String, String)>), ApiError> {
    let st = state.clone();
    let acc = access.clone();
    let query = parsed.query.clone();
    if parsed.memory_sort.is_empty() {
        return blocking(move || {
            st.store
                .search_keys(&acc, &query, SORT_SNAPSHOT_MAX)
                .map_err(ApiError::from)
        })
        .await;
    }
    let (_, keys) = blocking(move || {
        st.store
            .search_keys(&acc, &query, SORT_SNAPSHOT_MAX + 1)
            .map_err(ApiError::from)
    })
    .await?;
    if keys.len() > SORT_SNAPSHOT_MAX as usize {
        return Err(ApiError::bad_request(
            IssueType::TooCostly,
            "too many matches to sort by an identifying parameter: narrow the search",
        ));
    }
    let mut ordered: Vec<(Vec<Option<String>>, crate::store::search_query::Key)> = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(500) {
        let st = state.clone();
        let acc = access.clone();
        let chunk = chunk.to_vec();
        let versions = blocking(move || st.store.read_keys(&acc, &chunk).map_err(ApiError::from)).await?;
        for v in versions {
            let Some(resource) = visible(&v)? else { continue };
            let sort_values = parsed
                .memory_sort
                .iter()
                .map(|(param, desc)| crate::search::query::memory_sort_value(param, &resource, *desc))
                .collect();
            ordered.push((sort_values, (v.resource_type, v.logical_id)));
        }
    }
    let dirs: Vec<bool> = parsed.memory_sort.iter().map(|(_, d)| *d).collect();
    ordered.sort_by(|a, b| {
        for (i, desc) in dirs.iter().enumerate() {
            // missing values last, whichever the direction
            let o = match (&a.0[i], &b.0[i]) {
                (Some(x), Some(y)) if *desc => y.cmp(x),
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        a.1.cmp(&b.1)
    });
    let snap: Vec<(String, String)> = ordered.into_iter().map(|(_, k)| k).collect();
    Ok((snap.len() as i64, snap))
}

/// One `_include` or `_revinclude` value: `Source:param[:Target]`, `Source:*` or `*`.
struct IncludeSpec {
    reverse: bool,
    iterate: bool,
    /// `None` for `*`
    source: Option<String>,
    param: Option<String>,
    target: Option<String>,
}

fn include_specs(state: &AppState, pairs: &[(String, String)]) -> Result<Vec<IncludeSpec>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        let (reverse, iterate) = match k.as_str() {
            "_include" => (false, false),
            "_include:iterate" | "_include:recurse" => (false, true),
            "_revinclude" => (true, false),
            "_revinclude:iterate" | "_revinclude:recurse" => (true, true),
            _ => continue,
        };
        let bad = || {
            ApiError::bad_request(
                IssueType::Invalid,
                "_include and _revinclude take Type:parameter[:Target]",
            )
        };
        if v == "*" {
            out.push(IncludeSpec {
                reverse,
                iterate,
                source: None,
                param: None,
                target: None,
            });
            continue;
        }
        let mut parts = v.split(':');
        let source = parts
            .next()
            .filter(|s| state.resource_types.contains(*s))
            .ok_or_else(bad)?;
        let param = parts.next().ok_or_else(bad)?;
        let target = parts.next().map(str::to_string);
        if target.as_ref().is_some_and(|t| !state.resource_types.contains(t)) {
            return Err(bad());
        }
        if param != "*" {
            let registry = state.search.current();
            let def = registry.get(source, param).ok_or_else(bad)?;
            if def.kind != crate::search::ParamType::Reference {
                return Err(bad());
            }
        }
        out.push(IncludeSpec {
            reverse,
            iterate,
            source: Some(source.to_string()),
            param: (param != "*").then(|| param.to_string()),
            target,
        });
    }
    Ok(out)
}

/// The (type, id) of what one spec adds to `frontier`.
async fn included(
    state: &web::Data<AppState>,
    spec: &IncludeSpec,
    frontier: &[(String, String)],
) -> Result<Vec<(String, String)>, ApiError> {
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (t, id) in frontier {
        by_type.entry(t.clone()).or_default().push(id.clone());
    }
    let mut out = Vec::new();
    for (t, ids) in by_type {
        let st = state.clone();
        let (source, param, target) = (spec.source.clone(), spec.param.clone(), spec.target.clone());
        if spec.reverse {
            // resources of `source` (any type, for `*`) referring to these
            let Some(source) = source else {
                let rows = blocking(move || st.store.all_referrers_of(&t, &ids).map_err(ApiError::from)).await?;
                out.extend(rows);
                continue;
            };
            let rows = blocking(move || {
                st.store
                    .referrers_of(&source, param.as_deref(), &t, &ids)
                    .map_err(ApiError::from)
                    .map(|rows| rows.into_iter().map(|r| (source.clone(), r.0)).collect::<Vec<_>>())
            })
            .await?;
            out.extend(rows);
        } else {
            if source.as_ref().is_some_and(|s| *s != t) {
                continue;
            }
            let rows = blocking(move || {
                st.store
                    .references_of(&t, &ids, param.as_deref())
                    .map_err(ApiError::from)
            })
            .await?;
            for (_, target_type, target_id) in rows {
                let Some(tt) = target_type else { continue };
                if target.as_ref().is_some_and(|want| *want != tt) {
                    continue;
                }
                out.push((tt, target_id));
            }
        }
    }
    Ok(out)
}

/// The resources the token may see among `keys` (one query per type): those of types it may
/// not read, outside its compartment or hidden by labels are left out; the rest shaped, with
/// their patients.
async fn fetch_visible(
    state: &web::Data<AppState>,
    p: &Principal,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, Value, Vec<String>)>, ApiError> {
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (t, id) in keys {
        by_type.entry(t.clone()).or_default().push(id.clone());
    }
    let mut out = Vec::new();
    for (t, ids) in by_type {
        let Ok(decision) = authorize(p, &t, Permission::Read) else {
            continue;
        };
        let st = state.clone();
        let (tt, access) = (t.clone(), decision.access());
        let versions = blocking(move || st.store.read_many(&access, &tt, &ids).map_err(ApiError::from)).await?;
        for v in versions {
            let Some(json) = v.content else { continue };
            if !decision.unrestricted {
                let value: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
                if !decision.admits(&state.compartment, &t, &v.logical_id, Some(&value)) {
                    continue;
                }
            }
            let Some(shaped) = state.attributes.shape_stored(p, &t, json) else {
                continue;
            };
            let resource: Value = serde_json::from_slice(&shaped).map_err(|_| ApiError::Internal)?;
            out.push((t.clone(), v.logical_id, resource, v.patients));
        }
    }
    Ok(out)
}
