//! `$validate` (issue 8): the official R4 examples validate without errors; broken copies of
//! them fail naming the element; modes; US Core profiles (`profile`, `meta.profile`); and the
//! switch that makes create and update refuse resources failing their declared profiles. Each
//! on SQLite and on PostgreSQL.

mod common;

use common::{Db, Reply, TestServer};
use fhirvault::config::ConfigLayer;
use serde_json::{json, Value};

const US_CORE_PATIENT: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";

fn with_profiles(on_write: bool) -> ConfigLayer {
    ConfigLayer {
        profile_dir: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles")),
        validate_profiles_on_write: Some(on_write),
        ..Default::default()
    }
}

fn validate(s: &TestServer, path: &str, body: &Value) -> Value {
    let r = s.post(path, body);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let oo = r.outcome();
    assert!(!oo["issue"].as_array().unwrap().is_empty());
    oo
}

/// The error issues of an outcome, as (expression, diagnostics).
fn errors(oo: &Value) -> Vec<(String, String)> {
    oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["severity"] == "error" || i["severity"] == "fatal")
        .map(|i| {
            (
                i["expression"][0].as_str().unwrap_or("").to_string(),
                i["diagnostics"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn us_core(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/us-core")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The top-level elements R4 requires of a type (min ≥ 1), from the definitions the server
/// validates with.
fn required_elements() -> std::collections::HashMap<String, Vec<String>> {
    let rules: Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir-schemas/structure-rules.json"))
            .unwrap(),
    )
    .unwrap();
    let mut out = std::collections::HashMap::new();
    for sd in rules["structures"].as_array().unwrap() {
        let t = sd["type"].as_str().unwrap().to_string();
        let req: Vec<String> = sd["snapshot"]["element"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["min"].as_u64().unwrap_or(0) >= 1)
            .filter_map(|e| {
                let id = e["id"].as_str()?;
                let rest = id.strip_prefix(&format!("{t}."))?;
                (!rest.contains('.')).then(|| rest.to_string())
            })
            .collect();
        out.insert(t, req);
    }
    out
}

fn official_examples_and_broken_copies(db: Db) {
    let s = TestServer::start(db);
    let required = required_elements();
    let (mut checked, mut broken) = (0, 0);
    for (name, example) in common::r4_examples() {
        let t = example["resourceType"].as_str().unwrap().to_string();
        if t == "AuditEvent" {
            continue;
        }
        let oo = validate(&s, &format!("/{t}/$validate"), &example);
        assert!(errors(&oo).is_empty(), "{name}: {:?}", errors(&oo));
        checked += 1;
        // a copy without an element R4 requires fails, naming it
        let present = required
            .get(&t)
            .into_iter()
            .flatten()
            .find(|e| {
                let key = e.trim_end_matches("[x]");
                example
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|k| k == key || (e.ends_with("[x]") && k.starts_with(key)))
            })
            .cloned();
        if let Some(element) = present {
            let key = element.trim_end_matches("[x]");
            let mut copy = example.clone();
            copy.as_object_mut()
                .unwrap()
                .retain(|k, _| !(k == key || (element.ends_with("[x]") && k.starts_with(key))));
            let e = errors(&validate(&s, &format!("/{t}/$validate"), &copy));
            assert!(
                e.iter().any(|(at, _)| *at == format!("{t}.{key}")),
                "{name} without {key}: {e:?}"
            );
            broken += 1;
        }
    }
    assert!(checked >= 130, "{checked}");
    assert!(broken >= 60, "{broken}");

    // deeper breaks, each located
    let e = errors(&validate(
        &s,
        "/Patient/$validate",
        &json!({"resourceType": "Patient", "link": [{"type": "seealso"}]}),
    ));
    assert_eq!(
        e.iter().map(|(at, _)| at.as_str()).collect::<Vec<_>>(),
        ["Patient.link[0].other"]
    );
    let e = errors(&validate(
        &s,
        "/Patient/$validate",
        &json!({"resourceType": "Patient", "contact": [{"gender": "male"}]}),
    ));
    assert!(
        e.iter()
            .any(|(at, d)| at == "Patient.contact[0]" && d.starts_with("pat-1")),
        "{e:?}"
    );
    // the JSON Schema's findings come through too
    let e = errors(&validate(
        &s,
        "/Patient/$validate",
        &json!({"resourceType": "Patient", "gender": 12}),
    ));
    assert!(!e.is_empty());
    // a Parameters body with a mode
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": {"resourceType": "Observation", "code": {"text": "x"}}},
        {"name": "mode", "valueCode": "create"}]});
    let e = errors(&validate(&s, "/Observation/$validate", &params));
    assert!(e.iter().any(|(at, _)| at == "Observation.status"), "{e:?}");
    // a valid resource: warnings (dom-6: no narrative) and an information issue, no error
    let oo = validate(&s, "/Patient/$validate", &json!({"resourceType": "Patient"}));
    let issues = oo["issue"].as_array().unwrap();
    assert!(issues
        .iter()
        .any(|i| i["severity"] == "warning" && i["diagnostics"].as_str().unwrap().starts_with("dom-6")));
    assert_eq!(issues.last().unwrap()["severity"], "information");
    assert!(errors(&oo).is_empty());
    // wrong type, bad mode
    assert_eq!(
        s.post("/Patient/$validate", &json!({"resourceType": "Observation"}))
            .status,
        400
    );
    assert_eq!(
        s.post("/Patient/$validate?mode=replace", &json!({"resourceType": "Patient"}))
            .status,
        400
    );
}

