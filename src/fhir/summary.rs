//! `_summary` and `_elements`: subsets of a resource, from the official R4 definitions of which
//! top-level elements are in the summary and which are mandatory (fhir-schemas/
//! summary-elements.json, generated from profiles-resources.json; see SOURCES.md).

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::LazyLock;

const SUMMARY_ELEMENTS_JSON: &str = include_str!("../../fhir-schemas/summary-elements.json");

#[derive(serde::Deserialize)]
struct Elements {
    summary: Vec<String>,
    mandatory: Vec<String>,
}

/// Parsed once; a file compiled into the binary that fails to parse is a build defect that the
/// unit test below catches, so an empty table here can only mean that.
static ELEMENTS: LazyLock<HashMap<String, Elements>> =
    LazyLock::new(|| serde_json::from_str(SUMMARY_ELEMENTS_JSON).unwrap_or_default());

/// The `_summary` modes that return (part of) each resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    /// the elements marked as summary
    True,
    /// text, id, meta and the mandatory elements
    Text,
    /// everything but the narrative
    Data,
}

impl Summary {
    /// `true`, `text`, `data`; `false` and absent mean the whole resource (`None`).
    pub fn parse(v: &str) -> Option<Option<Summary>> {
        Some(match v {
            "true" => Some(Summary::True),
            "text" => Some(Summary::Text),
            "data" => Some(Summary::Data),
            "false" => None,
            _ => return None,
        })
    }
}

/// Whether the JSON key `key` is the element `name` (`value[x]` covers `valueQuantity` …; a
/// primitive's `_name` sibling goes with it).
fn is_element(key: &str, name: &str) -> bool {
    let key = key.strip_prefix('_').unwrap_or(key);
    match name.strip_suffix("[x]") {
        Some(stem) => key
            .strip_prefix(stem)
            .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase())),
        None => key == name,
    }
}

fn tag_subsetted(map: &mut Map<String, Value>) {
    let meta = map.entry("meta").or_insert_with(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        let tags = m.entry("tag").or_insert_with(|| json!([]));
        if let Some(t) = tags.as_array_mut() {
            t.push(json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}));
        }
    }
}

/// Applies a `_summary` mode, tagging the result SUBSETTED.
pub fn summarize(resource: &mut Value, mode: Summary) {
    let Some(map) = resource.as_object_mut() else { return };
    let rt = map
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let defs = ELEMENTS.get(&rt);
    let keep = |k: &str, names: &[String]| {
        matches!(k, "resourceType" | "id" | "meta") || names.iter().any(|n| is_element(k, n))
    };
    match mode {
        Summary::True => {
            let names = defs.map(|d| d.summary.as_slice()).unwrap_or(&[]);
            map.retain(|k, _| keep(k, names));
        }
        Summary::Text => {
            let names = defs.map(|d| d.mandatory.as_slice()).unwrap_or(&[]);
            map.retain(|k, _| k == "text" || keep(k, names));
        }
        Summary::Data => {
            map.remove("text");
        }
    }
    tag_subsetted(map);
}

/// `_elements`: keeps the named top-level elements and the mandatory ones, tagged SUBSETTED.
pub fn elements(resource: &mut Value, keep: &[String]) {
    let Some(map) = resource.as_object_mut() else { return };
    let rt = map
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mandatory = ELEMENTS.get(&rt).map(|d| d.mandatory.as_slice()).unwrap_or(&[]);
    map.retain(|k, _| {
        matches!(k.as_str(), "resourceType" | "id" | "meta")
            || keep.iter().any(|e| is_element(k, e))
            || mandatory.iter().any(|n| is_element(k, n))
    });
    tag_subsetted(map);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_load_for_every_resource_type() {
        assert!(
            ELEMENTS.len() >= 140,
            "summary-elements.json parsed: {}",
            ELEMENTS.len()
        );
        assert!(ELEMENTS["Observation"].mandatory.contains(&"code".to_string()));
    }

    #[test]
    fn summary_modes_keep_what_the_definitions_say() {
        let obs = json!({"resourceType": "Observation", "id": "o", "status": "final",
            "text": {"status": "generated", "div": "<div/>"},
            "code": {"text": "x"}, "valueQuantity": {"value": 1}, "note": [{"text": "n"}],
            "_status": {"id": "s"}});
        let mut t = obs.clone();
        summarize(&mut t, Summary::True);
        assert!(t.get("valueQuantity").is_some() && t.get("_status").is_some());
        assert!(t.get("note").is_none() && t.get("text").is_none());
        assert_eq!(t["meta"]["tag"][0]["code"], "SUBSETTED");
        let mut t = obs.clone();
        summarize(&mut t, Summary::Text);
        assert!(t.get("text").is_some() && t.get("code").is_some() && t.get("status").is_some());
        assert!(t.get("valueQuantity").is_none());
        let mut t = obs.clone();
        summarize(&mut t, Summary::Data);
        assert!(t.get("text").is_none() && t.get("note").is_some());
        let mut t = obs;
        elements(&mut t, &["note".to_string()]);
        assert!(
            t.get("note").is_some() && t.get("code").is_some(),
            "mandatory elements stay"
        );
        assert!(t.get("valueQuantity").is_none());
    }
}
