//! The built-in authorization server's pages (`/auth/authorize`, `login`, `mfa`, `mfa/enrol`,
//! `consent`, `logout`): sign-in with password and second factor (TOTP, enrolled on first use),
//! consent with the patient picker, and the console's sign-in, which leads back to `/console`
//! instead of consent. Server-rendered HTML (`pages.rs`); every step is audited before it
//! answers.

use super::pages::{self, Consent, PatientChoice};
use super::smart::{
    audit, audit_user, count_failure, html, internal, parse_pairs, see_other, server, session_cookie, set_cookie,
    throttled, too_many, unavailable, user_agent,
};
use super::{blocking, ApiError, AppState};
use crate::audit::{Action, Agent, AuditRecord, Kind, Outcome};
use crate::auth::console::{is_console, CONSOLE_HOME};
use crate::auth::server::{AuthServer, AuthorizeFailure, AuthzRequest, OAuthError};
use crate::store::auth::UserRow;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

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
