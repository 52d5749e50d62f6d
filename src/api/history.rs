//! History for an instance, a type and the whole system, as a paged `history` Bundle.
//!
//! Paging links carry an opaque cursor (`_page`) naming the last row of the page, never
//! resource content; pages are stable under concurrent writes because rows are never changed.

use super::negotiate::query_pairs;
use super::{blocking, etag, ApiError, AppState, Format};
use crate::auth::policy::{authorize, Decision};
use crate::auth::{Permission, Principal};
use crate::fhir::resource::instant;
use crate::fhir::IssueType;
use crate::store::Access;
use crate::store::{now, HistoryQuery, HistoryScope, StoredVersion};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn system_history(
    req: HttpRequest,
    p: Arc<Principal>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // It lists every type: the token must be able to search every type; where any of them is
    // granted only in patient context, the whole listing is limited to the compartment.
    let mut patient = None;
    for t in &state.resource_types {
        let d = authorize(&p, t, Permission::Search)?;
        // granular scopes: the listing cannot filter every type by them (fail closed)
        if !d.filters.is_empty() {
            return Err(ApiError::Forbidden);
        }
        if !d.unrestricted {
            patient = d.patient;
        }
    }
    history(req, p, state, HistoryScope::System, "_history".into(), None, patient).await
}

pub async fn type_history(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // A patient-context token lists only its compartment, filtered in the query (counts too).
    let d = authorize(&p, &t, Permission::Search)?;
    let patient = if d.unrestricted { None } else { d.patient.clone() };
    let rel = format!("{t}/_history");
    // granular scopes: each version is checked on its content, and the total is not shown
    let restricted = (!d.filters.is_empty()).then_some(d);
    history(req, p, state, HistoryScope::Type(t), rel, restricted, patient).await
}

pub async fn instance_history(
    req: HttpRequest,
    p: Arc<Principal>,
    t: String,
    id: String,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let decision = authorize(&p, &t, Permission::Read)?;
    let rel = format!("{t}/{id}/_history");
    // Each version is authorized on its own content; a restricted token sees no total.
    let restricted = (!decision.unrestricted).then_some(decision);
    history(req, p, state, HistoryScope::Instance(t, id), rel, restricted, None).await
}

/// How long a page link stays valid.
const PAGE_TOKEN_SECS: i64 = 3600;

/// Page tokens: `row.expiry.mac`, base64url. The MAC (keyed, from the crypto module) binds the
/// cursor to the token's subject and to the listing (path and `_since`), so a link works only
/// for whoever received it, for that listing, until it expires. It carries a row id and a time,
/// never a search value, so no PHI reaches a URL.
pub(super) struct PageTokens<'a> {
    pub cipher: &'a crate::crypto::Cipher,
    pub subject: &'a str,
    pub listing: String,
}

/// `path?query` without `_page`: what a page cursor is bound to, and the base of page links.
pub(super) fn listing(path: &str, pairs: &[(String, String)]) -> String {
    format!(
        "{path}?{}",
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter().filter(|(k, _)| k != "_page"))
            .finish()
    )
}

impl PageTokens<'_> {
    fn mac(&self, cursor: &str, expiry: i64) -> [u8; crate::crypto::BLIND_INDEX_LEN] {
        self.cipher.blind_index(
            "history-page-token",
            &format!("{}\n{}\n{cursor}\n{expiry}", self.subject, self.listing),
        )
    }

    fn encode(&self, row: i64) -> String {
        self.encode_cursor(&row.to_string())
    }

    fn decode(&self, token: &str) -> Option<i64> {
        self.decode_cursor(token)?.parse().ok()
    }

    /// A token for any cursor without `.` (a row id, a timestamp and an event id …).
    pub fn encode_cursor(&self, cursor: &str) -> String {
        debug_assert!(!cursor.contains('.'));
        let expiry = chrono::Utc::now().timestamp() + PAGE_TOKEN_SECS;
        let mac: String = self.mac(cursor, expiry).iter().map(|b| format!("{b:02x}")).collect();
        B64URL.encode(format!("{cursor}.{expiry}.{mac}"))
    }

    pub fn decode_cursor(&self, token: &str) -> Option<String> {
        let raw = B64URL.decode(token).ok()?;
        let text = std::str::from_utf8(&raw).ok()?;
        let mut parts = text.split('.');
        let (cursor, expiry, mac) = (parts.next()?, parts.next()?.parse::<i64>().ok()?, parts.next()?);
        if parts.next().is_some() || expiry < chrono::Utc::now().timestamp() {
            return None;
        }
        let expected: String = self.mac(cursor, expiry).iter().map(|b| format!("{b:02x}")).collect();
        // constant-time comparison
        let same = expected.len() == mac.len()
            && expected.bytes().zip(mac.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        same.then(|| cursor.to_string())
    }
}

