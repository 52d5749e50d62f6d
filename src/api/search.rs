//! `GET [type]?…`: search over the index tables (see `crate::search`), as a paged searchset
//! Bundle. Authorized like any read of the type; a patient-context token searches only its
//! compartment (filtered in the query, so counts and pages hold nothing else). Audited as one
//! event with the query (sealed) and the patients whose data the page returned.

use super::history::PageTokens;
use super::negotiate::query_pairs;
use super::trail::Trail;
use super::{blocking, ApiError, AppState, Format};
use crate::auth::policy::authorize;
use crate::auth::{Permission, Principal};
use crate::fhir::resource::instant;
use crate::fhir::IssueType;
use crate::search::query::{parse, QueryError};
use crate::store::now;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::sync::Arc;

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        match e {
            QueryError::UnknownParameter => ApiError::bad_request(
                IssueType::NotSupported,
                "unknown search parameter for this resource type",
            ),
            QueryError::NotSupported(text) => ApiError::bad_request(IssueType::NotSupported, text),
            QueryError::Invalid(text) => ApiError::bad_request(IssueType::Invalid, text),
        }
    }
}

/// `compartment`: the patient of a compartment search (`Patient/[id]/[type]`).
pub async fn search_type(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    compartment: Option<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Search)?;
    let fmt = Format::negotiate(&req)?;
    let pairs = query_pairs(&req);
    let mut count = state.config.default_page_size;
    let mut page = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "_count" => {
                let n: u32 = v.parse().map_err(|_| {
                    ApiError::bad_request(IssueType::Invalid, "_count must be a non-negative whole number")
                })?;
                count = n.min(state.config.max_page_size);
            }
            "_page" => page = Some(v.clone()),
            _ => {}
        }
    }
    let trail = Trail::of(&req);
    trail.query(req.query_string());
    let mut parsed = parse(&state.search, state.store.cipher(), &t, &pairs, count)?;
    if !decision.unrestricted {
        parsed.query.patient = decision.patient.clone();
    }
    parsed.query.compartment = compartment.clone();
    // Chains and `_has` read other types: the token must be allowed to search each, and what
    // they reach is held to its compartment where that is all the token may see.
    for other in &parsed.types {
        let d = authorize(&p, other, Permission::Search)?;
        if !d.unrestricted {
            parsed.query.nested_patient = d.patient.clone();
        }
    }
    let listing_pairs: Vec<(String, String)> = pairs.iter().filter(|(k, _)| k != "_page").cloned().collect();
    let path = match &compartment {
        Some(pid) => format!("Patient/{pid}/{t}"),
        None => t.clone(),
    };
    let listing = format!(
        "{path}?{}",
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(listing_pairs.iter())
            .finish()
    );
    let tokens = PageTokens {
        cipher: state.store.cipher(),
        subject: &p.subject,
        listing: listing.clone(),
    };
    if let Some(raw) = &page {
        parsed.query.after = Some(
            tokens
                .decode_cursor(raw)
                .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "invalid or expired page token"))?,
        );
    }
    let access = decision.access();
    let st = state.clone();
    let query = parsed.query.clone();
    let result = blocking(move || st.store.search(&access, &query).map_err(ApiError::from)).await?;
    let labels_bind = state.attributes.label_rules_bind(&p);
    let mut entries = Vec::new();
    let mut patients = Vec::new();
    for v in result.entries {
        let Some(json) = v.content.clone() else { continue };
        if !parsed.rechecks.is_empty() || !decision.unrestricted {
            let value: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
            if !parsed.rechecks.iter().all(|r| r.holds(&value)) {
                continue;
            }
            if !decision.admits(&state.compartment, &t, &v.logical_id, Some(&value)) {
                continue;
            }
        }
        // labels and hidden elements, as for every read
        let Some(shaped) = state.attributes.shape_stored(&p, &t, json) else {
            continue;
        };
        let resource: Value = serde_json::from_slice(&shaped).map_err(|_| ApiError::Internal)?;
        patients.extend(v.patients.iter().cloned());
        entries.push(json!({
            "fullUrl": format!("{}/{t}/{}", state.base_url(&req), v.logical_id),
            "resource": resource,
            "search": {"mode": "match"}
        }));
    }
    trail.returned_patients(patients.iter());
    let base = state.base_url(&req);
    let mut links = vec![json!({"relation": "self", "url": format!("{base}/{listing}")})];
    if let Some(next) = &result.next_after {
        let sep = if listing.ends_with('?') { "" } else { "&" };
        links.push(json!({
            "relation": "next",
            "url": format!("{base}/{listing}{sep}_page={}", tokens.encode_cursor(next))
        }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": instant(&now())},
        "type": "searchset",
        "link": links,
    });
    // a total that counts what re-checks or labels hide would say too much
    if parsed.rechecks.is_empty() && !labels_bind {
        bundle["total"] = json!(result.total);
    }
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&bundle)))
}
