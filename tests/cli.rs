//! The `fhirvault` binary: help, configuration errors, safe defaults, migrations, and logs
//! that carry no PHI.

mod common;

use common::{Db, TestDb};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
    // Do not inherit settings from the developer's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRVAULT_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn help_explains_each_command() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "serve",
        "migrate",
        "--config",
        "--listen",
        "--data-dir",
        "--database-url",
        "Run the FHIR server",
        "migrations",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
    let out = bin().args(["serve", "--help"]).output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("--behind-tls-proxy"));
}

#[test]
fn bad_configuration_fails_at_startup_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    type Case = (Vec<String>, Vec<(&'static str, &'static str)>, &'static str);
    let cases: Vec<Case> = vec![
        (vec!["--listen".into(), "not-an-address".into()], vec![], "listen"),
        (
            vec!["--database-url".into(), "mysql://x".into()],
            vec![],
            "database_url",
        ),
        (vec![], vec![("FHIRVAULT_POOL_SIZE", "many")], "FHIRVAULT_POOL_SIZE"),
        (vec![], vec![("FHIRVAULT_KEY", "c2VjcmV0")], "FHIRVAULT_KEY"),
    ];
    for (args, env, setting) in cases {
        let mut c = bin();
        c.arg("serve").arg("--data-dir").arg(dir.path()).args(&args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(setting), "error for {setting} does not name it: {err}");
        assert!(!err.contains("c2VjcmV0"), "key material echoed");
    }
    // a TOML file with a typo and a bad value
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "max_body_bytes = \"big\"\n").unwrap();
    let out = bin().args(["migrate", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_body_bytes"));
    // flags override the environment, which overrides the file
    std::fs::write(&cfg, "listen = \"bad file value\"\n").unwrap();
    let out = bin()
        .args(["serve", "--listen", "0.0.0.0:1"])
        .arg("--config")
        .arg(&cfg)
        .env("FHIRVAULT_LISTEN", "bad env value")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    // the flag's value won (a valid but non-loopback address), so the refusal is about TLS
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn refuses_plaintext_on_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen") && err.contains("--behind-tls-proxy"), "{err}");
    // nothing was created: the check comes before any data is touched
    assert!(!dir.path().join("fhirvault.key").exists());
}

fn migrate_applies_embedded_migrations(db: Db) {
    let t = TestDb::new(db);
    let data = t.dir.path().join("data");
    let run = || {
        bin()
            .arg("migrate")
            .arg("--data-dir")
            .arg(&data)
            .arg("--database-url")
            .arg(&t.database_url)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied"));
    let out = run();
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
    t.exec("SELECT count(*) FROM resource_versions").unwrap();
}

/// Starts `fhirvault serve` on a free loopback port; returns the child and its base URL.
/// The caller kills and waits for the child.
#[allow(clippy::zombie_processes)]
fn spawn_server(t: &TestDb, log_path: &std::path::Path) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(log_path).unwrap();
    let child = bin()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(t.dir.path().join("data"))
        .arg("--database-url")
        .arg(&t.database_url)
        .env("FHIRVAULT_LOG_FORMAT", "json")
        .env("FHIRVAULT_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::blocking::get(format!("{base}/metadata")).is_ok() {
            return (child, base);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "server did not start: {}",
        std::fs::read_to_string(log_path).unwrap_or_default()
    );
}

/// The binary on its defaults: key file created 0600, serves FHIR, and its logs (at debug
/// level) never contain request bodies, query strings or resource content.
fn serve_creates_key_and_logs_no_phi(db: Db) {
    let t = TestDb::new(db);
    let log_path = t.dir.path().join("server.log");
    let (mut child, base) = spawn_server(&t, &log_path);
    let key = t.dir.path().join("data/fhirvault.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    if db == Db::Sqlite {
        let data = t.dir.path().join("data");
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        for f in ["fhirvault.db", "fhirvault.db-wal", "fhirvault.db-shm"] {
            let mode = std::fs::metadata(t.dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
        }
    }
    let sentinel = "Qwzxlogsentinel";
    // `fhirvault token` reads the same settings as `serve` and prints a token it accepts.
    let out = bin()
        .args([
            "token",
            "--scope",
            "system/*.cruds",
            "--client",
            "cli-test",
            "--data-dir",
        ])
        .arg(t.dir.path().join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT on stdout");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let client = reqwest::blocking::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    // without the token: 401
    let r = reqwest::blocking::get(format!("{base}/Patient/x")).unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body = serde_json::json!({"resourceType": "Patient", "name": [{"family": sentinel}], "identifier": [{"value": format!("{sentinel}-id")}]});
    let r = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .header("If-None-Exist", format!("identifier={sentinel}-id"))
        .body(body.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<serde_json::Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let _ = client
        .get(format!("{base}/Patient/{id}?_pretty=true&family={sentinel}"))
        .send()
        .unwrap();
    let _ = client.get(format!("{base}/_history?_since={sentinel}")).send().unwrap();
    let bad = serde_json::json!({"resourceType": "Patient", "gender": sentinel});
    let _ = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(bad.to_string())
        .send()
        .unwrap();
    let _ = client.get(format!("{base}/{sentinel}/x")).send().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("\"route\""), "expected structured request logs:\n{log}");
    assert!(!log.contains(sentinel), "PHI in logs:\n{log}");
    assert!(
        !log.contains(&token) && !log.contains(&token[token.len() - 20..]),
        "token in logs"
    );
    assert!(
        !log.contains("_pretty") && !log.contains("_since"),
        "query string in logs:\n{log}"
    );
    // every line is JSON
    for line in BufReader::new(log.as_bytes()).lines() {
        let line = line.unwrap();
        if !line.trim().is_empty() {
            serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        }
    }
}

on_both_backends!(
    migrate_applies_embedded_migrations,
    serve_creates_key_and_logs_no_phi,
    audit_commands_are_audited_and_name_the_tampered_record
);

/// `token`, `migrate` and the `audit` commands are themselves audited; `audit verify` passes on
/// an intact ledger and fails naming the record after tampering; `audit export` writes NDJSON.
fn audit_commands_are_audited_and_name_the_tampered_record(db: Db) {
    let t = TestDb::new(db);
    let data = t.dir.path().join("data");
    let run = |args: &[&str]| {
        bin()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .arg("--database-url")
            .arg(&t.database_url)
            .output()
            .unwrap()
    };
    assert!(run(&["migrate"]).status.success());
    for _ in 0..3 {
        let out = run(&["token", "--scope", "system/*.rs", "--user", "Practitioner/1"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // stdout is the token alone
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim().split('.').count(), 3);
    }
    // SMART v2 granular scopes are minted; one the server cannot evaluate is refused, saying why
    let out = run(&[
        "token",
        "--scope",
        "system/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["token", "--scope", "system/Observation.rs?date=2020"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("grants nothing"));
    let out = run(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // the command line's own chain (no server ran): chain 1
    assert!(
        text.contains("audit chains intact: 1 chains, 5 records checked"),
        "{text}"
    );
    let out = run(&["audit", "export", "--format", "ndjson"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // migrate, 4 token issues (the last granular), the verify
    assert_eq!(lines.len(), 6);
    let subtypes: Vec<&str> = lines
        .iter()
        .map(|l| l["subtype"][0]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        subtypes,
        [
            "migrate",
            "token-issue",
            "token-issue",
            "token-issue",
            "token-issue",
            "audit-verify"
        ]
    );
    assert_eq!(lines[1]["entity"][0]["what"]["reference"], "Practitioner/1");
    assert!(run(&["audit", "export", "--format", "csv"]).status.code() != Some(0));
    // an attacker edits record 3's search row (the triggers dropped first)
    let unprotect = match db {
        Db::Sqlite => "DROP TRIGGER audit_search_no_update;",
        Db::Postgres => "ALTER TABLE audit_search DISABLE TRIGGER USER;",
    };
    t.exec(unprotect).unwrap();
    t.exec("UPDATE audit_search SET action = 'R' WHERE event_id = (SELECT event_id FROM audit_chain WHERE seq = 3)")
        .unwrap();
    let out = run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chain 1 record 3 was edited"), "{err}");
    // a range before the edit still verifies
    let out = run(&["audit", "verify", "--from", "1", "--to", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
