//! Structural validation against StructureDefinitions: the official R4 definitions (built into
//! the binary from `fhir-schemas/structure-rules.json`) and profiles loaded from a folder (US
//! Core 6.1 ships in `profiles/`). What the JSON Schema cannot say: cardinality, the types of
//! choice elements, fixed and pattern values, required bindings (for the value sets R4 expands),
//! slices of profiles, and the FHIRPath invariants of each element.
//!
//! Issues name the element (`Patient.contact[0].relationship`) and the rule, never a value: a
//! validation result may be logged or shown, and values are PHI.

use super::fhirpath::{FhirPath, Item};
use super::{Issue, IssueSeverity, IssueType};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

pub(crate) const R4_RULES: &str = include_str!("../../fhir-schemas/structure-rules.json");

#[derive(Debug, thiserror::Error)]
pub enum StructureError {
    #[error("structure definitions: {0}")]
    Invalid(String),
    #[error("profile folder: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
struct Constraint {
    key: String,
    error: bool,
    human: String,
    /// `None`: the expression does not compile here (it is not evaluated).
    expr: Option<FhirPath>,
}

#[derive(Debug)]
struct Element {
    id: String,
    /// The last path segment (`value[x]`).
    name: String,
    min: u32,
    /// `None`: unbounded.
    max: Option<u32>,
    types: Vec<String>,
    /// Profiles of the element's types (an extension slice names its extension here).
    type_profiles: Vec<String>,
    content_ref: Option<String>,
    binding: Option<String>,
    fixed: Option<Value>,
    pattern: Option<Value>,
    /// Slicing discriminators: (type, path).
    discriminators: Vec<(String, String)>,
    constraints: Vec<Constraint>,
}

/// One StructureDefinition's snapshot, indexed for walking.
#[derive(Debug)]
pub struct Structure {
    pub url: String,
    pub type_name: String,
    elements: Vec<Element>,
    /// Element id → the ids of its children (slices excluded).
    children: HashMap<String, Vec<usize>>,
    /// Element id → its slices.
    slices: HashMap<String, Vec<usize>>,
    by_id: HashMap<String, usize>,
}

/// Splits an element id into (parent id, name, slice name): `A.b:s` → (`A`, `b`, `s`).
fn split_id(id: &str) -> Option<(&str, &str, Option<&str>)> {
    let dot = id.rfind('.')?;
    let (parent, tail) = (&id[..dot], &id[dot + 1..]);
    Some(match tail.split_once(':') {
        Some((name, slice)) => (parent, name, Some(slice)),
        None => (parent, tail, None),
    })
}

fn parse_max(v: Option<&Value>) -> Option<u32> {
    match v.and_then(Value::as_str) {
        Some("*") | None => None,
        Some(n) => n.parse().ok(),
    }
}

impl Structure {
    fn from_json(sd: &Value) -> Result<(Structure, usize), StructureError> {
        let url = sd["url"].as_str().unwrap_or_default().to_string();
        let type_name = sd["type"]
            .as_str()
            .ok_or_else(|| StructureError::Invalid(format!("{url}: no type")))?
            .to_string();
        let raw = sd["snapshot"]["element"]
            .as_array()
            .ok_or_else(|| StructureError::Invalid(format!("{url}: no snapshot")))?;
        let mut skipped = 0;
        let mut elements = Vec::with_capacity(raw.len());
        for e in raw {
            let path = e["path"].as_str().unwrap_or_default();
            let id = e["id"].as_str().unwrap_or(path).to_string();
            let name = split_id(&id).map_or(id.as_str(), |(_, n, _)| n).to_string();
            let mut types = Vec::new();
            let mut type_profiles = Vec::new();
            for t in e["type"].as_array().into_iter().flatten() {
                match t {
                    Value::String(code) => types.push(code.clone()),
                    Value::Object(o) => {
                        if let Some(code) = o.get("code").and_then(Value::as_str) {
                            types.push(code.to_string());
                        }
                        for p in o.get("profile").and_then(Value::as_array).into_iter().flatten() {
                            if let Some(p) = p.as_str() {
                                type_profiles.push(p.to_string());
                            }
                        }
                    }
                    _ => {}
                }
            }
            let (mut fixed, mut pattern) = (None, None);
            if let Some(o) = e.as_object() {
                for (k, v) in o {
                    if k.starts_with("fixed") {
                        fixed = Some(v.clone());
                    } else if k.starts_with("pattern") {
                        pattern = Some(v.clone());
                    }
                }
            }
            let binding = (e["binding"]["strength"] == "required")
                .then(|| e["binding"]["valueSet"].as_str())
                .flatten()
                .map(|vs| vs.split('|').next().unwrap_or(vs).to_string());
            let discriminators = e["slicing"]["discriminator"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| Some((d["type"].as_str()?.to_string(), d["path"].as_str()?.to_string())))
                .collect();
            let constraints = e["constraint"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let source = c["expression"].as_str()?;
                    let expr = FhirPath::compile(source).ok();
                    if expr.is_none() {
                        skipped += 1;
                    }
                    Some(Constraint {
                        key: c["key"].as_str().unwrap_or_default().to_string(),
                        error: c["severity"] == "error",
                        human: c["human"].as_str().unwrap_or_default().to_string(),
                        expr,
                    })
                })
                .collect();
            elements.push(Element {
                id,
                name,
                min: e["min"].as_u64().unwrap_or(0) as u32,
                max: parse_max(e.get("max")),
                types,
                type_profiles,
                content_ref: e["contentReference"]
                    .as_str()
                    .map(|r| r.rsplit('#').next().unwrap_or(r).to_string()),
                binding,
                fixed,
                pattern,
                discriminators,
                constraints,
            });
        }
        let mut children: HashMap<String, Vec<usize>> = HashMap::new();
        let mut slices: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, el) in elements.iter().enumerate() {
            by_id.insert(el.id.clone(), i);
            if let Some((parent, name, slice)) = split_id(&el.id) {
                match slice {
                    Some(_) => slices.entry(format!("{parent}.{name}")).or_default().push(i),
                    None => children.entry(parent.to_string()).or_default().push(i),
                }
            }
        }
        Ok((
            Structure {
                url,
                type_name,
                elements,
                children,
                slices,
                by_id,
            },
            skipped,
        ))
    }

    fn root(&self) -> Option<&Element> {
        self.by_id.get(&self.type_name).map(|&i| &self.elements[i])
    }
}

