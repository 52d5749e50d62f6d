//! Bulk Data `$export` (HL7 Bulk Data Access 2.0): kick-off, status polling, cancel, file
//! download. The jobs themselves run in `bulk`; these handlers check, record and answer.

use super::trail::Trail;
use super::{blocking, ApiError, AppState};
use crate::auth::policy::authorize;
use crate::auth::{Permission, Principal};
use crate::bulk::{owner_of, ExportError, JobPrincipal, JobRequest};
use crate::fhir::{Issue, IssueType, OperationOutcome};
use crate::store::export::{ExportJob, JobStatus};
use crate::store::Access;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use std::sync::Arc;

/// The name of a job's error file (what lenient handling left out) in its download URL.
const ERRORS_FILE: &str = "errors";

/// The level an export runs at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    System,
    Patient,
    Group(String),
}

/// The NDJSON media types `_outputFormat` may name (the spec's abbreviations included, and
/// `application/fhir ndjson`: the `+` of an unencoded query string decodes to a space).
const OUTPUT_FORMATS: [&str; 4] = [
    "application/fhir+ndjson",
    "application/fhir ndjson",
    "application/ndjson",
    "ndjson",
];

impl From<ExportError> for ApiError {
    fn from(e: ExportError) -> ApiError {
        match e {
            ExportError::Store(e) => e.into(),
            other => {
                tracing::error!(error = %other, "export");
                ApiError::Internal
            }
        }
    }
}

fn bad(code: IssueType, text: &'static str, at: &'static str) -> ApiError {
    ApiError::BadRequest(vec![Issue::error(code, text).at(at)])
}

/// `_typeFilter` values: each is one or more `Type?query`, comma-separated (a comma inside a
/// query, between alternatives of a parameter, is kept: a new filter starts only where a
/// resource type and `?` follow the comma).
fn split_type_filters(value: &str, is_type: impl Fn(&str) -> bool) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let rest = &value[i + 1..];
        if rest.split_once('?').is_some_and(|(t, _)| is_type(t)) {
            out.push(&value[start..i]);
            start = i + 1;
        }
    }
    out.push(&value[start..]);
    out
}

