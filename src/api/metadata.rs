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
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];
/// The system-level interactions routed.
pub const SYSTEM_INTERACTIONS: &[&str] = &["transaction", "batch", "history-system", "search-system"];

/// AuditEvent is written only by the server: it is read and searched (see `api::audit`).
fn audit_event_capability() -> Value {
    let param = |name: &str, kind: &str, doc: &str| json!({"name": name, "type": kind, "documentation": doc});
    json!({
        "type": "AuditEvent",
        "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
        "documentation": "The audit log: one AuditEvent per request, kept in a hash-chained, append-only ledger. \
            Readable with a system/ scope on AuditEvent, or a user/ scope and the auditor role.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "no-version",
        "readHistory": false,
        "updateCreate": false,
        "conditionalCreate": false,
        "conditionalRead": "not-supported",
        "conditionalUpdate": false,
        "conditionalDelete": "not-supported",
        "searchParam": [
            param("date", "date", "When the event was recorded (prefixes eq, gt, ge, lt, le, sa, eb)"),
            param("agent", "reference", "Who acted: the user's reference, else the client id or token subject"),
            param("entity", "reference", "A resource the event touched"),
            param("patient", "reference", "A patient whose data the event concerned"),
            param("type", "token", "Type of event (rest, or a DICOM event type)"),
            param("subtype", "token", "The interaction (read, search-type, create …) or command"),
            param("action", "token", "C, R, U, D or E"),
            param("outcome", "token", "0 success, 4 minor failure, 8 serious failure, 12 major failure"),
        ],
    })
}

/// Stands for the origin the client reached the server at, in the stored CapabilityStatement,
/// when no public URL is configured (replaced per request).
pub const ORIGIN_PLACEHOLDER: &str = "https://origin.fhirvault.invalid";

/// `rest.security`: SMART on FHIR, with the OAuth endpoints of the built-in server (or of the
/// external provider that signs users in).
fn security(config: &Config, providers: &crate::auth::oidc::Providers) -> Value {
    let description = "Every interaction but capabilities requires an OAuth 2 bearer token whose SMART App Launch \
        scopes allow it (see .well-known/smart-configuration).";
    let origin = config.public_origin().unwrap_or(ORIGIN_PLACEHOLDER);
    let uris: Vec<(&str, String)> = if config.auth_server {
        ["authorize", "token", "introspect", "revoke"]
            .iter()
            .map(|e| (*e, format!("{origin}/auth/{e}")))
            .collect()
    } else if let Some(p) = providers.metadata().into_iter().next() {
        let mut v = Vec::new();
        if let Some(a) = p.authorization_endpoint {
            v.push(("authorize", a));
        }
        if let Some(t) = p.token_endpoint {
            v.push(("token", t));
        }
        v
    } else {
        return json!({"cors": false, "description": description});
    };
    json!({
        "cors": false,
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": uris.into_iter().map(|(k, v)| json!({"url": k, "valueUri": v})).collect::<Vec<_>>(),
        }],
        "service": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR",
                "display": "SMART-on-FHIR"
            }],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"
        }],
        "description": description,
    })
}

