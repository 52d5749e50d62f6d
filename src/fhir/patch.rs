//! Patches: JSON Patch (RFC 6902, through the `json-patch` crate) and FHIRPath Patch (a
//! Parameters resource of `operation`s: add, insert, delete, replace, move; FHIR R4 2.42).
//!
//! A FHIRPath Patch operation evaluates its `path` with our FHIRPath evaluator; the nodes found
//! are located in the document by identity (each result is a reference into it), which gives
//! their JSON Pointer, and the change is made there. Whether an element repeats (an `add`
//! appends to a list or sets a single value) comes from the R4 schema's definitions.
//!
//! Errors never quote the document or the patch's values (they may be PHI).

use super::fhirpath::{FhirPath, Item};
use super::validate::Validator;
use base64::Engine;
use serde_json::{Map, Value};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document itself is malformed (400).
    #[error("{0}")]
    Invalid(&'static str),
    /// The patch does not apply to this resource (422).
    #[error("{0}")]
    NotApplicable(&'static str),
}

#[derive(Debug, Clone)]
pub enum Patch {
    Json(json_patch::Patch),
    FhirPath(Vec<Operation>),
}

#[derive(Debug, Clone)]
pub enum Operation {
    Add {
        path: FhirPath,
        name: String,
        value: Value,
    },
    Insert {
        path: FhirPath,
        index: usize,
        value: Value,
    },
    Delete {
        path: FhirPath,
    },
    Replace {
        path: FhirPath,
        value: Value,
    },
    Move {
        path: FhirPath,
        source: usize,
        destination: usize,
    },
}

/// The media type of a JSON Patch document.
pub const JSON_PATCH: &str = "application/json-patch+json";

impl Patch {
    /// A JSON Patch document (a JSON array of operations).
    pub fn json(doc: Value) -> Result<Patch, PatchError> {
        serde_json::from_value(doc)
            .map(Patch::Json)
            .map_err(|_| PatchError::Invalid("the JSON Patch document is not a list of valid operations"))
    }

    /// A FHIRPath Patch: a Parameters resource.
    pub fn fhirpath(params: &Map<String, Value>) -> Result<Patch, PatchError> {
        if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(PatchError::Invalid("a FHIRPath Patch is a Parameters resource"));
        }
        let mut ops = Vec::new();
        for p in params.get("parameter").and_then(Value::as_array).into_iter().flatten() {
            if p.get("name").and_then(Value::as_str) != Some("operation") {
                return Err(PatchError::Invalid(
                    "a FHIRPath Patch has only parameters named operation",
                ));
            }
            ops.push(Operation::parse(p)?);
        }
        Ok(Patch::FhirPath(ops))
    }

    /// A patch as a Bundle entry carries it: a Binary holding a JSON Patch, or Parameters.
    pub fn from_resource(resource: &Map<String, Value>) -> Result<Patch, PatchError> {
        match resource.get("resourceType").and_then(Value::as_str) {
            Some("Parameters") => Patch::fhirpath(resource),
            Some("Binary") => {
                if resource.get("contentType").and_then(Value::as_str) != Some(JSON_PATCH) {
                    return Err(PatchError::Invalid(
                        "a Binary patch must have contentType application/json-patch+json",
                    ));
                }
                let data = resource
                    .get("data")
                    .and_then(Value::as_str)
                    .ok_or(PatchError::Invalid("the Binary patch has no data"))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(|_| PatchError::Invalid("the Binary patch data is not base64"))?;
                let doc = serde_json::from_slice(&bytes)
                    .map_err(|_| PatchError::Invalid("the Binary patch data is not JSON"))?;
                Patch::json(doc)
            }
            _ => Err(PatchError::Invalid(
                "a patch entry's resource must be Parameters or Binary",
            )),
        }
    }

    /// Applies the patch to `doc`: all of it, or (on error) none of it.
    pub fn apply(&self, doc: &mut Value, model: &Validator) -> Result<(), PatchError> {
        match self {
            Patch::Json(p) => json_patch::patch(doc, p).map_err(|e| {
                PatchError::NotApplicable(match e.kind {
                    json_patch::PatchErrorKind::TestFailed => "a JSON Patch test operation failed",
                    _ => "a JSON Patch operation names a path that does not exist in the resource",
                })
            }),
            Patch::FhirPath(ops) => {
                let mut work = doc.clone();
                for op in ops {
                    op.apply(&mut work, model)?;
                }
                *doc = work;
                Ok(())
            }
        }
    }
}

fn part<'a>(parts: &'a [Value], name: &str) -> Option<&'a Value> {
    parts
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

