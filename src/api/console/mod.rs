//! The compliance console (`/console`): the audit log with filters and paging, a patient's
//! access report, break-glass uses with their reasons and a "reviewed" action, users and clients
//! (admins: disable, enable, reset the second factor), and the compliance report of the last 30
//! days. A user signs in through the built-in authorization server's own pages (password, then
//! the second factor as configured); the console trusts that browser session, never a token.
//! Who may do what is `auth::console`'s; the rows are the store's; these handlers check, call,
//! audit and render. Every page and every action is an AuditEvent (subtype `console-…` for what
//! only the console does, the CLI's own subtype where the CLI does the same), recorded before the
//! page or the change: no event, no page.

mod audit_log;
mod pages;

use super::{blocking, ApiError, AppState};
use super::{sign_in, smart};
use crate::audit::{Action, Agent, AuditRecord, Kind, Outcome};
use crate::auth::console::{sign_in_request, ConsoleAction, ConsoleRole, CONSOLE_CLIENT_ID, CONSOLE_HOME};
use crate::store::auth::UserRow;
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use pages::{esc, Viewer};
use std::collections::HashMap;
use std::fmt::Write;

const SIGN_IN: &str = "/console/sign-in";

/// The console's routes (under `/console`, with its own CSP set by the caller).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("", web::get().to(overview))
        .route("/", web::get().to(overview))
        .route("/sign-in", web::get().to(sign_in))
        .route("/audit", web::get().to(audit_log::audit_log))
        .route("/access-report", web::get().to(audit_log::access_report))
        .route("/break-glass", web::get().to(break_glass))
        .route("/break-glass/review", web::post().to(review_break_glass))
        .route("/accounts", web::get().to(accounts))
        .route("/users/{action}", web::post().to(user_action))
        .route("/clients/disable", web::post().to(client_disable))
        .route("/report", web::get().to(report))
        .route("/report/download", web::get().to(report_download));
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

/// The signed-in officer of a console request.
pub(super) struct Officer {
    user: UserRow,
    role: ConsoleRole,
    csrf: String,
}

impl Officer {
    fn viewer(&self) -> Viewer<'_> {
        Viewer {
            username: &self.user.username,
            role: self.role,
        }
    }
}

/// The officer of this request if they may take `need`; else the answer: the sign-in when
/// there is no complete session (or the account was disabled since), 403 (audited) for a user
/// without the role, 404 where the built-in authorization server is off.
async fn gate(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    need: ConsoleAction,
) -> Result<Result<Officer, HttpResponse>, ApiError> {
    let Some(srv) = state.auth_server.clone() else {
        return Ok(Err(html(
            StatusCode::NOT_FOUND,
            pages::message(
                "Console unavailable",
                "The console signs in through the built-in authorization server, which is turned off here.",
            ),
        )));
    };
    let Some(cookie) = smart::session_cookie(req) else {
        return Ok(Err(see_other(SIGN_IN)));
    };
    let (s2, c2) = (srv.clone(), cookie.clone());
    let found = blocking(move || s2.session(&c2).map_err(smart::internal)).await?;
    let Some((_, user)) = found.filter(|(s, u)| sign_in::signed_in(state, s, u) && !u.disabled) else {
        return Ok(Err(see_other(SIGN_IN)));
    };
    let role = ConsoleRole::of(&user.roles);
    if let Some(role) = role.filter(|r| r.may(need)) {
        return Ok(Ok(Officer {
            csrf: srv.csrf_token(&cookie),
            user,
            role,
        }));
    }
    let mut record = record_for(req, &user, Kind::Admin("console-denied"), Action::Read);
    record.outcome = Outcome::MinorFailure;
    record.outcome_desc = Some(format!("{} is not allowed to {need:?}", user.username));
    record.query = Some(req.path().to_string());
    if let Err(page) = durable(state, &record).await {
        return Ok(Err(page));
    }
    let text = if role.is_some() {
        "This part of the console is for administrators."
    } else {
        "The console is for users with the auditor or admin role."
    };
    Ok(Err(html(StatusCode::FORBIDDEN, pages::message("Not allowed", text))))
}

/// An event of the console acting for `user`.
fn record_for(req: &HttpRequest, user: &UserRow, kind: Kind, action: Action) -> AuditRecord {
    let mut agent = Agent {
        network: req.peer_addr().map(|a| a.ip().to_string()),
        ..Agent::default()
    };
    smart::user_agent(user, Some(CONSOLE_CLIENT_ID))(&mut agent);
    AuditRecord::new(kind, action, agent)
}

