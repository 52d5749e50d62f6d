//! Validation of resources against the official R4 JSON Schema.
//!
//! Validating against the schema's root (a `oneOf` over all resource types) gives useless errors,
//! so one validator is compiled per resource type, from that type's definition with the shared
//! definitions, once at start-up. Issue texts name the element and the rule broken but never
//! echo the submitted value (it may be PHI).

use super::outcome::{Issue, IssueType};
use jsonschema::error::ValidationErrorKind;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the bundled R4 JSON Schema is not valid JSON: {0}")]
    Parse(String),
    #[error("the bundled R4 JSON Schema lacks the resource type list")]
    NoTypes,
    #[error("compiling the schema of {0} failed: {1}")]
    Compile(String, String),
}

pub struct Validator {
    all: jsonschema::Validator,
    by_type: BTreeSet<String>,
    /// Per definition, per element: whether it repeats, and the definition of its type.
    elements: HashMap<String, HashMap<String, Element>>,
}

/// What the schema says of one element of a type.
#[derive(Debug, Clone)]
pub struct Element {
    pub repeats: bool,
    /// The schema definition of its type (`Identifier`, `Patient_Contact`, `ResourceList` …).
    pub type_def: Option<String>,
}

/// The schema's primitive patterns with the whitespace the FHIR specification means. JSON
/// Schema evaluates `\s` as ECMA-262 does (every Unicode space), so HL7's `[ \r\n\t\S]+` for
/// `string` refused a no-break space, which R4 allows (a string may hold any character but the
/// controls below U+0020 other than tab, CR and LF: §2.1.28.0.1) and HL7's own validator accepts
/// (Java's `\s` is ASCII). The official examples carry such text. Patterns are rewritten with
/// ASCII whitespace, and `string`'s as the specification words it.
fn fhir_whitespace_patterns(v: &mut Value) {
    const WS: &str = r"[ \t\n\x0B\f\r]";
    const NOT_WS: &str = r"[^ \t\n\x0B\f\r]";
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if let (true, Value::String(p)) = (k == "pattern", &mut *child) {
                    let rewritten = match p.as_str() {
                        r"^[ \r\n\t\S]+$" => Some(r"^[^\x00-\x08\x0B\x0C\x0E-\x1F]+$".to_string()),
                        r"^\S*$" => Some(format!("^{NOT_WS}*$")),
                        r"^[^\s]+(\s[^\s]+)*$" => Some(format!("^{NOT_WS}+({WS}{NOT_WS}+)*$")),
                        r"^(\s*([0-9a-zA-Z\+/=]){4}\s*)+$" => Some(format!("^({WS}*([0-9a-zA-Z\\+/=]){{4}}{WS}*)+$")),
                        _ => None,
                    };
                    if let Some(r) = rewritten {
                        *p = r;
                    }
                } else {
                    fhir_whitespace_patterns(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(fhir_whitespace_patterns),
        _ => {}
    }
}

/// The element table of the schema's definitions.
fn element_table(defs: &serde_json::Map<String, Value>) -> HashMap<String, HashMap<String, Element>> {
    let def_of = |v: &Value| {
        v.get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/definitions/"))
            .map(str::to_string)
    };
    defs.iter()
        .filter_map(|(name, def)| {
            let props = def.get("properties")?.as_object()?;
            let elements = props
                .iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .map(|(k, v)| {
                    let repeats = v.get("type").and_then(Value::as_str) == Some("array");
                    let type_def = if repeats {
                        v.get("items").and_then(def_of)
                    } else {
                        def_of(v)
                    };
                    (k.clone(), Element { repeats, type_def })
                })
                .collect();
            Some((name.clone(), elements))
        })
        .collect()
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Validator({} resource types)", self.by_type.len())
    }
}

impl Validator {
    /// Compiles one validator per resource type from the bundled official R4 schema.
    pub fn r4() -> Result<Validator, SchemaError> {
        Self::from_schema_text(super::R4_SCHEMA_JSON)
    }

