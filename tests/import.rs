//! `fhirvault import` (issue 26), the real binary against a server's database: an export of one
//! server imported into an empty one gives back every resource; the 60 Synthea patients go in
//! whole; refused lines are reported by file and line, never by content, and with
//! `--on-error stop` nothing of their file is applied; an import killed with SIGKILL resumes
//! with nothing imported twice. Each on SQLite and PostgreSQL.

mod common;

use common::{Db, Reply, TestServer};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

fn bin(s: &TestServer) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRVAULT_") {
            c.env_remove(k);
        }
    }
    c.arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url);
    c
}

fn import(s: &TestServer, args: &[&str]) -> std::process::Output {
    bin(s).arg("import").args(args).output().unwrap()
}

/// A resource as compared after an import: without what the server sets.
fn comparable(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            v.as_object_mut().unwrap().remove("meta");
        }
    }
    v
}

fn created_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn wait(s: &TestServer, status: &str) -> Value {
    for _ in 0..300 {
        let r = s.get(status);
        if r.status != 202 {
            assert_eq!(r.status, 200, "{}", r.text());
            return r.json();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("export did not finish");
}

/// Resources of one server exported, and imported into an empty one: every one comes back the
/// same (after canonical JSON, without the server's meta.versionId and meta.lastUpdated).
fn an_export_imported_gives_back_every_resource(db: Db) {
    let source = TestServer::start(db);
    let doctor = created_id(&source.post(
        "/Practitioner",
        &json!({"resourceType": "Practitioner", "name": [{"family": "Importdoc"}]}),
    ));
    for i in 0..4 {
        let pid = created_id(&source.post(
            "/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": format!("Importfam{i}"), "given": ["Ä", "x"]}],
                    "birthDate": format!("1970-01-0{}", i + 1), "identifier": [{"system": "urn:mrn", "value": format!("{i}")}]}),
        ));
        for code in ["1234-5", "9999-9"] {
            created_id(&source.post(
                "/Observation",
                &json!({"resourceType": "Observation", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                        "subject": {"reference": format!("Patient/{pid}")},
                        "performer": [{"reference": format!("Practitioner/{doctor}")}],
                        "valueQuantity": {"value": 7.25, "unit": "mmol/L"}}),
            ));
        }
    }
    let manifest = wait(&source, &common::export_kick_off(&source, "/$export"));
    let dir = tempfile::tempdir().unwrap();
    let mut exported = Vec::new();
    for (n, out) in manifest["output"].as_array().unwrap().iter().enumerate() {
        let text = Reply::from(source.client.get(out["url"].as_str().unwrap()).send().unwrap()).text();
        exported.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
        let path = dir.path().join(format!("{n}.ndjson"));
        std::fs::write(&path, &text).unwrap();
        if n == 0 {
            // one of them gzipped
            assert!(Command::new("gzip").arg(&path).status().unwrap().success());
        }
    }
    assert_eq!(exported.len(), 1 + 4 + 8);
    let target = TestServer::start(db);
    let out = import(&target, &[dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.contains("Observation") && table.contains("total"), "{table}");
    // not a terminal: a plain progress line per file
    let progress = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        progress.lines().filter(|l| l.contains(" resources in ")).count(),
        manifest["output"].as_array().unwrap().len(),
        "{progress}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("total") && l.split_whitespace().nth(1) == Some("13")),
        "{table}"
    );
    for v in &exported {
        let r = target.get(&format!(
            "/{}/{}",
            v["resourceType"].as_str().unwrap(),
            v["id"].as_str().unwrap()
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(comparable(r.json()), comparable(v.clone()));
    }
    // each resource has its AuditEvent, naming it, like a write through the API
    target.auditor.flush_blocking().unwrap();
    let p = exported.iter().find(|v| v["resourceType"] == "Patient").unwrap();
    let r = target.get(&format!("/AuditEvent?entity=Patient/{}", p["id"].as_str().unwrap()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["entry"].as_array().is_some_and(|e| !e.is_empty()),
        "{}",
        r.text()
    );
}

/// Every reference of `expected` to an entry's `urn:uuid:` fullUrl, as the import writes it.
fn rewrite(v: &mut Value, ids: &std::collections::HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference" {
                    if let Some(to) = x.as_str().and_then(|r| ids.get(r)) {
                        *x = json!(to);
                    }
                } else {
                    rewrite(x, ids);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, ids)),
        _ => {}
    }
}

