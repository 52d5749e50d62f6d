//! The FHIRPath evaluator over resources as `serde_json::Value`.

use super::parse::{Expr, Literal};
use super::FhirPathError;
use serde_json::Value;

/// One element of a collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// A node of the resource, with the FHIR type its choice element or `resourceType` names.
    Node(&'a Value, Option<String>),
    Bool(bool),
    Int(i64),
    Dec(f64),
    Str(String),
    Date(String),
    DateTime(String),
    Time(String),
    Quantity(f64, String),
}

pub type Coll<'a> = Vec<Item<'a>>;

fn err(msg: impl Into<String>) -> FhirPathError {
    FhirPathError::Eval(msg.into())
}

/// What `%resource`, `%context` and `$this` mean during one evaluation.
pub struct Ctx<'a> {
    pub resource: &'a Value,
    /// `%rootResource`: the resource a contained resource sits in (else `resource`).
    pub root_resource: &'a Value,
    pub this: Option<Item<'a>>,
    pub index: Option<i64>,
    pub total: Option<Coll<'a>>,
}

impl<'a> Item<'a> {
    /// A primitive node as a system value; other items as they are.
    pub fn prim(&self) -> Item<'a> {
        match self {
            Item::Node(Value::Bool(b), _) => Item::Bool(*b),
            Item::Node(Value::Number(n), ty) => match (n.as_i64(), ty.as_deref()) {
                (Some(i), ty) if ty != Some("decimal") && !n.to_string().contains('.') => Item::Int(i),
                _ => Item::Dec(n.as_f64().unwrap_or(0.0)),
            },
            Item::Node(Value::String(s), ty) => match ty.as_deref() {
                Some("date") => Item::Date(s.clone()),
                Some("dateTime") | Some("instant") => Item::DateTime(s.clone()),
                Some("time") => Item::Time(s.clone()),
                _ => Item::Str(s.clone()),
            },
            Item::Node(Value::Object(m), _) if is_quantity(m) => {
                let value = m.get("value").and_then(Value::as_f64).unwrap_or(0.0);
                let unit = m
                    .get("code")
                    .or_else(|| m.get("unit"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                Item::Quantity(value, unit)
            }
            other => other.clone(),
        }
    }
}

fn is_quantity(m: &serde_json::Map<String, Value>) -> bool {
    m.contains_key("value") && (m.contains_key("code") || m.contains_key("unit") || m.contains_key("system"))
}

/// Whether R4 has a choice element (`value[x]`) of this name, anywhere: read once from the
/// structure definitions the validator uses.
fn is_choice_name(name: &str) -> bool {
    static NAMES: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    NAMES
        .get_or_init(|| {
            let text = crate::fhir::structure::R4_RULES;
            let mut names = std::collections::HashSet::new();
            for (at, _) in text.match_indices("[x]\"") {
                let before = &text[..at];
                let start = before.rfind(['.', '"']).map_or(0, |i| i + 1);
                names.insert(before[start..].to_string());
            }
            names
        })
        .contains(name)
}

/// Children of a node by name: arrays flattened; choice elements (`value` → `valueQuantity`)
/// found by prefix, with their type.
fn member<'a>(item: &Item<'a>, name: &str, out: &mut Coll<'a>) {
    let Item::Node(Value::Object(m), _) = item else { return };
    let mut push = |v: &'a Value, ty: Option<String>| match v {
        Value::Array(items) => {
            for i in items {
                if !i.is_null() {
                    out.push(Item::Node(i, ty.clone().or_else(|| resource_type(i))));
                }
            }
        }
        Value::Null => {}
        v => out.push(Item::Node(v, ty.or_else(|| resource_type(v)))),
    };
    if let Some(v) = m.get(name) {
        push(v, primitive_type_of(name));
        return;
    }
    // a primitive present only through its extensions (`_given`) exists, without a value
    if let Some(v) = m.get(&format!("_{name}")) {
        push(v, primitive_type_of(name));
        return;
    }
    // only R4's choice elements are found by prefix (`response` is not `responseCode`)
    if !is_choice_name(name) {
        return;
    }
    for (k, v) in m {
        let k = k.strip_prefix('_').filter(|plain| !m.contains_key(*plain)).unwrap_or(k);
        // `_valueString` alone: the choice is there, its value only extended
        let v = m.get(k).unwrap_or(v);
        if let Some(rest) = k.strip_prefix(name) {
            if rest.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                let mut ty = rest.to_string();
                if let Some(first) = ty.get(..1) {
                    if matches!(
                        rest,
                        "Boolean"
                            | "Integer"
                            | "Decimal"
                            | "String"
                            | "Date"
                            | "DateTime"
                            | "Time"
                            | "Instant"
                            | "Uri"
                            | "Url"
                            | "Canonical"
                            | "Code"
                            | "Id"
                            | "Markdown"
                            | "Oid"
                            | "Uuid"
                            | "PositiveInt"
                            | "UnsignedInt"
                            | "Base64Binary"
                    ) {
                        ty = first.to_lowercase() + &rest[1..];
                    }
                }
                push(v, Some(ty));
                return;
            }
        }
    }
}

