//! The console's audit log and a patient's access report: the AuditEvent search of the FHIR API
//! (the same parser and the same derived rows, `store::audit::search`), newest first, paged by
//! the last event id shown. A client filter is checked on each decrypted event (the derived rows
//! index the acting user, not the app a user acted through), scanning a bounded number of events
//! per page.

use super::pages::{self, esc};
use super::{durable, gate, html, query_map, record_for};
use crate::api::{blocking, ApiError, AppState};
use crate::audit::{Action, Kind};
use crate::auth::console::ConsoleAction;
use crate::fhir::resource::is_valid_id;
use crate::store::Access;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::Value;
use std::fmt::Write;

/// Events per page.
const PAGE: usize = 50;
/// Events examined per page at most when a filter is checked on the decrypted events.
const SCAN: usize = 2_000;

/// The filters of the audit log page (as typed; checked by [`Filter::pairs`]).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub patient: String,
    pub user: String,
    pub client: String,
    pub event_type: String,
    pub subtype: String,
    pub outcome: String,
    /// `YYYY-MM-DD` or an instant: events at or after.
    pub from: String,
    /// `YYYY-MM-DD` (through that day) or an instant: events at or before.
    pub to: String,
    /// Paging: events older than this event id.
    pub after: String,
}

/// The event types the log holds: (code, label).
const TYPES: &[(&str, &str)] = &[
    ("", "Any"),
    ("rest", "RESTful operation"),
    ("110114", "User authentication"),
    ("110100", "Application activity"),
    ("110106", "Export (notification)"),
];
const OUTCOMES: &[(&str, &str)] = &[
    ("", "Any"),
    ("0", "Success"),
    ("4", "Minor failure"),
    ("8", "Serious failure"),
    ("12", "Major failure"),
];

impl Filter {
    fn from_query(q: &std::collections::HashMap<String, String>) -> Filter {
        let get = |k: &str| q.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
        Filter {
            patient: get("patient"),
            user: get("user"),
            client: get("client"),
            event_type: get("type"),
            subtype: get("subtype"),
            outcome: get("outcome"),
            from: get("from"),
            to: get("to"),
            after: get("after"),
        }
    }

    /// The AuditEvent search these filters make, or what is wrong with one of them.
    fn pairs(&self) -> Result<Vec<(String, String)>, &'static str> {
        let mut pairs = Vec::new();
        if !self.patient.is_empty() {
            let id = self.patient.strip_prefix("Patient/").unwrap_or(&self.patient);
            if !is_valid_id(id) {
                return Err("The patient must be a Patient id (such as 123 or Patient/123).");
            }
            pairs.push(("patient".into(), format!("Patient/{id}")));
        }
        if !self.user.is_empty() {
            if self.user.contains(',') {
                return Err("The user is one reference or name (no commas).");
            }
            pairs.push(("agent".into(), self.user.clone()));
        }
        if !self.event_type.is_empty() {
            if !TYPES.iter().any(|(c, _)| *c == self.event_type) {
                return Err("Choose a type from the list.");
            }
            pairs.push(("type".into(), self.event_type.clone()));
        }
        if !self.subtype.is_empty() {
            if !self.subtype.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err("The subtype is a code such as read, search-type or login-failure.");
            }
            pairs.push(("subtype".into(), self.subtype.clone()));
        }
        if !self.outcome.is_empty() {
            if !OUTCOMES.iter().any(|(c, _)| *c == self.outcome) {
                return Err("Choose an outcome from the list.");
            }
            pairs.push(("outcome".into(), self.outcome.clone()));
        }
        for (value, prefix) in [(&self.from, "ge"), (&self.to, "le")] {
            if value.is_empty() {
                continue;
            }
            if !value.chars().all(|c| c.is_ascii_digit() || "-:TZ+.".contains(c)) {
                return Err("Dates are YYYY-MM-DD.");
            }
            pairs.push(("date".into(), format!("{prefix}{value}")));
        }
        pairs.push(("_count".into(), PAGE.to_string()));
        Ok(pairs)
    }

    /// The page's query string without the cursor (for the next page's link).
    fn query_string(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("patient", &self.patient),
            ("user", &self.user),
            ("client", &self.client),
            ("type", &self.event_type),
            ("subtype", &self.subtype),
            ("outcome", &self.outcome),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.is_empty() {
                s.append_pair(k, v);
            }
        }
        s.finish()
    }

    /// What the filters were, for the page's own audit event (stored sealed: a patient id is
    /// PHI).
    fn described(&self) -> String {
        let q = self.query_string();
        if q.is_empty() {
            "(no filter)".into()
        } else {
            q
        }
    }

    /// Whether a decrypted event passes the filters the search cannot apply.
    fn admits(&self, ev: &Value) -> bool {
        let agents = ev.get("agent").and_then(Value::as_array);
        let client_ok = self.client.is_empty()
            || agents.into_iter().flatten().any(|a| {
                a.pointer("/who/identifier/system").and_then(Value::as_str) == Some("urn:fhirvault:client-id")
                    && a.pointer("/who/identifier/value").and_then(Value::as_str) == Some(self.client.as_str())
            });
        client_ok
    }
}