fn part_str<'a>(parts: &'a [Value], name: &str) -> Option<&'a str> {
    let p = part(parts, name)?.as_object()?;
    p.iter()
        .find(|(k, _)| k.starts_with("value"))
        .and_then(|(_, v)| v.as_str())
}

fn part_index(parts: &[Value], name: &str) -> Result<usize, PatchError> {
    let p = part(parts, name).ok_or(PatchError::Invalid("an operation lacks its index"))?;
    p.get("valueInteger")
        .and_then(Value::as_u64)
        .map(|i| i as usize)
        .ok_or(PatchError::Invalid("an index must be a non-negative valueInteger"))
}

/// The `value` of an operation: a `value[x]`, a resource, or (for complex types) parts.
fn part_value(parts: &[Value]) -> Result<Value, PatchError> {
    let p = part(parts, "value")
        .and_then(Value::as_object)
        .ok_or(PatchError::Invalid("an operation lacks its value"))?;
    value_of(p)
}

fn value_of(p: &Map<String, Value>) -> Result<Value, PatchError> {
    if let Some((_, v)) = p.iter().find(|(k, _)| k.starts_with("value")) {
        return Ok(v.clone());
    }
    if let Some(r) = p.get("resource") {
        return Ok(r.clone());
    }
    let Some(sub) = p.get("part").and_then(Value::as_array) else {
        return Err(PatchError::Invalid(
            "an operation's value has no value[x], resource or parts",
        ));
    };
    let mut out = Map::new();
    for s in sub {
        let s = s.as_object().ok_or(PatchError::Invalid("a part must be an object"))?;
        let name = s
            .get("name")
            .and_then(Value::as_str)
            .ok_or(PatchError::Invalid("a part lacks its name"))?;
        let v = value_of(s)?;
        // a name given twice is a list
        match out.get_mut(name) {
            None => {
                out.insert(name.to_string(), v);
            }
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => {
                let first = prev.take();
                *prev = Value::Array(vec![first, v]);
            }
        }
    }
    Ok(Value::Object(out))
}

impl Operation {
    fn parse(p: &Value) -> Result<Operation, PatchError> {
        let parts = p
            .get("part")
            .and_then(Value::as_array)
            .ok_or(PatchError::Invalid("an operation has no parts"))?;
        let path = part_str(parts, "path").ok_or(PatchError::Invalid("an operation lacks its path"))?;
        let path =
            FhirPath::compile(path).map_err(|_| PatchError::Invalid("an operation's path is not valid FHIRPath"))?;
        Ok(match part_str(parts, "type") {
            Some("add") => Operation::Add {
                path,
                name: part_str(parts, "name")
                    .ok_or(PatchError::Invalid("an add operation lacks its name"))?
                    .to_string(),
                value: part_value(parts)?,
            },
            Some("insert") => Operation::Insert {
                path,
                index: part_index(parts, "index")?,
                value: part_value(parts)?,
            },
            Some("delete") => Operation::Delete { path },
            Some("replace") => Operation::Replace {
                path,
                value: part_value(parts)?,
            },
            Some("move") => Operation::Move {
                path,
                source: part_index(parts, "source")?,
                destination: part_index(parts, "destination")?,
            },
            _ => {
                return Err(PatchError::Invalid(
                    "an operation's type must be add, insert, delete, replace or move",
                ))
            }
        })
    }