fn modes_and_stored_resources(db: Db) {
    let s = TestServer::start(db);
    let id = s
        .post("/Patient", &json!({"resourceType": "Patient", "gender": "female"}))
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // update: the id must be the URL's
    let e = errors(&validate(
        &s,
        &format!("/Patient/{id}/$validate?mode=update"),
        &json!({"resourceType": "Patient", "id": "other"}),
    ));
    assert!(e.iter().any(|(at, _)| at == "id"), "{e:?}");
    let e = errors(&validate(
        &s,
        &format!("/Patient/{id}/$validate?mode=update"),
        &json!({"resourceType": "Patient", "id": id}),
    ));
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(
        s.post("/Patient/$validate?mode=update", &json!({"resourceType": "Patient"}))
            .status,
        400
    );
    // delete: the resource must exist
    let r = s.post(&format!("/Patient/{id}/$validate?mode=delete"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.post("/Patient/nope/$validate?mode=delete", &json!({})).status, 404);
    // the stored resource
    let r = s.get(&format!("/Patient/{id}/$validate"));
    assert_eq!(r.status, 200);
    assert!(errors(&r.outcome()).is_empty());
    // a stored resource is validated only if the token may read it: a patient's token sees its
    // own record, and another patient's is absent, whatever else the token may do
    let other_id = s.post("/Patient", &json!({"resourceType": "Patient"})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for scope in ["patient/Patient.rs", "system/Patient.c patient/Patient.rs"] {
        let t = s.token(scope, Some(&id));
        let get = |path: &str| {
            Reply::from(
                reqwest::blocking::Client::new()
                    .get(s.url(path))
                    .bearer_auth(&t)
                    .send()
                    .unwrap(),
            )
        };
        assert_eq!(get(&format!("/Patient/{id}/$validate")).status, 200, "{scope}");
        assert_eq!(get(&format!("/Patient/{other_id}/$validate")).status, 404, "{scope}");
    }
    // a token without any scope on the type gets 403
    let other = s.token("system/Observation.cruds", None);
    let r = Reply::from(
        reqwest::blocking::Client::new()
            .post(s.url("/Patient/$validate"))
            .bearer_auth(other)
            .header("content-type", "application/fhir+json")
            .body(r#"{"resourceType":"Patient"}"#)
            .send()
            .unwrap(),
    );
    assert_eq!(r.status, 403);
}

fn us_core_profiles(db: Db) {
    let s = TestServer::start_with(db, with_profiles(false));
    let patient = us_core("Patient-example.json");
    assert!(errors(&validate(&s, "/Patient/$validate", &patient)).is_empty());
    // US Core requires an identifier (R4 does not)
    let mut no_id = patient.clone();
    no_id.as_object_mut().unwrap().remove("identifier");
    let e = errors(&validate(&s, "/Patient/$validate", &no_id));
    assert!(e.iter().any(|(at, _)| at == "Patient.identifier"), "{e:?}");
    // the same resource without meta.profile is valid R4, and invalid against `profile=`
    no_id.as_object_mut().unwrap().remove("meta");
    assert!(errors(&validate(&s, "/Patient/$validate", &no_id)).is_empty());
    let e = errors(&validate(
        &s,
        &format!("/Patient/$validate?profile={US_CORE_PATIENT}"),
        &no_id,
    ));
    assert!(e.iter().any(|(at, _)| at == "Patient.identifier"), "{e:?}");
    // blood pressure: the vital-signs category slice and the systolic/diastolic components
    let bp = us_core("Observation-blood-pressure.json");
    assert!(errors(&validate(&s, "/Observation/$validate", &bp)).is_empty());
    let mut no_category = bp.clone();
    no_category["category"] = json!([{"text": "something else"}]);
    let e = errors(&validate(&s, "/Observation/$validate", &no_category));
    assert!(
        e.iter()
            .any(|(at, d)| at == "Observation.category" && d.contains("VSCat")),
        "{e:?}"
    );
    let mut one_component = bp.clone();
    one_component["component"].as_array_mut().unwrap().truncate(1);
    let e = errors(&validate(&s, "/Observation/$validate", &one_component));
    assert!(
        e.iter()
            .any(|(at, d)| at == "Observation.component" && d.contains("diastolic")),
        "{e:?}"
    );
    // an unknown profile is a warning, not an error
    let oo = validate(
        &s,
        "/Patient/$validate?profile=http://example.org/nope",
        &json!({"resourceType": "Patient"}),
    );
    assert!(oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["severity"] == "warning"));
    assert!(errors(&oo).is_empty());
    // the CapabilityStatement lists $validate and the loaded profiles
    let cs = s.get("/metadata").json();
    let res = common::capability_of(&cs, "Patient");
    assert!(res["operation"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["name"] == "validate"));
    assert!(res["supportedProfile"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == US_CORE_PATIENT));
    // with the switch off, writes are not held to their profiles
    let mut declared = us_core("Patient-example.json");
    declared.as_object_mut().unwrap().remove("identifier");
    declared.as_object_mut().unwrap().remove("id");
    assert_eq!(s.post("/Patient", &declared).status, 201);
}

fn writes_held_to_declared_profiles(db: Db) {
    let s = TestServer::start_with(db, with_profiles(true));
    let mut patient = us_core("Patient-example.json");
    patient.as_object_mut().unwrap().remove("id");
    let r = s.post("/Patient", &patient);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    // without its identifier it fails the profile it declares: 422, naming the element
    let mut broken = patient.clone();
    broken.as_object_mut().unwrap().remove("identifier");
    let r = s.post("/Patient", &broken);
    assert_eq!(r.status, 422, "{}", r.text());
    let e = errors(&r.outcome());
    assert!(e.iter().any(|(at, _)| at == "Patient.identifier"), "{e:?}");
    // an update too, and nothing changes
    broken["id"] = json!(id);
    assert_eq!(s.put(&format!("/Patient/{id}"), &broken).status, 422);
    assert!(s.get(&format!("/Patient/{id}")).json()["identifier"].is_array());
    // a resource declaring no profile (or one the server does not know) is not held to one
    broken.as_object_mut().unwrap().remove("meta");
    assert_eq!(s.put(&format!("/Patient/{id}"), &broken).status, 200);
    broken["meta"] = json!({"profile": ["http://example.org/unknown"]});
    assert_eq!(s.put(&format!("/Patient/{id}"), &broken).status, 200);
}

/// Issue 23: `Prefer: handling=lenient` on writes drops elements R4 does not know, with a warning
/// per element; strict stays the default; nothing else is forgiven.
fn lenient_writes(db: Db) {
    let s = TestServer::start(db);
    let lenient = [("Prefer", "handling=lenient")];
    let with_outcome = [("Prefer", "handling=lenient, return=OperationOutcome")];
    // the defect of a US Core example served by a public test server: Period has no `stop`
    let observation = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "glucose"}, "effectivePeriod": {"start": "2024-01-01", "stop": "SECRET-2024"}});
    let r = s.post("/Observation", &observation);
    assert_eq!(r.status, 400, "strict is the default: {}", r.text());
    assert!(errors(&r.outcome())
        .iter()
        .any(|(at, _)| at == "Observation.effectivePeriod.stop"));
    let r = s.send("POST", "/Observation", Some(&observation), &lenient);
    assert_eq!(r.status, 201, "{}", r.text());
    let stored = r.json();
    assert_eq!(stored["effectivePeriod"], json!({"start": "2024-01-01"}));
    let id = stored["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.get(&format!("/Observation/{id}")).json()["effectivePeriod"],
        json!({"start": "2024-01-01"})
    );
    // the warnings, with return=OperationOutcome: each element by path, never its value
    let r = s.send("POST", "/Observation", Some(&observation), &with_outcome);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!r.text().contains("SECRET"));
    let warnings: Vec<Value> = r.outcome()["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["severity"] == "warning")
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["expression"][0], "Observation.effectivePeriod.stop");
    // update and conditional update alike
    let mut updated = observation.clone();
    updated["id"] = json!(id);
    assert_eq!(s.put(&format!("/Observation/{id}"), &updated).status, 400);
    let r = s.send("PUT", &format!("/Observation/{id}"), Some(&updated), &with_outcome);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.outcome()["issue"][1]["expression"][0],
        "Observation.effectivePeriod.stop"
    );
    let r = s.send("PUT", &format!("/Observation?_id={id}"), Some(&updated), &lenient);
    assert_eq!(r.status, 200, "{}", r.text());
    // lenient forgives unknown elements only: a wrong value is still refused, and nothing stored
    let mut wrong = observation.clone();
    wrong["status"] = json!("not-a-status");
    assert_eq!(s.send("POST", "/Observation", Some(&wrong), &lenient).status, 400);

    // a transaction: strict refuses it whole; lenient stores it, each entry's outcome says what went
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Lenient", "nickname": "SECRET"}]});
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:8d2c5a8e-0000-4000-8000-000000000001", "resource": patient,
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "urn:uuid:8d2c5a8e-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": observation, "request": {"method": "POST", "url": "Observation"}}]});
    let count = |s: &TestServer| {
        let r = s.get("/Patient?family=Lenient");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["entry"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(s.post("/", &bundle).status, 400);
    assert_eq!(count(&s), 0, "nothing of a refused transaction is stored");
    let r = s.send("POST", "/", Some(&bundle), &lenient);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains("SECRET"));
    let entries = r.json()["entry"].as_array().unwrap().clone();
    assert_eq!(
        entries[0]["response"]["outcome"]["issue"][0]["expression"][0],
        "Patient.name[0].nickname"
    );
    assert_eq!(entries[0]["response"]["outcome"]["issue"][0]["severity"], "warning");
    assert!(entries[1]["response"].get("outcome").is_none());
    assert_eq!(
        entries[2]["response"]["outcome"]["issue"][0]["expression"][0],
        "Observation.effectivePeriod.stop"
    );
    assert_eq!(count(&s), 1);
    // a batch: each entry on its own
    let mut batch = bundle.clone();
    batch["type"] = json!("batch");
    batch["entry"][1]["resource"]["status"] = json!("not-a-status");
    let r = s.send("POST", "/", Some(&batch), &lenient);
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses = r.entry_statuses();
    assert_eq!(statuses, ["201", "400", "201"]);
}

