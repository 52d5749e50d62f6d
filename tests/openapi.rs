//! The OpenAPI document: served at `/openapi.json`, generated from the same registry as the
//! CapabilityStatement, every body's schema reference resolving to the official R4 schema, the
//! committed `openapi/openapi.json` equal to what the server generates, and Swagger UI at
//! `/docs` served from the binary.
//!
//! To refresh the committed copy after a change: `FHIRVAULT_BLESS=1 cargo test --test openapi`.

mod common;

use common::{Db, TestServer};
use serde_json::Value;
use std::collections::BTreeSet;

fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.insert(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn openapi_document_matches_capabilities_and_the_committed_copy() {
    let s = TestServer::start(Db::Sqlite);
    let r = s.client.get(format!("http://{}/openapi.json", s.addr)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let bytes = r.bytes().unwrap().to_vec();
    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["components"]["securitySchemes"]["smart"]["scheme"], "bearer");
    // every interaction of a type, with the statuses it can give
    let patient = &doc["paths"]["/fhir/Patient"];
    for m in ["get", "post", "put", "delete"] {
        assert!(patient[m].is_object(), "/fhir/Patient {m}");
    }
    assert!(patient["get"]["responses"]["401"].is_object());
    assert!(doc["paths"]["/fhir/Patient/{id}/_history/{vid}"]["get"].is_object());
    assert!(
        doc["paths"]["/fhir/AuditEvent"]["post"].is_null(),
        "the audit log is read-only"
    );
    // the search parameters are the CapabilityStatement's, type by type
    let cs = s.get("/metadata").json();
    // Bulk Data export: listed in both, at each level, with its parameters
    assert_eq!(cs["rest"][0]["operation"][0]["name"], "export");
    // under Bulk Data 2.0's name, and under 1.0's for older clients' discovery, one definition
    for (t, legacy, definition) in [
        ("Patient", "patient-export", "patient-export"),
        ("Group", "group-export", "group-export"),
    ] {
        let res = common::capability_of(&cs, t);
        let ops = res["operation"].as_array().unwrap();
        for name in ["export", legacy] {
            let op = ops
                .iter()
                .find(|o| o["name"] == name)
                .unwrap_or_else(|| panic!("{t} {name}"));
            assert_eq!(
                op["definition"],
                format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{definition}")
            );
        }
    }
    for path in ["/fhir/$export", "/fhir/Patient/$export", "/fhir/Group/{id}/$export"] {
        let names: BTreeSet<&str> = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}"))
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for p in ["Prefer", "_outputFormat", "_since", "_type", "_typeFilter"] {
            assert!(names.contains(p), "{path} {p}");
        }
    }
    assert!(doc["paths"]["/fhir/$export-status/{job}"]["delete"].is_object());
    assert!(doc["paths"]["/fhir/$export-file/{job}/{file}"]["get"].is_object());
    for res in cs["rest"][0]["resource"].as_array().unwrap() {
        let t = res["type"].as_str().unwrap();
        let listed: BTreeSet<&str> = res["searchParam"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let documented: BTreeSet<&str> = doc["paths"][format!("/fhir/{t}")]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap())
            .filter(|n| {
                !matches!(
                    *n,
                    "_count" | "_sort" | "_total" | "_summary" | "_elements" | "_include" | "_revinclude" | "_page"
                )
            })
            .collect();
        assert_eq!(listed, documented, "{t}");
    }
    // every schema reference resolves to a definition of the official R4 schema
    let mut all = BTreeSet::new();
    refs(&doc, &mut all);
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert!(schemas.contains_key("Patient") && schemas.contains_key("OperationOutcome"));
    for r in &all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r}"));
        assert!(schemas.contains_key(name), "{r} does not resolve");
    }
    // the committed copy is what the server generates
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    if std::env::var("FHIRVAULT_BLESS").is_ok() {
        // committed pretty-printed, for readable diffs
        let mut pretty = serde_json::to_vec_pretty(&doc).unwrap();
        pretty.push(b'\n');
        std::fs::write(&committed, pretty).unwrap();
    }
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&committed).unwrap_or_default()).unwrap_or(Value::Null);
    assert!(
        on_disk == doc,
        "openapi/openapi.json differs from what the server generates: run FHIRVAULT_BLESS=1 cargo test --test openapi"
    );
}

#[test]
fn swagger_ui_is_served_from_the_binary() {
    let s = TestServer::start(Db::Sqlite);
    let get = |path: &str| s.client.get(format!("http://{}{path}", s.addr)).send().unwrap();
    let bare_docs = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://{}/docs", s.addr))
        .send()
        .unwrap();
    assert_eq!(bare_docs.status().as_u16(), 302);
    assert_eq!(bare_docs.headers()["location"], "/docs/");
    let page = get("/docs/");
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && !csp.contains("http"), "{csp}");
    let html = page.text().unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let init = get("/docs/swagger-initializer.js");
    assert_eq!(init.status().as_u16(), 200);
    assert!(init.text().unwrap().contains("/openapi.json"));
    assert_eq!(get("/docs/swagger-ui-bundle.js").status().as_u16(), 200);
    // the document needs no token; the FHIR API still does
    assert_eq!(get("/openapi.json").status().as_u16(), 200);
    let bare = reqwest::blocking::Client::new()
        .get(format!("http://{}/fhir/Patient", s.addr))
        .send()
        .unwrap();
    assert_eq!(bare.status().as_u16(), 401);
}
