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
on_both_backends!(other_search_settings_need_a_reindex);

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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .arg("reindex")
        .env("FHIRVAULT_SEARCH_PHI_PARAMETERS", list.join(","))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fhirvault::server::check_search_index(&s.store, &stricter).expect("rebuilt under the new settings");
    assert!(fhirvault::server::check_search_index(&s.store, &default).is_err());
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .arg("reindex")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
