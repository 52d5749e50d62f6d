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
        let bundle: Value = serde_json::from_str(R4_SEARCH_PARAMETERS_JSON).map_err(|_| RegistryError::Format)?;
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .ok_or(RegistryError::Format)?;
        let mut registry = Registry::default();
        // what the index rows depend on: the definitions, the identifying list, and the format
        // of the rows themselves (`INDEX_FORMAT`)
        let mut phi_sorted = phi_list.to_vec();
        phi_sorted.sort();
        phi_sorted.dedup();
        let mut h = Sha256::new();
        h.update(INDEX_FORMAT.as_bytes());
        h.update(R4_SEARCH_PARAMETERS_JSON.as_bytes());
        h.update(phi_sorted.join("\n").as_bytes());
        registry.fingerprint = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        // the type of each definition, for the components of composites
        let kinds: HashMap<&str, ParamType> = entries
            .iter()
            .filter_map(|e| {
                let r = e.get("resource")?;
                Some((r.get("url")?.as_str()?, ParamType::parse(r.get("type")?.as_str()?)?))
            })
            .collect();
        for entry in entries {
            let r = entry.get("resource").ok_or(RegistryError::Format)?;
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
            let param = Arc::new(SearchParam {
                code: code.clone(),
                url,
                kind,
                expression,
                targets,
                components,
                phi,
            });
            registry.count += 1;
            for base in bases {
                if base == "Resource" || base == "DomainResource" {
                    registry.common.insert(code.clone(), param.clone());
                } else {
                    registry
                        .by_type
                        .entry(base)
                        .or_default()
                        .insert(code.clone(), param.clone());
                }
            }
        }
        Ok(registry)
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
