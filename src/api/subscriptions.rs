//! The Subscriptions Backport's operations: `$status` (where a subscription stands) and
//! `$events` (its past events by number). The caller must be able to read the Subscription;
//! `$events` shows each event's resource only as far as the caller's own grant reaches.

use super::negotiate::{query_pairs, Format};
use super::{blocking, trail::Trail, ApiError, AppState};
use crate::auth::policy::authorize;
use crate::auth::{Permission, Principal};
use crate::fhir::IssueType;
use crate::store::subscription::SUBSCRIPTION;
use crate::subscription::deliver::{event_of, Viewer};
use crate::subscription::notification::{self, Header, Kind};
use crate::subscription::{Flavor, Payload, Spec};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::sync::Arc;

/// The Subscription `id` as the caller may read it, read as a subscription.
fn readable(state: &AppState, p: &Principal, id: &str) -> Result<Spec, ApiError> {
    const ABSENT: ApiError = ApiError::NotFound("resource not found");
    let decision = authorize(p, SUBSCRIPTION, Permission::Read)?;
    let stored = state
        .store
        .read(&decision.access(), SUBSCRIPTION, id)
        .map_err(|_| ABSENT)?;
    let value: Value =
        serde_json::from_slice(stored.content.as_deref().ok_or(ABSENT)?).map_err(|_| ApiError::Internal)?;
    if !decision.admits(&state.compartment, SUBSCRIPTION, id, Some(&value)) || !state.attributes.labels_allow(p, &value)
    {
        return Err(ABSENT);
    }
    let registry = state.search.current();
    let is_type = |t: &str| state.validator.is_resource_type(t);
    let mut ctx = state.subscription_context(&registry, &is_type);
    // a subscription stored before a setting changed is still shown
    ctx.full_resource_allowed = true;
    ctx.allowed_networks = &[];
    let mut spec = crate::subscription::read_spec(&ctx, id, &value).or_else(|_| {
        // its endpoint may be one the settings now refuse: shown all the same
        let mut v = value.clone();
        v["channel"]["endpoint"] = json!("https://example.invalid/");
        crate::subscription::read_spec(&ctx, id, &v).map_err(|_| ApiError::Internal)
    })?;
    spec.status = value["status"].as_str().unwrap_or("requested").to_string();
    Ok(spec)
}

/// The ids of the Subscriptions the caller may read (at most 1,000).
fn readable_ids(state: &AppState, p: &Principal) -> Result<Vec<String>, ApiError> {
    let decision = authorize(p, SUBSCRIPTION, Permission::Search)?;
    let registry = state.search.current();
    let parsed = crate::search::query::parse(&registry, state.store.cipher(), SUBSCRIPTION, &[], 1000, true)
        .map_err(|_| ApiError::Internal)?;
    let mut q = parsed.query;
    q.total = false;
    if let crate::store::Access::Patient(patient) = decision.access() {
        q.patient = Some(patient);
    }
    if let Some(clause) = decision.filter_clause(SUBSCRIPTION) {
        q.clauses.push(clause);
    }
    let page = state.store.search_contents(&decision.access(), &q)?;
    Ok(page
        .into_iter()
        .filter(|(id, json)| {
            serde_json::from_slice::<Value>(json).is_ok_and(|v| {
                decision.admits(&state.compartment, SUBSCRIPTION, id, Some(&v)) && state.attributes.labels_allow(p, &v)
            })
        })
        .map(|(id, _)| id)
        .collect())
}

fn topic_of(spec: &Spec) -> String {
    match &spec.flavor {
        Flavor::Backport { topic } => topic.clone(),
        Flavor::R4 => format!("{}{}", crate::subscription::TOPIC_BASE, spec.resource_type),
    }
}

fn bundle_response(req: &HttpRequest, bundle: &Value) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(req)?;
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(bundle)))
}