    fn apply(&self, doc: &mut Value, model: &Validator) -> Result<(), PatchError> {
        match self {
            Operation::Add { path, name, value } => {
                let target = one(&locate(path, doc)?)?;
                let def = definition_at(doc, &target, model);
                let repeats = def.as_deref().and_then(|d| model.element(d, name)).map(|e| e.repeats);
                let node = pointer_mut(doc, &target)?
                    .as_object_mut()
                    .ok_or(PatchError::NotApplicable(
                        "add: the path does not name an element with children",
                    ))?;
                match (node.get_mut(name.as_str()), repeats) {
                    (Some(Value::Array(a)), _) => a.push(value.clone()),
                    (None, Some(true)) => {
                        node.insert(name.clone(), Value::Array(vec![value.clone()]));
                    }
                    (None, _) => {
                        node.insert(name.clone(), value.clone());
                    }
                    (Some(_), _) => return Err(PatchError::NotApplicable("add: the element already has a value")),
                }
                Ok(())
            }
            Operation::Insert { path, index, value } => {
                let found = locate(path, doc)?;
                let list = list_of(&found)?;
                let Some(list) = list else {
                    // nothing there yet: the list is created, at index 0 only
                    if *index != 0 {
                        return Err(PatchError::NotApplicable(
                            "insert: the index is past the end of the list",
                        ));
                    }
                    return Operation::Add {
                        path: parent_path(path)?,
                        name: last_name(path)?,
                        value: Value::Array(vec![value.clone()]),
                    }
                    .apply(doc, model);
                };
                let a = pointer_mut(doc, &list)?
                    .as_array_mut()
                    .ok_or(PatchError::NotApplicable("insert: the path does not name a list"))?;
                if *index > a.len() {
                    return Err(PatchError::NotApplicable(
                        "insert: the index is past the end of the list",
                    ));
                }
                a.insert(*index, value.clone());
                Ok(())
            }
            Operation::Delete { path } => {
                let found = locate(path, doc)?;
                match found.as_slice() {
                    [] => Ok(()),
                    [target] => remove(doc, target),
                    _ => Err(PatchError::NotApplicable(
                        "delete: the path names more than one element",
                    )),
                }
            }
            Operation::Replace { path, value } => {
                let target = one(&locate(path, doc)?)?;
                *pointer_mut(doc, &target)? = value.clone();
                Ok(())
            }
            Operation::Move {
                path,
                source,
                destination,
            } => {
                let found = locate(path, doc)?;
                let list = list_of(&found)?.ok_or(PatchError::NotApplicable("move: the path names no list"))?;
                let a = pointer_mut(doc, &list)?
                    .as_array_mut()
                    .ok_or(PatchError::NotApplicable("move: the path does not name a list"))?;
                if *source >= a.len() || *destination >= a.len() {
                    return Err(PatchError::NotApplicable("move: an index is past the end of the list"));
                }
                let item = a.remove(*source);
                a.insert(*destination, item);
                Ok(())
            }
        }
    }
}

/// The JSON Pointers (as segments) of the nodes `path` selects in `doc`.
fn locate(path: &FhirPath, doc: &Value) -> Result<Vec<Vec<String>>, PatchError> {
    let items = path
        .evaluate(doc)
        .map_err(|_| PatchError::NotApplicable("the path could not be evaluated on the resource"))?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut where_is: HashMap<*const Value, Vec<String>> = HashMap::new();
    index_nodes(doc, &mut Vec::new(), &mut where_is);
    items
        .iter()
        .map(|i| match i {
            Item::Node(v, _) => where_is
                .get(&(*v as *const Value))
                .cloned()
                .ok_or(PatchError::NotApplicable(
                    "the path selects something that is not an element of the resource",
                )),
            _ => Err(PatchError::NotApplicable(
                "the path selects a computed value, not an element",
            )),
        })
        .collect()
}