/// A value set's codes, as `system|code` and as bare codes.
#[derive(Debug, Default)]
struct ValueSet {
    coded: HashSet<String>,
    codes: HashSet<String>,
}

/// The R4 definitions and any loaded profiles, compiled once.
#[derive(Debug)]
pub struct StructureValidator {
    base: HashMap<String, Arc<Structure>>,
    profiles: HashMap<String, Arc<Structure>>,
    value_sets: HashMap<String, ValueSet>,
    /// Invariants whose FHIRPath this evaluator cannot compile (not checked).
    pub uncompiled_constraints: usize,
}

impl StructureValidator {
    /// The official R4 definitions.
    pub fn r4() -> Result<StructureValidator, StructureError> {
        let rules: Value = serde_json::from_str(R4_RULES).map_err(|e| StructureError::Invalid(e.to_string()))?;
        let mut v = StructureValidator {
            base: HashMap::new(),
            profiles: HashMap::new(),
            value_sets: HashMap::new(),
            uncompiled_constraints: 0,
        };
        for sd in rules["structures"].as_array().into_iter().flatten() {
            let (st, skipped) = Structure::from_json(sd)?;
            v.uncompiled_constraints += skipped;
            v.base.insert(st.type_name.clone(), Arc::new(st));
        }
        for (url, codes) in rules["valueSets"].as_object().into_iter().flatten() {
            let mut vs = ValueSet::default();
            for c in codes.as_array().into_iter().flatten().filter_map(Value::as_str) {
                vs.coded.insert(c.to_string());
                if let Some((_, code)) = c.split_once('|') {
                    vs.codes.insert(code.to_string());
                }
            }
            v.value_sets.insert(url.clone(), vs);
        }
        Ok(v)
    }

