//! create, read, vread, update, delete.

use super::negotiate::{lenient_handling, read_resource_body};
use super::trail::Trail;
use super::{blocking, etag, http_date, ApiError, AppState, Format, Prefer};
use crate::auth::policy::{authorize, Decision};
use crate::auth::{Permission, Principal};
use crate::fhir::patch::{Patch, PatchError};
use crate::fhir::resource;
use crate::fhir::{Issue, IssueType, OperationOutcome};
use crate::store::{
    self, Condition, Content, CreateMethod, CreateOutcome, DeleteOutcome, StoreError, StoredVersion, Written,
};
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::NaiveDateTime;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Lends a resource body as the `Value` that validation and the policy take, moving the map in
/// and out rather than copying it.
pub(super) fn as_value<R>(body: &mut Map<String, Value>, f: impl FnOnce(&mut Value) -> R) -> R {
    let mut value = Value::Object(std::mem::take(body));
    let result = f(&mut value);
    if let Value::Object(m) = value {
        *body = m;
    }
    result
}

/// The body of a create or update. Under `Prefer: handling=lenient` the elements the R4
/// definitions do not know are dropped first and returned as warnings (for the response's
/// OperationOutcome); strict, the default, leaves them for validation to refuse.
pub(super) async fn read_write_body(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    resource_type: &str,
) -> Result<(Map<String, Value>, Vec<Issue>), ApiError> {
    let mut body = read_resource_body(req, payload, state.config.max_body_bytes).await?;
    let dropped = if lenient_handling(req) && body.get("resourceType").and_then(Value::as_str) == Some(resource_type) {
        as_value(&mut body, |v| state.validator.drop_unknown_elements(resource_type, v))
    } else {
        Vec::new()
    };
    Ok((body, dropped))
}

/// Checks a submitted body: `resourceType` names the URL's type, then the R4 JSON Schema.
/// `meta.versionId` and `meta.lastUpdated` belong to the server: they are dropped first, so a
/// stale or malformed client value neither fails validation nor survives.
pub(super) fn check_body(state: &AppState, resource_type: &str, body: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == resource_type => {}
        Some(_) => {
            return Err(ApiError::BadRequest(vec![Issue::error(
                IssueType::Invalid,
                "resourceType does not match the type in the URL",
            )
            .at("resourceType")]))
        }
        None => {
            return Err(ApiError::BadRequest(vec![Issue::error(
                IssueType::Required,
                "resourceType is required",
            )
            .at("resourceType")]))
        }
    }
    if let Some(Value::Object(meta)) = body.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
    }
    let issues = as_value(body, |v| state.validator.validate(resource_type, v));
    if !issues.is_empty() {
        return Err(ApiError::BadRequest(issues));
    }
    // an active SearchParameter becomes a search parameter of this server: it must be one
    if resource_type == "SearchParameter" {
        let registry = state.search.current();
        as_value(body, |v| {
            crate::search::registry::check_stored_definition(&registry, |t| state.validator.is_resource_type(t), v)
        })
        .map_err(|reason| ApiError::BadRequest(vec![Issue::error(IssueType::Invalid, reason).at("SearchParameter")]))?;
    }
    if resource_type == crate::store::subscription::SUBSCRIPTION {
        check_subscription(state, body)?;
    }
    if state.config.validate_profiles_on_write {
        check_declared_profiles(state, body)?;
    }
    Ok(())
}

/// A Subscription must be one this server can deliver (criteria, channel, endpoint); its status
/// is the server's to set: `requested` (the handshake makes it `active`), unless the client
/// writes it `off` or `error` (neither is delivered).
fn check_subscription(state: &AppState, body: &mut Map<String, Value>) -> Result<(), ApiError> {
    let registry = state.search.current();
    let is_type = |t: &str| state.validator.is_resource_type(t);
    let ctx = state.subscription_context(&registry, &is_type);
    let id = body.get("id").and_then(Value::as_str).unwrap_or("").to_string();
    as_value(body, |v| crate::subscription::read_spec(&ctx, &id, v))
        .map_err(|e| ApiError::BadRequest(vec![Issue::error(IssueType::NotSupported, e.reason).at(e.at)]))?;
    if !matches!(body.get("status").and_then(Value::as_str), Some("off" | "error")) {
        body.insert("status".into(), Value::String("requested".into()));
    }
    Ok(())
}

