//! The official FHIR patch test cases (tests/data/patch, from FHIR/fhir-test-cases r4/patch):
//! every FHIRPath Patch case and every JSON Patch case, through the server's patch engine.

use fhirvault::fhir::patch::Patch;
use fhirvault::fhir::validate::Validator;
use serde_json::Value;

fn cases(file: &str) -> Vec<Value> {
    let path = format!("{}/tests/data/patch/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn official_fhirpath_patch_cases() {
    let model = Validator::r4().unwrap();
    let all = cases("fhir-patch-tests.json");
    let mut failed = Vec::new();
    for c in &all {
        let name = c["name"].as_str().unwrap();
        let Value::Object(diff) = &c["diff"] else {
            panic!("{name}")
        };
        let mut doc = c["input"].clone();
        let result = Patch::fhirpath(diff).and_then(|p| p.apply(&mut doc, &model));
        let ok = match (&c["output"], result) {
            (Value::Null, Err(_)) => true,
            (Value::Null, Ok(())) => false,
            (expected, Ok(())) => *expected == doc,
            (_, Err(_)) => false,
        };
        if !ok {
            failed.push(name.to_string());
        }
    }
    println!(
        "FHIRPath Patch: {} of {} official cases pass",
        all.len() - failed.len(),
        all.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn official_json_patch_cases() {
    let model = Validator::r4().unwrap();
    let all = cases("json-patch-tests.json");
    let mut failed = Vec::new();
    for c in &all {
        let name = c["comment"].as_str().unwrap_or("?").to_string();
        if c["disabled"] == true {
            continue;
        }
        let mut doc = c["doc"].clone();
        let result = Patch::json(c["patch"].clone()).and_then(|p| p.apply(&mut doc, &model));
        let ok = match (c.get("expected"), c.get("error"), result) {
            (Some(expected), _, Ok(())) => *expected == doc,
            (None, Some(_), Err(_)) => true,
            // neither expected nor error: the document is unchanged
            (None, None, Ok(())) => doc == c["doc"],
            _ => false,
        };
        if !ok {
            failed.push(name);
        }
    }
    println!(
        "JSON Patch: {} of {} official cases pass",
        all.len() - failed.len(),
        all.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
}
