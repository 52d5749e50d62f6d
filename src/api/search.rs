//! `GET [type]?…`: search over the index tables (see `crate::search`), as a paged searchset
//! Bundle. Authorized like any read of the type; a patient-context token searches only its
//! compartment (filtered in the query, so counts and pages hold nothing else). Audited as one
//! event with the query (sealed) and the patients whose data the page returned.

use super::history::PageTokens;
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
    pairs: Vec<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Search)?;
    let fmt = Format::negotiate(&req)?;
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
            "_total" if !matches!(v.as_str(), "none" | "estimate" | "accurate") => {
                return Err(ApiError::bad_request(
                    IssueType::Invalid,
                    "_total takes none, estimate or accurate",
                ))
            }
            "_summary" if !matches!(v.as_str(), "count" | "false") => {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "_summary supports count and false",
                ))
            }
            _ => {}
        }
    }
    let no_total = pairs.iter().any(|(k, v)| k == "_total" && v == "none");
    let count_only = pairs.iter().any(|(k, v)| k == "_summary" && v == "count");
    if count_only {
        count = 0;
    }
    // `_elements`: the top-level elements to keep (plus the mandatory ones)
    let elements: Option<Vec<String>> = pairs.iter().find(|(k, _)| k == "_elements").map(|(_, v)| {
        v.split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect()
    });
    let trail = Trail::of(&req)?;
    // the query as the search received it (a POST's body included), sealed in the audit event
    trail.query(
        &form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter())
            .finish(),
    );
    let strict = super::negotiate::strict_handling(&req);
    let mut parsed = parse(&state.search, state.store.cipher(), &t, &pairs, count, strict)?;
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
    let path = match &compartment {
        Some(pid) => format!("Patient/{pid}/{t}"),
        None => t.clone(),
    };
    let listing = super::history::listing(&path, &pairs);
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
    let mut matched: Vec<(String, String)> = Vec::new();
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
        let mut resource: Value = serde_json::from_slice(&shaped).map_err(|_| ApiError::Internal)?;
        if let Some(keep) = &elements {
            subset(&mut resource, keep);
        }
        patients.extend(v.patients.iter().cloned());
        matched.push((t.clone(), v.logical_id.clone()));
        entries.push(json!({
            "fullUrl": format!("{}/{t}/{}", state.base_url(&req), v.logical_id),
            "resource": resource,
            "search": {"mode": "match"}
        }));
    }
    // `_include` / `_revinclude` (`:iterate` follows what was included, a few rounds deep)
    let specs = include_specs(&state, &pairs)?;
    if !specs.is_empty() {
        let mut seen: std::collections::HashSet<(String, String)> = matched.iter().cloned().collect();
        let mut frontier = matched.clone();
        for round in 0..4 {
            let mut next = Vec::new();
            for spec in specs.iter().filter(|s| round == 0 || s.iterate) {
                let fresh: Vec<(String, String)> = included(&state, spec, &frontier)
                    .await?
                    .into_iter()
                    .filter(|key| seen.insert(key.clone()))
                    .collect();
                for (rt, id, resource, pats) in fetch_visible(&state, &p, &fresh).await? {
                    patients.extend(pats);
                    entries.push(json!({
                        "fullUrl": format!("{}/{rt}/{id}", state.base_url(&req)),
                        "resource": resource,
                        "search": {"mode": "include"}
                    }));
                    next.push((rt, id));
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
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
    if parsed.rechecks.is_empty() && !labels_bind && !no_total {
        bundle["total"] = json!(result.total);
    }
    if !parsed.ignored.is_empty() {
        // lenient handling: say what was left out (names only: values may be PHI)
        let issues: Vec<Value> = parsed
            .ignored
            .iter()
            .map(|(name, e)| {
                json!({"severity": "warning", "code": "not-supported",
                       "diagnostics": format!("parameter {} ignored: {e}", name.chars().filter(|c| c.is_ascii_alphanumeric() || "-_:.".contains(*c)).collect::<String>())})
            })
            .collect();
        entries.push(json!({
            "resource": {"resourceType": "OperationOutcome", "issue": issues},
            "search": {"mode": "outcome"}
        }));
    }
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&bundle)))
}

/// One `_include` or `_revinclude` value: `Source:param[:Target]`, `Source:*` or `*`.
struct IncludeSpec {
    reverse: bool,
    iterate: bool,
    /// `None` for `*`
    source: Option<String>,
    param: Option<String>,
    target: Option<String>,
}

