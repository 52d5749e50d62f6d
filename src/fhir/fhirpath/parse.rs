//! FHIRPath (N1, with the FHIR R4 additions) lexer and parser: text to [`Expr`].
//!
//! Precedence, highest first (FHIRPath §"Operator precedence"): `.` and `[]`; unary `+ -`;
//! `* / div mod`; `+ - &`; `is as`; `|`; `< > <= >=`; `= ~ != !~`; `in contains`; `and`;
//! `xor or`; `implies`.

use super::FhirPathError;

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Empty,
    Bool(bool),
    Str(String),
    Int(i64),
    Dec(f64, u32),
    Date(String),
    DateTime(String),
    Time(String),
    Quantity(f64, u32, String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Literal),
    /// A name: a member of the focus, or a type name at the start of a path.
    Identifier(String),
    /// `%name`
    External(String),
    This,
    Index,
    Total,
    /// `base.name`
    Member(Box<Expr>, String),
    /// `base.name(args)` (base `None` for a function called on the focus)
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    Indexer(Box<Expr>, Box<Expr>),
    Unary(char, Box<Expr>),
    Binary(String, Box<Expr>, Box<Expr>),
    /// `is` / `as` with a type specifier
    TypeOp(String, Box<Expr>, String),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Delimited(String),
    Str(String),
    Num(String),
    DateTime(String),
    External(String),
    Special(String),
    Op(String),
    Unit(String),
}

fn err(msg: impl Into<String>) -> FhirPathError {
    FhirPathError::Parse(msg.into())
}

fn lex(src: &str) -> Result<Vec<Tok>, FhirPathError> {
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'*') {
            let mut j = i + 2;
            loop {
                if j + 1 >= chars.len() {
                    return Err(err("unterminated comment"));
                }
                if chars[j] == '*' && chars[j + 1] == '/' {
                    break;
                }
                j += 1;
            }
            i = j + 2;
            continue;
        }
        if c == '\'' || c == '`' {
            let quote = c;
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                let Some(&ch) = chars.get(j) else {
                    return Err(err("unterminated string"));
                };
                if ch == quote {
                    break;
                }
                if ch == '\\' {
                    j += 1;
                    let esc = *chars.get(j).ok_or_else(|| err("bad escape"))?;
                    match esc {
                        'n' => s.push('\n'),
                        't' => s.push('\t'),
                        'r' => s.push('\r'),
                        'f' => s.push('\u{c}'),
                        'u' => {
                            let hex: String = chars
                                .get(j + 1..j + 5)
                                .ok_or_else(|| err("bad escape"))?
                                .iter()
                                .collect();
                            let code = u32::from_str_radix(&hex, 16).map_err(|_| err("bad escape"))?;
                            s.push(char::from_u32(code).ok_or_else(|| err("bad escape"))?);
                            j += 4;
                        }
                        other => s.push(other),
                    }
                } else {
                    s.push(ch);
                }
                j += 1;
            }
            out.push(if quote == '\'' { Tok::Str(s) } else { Tok::Delimited(s) });
            i = j + 1;
            continue;
        }
        if c == '@' {
            let mut j = i + 1;
            while j < chars.len() {
                let ch = chars[j];
                // a '.' belongs to the literal only as the start of fractional seconds
                let fraction = ch == '.' && chars.get(j + 1).is_some_and(|d| d.is_ascii_digit());
                if ch.is_ascii_digit() || "-:+TZ".contains(ch) || fraction {
                    j += 1;
                } else {
                    break;
                }
            }
            out.push(Tok::DateTime(chars[i + 1..j].iter().collect()));
            i = j;
            continue;
        }
        if c.is_ascii_digit() {
            let mut j = i;
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
            }
            if j + 1 < chars.len() && chars[j] == '.' && chars[j + 1].is_ascii_digit() {
                j += 1;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
            }
            out.push(Tok::Num(chars[i..j].iter().collect()));
            i = j;
            // a quantity: a number followed by a unit string or a calendar word
            let mut k = j;
            while k < chars.len() && chars[k] == ' ' {
                k += 1;
            }
            if chars.get(k) == Some(&'\'') {
                let mut m = k + 1;
                while m < chars.len() && chars[m] != '\'' {
                    m += 1;
                }
                if m < chars.len() {
                    out.push(Tok::Unit(chars[k + 1..m].iter().collect()));
                    i = m + 1;
                }
            } else {
                let mut m = k;
                while m < chars.len() && chars[m].is_ascii_alphabetic() {
                    m += 1;
                }
                let word: String = chars[k..m].iter().collect();
                const UNITS: &[&str] = &[
                    "year",
                    "years",
                    "month",
                    "months",
                    "week",
                    "weeks",
                    "day",
                    "days",
                    "hour",
                    "hours",
                    "minute",
                    "minutes",
                    "second",
                    "seconds",
                    "millisecond",
                    "milliseconds",
                ];
                if k > j && UNITS.contains(&word.as_str()) {
                    out.push(Tok::Unit(word));
                    i = m;
                }
            }
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let mut j = i;
            while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            out.push(Tok::Ident(chars[i..j].iter().collect()));
            i = j;
            continue;
        }
        if c == '$' {
            let mut j = i + 1;
            while j < chars.len() && chars[j].is_alphanumeric() {
                j += 1;
            }
            out.push(Tok::Special(chars[i + 1..j].iter().collect()));
            i = j;
            continue;
        }
        if c == '%' {
            if chars.get(i + 1) == Some(&'`') || chars.get(i + 1) == Some(&'\'') {
                let quote = chars[i + 1];
                let mut j = i + 2;
                while j < chars.len() && chars[j] != quote {
                    j += 1;
                }
                out.push(Tok::External(chars[i + 2..j.min(chars.len())].iter().collect()));
                i = j + 1;
            } else {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_' || chars[j] == '-') {
                    j += 1;
                }
                out.push(Tok::External(chars[i + 1..j].iter().collect()));
                i = j;
            }
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        if ["<=", ">=", "!=", "!~"].contains(&two.as_str()) {
            out.push(Tok::Op(two));
            i += 2;
            continue;
        }
        if "+-*/=~<>&|.,()[]{}".contains(c) {
            out.push(Tok::Op(c.to_string()));
            i += 1;
            continue;
        }
        return Err(err(format!("unexpected character {c:?}")));
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

