//! Search index rows follow every write (create, update, delete) in the write's transaction,
//! hold PHI only as blind indexes, and `fhirvault reindex` rebuilds them from stored content.

mod common;

use common::{Db, TestServer};
use serde_json::json;
use std::collections::BTreeMap;

fn counts(s: &TestServer) -> BTreeMap<&'static str, i64> {
    s.store.search_index_counts().unwrap().into_iter().collect()
}

on_both_backends!(index_rows_follow_writes_hide_phi_and_rebuild);
on_both_backends!(
    other_search_settings_need_a_reindex,
    implementation_guide_parameters,
    search_parameters_stored_through_the_api
);

/// The identifying parameters are configuration; an index built under other settings is
/// refused until `fhirvault reindex` rebuilds it under the new ones.
fn other_search_settings_need_a_reindex(db: Db) {
    let s = TestServer::start(db);
    let default = fhirvault::search::Registry::r4().unwrap();
    fhirvault::server::check_search_index(&s.store, &default).expect("a fresh database is marked at start");
    assert_eq!(
        s.post("/Patient", &json!({"resourceType": "Patient", "gender": "female"}))
            .status,
        201
    );
    let mut list = fhirvault::search::registry::default_phi();
    list.push("Patient.gender".into());
    let stricter = fhirvault::search::Registry::r4_with_phi(&list).unwrap();
    assert_ne!(stricter.fingerprint(), default.fingerprint());
    assert!(stricter.get("Patient", "gender").unwrap().phi);
    let refused = fhirvault::server::check_search_index(&s.store, &stricter).unwrap_err();
    assert!(format!("{refused:#}").contains("fhirvault reindex"), "{refused:#}");
    reindex(&s, &[("FHIRVAULT_SEARCH_PHI_PARAMETERS", list.join(",").into())]);
    fhirvault::server::check_search_index(&s.store, &stricter).expect("rebuilt under the new settings");
    assert!(fhirvault::server::check_search_index(&s.store, &default).is_err());
}

/// Runs `fhirvault reindex` on the server's database with these environment settings; it must
/// succeed.
fn reindex(s: &TestServer, env: &[(&str, std::ffi::OsString)]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .arg("reindex")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn us_core_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/us-core-6.1.0")
}

/// Issue 21: the SearchParameters of the implementation guides under `profile_dir` (US Core 6.1:
/// race, ethnicity, gender identity, Condition asserted-date, Encounter discharge-disposition …)
/// are indexed on write, searchable, listed in the CapabilityStatement and the OpenAPI document;
/// an index built without them needs `fhirvault reindex`.
fn implementation_guide_parameters(db: Db) {
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            profile_dir: Some(us_core_dir()),
            ..Default::default()
        },
    );
    let patient: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/us-core/Patient-example.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(s.put("/Patient/example", &patient).status, 201);
    let found = |q: &str| -> usize {
        let r = s.get(q);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.json()["entry"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(found("/Patient?race=2106-3"), 1);
    // the definition indexes the code alone (`….value.code`): a second race of the patient
    assert_eq!(found("/Patient?race=1002-5"), 1);
    assert_eq!(found("/Patient?race=2135-2"), 0, "an ethnicity code is not a race");
    assert_eq!(found("/Patient?ethnicity=2135-2"), 1);
    assert_eq!(found("/Patient?gender-identity=UNK"), 1);
    let condition = json!({"resourceType": "Condition", "subject": {"reference": "Patient/example"},
        "code": {"text": "x"},
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/condition-assertedDate", "valueDateTime": "2021-03-04"}]});
    assert_eq!(s.post("/Condition", &condition).status, 201);
    assert_eq!(found("/Condition?asserted-date=2021-03-04"), 1);
    assert_eq!(found("/Condition?asserted-date=lt2021"), 0);
    let encounter = json!({"resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": "Patient/example"},
        "hospitalization": {"dischargeDisposition": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "home"}]}}});
    assert_eq!(s.post("/Encounter", &encounter).status, 201);
    assert_eq!(found("/Encounter?discharge-disposition=home"), 1);
    assert_eq!(found("/Encounter?discharge-disposition=hosp"), 0);
    // advertised where clients look
    let cs = s.get("/metadata").json();
    let patient_params: Vec<String> = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap()["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for code in ["race", "ethnicity", "gender-identity"] {
        assert!(patient_params.iter().any(|p| p == code), "{code} in {patient_params:?}");
    }
    // (the document is served at the root, beside /fhir)
    let root = s.base.trim_end_matches("/fhir").to_string();
    let openapi = reqwest::blocking::get(format!("{root}/openapi.json"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        openapi.contains("\"asserted-date\""),
        "the OpenAPI document lists asserted-date"
    );

    // without the guide, the parameter is unknown; an index built without it needs a reindex
    let plain = TestServer::start(db);
    let r = plain.send("GET", "/Patient?race=2106-3", None, &[("Prefer", "handling=strict")]);
    assert_eq!(r.status, 400);
    assert_eq!(plain.put("/Patient/example", &patient).status, 201);
    let extra = fhirvault::search::registry::search_parameters_in(&us_core_dir()).unwrap();
    let with_guide = fhirvault::search::Registry::r4_with(&fhirvault::search::registry::default_phi(), &extra).unwrap();
    assert!(with_guide.skipped().is_empty(), "{:?}", with_guide.skipped());
    assert!(fhirvault::server::check_search_index(&plain.store, &with_guide).is_err());
    reindex(&plain, &[("FHIRVAULT_PROFILE_DIR", us_core_dir().into())]);
    fhirvault::server::check_search_index(&plain.store, &with_guide).expect("rebuilt with the guide's parameters");
}

