//! `$validate` (FHIR R4 Resource-validate): `POST [type]/$validate` and
//! `POST|GET [type]/[id]/$validate`, with `mode` (create, update, delete) and `profile`. The
//! resource is checked against the R4 JSON Schema, the R4 StructureDefinitions, and the
//! profiles named by `profile` or its `meta.profile`; the answer is an OperationOutcome with one
//! issue per problem (severity, and the element as `expression`), 200 whatever it found.

use super::trail::Trail;
use super::{blocking, ApiError, AppState};
use crate::auth::policy::authorize;
use crate::auth::{Permission, Principal};
use crate::fhir::{Issue, IssueSeverity, IssueType, OperationOutcome};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No mode: is the resource valid?
    General,
    Create,
    Update,
    Delete,
}

fn bad(text: &'static str, at: &'static str) -> ApiError {
    ApiError::BadRequest(vec![Issue::error(IssueType::Invalid, text).at(at)])
}

/// The request's resource, mode and profile: from a Parameters body (`resource`, `mode`,
/// `profile`) or a bare resource, and the query string.
fn inputs(query: &[(String, String)], body: Option<Value>) -> Result<(Option<Value>, Mode, Option<String>), ApiError> {
    let mut mode = None;
    let mut profile = None;
    let mut resource = None;
    for (k, v) in query {
        match k.as_str() {
            "mode" => mode = Some(v.clone()),
            "profile" => profile = Some(v.clone()),
            "_format" | "_pretty" => {}
            _ => return Err(bad("$validate takes mode and profile", "parameter")),
        }
    }
    match body {
        Some(Value::Object(mut m)) if m.get("resourceType").and_then(Value::as_str) == Some("Parameters") => {
            for p in m
                .remove("parameter")
                .and_then(|p| p.as_array().cloned())
                .unwrap_or_default()
            {
                match p["name"].as_str() {
                    Some("resource") => resource = p.get("resource").cloned(),
                    Some("mode") => mode = p["valueCode"].as_str().map(str::to_string),
                    Some("profile") => {
                        profile = p["valueUri"]
                            .as_str()
                            .or(p["valueCanonical"].as_str())
                            .map(str::to_string)
                    }
                    _ => {
                        return Err(bad(
                            "$validate takes the parameters resource, mode and profile",
                            "Parameters",
                        ))
                    }
                }
            }
        }
        Some(v @ Value::Object(_)) => resource = Some(v),
        Some(_) => return Err(bad("the body must be a resource or Parameters", "body")),
        None => {}
    }
    let mode = match mode.as_deref() {
        None => Mode::General,
        Some("create") => Mode::Create,
        Some("update") => Mode::Update,
        Some("delete") => Mode::Delete,
        Some(_) => return Err(bad("mode is create, update or delete", "mode")),
    };
    Ok((resource, mode, profile))
}

/// `[type]/$validate` (`id` `None`) or `[type]/[id]/$validate`.
pub async fn validate(
    req: HttpRequest,
    p: Arc<Principal>,
    resource_type: String,
    id: Option<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let query = super::negotiate::query_pairs(&req);
    let body = if req.method() == actix_web::http::Method::POST {
        Some(
            super::negotiate::read_json_body(&req, payload, state.config.max_body_bytes, false)
                .await?
                .1,
        )
    } else {
        None
    };
    let (resource, mode, profile) = inputs(&query, body)?;
    // what validating may reveal is what the mode's interaction would: the token must be
    // allowed that interaction on the type
    let needed = match mode {
        Mode::General | Mode::Create => Permission::Create,
        Mode::Update => Permission::Update,
        Mode::Delete => Permission::Delete,
    };
    let decision = authorize(&p, &resource_type, needed).or_else(|e| match mode {
        // a token that may only read may still check a resource it holds
        Mode::General => authorize(&p, &resource_type, Permission::Read),
        _ => Err(e),
    })?;
    let mut issues = Vec::new();
    match (mode, &id) {
        (Mode::Update | Mode::Delete, None) => {
            return Err(bad("mode update and delete need [type]/[id]/$validate", "mode"))
        }
        (Mode::Delete, Some(id)) => {
            // the resource must exist and be one the token may delete (its compartment, labels)
            let st = state.clone();
            let (t, i, access) = (resource_type.clone(), id.clone(), decision.access());
            let found = blocking(move || st.store.read(&access, &t, &i).map_err(ApiError::from)).await;
            let (found, _) = super::crud::visible(&state, &p, &decision, &resource_type, id, found, true)?;
            Trail::of(&req)?.touched(
                format!("{resource_type}/{id}/_history/{}", found.version_id),
                &found.patients,
            );
        }
        _ => {}
    }
    if mode != Mode::Delete {
        let resource = match (resource, &id) {
            (Some(r), _) => r,
            // GET [type]/[id]/$validate: the stored resource
            (None, Some(id)) => {
                // exactly what a read by this token would return (compartment, labels, masks)
                let read = authorize(&p, &resource_type, Permission::Read)?;
                let st = state.clone();
                let (t, i, access) = (resource_type.clone(), id.clone(), read.access());
                let found = blocking(move || st.store.read(&access, &t, &i).map_err(ApiError::from)).await;
                let (found, _) = super::crud::visible(&state, &p, &read, &resource_type, id, found, false)?;
                Trail::of(&req)?.touched(
                    format!("{resource_type}/{id}/_history/{}", found.version_id),
                    &found.patients,
                );
                serde_json::from_slice(found.content.as_deref().unwrap_or(b"{}")).map_err(|_| ApiError::Internal)?
            }
            (None, None) => return Err(bad("$validate needs a resource to validate", "resource")),
        };
        if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type.as_str()) {
            return Err(bad("resourceType does not match the type in the URL", "resourceType"));
        }
        if mode == Mode::Update {
            let body_id = resource.get("id").and_then(Value::as_str);
            if body_id != id.as_deref() {
                issues.push(
                    Issue::error(IssueType::Invalid, "an update's resource must carry the id of the URL").at("id"),
                );
            }
        }
        let mut profiles: Vec<String> = resource["meta"]["profile"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        if let Some(p) = profile {
            profiles.push(p);
        }
        profiles.sort();
        profiles.dedup();
        let st = state.clone();
        let t = resource_type.clone();
        let found =
            blocking(move || {
                // the JSON Schema first (shapes and primitive formats), then the definitions
                let mut found = st.validator.validate(&t, &resource);
                // an element the schema already faulted is not reported twice
                let faulted: std::collections::HashSet<String> =
                    found.iter().flat_map(|i| i.expression.iter().cloned()).collect();
                found.extend(st.structures.validate(&resource, &profiles).into_iter().filter(|i| {
                    i.severity != IssueSeverity::Error || !i.expression.iter().any(|e| faulted.contains(e))
                }));
                Ok::<_, ApiError>(found)
            })
            .await?;
        issues.extend(found);
    }
    if !issues
        .iter()
        .any(|i| matches!(i.severity, IssueSeverity::Error | IssueSeverity::Fatal))
    {
        issues.push(Issue {
            severity: IssueSeverity::Information,
            code: IssueType::Informational,
            diagnostics: Some("no errors found".into()),
            expression: Vec::new(),
        });
    }
    Ok(HttpResponse::Ok()
        .content_type(super::FHIR_JSON)
        .body(serde_json::to_vec(&OperationOutcome::new(issues)).map_err(|_| ApiError::Internal)?))
}
