//! Reading the audit log over FHIR: `GET AuditEvent/{id}`, AuditEvent search (`date`, `agent`,
//! `entity`, `patient`, `type`, `subtype`, `action`, `outcome`), and
//! `GET Patient/{id}/$access-report`, which shows a patient who accessed their record, when and
//! why, without anyone else's data. Every one of these reads is itself audited by the router.

use super::history::PageTokens;
use super::negotiate::query_pairs;
use super::trail::Trail;
use super::{blocking, ApiError, AppState, Format};
use crate::auth::policy::{authorize_access_report, authorize_audit_log};
use crate::auth::{Permission, Principal};
use crate::fhir::resource::{instant, is_valid_id};
use crate::fhir::IssueType;
use crate::store::audit::{event_aad, AuditQuery, StoredAuditEvent};
use crate::store::now;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{NaiveDate, NaiveDateTime};
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn read(
    req: HttpRequest,
    p: Arc<Principal>,
    id: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize_audit_log(&p, Permission::Read)?;
    let fmt = Format::negotiate(&req)?;
    let st = state.clone();
    let ids = vec![id.clone()];
    let (events, _) = blocking(move || st.store.audit_events_by_id(&ids).map_err(ApiError::from)).await?;
    let ev = events
        .into_iter()
        .next()
        .ok_or(ApiError::NotFound("resource not found"))?;
    let value = open(&state, &ev)?;
    Trail::of(&req)?.touched(format!("AuditEvent/{id}"), &[]);
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&value)))
}

pub async fn search(req: HttpRequest, p: Arc<Principal>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize_audit_log(&p, Permission::Search)?;
    let query = parse_query(&req, &state)?;
    list(req, p, state, query, "AuditEvent".into(), None).await
}

pub async fn access_report(
    req: HttpRequest,
    p: Arc<Principal>,
    patient: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize_access_report(&p, &patient)?;
    let mut query = AuditQuery {
        count: state.config.default_page_size,
        ..Default::default()
    };
    for (k, v) in query_pairs(&req) {
        match k.as_str() {
            "_count" => query.count = parse_count(&v, &state)?,
            "_page" | "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "$access-report takes only _count",
                ))
            }
        }
    }
    query.patients = vec![format!("Patient/{patient}")];
    Trail::of(&req)?.touched(format!("Patient/{patient}"), std::slice::from_ref(&patient));
    let relative = format!("Patient/{patient}/$access-report");
    list(req, p, state, query, relative, Some(patient)).await
}

fn parse_count(v: &str, state: &AppState) -> Result<u32, ApiError> {
    let n: u32 = v
        .parse()
        .map_err(|_| ApiError::bad_request(IssueType::Invalid, "_count must be a non-negative whole number"))?;
    Ok(n.min(state.config.max_page_size))
}

/// A reference search value: `Type/id`, an absolute URL ending in one, or (with `bare_type`) an id.
fn reference(v: &str, bare_type: Option<&str>) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(IssueType::Invalid, "a reference parameter needs Type/id");
    let parts: Vec<&str> = v.rsplitn(3, '/').collect();
    match (parts.as_slice(), bare_type) {
        ([id, t, ..], _) if is_valid_id(id) && t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
            Ok(format!("{t}/{id}"))
        }
        ([id], Some(t)) if is_valid_id(id) => Ok(format!("{t}/{id}")),
        _ => Err(bad()),
    }
}

/// `system|code` or `code` → code (the codes searched are unique within this server's events).
fn token(v: &str) -> String {
    v.rsplit('|').next().unwrap_or(v).to_string()
}

/// A FHIR date or dateTime (partial allowed) as the range [start, end) it covers.
fn date_range(v: &str) -> Option<(NaiveDateTime, NaiveDateTime)> {
    let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0);
    match v.len() {
        4 => {
            let y: i32 = v.parse().ok()?;
            Some((
                midnight(NaiveDate::from_ymd_opt(y, 1, 1)?)?,
                midnight(NaiveDate::from_ymd_opt(y + 1, 1, 1)?)?,
            ))
        }
        7 => {
            let d = NaiveDate::parse_from_str(&format!("{v}-01"), "%Y-%m-%d").ok()?;
            let next = d.checked_add_months(chrono::Months::new(1))?;
            Some((midnight(d)?, midnight(next)?))
        }
        10 => {
            let d = NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()?;
            Some((midnight(d)?, midnight(d.succ_opt()?)?))
        }
        _ => {
            let t = chrono::DateTime::parse_from_rfc3339(v).ok()?.naive_utc();
            // precision of the value given: a whole second unless fractions were written
            let width = if v.contains('.') {
                chrono::Duration::microseconds(1)
            } else {
                chrono::Duration::seconds(1)
            };
            Some((t, t + width))
        }
    }
}