/// What a create or update of `body` would refuse before touching the database (the same
/// checks, [`check_body`]): for commands that check their input before writing any of it.
pub fn precheck(state: &AppState, resource_type: &str, body: &Map<String, Value>) -> Result<(), ApiError> {
    let mut body = body.clone();
    check_body(state, resource_type, &mut body)
}

/// `validate_profiles_on_write`: a resource declaring profiles the server knows must meet them
/// (and the R4 definitions); one that fails is refused with every error (422). Profiles the
/// server does not know are not checked.
fn check_declared_profiles(state: &AppState, body: &mut Map<String, Value>) -> Result<(), ApiError> {
    let declared: Vec<String> = body
        .get("meta")
        .and_then(|m| m.get("profile"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|url| state.structures.knows_profile(url))
        .map(str::to_string)
        .collect();
    if declared.is_empty() {
        return Ok(());
    }
    let errors: Vec<Issue> = as_value(body, |v| state.structures.validate(v, &declared))
        .into_iter()
        .filter(|i| {
            matches!(
                i.severity,
                crate::fhir::IssueSeverity::Error | crate::fhir::IssueSeverity::Fatal
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(errors))
    }
}

/// Parses `If-Match: W/"3"` (or `"3"`).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    parse_etag(v.to_str().unwrap_or(""))
        .map(Some)
        .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "If-Match must be an ETag such as W/\"1\""))
}

pub(super) fn parse_etag(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// `If-None-Exist: identifier=sys|val&_id=…` → a condition on identity.
/// The condition of a conditional write (`If-None-Exist`, or the query of `PUT`/`DELETE
/// [type]?…`), parsed by the search engine. Strictly: a parameter left out would widen the
/// condition to more resources than the client named. A token must be able to search, and
/// read, every type the condition reaches, without compartment limits.
pub(super) fn parse_condition(
    state: &AppState,
    p: &Principal,
    resource_type: &str,
    query: &str,
) -> Result<Condition, ApiError> {
    let mut pairs = super::negotiate::url_decode_pairs(query.trim_start_matches('?'));
    pairs.retain(|(k, _)| !matches!(k.as_str(), "_format" | "_pretty"));
    if pairs.is_empty() {
        return Err(ApiError::bad_request(
            IssueType::Invalid,
            "a conditional write needs search parameters",
        ));
    }
    if pairs.iter().any(|(k, _)| {
        k.starts_with('_')
            && !matches!(
                k.as_str(),
                "_id" | "_lastUpdated" | "_tag" | "_profile" | "_security" | "_source"
            )
            && !k.starts_with("_has:")
    }) {
        return Err(ApiError::bad_request(
            IssueType::Invalid,
            "a condition takes search parameters, not result parameters",
        ));
    }
    let parsed = crate::search::query::parse(
        &state.search.current(),
        state.store.cipher(),
        resource_type,
        &pairs,
        0,
        true,
    )?;
    for t in std::iter::once(resource_type.to_string()).chain(parsed.types.iter().cloned()) {
        for needed in [Permission::Search, Permission::Read] {
            if !authorize(p, &t, needed)?.unrestricted {
                return Err(ApiError::Forbidden);
            }
        }
    }
    pairs.sort();
    let key = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish();
    let rechecks = parsed.rechecks;
    let cipher = state.store.shared_cipher();
    Ok(Condition {
        clauses: parsed.query.clauses,
        recheck: (!rechecks.is_empty()).then(|| {
            Arc::new(move |v: &Value| rechecks.iter().all(|r| r.holds(v, &cipher))) as crate::store::ContentTest
        }),
        key,
    })
}

/// The checks of a create before it is written: the right to create, the body, and (for a
/// patient-context token) that the new resource is inside its compartment, and the attribute
/// rules. Returns the decision the write runs under.
pub(super) fn check_create(
    state: &AppState,
    p: &Principal,
    resource_type: &str,
    body: &mut Map<String, Value>,
) -> Result<Decision, ApiError> {
    let decision = authorize(p, resource_type, Permission::Create)?;
    check_body(state, resource_type, body)?;
    // The server assigns the id (FHIR 3.1.0.7): drop the client's before anything looks at it.
    body.remove("id");
    // A patient-context token creates only inside its own compartment.
    if !decision.unrestricted
        && !as_value(body, |v| {
            decision.admits(&state.compartment, resource_type, "", Some(v))
        })
    {
        return Err(ApiError::Forbidden);
    }
    as_value(body, |v| state.attributes.check_write(p, resource_type, None, v))?;
    Ok(decision)
}

/// The checks of an update (`PUT [type]/[id]`) that need no stored version: the rights, the
/// body and its id, and that new content stays inside a patient-context token's compartment.
/// Returns the decision and whether the token may create the resource if it does not exist.
pub(super) fn check_update(
    state: &AppState,
    p: &Principal,
    t: &str,
    id: &str,
    body: &mut Map<String, Value>,
) -> Result<(Decision, bool), ApiError> {
    let decision = authorize(p, t, Permission::Update)?;
    // Update-as-create also needs the right to create (decided in the write transaction); a
    // patient-context token only updates what exists and is already in its compartment.
    let may_create = authorize(p, t, Permission::Create).is_ok_and(|d| d.unrestricted);
    check_body(state, t, body)?;
    match body.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(_) => {
            return Err(ApiError::BadRequest(vec![Issue::error(
                IssueType::Invalid,
                "the id in the body does not match the id in the URL",
            )
            .at(format!("{t}.id"))]))
        }
        None => {
            return Err(ApiError::BadRequest(vec![Issue::error(
                IssueType::Required,
                "an update must carry the resource id",
            )
            .at(format!("{t}.id"))]))
        }
    }
    // The new content must stay inside the compartment, and so must the old one (checked
    // against the stored version, see `check_against_stored`).
    if !decision.unrestricted && !as_value(body, |v| decision.admits(&state.compartment, t, id, Some(v))) {
        return Err(ApiError::Forbidden);
    }
    Ok((decision, may_create))
}