/// `_since` is an instant: a full date-time with a time zone.
fn parse_instant(s: &str) -> Option<chrono::NaiveDateTime> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|d| d.naive_utc())
}

#[allow(clippy::too_many_arguments)]
async fn history(
    req: HttpRequest,
    p: Arc<Principal>,
    state: web::Data<AppState>,
    scope: HistoryScope,
    relative: String,
    restricted: Option<Decision>,
    patient: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let fmt = Format::negotiate(&req)?;
    let cfg = &state.config;
    let mut count = cfg.default_page_size;
    let mut since = None;
    let mut since_raw = None;
    let mut before_row = None;
    let mut page_raw = None;
    for (k, v) in query_pairs(&req) {
        match k.as_str() {
            "_count" => {
                let n: u32 = v.parse().map_err(|_| {
                    ApiError::bad_request(IssueType::Invalid, "_count must be a non-negative whole number")
                })?;
                // `_count=0` asks for the total only.
                count = n.min(cfg.max_page_size);
            }
            "_since" => {
                since = Some(parse_instant(&v).ok_or_else(|| {
                    ApiError::bad_request(
                        IssueType::Invalid,
                        "_since must be an instant such as 2024-01-01T00:00:00Z",
                    )
                })?);
                since_raw = Some(v);
            }
            "_page" => page_raw = Some(v),
            "_format" | "_pretty" => {}
            "_at" | "_list" | "_sort" => {
                return Err(ApiError::bad_request(
                    IssueType::NotSupported,
                    "this history parameter is not supported",
                ))
            }
            _ => {}
        }
    }
    let tokens = PageTokens {
        cipher: state.store.cipher(),
        subject: &p.subject,
        listing: format!("{relative}?_since={}", since_raw.as_deref().unwrap_or("")),
    };
    if let Some(raw) = &page_raw {
        before_row = Some(
            tokens
                .decode(raw)
                .ok_or_else(|| ApiError::bad_request(IssueType::Invalid, "invalid or expired page token"))?,
        );
    }
    // in a patient's context, versions of shared types in nobody's compartment are listed too
    let shared_types = match &scope {
        HistoryScope::System => state.compartment.shared_types(),
        HistoryScope::Type(t) | HistoryScope::Instance(t, _) if state.compartment.is_shared(t) => vec![t.clone()],
        _ => Vec::new(),
    };
    let query = HistoryQuery {
        patient,
        shared_types,
        scope,
        since,
        before_row,
        count,
    };
    let st = state.clone();
    let access = match query
        .patient
        .clone()
        .or_else(|| restricted.as_ref().and_then(|d| d.patient.clone()))
    {
        Some(p) => Access::Patient(p),
        None => Access::All,
    };
    let mut page = blocking(move || st.store.history(&access, &query).map_err(ApiError::from)).await?;
    let trail = super::trail::Trail::of(&req)?;
    trail.query(req.query_string());
    if let Some(d) = &restricted {
        page.entries.retain(|v| {
            d.admits_stored(
                &state.compartment,
                &v.resource_type,
                &v.logical_id,
                v.content.as_deref(),
            )
        });
        if page.entries.is_empty() && page.next_before_row.is_none() {
            return Err(ApiError::NotFound("resource not found"));
        }
    }
    // Attribute policy: versions hidden by their labels are left out, hidden elements masked.
    let labels_bind = state.attributes.label_rules_bind(&p);
    for v in std::mem::take(&mut page.entries) {
        let mut v = v;
        match v.content.take() {
            Some(json) => {
                if let Some(shaped) = state.attributes.shape_stored(&p, &v.resource_type, json) {
                    v.content = Some(shaped);
                    page.entries.push(v);
                }
            }
            // a deletion says nothing of the labels it had: shown only where no label rule binds
            None if !labels_bind => page.entries.push(v),
            None => {}
        }
    }
    // the patients whose data this page returns
    trail.returned_patients(page.entries.iter().flat_map(|e| e.patients.iter()));
    let base = state.base_url(&req);
    let link = |cursor: Option<i64>| {
        let mut url = format!("{base}/{relative}?_count={count}");
        if let Some(s) = &since_raw {
            url.push_str("&_since=");
            url.push_str(&s.replace('+', "%2B").replace(':', "%3A"));
        }
        if let Some(c) = cursor {
            url.push_str("&_page=");
            url.push_str(&tokens.encode(c));
        }
        url
    };
    let mut links = vec![json!({"relation": "self", "url": link(before_row)})];
    if before_row.is_some() {
        links.push(json!({"relation": "first", "url": link(None)}));
    }
    if let Some(next) = page.next_before_row {
        links.push(json!({"relation": "next", "url": link(Some(next))}));
    }
    let entries: Vec<Value> = page.entries.iter().map(|e| entry(&base, e)).collect::<Result<_, _>>()?;
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": instant(&now())},
        "type": "history",
        "link": links,
    });
    // A total that counts versions the token cannot see would leak them: omitted then.
    if restricted.is_none() && !labels_bind {
        bundle["total"] = json!(page.total);
    }
    // FHIR JSON never has empty arrays.
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(HttpResponse::Ok()
        .content_type(fmt.content_type())
        .body(fmt.render(&bundle)))
}

