//! Parses a request under the FHIR base into one typed [`Interaction`] and dispatches it.
//!
//! Routing is a split on `/` and a match, not actix's pattern routes: those are regular
//! expressions tried one after another (and again for logging), which cost more than the
//! database read behind a `GET [type]/[id]`.

use super::trail::Trail;
use super::{audit, bundle, crud, export, history, metadata, search, subscriptions, validate, ApiError, AppState};
use crate::fhir::resource::is_valid_id;
use crate::fhir::{Issue, IssueType};
use actix_web::http::Method;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};

/// One FHIR interaction, with its path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    HistorySystem,
    HistoryType {
        resource_type: String,
    },
    HistoryInstance {
        resource_type: String,
        id: String,
    },
    Read {
        resource_type: String,
        id: String,
    },
    VRead {
        resource_type: String,
        id: String,
        version: String,
    },
    Create {
        resource_type: String,
    },
    Update {
        resource_type: String,
        id: String,
    },
    Delete {
        resource_type: String,
        id: String,
    },
    SearchType {
        resource_type: String,
    },
    /// `POST [type]/_search` with a form body: the same search, its values kept out of the URL.
    SearchPost {
        resource_type: String,
    },
    /// `PUT [type]?…`: update the one match, or create.
    ConditionalUpdate {
        resource_type: String,
    },
    /// `DELETE [type]?…`: delete the one match.
    ConditionalDelete {
        resource_type: String,
    },
    /// `GET /fhir?_type=…` (or `POST /fhir/_search`): a search across the types `_type` names.
    SearchSystem,
    /// `Patient/[id]/[type]`: a search of `resource_type` within that patient's compartment.
    SearchCompartment {
        patient: String,
        resource_type: String,
    },
    /// `PATCH [type]/[id]` with a JSON Patch or FHIRPath Patch.
    Patch {
        resource_type: String,
        id: String,
    },
    /// `POST [base]` with a batch or transaction Bundle.
    Bundle,
    /// `GET [base]/$export`: a system-level Bulk Data export (`Patient/$export` and
    /// `Group/[id]/$export` are operations of their type).
    BulkExport,
    /// `GET` (poll) or `DELETE` (cancel) `[base]/$export-status/[job]`.
    BulkStatus {
        job: String,
    },
    /// `GET [base]/$export-file/[job]/[n]`: one NDJSON file of a completed export.
    BulkFile {
        job: String,
        file: String,
    },
    /// `[type]/$name` or `[type]/[id]/$name`.
    Operation {
        resource_type: String,
        id: Option<String>,
        name: String,
    },
}

/// AuditEvent is written only by the server itself: the API reads and searches it.
const AUDIT_EVENT: &str = "AuditEvent";

