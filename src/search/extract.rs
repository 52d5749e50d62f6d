//! Index values from a resource, per parameter type, normalized as the R4 search page compares
//! them: strings case- and accent-folded, tokens as system and code, dates as the range they
//! cover, references as type and id, quantities with their system and code.

use super::registry::{ParamType, SearchParam};
use crate::fhir::fhirpath::{FhirPathError, Item};
use chrono::{NaiveDate, NaiveDateTime};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// Text as written (folded where it is compared: `fold`).
    String(String),
    Token {
        system: Option<String>,
        code: String,
    },
    /// The text of a CodeableConcept or display of a Coding (`:text`).
    TokenText(String),
    /// An Identifier with its type (`:of-type`).
    IdentifierOfType {
        type_system: Option<String>,
        type_code: String,
        value: String,
    },
    /// The identifier of a Reference (`:identifier`).
    ReferenceIdentifier {
        system: Option<String>,
        value: String,
    },
    /// A composite parameter's components on one element.
    Composite {
        c1_system: Option<String>,
        c1_code: String,
        second: Box<IndexValue>,
        third: Option<f64>,
    },
    /// The instants a date covers: `[start, end)`.
    Date {
        start: NaiveDateTime,
        end: NaiveDateTime,
    },
    Reference {
        resource_type: Option<String>,
        id: String,
    },
    Number(f64),
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
    },
    Uri(String),
}

/// Lower case without diacritics (the common Latin ones), for string matching.
pub fn fold(s: &str) -> String {
    s.chars()
        .flat_map(|c| c.to_lowercase())
        .map(|c| match c {
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
            'ç' | 'ć' | 'č' => 'c',
            'ď' => 'd',
            'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => 'e',
            'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' => 'i',
            'ñ' | 'ń' | 'ň' => 'n',
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => 'o',
            'ř' => 'r',
            'ś' | 'š' | 'ş' => 's',
            'ť' => 't',
            'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' => 'u',
            'ý' | 'ÿ' => 'y',
            'ź' | 'ż' | 'ž' => 'z',
            'ł' => 'l',
            other => other,
        })
        .collect()
}

/// The start of an open-ended period (the earliest instant both databases store).
pub fn open_start() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .unwrap_or_default()
}

/// The end of an open-ended period.
pub fn open_end() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_opt(23, 59, 59))
        .unwrap_or_default()
}

/// The range a FHIR date, dateTime or instant covers, in UTC.
pub fn date_range(s: &str) -> Option<(NaiveDateTime, NaiveDateTime)> {
    let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0);
    match s.len() {
        4 => {
            let y: i32 = s.parse().ok()?;
            Some((
                midnight(NaiveDate::from_ymd_opt(y, 1, 1)?)?,
                midnight(NaiveDate::from_ymd_opt(y + 1, 1, 1)?)?,
            ))
        }
        7 => {
            let d = NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").ok()?;
            Some((midnight(d)?, midnight(d.checked_add_months(chrono::Months::new(1))?)?))
        }
        10 => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            Some((midnight(d)?, midnight(d.succ_opt()?)?))
        }
        _ => {
            // a dateTime: with or without seconds and zone (no zone: UTC)
            let (body, zone) = match s.get(10..).and_then(|t| t.rfind(['Z', '+', '-'])) {
                Some(i) => s.split_at(10 + i),
                None => (s, "Z"),
            };
            let minutes_only = body.len() == 16;
            let full = if minutes_only {
                format!("{body}:00{zone}")
            } else {
                format!("{body}{zone}")
            };
            let t = chrono::DateTime::parse_from_rfc3339(&full).ok()?.naive_utc();
            let width = if minutes_only {
                chrono::Duration::minutes(1)
            } else if body.contains('.') {
                chrono::Duration::milliseconds(1)
            } else {
                chrono::Duration::seconds(1)
            };
            Some((t, t + width))
        }
    }
}