    pub fn from_schema_text(text: &str) -> Result<Validator, SchemaError> {
        let mut root: Value = serde_json::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        fhir_whitespace_patterns(&mut root);
        let types: Vec<String> = root
            .pointer("/discriminator/mapping")
            .and_then(Value::as_object)
            .ok_or(SchemaError::NoTypes)?
            .keys()
            .cloned()
            .collect();
        let obj = root.as_object_mut().ok_or(SchemaError::NoTypes)?;
        obj.remove("oneOf");
        obj.remove("discriminator");
        obj.remove("id");
        obj.remove("$id");
        // `ResourceList` (contained resources, Bundle.entry.resource, Parameters.parameter.resource,
        // Bundle.entry.response.outcome) is a oneOf over every resource type: compiled into each
        // type's validator it costs gigabytes and yields useless errors. Here it only checks that a
        // nested resource names a known type; `validate` then checks each nested resource with
        // the validator of its own type, with precise paths.
        let defs = obj
            .get_mut("definitions")
            .and_then(Value::as_object_mut)
            .ok_or(SchemaError::NoTypes)?;
        let elements = element_table(defs);
        defs.insert(
            "ResourceList".into(),
            serde_json::json!({
                "type": "object",
                "required": ["resourceType"],
                "properties": {"resourceType": {"enum": types}},
            }),
        );
        // One validator for all types: `allOf` of `if resourceType = T then T`, so that the
        // element definitions shared by all types (Extension, CodeableConcept …) are compiled once.
        let branches: Vec<Value> = types
            .iter()
            .map(|t| {
                serde_json::json!({
                    "if": {"properties": {"resourceType": {"const": t}}, "required": ["resourceType"]},
                    "then": {"$ref": format!("#/definitions/{t}")},
                })
            })
            .collect();
        root["allOf"] = Value::Array(branches);
        root["$schema"] = Value::String("http://json-schema.org/draft-07/schema#".into());
        let all = jsonschema::options()
            .should_validate_formats(false)
            .build(&root)
            .map_err(|e| SchemaError::Compile("R4".into(), e.to_string()))?;
        let by_type = types.into_iter().collect();
        Ok(Validator { all, by_type, elements })
    }

    /// Every resource type of the schema, in alphabetical order.
    pub fn resource_types(&self) -> impl Iterator<Item = &str> {
        self.by_type.iter().map(String::as_str)
    }

    /// The element `name` of the schema definition `def` (a resource type or a data type).
    pub fn element(&self, def: &str, name: &str) -> Option<&Element> {
        self.elements.get(def)?.get(name)
    }

    pub fn is_resource_type(&self, name: &str) -> bool {
        self.by_type.contains(name)
    }

    /// Validates `resource` as `resource_type`. An empty list means valid.
    pub fn validate(&self, resource_type: &str, resource: &Value) -> Vec<Issue> {
        let mut issues = Vec::new();
        self.validate_at(resource_type, resource, resource_type, &mut issues, 0);
        issues.dedup();
        issues.truncate(100);
        issues
    }

    /// Lenient parsing (`Prefer: handling=lenient` on a write): removes every element the R4
    /// definitions do not know for where it stands, nested resources included, and returns one
    /// warning per element removed, with its path (never its value). Whatever else is wrong is
    /// left for [`Validator::validate`] to refuse: only unknown elements are forgiven.
    pub fn drop_unknown_elements(&self, resource_type: &str, resource: &mut Value) -> Vec<Issue> {
        let mut dropped = Vec::new();
        self.drop_unknown_at(resource_type, resource, resource_type, &mut dropped, 0);
        dropped
    }

    fn drop_unknown_at(&self, def: &str, node: &mut Value, path: &str, out: &mut Vec<Issue>, depth: usize) {
        // as deep as validation goes (resources nest at most 16 deep, data types little more)
        if depth > 64 {
            return;
        }
        let Value::Object(map) = node else { return };
        // a nested resource is read as its own type
        let def = if def == "ResourceList" {
            match map.get("resourceType").and_then(Value::as_str) {
                Some(t) if self.by_type.contains(t) => t.to_string(),
                _ => return,
            }
        } else {
            def.to_string()
        };
        let Some(elements) = self.elements.get(&def) else {
            return;
        };
        let unknown: Vec<String> = map
            .keys()
            .filter(|k| !elements.contains_key(k.strip_prefix('_').unwrap_or(k)))
            .cloned()
            .collect();
        for name in unknown {
            map.remove(&name);
            out.push(
                Issue::warning(
                    IssueType::Structure,
                    "unknown element dropped (Prefer: handling=lenient)",
                )
                .at(format!("{path}.{}", printable_name(&name))),
            );
        }
        for (name, child) in map.iter_mut() {
            // `_birthDate`: the id and extensions of a primitive
            let (child_def, label) = match name.strip_prefix('_') {
                Some(_) => ("Element".to_string(), name.as_str()),
                None => match elements.get(name).and_then(|e| e.type_def.clone()) {
                    Some(d) => (d, name.as_str()),
                    None => continue,
                },
            };
            match child {
                Value::Array(items) => {
                    for (i, item) in items.iter_mut().enumerate() {
                        self.drop_unknown_at(&child_def, item, &format!("{path}.{label}[{i}]"), out, depth + 1);
                    }
                }
                item => self.drop_unknown_at(&child_def, item, &format!("{path}.{label}"), out, depth + 1),
            }
        }
    }