impl Interaction {
    /// The interaction's name (FHIR's codes): what the logs record instead of the path.
    pub fn name(&self) -> &'static str {
        match self {
            Interaction::Capabilities => "capabilities",
            Interaction::HistorySystem => "history-system",
            Interaction::HistoryType { .. } => "history-type",
            Interaction::HistoryInstance { .. } => "history-instance",
            Interaction::Read { .. } => "read",
            Interaction::VRead { .. } => "vread",
            Interaction::Create { .. } => "create",
            Interaction::Update { .. } | Interaction::ConditionalUpdate { .. } => "update",
            Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => "delete",
            Interaction::SearchSystem => "search-system",
            Interaction::SearchType { .. } | Interaction::SearchCompartment { .. } | Interaction::SearchPost { .. } => {
                "search-type"
            }
            Interaction::Patch { .. } => "patch",
            Interaction::Bundle => "batch",
            Interaction::Operation { .. }
            | Interaction::BulkExport
            | Interaction::BulkStatus { .. }
            | Interaction::BulkFile { .. } => "operation",
        }
    }

    /// The AuditEvent action of the interaction.
    pub fn action(&self) -> crate::audit::Action {
        use crate::audit::Action;
        match self {
            Interaction::Create { .. } => Action::Create,
            Interaction::Update { .. } | Interaction::ConditionalUpdate { .. } | Interaction::Patch { .. } => {
                Action::Update
            }
            Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => Action::Delete,
            Interaction::Operation { .. } | Interaction::Bundle | Interaction::BulkExport => Action::Execute,
            _ => Action::Read,
        }
    }

    pub fn resource_type(&self) -> Option<&str> {
        match self {
            Interaction::Capabilities
            | Interaction::HistorySystem
            | Interaction::SearchSystem
            | Interaction::Bundle
            | Interaction::BulkExport
            | Interaction::BulkStatus { .. }
            | Interaction::BulkFile { .. } => None,
            Interaction::HistoryType { resource_type }
            | Interaction::HistoryInstance { resource_type, .. }
            | Interaction::Read { resource_type, .. }
            | Interaction::VRead { resource_type, .. }
            | Interaction::Create { resource_type }
            | Interaction::Update { resource_type, .. }
            | Interaction::Patch { resource_type, .. }
            | Interaction::Delete { resource_type, .. }
            | Interaction::ConditionalUpdate { resource_type }
            | Interaction::ConditionalDelete { resource_type }
            | Interaction::SearchType { resource_type }
            | Interaction::SearchCompartment { resource_type, .. }
            | Interaction::SearchPost { resource_type }
            | Interaction::Operation { resource_type, .. } => Some(resource_type),
        }
    }

    /// The resource the URL names, if it names one.
    pub fn reference(&self) -> Option<String> {
        match self {
            Interaction::HistoryInstance { resource_type, id }
            | Interaction::Read { resource_type, id }
            | Interaction::Update { resource_type, id }
            | Interaction::Patch { resource_type, id }
            | Interaction::Delete { resource_type, id }
            | Interaction::Operation {
                resource_type,
                id: Some(id),
                ..
            } => Some(format!("{resource_type}/{id}")),
            Interaction::VRead {
                resource_type,
                id,
                version,
            } => Some(format!("{resource_type}/{id}/_history/{version}")),
            _ => None,
        }
    }

    /// Maps a method and the path below the base (`Patient/1/_history`) to an interaction.
    /// A known path with another method is a 405; an unknown type or path a 404.
    pub fn parse(method: &Method, rest: &str, is_type: impl Fn(&str) -> bool) -> Result<Interaction, ApiError> {
        let segs: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let get = method == Method::GET || method == Method::HEAD;
        let known = |t: &str| -> Result<String, ApiError> {
            if is_type(t) {
                Ok(t.to_string())
            } else {
                Err(ApiError::NotFound("unknown resource type"))
            }
        };
        let only = |ok: bool, i: Interaction| if ok { Ok(i) } else { Err(ApiError::MethodNotAllowed) };
        match segs.as_slice() {
            [] if *method == Method::POST => Ok(Interaction::Bundle),
            [] => only(get, Interaction::SearchSystem),
            ["_search"] => only(*method == Method::POST, Interaction::SearchSystem),
            ["metadata"] => only(get, Interaction::Capabilities),
            ["_history"] => only(get, Interaction::HistorySystem),
            ["$export"] => only(get || *method == Method::POST, Interaction::BulkExport),
            ["$export-status", job] => only(
                get || *method == Method::DELETE,
                Interaction::BulkStatus { job: job.to_string() },
            ),
            ["$export-file", job, file] => only(
                get,
                Interaction::BulkFile {
                    job: job.to_string(),
                    file: file.to_string(),
                },
            ),
            [t] => {
                let resource_type = known(t)?;
                match *method {
                    Method::POST if resource_type != AUDIT_EVENT => Ok(Interaction::Create { resource_type }),
                    Method::PUT if resource_type != AUDIT_EVENT => Ok(Interaction::ConditionalUpdate { resource_type }),
                    Method::DELETE if resource_type != AUDIT_EVENT => {
                        Ok(Interaction::ConditionalDelete { resource_type })
                    }
                    Method::GET | Method::HEAD => Ok(Interaction::SearchType { resource_type }),
                    _ => Err(ApiError::MethodNotAllowed),
                }
            }
            [t, op] if op.starts_with('$') => Ok(Interaction::Operation {
                resource_type: known(t)?,
                id: None,
                name: op.to_string(),
            }),
            ["Patient", id, t] if is_type(t) && !t.starts_with('$') => only(
                get,
                Interaction::SearchCompartment {
                    patient: existing_id(id)?,
                    resource_type: t.to_string(),
                },
            ),
            [t, id, op] if op.starts_with('$') => Ok(Interaction::Operation {
                resource_type: known(t)?,
                id: Some(existing_id(id)?),
                name: op.to_string(),
            }),
            [t, rest @ ..] if *t == AUDIT_EVENT && !(get && matches!(rest, [id] if *id != "_history")) => {
                // no writes, no history: an AuditEvent has one version, written by the server
                known(t)?;
                Err(ApiError::MethodNotAllowed)
            }
            [t, "_search"] if *method == Method::POST => Ok(Interaction::SearchPost {
                resource_type: known(t)?,
            }),
            [t, "_history"] => only(
                get,
                Interaction::HistoryType {
                    resource_type: known(t)?,
                },
            ),
            [t, id] => {
                let resource_type = known(t)?;
                if *method == Method::PUT && !is_valid_id(id) {
                    // An update names the id it wants to create or replace: a bad one is the client's error.
                    return Err(ApiError::BadRequest(vec![Issue::error(
                        IssueType::Invalid,
                        "the id in the URL is not a valid FHIR id",
                    )
                    .at("id")]));
                }
                let id = existing_id(id)?;
                match *method {
                    Method::GET | Method::HEAD => Ok(Interaction::Read { resource_type, id }),
                    Method::PUT => Ok(Interaction::Update { resource_type, id }),
                    Method::DELETE => Ok(Interaction::Delete { resource_type, id }),
                    Method::PATCH => Ok(Interaction::Patch { resource_type, id }),
                    _ => Err(ApiError::MethodNotAllowed),
                }
            }
            [t, id, "_history"] => only(
                get,
                Interaction::HistoryInstance {
                    resource_type: known(t)?,
                    id: existing_id(id)?,
                },
            ),
            [t, id, "_history", v] => only(
                get,
                Interaction::VRead {
                    resource_type: known(t)?,
                    id: existing_id(id)?,
                    version: v.to_string(),
                },
            ),
            _ => Err(ApiError::NotFound("no such endpoint")),
        }
    }
}

