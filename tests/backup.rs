//! Backup and restore through the command line: a backup of a live server's database, restored
//! into an empty database on a new data directory (holding only the key files), gives back
//! every resource version and every audit row, and the restored ledger verifies. A damaged or
//! truncated backup restores nothing.

mod common;

use common::{pg, Db, TestServer};
use fhirvault::store::{Access, HistoryQuery, HistoryScope};
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn bin(data: &Path, database_url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRVAULT_") {
            c.env_remove(k);
        }
    }
    c.arg("--data-dir").arg(data).arg("--database-url").arg(database_url);
    c
}

/// (type, id, version, deleted, decrypted content)
type Version = (String, String, i64, bool, Option<Vec<u8>>);

/// Every version in the store, decrypted, oldest first.
fn all_versions(store: &fhirvault::store::Store) -> Vec<Version> {
    let page = store
        .history(
            &Access::All,
            &HistoryQuery {
                scope: HistoryScope::System,
                since: None,
                before_row: None,
                count: 10_000,
                patient: None,
                shared_types: Vec::new(),
            },
        )
        .unwrap();
    let mut v: Vec<_> = page
        .entries
        .into_iter()
        .map(|e| (e.resource_type, e.logical_id, e.version_id, e.deleted, e.content))
        .collect();
    v.reverse();
    v
}

/// The server's chain (chain 1) up to `up_to`, as exported.
fn export(store: &fhirvault::store::Store, up_to: i64) -> String {
    let mut out = Vec::new();
    let up_to = std::collections::BTreeMap::from([(1, up_to)]);
    fhirvault::audit::export::export_ndjson(store, store.cipher(), None, Some(&up_to), &mut out, |_| {}).unwrap();
    String::from_utf8(out).unwrap()
}

on_both_backends!(backup_then_restore_gives_back_every_row);

fn backup_then_restore_gives_back_every_row(db: Db) {
    let s = TestServer::start(db);
    for i in 0..5 {
        let p = s.post(
            "/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": format!("Backupname{i}")}]}),
        );
        let id = p.json()["id"].as_str().unwrap().to_string();
        assert_eq!(s.get(&format!("/Patient/{id}")).status, 200);
        if i % 2 == 0 {
            let mut body = p.json();
            body["gender"] = json!("female");
            assert_eq!(s.put(&format!("/Patient/{id}"), &body).status, 200);
        }
        if i == 4 {
            assert_eq!(s.delete(&format!("/Patient/{id}")).status, 200);
        }
    }
    s.auditor.flush_blocking().unwrap();
    let data = s.db.dir.path().join("data");
    let file = s.db.dir.path().join("backup.fvb");
    let out = bin(&data, &s.db.database_url)
        .arg("backup")
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resource_versions:"),
        "progress is shown"
    );
    // no plaintext PHI in the backup file
    let bytes = std::fs::read(&file).unwrap();
    assert!(!bytes.windows(10).any(|w| w == b"Backupname"));
    s.auditor.flush_blocking().unwrap();

    // a new machine: an empty database and only the key files
    let target_dir = tempfile::tempdir().unwrap();
    let target_data = target_dir.path().join("data");
    std::fs::create_dir_all(&target_data).unwrap();
    for key in ["fhirvault.key", "issuer-es256.pem", "audit-ed25519.key"] {
        std::fs::copy(data.join(key), target_data.join(key)).unwrap();
    }
    let target_url = match db {
        Db::Sqlite => format!("sqlite://{}", target_dir.path().join("restored.db").display()),
        Db::Postgres => pg().url(&pg().create_db()),
    };
    // a damaged backup restores nothing
    let damaged = target_dir.path().join("damaged.fvb");
    let mut broken = bytes.clone();
    let mid = broken.len() / 2;
    broken[mid] ^= 0x01;
    std::fs::write(&damaged, &broken).unwrap();
    let out = bin(&target_data, &target_url)
        .arg("restore")
        .arg(&damaged)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truncated = target_dir.path().join("truncated.fvb");
    std::fs::write(&truncated, &bytes[..bytes.len() - 40]).unwrap();
    let out = bin(&target_data, &target_url)
        .arg("restore")
        .arg(&truncated)
        .output()
        .unwrap();
    assert!(!out.status.success());

    let out = bin(&target_data, &target_url)
        .arg("restore")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // restoring twice is refused: the database is no longer empty
    let out = bin(&target_data, &target_url)
        .arg("restore")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // every resource version and every audit row as before
    let restored = fhirvault::store::Store::open(&target_url, None, 2, s.store.shared_cipher()).unwrap();
    assert_eq!(all_versions(&restored), all_versions(&s.store));
    let head = s.store.audit_chain_head(1).unwrap().seq;
    let original = export(&s.store, head);
    assert_eq!(original.lines().count(), 14, "5 creates, 5 reads, 3 updates, 1 delete");
    // the restored ledger holds the server's chain as it was (the commands' own events are
    // in the chain of the command line's node)
    assert_eq!(restored.audit_chain_head(1).unwrap().seq, head);
    assert_eq!(export(&restored, head), original);
    // and it verifies
    let out = bin(&target_data, &target_url)
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // a backup of the previous format (2, whose audit search rows lack site and address)
    // restores without its derived rows, and every chain is derived again from its events
    let format_2 = target_dir.path().join("format-2.fvb");
    let mut older = bytes.clone();
    assert_eq!(&older[..19], b"FHIRVAULT-BACKUP 3\n");
    older[17] = b'2';
    std::fs::write(&format_2, &older).unwrap();
    let older_url = match db {
        Db::Sqlite => format!("sqlite://{}", target_dir.path().join("older.db").display()),
        Db::Postgres => pg().url(&pg().create_db()),
    };
    // (another machine: the first one's checkpoint file now holds that restore's checkpoints)
    let older_data = target_dir.path().join("older-data");
    std::fs::create_dir_all(&older_data).unwrap();
    for key in ["fhirvault.key", "issuer-es256.pem", "audit-ed25519.key"] {
        std::fs::copy(data.join(key), older_data.join(key)).unwrap();
    }
    let out = bin(&older_data, &older_url)
        .arg("restore")
        .arg(&format_2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let older_store = fhirvault::store::Store::open(&older_url, None, 2, s.store.shared_cipher()).unwrap();
    assert_eq!(all_versions(&older_store), all_versions(&s.store));
    assert_eq!(export(&older_store, head), original);
    let first: serde_json::Value = serde_json::from_str(original.lines().next().unwrap()).unwrap();
    let first_id = first["id"].as_str().unwrap().to_string();
    assert!(older_store
        .audit_search_rows_by_id(std::slice::from_ref(&first_id))
        .unwrap()
        .is_empty());
    assert_eq!(older_store.audit_indexed_seq(1).unwrap(), 0);
    // a node serving the restored database derives the chain's search rows again
    let mut node = common::node::Node::start(&older_data, &older_url, common::free_port(), "older");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while older_store.audit_indexed_seq(1).unwrap() < head && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    node.stop();
    assert_eq!(older_store.audit_indexed_seq(1).unwrap(), head, "{}", node.logs());
    let rows = older_store.audit_search_rows_by_id(&[first_id]).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].site, "fhirvault");
    let out = bin(&older_data, &older_url).args(["audit", "verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