/// Whether the request's `Accept` takes `application/fhir+json` (a wildcard does).
fn accepts_fhir_json(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(actix_web::http::header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|m| m.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .any(|m| matches!(m.as_str(), "application/fhir+json" | "application/*" | "*/*"))
}

/// A kick-off is a GET (parameters in the query) or a POST (a Parameters resource).
pub fn kick_off_method(method: &actix_web::http::Method) -> bool {
    *method == actix_web::http::Method::GET || *method == actix_web::http::Method::POST
}

/// The parameters of a POST kick-off's Parameters resource, as the query pairs a GET would
/// send (`patient` references as `patient` pairs): each value is the parameter's one `value[x]`
/// of the type Bulk Data gives it. A parameter without one is kept with an empty value, which
/// the checks refuse (or, lenient, report).
fn parameters_as_pairs(body: &serde_json::Value) -> Result<Vec<(String, String)>, ApiError> {
    if body.get("resourceType").and_then(|t| t.as_str()) != Some("Parameters") {
        return Err(bad(
            IssueType::Invalid,
            "a POST kick-off's body is a Parameters resource",
            "Parameters",
        ));
    }
    let mut pairs = Vec::new();
    for param in body.get("parameter").and_then(|p| p.as_array()).into_iter().flatten() {
        let Some(name) = param.get("name").and_then(|n| n.as_str()) else {
            return Err(bad(
                IssueType::Invalid,
                "a parameter without a name",
                "Parameters.parameter",
            ));
        };
        let value = if name == "patient" {
            param.pointer("/valueReference/reference").and_then(|r| r.as_str())
        } else {
            ["valueString", "valueInstant", "valueCode", "valueDateTime", "valueUri"]
                .iter()
                .find_map(|k| param.get(*k).and_then(|v| v.as_str()))
        };
        pairs.push((name.to_string(), value.unwrap_or("").to_string()));
    }
    Ok(pairs)
}

/// `GET` or `POST [base]/$export`, `[base]/Patient/$export`, `[base]/Group/[id]/$export`.
pub async fn kick_off(
    req: HttpRequest,
    p: Arc<Principal>,
    level: Level,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let prefers = |what: &str| super::negotiate::prefers(&req, what);
    let respond_async = prefers("respond-async");
    if !respond_async {
        return Err(bad(
            IssueType::Required,
            "a Bulk Data export runs asynchronously: send Prefer: respond-async",
            "Prefer",
        ));
    }
    // Bulk Data: the kick-off names the format of the OperationOutcomes it may be answered
    // with; only FHIR JSON is offered
    if !accepts_fhir_json(&req) {
        return Err(bad(
            IssueType::Required,
            "a Bulk Data kick-off needs Accept: application/fhir+json",
            "Accept",
        ));
    }
    let mut pairs = super::negotiate::query_pairs(&req);
    if req.method() == actix_web::http::Method::POST {
        let (_, body) = super::negotiate::read_json_body(&req, payload, state.config.max_body_bytes, false).await?;
        pairs.extend(parameters_as_pairs(&body)?);
    }
    let trail = Trail::of(&req)?;
    // the query as received, sealed in the audit event (a `_typeFilter` may carry PHI)
    trail.query(
        &form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter())
            .finish(),
    );
    // Bulk Data: an unsupported parameter is an error unless the client asks for leniency
    let strict = !prefers("handling=lenient");
    let is_type = |t: &str| state.resource_types.contains(t);
    let mut listed: Vec<String> = Vec::new();
    let mut since = None;
    let mut filters: Vec<(String, String)> = Vec::new();
    // `patient`: only these patients' compartments (Patient and Group level)
    let mut only_patients: Vec<String> = Vec::new();
    let mut elements: Vec<String> = Vec::new();
    // lenient handling: what was left out, by name (reported in the manifest's error file)
    let mut ignored: Vec<String> = Vec::new();
    // `includeAssociatedData`: the broader of the values given
    let mut associated: Option<crate::bulk::Associated> = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "_elements" => {
                for e in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    let (t, name) = e.split_once('.').map_or((None, e), |(t, n)| (Some(t), n));
                    let valid_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric());
                    if !valid_name || t.is_some_and(|t| !is_type(t)) {
                        return Err(bad(
                            IssueType::Invalid,
                            "_elements takes [type.]element names",
                            "_elements",
                        ));
                    }
                    elements.push(e.to_string());
                }
            }
            // Provenance of the exported resources (the latest of each, or all); a custom value
            // this server does not define is refused, or left out when lenient
            "includeAssociatedData" => {
                for value in v.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    match crate::bulk::Associated::parse(value) {
                        Some(a) => associated = associated.max(Some(a)),
                        None if strict => {
                            return Err(bad(
                                IssueType::NotSupported,
                                "includeAssociatedData takes LatestProvenanceResources or RelevantProvenanceResources",
                                "includeAssociatedData",
                            ))
                        }
                        None => ignored.push("includeAssociatedData: a value this server does not define".into()),
                    }
                }
            }
            "patient" if level == Level::System => {
                return Err(bad(
                    IssueType::NotSupported,
                    "patient applies to Patient and Group level exports only",
                    "patient",
                ))
            }
            "patient" => {
                for reference in v.split(',').map(str::trim) {
                    let id = reference
                        .rsplit_once("Patient/")
                        .map(|(_, id)| id)
                        .filter(|id| crate::fhir::resource::is_valid_id(id))
                        .ok_or_else(|| bad(IssueType::Invalid, "patient takes Patient/[id] references", "patient"))?;
                    only_patients.push(id.to_string());
                }
            }
            "_outputFormat" if !OUTPUT_FORMATS.contains(&v.as_str()) => {
                return Err(bad(
                    IssueType::NotSupported,
                    "_outputFormat: only application/fhir+ndjson is supported",
                    "_outputFormat",
                ))
            }
            "_outputFormat" | "_format" => {}
            "_type" => listed.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            ),
            "_since" => {
                let at = chrono::DateTime::parse_from_rfc3339(v).map_err(|_| {
                    bad(
                        IssueType::Invalid,
                        "_since must be an instant (with a time zone)",
                        "_since",
                    )
                })?;
                // Bulk Data: a `_since` after the kick-off's transaction time selects nothing that
                // could ever be right (a client's clock or typo): refused
                if at.to_utc() > chrono::Utc::now() {
                    return Err(bad(IssueType::Invalid, "_since must not be in the future", "_since"));
                }
                since = Some(at.to_utc().to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
            }
            "_typeFilter" => {
                for f in split_type_filters(v, is_type) {
                    let Some((t, q)) = f.split_once('?') else {
                        return Err(bad(
                            IssueType::Invalid,
                            "_typeFilter takes [type]?[search parameters]",
                            "_typeFilter",
                        ));
                    };
                    if !is_type(t) {
                        return Err(bad(
                            IssueType::NotSupported,
                            "_typeFilter names an unknown type",
                            "_typeFilter",
                        ));
                    }
                    let fp: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
                    if !strict
                        && crate::search::query::parse(&state.search.current(), state.store.cipher(), t, &fp, 1, true)
                            .is_err()
                    {
                        // lenient: a filter this server cannot apply is left out, by its type
                        ignored.push(format!("_typeFilter on {t}: not supported"));
                        continue;
                    }
                    filters.push((t.to_string(), q.to_string()));
                }
            }
            _ if strict => {
                return Err(bad(
                    IssueType::NotSupported,
                    "this server's $export takes _outputFormat, _since, _type, _typeFilter, _elements and patient",
                    "parameter",
                ))
            }
            other => {
                let name: String = other
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "_-".contains(*c))
                    .take(64)
                    .collect();
                ignored.push(format!("{name}: not supported"));
            }
        }
    }
    // what the level may export: every type, or those of the patient compartment
    let in_scope: Vec<String> = match &level {
        Level::System => {
            let mut all: Vec<String> = state.resource_types.iter().cloned().collect();
            all.sort();
            all
        }
        Level::Patient | Level::Group(_) => state.compartment.types(),
    };
    // Patient and Group level: `_type` may also name a shared type (Practitioner,
    // Organization, Medication, Location …: in no patient's compartment), which is exported as
    // a patient-context token reads it (the shared-resources rule): every resource of the type
    // that lies in no patient's compartment. Without `_type`, the compartment types alone.
    let shared: Vec<String> = match &level {
        Level::System => Vec::new(),
        Level::Patient | Level::Group(_) => listed
            .iter()
            .filter(|t| !in_scope.contains(t) && state.compartment.is_shared(t))
            .cloned()
            .collect(),
    };
    if listed
        .iter()
        .any(|t| (!in_scope.contains(t) && !shared.contains(t)) || t == "AuditEvent")
    {
        return Err(bad(
            IssueType::NotSupported,
            "_type names a type this export level does not cover",
            "_type",
        ));
    }
    // Bulk export is for backend services and users with unrestricted read (or read limited by
    // granular scopes, whose filters the job applies): a token limited to one patient's
    // compartment exports nothing (fail closed)
    let may_export = |t: &str| {
        [Permission::Read, Permission::Search]
            .into_iter()
            .all(|needed| authorize(&p, t, needed).is_ok_and(|d| d.reaches_every_patient()))
    };
    let types: Vec<String> = if listed.is_empty() {
        in_scope
            .into_iter()
            .filter(|t| t != "AuditEvent" && may_export(t))
            .collect()
    } else {
        if !listed.iter().all(|t| may_export(t)) {
            return Err(ApiError::Forbidden);
        }
        let mut l = listed;
        l.sort();
        l.dedup();
        l
    };
    if types.is_empty() {
        return Err(ApiError::Forbidden);
    }
    if filters.iter().any(|(t, _)| !types.contains(t)) {
        return Err(bad(
            IssueType::Invalid,
            "_typeFilter names a type the export does not include",
            "_typeFilter",
        ));
    }
    // every filter must parse as a search of its type (and what it reads must be the token's)
    for (t, q) in &filters {
        let fp: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
        let parsed = crate::search::query::parse(&state.search.current(), state.store.cipher(), t, &fp, 1, true)?;
        if parsed.types.iter().any(|other| !may_export(other)) {
            return Err(ApiError::Forbidden);
        }
    }
    // associated Provenance: read as the export's types are (every patient's); the
    // Provenance the export selects as a type of its own joins the associated ones in one pass
    // after the other types, so that none is written twice
    let mut types = types;
    let mut provenance_type = false;
    if associated.is_some() {
        if !may_export("Provenance") {
            if strict {
                return Err(ApiError::Forbidden);
            }
            ignored.push("includeAssociatedData: the token does not read Provenance".into());
            associated = None;
        } else if let Some(at) = types.iter().position(|t| t == "Provenance") {
            types.remove(at);
            provenance_type = true;
        }
    }
    only_patients.sort();
    only_patients.dedup();
    if !only_patients.is_empty() {
        // a patient this server does not hold is an error (Bulk Data: SHOULD), not a silent gap
        let st = state.clone();
        let ids = only_patients.clone();
        let found = blocking(move || {
            st.store
                .read_many(&Access::All, "Patient", &ids)
                .map_err(ApiError::from)
        })
        .await?;
        if found.iter().filter(|v| !v.deleted).count() != only_patients.len() {
            return Err(bad(
                IssueType::NotFound,
                "patient names a patient this server does not hold",
                "patient",
            ));
        }
    }
    let patients = match &level {
        Level::System => None,
        Level::Patient => Some(only_patients.clone()),
        Level::Group(id) => {
            let d = authorize(&p, "Group", Permission::Read)?;
            if !d.unrestricted {
                return Err(ApiError::Forbidden);
            }
            let st = state.clone();
            let gid = id.clone();
            let group = blocking(move || st.store.read(&Access::All, "Group", &gid).map_err(ApiError::from)).await?;
            let value: serde_json::Value =
                serde_json::from_slice(group.content.as_deref().unwrap_or(b"{}")).map_err(|_| ApiError::Internal)?;
            let members: Vec<String> = value["member"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["entity"]["reference"].as_str())
                .filter_map(|r| r.strip_prefix("Patient/"))
                .map(str::to_string)
                .collect();
            if only_patients.is_empty() && members.is_empty() {
                // a group without patient members exports no patient's data: an empty list
                // would mean every patient's compartment, so it names a patient nobody is
                // (an id is never empty)
                Some(vec![String::new()])
            } else if only_patients.is_empty() {
                Some(members)
            } else if only_patients.iter().all(|p| members.contains(p)) {
                Some(only_patients.clone())
            } else {
                return Err(bad(
                    IssueType::Invalid,
                    "patient names a patient who is not a member of the group",
                    "patient",
                ));
            }
        }
    };
    let job_id = uuid::Uuid::new_v4().simple().to_string();
    let request_url = format!(
        "{}{}",
        state.base_url(&req),
        req.uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("")
            .strip_prefix(state.config.base_path.as_str())
            .unwrap_or("")
    );
    let request = JobRequest {
        request_url,
        patients,
        types,
        since,
        type_filters: filters,
        principal: JobPrincipal::of(&p),
        elements,
        ignored,
        shared,
        associated,
        provenance_type,
    };
    let st = state.clone();
    let id = job_id.clone();
    let owner = owner_of(&p);
    blocking(move || {
        let sealed = st.exporter.seal_request(&id, &request)?;
        st.store
            .create_export_job(&id, &owner, &sealed, crate::store::now())
            .map_err(ApiError::from)
    })
    .await?;
    state.exporter.notify();
    let status_url = format!("{}/$export-status/{job_id}", state.base_url(&req));
    Ok(HttpResponse::Accepted()
        .insert_header(("Content-Location", status_url))
        .content_type(super::FHIR_JSON)
        .body(
            serde_json::to_vec(&OperationOutcome::information(
                "export accepted: poll the Content-Location URL for its progress and manifest",
            ))
            .map_err(|_| ApiError::Internal)?,
        ))
}

