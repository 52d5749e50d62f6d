//! `POST [base]` with a Bundle of type `batch` or `transaction` (FHIR R4 3.1.0.11).
//!
//! A **transaction** runs every write in one database transaction, in the order the
//! specification gives (DELETE, POST, PUT/PATCH), after resolving what the entries name:
//! server ids for `POST` entries (their `fullUrl`, `urn:uuid:` or `urn:oid:` or a URL, is
//! rewritten in every reference of every entry, extensions and contained resources included),
//! conditional creates and updates, and conditional references (`Patient?identifier=…`), each to
//! exactly one resource. Any failure rolls everything back and names the entry. Its `GET`
//! entries run last, after the commit, as the reads they are.
//!
//! A **batch** runs each entry on its own (its own transaction); a failing entry gets its error
//! in its response entry and the others still succeed.
//!
//! Every entry is authorized as the same interaction sent alone would be, and audited with its
//! own AuditEvent (a write's inside the write's transaction); the Bundle request has its own
//! event (subtype `batch` or `transaction`) with the overall outcome.

use super::crud::{self, content_for, parse_condition};
use super::negotiate::read_resource_body;
use super::route::Interaction;
use super::trail::Trail;
use super::{blocking, etag, search, ApiError, AppState, Format, Prefer};
use crate::audit::TxAudit;
use crate::auth::policy::authorize;
use crate::auth::{Permission, Principal};
use crate::fhir::patch::Patch;
use crate::fhir::{Issue, IssueType, OperationOutcome};
use crate::store::{Access, CreateMethod, CreateOutcome, DeleteOutcome, NewResource, StoreError, StoreTx, Written};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use chrono::NaiveDateTime;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Batch,
    Transaction,
}

/// One request entry of the Bundle, parsed.
struct Entry {
    index: usize,
    full_url: Option<String>,
    interaction: Interaction,
    /// The query of the entry's URL (a search, or the condition of a conditional write).
    query: String,
    resource: Option<Map<String, Value>>,
    if_match: Option<i64>,
    if_none_exist: Option<String>,
    /// The id a `POST` (or a conditional update that creates) writes under, chosen up front so
    /// that references to the entry can be rewritten before anything is written.
    new_id: String,
}

/// The results of a Bundle's writes (by entry index) and the audit hooks whose events
/// committed with them.
type Committed = (Vec<(usize, EntryResult)>, Vec<TxAudit>);

/// What an entry did: its `response` (and, on request, its resource).
struct EntryResult {
    status: StatusCode,
    location: Option<String>,
    version_id: Option<i64>,
    last_modified: Option<NaiveDateTime>,
    resource: Option<Value>,
    outcome: Option<Value>,
    /// A read's resource is what the entry asked for: always in the response.
    read: bool,
}

impl EntryResult {
    fn written(status: StatusCode, t: &str, id: &str, w: &Written) -> EntryResult {
        EntryResult {
            status,
            location: Some(format!("{t}/{id}/_history/{}", w.version_id)),
            version_id: Some(w.version_id),
            last_modified: Some(w.last_updated),
            resource: serde_json::from_slice(&w.json).ok(),
            outcome: None,
            read: false,
        }
    }

    fn failed(e: &ApiError) -> EntryResult {
        EntryResult {
            status: e.status_code(),
            location: None,
            version_id: None,
            last_modified: None,
            resource: None,
            outcome: serde_json::to_value(e.outcome()).ok(),
            read: false,
        }
    }

    fn deleted(outcome: DeleteOutcome) -> EntryResult {
        let (version_id, text) = match outcome {
            DeleteOutcome::Deleted { version_id } => (Some(version_id), "resource deleted"),
            DeleteOutcome::NothingToDelete => (None, "nothing to delete"),
        };
        EntryResult {
            status: StatusCode::OK,
            location: None,
            version_id,
            last_modified: None,
            resource: None,
            outcome: serde_json::to_value(OperationOutcome::information(text)).ok(),
            read: false,
        }
    }

