//! The search-parameter registry, loaded once from the official R4 `search-parameters.json`
//! (fhir-schemas/) with every expression compiled: which parameters each resource type has,
//! their types, targets and composite components, and which carry PHI (those are only ever
//! indexed as blind indexes).

use crate::fhir::fhirpath::{FhirPath, FhirPathError};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The official definitions (HL7, CC0), compiled into the binary; see fhir-schemas/SOURCES.md.
pub const R4_SEARCH_PARAMETERS_JSON: &str = include_str!("../../fhir-schemas/search-parameters.json");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl ParamType {
    fn parse(s: &str) -> Option<ParamType> {
        Some(match s {
            "number" => ParamType::Number,
            "date" => ParamType::Date,
            "string" => ParamType::String,
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "composite" => ParamType::Composite,
            "quantity" => ParamType::Quantity,
            "uri" => ParamType::Uri,
            "special" => ParamType::Special,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct SearchParam {
    pub code: String,
    pub url: String,
    pub kind: ParamType,
    /// The values to index (absent for parameters the server computes, such as `_type`).
    pub expression: Option<FhirPath>,
    /// Resource types a reference parameter may point to.
    pub targets: Vec<String>,
    /// Composite parameters: each component (its expression relative to the composite's value).
    pub components: Vec<Component>,
    /// Values that identify a person (names, addresses, contact details, identifiers, birth
    /// dates): stored only as blind indexes.
    pub phi: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("search-parameters.json is not a Bundle of SearchParameter resources")]
    Format,
    #[error("search parameter {url}: {source}")]
    Expression { url: String, source: FhirPathError },
}

/// One component of a composite parameter.
#[derive(Debug)]
pub struct Component {
    /// The URL of the component's own parameter definition.
    pub definition: String,
    /// That definition's type (`Special` where it names none the registry knows).
    pub kind: ParamType,
    pub expression: FhirPath,
}

/// The default list of identifying parameters (`Type.code`, `*.code` for every type): names,
/// addresses, contact details, birth and death dates of the types that describe people, and
/// identifiers everywhere.
pub fn default_phi() -> Vec<String> {
    let mut out: Vec<String> = PEOPLE
        .iter()
        .flat_map(|t| PHI_CODES.iter().map(move |c| format!("{t}.{c}")))
        .collect();
    out.push("*.identifier".into());
    out
}

/// Codes whose values identify a person, for the resource types that describe people.
const PHI_CODES: &[&str] = &[
    "name",
    "family",
    "given",
    "phonetic",
    "address",
    "address-city",
    "address-country",
    "address-postalcode",
    "address-state",
    "telecom",
    "phone",
    "email",
    "identifier",
    "birthdate",
    "death-date",
];
const PEOPLE: &[&str] = &["Patient", "Person", "RelatedPerson", "Practitioner"];

/// Every parameter, by resource type and code.
#[derive(Debug, Default)]
pub struct Registry {
    by_type: HashMap<String, BTreeMap<String, Arc<SearchParam>>>,
    /// Parameters of `Resource` and `DomainResource`, which every type has.
    common: BTreeMap<String, Arc<SearchParam>>,
    count: usize,
    fingerprint: String,
    /// Implementation-guide definitions left out, as `url: reason`.
    skipped: Vec<String>,
    /// The codes added by SearchParameter resources stored through the API.
    stored: Vec<String>,
    /// The implementation guides' definitions it was built with (rebuilt with them when stored
    /// definitions change, without reading `profile_dir` again).
    guides: Arc<Vec<Value>>,
}

/// The version of the index rows' format (blind-index keys, prefix bounds, columns): a change
/// makes every stored index stale, which the fingerprint then tells.
const INDEX_FORMAT: &str = "fhirvault-search-index-4";

impl Registry {
    /// Loads the official R4 parameters with the default identifying ones.
    pub fn r4() -> Result<Registry, RegistryError> {
        Registry::r4_with_phi(&default_phi())
    }

    /// Loads the official R4 parameters, compiling each expression once; `phi` lists the
    /// identifying ones (`Type.code`, `*.code`). A definition shared by several types is
    /// identifying on all of them when the list names it on any: its one index cannot be both.
    pub fn r4_with_phi(phi_list: &[String]) -> Result<Registry, RegistryError> {
        Registry::r4_with(phi_list, &[])
    }

    /// [`Registry::r4_with_phi`] plus the SearchParameter resources of implementation guides
    /// (`extra`, from `profile_dir`): each adds its code to the types it names where R4 does not
    /// define that code already (US Core's `race`, `ethnicity`, `gender-identity`, Condition
    /// `asserted-date` …; its copies of R4's own parameters change nothing). A definition that
    /// is malformed or whose expression does not compile is left out and returned by
    /// [`Registry::skipped`], never half-indexed.
    pub fn r4_with(phi_list: &[String], extra: &[Value]) -> Result<Registry, RegistryError> {
        Registry::r4_with_stored(phi_list, extra, &[])
    }

    /// [`Registry::r4_with`] plus the active SearchParameter resources stored through the API
    /// (`stored`, checked by [`check_stored_definition`] when written). They are not part of the
    /// fingerprint: new writes index them at once, data stored before needs `fhirvault reindex`,
    /// and adding one never stops a server from starting. Those on a people type, and string
    /// ones anywhere, are identifying (blind indexes only): nobody vetted what they index.
    pub fn r4_with_stored(phi_list: &[String], extra: &[Value], stored: &[Value]) -> Result<Registry, RegistryError> {
        let mut registry = Registry::r4_guides(phi_list, extra)?;
        let kinds: HashMap<&str, ParamType> = HashMap::new();
        for r in stored {
            let url = r.get("url").and_then(Value::as_str).unwrap_or("(no url)").to_string();
            match definition(r, &kinds, phi_list) {
                Ok((mut param, bases)) => {
                    let new: Vec<String> = bases
                        .into_iter()
                        .filter(|b| registry.get(b, &param.code).is_none())
                        .collect();
                    if new.is_empty() {
                        continue;
                    }
                    param.phi = param.phi
                        || param.kind == ParamType::String
                        || new.iter().any(|b| PEOPLE.contains(&b.as_str()));
                    registry.stored.push(param.code.clone());
                    registry.insert(param, new);
                }
                Err(e) => registry.skipped.push(format!("{url}: {e}")),
            }
        }
        Ok(registry)
    }

    fn r4_guides(phi_list: &[String], extra: &[Value]) -> Result<Registry, RegistryError> {
        let bundle: Value = serde_json::from_str(R4_SEARCH_PARAMETERS_JSON).map_err(|_| RegistryError::Format)?;
        let entries: Vec<&Value> = bundle
            .get("entry")
            .and_then(Value::as_array)
            .ok_or(RegistryError::Format)?
            .iter()
            .filter_map(|e| e.get("resource"))
            .collect();
        let mut registry = Registry::default();
        // the type of each definition, for the components of composites
        let kinds: HashMap<&str, ParamType> = entries
            .iter()
            .copied()
            .chain(extra.iter())
            .filter_map(|r| Some((r.get("url")?.as_str()?, ParamType::parse(r.get("type")?.as_str()?)?)))
            .collect();
        for r in &entries {
            let (param, bases) = definition(r, &kinds, phi_list)?;
            registry.insert(param, bases);
        }
        // what the index rows depend on: the definitions, the identifying list, and the format
        // of the rows themselves (`INDEX_FORMAT`)
        let mut phi_sorted = phi_list.to_vec();
        phi_sorted.sort();
        phi_sorted.dedup();
        let mut h = Sha256::new();
        h.update(INDEX_FORMAT.as_bytes());
        h.update(R4_SEARCH_PARAMETERS_JSON.as_bytes());
        h.update(phi_sorted.join("\n").as_bytes());
        let mut added: Vec<String> = Vec::new();
        for r in extra {
            let url = r.get("url").and_then(Value::as_str).unwrap_or("(no url)").to_string();
            match definition(r, &kinds, phi_list) {
                Ok((param, bases)) => {
                    let new: Vec<String> = bases
                        .into_iter()
                        .filter(|b| b != "Resource" && b != "DomainResource" && registry.get(b, &param.code).is_none())
                        .collect();
                    if new.is_empty() {
                        continue;
                    }
                    added.push(format!(
                        "{url}\u{1}{}\u{1}{}",
                        new.join(","),
                        r.get("expression").and_then(Value::as_str).unwrap_or("")
                    ));
                    registry.insert(param, new);
                }
                Err(e) => registry.skipped.push(format!("{url}: {e}")),
            }
        }
        added.sort();
        for a in &added {
            h.update(b"\n");
            h.update(a.as_bytes());
        }
        registry.fingerprint = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        registry.guides = Arc::new(extra.to_vec());
        Ok(registry)
    }

    fn insert(&mut self, param: SearchParam, bases: Vec<String>) {
        let code = param.code.clone();
        let param = Arc::new(param);
        self.count += 1;
        for base in bases {
            if base == "Resource" || base == "DomainResource" {
                self.common.insert(code.clone(), param.clone());
            } else {
                self.by_type
                    .entry(base)
                    .or_default()
                    .insert(code.clone(), param.clone());
            }
        }
    }

    /// The implementation guides' SearchParameter resources this registry was built with.
    pub fn guides(&self) -> &Arc<Vec<Value>> {
        &self.guides
    }

    /// The codes SearchParameter resources stored through the API added.
    pub fn stored_codes(&self) -> &[String] {
        &self.stored
    }

    /// The implementation guides' definitions left out (malformed, or an expression that does
    /// not compile), each as `url: reason`.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// A digest of everything the index rows depend on: an index built under another one is
    /// stale (`fhirvault reindex` rebuilds it).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// How many parameter definitions were loaded.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The parameter `code` of `resource_type` (its own, or one every resource has).
    pub fn get(&self, resource_type: &str, code: &str) -> Option<&Arc<SearchParam>> {
        self.by_type
            .get(resource_type)
            .and_then(|m| m.get(code))
            .or_else(|| self.common.get(code))
    }

    /// The resource types with parameters of their own.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }

    /// Every parameter of `resource_type`, its own first.
    pub fn params<'a>(&'a self, resource_type: &str) -> impl Iterator<Item = &'a Arc<SearchParam>> + 'a {
        self.by_type
            .get(resource_type)
            .into_iter()
            .flat_map(|m| m.values())
            .chain(self.common.values())
    }
}

/// One SearchParameter resource compiled: the parameter and the types it applies to.
fn definition(
    r: &Value,
    kinds: &HashMap<&str, ParamType>,
    phi_list: &[String],
) -> Result<(SearchParam, Vec<String>), RegistryError> {
    let text = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(code), Some(url), Some(kind)) = (
        text("code"),
        text("url"),
        text("type").as_deref().and_then(ParamType::parse),
    ) else {
        return Err(RegistryError::Format);
    };
    let compile = |src: &str| {
        FhirPath::compile(src).map_err(|source| RegistryError::Expression {
            url: url.clone(),
            source,
        })
    };
    let expression = text("expression").map(|e| compile(&e)).transpose()?;
    let mut components = Vec::new();
    for c in r.get("component").and_then(Value::as_array).into_iter().flatten() {
        let (Some(def), Some(expr)) = (
            c.get("definition").and_then(Value::as_str),
            c.get("expression").and_then(Value::as_str),
        ) else {
            return Err(RegistryError::Format);
        };
        components.push(Component {
            definition: def.to_string(),
            kind: kinds.get(def).copied().unwrap_or(ParamType::Special),
            expression: compile(expr)?,
        });
    }
    let targets = r
        .get("target")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let bases: Vec<String> = r
        .get("base")
        .and_then(Value::as_array)
        .map(|b| b.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let phi = phi_list.iter().any(|entry| match entry.split_once('.') {
        Some((t, c)) => c == code && (t == "*" || bases.iter().any(|b| b == t)),
        None => false,
    });
    Ok((
        SearchParam {
            code,
            url,
            kind,
            expression,
            targets,
            components,
            phi,
        },
        bases,
    ))
}

/// Whether a SearchParameter resource written through the API can be indexed and searched, with
/// the reason when not (never echoing the expression): a draft or retired one is stored as data
/// and not checked; an active one needs a code, a type this server searches (not `special` or
/// `composite`), known base types, an expression that compiles and starts with one of them, and
/// a code none of its types has already (R4's and the guides' stay as they are).
pub fn check_stored_definition(registry: &Registry, is_type: impl Fn(&str) -> bool, r: &Value) -> Result<(), String> {
    if r.get("status").and_then(Value::as_str) != Some("active") {
        return Ok(());
    }
    let code = r.get("code").and_then(Value::as_str).unwrap_or("");
    if code.is_empty() || code.starts_with('_') || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err("code must be letters, digits and '-', not starting with '_'".into());
    }
    if r.get("url").and_then(Value::as_str).is_none() {
        return Err("an active SearchParameter needs a url".into());
    }
    match r.get("type").and_then(Value::as_str).and_then(ParamType::parse) {
        Some(ParamType::Special | ParamType::Composite) => {
            return Err("special and composite parameters cannot be added through the API".into())
        }
        Some(_) => {}
        None => return Err("type must be a search parameter type".into()),
    }
    let bases: Vec<&str> = r
        .get("base")
        .and_then(Value::as_array)
        .map(|b| b.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if bases.is_empty() || !bases.iter().all(|b| is_type(b)) {
        return Err("base must name resource types of R4".into());
    }
    let Some(expression) = r.get("expression").and_then(Value::as_str) else {
        return Err("an active SearchParameter needs an expression".into());
    };
    if let Err(e) = FhirPath::compile(expression) {
        return Err(format!("the expression does not compile: {e}"));
    }
    let roots: Vec<&str> = expression
        .split('|')
        .map(|part| {
            part.trim()
                .trim_start_matches('(')
                .split(['.', ' ', '('])
                .next()
                .unwrap_or("")
        })
        .collect();
    if !roots.iter().all(|root| bases.contains(root)) {
        return Err("each path of the expression must start with one of the base types".into());
    }
    if let Some(b) = bases.iter().find(|b| {
        registry
            .get(b, code)
            .is_some_and(|p| Some(p.url.as_str()) != r.get("url").and_then(Value::as_str))
    }) {
        return Err(format!("{b} already has a search parameter named {code}"));
    }
    Ok(())
}

/// The SearchParameter resources (JSON files) under `dir` and its subfolders, as read.
pub fn search_parameters_in(dir: &std::path::Path) -> std::io::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(&d)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        paths.sort();
        for path in paths {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().and_then(|e| e.to_str()) == Some("json") {
                if let Ok(v) = serde_json::from_slice::<Value>(&std::fs::read(&path)?) {
                    if v["resourceType"] == "SearchParameter" {
                        out.push(v);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_every_r4_parameter_and_compiles_every_expression() {
        let r = Registry::r4().unwrap();
        assert_eq!(r.len(), 1375);
        let p = r.get("Patient", "birthdate").unwrap();
        assert_eq!(p.kind, ParamType::Date);
        assert!(p.phi);
        assert!(
            r.get("Patient", "_id").is_some(),
            "common parameters apply to every type"
        );
        assert!(
            !r.get("Patient", "gender").unwrap().phi,
            "low-cardinality values are not PHI"
        );
        let subject = r.get("Observation", "subject").unwrap();
        assert_eq!(subject.kind, ParamType::Reference);
        assert!(subject.targets.contains(&"Patient".to_string()));
        let composite = r.get("Observation", "code-value-quantity").unwrap();
        assert_eq!(composite.components.len(), 2);
    }
}