/// The job, if it is the caller's (anyone else's, or none, is a 404 alike).
async fn own_job(state: &web::Data<AppState>, p: &Principal, job: String) -> Result<ExportJob, ApiError> {
    if !job.bytes().all(|b| b.is_ascii_hexdigit()) || job.len() != 32 {
        return Err(ApiError::NotFound("no such export"));
    }
    let st = state.clone();
    let found = blocking(move || st.store.export_job(&job).map_err(ApiError::from)).await?;
    match found {
        Some(j) if j.owner == owner_of(p) => Ok(j),
        _ => Err(ApiError::NotFound("no such export")),
    }
}

/// `GET [base]/$export-status/[job]`: 202 with `X-Progress` while it runs, the manifest once
/// complete, an OperationOutcome if it failed.
pub async fn status(
    req: HttpRequest,
    p: Arc<Principal>,
    job: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &p, job).await?;
    match job.status {
        JobStatus::Accepted | JobStatus::Running => {
            let progress = match job.status {
                JobStatus::Accepted => "queued".to_string(),
                _ => format!("{} resources exported", job.resources_done),
            };
            Ok(HttpResponse::Accepted()
                .insert_header(("X-Progress", progress))
                .insert_header(("Retry-After", "2"))
                .finish())
        }
        JobStatus::Failed => {
            let text = job.error.unwrap_or_else(|| "the export failed".into());
            Ok(HttpResponse::build(StatusCode::INTERNAL_SERVER_ERROR)
                .content_type(super::FHIR_JSON)
                .body(
                    serde_json::to_vec(&OperationOutcome::single(Issue::error(IssueType::Exception, text)))
                        .map_err(|_| ApiError::Internal)?,
                ))
        }
        JobStatus::Completed => {
            let st = state.clone();
            let id = job.id.clone();
            let files = blocking(move || st.store.export_files(&id).map_err(ApiError::from)).await?;
            let st = state.clone();
            let j = job.clone();
            let request = blocking(move || st.exporter.open_request(&j).map_err(ApiError::from)).await?;
            let base = state.base_url(&req);
            let output: Vec<serde_json::Value> = files
                .iter()
                .map(|f| {
                    json!({
                        "type": f.resource_type,
                        "url": format!("{base}/$export-file/{}/{}", job.id, f.seq),
                        "count": f.resource_count,
                    })
                })
                .collect();
            // what lenient handling left out: one OperationOutcome file
            let errors: Vec<serde_json::Value> = if request.ignored.is_empty() {
                Vec::new()
            } else {
                vec![
                    json!({"type": "OperationOutcome", "url": format!("{base}/$export-file/{}/{ERRORS_FILE}", job.id)}),
                ]
            };
            let manifest = json!({
                "transactionTime": job.transaction_time.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "request": request.request_url,
                "requiresAccessToken": true,
                "output": output,
                "error": errors,
            });
            let mut res = HttpResponse::Ok();
            if let Some(exp) = job.expires_at {
                res.insert_header((
                    "Expires",
                    httpdate::fmt_http_date(std::time::SystemTime::from(exp.and_utc())),
                ));
            }
            Ok(res
                .content_type("application/json")
                .body(serde_json::to_vec(&manifest).map_err(|_| ApiError::Internal)?))
        }
    }
}

