//! The SMART endpoints: the well-known documents (`smart-configuration`, `openid-configuration`,
//! JWKS) and the built-in authorization server's HTTP edge (`/auth/…`): the authorize flow's
//! pages, token, introspection, revocation and userinfo. Decisions are `auth::server`'s; these
//! handlers parse, call, audit and answer. OAuth endpoints answer RFC 6749 JSON errors; pages
//! answer HTML. Every sign-in, failure, token, introspection and revocation is an AuditEvent,
//! durable before the answer leaves (fail closed: no event, no token).

use super::pages::{self, Consent, PatientChoice};
use super::{blocking, ApiError, AppState};
use crate::audit::{Action, Agent, AuditRecord, Kind, Outcome};
use crate::auth::console::{is_console, CONSOLE_HOME};
use crate::auth::server::{AuthServer, AuthorizeFailure, AuthzRequest, OAuthError};
use crate::store::auth::UserRow;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

const SESSION_COOKIE: &str = "fhirvault_session";
const FORM: &str = "application/x-www-form-urlencoded";

/// Scheme, host and port the server is reached at (the public URL's, when configured).
pub fn origin(state: &AppState, req: &HttpRequest) -> String {
    match state.config.public_origin() {
        Some(o) => o.to_string(),
        None => {
            let info = req.connection_info();
            format!("{}://{}", info.scheme(), info.host())
        }
    }
}

fn endpoint(state: &AppState, req: &HttpRequest, path: &str) -> String {
    format!("{}/auth/{path}", origin(state, req))
}

fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::PRAGMA, "no-cache"))
        .content_type("application/json")
        .body(body.to_string())
}

fn html(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

/// The authorization server, or 404 where it is turned off.
fn server(state: &AppState) -> Result<Arc<AuthServer>, ApiError> {
    state
        .auth_server
        .clone()
        .ok_or(ApiError::NotFound("the built-in authorization server is turned off"))
}

/// A form body: each parameter once (a repeated one is refused, RFC 6749 §3.1).
fn parse_form(req: &HttpRequest, body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with(FORM) {
        return Err(OAuthError::InvalidRequest(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    parse_pairs(body)
}

fn parse_pairs(bytes: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(bytes) {
        if out.insert(k.into_owned(), v.into_owned()).is_some() {
            return Err(OAuthError::InvalidRequest("a parameter is repeated"));
        }
    }
    Ok(out)
}

/// HTTP Basic client credentials (RFC 6749 §2.3.1: both parts form-urlencoded).
fn basic_credentials(req: &HttpRequest) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = OAuthError::InvalidClient("malformed Authorization header");
    let text = value
        .to_str()
        .map_err(|_| OAuthError::InvalidClient("malformed Authorization header"))?;
    let Some((scheme, rest)) = text.split_once(' ') else {
        return Err(bad);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| OAuthError::InvalidClient("malformed Authorization header"))?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| OAuthError::InvalidClient("malformed Authorization header"))?;
    let (id, secret) = decoded.split_once(':').ok_or(bad)?;
    let unescape = |s: &str| -> String {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .map(|(_, v)| v.into_owned())
            .next()
            .unwrap_or_default()
    };
    Ok(Some((unescape(id), unescape(secret))))
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

fn oauth_error(e: &OAuthError, used_basic: bool) -> HttpResponse {
    let status = match e {
        OAuthError::InvalidClient(_) | OAuthError::InvalidToken => StatusCode::UNAUTHORIZED,
        OAuthError::Server(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    if let OAuthError::Server(inner) = e {
        tracing::error!(error = %inner, "authorization server error");
    }
    let mut resp = json_response(status, &json!({"error": e.code(), "error_description": e.to_string()}));
    if used_basic && matches!(e, OAuthError::InvalidClient(_)) {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"fhirvault\""),
        );
    }
    if matches!(e, OAuthError::InvalidToken) {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    resp
}

/// Records one authorization-server event and waits until it is durable.
async fn audit(
    state: &AppState,
    req: &HttpRequest,
    code: &'static str,
    outcome: Outcome,
    reason: Option<&str>,
    fill: impl FnOnce(&mut Agent),
) -> Result<(), ApiError> {
    let mut agent = Agent {
        network: req.peer_addr().map(|a| a.ip().to_string()),
        ..Agent::default()
    };
    fill(&mut agent);
    let mut record = AuditRecord::new(Kind::Security(code), Action::Execute, agent);
    record.outcome = outcome;
    record.outcome_desc = reason.map(str::to_string);
    state.auditor.record(&record).await.map_err(|e| {
        tracing::error!(error = %e, "an authorization event could not be audited");
        ApiError::AuditUnavailable
    })
}

/// Records a sign-in step of a user and an app; `Err` is the page to answer when the audit log
/// cannot record it (nothing was done).
async fn audit_user(
    state: &AppState,
    req: &HttpRequest,
    code: &'static str,
    outcome: Outcome,
    reason: Option<&str>,
    user: &UserRow,
    client_id: &str,
) -> Result<(), HttpResponse> {
    audit(state, req, code, outcome, reason, user_agent(user, Some(client_id)))
        .await
        .map_err(|_| unavailable())
}

/// A page that says the audit log could not record the step (nothing was done).
fn unavailable() -> HttpResponse {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        pages::error(
            "Unavailable",
            "The server cannot record this sign-in step right now. Try again later.",
        ),
    )
}

/// 429 when the address has failed too often.
fn throttled(state: &AppState, req: &HttpRequest) -> Option<u64> {
    let ip = req.peer_addr()?.ip();
    state
        .auth_failures
        .blocked(&crate::auth::limiter::FailureKey::Address(ip))
}

fn count_failure(state: &AppState, req: &HttpRequest) {
    if let Some(a) = req.peer_addr() {
        state
            .auth_failures
            .record_failure(crate::auth::limiter::FailureKey::Address(a.ip()));
    }
}

fn too_many(retry_after: u64, page: bool) -> HttpResponse {
    let mut resp = if page {
        html(
            StatusCode::TOO_MANY_REQUESTS,
            pages::error(
                "Too many attempts",
                "Too many failed attempts from this address. Wait a minute and try again.",
            ),
        )
    } else {
        json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": "slow_down", "error_description": "too many failed attempts"}),
        )
    };
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

pub(super) fn session_cookie(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get(header::COOKIE)?.to_str().ok()?;
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == SESSION_COOKIE && !v.is_empty()).then(|| v.to_string())
    })
}