    fn into_json(self, with_resource: bool) -> Value {
        let mut response = Map::new();
        let reason = self.status.canonical_reason().unwrap_or("");
        response.insert(
            "status".into(),
            json!(format!("{} {reason}", self.status.as_u16()).trim_end()),
        );
        if let Some(l) = self.location {
            response.insert("location".into(), json!(l));
        }
        if let Some(v) = self.version_id {
            response.insert("etag".into(), json!(etag(v)));
        }
        if let Some(ts) = self.last_modified {
            response.insert(
                "lastModified".into(),
                json!(ts.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            );
        }
        if let Some(o) = self.outcome {
            response.insert("outcome".into(), o);
        }
        let mut entry = Map::new();
        if with_resource || self.read {
            if let Some(r) = self.resource {
                entry.insert("resource".into(), r);
            }
        }
        entry.insert("response".into(), Value::Object(response));
        Value::Object(entry)
    }
}

/// Drops the unknown elements of an entry's resource (lenient handling), returning a warning
/// for each, with paths from the resource's type. An entry without a resource of a known type
/// is left for parsing to judge.
fn drop_unknown_in_entry(state: &AppState, entry: &mut Value) -> Vec<Issue> {
    let Some(resource) = entry.get_mut("resource") else {
        return Vec::new();
    };
    match resource.get("resourceType").and_then(Value::as_str).map(str::to_string) {
        Some(t) if state.validator.is_resource_type(&t) => state.validator.drop_unknown_elements(&t, resource),
        _ => Vec::new(),
    }
}

fn invalid(text: &'static str) -> ApiError {
    ApiError::bad_request(IssueType::Invalid, text)
}

/// The order a transaction processes entries in: DELETE, POST, PUT/PATCH, then GET.
fn phase(i: &Interaction) -> u8 {
    match i {
        Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => 0,
        Interaction::Create { .. } => 1,
        Interaction::Update { .. } | Interaction::ConditionalUpdate { .. } | Interaction::Patch { .. } => 2,
        _ => 3,
    }
}

fn is_read(i: &Interaction) -> bool {
    matches!(
        i,
        Interaction::Read { .. } | Interaction::VRead { .. } | Interaction::SearchType { .. }
    )
}

impl Entry {
    fn parse(state: &AppState, base: &str, index: usize, entry: Value) -> Result<Entry, ApiError> {
        let Value::Object(mut entry) = entry else {
            return Err(invalid("a Bundle entry must be an object"));
        };
        let request = match entry.remove("request") {
            Some(Value::Object(r)) => r,
            _ => return Err(invalid("a batch or transaction entry needs a request")),
        };
        let method = match request.get("method").and_then(Value::as_str) {
            Some("GET") => Method::GET,
            Some("HEAD") => Method::HEAD,
            Some("POST") => Method::POST,
            Some("PUT") => Method::PUT,
            Some("DELETE") => Method::DELETE,
            Some("PATCH") => Method::PATCH,
            _ => return Err(invalid("request.method must be GET, HEAD, POST, PUT, DELETE or PATCH")),
        };
        let url = request
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("request.url is required"))?;
        // relative to the base, or an absolute URL under it
        let url = match url.strip_prefix(base) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') => rest,
            _ if url.contains("://") => return Err(invalid("request.url must be relative to this server's base")),
            _ => url,
        };
        // or a path from the server's root (`/fhir/Patient`)
        let base_path = state.config.base_path.as_str();
        let url = match url.strip_prefix(base_path) {
            Some(rest) if !base_path.is_empty() && (rest.starts_with('/') || rest.starts_with('?')) => rest,
            _ => url,
        };
        let url = url.trim_start_matches('/');
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let interaction = Interaction::parse(&method, path, |t| state.resource_types.contains(t))?;
        let supported = matches!(
            interaction,
            Interaction::Create { .. }
                | Interaction::Update { .. }
                | Interaction::Delete { .. }
                | Interaction::ConditionalUpdate { .. }
                | Interaction::ConditionalDelete { .. }
                | Interaction::Patch { .. }
                | Interaction::Read { .. }
                | Interaction::VRead { .. }
                | Interaction::SearchType { .. }
        );
        if !supported {
            return Err(ApiError::MethodNotAllowed);
        }
        let header = |name: &str| request.get(name).and_then(Value::as_str).map(str::to_string);
        let if_match = match header("ifMatch") {
            Some(v) => {
                Some(crud::parse_etag(&v).ok_or_else(|| invalid("request.ifMatch must be an ETag such as W/\"1\""))?)
            }
            None => None,
        };
        let resource = match entry.remove("resource") {
            Some(Value::Object(r)) => Some(r),
            None => None,
            Some(_) => return Err(invalid("entry.resource must be a resource")),
        };
        let needs_body = matches!(
            interaction,
            Interaction::Create { .. }
                | Interaction::Update { .. }
                | Interaction::ConditionalUpdate { .. }
                | Interaction::Patch { .. }
        );
        if needs_body && resource.is_none() {
            return Err(ApiError::BadRequest(vec![Issue::error(
                IssueType::Required,
                "this request needs entry.resource",
            )]));
        }
        Ok(Entry {
            index,
            full_url: entry.get("fullUrl").and_then(Value::as_str).map(str::to_string),
            interaction,
            query: query.to_string(),
            resource,
            if_match,
            if_none_exist: header("ifNoneExist").filter(|s| !s.is_empty()),
            new_id: uuid::Uuid::new_v4().to_string(),
        })
    }
}

