//! Query strings to typed searches, checked against the registry. What is not supported yet
//! (chaining, `_has`, `_include`, composites, some modifiers) is refused with a clear error,
//! never ignored: an ignored filter would return more than was asked for.

use super::extract::{date_range, fold, IndexValue};
use super::registry::{ParamType, Registry, SearchParam};
use crate::crypto::Cipher;
use crate::store::search_query::{Cond, DateOp, NumOp, SearchQuery};
use chrono::Datelike;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("unknown search parameter for this resource type")]
    UnknownParameter,
    #[error("{0}")]
    NotSupported(&'static str),
    #[error("{0}")]
    Invalid(&'static str),
}

/// A condition that blind indexes can only narrow: checked again on the decrypted resource.
#[derive(Debug, Clone)]
pub struct Recheck {
    pub param: Arc<SearchParam>,
    /// Any of these must hold.
    pub any: Vec<RecheckTest>,
}

#[derive(Debug, Clone)]
pub enum RecheckTest {
    StringPrefix(String),
    DateWithin(chrono::NaiveDateTime, chrono::NaiveDateTime, DateOp),
}

impl Recheck {
    /// Whether the resource satisfies the condition.
    pub fn holds(&self, resource: &serde_json::Value) -> bool {
        let values = super::extract(&self.param, resource).unwrap_or_default();
        self.any.iter().any(|t| {
            values.iter().any(|v| match (t, v) {
                (RecheckTest::StringPrefix(p), IndexValue::String(s)) => s.starts_with(p.as_str()),
                (RecheckTest::DateWithin(qs, qe, op), IndexValue::Date { start, end }) => {
                    date_matches(*op, *start, *end, *qs, *qe)
                }
                _ => false,
            })
        })
    }
}

fn date_matches(
    op: DateOp,
    start: chrono::NaiveDateTime,
    end: chrono::NaiveDateTime,
    qs: chrono::NaiveDateTime,
    qe: chrono::NaiveDateTime,
) -> bool {
    match op {
        DateOp::Within => start >= qs && end <= qe,
        DateOp::NotWithin => !(start >= qs && end <= qe),
        DateOp::Gt => end > qe,
        DateOp::Ge => end > qs,
        DateOp::Lt => start < qs,
        DateOp::Le => start < qe,
        DateOp::StartsAfter => start >= qe,
        DateOp::EndsBefore => end <= qs,
    }
}

/// The parsed search: the store query, what must be re-checked, and the query string that
/// identifies it (for paging links, without `_page`).
pub struct ParsedSearch {
    pub query: SearchQuery,
    /// Under lenient handling: the parameters left out (unknown or malformed), by name.
    pub ignored: Vec<(String, QueryError)>,
    pub rechecks: Vec<Recheck>,
    /// Other resource types the search reads through chains and `_has`.
    pub types: std::collections::BTreeSet<String>,
}

fn num_prefix(v: &str) -> (NumOp, &str) {
    for (p, op) in [
        ("eq", NumOp::Eq),
        ("ne", NumOp::Ne),
        ("gt", NumOp::Gt),
        ("lt", NumOp::Lt),
        ("ge", NumOp::Ge),
        ("le", NumOp::Le),
    ] {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
                return (op, rest);
            }
        }
    }
    (NumOp::Eq, v)
}

fn date_prefix(v: &str) -> Result<(DateOp, &str), QueryError> {
    let ops = [
        ("eq", DateOp::Within),
        ("ne", DateOp::NotWithin),
        ("gt", DateOp::Gt),
        ("lt", DateOp::Lt),
        ("ge", DateOp::Ge),
        ("le", DateOp::Le),
        ("sa", DateOp::StartsAfter),
        ("eb", DateOp::EndsBefore),
    ];
    if v.starts_with("ap") {
        return Err(QueryError::NotSupported("the date prefix ap is not supported yet"));
    }
    for (p, op) in ops {
        if let Some(rest) = v.strip_prefix(p) {
            return Ok((op, rest));
        }
    }
    Ok((DateOp::Within, v))
}