/// Whether an update must be compared with the stored version before it is written.
pub(super) fn update_needs_stored(state: &AppState, p: &Principal, decision: &Decision, t: &str) -> bool {
    !decision.unrestricted || state.attributes.needs_old_content(p, t)
}

/// Checks an update against the stored version `found` (as this token may see it): the
/// attribute rules compare old and new, and the write is pinned to that version (returned as
/// the expected version). When nothing is stored an unrestricted token that may create only
/// creates (`Ok((None, true))`), so a version written meanwhile is never overwritten unchecked.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_against_stored(
    state: &AppState,
    p: &Principal,
    decision: &Decision,
    t: &str,
    id: &str,
    body: &mut Map<String, Value>,
    expected: Option<i64>,
    may_create: bool,
    found: Result<StoredVersion, ApiError>,
) -> Result<(Option<i64>, bool), ApiError> {
    let (expected, create_only, old) = match admitted(state, p, decision, t, id, found) {
        Ok((version, content)) => (expected.or(Some(version)), false, content),
        Err(ApiError::NotFound(_)) if decision.unrestricted && may_create && expected.is_none() => (None, true, None),
        Err(e) => return Err(e),
    };
    as_value(body, |v| state.attributes.check_write(p, t, old.as_ref(), v))?;
    Ok((expected, create_only))
}

/// Builds a read/write response with ETag, Last-Modified and the body the client prefers.
#[allow(clippy::too_many_arguments)]
fn resource_response(
    status: StatusCode,
    fmt: Format,
    prefer: Prefer,
    version_id: i64,
    last_updated: &NaiveDateTime,
    location: Option<String>,
    json: Vec<u8>,
    warnings: Vec<Issue>,
) -> HttpResponse {
    let mut b = HttpResponse::build(status);
    b.insert_header((header::ETAG, etag(version_id)))
        .insert_header((header::LAST_MODIFIED, http_date(last_updated)));
    if let Some(loc) = location {
        if status == StatusCode::CREATED {
            b.insert_header((header::LOCATION, loc.clone()));
        }
        b.insert_header((header::CONTENT_LOCATION, loc));
    }
    match prefer {
        Prefer::Minimal => b.finish(),
        Prefer::Representation => b.content_type(fmt.content_type()).body(fmt.render_stored(json)),
        Prefer::OperationOutcome => {
            let text = if status == StatusCode::CREATED { "created" } else { "ok" };
            let mut outcome = OperationOutcome::information(text);
            outcome.issue.extend(warnings);
            b.content_type(fmt.content_type()).body(fmt.render(&outcome))
        }
    }
}

fn version_location(base: &str, t: &str, id: &str, v: i64) -> String {
    format!("{base}/{t}/{id}/_history/{v}")
}