    /// Loads every StructureDefinition (with a snapshot) and every expanded ValueSet in the
    /// JSON files of `dir` and its subfolders. Returns the number of profiles.
    pub fn load_profiles(&mut self, dir: &Path) -> Result<usize, StructureError> {
        let mut n = 0;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&std::fs::read(&path)?) else {
                    continue;
                };
                match v["resourceType"].as_str() {
                    Some("StructureDefinition") if v["snapshot"].is_object() => {
                        let (st, skipped) = Structure::from_json(&v)
                            .map_err(|e| StructureError::Invalid(format!("{}: {e}", path.display())))?;
                        self.uncompiled_constraints += skipped;
                        let st = Arc::new(st);
                        if let Some(version) = v["version"].as_str() {
                            self.profiles.insert(format!("{}|{version}", st.url), st.clone());
                        }
                        self.profiles.insert(st.url.clone(), st);
                        n += 1;
                    }
                    Some("ValueSet") => {
                        let mut vs = ValueSet::default();
                        let mut stack: Vec<&Value> =
                            v["expansion"]["contains"].as_array().into_iter().flatten().collect();
                        while let Some(c) = stack.pop() {
                            if let (Some(code), false) = (c["code"].as_str(), c["abstract"] == true) {
                                vs.coded
                                    .insert(format!("{}|{code}", c["system"].as_str().unwrap_or_default()));
                                vs.codes.insert(code.to_string());
                            }
                            stack.extend(c["contains"].as_array().into_iter().flatten());
                        }
                        if let (Some(url), false) = (v["url"].as_str(), vs.codes.is_empty()) {
                            self.value_sets.insert(url.to_string(), vs);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(n)
    }

    /// Whether a profile of this canonical URL is loaded.
    pub fn knows_profile(&self, url: &str) -> bool {
        self.profiles.contains_key(url)
    }

    /// The loaded profiles of a resource type (canonical URLs without versions), sorted.
    pub fn profiles_of(&self, resource_type: &str) -> Vec<String> {
        let mut urls: Vec<String> = self
            .profiles
            .values()
            .filter(|p| p.type_name == resource_type)
            .map(|p| p.url.clone())
            .collect();
        urls.sort();
        urls.dedup();
        urls
    }

    /// Validates a resource against the R4 definition of its type and the given profiles (an
    /// unknown profile is a warning). Issues are in document order, without duplicates.
    pub fn validate(&self, resource: &Value, profiles: &[String]) -> Vec<Issue> {
        let mut w = Walk {
            v: self,
            root: resource,
            container: resource,
            issues: Vec::new(),
            seen: HashSet::new(),
        };
        let Some(t) = resource["resourceType"].as_str() else {
            return vec![Issue::error(IssueType::Structure, "resourceType is missing").at("resourceType")];
        };
        match self.base.get(t) {
            Some(st) => w.resource(st, resource, t.to_string(), false),
            None => w.push(
                IssueSeverity::Error,
                IssueType::NotSupported,
                t,
                "unknown resource type".into(),
            ),
        }
        for url in profiles {
            match self.profiles.get(url) {
                Some(st) if st.type_name == t => w.resource(st, resource, t.to_string(), false),
                Some(_) => w.push(
                    IssueSeverity::Error,
                    IssueType::Invalid,
                    t,
                    "the profile is for another resource type".into(),
                ),
                None => w.push(
                    IssueSeverity::Warning,
                    IssueType::NotSupported,
                    t,
                    "a profile this server does not know was not checked".into(),
                ),
            }
        }
        w.issues
    }
}

/// The values an element holds in a JSON object, with the type each has (for choices), and
/// the key each came from.
fn values_of<'v>(node: &'v Value, el: &Element) -> Vec<(&'v Value, Option<String>, String)> {
    let Some(obj) = node.as_object() else { return Vec::new() };
    let mut out = Vec::new();
    let mut take = |key: &str, ty: Option<String>| {
        let own = obj.get(key);
        let ext = obj.get(&format!("_{key}"));
        let items: Vec<&Value> = match (own, ext) {
            (Some(Value::Array(a)), _) => a.iter().collect(),
            (Some(v), _) if !v.is_null() => vec![v],
            // a primitive present only through its extensions
            (None, Some(Value::Array(a))) => a.iter().collect(),
            (None, Some(v)) if !v.is_null() => vec![v],
            _ => Vec::new(),
        };
        for v in items {
            out.push((v, ty.clone(), key.to_string()));
        }
    };
    match el.name.strip_suffix("[x]") {
        Some(prefix) => {
            for t in &el.types {
                let mut chars = t.chars();
                let cap: String = chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default();
                take(&format!("{prefix}{cap}"), Some(t.clone()));
            }
        }
        None => take(&el.name, el.types.first().cloned()),
    }
    out
}

/// Whether `value` holds everything `pattern` has (FHIR pattern[x] semantics).
fn matches_pattern(pattern: &Value, value: &Value) -> bool {
    match (pattern, value) {
        (Value::Object(p), Value::Object(v)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| matches_pattern(pv, vv))),
        (Value::Array(p), Value::Array(v)) => p.iter().all(|pi| v.iter().any(|vi| matches_pattern(pi, vi))),
        (Value::Array(p), single) => p.iter().all(|pi| matches_pattern(pi, single)),
        (p, v) => p == v,
    }
}

