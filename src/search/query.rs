//! Query strings to typed searches, checked against the registry. What is not supported (the
//! `special` parameters, terminology modifiers such as `:in` and `:below` on tokens) is refused
//! with a clear error, never ignored: an ignored filter would return more than was asked for.

use super::extract::{date_range, fold, IndexValue};
use super::registry::{ParamType, Registry, SearchParam};
use crate::crypto::Cipher;
use crate::store::search_index::SearchRow;
use crate::store::search_query::{CompositePart, Cond, DateOp, NumOp, NumTest, SearchQuery, SortKey};
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
    /// A value of a known parameter that cannot be read: named by the parameter's code (from
    /// the registry, never the client's text), never echoing the value, which may be PHI.
    #[error("the value of search parameter `{0}` is not valid: {1}")]
    InvalidValue(String, &'static str),
}

/// A condition found through blind indexes, checked again on the decrypted resource (the
/// design's invariant: a blind index never decides alone). Some tests only confirm what an
/// exact blind match found (a stale or colliding index row is all they catch); others decide,
/// where the blind index only narrows (a prefix past the bound, `:contains`, a date range).
#[derive(Debug, Clone)]
pub struct Recheck {
    pub param: Arc<SearchParam>,
    /// Any of these must hold.
    pub any: Vec<RecheckTest>,
}

#[derive(Debug, Clone)]
pub enum RecheckTest {
    /// the resource's own blind rows for the parameter include one of these (confirmation)
    BlindAny(Vec<Vec<u8>>),
    /// ... include none of these (`:not`; confirmation)
    BlindNone(Vec<Vec<u8>>),
    /// the folded value starts with this
    StringPrefix(String),
    /// the value is exactly this, as written
    Exact(String),
    /// the folded value contains this
    Contains(String),
    DateWithin(chrono::NaiveDateTime, chrono::NaiveDateTime, DateOp),
}

impl Recheck {
    /// Whether the resource satisfies the condition.
    pub fn holds(&self, resource: &serde_json::Value, cipher: &Cipher) -> bool {
        let values = super::extract(&self.param, resource).unwrap_or_default();
        // the resource's own blind rows, computed once however many tests need them
        let own = std::cell::OnceCell::new();
        let blinds = || -> &Vec<Vec<u8>> {
            own.get_or_init(|| {
                super::param_rows(&self.param, cipher, values.clone())
                    .into_iter()
                    .filter_map(|r| match r {
                        SearchRow::String { blind, .. }
                        | SearchRow::Token { blind, .. }
                        | SearchRow::Date { blind, .. } => blind,
                        _ => None,
                    })
                    .collect()
            })
        };
        self.any.iter().any(|t| match t {
            RecheckTest::BlindAny(wanted) => blinds().iter().any(|b| wanted.contains(b)),
            RecheckTest::BlindNone(unwanted) => !blinds().iter().any(|b| unwanted.contains(b)),
            _ => values.iter().any(|v| match (t, v) {
                (RecheckTest::StringPrefix(p), IndexValue::String(s)) => fold(s).starts_with(p.as_str()),
                (RecheckTest::Exact(e), IndexValue::String(s)) => s == e,
                (RecheckTest::Contains(c), IndexValue::String(s)) => fold(s).contains(c.as_str()),
                (RecheckTest::DateWithin(qs, qe, op), IndexValue::Date { start, end }) => {
                    date_matches(*op, *start, *end, *qs, *qe)
                }
                _ => false,
            }),
        })
    }

