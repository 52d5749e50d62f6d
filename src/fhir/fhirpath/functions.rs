//! FHIRPath functions.

use super::eval::{equal, eval, is_type, single, to_bool, to_text, union, Coll, Ctx, Item};
use super::parse::Expr;
use super::FhirPathError;
use serde_json::Value;

fn err(msg: impl Into<String>) -> FhirPathError {
    FhirPathError::Eval(msg.into())
}

/// Evaluates `e` with each item of `input` as `$this` (and its `$index`).
fn per_item<'a>(e: &Expr, input: &Coll<'a>, ctx: &Ctx<'a>) -> Result<Vec<Coll<'a>>, FhirPathError> {
    input
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let sub = Ctx {
                resource: ctx.resource,
                root_resource: ctx.root_resource,
                this: Some(item.clone()),
                index: Some(i as i64),
                total: ctx.total.clone(),
            };
            eval(e, &vec![item.clone()], &sub)
        })
        .collect()
}

fn arg<'a>(args: &[Expr], n: usize, focus: &Coll<'a>, ctx: &Ctx<'a>) -> Result<Coll<'a>, FhirPathError> {
    let e = args.get(n).ok_or_else(|| err("missing argument"))?;
    eval(e, focus, ctx)
}

fn str_arg<'a>(args: &[Expr], n: usize, focus: &Coll<'a>, ctx: &Ctx<'a>) -> Result<Option<String>, FhirPathError> {
    Ok(single(&arg(args, n, focus, ctx)?)?.and_then(|i| to_text(&i)))
}

fn int_arg<'a>(args: &[Expr], n: usize, focus: &Coll<'a>, ctx: &Ctx<'a>) -> Result<Option<i64>, FhirPathError> {
    Ok(match single(&arg(args, n, focus, ctx)?)? {
        Some(Item::Int(i)) => Some(i),
        None => None,
        _ => return Err(err("expected an integer argument")),
    })
}

fn type_arg(args: &[Expr]) -> Result<String, FhirPathError> {
    match args.first() {
        Some(Expr::Identifier(n)) => Ok(n.clone()),
        Some(Expr::Member(base, n)) => match base.as_ref() {
            Expr::Identifier(ns) => Ok(format!("{ns}.{n}")),
            _ => Err(err("expected a type name")),
        },
        _ => Err(err("expected a type name")),
    }
}

fn the_string<'a>(input: &Coll<'a>) -> Result<Option<String>, FhirPathError> {
    Ok(match single(input)? {
        Some(Item::Str(s)) => Some(s),
        Some(i @ (Item::Date(_) | Item::DateTime(_) | Item::Time(_))) => to_text(&i),
        None => None,
        Some(_) => return Err(err("expected a string")),
    })
}

fn the_number(input: &Coll<'_>) -> Result<Option<f64>, FhirPathError> {
    Ok(match single(input)? {
        Some(Item::Int(i)) => Some(i as f64),
        Some(Item::Dec(d)) => Some(d),
        None => None,
        Some(_) => return Err(err("expected a number")),
    })
}

fn bools(v: Option<bool>) -> Coll<'static> {
    v.map(Item::Bool).into_iter().collect()
}

fn descendants<'a>(item: &Item<'a>, out: &mut Coll<'a>) {
    if let Item::Node(Value::Object(m), _) = item {
        for (k, v) in m {
            if k == "resourceType" {
                continue;
            }
            let children: Vec<&'a Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for c in children {
                // strings: an unknown string-based primitive (see `is_type`)
                let child = Item::Node(c, c.is_string().then(String::new));
                out.push(child.clone());
                descendants(&child, out);
            }
        }
    }
}

fn regex(p: &str) -> Result<regex::Regex, FhirPathError> {
    // whole-string semantics are the caller's; the pattern is used as given
    regex::Regex::new(p).map_err(|_| err("invalid regular expression"))
}