/// Entry point: `POST [base]` with a Bundle.
pub async fn process(
    req: HttpRequest,
    p: Arc<Principal>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // The router abandons the request at `request_timeout_secs`, but a transaction already
    // running on a blocking thread would still commit: it gives up (rolls back) by itself at
    // 80 % of that time, so a client told "timed out" never finds its writes applied later.
    let deadline = Instant::now() + Duration::from_secs(state.config.request_timeout_secs) * 4 / 5;
    let fmt = Format::negotiate(&req)?;
    // entries carry their resources only when asked: a Synthea bundle echoed back is megabytes
    let with_resources = req.headers().contains_key("prefer") && Prefer::from_request(&req) == Prefer::Representation;
    let mut body = read_resource_body(&req, payload, state.config.max_body_bytes).await?;
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(invalid("POST to the base takes a Bundle of type batch or transaction"));
    }
    let kind = match body.get("type").and_then(Value::as_str) {
        Some("batch") => Kind::Batch,
        Some("transaction") => Kind::Transaction,
        _ => return Err(invalid("Bundle.type must be batch or transaction")),
    };
    let trail = Trail::of(&req)?;
    trail.bundle_kind(if kind == Kind::Batch { "batch" } else { "transaction" });
    let entries = match body.remove("entry") {
        Some(Value::Array(a)) => a,
        None => Vec::new(),
        Some(_) => return Err(invalid("Bundle.entry must be a list")),
    };
    if entries.len() > state.config.max_bundle_entries {
        return Err(ApiError::TooManyEntries(state.config.max_bundle_entries));
    }
    // Prefer: handling=lenient: each entry's resource loses the elements R4 does not know,
    // reported in that entry's `response.outcome` when it succeeds
    let mut entries = entries;
    let dropped: Vec<Vec<Issue>> = if super::negotiate::lenient_handling(&req) {
        entries.iter_mut().map(|e| drop_unknown_in_entry(&state, e)).collect()
    } else {
        Vec::new()
    };
    let base = state.base_url(&req);
    let parsed: Vec<Result<Entry, ApiError>> = entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| Entry::parse(&state, &base, i, e))
        .collect();
    let mut results = match kind {
        Kind::Transaction => transaction(&req, &p, &state, &trail, parsed, deadline).await?,
        Kind::Batch => batch(&req, &p, &state, &trail, parsed, deadline).await?,
    };
    for (result, warnings) in results.iter_mut().zip(dropped) {
        if result.status.is_success() && !warnings.is_empty() {
            result.outcome = serde_json::to_value(OperationOutcome::new(warnings)).ok();
        }
    }
    let response = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": if kind == Kind::Batch { "batch-response" } else { "transaction-response" },
        "entry": results.into_iter().map(|r| r.into_json(with_resources)).collect::<Vec<_>>(),
    });
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&response)))
}

async fn transaction(
    req: &HttpRequest,
    p: &Arc<Principal>,
    state: &web::Data<AppState>,
    trail: &Trail,
    parsed: Vec<Result<Entry, ApiError>>,
    deadline: Instant,
) -> Result<Vec<EntryResult>, ApiError> {
    let mut entries = Vec::with_capacity(parsed.len());
    for (index, e) in parsed.into_iter().enumerate() {
        entries.push(e.map_err(|error| ApiError::InEntry {
            index,
            error: Box::new(error),
        })?);
    }
    let (writes, reads): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| !is_read(&e.interaction));
    let audits: Vec<TxAudit> = writes.iter().map(|e| trail.for_entry(state, &e.interaction)).collect();
    let (st, pp) = (state.clone(), p.clone());
    let (mut results, audits) = blocking(move || run_transaction(&st, &pp, writes, audits, deadline)).await?;
    trail.entries_committed(state, audits);
    for e in reads {
        let index = e.index;
        results.push((index, read_entry(req, p, state, trail, e).await?));
    }
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