/// Well-known element names whose JSON strings are dates (no model: only the common ones).
fn primitive_type_of(name: &str) -> Option<String> {
    match name {
        "birthDate" => Some("date".into()),
        "lastUpdated" | "issued" | "recorded" | "instant" => Some("instant".into()),
        _ => None,
    }
}

fn resource_type(v: &Value) -> Option<String> {
    v.get("resourceType").and_then(Value::as_str).map(str::to_string)
}

fn type_name(item: &Item<'_>) -> String {
    match item {
        Item::Node(_, Some(t)) => t.clone(),
        Item::Node(Value::Bool(_), None) | Item::Bool(_) => "boolean".into(),
        Item::Node(Value::Number(n), None) => {
            if n.is_i64() {
                "integer".into()
            } else {
                "decimal".into()
            }
        }
        Item::Node(Value::String(_), None) => "string".into(),
        Item::Node(_, None) => String::new(),
        Item::Int(_) => "Integer".into(),
        Item::Dec(_) => "Decimal".into(),
        Item::Str(_) => "String".into(),
        Item::Date(_) => "Date".into(),
        Item::DateTime(_) => "DateTime".into(),
        Item::Time(_) => "Time".into(),
        Item::Quantity(..) => "Quantity".into(),
    }
}

pub(super) fn is_type(item: &Item<'_>, ty: &str) -> bool {
    let ty = ty.strip_prefix("FHIR.").unwrap_or(ty);
    let ty = ty.strip_prefix("System.").unwrap_or(ty);
    let actual = type_name(item);
    if actual.eq_ignore_ascii_case(ty) {
        // System types are capitalized, FHIR primitives are not: `Patient.active is Boolean` is
        // false in the strict spec, but treated leniently here
        return true;
    }
    // a string `descendants()` reached, of an element whose type is unknown (no model here),
    // may be any string-based primitive: dom-3's `descendants().as(canonical)` must see
    // `#id` in `definitionCanonical`
    if matches!(item, Item::Node(Value::String(_), Some(t)) if t.is_empty())
        && matches!(
            ty,
            "code" | "id" | "uri" | "url" | "canonical" | "markdown" | "oid" | "uuid"
        )
    {
        return true;
    }
    match (actual.as_str(), ty) {
        ("code" | "id" | "uri" | "url" | "canonical" | "markdown" | "oid" | "uuid", "string") => true,
        ("positiveInt" | "unsignedInt", "integer") => true,
        ("Age" | "Distance" | "Duration" | "Count" | "SimpleQuantity" | "MoneyQuantity", "Quantity") => true,
        ("", "Resource" | "DomainResource") => false,
        (a, "Resource" | "DomainResource") => {
            a.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && matches!(item, Item::Node(v, _) if v.get("resourceType").is_some())
        }
        _ => false,
    }
}

pub(super) fn single<'a>(c: &Coll<'a>) -> Result<Option<Item<'a>>, FhirPathError> {
    match c.len() {
        0 => Ok(None),
        1 => Ok(Some(c[0].prim())),
        _ => Err(err("expected a single item")),
    }
}

pub(super) fn to_bool(c: &Coll<'_>) -> Result<Option<bool>, FhirPathError> {
    match c.len() {
        0 => Ok(None),
        1 => match c[0].prim() {
            Item::Bool(b) => Ok(Some(b)),
            // a single non-boolean item counts as true (singleton evaluation)
            _ => Ok(Some(true)),
        },
        _ => Err(err("expected a single boolean")),
    }
}

