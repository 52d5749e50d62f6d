//! PostgreSQL row-level security: the server's role cannot see another patient's rows even
//! with raw SQL, and cannot switch the protection off. (SQLite has no RLS; the same rule is
//! enforced by the API layer, tested on both backends in tests/auth.rs.)

mod common;

use common::{pg, Db, TestDb, TestServer};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use fhirvault::config::ConfigLayer;
use serde_json::json;

use common::visible_ids as visible;

#[test]
fn server_role_sees_only_its_access_context_even_with_raw_sql() {
    let tdb = TestDb::new(Db::Postgres);
    let name = tdb.pg_name.clone().unwrap();
    let role = format!("app_{name}");
    pg().admin(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"));
    let app_url = pg().url_as(&role, &name);
    let s = TestServer::start_on(
        tdb,
        ConfigLayer {
            database_url: Some(app_url.clone()),
            migration_database_url: Some(pg().url(&name)),
            ..Default::default()
        },
    );
    for p in ["p1", "p2"] {
        assert_eq!(
            s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}))
                .status,
            201
        );
        let o = json!({"resourceType": "Observation", "id": format!("o-{p}"), "status": "final",
                       "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}});
        assert_eq!(s.put(&format!("/Observation/o-{p}"), &o).status, 201);
    }
    let o = json!({"resourceType": "Organization", "id": "org", "name": "x"});
    assert_eq!(s.put("/Organization/org", &o).status, 201);
    // shared resources (issue 21): a Device implanted in p2 is p2's; one in nobody is shared
    let d = json!({"resourceType": "Device", "id": "dev-p2", "patient": {"reference": "Patient/p2"}});
    assert_eq!(s.put("/Device/dev-p2", &d).status, 201);
    assert_eq!(
        s.put("/Device/dev-none", &json!({"resourceType": "Device", "id": "dev-none"}))
            .status,
        201
    );

    // Raw SQL through the server's role.
    let mut c = PgConnection::establish(&app_url).unwrap();
    assert!(visible(&mut c).is_empty(), "no access context: nothing (fail closed)");
    c.batch_execute("SELECT set_config('fhirvault.access', 'patient:p1', false)")
        .unwrap();
    assert_eq!(
        visible(&mut c),
        vec!["o-p1", "p1"],
        "a forgotten WHERE still cannot reach p2, nor shared types without the shared setting"
    );
    c.batch_execute("SELECT set_config('fhirvault.shared', ',Organization,Device,', false)")
        .unwrap();
    assert_eq!(
        visible(&mut c),
        vec!["dev-none", "o-p1", "org", "p1"],
        "shared types in nobody's compartment, never a Device of p2"
    );
    c.batch_execute("SELECT set_config('fhirvault.access', 'patient:p2', false)")
        .unwrap();
    assert_eq!(visible(&mut c), vec!["dev-none", "dev-p2", "o-p2", "org", "p2"]);
    c.batch_execute("SELECT set_config('fhirvault.access', 'all', false)")
        .unwrap();
    assert_eq!(visible(&mut c).len(), 7);
    // the role may read and append to the audit ledger (the writer runs as it)
    #[derive(QueryableByName)]
    struct Privileges {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        can_insert: bool,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        can_select: bool,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        can_update: bool,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        can_delete: bool,
    }
    for table in [
        "audit_events",
        "audit_search",
        "audit_entities",
        "audit_chains",
        "audit_chain",
        "audit_checkpoints",
    ] {
        let p: Privileges = diesel::sql_query(format!(
            "SELECT has_table_privilege('{table}', 'INSERT') AS can_insert, \
             has_table_privilege('{table}', 'SELECT') AS can_select, \
             has_table_privilege('{table}', 'UPDATE') AS can_update, \
             has_table_privilege('{table}', 'DELETE') AS can_delete"
        ))
        .get_result(&mut c)
        .unwrap();
        assert!(
            p.can_insert && p.can_select && !p.can_update && !p.can_delete,
            "{table}"
        );
    }
    // The role can neither lift the protection nor rewrite history.
    for sql in [
        "ALTER TABLE resource_versions DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE resource_versions NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY fhirvault_access ON resource_versions",
        "UPDATE resource_versions SET deleted = TRUE",
        "DELETE FROM resource_versions",
        "DELETE FROM resource_compartments",
        // the audit ledger: INSERT and SELECT only, whatever the triggers would allow
        "UPDATE audit_events SET recorded = now()",
        "UPDATE audit_search SET outcome = '0'",
        "DELETE FROM audit_events",
        "DELETE FROM audit_search",
        "DELETE FROM audit_chains",
        "DELETE FROM audit_chain",
        "DELETE FROM audit_entities",
        "DELETE FROM audit_checkpoints",
        "INSERT INTO audit_archives (chain_id, up_to_seq, last_hash, archived_at, cutoff, events, file_sha256) \
         VALUES (1, 1000000, '\\x00', now(), now(), 0, '\\x00')",
        "ALTER TABLE audit_events DISABLE TRIGGER USER",
        "TRUNCATE audit_chain",
    ] {
        assert!(c.batch_execute(sql).is_err(), "{sql} must be refused");
    }
    // Writing a row outside the context is refused by the policy's check.
    c.batch_execute("SELECT set_config('fhirvault.access', 'patient:p1', false)")
        .unwrap();
    let forged = c.batch_execute(
        "INSERT INTO resource_versions (resource_type, logical_id, version_id, last_updated, deleted, method) \
         VALUES ('Organization', 'org', 99, now(), TRUE, 'DELETE')",
    );
    assert!(
        forged.is_err(),
        "insert outside the compartment must fail the policy check"
    );
    // shared types are read-only in a patient's context, in the database too
    c.batch_execute("SELECT set_config('fhirvault.shared', ',Organization,Device,', false)")
        .unwrap();
    let forged = c.batch_execute(
        "INSERT INTO resource_versions (resource_type, logical_id, version_id, last_updated, deleted, method) \
         VALUES ('Organization', 'org', 99, now(), TRUE, 'DELETE')",
    );
    assert!(forged.is_err(), "a patient context never writes a shared resource");

    // And the server works under it: a patient token reads its own data, not the other's.
    let t = format!("Bearer {}", s.token("patient/*.rs", Some("p1")));
    let get = |path: &str| {
        reqwest::blocking::Client::new()
            .get(s.url(path))
            .header("authorization", &t)
            .send()
            .unwrap()
    };
    assert_eq!(get("/Observation/o-p1").status().as_u16(), 200);
    assert_eq!(get("/Observation/o-p2").status().as_u16(), 404);
    assert_eq!(get("/Organization/org").status().as_u16(), 200);
    assert_eq!(get("/Device/dev-none").status().as_u16(), 200);
    assert_eq!(get("/Device/dev-p2").status().as_u16(), 404);
    let devices: serde_json::Value = get("/Device").json().unwrap();
    assert_eq!(devices["total"], 1, "{devices}");
    assert_eq!(devices["entry"][0]["resource"]["id"], "dev-none");
    let h: serde_json::Value = get("/Observation/_history").json().unwrap();
    assert_eq!(h["total"], 1);
    // system tokens still see everything
    assert_eq!(s.get("/_history").json()["total"], 7);
}