/// Applies one `date` value (prefix + date) to the query's recorded range.
fn apply_date(q: &mut AuditQuery, v: &str) -> Result<(), ApiError> {
    let (prefix, rest) = match v.get(..2) {
        Some(p @ ("eq" | "ne" | "gt" | "lt" | "ge" | "le" | "sa" | "eb" | "ap")) => (p, &v[2..]),
        _ => ("eq", v),
    };
    let (start, end) = date_range(rest)
        .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "date must be a FHIR date or dateTime"))?;
    let narrow_from =
        |q: &mut AuditQuery, t: NaiveDateTime| q.recorded_from = Some(q.recorded_from.map_or(t, |f| f.max(t)));
    let narrow_before =
        |q: &mut AuditQuery, t: NaiveDateTime| q.recorded_before = Some(q.recorded_before.map_or(t, |b| b.min(t)));
    match prefix {
        "eq" => {
            narrow_from(q, start);
            narrow_before(q, end);
        }
        "ge" => narrow_from(q, start),
        "gt" | "sa" => narrow_from(q, end),
        "le" => narrow_before(q, end),
        "lt" | "eb" => narrow_before(q, start),
        _ => {
            return Err(ApiError::bad_request(
                IssueType::NotSupported,
                "AuditEvent date supports the prefixes eq, gt, ge, lt, le, sa and eb",
            ))
        }
    }
    Ok(())
}

fn parse_query(req: &HttpRequest, state: &AppState) -> Result<AuditQuery, ApiError> {
    let mut q = AuditQuery {
        count: state.config.default_page_size,
        ..Default::default()
    };
    for (k, v) in query_pairs(req) {
        let values = || v.split(',').filter(|s| !s.is_empty());
        match k.as_str() {
            "date" => apply_date(&mut q, &v)?,
            "agent" => {
                for x in values() {
                    // a user reference, or a client id or token subject as recorded
                    q.agents.push(reference(x, None).unwrap_or_else(|_| x.to_string()));
                }
            }
            "entity" => q
                .entities
                .extend(values().map(|x| reference(x, None)).collect::<Result<Vec<_>, _>>()?),
            "patient" => q.patients.extend(
                values()
                    .map(|x| reference(x, Some("Patient")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            "type" => q.types.extend(values().map(token)),
            "subtype" => q.subtypes.extend(values().map(token)),
            "action" => q.actions.extend(values().map(token)),
            "outcome" => q.outcomes.extend(values().map(token)),
            "_count" => q.count = parse_count(&v, state)?,
            "_page" | "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "AuditEvent search supports date, agent, entity, patient, type, subtype, action and outcome",
                ))
            }
        }
    }
    Ok(q)
}

/// Decrypts a stored event.
fn open(state: &AppState, ev: &StoredAuditEvent) -> Result<Value, ApiError> {
    let plain = state
        .store
        .cipher()
        .open(&event_aad(&ev.id), &ev.content.0)
        .map_err(|_| {
            tracing::error!("an audit event failed authentication on read; run `fhirvault audit verify`");
            ApiError::Internal
        })?;
    let mut value = serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)?;
    crate::audit::event::reveal_query(&mut value, state.store.cipher());
    Ok(value)
}

/// What a patient may see of an event about them: who, when, what and why, without other
/// patients, the query text or network details.
fn for_patient(mut ev: Value, patient: &str) -> Value {
    let own = format!("Patient/{patient}");
    if let Some(entities) = ev.get_mut("entity").and_then(Value::as_array_mut) {
        entities.retain(|e| {
            if e.get("query").is_some() {
                return false;
            }
            match e.pointer("/what/reference").and_then(Value::as_str) {
                Some(r) if r.starts_with("Patient/") => crate::audit::event::versionless(r) == own,
                Some(_) => true,
                None => false,
            }
        });
    }
    if let Some(agents) = ev.get_mut("agent").and_then(Value::as_array_mut) {
        for a in agents.iter_mut().filter_map(Value::as_object_mut) {
            a.remove("network");
        }
    }
    ev
}