fn num(i: &Item<'_>) -> Option<f64> {
    match i {
        Item::Int(n) => Some(*n as f64),
        Item::Dec(d) => Some(*d),
        _ => None,
    }
}

/// Date/time values as comparable parts: (precision, normalized text).
fn temporal_key(s: &str) -> String {
    s.trim_start_matches('@').replace('Z', "+00:00")
}

pub(super) fn compare(a: &Item<'_>, b: &Item<'_>) -> Option<std::cmp::Ordering> {
    let (a, b) = (a.prim(), b.prim());
    match (&a, &b) {
        (Item::Str(x), Item::Str(y)) => Some(x.cmp(y)),
        (Item::Quantity(x, u), Item::Quantity(y, v)) if u == v => x.partial_cmp(y),
        _ if num(&a).is_some() && num(&b).is_some() => num(&a)?.partial_cmp(&num(&b)?),
        _ => {
            let ta = temporal(&a)?;
            let tb = temporal(&b)?;
            compare_temporal(&ta, &tb)
        }
    }
}

fn temporal(i: &Item<'_>) -> Option<String> {
    match i {
        Item::Date(s) | Item::DateTime(s) => Some(temporal_key(s)),
        Item::Time(s) => Some(format!("T{}", s.trim_start_matches('T'))),
        Item::Str(s) if s.len() >= 4 && s.as_bytes()[0].is_ascii_digit() => Some(temporal_key(s)),
        _ => None,
    }
}

/// Compares two date/time strings; different precision gives `None` (empty). Full date-times
/// with a time zone compare as instants.
fn compare_temporal(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let instant = |s: &str| chrono::DateTime::parse_from_rfc3339(&s.replace("+00:00", "Z")).ok();
    if let (Some(x), Some(y)) = (instant(a), instant(b)) {
        return Some(x.cmp(&y));
    }
    let parse = |s: &str| -> Option<(Vec<u32>, usize)> {
        let (date, time) = match s.split_once('T') {
            Some((d, t)) => (d, Some(t)),
            None => (s, None),
        };
        let mut parts: Vec<u32> = Vec::new();
        if !date.is_empty() {
            for p in date.split('-') {
                parts.push(p.parse().ok()?);
            }
        }
        if let Some(t) = time {
            let t = t.split(['+', 'Z']).next().unwrap_or(t);
            // a `-` after the first character is a negative offset
            let t = match t.get(1..).and_then(|rest| rest.find('-')) {
                Some(i) => &t[..i + 1],
                None => t,
            };
            for p in t.split(':') {
                if p.is_empty() {
                    continue;
                }
                if let Some((sec, ms)) = p.split_once('.') {
                    parts.push(sec.parse().ok()?);
                    parts.push(format!("{ms:0<3}")[..3].parse().ok()?);
                } else {
                    parts.push(p.parse().ok()?);
                }
            }
        }
        let n = parts.len();
        Some((parts, n))
    };
    let (pa, na) = parse(a)?;
    let (pb, nb) = parse(b)?;
    for (x, y) in pa.iter().zip(pb.iter()) {
        if x != y {
            return Some(x.cmp(y));
        }
    }
    if na == nb || (na >= 6 && nb >= 6) {
        Some(std::cmp::Ordering::Equal)
    } else {
        None
    }
}

pub(super) fn equal(a: &Item<'_>, b: &Item<'_>) -> Option<bool> {
    if let (Item::Node(x @ Value::Object(_), _), Item::Node(y @ Value::Object(_), _)) = (a, b) {
        return Some(x == y);
    }
    let (pa, pb) = (a.prim(), b.prim());
    match (&pa, &pb) {
        (Item::Bool(x), Item::Bool(y)) => Some(x == y),
        (Item::Str(x), Item::Str(y)) => Some(x == y),
        (Item::Quantity(x, u), Item::Quantity(y, v)) => Some(x == y && (u == v || calendar_eq(u, v))),
        _ if num(&pa).is_some() && num(&pb).is_some() => Some(num(&pa) == num(&pb)),
        _ => match (temporal(&pa), temporal(&pb)) {
            (Some(x), Some(y)) => compare_temporal(&x, &y).map(|o| o.is_eq()),
            _ => Some(false),
        },
    }
}