    /// Whether the blind index only narrowed (the candidates' count says more than the matches').
    pub fn narrows(&self) -> bool {
        self.any
            .iter()
            .any(|t| !matches!(t, RecheckTest::BlindAny(_) | RecheckTest::BlindNone(_)))
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
        DateOp::Overlaps => start < qe && end > qs,
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
    /// Under lenient handling: the unknown parameters left out, by name.
    pub ignored: Vec<(String, QueryError)>,
    pub rechecks: Vec<Recheck>,
    /// Other resource types the search reads through chains and `_has`.
    pub types: std::collections::BTreeSet<String>,
    /// `_sort`, when SQL can order by every key (plaintext parameters).
    pub sort: Vec<SortKey>,
    /// `_sort` with an identifying parameter among the keys: the order is made after
    /// decryption, on every key.
    pub memory_sort: Vec<(Arc<SearchParam>, bool)>,
    /// Chains through an identifying parameter whose blind index only narrows (a name prefix,
    /// `:contains`, a date range): the caller confirms the chained candidates after decryption
    /// and puts the confirmed ids in the chain (see [`ChainCheck`]).
    pub chain_checks: Vec<ChainCheck>,
}

/// A chain whose target's condition must be confirmed on the decrypted target resources:
/// `clauses[clause][0]` is the `Cond::Chain`; its `inner` holds the blind-index conditions
/// (the candidates) until the caller replaces it with the confirmed targets (see
/// [`ChainCheck::confirmed`]).
#[derive(Debug, Clone)]
pub struct ChainCheck {
    pub clause: usize,
    pub target_type: String,
    pub candidates: Vec<Cond>,
    pub recheck: Recheck,
}

impl ChainCheck {
    /// The chain's condition once its candidates are confirmed: any of these ids (none
    /// confirmed: an id no resource has, so the chain matches nothing).
    pub fn confirmed(ids: Vec<String>) -> Vec<Cond> {
        if ids.is_empty() {
            // ids are never empty: this matches no resource
            return vec![Cond::Id(String::new())];
        }
        ids.into_iter().map(Cond::Id).collect()
    }
}

/// `_sort=a,-b`: the parameters and whether each is descending.
fn sort_keys(
    registry: &Registry,
    resource_type: &str,
    value: &str,
) -> Result<Vec<(Arc<SearchParam>, bool)>, QueryError> {
    let mut out = Vec::new();
    for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let (code, descending) = match key.strip_prefix('-') {
            Some(c) => (c, true),
            None => (key, false),
        };
        let param = registry.get(resource_type, code).ok_or(QueryError::UnknownParameter)?;
        if matches!(param.kind, ParamType::Composite | ParamType::Special) || param.expression.is_none() {
            return Err(QueryError::Invalid("_sort needs parameters with a value to order by"));
        }
        out.push((param.clone(), descending));
    }
    Ok(out)
}

/// The index table and column SQL orders a plaintext parameter by.
fn sort_column(kind: ParamType) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        ParamType::String => ("search_string", "value"),
        ParamType::Token => ("search_token", "code"),
        ParamType::Date => ("search_date", "start_at"),
        ParamType::Number => ("search_number", "value"),
        ParamType::Quantity => ("search_quantity", "value"),
        ParamType::Uri => ("search_uri", "value"),
        ParamType::Reference => ("search_reference", "target_id"),
        ParamType::Composite | ParamType::Special => return None,
    })
}