async fn list(
    req: HttpRequest,
    p: Arc<Principal>,
    state: web::Data<AppState>,
    mut query: AuditQuery,
    relative: String,
    for_patient_id: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(&req)?;
    let trail = Trail::of(&req)?;
    trail.query(req.query_string());
    // The page cursor is bound to the subject and to the query without `_page`.
    let listing = super::history::listing(&relative, &query_pairs(&req));
    let tokens = PageTokens {
        cipher: state.store.cipher(),
        subject: &p.subject,
        listing: listing.clone(),
    };
    if let Some((_, raw)) = query_pairs(&req).into_iter().find(|(k, _)| k == "_page") {
        let cursor = tokens
            .decode_cursor(&raw)
            .and_then(|c| {
                let (micros, id) = c.split_once('~')?;
                let ts = chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?.naive_utc();
                Some((ts, id.to_string()))
            })
            .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "invalid or expired page token"))?;
        query.before = Some(cursor);
    }
    let count = query.count as usize;
    // search rows are derived off the request path: wait for this node's own (other nodes'
    // events are searchable within a second of their commit)
    state
        .auditor
        .sync_search()
        .await
        .map_err(|_| ApiError::AuditUnavailable)?;
    let st = state.clone();
    let rows = blocking(move || st.store.search_audit(&query).map_err(ApiError::from)).await?;
    let has_more = rows.len() > count;
    let base = state.base_url(&req);
    let mut entries = Vec::new();
    let mut last = None;
    for ev in rows.iter().take(count) {
        let mut value = open(&state, ev)?;
        if let Some(pid) = &for_patient_id {
            value = for_patient(value, pid);
        }
        entries.push(json!({
            "fullUrl": format!("{base}/AuditEvent/{}", ev.id),
            "resource": value,
            "search": {"mode": "match"}
        }));
        last = Some(ev);
    }
    let mut links = vec![json!({"relation": "self", "url": format!("{base}/{listing}")})];
    if has_more {
        if let Some(ev) = last {
            let cursor = format!("{}~{}", ev.recorded.and_utc().timestamp_micros(), ev.id);
            let sep = if listing.ends_with('?') { "" } else { "&" };
            links.push(json!({
                "relation": "next",
                "url": format!("{base}/{listing}{sep}_page={}", tokens.encode_cursor(&cursor))
            }));
        }
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": instant(&now())},
        "type": "searchset",
        "link": links,
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&bundle)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_ranges_and_prefixes_narrow_them() {
        let d = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().naive_utc();
        let (a, b) = date_range("2026-11").unwrap();
        assert_eq!((a, b), (d("2026-11-01T00:00:00Z"), d("2026-12-01T00:00:00Z")));
        let (a, b) = date_range("2026").unwrap();
        assert_eq!((a, b), (d("2026-01-01T00:00:00Z"), d("2027-01-01T00:00:00Z")));
        assert!(date_range("2026-13").is_none() && date_range("yesterday").is_none());
        let mut q = AuditQuery::default();
        apply_date(&mut q, "ge2026-11-23").unwrap();
        apply_date(&mut q, "lt2026-11-24T10:00:00Z").unwrap();
        assert_eq!(q.recorded_from, Some(d("2026-11-23T00:00:00Z")));
        assert_eq!(q.recorded_before, Some(d("2026-11-24T10:00:00Z")));
        let mut q = AuditQuery::default();
        apply_date(&mut q, "2026-11-23").unwrap();
        assert_eq!(q.recorded_before, Some(d("2026-11-24T00:00:00Z")));
        assert!(apply_date(&mut AuditQuery::default(), "ne2026").is_err());
    }

    #[test]
    fn references_and_tokens() {
        assert_eq!(reference("Patient/1", None).unwrap(), "Patient/1");
        assert_eq!(reference("http://x/fhir/Patient/1", None).unwrap(), "Patient/1");
        assert_eq!(reference("1", Some("Patient")).unwrap(), "Patient/1");
        assert!(reference("1", None).is_err());
        assert_eq!(token("http://hl7.org/fhir/restful-interaction|read"), "read");
        assert_eq!(token("R"), "R");
    }

    #[test]
    fn a_patient_sees_no_other_patient_nor_the_query() {
        let ev = json!({"entity": [
            {"what": {"reference": "Patient/p1"}},
            {"what": {"reference": "Patient/p2"}},
            {"what": {"reference": "Observation/o/_history/1"}},
            {"query": "bmFtZT14"}
        ], "agent": [{"network": {"address": "10.0.0.1"}, "who": {"reference": "Practitioner/1"}}]});
        let shown = for_patient(ev, "p1");
        let text = shown.to_string();
        assert!(text.contains("Patient/p1") && text.contains("Observation/o"));
        assert!(!text.contains("p2") && !text.contains("bmFtZT14") && !text.contains("10.0.0.1"));
    }
}
