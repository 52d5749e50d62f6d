//! Key rotation through the command line: after `keys rotate`, every stored version and audit
//! event is under the new key, reads back with it, the audit chain still verifies, and a
//! version no row uses any more is retired (kept aside for old backups).

mod common;

use common::{Db, TestServer};
use fhirvault::store::{Access, HistoryQuery, HistoryScope};
use serde_json::json;
use std::process::Command;

fn run(s: &TestServer, env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRVAULT_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    c.arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .args(args)
        .output()
        .unwrap()
}

on_both_backends!(
    rotation_reencrypts_everything_and_retires_unused_keys,
    rotation_with_aws_kms
);

fn rotation_reencrypts_everything_and_retires_unused_keys(db: Db) {
    rotation(&TestServer::start(db), &[]);
}

/// The moto KMS emulator (PyPI `moto[server]`, which .ci/run installs) on a loopback port.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto's server from `MOTO_SERVER_BIN` (or the venv .ci/run makes under target/);
/// without it the test is skipped locally, and fails in CI.
fn moto() -> Option<Moto> {
    let bin = std::env::var("MOTO_SERVER_BIN")
        .ok()
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/moto_server");
            p.exists().then_some(p)
        });
    let Some(bin) = bin else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the KMS test: set MOTO_SERVER_BIN (see .ci/run)"
        );
        eprintln!("skipped: moto is not installed (pip install 'moto[server]'; MOTO_SERVER_BIN=…/moto_server)");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting moto_server");
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(moto);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("moto_server did not start");
}

/// The same rotation with AWS KMS as the key provider (envelope encryption against moto): the
/// key file holds only wrapped data keys, everything reads back after rotation and restart,
/// and without KMS nothing starts.
fn rotation_with_aws_kms(db: Db) {
    let Some(moto) = moto() else { return };
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let admin = fhirvault::crypto::kms::KmsClient::from_env(Some(&moto.endpoint), "us-east-1", "none").unwrap();
    let created = admin
        .call("CreateKey", &json!({"Description": "fhirvault test"}))
        .unwrap();
    let key_id = created["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let layer = fhirvault::config::ConfigLayer {
        key_provider: Some("aws-kms".into()),
        kms_key_id: Some(key_id.clone()),
        kms_region: Some("us-east-1".into()),
        kms_endpoint: Some(moto.endpoint.clone()),
        ..Default::default()
    };
    let s = TestServer::start_with(db, layer);
    // the key file holds KMS ciphertext blobs, never a 256-bit key
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&s.config.key_file).unwrap()).unwrap();
    assert_eq!(file["format"], "fhirvault-kms-keyfile-v1");
    assert_eq!(file["kms_key_id"], key_id.as_str());
    use base64::Engine;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(file["keys"]["1"].as_str().unwrap())
        .unwrap();
    assert!(blob.len() > 32, "a wrapped data key, not the key itself");
    let env = vec![
        ("FHIRVAULT_KEY_PROVIDER", "aws-kms".to_string()),
        ("FHIRVAULT_KMS_KEY_ID", key_id.clone()),
        ("FHIRVAULT_KMS_REGION", "us-east-1".to_string()),
        ("FHIRVAULT_KMS_ENDPOINT", moto.endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
    ];
    rotation(&s, &env);
    let status = run(&s, &env, &["keys", "status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains(&format!("AWS KMS key {key_id}")));
    // fail closed: KMS unreachable, or the file opened as a local key file
    let mut dead = s.config.clone();
    dead.key_provider = fhirvault::config::KeyProviderConfig::AwsKms {
        key_id: key_id.clone(),
        region: "us-east-1".into(),
        endpoint: Some("http://127.0.0.1:9".into()),
    };
    let e = fhirvault::server::open_cipher(&dead).unwrap_err();
    assert!(format!("{e:#}").contains("unreachable"), "{e:#}");
    let mut local = s.config.clone();
    local.key_provider = fhirvault::config::KeyProviderConfig::Local;
    let e = fhirvault::server::open_cipher(&local).unwrap_err();
    assert!(format!("{e:#}").contains("KMS-wrapped keys"), "{e:#}");
    // a data key moved to another version does not unwrap (the encryption context binds it)
    assert!(admin.decrypt(2, file["keys"]["1"].as_str().unwrap()).is_err());
    drop(moto);
}

/// Writes, rotates through the CLI (`env`: its key-provider settings), and checks everything.
fn rotation(s: &TestServer, env: &[(&str, String)]) {
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
    // a user's TOTP secret, sealed with the content key
    let mut user = fhirvault::auth::server::new_user("rotated", "a long enough password", None, &[]).unwrap();
    let totp: Vec<u8> = (1..=20).collect();
    user.totp_secret = Some(fhirvault::auth::server::seal_totp(s.store.cipher(), &user.id, &totp).unwrap());
    s.store.auth_user_add(&user).unwrap();
    let totp_under = |store: &fhirvault::store::Store, cipher: &fhirvault::crypto::Cipher| {
        let sealed = store.auth_user(&user.id).unwrap().unwrap().totp_secret.unwrap();
        let sealed = fhirvault::crypto::Sealed::from_stored(sealed);
        let aad = fhirvault::crypto::Aad {
            table: "auth_users",
            resource_type: "totp",
            logical_id: &user.id,
            version_id: 0,
        };
        assert_eq!(cipher.open(&aad, &sealed).unwrap(), totp, "the TOTP secret opens");
        sealed.key_version()
    };

    // every event in the database (SQLite journals reads' events first)
    s.auditor.flush_blocking().unwrap();
    let out = run(s, env, &["keys", "rotate"]);
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
                shared_types: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(page.entries.len(), 4 * 2 + 1);
    assert_eq!(
        totp_under(&store, &cipher),
        Some(2),
        "the TOTP secret is re-encrypted too"
    );
    assert!(page
        .entries
        .iter()
        .filter(|e| !e.deleted)
        .all(|e| String::from_utf8_lossy(e.content.as_ref().unwrap()).contains("Rotatename")));
    // the chain still verifies, and a sealed query still opens
    let out = run(s, env, &["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (events, _) = store
        .audit_events_by_id(
            &store
                .audit_chain_page(1, 0, None, 1000)
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
    let out = run(s, env, &["keys", "rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = run(s, env, &["keys", "status"]);
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
    let cipher = fhirvault::server::open_cipher(&s.config).unwrap();
    assert_eq!(totp_under(&store, &cipher), Some(3));
}
