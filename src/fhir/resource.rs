//! The typed envelope around a resource body: id syntax, `meta` stamping, and the few values
//! the server itself reads out of a resource.

use chrono::NaiveDateTime;
use serde_json::{Map, Value};

/// `[A-Za-z0-9\-\.]{1,64}` (R4 `id` datatype).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// FHIR `instant` text for a UTC timestamp (microsecond precision, `Z`).
pub fn instant(ts: &NaiveDateTime) -> String {
    ts.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, which belong to the server, keeping the
/// other `meta` elements (profile, security, tag, source) the client sent. Returns the body
/// serialized with `resourceType` and `id` first.
pub fn stamp(body: &mut Map<String, Value>, id: &str, version_id: i64, last_updated: &NaiveDateTime) -> Vec<u8> {
    let mut meta = match body.remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.remove("versionId");
    meta.remove("lastUpdated");
    let mut new_meta = Map::new();
    new_meta.insert("versionId".into(), Value::String(version_id.to_string()));
    new_meta.insert("lastUpdated".into(), Value::String(instant(last_updated)));
    new_meta.extend(meta);
    let resource_type = body.remove("resourceType").unwrap_or(Value::Null);
    body.remove("id");
    let mut out = Map::with_capacity(body.len() + 3);
    out.insert("resourceType".into(), resource_type);
    out.insert("id".into(), Value::String(id.to_string()));
    out.insert("meta".into(), Value::Object(new_meta));
    out.extend(std::mem::take(body));
    let bytes = serde_json::to_vec(&out).expect("a JSON value always serializes");
    *body = out;
    bytes
}

/// Normalized token index entries for the `identifier` search parameter: one entry matching
/// `system|value`, one matching the bare `value` (any system), and `|value` when there is no system.
pub fn identifier_tokens(body: &Map<String, Value>) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let list: Vec<&Value> = match body.get("identifier") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        _ => vec![],
    };
    for ident in list {
        let Some(value) = ident.get("value").and_then(Value::as_str) else {
            continue;
        };
        out.extend(token_keys(ident.get("system").and_then(Value::as_str), value));
    }
    out
}

fn token_keys(system: Option<&str>, value: &str) -> Vec<(&'static str, String)> {
    let mut out = vec![("identifier", format!("any|{value}"))];
    match system {
        Some(s) => out.push(("identifier", format!("sys|{s}|{value}"))),
        None => out.push(("identifier", format!("nosys|{value}"))),
    }
    out
}

/// The index key a search value `[system]|value` or `value` on a token parameter looks up.
pub fn token_query_key(query_value: &str) -> Option<String> {
    match query_value.split_once('|') {
        None if !query_value.is_empty() => Some(format!("any|{query_value}")),
        Some(("", v)) if !v.is_empty() => Some(format!("nosys|{v}")),
        Some((s, v)) if !v.is_empty() => Some(format!("sys|{s}|{v}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn id_syntax() {
        assert!(is_valid_id("abc-1.2"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"a".repeat(65)));
    }

    #[test]
    fn stamp_keeps_client_meta_but_owns_version() {
        let mut body = json!({"resourceType":"Patient","meta":{"versionId":"99","tag":[{"code":"x"}]},"active":true})
            .as_object()
            .cloned()
            .unwrap();
        let ts = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_000)
            .unwrap()
            .naive_utc();
        let bytes = stamp(&mut body, "p1", 3, &ts);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["meta"]["versionId"], "3");
        assert_eq!(v["meta"]["lastUpdated"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["meta"]["tag"][0]["code"], "x");
        assert_eq!(v["id"], "p1");
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .starts_with("{\"resourceType\":\"Patient\",\"id\":\"p1\""));
    }

    #[test]
    fn identifier_keys_match_queries() {
        let body = json!({"identifier":[{"system":"urn:s","value":"1"},{"value":"2"}]})
            .as_object()
            .cloned()
            .unwrap();
        let keys: Vec<String> = identifier_tokens(&body).into_iter().map(|(_, k)| k).collect();
        for q in ["urn:s|1", "1", "2", "|2"] {
            assert!(keys.contains(&token_query_key(q).unwrap()), "{q}");
        }
        assert!(!keys.contains(&token_query_key("|1").unwrap()));
        assert!(!keys.contains(&token_query_key("urn:x|1").unwrap()));
        assert_eq!(token_query_key("|"), None);
    }
}