    fn validate_at(&self, resource_type: &str, resource: &Value, root: &str, out: &mut Vec<Issue>, depth: usize) {
        if depth > 16 {
            out.push(Issue::error(IssueType::TooCostly, "resources are nested too deeply").at(root.to_string()));
            return;
        }
        if !self.by_type.contains(resource_type) {
            out.push(Issue::error(IssueType::NotSupported, "unknown resource type").at(root.to_string()));
            return;
        }
        let v = &self.all;
        if !v.is_valid(resource) {
            out.extend(
                v.iter_errors(resource)
                    .flat_map(|e| describe(root, e.instance_path().as_str(), e.kind())),
            );
        }
        self.validate_nested(resource, root, out, depth);
    }

    /// Finds nested resources (in `contained`, `resource` and `outcome` elements) and validates
    /// each with the validator of its own type.
    fn validate_nested(&self, node: &Value, path: &str, out: &mut Vec<Issue>, depth: usize) {
        match node {
            Value::Object(map) => {
                for (k, child) in map {
                    let nested_slot = matches!(k.as_str(), "contained" | "resource" | "outcome");
                    let items: Vec<(String, &Value)> = match child {
                        Value::Array(a) => a
                            .iter()
                            .enumerate()
                            .map(|(i, c)| (format!("{path}.{k}[{i}]"), c))
                            .collect(),
                        other => vec![(format!("{path}.{k}"), other)],
                    };
                    for (child_path, item) in items {
                        match item.get("resourceType").and_then(Value::as_str) {
                            Some(t) if nested_slot && self.by_type.contains(t) => {
                                self.validate_at(t, item, &child_path, out, depth + 1)
                            }
                            _ => self.validate_nested(item, &child_path, out, depth),
                        }
                    }
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    self.validate_nested(c, &format!("{path}[{i}]"), out, depth);
                }
            }
            _ => {}
        }
    }
}