fn set_cookie(state: &AppState, resp: &mut HttpResponse, value: &str, max_age: Option<i64>) {
    let secure = state.config.tls.is_some()
        || state.config.behind_tls_proxy
        || state
            .config
            .public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
    // the whole origin: the sign-in pages (`/auth`) and the console (`/console`) share it; the
    // FHIR API never reads it (bearer tokens only)
    let mut cookie = format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax");
    if secure {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

pub(super) fn user_agent(user: &UserRow, client_id: Option<&str>) -> impl FnOnce(&mut Agent) {
    let (id, fhir_user, roles) = (user.id.clone(), user.fhir_user.clone(), user.roles.clone());
    let client = client_id.map(str::to_string);
    move |a: &mut Agent| {
        a.subject = Some(id);
        a.user = fhir_user;
        a.roles = roles.split_whitespace().map(str::to_string).collect();
        a.client_id = client;
    }
}

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

pub async fn stylesheet() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .content_type("text/css; charset=utf-8")
        .body(pages::STYLESHEET)
}

// ---- the authorize flow ----

/// `GET /auth/authorize`: checks the request, then the sign-in (or, with a live session, the
/// consent page).
pub async fn authorize(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    let params: HashMap<String, String> = form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect();
    let fhir_base = state.base_url(&req);
    let s2 = srv.clone();
    let checked = blocking(move || Ok(s2.begin_authorize(&params, &fhir_base))).await?;
    let authz = match checked {
        Ok(r) => r,
        Err(AuthorizeFailure::Page(msg)) => {
            return Ok(html(StatusCode::BAD_REQUEST, pages::error("Cannot sign in", msg)));
        }
        Err(AuthorizeFailure::Redirect(url)) => return Ok(see_other(&url)),
        Err(AuthorizeFailure::Server(e)) => return Ok(server_error_page(&e)),
    };
    let sealed = srv.seal_request(&authz).map_err(|_| ApiError::Internal)?;
    if let Some(cookie) = session_cookie(&req) {
        let (s2, c2) = (srv.clone(), cookie.clone());
        if let Some((session, user)) = blocking(move || s2.session(&c2).map_err(internal)).await? {
            if signed_in(&state, &session, &user) {
                return consent_page(&state, &srv, &cookie, &user, &authz, &sealed, "", None).await;
            }
        }
    }
    Ok(html(StatusCode::OK, login_page(&authz, &sealed, None)))
}

pub(super) fn internal(e: OAuthError) -> ApiError {
    tracing::error!(error = %e, "authorization server error");
    ApiError::Internal
}

fn server_error_page(e: &OAuthError) -> HttpResponse {
    tracing::error!(error = %e, "authorization server error");
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        pages::error(
            "Something went wrong",
            "The server could not complete this step. Try again later.",
        ),
    )
}