/// Issue 21: an active SearchParameter created through the API by an admin is a search
/// parameter at once (new writes indexed, listed in the CapabilityStatement), `fhirvault
/// reindex` indexes what was stored before, a bad one is refused with an OperationOutcome, and
/// deleting it removes it. Drafts are data.
fn search_parameters_stored_through_the_api(db: Db) {
    let s = TestServer::start(db);
    let admin = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/*.cruds".into(),
            client_id: Some("admin-client".into()),
            roles: vec!["admin".into()],
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let as_admin = |method: &str, path: &str, body: Option<&serde_json::Value>| {
        s.send(method, path, body, &[("authorization", &format!("Bearer {admin}"))])
    };
    let definition = json!({"resourceType": "SearchParameter", "url": "http://example.org/sp/observation-method",
        "name": "ObservationMethod", "status": "active", "description": "How the observation was made",
        "code": "obs-method", "base": ["Observation"], "type": "token", "expression": "Observation.method"});
    let obs = |code: &str| {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "method": {"coding": [{"system": "http://snomed.info/sct", "code": code}]}})
    };
    // stored before the parameter exists
    assert_eq!(s.post("/Observation", &obs("before-1")).status, 201);
    let strict = [("Prefer", "handling=strict")];
    assert_eq!(
        s.send("GET", "/Observation?obs-method=before-1", None, &strict).status,
        400
    );
    // only an admin may define one
    let plain = format!("Bearer {}", s.token("system/*.cruds", None));
    let r = s.send(
        "POST",
        "/SearchParameter",
        Some(&definition),
        &[("authorization", &plain)],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    // bad definitions are refused, saying why
    for (field, value) in [
        ("expression", json!("Observation.method.where(")),
        ("expression", json!("Patient.gender")),
        ("code", json!("status")),
        ("type", json!("special")),
        ("base", json!(["NoSuchType"])),
    ] {
        let mut bad = definition.clone();
        bad[field] = value;
        let r = as_admin("POST", "/SearchParameter", Some(&bad));
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        assert_eq!(r.outcome()["issue"][0]["code"], "invalid");
    }
    let r = as_admin("POST", "/SearchParameter", Some(&definition));
    assert_eq!(r.status, 201, "{}", r.text());
    let sp_id = r.json()["id"].as_str().unwrap().to_string();
    // at once: new writes are indexed, searches know it, the CapabilityStatement lists it
    assert_eq!(s.post("/Observation", &obs("after-1")).status, 201);
    let count = |q: &str| {
        let r = s.get(q);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.json()["total"].as_u64().unwrap()
    };
    assert_eq!(count("/Observation?obs-method=after-1"), 1);
    assert_eq!(count("/Observation?obs-method=http://snomed.info/sct|after-1"), 1);
    assert_eq!(
        count("/Observation?obs-method=before-1"),
        0,
        "stored before: until a reindex"
    );
    let listed = s.get("/metadata").json()["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap()["searchParam"]
        .to_string();
    assert!(listed.contains("obs-method"), "the CapabilityStatement lists it");
    // reindex indexes what was stored before
    reindex(&s, &[]);
    assert_eq!(count("/Observation?obs-method=before-1"), 1);
    // a draft is data, not a parameter
    let mut draft = definition.clone();
    draft["status"] = json!("draft");
    draft["code"] = json!("draft-method");
    draft["expression"] = json!("Observation.method.where(");
    assert_eq!(as_admin("POST", "/SearchParameter", Some(&draft)).status, 201);
    assert_eq!(s.send("GET", "/Observation?draft-method=x", None, &strict).status, 400);
    // deleted: gone from searches
    assert_eq!(
        as_admin("DELETE", &format!("/SearchParameter/{sp_id}"), None).status,
        200
    );
    assert_eq!(
        s.send("GET", "/Observation?obs-method=after-1", None, &strict).status,
        400
    );
}

fn index_rows_follow_writes_hide_phi_and_rebuild(db: Db) {
    let s = TestServer::start(db);
    assert!(counts(&s).values().all(|n| *n == 0));
    let p = s.post(
        "/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Indexsentinel", "given": ["Quorra"]}],
                "birthDate": "1974-12-25", "gender": "female",
                "identifier": [{"system": "urn:mrn", "value": "MRN-77441"}],
                "telecom": [{"system": "phone", "value": "555-0199"}]}),
    );
    let pid = p.json()["id"].as_str().unwrap().to_string();
    let o = s.post(
        "/Observation",
        &json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                "subject": {"reference": format!("Patient/{pid}")},
                "effectiveDateTime": "2024-05-06T07:08:09Z",
                "valueQuantity": {"value": 72.5, "system": "http://unitsofmeasure.org", "code": "kg"}}),
    );
    let oid = o.json()["id"].as_str().unwrap().to_string();
    let after_create = counts(&s);
    for table in [
        "search_string",
        "search_token",
        "search_date",
        "search_reference",
        "search_quantity",
    ] {
        assert!(after_create[table] > 0, "{table}: {after_create:?}");
    }
    // an update replaces the rows of the resource; a delete removes them
    let mut body = p.json();
    body["gender"] = json!("male");
    body["name"] = json!([{"family": "Indexsentinel"}]);
    assert_eq!(s.put(&format!("/Patient/{pid}"), &body).status, 200);
    let after_update = counts(&s);
    assert!(
        after_update["search_string"] < after_create["search_string"],
        "the dropped given name's rows are gone"
    );
    assert_eq!(s.delete(&format!("/Observation/{oid}")).status, 200);
    let after_delete = counts(&s);
    assert_eq!(after_delete["search_quantity"], 0);
    assert_eq!(
        after_delete["search_reference"], 0,
        "only the observation referred to anything"
    );
    assert!(after_update["search_reference"] >= 2, "subject and patient");

    // reindex rebuilds exactly what the writes built
    let tables: Vec<&str> = after_delete.keys().copied().collect();
    s.db.exec(&tables.iter().map(|t| format!("DELETE FROM {t};")).collect::<String>())
        .unwrap();
    assert!(counts(&s).values().all(|n| *n == 0));
    let out = reindex(&s, &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resources reindexed"),
        "progress"
    );
    assert_eq!(counts(&s), after_delete);
    // checked last: reading the SQLite files from this process drops its POSIX locks on them
    // PHI only as blind indexes: not the name (as written or folded), not the birth date,
    // the identifier or the phone number
    let at_rest = s.db.bytes_at_rest();
    for needle in [
        "Indexsentinel",
        "indexsentinel",
        "quorra",
        "1974-12-25",
        "MRN-77441",
        "555-0199",
    ] {
        assert!(
            !at_rest.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} at rest in plaintext"
        );
    }
}
