//! Search (in progress, issue 3): the parameter registry loaded from the official R4 definitions
//! and index-value extraction through FHIRPath. The index tables, the query side and the HTTP
//! interaction come next; until then the CapabilityStatement lists no search for resource types
//! other than AuditEvent.

pub mod extract;
pub mod query;
pub mod registry;

pub use extract::{extract, IndexValue};
pub use registry::{ParamType, Registry, SearchParam};

use crate::crypto::Cipher;
use crate::store::search_index::SearchRow;
use serde_json::Value;

/// How many leading characters of a PHI string get their own blind index (prefix search);
/// longer prefixes are matched on this many and re-checked after decryption.
pub const BLIND_PREFIX_MAX: usize = 8;

/// The index rows of a resource: every parameter of its type evaluated on it, PHI values
/// blinded. A parameter whose expression cannot be evaluated on this content is skipped (and
/// logged by code), never failing the write.
pub fn index_rows(registry: &Registry, cipher: &Cipher, resource_type: &str, resource: &Value) -> Vec<SearchRow> {
    let mut rows = Vec::new();
    for param in registry.params(resource_type) {
        let values = match extract(param, resource) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(param = %param.code, resource_type, error = %e, "search parameter not indexed");
                continue;
            }
        };
        let code = param.code.clone();
        for v in values {
            let row = match v {
                IndexValue::String(s) if param.phi => {
                    let chars: Vec<char> = s.chars().collect();
                    for n in 1..=chars.len().min(BLIND_PREFIX_MAX) {
                        let prefix: String = chars[..n].iter().collect();
                        rows.push(SearchRow::String {
                            param: code.clone(),
                            value: None,
                            blind: Some(cipher.blind_index(&format!("{code}~prefix"), &prefix).to_vec()),
                        });
                    }
                    SearchRow::String {
                        param: code.clone(),
                        value: None,
                        blind: Some(cipher.blind_index(&format!("{code}~exact"), &s).to_vec()),
                    }
                }
                IndexValue::String(s) => SearchRow::String {
                    param: code.clone(),
                    value: Some(s),
                    blind: None,
                },
                IndexValue::Token { system, code: c } if param.phi => {
                    // as conditional writes match identifiers: `system|value` and `|value`
                    let with_system = format!("{}|{c}", system.as_deref().unwrap_or(""));
                    rows.push(SearchRow::Token {
                        param: code.clone(),
                        system: None,
                        code: None,
                        blind: Some(cipher.blind_index(&code, &format!("|{c}")).to_vec()),
                    });
                    SearchRow::Token {
                        param: code.clone(),
                        system: None,
                        code: None,
                        blind: Some(cipher.blind_index(&code, &with_system).to_vec()),
                    }
                }
                IndexValue::Token { system, code: c } => SearchRow::Token {
                    param: code.clone(),
                    system,
                    code: Some(c),
                    blind: None,
                },
                IndexValue::Date { start, end } if param.phi => SearchRow::Date {
                    param: code.clone(),
                    start: None,
                    end: None,
                    // the year alone is not identifying; it prunes range searches
                    year: Some(chrono::Datelike::year(&start)),
                    blind: Some(cipher.blind_index(&code, &format!("{start}/{end}")).to_vec()),
                },
                IndexValue::Date { start, end } => SearchRow::Date {
                    param: code.clone(),
                    start: Some(start),
                    end: Some(end),
                    year: None,
                    blind: None,
                },
                IndexValue::Reference { resource_type, id } => SearchRow::Reference {
                    param: code.clone(),
                    target_type: resource_type,
                    target_id: id,
                },
                IndexValue::Number(n) => SearchRow::Number {
                    param: code.clone(),
                    value: n,
                },
                IndexValue::Quantity { value, system, code: c } => SearchRow::Quantity {
                    param: code.clone(),
                    value,
                    system,
                    code: c,
                },
                IndexValue::Uri(u) => SearchRow::Uri {
                    param: code.clone(),
                    value: u,
                },
            };
            rows.push(row);
        }
    }
    // the same value reached by two paths (a prefix shared by two name parts …) is one row
    let mut unique: Vec<SearchRow> = Vec::with_capacity(rows.len());
    for r in rows {
        if !unique.contains(&r) {
            unique.push(r);
        }
    }
    unique
}