fn reference_target(v: &str) -> (Option<String>, String) {
    let v = v.split("/_history/").next().unwrap_or(v);
    let mut parts = v.rsplit('/');
    let id = parts.next().unwrap_or("").to_string();
    let ty = parts
        .next()
        .filter(|t| t.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        .map(str::to_string);
    (ty, id)
}

/// The conditions of one `key=value` pair on `resource_type`, following chains
/// (`subject:Patient.name`) and reverse chains (`_has:Observation:patient:code`) into the types
/// they name, which are added to `types` (the caller must authorize a search of each).
fn conds_for(
    registry: &Registry,
    cipher: &Cipher,
    resource_type: &str,
    key: &str,
    value: &str,
    nested: bool,
    types: &mut std::collections::BTreeSet<String>,
) -> Result<(Vec<Cond>, Option<Recheck>), QueryError> {
    if let Some(rest) = key.strip_prefix("_has:") {
        let mut parts = rest.splitn(3, ':');
        let (Some(source), Some(param), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(QueryError::Invalid(
                "_has needs _has:Type:reference-parameter:parameter",
            ));
        };
        let reference = registry.get(source, param).ok_or(QueryError::UnknownParameter)?;
        if reference.kind != ParamType::Reference {
            return Err(QueryError::Invalid(
                "_has needs a reference parameter of the referring type",
            ));
        }
        types.insert(source.to_string());
        let (inner, _) = conds_for(registry, cipher, source, tail, value, true, types)?;
        return Ok((
            vec![Cond::Has {
                source_type: source.to_string(),
                param: param.to_string(),
                inner,
            }],
            None,
        ));
    }
    if let Some((head, tail)) = key.split_once('.') {
        let (code, modifier) = match head.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (head, None),
        };
        let reference = registry.get(resource_type, code).ok_or(QueryError::UnknownParameter)?;
        if reference.kind != ParamType::Reference {
            return Err(QueryError::Invalid("only reference parameters can be chained"));
        }
        let target = match (modifier, reference.targets.as_slice()) {
            (Some(m), _) if reference.targets.iter().any(|t| t == m) => m.to_string(),
            (Some(_), _) => {
                return Err(QueryError::Invalid(
                    "the chain names a type this reference cannot point to",
                ))
            }
            (None, [only]) => only.clone(),
            // `patient` parameters point to a Patient whatever else their definition allows
            (None, targets) if code == "patient" && targets.iter().any(|t| t == "Patient") => "Patient".to_string(),
            (None, _) => {
                return Err(QueryError::Invalid(
                    "the reference can point to several types: name one (param:Type.name)",
                ))
            }
        };
        types.insert(target.clone());
        let (inner, _) = conds_for(registry, cipher, &target, tail, value, true, types)?;
        return Ok((
            vec![Cond::Chain {
                param: code.to_string(),
                target_type: target,
                inner,
            }],
            None,
        ));
    }
    let (code, modifier) = match key.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (key, None),
    };
    let param = registry
        .get(resource_type, code)
        .ok_or(QueryError::UnknownParameter)?
        .clone();
    let values: Vec<&str> = value.split(',').filter(|v| !v.is_empty()).collect();
    if values.is_empty() {
        return Err(QueryError::Invalid("a search parameter needs a value"));
    }
    if modifier == Some("missing") {
        let table = match param.kind {
            ParamType::String => "search_string",
            ParamType::Token => "search_token",
            ParamType::Date => "search_date",
            ParamType::Reference => "search_reference",
            ParamType::Number => "search_number",
            ParamType::Quantity => "search_quantity",
            ParamType::Uri => "search_uri",
            _ => {
                return Err(QueryError::NotSupported(
                    ":missing is not supported on this parameter yet",
                ))
            }
        };
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(QueryError::Invalid(":missing takes true or false")),
        };
        return Ok((
            vec![Cond::Missing {
                param: param.code.clone(),
                table,
                missing,
            }],
            None,
        ));
    }
    let mut any = Vec::new();
    let mut recheck = Vec::new();
    let p = param.code.clone();
    for v in values {
        match (param.kind, modifier) {
            (kind, Some(m))
                if code == "_id"
                    || !matches!(
                        (kind, m),
                        (ParamType::String | ParamType::Reference, _)
                            | (ParamType::Token, "not")
                            | (ParamType::Uri, "below" | "above")
                    ) =>
            {
                return Err(QueryError::NotSupported("this modifier is not supported yet"));
            }
            _ if code == "_id" => any.push(Cond::Id(v.to_string())),
            (ParamType::String, None) if param.phi => {
                let folded = fold(v);
                let chars: Vec<char> = folded.chars().collect();
                let n = chars.len().min(super::BLIND_PREFIX_MAX);
                let prefix: String = chars[..n].iter().collect();
                any.push(Cond::StringBlind {
                    param: p.clone(),
                    blind: cipher.blind_index(&format!("{p}~prefix"), &prefix).to_vec(),
                });
                // the blind index is exact up to its bound; beyond it, candidates are re-checked
                if chars.len() > super::BLIND_PREFIX_MAX {
                    recheck.push(RecheckTest::StringPrefix(folded));
                }
            }
            (ParamType::String, None) => any.push(Cond::StringPrefix {
                param: p.clone(),
                prefix: fold(v),
            }),
            (ParamType::String, Some("contains")) if !param.phi => any.push(Cond::StringContains {
                param: p.clone(),
                part: fold(v),
            }),
            (ParamType::String, Some("exact")) if param.phi => any.push(Cond::StringBlind {
                param: p.clone(),
                blind: cipher.blind_index(&format!("{p}~exact"), &fold(v)).to_vec(),
            }),
            (ParamType::String, _) => {
                return Err(QueryError::NotSupported(
                    "this string modifier is not supported here yet",
                ))
            }
            (ParamType::Token, None | Some("not")) if param.phi => {
                let key = match v.split_once('|') {
                    Some((s, c)) if !c.is_empty() => format!("{s}|{c}"),
                    Some(_) => {
                        return Err(QueryError::NotSupported(
                            "system| alone cannot be searched on an identifying parameter",
                        ))
                    }
                    None => format!("|{v}"),
                };
                any.push(Cond::TokenBlind {
                    param: p.clone(),
                    blind: cipher.blind_index(&p, &key).to_vec(),
                });
            }
            (ParamType::Token, None | Some("not")) => {
                let (system, code) = match v.split_once('|') {
                    Some(("", c)) => (Some(None), Some(c.to_string())),
                    Some((s, "")) => (Some(Some(s.to_string())), None),
                    Some((s, c)) => (Some(Some(s.to_string())), Some(c.to_string())),
                    None => (None, Some(v.to_string())),
                };
                any.push(Cond::Token {
                    param: p.clone(),
                    system,
                    code,
                });
            }
            (ParamType::Date, None) => {
                let (op, rest) = date_prefix(v)?;
                let (start, end) = date_range(rest).ok_or(QueryError::Invalid("not a valid date"))?;
                if param.phi {
                    // the year is all the index holds: candidates, re-checked below
                    let (min, max) = match op {
                        DateOp::Within => (start.year(), end.year()),
                        DateOp::Gt | DateOp::Ge | DateOp::StartsAfter => (start.year(), 9999),
                        DateOp::Lt | DateOp::Le | DateOp::EndsBefore => (1, end.year()),
                        DateOp::NotWithin => (1, 9999),
                    };
                    any.push(Cond::DateYear {
                        param: p.clone(),
                        min,
                        max,
                    });
                    recheck.push(RecheckTest::DateWithin(start, end, op));
                } else {
                    any.push(Cond::Date {
                        param: p.clone(),
                        op,
                        start,
                        end,
                    });
                }
            }
            (ParamType::Reference, m) => {
                let (mut ty, id) = reference_target(v);
                if let Some(m) = m {
                    if !m.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                        return Err(QueryError::NotSupported("this reference modifier is not supported yet"));
                    }
                    ty = Some(m.to_string());
                }
                if id.is_empty() {
                    return Err(QueryError::Invalid("a reference needs an id"));
                }
                any.push(Cond::Reference {
                    param: p.clone(),
                    target_type: ty,
                    id,
                });
            }
            (ParamType::Number, None) => {
                let (op, rest) = num_prefix(v);
                let value: f64 = rest.parse().map_err(|_| QueryError::Invalid("not a number"))?;
                any.push(Cond::Number {
                    param: p.clone(),
                    op,
                    value,
                });
            }
            (ParamType::Quantity, None) => {
                let (op, rest) = num_prefix(v);
                let mut parts = rest.splitn(3, '|');
                let value: f64 = parts
                    .next()
                    .unwrap_or("")
                    .parse()
                    .map_err(|_| QueryError::Invalid("not a quantity"))?;
                let system = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
                let code = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
                any.push(Cond::Quantity {
                    param: p.clone(),
                    op,
                    value,
                    system,
                    code,
                });
            }
            (ParamType::Uri, None) => any.push(Cond::Uri {
                param: p.clone(),
                value: v.to_string(),
            }),
            (ParamType::Uri, Some("below")) => any.push(Cond::UriBelow {
                param: p.clone(),
                prefix: v.to_string(),
            }),
            (ParamType::Uri, Some("above")) => any.push(Cond::UriAbove {
                param: p.clone(),
                value: v.to_string(),
            }),
            _ => {
                return Err(QueryError::NotSupported(
                    "this kind of search parameter is not supported yet",
                ))
            }
        }
    }
    if modifier == Some("not") {
        // none of the values (a resource without the element matches too)
        any = vec![Cond::Not(any)];
    }
    if !recheck.is_empty() {
        if nested {
            // a re-check reads the resource the chain reaches, which this search does not load
            return Err(QueryError::NotSupported(
                "this value of an identifying parameter cannot be searched through a chain yet",
            ));
        }
        return Ok((
            any,
            Some(Recheck {
                param: param.clone(),
                any: recheck,
            }),
        ));
    }
    Ok((any, None))
}

