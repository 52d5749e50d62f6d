//! The audit ledger, black-box where it can be: an exact count of AuditEvents for mixed
//! requests, fail-closed behaviour, tamper detection by the verifier, append-only storage,
//! AuditEvent search and `$access-report`, archiving, and no PHI in operational logs.
//! Every test runs on SQLite and PostgreSQL.

mod common;

use common::{Db, Reply, TestServer};
use fhirvault::audit::verify::{verify, Finding, Report};
use fhirvault::config::ConfigLayer;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn patient(name: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": name}], "gender": "female"})
}

/// Every stored event, through the API (newest first), with the default system token.
fn events(s: &TestServer) -> Vec<Value> {
    s.audit_events("?_count=1000")
}

fn without_token(s: &TestServer, path: &str, token: Option<&str>) -> Reply {
    let mut r = reqwest::blocking::Client::new().get(s.url(path));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    Reply::from(r.send().unwrap())
}

/// The events durable now: in the database, and (SQLite) in the journal, not moved yet. The
/// journal's ids are read first: an event moved meanwhile is still in the journal, and counted
/// once.
fn durable_event_count(s: &TestServer) -> i64 {
    let journaled: std::collections::BTreeSet<String> = match s.store.sqlite_path() {
        Some(db) => {
            fhirvault::audit::journal::read_all(&fhirvault::audit::journal::segment_paths(db, s.auditor.chain_id()))
                .unwrap()
                .into_iter()
                .flat_map(|b| b.rows.into_iter().map(|r| r.id))
                .collect()
        }
        None => Default::default(),
    };
    let outside = if journaled.is_empty() {
        String::new()
    } else {
        let ids: Vec<String> = journaled.iter().map(|id| format!("'{id}'")).collect();
        format!(" WHERE id NOT IN ({})", ids.join(","))
    };
    s.db.count(&format!("SELECT COUNT(*) AS n FROM audit_events{outside}")) + journaled.len() as i64
}

fn run_verify(s: &TestServer) -> Report {
    s.auditor.sync_search_blocking().unwrap();
    let (key, file) = fhirvault::server::audit_checkpointing(&s.config).unwrap();
    verify(
        &s.store,
        s.store.cipher(),
        &key.verifying_key(),
        &[file],
        None,
        None,
        |_| {},
    )
    .unwrap()
}

on_both_backends!(
    every_request_yields_exactly_one_event,
    fail_closed_when_the_ledger_cannot_be_written,
    verifier_catches_each_kind_of_tampering,
    verifier_catches_a_node_chain_truncated_or_dropped,
    audit_tables_are_append_only,
    audit_log_search_and_access_report,
    audit_log_search_takes_the_common_result_parameters,
    archive_exports_before_it_removes_and_keeps_the_chain_verifiable,
);