/// Bundles and patches under row-level security: each entry runs with its own access
/// context inside the one transaction (set transaction-locally), so a patient token's
/// transaction writes inside its compartment and a system token's writes anywhere.
#[test]
fn bundles_and_patches_work_under_row_level_security() {
    let tdb = TestDb::new(Db::Postgres);
    let name = tdb.pg_name.clone().unwrap();
    let role = format!("app_{name}");
    pg().admin(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"));
    let s = TestServer::start_on(
        tdb,
        ConfigLayer {
            database_url: Some(pg().url_as(&role, &name)),
            migration_database_url: Some(pg().url(&name)),
            ..Default::default()
        },
    );
    // a system token: patients, an organization and observations in one transaction
    let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Organization", "name": "x"}, "request": {"method": "POST", "url": "Organization"}},
        {"resource": {"resourceType": "Patient", "id": "p1", "managingOrganization": {"reference": "urn:uuid:o"}}, "request": {"method": "PUT", "url": "Patient/p1"}},
        {"resource": {"resourceType": "Patient", "id": "p2"}, "request": {"method": "PUT", "url": "Patient/p2"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p2"}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = s.post("", &b);
    assert_eq!(r.status, 200, "{}", r.text());
    // a patient token: its own compartment only, patched and deleted in one transaction
    let t = format!("Bearer {}", s.token("patient/*.cruds", Some("p1")));
    let send = |b: &serde_json::Value| {
        common::Reply::from(
            reqwest::blocking::Client::new()
                .post(s.url(""))
                .header("authorization", &t)
                .header("content-type", "application/fhir+json")
                .body(b.to_string())
                .send()
                .unwrap(),
        )
    };
    let mine = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "mine"},
         "subject": {"reference": "Patient/p1"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "female"}]}]},
         "request": {"method": "PATCH", "url": "Patient/p1"}},
        {"request": {"method": "GET", "url": "Observation?subject=Patient/p1"}}
    ]});
    let r = send(&mine);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["entry"][2]["resource"]["total"], 1);
    assert_eq!(s.get("/Patient/p1").json()["gender"], "female");
    // the other patient's resources stay out of reach, in bundles as elsewhere
    let theirs = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "male"}]}]},
         "request": {"method": "PATCH", "url": "Patient/p2"}}
    ]});
    let r = send(&theirs);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(s.get("/Patient/p2").json().get("gender").is_none());
}