fn binding_power(op: &str) -> Option<u8> {
    Some(match op {
        "implies" => 1,
        "or" | "xor" => 2,
        "and" => 3,
        "in" | "contains" => 4,
        "=" | "~" | "!=" | "!~" => 5,
        "<" | ">" | "<=" | ">=" => 6,
        "|" => 7,
        "is" | "as" => 8,
        "+" | "-" | "&" => 9,
        "*" | "/" | "div" | "mod" => 10,
        _ => return None,
    })
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect_op(&mut self, op: &str) -> Result<(), FhirPathError> {
        match self.next() {
            Some(Tok::Op(o)) if o == op => Ok(()),
            _ => Err(err(format!("expected {op}"))),
        }
    }

    fn peek_binary(&self) -> Option<String> {
        match self.peek()? {
            Tok::Op(o) if binding_power(o).is_some() => Some(o.clone()),
            Tok::Ident(w) if binding_power(w).is_some() => Some(w.clone()),
            _ => None,
        }
    }

    fn expr(&mut self, min: u8) -> Result<Expr, FhirPathError> {
        let mut lhs = self.unary()?;
        while let Some(op) = self.peek_binary() {
            let bp = binding_power(&op).unwrap_or(0);
            if bp < min {
                break;
            }
            self.pos += 1;
            if op == "is" || op == "as" {
                let ty = self.type_specifier()?;
                lhs = Expr::TypeOp(op, Box::new(lhs), ty);
                continue;
            }
            let rhs = self.expr(bp + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn type_specifier(&mut self) -> Result<String, FhirPathError> {
        let mut name = match self.next() {
            Some(Tok::Ident(n)) | Some(Tok::Delimited(n)) => n,
            _ => return Err(err("expected a type name")),
        };
        while matches!(self.peek(), Some(Tok::Op(o)) if o == ".") {
            self.pos += 1;
            match self.next() {
                Some(Tok::Ident(n)) | Some(Tok::Delimited(n)) => {
                    name.push('.');
                    name.push_str(&n);
                }
                _ => return Err(err("expected a type name")),
            }
        }
        Ok(name)
    }

    fn unary(&mut self) -> Result<Expr, FhirPathError> {
        match self.peek() {
            Some(Tok::Op(o)) if o == "-" || o == "+" => {
                let sign = if o == "-" { '-' } else { '+' };
                self.pos += 1;
                let inner = self.unary()?;
                Ok(Expr::Unary(sign, Box::new(inner)))
            }
            _ => self.postfix(),
        }
    }

    fn postfix(&mut self) -> Result<Expr, FhirPathError> {
        let mut e = self.term()?;
        loop {
            match self.peek() {
                Some(Tok::Op(o)) if o == "." => {
                    self.pos += 1;
                    let name = match self.next() {
                        Some(Tok::Ident(n)) | Some(Tok::Delimited(n)) => n,
                        _ => return Err(err("expected a name after '.'")),
                    };
                    if matches!(self.peek(), Some(Tok::Op(o)) if o == "(") {
                        let args = self.args()?;
                        e = Expr::Call(Some(Box::new(e)), name, args);
                    } else {
                        e = Expr::Member(Box::new(e), name);
                    }
                }
                Some(Tok::Op(o)) if o == "[" => {
                    self.pos += 1;
                    let idx = self.expr(0)?;
                    self.expect_op("]")?;
                    e = Expr::Indexer(Box::new(e), Box::new(idx));
                }
                _ => return Ok(e),
            }
        }
    }

    fn args(&mut self) -> Result<Vec<Expr>, FhirPathError> {
        self.expect_op("(")?;
        let mut args = Vec::new();
        if matches!(self.peek(), Some(Tok::Op(o)) if o == ")") {
            self.pos += 1;
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            match self.next() {
                Some(Tok::Op(o)) if o == "," => continue,
                Some(Tok::Op(o)) if o == ")" => return Ok(args),
                _ => return Err(err("expected ',' or ')'")),
            }
        }
    }

    fn term(&mut self) -> Result<Expr, FhirPathError> {
        match self.next().ok_or_else(|| err("unexpected end of expression"))? {
            Tok::Op(o) if o == "(" => {
                let e = self.expr(0)?;
                self.expect_op(")")?;
                Ok(e)
            }
            Tok::Op(o) if o == "{" => {
                self.expect_op("}")?;
                Ok(Expr::Literal(Literal::Empty))
            }
            Tok::Str(s) => Ok(Expr::Literal(Literal::Str(s))),
            Tok::Num(n) => {
                let unit = match self.peek() {
                    Some(Tok::Unit(u)) => {
                        let u = u.clone();
                        self.pos += 1;
                        Some(u)
                    }
                    _ => None,
                };
                let precision = n.split_once('.').map(|(_, f)| f.len() as u32).unwrap_or(0);
                let value: f64 = n.parse().map_err(|_| err("bad number"))?;
                match unit {
                    Some(u) => Ok(Expr::Literal(Literal::Quantity(value, precision, u))),
                    None if n.contains('.') => Ok(Expr::Literal(Literal::Dec(value, precision))),
                    None => n
                        .parse()
                        .map(|i| Expr::Literal(Literal::Int(i)))
                        .map_err(|_| err("integer out of range")),
                }
            }
            Tok::DateTime(d) => Ok(Expr::Literal(if let Some(t) = d.strip_prefix('T') {
                Literal::Time(t.to_string())
            } else if d.contains('T') {
                Literal::DateTime(d)
            } else {
                Literal::Date(d)
            })),
            Tok::Special(s) => match s.as_str() {
                "this" => Ok(Expr::This),
                "index" => Ok(Expr::Index),
                "total" => Ok(Expr::Total),
                _ => Err(err("unknown $ variable")),
            },
            Tok::External(n) => Ok(Expr::External(n)),
            Tok::Ident(n) if n == "true" => Ok(Expr::Literal(Literal::Bool(true))),
            Tok::Ident(n) if n == "false" => Ok(Expr::Literal(Literal::Bool(false))),
            Tok::Ident(n) | Tok::Delimited(n) => {
                if matches!(self.peek(), Some(Tok::Op(o)) if o == "(") {
                    let args = self.args()?;
                    Ok(Expr::Call(None, n, args))
                } else {
                    Ok(Expr::Identifier(n))
                }
            }
            other => Err(err(format!("unexpected {other:?}"))),
        }
    }
}

pub fn parse(src: &str) -> Result<Expr, FhirPathError> {
    let toks = lex(src)?;
    let mut p = Parser { toks, pos: 0 };
    let e = p.expr(0)?;
    if p.pos < p.toks.len() {
        return Err(err("unexpected text after the expression"));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_functions_and_precedence() {
        assert!(matches!(parse("Patient.name.given").unwrap(), Expr::Member(..)));
        assert!(matches!(parse("name.where(use = 'official')").unwrap(), Expr::Call(..)));
        match parse("1 + 2 * 3").unwrap() {
            Expr::Binary(op, _, rhs) => {
                assert_eq!(op, "+");
                assert!(matches!(*rhs, Expr::Binary(ref m, ..) if m == "*"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse("value as Quantity").unwrap(), Expr::TypeOp(..)));
        assert!(matches!(parse("4 'mg'").unwrap(), Expr::Literal(Literal::Quantity(..))));
        assert!(matches!(
            parse("@2015-02-04T14:34:28Z").unwrap(),
            Expr::Literal(Literal::DateTime(_))
        ));
        assert!(parse("2 + 2 /").is_err());
        assert!(parse("2 + 2 /* open").is_err());
    }
}