async fn batch(
    req: &HttpRequest,
    p: &Arc<Principal>,
    state: &web::Data<AppState>,
    trail: &Trail,
    parsed: Vec<Result<Entry, ApiError>>,
    deadline: Instant,
) -> Result<Vec<EntryResult>, ApiError> {
    let mut results = Vec::with_capacity(parsed.len());
    for e in parsed {
        let e = match e {
            Ok(e) => e,
            Err(error) => {
                results.push(EntryResult::failed(&error));
                continue;
            }
        };
        if is_read(&e.interaction) {
            results.push(read_entry(req, p, state, trail, e).await?);
            continue;
        }
        let interaction = e.interaction.clone();
        let audit = trail.for_entry(state, &interaction);
        let (st, pp) = (state.clone(), p.clone());
        match blocking(move || run_transaction(&st, &pp, vec![e], vec![audit], deadline)).await {
            Ok((mut done, audits)) => {
                trail.entries_committed(state, audits);
                results.push(done.pop().map(|(_, r)| r).ok_or(ApiError::Internal)?);
            }
            // the entry's own failure; the server's (audit, database down, time) fails the batch
            Err(ApiError::InEntry { error, .. }) => {
                trail.entry_failed(state, &interaction, &error).await?;
                results.push(EntryResult::failed(&error));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(results)
}

/// A read entry (`GET [type]/[id]`, a vread, a search), run as the request it names under its
/// own audit trail, after the writes.
async fn read_entry(
    req: &HttpRequest,
    p: &Arc<Principal>,
    state: &web::Data<AppState>,
    bundle_trail: &Trail,
    e: Entry,
) -> Result<EntryResult, ApiError> {
    let entry_trail = Trail::start(req, state, Some(&e.interaction));
    entry_trail.principal(p);
    let result = match e.interaction.clone() {
        Interaction::Read { resource_type, id } if resource_type == "AuditEvent" => {
            super::audit::read(req.clone(), p.clone(), id, state.clone()).await
        }
        Interaction::Read { resource_type, id } => {
            crud::read(req.clone(), p.clone(), resource_type, id, state.clone()).await
        }
        Interaction::VRead {
            resource_type,
            id,
            version,
        } => crud::vread(req.clone(), p.clone(), resource_type, id, version, state.clone()).await,
        Interaction::SearchType { resource_type } => {
            let pairs = super::negotiate::url_decode_pairs(&e.query);
            search::search(
                req.clone(),
                p.clone(),
                search::Target::Type(resource_type),
                pairs,
                state.clone(),
            )
            .await
        }
        _ => Err(ApiError::MethodNotAllowed),
    };
    let result = entry_trail.finish(state, result).await;
    req.extensions_mut().insert(bundle_trail.clone());
    Ok(match result {
        Ok(resp) => {
            let status = resp.status();
            let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
            let header_version = header(actix_web::http::header::ETAG).and_then(crud::parse_etag);
            let last_modified = header(actix_web::http::header::LAST_MODIFIED)
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .map(|t| chrono::DateTime::<chrono::Utc>::from(t).naive_utc());
            let bytes = actix_web::body::to_bytes(resp.into_body())
                .await
                .map_err(|_| ApiError::Internal)?;
            let resource: Option<Value> = serde_json::from_slice(&bytes).ok();
            EntryResult {
                status,
                location: None,
                version_id: header_version,
                last_modified,
                resource,
                outcome: None,
                read: true,
            }
        }
        Err(ApiError::AuditUnavailable) => return Err(ApiError::AuditUnavailable),
        Err(e) => EntryResult::failed(&e),
    })
}

/// The write entries, in one database transaction. Returns each entry's result (by index)
/// and the audit hooks, whose events committed with the writes.
fn run_transaction(
    state: &AppState,
    p: &Principal,
    mut entries: Vec<Entry>,
    mut audits: Vec<TxAudit>,
    deadline: Instant,
) -> Result<Committed, ApiError> {
    // The transaction starts with the token's own reach; each entry then runs with its decision's.
    let base_access = match &p.patient {
        Some(patient) => Access::Patient(patient.clone()),
        None => Access::All,
    };
    let results = state.store.transaction(&base_access, |tx| {
        apply(state, p, tx, &mut entries, &mut audits, deadline)
    })?;
    Ok((results, audits))
}

fn in_entry(index: usize) -> impl Fn(ApiError) -> ApiError {
    move |error| match error {
        e @ ApiError::InEntry { .. } => e,
        error => ApiError::InEntry {
            index,
            error: Box::new(error),
        },
    }
}

fn apply(
    state: &AppState,
    p: &Principal,
    tx: &mut StoreTx<'_>,
    entries: &mut [Entry],
    audits: &mut [TxAudit],
    deadline: Instant,
) -> Result<Vec<(usize, EntryResult)>, ApiError> {
    let in_time = || {
        if Instant::now() > deadline {
            tracing::warn!("a Bundle ran out of time and was rolled back");
            Err(ApiError::Timeout)
        } else {
            Ok(())
        }
    };
    // 1. What each fullUrl becomes: the id a POST is given (or the resource its condition
    //    matched), the resource a PUT names.
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut conditions = HashMap::new();
    // a condition met by nothing yet names what the first entry with it creates: a second
    // entry with the same condition finds that one (and its fullUrl must point there too)
    let mut created_for: HashMap<(String, String), String> = HashMap::new();
    for e in entries.iter_mut() {
        let at = in_entry(e.index);
        let target = match &e.interaction {
            Interaction::Create { resource_type: t } => match &e.if_none_exist {
                Some(q) => {
                    let cond = parse_condition(state, p, t, q).map_err(&at)?;
                    let found = tx.resolve(t, &cond, 2).map_err(ApiError::from).map_err(&at)?;
                    let key = (t.clone(), cond.key.clone());
                    conditions.insert(e.index, cond);
                    match found.as_slice() {
                        [] => Some(
                            created_for
                                .entry(key)
                                .or_insert_with(|| format!("{t}/{}", e.new_id))
                                .clone(),
                        ),
                        [one] => Some(format!("{t}/{one}")),
                        _ => return Err(at(ApiError::from(StoreError::MultipleMatches))),
                    }
                }
                None => Some(format!("{t}/{}", e.new_id)),
            },
            Interaction::Update { resource_type: t, id } | Interaction::Patch { resource_type: t, id } => {
                Some(format!("{t}/{id}"))
            }
            Interaction::ConditionalUpdate { resource_type: t } => {
                let cond = crud::check_conditional_update(state, p, t, &e.query).map_err(&at)?;
                let found = tx.resolve(t, &cond, 2).map_err(ApiError::from).map_err(&at)?;
                conditions.insert(e.index, cond);
                let body_id = e.resource.as_ref().and_then(|r| r.get("id")).and_then(Value::as_str);
                match (found.as_slice(), body_id) {
                    ([], Some(b)) => Some(format!("{t}/{b}")),
                    ([], None) => Some(format!("{t}/{}", e.new_id)),
                    ([one], _) => Some(format!("{t}/{one}")),
                    _ => return Err(at(ApiError::from(StoreError::MultipleMatches))),
                }
            }
            _ => None,
        };
        if let (Some(full_url), Some(target)) = (&e.full_url, target) {
            if ids.insert(full_url.clone(), target).is_some() {
                return Err(at(invalid("two entries have the same fullUrl")));
            }
        }
    }
    // 2. Every reference to another entry, or by condition, becomes the resource it names.
    let mut resolved: HashMap<String, String> = HashMap::new();
    for e in entries.iter_mut() {
        let at = in_entry(e.index);
        let Some(body) = e.resource.as_mut() else { continue };
        if matches!(e.interaction, Interaction::Patch { .. }) {
            continue;
        }
        let mut refs = Vec::new();
        collect_references(body, &mut refs);
        for r in refs {
            if ids.contains_key(&r) || resolved.contains_key(&r) {
                continue;
            }
            if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
                return Err(at(invalid("a reference names an entry that is not in the Bundle")));
            }
            if let Some((t, q)) = r.split_once('?') {
                if !state.resource_types.contains(t) {
                    continue;
                }
                let cond = parse_condition(state, p, t, q).map_err(&at)?;
                let found = tx.resolve(t, &cond, 2).map_err(ApiError::from).map_err(&at)?;
                match found.as_slice() {
                    [one] => {
                        resolved.insert(r.clone(), format!("{t}/{one}"));
                    }
                    [] => return Err(at(invalid("a conditional reference matches no resource"))),
                    _ => {
                        return Err(at(ApiError::PreconditionFailed(
                            IssueType::MultipleMatches,
                            "a conditional reference matches more than one resource",
                        )))
                    }
                }
            }
        }
        rewrite_references(body, &|r| ids.get(r).or_else(|| resolved.get(r)).cloned());
    }
    // 3. The writes, in the order the specification gives. Plain creates (most of a patient's
    //    bundle) are written together, one multi-row INSERT per table.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| (phase(&entries[i].interaction), i));
    // plain PUTs (no If-Match, no condition): which of their ids nobody holds yet, one query
    // per type, seeing every resource
    let mut absent: std::collections::HashSet<(String, String)> = Default::default();
    let mut puts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for e in entries.iter() {
        if let (Interaction::Update { resource_type: t, id }, None, false) =
            (&e.interaction, e.if_match, conditions.contains_key(&e.index))
        {
            puts.entry(t.clone()).or_default().push(id.clone());
        }
    }
    if !puts.is_empty() {
        tx.set_access(&Access::All).map_err(ApiError::from)?;
        for (t, ids) in puts {
            let existing = tx.existing_ids(&t, &ids).map_err(ApiError::from)?;
            absent.extend(
                ids.into_iter()
                    .filter(|id| !existing.contains(id))
                    .map(|id| (t.clone(), id)),
            );
        }
    }
    let mut results = Vec::with_capacity(entries.len());
    let mut creates = Creates {
        ts: crate::store::now(),
        access: None,
        pending: Vec::new(),
    };
    for i in order {
        in_time()?;
        let e = &mut entries[i];
        let cond = conditions.remove(&e.index);
        if let (Interaction::Create { resource_type: t }, None) = (&e.interaction, &cond) {
            let mut body = e.resource.take().ok_or(ApiError::Internal)?;
            let decision = crud::check_create(state, p, t, &mut body).map_err(in_entry(e.index))?;
            creates.switch_to(decision.access(), tx, audits, &mut results, e.index)?;
            let content = content_for(state, t, &mut body, &e.new_id, 1, creates.ts);
            creates.pending.push((
                i,
                e.index,
                NewResource {
                    resource_type: t.clone(),
                    id: e.new_id.clone(),
                    content,
                    method: CreateMethod::Post,
                },
            ));
            continue;
        }
        // a PUT of an id nobody holds, by a token that reads everything: a create, written
        // with the plain creates (an import's chunks are hundreds of these)
        if let (Interaction::Update { resource_type: t, id }, None, None) = (&e.interaction, &cond, e.if_match) {
            if absent.remove(&(t.clone(), id.clone())) {
                let mut body = e.resource.take().ok_or(ApiError::Internal)?;
                let (decision, may_create) =
                    crud::check_update(state, p, t, id, &mut body).map_err(in_entry(e.index))?;
                if may_create && !crud::update_needs_stored(state, p, &decision, t) {
                    creates.switch_to(decision.access(), tx, audits, &mut results, e.index)?;
                    let content = content_for(state, t, &mut body, id, 1, creates.ts);
                    creates.pending.push((
                        i,
                        e.index,
                        NewResource {
                            resource_type: t.clone(),
                            id: id.clone(),
                            content,
                            method: CreateMethod::Put,
                        },
                    ));
                    continue;
                }
                e.resource = Some(body);
            }
        }
        creates.flush(tx, audits, &mut results)?;
        creates.access = None;
        let result = write_entry(state, p, tx, e, cond, &mut audits[i]).map_err(in_entry(e.index))?;
        results.push((e.index, result));
    }
    creates.flush(tx, audits, &mut results)?;
    in_time()?;
    Ok(results)
}

/// Plain creates waiting to be written together.
struct Creates {
    /// The transaction's time: every version it writes has it as `lastUpdated`.
    ts: NaiveDateTime,
    /// The access the pending creates were checked under (the transaction's current one).
    access: Option<Access>,
    /// (position in the entries and audits, entry index, the resource)
    pending: Vec<(usize, usize, NewResource)>,
}

impl Creates {
    /// Pending creates are written under the access they were checked with: a create checked
    /// under another first writes those, then switches the transaction to its own.
    fn switch_to(
        &mut self,
        access: Access,
        tx: &mut StoreTx<'_>,
        audits: &mut [TxAudit],
        results: &mut Vec<(usize, EntryResult)>,
        index: usize,
    ) -> Result<(), ApiError> {
        if self.access.as_ref() != Some(&access) {
            self.flush(tx, audits, results)?;
            tx.set_access(&access)
                .map_err(ApiError::from)
                .map_err(in_entry(index))?;
            self.access = Some(access);
        }
        Ok(())
    }

    fn flush(
        &mut self,
        tx: &mut StoreTx<'_>,
        audits: &mut [TxAudit],
        results: &mut Vec<(usize, EntryResult)>,
    ) -> Result<(), ApiError> {
        let pending = std::mem::take(&mut self.pending);
        let Some(&(_, first_index, _)) = pending.first() else {
            return Ok(());
        };
        let positions: std::collections::HashSet<usize> = pending.iter().map(|(pos, _, _)| *pos).collect();
        // the audit hooks of these entries, in the order of `pending` (positions ascend)
        let hooks: Vec<&mut dyn crate::store::WriteAudit> = audits
            .iter_mut()
            .enumerate()
            .filter(|(pos, _)| positions.contains(pos))
            .map(|(_, a)| a as &mut dyn crate::store::WriteAudit)
            .collect();
        let (keys, items): (Vec<(usize, String, String)>, Vec<NewResource>) = pending
            .into_iter()
            .map(|(_, index, r)| ((index, r.resource_type.clone(), r.id.clone()), r))
            .unzip();
        let written = tx
            .create_many(self.ts, items, hooks)
            .map_err(ApiError::from)
            .map_err(in_entry(first_index))?;
        for ((index, t, id), w) in keys.into_iter().zip(written) {
            results.push((index, EntryResult::written(StatusCode::CREATED, &t, &id, &w)));
        }
        Ok(())
    }
}

/// One write entry inside the transaction: the same checks as the interaction sent alone.
fn write_entry(
    state: &AppState,
    p: &Principal,
    tx: &mut StoreTx<'_>,
    e: &mut Entry,
    cond: Option<crate::store::Condition>,
    audit: &mut TxAudit,
) -> Result<EntryResult, ApiError> {
    match e.interaction.clone() {
        Interaction::Create { resource_type: t } => {
            let mut body = e.resource.take().ok_or(ApiError::Internal)?;
            let decision = crud::check_create(state, p, &t, &mut body)?;
            tx.set_access(&decision.access())?;
            let id = e.new_id.clone();
            let outcome = tx.create(
                &t,
                &id,
                CreateMethod::Post,
                cond.as_ref(),
                |v, ts| content_for(state, &t, &mut body, &id, v, ts),
                audit,
            )?;
            Ok(match outcome {
                CreateOutcome::Created(w) => EntryResult::written(StatusCode::CREATED, &t, &id, &w),
                CreateOutcome::Existing(v) => EntryResult {
                    status: StatusCode::OK,
                    location: Some(format!("{t}/{}/_history/{}", v.logical_id, v.version_id)),
                    version_id: Some(v.version_id),
                    last_modified: Some(v.last_updated),
                    resource: v.content.as_deref().and_then(|c| serde_json::from_slice(c).ok()),
                    outcome: None,
                    read: false,
                },
            })
        }
        Interaction::Update { resource_type: t, id } => {
            let mut body = e.resource.take().ok_or(ApiError::Internal)?;
            let (decision, may_create) = crud::check_update(state, p, &t, &id, &mut body)?;
            tx.set_access(&decision.access())?;
            let mut expected = e.if_match;
            let mut create_only = false;
            if crud::update_needs_stored(state, p, &decision, &t) {
                let found = tx.read(&t, &id).map_err(ApiError::from);
                (expected, create_only) =
                    crud::check_against_stored(state, p, &decision, &t, &id, &mut body, expected, may_create, found)?;
            }
            let w = if create_only {
                match tx.create(
                    &t,
                    &id,
                    CreateMethod::Put,
                    None,
                    |v, ts| content_for(state, &t, &mut body, &id, v, ts),
                    audit,
                )? {
                    CreateOutcome::Created(w) => w,
                    CreateOutcome::Existing(_) => return Err(ApiError::Internal),
                }
            } else {
                tx.update(
                    &t,
                    &id,
                    expected,
                    may_create,
                    &|v, ts| {
                        let mut b = body.clone();
                        content_for(state, &t, &mut b, &id, v, ts)
                    },
                    audit,
                )
                .map_err(|e| match e {
                    StoreError::CreateNotAllowed => ApiError::Forbidden,
                    other => crud::update_error(other),
                })?
            };
            let status = if w.created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(EntryResult::written(status, &t, &id, &w))
        }
        Interaction::ConditionalUpdate { resource_type: t } => {
            let cond = match cond {
                Some(c) => c,
                None => crud::check_conditional_update(state, p, &t, &e.query)?,
            };
            let mut body = e.resource.take().ok_or(ApiError::Internal)?;
            let body_id = crud::check_conditional_body(state, p, &t, &mut body)?;
            tx.set_access(&Access::All)?;
            let (id, w) = tx
                .conditional_update(
                    &t,
                    &cond,
                    body_id.as_deref(),
                    &e.new_id,
                    e.if_match,
                    &|id, v, ts| {
                        let mut b = body.clone();
                        content_for(state, &t, &mut b, id, v, ts)
                    },
                    audit,
                )
                .map_err(crud::conditional_update_error)?;
            let status = if w.created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(EntryResult::written(status, &t, &id, &w))
        }
        Interaction::Delete { resource_type: t, id } => {
            let decision = authorize(p, &t, Permission::Delete)?;
            tx.set_access(&decision.access())?;
            let mut expected = e.if_match;
            if !decision.unrestricted || state.attributes.label_rules_bind(p) {
                let found = tx.read(&t, &id).map_err(ApiError::from);
                expected = expected.or(Some(crud::admitted(state, p, &decision, &t, &id, found)?.0));
            }
            Ok(EntryResult::deleted(tx.delete(&t, &id, expected, audit)?))
        }
        Interaction::ConditionalDelete { resource_type: t } => {
            let cond = crud::check_conditional_delete(state, p, &t, &e.query)?;
            tx.set_access(&Access::All)?;
            Ok(EntryResult::deleted(tx.conditional_delete(&t, &cond, audit)?))
        }
        Interaction::Patch { resource_type: t, id } => {
            let body = e.resource.take().ok_or(ApiError::Internal)?;
            let patch = Patch::from_resource(&body).map_err(crud::patch_error)?;
            let w = crud::patch_in_tx(state, p, tx, &t, &id, &patch, e.if_match, audit)?;
            Ok(EntryResult::written(StatusCode::OK, &t, &id, &w))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Every `reference` string in a resource (contained resources and extensions included).
fn collect_references(body: &Map<String, Value>, out: &mut Vec<String>) {
    for (k, v) in body {
        match v {
            Value::String(s) if k == "reference" => out.push(s.clone()),
            Value::Object(m) => collect_references(m, out),
            Value::Array(a) => {
                for item in a {
                    if let Value::Object(m) = item {
                        collect_references(m, out);
                    }
                }
            }
            _ => {}
        }
    }
}

fn rewrite_references(body: &mut Map<String, Value>, target: &dyn Fn(&str) -> Option<String>) {
    for (k, v) in body.iter_mut() {
        match v {
            Value::String(s) if k == "reference" => {
                if let Some(t) = target(s) {
                    *s = t;
                }
            }
            Value::Object(m) => rewrite_references(m, target),
            Value::Array(a) => {
                for item in a {
                    if let Value::Object(m) = item {
                        rewrite_references(m, target);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_rewritten_everywhere() {
        let mut body = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "extension": [{"url": "x", "valueReference": {"reference": "urn:uuid:1"}}],
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:2"}]}],
            "note": [{"text": "reference urn:uuid:1 stays"}]
        });
        let Value::Object(m) = &mut body else { unreachable!() };
        let mut refs = Vec::new();
        collect_references(m, &mut refs);
        assert_eq!(refs.len(), 3);
        rewrite_references(m, &|r| match r {
            "urn:uuid:1" => Some("Patient/a".into()),
            "urn:uuid:2" => Some("Patient/b".into()),
            _ => None,
        });
        assert_eq!(body["subject"]["reference"], "Patient/a");
        assert_eq!(body["extension"][0]["valueReference"]["reference"], "Patient/a");
        assert_eq!(body["contained"][0]["target"][0]["reference"], "Patient/b");
        assert_eq!(body["note"][0]["text"], "reference urn:uuid:1 stays");
    }

    #[test]
    fn transactions_process_deletes_then_creates_then_updates_then_reads() {
        let t = || "Patient".to_string();
        assert!(
            phase(&Interaction::Delete {
                resource_type: t(),
                id: "1".into()
            }) < phase(&Interaction::Create { resource_type: t() })
        );
        assert!(
            phase(&Interaction::Create { resource_type: t() })
                < phase(&Interaction::Patch {
                    resource_type: t(),
                    id: "1".into()
                })
        );
        assert!(
            phase(&Interaction::Update {
                resource_type: t(),
                id: "1".into()
            }) < phase(&Interaction::Read {
                resource_type: t(),
                id: "1".into()
            })
        );
    }
}
