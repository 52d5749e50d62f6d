//! A subscription's criteria tested against the index rows of one version, in memory: the
//! conditions are those the search engine builds (`search::query::parse`), and each is
//! answered here as its SQL (`store::search_query`) answers it on the index tables, so a write
//! matches a subscription exactly when a search would find the version. Conditions that read
//! other resources (chains, `_has`) are not answered here: criteria holding them are refused
//! when the Subscription is written.

use crate::store::search_index::SearchRow;
use crate::store::search_query::{CompositePart, Cond, DateOp, NumOp, NumTest};
use chrono::NaiveDateTime;

/// Whether a condition can be answered from one resource's own rows.
pub fn answerable(c: &Cond) -> bool {
    match c {
        Cond::Chain { .. } | Cond::Has { .. } => false,
        Cond::All(groups) => groups.iter().flatten().all(answerable),
        Cond::Not(inner) => inner.iter().all(answerable),
        _ => true,
    }
}

/// Whether every clause holds (within one, any condition) for the version of
/// `resource_type/id` whose index rows are `rows`.
pub fn holds(clauses: &[Vec<Cond>], resource_type: &str, id: &str, rows: &[SearchRow]) -> bool {
    clauses
        .iter()
        .all(|any| any.iter().any(|c| cond(c, resource_type, id, rows)))
}

fn num(v: f64, t: &NumTest) -> bool {
    match t.op {
        NumOp::Eq => v >= t.lo && v < t.hi,
        NumOp::Ne => !(v >= t.lo && v < t.hi),
        NumOp::Ap => v >= t.lo && v <= t.hi,
        NumOp::Gt => v > t.value,
        NumOp::Lt => v < t.value,
        NumOp::Ge => v >= t.value,
        NumOp::Le => v <= t.value,
    }
}

/// The SQL date test (`store::search_query::date_test`) on an indexed range `[s, e)`.
fn date(op: DateOp, s: NaiveDateTime, e: NaiveDateTime, start: NaiveDateTime, end: NaiveDateTime) -> bool {
    match op {
        DateOp::Within => s >= start && e <= end,
        DateOp::NotWithin => !(s >= start && e <= end),
        DateOp::Overlaps => s < end && e > start,
        DateOp::Gt => e > end,
        DateOp::Ge => e > start,
        DateOp::Lt => s < start,
        DateOp::Le => s < end,
        DateOp::StartsAfter => s >= end,
        DateOp::EndsBefore => e <= start,
    }
}

/// `system` as the search gives it: `None` any, `Some(None)` none, `Some(Some(s))` that one.
fn system_ok(want: &Option<Option<String>>, have: &Option<String>) -> bool {
    match want {
        None => true,
        Some(None) => have.is_none(),
        Some(Some(s)) => have.as_deref() == Some(s.as_str()),
    }
}

fn param_of(row: &SearchRow) -> &str {
    match row {
        SearchRow::String { param, .. }
        | SearchRow::Token { param, .. }
        | SearchRow::Date { param, .. }
        | SearchRow::Reference { param, .. }
        | SearchRow::Number { param, .. }
        | SearchRow::Quantity { param, .. }
        | SearchRow::Uri { param, .. }
        | SearchRow::Composite { param, .. } => param,
    }
}

fn blind_of(row: &SearchRow) -> Option<&[u8]> {
    match row {
        SearchRow::String { blind, .. } | SearchRow::Token { blind, .. } | SearchRow::Date { blind, .. } => {
            blind.as_deref()
        }
        _ => None,
    }
}

/// The rows of parameter `p`.
fn rows_of<'r>(rows: &'r [SearchRow], p: &'r str) -> impl Iterator<Item = &'r SearchRow> + 'r {
    rows.iter().filter(move |r| param_of(r) == p)
}