/// Records an event and waits until it is durable; `Err` is the page to answer instead
/// (nothing shown, nothing changed).
async fn durable(state: &AppState, record: &AuditRecord) -> Result<(), HttpResponse> {
    state.auditor.record(record).await.map_err(|e| {
        tracing::error!(error = %e, "a console event could not be audited");
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message(
                "Unavailable",
                "The audit log cannot record this right now, so nothing was shown or changed. Try again later.",
            ),
        )
    })
}

/// A form post's fields, with the session's form token checked (`None`: refused).
fn form_fields(officer: &Officer, body: &[u8]) -> Option<HashMap<String, String>> {
    let fields: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    (fields.get("csrf").map(String::as_str) == Some(officer.csrf.as_str())).then_some(fields)
}

fn expired_form() -> HttpResponse {
    html(
        StatusCode::BAD_REQUEST,
        pages::message(
            "Form expired",
            "This form was not sent from the current console session. Go back, reload the page and try again.",
        ),
    )
}

fn query_map(req: &HttpRequest) -> HashMap<String, String> {
    form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect()
}

/// What a finished action says on the page it returns to (fixed texts, chosen by a code in the
/// URL: nothing the client typed is echoed).
fn done_notice(q: &HashMap<String, String>) -> Option<&'static str> {
    Some(match q.get("done")?.as_str() {
        "reviewed" => "The break-glass use is marked reviewed.",
        "already-reviewed" => "That use was already reviewed; the first review stands.",
        "user-disable" => "The user is disabled; their sessions and refresh tokens are ended.",
        "user-enable" => "The user is enabled.",
        "user-reset-mfa" => "The user's second factor is removed; they enrol again at their next sign-in.",
        "client-disable" => "The client is disabled; its refresh tokens are revoked.",
        "self" => "You cannot disable your own account or reset your own second factor here.",
        "missing" => "No such account.",
        _ => return None,
    })
}

fn instant(t: &chrono::NaiveDateTime) -> String {
    t.and_utc().format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `GET /console/sign-in`: the authorization server's sign-in form, for the console.
async fn sign_in(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(srv) = state.auth_server.clone() else {
        return Ok(html(
            StatusCode::NOT_FOUND,
            pages::message(
                "Console unavailable",
                "The console signs in through the built-in authorization server, which is turned off here.",
            ),
        ));
    };
    let request = sign_in_request(chrono::Utc::now().timestamp());
    let sealed = srv.seal_request(&request).map_err(|_| ApiError::Internal)?;
    Ok(html(StatusCode::OK, sign_in::login_page(&request, &sealed, None)))
}

/// `GET /console`: what needs attention.
async fn overview(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::Review).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let record = record_for(&req, &officer.user, Kind::Admin("console-overview"), Action::Read);
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    let now = crate::store::now();
    let st = state.clone();
    let uses = blocking(move || {
        st.store
            .break_glass_uses(now - chrono::Duration::days(30), now + chrono::Duration::seconds(1))
            .map_err(ApiError::from)
    })
    .await?;
    let open = uses.iter().filter(|u| u.reviewed_at.is_none()).count();
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>Break-glass uses in the last 30 days: <strong>{}</strong>, of which <strong>{open}</strong> not yet reviewed. \
         <a href=\"/console/break-glass\">Review them</a>.</p>\
         <ul><li><a href=\"/console/audit\">Search the audit log</a> by patient, user, client, type, outcome and date.</li>\
         <li><a href=\"/console/access-report\">A patient's access report</a>: who saw their record, when and why.</li>\
         <li><a href=\"/console/report\">The compliance report</a> of the last 30 days (45 CFR 164.312), to read or download.</li>",
        uses.len()
    );
    if officer.role.may(ConsoleAction::ManageAccounts) {
        body.push_str(
            "<li><a href=\"/console/accounts\">Users and clients</a>: disable, enable, reset a second factor.</li>",
        );
    }
    body.push_str("</ul>");
    Ok(html(
        StatusCode::OK,
        pages::page("Overview", CONSOLE_HOME, &officer.viewer(), &body),
    ))
}