/// An id that could name a stored resource; anything else cannot exist (404).
fn existing_id(id: &str) -> Result<String, ApiError> {
    if is_valid_id(id) {
        Ok(id.to_string())
    } else {
        Err(ApiError::NotFound("resource not found"))
    }
}

fn get_or_post(req: &HttpRequest) -> bool {
    matches!(*req.method(), Method::GET | Method::POST)
}

/// The one handler for everything under the FHIR base path. Every request but `metadata`
/// yields exactly one AuditEvent (a write's inside its own transaction), allowed or not.
pub async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let base = state.config.base_path.as_str();
    let rest = req.path().strip_prefix(base).unwrap_or("").trim_start_matches('/');
    let parsed = Interaction::parse(req.method(), rest, |t| state.resource_types.contains(t));
    let route = parsed.as_ref().map(Interaction::name).unwrap_or("unknown");
    if let Some(span) = req.extensions().get::<tracing_actix_web::RootSpan>() {
        span.record("route", route);
    }
    req.extensions_mut().insert(super::ops::RouteLabel(route));
    if matches!(parsed, Ok(Interaction::Capabilities)) {
        return metadata::capabilities(req, state).await;
    }
    let trail = Trail::start(&req, &state, parsed.as_ref().ok());
    // The request's own work is bounded; recording its outcome (below) is not cut short.
    let limit = std::time::Duration::from_secs(state.config.request_timeout_secs);
    let result = match actix_web::rt::time::timeout(limit, handle(req, payload, state.clone(), parsed, &trail)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("request timed out");
            Err(ApiError::Timeout)
        }
    };
    trail.finish(&state, result).await
}

