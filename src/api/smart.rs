//! The built-in authorization server's OAuth endpoints (`/auth/token`, `introspect`, `revoke`,
//! `userinfo`) and what its HTTP edge shares with the sign-in pages (`sign_in.rs`) and the
//! discovery documents (`discovery.rs`): form parsing, client credentials, the session cookie,
//! throttling and the audit of each step. Decisions are `auth::server`'s; these handlers parse,
//! call, audit and answer, with RFC 6749 JSON errors. Every sign-in, failure, token,
//! introspection and revocation is an AuditEvent, durable before the answer leaves (fail closed:
//! no event, no token).

use super::pages;
use super::{blocking, ApiError, AppState};
use crate::audit::{Action, Agent, AuditRecord, Kind, Outcome};
use crate::auth::server::{AuthServer, OAuthError};
use crate::store::auth::UserRow;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) const SESSION_COOKIE: &str = "fhirvault_session";
pub(super) const FORM: &str = "application/x-www-form-urlencoded";

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

pub(super) fn endpoint(state: &AppState, req: &HttpRequest, path: &str) -> String {
    format!("{}/auth/{path}", origin(state, req))
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::PRAGMA, "no-cache"))
        .content_type("application/json")
        .body(body.to_string())
}

pub(super) fn html(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

pub(super) fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

/// The authorization server, or 404 where it is turned off.
pub(super) fn server(state: &AppState) -> Result<Arc<AuthServer>, ApiError> {
    state
        .auth_server
        .clone()
        .ok_or(ApiError::NotFound("the built-in authorization server is turned off"))
}

/// A form body: each parameter once (a repeated one is refused, RFC 6749 §3.1).
pub(super) fn parse_form(req: &HttpRequest, body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
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

pub(super) fn parse_pairs(bytes: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(bytes) {
        if out.insert(k.into_owned(), v.into_owned()).is_some() {
            return Err(OAuthError::InvalidRequest("a parameter is repeated"));
        }
    }
    Ok(out)
}

/// HTTP Basic client credentials (RFC 6749 §2.3.1: both parts form-urlencoded).
pub(super) fn basic_credentials(req: &HttpRequest) -> Result<Option<(String, String)>, OAuthError> {
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

pub(super) fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

pub(super) fn oauth_error(e: &OAuthError, used_basic: bool) -> HttpResponse {
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
pub(super) async fn audit(
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
pub(super) async fn audit_user(
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
pub(super) fn unavailable() -> HttpResponse {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        pages::error(
            "Unavailable",
            "The server cannot record this sign-in step right now. Try again later.",
        ),
    )
}

/// 429 when the address has failed too often.
pub(super) fn throttled(state: &AppState, req: &HttpRequest) -> Option<u64> {
    let ip = req.peer_addr()?.ip();
    state
        .auth_failures
        .blocked(&crate::auth::limiter::FailureKey::Address(ip))
}

pub(super) fn count_failure(state: &AppState, req: &HttpRequest) {
    if let Some(a) = req.peer_addr() {
        state
            .auth_failures
            .record_failure(crate::auth::limiter::FailureKey::Address(a.ip()));
    }
}

pub(super) fn too_many(retry_after: u64, page: bool) -> HttpResponse {
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

pub(super) fn set_cookie(state: &AppState, resp: &mut HttpResponse, value: &str, max_age: Option<i64>) {
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

/// An authorization server failure, logged, as a 500 (no detail to the client).
pub(super) fn internal(e: OAuthError) -> ApiError {
    tracing::error!(error = %e, "authorization server error");
    ApiError::Internal
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