pub(super) fn content_for(
    state: &AppState,
    resource_type: &str,
    body: &mut Map<String, Value>,
    id: &str,
    version: i64,
    ts: NaiveDateTime,
) -> Content {
    let json = resource::stamp(body, id, version, &ts);
    let (compartments, search) = as_value(body, |v| {
        (
            state.compartment.patients_of(resource_type, v).into_iter().collect(),
            crate::search::index_rows(&state.search.current(), state.store.cipher(), resource_type, v),
        )
    });
    Content {
        json,
        compartments,
        search,
    }
}

pub async fn create(
    req: HttpRequest,
    p: Arc<Principal>,
    resource_type: String,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&p, &resource_type, Permission::Create)?;
    let fmt = Format::negotiate(&req)?;
    let prefer = Prefer::from_request(&req);
    let (mut body, dropped) = read_write_body(&req, payload, &state, &resource_type).await?;
    let decision = check_create(&state, &p, &resource_type, &mut body)?;
    let condition = match req.headers().get("if-none-exist") {
        // a conditional create is a search, and may answer with the match: it needs both
        Some(v) => Some(parse_condition(
            &state,
            &p,
            &resource_type,
            v.to_str()
                .map_err(|_| ApiError::bad_request(IssueType::Invalid, "If-None-Exist is not valid text"))?,
        )?),
        None => None,
    };
    // The server assigns the id of a created resource; any id sent is ignored (FHIR 3.1.0.7).
    let id = uuid::Uuid::new_v4().to_string();
    let st = state.clone();
    let t = resource_type.clone();
    let access = decision.access();
    let trail = Trail::of(&req)?;
    let mut tx = trail.for_write(&state);
    let (outcome, tx) = blocking(move || {
        st.store
            .create(
                &access,
                &t,
                &id,
                CreateMethod::Post,
                condition.as_ref(),
                |v, ts| content_for(&st, &t, &mut body, &id, v, ts),
                &mut tx,
            )
            .map(|o| (o, tx))
            .map_err(ApiError::from)
    })
    .await?;
    trail.committed(&state, tx);
    let base = state.base_url(&req);
    Ok(match outcome {
        CreateOutcome::Created(Written {
            version_id,
            last_updated,
            json,
            ..
        }) => {
            let id = logical_id_of(&json);
            let loc = version_location(&base, &resource_type, &id, version_id);
            resource_response(
                StatusCode::CREATED,
                fmt,
                prefer,
                version_id,
                &last_updated,
                Some(loc),
                json,
                dropped,
            )
        }
        CreateOutcome::Existing(existing) => {
            let loc = version_location(&base, &resource_type, &existing.logical_id, existing.version_id);
            let json = existing.content.unwrap_or_default();
            resource_response(
                StatusCode::OK,
                fmt,
                prefer,
                existing.version_id,
                &existing.last_updated,
                Some(loc),
                json,
                Vec::new(),
            )
        }
    })
}

/// The errors of an update (plain or conditional) that mean something particular there.
pub(super) fn update_error(e: StoreError) -> ApiError {
    match e {
        StoreError::VersionConflict { current: None } => ApiError::PreconditionFailed(
            IssueType::Conflict,
            "If-Match was given for a resource that does not exist",
        ),
        other => ApiError::from(other),
    }
}

/// 201 with the new resource when the update created it, 200 otherwise.
#[allow(clippy::too_many_arguments)]
fn update_response(
    req: &HttpRequest,
    state: &AppState,
    t: &str,
    id: &str,
    fmt: Format,
    prefer: Prefer,
    written: Written,
    warnings: Vec<Issue>,
) -> HttpResponse {
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let loc = version_location(&state.base_url(req), t, id, written.version_id);
    resource_response(
        status,
        fmt,
        prefer,
        written.version_id,
        &written.last_updated,
        Some(loc),
        written.json,
        warnings,
    )
}

pub(super) fn logical_id_of(json: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    serde_json::from_slice::<IdOnly>(json).map(|i| i.id).unwrap_or_default()
}

