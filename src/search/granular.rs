//! SMART v2 granular scopes (`patient/Observation.rs?category=http://…|laboratory`): the
//! condition a scope puts on its type, evaluated on content (reads, includes, writes) and as
//! SQL conditions (searches, so that counts and pages hold only what the scope grants).
//!
//! Supported: token parameters of the type that are not identifying (`category`, `code`,
//! `status`, `clinical-status` …), each `system|code`, `code`, `system|` or `|code`, several
//! values comma-separated (any may hold), several parameters joined by `&` (all must hold): what
//! SMART App Launch 2 and US Core's scopes use. A scope with any other condition compiles to
//! nothing and grants nothing.

use super::extract::{extract, IndexValue};
use super::query::{split_unescaped, token_value};
use super::registry::{ParamType, Registry, SearchParam};
use crate::store::search_query::Cond;
use serde_json::Value;
use std::sync::Arc;

/// One `param=value,value` of a scope: the value of `param` on the resource is one of these
/// (`system` None: any system; `Some(None)`: none; `code` None: any code of the system).
#[derive(Debug, Clone)]
struct TokenTest {
    param: Arc<SearchParam>,
    values: Vec<(Option<Option<String>>, Option<String>)>,
}

/// The condition of one granular scope on its type: every test holds.
#[derive(Debug, Clone)]
pub struct ScopeFilter {
    tests: Vec<TokenTest>,
}

/// Two filters are equal when they test the same parameters for the same values.
impl PartialEq for ScopeFilter {
    fn eq(&self, other: &Self) -> bool {
        self.tests.len() == other.tests.len()
            && self
                .tests
                .iter()
                .zip(&other.tests)
                .all(|(a, b)| a.param.code == b.param.code && a.values == b.values)
    }
}

impl Eq for ScopeFilter {}

impl ScopeFilter {
    /// The filter of a scope's constraints on `resource_type`; `None` when any of them is not a
    /// supported condition (the scope then grants nothing).
    pub fn compile(registry: &Registry, resource_type: &str, constraints: &[(String, String)]) -> Option<ScopeFilter> {
        if constraints.is_empty() {
            return None;
        }
        let mut tests = Vec::with_capacity(constraints.len());
        for (name, raw) in constraints {
            // a modifier (`category:not`) or an unknown parameter: not a condition we evaluate
            let param = registry.get(resource_type, name)?;
            if param.kind != ParamType::Token || param.phi || param.expression.is_none() {
                return None;
            }
            let value = percent_decode(raw)?;
            let values: Vec<_> = split_unescaped(&value, ',')
                .into_iter()
                .map(token_value)
                .filter(|(s, c)| c.as_deref().is_some_and(|c| !c.is_empty()) || matches!(s, Some(Some(_))))
                .collect();
            if values.is_empty() {
                return None;
            }
            tests.push(TokenTest {
                param: param.clone(),
                values,
            });
        }
        Some(ScopeFilter { tests })
    }

    /// Whether `resource` meets every test.
    pub fn matches(&self, resource: &Value) -> bool {
        self.tests.iter().all(|t| {
            let Ok(found) = extract(&t.param, resource) else {
                return false;
            };
            found.iter().any(|v| match v {
                IndexValue::Token { system, code } => t.values.iter().any(|(want_system, want_code)| {
                    let system_ok = match want_system {
                        None => true,
                        Some(None) => system.is_none(),
                        Some(Some(s)) => system.as_deref() == Some(s.as_str()),
                    };
                    system_ok && want_code.as_deref().is_none_or(|c| c == code)
                }),
                _ => false,
            })
        })
    }

    /// The same condition for a search: every returned group must hold, one of its conditions
    /// in each (the shape of a search's clauses).
    pub fn conditions(&self) -> Vec<Vec<Cond>> {
        self.tests
            .iter()
            .map(|t| {
                t.values
                    .iter()
                    .map(|(system, code)| Cond::Token {
                        param: t.param.code.clone(),
                        system: system.clone(),
                        code: code.clone(),
                    })
                    .collect()
            })
            .collect()
    }
}

/// A scope's query value as written in the scope string: percent-encoding undone (`%7C` → `|`).
fn percent_decode(raw: &str) -> Option<String> {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry() -> &'static Registry {
        static R: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        R.get_or_init(|| Registry::r4().unwrap())
    }

    fn filter(t: &str, c: &[(&str, &str)]) -> Option<ScopeFilter> {
        let c: Vec<(String, String)> = c.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ScopeFilter::compile(registry(), t, &c)
    }

    const CAT: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

    #[test]
    fn token_conditions_match_content() {
        let lab = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "category": [{"coding": [{"system": CAT, "code": "laboratory"}]}]});
        let vitals = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "category": [{"coding": [{"system": CAT, "code": "vital-signs"}]}]});
        let none = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
        let f = filter("Observation", &[("category", &format!("{CAT}|laboratory"))]).unwrap();
        assert!(f.matches(&lab) && !f.matches(&vitals) && !f.matches(&none));
        let f = filter("Observation", &[("category", "laboratory,vital-signs")]).unwrap();
        assert!(f.matches(&lab) && f.matches(&vitals) && !f.matches(&none));
        // percent-encoded as in a scope string, and several parameters all holding
        let f = filter(
            "Observation",
            &[("category", &format!("{}%7Claboratory", CAT)), ("status", "final")],
        )
        .unwrap();
        assert!(f.matches(&lab) && !f.matches(&vitals));
        let f = filter("Observation", &[("category", "laboratory"), ("status", "amended")]).unwrap();
        assert!(!f.matches(&lab));
        assert_eq!(f.conditions().len(), 2);
        let f = filter("Observation", &[("category", &format!("{CAT}|"))]).unwrap();
        assert!(f.matches(&lab) && f.matches(&vitals) && !f.matches(&none));
    }

    #[test]
    fn other_conditions_compile_to_nothing() {
        assert!(filter("Observation", &[("category:not", "laboratory")]).is_none());
        assert!(filter("Observation", &[("date", "2020")]).is_none(), "not a token");
        assert!(filter("Observation", &[("nonsense", "x")]).is_none());
        assert!(filter("Patient", &[("identifier", "x|1")]).is_none(), "identifying");
        assert!(filter("Observation", &[("category", ",")]).is_none());
        assert!(filter("Observation", &[]).is_none());
    }
}