/// Builds the search of `resource_type` from its query pairs (`_count`, `_page` and formatting
/// parameters are the caller's).
pub fn parse(
    registry: &Registry,
    cipher: &Cipher,
    resource_type: &str,
    pairs: &[(String, String)],
    count: u32,
    strict: bool,
) -> Result<ParsedSearch, QueryError> {
    let mut ignored = Vec::new();
    let mut clauses = Vec::new();
    let mut rechecks = Vec::new();
    let mut types = std::collections::BTreeSet::new();
    for (key, value) in pairs {
        let code = key.split([':', '.']).next().unwrap_or("");
        match code {
            // `_include` and `_revinclude` shape the result: the caller's
            "_count" | "_page" | "_format" | "_pretty" | "_include" | "_revinclude" | "_total" | "_summary"
            | "_elements" => continue,
            "_sort" | "_contained" | "_containedType" | "_list" | "_query" | "_filter" | "_text" | "_content" => {
                return Err(QueryError::NotSupported(
                    "this search result parameter is not supported yet",
                ))
            }
            _ => {}
        }
        match conds_for(registry, cipher, resource_type, key, value, false, &mut types) {
            Ok((any, recheck)) => {
                rechecks.extend(recheck);
                clauses.push(any);
            }
            // lenient handling (the default): an unknown or malformed parameter is left out and
            // reported; what is known but not supported is always refused (ignoring it would
            // return more than was asked for)
            Err(e @ (QueryError::UnknownParameter | QueryError::Invalid(_))) if !strict => {
                ignored.push((key.clone(), e));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ParsedSearch {
        query: SearchQuery {
            resource_type: resource_type.to_string(),
            clauses,
            count,
            after: None,
            patient: None,
            nested_patient: None,
            compartment: None,
        },
        rechecks,
        types,
        ignored,
    })
}

/// Whether the search supports this parameter (for the CapabilityStatement).
pub fn supported(param: &SearchParam) -> bool {
    matches!(
        param.kind,
        ParamType::String
            | ParamType::Token
            | ParamType::Date
            | ParamType::Reference
            | ParamType::Number
            | ParamType::Quantity
            | ParamType::Uri
    ) && param.expression.is_some()
}