pub async fn read(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    id: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Read)?;
    let fmt = Format::negotiate(&req)?;
    // A read by id is one indexed query: with a connection idle it runs right here, since
    // handing it to the blocking pool costs thread switches that cost more than the query.
    // The server runs several workers per core (`workers`) so that one waiting on PostgreSQL
    // does not idle the CPU. Without an idle connection it waits on a blocking thread instead.
    let access = decision.access();
    let found = match state.store.read_if_idle(&access, &t, &id) {
        Some(result) => result.map_err(ApiError::from),
        None => {
            let st = state.clone();
            let (tt, iid) = (t.clone(), id.clone());
            blocking(move || st.store.read(&access, &tt, &iid).map_err(ApiError::from)).await
        }
    };
    let (found, _) = visible(&state, &p, &decision, &t, &id, found, false)?;
    Trail::of(&req)?.touched(format!("{t}/{id}/_history/{}", found.version_id), &found.patients);
    respond_read(&req, fmt, found)
}

pub async fn vread(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    id: String,
    vid: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Read)?;
    let fmt = Format::negotiate(&req)?;
    let vid: i64 = match vid.parse() {
        Ok(v) if v > 0 => v,
        _ => return Err(ApiError::NotFound("resource version not found")),
    };
    let st = state.clone();
    let (tt, iid) = (t.clone(), id.clone());
    let access = decision.access();
    let found = blocking(move || st.store.vread(&access, &tt, &iid, vid).map_err(ApiError::from)).await;
    let (found, _) = visible(&state, &p, &decision, &t, &id, found, false)?;
    Trail::of(&req)?.touched(format!("{t}/{id}/_history/{}", found.version_id), &found.patients);
    respond_read(&req, fmt, found)
}

/// What storage returned, as this token may see it: outside its rights (compartment or
/// labels) a resource answers exactly as an absent one (404), and so does a deletion it cannot
/// see; hidden elements are masked for readers (`keep_stored` hands a writer the stored content
/// instead). The stored JSON is parsed once, and only when a restriction or the attribute
/// policy concerns the resource.
pub(super) fn visible(
    state: &AppState,
    p: &Principal,
    decision: &Decision,
    t: &str,
    id: &str,
    found: Result<StoredVersion, ApiError>,
    keep_stored: bool,
) -> Result<(StoredVersion, Option<Value>), ApiError> {
    const ABSENT: ApiError = ApiError::NotFound("resource not found");
    let mut v = match found {
        Ok(v) => v,
        Err(gone @ ApiError::Gone { .. }) if decision.admits(&state.compartment, t, id, None) => return Err(gone),
        Err(ApiError::Gone { .. }) => return Err(ABSENT),
        Err(other) => return Err(other),
    };
    if decision.unrestricted && !state.attributes.concerns(t) {
        return Ok((v, None));
    }
    let Some(json) = v.content.as_deref() else {
        return Ok((v, None));
    };
    let mut value: Value = serde_json::from_slice(json).map_err(|_| ApiError::Internal)?;
    if !decision.admits(&state.compartment, t, id, Some(&value)) || !state.attributes.labels_allow(p, &value) {
        return Err(ABSENT);
    }
    // a writer needs the stored content as it is; a reader gets it masked
    if keep_stored {
        return Ok((v, Some(value)));
    }
    if state.attributes.mask(p, t, &mut value) {
        v.content = Some(serde_json::to_vec(&value).map_err(|_| ApiError::Internal)?);
    }
    Ok((v, None))
}

/// The current version, read for a write that must be checked against it.
async fn stored(
    state: &web::Data<AppState>,
    decision: &Decision,
    t: &str,
    id: &str,
) -> Result<StoredVersion, ApiError> {
    let st = state.clone();
    let (tt, iid) = (t.to_string(), id.to_string());
    let access = decision.access();
    blocking(move || st.store.read(&access, &tt, &iid).map_err(ApiError::from)).await
}

/// For a write that must be checked against the stored version `found`: that version and its
/// content, or the same 404 an absent resource gets.
pub(super) fn admitted(
    state: &AppState,
    p: &Principal,
    decision: &Decision,
    t: &str,
    id: &str,
    found: Result<StoredVersion, ApiError>,
) -> Result<(i64, Option<Value>), ApiError> {
    match visible(state, p, decision, t, id, found, true) {
        Ok((v, content)) => {
            let content = match content {
                Some(c) => Some(c),
                None => v
                    .content
                    .as_deref()
                    .map(serde_json::from_slice)
                    .transpose()
                    .map_err(|_| ApiError::Internal)?,
            };
            Ok((v.version_id, content))
        }
        Err(ApiError::Gone { .. }) => Err(ApiError::NotFound("resource not found")),
        Err(e) => Err(e),
    }
}