fn calendar_unit(u: &str) -> &str {
    {
        match u {
            "year" | "years" => "a",
            "month" | "months" => "mo",
            "week" | "weeks" => "wk",
            "day" | "days" => "d",
            "hour" | "hours" => "h",
            "minute" | "minutes" => "min",
            "second" | "seconds" => "s",
            "millisecond" | "milliseconds" => "ms",
            other => other,
        }
    }
}

fn calendar_eq(a: &str, b: &str) -> bool {
    calendar_unit(a) == calendar_unit(b)
}

fn equivalent(a: &Item<'_>, b: &Item<'_>) -> bool {
    let (pa, pb) = (a.prim(), b.prim());
    match (&pa, &pb) {
        (Item::Str(x), Item::Str(y)) => {
            let n = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
            n(x) == n(y)
        }
        (Item::Dec(_), _) | (_, Item::Dec(_)) if num(&pa).is_some() && num(&pb).is_some() => {
            let (x, y) = (num(&pa).unwrap_or(0.0), num(&pb).unwrap_or(0.0));
            let prec = |v: f64| {
                let s = format!("{v}");
                s.split_once('.').map(|(_, f)| f.len()).unwrap_or(0)
            };
            let p = prec(x).min(prec(y)) as i32;
            let f = 10f64.powi(p);
            (x * f).round() == (y * f).round()
        }
        _ => match (temporal(&pa), temporal(&pb)) {
            (Some(x), Some(y)) => compare_temporal(&x, &y).is_some_and(|o| o.is_eq()),
            _ => equal(a, b).unwrap_or(false),
        },
    }
}

fn literal(l: &Literal) -> Coll<'static> {
    match l {
        Literal::Empty => vec![],
        Literal::Bool(b) => vec![Item::Bool(*b)],
        Literal::Str(s) => vec![Item::Str(s.clone())],
        Literal::Int(i) => vec![Item::Int(*i)],
        Literal::Dec(d, _) => vec![Item::Dec(*d)],
        Literal::Date(d) => vec![Item::Date(d.clone())],
        Literal::DateTime(d) => vec![Item::DateTime(d.clone())],
        Literal::Time(t) => vec![Item::Time(t.clone())],
        Literal::Quantity(v, _, u) => vec![Item::Quantity(*v, u.clone())],
    }
}

pub fn eval<'a>(e: &Expr, focus: &Coll<'a>, ctx: &Ctx<'a>) -> Result<Coll<'a>, FhirPathError> {
    Ok(match e {
        Expr::Literal(l) => literal(l),
        Expr::This => ctx.this.clone().into_iter().collect(),
        Expr::Index => ctx.index.map(Item::Int).into_iter().collect(),
        Expr::Total => ctx.total.clone().unwrap_or_default(),
        Expr::External(name) => match name.as_str() {
            "resource" | "context" => vec![Item::Node(ctx.resource, resource_type(ctx.resource))],
            "rootResource" => vec![Item::Node(ctx.root_resource, resource_type(ctx.root_resource))],
            "ucum" => vec![Item::Str("http://unitsofmeasure.org".into())],
            "sct" => vec![Item::Str("http://snomed.info/sct".into())],
            "loinc" => vec![Item::Str("http://loinc.org".into())],
            n if n.starts_with("vs-") => vec![Item::Str(format!("http://hl7.org/fhir/ValueSet/{}", &n[3..]))],
            n if n.starts_with("ext-") => {
                vec![Item::Str(format!(
                    "http://hl7.org/fhir/StructureDefinition/{}",
                    &n[4..]
                ))]
            }
            _ => return Err(err(format!("unknown variable %{name}"))),
        },
        Expr::Identifier(name) => {
            // a type name at the start of a path selects the focus if it is of that type
            let mut out = Vec::new();
            let mut typed = false;
            for item in focus {
                if let Item::Node(v, _) = item {
                    if let Some(rt) = v.get("resourceType").and_then(Value::as_str) {
                        // the abstract bases name every resource (DomainResource: all but three)
                        let matches = rt == name
                            || name == "Resource"
                            || (name == "DomainResource" && !matches!(rt, "Bundle" | "Binary" | "Parameters"));
                        if matches {
                            out.push(item.clone());
                            typed = true;
                        }
                    }
                }
            }
            if typed {
                return Ok(out);
            }
            for item in focus {
                member(item, name, &mut out);
            }
            out
        }
        Expr::Member(base, name) => {
            let base = eval(base, focus, ctx)?;
            let mut out = Vec::new();
            for item in &base {
                member(item, name, &mut out);
            }
            out
        }
        Expr::Indexer(base, idx) => {
            let base = eval(base, focus, ctx)?;
            let idx = eval(idx, focus, ctx)?;
            match single(&idx)? {
                Some(Item::Int(i)) if i >= 0 => base.into_iter().nth(i as usize).into_iter().collect(),
                _ => vec![],
            }
        }
        Expr::Unary(sign, inner) => {
            let v = eval(inner, focus, ctx)?;
            match (sign, single(&v)?) {
                (_, None) => vec![],
                ('+', Some(i)) => vec![i],
                (_, Some(Item::Int(i))) => vec![Item::Int(-i)],
                (_, Some(Item::Dec(d))) => vec![Item::Dec(-d)],
                (_, Some(Item::Quantity(q, u))) => vec![Item::Quantity(-q, u)],
                _ => return Err(err("unary minus on a non-number")),
            }
        }
        Expr::TypeOp(op, inner, ty) => {
            let v = eval(inner, focus, ctx)?;
            if op == "is" {
                match v.len() {
                    0 => vec![],
                    1 => vec![Item::Bool(is_type(&v[0], ty))],
                    _ => return Err(err("'is' needs a single item")),
                }
            } else {
                v.into_iter().filter(|i| is_type(i, ty)).collect()
            }
        }
        Expr::Binary(op, l, r) => binary(op, l, r, focus, ctx)?,
        Expr::Call(base, name, args) => {
            let input = match base {
                Some(b) => eval(b, focus, ctx)?,
                None => focus.clone(),
            };
            super::functions::call(name, &input, args, focus, ctx)?
        }
    })
}