fn entry(base: &str, v: &StoredVersion) -> Result<Value, ApiError> {
    let t = &v.resource_type;
    let id = &v.logical_id;
    let (method, url, status) = match (v.method.as_str(), v.deleted) {
        (_, true) => ("DELETE", format!("{t}/{id}"), "204 No Content"),
        ("POST", _) => ("POST", t.to_string(), "201 Created"),
        _ if v.version_id == 1 => ("PUT", format!("{t}/{id}"), "201 Created"),
        _ => ("PUT", format!("{t}/{id}"), "200 OK"),
    };
    let mut e = json!({
        "fullUrl": format!("{base}/{t}/{id}"),
        "request": {"method": method, "url": url},
        "response": {"status": status, "etag": etag(v.version_id), "lastModified": instant(&v.last_updated)},
    });
    if let Some(content) = &v.content {
        let resource: Value = serde_json::from_slice(content).map_err(|_| ApiError::Internal)?;
        e["resource"] = resource;
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_bound_to_subject_and_listing() {
        use crate::crypto::{Cipher, KeyMaterial, KeyProvider};
        struct K;
        impl KeyProvider for K {
            fn current_version(&self) -> u32 {
                1
            }
            fn versions(&self) -> Vec<(u32, KeyMaterial)> {
                vec![(1, zeroize::Zeroizing::new([3u8; 32]))]
            }
            fn blind_index_version(&self) -> u32 {
                1
            }
        }
        let cipher = Cipher::from_provider(&K).unwrap();
        let t = |subject: &'static str, listing: &str| PageTokens {
            cipher: &cipher,
            subject,
            listing: listing.to_string(),
        };
        let token = t("alice", "_history?_since=").encode(42);
        assert_eq!(t("alice", "_history?_since=").decode(&token), Some(42));
        assert_eq!(t("bob", "_history?_since=").decode(&token), None, "another subject");
        assert_eq!(
            t("alice", "Patient/_history?_since=").decode(&token),
            None,
            "another listing"
        );
        assert_eq!(t("alice", "_history?_since=").decode("zzz"), None);
        let forged = B64URL.encode("41.99999999999.00");
        assert_eq!(t("alice", "_history?_since=").decode(&forged), None);
        assert!(!B64URL
            .decode(&token)
            .map(|b| String::from_utf8_lossy(&b).contains("alice"))
            .unwrap());
    }
}