/// The values at a dotted path below `value` (through arrays).
fn at_path<'v>(value: &'v Value, path: &str) -> Vec<&'v Value> {
    let mut cur = vec![value];
    for seg in path.split('.').filter(|s| !s.is_empty() && *s != "$this") {
        cur = cur
            .into_iter()
            .filter_map(|v| v.get(seg))
            .flat_map(|v| match v {
                Value::Array(a) => a.iter().collect::<Vec<_>>(),
                other => vec![other],
            })
            .collect();
    }
    cur
}

struct Walk<'a> {
    v: &'a StructureValidator,
    /// The resource being walked (`%resource`), and the one a contained resource sits in
    /// (`%rootResource`).
    root: &'a Value,
    container: &'a Value,
    issues: Vec<Issue>,
    seen: HashSet<(String, String)>,
}

impl<'a> Walk<'a> {
    fn push(&mut self, severity: IssueSeverity, code: IssueType, at: &str, text: String) {
        if self.seen.insert((at.to_string(), text.clone())) {
            self.issues.push(Issue {
                severity,
                code,
                diagnostics: Some(text),
                expression: vec![at.to_string()],
            });
        }
    }

    /// A resource (the root, or one contained or in a Bundle) against a structure of its type.
    fn resource(&mut self, st: &Structure, resource: &'a Value, loc: String, contained: bool) {
        // `%resource` in the invariants of this resource's elements is this resource
        // (a contained resource keeps its container as `%rootResource`; a Bundle's entry is
        // its own root)
        let outer = std::mem::replace(&mut self.root, resource);
        let outer_container = self.container;
        if !contained {
            self.container = resource;
        }
        if let Some(root) = st.root() {
            self.constraints(root, resource, st.type_name.clone(), &loc);
        }
        self.children(st, &st.type_name.clone(), resource, &loc);
        self.root = outer;
        self.container = outer_container;
    }

    fn constraints(&mut self, el: &Element, value: &'a Value, type_name: String, loc: &str) {
        for c in &el.constraints {
            let Some(expr) = &c.expr else { continue };
            // an invariant holds unless it evaluates to false; one this evaluator cannot
            // evaluate is not reported
            let failed = match expr.evaluate_in(value, Some(type_name.clone()), self.root, self.container) {
                Ok(items) => matches!(items.as_slice(), [Item::Bool(false)]),
                Err(_) => false,
            };
            if failed {
                let (severity, code) = if c.error {
                    (IssueSeverity::Error, IssueType::Invariant)
                } else {
                    (IssueSeverity::Warning, IssueType::Invariant)
                };
                self.push(severity, code, loc, format!("{}: {}", c.key, c.human));
            }
        }
    }

    /// Checks the children of element `id` of `st` in the object `node`.
    fn children(&mut self, st: &Structure, id: &str, node: &'a Value, loc: &str) {
        let Some(kids) = st.children.get(id) else { return };
        for &i in kids {
            let el = &st.elements[i];
            let values = values_of(node, el);
            let name = el.name.trim_end_matches("[x]");
            let at = format!("{loc}.{name}");
            if (values.len() as u32) < el.min {
                self.push(
                    IssueSeverity::Error,
                    IssueType::Required,
                    &at,
                    format!("{name}: at least {} required, {} present", el.min, values.len()),
                );
            }
            if let Some(max) = el.max {
                if values.len() as u32 > max {
                    self.push(
                        IssueSeverity::Error,
                        IssueType::Structure,
                        &at,
                        format!("{name}: at most {max} allowed, {} present", values.len()),
                    );
                }
            }
            let slices: Vec<&Element> = st
                .slices
                .get(&el.id)
                .map(|s| s.iter().map(|&j| &st.elements[j]).collect())
                .unwrap_or_default();
            let mut per_slice = vec![0u32; slices.len()];
            let many = values.len() > 1 || values.first().is_some_and(|(_, _, k)| node[k].is_array());
            for (n, (value, ty, key)) in values.iter().enumerate() {
                // a choice is named by its key (`valueQuantity`), as the client wrote it
                let named = if key.as_str() == name {
                    at.clone()
                } else {
                    format!("{loc}.{key}")
                };
                let here = if many { format!("{named}[{n}]") } else { named };
                let ty = ty.clone().unwrap_or_default();
                let slice = slices.iter().position(|s| self.in_slice(st, el, s, value));
                self.value(st, el, value, &ty, &here);
                if let Some(k) = slice {
                    per_slice[k] += 1;
                    let s = slices[k];
                    self.checks(s, value, &ty, &here);
                    if st.children.contains_key(&s.id) {
                        self.children(st, &s.id.clone(), value, &here);
                    }
                }
            }
            for (s, count) in slices.iter().zip(per_slice) {
                // a slice this walker cannot recognise values of is not counted
                if !self.recognisable(st, el, s) {
                    continue;
                }
                let slice_name = s.id.rsplit(':').next().unwrap_or_default();
                if count < s.min {
                    self.push(
                        IssueSeverity::Error,
                        IssueType::Required,
                        &at,
                        format!("{name}: slice {slice_name} needs at least {}, {count} present", s.min),
                    );
                }
                if s.max.is_some_and(|m| count > m) {
                    self.push(
                        IssueSeverity::Error,
                        IssueType::Structure,
                        &at,
                        format!("{name}: slice {slice_name} allows at most {}", s.max.unwrap_or(0)),
                    );
                }
            }
        }
    }