fn every_request_yields_exactly_one_event(db: Db) {
    let s = TestServer::start(db);
    let created = s.post("/Patient", &patient("Countwell"));
    assert_eq!(created.status, 201);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let mut body = created.json();
    body["gender"] = json!("male");
    let observer_token = s.token("system/Observation.rs", None);
    // (status, subtype, action, outcome) of each request, in order
    let expected: Vec<(u16, &str, &str, &str)> = vec![
        (201, "create", "C", "0"),
        (s.get(&format!("/Patient/{id}")).status, "read", "R", "0"),
        (s.put(&format!("/Patient/{id}"), &body).status, "update", "U", "0"),
        (
            s.get(&format!("/Patient/{id}/_history")).status,
            "history-instance",
            "R",
            "0",
        ),
        (s.get(&format!("/Patient/{id}/_history/1")).status, "vread", "R", "0"),
        (s.get("/Patient/nobody").status, "read", "R", "4"),
        (
            without_token(&s, &format!("/Patient/{id}"), None).status,
            "read",
            "R",
            "4",
        ),
        (
            without_token(&s, &format!("/Patient/{id}"), Some("not.a.jwt")).status,
            "read",
            "R",
            "4",
        ),
        (
            without_token(&s, &format!("/Patient/{id}"), Some(&observer_token)).status,
            "read",
            "R",
            "4",
        ),
        (
            s.post("/AuditEvent", &json!({"resourceType": "AuditEvent"})).status,
            "create",
            "C",
            "4",
        ),
        (
            s.put(
                &format!("/Patient/{id}"),
                &json!({"resourceType": "Patient", "id": id, "gender": 7}),
            )
            .status,
            "update",
            "U",
            "4",
        ),
        (s.delete(&format!("/Patient/{id}")).status, "delete", "D", "0"),
        (s.get(&format!("/Patient/{id}")).status, "read", "R", "4"),
    ];
    let statuses: Vec<u16> = expected.iter().map(|e| e.0).collect();
    assert_eq!(
        statuses,
        vec![201, 200, 200, 200, 200, 404, 401, 401, 403, 405, 400, 200, 410]
    );
    // metadata is not PHI: not audited
    assert_eq!(without_token(&s, "/metadata", None).status, 200);
    // every event is durable before its response: the count is exact right away (on SQLite
    // reads' events are in the journal until the deriver moves them into the database)
    assert_eq!(durable_event_count(&s), expected.len() as i64);
    s.auditor.flush_blocking().unwrap();
    assert_eq!(s.store.audit_event_count().unwrap(), expected.len() as i64);
    let mut got = events(&s);
    got.reverse();
    assert_eq!(got.len(), expected.len());
    let mut seen: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for e in &got {
        let key = (
            e["subtype"][0]["code"].as_str().unwrap().to_string(),
            e["action"].as_str().unwrap().to_string(),
            e["outcome"].as_str().unwrap().to_string(),
        );
        *seen.entry(key).or_default() += 1;
    }
    let mut want: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for (_, sub, act, out) in &expected {
        *want
            .entry((sub.to_string(), act.to_string(), out.to_string()))
            .or_default() += 1;
    }
    assert_eq!(seen, want);
    // content: a read names the version read and the patient, the agent and the source
    let read = got
        .iter()
        .find(|e| e["subtype"][0]["code"] == "read" && e["outcome"] == "0")
        .unwrap();
    let refs: Vec<&str> = read["entity"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["what"]["reference"].as_str())
        .collect();
    assert!(refs.contains(&format!("Patient/{id}/_history/1").as_str()), "{refs:?}");
    assert_eq!(read["agent"][1]["who"]["identifier"]["value"], "test-client");
    assert_eq!(read["agent"][1]["network"]["address"], "127.0.0.1");
    assert_eq!(read["type"]["code"], "rest");
    assert!(read["recorded"].as_str().unwrap().ends_with('Z'));
    let denied = got
        .iter()
        .find(|e| e["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("403")))
        .unwrap();
    assert_eq!(denied["outcome"], "4");
    let unauthenticated = got
        .iter()
        .filter(|e| e["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("401")))
        .count();
    assert_eq!(unauthenticated, 2);
    // the search above is itself audited, and the chain verifies
    assert_eq!(durable_event_count(&s), expected.len() as i64 + 1);
    let report = run_verify(&s);
    assert_eq!(report.finding, None, "{report:?}");
    assert_eq!(report.checked, expected.len() as u64 + 1);
}

fn fail_closed_when_the_ledger_cannot_be_written(db: Db) {
    let s = TestServer::start(db);
    let created = s.post("/Patient", &patient("Failclosedsentinel"));
    let id = created.json()["id"].as_str().unwrap().to_string();
    let block = match db {
        Db::Sqlite => "CREATE TRIGGER audit_block BEFORE INSERT ON audit_events \
                       BEGIN SELECT RAISE(ABORT, 'audit storage down'); END;"
            .to_string(),
        Db::Postgres => "CREATE FUNCTION audit_block() RETURNS trigger LANGUAGE plpgsql AS \
                         $$ BEGIN RAISE EXCEPTION 'audit storage down'; END; $$; \
                         CREATE TRIGGER audit_block BEFORE INSERT ON audit_events \
                         FOR EACH ROW EXECUTE FUNCTION audit_block();"
            .to_string(),
    };
    s.db.exec(&block).unwrap();
    // a read is refused without data (SQLite: once the journal's events are refused by the
    // database, which the deriver finds within a second; the reads before are durable in the
    // journal)
    let mut r = s.get(&format!("/Patient/{id}"));
    for _ in 0..50 {
        if r.status == 503 || db == Db::Postgres {
            break;
        }
        assert_eq!(r.status, 200);
        std::thread::sleep(std::time::Duration::from_millis(100));
        r = s.get(&format!("/Patient/{id}"));
    }
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.text().contains("Failclosedsentinel"));
    assert_eq!(r.outcome()["issue"][0]["code"], "exception");
    // a write is refused and nothing is stored
    let w = s.post("/Patient", &patient("Neverstored"));
    assert!(w.status >= 500, "{}", w.status);
    let u = s.put(
        &format!("/Patient/{id}"),
        &json!({"resourceType": "Patient", "id": id, "name": [{"family": "Changedname"}]}),
    );
    assert!(u.status >= 500, "{}", u.status);
    s.db.exec("DROP TRIGGER audit_block ON audit_events")
        .or_else(|_| s.db.exec("DROP TRIGGER audit_block"))
        .unwrap();
    // the journaled events go in now, and the writer takes events again
    s.auditor.flush_blocking().unwrap();
    let r = s.get(&format!("/Patient/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["meta"]["versionId"], "1", "the refused update changed nothing");
    assert!(r.text().contains("Failclosedsentinel"));
    let all = s.get("/Patient/_history").json();
    assert_eq!(all["total"], 1, "the refused create stored nothing");
    assert_eq!(run_verify(&s).finding, None);
}

/// Builds a ledger of `n` read events on a fresh server (a checkpoint after every batch).
fn ledger(db: Db, n: usize) -> TestServer {
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            audit_checkpoint_events: Some(1),
            ..Default::default()
        },
    );
    for i in 0..n {
        assert_eq!(s.get(&format!("/Patient/p{i}")).status, 404);
    }
    let report = run_verify(&s);
    assert_eq!(report.finding, None);
    assert_eq!(report.checked, n as u64);
    assert_eq!(s.auditor.chain_id(), 1, "the first node registers chain 1");
    s
}

fn unprotect(s: &TestServer) {
    let sql = match s.db.db {
        Db::Sqlite => {
            "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete; \
                       DROP TRIGGER audit_chain_no_update; DROP TRIGGER audit_chain_no_delete; \
                       DROP TRIGGER audit_entities_no_delete; DROP TRIGGER audit_checkpoints_no_delete; \
                       DROP TRIGGER audit_search_no_update; DROP TRIGGER audit_search_no_delete; \
                       DROP TRIGGER audit_chains_no_delete;"
        }
        Db::Postgres => {
            "ALTER TABLE audit_events DISABLE TRIGGER USER; ALTER TABLE audit_chain DISABLE TRIGGER USER; \
                         ALTER TABLE audit_entities DISABLE TRIGGER USER; ALTER TABLE audit_search DISABLE TRIGGER USER; \
                         ALTER TABLE audit_checkpoints DISABLE TRIGGER USER; ALTER TABLE audit_chains DISABLE TRIGGER USER;"
        }
    };
    s.db.exec(sql).unwrap();
}

/// The event at `seq` of chain 1 (the server's), as SQL.
fn event_at(seq: i64) -> String {
    format!("(SELECT event_id FROM audit_chain WHERE chain_id = 1 AND seq = {seq})")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A binary literal in the test database's SQL.
fn blob(s: &TestServer, b: &[u8]) -> String {
    if s.db.db == Db::Sqlite {
        format!("X'{}'", hex(b))
    } else {
        format!("'\\x{}'::bytea", hex(b))
    }
}

fn verifier_catches_each_kind_of_tampering(db: Db) {
    type Tamper = fn(&TestServer);
    type Expect = fn(&Finding) -> bool;
    let cases: Vec<(&str, Tamper, Expect)> = vec![
        (
            "content replaced",
            |s| {
                s.db.exec(&format!(
                    "UPDATE audit_events SET content = (SELECT content FROM audit_events WHERE id = {}) WHERE id = {}",
                    event_at(3),
                    event_at(5)
                ))
                .unwrap()
            },
            |f| matches!(f, Finding::Edited { chain: 1, seq: 5, .. }),
        ),
        (
            "search column edited",
            |s| {
                s.db.exec(&format!(
                    "UPDATE audit_search SET outcome = '0' WHERE event_id = {}",
                    event_at(6)
                ))
                .unwrap()
            },
            |f| matches!(f, Finding::Edited { chain: 1, seq: 6, .. }),
        ),
        (
            "record deleted",
            |s| {
                s.db.exec(&format!(
                    "DELETE FROM audit_entities WHERE event_id = {e}; DELETE FROM audit_search WHERE event_id = {e}; \
                     DELETE FROM audit_events WHERE id = {e}; DELETE FROM audit_chain WHERE chain_id = 1 AND seq = 4;",
                    e = event_at(4)
                ))
                .unwrap()
            },
            |f| matches!(f, Finding::Deleted { chain: 1, seq: 4, .. }),
        ),
        (
            "records reordered",
            |s| {
                s.db.exec(
                    "UPDATE audit_chain SET seq = -1 WHERE seq = 5; UPDATE audit_chain SET seq = 5 WHERE seq = 6; \
                     UPDATE audit_chain SET seq = 6 WHERE seq = -1;",
                )
                .unwrap()
            },
            |f| matches!(f, Finding::Reordered { chain: 1, seq: 5 }),
        ),
        (
            "record inserted",
            |s| {
                // a well-formed event, sealed with the real key, linked after record 4 with a
                // correct hash; the records after it are renumbered to make room
                use fhirvault::audit::{Action, Agent, AuditRecord, Kind};
                let rec = AuditRecord::new(Kind::Rest("read"), Action::Read, Agent::default());
                let (row, canonical) = rec.seal(s.auditor.source(), s.store.cipher()).unwrap();
                let prev = s.store.audit_link_at(1, 4).unwrap().unwrap().hash;
                let hash = fhirvault::audit::link_hash(&prev, &canonical);
                let content = blob(s, row.content.as_bytes());
                let max = s.store.audit_chain_head(1).unwrap().seq;
                let mut sql = String::new();
                for seq in (5..=max).rev() {
                    sql.push_str(&format!("UPDATE audit_chain SET seq = {} WHERE seq = {seq};", seq + 1));
                }
                let recorded = row.recorded.format("%Y-%m-%d %H:%M:%S%.6f");
                // a complete forgery: its search row too
                sql.push_str(&format!(
                    "INSERT INTO audit_events (id, recorded, key_version, content, chain_id) \
                     VALUES ('{id}', '{recorded}', 1, {content}, 1); \
                     INSERT INTO audit_search (event_id, recorded, type_code, subtype, action, outcome, agent, site) \
                     VALUES ('{id}', '{recorded}', '{}', '{}', '{}', '{}', '{}', '{}'); \
                     INSERT INTO audit_chain (chain_id, seq, event_id, prev_hash, hash) VALUES (1, 5, '{id}', {}, {});",
                    row.type_code,
                    row.subtype,
                    row.action,
                    row.outcome,
                    row.agent,
                    row.site,
                    blob(s, &prev),
                    blob(s, &hash),
                    id = row.id,
                ));
                s.db.exec(&sql).unwrap();
            },
            |f| matches!(f, Finding::Inserted { chain: 1, seq: 5 }),
        ),
        (
            "tail truncated (with its database checkpoints)",
            |s| {
                let max = s.store.audit_chain_head(1).unwrap().seq;
                truncate_chain(s, 1, max - 3);
            },
            |f| {
                matches!(
                    f,
                    Finding::Truncated {
                        chain: 1,
                        last_seq: 7,
                        ..
                    }
                )
            },
        ),
        (
            "event added outside the chain",
            |s| {
                s.db.exec(
                    "INSERT INTO audit_events (id, recorded, key_version, content, chain_id) \
                     SELECT 'forged', recorded, key_version, content, chain_id FROM audit_events LIMIT 1",
                )
                .unwrap()
            },
            |f| matches!(f, Finding::Unchained { event_id } if event_id == "forged"),
        ),
    ];
    for (name, tamper, expect) in cases {
        let s = ledger(db, 10);
        unprotect(&s);
        tamper(&s);
        let report = run_verify(&s);
        let finding = report.finding.unwrap_or_else(|| panic!("{name}: not detected"));
        assert!(expect(&finding), "{name}: {finding}");
    }
}

/// Removes `chain`'s records after `keep` (rows, search rows, links) and every checkpoint in
/// the database: only the checkpoint file outside it is left to tell.
fn truncate_chain(s: &TestServer, chain: i64, keep: i64) {
    let after = format!("(SELECT event_id FROM audit_chain WHERE chain_id = {chain} AND seq > {keep})");
    s.db.exec(&format!(
        "DELETE FROM audit_entities WHERE event_id IN {after}; DELETE FROM audit_search WHERE event_id IN {after}; \
         DELETE FROM audit_events WHERE id IN {after}; \
         DELETE FROM audit_chain WHERE chain_id = {chain} AND seq > {keep}; DELETE FROM audit_checkpoints;"
    ))
    .unwrap()
}

/// Two nodes' chains on one database: the server's (chain 1) and a second node's (chain 2,
/// five events), with checkpoints signed by both covering both.
fn two_nodes(db: Db) -> TestServer {
    let s = ledger(db, 6);
    let second = fhirvault::server::open_auditor(&s.config, &s.store, "second-node").unwrap();
    assert_eq!(second.chain_id(), 2);
    use fhirvault::audit::{Action, Agent, AuditRecord, Kind};
    for _ in 0..5 {
        let mut r = AuditRecord::new(Kind::Rest("read"), Action::Read, Agent::default());
        r.entities.push("Patient/p1".into());
        second.record_blocking(&r).unwrap();
    }
    second.shutdown();
    // the first node signs over both heads too
    assert_eq!(s.get("/Patient/after").status, 404);
    let report = run_verify(&s);
    assert_eq!(report.finding, None, "{report:?}");
    assert_eq!((report.chains, report.checked), (2, 12));
    s
}

fn verifier_catches_a_node_chain_truncated_or_dropped(db: Db) {
    // one node's chain cut short (and every checkpoint in the database removed)
    let s = two_nodes(db);
    unprotect(&s);
    truncate_chain(&s, 2, 3);
    let f = run_verify(&s).finding.expect("truncation detected");
    assert!(
        matches!(
            f,
            Finding::Truncated {
                chain: 2,
                last_seq: 3,
                checkpoint_seq: 5
            }
        ),
        "{f}"
    );
    // one node's chain dropped whole: its rows, its links, its registration
    let s = two_nodes(db);
    unprotect(&s);
    truncate_chain(&s, 2, 0);
    s.db.exec("DELETE FROM audit_chains WHERE id = 2; DELETE FROM audit_index_progress WHERE chain_id = 2;")
        .unwrap();
    let report = run_verify(&s);
    let f = report.finding.expect("dropped chain detected");
    assert!(
        matches!(
            f,
            Finding::Dropped {
                chain: 2,
                checkpoint_seq: 5
            }
        ),
        "{f}"
    );
    assert_eq!(report.chains, 1);
}

fn audit_tables_are_append_only(db: Db) {
    let s = ledger(db, 3);
    for sql in [
        "UPDATE audit_events SET outcome = '0'",
        "DELETE FROM audit_events",
        "UPDATE audit_chain SET hash = prev_hash",
        "DELETE FROM audit_chain",
        "DELETE FROM audit_entities",
        "DELETE FROM audit_checkpoints",
        "UPDATE audit_checkpoints SET key_id = 'x'",
        "UPDATE audit_search SET outcome = '0'",
        "DELETE FROM audit_search",
        "DELETE FROM audit_chains",
        "UPDATE audit_chains SET node = 'x'",
    ] {
        assert!(s.db.exec(sql).is_err(), "{sql} must be refused");
    }
    if db == Db::Postgres {
        assert!(s.db.exec("TRUNCATE audit_events").is_err());
    }
    assert_eq!(run_verify(&s).finding, None);
    // the API refuses to write AuditEvents
    let id = s.get("/AuditEvent?_count=1").json()["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (method, path) in [
        ("POST", "/AuditEvent".to_string()),
        ("PUT", "/AuditEvent?_id=x".to_string()),
        ("DELETE", "/AuditEvent?_id=x".to_string()),
        ("PUT", format!("/AuditEvent/{id}")),
        ("DELETE", format!("/AuditEvent/{id}")),
        ("PATCH", format!("/AuditEvent/{id}")),
    ] {
        let r = s.send(
            method,
            &path,
            Some(&json!({"resourceType": "AuditEvent", "id": id})),
            &[],
        );
        assert_eq!(r.status, 405, "{method} {path}");
    }
    assert_eq!(s.get(&format!("/AuditEvent/{id}")).status, 200);
    // the CapabilityStatement says so
    let cs = s.get("/metadata").json();
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let audit = resources.iter().find(|r| r["type"] == "AuditEvent").unwrap();
    assert_eq!(audit["interaction"], json!([{"code": "read"}, {"code": "search-type"}]));
    assert_eq!(audit["searchParam"].as_array().unwrap().len(), 20);
    let patient = resources.iter().find(|r| r["type"] == "Patient").unwrap();
    assert!(patient["operation"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["name"] == "access-report"));
}

fn audit_log_search_and_access_report(db: Db) {
    let s = TestServer::start(db);
    let p1 = s.post("/Patient", &patient("Accessreportone")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p2 = s.post("/Patient", &patient("Accessreporttwo")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": format!("Patient/{p1}")}});
    let o1 = s.post("/Observation", &obs).json()["id"].as_str().unwrap().to_string();
    // a practitioner reads p1's data
    let doctor = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "user/*.rs".into(),
            fhir_user: Some("Practitioner/doc1".into()),
            client_id: Some("ehr".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let auth = format!("Bearer {doctor}");
    assert_eq!(
        s.get_with(&format!("/Observation/{o1}"), &[("authorization", &auth)])
            .status,
        200
    );
    assert_eq!(
        s.get_with(&format!("/Patient/{p2}"), &[("authorization", &auth)])
            .status,
        200
    );
    // the doctor may not read the audit log (no auditor role)
    assert_eq!(s.get_with("/AuditEvent", &[("authorization", &auth)]).status, 403);
    let auditor = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "user/AuditEvent.rs".into(),
            fhir_user: Some("Practitioner/aud".into()),
            roles: vec!["auditor".into()],
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let aud = format!("Bearer {auditor}");
    let search = |q: &str| {
        let r = s.get_with(&format!("/AuditEvent?{q}"), &[("authorization", &aud)]);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.json()["entry"].as_array().cloned().unwrap_or_default()
    };
    assert_eq!(
        search("agent=Practitioner/doc1").len(),
        3,
        "two reads and a refused search"
    );
    assert_eq!(search(&format!("patient={p1}&agent=Practitioner/doc1")).len(), 1);
    assert_eq!(search(&format!("entity=Observation/{o1}")).len(), 2, "create and read");
    assert_eq!(search("subtype=create&action=C").len(), 3);
    assert_eq!(search("outcome=4").len(), 1, "the doctor's refused audit search");
    // 3 creates, the doctor's 3 requests, the auditor's 5 searches so far
    assert_eq!(
        search("type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest").len(),
        11
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(search(&format!("date={today}&subtype=read")).len(), 2);
    assert_eq!(search("date=lt2000-01-01").len(), 0);
    // paging: one per page, following opaque next links
    let mut url = format!("{}/AuditEvent?subtype=create&_count=1", s.base);
    let mut pages = 0;
    loop {
        let r = Reply::from(
            reqwest::blocking::Client::new()
                .get(&url)
                .header("authorization", &aud)
                .send()
                .unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        pages += 1;
        match r.json()["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(next) => url = next["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    // the auditor sees a search's query; it is not stored in plaintext
    let searches = search("subtype=search-type&agent=Practitioner/aud");
    let queries: Vec<String> = searches
        .iter()
        .flat_map(|e| e["resource"]["entity"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["query"].as_str().map(str::to_string))
        .map(|q| {
            use base64::Engine;
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(q).unwrap()).unwrap()
        })
        .collect();
    // (as the search engine records every query: form-encoded)
    assert!(queries.iter().any(|q| q == "agent=Practitioner%2Fdoc1"), "{queries:?}");
    let at_rest = s.db.bytes_at_rest();
    assert!(!at_rest.windows(22).any(|w| w == b"agent=Practitioner/doc"));
    assert!(!at_rest.windows(24).any(|w| w == b"agent=Practitioner%2Fdoc"));
    // p1 sees who accessed their record, and nothing of p2
    let me = s.token("patient/AuditEvent.rs", Some(&p1));
    let me = format!("Bearer {me}");
    let r = s.get_with(&format!("/Patient/{p1}/$access-report"), &[("authorization", &me)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.contains("Practitioner/doc1"));
    assert!(!text.contains(&p2), "another patient's id leaked into the report");
    assert!(!text.contains("\"query\""));
    assert!(!text.contains("\"network\""));
    let report = r.json();
    assert_eq!(report["type"], "searchset");
    // p1's own events: create of p1, create and read of o1, and the doctor's read
    assert_eq!(report["entry"].as_array().unwrap().len(), 3);
    // p1 cannot ask about p2, nor search the log
    assert_eq!(
        s.get_with(&format!("/Patient/{p2}/$access-report"), &[("authorization", &me)])
            .status,
        404
    );
    assert_eq!(s.get_with("/AuditEvent", &[("authorization", &me)]).status, 403);
}

/// AuditEvent search is the common engine's: `_summary=count`, `_total`, `_sort`, `_elements`,
/// `_include`, `:missing`, `:not`, compartments and paging behave as for every type, on the rows
/// the log derives; parameters those rows do not hold are refused by name, and a malformed
/// value is a 400 as elsewhere.
fn audit_log_search_takes_the_common_result_parameters(db: Db) {
    let s = TestServer::start(db);
    let p1 = s.post("/Patient", &patient("Commonengineone")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p2 = s.post("/Patient", &patient("Commonenginetwo")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s.get(&format!("/Patient/{p1}")).status, 200);
    // the events so far: two creates and a read, all of the default test token
    let auditor = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "user/AuditEvent.rs user/Patient.rs".into(),
            fhir_user: Some("Practitioner/aud2".into()),
            roles: vec!["auditor".into()],
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let aud = format!("Bearer {auditor}");
    let get = |q: &str| s.get_with(&format!("/AuditEvent?{q}"), &[("authorization", &aud)]);
    let ok = |q: &str| {
        let r = get(q);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.json()
    };
    let ids = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    // counted without entries (refused with 400 before)
    let counted = ok("subtype=create&_summary=count");
    assert_eq!(counted["total"], 2, "{counted}");
    assert!(counted.get("entry").is_none());
    assert_eq!(ok("subtype=create,read&_total=accurate")["total"], 3);
    assert!(ok("subtype=create&_total=none").get("total").is_none());
    // newest first by default; _sort orders as asked
    let newest = ids(&ok("subtype=create,read"));
    let oldest = ids(&ok("subtype=create,read&_sort=date"));
    assert_eq!(newest.len(), 3);
    assert_eq!(newest.iter().rev().cloned().collect::<Vec<_>>(), oldest);
    assert_eq!(ids(&ok("subtype=create,read&_sort=-date")), newest);
    let by_subtype = ok("subtype=create,read&_sort=-subtype,date");
    let first = &by_subtype["entry"][0]["resource"];
    assert_eq!(first["subtype"][0]["code"], "read", "{by_subtype}");
    // _elements keeps what was asked (and the mandatory elements)
    let slim = ok("subtype=read&_elements=type,recorded");
    let event = &slim["entry"][0]["resource"];
    assert!(
        event.get("recorded").is_some() && event.get("outcome").is_none(),
        "{event}"
    );
    // _id, :missing, :not, and every date prefix
    assert_eq!(ids(&ok(&format!("_id={}", oldest[0]))), vec![oldest[0].clone()]);
    assert_eq!(ok(&format!("patient=Patient/{p1}&_summary=count"))["total"], 2);
    assert_eq!(ok(&format!("patient={p2}&_summary=count"))["total"], 1);
    assert_eq!(ok("subtype=create&patient:missing=true&_summary=count")["total"], 0);
    assert_eq!(ok("subtype:not=create&subtype=create,read&_summary=count")["total"], 1);
    assert_eq!(
        ok("action=http://hl7.org/fhir/audit-event-action|C&subtype=create&_summary=count")["total"],
        2
    );
    assert_eq!(ok("subtype=http://elsewhere|create&_summary=count")["total"], 0);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(ok(&format!("date=ap{today}&subtype=create&_summary=count"))["total"], 2);
    assert_eq!(ok("date=sa2000-01-01&subtype=create&_summary=count")["total"], 2);
    assert_eq!(ok("_lastUpdated=lt2000-01-01&_summary=count")["total"], 0);
    // the other R4 parameters: site, the client's address (a blind index: whole values),
    // the agent's roles, entity type and role; those fhirvault never records match nothing
    let creates = "subtype=create&_summary=count";
    assert_eq!(ok(&format!("site=fhirvault&{creates}"))["total"], 2);
    assert_eq!(ok(&format!("site=elsewhere&{creates}"))["total"], 0);
    assert_eq!(ok(&format!("address=127.0.0.1&{creates}"))["total"], 2);
    assert_eq!(ok(&format!("address:exact=127.0.0.1&{creates}"))["total"], 2);
    assert_eq!(ok(&format!("address=127.0.0&{creates}"))["total"], 0);
    assert_eq!(ok(&format!("agent-role=admin&{creates}"))["total"], 2);
    assert_eq!(ok(&format!("agent-role=auditor&{creates}"))["total"], 0);
    assert_eq!(ok(&format!("entity-type=1&entity-role=1&{creates}"))["total"], 2);
    assert_eq!(
        ok("entity-type=http://terminology.hl7.org/CodeSystem/audit-entity-type|2&subtype=create&_summary=count")
            ["total"],
        2
    );
    // the auditor's own searches carry their query: entity-role 24
    let searches = ok("entity-role=24&agent=Practitioner/aud2&_summary=count")["total"]
        .as_i64()
        .unwrap();
    assert!(searches >= 10, "{searches}");
    assert_eq!(ok("entity-role=24&subtype=create&_summary=count")["total"], 0);
    for never in [
        "agent-name=x",
        "altid=x",
        "entity-name=x",
        "policy=http://x",
        "source=Device/x",
    ] {
        assert_eq!(ok(&format!("{never}&{creates}"))["total"], 0, "{never}");
    }
    assert_eq!(ok(&format!("agent-name:missing=true&{creates}"))["total"], 2);
    assert_eq!(ok(&format!("site=fhirvault&_sort=site,-date&{creates}"))["total"], 2);
    // no address in plaintext at rest (the events hold it sealed, the search row blinded)
    assert!(!s.db.bytes_at_rest().windows(9).any(|w| w == b"127.0.0.1"));
    // a compartment search of the log: the patient's events only
    let compartment = s.get_with(
        &format!("/Patient/{p2}/AuditEvent?subtype=create"),
        &[("authorization", &aud)],
    );
    assert_eq!(compartment.status, 200, "{}", compartment.text());
    assert_eq!(ids(&compartment.json()).len(), 1);
    // _include reaches the patients the token may read, and no further
    let included = ok("subtype=create&_include=AuditEvent:patient");
    let patients: Vec<&Value> = included["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .collect();
    assert_eq!(patients.len(), 2, "{included}");
    assert!(patients.iter().all(|e| e["resource"]["resourceType"] == "Patient"));
    let log_only = s.token("system/AuditEvent.rs", None);
    let r = s.get_with(
        "/AuditEvent?subtype=create&_include=AuditEvent:patient",
        &[("authorization", &format!("Bearer {log_only}"))],
    );
    assert_eq!(r.status, 200);
    assert!(
        !r.text().contains("\"Patient\""),
        "a patient included without a Patient scope"
    );
    // paging through the common engine's links
    let mut url = format!("{}/AuditEvent?subtype=create,read&_count=2", s.base);
    let mut seen = Vec::new();
    loop {
        let r = Reply::from(
            reqwest::blocking::Client::new()
                .get(&url)
                .header("authorization", &aud)
                .send()
                .unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        seen.extend(ids(&page));
        match page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(next) => url = next["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen, newest, "pages neither repeat nor skip");
    // what the log's rows do not hold is refused by name; malformed values are refused
    for (q, name) in [
        ("address:contains=127", "address:contains"),
        ("_sort=entity-name", "entity-name"),
        ("patient.name=Commonengineone", "patient"),
        ("_has:Observation:subject:status=final", "_has"),
    ] {
        let r = get(q);
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert!(r.text().contains(name), "{q}: {}", r.text());
    }
    for q in ["date=garbage", "_count=many", "subtype=create&_sort=nonsense"] {
        assert_eq!(get(q).status, 400, "{q}");
    }
    // still the log's access rule: a clinician's user/*.rs does not open it
    let doctor = s.token("user/*.rs", None);
    let r = s.get_with(
        "/AuditEvent?_summary=count",
        &[("authorization", &format!("Bearer {doctor}"))],
    );
    assert_eq!(r.status, 403);
    // and in a batch, as alone
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "AuditEvent?subtype=create&_summary=count"}}]});
    let r = s.send("POST", "", Some(&batch), &[("authorization", &aud)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["entry"][0]["resource"]["total"], 2, "{}", r.text());
}

fn archive_exports_before_it_removes_and_keeps_the_chain_verifiable(db: Db) {
    let s = ledger(db, 8);
    let links = s.store.audit_chain_page(1, 0, None, 100).unwrap();
    let (events, _) = s.store.audit_events_by_id(&[links[4].event_id.clone()]).unwrap();
    let cutoff = events[0].recorded; // events 1..=4 are older than this
                                     // the configured retention (six years) archives nothing
    let out = s.db.dir.path().join("archive-none.ndjson");
    let six_years = fhirvault::audit::export::retention_cutoff(s.config.audit_retention_days);
    assert!(
        fhirvault::audit::export::archive(&s.store, s.store.cipher(), six_years, &out, |_| {})
            .unwrap()
            .is_none()
    );
    let out = s.db.dir.path().join("archive.ndjson");
    let (runs, removed) = fhirvault::audit::export::archive(&s.store, s.store.cipher(), cutoff, &out, |_| {})
        .unwrap()
        .expect("events to archive");
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].chain_id, runs[0].up_to_seq, removed), (1, 4, 4));
    assert_eq!(s.store.audit_event_count().unwrap(), 4, "8 events, 4 archived");
    // the archive re-verifies outside fhirvault: strip the chain extension, hash, link
    let text = std::fs::read_to_string(&out).unwrap();
    let mut prev = vec![0u8; 32];
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for line in text.lines() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        let ext = v.as_object_mut().unwrap().remove("extension").unwrap();
        let get = |name: &str| {
            ext[0]["extension"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["url"] == name)
                .unwrap()
                .clone()
        };
        let stated_prev = b64
            .decode(get("prevHash")["valueBase64Binary"].as_str().unwrap())
            .unwrap();
        assert_eq!(stated_prev, prev);
        let bytes = fhirvault::audit::event::canonical_json(&v);
        let hash = fhirvault::audit::link_hash(&prev, &bytes).to_vec();
        assert_eq!(
            b64.decode(get("hash")["valueBase64Binary"].as_str().unwrap()).unwrap(),
            hash
        );
        prev = hash;
    }
    assert_eq!(text.lines().count(), 4);
    // removing archived rows is allowed by the triggers; the rest of the chain still verifies
    let report = run_verify(&s);
    assert_eq!(report.finding, None, "{report:?}");
    assert_eq!(report.checked, 4);
    // younger rows stay protected
    assert!(s.db.exec("DELETE FROM audit_chain WHERE seq = 5").is_err());
    assert!(s.db.exec("DELETE FROM audit_search").is_err());
}

/// No PHI in operational logs: the real binary, with debug logging, is driven with a sentinel
/// in bodies, query strings, headers and paths, and its captured output never holds it.
#[test]
fn operational_logs_hold_no_phi() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_fhirvault");
    let mut child = std::process::Command::new(bin)
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "serve",
        ])
        .env("FHIRVAULT_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let client = reqwest::blocking::Client::new();
    let up = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        client.get(format!("{base}/metadata")).send().is_ok()
    });
    assert!(up, "server did not start");
    let token = String::from_utf8(
        std::process::Command::new(bin)
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "token",
                "--scope",
                "system/*.cruds",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let auth = format!("Bearer {}", token.trim());
    const SENTINEL: &str = "Qzxsentinelphi";
    let body = json!({"resourceType": "Patient", "name": [{"family": SENTINEL}]});
    let created: Value = client
        .post(format!("{base}/Patient"))
        .header("authorization", &auth)
        .header("content-type", "application/fhir+json")
        .header("x-patient-name", SENTINEL)
        .body(body.to_string())
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let requests: Vec<reqwest::blocking::RequestBuilder> = vec![
        client
            .get(format!("{base}/Patient/{id}?name={SENTINEL}"))
            .header("authorization", &auth),
        client
            .get(format!("{base}/Patient/{SENTINEL}"))
            .header("authorization", &auth),
        client
            .get(format!("{base}/Patient?family={SENTINEL}"))
            .header("authorization", &auth),
        client
            .get(format!("{base}/AuditEvent?agent={SENTINEL}"))
            .header("authorization", &auth),
        // invalid content quoting the sentinel where a validator message might echo it
        client
            .post(format!("{base}/Patient"))
            .header("authorization", &auth)
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "Patient", "gender": SENTINEL, "birthDate": SENTINEL}).to_string()),
        client
            .post(format!("{base}/Patient"))
            .header("authorization", &auth)
            .header("content-type", "application/fhir+json")
            .body(format!("{{\"resourceType\": \"Patient\", \"name\": \"{SENTINEL}")),
        client
            .get(format!("{base}/Patient/{id}"))
            .header("authorization", format!("Bearer {SENTINEL}")),
        client
            .get(format!("{base}/Patient/{id}/_history?_since={SENTINEL}"))
            .header("authorization", &auth),
    ];
    for r in requests {
        let reply = r.send().unwrap();
        let status = reply.status().as_u16();
        let text = reply.text().unwrap();
        // error texts never echo it either
        if status >= 400 {
            assert!(!text.contains(SENTINEL), "{status}: {text}");
        }
    }
    let _ = std::process::Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let mut logs = String::new();
    child.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    child.stdout.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(logs.contains("request"), "the requests were logged: {logs}");
    // what a request line holds: method, interaction, request id, agent, status, duration
    for field in [
        "method",
        "route",
        "request_id",
        "client",
        "subject",
        "status",
        "duration_ms",
    ] {
        assert!(logs.contains(field), "{field} missing from the request log:\n{logs}");
    }
    assert!(!logs.contains(SENTINEL), "PHI in logs:\n{logs}");
    assert!(!logs.contains(id), "resource ids (paths) in logs");
}

/// PostgreSQL ends the audit writer's connection (a restarted or failed-over server does the
/// same to every connection): the next read still answers, its event on the node's own chain,
/// claimed again on a new connection; the ledger verifies. (SQLite has no server to lose.)
#[test]
fn the_writer_reconnects_and_keeps_its_chain() {
    let s = TestServer::start(Db::Postgres);
    assert_eq!(s.get("/Patient/before").status, 404);
    let chain = s.auditor.chain_id();
    // the backend holding the chain's advisory lock is the writer's (advisory locks are per
    // database: other tests' servers hold the same keys in theirs)
    let killed = s.db.count(&format!(
        "SELECT COUNT(pg_terminate_backend(pid)) AS n FROM pg_locks \
         WHERE locktype = 'advisory' AND classid = {} AND objid = {chain} \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        0x6676_6175
    ));
    assert_eq!(killed, 1, "the writer's connection holds the chain");
    for i in 0..5 {
        assert_eq!(s.get(&format!("/Patient/after{i}")).status, 404);
    }
    assert_eq!(s.auditor.chain_id(), chain, "the same chain, claimed again");
    assert_eq!(
        s.db.count(&format!(
            "SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND classid = {} AND objid = {chain} \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            0x6676_6175
        )),
        1
    );
    let report = run_verify(&s);
    assert_eq!(report.finding, None, "{report:?}");
    assert_eq!(report.checked, 6);
}

/// SQLite journals reads' events and moves them into the database off the request path: the
/// real binary is killed with SIGKILL while four clients read, and on restart every read
/// that was answered has its AuditEvent in the database (moved from the journal), and the
/// chain verifies.
/// The real binary on a SQLite data directory of its own, started and stopped by the tests.
struct Binary {
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
}

impl Binary {
    fn new() -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        Binary { dir, data }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["--data-dir", self.data.to_str().unwrap()];
        full.extend_from_slice(args);
        std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
            .args(&full)
            .output()
            .unwrap()
    }

    /// Starts a server; its FHIR base once it answers.
    fn start(&self) -> (std::process::Child, String) {
        let port = common::free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
            .args([
                "--data-dir",
                self.data.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "serve",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join(format!("server-{port}.log"))).unwrap())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}/fhir");
        let up = (0..150).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            reqwest::blocking::get(format!("{base}/metadata")).is_ok_and(|r| r.status() == 200)
        });
        assert!(up, "server did not start");
        (child, base)
    }

    fn token(&self) -> String {
        let token = String::from_utf8(self.cli(&["token", "--scope", "system/*.cruds"]).stdout).unwrap();
        format!("Bearer {}", token.trim())
    }
}