fn include_specs(state: &AppState, pairs: &[(String, String)]) -> Result<Vec<IncludeSpec>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        let (reverse, iterate) = match k.as_str() {
            "_include" => (false, false),
            "_include:iterate" | "_include:recurse" => (false, true),
            "_revinclude" => (true, false),
            "_revinclude:iterate" | "_revinclude:recurse" => (true, true),
            _ => continue,
        };
        let bad = || {
            ApiError::bad_request(
                IssueType::Invalid,
                "_include and _revinclude take Type:parameter[:Target]",
            )
        };
        if v == "*" {
            out.push(IncludeSpec {
                reverse,
                iterate,
                source: None,
                param: None,
                target: None,
            });
            continue;
        }
        let mut parts = v.split(':');
        let source = parts
            .next()
            .filter(|s| state.resource_types.contains(*s))
            .ok_or_else(bad)?;
        let param = parts.next().ok_or_else(bad)?;
        let target = parts.next().map(str::to_string);
        if target.as_ref().is_some_and(|t| !state.resource_types.contains(t)) {
            return Err(bad());
        }
        if param != "*" {
            let def = state.search.get(source, param).ok_or_else(bad)?;
            if def.kind != crate::search::ParamType::Reference {
                return Err(bad());
            }
        }
        out.push(IncludeSpec {
            reverse,
            iterate,
            source: Some(source.to_string()),
            param: (param != "*").then(|| param.to_string()),
            target,
        });
    }
    Ok(out)
}

/// The (type, id) of what one spec adds to `frontier`.
async fn included(
    state: &web::Data<AppState>,
    spec: &IncludeSpec,
    frontier: &[(String, String)],
) -> Result<Vec<(String, String)>, ApiError> {
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (t, id) in frontier {
        by_type.entry(t.clone()).or_default().push(id.clone());
    }
    let mut out = Vec::new();
    for (t, ids) in by_type {
        let st = state.clone();
        let (source, param, target) = (spec.source.clone(), spec.param.clone(), spec.target.clone());
        if spec.reverse {
            // resources of `source` referring to these
            let Some(source) = source else { continue };
            let rows = blocking(move || {
                st.store
                    .referrers_of(&source, param.as_deref(), &t, &ids)
                    .map_err(ApiError::from)
                    .map(|rows| rows.into_iter().map(|r| (source.clone(), r.0)).collect::<Vec<_>>())
            })
            .await?;
            out.extend(rows);
        } else {
            if source.as_ref().is_some_and(|s| *s != t) {
                continue;
            }
            let rows = blocking(move || {
                st.store
                    .references_of(&t, &ids, param.as_deref())
                    .map_err(ApiError::from)
            })
            .await?;
            for (_, target_type, target_id) in rows {
                let Some(tt) = target_type else { continue };
                if target.as_ref().is_some_and(|want| *want != tt) {
                    continue;
                }
                out.push((tt, target_id));
            }
        }
    }
    Ok(out)
}

/// The resources the token may see among `keys` (one query per type): those of types it may
/// not read, outside its compartment or hidden by labels are left out; the rest shaped, with
/// their patients.
async fn fetch_visible(
    state: &web::Data<AppState>,
    p: &Principal,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, Value, Vec<String>)>, ApiError> {
    let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (t, id) in keys {
        by_type.entry(t.clone()).or_default().push(id.clone());
    }
    let mut out = Vec::new();
    for (t, ids) in by_type {
        let Ok(decision) = authorize(p, &t, Permission::Read) else {
            continue;
        };
        let st = state.clone();
        let (tt, access) = (t.clone(), decision.access());
        let versions = blocking(move || st.store.read_many(&access, &tt, &ids).map_err(ApiError::from)).await?;
        for v in versions {
            let Some(json) = v.content else { continue };
            if !decision.unrestricted {
                let value: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
                if !decision.admits(&state.compartment, &t, &v.logical_id, Some(&value)) {
                    continue;
                }
            }
            let Some(shaped) = state.attributes.shape_stored(p, &t, json) else {
                continue;
            };
            let resource: Value = serde_json::from_slice(&shaped).map_err(|_| ApiError::Internal)?;
            out.push((t.clone(), v.logical_id, resource, v.patients));
        }
    }
    Ok(out)
}

/// `_elements`: keeps the named top-level elements and the mandatory ones, and tags the result
/// SUBSETTED so that nobody mistakes it for the whole resource.
fn subset(resource: &mut Value, keep: &[String]) {
    let Some(map) = resource.as_object_mut() else { return };
    map.retain(|k, _| matches!(k.as_str(), "resourceType" | "id" | "meta") || keep.iter().any(|e| e == k));
    let meta = map.entry("meta").or_insert_with(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        let tags = m.entry("tag").or_insert_with(|| json!([]));
        if let Some(t) = tags.as_array_mut() {
            t.push(json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}));
        }
    }
}
