//! The discovery documents: `/.well-known/smart-configuration` (SMART App Launch 2.x),
//! `/.well-known/openid-configuration` and the issuer's JWKS, at the root and under the FHIR base;
//! they name the built-in authorization server's endpoints, or an external provider's.

use super::smart::{endpoint, json_response, server};
use super::{ApiError, AppState};
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

// ---- well-known documents ----

/// Registers the discovery documents (on the root and on the FHIR base alike).
pub fn well_known(cfg: &mut web::ServiceConfig) {
    cfg.route("/.well-known/smart-configuration", web::get().to(smart_configuration))
        .route("/.well-known/openid-configuration", web::get().to(openid_configuration));
}

/// `GET [base]/.well-known/smart-configuration` (and at the root): SMART App Launch 2.
pub async fn smart_configuration(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let doc = smart_document(&state, &req).ok_or(ApiError::NotFound("no authorization server is configured"))?;
    Ok(json_response(StatusCode::OK, &doc))
}

/// Granular scopes advertised in `scopes_supported`: (type, category system, code).
const GRANULAR_EXAMPLES: &[(&str, &str, &str)] = &[
    (
        "Condition",
        "http://terminology.hl7.org/CodeSystem/condition-category",
        "encounter-diagnosis",
    ),
    (
        "Condition",
        "http://terminology.hl7.org/CodeSystem/condition-category",
        "problem-list-item",
    ),
    (
        "Condition",
        "http://hl7.org/fhir/us/core/CodeSystem/condition-category",
        "health-concern",
    ),
    (
        "Observation",
        "http://terminology.hl7.org/CodeSystem/observation-category",
        "laboratory",
    ),
    (
        "Observation",
        "http://terminology.hl7.org/CodeSystem/observation-category",
        "social-history",
    ),
    (
        "Observation",
        "http://terminology.hl7.org/CodeSystem/observation-category",
        "vital-signs",
    ),
    (
        "Observation",
        "http://terminology.hl7.org/CodeSystem/observation-category",
        "survey",
    ),
    (
        "Observation",
        "http://hl7.org/fhir/us/core/CodeSystem/us-core-category",
        "sdoh",
    ),
];

/// The document, or `None` when no authorization server (built-in or external) is configured.
pub fn smart_document(state: &AppState, req: &HttpRequest) -> Option<Value> {
    let mut scopes: Vec<String> = [
        "openid",
        "fhirUser",
        "profile",
        "launch",
        "launch/patient",
        "offline_access",
        "online_access",
        "patient/*.cruds",
        "user/*.cruds",
        "system/*.cruds",
        "patient/*.read",
        "user/*.read",
        "system/*.read",
        "patient/*.write",
        "user/*.write",
        "system/*.write",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // SMART v2 granular scopes: the category scopes US Core and ONC (g)(10) ask for, as examples
    // of the token search parameters any type's scope may be narrowed by
    scopes.extend(
        GRANULAR_EXAMPLES
            .iter()
            .map(|(t, system, code)| format!("patient/{t}.rs?category={system}|{code}")),
    );
    let scopes = json!(scopes);
    if state.auth_server.is_some() {
        return Some(json!({
            "issuer": state.issuer.issuer(),
            "jwks_uri": endpoint(state, req, "jwks"),
            "authorization_endpoint": endpoint(state, req, "authorize"),
            "token_endpoint": endpoint(state, req, "token"),
            "introspection_endpoint": endpoint(state, req, "introspect"),
            "revocation_endpoint": endpoint(state, req, "revoke"),
            "userinfo_endpoint": endpoint(state, req, "userinfo"),
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": scopes,
            "capabilities": [
                "launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric",
                "client-confidential-asymmetric", "sso-openid-connect", "context-ehr-patient",
                "context-ehr-encounter", "context-standalone-patient", "context-banner",
                "permission-offline", "permission-online", "permission-patient", "permission-user",
                "permission-v1", "permission-v2"
            ],
        }));
    }
    // an external provider signs users in: point clients at it
    let provider = state.providers.metadata().into_iter().next()?;
    let mut doc = json!({
        "issuer": provider.issuer,
        "jwks_uri": provider.jwks_uri,
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": scopes,
        "capabilities": ["launch-standalone", "client-public", "client-confidential-symmetric", "sso-openid-connect",
                          "permission-patient", "permission-user", "permission-v1", "permission-v2"],
    });
    if let Some(a) = provider.authorization_endpoint {
        doc["authorization_endpoint"] = json!(a);
    }
    if let Some(t) = provider.token_endpoint {
        doc["token_endpoint"] = json!(t);
    }
    Some(doc)
}

/// `GET /.well-known/openid-configuration` (and under the FHIR base): OpenID Connect discovery
/// of the built-in server.
pub async fn openid_configuration(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    server(&state)?;
    let s = &state;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "issuer": s.issuer.issuer(),
            "authorization_endpoint": endpoint(s, &req, "authorize"),
            "token_endpoint": endpoint(s, &req, "token"),
            "userinfo_endpoint": endpoint(s, &req, "userinfo"),
            "jwks_uri": endpoint(s, &req, "jwks"),
            "introspection_endpoint": endpoint(s, &req, "introspect"),
            "revocation_endpoint": endpoint(s, &req, "revoke"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "fhirUser", "profile", "offline_access", "online_access", "launch", "launch/patient"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "amr", "fhirUser", "preferred_username"],
        }),
    ))
}

/// `GET /auth/jwks` (and `/.well-known/jwks.json`): the key that verifies this server's tokens.
pub async fn jwks(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    server(&state)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .content_type("application/json")
        .body(json!({"keys": [state.issuer.jwk()]}).to_string()))
}