    /// Whether values can be told to belong to slice `s` of `el` (a pattern or fixed value on
    /// the slice or on the discriminating child, or an extension's URL).
    fn recognisable(&self, st: &Structure, el: &Element, s: &Element) -> bool {
        if s.fixed.is_some() || s.pattern.is_some() {
            return true;
        }
        if el.name == "extension" || el.name == "modifierExtension" {
            return !s.type_profiles.is_empty() || st.by_id.contains_key(&format!("{}.url", s.id));
        }
        !el.discriminators.is_empty()
            && el.discriminators.iter().all(|(kind, path)| {
                // `$this` without a value on the slice: a slice by value set (not recognised)
                matches!(kind.as_str(), "value" | "pattern")
                    && path != "$this"
                    && st
                        .by_id
                        .get(&format!("{}.{path}", s.id))
                        .is_some_and(|&i| st.elements[i].fixed.is_some() || st.elements[i].pattern.is_some())
            })
    }

    fn in_slice(&self, st: &Structure, el: &Element, s: &Element, value: &Value) -> bool {
        if !self.recognisable(st, el, s) {
            return false;
        }
        if let Some(f) = &s.fixed {
            return f == value;
        }
        if let Some(p) = &s.pattern {
            return matches_pattern(p, value);
        }
        if el.name == "extension" || el.name == "modifierExtension" {
            let url = value["url"].as_str().unwrap_or_default();
            if let Some(&i) = st.by_id.get(&format!("{}.url", s.id)) {
                if let Some(Value::String(fixed)) = &st.elements[i].fixed {
                    return url == fixed;
                }
            }
            return s.type_profiles.iter().any(|p| p == url);
        }
        el.discriminators.iter().all(|(_, path)| {
            let rule = if path == "$this" {
                Some(s)
            } else {
                st.by_id.get(&format!("{}.{path}", s.id)).map(|&i| &st.elements[i])
            };
            let Some(rule) = rule else { return false };
            let found = at_path(value, path);
            match (&rule.fixed, &rule.pattern) {
                (Some(f), _) => found.contains(&f),
                (None, Some(p)) => found.iter().any(|v| matches_pattern(p, v)),
                _ => false,
            }
        })
    }

    /// Fixed and pattern values, the required binding and the invariants of `el` on a value.
    fn checks(&mut self, el: &Element, value: &'a Value, ty: &str, loc: &str) {
        if let Some(f) = &el.fixed {
            if f != value {
                self.push(
                    IssueSeverity::Error,
                    IssueType::Value,
                    loc,
                    "the value differs from the fixed value of the definition".into(),
                );
            }
        }
        if let Some(p) = &el.pattern {
            if !matches_pattern(p, value) {
                self.push(
                    IssueSeverity::Error,
                    IssueType::Value,
                    loc,
                    "the value does not match the pattern of the definition".into(),
                );
            }
        }
        if let Some(vs) = &el.binding {
            self.binding(vs, value, ty, loc);
        }
        self.constraints(el, value, ty.to_string(), loc);
    }