/// Turns a JSON pointer into a FHIRPath-style expression: `/name/0/given` → `Patient.name[0].given`.
pub fn pointer_to_expression(root: &str, pointer: &str) -> String {
    let mut out = String::from(root);
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(&seg);
            out.push(']');
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

/// An element name as an issue may show it: names are structure, not data, but an unknown one
/// is whatever the client typed, so it is kept short and printable.
fn printable_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

fn describe(root: &str, pointer: &str, kind: &ValidationErrorKind) -> Vec<Issue> {
    let at = pointer_to_expression(root, pointer);
    let one = |code: IssueType, text: &str| vec![Issue::error(code, text).at(at.clone())];
    match kind {
        ValidationErrorKind::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|name| {
                Issue::error(IssueType::Structure, "unknown element").at(format!("{at}.{}", printable_name(name)))
            })
            .collect(),
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or("?");
            vec![Issue::error(IssueType::Required, "missing required element").at(format!("{at}.{name}"))]
        }
        ValidationErrorKind::Type { kind } => one(
            IssueType::Structure,
            &format!("wrong JSON type: expected {kind:?}").to_lowercase(),
        ),
        ValidationErrorKind::Enum { .. } => one(IssueType::Value, "value is not one of the allowed codes"),
        ValidationErrorKind::Constant { .. } => one(IssueType::Value, "value differs from the fixed value"),
        ValidationErrorKind::Pattern { .. } => {
            one(IssueType::Value, "value does not match the syntax of its data type")
        }
        ValidationErrorKind::MinItems { .. } => one(IssueType::Structure, "array must not be empty"),
        ValidationErrorKind::MaxItems { .. } => one(IssueType::Structure, "too many repetitions"),
        ValidationErrorKind::MinLength { .. } => one(IssueType::Value, "value is too short"),
        ValidationErrorKind::MaxLength { .. } => one(IssueType::Value, "value is too long"),
        ValidationErrorKind::OneOfNotValid { .. } | ValidationErrorKind::AnyOf { .. } => one(
            IssueType::Structure,
            "content matches none of the allowed types (for a resource: unknown type or invalid content)",
        ),
        ValidationErrorKind::OneOfMultipleValid { .. } => {
            one(IssueType::Structure, "content matches more than one allowed type")
        }
        ValidationErrorKind::FalseSchema => one(IssueType::Structure, "element is not allowed here"),
        _ => one(IssueType::Invalid, "value is invalid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    fn v() -> &'static Validator {
        static V: OnceLock<Validator> = OnceLock::new();
        V.get_or_init(|| Validator::r4().unwrap())
    }

    #[test]
    fn whitespace_is_what_fhir_means_by_it() {
        let ok = |p: serde_json::Value| v().validate("Patient", &p).is_empty();
        // a no-break space is a character like any other in a string (the official examples hold them)
        assert!(ok(
            json!({"resourceType": "Patient", "name": [{"text": "Ada\u{a0}Lovelace"}]})
        ));
        // control characters are not
        assert!(!ok(json!({"resourceType": "Patient", "name": [{"text": "Ada\u{1}"}]})));
        assert!(ok(
            json!({"resourceType": "Patient", "name": [{"text": "two\r\nlines\tand a tab"}]})
        ));
        // codes: single inner spaces only; uris: no spaces
        assert!(!ok(json!({"resourceType": "Patient", "language": "en  US"})));
        assert!(ok(json!({"resourceType": "Patient", "language": "en US"})));
        assert!(!ok(json!({"resourceType": "Patient", "implicitRules": "http://a b"})));
        assert!(ok(
            json!({"resourceType": "Patient", "photo": [{"data": "QUJD\nREVG"}]})
        ));
    }

    #[test]
    fn knows_all_r4_resource_types() {
        assert_eq!(v().resource_types().count(), 146);
        assert!(v().is_resource_type("Patient"));
        assert!(!v().is_resource_type("Element"));
    }

    #[test]
    fn errors_carry_paths_and_never_values() {
        let p = json!({"resourceType":"Patient","gender":"SECRET-GENDER","birthDate":"SECRET-DATE","name":[{"given":"SECRET-NAME"}],"bogus":1});
        let issues = v().validate("Patient", &p);
        let text = serde_json::to_string(&issues).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        let exprs: Vec<&str> = issues
            .iter()
            .flat_map(|i| i.expression.iter().map(String::as_str))
            .collect();
        for e in [
            "Patient.gender",
            "Patient.birthDate",
            "Patient.name[0].given",
            "Patient.bogus",
        ] {
            assert!(exprs.contains(&e), "{e} not in {exprs:?}");
        }
    }

    #[test]
    fn nested_resources_are_checked_by_their_own_type() {
        let b = json!({"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient","gender":1}}]});
        let issues = v().validate("Bundle", &b);
        assert_eq!(
            issues[0].expression,
            vec!["Bundle.entry[0].resource.gender".to_string()],
            "{issues:?}"
        );
        let p = json!({"resourceType":"Patient","contained":[{"resourceType":"Nope"}]});
        assert!(!v().validate("Patient", &p).is_empty());
        let p = json!({"resourceType":"Patient","contained":[{"resourceType":"Organization","name":"x"}]});
        assert!(v().validate("Patient", &p).is_empty());
    }

    #[test]
    fn lenient_parsing_drops_only_unknown_elements() {
        // the US Core example that a public test server serves: Period has no `stop`
        let mut o = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
            "effectivePeriod":{"start":"2020-01-01","stop":"2020-01-02"},
            "component":[{"code":{"text":"c"},"valueQuantity":{"value":1,"unitt":"SECRET"}}],
            "_status":{"extension":[{"url":"http://e","valueString":"v"}],"bogus":true},
            "_nothing":{"id":"x"},
            "contained":[{"resourceType":"Patient","id":"p","gender":"other","nickname":"SECRET"}],
            "extension":[{"url":"http://e","valueCodeableConcept":{"text":"t","colour":"red"}}]});
        let warnings = v().drop_unknown_elements("Observation", &mut o);
        let mut paths: Vec<&str> = warnings.iter().map(|w| w.expression[0].as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "Observation._nothing",
                "Observation._status.bogus",
                "Observation.component[0].valueQuantity.unitt",
                "Observation.contained[0].nickname",
                "Observation.effectivePeriod.stop",
                "Observation.extension[0].valueCodeableConcept.colour",
            ]
        );
        assert!(warnings
            .iter()
            .all(|w| w.severity == crate::fhir::IssueSeverity::Warning));
        assert!(!serde_json::to_string(&warnings).unwrap().contains("SECRET"));
        // what is left is valid, and keeps everything known
        assert!(
            v().validate("Observation", &o).is_empty(),
            "{:?}",
            v().validate("Observation", &o)
        );
        assert_eq!(o["effectivePeriod"], json!({"start":"2020-01-01"}));
        assert_eq!(o["_status"]["extension"][0]["valueString"], "v");
        assert_eq!(o["contained"][0]["gender"], "other");
        // other errors are not forgiven
        let mut bad = json!({"resourceType":"Patient","gender":7,"extra":1});
        assert_eq!(v().drop_unknown_elements("Patient", &mut bad).len(), 1);
        assert!(!v().validate("Patient", &bad).is_empty());
        // a valid resource loses nothing
        let mut ok =
            json!({"resourceType":"Patient","name":[{"family":"X"}],"_birthDate":{"id":"b"},"birthDate":"1970"});
        assert!(v().drop_unknown_elements("Patient", &mut ok).is_empty());
    }

    #[test]
    fn valid_resource_passes() {
        let p = json!({"resourceType":"Patient","name":[{"family":"X","given":["Y"]}],"birthDate":"1970-01-01"});
        assert!(v().validate("Patient", &p).is_empty());
    }
}