/// Answers a read, honouring `If-None-Match` and `If-Modified-Since` (304).
fn respond_read(req: &HttpRequest, fmt: Format, found: StoredVersion) -> Result<HttpResponse, ApiError> {
    let not_modified = if let Some(inm) = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        inm.split(',')
            .any(|t| t.trim() == "*" || parse_etag(t) == Some(found.version_id))
    } else if let Some(ims) = req
        .headers()
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    {
        match httpdate::parse_http_date(ims) {
            Ok(since) => {
                let since = since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                found.last_updated.and_utc().timestamp() <= since
            }
            Err(_) => false,
        }
    } else {
        false
    };
    if not_modified {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, etag(found.version_id)))
            .insert_header((header::LAST_MODIFIED, http_date(&found.last_updated)))
            .finish());
    }
    let json = found.content.ok_or(ApiError::Internal)?;
    if req.method() == actix_web::http::Method::HEAD {
        return Ok(HttpResponse::Ok()
            .insert_header((header::ETAG, etag(found.version_id)))
            .insert_header((header::LAST_MODIFIED, http_date(&found.last_updated)))
            .content_type(fmt.content_type())
            .finish());
    }
    Ok(resource_response(
        StatusCode::OK,
        fmt,
        Prefer::Representation,
        found.version_id,
        &found.last_updated,
        None,
        json,
        Vec::new(),
    ))
}

pub async fn update(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    id: String,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&p, &t, Permission::Update)?;
    let fmt = Format::negotiate(&req)?;
    let prefer = Prefer::from_request(&req);
    let mut expected = if_match(req.headers())?;
    let (mut body, dropped) = read_write_body(&req, payload, &state, &t).await?;
    let (decision, may_create) = check_update(&state, &p, &t, &id, &mut body)?;
    // Set when the write was checked against "no stored version": it may then only create.
    let mut create_only = false;
    if update_needs_stored(&state, &p, &decision, &t) {
        let found = stored(&state, &decision, &t, &id).await;
        (expected, create_only) =
            check_against_stored(&state, &p, &decision, &t, &id, &mut body, expected, may_create, found)?;
    }
    let st = state.clone();
    let (tt, iid) = (t.clone(), id.clone());
    let access = decision.access();
    let trail = Trail::of(&req)?;
    let mut tx = trail.for_write(&state);
    let (written, tx) = blocking(move || {
        if create_only {
            return match st.store.create(
                &access,
                &tt,
                &iid,
                CreateMethod::Put,
                None,
                |v, ts| content_for(&st, &tt, &mut body, &iid, v, ts),
                &mut tx,
            ) {
                Ok(CreateOutcome::Created(w)) => Ok((w, tx)),
                Ok(CreateOutcome::Existing(_)) => Err(ApiError::Internal),
                Err(e) if e.is_unique_violation() => Err(ApiError::PreconditionFailed(
                    IssueType::Conflict,
                    "the resource was created concurrently; read it and retry",
                )),
                Err(e) => Err(ApiError::from(e)),
            };
        }
        st.store
            .update(
                &access,
                &tt,
                &iid,
                expected,
                may_create,
                |v, ts| {
                    let mut b = body.clone();
                    content_for(&st, &tt, &mut b, &iid, v, ts)
                },
                &mut tx,
            )
            .map(|w| (w, tx))
            .map_err(|e| match e {
                StoreError::CreateNotAllowed => ApiError::Forbidden,
                other => update_error(other),
            })
    })
    .await?;
    trail.committed(&state, tx);
    Ok(update_response(&req, &state, &t, &id, fmt, prefer, written, dropped))
}

pub async fn delete(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    id: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Delete)?;
    let fmt = Format::negotiate(&req)?;
    let mut expected = if_match(req.headers())?;
    if !decision.unrestricted || state.attributes.label_rules_bind(&p) {
        let found = stored(&state, &decision, &t, &id).await;
        expected = expected.or(Some(admitted(&state, &p, &decision, &t, &id, found)?.0));
    }
    let st = state.clone();
    let access = decision.access();
    let trail = Trail::of(&req)?;
    let mut tx = trail.for_write(&state);
    let (outcome, tx) = blocking(move || {
        st.store
            .delete(&access, &t, &id, expected, &mut tx)
            .map(|o| (o, tx))
            .map_err(ApiError::from)
    })
    .await?;
    trail.committed(&state, tx);
    Ok(delete_response(
        fmt,
        outcome,
        "nothing to delete: the resource does not exist or is already deleted",
    ))
}