fn expired_page() -> HttpResponse {
    html(
        StatusCode::BAD_REQUEST,
        pages::error(
            "Sign-in expired",
            "This sign-in took too long or was already used. Go back to the application and start again.",
        ),
    )
}

/// The sign-in form of an app's request, or of the console's.
pub(super) fn login_page(authz: &AuthzRequest, sealed: &str, error: Option<&str>) -> String {
    if is_console(authz) {
        pages::login(None, sealed, error)
    } else {
        pages::login(Some(&authz.client_name), sealed, error)
    }
}

const LOGIN_FAILED: &str = "The username or password is incorrect, or the account is locked.";

/// `POST /auth/login`.
pub async fn login(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    if let Some(retry) = throttled(&state, &req) {
        return Ok(too_many(retry, true));
    }
    let Ok(form) = parse_pairs(&body) else {
        return Ok(expired_page());
    };
    let Some(authz) = form.get("request").and_then(|r| srv.open_request(r)) else {
        return Ok(expired_page());
    };
    let sealed = form.get("request").cloned().unwrap_or_default();
    let username = form.get("username").cloned().unwrap_or_default();
    let password = zeroize::Zeroizing::new(form.get("password").cloned().unwrap_or_default());
    let s2 = srv.clone();
    let user = blocking(move || s2.login(&username, &password).map_err(internal)).await?;
    let Some(user) = user else {
        count_failure(&state, &req);
        let client = authz.client_id.clone();
        if audit(
            &state,
            &req,
            "login-failure",
            Outcome::MinorFailure,
            Some("wrong credentials"),
            |a| a.client_id = Some(client),
        )
        .await
        .is_err()
        {
            return Ok(unavailable());
        }
        return Ok(html(
            StatusCode::UNAUTHORIZED,
            login_page(&authz, &sealed, Some(LOGIN_FAILED)),
        ));
    };
    let needs_factor = state.config.auth_mfa_required || user.totp_secret.is_some();
    let (s2, u2) = (srv.clone(), user.clone());
    let cookie = blocking(move || s2.start_session(&u2, !needs_factor, "pwd").map_err(internal)).await?;
    let mut resp = if !needs_factor {
        if let Err(page) = audit_user(&state, &req, "login", Outcome::Success, None, &user, &authz.client_id).await {
            return Ok(page);
        }
        consent_page(&state, &srv, &cookie, &user, &authz, &sealed, "", None).await?
    } else if user.totp_secret.is_none() {
        enrol_page(&srv, &cookie, &user, &sealed, None, None)?
    } else {
        html(StatusCode::OK, pages::mfa(&sealed, &srv.csrf_token(&cookie), None))
    };
    set_cookie(&state, &mut resp, &cookie, None);
    Ok(resp)
}

fn enrol_page(
    srv: &AuthServer,
    cookie: &str,
    user: &UserRow,
    sealed: &str,
    pending: Option<&str>,
    error: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    // the same secret again after a wrong code; a new one the first time
    let secret = match pending.and_then(|p| srv.open_pending_totp(cookie, p)) {
        Some(s) => s,
        None => crate::auth::server::new_totp_secret(),
    };
    let pending = srv.seal_pending_totp(cookie, &secret).map_err(internal)?;
    let (text, uri) = crate::auth::server::totp_enrolment(&user.username, &secret);
    Ok(html(
        if error.is_some() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        },
        pages::enrol(sealed, &srv.csrf_token(cookie), &pending, &text, &uri, error),
    ))
}