/// The 60 Synthea patients (transaction Bundles, references by urn:uuid fullUrls): every
/// resource stored under its id, the same after the references are rewritten.
fn the_synthea_patients_go_in_whole(db: Db) {
    let dir = common::synthea_dir();
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            request_timeout_secs: Some(600),
            ..Default::default()
        },
    );
    let out = import(&s, &["--format", "bundle", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 60);
    let mut checked = 0;
    for f in files {
        let bundle: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let entries = bundle["entry"].as_array().unwrap();
        let ids: std::collections::HashMap<String, String> = entries
            .iter()
            .map(|e| {
                let t = e["resource"]["resourceType"].as_str().unwrap();
                let id = e["resource"]["id"].as_str().unwrap();
                (e["fullUrl"].as_str().unwrap().to_string(), format!("{t}/{id}"))
            })
            .collect();
        for e in entries {
            let mut expected = e["resource"].clone();
            rewrite(&mut expected, &ids);
            let path = format!(
                "/{}/{}",
                expected["resourceType"].as_str().unwrap(),
                expected["id"].as_str().unwrap()
            );
            let r = s.get(&path);
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(comparable(r.json()), comparable(expected), "{path}");
            checked += 1;
        }
    }
    assert!(checked > 5000, "{checked}");
}

/// Refused input is named by file and line with the reason, never its content; with `stop`
/// nothing of the file is applied, with `skip` the rest is.
fn refused_lines_are_reported_without_their_content(db: Db) {
    let s = TestServer::start(db);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.ndjson");
    let lines = [
        json!({"resourceType": "Patient", "id": "good-1", "gender": "male"}).to_string(),
        "{\"resourceType\": \"Patient\", \"name\": [{\"family\": \"Sentinelbroken".to_string(),
        json!({"resourceType": "Patient", "id": "bad-gender", "gender": "Sentinelgender"}).to_string(),
        json!({"resourceType": "Nosuchtype", "id": "x", "note": "Sentinelnote"}).to_string(),
        String::new(),
        json!({"resourceType": "Patient", "id": "good-2", "name": [{"family": "Kept"}]}).to_string(),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = import(&s, &[file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    for line in [2, 3, 4] {
        assert!(err.contains(&format!("mixed.ndjson:{line}:")), "line {line}: {err}");
    }
    assert!(!err.contains("Sentinel"), "content in the report: {err}");
    assert_eq!(
        s.get("/Patient/good-1").status,
        404,
        "stop: nothing of the file applied"
    );
    assert_eq!(s.get("/Patient/good-2").status, 404);
    let out = import(&s, &["--on-error", "skip", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.get("/Patient/good-1").status, 200);
    assert_eq!(s.get("/Patient/good-2").json()["name"][0]["family"], "Kept");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Patient") && l.split_whitespace().collect::<Vec<_>>()[1..4] == ["2", "0", "1"]),
        "{table}"
    );
}

/// Killed with SIGKILL in the middle, then `--resume`: every resource is there, and none was
/// written twice (each has one version).
fn a_killed_import_resumes_without_duplicates(db: Db) {
    let s = TestServer::start(db);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.ndjson");
    let n = 6000;
    let body: Vec<String> = (0..n)
        .map(|i| {
            json!({"resourceType": "Patient", "id": format!("r{i}"), "name": [{"family": format!("Resume{i}")}]})
                .to_string()
        })
        .collect();
    std::fs::write(&file, body.join("\n")).unwrap();
    let mut child = bin(&s)
        .arg("import")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // kill it once a few chunks are recorded
    let imports = s.config.data_dir.join("imports");
    let mut killed = false;
    for _ in 0..600 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let positions: Vec<_> = std::fs::read_dir(&imports)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "position"))
                    .collect()
            })
            .unwrap_or_default();
        let line = positions
            .first()
            .and_then(|e| std::fs::read(e.path()).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["line"].as_u64())
            .unwrap_or(0);
        if line >= 1500 {
            assert!(Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status()
                .unwrap()
                .success());
            killed = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
    }
    let _ = child.wait();
    assert!(killed, "the import ended before it could be killed");
    let stored =
        s.db.count("SELECT COUNT(*) AS n FROM resources WHERE resource_type = 'Patient'");
    assert!(stored > 0 && stored < n, "{stored}");
    let out = import(&s, &["--resume", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        s.db.count("SELECT COUNT(*) AS n FROM resources WHERE resource_type = 'Patient'"),
        n
    );
    assert_eq!(
        s.db.count("SELECT COUNT(*) AS n FROM resource_versions WHERE resource_type = 'Patient'"),
        n,
        "a resource was imported twice"
    );
    assert!(!imports
        .read_dir()
        .unwrap()
        .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "position")));
}

on_both_backends!(
    an_export_imported_gives_back_every_resource,
    the_synthea_patients_go_in_whole,
    refused_lines_are_reported_without_their_content,
    a_killed_import_resumes_without_duplicates
);