/// `GET /console/break-glass?days=N`: every use in the period with its reason, its requests and
/// whether it was reviewed.
async fn break_glass(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::Review).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let q = query_map(&req);
    let days: i64 = q
        .get("days")
        .and_then(|d| d.parse().ok())
        .filter(|d| (1..=3650).contains(d))
        .unwrap_or(30);
    let mut record = record_for(&req, &officer.user, Kind::Admin("console-break-glass"), Action::Read);
    record.outcome_desc = Some(format!("break-glass uses of the last {days} days listed"));
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    // the requests' events are searched: this node's own must be derived first
    super::audit::own_events_settled(&state).await?;
    let now = crate::store::now();
    let st = state.clone();
    let rows = blocking(move || {
        let uses = st
            .store
            .break_glass_uses(now - chrono::Duration::days(days), now + chrono::Duration::seconds(1))
            .map_err(ApiError::from)?;
        let mut rows = Vec::new();
        for u in uses {
            let counted = st.store.break_glass_requests(&u, 1000)?;
            rows.push((u, counted));
        }
        Ok(rows)
    })
    .await?;
    let cipher = state.store.cipher();
    let mut table_rows = Vec::new();
    for (u, (requests, more)) in &rows {
        let reason = u.reason(cipher).map(|r| esc(&r)).unwrap_or_else(|| {
            "<em>the sealed reason does not open: run <code>fhirvault audit verify</code></em>".into()
        });
        let audit_link = format!(
            "/console/audit?user={}&from={}&to={}",
            form_urlencoded::byte_serialize(u.fhir_user.as_bytes()).collect::<String>(),
            u.issued_at.format("%Y-%m-%d"),
            u.expires_at.format("%Y-%m-%d")
        );
        let review = match (&u.reviewed_at, &u.reviewed_by) {
            (Some(at), by) => format!("Reviewed by {} at {}", esc(by.as_deref().unwrap_or("?")), instant(at)),
            (None, _) => pages::action_button(
                "/console/break-glass/review",
                "Mark reviewed",
                &[("token", &u.token_id)],
                &officer.csrf,
            ),
        };
        table_rows.push(vec![
            instant(&u.issued_at),
            instant(&u.expires_at),
            esc(&u.fhir_user),
            esc(u.client_id.as_deref().unwrap_or("-")),
            reason,
            format!(
                "<a href=\"{}\">{requests}{} request{}</a>",
                esc(&audit_link),
                if *more { "+" } else { "" },
                if *requests == 1 && !*more { "" } else { "s" }
            ),
            review,
        ]);
    }
    let body = format!(
        "{}<p>Every emergency access (purpose of use BTG) issued in the last {days} days, newest first. \
         The reason is stored sealed and shown only here and in the compliance report.</p>{}",
        pages::notice(done_notice(&q)),
        pages::table(
            "Break-glass uses",
            &[
                "Issued",
                "Window ends",
                "User",
                "Client",
                "Reason",
                "Requests",
                "Review"
            ],
            &table_rows
        )
    );
    Ok(html(
        StatusCode::OK,
        pages::page("Break-glass uses", "/console/break-glass", &officer.viewer(), &body),
    ))
}

/// `POST /console/break-glass/review`: marks a use reviewed (once), audited.
async fn review_break_glass(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::ReviewBreakGlass).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let Some(form) = form_fields(&officer, &body) else {
        return Ok(expired_form());
    };
    let token = form.get("token").cloned().unwrap_or_default();
    let st = state.clone();
    let t2 = token.clone();
    let Some(found) = blocking(move || st.store.break_glass_use(&t2).map_err(ApiError::from)).await? else {
        return Ok(html(
            StatusCode::NOT_FOUND,
            pages::message("Not found", "There is no such break-glass use."),
        ));
    };
    let mut record = record_for(&req, &officer.user, Kind::Admin("break-glass-review"), Action::Update);
    record.entities.push(found.fhir_user.clone());
    record.outcome_desc = Some(format!("break-glass use {} reviewed", found.token_id));
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    let (st, reviewer) = (state.clone(), officer.user.username.clone());
    let first = blocking(move || st.store.break_glass_review(&token, &reviewer).map_err(ApiError::from)).await?;
    Ok(see_other(if first {
        "/console/break-glass?done=reviewed"
    } else {
        "/console/break-glass?done=already-reviewed"
    }))
}