fn sigkill(child: &mut std::process::Child) {
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = child.wait();
}

/// SQLite's writes share commits, and each is answered only after the commit that holds it: the
/// real binary is killed with SIGKILL while eight clients create, and after a restart every
/// create that was answered 201 is there, and the audit chains verify.
#[test]
fn killed_sqlite_node_keeps_every_acknowledged_write() {
    let bin = Binary::new();
    let (mut child, base) = bin.start();
    let auth = bin.token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|k| {
            let (base, auth, stop) = (base.clone(), auth.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut acknowledged = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let body = json!({"resourceType": "Patient", "name": [{"family": format!("Killed{k}x{i}")}]});
                    match client
                        .post(format!("{base}/Patient"))
                        .header("authorization", &auth)
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string())
                        .send()
                    {
                        Ok(r) if r.status() == 201 => {
                            let created: Value = r.json().unwrap();
                            acknowledged.push(created["id"].as_str().unwrap().to_string());
                        }
                        Ok(r) => panic!("unexpected {}", r.status()),
                        Err(_) => break, // the server is gone
                    }
                }
                acknowledged
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    sigkill(&mut child);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(
        acknowledged.len() > 20,
        "only {} creates before the kill",
        acknowledged.len()
    );
    let (mut again, base) = bin.start();
    let client = reqwest::blocking::Client::new();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| {
            let r = client
                .get(format!("{base}/Patient/{id}"))
                .header("authorization", &auth)
                .send()
                .unwrap();
            r.status() != 200
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged creates lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
    let _ = std::process::Command::new("kill").arg(again.id().to_string()).status();
    let _ = again.wait();
    let out = bin.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn killed_sqlite_node_loses_no_acknowledged_read_event() {
    let bin = Binary::new();
    let (mut child, base) = bin.start();
    let auth = bin.token();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|k| {
            let (base, auth, answered, stop) = (base.clone(), auth.clone(), answered.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    match client
                        .get(format!("{base}/Patient/absent-{k}-{i}"))
                        .header("authorization", &auth)
                        .send()
                    {
                        // an answer (404 for these ids) means its event was durable
                        Ok(r) if r.status() == 404 => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(r) => panic!("unexpected {}", r.status()),
                        Err(_) => break, // the server is gone
                    }
                }
            })
        })
        .collect();
    // past the deriver's first moves, then in the middle of the next interval
    std::thread::sleep(std::time::Duration::from_millis(1700));
    sigkill(&mut child);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let answered = answered.load(std::sync::atomic::Ordering::Relaxed);
    assert!(answered > 20, "only {answered} reads before the kill");
    // what was journaled and not moved at the kill
    let db_file = bin.data.join("fhirvault.db");
    let db = db_file.to_str().unwrap();
    let journaled: u64 = (1..=2)
        .map(|chain| {
            fhirvault::audit::journal::read_all(&fhirvault::audit::journal::segment_paths(db, chain))
                .unwrap()
                .iter()
                .map(|b| b.rows.len() as u64)
                .sum::<u64>()
        })
        .sum();
    assert!(
        journaled > 0,
        "the kill left nothing in the journal: the test proves nothing"
    );
    let events = || -> u64 {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut c = diesel::SqliteConnection::establish(db).unwrap();
        diesel::sql_query("SELECT COUNT(*) AS n FROM audit_events")
            .get_result::<N>(&mut c)
            .unwrap()
            .n as u64
    };
    assert!(events() < answered, "the database alone lacks answered reads' events");
    // restart: the journal is moved in before the node serves
    let (again, _) = bin.start();
    let _ = std::process::Command::new("kill").arg(again.id().to_string()).status();
    let mut again = again;
    let _ = again.wait();
    // every answered read (and those whose answer the kill cut off) is in the log
    let stored = events();
    let logs: String = std::fs::read_dir(bin.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        stored >= answered,
        "{stored} events in the database for {answered} answered reads ({journaled} journaled at the kill): {logs}"
    );
    let out = bin.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
