//! Key rotation through the command line: after `keys rotate`, every stored version and audit
//! event is under the new key, reads back with it, the audit chain still verifies, and a
//! version no row uses any more is retired (kept aside for old backups).

mod common;

use common::{Db, TestServer};
use fhirvault::store::{Access, HistoryQuery, HistoryScope};
use serde_json::json;
use std::process::Command;

fn run(s: &TestServer, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRVAULT_") {
            c.env_remove(k);
        }
    }
    c.arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .args(args)
        .output()
        .unwrap()
}

on_both_backends!(rotation_reencrypts_everything_and_retires_unused_keys);

fn rotation_reencrypts_everything_and_retires_unused_keys(db: Db) {
    let s = TestServer::start(db);
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = s.post(
            "/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": format!("Rotatename{i}")}]}),
        );
        let id = r.json()["id"].as_str().unwrap().to_string();
        let mut body = r.json();
        body["gender"] = json!("male");
        assert_eq!(s.put(&format!("/Patient/{id}"), &body).status, 200);
        ids.push(id);
    }
    assert_eq!(s.delete(&format!("/Patient/{}", ids[3])).status, 200);
    // an audit search, whose query is sealed inside its event
    assert_eq!(s.get("/AuditEvent?subtype=create").status, 200);
    s.auditor.flush_blocking().unwrap();

    let out = run(&s, &["keys", "rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rows re-encrypted"),
        "progress is shown"
    );
    // a fresh store with the rotated key file sees everything under version 2
    let cipher = fhirvault::server::open_cipher(&s.config).unwrap();
    assert_eq!(cipher.current_version(), 2);
    let store = fhirvault::store::Store::open(&s.db.database_url, None, 2, cipher.clone()).unwrap();
    let usage = store.key_usage().unwrap();
    assert_eq!(
        usage.resource_versions.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "{usage:?}"
    );
    assert_eq!(
        usage.audit_events.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "{usage:?}"
    );
    // every version reads back (content and digest checked on the way)
    let page = store
        .history(
            &Access::All,
            &HistoryQuery {
                scope: HistoryScope::System,
                since: None,
                before_row: None,
                count: 1000,
                patient: None,
            },
        )
        .unwrap();
    assert_eq!(page.entries.len(), 4 * 2 + 1);
    assert!(page
        .entries
        .iter()
        .filter(|e| !e.deleted)
        .all(|e| String::from_utf8_lossy(e.content.as_ref().unwrap()).contains("Rotatename")));
    // the chain still verifies, and a sealed query still opens
    let out = run(&s, &["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (events, _) = store
        .audit_events_by_id(
            &store
                .audit_chain_page(0, None, 1000)
                .unwrap()
                .into_iter()
                .map(|l| l.event_id)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let with_query = events.iter().any(|e| {
        let aad = fhirvault::crypto::Aad {
            table: "audit_events",
            resource_type: "AuditEvent",
            logical_id: &e.id,
            version_id: 1,
        };
        let mut v: serde_json::Value = serde_json::from_slice(&cipher.open(&aad, &e.content.0).unwrap()).unwrap();
        let before = v.to_string();
        fhirvault::audit::event::reveal_query(&mut v, &cipher);
        before.contains("\"query\"") && v.to_string().contains("\"query\"")
    });
    assert!(with_query, "a search event's query opens after rotation");
    // version 1 stays (blind indexes and sealed queries derive from it); rotate again and the
    // now unused version 2 is retired, kept aside in its own file
    let out = run(&s, &["keys", "rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = run(&s, &["keys", "status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(text.contains("current version: 3"), "{text}");
    assert!(
        text.contains("  v1:") && text.contains("  v3:") && !text.contains("  v2:"),
        "{text}"
    );
    assert!(s.config.key_file.with_extension("key.retired-v2").exists());
    // the retired key's rows are gone: everything still reads with the new file
    let cipher = fhirvault::server::open_cipher(&s.config).unwrap();
    let store = fhirvault::store::Store::open(&s.db.database_url, None, 2, cipher).unwrap();
    for id in &ids[..3] {
        assert!(store.read(&Access::All, "Patient", id).is_ok());
    }
}