fn cond(c: &Cond, ty: &str, id: &str, rows: &[SearchRow]) -> bool {
    let of = |p| rows_of(rows, p);
    match c {
        Cond::Id(v) => id == v,
        Cond::TypeNotIn(types) => !types.iter().any(|t| t == ty),
        Cond::All(groups) => groups.iter().all(|g| g.iter().any(|c| cond(c, ty, id, rows))),
        Cond::Not(inner) => !inner.iter().any(|c| cond(c, ty, id, rows)),
        Cond::StringPrefix { param, prefix } => of(param).any(|r| match r {
            SearchRow::String { value: Some(v), .. } => v.starts_with(prefix.as_str()),
            _ => false,
        }),
        Cond::StringContains { param, part } => of(param).any(|r| match r {
            SearchRow::String { value: Some(v), .. } => v.contains(part.as_str()),
            _ => false,
        }),
        Cond::StringExact { param, value } => of(param).any(|r| match r {
            SearchRow::String { exact: Some(v), .. } => v == value,
            _ => false,
        }),
        Cond::Blind { table, param, blinds } => of(param)
            .filter(|r| r.table() == *table)
            .any(|r| blind_of(r).is_some_and(|b| blinds.iter().any(|w| w.as_slice() == b))),
        Cond::BlindAll { table, param, blinds } => blinds.iter().all(|w| {
            of(param)
                .filter(|r| r.table() == *table)
                .any(|r| blind_of(r) == Some(w.as_slice()))
        }),
        Cond::Token { param, system, code } => of(param).any(|r| match r {
            SearchRow::Token { system: s, code: k, .. } => {
                code.as_ref().is_none_or(|want| k.as_deref() == Some(want.as_str())) && system_ok(system, s)
            }
            _ => false,
        }),
        Cond::TokenText { param, prefix } => of(param).any(|r| match r {
            SearchRow::Token { text: Some(t), .. } => t.starts_with(prefix.as_str()),
            _ => false,
        }),
        Cond::Date { param, op, start, end } => of(param).any(|r| match r {
            SearchRow::Date {
                start: Some(s),
                end: Some(e),
                ..
            } => date(*op, *s, *e, *start, *end),
            _ => false,
        }),
        Cond::Reference {
            param,
            target_type,
            id: target,
        } => of(param).any(|r| match r {
            SearchRow::Reference {
                target_type: tt,
                target_id,
                ..
            } => {
                target_id == target
                    && match target_type {
                        None => true,
                        Some(t) => tt.as_deref().is_none_or(|have| have == t),
                    }
            }
            _ => false,
        }),
        Cond::Number { param, test } => of(param).any(|r| match r {
            SearchRow::Number { value, .. } => num(*value, test),
            _ => false,
        }),
        Cond::Quantity {
            param,
            test,
            system,
            code,
        } => of(param).any(|r| match r {
            SearchRow::Quantity {
                value,
                system: s,
                code: k,
                ..
            } => {
                num(*value, test)
                    && code.as_ref().is_none_or(|c| k.as_deref() == Some(c.as_str()))
                    && system.as_ref().is_none_or(|w| s.as_deref() == Some(w.as_str()))
            }
            _ => false,
        }),
        Cond::Composite {
            param,
            system,
            code,
            second,
            third,
        } => of(param).any(|r| match r {
            SearchRow::Composite {
                c1_system,
                c1_code,
                c2_system,
                c2_code,
                c2_number,
                c2_start,
                c2_end,
                c2_text,
                c3_number,
                ..
            } => {
                c1_code == code
                    && system_ok(system, c1_system)
                    && match second {
                        CompositePart::Token { system, code } => {
                            c2_code.is_some()
                                && code.as_ref().is_none_or(|w| c2_code.as_deref() == Some(w.as_str()))
                                && system_ok(system, c2_system)
                        }
                        CompositePart::Number(t) => c2_number.is_some_and(|v| num(v, t)),
                        CompositePart::Quantity { test, system, code } => {
                            c2_number.is_some_and(|v| num(v, test))
                                && code.as_ref().is_none_or(|w| c2_code.as_deref() == Some(w.as_str()))
                                && system.as_ref().is_none_or(|w| c2_system.as_deref() == Some(w.as_str()))
                        }
                        CompositePart::Date { op, start, end } => match (c2_start, c2_end) {
                            (Some(s), Some(e)) => date(*op, *s, *e, *start, *end),
                            _ => false,
                        },
                        CompositePart::StringPrefix(p) => c2_text.as_deref().is_some_and(|t| t.starts_with(p.as_str())),
                    }
                    && third.as_ref().is_none_or(|t| c3_number.is_some_and(|v| num(v, t)))
            }
            _ => false,
        }),
        Cond::Uri { param, value } => of(param).any(|r| match r {
            SearchRow::Uri { value: v, .. } => v == value,
            _ => false,
        }),
        Cond::UriBelow { param, prefix } => of(param).any(|r| match r {
            SearchRow::Uri { value: v, .. } => v.starts_with(prefix.as_str()),
            _ => false,
        }),
        Cond::UriAbove { param, value } => of(param).any(|r| match r {
            SearchRow::Uri { value: v, .. } => value.starts_with(v.as_str()),
            _ => false,
        }),
        Cond::Missing { param, table, missing } => {
            let present = of(param).any(|r| r.table() == *table);
            present != *missing
        }
        Cond::Chain { .. } | Cond::Has { .. } => false,
    }
}