/// `GET|POST Subscription/[id]/$status`, or `Subscription/$status?id=a,b`: a searchset Bundle
/// of SubscriptionStatus Parameters (type `query-status`).
pub async fn status(
    req: HttpRequest,
    p: Arc<Principal>,
    id: Option<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ids: Vec<String> = match id {
        Some(id) => vec![id],
        None => query_pairs(&req)
            .into_iter()
            .filter(|(k, _)| k == "id")
            .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
            .collect(),
    };
    let trail = Trail::of(&req)?;
    let base = state.base_url(&req);
    let st = state.clone();
    let pp = p.clone();
    let found = blocking(move || {
        // without ids: every subscription the caller may read (the operation's definition)
        let ids = if ids.is_empty() { readable_ids(&st, &pp)? } else { ids };
        let mut out = Vec::new();
        for id in ids {
            let spec = readable(&st, &pp, &id)?;
            let row = st.store.subscription_state(&id)?;
            out.push((spec, row));
        }
        Ok(out)
    })
    .await?;
    let mut entries = Vec::new();
    for (n, (spec, row)) in found.iter().enumerate() {
        let reference = format!("Subscription/{}", spec.id);
        if n == 0 {
            trail.touched(reference, &[]);
        } else {
            trail.also_touched(reference, &[]);
        }
        let topic = topic_of(spec);
        let status = row.as_ref().map_or(spec.status.as_str(), |r| r.status.as_str());
        let header = Header {
            base: &base,
            spec,
            topic: &topic,
            status,
            kind: Kind::QueryStatus,
            events_since_start: row.as_ref().map_or(0, |r| r.events_since_start),
        };
        let error = row.as_ref().and_then(|r| r.last_error.as_deref());
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": notification::status_parameters(&header, &[], error),
            "search": {"mode": "match"},
        }));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": entries.len(),
        "entry": entries,
    });
    bundle_response(&req, &bundle)
}

/// `GET|POST Subscription/[id]/$events?eventsSinceNumber=&eventsUntilNumber=&content=`: the
/// events kept (seven days after delivery) as a notification Bundle of type `query-event`.
pub async fn events(
    req: HttpRequest,
    p: Arc<Principal>,
    id: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut since: Option<i64> = None;
    let mut until: Option<i64> = None;
    let mut content: Option<Payload> = None;
    for (k, v) in query_pairs(&req) {
        let number = || {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "event numbers are whole numbers"))
        };
        match k.as_str() {
            "eventsSinceNumber" => since = Some(number()?),
            "eventsUntilNumber" => until = Some(number()?),
            "content" => {
                content = Some(match v.as_str() {
                    "empty" => Payload::Empty,
                    "id-only" => Payload::IdOnly,
                    "full-resource" => Payload::FullResource,
                    _ => {
                        return Err(ApiError::bad_request(
                            IssueType::Invalid,
                            "content is empty, id-only or full-resource",
                        ))
                    }
                })
            }
            "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "$events takes eventsSinceNumber, eventsUntilNumber and content",
                ))
            }
        }
    }
    if content == Some(Payload::FullResource) && !state.config.subscription_full_resource {
        return Err(ApiError::bad_request(
            IssueType::NotSupported,
            "this server sends ids, not whole resources (subscription_full_resource)",
        ));
    }
    let trail = Trail::of(&req)?;
    let base = state.base_url(&req);
    let st = state.clone();
    let pp = p.clone();
    let (spec, row, events) = blocking(move || {
        let mut spec = readable(&st, &pp, &id)?;
        if let Some(c) = content {
            spec.payload = c;
        }
        let row = st.store.subscription_state(&id)?;
        let last = row.as_ref().map_or(0, |r| r.events_since_start);
        let until = until.unwrap_or(last).min(last);
        let since = since.unwrap_or_else(|| (until - 99).max(1)).max(until - 999).max(1);
        let stored = st.store.numbered_events(&id, since, until)?;
        let registry = st.search.current();
        let viewer = Viewer {
            store: &st.store,
            compartment: &st.compartment,
            attributes: &st.attributes,
            registry: &registry,
        };
        let mut events = Vec::with_capacity(stored.len());
        for e in &stored {
            let seen = viewer.visible(&pp, &spec, e)?;
            events.push(event_of(e, seen));
        }
        Ok((spec, row, events))
    })
    .await?;
    trail.touched(format!("Subscription/{}", spec.id), &[]);
    for e in events.iter().filter(|e| e.visible) {
        trail.also_touched(format!("{}/{}", e.resource_type, e.id), &e.patients);
    }
    let topic = topic_of(&spec);
    let status = row.as_ref().map_or(spec.status.as_str(), |r| r.status.as_str());
    let header = Header {
        base: &base,
        spec: &spec,
        topic: &topic,
        status,
        kind: Kind::QueryEvent,
        events_since_start: row.as_ref().map_or(0, |r| r.events_since_start),
    };
    let bundle = notification::bundle(&header, &events, &crate::store::now());
    bundle_response(&req, &bundle)
}
