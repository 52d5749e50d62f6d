//! The CapabilityStatement, generated from what the server implements: the resource types of
//! the validator's registry and the interactions routed in `api::app`. Nothing is listed that
//! does not work (search parameters and operations appear as they land).

use super::{ApiError, AppState, Format};
use crate::config::Config;
use crate::fhir::{Validator, FHIR_VERSION};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::sync::Arc;

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

/// AuditEvent is written only by the server: it is read (`api::audit`) and searched with the
/// common engine and result parameters, on the parameters the log's rows hold
/// (`store::audit::search::AUDIT_SEARCH_PARAMS`; a unit test keeps the two lists equal).
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
        "searchInclude": ["AuditEvent:agent", "AuditEvent:entity", "AuditEvent:patient"],
        "searchParam": [
            param("_id", "token", "The event's id"),
            param("_lastUpdated", "date", "When the event was recorded"),
            param("date", "date", "When the event was recorded (every prefix)"),
            param("agent", "reference", "Who acted: the user's reference, else the client id or token subject"),
            param("entity", "reference", "A resource the event touched"),
            param("patient", "reference", "A patient whose data the event concerned"),
            param("type", "token", "Type of event (rest, or a DICOM event type)"),
            param("subtype", "token", "The interaction (read, search-type, create …) or command"),
            param("action", "token", "C, R, U, D or E"),
            param("outcome", "token", "0 success, 4 minor failure, 8 serious failure, 12 major failure"),
            param("site", "token", "The site of the server that recorded the event (source.site)"),
            param("address", "string", "The client's network address, whole (kept as a blind index: exact match, no :contains)"),
            param("agent-role", "token", "A role the agent held (the role names fhirvault grants: admin, auditor …)"),
            param("entity-type", "token", "1 a patient, 2 a resource or a search's query"),
            param("entity-role", "token", "1 a patient, 24 a search's query"),
            param("agent-name", "string", "Never recorded by fhirvault (matches no event)"),
            param("altid", "token", "Never recorded by fhirvault (matches no event)"),
            param("entity-name", "string", "Never recorded by fhirvault (matches no event)"),
            param("policy", "uri", "Never recorded by fhirvault (matches no event)"),
            param("source", "reference", "The observer is recorded by name, not reference (matches no event)"),
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
                }, {
                    "name": "patient-export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
                    "documentation": BULK_EXPORT_LEGACY_NAME
                }]);
            }
            if t == "Group" {
                r["operation"] = json!([{
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
                    "documentation": BULK_EXPORT_DOC
                }, {
                    "name": "group-export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
                    "documentation": BULK_EXPORT_LEGACY_NAME
                }]);
            }
            if t == "Subscription" {
                // the SubscriptionTopics offered: "a resource of type T was created, updated or
                // deleted", filterable by T's search parameters
                r["extension"] = validator
                    .resource_types()
                    .map(|t| {
                        json!({
                            "url": format!("{}capabilitystatement-subscriptiontopic-canonical", crate::subscription::BACKPORT),
                            "valueCanonical": format!("{}{t}", crate::subscription::TOPIC_BASE),
                        })
                    })
                    .collect();
                r["operation"] = json!([{
                    "name": "status",
                    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
                    "documentation": "GET or POST Subscription/[id]/$status, or Subscription/$status?id=: the \
                        SubscriptionStatus of each subscription the token may read (status, events since start, last error)."
                }, {
                    "name": "events",
                    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events",
                    "documentation": "GET or POST Subscription/[id]/$events (eventsSinceNumber, eventsUntilNumber, content): \
                        past events by number, kept seven days after delivery, each resource only as far as the token reaches."
                }]);
                r["documentation"] = json!(
                    "R4 rest-hook subscriptions (criteria a search; without payload a POST without a body, with \
                     application/fhir+json a PUT of each resource to [endpoint]/[type]/[id] where the server allows whole \
                     resources) and the Subscriptions R5 Backport (topics below, filter criteria, content empty, id-only \
                     or full-resource, heartbeat, timeout, max count). Handshake before active; error after repeated \
                     failures. Notifications are filtered by the grant of the client that wrote the subscription, as it \
                     stands at delivery; endpoints are https (http to loopback only) and never internal addresses unless \
                     the server allows them."
                );
            }
            let mut profiles = structures.profiles_of(t);
            if t == "Subscription" {
                profiles.push(format!("{}backport-subscription", crate::subscription::BACKPORT));
            }
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
    // the implementation guides' server CapabilityStatements this one covers in full
    for (url, gaps) in guide_requirements(config, &cs) {
        if gaps.is_empty() {
            if let Some(list) = cs["instantiates"].as_array_mut() {
                list.push(Value::String(url));
            }
        } else {
            tracing::info!(capability = %url, missing = %gaps.join(", "), "not declared as instantiated: requirements not met");
        }
    }
    cs
}