/// A page of events.
pub struct Found {
    pub events: Vec<Value>,
    /// The cursor of the next page, when there is more.
    pub next: Option<String>,
}

/// Runs the filters' search: up to `want` events passing every filter, examining at most
/// `scan` when some are checked on the decrypted events.
pub fn search(state: &AppState, filter: &Filter, want: usize, scan: usize) -> Result<Found, ApiError> {
    let pairs = filter
        .pairs()
        .map_err(|m| ApiError::bad_request(crate::fhir::IssueType::Invalid, m))?;
    let cipher = state.store.cipher();
    let mut parsed =
        crate::search::query::parse(&state.search.current(), cipher, "AuditEvent", &pairs, PAGE as u32, true)?;
    let post_filtered = !filter.client.is_empty();
    parsed.query.count = if post_filtered { 200 } else { want as u32 };
    parsed.query.total = false;
    let mut after = (!filter.after.is_empty()).then(|| filter.after.clone());
    if after.as_deref().is_some_and(|a| !is_valid_id(a)) {
        return Err(ApiError::bad_request(
            crate::fhir::IssueType::Invalid,
            "invalid page cursor",
        ));
    }
    let mut events = Vec::new();
    let mut scanned = 0;
    loop {
        parsed.query.after = after.clone().map(|id| ("AuditEvent".to_string(), id));
        let page = state.store.search(&Access::All, &parsed.query)?;
        let mut last = None;
        for v in &page.entries {
            scanned += 1;
            last = Some(v.logical_id.clone());
            let Some(content) = &v.content else { continue };
            let mut value: Value = serde_json::from_slice(content).map_err(|_| ApiError::Internal)?;
            crate::audit::event::reveal_query(&mut value, cipher);
            if filter.admits(&value) {
                events.push(value);
                if events.len() == want {
                    let more = page.more
                        || v.logical_id != page.entries.last().map(|l| l.logical_id.clone()).unwrap_or_default();
                    return Ok(Found {
                        events,
                        next: more.then(|| v.logical_id.clone()),
                    });
                }
            }
        }
        if !page.more || last.is_none() {
            return Ok(Found { events, next: None });
        }
        if scanned >= scan {
            // a bounded page: the officer goes on from where the scan stopped
            return Ok(Found { events, next: last });
        }
        after = last;
    }
}

fn outcome_label(code: &str) -> &'static str {
    OUTCOMES
        .iter()
        .find(|(c, _)| *c == code && !c.is_empty())
        .map(|(_, l)| *l)
        .unwrap_or("?")
}