    /// A value of element `el`: its own checks, then what it contains.
    fn value(&mut self, st: &Structure, el: &Element, value: &'a Value, ty: &str, loc: &str) {
        self.checks(el, value, ty, loc);
        if !value.is_object() {
            return;
        }
        if st.children.contains_key(&el.id) {
            self.children(st, &el.id.clone(), value, loc);
        } else if let Some(r) = &el.content_ref {
            if st.by_id.contains_key(r) {
                self.children(st, &r.clone(), value, loc);
            } else if let Some(base) = self.v.base.get(&st.type_name).cloned() {
                // a profile's content reference names the base definition's element
                self.children(&base, r, value, loc);
            }
        } else if ty == "Resource"
            || (self.v.base.get(ty).is_some_and(|b| b.root().is_some()) && value.get("resourceType").is_some())
        {
            let inner = value["resourceType"].as_str().unwrap_or_default();
            match self.v.base.get(inner).cloned() {
                Some(b) => self.resource(&b, value, loc.to_string(), el.name == "contained"),
                None => self.push(
                    IssueSeverity::Error,
                    IssueType::Invalid,
                    loc,
                    "unknown resource type".into(),
                ),
            }
        } else if let Some(b) = self.v.base.get(ty).cloned() {
            if let Some(root) = b.root() {
                self.constraints(root, value, ty.to_string(), loc);
            }
            self.children(&b, &b.type_name.clone(), value, loc);
        }
    }

    /// A required binding: the code (or one coding) must be in the value set, when the value
    /// set is one this server has an expansion of.
    fn binding(&mut self, url: &str, value: &Value, ty: &str, loc: &str) {
        let Some(vs) = self.v.value_sets.get(url) else { return };
        let coding_ok = |c: &Value| match (c["system"].as_str(), c["code"].as_str()) {
            (Some(s), Some(code)) => vs.coded.contains(&format!("{s}|{code}")),
            (None, Some(code)) => vs.codes.contains(code),
            _ => false,
        };
        let ok = match ty {
            "code" | "string" | "uri" => match value.as_str() {
                Some(code) => vs.codes.contains(code),
                None => true, // only extensions
            },
            "Coding" => coding_ok(value),
            "CodeableConcept" => value["coding"].as_array().is_some_and(|cs| cs.iter().any(coding_ok)),
            "Quantity" => value["code"].as_str().is_none() || coding_ok(value),
            _ => true,
        };
        if !ok {
            self.push(
                IssueSeverity::Error,
                IssueType::Value,
                loc,
                format!("the code is not in the required value set {url}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(v: &StructureValidator, r: &Value) -> Vec<(String, String)> {
        v.validate(r, &[])
            .into_iter()
            .filter(|i| i.severity == IssueSeverity::Error)
            .map(|i| (i.expression[0].clone(), i.diagnostics.unwrap_or_default()))
            .collect()
    }

    #[test]
    fn cardinality_bindings_and_invariants_are_located() {
        let v = StructureValidator::r4().unwrap();
        assert!(errors(&v, &json!({"resourceType": "Patient", "gender": "female"})).is_empty());
        // Observation.status and code are 1..1
        let e = errors(&v, &json!({"resourceType": "Observation"}));
        assert!(e.iter().any(|(at, _)| at == "Observation.status"), "{e:?}");
        assert!(e.iter().any(|(at, _)| at == "Observation.code"), "{e:?}");
        // Patient.link.other is 1..1, inside a backbone element
        let e = errors(&v, &json!({"resourceType": "Patient", "link": [{"type": "seealso"}]}));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "Patient.link[0].other");
        // pat-1: a contact needs a name, telecom, address or organization
        let e = errors(&v, &json!({"resourceType": "Patient", "contact": [{"gender": "male"}]}));
        assert!(
            e.iter()
                .any(|(at, d)| at == "Patient.contact[0]" && d.starts_with("pat-1")),
            "{e:?}"
        );
        // a required binding on a Coding and in a datatype (Quantity.comparator is a code)
        let e = errors(
            &v,
            &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                    "valueQuantity": {"value": 1, "comparator": "~~"}}),
        );
        assert!(
            e.iter().any(|(at, _)| at == "Observation.valueQuantity.comparator"),
            "{e:?}"
        );
        // nested resources are validated as what they are
        let e = errors(
            &v,
            &json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Observation"}}]}),
        );
        assert!(e.iter().any(|(at, _)| at == "Bundle.entry[0].resource.status"), "{e:?}");
        // nothing of the value in any text
        let e = errors(
            &v,
            &json!({"resourceType": "Patient", "link": [{"type": "Sentinel-PHI-value"}]}),
        );
        assert!(e.iter().all(|(_, d)| !d.contains("Sentinel")));
    }
}