/// The server CapabilityStatements (`kind: requirements`) under `profile_dir`, each with what
/// `ours` lacks of the resource types, interactions, search parameters, includes, profiles and
/// operations it requires (SHALL and SHOULD alike): declared as instantiated only when nothing
/// is missing (US Core's `$docref`, for one, keeps it from being declared today).
pub fn guide_requirements(config: &Config, ours: &Value) -> Vec<(String, Vec<String>)> {
    let Some(dir) = &config.profile_dir else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let is_capability = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("CapabilityStatement") && n.ends_with(".json"));
            let Some(required) = is_capability
                .then(|| std::fs::read(&path).ok())
                .flatten()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            else {
                continue;
            };
            if required["kind"] != "requirements" || required["rest"][0]["mode"] != "server" {
                continue;
            }
            let Some(url) = required["url"].as_str() else { continue };
            found.push((url.to_string(), requirement_gaps(&required, ours)));
        }
    }
    found.sort();
    found
}

/// What `ours` lacks of `required`'s first `rest`.
fn requirement_gaps(required: &Value, ours: &Value) -> Vec<String> {
    let names = |v: &Value, key: &str, field: &str| -> Vec<String> {
        v[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| {
                if field.is_empty() {
                    x.as_str()
                } else {
                    x[field].as_str()
                }
            })
            .map(str::to_string)
            .collect()
    };
    let our_rest = &ours["rest"][0];
    let mut gaps = Vec::new();
    for code in names(&required["rest"][0], "interaction", "code") {
        if !names(our_rest, "interaction", "code").contains(&code) {
            gaps.push(format!("system {code}"));
        }
    }
    for r in required["rest"][0]["resource"].as_array().into_iter().flatten() {
        let Some(t) = r["type"].as_str() else { continue };
        let Some(mine) = our_rest["resource"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["type"] == t)
        else {
            gaps.push(t.to_string());
            continue;
        };
        let checks = [
            ("interaction", "code", "interaction"),
            ("searchParam", "name", "search parameter"),
            ("operation", "name", "operation"),
            ("searchInclude", "", "_include"),
            ("searchRevInclude", "", "_revinclude"),
        ];
        for (key, field, what) in checks {
            let have = names(mine, key, field);
            for want in names(r, key, field) {
                // `CareTeam:participant:Practitioner` narrows `CareTeam:participant` to a type
                let untyped = want.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
                let covered = have.contains(&want) || (field.is_empty() && have.contains(&untyped));
                if !covered {
                    gaps.push(format!("{t} {what} {want}"));
                }
            }
        }
        for profile in names(r, "supportedProfile", "") {
            if !names(mine, "supportedProfile", "").contains(&profile) {
                gaps.push(format!("{t} profile {profile}"));
            }
        }
    }
    gaps
}

/// Bulk Data 2.0 declares the Patient and Group exports under the name `export`; clients of
/// Bulk Data 1.0 look them up as `patient-export` and `group-export`: a second entry each, with
/// the same definition, so that discovery by either name finds them.
const BULK_EXPORT_LEGACY_NAME: &str =
    "The same operation under its Bulk Data 1.0 name, for discovery: it is invoked as \
    $export (see the entry named export).";

/// What the three `$export` operations take and how they answer.
const BULK_EXPORT_DOC: &str = "Bulk Data Access 2.0 export by GET or POST (a Parameters body; Prefer: respond-async, \
    Accept: application/fhir+json): patient (Patient and Group level), _outputFormat \
    (application/fhir+ndjson), _since, _type, _typeFilter, _elements, includeAssociatedData \
    (LatestProvenanceResources, RelevantProvenanceResources); with Prefer: handling=lenient what is not \
    supported is left out and named in the manifest's error file. \
    202 with Content-Location: poll it \
    ($export-status, X-Progress, Retry-After) for the manifest, DELETE it to cancel. Files are NDJSON, \
    encrypted at rest, served only to the client that started the job while its token grants their \
    type (system/ or user/ read scopes), and deleted after export_retention_secs.";

/// A document rendered from one registry (told apart by its address): rendered again when the
/// search parameters change.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub registry: usize,
    pub bytes: Arc<Vec<u8>>,
}

/// The CapabilityStatement of the current search parameters (rendered again after they changed).
fn current_capability(state: &AppState) -> Arc<Vec<u8>> {
    let registry = state.search.current();
    let key = Arc::as_ptr(&registry) as usize;
    {
        let cached = state.capability.read().unwrap_or_else(|p| p.into_inner());
        if cached.registry == key {
            return cached.bytes.clone();
        }
    }
    let cs = capability_statement(
        &state.config,
        &state.providers,
        &state.validator,
        &registry,
        &state.structures,
    );
    let bytes = Arc::new(serde_json::to_vec(&cs).unwrap_or_default());
    *state.capability.write().unwrap_or_else(|p| p.into_inner()) = Rendered {
        registry: key,
        bytes: bytes.clone(),
    };
    bytes
}

pub async fn capabilities(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(&req)?;
    let capability = current_capability(&state);
    let stored = if state.config.public_url.is_none() {
        // the OAuth URIs name the origin this client reached us at
        let text = String::from_utf8_lossy(&capability);
        text.replace(ORIGIN_PLACEHOLDER, &super::smart::origin(&state, &req))
            .into_bytes()
    } else {
        capability.as_ref().clone()
    };
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render_stored(stored)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_audit_log_declares_the_parameters_its_rows_answer() {
        let declared: std::collections::BTreeSet<String> = super::audit_event_capability()["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        let answered = crate::store::audit::search::AUDIT_SEARCH_PARAMS
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(declared, answered);
    }
}