fn index_nodes(v: &Value, at: &mut Vec<String>, out: &mut HashMap<*const Value, Vec<String>>) {
    out.insert(v as *const Value, at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(k.clone());
                index_nodes(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(i.to_string());
                index_nodes(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn one(found: &[Vec<String>]) -> Result<Vec<String>, PatchError> {
    match found {
        [one] => Ok(one.clone()),
        [] => Err(PatchError::NotApplicable("the path names no element")),
        _ => Err(PatchError::NotApplicable("the path names more than one element")),
    }
}

/// The list the selected items are elements of (all of one list), if any were selected.
fn list_of(found: &[Vec<String>]) -> Result<Option<Vec<String>>, PatchError> {
    let mut parent: Option<&[String]> = None;
    for f in found {
        let is_item = f.last().is_some_and(|s| s.parse::<usize>().is_ok());
        let p = &f[..f.len().saturating_sub(1)];
        if !is_item || parent.is_some_and(|q| q != p) {
            return Err(PatchError::NotApplicable(
                "the path does not name the elements of one list",
            ));
        }
        parent = Some(p);
    }
    Ok(parent.map(<[String]>::to_vec))
}

fn pointer_mut<'a>(doc: &'a mut Value, at: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut v = doc;
    for seg in at {
        v = match v {
            Value::Object(m) => m.get_mut(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or(PatchError::NotApplicable("the path names no element"))?;
    }
    Ok(v)
}

/// Removes the element at `at`; a list or element left empty goes too (FHIR has no empty
/// lists or elements).
fn remove(doc: &mut Value, at: &[String]) -> Result<(), PatchError> {
    let Some((last, parent_at)) = at.split_last() else {
        return Err(PatchError::NotApplicable(
            "delete: the whole resource cannot be deleted by a patch",
        ));
    };
    let parent = pointer_mut(doc, parent_at)?;
    let now_empty = match parent {
        Value::Object(m) => {
            m.remove(last);
            m.is_empty()
        }
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| PatchError::NotApplicable("the path names no element"))?;
            if i < a.len() {
                a.remove(i);
            }
            a.is_empty()
        }
        _ => false,
    };
    if now_empty && !parent_at.is_empty() {
        return remove(doc, parent_at);
    }
    Ok(())
}

/// The schema definition of the node at `at` (walking the resource's elements down).
fn definition_at(doc: &Value, at: &[String], model: &Validator) -> Option<String> {
    let mut def = doc.get("resourceType")?.as_str()?.to_string();
    let mut node = doc;
    for seg in at {
        node = match node {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
        if seg.parse::<usize>().is_ok() {
            continue; // an item of a list has the list's type
        }
        let element = model.element(&def, seg)?;
        def = element.type_def.clone()?;
        if def == "ResourceList" {
            // a contained or nested resource: its own type
            let first = if let Value::Array(a) = node { a.first()? } else { node };
            def = first.get("resourceType")?.as_str()?.to_string();
        }
    }
    Some(def)
}

/// `Patient.identifier` → `Patient`; for inserting into a list that does not exist yet.
fn parent_path(path: &FhirPath) -> Result<FhirPath, PatchError> {
    let src = path.source();
    let (parent, _) = src
        .rsplit_once('.')
        .ok_or(PatchError::NotApplicable("insert: the path names no list"))?;
    FhirPath::compile(parent).map_err(|_| PatchError::NotApplicable("insert: the path names no list"))
}

fn last_name(path: &FhirPath) -> Result<String, PatchError> {
    let src = path.source();
    let (_, name) = src
        .rsplit_once('.')
        .ok_or(PatchError::NotApplicable("insert: the path names no list"))?;
    if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(name.to_string())
    } else {
        Err(PatchError::NotApplicable("insert: the path names no list"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> &'static Validator {
        static V: std::sync::OnceLock<Validator> = std::sync::OnceLock::new();
        V.get_or_init(|| Validator::r4().unwrap())
    }

    fn op(parts: Value) -> Map<String, Value> {
        let Value::Object(m) =
            json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]})
        else {
            unreachable!()
        };
        m
    }

    #[test]
    fn add_appends_to_repeating_elements_and_sets_single_ones() {
        let mut doc = json!({"resourceType": "Patient"});
        let add_name = op(json!([
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "name"},
            {"name": "value", "part": [{"name": "family", "valueString": "X"}]}
        ]));
        Patch::fhirpath(&add_name).unwrap().apply(&mut doc, model()).unwrap();
        assert_eq!(doc["name"], json!([{"family": "X"}]));
        let add_gender = op(json!([
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "gender"},
            {"name": "value", "valueCode": "female"}
        ]));
        let p = Patch::fhirpath(&add_gender).unwrap();
        p.apply(&mut doc, model()).unwrap();
        assert_eq!(doc["gender"], "female");
        // a second add to a single element fails, and leaves the document as it was
        let before = doc.clone();
        assert!(p.apply(&mut doc, model()).is_err());
        assert_eq!(doc, before);
    }

    #[test]
    fn delete_insert_move_replace() {
        let mut doc = json!({"resourceType": "Patient", "identifier": [{"value": "a"}, {"value": "b"}]});
        let apply = |doc: &mut Value, parts: Value| Patch::fhirpath(&op(parts)).unwrap().apply(doc, model());
        apply(
            &mut doc,
            json!([{"name": "type", "valueCode": "insert"}, {"name": "path", "valueString": "Patient.identifier"},
                   {"name": "index", "valueInteger": 1}, {"name": "value", "part": [{"name": "value", "valueString": "c"}]}]),
        )
        .unwrap();
        assert_eq!(doc["identifier"][1]["value"], "c");
        apply(
            &mut doc,
            json!([{"name": "type", "valueCode": "move"}, {"name": "path", "valueString": "Patient.identifier"},
                   {"name": "source", "valueInteger": 0}, {"name": "destination", "valueInteger": 2}]),
        )
        .unwrap();
        assert_eq!(doc["identifier"][2]["value"], "a");
        apply(
            &mut doc,
            json!([{"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.identifier[0].value"},
                   {"name": "value", "valueString": "z"}]),
        )
        .unwrap();
        assert_eq!(doc["identifier"][0]["value"], "z");
        for _ in 0..3 {
            apply(
                &mut doc,
                json!([{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.identifier[0]"}]),
            )
            .unwrap();
        }
        assert_eq!(doc, json!({"resourceType": "Patient"}));
    }

    #[test]
    fn json_patch_is_atomic() {
        let mut doc = json!({"resourceType": "Patient", "active": true});
        let p = Patch::json(json!([
            {"op": "replace", "path": "/active", "value": false},
            {"op": "test", "path": "/gender", "value": "male"}
        ]))
        .unwrap();
        assert!(matches!(p.apply(&mut doc, model()), Err(PatchError::NotApplicable(_))));
        assert_eq!(doc["active"], true);
    }
}