fn binary<'a>(op: &str, l: &Expr, r: &Expr, focus: &Coll<'a>, ctx: &Ctx<'a>) -> Result<Coll<'a>, FhirPathError> {
    // boolean operators short-circuit on the left value
    if matches!(op, "and" | "or" | "xor" | "implies") {
        let a = to_bool(&eval(l, focus, ctx)?)?;
        let b = || -> Result<Option<bool>, FhirPathError> { to_bool(&eval(r, focus, ctx)?) };
        let v = match op {
            "and" => match a {
                Some(false) => Some(false),
                _ => match (a, b()?) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
            },
            "or" => match a {
                Some(true) => Some(true),
                _ => match (a, b()?) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
            },
            "xor" => match (a, b()?) {
                (Some(x), Some(y)) => Some(x != y),
                _ => None,
            },
            _ => match a {
                Some(false) => Some(true),
                _ => match (a, b()?) {
                    (_, Some(true)) => Some(true),
                    (Some(true), Some(false)) => Some(false),
                    _ => None,
                },
            },
        };
        return Ok(v.map(Item::Bool).into_iter().collect());
    }
    let a = eval(l, focus, ctx)?;
    let b = eval(r, focus, ctx)?;
    Ok(match op {
        "|" => union(a, b),
        "=" | "!=" => {
            if a.is_empty() || b.is_empty() {
                return Ok(vec![]);
            }
            let eq = if a.len() != b.len() {
                Some(false)
            } else {
                let mut all = Some(true);
                for (x, y) in a.iter().zip(b.iter()) {
                    match equal(x, y) {
                        Some(true) => {}
                        Some(false) => {
                            all = Some(false);
                            break;
                        }
                        None => all = None,
                    }
                }
                all
            };
            match eq {
                Some(v) => vec![Item::Bool(if op == "=" { v } else { !v })],
                None => vec![],
            }
        }
        "~" | "!~" => {
            let eq = a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| equivalent(x, y));
            vec![Item::Bool(if op == "~" { eq } else { !eq })]
        }
        "<" | ">" | "<=" | ">=" => {
            let (Some(x), Some(y)) = (single(&a)?, single(&b)?) else {
                return Ok(vec![]);
            };
            match compare(&x, &y) {
                Some(o) => vec![Item::Bool(match op {
                    "<" => o.is_lt(),
                    ">" => o.is_gt(),
                    "<=" => o.is_le(),
                    _ => o.is_ge(),
                })],
                None => {
                    if temporal(&x).is_some() && temporal(&y).is_some() {
                        vec![]
                    } else {
                        return Err(err("values cannot be compared"));
                    }
                }
            }
        }
        "in" | "contains" => {
            let (item, coll) = if op == "in" { (&a, &b) } else { (&b, &a) };
            match item.len() {
                0 => vec![],
                1 => vec![Item::Bool(coll.iter().any(|c| equal(&item[0], c) == Some(true)))],
                _ => return Err(err("membership needs a single item")),
            }
        }
        "&" => {
            let s = |c: &Coll<'_>| -> Result<String, FhirPathError> {
                Ok(match single(c)? {
                    Some(i) => to_text(&i).unwrap_or_default(),
                    None => String::new(),
                })
            };
            vec![Item::Str(s(&a)? + &s(&b)?)]
        }
        _ => arithmetic(op, &a, &b)?,
    })
}