/// The session of a form post, checked against its CSRF field; `None` when it is missing,
/// idle too long, or the field does not match.
async fn form_session(
    srv: &Arc<AuthServer>,
    req: &HttpRequest,
    form: &HashMap<String, String>,
) -> Result<Option<(String, crate::store::auth::SessionRow, UserRow)>, ApiError> {
    let Some(cookie) = session_cookie(req) else {
        return Ok(None);
    };
    if form.get("csrf").map(String::as_str) != Some(srv.csrf_token(&cookie).as_str()) {
        return Ok(None);
    }
    let (s2, c2) = (srv.clone(), cookie.clone());
    Ok(blocking(move || s2.session(&c2).map_err(internal))
        .await?
        .map(|(s, u)| (cookie, s, u)))
}

/// A sign-in form post past the checks every step makes: the server is on, the address is not
/// throttled, the sealed request is intact and current, and the session cookie matches the
/// form's CSRF field. `Err` holds the page to answer instead.
struct FormStep {
    srv: Arc<AuthServer>,
    form: HashMap<String, String>,
    sealed: String,
    authz: AuthzRequest,
    cookie: String,
    session: crate::store::auth::SessionRow,
    user: UserRow,
}

async fn form_step(
    req: &HttpRequest,
    state: &AppState,
    body: &[u8],
) -> Result<Result<FormStep, HttpResponse>, ApiError> {
    let srv = server(state)?;
    if let Some(retry) = throttled(state, req) {
        return Ok(Err(too_many(retry, true)));
    }
    let Ok(form) = parse_pairs(body) else {
        return Ok(Err(expired_page()));
    };
    let sealed = form.get("request").cloned().unwrap_or_default();
    let Some(authz) = srv.open_request(&sealed) else {
        return Ok(Err(expired_page()));
    };
    let Some((cookie, session, user)) = form_session(&srv, req, &form).await? else {
        return Ok(Err(expired_page()));
    };
    Ok(Ok(FormStep {
        srv,
        form,
        sealed,
        authz,
        cookie,
        session,
        user,
    }))
}

/// Whether a session has signed in completely (the second factor too, where one is needed).
pub(super) fn signed_in(state: &AppState, session: &crate::store::auth::SessionRow, user: &UserRow) -> bool {
    session.mfa_done || (!state.config.auth_mfa_required && user.totp_secret.is_none())
}

const CODE_FAILED: &str = "That code is not right (or was already used). Enter the current code.";

/// `POST /auth/mfa`: the second factor of an enrolled user.
pub async fn mfa(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let FormStep {
        srv,
        form,
        sealed,
        authz,
        cookie,
        session,
        user,
    } = match form_step(&req, &state, &body).await? {
        Ok(step) => step,
        Err(page) => return Ok(page),
    };
    if session.mfa_done {
        return consent_page(&state, &srv, &cookie, &user, &authz, &sealed, "", None).await;
    }
    let code = form.get("code").cloned().unwrap_or_default();
    let (s2, u2) = (srv.clone(), user.clone());
    let ok = blocking(move || {
        let ok = s2.verify_totp(&u2, &code).map_err(internal)?;
        if !ok {
            // wrong codes count toward the account's lockout like wrong passwords
            s2.record_factor_failure(&u2).map_err(internal)?;
        }
        Ok(ok)
    })
    .await?;
    if !ok {
        count_failure(&state, &req);
        if let Err(page) = audit_user(
            &state,
            &req,
            "login-failure",
            Outcome::MinorFailure,
            Some("wrong second factor"),
            &user,
            &authz.client_id,
        )
        .await
        {
            return Ok(page);
        }
        return Ok(html(
            StatusCode::UNAUTHORIZED,
            pages::mfa(&sealed, &srv.csrf_token(&cookie), Some(CODE_FAILED)),
        ));
    }
    finish_sign_in(&state, &req, &srv, &cookie, &user, &authz, &sealed, "login").await
}

/// The second factor was proven: the session is complete, the sign-in audited, consent next.
#[allow(clippy::too_many_arguments)]
async fn finish_sign_in(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    srv: &Arc<AuthServer>,
    cookie: &str,
    user: &UserRow,
    authz: &AuthzRequest,
    sealed: &str,
    event: &'static str,
) -> Result<HttpResponse, ApiError> {
    if let Err(page) = audit_user(state, req, event, Outcome::Success, None, user, &authz.client_id).await {
        return Ok(page);
    }
    let (s2, c2) = (srv.clone(), cookie.to_string());
    blocking(move || s2.complete_session(&c2, "pwd otp mfa").map_err(internal)).await?;
    consent_page(state, srv, cookie, user, authz, sealed, "", None).await
}