/// `Patient/123`, `http://host/fhir/Patient/123`, `Patient/123/_history/2` → (type, id).
fn reference_parts(r: &str) -> Option<(Option<String>, String)> {
    if r.starts_with('#') || r.starts_with("urn:") {
        return None;
    }
    let r = match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    };
    let mut parts = r.rsplit('/');
    let id = parts.next()?.to_string();
    let ty = parts
        .next()
        .filter(|t| t.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        .map(str::to_string);
    (!id.is_empty()).then_some((ty, id))
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn string_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => out.push(IndexValue::String(s.clone())),
        Value::Object(m) => {
            // HumanName, Address and the like: their text parts
            for key in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                match m.get(key) {
                    Some(Value::String(s)) => out.push(IndexValue::String(s.clone())),
                    Some(Value::Array(items)) => out.extend(
                        items
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|s| IndexValue::String(s.to_string())),
                    ),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn token_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => out.push(IndexValue::Token {
            system: None,
            code: s.clone(),
        }),
        Value::Bool(b) => out.push(IndexValue::Token {
            system: None,
            code: b.to_string(),
        }),
        Value::Object(m) => {
            if let Some(Value::Array(codings)) = m.get("coding") {
                for c in codings {
                    if let Some(code) = text(c, "code") {
                        out.push(IndexValue::Token {
                            system: text(c, "system"),
                            code,
                        });
                    }
                    if let Some(display) = text(c, "display") {
                        out.push(IndexValue::TokenText(display));
                    }
                }
                if let Some(t) = text(v, "text") {
                    out.push(IndexValue::TokenText(t));
                }
            } else if let Some(code) = text(v, "code") {
                out.push(IndexValue::Token {
                    system: text(v, "system"),
                    code,
                });
                if let Some(display) = text(v, "display") {
                    out.push(IndexValue::TokenText(display));
                }
            } else if let Some(value) = text(v, "value") {
                // Identifier and ContactPoint
                out.push(IndexValue::Token {
                    system: text(v, "system"),
                    code: value.clone(),
                });
                for c in m
                    .get("type")
                    .and_then(|t| t.get("coding"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(type_code) = text(c, "code") {
                        out.push(IndexValue::IdentifierOfType {
                            type_system: text(c, "system"),
                            type_code,
                            value: value.clone(),
                        });
                    }
                }
            } else if let Some(t) = text(v, "text") {
                out.push(IndexValue::TokenText(t));
            }
        }
        _ => {}
    }
}

fn date_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => {
            if let Some((start, end)) = date_range(s) {
                out.push(IndexValue::Date { start, end });
            }
        }
        Value::Object(m) => {
            // Period: from its start to its end, open ends unbounded
            let start = m.get("start").and_then(Value::as_str).and_then(date_range).map(|r| r.0);
            let end = m.get("end").and_then(Value::as_str).and_then(date_range).map(|r| r.1);
            if start.is_some() || end.is_some() {
                out.push(IndexValue::Date {
                    start: start.unwrap_or_else(open_start),
                    end: end.unwrap_or_else(open_end),
                });
            }
            // Timing: its events
            for e in m.get("event").and_then(Value::as_array).into_iter().flatten() {
                date_values(e, out);
            }
        }
        _ => {}
    }
}

fn quantity_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::Number(n) => out.push(IndexValue::Quantity {
            value: n.as_f64().unwrap_or(0.0),
            system: None,
            code: None,
        }),
        Value::Object(m) => {
            if let Some(value) = m.get("value").and_then(Value::as_f64) {
                out.push(IndexValue::Quantity {
                    value,
                    system: text(v, "system"),
                    code: text(v, "code")
                        .or_else(|| text(v, "unit"))
                        .or_else(|| text(v, "currency")),
                });
            }
            // Range: its bounds
            for bound in ["low", "high"] {
                if let Some(b) = m.get(bound) {
                    quantity_values(b, out);
                }
            }
        }
        _ => {}
    }
}

/// The index values of one parameter in one resource.
pub fn extract(param: &SearchParam, resource: &Value) -> Result<Vec<IndexValue>, FhirPathError> {
    let Some(expr) = &param.expression else {
        return Ok(Vec::new());
    };
    let items = expr.evaluate(resource)?;
    let mut out = Vec::new();
    for item in &items {
        let v: Value = match item {
            Item::Node(v, _) => (*v).clone(),
            other => crate::fhir::fhirpath::to_json(other),
        };
        match param.kind {
            ParamType::String => string_values(&v, &mut out),
            ParamType::Token => token_values(&v, &mut out),
            ParamType::Date => date_values(&v, &mut out),
            ParamType::Quantity => quantity_values(&v, &mut out),
            ParamType::Number => {
                if let Some(n) = v.as_f64() {
                    out.push(IndexValue::Number(n));
                }
            }
            ParamType::Uri => {
                if let Some(s) = v.as_str() {
                    out.push(IndexValue::Uri(s.to_string()));
                }
            }
            ParamType::Reference => {
                let r = match &v {
                    Value::Object(_) => text(&v, "reference"),
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                };
                if let Some((resource_type, id)) = r.as_deref().and_then(reference_parts) {
                    out.push(IndexValue::Reference { resource_type, id });
                }
                if let Some(value) = v.get("identifier").and_then(|i| text(i, "value")) {
                    out.push(IndexValue::ReferenceIdentifier {
                        system: v.get("identifier").and_then(|i| text(i, "system")),
                        value,
                    });
                }
            }
            ParamType::Composite => {
                if let Item::Node(node, ty) = item {
                    composite_values(param, node, ty.clone(), resource, &mut out)?;
                }
            }
            // `special` parameters (`near` …) need their own logic: not indexed
            ParamType::Special => {}
        }
    }
    Ok(out)
}

