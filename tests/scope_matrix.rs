//! The scope matrix: for every combination of launch context (patient, user, system), resource
//! type (including `*`) and permission letters, every read path and the writes are exercised,
//! and nothing outside the token's rights is ever returned, counted or changed. The expected
//! rights come from the data set built here, not from the server's policy code.
//!
//! Shared resources (issue 21): in a patient's context, resources of a shared type (here
//! Organization and Device) that lie in no patient's compartment are readable and searchable;
//! a Device naming another patient, or anything in another patient's compartment only, is not;
//! a resource in two compartments is each patient's; shared types are never written.

mod common;

use common::{Db, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const TYPES: [&str; 5] = ["Patient", "Observation", "Condition", "Organization", "Device"];

/// The types shared in the server's default configuration, among those of the data set.
const SHARED: [&str; 2] = ["Organization", "Device"];

/// The category of the Observations a granular scope admits (`obs-p1`, `obs-p2`; `obs-both`
/// and those the writes create have none).
const LAB: (&str, &str) = (
    "http://terminology.hl7.org/CodeSystem/observation-category",
    "laboratory",
);
const LAB_IDS: [&str; 2] = ["obs-p1", "obs-p2"];

/// The patients whose compartments hold a resource (none: a shared resource, if its type is).
type Compartments = Vec<String>;

fn put(s: &TestServer, path: &str, body: Value) {
    let r = s.put(path, &body);
    assert!(r.status == 200 || r.status == 201, "{path}: {}", r.text());
}

/// (type, id, patient compartments) of every resource in the data set.
fn build(s: &TestServer) -> Vec<(String, String, Compartments)> {
    let mut out = Vec::new();
    let one = |p: &str| vec![p.to_string()];
    for p in ["p1", "p2"] {
        put(s, &format!("/Patient/{p}"), json!({"resourceType": "Patient", "id": p}));
        out.push(("Patient".to_string(), p.to_string(), one(p)));
        let o = json!({"resourceType": "Observation", "id": format!("obs-{p}"), "status": "final",
                       "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")},
                       "category": [{"coding": [{"system": LAB.0, "code": LAB.1}]}],
                       "performer": [{"reference": "Organization/org"}]});
        put(s, &format!("/Observation/obs-{p}"), o);
        out.push(("Observation".into(), format!("obs-{p}"), one(p)));
        let c = json!({"resourceType": "Condition", "id": format!("cond-{p}"),
                       "subject": {"reference": format!("Patient/{p}")}});
        put(s, &format!("/Condition/cond-{p}"), c);
        out.push(("Condition".into(), format!("cond-{p}"), one(p)));
        // an implanted device is its patient's, never shared
        let d = json!({"resourceType": "Device", "id": format!("dev-{p}"),
                       "patient": {"reference": format!("Patient/{p}")}});
        put(s, &format!("/Device/dev-{p}"), d);
        out.push(("Device".into(), format!("dev-{p}"), one(p)));
    }
    // in both compartments: p2's subject, p1 its performer
    let both = json!({"resourceType": "Observation", "id": "obs-both", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/p2"}, "performer": [{"reference": "Patient/p1"}]});
    put(s, "/Observation/obs-both", both);
    out.push(("Observation".into(), "obs-both".into(), vec!["p1".into(), "p2".into()]));
    put(
        s,
        "/Organization/org",
        json!({"resourceType": "Organization", "id": "org", "name": "x"}),
    );
    out.push(("Organization".into(), "org".into(), Vec::new()));
    put(
        s,
        "/Device/dev-none",
        json!({"resourceType": "Device", "id": "dev-none"}),
    );
    out.push(("Device".into(), "dev-none".into(), Vec::new()));
    out
}

struct Token {
    context: &'static str,
    rtype: &'static str,
    letters: &'static str,
    /// A SMART v2 granular scope: `Observation.…?category=…|laboratory`.
    granular: bool,
    bearer: String,
}

impl Token {
    fn grants(&self, rtype: &str, id: &str, letter: char, compartments: &[String]) -> bool {
        let shared = compartments.is_empty() && SHARED.contains(&rtype) && "rs".contains(letter);
        (!self.granular || LAB_IDS.contains(&id))
            && (self.rtype == "*" || self.rtype == rtype)
            && self.letters.contains(letter)
            && (self.context != "patient" || compartments.iter().any(|p| p == "p1") || shared)
    }
}

fn get(s: &TestServer, t: &Token, path: &str) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .get(s.url(path))
        .header("authorization", &t.bearer)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn scope_matrix(db: Db) {
    let s = TestServer::start(db);
    let mut data = build(&s);
    let mut tokens = Vec::new();
    for context in ["patient", "user", "system"] {
        for rtype in ["Patient", "Observation", "Organization", "*"] {
            for letters in ["r", "s", "rs", "cu", "cruds"] {
                let scope = format!("{context}/{rtype}.{letters}");
                let patient = (context == "patient").then_some("p1");
                tokens.push(Token {
                    context,
                    rtype,
                    letters,
                    granular: false,
                    bearer: format!("Bearer {}", s.token(&scope, patient)),
                });
            }
        }
        for letters in ["rs", "cruds"] {
            let scope = format!("{context}/Observation.{letters}?category={}%7C{}", LAB.0, LAB.1);
            let patient = (context == "patient").then_some("p1");
            tokens.push(Token {
                context,
                rtype: "Observation",
                letters,
                granular: true,
                bearer: format!("Bearer {}", s.token(&scope, patient)),
            });
        }
    }
    let mut checked = 0;
    for t in &tokens {
        let label = format!(
            "{}/{}.{}{}",
            t.context,
            t.rtype,
            t.letters,
            if t.granular { "?category" } else { "" }
        );
        // read, vread, instance history: exactly the resources the token may read
        for (rtype, id, comp) in &data {
            let may = t.grants(rtype, id, 'r', comp);
            for path in [format!("/{rtype}/{id}"), format!("/{rtype}/{id}/_history/1")] {
                let (status, body) = get(&s, t, &path);
                if may {
                    assert_eq!(status, 200, "{label} {path}");
                    assert_eq!(body["id"], id.as_str(), "{label} {path}");
                } else {
                    assert!(status == 403 || status == 404, "{label} {path}: {status}");
                    assert_eq!(body["resourceType"], "OperationOutcome", "{label} {path}");
                }
                checked += 1;
            }
            let (status, body) = get(&s, t, &format!("/{rtype}/{id}/_history"));
            if may {
                assert_eq!(status, 200, "{label} {rtype}/{id}/_history");
                assert!(body["entry"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|e| e["resource"]["id"] == id.as_str()));
            } else {
                assert!(
                    status == 403 || status == 404,
                    "{label} {rtype}/{id}/_history: {status}"
                );
            }
            checked += 1;
        }
        // type history: only searchable resources, and the total counts only those
        for rtype in TYPES {
            let expected: BTreeSet<String> = data
                .iter()
                .filter(|(t2, id, c)| t2 == rtype && t.grants(rtype, id, 's', c))
                .map(|(_, id, _)| id.clone())
                .collect();
            let searchable = t.rtype == "*" || t.rtype == rtype;
            let (status, body) = get(&s, t, &format!("/{rtype}/_history?_count=100"));
            if searchable && t.letters.contains('s') {
                assert_eq!(status, 200, "{label} {rtype}/_history");
                let got: BTreeSet<String> = body["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                    .collect();
                if t.granular {
                    // checked on content page by page (no total): never anything outside the grant
                    assert!(got.is_subset(&expected), "{label} {rtype}/_history: {got:?}");
                    assert!(body.get("total").is_none(), "{label} {rtype}/_history");
                } else {
                    assert_eq!(got, expected, "{label} {rtype}/_history");
                    assert_eq!(
                        body["total"].as_u64().unwrap() as usize,
                        body["entry"].as_array().map_or(0, Vec::len)
                    );
                }
            } else {
                assert_eq!(status, 403, "{label} {rtype}/_history");
            }
            checked += 1;
            // search, bare and with a condition on ids: the same set, and totals that count
            // nothing else
            let all_ids: Vec<&str> = data
                .iter()
                .filter(|(t2, _, _)| t2 == rtype)
                .map(|(_, id, _)| id.as_str())
                .collect();
            for query in [
                format!("/{rtype}?_count=100"),
                format!("/{rtype}?_id={}&_count=100", all_ids.join(",")),
            ] {
                let (status, body) = get(&s, t, &query);
                if searchable && t.letters.contains('s') {
                    assert_eq!(status, 200, "{label} {query}");
                    let got: BTreeSet<String> = body["entry"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                        .collect();
                    assert_eq!(got, expected, "{label} {query}");
                    assert_eq!(
                        body["total"].as_u64().unwrap() as usize,
                        expected.len(),
                        "{label} {query}"
                    );
                } else {
                    assert_eq!(status, 403, "{label} {query}");
                }
                checked += 1;
            }
        }
        // system history: only with s on every type; then only what the context allows
        let (status, body) = get(&s, t, "/_history?_count=100");
        if t.rtype == "*" && t.letters.contains('s') {
            assert_eq!(status, 200, "{label} /_history");
            for e in body["entry"].as_array().into_iter().flatten() {
                let (rt, id) = (
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap(),
                );
                let comp = data
                    .iter()
                    .find(|(t2, i, _)| t2 == rt && i == id)
                    .map(|(_, _, c)| c.clone())
                    .unwrap_or_default();
                assert!(t.grants(rt, id, 's', &comp), "{label} /_history returned {rt}/{id}");
            }
        } else {
            assert_eq!(status, 403, "{label} /_history");
        }
        checked += 1;
        // writes: create inside and outside the compartment; update of each Observation
        for p in ["p1", "p2"] {
            let body = json!({"resourceType": "Observation", "status": "final", "code": {"text": "w"},
                              "subject": {"reference": format!("Patient/{p}")}});
            let r = reqwest::blocking::Client::new()
                .post(s.url("/Observation"))
                .header("authorization", &t.bearer)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .unwrap();
            let may = t.grants("Observation", "new", 'c', &[p.to_string()]);
            let created = r.status().as_u16() == 201;
            assert_eq!(created, may, "{label} create for {p}: {}", r.status());
            if created {
                let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
                data.push(("Observation".into(), id, vec![p.to_string()]));
            }
            checked += 1;
        }
        // a shared type is read-only in a patient's context: creating and updating it are refused
        let org = json!({"resourceType": "Organization", "id": "org", "name": "x"});
        for (method, path) in [("POST", "/Organization"), ("PUT", "/Organization/org")] {
            let r = reqwest::blocking::Client::new()
                .request(method.parse().unwrap(), s.url(path))
                .header("authorization", &t.bearer)
                .header("content-type", "application/fhir+json")
                .body(org.to_string())
                .send()
                .unwrap();
            let letter = if method == "POST" { 'c' } else { 'u' };
            let may = t.grants("Organization", "org", letter, &[]);
            assert_eq!(r.status().is_success(), may, "{label} {method} {path}: {}", r.status());
            if r.status().as_u16() == 201 {
                let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
                data.push(("Organization".into(), id, Vec::new()));
            }
            checked += 1;
        }
        // _include: the shared Organization the Observations point at, where the token reads it
        let (status, body) = get(&s, t, "/Observation?_include=Observation:performer&_count=100");
        if (t.rtype == "*" || t.rtype == "Observation") && t.letters.contains('s') {
            assert_eq!(status, 200, "{label} _include");
            let included: BTreeSet<String> = body["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["search"]["mode"] == "include")
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap(),
                        e["resource"]["id"].as_str().unwrap()
                    )
                })
                .collect();
            let mut expected = BTreeSet::new();
            if t.grants("Organization", "org", 'r', &[]) {
                expected.insert("Organization/org".to_string());
            }
            if t.grants("Patient", "p1", 'r', &["p1".to_string()]) {
                expected.insert("Patient/p1".to_string());
            }
            assert_eq!(included, expected, "{label} _include");
        } else {
            assert_eq!(status, 403, "{label} _include");
        }
        checked += 1;
        for p in ["p1", "p2"] {
            let id = format!("obs-{p}");
            let current = s.get(&format!("/Observation/{id}")).json();
            let r = reqwest::blocking::Client::new()
                .put(s.url(&format!("/Observation/{id}")))
                .header("authorization", &t.bearer)
                .header("content-type", "application/fhir+json")
                .body(current.to_string())
                .send()
                .unwrap();
            let may = t.grants("Observation", &id, 'u', &[p.to_string()]);
            assert_eq!(r.status().as_u16() == 200, may, "{label} update {id}: {}", r.status());
            checked += 1;
        }
    }
    assert!(checked > 2000, "{checked} checks");
}

on_both_backends!(scope_matrix);