/// Like HAPI: 200 with an OperationOutcome; deleting what is absent or already deleted succeeds
/// too (`nothing`: the text saying so).
pub(super) fn delete_response(fmt: Format, outcome: DeleteOutcome, nothing: &str) -> HttpResponse {
    let mut b = HttpResponse::Ok();
    let text = match outcome {
        DeleteOutcome::Deleted { version_id } => {
            b.insert_header((header::ETAG, etag(version_id)));
            "resource deleted"
        }
        DeleteOutcome::NothingToDelete => nothing,
    };
    b.content_type(fmt.content_type())
        .body(fmt.render(&OperationOutcome::information(text)))
}

/// The checks of a conditional update (`PUT [type]?query`) before its body: it may update or
/// create whatever the condition finds, so only tokens without compartment or element limits.
/// Returns the parsed condition (the write runs with `Access::All`).
pub(super) fn check_conditional_update(
    state: &AppState,
    p: &Principal,
    t: &str,
    query: &str,
) -> Result<Condition, ApiError> {
    for needed in [Permission::Update, Permission::Create] {
        if !authorize(p, t, needed)?.unrestricted {
            return Err(ApiError::Forbidden);
        }
    }
    // element and label rules compare with the stored version, which is known only in the
    // write: a token they bind uses conditional read and a plain update instead
    if state.attributes.needs_old_content(p, t) || state.attributes.label_rules_bind(p) {
        return Err(ApiError::Forbidden);
    }
    parse_condition(state, p, t, query)
}

/// The body of a conditional update: checked, and its id (if any) returned.
pub(super) fn check_conditional_body(
    state: &AppState,
    p: &Principal,
    t: &str,
    body: &mut Map<String, Value>,
) -> Result<Option<String>, ApiError> {
    check_body(state, t, body)?;
    let body_id = body.get("id").and_then(Value::as_str).map(str::to_string);
    as_value(body, |v| state.attributes.check_write(p, t, None, v))?;
    Ok(body_id)
}

/// The checks of a conditional delete (`DELETE [type]?query`): only tokens without compartment
/// or label limits. Returns the parsed condition (the write runs with `Access::All`).
pub(super) fn check_conditional_delete(
    state: &AppState,
    p: &Principal,
    t: &str,
    query: &str,
) -> Result<Condition, ApiError> {
    let decision = authorize(p, t, Permission::Delete)?;
    if !decision.unrestricted || state.attributes.label_rules_bind(p) {
        return Err(ApiError::Forbidden);
    }
    parse_condition(state, p, t, query)
}

/// The conditional update's errors that mean something particular there.
pub(super) fn conditional_update_error(e: StoreError) -> ApiError {
    match e {
        StoreError::ConditionIdMismatch => ApiError::bad_request(
            IssueType::Invalid,
            "the id in the body is not that of the resource the condition matched",
        ),
        other => update_error(other),
    }
}

/// A patch's own errors: a malformed patch is the client's bad request (400), one that does not
/// apply to the resource cannot be processed (422).
pub(super) fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::Invalid(text) => ApiError::bad_request(IssueType::Invalid, text),
        PatchError::NotApplicable(text) => ApiError::Unprocessable(vec![Issue::error(IssueType::Processing, text)]),
    }
}

/// `PATCH [type]/[id]` with a JSON Patch (`application/json-patch+json`) or a FHIRPath Patch
/// (a Parameters resource). Applied to the current version inside the write's transaction,
/// then checked like an update of that version.
pub async fn patch(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    id: String,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Update)?;
    let fmt = Format::negotiate(&req)?;
    let prefer = Prefer::from_request(&req);
    let expected = if_match(req.headers())?;
    let (media_type, doc) = super::negotiate::read_json_body(&req, payload, state.config.max_body_bytes, true).await?;
    let patch = if media_type == crate::fhir::patch::JSON_PATCH {
        Patch::json(doc)
    } else {
        match &doc {
            Value::Object(m) => Patch::fhirpath(m),
            _ => Err(PatchError::Invalid("a FHIRPath Patch is a Parameters resource")),
        }
    }
    .map_err(patch_error)?;
    let st = state.clone();
    let (tt, iid) = (t.clone(), id.clone());
    let trail = Trail::of(&req)?;
    let mut tx = trail.for_write(&state);
    let pp = p.clone();
    let (written, tx) = blocking(move || {
        st.store
            .transaction(&decision.access(), |stx| {
                patch_in_tx(&st, &pp, stx, &tt, &iid, &patch, expected, &mut tx)
            })
            .map(|w| (w, tx))
    })
    .await?;
    trail.committed(&state, tx);
    Ok(update_response(&req, &state, &t, &id, fmt, prefer, written, Vec::new()))
}