/// `POST /auth/mfa/enrol`: the first code from a newly added authenticator.
pub async fn enrol(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let FormStep {
        srv,
        form,
        sealed,
        authz,
        cookie,
        session,
        user,
    } = match form_step(&req, &state, &body).await? {
        Ok(step) => step,
        Err(page) => return Ok(page),
    };
    if session.mfa_done || user.totp_secret.is_some() {
        return Ok(expired_page());
    }
    let pending = form.get("pending").cloned().unwrap_or_default();
    let code = form.get("code").cloned().unwrap_or_default();
    let (s2, u2, c2, p2) = (srv.clone(), user.clone(), cookie.clone(), pending.clone());
    let ok = blocking(move || s2.enrol_totp(&c2, &u2, &p2, &code).map_err(internal)).await?;
    if !ok {
        count_failure(&state, &req);
        return enrol_page(&srv, &cookie, &user, &sealed, Some(&pending), Some(CODE_FAILED));
    }
    if let Err(page) = audit_user(
        &state,
        &req,
        "mfa-enrol",
        Outcome::Success,
        None,
        &user,
        &authz.client_id,
    )
    .await
    {
        return Ok(page);
    }
    finish_sign_in(&state, &req, &srv, &cookie, &user, &authz, &sealed, "login").await
}

