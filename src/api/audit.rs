//! Reading the audit log over FHIR: `GET AuditEvent/{id}`, and `GET Patient/{id}/$access-report`,
//! which shows a patient who accessed their record, when and why, without anyone else's data.
//! AuditEvent search is the common search engine's (`api::search`, answered from the log's own
//! rows by `store::audit::search`). Every one of these reads is itself audited by the router.

use super::history::PageTokens;
use super::negotiate::query_pairs;
use super::trail::Trail;
use super::{blocking, ApiError, AppState, Format};
use crate::auth::policy::{authorize_access_report, authorize_audit_log};
use crate::auth::{Permission, Principal};
use crate::fhir::resource::instant;
use crate::fhir::IssueType;
use crate::store::audit::{event_aad, AuditQuery, StoredAuditEvent};
use crate::store::now;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::sync::Arc;

/// Waits until this node's own events are in the database and derived, so that an
/// AuditEvent read or search on this node sees everything it recorded before.
pub(super) async fn own_events_settled(state: &AppState) -> Result<(), ApiError> {
    state
        .auditor
        .sync_search()
        .await
        .map_err(|_| ApiError::AuditUnavailable)
}

pub async fn read(
    req: HttpRequest,
    p: Arc<Principal>,
    id: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize_audit_log(&p, Permission::Read)?;
    let fmt = Format::negotiate(&req)?;
    let lookup = || {
        let (st, ids) = (state.clone(), vec![id.clone()]);
        blocking(move || st.store.audit_events_by_id(&ids).map_err(ApiError::from))
    };
    let mut events = lookup().await?.0;
    if events.is_empty() {
        // an event this node recorded a moment ago may not have reached the database yet
        // (SQLite journals them first): wait for it once, then look again
        own_events_settled(&state).await?;
        events = lookup().await?.0;
    }
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
    own_events_settled(&state).await?;
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