fn to_integer(i: &Item<'_>) -> Option<i64> {
    match i.prim() {
        Item::Int(n) => Some(n),
        Item::Bool(b) => Some(b as i64),
        Item::Str(s) => s.parse().ok(),
        _ => None,
    }
}

fn to_decimal(i: &Item<'_>) -> Option<f64> {
    match i.prim() {
        Item::Int(n) => Some(n as f64),
        Item::Dec(d) => Some(d),
        Item::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
        Item::Str(s) => s
            .parse()
            .ok()
            .filter(|_| s.chars().all(|c| c.is_ascii_digit() || "+-.".contains(c))),
        _ => None,
    }
}

fn to_bool_conv(i: &Item<'_>) -> Option<bool> {
    match i.prim() {
        Item::Bool(b) => Some(b),
        Item::Int(1) => Some(true),
        Item::Int(0) => Some(false),
        Item::Dec(1.0) => Some(true),
        Item::Dec(0.0) => Some(false),
        Item::Str(s) => match s.to_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(true),
            "false" | "f" | "no" | "n" | "0" | "0.0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn to_quantity<'a>(i: &Item<'a>) -> Option<Item<'a>> {
    match i.prim() {
        q @ Item::Quantity(..) => Some(q),
        Item::Int(n) => Some(Item::Quantity(n as f64, "1".into())),
        Item::Dec(d) => Some(Item::Quantity(d, "1".into())),
        Item::Str(s) => {
            let (num, unit) = match s.split_once(' ') {
                Some((n, u)) => (n, u.trim().trim_matches('\'').to_string()),
                None => (s.as_str(), "1".to_string()),
            };
            num.parse().ok().map(|v| Item::Quantity(v, unit))
        }
        _ => None,
    }
}

pub fn call<'a>(
    name: &str,
    input: &Coll<'a>,
    args: &[Expr],
    focus: &Coll<'a>,
    ctx: &Ctx<'a>,
) -> Result<Coll<'a>, FhirPathError> {
    // arguments that are not lambdas are evaluated against the focus the call was made in
    let outer = focus;
    Ok(match name {
        "empty" => vec![Item::Bool(input.is_empty())],
        "exists" => match args.first() {
            None => vec![Item::Bool(!input.is_empty())],
            Some(e) => {
                let mut any = false;
                for r in per_item(e, input, ctx)? {
                    if to_bool(&r)? == Some(true) {
                        any = true;
                        break;
                    }
                }
                vec![Item::Bool(any)]
            }
        },
        "all" => {
            let e = args.first().ok_or_else(|| err("all() needs a criterion"))?;
            let mut all = true;
            for r in per_item(e, input, ctx)? {
                if to_bool(&r)? != Some(true) {
                    all = false;
                    break;
                }
            }
            vec![Item::Bool(all)]
        }
        "allTrue" => vec![Item::Bool(input.iter().all(|i| matches!(i.prim(), Item::Bool(true))))],
        "anyTrue" => vec![Item::Bool(input.iter().any(|i| matches!(i.prim(), Item::Bool(true))))],
        "allFalse" => vec![Item::Bool(input.iter().all(|i| matches!(i.prim(), Item::Bool(false))))],
        "anyFalse" => vec![Item::Bool(input.iter().any(|i| matches!(i.prim(), Item::Bool(false))))],
        "subsetOf" | "supersetOf" => {
            let other = arg(args, 0, outer, ctx)?;
            let (small, big) = if name == "subsetOf" {
                (input, &other)
            } else {
                (&other, input)
            };
            vec![Item::Bool(
                small.iter().all(|i| big.iter().any(|j| equal(i, j) == Some(true))),
            )]
        }
        "count" => vec![Item::Int(input.len() as i64)],
        "distinct" => union(input.clone(), vec![]),
        "isDistinct" => vec![Item::Bool(union(input.clone(), vec![]).len() == input.len())],
        "where" => {
            let e = args.first().ok_or_else(|| err("where() needs a criterion"))?;
            let results = per_item(e, input, ctx)?;
            let mut out = Vec::new();
            for (item, r) in input.iter().zip(results) {
                if to_bool(&r)? == Some(true) {
                    out.push(item.clone());
                }
            }
            out
        }
        "select" => {
            let e = args.first().ok_or_else(|| err("select() needs a projection"))?;
            per_item(e, input, ctx)?.into_iter().flatten().collect()
        }
        "repeat" => {
            let e = args.first().ok_or_else(|| err("repeat() needs a projection"))?;
            let mut out: Coll<'a> = Vec::new();
            let mut frontier = input.clone();
            while !frontier.is_empty() {
                let next: Coll<'a> = per_item(e, &frontier, ctx)?.into_iter().flatten().collect();
                frontier = Vec::new();
                for n in next {
                    if !out.iter().any(|o| equal(o, &n) == Some(true)) {
                        out.push(n.clone());
                        frontier.push(n);
                    }
                }
            }
            out
        }
        "ofType" => {
            let ty = type_arg(args)?;
            input.iter().filter(|i| is_type(i, &ty)).cloned().collect()
        }
        "as" => {
            let ty = type_arg(args)?;
            input.iter().filter(|i| is_type(i, &ty)).cloned().collect()
        }
        "is" => {
            let ty = type_arg(args)?;
            match input.len() {
                0 => vec![],
                1 => vec![Item::Bool(is_type(&input[0], &ty))],
                _ => return Err(err("is() needs a single item")),
            }
        }
        "single" => match input.len() {
            0 | 1 => input.clone(),
            _ => return Err(err("single() on more than one item")),
        },
        "first" => input.first().cloned().into_iter().collect(),
        "last" => input.last().cloned().into_iter().collect(),
        "tail" => input.iter().skip(1).cloned().collect(),
        "skip" => {
            let n = int_arg(args, 0, outer, ctx)?.unwrap_or(0).max(0) as usize;
            input.iter().skip(n).cloned().collect()
        }
        "take" => {
            let n = int_arg(args, 0, outer, ctx)?.unwrap_or(0).max(0) as usize;
            input.iter().take(n).cloned().collect()
        }
        "intersect" => {
            let other = arg(args, 0, outer, ctx)?;
            let both: Coll<'a> = input
                .iter()
                .filter(|i| other.iter().any(|o| equal(i, o) == Some(true)))
                .cloned()
                .collect();
            union(both, vec![])
        }
        "exclude" => {
            let other = arg(args, 0, outer, ctx)?;
            input
                .iter()
                .filter(|i| !other.iter().any(|o| equal(i, o) == Some(true)))
                .cloned()
                .collect()
        }
        "union" => union(input.clone(), arg(args, 0, outer, ctx)?),
        "combine" => {
            let mut out = input.clone();
            out.extend(arg(args, 0, outer, ctx)?);
            out
        }
        "iif" => {
            if input.len() > 1 {
                return Err(err("iif() on more than one item"));
            }
            // the criterion and results see the input as $this (the focus when called bare)
            let sub = Ctx {
                resource: ctx.resource,
                root_resource: ctx.root_resource,
                this: input.first().cloned().or_else(|| ctx.this.clone()),
                index: ctx.index,
                total: ctx.total.clone(),
            };
            let cond = to_bool(&arg(args, 0, input, &sub)?)?;
            if cond == Some(true) {
                arg(args, 1, input, &sub)?
            } else if args.len() > 2 {
                arg(args, 2, input, &sub)?
            } else {
                vec![]
            }
        }
        "not" => bools(to_bool(input)?.map(|b| !b)),
        "toBoolean" | "toInteger" | "toDecimal" | "toString" | "toQuantity" | "convertsToBoolean"
        | "convertsToInteger" | "convertsToDecimal" | "convertsToString" | "convertsToQuantity" => {
            let target = name.trim_start_matches("convertsTo").trim_start_matches("to");
            let convert = |i: &Item<'a>| -> Option<Item<'a>> {
                match target {
                    "Boolean" => to_bool_conv(i).map(Item::Bool),
                    "Integer" => to_integer(i).map(Item::Int),
                    "Decimal" => to_decimal(i).map(Item::Dec),
                    "String" => to_text(i).map(Item::Str),
                    _ => to_quantity(i),
                }
            };
            match single(input)? {
                None => vec![],
                Some(i) if name.starts_with("convertsTo") => vec![Item::Bool(convert(&i).is_some())],
                Some(i) => convert(&i).into_iter().collect(),
            }
        }
        "toDate" | "toDateTime" | "toTime" | "convertsToDate" | "convertsToDateTime" | "convertsToTime" => {
            let Some(i) = single(input)? else { return Ok(vec![]) };
            let text = to_text(&i).unwrap_or_default();
            let ok = match name {
                "toDate" | "convertsToDate" => {
                    text.len() >= 4 && text.len() <= 10 && text.chars().all(|c| c.is_ascii_digit() || c == '-')
                }
                "toDateTime" | "convertsToDateTime" => {
                    text.len() >= 4 && text.as_bytes()[0].is_ascii_digit() && !text.starts_with('T')
                }
                _ => text.contains(':') || text.len() == 2,
            };
            match name {
                "toDate" if ok => vec![Item::Date(text)],
                "toDateTime" if ok => vec![Item::DateTime(text)],
                "toTime" if ok => vec![Item::Time(text)],
                n if n.starts_with("convertsTo") => vec![Item::Bool(ok)],
                _ => vec![],
            }
        }
        "indexOf" => {
            let (Some(s), Some(sub)) = (the_string(input)?, str_arg(args, 0, outer, ctx)?) else {
                return Ok(vec![]);
            };
            vec![Item::Int(
                s.find(&sub).map(|b| s[..b].chars().count() as i64).unwrap_or(-1),
            )]
        }
        "substring" => {
            let Some(s) = the_string(input)? else { return Ok(vec![]) };
            let Some(start) = int_arg(args, 0, outer, ctx)? else {
                return Ok(vec![]);
            };
            let chars: Vec<char> = s.chars().collect();
            if start < 0 || start as usize >= chars.len() {
                return Ok(vec![]);
            }
            let len = if args.len() > 1 {
                int_arg(args, 1, outer, ctx)?.unwrap_or(0).max(0) as usize
            } else {
                chars.len()
            };
            vec![Item::Str(chars.iter().skip(start as usize).take(len).collect())]
        }
        "startsWith" | "endsWith" | "contains" => {
            let (Some(s), Some(t)) = (the_string(input)?, str_arg(args, 0, outer, ctx)?) else {
                return Ok(vec![]);
            };
            vec![Item::Bool(match name {
                "startsWith" => s.starts_with(&t),
                "endsWith" => s.ends_with(&t),
                _ => s.contains(&t),
            })]
        }
        "upper" => the_string(input)?
            .map(|s| Item::Str(s.to_uppercase()))
            .into_iter()
            .collect(),
        "lower" => the_string(input)?
            .map(|s| Item::Str(s.to_lowercase()))
            .into_iter()
            .collect(),
        "trim" => the_string(input)?
            .map(|s| Item::Str(s.trim().to_string()))
            .into_iter()
            .collect(),
        "length" => the_string(input)?
            .map(|s| Item::Int(s.chars().count() as i64))
            .into_iter()
            .collect(),
        "toChars" => the_string(input)?
            .map(|s| s.chars().map(|c| Item::Str(c.to_string())).collect())
            .unwrap_or_default(),
        "replace" => {
            let (Some(s), Some(p), Some(r)) = (
                the_string(input)?,
                str_arg(args, 0, outer, ctx)?,
                str_arg(args, 1, outer, ctx)?,
            ) else {
                return Ok(vec![]);
            };
            if p.is_empty() {
                let mut out = r.clone();
                for c in s.chars() {
                    out.push(c);
                    out.push_str(&r);
                }
                vec![Item::Str(out)]
            } else {
                vec![Item::Str(s.replace(&p, &r))]
            }
        }
        "matches" => {
            let (Some(s), Some(p)) = (the_string(input)?, str_arg(args, 0, outer, ctx)?) else {
                return Ok(vec![]);
            };
            vec![Item::Bool(regex(&p)?.is_match(&s))]
        }
        "matchesFull" => {
            let (Some(s), Some(p)) = (the_string(input)?, str_arg(args, 0, outer, ctx)?) else {
                return Ok(vec![]);
            };
            vec![Item::Bool(regex(&format!("^(?:{p})$"))?.is_match(&s))]
        }
        "replaceMatches" => {
            let (Some(s), Some(p), Some(r)) = (
                the_string(input)?,
                str_arg(args, 0, outer, ctx)?,
                str_arg(args, 1, outer, ctx)?,
            ) else {
                return Ok(vec![]);
            };
            vec![Item::Str(regex(&p)?.replace_all(&s, r.as_str()).into_owned())]
        }
        "split" => {
            let (Some(s), Some(sep)) = (the_string(input)?, str_arg(args, 0, outer, ctx)?) else {
                return Ok(vec![]);
            };
            s.split(sep.as_str()).map(|p| Item::Str(p.to_string())).collect()
        }
        "join" => {
            let sep = if args.is_empty() {
                String::new()
            } else {
                str_arg(args, 0, outer, ctx)?.unwrap_or_default()
            };
            let parts: Vec<String> = input.iter().filter_map(to_text).collect();
            vec![Item::Str(parts.join(&sep))]
        }
        "abs" => match single(input)? {
            Some(Item::Int(i)) => vec![Item::Int(i.abs())],
            Some(Item::Dec(d)) => vec![Item::Dec(d.abs())],
            Some(Item::Quantity(q, u)) => vec![Item::Quantity(q.abs(), u)],
            None => vec![],
            _ => return Err(err("abs() needs a number")),
        },
        "ceiling" => the_number(input)?
            .map(|d| Item::Int(d.ceil() as i64))
            .into_iter()
            .collect(),
        "floor" => the_number(input)?
            .map(|d| Item::Int(d.floor() as i64))
            .into_iter()
            .collect(),
        "truncate" => the_number(input)?
            .map(|d| Item::Int(d.trunc() as i64))
            .into_iter()
            .collect(),
        "exp" => the_number(input)?.map(|d| Item::Dec(d.exp())).into_iter().collect(),
        "ln" => the_number(input)?.map(|d| Item::Dec(d.ln())).into_iter().collect(),
        "sqrt" => the_number(input)?
            .filter(|d| *d >= 0.0)
            .map(|d| Item::Dec(d.sqrt()))
            .into_iter()
            .collect(),
        "log" => {
            let (Some(x), Some(b)) = (the_number(input)?, the_number(&arg(args, 0, outer, ctx)?)?) else {
                return Ok(vec![]);
            };
            vec![Item::Dec(x.ln() / b.ln())]
        }
        "power" => {
            let base = single(input)?;
            let exp = single(&arg(args, 0, outer, ctx)?)?;
            match (base, exp) {
                (Some(Item::Int(b)), Some(Item::Int(e))) if e >= 0 => {
                    b.checked_pow(e as u32).map(Item::Int).into_iter().collect()
                }
                (Some(b), Some(e)) => {
                    let (Some(b), Some(e)) = (the_number(&vec![b])?, the_number(&vec![e])?) else {
                        return Ok(vec![]);
                    };
                    let r = b.powf(e);
                    if r.is_nan() {
                        vec![]
                    } else {
                        vec![Item::Dec(r)]
                    }
                }
                _ => vec![],
            }
        }
        "round" => {
            let Some(d) = the_number(input)? else { return Ok(vec![]) };
            let p = if args.is_empty() {
                0
            } else {
                int_arg(args, 0, outer, ctx)?.unwrap_or(0)
            };
            let f = 10f64.powi(p as i32);
            vec![Item::Dec((d * f).round() / f)]
        }
        "children" => {
            let mut out = Vec::new();
            for i in input {
                if let Item::Node(Value::Object(m), _) = i {
                    for (k, v) in m {
                        if k == "resourceType" {
                            continue;
                        }
                        match v {
                            Value::Array(a) => out.extend(a.iter().map(|x| Item::Node(x, None))),
                            other => out.push(Item::Node(other, None)),
                        }
                    }
                }
            }
            out
        }
        "descendants" => {
            let mut out = Vec::new();
            for i in input {
                descendants(i, &mut out);
            }
            out
        }
        "trace" => input.clone(),
        "hasValue" => vec![Item::Bool(
            input.len() == 1
                && matches!(
                    input[0],
                    Item::Node(Value::String(_) | Value::Number(_) | Value::Bool(_), _)
                ),
        )],
        "getValue" => input
            .iter()
            .filter(|i| matches!(i, Item::Node(Value::String(_) | Value::Number(_) | Value::Bool(_), _)))
            .map(Item::prim)
            .collect(),
        "extension" => {
            let Some(url) = str_arg(args, 0, outer, ctx)? else {
                return Ok(vec![]);
            };
            let mut out = Vec::new();
            for i in input {
                if let Item::Node(Value::Object(m), _) = i {
                    if let Some(Value::Array(exts)) = m.get("extension") {
                        for e in exts {
                            if e.get("url").and_then(Value::as_str) == Some(url.as_str()) {
                                out.push(Item::Node(e, Some("Extension".into())));
                            }
                        }
                    }
                }
            }
            out
        }
        "aggregate" => {
            let e = args.first().ok_or_else(|| err("aggregate() needs an aggregator"))?;
            let mut total: Coll<'a> = if args.len() > 1 {
                arg(args, 1, outer, ctx)?
            } else {
                vec![]
            };
            for (i, item) in input.iter().enumerate() {
                let sub = Ctx {
                    resource: ctx.resource,
                    root_resource: ctx.root_resource,
                    this: Some(item.clone()),
                    index: Some(i as i64),
                    total: Some(total.clone()),
                };
                total = eval(e, &vec![item.clone()], &sub)?;
            }
            total
        }
        "today" => vec![Item::Date(chrono::Utc::now().format("%Y-%m-%d").to_string())],
        "now" => vec![Item::DateTime(
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string(),
        )],
        "timeOfDay" => vec![Item::Time(chrono::Utc::now().format("%H:%M:%S%.3f").to_string())],
        // Without a resource store at hand, a reference resolves to itself typed as its target
        // (`Patient/1` is a Patient): enough for `resolve() is Patient` and `ofType(...)`, the
        // uses search parameters make of it; the target's own elements are not reachable.
        "resolve" => input
            .iter()
            .filter_map(|i| {
                let Item::Node(v, _) = i else { return None };
                let r = v.get("reference").and_then(Value::as_str).or_else(|| v.as_str())?;
                let r = r.split("/_history/").next().unwrap_or(r);
                let mut parts = r.rsplit('/');
                parts.next()?;
                let ty = parts.next()?;
                ty.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_uppercase())
                    .then(|| Item::Node(v, Some(ty.to_string())))
            })
            .collect(),
        "lowBoundary" | "highBoundary" | "precision" | "comparable" | "conformsTo" | "memberOf" | "encode"
        | "decode" | "escape" | "unescape" | "sort" => {
            return Err(err(format!("{name}() is not supported")));
        }
        _ => return Err(err(format!("unknown function {name}()"))),
    })
}