/// The patients the user may choose for this request: those a read of Patient under the grant
/// the user is about to make would show (its scopes, the user's roles, the label rules).
fn patient_choices(
    state: &AppState,
    user: &UserRow,
    authz: &AuthzRequest,
    query: &str,
    only_id: Option<&str>,
) -> Result<Vec<PatientChoice>, ApiError> {
    use crate::auth::scope::{Permission, ScopeSet};
    let srv = server(state)?;
    let (scopes, _) = srv.scope_for_user(user, authz, Some("-"));
    let principal = crate::auth::Principal {
        subject: user.id.clone(),
        kind: crate::auth::PrincipalKind::User,
        scopes: ScopeSet::parse(&scopes.join(" "), |t| state.resource_types.contains(t)),
        patient: None,
        fhir_user: user.fhir_user.clone(),
        client_id: Some(authz.client_id.clone()),
        amr: vec!["pwd".into(), "otp".into(), "mfa".into()],
        roles: user.roles.split_whitespace().map(str::to_string).collect(),
        break_glass: false,
        purpose_of_use: None,
        token_id: String::new(),
        expires_at: 0,
    };
    let allowed = crate::auth::policy::authorize(&principal, "Patient", Permission::Read).is_ok_and(|d| d.unrestricted);
    if !allowed {
        return Ok(Vec::new());
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(id) = only_id {
        pairs.push(("_id".into(), id.to_string()));
    } else if !query.trim().is_empty() {
        pairs.push(("name".into(), query.trim().to_string()));
    }
    let store = state.store.clone();
    let parsed = match crate::search::query::parse(&state.search.current(), store.cipher(), "Patient", &pairs, 20, true)
    {
        Ok(p) => p,
        Err(_) => return Ok(Vec::new()),
    };
    let rows = store
        .search_contents(&crate::store::Access::All, &parsed.query)
        .map_err(|_| ApiError::Unavailable)?;
    let mut out = Vec::new();
    for (id, json) in rows {
        let Ok(mut patient) = serde_json::from_slice::<Value>(&json) else {
            continue;
        };
        if !parsed.rechecks.iter().all(|r| r.holds(&patient, store.cipher())) {
            continue;
        }
        if !state.attributes.labels_allow(&principal, &patient) {
            continue;
        }
        state.attributes.mask(&principal, "Patient", &mut patient);
        out.push(PatientChoice {
            label: patient_label(&patient, &id),
            id,
        });
    }
    Ok(out)
}

fn patient_label(p: &Value, id: &str) -> String {
    let name = p["name"].as_array().and_then(|n| n.first());
    let mut parts: Vec<String> = Vec::new();
    if let Some(n) = name {
        if let Some(given) = n["given"].as_array() {
            parts.extend(given.iter().filter_map(Value::as_str).map(str::to_string));
        }
        if let Some(f) = n["family"].as_str() {
            parts.push(f.to_string());
        }
        if parts.is_empty() {
            if let Some(t) = n["text"].as_str() {
                parts.push(t.to_string());
            }
        }
    }
    if parts.is_empty() {
        parts.push("(no name)".into());
    }
    let born = p["birthDate"]
        .as_str()
        .map(|b| format!(", born {b}"))
        .unwrap_or_default();
    format!("{}{born} (Patient/{id})", parts.join(" "))
}

#[allow(clippy::too_many_arguments)]
async fn consent_page(
    state: &web::Data<AppState>,
    srv: &Arc<AuthServer>,
    cookie: &str,
    user: &UserRow,
    authz: &AuthzRequest,
    sealed: &str,
    query: &str,
    error: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    // the console asks for no consent and is issued nothing: the signed-in session is its grant
    if is_console(authz) {
        return Ok(see_other(CONSOLE_HOME));
    }
    let picker = if authz.needs_patient_choice(user) {
        let choices = {
            let (st, u, a, q) = (state.clone(), user.clone(), authz.clone(), query.to_string());
            blocking(move || patient_choices(&st, &u, &a, &q, None)).await?
        };
        // the picker's search is a read of patient data: audited like one
        let patients: Vec<String> = choices.iter().map(|c| format!("Patient/{}", c.id)).collect();
        let mut agent = Agent {
            network: None,
            ..Agent::default()
        };
        user_agent(user, Some(&authz.client_id))(&mut agent);
        let mut record = AuditRecord::new(Kind::Rest("search-type"), Action::Read, agent);
        record.resource_type = Some("Patient".into());
        record.patients = patients
            .iter()
            .filter_map(|p| p.strip_prefix("Patient/"))
            .map(str::to_string)
            .collect();
        record.entities = patients;
        if !query.is_empty() {
            record.query = Some(format!("name={query}"));
        }
        if state.auditor.record(&record).await.is_err() {
            return Ok(unavailable());
        }
        Some((choices, query))
    } else {
        None
    };
    let (scopes, patient) = srv.scope_for_user(user, authz, Some("-"));
    let patient_note = if picker.is_none() {
        patient.map(|p| format!("Patient/{p}"))
    } else {
        None
    };
    let described: Vec<String> = scopes.iter().map(|s| crate::auth::server::describe_scope(s)).collect();
    let csrf = srv.csrf_token(cookie);
    let page = pages::consent(&Consent {
        client_name: &authz.client_name,
        username: &user.username,
        scopes: described,
        request: sealed,
        csrf: &csrf,
        picker,
        patient_note: patient_note.as_deref(),
        error,
    });
    Ok(html(
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        page,
    ))
}

/// `GET /auth/consent?request=…&q=…`: the consent page again, with a patient search.
pub async fn consent_search(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    let params: HashMap<String, String> = form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect();
    let sealed = params.get("request").cloned().unwrap_or_default();
    let Some(authz) = srv.open_request(&sealed) else {
        return Ok(expired_page());
    };
    let Some(cookie) = session_cookie(&req) else {
        return Ok(expired_page());
    };
    let (s2, c2) = (srv.clone(), cookie.clone());
    let Some((session, user)) = blocking(move || s2.session(&c2).map_err(internal)).await? else {
        return Ok(expired_page());
    };
    if !signed_in(&state, &session, &user) {
        return Ok(expired_page());
    }
    let q = params.get("q").cloned().unwrap_or_default();
    consent_page(&state, &srv, &cookie, &user, &authz, &sealed, &q, None).await
}

/// `POST /auth/consent`: allow (with the chosen patient) or deny; back to the application.
pub async fn consent(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let FormStep {
        srv,
        form,
        sealed,
        authz,
        cookie,
        session,
        user,
    } = match form_step(&req, &state, &body).await? {
        Ok(step) => step,
        Err(page) => return Ok(page),
    };
    if !signed_in(&state, &session, &user) {
        return Ok(expired_page());
    }
    if is_console(&authz) {
        return Ok(see_other(CONSOLE_HOME));
    }
    if form.get("decision").map(String::as_str) != Some("allow") {
        if let Err(page) = audit_user(
            &state,
            &req,
            "consent-denied",
            Outcome::Success,
            None,
            &user,
            &authz.client_id,
        )
        .await
        {
            return Ok(page);
        }
        return Ok(see_other(&srv.deny(&authz, "access_denied", "the user denied access")));
    }
    let mut chosen = None;
    if authz.needs_patient_choice(&user) {
        let Some(id) = form.get("patient").filter(|p| !p.is_empty()).cloned() else {
            return consent_page(
                &state,
                &srv,
                &cookie,
                &user,
                &authz,
                &sealed,
                "",
                Some("Choose a patient."),
            )
            .await;
        };
        // the choice must be one the picker could have shown
        let (st, u, a, i) = (state.clone(), user.clone(), authz.clone(), id.clone());
        let found = blocking(move || patient_choices(&st, &u, &a, "", Some(&i))).await?;
        if !found.iter().any(|c| c.id == id) {
            return consent_page(
                &state,
                &srv,
                &cookie,
                &user,
                &authz,
                &sealed,
                "",
                Some("Choose a patient from the list."),
            )
            .await;
        }
        chosen = Some(id);
    }
    let (s2, u2, a2) = (srv.clone(), user.clone(), authz.clone());
    let amr = session.amr.clone();
    let auth_time = session.created_at;
    let location = blocking(move || {
        s2.approve(&u2, &amr, auth_time, &a2, chosen.as_deref())
            .map_err(internal)
    })
    .await?;
    if let Err(page) = audit_user(&state, &req, "consent", Outcome::Success, None, &user, &authz.client_id).await {
        return Ok(page);
    }
    Ok(see_other(&location))
}

/// `POST /auth/logout`: ends the browser session.
pub async fn logout(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    if let Some(cookie) = session_cookie(&req) {
        let s2 = srv.clone();
        blocking(move || s2.end_session(&cookie).map_err(internal)).await?;
    }
    let mut resp = html(StatusCode::OK, pages::error("Signed out", "You are signed out."));
    set_cookie(&state, &mut resp, "", Some(0));
    Ok(resp)
}

// ---- OAuth endpoints ----

/// `POST /auth/token`.
pub async fn token(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    if let Some(retry) = throttled(&state, &req) {
        return Ok(too_many(retry, false));
    }
    let token_url = endpoint(&state, &req, "token");
    let basic = match basic_credentials(&req) {
        Ok(b) => b,
        Err(e) => return Ok(oauth_error(&e, true)),
    };
    let used_basic = basic.is_some();
    let form = match parse_form(&req, &body) {
        Ok(f) => f,
        Err(e) => return Ok(oauth_error(&e, used_basic)),
    };
    let claimed_client = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.0.clone()));
    let s2 = srv.clone();
    let types = state.resource_types.clone();
    let result = blocking(move || Ok(s2.token(&form, basic, &token_url, &|t| types.contains(t)))).await?;
    match result {
        Ok(issued) => {
            let (subject, user, client, patient) = (
                issued.subject.clone(),
                issued.fhir_user.clone(),
                issued.client_id.clone(),
                issued.patient.clone(),
            );
            audit(&state, &req, issued.event, Outcome::Success, None, move |a| {
                a.subject = Some(subject);
                a.user = user;
                a.client_id = Some(client);
                a.patient_context = patient;
            })
            .await?;
            Ok(json_response(StatusCode::OK, &issued.body))
        }
        Err(e) => {
            if !matches!(e, OAuthError::Server(_)) {
                count_failure(&state, &req);
                let reason = format!("{}: {e}", e.code());
                audit(
                    &state,
                    &req,
                    "token-failure",
                    Outcome::MinorFailure,
                    Some(&reason),
                    move |a| a.client_id = claimed_client,
                )
                .await?;
            }
            Ok(oauth_error(&e, used_basic))
        }
    }
}

