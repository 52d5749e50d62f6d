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
}
