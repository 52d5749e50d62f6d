//! FHIRPath for FHIR R4 over resources as `serde_json::Value`: what search-parameter
//! extraction, invariants and FHIRPath Patch evaluate. Compile once ([`FhirPath::compile`]),
//! evaluate many times ([`FhirPath::evaluate`]).
//!
//! The official FHIRPath R4 test suite runs in `tests/fhirpath.rs` and prints the pass rate.
//! Not yet: date/time arithmetic, UCUM unit conversion, `lowBoundary`/`highBoundary`/`precision`,
//! `memberOf()`, and model-based checks (unknown element names are empty, not errors).
//! `resolve()` types a reference as its target without fetching it.

mod eval;
mod functions;
mod parse;

pub use eval::Item;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FhirPathError {
    #[error("FHIRPath syntax: {0}")]
    Parse(String),
    #[error("FHIRPath evaluation: {0}")]
    Eval(String),
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct FhirPath {
    expr: parse::Expr,
    src: String,
}

impl FhirPath {
    pub fn compile(src: &str) -> Result<FhirPath, FhirPathError> {
        Ok(FhirPath {
            expr: parse::parse(src)?,
            src: src.to_string(),
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Evaluates against a resource (which is also `%resource` and `%context`).
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Result<Vec<Item<'a>>, FhirPathError> {
        let type_name = resource.get("resourceType").and_then(Value::as_str).map(str::to_string);
        self.evaluate_at(resource, type_name, resource)
    }
}

impl FhirPath {
    /// Evaluates against `node` (a part of `resource`, of FHIR type `type_name` if known), with
    /// `%resource` the whole: the components of a composite search parameter.
    pub fn evaluate_at<'a>(
        &self,
        node: &'a Value,
        type_name: Option<String>,
        resource: &'a Value,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        self.evaluate_in(node, type_name, resource, resource)
    }

    /// [`FhirPath::evaluate_at`] inside a contained resource: `%resource` is the contained
    /// resource, `%rootResource` the one holding it (an invariant's context).
    pub fn evaluate_in<'a>(
        &self,
        node: &'a Value,
        type_name: Option<String>,
        resource: &'a Value,
        root_resource: &'a Value,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        let root = Item::Node(node, type_name);
        let ctx = eval::Ctx {
            resource,
            root_resource,
            this: Some(root.clone()),
            index: None,
            total: None,
        };
        eval::eval(&self.expr, &vec![root], &ctx)
    }
}

/// A result item as plain JSON: primitives as their values, dates and times as text,
/// quantities as `value 'unit'`, nodes as they are.
pub fn to_json(item: &Item<'_>) -> Value {
    match item.prim() {
        Item::Bool(b) => Value::Bool(b),
        Item::Int(i) => Value::from(i),
        Item::Dec(d) => serde_json::Number::from_f64(d)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Item::Str(s) => Value::String(s),
        Item::Date(s) | Item::DateTime(s) => Value::String(s.trim_start_matches('@').to_string()),
        Item::Time(s) => Value::String(s.trim_start_matches('T').to_string()),
        q @ Item::Quantity(..) => Value::String(eval::to_text(&q).unwrap_or_default()),
        Item::Node(v, _) => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(expr: &str, resource: &Value) -> Vec<Value> {
        FhirPath::compile(expr)
            .unwrap()
            .evaluate(resource)
            .unwrap()
            .iter()
            .map(to_json)
            .collect()
    }

    #[test]
    fn odd_input_is_an_error_or_a_result_never_a_panic() {
        let r = json!({"resourceType": "Patient", "birthDate": "2020T", "name": [{"given": ["é", ""]}],
                       "deceasedDateTime": "T", "x": "-"});
        let exprs = [
            "",
            "(",
            ")",
            "@",
            "@T",
            "%",
            "%`",
            "'",
            "`",
            "1 '",
            "$",
            "a.",
            "a[",
            "a[0",
            "{",
            "{}",
            "1/0",
            "1 div 0",
            "birthDate < @2020",
            "birthDate = @T10",
            "deceased > @2020-01-01T",
            "x < @2020",
            "'' < @2020",
            "name.given.substring(-1)",
            "name.given.substring(5, -2)",
            "name.given.first().toChars()",
            "'a'.matches('(')",
            "name.given.indexOf('')",
            "'é'.substring(0, 1)",
            "1.power(9999999)",
            "(1 | 2).single()",
            "iif(1, 2)",
            "resolve()",
            "x.resolve()",
            "%vs-",
            "%ext-",
        ];
        for e in exprs {
            if let Ok(p) = FhirPath::compile(e) {
                let _ = p.evaluate(&r);
            }
        }
    }

    #[test]
    fn paths_choice_types_and_functions() {
        let p = json!({"resourceType": "Patient", "name": [{"use": "official", "given": ["A", "B"]}, {"given": ["C"]}],
                       "birthDate": "1974-12-25", "deceasedBoolean": false});
        assert_eq!(run("Patient.name.given", &p), vec![json!("A"), json!("B"), json!("C")]);
        assert_eq!(run("name.where(use = 'official').given.first()", &p), vec![json!("A")]);
        assert_eq!(run("deceased", &p), vec![json!(false)]);
        assert_eq!(run("birthDate < @2000-01-01", &p), vec![json!(true)]);
        assert_eq!(run("name.given.count() = 3 and name.exists()", &p), vec![json!(true)]);
        assert_eq!(run("(1 | 2 | 2).count()", &p), vec![json!(2)]);
        assert_eq!(run("'abc'.substring(1) + 'd'", &p), vec![json!("bcd")]);
        let o =
            json!({"resourceType": "Observation", "valueQuantity": {"value": 185, "unit": "lbs", "code": "[lb_av]"}});
        assert_eq!(run("Observation.value.ofType(Quantity).value", &o), vec![json!(185)]);
        assert_eq!(run("(value as Quantity).unit", &o), vec![json!("lbs")]);
    }
}