/// The caller of introspection: a confidential client, or the bearer of a valid token.
async fn introspection_caller(
    state: &web::Data<AppState>,
    srv: &Arc<AuthServer>,
    req: &HttpRequest,
    form: &HashMap<String, String>,
    token_url: String,
) -> Result<String, OAuthError> {
    if bearer(req).is_some() {
        return state
            .authenticate(req)
            .map(|p| p.client_id.clone().unwrap_or_else(|| p.subject.clone()))
            .map_err(|_| OAuthError::InvalidToken);
    }
    let basic = basic_credentials(req)?;
    let (s2, f2) = (srv.clone(), form.clone());
    let client = blocking(move || Ok(s2.authenticate_client(&f2, basic, &token_url)))
        .await
        .map_err(|_| OAuthError::Server("introspection".into()))??;
    if client.client_type != "confidential" {
        return Err(OAuthError::InvalidClient("introspection needs a confidential client"));
    }
    Ok(client.client_id)
}

/// `POST /auth/introspect` (RFC 7662).
pub async fn introspect(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    if let Some(retry) = throttled(&state, &req) {
        return Ok(too_many(retry, false));
    }
    let form = match parse_form(&req, &body) {
        Ok(f) => f,
        Err(e) => return Ok(oauth_error(&e, false)),
    };
    let caller = match introspection_caller(&state, &srv, &req, &form, endpoint(&state, &req, "token")).await {
        Ok(c) => c,
        Err(e) => {
            count_failure(&state, &req);
            audit(
                &state,
                &req,
                "token-introspect",
                Outcome::MinorFailure,
                Some(e.code()),
                |_| {},
            )
            .await?;
            return Ok(oauth_error(&e, true));
        }
    };
    let Some(token) = form.get("token").filter(|t| !t.is_empty()).cloned() else {
        return Ok(oauth_error(&OAuthError::InvalidRequest("token is required"), false));
    };
    let (s2, st) = (srv.clone(), state.clone());
    let found = blocking(move || {
        s2.introspect(&token, |t| st.resource_types.contains(t))
            .map_err(internal)
    })
    .await?;
    let active = found.body["active"].as_bool().unwrap_or(false);
    audit(
        &state,
        &req,
        "token-introspect",
        Outcome::Success,
        Some(if active { "active" } else { "inactive" }),
        move |a| a.client_id = Some(caller),
    )
    .await?;
    Ok(json_response(StatusCode::OK, &found.body))
}