/// `GET /console/accounts` (admins): users and clients with their state and actions.
async fn accounts(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::ManageAccounts).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let mut record = record_for(&req, &officer.user, Kind::Admin("user-list"), Action::Read);
    record.outcome_desc = Some("users and clients listed".into());
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    let st = state.clone();
    let (users, clients, (user_use, client_use)) = blocking(move || {
        Ok((
            st.store.auth_users()?,
            st.store.auth_clients()?,
            st.store.auth_last_use()?,
        ))
    })
    .await?;
    let used: HashMap<String, Option<chrono::NaiveDateTime>> = user_use.into_iter().chain(client_use).collect();
    let last = |k: &str| {
        used.get(k)
            .copied()
            .flatten()
            .map(|t| instant(&t))
            .unwrap_or_else(|| "never".into())
    };
    let now = crate::store::now();
    let csrf = &officer.csrf;
    let user_rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            let status = if u.disabled {
                "disabled".to_string()
            } else if let Some(t) = u.locked_until.filter(|t| *t > now) {
                format!("locked until {}", instant(&t))
            } else {
                "active".to_string()
            };
            let mut actions = String::new();
            let name = u.username.as_str();
            if name == officer.user.username {
                // an admin does not lock themselves out from here
                actions.push_str("<span class=\"note\">your account</span>");
            } else if u.disabled {
                actions.push_str(&pages::action_button(
                    "/console/users/enable",
                    "Enable",
                    &[("username", name)],
                    csrf,
                ));
            } else {
                actions.push_str(&pages::action_button(
                    "/console/users/disable",
                    &format!("Disable {name}"),
                    &[("username", name)],
                    csrf,
                ));
            }
            if u.totp_secret.is_some() && name != officer.user.username {
                actions.push_str(&pages::action_button(
                    "/console/users/reset-mfa",
                    &format!("Reset second factor of {name}"),
                    &[("username", name)],
                    csrf,
                ));
            }
            vec![
                esc(name),
                esc(&u.roles),
                esc(u.fhir_user.as_deref().unwrap_or("-")),
                if u.totp_secret.is_some() { "enrolled" } else { "none" }.to_string(),
                status,
                last(name),
                actions,
            ]
        })
        .collect();
    let client_rows: Vec<Vec<String>> = clients
        .iter()
        .map(|c| {
            let action = if c.disabled {
                String::new()
            } else {
                pages::action_button(
                    "/console/clients/disable",
                    &format!("Disable {}", c.client_id),
                    &[("client_id", &c.client_id)],
                    csrf,
                )
            };
            vec![
                esc(&c.client_id),
                esc(&c.name),
                esc(&c.client_type),
                esc(&c.scopes),
                if c.disabled { "disabled" } else { "active" }.to_string(),
                last(&c.client_id),
                action,
            ]
        })
        .collect();
    let body = format!(
        "{}{}{}",
        pages::notice(done_notice(&query_map(&req))),
        pages::table(
            "Users",
            &[
                "Username",
                "Roles",
                "FHIR user",
                "Second factor",
                "Status",
                "Last sign-in",
                "Actions"
            ],
            &user_rows
        ),
        pages::table(
            "Clients",
            &["Client id", "Name", "Type", "Scopes", "Status", "Last token", "Actions"],
            &client_rows
        )
    );
    Ok(html(
        StatusCode::OK,
        pages::page("Users and clients", "/console/accounts", &officer.viewer(), &body),
    ))
}

/// `POST /console/users/{disable|enable|reset-mfa}` (admins), audited before the change.
async fn user_action(
    req: HttpRequest,
    state: web::Data<AppState>,
    action: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::ManageAccounts).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let event: &'static str = match action.as_str() {
        "disable" => "user-disable",
        "enable" => "user-enable",
        "reset-mfa" => "user-reset-mfa",
        _ => {
            return Ok(html(
                StatusCode::NOT_FOUND,
                pages::message("Not found", "There is no such action."),
            ))
        }
    };
    let Some(form) = form_fields(&officer, &body) else {
        return Ok(expired_form());
    };
    let username = form.get("username").cloned().unwrap_or_default();
    if username == officer.user.username && event != "user-enable" {
        return Ok(see_other("/console/accounts?done=self"));
    }
    let mut record = record_for(&req, &officer.user, Kind::Admin(event), Action::Update);
    record.outcome_desc = Some(format!("user {username}"));
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    let st = state.clone();
    let found = blocking(move || {
        match event {
            "user-disable" => st.store.auth_user_set_disabled(&username, true),
            "user-enable" => st.store.auth_user_set_disabled(&username, false),
            _ => st.store.auth_user_reset_mfa(&username),
        }
        .map_err(ApiError::from)
    })
    .await?;
    Ok(see_other(&format!(
        "/console/accounts?done={}",
        if found { event } else { "missing" }
    )))
}