async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    parsed: Result<Interaction, ApiError>,
    trail: &Trail,
) -> Result<HttpResponse, ApiError> {
    // Everything else acts on PHI: a valid token first, then each handler asks the policy.
    let p = state.authenticate(&req)?;
    trail.principal(&p);
    if let Some(limiter) = &state.request_limit {
        let key = crate::auth::limiter::FailureKey::Client(p.client_id.clone().unwrap_or_else(|| p.subject.clone()));
        if let Some(retry_after) = limiter.hit(key) {
            return Err(ApiError::TooManyRequests { retry_after });
        }
    }
    if let Some(span) = req.extensions().get::<tracing_actix_web::RootSpan>() {
        span.record("client", p.client_id.as_deref().unwrap_or(""));
        span.record("subject", p.subject.as_str());
    }
    let interaction = parsed?;
    if p.break_glass {
        // An alert on every break-glass request: who, which client, what kind of access; never
        // the reason (free text) nor the resource.
        tracing::warn!(
            alert = "break-glass",
            subject = %p.subject,
            client = %p.client_id.as_deref().unwrap_or(""),
            interaction = interaction.name(),
            "break-glass access"
        );
        if let Some(url) = &state.config.break_glass_webhook {
            crate::auth::alert::break_glass(url, &p, interaction.name());
        }
    }
    let name = interaction.name();
    let (req_for_log, p_for_log, st) = (req.clone(), p.clone(), state.clone());
    let is_audit = interaction.resource_type() == Some("AuditEvent");
    let result = match interaction {
        Interaction::Capabilities => unreachable!("answered by dispatch"),
        Interaction::HistorySystem => history::system_history(req, p, state).await,
        Interaction::HistoryType { resource_type } => history::type_history(req, p, resource_type, state).await,
        Interaction::HistoryInstance { resource_type, id } => {
            history::instance_history(req, p, resource_type, id, state).await
        }
        Interaction::Read { id, .. } if is_audit => audit::read(req, p, id, state).await,
        Interaction::Read { resource_type, id } => crud::read(req, p, resource_type, id, state).await,
        Interaction::VRead {
            resource_type,
            id,
            version,
        } => crud::vread(req, p, resource_type, id, version, state).await,
        Interaction::Create { resource_type } => crud::create(req, p, resource_type, payload, state).await,
        Interaction::Update { resource_type, id } => crud::update(req, p, resource_type, id, payload, state).await,
        Interaction::Delete { resource_type, id } => crud::delete(req, p, resource_type, id, state).await,
        Interaction::ConditionalUpdate { resource_type } => {
            crud::conditional_update(req, p, resource_type, payload, state).await
        }
        Interaction::ConditionalDelete { resource_type } => {
            crud::conditional_delete(req, p, resource_type, state).await
        }
        Interaction::SearchType { resource_type } => {
            let pairs = super::negotiate::query_pairs(&req);
            search::search(req, p, search::Target::Type(resource_type), pairs, state).await
        }
        Interaction::SearchPost { resource_type } => {
            let mut pairs = super::negotiate::query_pairs(&req);
            pairs.extend(super::negotiate::read_form_body(&req, payload, state.config.max_body_bytes).await?);
            search::search(req, p, search::Target::Type(resource_type), pairs, state).await
        }
        Interaction::SearchSystem => {
            let mut pairs = super::negotiate::query_pairs(&req);
            if req.method() == actix_web::http::Method::POST {
                pairs.extend(super::negotiate::read_form_body(&req, payload, state.config.max_body_bytes).await?);
            }
            search::search(req, p, search::Target::System, pairs, state).await
        }
        Interaction::SearchCompartment { patient, resource_type } => {
            let pairs = super::negotiate::query_pairs(&req);
            search::search(
                req,
                p,
                search::Target::Compartment(patient, resource_type),
                pairs,
                state,
            )
            .await
        }
        Interaction::Operation {
            resource_type,
            id: Some(id),
            name,
        } if resource_type == "Patient" && name == "$access-report" => audit::access_report(req, p, id, state).await,
        Interaction::Operation {
            resource_type,
            id: Some(id),
            name,
        } if resource_type == "Patient" && name == "$everything" && req.method() == actix_web::http::Method::GET => {
            let pairs = super::negotiate::query_pairs(&req);
            search::search(req, p, search::Target::Everything(id), pairs, state).await
        }
        Interaction::Patch { resource_type, id } => crud::patch(req, p, resource_type, id, payload, state).await,
        Interaction::Bundle => bundle::process(req, p, payload, state).await,
        Interaction::BulkExport => export::kick_off(req, p, export::Level::System, payload, state).await,
        Interaction::Operation {
            resource_type,
            id,
            name,
        } if name == "$validate"
            && (req.method() == actix_web::http::Method::POST
                || (id.is_some() && req.method() == actix_web::http::Method::GET)) =>
        {
            validate::validate(req, p, resource_type, id, payload, state).await
        }
        Interaction::Operation {
            resource_type,
            id: None,
            name,
        } if resource_type == "Patient" && name == "$export" && export::kick_off_method(req.method()) => {
            export::kick_off(req, p, export::Level::Patient, payload, state).await
        }
        Interaction::Operation {
            resource_type,
            id: Some(id),
            name,
        } if resource_type == "Group" && name == "$export" && export::kick_off_method(req.method()) => {
            export::kick_off(req, p, export::Level::Group(id), payload, state).await
        }
        Interaction::BulkStatus { job } if req.method() == actix_web::http::Method::DELETE => {
            export::cancel(req, p, job, state).await
        }
        Interaction::BulkStatus { job } => export::status(req, p, job, state).await,
        Interaction::BulkFile { job, file } => export::file(req, p, job, file, state).await,
        Interaction::Operation {
            resource_type,
            id,
            name,
        } if resource_type == "Subscription" && name == "$status" && get_or_post(&req) => {
            subscriptions::status(req, p, id, state).await
        }
        Interaction::Operation {
            resource_type,
            id: Some(id),
            name,
        } if resource_type == "Subscription" && name == "$events" && get_or_post(&req) => {
            subscriptions::events(req, p, id, state).await
        }
        Interaction::Operation { .. } => Err(ApiError::NotFound("unknown operation")),
    };
    if matches!(result, Err(ApiError::Forbidden)) {
        st.record_denial(&req_for_log, &p_for_log, name);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(m: Method, p: &str) -> Result<Interaction, u16> {
        Interaction::parse(&m, p, |t| t == "Patient").map_err(|e| actix_web::ResponseError::status_code(&e).as_u16())
    }

    #[test]
    fn paths_map_to_interactions() {
        assert_eq!(parse(Method::GET, "metadata"), Ok(Interaction::Capabilities));
        assert_eq!(parse(Method::GET, "Patient/1").unwrap().name(), "read");
        assert_eq!(parse(Method::HEAD, "Patient/1").unwrap().name(), "read");
        assert_eq!(parse(Method::PUT, "Patient/1").unwrap().name(), "update");
        assert_eq!(parse(Method::DELETE, "Patient/1").unwrap().name(), "delete");
        assert_eq!(parse(Method::POST, "Patient").unwrap().name(), "create");
        assert_eq!(parse(Method::GET, "Patient/_history").unwrap().name(), "history-type");
        assert_eq!(
            parse(Method::GET, "Patient/1/_history").unwrap().name(),
            "history-instance"
        );
        assert_eq!(parse(Method::GET, "Patient/1/_history/2").unwrap().name(), "vread");
        assert_eq!(parse(Method::GET, "_history").unwrap().name(), "history-system");
        assert_eq!(parse(Method::GET, "Patient").unwrap().name(), "search-type");
        assert_eq!(
            parse(Method::GET, "Patient/1/$access-report").unwrap().name(),
            "operation"
        );
    }

    #[test]
    fn audit_events_are_read_only() {
        let parse = |m: Method, p: &str| {
            Interaction::parse(&m, p, |t| t == "AuditEvent")
                .map_err(|e| actix_web::ResponseError::status_code(&e).as_u16())
        };
        assert_eq!(parse(Method::GET, "AuditEvent/1").unwrap().name(), "read");
        assert_eq!(parse(Method::GET, "AuditEvent").unwrap().name(), "search-type");
        for (m, path) in [
            (Method::POST, "AuditEvent"),
            (Method::PUT, "AuditEvent/1"),
            (Method::DELETE, "AuditEvent/1"),
            (Method::PATCH, "AuditEvent/1"),
            (Method::GET, "AuditEvent/1/_history"),
            (Method::GET, "AuditEvent/_history"),
        ] {
            assert_eq!(parse(m.clone(), path), Err(405), "{m} {path}");
        }
    }

    #[test]
    fn wrong_methods_and_unknown_paths() {
        assert_eq!(parse(Method::PATCH, "Patient/1").unwrap().name(), "patch");
        assert_eq!(parse(Method::PATCH, "Patient"), Err(405));
        assert_eq!(parse(Method::POST, "").unwrap().name(), "batch");
        assert_eq!(parse(Method::PUT, ""), Err(405));
        assert_eq!(parse(Method::PUT, "metadata"), Err(405));
        assert_eq!(parse(Method::GET, "Nope/1"), Err(404));
        assert_eq!(parse(Method::GET, "Patient/1/_history/2/x"), Err(404));
        assert_eq!(parse(Method::GET, "Patient/1/other"), Err(404));
        assert_eq!(parse(Method::GET, "Patient/bad%20id"), Err(404));
        assert_eq!(parse(Method::DELETE, "Patient/bad%20id"), Err(404));
        assert_eq!(parse(Method::GET, "Patient/bad%20id/_history"), Err(404));
        assert_eq!(parse(Method::PUT, "Patient/bad%20id"), Err(400));
    }
}
