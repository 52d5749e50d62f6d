//! `fhirvault compliance report` (issue 25, point 1 in part): run from the shell against a
//! deployment's configuration and database, a verdict and its reason per check of 45 CFR
//! 164.312, as JSON and as one self-contained HTML file; audited; exits 1 when a check fails.
//! On SQLite and on PostgreSQL (as the tables' owner, where row-level security does not bind,
//! and as a dedicated role, where it does).

mod common;

use common::{node::bin, pg, Db, TestDb};
use serde_json::Value;
use std::path::Path;

const BTG_REASON: &str = "cardiac arrest in the waiting room";

fn run(data: &Path, url: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    bin()
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--database-url")
        .arg(url)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn check<'a>(report: &'a Value, citation: &str, name: &str) -> &'a Value {
    report["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["citation"] == citation)
        .unwrap_or_else(|| panic!("no section {citation}"))["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {citation}"))
}

fn report_on(db: Db) {
    let t = TestDb::new(db);
    let data = t.dir.path().join("data");
    let url = t.database_url.clone();
    assert!(run(&data, &url, &[], &["migrate"]).status.success());
    let out = run(
        &data,
        &url,
        &[],
        &["admin", "user", "add", "officer", "--role", "auditor"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // a break-glass token: its use is listed with its reason
    let out = run(
        &data,
        &url,
        &[],
        &[
            "token",
            "--scope",
            "user/*.rs",
            "--user",
            "Practitioner/er-doc",
            "--purpose-of-use",
            "BTG",
            "--reason",
            BTG_REASON,
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refused = run(
        &data,
        &url,
        &[],
        &[
            "token",
            "--scope",
            "user/*.rs",
            "--user",
            "Practitioner/er-doc",
            "--purpose-of-use",
            "BTG",
        ],
    );
    assert!(!refused.status.success(), "break-glass without a reason is refused");
    let json_path = t.dir.path().join("report.json");
    let out = run(
        &data,
        &url,
        &[],
        &[
            "compliance",
            "report",
            "--format",
            "json",
            "--out",
            json_path.to_str().unwrap(),
        ],
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    for citation in [
        "164.312(a)(1)",
        "164.312(a)(2)(ii)",
        "164.312(a)(2)(iii)",
        "164.312(a)(2)(iv)",
        "164.312(b)",
        "164.312(d)",
        "164.312(e)(1)",
    ] {
        assert!(
            report["sections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["citation"] == citation),
            "{citation} missing"
        );
    }
    let chains = check(&report, "164.312(b)", "audit chains verified end to end");
    assert_eq!(chains["verdict"], "pass", "{chains}");
    let accounts = check(
        &report,
        "164.312(a)(1)",
        "accounts of the built-in authorization server",
    );
    assert_eq!(accounts["evidence"]["users"][0]["username"], "officer");
    let review = check(&report, "164.312(a)(1)", "access review: accounts unused for 90 days");
    assert_eq!(review["verdict"], "pass", "a new account is not yet unused: {review}");
    let mfa = check(&report, "164.312(d)", "accounts without a second factor");
    assert_eq!(mfa["verdict"], "attention", "the officer has not enrolled yet: {mfa}");
    let uses = check(&report, "164.312(a)(2)(ii)", "break-glass uses in the period");
    assert_eq!(uses["verdict"], "attention", "not reviewed yet: {uses}");
    assert_eq!(uses["evidence"]["uses"].as_array().unwrap().len(), 1, "{uses}");
    assert_eq!(uses["evidence"]["uses"][0]["reason"], BTG_REASON);
    assert_eq!(uses["evidence"]["uses"][0]["user"], "Practitioner/er-doc");
    let backups = check(&report, "164.308(a)(7)(ii)(A)", "backups written");
    assert_eq!(backups["verdict"], "attention", "none yet: {backups}");
    let bursts = check(&report, "164.312(d)", "failed sign-in bursts");
    assert_eq!(bursts["verdict"], "pass", "{bursts}");
    let rls = check(&report, "164.312(a)(1)", "row-level security binds the serving role");
    match db {
        Db::Sqlite => {
            assert_eq!(rls["verdict"], "attention", "{rls}");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        Db::Postgres => {
            // the test connects as the tables' owner: row-level security does not bind it
            assert_eq!(rls["verdict"], "fail", "{rls}");
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("164.312(a)(1)"));
            // served as a dedicated role, with migrations as the owner: it binds
            let name = t.pg_name.clone().unwrap();
            let role = format!("app_{name}");
            pg().admin(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"));
            let owner = pg().url(&name);
            let out = run(
                &data,
                &pg().url_as(&role, &name),
                &[("FHIRVAULT_MIGRATION_DATABASE_URL", owner.as_str())],
                &["migrate"],
            );
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let out = run(
                &data,
                &pg().url_as(&role, &name),
                &[("FHIRVAULT_MIGRATION_DATABASE_URL", owner.as_str())],
                &["compliance", "report", "--format", "json"],
            );
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            let rls = check(&report, "164.312(a)(1)", "row-level security binds the serving role");
            assert_eq!(rls["verdict"], "pass", "{rls}");
            // the serving role reads the break-glass uses (and their sealed reasons) too
            let uses = check(&report, "164.312(a)(2)(ii)", "break-glass uses in the period");
            assert_eq!(uses["evidence"]["uses"][0]["reason"], BTG_REASON);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }

    // an account made 100 days ago and never used since is one to review
    let old = match db {
        Db::Sqlite => "datetime('now', '-100 days')",
        Db::Postgres => "now() - interval '100 days'",
    };
    t.exec(&format!(
        "UPDATE auth_users SET created_at = {old} WHERE username = 'officer'"
    ))
    .unwrap();
    let out = run(&data, &url, &[], &["compliance", "report", "--format", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let review = check(&report, "164.312(a)(1)", "access review: accounts unused for 90 days");
    assert_eq!(review["verdict"], "attention", "{review}");
    assert_eq!(review["evidence"]["users"][0]["username"], "officer");

    // the HTML: one file, no script, nothing fetched from elsewhere
    let html_path = t.dir.path().join("report.html");
    let _ = run(
        &data,
        &url,
        &[],
        &["compliance", "report", "--out", html_path.to_str().unwrap()],
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("164.312(b)") && html.contains("Audit controls"));
    for forbidden in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(forbidden), "{forbidden} in the report");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&html_path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // each run is on the ledger
    let out = run(&data, &url, &[], &["audit", "export", "--format", "ndjson"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("compliance-report").count() >= 2, "{text}");
}

#[test]
fn compliance_report_on_sqlite() {
    report_on(Db::Sqlite);
}

#[test]
fn compliance_report_on_postgres() {
    report_on(Db::Postgres);
}

/// `fhirvault restore --drill`: a backup restored into a scratch database and its audit log
/// verified, the drill recorded here; the report's "last verified restore" follows the last
/// drill (a damaged backup fails it), and the scratch database is removed either way.
fn restore_drill_on(db: Db) {
    let t = TestDb::new(db);
    let data = t.dir.path().join("data");
    let url = t.database_url.clone();
    assert!(run(&data, &url, &[], &["migrate"]).status.success());
    let out = run(&data, &url, &[], &["token", "--scope", "system/*.rs"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = t.dir.path().join("drill.fvbackup");
    let out = run(&data, &url, &[], &["backup", "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&data, &url, &[], &["restore", "--drill", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("restore drill passed"));
    let report = |name: &str| -> Value {
        let out = run(&data, &url, &[], &["compliance", "report", "--format", "json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        check(&report, "164.308(a)(7)(ii)(A)", name).clone()
    };
    let drill = report("last verified restore");
    assert_eq!(drill["verdict"], "pass", "{drill}");
    assert_eq!(report("backups written")["verdict"], "pass");
    // a damaged backup: the drill fails, and says so in the report
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let damaged = t.dir.path().join("damaged.fvbackup");
    std::fs::write(&damaged, &bytes).unwrap();
    let out = run(&data, &url, &[], &["restore", "--drill", damaged.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drill = report("last verified restore");
    assert_eq!(drill["verdict"], "fail", "{drill}");
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("restore-drill-"))
        .collect();
    assert!(left.is_empty(), "the scratch databases are removed");
}

#[test]
fn restore_drill_on_sqlite() {
    restore_drill_on(Db::Sqlite);
}

#[test]
fn restore_drill_on_postgres() {
    restore_drill_on(Db::Postgres);
}

/// The listener's certificate: a certificate that expires within 30 days needs attention, one
/// that expired fails the report.
#[test]
fn certificate_expiry_is_reported() {
    let t = TestDb::new(Db::Sqlite);
    let data = t.dir.path().join("data");
    let url = t.database_url.clone();
    assert!(run(&data, &url, &[], &["migrate"]).status.success());
    let make = |days: &str, name: &str| {
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args(["-days", days, "-subj", "/CN=fhirvault.test"])
            .arg("-keyout")
            .arg(t.dir.path().join(format!("{name}.key")))
            .arg("-out")
            .arg(t.dir.path().join(format!("{name}.pem")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        use std::os::unix::fs::PermissionsExt;
        let key = t.dir.path().join(format!("{name}.key"));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (t.dir.path().join(format!("{name}.pem")), key)
    };
    let verdict_for = |cert: &Path, key: &Path| -> (Value, bool) {
        let out = run(
            &data,
            &url,
            &[
                ("FHIRVAULT_TLS_CERT_FILE", cert.to_str().unwrap()),
                ("FHIRVAULT_TLS_KEY_FILE", key.to_str().unwrap()),
            ],
            &["compliance", "report", "--format", "json"],
        );
        let report: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (
            check(&report, "164.312(e)(1)", "the server's certificate").clone(),
            out.status.success(),
        )
    };
    let (cert, key) = make("400", "long");
    let (c, _) = verdict_for(&cert, &key);
    assert_eq!(c["verdict"], "pass", "{c}");
    assert!(c["evidence"]["subject"].as_str().unwrap().contains("fhirvault.test"));
    let (cert, key) = make("10", "short");
    let (c, ok) = verdict_for(&cert, &key);
    assert_eq!(c["verdict"], "attention", "{c}");
    assert!(c["reason"].as_str().unwrap().contains("expires in"));
    assert!(ok, "attention is not a failure");
}