/// The value a resource sorts by on `param` (identifying parameters, after decryption).
pub fn memory_sort_value(param: &SearchParam, resource: &serde_json::Value, descending: bool) -> Option<String> {
    let values = super::extract(param, resource).ok()?;
    let mut keys: Vec<String> = values
        .into_iter()
        .filter_map(|v| match v {
            IndexValue::String(s) => Some(fold(&s)),
            IndexValue::Token { code, .. } => Some(code),
            IndexValue::Date { start, .. } => Some(start.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
            _ => None,
        })
        .collect();
    keys.sort();
    if descending {
        keys.pop()
    } else {
        keys.into_iter().next()
    }
}

fn num_prefix(v: &str) -> (NumOp, &str) {
    for (p, op) in [
        ("eq", NumOp::Eq),
        ("ne", NumOp::Ne),
        ("gt", NumOp::Gt),
        ("lt", NumOp::Lt),
        ("ge", NumOp::Ge),
        ("le", NumOp::Le),
        ("ap", NumOp::Ap),
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
        ("ap", DateOp::Overlaps),
    ];
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
#[allow(clippy::too_many_arguments)] // the recursion's state: the types reached, the chains to confirm
fn conds_for(
    registry: &Registry,
    cipher: &Cipher,
    resource_type: &str,
    key: &str,
    value: &str,
    nested: bool,
    types: &mut std::collections::BTreeSet<String>,
    chain_checks: &mut Vec<ChainCheck>,
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
        let (inner, check) = conds_for(registry, cipher, source, tail, value, true, types, chain_checks)?;
        if check.is_some() {
            return Err(QueryError::NotSupported(
                "this value of an identifying parameter cannot be searched through _has",
            ));
        }
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
        let (inner, check) = conds_for(registry, cipher, &target, tail, value, true, types, chain_checks)?;
        if let Some(recheck) = check {
            // one level deep: the caller loads the candidates of `target`, confirms them
            // after decryption, and joins the confirmed ones
            if nested {
                return Err(QueryError::NotSupported(
                    "this value of an identifying parameter cannot be searched through a chain of chains",
                ));
            }
            chain_checks.push(ChainCheck {
                clause: usize::MAX,
                target_type: target.clone(),
                candidates: inner.clone(),
                recheck,
            });
        }
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
    // R4 escaping: `\,` is a comma inside a value, not between values (see `split_unescaped`)
    let values: Vec<&str> = split_unescaped(value, ',')
        .into_iter()
        .filter(|v| !v.is_empty())
        .collect();
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
            ParamType::Composite => "search_composite",
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
    let blind = |key: &str, value: &str| cipher.blind_index(key, value).to_vec();
    if code == "_id" && modifier.is_some() {
        return Err(QueryError::NotSupported("_id takes no modifier"));
    }
    for v in values {
        match (param.kind, modifier) {
            _ if code == "_id" => any.push(Cond::Id(v.to_string())),
            (ParamType::String, None | Some("exact")) if param.phi && param.code == "phonetic" => {
                let key = super::soundex(&unescape(v)).ok_or(QueryError::Invalid("phonetic needs a word"))?;
                let blinds = vec![blind(&format!("{p}~soundex"), &key)];
                recheck.push(RecheckTest::BlindAny(blinds.clone()));
                any.push(Cond::Blind {
                    table: "search_string",
                    param: p.clone(),
                    blinds,
                });
            }
            (ParamType::String, None) if param.phi => {
                let folded = fold(&unescape(v));
                let chars: Vec<char> = folded.chars().collect();
                if chars.len() > super::BLIND_PREFIX_MAX {
                    // the blind prefixes stop here: the candidates are re-checked
                    let prefix: String = chars[..super::BLIND_PREFIX_MAX].iter().collect();
                    any.push(Cond::Blind {
                        table: "search_string",
                        param: p.clone(),
                        blinds: vec![blind(&format!("{p}~prefix"), &prefix)],
                    });
                    recheck.push(RecheckTest::StringPrefix(folded));
                } else {
                    // a prefix, or the whole value (prefixes stop short of it)
                    let blinds = vec![
                        blind(&format!("{p}~prefix"), &folded),
                        blind(&format!("{p}~full"), &folded),
                    ];
                    recheck.push(RecheckTest::BlindAny(blinds.clone()));
                    any.push(Cond::Blind {
                        table: "search_string",
                        param: p.clone(),
                        blinds,
                    });
                }
            }
            (ParamType::String, Some("exact")) if param.phi => {
                any.push(Cond::Blind {
                    table: "search_string",
                    param: p.clone(),
                    blinds: vec![blind(&format!("{p}~full"), &fold(&unescape(v)))],
                });
                recheck.push(RecheckTest::Exact(unescape(v)));
            }
            (ParamType::String, Some("contains")) if param.phi && param.code != "phonetic" => {
                // every three-character piece must be there; the candidates are re-checked
                let folded = fold(&unescape(v));
                let pieces = super::trigrams(&folded);
                if pieces.is_empty() {
                    return Err(QueryError::NotSupported(
                        ":contains on an identifying parameter needs at least 3 characters",
                    ));
                }
                any.push(Cond::BlindAll {
                    table: "search_string",
                    param: p.clone(),
                    blinds: pieces.iter().map(|t| blind(&format!("{p}~tri"), t)).collect(),
                });
                recheck.push(RecheckTest::Contains(folded));
            }
            (ParamType::String, None) => any.push(Cond::StringPrefix {
                param: p.clone(),
                prefix: fold(&unescape(v)),
            }),
            (ParamType::String, Some("contains")) => any.push(Cond::StringContains {
                param: p.clone(),
                part: fold(&unescape(v)),
            }),
            (ParamType::String, Some("exact")) => any.push(Cond::StringExact {
                param: p.clone(),
                value: unescape(v),
            }),
            (ParamType::Token, None | Some("not")) if param.phi => {
                let key = blind_token_key(v).ok_or(QueryError::NotSupported(
                    "system| alone cannot be searched on an identifying parameter",
                ))?;
                let blinds = vec![blind(&p, &key)];
                recheck.push(if modifier == Some("not") {
                    RecheckTest::BlindNone(blinds.clone())
                } else {
                    RecheckTest::BlindAny(blinds.clone())
                });
                any.push(Cond::Blind {
                    table: "search_token",
                    param: p.clone(),
                    blinds,
                });
            }
            (ParamType::Token, Some("of-type")) => {
                let parts: Vec<String> = split_unescaped(v, '|').into_iter().map(unescape).collect();
                let [ts, tc, value] = parts.as_slice() else {
                    return Err(QueryError::Invalid(":of-type takes type-system|type-code|value"));
                };
                if tc.is_empty() || value.is_empty() {
                    return Err(QueryError::Invalid(":of-type takes type-system|type-code|value"));
                }
                let blinds = vec![blind(&p, &format!("of-type|{ts}|{tc}|{value}"))];
                recheck.push(RecheckTest::BlindAny(blinds.clone()));
                any.push(Cond::Blind {
                    table: "search_token",
                    param: p.clone(),
                    blinds,
                });
            }
            (ParamType::Token, Some("text")) if param.phi => {
                return Err(QueryError::NotSupported(
                    ":text cannot be searched on an identifying parameter",
                ))
            }
            (ParamType::Token, Some("text")) => any.push(Cond::TokenText {
                param: p.clone(),
                prefix: fold(&unescape(v)),
            }),
            (ParamType::Token, None | Some("not")) => {
                let (system, code) = token_value(v);
                any.push(Cond::Token {
                    param: p.clone(),
                    system,
                    code,
                });
            }
            (ParamType::Date, None) => {
                let (op, start, end) = date_value(v)?;
                if param.phi {
                    let cond = phi_date(cipher, &p, op, start, end);
                    // eq looks up the bucket of its own precision: exact; ranges only narrow
                    match (&cond, op) {
                        (Cond::Blind { blinds, .. }, DateOp::Within) => {
                            recheck.push(RecheckTest::BlindAny(blinds.clone()))
                        }
                        _ => recheck.push(RecheckTest::DateWithin(start, end, op)),
                    }
                    any.push(cond);
                } else {
                    any.push(Cond::Date {
                        param: p.clone(),
                        op,
                        start,
                        end,
                    });
                }
            }
            (ParamType::Reference, Some("identifier")) => {
                let key =
                    blind_token_key(v).ok_or(QueryError::Invalid(":identifier takes system|value, |value or value"))?;
                let name = format!("{p}:identifier");
                let blinds = vec![blind(&name, &key)];
                recheck.push(RecheckTest::BlindAny(blinds.clone()));
                any.push(Cond::Blind {
                    table: "search_token",
                    blinds,
                    param: name,
                });
            }
            (ParamType::Reference, m) => {
                let (mut ty, id) = reference_target(&unescape(v));
                if let Some(m) = m {
                    if !m.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                        || !param.targets.iter().any(|t| t == m)
                    {
                        return Err(QueryError::NotSupported(
                            "this reference modifier is not supported here",
                        ));
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
            (ParamType::Number, None) => any.push(Cond::Number {
                param: p.clone(),
                test: num_value(v)?,
            }),
            (ParamType::Quantity, None) => {
                let (test, system, code) = quantity_value(v)?;
                any.push(Cond::Quantity {
                    param: p.clone(),
                    test,
                    system,
                    code,
                });
            }
            (ParamType::Uri, None) => any.push(Cond::Uri {
                param: p.clone(),
                value: unescape(v),
            }),
            (ParamType::Uri, Some("below")) => any.push(Cond::UriBelow {
                param: p.clone(),
                prefix: unescape(v),
            }),
            (ParamType::Uri, Some("above")) => any.push(Cond::UriAbove {
                param: p.clone(),
                value: unescape(v),
            }),
            (ParamType::Composite, None) => any.push(composite_value(&param, v)?),
            (_, Some(_)) => {
                return Err(QueryError::NotSupported(
                    "this modifier is not supported on this parameter",
                ))
            }
            _ => {
                return Err(QueryError::NotSupported(
                    "this kind of search parameter is not supported",
                ))
            }
        }
    }
    if modifier == Some("not") {
        // none of the values (a resource without the element matches too)
        any = vec![Cond::Not(any)];
    }
    if !recheck.is_empty() {
        let check = Recheck {
            param: param.clone(),
            any: recheck,
        };
        if nested {
            // a re-check reads the resource the chain reaches, which this search does not
            // load: exact blind matches stand there unconfirmed; what only narrows goes back to
            // the chain, whose caller confirms the candidates
            if check.narrows() {
                return Ok((any, Some(check)));
            }
            return Ok((any, None));
        }
        return Ok((any, Some(check)));
    }
    Ok((any, None))
}

/// Splits `v` at every `sep` that no backslash escapes. The pieces keep their escapes, for a
/// later split at another separator (a composite's `$`, then a token's `|`) and `unescape`.
pub(crate) fn split_unescaped(v: &str, sep: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in v.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            pieces.push(&v[start..i]);
            start = i + c.len_utf8();
        }
    }
    pieces.push(&v[start..]);
    pieces
}

/// The value a search means: R4's escapes `\,` `\$` `\|` and `\\` stand for the character; any
/// other backslash is kept as it is.
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(&next @ (',' | '$' | '|' | '\\'))) => {
                out.push(next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The `|` that separates a token's system from its code, if any (not an escaped one).
fn split_token(v: &str) -> Option<(String, String)> {
    match split_unescaped(v, '|').as_slice() {
        [_] => None,
        [system, rest @ ..] => {
            // the code is everything after the first separator
            let code = &v[system.len() + 1..];
            debug_assert!(!rest.is_empty());
            Some((unescape(system), unescape(code)))
        }
        [] => None,
    }
}

/// `system|code`, `|code`, `system|` or `code`, unescaped.
pub(crate) fn token_value(v: &str) -> (Option<Option<String>>, Option<String>) {
    match split_token(v) {
        Some((s, c)) if s.is_empty() => (Some(None), Some(c)),
        Some((s, c)) if c.is_empty() => (Some(Some(s)), None),
        Some((s, c)) => (Some(Some(s)), Some(c)),
        None => (None, Some(unescape(v))),
    }
}

/// The blind-index key an identifying token's search value looks up (see
/// `super::blind_token_keys`): `value` (any system), `|value` (no system) or `system|value`;
/// `system|` alone has none.
pub(crate) fn blind_token_key(v: &str) -> Option<String> {
    match token_value(v) {
        (None, Some(code)) if !code.is_empty() => Some(super::blind_token_keys(None, &code)[0].clone()),
        (Some(system), Some(code)) if !code.is_empty() => {
            Some(super::blind_token_keys(system.as_deref(), &code)[1].clone())
        }
        _ => None,
    }
}

/// A date value with its prefix, as the range to compare (`ap` widened by a tenth of its
/// distance from now, as the R4 search page suggests).
fn date_value(v: &str) -> Result<(DateOp, chrono::NaiveDateTime, chrono::NaiveDateTime), QueryError> {
    let (op, rest) = date_prefix(v)?;
    let (start, end) = date_range(rest).ok_or(QueryError::Invalid("not a valid date"))?;
    if op == DateOp::Overlaps {
        let now = chrono::Utc::now().naive_utc();
        let widen = |t: chrono::NaiveDateTime| (now - t).abs() / 10;
        return Ok((op, start - widen(start), end + widen(end)));
    }
    Ok((op, start, end))
}

/// A PHI date: the blind bucket of the searched date's own precision for `eq` (exact), else
/// the years the range can reach (candidates, re-checked).
fn phi_date(
    cipher: &Cipher,
    param: &str,
    op: DateOp,
    start: chrono::NaiveDateTime,
    end: chrono::NaiveDateTime,
) -> Cond {
    let key = format!("{param}~date");
    let blinds = if op == DateOp::Within {
        let buckets = super::blind_date_buckets(start, end);
        let own = buckets.last().cloned().unwrap_or_default();
        vec![cipher.blind_index(&key, &own).to_vec()]
    } else {
        let this_year = chrono::Utc::now().year() + 1;
        let (min, max) = match op {
            DateOp::Gt | DateOp::Ge | DateOp::StartsAfter => (start.year(), this_year),
            DateOp::Lt | DateOp::Le | DateOp::EndsBefore => (EARLIEST_PHI_YEAR, end.year()),
            DateOp::Overlaps => (start.year(), end.year()),
            _ => (EARLIEST_PHI_YEAR, this_year),
        };
        (min.max(EARLIEST_PHI_YEAR)..=max.min(this_year))
            .map(|y| cipher.blind_index(&key, &format!("{y:04}")).to_vec())
            .collect()
    };
    Cond::Blind {
        table: "search_date",
        param: param.to_string(),
        blinds,
    }
}

/// Range searches on birth dates look up the year buckets from here on.
const EARLIEST_PHI_YEAR: i32 = 1800;

/// A number with its prefix; `eq`/`ne` use the range its precision implies.
fn num_value(v: &str) -> Result<NumTest, QueryError> {
    let (op, rest) = num_prefix(v);
    let value: f64 = rest.parse().map_err(|_| QueryError::Invalid("not a number"))?;
    if !value.is_finite() {
        return Err(QueryError::Invalid("not a number"));
    }
    let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().map_err(|_| QueryError::Invalid("not a number"))?),
        None => (rest, 0),
    };
    let decimals = mantissa.split_once('.').map(|(_, d)| d.len()).unwrap_or(0);
    // saturating: a client's exponent may be anything an i32 holds
    let half = 0.5 * 10f64.powi(exponent.saturating_sub(i32::try_from(decimals).unwrap_or(i32::MAX)));
    let (lo, hi) = if op == NumOp::Ap {
        let spread = (value.abs() / 10.0).max(half);
        (value - spread, value + spread)
    } else {
        (value - half, value + half)
    };
    Ok(NumTest { op, value, lo, hi })
}

/// `[prefix]number|system|code` (system and code optional).
fn quantity_value(v: &str) -> Result<(NumTest, Option<String>, Option<String>), QueryError> {
    let parts = split_unescaped(v, '|');
    if parts.len() > 3 {
        return Err(QueryError::Invalid("a quantity is number|system|code"));
    }
    let test = num_value(parts[0]).map_err(|_| QueryError::Invalid("not a quantity"))?;
    let system = parts.get(1).filter(|s| !s.is_empty()).map(|s| unescape(s));
    let code = parts.get(2).filter(|s| !s.is_empty()).map(|s| unescape(s));
    Ok((test, system, code))
}

/// `code$value` (and `$value` again for the three-part ones): each part parsed as its
/// component's type.
fn composite_value(param: &SearchParam, v: &str) -> Result<Cond, QueryError> {
    let parts: Vec<&str> = split_unescaped(v, '$');
    let comps = &param.components;
    if comps.len() < 2 || comps[0].kind != ParamType::Token {
        return Err(QueryError::NotSupported("this composite parameter is not supported"));
    }
    if parts.len() != comps.len() {
        return Err(QueryError::Invalid(
            "a composite value needs one part per component, joined by $",
        ));
    }
    let (system, code) = token_value(parts[0]);
    let code = code.ok_or(QueryError::Invalid("the first part of a composite needs a code"))?;
    let second = match comps[1].kind {
        ParamType::Token => {
            let (system, code) = token_value(parts[1]);
            CompositePart::Token { system, code }
        }
        ParamType::Quantity => {
            let (test, system, code) = quantity_value(parts[1])?;
            CompositePart::Quantity { test, system, code }
        }
        ParamType::Number => CompositePart::Number(num_value(parts[1])?),
        ParamType::Date => {
            let (op, start, end) = date_value(parts[1])?;
            CompositePart::Date { op, start, end }
        }
        ParamType::String => CompositePart::StringPrefix(fold(&unescape(parts[1]))),
        _ => return Err(QueryError::NotSupported("this composite parameter is not supported")),
    };
    let third = match comps.get(2) {
        Some(c) if c.kind == ParamType::Number => Some(num_value(parts[2])?),
        Some(_) => return Err(QueryError::NotSupported("this composite parameter is not supported")),
        None => None,
    };
    Ok(Cond::Composite {
        param: param.code.clone(),
        system,
        code,
        second,
        third,
    })
}

/// Builds the search of `resource_type` from its query pairs (`_count`, `_page` and formatting
/// parameters are the caller's). A chain whose target must be confirmed after decryption is
/// refused here: only the search handler confirms chains (see [`parse_confirming_chains`]);
/// conditional operations and export filters keep to what SQL and exact blind matches decide.
pub fn parse(
    registry: &Registry,
    cipher: &Cipher,
    resource_type: &str,
    pairs: &[(String, String)],
    count: u32,
    strict: bool,
) -> Result<ParsedSearch, QueryError> {
    let parsed = parse_confirming_chains(registry, cipher, resource_type, pairs, count, strict)?;
    if !parsed.chain_checks.is_empty() {
        return Err(QueryError::NotSupported(
            "this value of an identifying parameter cannot be searched through a chain here",
        ));
    }
    Ok(parsed)
}

/// [`parse`], leaving chains through identifying parameters in [`ParsedSearch::chain_checks`]
/// for the caller to confirm.
pub fn parse_confirming_chains(
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
    let mut chain_checks = Vec::new();
    let (mut sort, mut memory_sort) = (Vec::new(), Vec::new());
    for (key, value) in pairs {
        let code = key.split([':', '.']).next().unwrap_or("");
        match code {
            // `_include` and `_revinclude` shape the result: the caller's
            "_count" | "_page" | "_format" | "_pretty" | "_include" | "_revinclude" | "_total" | "_summary"
            | "_elements" => continue,
            "_sort" => {
                // a bad `_sort` is refused under lenient handling too: ignoring it would answer
                // in another order than asked, silently
                let keys = match sort_keys(registry, resource_type, value) {
                    Ok(k) => k,
                    Err(QueryError::UnknownParameter) => {
                        return Err(QueryError::InvalidValue(
                            "_sort".into(),
                            "it names a parameter this type does not have",
                        ))
                    }
                    Err(QueryError::Invalid(reason)) => return Err(QueryError::InvalidValue("_sort".into(), reason)),
                    Err(e) => return Err(e),
                };
                if keys.iter().any(|(p, _)| p.phi) {
                    memory_sort = keys;
                } else {
                    sort = keys
                        .iter()
                        .filter_map(|(p, d)| {
                            sort_column(p.kind).map(|(table, column)| SortKey {
                                param: p.code.clone(),
                                table,
                                column,
                                descending: *d,
                            })
                        })
                        .collect();
                }
                continue;
            }
            "_type" => continue,
            "_contained" | "_containedType" | "_list" | "_query" | "_filter" | "_text" | "_content" => {
                return Err(QueryError::NotSupported(
                    "this search result parameter is not supported yet",
                ))
            }
            _ => {}
        }
        let pending = chain_checks.len();
        match conds_for(
            registry,
            cipher,
            resource_type,
            key,
            value,
            false,
            &mut types,
            &mut chain_checks,
        ) {
            Ok((any, recheck)) => {
                rechecks.extend(recheck);
                for check in &mut chain_checks[pending..] {
                    check.clause = clauses.len();
                }
                clauses.push(any);
            }
            // lenient handling (the default): an unknown parameter is left out and reported.
            // A known parameter with a value that cannot be read is refused, lenient or not
            // (leaving it out would widen the result to everything the token may see), and so
            // is what is known but not supported.
            Err(e @ QueryError::UnknownParameter) if !strict => {
                ignored.push((key.clone(), e));
            }
            // an empty value (`?gender=`) asks for nothing: left out, as servers commonly do
            Err(e @ QueryError::Invalid(_)) if !strict && value.is_empty() => {
                ignored.push((key.clone(), e));
            }
            Err(QueryError::Invalid(reason)) => {
                return Err(match registry.get(resource_type, code) {
                    Some(param) => QueryError::InvalidValue(param.code.clone(), reason),
                    None => QueryError::Invalid(reason),
                })
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ParsedSearch {
        query: SearchQuery {
            resource_type: resource_type.to_string(),
            types: Vec::new(),
            clauses,
            count,
            after: None,
            before: None,
            sort: sort.clone(),
            total: true,
            patient: None,
            nested_patient: None,
            shared_types: Vec::new(),
            any_compartment: None,
            updated_after: None,
            updated_until: None,
            outside_compartments: false,
            compartment: None,
        },
        rechecks,
        types,
        ignored,
        sort,
        memory_sort,
        chain_checks,
    })
}

/// Whether the search supports this parameter (for the CapabilityStatement).
pub fn supported(param: &SearchParam) -> bool {
    let composite_ok = param.components.len() >= 2
        && param.components[0].kind == ParamType::Token
        && matches!(
            param.components[1].kind,
            ParamType::Token | ParamType::Quantity | ParamType::Number | ParamType::Date | ParamType::String
        )
        && param.components.get(2).is_none_or(|c| c.kind == ParamType::Number);
    param.expression.is_some()
        && match param.kind {
            ParamType::Special => false,
            ParamType::Composite => composite_ok,
            _ => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_split_and_unescape_as_r4_says() {
        assert_eq!(split_unescaped(r"a\,b,c", ','), vec![r"a\,b", "c"]);
        assert_eq!(unescape(r"INC\,THE"), "INC,THE");
        assert_eq!(unescape(r"a\$b\|c\\d\e"), r"a$b|c\d\e");
        // an escaped backslash does not escape what follows
        assert_eq!(split_unescaped(r"a\\,b", ','), vec![r"a\\", "b"]);
        assert_eq!(
            token_value(r"http://x|a\|b"),
            (Some(Some("http://x".into())), Some("a|b".into()))
        );
        assert_eq!(token_value(r"a\|b"), (None, Some("a|b".into())));
        assert_eq!(token_value("|c"), (Some(None), Some("c".into())));
        assert_eq!(split_unescaped(r"x\$y$gt100", '$'), vec![r"x\$y", "gt100"]);
        assert_eq!(
            blind_token_key(r"urn:s|A\,B"),
            Some(crate::search::blind_token_keys(Some("urn:s"), "A,B")[1].clone())
        );
        let (_, system, code) = quantity_value(r"5|http://u\|x|mg").unwrap();
        assert_eq!((system.as_deref(), code.as_deref()), (Some("http://u|x"), Some("mg")));
    }

    #[test]
    fn numbers_carry_their_precision_and_odd_exponents_do_not_panic() {
        let t = num_value("100").unwrap();
        assert_eq!((t.lo, t.hi), (99.5, 100.5));
        let t = num_value("1.50").unwrap();
        assert!((t.lo - 1.495).abs() < 1e-12 && (t.hi - 1.505).abs() < 1e-12);
        let t = num_value("1e2").unwrap();
        assert_eq!((t.lo, t.hi), (50.0, 150.0));
        // an extreme exponent is a (degenerate) range, never an overflow
        assert!(num_value("1.5e-2147483648").is_ok());
        assert!(num_value("1e2147483647").is_err(), "not finite");
        assert!(num_value("eqx").is_err());
    }
}
