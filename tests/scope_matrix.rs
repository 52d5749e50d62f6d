//! The scope matrix: for every combination of launch context (patient, user, system), resource
//! type (including `*`) and permission letters, every read path and the writes are exercised,
//! and nothing outside the token's rights is ever returned, counted or changed. The expected
//! rights come from the data set built here, not from the server's policy code.

mod common;

use common::{Db, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const TYPES: [&str; 4] = ["Patient", "Observation", "Condition", "Organization"];

/// (type, id, patient compartment) of every resource in the data set.
fn build(s: &TestServer) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for p in ["p1", "p2"] {
        s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}));
        out.push(("Patient".to_string(), p.to_string(), Some(p.to_string())));
        let o = json!({"resourceType": "Observation", "id": format!("obs-{p}"), "status": "final",
                       "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}});
        s.put(&format!("/Observation/obs-{p}"), &o);
        out.push(("Observation".into(), format!("obs-{p}"), Some(p.to_string())));
        let c = json!({"resourceType": "Condition", "id": format!("cond-{p}"),
                       "subject": {"reference": format!("Patient/{p}")}});
        s.put(&format!("/Condition/cond-{p}"), &c);
        out.push(("Condition".into(), format!("cond-{p}"), Some(p.to_string())));
    }
    s.put(
        "/Organization/org",
        &json!({"resourceType": "Organization", "id": "org", "name": "x"}),
    );
    out.push(("Organization".into(), "org".into(), None));
    out
}

struct Token {
    context: &'static str,
    rtype: &'static str,
    letters: &'static str,
    bearer: String,
}

impl Token {
    fn grants(&self, rtype: &str, letter: char, compartment: &Option<String>) -> bool {
        (self.rtype == "*" || self.rtype == rtype)
            && self.letters.contains(letter)
            && (self.context != "patient" || compartment.as_deref() == Some("p1"))
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
                    bearer: format!("Bearer {}", s.token(&scope, patient)),
                });
            }
        }
    }
    let mut checked = 0;
    for t in &tokens {
        let label = format!("{}/{}.{}", t.context, t.rtype, t.letters);
        // read, vread, instance history: exactly the resources the token may read
        for (rtype, id, comp) in &data {
            let may = t.grants(rtype, 'r', comp);
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
                .filter(|(t2, _, c)| t2 == rtype && t.grants(rtype, 's', c))
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
                assert_eq!(got, expected, "{label} {rtype}/_history");
                assert_eq!(
                    body["total"].as_u64().unwrap() as usize,
                    body["entry"].as_array().map_or(0, Vec::len)
                );
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
                    .map(|(_, _, c)| c.clone());
                let comp = comp.unwrap_or(None);
                assert!(t.grants(rt, 's', &comp), "{label} /_history returned {rt}/{id}");
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
            let may = t.grants("Observation", 'c', &Some(p.to_string()));
            let created = r.status().as_u16() == 201;
            assert_eq!(created, may, "{label} create for {p}: {}", r.status());
            if created {
                let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
                data.push(("Observation".into(), id, Some(p.to_string())));
            }
            checked += 1;
        }
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
            let may = t.grants("Observation", 'u', &Some(p.to_string()));
            assert_eq!(r.status().as_u16() == 200, may, "{label} update {id}: {}", r.status());
            checked += 1;
        }
    }
    assert!(checked > 2000, "{checked} checks");
}

on_both_backends!(scope_matrix);