/// The combinations of a composite's components on one element: the first a code, the second
/// of its own type, a third (the few with three) a number.
fn composite_values(
    param: &SearchParam,
    node: &Value,
    ty: Option<String>,
    resource: &Value,
    out: &mut Vec<IndexValue>,
) -> Result<(), FhirPathError> {
    let Some((first, rest)) = param.components.split_first() else {
        return Ok(());
    };
    let values = |c: &super::registry::Component| -> Result<Vec<IndexValue>, FhirPathError> {
        let mut vs = Vec::new();
        for item in c.expression.evaluate_at(node, ty.clone(), resource)? {
            let v: Value = match &item {
                Item::Node(v, _) => (*v).clone(),
                other => crate::fhir::fhirpath::to_json(other),
            };
            match c.kind {
                ParamType::Token => token_values(&v, &mut vs),
                ParamType::Quantity => quantity_values(&v, &mut vs),
                ParamType::Date => date_values(&v, &mut vs),
                ParamType::String => string_values(&v, &mut vs),
                ParamType::Number => {
                    if let Some(n) = v.as_f64() {
                        vs.push(IndexValue::Number(n));
                    }
                }
                _ => {}
            }
        }
        vs.retain(|v| !matches!(v, IndexValue::TokenText(_) | IndexValue::IdentifierOfType { .. }));
        Ok(vs)
    };
    if first.kind != ParamType::Token {
        return Ok(());
    }
    let codes = values(first)?;
    let seconds = match rest.first() {
        Some(c) => values(c)?,
        None => return Ok(()),
    };
    let thirds: Vec<Option<f64>> = match rest.get(1) {
        Some(c) => values(c)?
            .into_iter()
            .filter_map(|v| match v {
                IndexValue::Number(n) => Some(Some(n)),
                _ => None,
            })
            .collect(),
        None => vec![None],
    };
    for code in &codes {
        let IndexValue::Token { system, code } = code else {
            continue;
        };
        for second in &seconds {
            for third in &thirds {
                out.push(IndexValue::Composite {
                    c1_system: system.clone(),
                    c1_code: code.clone(),
                    second: Box::new(second.clone()),
                    third: *third,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::registry::Registry;
    use serde_json::json;

    #[test]
    fn values_are_normalized_per_type() {
        let r = Registry::r4().unwrap();
        let p = json!({"resourceType": "Patient", "id": "p1",
            "name": [{"family": "Müller", "given": ["Zoë"]}],
            "identifier": [{"system": "urn:mrn", "value": "123"}],
            "gender": "female", "birthDate": "1974-12",
            "generalPractitioner": [{"reference": "Practitioner/dr"}]});
        let get = |code: &str| extract(r.get("Patient", code).unwrap(), &p).unwrap();
        assert!(get("name").contains(&IndexValue::String("Müller".into())));
        assert!(get("name").contains(&IndexValue::String("Zoë".into())));
        assert_eq!(
            get("identifier"),
            vec![IndexValue::Token {
                system: Some("urn:mrn".into()),
                code: "123".into()
            }]
        );
        assert_eq!(
            get("gender"),
            vec![IndexValue::Token {
                system: None,
                code: "female".into()
            }]
        );
        let IndexValue::Date { start, end } = get("birthdate")[0] else {
            panic!()
        };
        assert_eq!(start.to_string(), "1974-12-01 00:00:00");
        assert_eq!(end.to_string(), "1975-01-01 00:00:00");
        assert_eq!(
            get("general-practitioner"),
            vec![IndexValue::Reference {
                resource_type: Some("Practitioner".into()),
                id: "dr".into()
            }]
        );
        assert_eq!(
            get("_id"),
            vec![IndexValue::Token {
                system: None,
                code: "p1".into()
            }]
        );
        let o = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-06T07:08:09Z",
            "valueQuantity": {"value": 72.5, "system": "http://unitsofmeasure.org", "code": "kg"}});
        let get = |code: &str| extract(r.get("Observation", code).unwrap(), &o).unwrap();
        assert_eq!(
            get("code"),
            vec![IndexValue::Token {
                system: Some("http://loinc.org".into()),
                code: "29463-7".into()
            }]
        );
        assert_eq!(
            get("value-quantity"),
            vec![IndexValue::Quantity {
                value: 72.5,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("kg".into())
            }]
        );
        assert_eq!(get("date").len(), 1);
        assert_eq!(
            get("patient"),
            vec![IndexValue::Reference {
                resource_type: Some("Patient".into()),
                id: "p1".into()
            }]
        );
    }
}