fn arithmetic<'a>(op: &str, a: &Coll<'a>, b: &Coll<'a>) -> Result<Coll<'a>, FhirPathError> {
    let (Some(x), Some(y)) = (single(a)?, single(b)?) else {
        return Ok(vec![]);
    };
    if op == "+" {
        if let (Item::Str(s), Item::Str(t)) = (&x, &y) {
            return Ok(vec![Item::Str(format!("{s}{t}"))]);
        }
    }
    if let (Item::Quantity(p, u), Item::Quantity(q, v)) = (&x, &y) {
        return Ok(match op {
            "+" if u == v => vec![Item::Quantity(p + q, u.clone())],
            "-" if u == v => vec![Item::Quantity(p - q, u.clone())],
            "*" => vec![Item::Quantity(p * q, format!("{u}.{v}"))],
            "/" if *q != 0.0 => vec![Item::Quantity(
                p / q,
                if u == v { "1".into() } else { format!("{u}/{v}") },
            )],
            _ => vec![],
        });
    }
    match (&x, &y) {
        (Item::Int(i), Item::Int(j)) => Ok(match op {
            "+" => i.checked_add(*j).map(Item::Int).into_iter().collect(),
            "-" => i.checked_sub(*j).map(Item::Int).into_iter().collect(),
            "*" => i.checked_mul(*j).map(Item::Int).into_iter().collect(),
            "/" if *j != 0 => vec![Item::Dec(*i as f64 / *j as f64)],
            // truncated division, as in the spec's examples (-5 div 2 = -2)
            "div" if *j != 0 => vec![Item::Int(i / j)],
            "mod" if *j != 0 => vec![Item::Int(i % j)],
            _ => vec![],
        }),
        _ => {
            let (Some(p), Some(q)) = (num(&x), num(&y)) else {
                return Err(err("arithmetic on non-numbers"));
            };
            Ok(match op {
                "+" => vec![Item::Dec(p + q)],
                "-" => vec![Item::Dec(p - q)],
                "*" => vec![Item::Dec(p * q)],
                "/" if q != 0.0 => vec![Item::Dec(p / q)],
                "div" if q != 0.0 => vec![Item::Int((p / q).trunc() as i64)],
                "mod" if q != 0.0 => vec![Item::Dec(p % q)],
                _ => vec![],
            })
        }
    }
}

pub fn union<'a>(a: Coll<'a>, b: Coll<'a>) -> Coll<'a> {
    let mut out: Coll<'a> = Vec::new();
    for i in a.into_iter().chain(b) {
        if !out.iter().any(|o| equal(o, &i) == Some(true)) {
            out.push(i);
        }
    }
    out
}

/// The text of a primitive (`toString()`).
pub fn to_text(i: &Item<'_>) -> Option<String> {
    Some(match i.prim() {
        Item::Bool(b) => b.to_string(),
        Item::Int(n) => n.to_string(),
        Item::Dec(d) => format!("{d}"),
        Item::Str(s) => s,
        Item::Date(s) | Item::DateTime(s) => s.trim_start_matches('@').to_string(),
        Item::Time(s) => s.trim_start_matches('T').to_string(),
        Item::Quantity(v, u) => {
            // calendar durations are words (`1 week`), UCUM units are quoted (`1 'wk'`)
            if calendar_unit(&u) != u {
                format!("{v} {u}")
            } else {
                format!("{v} '{u}'")
            }
        }
        Item::Node(..) => return None,
    })
}