/// `POST /auth/revoke` (RFC 7009).
pub async fn revoke(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    if let Some(retry) = throttled(&state, &req) {
        return Ok(too_many(retry, false));
    }
    let basic = match basic_credentials(&req) {
        Ok(b) => b,
        Err(e) => return Ok(oauth_error(&e, true)),
    };
    let used_basic = basic.is_some();
    let form = match parse_form(&req, &body) {
        Ok(f) => f,
        Err(e) => return Ok(oauth_error(&e, used_basic)),
    };
    let Some(token) = form.get("token").filter(|t| !t.is_empty()).cloned() else {
        return Ok(oauth_error(
            &OAuthError::InvalidRequest("token is required"),
            used_basic,
        ));
    };
    let token_url = endpoint(&state, &req, "token");
    let (s2, st) = (srv.clone(), state.clone());
    let result = blocking(move || {
        Ok(s2.authenticate_client(&form, basic, &token_url).and_then(|client| {
            let revoked = s2.revoke(&client, &token, |t| st.resource_types.contains(t))?;
            Ok((client.client_id, revoked))
        }))
    })
    .await?;
    match result {
        Ok((client, revoked)) => {
            audit(
                &state,
                &req,
                "token-revoke",
                Outcome::Success,
                Some(if revoked { "revoked" } else { "nothing to revoke" }),
                move |a| a.client_id = Some(client),
            )
            .await?;
            Ok(json_response(StatusCode::OK, &json!({})))
        }
        Err(e) => {
            count_failure(&state, &req);
            audit(
                &state,
                &req,
                "token-revoke",
                Outcome::MinorFailure,
                Some(e.code()),
                |_| {},
            )
            .await?;
            Ok(oauth_error(&e, used_basic))
        }
    }
}

/// `GET|POST /auth/userinfo` (OpenID Connect).
pub async fn userinfo(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let srv = server(&state)?;
    let principal = match state.authenticate(&req) {
        Ok(p) => p,
        Err(_) => return Ok(oauth_error(&OAuthError::InvalidToken, false)),
    };
    let (s2, p2) = (srv.clone(), principal.clone());
    let result = blocking(move || Ok(s2.userinfo(&p2))).await?;
    let p3 = principal.clone();
    let fill = move |a: &mut Agent| {
        a.subject = Some(p3.subject.clone());
        a.user = p3.fhir_user.clone();
        a.client_id = p3.client_id.clone();
    };
    match result {
        Ok(body) => {
            audit(&state, &req, "userinfo", Outcome::Success, None, fill).await?;
            Ok(json_response(StatusCode::OK, &body))
        }
        Err(e) => {
            audit(&state, &req, "userinfo", Outcome::MinorFailure, Some(e.code()), fill).await?;
            Ok(oauth_error(&e, false))
        }
    }
}