/// `POST /console/clients/disable` (admins), audited before the change.
async fn client_disable(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::ManageAccounts).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let Some(form) = form_fields(&officer, &body) else {
        return Ok(expired_form());
    };
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    let mut record = record_for(&req, &officer.user, Kind::Admin("client-disable"), Action::Update);
    record.outcome_desc = Some(format!("client {client_id}"));
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    let st = state.clone();
    let found = blocking(move || st.store.auth_client_disable(&client_id).map_err(ApiError::from)).await?;
    Ok(see_other(if found {
        "/console/accounts?done=client-disable"
    } else {
        "/console/accounts?done=missing"
    }))
}

/// The compliance report of the last 30 days, built on this node from the live deployment (the
/// audit chains verified end to end against the signed checkpoints).
async fn build_report(state: &web::Data<AppState>) -> Result<crate::compliance::Report, ApiError> {
    let st = state.clone();
    blocking(move || {
        let config = &st.config;
        let failed = |e: anyhow::Error| {
            tracing::error!(error = %format!("{e:#}"), "the compliance report could not be built");
            ApiError::Internal
        };
        let keys = crate::server::open_keys(config).map_err(failed)?;
        let (key, file) = crate::server::audit_checkpointing(config).map_err(failed)?;
        let now = crate::store::now();
        let inputs = crate::compliance::Inputs {
            config,
            store: &st.store,
            keys: &keys,
            checkpoint_key: &key,
            checkpoint_files: &[file],
            since: now - chrono::Duration::days(30),
            now,
        };
        crate::compliance::report(&inputs, |_| {}).map_err(failed)
    })
    .await
}

async fn report_event(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    officer: &Officer,
    what: &str,
) -> Result<(), HttpResponse> {
    let mut record = record_for(req, &officer.user, Kind::Admin("compliance-report"), Action::Read);
    record.outcome_desc = Some(format!("compliance report of the last 30 days {what}"));
    durable(state, &record).await
}

/// `GET /console/report`: the report, in the console.
async fn report(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::Review).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    if let Err(page) = report_event(&req, &state, &officer, "viewed").await {
        return Ok(page);
    }
    let report = build_report(&state).await?;
    let mut body = format!(
        "<p>Generated {} for the period from {}. \
         <a href=\"/console/report/download?format=html\" download>Download as HTML</a> (one self-contained file that prints) · \
         <a href=\"/console/report/download?format=json\" download>Download as JSON</a> (for GRC tools).</p>",
        esc(&report.generated),
        esc(&report.period_start)
    );
    for s in &report.sections {
        let rows: Vec<Vec<String>> = s
            .checks
            .iter()
            .map(|c| {
                vec![
                    esc(&c.name),
                    format!("<span class=\"{0}\">{0}</span>", c.verdict.as_str()),
                    esc(&c.reason),
                    format!(
                        "<pre>{}</pre>",
                        esc(&serde_json::to_string_pretty(&c.evidence).unwrap_or_default())
                    ),
                ]
            })
            .collect();
        let _ = write!(
            body,
            "<h2>{0} {1}: <span class=\"{2}\">{2}</span></h2>{3}",
            esc(&s.citation),
            esc(&s.title),
            s.verdict().as_str(),
            pages::table(&s.title, &["Check", "Verdict", "Reason", "Evidence"], &rows)
        );
    }
    Ok(html(
        StatusCode::OK,
        pages::page("Compliance report", "/console/report", &officer.viewer(), &body),
    ))
}

/// `GET /console/report/download?format=html|json`: the report as a file.
async fn report_download(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::Review).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let format = query_map(&req).get("format").cloned().unwrap_or_else(|| "html".into());
    if format != "html" && format != "json" {
        return Ok(html(
            StatusCode::BAD_REQUEST,
            pages::message("Unknown format", "The report downloads as html or json."),
        ));
    }
    if let Err(page) = report_event(&req, &state, &officer, &format!("downloaded as {format}")).await {
        return Ok(page);
    }
    let report = build_report(&state).await?;
    let day = crate::store::now().format("%Y-%m-%d");
    let (body, content_type) = if format == "json" {
        (
            serde_json::to_vec_pretty(&report.to_json()).map_err(|_| ApiError::Internal)?,
            "application/json",
        )
    } else {
        (
            crate::compliance::html::render(&report).into_bytes(),
            "text/html; charset=utf-8",
        )
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"fhirvault-compliance-{day}.{format}\""),
        ))
        // the file carries its own style (self-contained): allowed by its hash, nothing else
        .insert_header((header::CONTENT_SECURITY_POLICY, crate::compliance::html::CSP.as_str()))
        .body(body))
}
