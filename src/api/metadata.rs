//! The CapabilityStatement, generated from what the server implements: the resource types of
//! the validator's registry and the interactions routed in `api::app`. Nothing is listed that
//! does not work (search parameters and operations appear as they land).

use super::{ApiError, AppState, Format};
use crate::config::Config;
use crate::fhir::{Validator, FHIR_VERSION};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

/// The interactions `api::app` routes for every resource type.
pub const TYPE_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "delete",
    "history-instance",
    "history-type",
    "create",
];
/// The system-level interactions routed.
pub const SYSTEM_INTERACTIONS: &[&str] = &["history-system"];

pub fn capability_statement(config: &Config, validator: &Validator) -> Value {
    let resources: Vec<Value> = validator
        .resource_types()
        .map(|t| {
            json!({
                "type": t,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{t}"),
                "interaction": TYPE_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
            })
        })
        .collect();
    let mut cs = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": crate::fhir::resource::instant(&crate::store::now()),
        "publisher": "fhirvault",
        "kind": "instance",
        "software": {"name": "fhirvault", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "fhirvault FHIR R4 server"},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "application/json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "description": "Every interaction but capabilities requires an OAuth 2 bearer token (ES256 JWT from the server's issuer) whose SMART App Launch scopes allow it.",
            },
            "resource": resources,
            "interaction": SYSTEM_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
        }],
    });
    if let Some(url) = &config.public_url {
        cs["implementation"]["url"] = Value::String(url.clone());
    }
    cs
}

pub async fn capabilities(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(&req)?;
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render_stored(state.capability.clone())))
}