/// `DELETE [base]/$export-status/[job]`: cancels the job and deletes its files.
pub async fn cancel(
    _req: HttpRequest,
    p: Arc<Principal>,
    job: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &p, job).await?;
    let st = state.clone();
    blocking(move || st.exporter.delete_job(&job.id).map_err(ApiError::from)).await?;
    Ok(HttpResponse::Accepted()
        .content_type(super::FHIR_JSON)
        .body(serde_json::to_vec(&OperationOutcome::information("export cancelled")).map_err(|_| ApiError::Internal)?))
}

/// `GET [base]/$export-file/[job]/[n]`: one NDJSON file, decrypted as it is sent.
pub async fn file(
    _req: HttpRequest,
    p: Arc<Principal>,
    job: String,
    file: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &p, job).await?;
    if job.status != JobStatus::Completed {
        return Err(ApiError::NotFound("no such export file"));
    }
    if file == ERRORS_FILE {
        let st = state.clone();
        let j = job.clone();
        let request = blocking(move || st.exporter.open_request(&j).map_err(ApiError::from)).await?;
        if request.ignored.is_empty() {
            return Err(ApiError::NotFound("no such export file"));
        }
        let mut body = Vec::new();
        for what in &request.ignored {
            let outcome = OperationOutcome::single(Issue::warning(IssueType::NotSupported, format!("ignored: {what}")));
            serde_json::to_writer(&mut body, &outcome).map_err(|_| ApiError::Internal)?;
            body.push(b'\n');
        }
        return Ok(HttpResponse::Ok().content_type("application/fhir+ndjson").body(body));
    }
    let seq: i32 = file.parse().map_err(|_| ApiError::NotFound("no such export file"))?;
    let st = state.clone();
    let id = job.id.clone();
    let files = blocking(move || st.store.export_files(&id).map_err(ApiError::from)).await?;
    let Some(f) = files.iter().find(|f| f.seq == seq) else {
        return Err(ApiError::NotFound("no such export file"));
    };
    // the token downloading must still grant what the file holds
    if !authorize(&p, &f.resource_type, Permission::Read).is_ok_and(|d| d.reaches_every_patient()) {
        return Err(ApiError::Forbidden);
    }
    // Decrypt on a blocking thread, a chunk at a time, into a bounded channel the response
    // streams from: memory stays a few chunks whatever the file's size.
    let opened = state.exporter.open_file(&job.id, seq).map_err(ApiError::from)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(4);
    std::thread::spawn(move || {
        let result = opened.for_each_chunk(|chunk| tx.blocking_send(Ok(web::Bytes::from(chunk))).is_ok());
        if let Err(e) = result {
            tracing::error!(error = %e, "an export file could not be read");
            let _ = tx.blocking_send(Err(std::io::Error::other("export file unreadable")));
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(HttpResponse::Ok()
        .content_type("application/fhir+ndjson")
        .streaming(body))
}