/// One event as a table row.
fn row(ev: &Value) -> Vec<String> {
    let s = |p: &str| ev.pointer(p).and_then(Value::as_str).unwrap_or("");
    let agents: Vec<&Value> = ev
        .get("agent")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let user = agents
        .first()
        .map(|a| {
            a.pointer("/who/reference")
                .or_else(|| a.pointer("/who/identifier/value"))
                .or_else(|| a.pointer("/who/display"))
                .and_then(Value::as_str)
                .unwrap_or("")
        })
        .unwrap_or("");
    let client = agents.get(1).map_or("", |a| {
        a.pointer("/who/identifier/value")
            .and_then(Value::as_str)
            .unwrap_or("-")
    });
    let address = agents
        .get(1)
        .and_then(|a| a.pointer("/network/address"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let purpose = ev
        .pointer("/purposeOfEvent/0/coding/0/code")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut what = Vec::new();
    let mut query = String::new();
    for e in ev.get("entity").and_then(Value::as_array).into_iter().flatten() {
        if let Some(r) = e.pointer("/what/reference").and_then(Value::as_str) {
            what.push(esc(r));
        }
        if let Some(q) = e.get("query").and_then(Value::as_str) {
            let text = base64::engine::general_purpose::STANDARD
                .decode(q)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            query = format!("<code>{}</code>", esc(&text));
        }
    }
    let outcome = s("/outcome");
    let mut outcome_cell = esc(outcome_label(outcome));
    if let Some(d) = ev.get("outcomeDesc").and_then(Value::as_str) {
        let _ = write!(outcome_cell, ": {}", esc(d));
    }
    vec![
        esc(s("/recorded")),
        format!("{} <code>{}</code>", esc(s("/type/display")), esc(s("/subtype/0/code"))),
        esc(s("/action")),
        outcome_cell,
        esc(user),
        esc(client),
        esc(address),
        esc(purpose),
        what.join("<br>"),
        query,
    ]
}

const COLUMNS: &[&str] = &[
    "Recorded", "Event", "Action", "Outcome", "User", "Client", "Address", "Purpose", "Entities", "Query",
];

fn filter_form(f: &Filter) -> String {
    format!(
        "<form method=\"get\" action=\"/console/audit\" class=\"filters\" role=\"search\" aria-label=\"Filter the audit log\">\
         {}{}{}{}{}{}{}{}<div><button type=\"submit\">Search</button></div></form>",
        pages::field("patient", "Patient", &f.patient, "text"),
        pages::field("user", "User", &f.user, "text"),
        pages::field("client", "Client", &f.client, "text"),
        pages::select("type", "Type", &f.event_type, TYPES),
        pages::field("subtype", "Subtype", &f.subtype, "text"),
        pages::select("outcome", "Outcome", &f.outcome, OUTCOMES),
        pages::field("from", "From (date)", &f.from, "date"),
        pages::field("to", "To (date)", &f.to, "date"),
    )
}

fn results(found: &Found, caption: &str, next_base: &str) -> String {
    let rows: Vec<Vec<String>> = found.events.iter().map(row).collect();
    let mut out = format!(
        "<p role=\"status\">{} event{} shown, newest first.</p>{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        pages::table(caption, COLUMNS, &rows)
    );
    if let Some(next) = &found.next {
        let sep = if next_base.contains('?') { "&" } else { "?" };
        let _ = write!(
            out,
            "<p><a href=\"{}{sep}after={}\" rel=\"next\">Older events</a></p>",
            esc(next_base),
            esc(next)
        );
    }
    out
}

/// `GET /console/audit`: the audit log, filtered and paged.
pub async fn audit_log(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::Review).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let filter = Filter::from_query(&query_map(&req));
    let mut record = record_for(&req, &officer.user, Kind::Admin("console-audit-log"), Action::Read);
    record.resource_type = Some("AuditEvent".into());
    record.query = Some(filter.described());
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    let mut body = filter_form(&filter);
    match filter.pairs() {
        Err(message) => {
            let _ = write!(body, "<p class=\"alert\" role=\"alert\">{}</p>", esc(message));
            return Ok(html(
                StatusCode::BAD_REQUEST,
                pages::page("Audit log", "/console/audit", &officer.viewer(), &body),
            ));
        }
        Ok(_) => {
            crate::api::audit::own_events_settled(&state).await?;
            let (st, f) = (state.clone(), filter.clone());
            let found = blocking(move || search(&st, &f, PAGE, SCAN)).await?;
            let next_base = format!("/console/audit?{}", filter.query_string());
            body.push_str(&results(&found, "Audit events", &next_base));
        }
    }
    Ok(html(
        StatusCode::OK,
        pages::page("Audit log", "/console/audit", &officer.viewer(), &body),
    ))
}

/// `GET /console/access-report?patient=ID`: who accessed a patient's record, when and why.
pub async fn access_report(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let officer = match gate(&req, &state, ConsoleAction::Review).await? {
        Ok(o) => o,
        Err(page) => return Ok(page),
    };
    let q = query_map(&req);
    let patient = q.get("patient").map(|p| p.trim().to_string()).unwrap_or_default();
    let id = patient.strip_prefix("Patient/").unwrap_or(&patient).to_string();
    let mut body = format!(
        "<form method=\"get\" action=\"/console/access-report\" class=\"filters\" role=\"search\" aria-label=\"Choose the patient\">\
         {}<div><button type=\"submit\">Show accesses</button></div></form>",
        pages::field("patient", "Patient id", &patient, "text")
    );
    if patient.is_empty() {
        let record = record_for(&req, &officer.user, Kind::Admin("console-access-report"), Action::Read);
        if let Err(page) = durable(&state, &record).await {
            return Ok(page);
        }
        return Ok(html(
            StatusCode::OK,
            pages::page(
                "Patient access report",
                "/console/access-report",
                &officer.viewer(),
                &body,
            ),
        ));
    }
    if !is_valid_id(&id) {
        body.push_str(
            "<p class=\"alert\" role=\"alert\">The patient must be a Patient id (such as 123 or Patient/123).</p>",
        );
        return Ok(html(
            StatusCode::BAD_REQUEST,
            pages::page(
                "Patient access report",
                "/console/access-report",
                &officer.viewer(),
                &body,
            ),
        ));
    }
    let mut record = record_for(&req, &officer.user, Kind::Admin("console-access-report"), Action::Read);
    record.patients.insert(id.clone());
    record.entities.push(format!("Patient/{id}"));
    if let Err(page) = durable(&state, &record).await {
        return Ok(page);
    }
    crate::api::audit::own_events_settled(&state).await?;
    let filter = Filter {
        patient: id.clone(),
        after: q.get("after").cloned().unwrap_or_default(),
        ..Default::default()
    };
    let (st, f) = (state.clone(), filter.clone());
    let found = blocking(move || search(&st, &f, PAGE, SCAN)).await?;
    let next_base = format!("/console/access-report?patient={id}");
    body.push_str(&results(&found, &format!("Accesses to Patient/{id}"), &next_base));
    Ok(html(
        StatusCode::OK,
        pages::page(
            "Patient access report",
            "/console/access-report",
            &officer.viewer(),
            &body,
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_make_an_audit_event_search_and_refuse_what_is_not_one() {
        let f = Filter {
            patient: "Patient/p-1".into(),
            user: "Practitioner/7".into(),
            event_type: "rest".into(),
            outcome: "4".into(),
            from: "2026-12-01".into(),
            to: "2026-12-07".into(),
            ..Default::default()
        };
        let pairs = f.pairs().unwrap();
        assert!(pairs.contains(&("patient".into(), "Patient/p-1".into())));
        assert!(pairs.contains(&("agent".into(), "Practitioner/7".into())));
        assert!(pairs.contains(&("date".into(), "ge2026-12-01".into())));
        assert!(pairs.contains(&("date".into(), "le2026-12-07".into())));
        for bad in [
            Filter {
                patient: "a b".into(),
                ..Default::default()
            },
            Filter {
                event_type: "other".into(),
                ..Default::default()
            },
            Filter {
                outcome: "1".into(),
                ..Default::default()
            },
            Filter {
                from: "yesterday".into(),
                ..Default::default()
            },
            Filter {
                user: "a,b".into(),
                ..Default::default()
            },
        ] {
            assert!(bad.pairs().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_client_is_checked_on_the_event() {
        let ev = json!({
            "agent": [{"who": {"reference": "Practitioner/1"}},
                      {"who": {"identifier": {"system": "urn:fhirvault:client-id", "value": "app-1"}}}]
        });
        let mut f = Filter {
            client: "app-1".into(),
            ..Default::default()
        };
        assert!(f.admits(&ev));
        f.client = "app-2".into();
        assert!(!f.admits(&ev));
        // the user's identifier is not a client
        f.client = "Practitioner/1".into();
        assert!(!f.admits(&ev));
    }
}