pub fn capability_statement(
    config: &Config,
    providers: &crate::auth::oidc::Providers,
    validator: &Validator,
    registry: &crate::search::Registry,
    structures: &crate::fhir::structure::StructureValidator,
) -> Value {
    use crate::search::ParamType;
    // `_revinclude` values per target type: every reference parameter that can point to it
    let mut revincludes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for source in registry.types() {
        for p in registry.params(source).filter(|p| p.kind == ParamType::Reference) {
            for target in &p.targets {
                revincludes
                    .entry(target.clone())
                    .or_default()
                    .push(format!("{source}:{}", p.code));
            }
        }
    }
    let resources: Vec<Value> = validator
        .resource_types()
        .map(|t| {
            if t == "AuditEvent" {
                return audit_event_capability();
            }
            let mut r = json!({
                "type": t,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{t}"),
                "interaction": TYPE_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
            });
            // the parameters search answers (chains and `_has` work on them; special ones such
            // as `near` are not listed: not supported)
            let params: Vec<Value> = registry
                .params(t)
                .filter(|p| crate::search::query::supported(p))
                .map(|p| {
                    let mut v = json!({
                        "name": p.code,
                        "definition": p.url,
                        "type": format!("{:?}", p.kind).to_lowercase(),
                    });
                    if p.phi {
                        v["documentation"] = json!(
                            "Identifying: stored only as blind indexes. Exact, prefix and :contains (3 \
                             characters or more) matches, re-checked after decryption where the blind \
                             index only narrows; no :text."
                        );
                    }
                    v
                })
                .collect();
            if !params.is_empty() {
                r["searchParam"] = Value::Array(params);
            }
            let mut includes: Vec<String> = registry
                .params(t)
                .filter(|p| p.kind == ParamType::Reference)
                .map(|p| format!("{t}:{}", p.code))
                .collect();
            includes.push("*".into());
            r["searchInclude"] = json!(includes);
            let mut rev = revincludes.get(t).cloned().unwrap_or_default();
            rev.push("*".into());
            r["searchRevInclude"] = json!(rev);
            if t == "Patient" {
                r["operation"] = json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "The patient's compartment as a paged searchset Bundle (start, end, _since, _type, \
                        _count), limited to the types the token may search; audited like a search."
                }, {
                    "name": "access-report",
                    "definition": "https://fhirvault.dev/OperationDefinition/Patient-access-report",
                    "documentation": "Who accessed this patient's record, when and why (AuditEvents about the patient, \
                        without other patients' data); for the patient themself with patient/AuditEvent.rs, or an auditor."
                }, {
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
                    "documentation": BULK_EXPORT_DOC
                }]);
            }
            if t == "Group" {
                r["operation"] = json!([{
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
                    "documentation": BULK_EXPORT_DOC
                }]);
            }
            let profiles = structures.profiles_of(t);
            if !profiles.is_empty() {
                r["supportedProfile"] = json!(profiles);
            }
            if t != "AuditEvent" {
                let validate = json!({
                    "name": "validate",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                    "documentation": "POST [type]/$validate, POST or GET [type]/[id]/$validate: the R4 JSON Schema and \
                        StructureDefinitions (cardinality, types, fixed and pattern values, required bindings, \
                        invariants) and the profiles named by `profile` or meta.profile; mode create, update or \
                        delete. An OperationOutcome, one issue per problem with its expression."
                });
                match r["operation"].as_array_mut() {
                    Some(ops) => ops.push(validate),
                    None => r["operation"] = json!([validate]),
                }
            }
            r
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
            "security": security(config, providers),
            "resource": resources,
            // `Patient/[id]/[type]` searches the patient compartment
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            "interaction": SYSTEM_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
            "operation": [{
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                "documentation": BULK_EXPORT_DOC
            }],
        }],
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
    });
    if let Some(url) = &config.public_url {
        cs["implementation"]["url"] = Value::String(url.clone());
    }
    cs
}

/// What the three `$export` operations take and how they answer.
const BULK_EXPORT_DOC: &str = "Bulk Data Access 2.0 export (Prefer: respond-async): _outputFormat \
    (application/fhir+ndjson), _since, _type, _typeFilter. 202 with Content-Location: poll it \
    ($export-status, X-Progress, Retry-After) for the manifest, DELETE it to cancel. Files are NDJSON, \
    encrypted at rest, served only to the client that started the job while its token grants their \
    type (system/ or user/ read scopes), and deleted after export_retention_secs.";

pub async fn capabilities(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(&req)?;
    let stored = if state.config.public_url.is_none() {
        // the OAuth URIs name the origin this client reached us at
        let text = String::from_utf8_lossy(&state.capability);
        text.replace(ORIGIN_PLACEHOLDER, &super::smart::origin(&state, &req))
            .into_bytes()
    } else {
        state.capability.clone()
    };
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render_stored(stored)))
}
