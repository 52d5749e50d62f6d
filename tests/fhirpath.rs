//! The official FHIRPath R4 test suite (HL7's fhirpath.js test data, `../shared/testdata/fhirpath-r4`,
//! 935 cases) against our evaluator. Prints the pass rate and the failures by group; fails if
//! the pass rate drops below the recorded floor (raise it as the evaluator grows).

use fhirvault::fhir::fhirpath::{to_json, FhirPath};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The pass rate this evaluator has reached; a change that lowers it fails the test.
const FLOOR: f64 = 0.83;

fn suite_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/fhirpath-r4")
}

struct Case {
    group: String,
    desc: String,
    input: Option<String>,
    expression: String,
    result: Option<Vec<serde_yaml::Value>>,
    error: bool,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(suite_dir().join("cases/fhir-r4.yaml")).expect("the FHIRPath suite");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    fn walk(v: &serde_yaml::Value, group: &str, out: &mut Vec<Case>) {
        match v {
            serde_yaml::Value::Sequence(items) => {
                for i in items {
                    walk(i, group, out);
                }
            }
            serde_yaml::Value::Mapping(m) => {
                if let Some(expr) = m.get("expression").and_then(|e| e.as_str()) {
                    if m.get("disable").and_then(|d| d.as_bool()) == Some(true) {
                        return;
                    }
                    out.push(Case {
                        group: group.to_string(),
                        desc: m.get("desc").and_then(|d| d.as_str()).unwrap_or("").to_string(),
                        input: m.get("inputfile").and_then(|d| d.as_str()).map(str::to_string),
                        expression: expr.to_string(),
                        result: m.get("result").and_then(|r| r.as_sequence()).cloned(),
                        error: m.get("error").and_then(|e| e.as_bool()) == Some(true),
                    });
                    return;
                }
                for (k, v) in m {
                    let name = k.as_str().unwrap_or(group).trim_start_matches("group: ").to_string();
                    walk(v, &name, out);
                }
            }
            _ => {}
        }
    }
    walk(&doc["tests"], "", &mut out);
    out
}

fn expected(v: &serde_yaml::Value) -> Value {
    match v {
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::from(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_yaml::Value::String(s) => Value::String(s.clone()),
        _ => Value::Null,
    }
}

fn same(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            (a.as_f64().unwrap_or(f64::NAN) - b.as_f64().unwrap_or(0.0)).abs() < 1e-9
        }
        (Value::String(a), Value::String(b)) => a == b || a.trim_start_matches('@') == b.trim_start_matches('@'),
        _ => got == want,
    }
}

#[test]
fn official_fhirpath_r4_suite() {
    let cases = cases();
    assert!(cases.len() > 850, "the suite has {} enabled cases", cases.len());
    let mut inputs: BTreeMap<String, Value> = BTreeMap::new();
    let mut passed = 0usize;
    let mut failed_by_group: BTreeMap<String, usize> = BTreeMap::new();
    let mut examples = Vec::new();
    for c in &cases {
        let resource = match &c.input {
            Some(f) => inputs
                .entry(f.clone())
                .or_insert_with(|| {
                    let text = std::fs::read_to_string(suite_dir().join("resources/r4").join(f)).unwrap();
                    serde_json::from_str(&text).unwrap()
                })
                .clone(),
            None => Value::Object(Default::default()),
        };
        let outcome = FhirPath::compile(&c.expression).and_then(|p| {
            p.evaluate(&resource)
                .map(|items| items.iter().map(to_json).collect::<Vec<Value>>())
        });
        let ok = match (&outcome, c.error, &c.result) {
            (Err(_), true, _) => true,
            (Ok(_), true, _) => false,
            (Err(_), false, _) => false,
            (Ok(got), false, Some(want)) => {
                got.len() == want.len() && got.iter().zip(want.iter()).all(|(g, w)| same(g, &expected(w)))
            }
            (Ok(got), false, None) => got.is_empty(),
        };
        if ok {
            passed += 1;
        } else {
            *failed_by_group.entry(c.group.clone()).or_default() += 1;
            if examples.len() < 40 {
                examples.push(format!(
                    "{} | {} | {:?}",
                    c.desc,
                    c.expression,
                    outcome.map_err(|e| e.to_string())
                ));
            }
        }
    }
    let rate = passed as f64 / cases.len() as f64;
    println!(
        "FHIRPath R4 suite: {passed} of {} passed ({:.1}%)",
        cases.len(),
        rate * 100.0
    );
    for (group, n) in &failed_by_group {
        println!("  failing in {group}: {n}");
    }
    for e in &examples {
        println!("  e.g. {e}");
    }
    assert!(rate >= FLOOR, "pass rate {rate:.3} fell below the floor {FLOOR}");
}

/// Every search parameter of every type evaluates on that type's official example without an
/// error, and the examples yield index values for most parameters they populate.
#[test]
fn every_search_parameter_extracts_from_the_official_examples() {
    let registry = fhirvault::search::Registry::r4().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/r4-examples");
    let mut evaluated = 0usize;
    let mut with_values = 0usize;
    let mut errors = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let resource: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let t = resource["resourceType"].as_str().unwrap().to_string();
        for param in registry.params(&t) {
            evaluated += 1;
            match fhirvault::search::extract(param, &resource) {
                Ok(values) if !values.is_empty() => with_values += 1,
                Ok(_) => {}
                Err(e) => errors.push(format!("{t}.{}: {e}", param.code)),
            }
        }
    }
    println!(
        "search extraction: {evaluated} parameter evaluations, {with_values} with values, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(with_values > 500, "{with_values}");
}
