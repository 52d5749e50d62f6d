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
    pub rechecks: Vec<Recheck>,
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

/// Builds the search of `resource_type` from its query pairs (`_count`, `_page` and formatting
/// parameters are the caller's).
pub fn parse(
    registry: &Registry,
    cipher: &Cipher,
    resource_type: &str,
    pairs: &[(String, String)],
    count: u32,
) -> Result<ParsedSearch, QueryError> {
    let mut clauses = Vec::new();
    let mut rechecks = Vec::new();
    for (key, value) in pairs {
        let (code, modifier) = match key.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (key.as_str(), None),
        };
        match code {
            "_count" | "_page" | "_format" | "_pretty" => continue,
            "_sort" | "_include" | "_revinclude" | "_summary" | "_elements" | "_total" | "_has" | "_contained"
            | "_containedType" | "_list" | "_query" | "_filter" | "_text" | "_content" => {
                return Err(QueryError::NotSupported(
                    "this search result parameter is not supported yet",
                ))
            }
            _ => {}
        }
        if code.contains('.') {
            return Err(QueryError::NotSupported("chained parameters are not supported yet"));
        }
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
            let missing = match value.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(QueryError::Invalid(":missing takes true or false")),
            };
            clauses.push(vec![Cond::Missing {
                param: param.code.clone(),
                table,
                missing,
            }]);
            continue;
        }
        let mut any = Vec::new();
        let mut recheck = Vec::new();
        let p = param.code.clone();
        for v in values {
            match (param.kind, modifier) {
                (_, Some(m))
                    if code == "_id" || param.kind != ParamType::String && param.kind != ParamType::Reference =>
                {
                    let _ = m;
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
                    recheck.push(RecheckTest::StringPrefix(folded));
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
                (ParamType::Token, None) if param.phi => {
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
                (ParamType::Token, None) => {
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
                _ => {
                    return Err(QueryError::NotSupported(
                        "this kind of search parameter is not supported yet",
                    ))
                }
            }
        }
        if !recheck.is_empty() {
            rechecks.push(Recheck {
                param: param.clone(),
                any: recheck,
            });
        }
        clauses.push(any);
    }
    Ok(ParsedSearch {
        query: SearchQuery {
            resource_type: resource_type.to_string(),
            clauses,
            count,
            after: None,
            patient: None,
        },
        rechecks,
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