/// An implementation guide's server CapabilityStatement under `profile_dir` is declared in
/// `instantiates` only when everything it requires is there: US Core 6.1's is not yet (its
/// `$docref` operation is missing); a requirements statement the server covers is.
fn guide_capabilities_are_instantiated_only_when_covered(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let covered = json!({"resourceType": "CapabilityStatement", "url": "http://example.org/cs/covered",
        "status": "active", "kind": "requirements", "date": "2024-01-01", "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": [{"type": "Patient",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [{"name": "family", "type": "string"}, {"name": "race", "type": "token"}],
            "searchRevInclude": ["Provenance:target"]}]}]});
    let mut uncovered = covered.clone();
    uncovered["url"] = json!("http://example.org/cs/uncovered");
    uncovered["rest"][0]["resource"][0]["operation"] = json!([{"name": "docref", "definition": "http://x"}]);
    std::fs::write(dir.path().join("CapabilityStatement-covered.json"), covered.to_string()).unwrap();
    std::fs::write(
        dir.path().join("CapabilityStatement-uncovered.json"),
        uncovered.to_string(),
    )
    .unwrap();
    // with US Core beside them, whose SearchParameters add `race`
    let us_core = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/us-core-6.1.0");
    for f in std::fs::read_dir(&us_core).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            profile_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    );
    let instantiates: Vec<String> = s.get("/metadata").json()["instantiates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        instantiates.contains(&"http://example.org/cs/covered".to_string()),
        "{instantiates:?}"
    );
    assert!(!instantiates.contains(&"http://example.org/cs/uncovered".to_string()));
    assert!(
        !instantiates.iter().any(|u| u.contains("us-core-server")),
        "US Core lacks $docref: {instantiates:?}"
    );
    assert!(instantiates.iter().any(|u| u.contains("bulk-data")));
}

on_both_backends!(
    guide_capabilities_are_instantiated_only_when_covered,
    lenient_writes,
    official_examples_and_broken_copies,
    modes_and_stored_resources,
    us_core_profiles,
    writes_held_to_declared_profiles
);