/// Applies `patch` to the current version of `t/id` and writes the result as the next
/// version, in the open transaction: the token must be able to see and update the resource,
/// the result must be valid (422 if not) and is checked as an update of the version patched.
#[allow(clippy::too_many_arguments)]
pub(super) fn patch_in_tx(
    state: &AppState,
    p: &Principal,
    tx: &mut store::StoreTx<'_>,
    t: &str,
    id: &str,
    patch: &Patch,
    if_match: Option<i64>,
    audit: &mut dyn store::WriteAudit,
) -> Result<Written, ApiError> {
    let decision = authorize(p, t, Permission::Update)?;
    tx.set_access(&decision.access())?;
    let found = tx.read(t, id).map_err(ApiError::from);
    let (version, old) = admitted(state, p, &decision, t, id, found)?;
    if if_match.is_some_and(|m| m != version) {
        return Err(ApiError::from(StoreError::VersionConflict { current: Some(version) }));
    }
    let old = old.ok_or(ApiError::Internal)?;
    let mut doc = old.clone();
    patch.apply(&mut doc, &state.validator).map_err(patch_error)?;
    let Value::Object(mut body) = doc else {
        return Err(patch_error(PatchError::NotApplicable(
            "the patch did not leave a resource",
        )));
    };
    // the result is checked like any update of this resource; an invalid one is unprocessable
    let (decision, _) = check_update(state, p, t, id, &mut body).map_err(|e| match e {
        ApiError::BadRequest(issues) => ApiError::Unprocessable(issues),
        other => other,
    })?;
    as_value(&mut body, |v| state.attributes.check_write(p, t, Some(&old), v))?;
    tx.set_access(&decision.access())?;
    tx.update(
        t,
        id,
        Some(version),
        false,
        &|v, ts| {
            let mut b = body.clone();
            content_for(state, t, &mut b, id, v, ts)
        },
        audit,
    )
    .map_err(update_error)
}

/// `PUT [type]?…`: updates the one match, creates when there is none, refuses several (412).
pub async fn conditional_update(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let cond = check_conditional_update(&state, &p, &t, req.query_string())?;
    let fmt = Format::negotiate(&req)?;
    let prefer = Prefer::from_request(&req);
    let expected = if_match(req.headers())?;
    let (mut body, dropped) = read_write_body(&req, payload, &state, &t).await?;
    let body_id = check_conditional_body(&state, &p, &t, &mut body)?;
    let new_id = uuid::Uuid::new_v4().to_string();
    let st = state.clone();
    let tt = t.clone();
    let access = store::Access::All;
    let trail = Trail::of(&req)?;
    let mut tx = trail.for_write(&state);
    let ((id, written), tx) = blocking(move || {
        st.store
            .conditional_update(
                &access,
                &tt,
                &cond,
                body_id.as_deref(),
                &new_id,
                expected,
                |id, v, ts| {
                    let mut b = body.clone();
                    content_for(&st, &tt, &mut b, id, v, ts)
                },
                &mut tx,
            )
            .map(|w| (w, tx))
            .map_err(conditional_update_error)
    })
    .await?;
    trail.committed(&state, tx);
    Ok(update_response(&req, &state, &t, &id, fmt, prefer, written, dropped))
}

/// `DELETE [type]?…`: deletes the one match; none is nothing to delete; several are refused (412).
pub async fn conditional_delete(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let cond = check_conditional_delete(&state, &p, &t, req.query_string())?;
    let fmt = Format::negotiate(&req)?;
    let st = state.clone();
    let access = store::Access::All;
    let trail = Trail::of(&req)?;
    let mut tx = trail.for_write(&state);
    let (outcome, tx) = blocking(move || {
        st.store
            .conditional_delete(&access, &t, &cond, &mut tx)
            .map(|o| (o, tx))
            .map_err(ApiError::from)
    })
    .await?;
    trail.committed(&state, tx);
    Ok(delete_response(
        fmt,
        outcome,
        "nothing to delete: no resource matched the condition",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_parse() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag("3"), None);
        assert_eq!(parse_etag("W/\"x\""), None);
    }
}
