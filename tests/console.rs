//! The compliance console (`/console`, issue 25 point 2), black box over HTTP on both backends:
//! sign-in through the built-in authorization server's pages with a TOTP second factor, the
//! audit log filtered (patient, user, client, type, outcome, dates) and paged, a patient's access
//! report, a break-glass use issued by `fhirvault token` listed with its reason (sealed at rest)
//! and marked reviewed once, users and clients managed by an admin (disable, reset the second
//! factor) and refused to an auditor, 403 for a user with neither role, the compliance report
//! viewed and downloaded, the CSP, and every one of these an AuditEvent.

mod common;

use common::browser::{now, totp_at, Browser, Page};
use common::{node::bin, Db, TestServer};
use fhirvault::store::auth::ClientRow;
use serde_json::{json, Value};

const PASSWORD: &str = "a long console password";
const REASON: &str = "unconscious patient in the ED";

fn add_user(s: &TestServer, name: &str, roles: &[&str], fhir_user: Option<&str>) {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    let u = fhirvault::auth::server::new_user(name, PASSWORD, fhir_user.map(str::to_string), &roles).unwrap();
    s.store.auth_user_add(&u).unwrap();
}

/// Signs in to the console, enrolling a TOTP second factor; lands on the overview.
fn sign_in(s: &TestServer, user: &str) -> Browser {
    let mut b = Browser::new(s);
    let login = b.get("/console/sign-in");
    assert_eq!(login.status, 200, "{}", login.body);
    assert!(login.body.contains("fhirvault console") && login.body.contains("<label for=\"username\">"));
    let enrol = b.post_with("/auth/login", &login, &[("username", user), ("password", PASSWORD)]);
    assert!(
        enrol.body.contains("/auth/mfa/enrol"),
        "a second factor first: {}",
        enrol.body
    );
    let wrong = b.post_with("/auth/mfa/enrol", &enrol, &[("code", "000000")]);
    assert_eq!(wrong.status, 401, "a wrong code is refused");
    let secret = enrol.secret();
    let landed = b.post_with("/auth/mfa/enrol", &wrong, &[("code", &totp_at(&secret, now()))]);
    assert_eq!(landed.status, 303, "{}", landed.body);
    assert_eq!(
        landed.location.as_deref(),
        Some("/console"),
        "no consent, no code: the console itself"
    );
    b
}

/// The form token of a console page (every action form carries it).
fn csrf(page: &Page) -> String {
    page.hidden().get("csrf").cloned().expect("an action form")
}

fn events(s: &TestServer, subtype: &str) -> Vec<Value> {
    s.audit_events(&format!("?subtype={subtype}&_count=100"))
}

fn console(db: Db) {
    let s = TestServer::start(db);
    add_user(&s, "officer", &["auditor"], Some("Practitioner/officer"));
    add_user(&s, "chief", &["admin"], Some("Practitioner/chief"));
    add_user(&s, "nurse", &["nurse"], Some("Practitioner/nurse"));
    s.store
        .auth_client_add(&ClientRow {
            client_id: "app-x".into(),
            name: "App X".into(),
            client_type: "public".into(),
            secret_hash: None,
            jwks: None,
            jwks_uri: None,
            redirect_uris: "http://127.0.0.1:9/cb".into(),
            scopes: "patient/*.rs".into(),
            disabled: false,
            created_at: fhirvault::store::now(),
        })
        .unwrap();

    // nobody signed in: the sign-in, never a page
    let mut anon = Browser::new(&s);
    for path in [
        "/console",
        "/console/audit",
        "/console/break-glass",
        "/console/accounts",
    ] {
        let r = anon.get(path);
        assert_eq!(
            (r.status, r.location.as_deref()),
            (303, Some("/console/sign-in")),
            "{path}"
        );
    }

    // data, a GP's reads through app-x, and a break-glass use issued by `fhirvault token`
    for p in ["p1", "p2"] {
        assert!(
            s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}))
                .status
                < 300
        );
        let o = json!({"resourceType": "Observation", "id": format!("o-{p}"), "status": "final",
                       "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}});
        assert!(s.put(&format!("/Observation/o-{p}"), &o).status < 300);
    }
    let gp = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "patient/*.rs".into(),
            patient: Some("p1".into()),
            fhir_user: Some("Practitioner/gp".into()),
            client_id: Some("app-x".into()),
            expires_in: 300,
            ..Default::default()
        })
        .unwrap();
    let http = reqwest::blocking::Client::new();
    let get_as = |token: &str, path: &str| {
        http.get(format!("{}{path}", s.base))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // more than a page of events
    for _ in 0..60 {
        assert_eq!(get_as(&gp, "/Patient/p1"), 200);
    }
    let data = s.config.data_dir.clone();
    let out = bin()
        .arg("--data-dir")
        .arg(&data)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .args([
            "token",
            "--scope",
            "patient/*.rs",
            "--patient",
            "p1",
            "--user",
            "Practitioner/er-doc",
            "--expires-in",
            "300",
            "--purpose-of-use",
            "BTG",
            "--reason",
            REASON,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let btg = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        get_as(&btg, "/Observation/o-p2"),
        200,
        "break-glass reaches another patient"
    );
    // a password-guessing burst from this address
    let mut guesser = Browser::new(&s);
    for _ in 0..6 {
        let login = guesser.get("/console/sign-in");
        let r = guesser.post_with("/auth/login", &login, &[("username", "mallory"), ("password", "guess")]);
        assert_eq!(r.status, 401);
    }

    // the auditor
    let mut officer = sign_in(&s, "officer");
    let overview = officer.get("/console");
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview
        .body
        .contains("<strong>1</strong>, of which <strong>1</strong> not yet reviewed"));
    assert!(
        !overview.body.contains("/console/accounts"),
        "no admin section for an auditor"
    );

    // the audit log, filtered
    let by_patient = officer.get("/console/audit?patient=p2");
    assert_eq!(by_patient.status, 200, "{}", by_patient.body);
    assert!(by_patient.body.contains("Observation/o-p2") && by_patient.body.contains("Practitioner/er-doc"));
    assert!(by_patient.body.contains("<td>BTG</td>"));
    assert!(!by_patient.body.contains("Practitioner/gp"), "p1's reads are not p2's");
    let by_client = officer.get("/console/audit?client=app-x");
    assert!(by_client.body.contains("Practitioner/gp") && !by_client.body.contains("Practitioner/er-doc"));
    let by_user = officer.get("/console/audit?user=Practitioner/er-doc&type=rest&outcome=0");
    assert!(by_user.body.contains("Observation/o-p2") && !by_user.body.contains("Practitioner/gp"));
    let failures = officer.get("/console/audit?type=110114&subtype=login-failure");
    assert!(failures.body.contains("login-failure") && failures.body.contains("wrong credentials"));
    let future = officer.get("/console/audit?from=2999-01-01");
    assert!(future.body.contains("0 events shown"), "{}", future.body);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let dated = officer.get(&format!("/console/audit?client=app-x&from={today}&to={today}"));
    assert!(dated.body.contains("Practitioner/gp"));
    let bad = officer.get("/console/audit?patient=a%20b");
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("role=\"alert\""));
    // paging: the next page holds older events than the first
    let first = officer.get("/console/audit?client=app-x");
    assert!(first.body.contains("50 events shown"), "{}", first.body);
    let next = regex::Regex::new(r#"href="(/console/audit\?[^"]*after=[^"]+)" rel="next""#)
        .unwrap()
        .captures(&first.body)
        .expect("a link to older events")[1]
        .replace("&amp;", "&");
    let older = officer.get(&next);
    assert_eq!(older.status, 200);
    assert!(older.body.contains("10 events shown"), "{}", older.body);

    // a patient's access report
    let report = officer.get("/console/access-report?patient=Patient/p2");
    assert_eq!(report.status, 200);
    assert!(report.body.contains("Accesses to Patient/p2") && report.body.contains("Practitioner/er-doc"));

    // break-glass: listed with its reason and its request, reviewed once
    let uses = officer.get("/console/break-glass");
    assert_eq!(uses.status, 200, "{}", uses.body);
    assert!(uses.body.contains(REASON) && uses.body.contains("Practitioner/er-doc"));
    assert!(uses.body.contains(">1 request</a>"), "{}", uses.body);
    let token = uses.hidden().get("token").cloned().expect("a review form");
    let officer_csrf = csrf(&uses);
    let forged = officer.post("/console/break-glass/review", &[("token", &token), ("csrf", "forged")]);
    assert_eq!(forged.status, 400, "a form from elsewhere is refused");
    let reviewed = officer.post_with("/console/break-glass/review", &uses, &[]);
    assert_eq!(reviewed.location.as_deref(), Some("/console/break-glass?done=reviewed"));
    let again = officer.post_with("/console/break-glass/review", &uses, &[]);
    assert_eq!(
        again.location.as_deref(),
        Some("/console/break-glass?done=already-reviewed")
    );
    let after = officer.get("/console/break-glass?done=reviewed");
    assert!(after.body.contains("Reviewed by officer") && after.body.contains("role=\"status\""));
    assert!(!after.body.contains("Mark reviewed"));

    // an auditor cannot reach admin actions
    assert_eq!(officer.get("/console/accounts").status, 403);
    let refused = officer.post(
        "/console/clients/disable",
        &[("client_id", "app-x"), ("csrf", &officer_csrf)],
    );
    assert_eq!(refused.status, 403);
    assert!(!s.store.auth_client("app-x").unwrap().unwrap().disabled);

    // a user with neither role: 403 pages
    let mut nurse = sign_in(&s, "nurse");
    for path in ["/console", "/console/audit", "/console/report"] {
        let r = nurse.get(path);
        assert_eq!(r.status, 403, "{path}");
        assert!(r.body.contains("auditor or admin role"));
    }

    // the admin: disable a client and a user, reset a second factor, never their own account
    let mut chief = sign_in(&s, "chief");
    let accounts = chief.get("/console/accounts");
    assert_eq!(accounts.status, 200, "{}", accounts.body);
    assert!(accounts.body.contains("app-x") && accounts.body.contains("nurse"));
    let c = csrf(&accounts);
    let r = chief.post("/console/clients/disable", &[("client_id", "app-x"), ("csrf", &c)]);
    assert_eq!(r.location.as_deref(), Some("/console/accounts?done=client-disable"));
    assert!(s.store.auth_client("app-x").unwrap().unwrap().disabled);
    let r = chief.post("/console/users/disable", &[("username", "nurse"), ("csrf", &c)]);
    assert_eq!(r.location.as_deref(), Some("/console/accounts?done=user-disable"));
    assert_eq!(
        nurse.get("/console").location.as_deref(),
        Some("/console/sign-in"),
        "a disabled user's session is over"
    );
    let r = chief.post("/console/users/reset-mfa", &[("username", "officer"), ("csrf", &c)]);
    assert_eq!(r.location.as_deref(), Some("/console/accounts?done=user-reset-mfa"));
    assert!(s
        .store
        .auth_user_by_name("officer")
        .unwrap()
        .unwrap()
        .totp_secret
        .is_none());
    assert_eq!(officer.get("/console").status, 303, "a reset ends the sessions");
    let r = chief.post("/console/users/disable", &[("username", "chief"), ("csrf", &c)]);
    assert_eq!(r.location.as_deref(), Some("/console/accounts?done=self"));
    assert!(!s.store.auth_user_by_name("chief").unwrap().unwrap().disabled);

    // a backup (from the shell: the running server derives the CLI's events into the search rows)
    let out = bin()
        .arg("--data-dir")
        .arg(&data)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .args(["backup", "--out"])
        .arg(s.db.dir.path().join("console.fvbackup"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while events(&s, "backup").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup's event was never derived"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // the compliance report: in the console, and downloaded
    let page = chief.get("/console/report");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("164.312(a)(2)(ii)") && page.body.contains("Emergency access procedure"));
    let r = http
        .get(format!("http://{}/console/report/download?format=json", s.addr))
        .header("cookie", chief.cookie.clone().unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let report: Value = r.json().unwrap();
    let section = |citation: &str| {
        report["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["citation"] == citation)
            .cloned()
            .unwrap_or_else(|| panic!("{citation}"))
    };
    let emergency = section("164.312(a)(2)(ii)");
    let used = &emergency["checks"][1]["evidence"]["uses"][0];
    assert_eq!(used["reason"], REASON);
    assert_eq!(used["reviewed_by"], "officer");
    assert_eq!(used["requests"], 1);
    assert_eq!(emergency["checks"][1]["verdict"], "pass", "every use reviewed");
    let bursts = section("164.312(d)")["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "failed sign-in bursts")
        .cloned()
        .unwrap();
    assert_eq!(bursts["verdict"], "attention", "{bursts}");
    assert_eq!(bursts["evidence"]["bursts"][0]["address"], "127.0.0.1");
    assert_eq!(
        section("164.312(b)")["checks"][0]["verdict"],
        "pass",
        "the chains verify"
    );
    let backups = section("164.308(a)(7)(ii)(A)");
    assert_eq!(backups["checks"][0]["verdict"], "pass", "{backups}");
    let r = http
        .get(format!("http://{}/console/report/download?format=html", s.addr))
        .header("cookie", chief.cookie.clone().unwrap())
        .send()
        .unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("style-src 'sha256-") && !csp.contains("unsafe"), "{csp}");
    let html = r.text().unwrap();
    assert!(html.contains("<style>") && html.contains(REASON) && !html.contains("<script"));

    // the console's own pages: no script, a strict policy
    let r = http
        .get(format!("http://{}/console/audit", s.addr))
        .header("cookie", chief.cookie.clone().unwrap())
        .send()
        .unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("form-action 'self'") && !csp.contains("unsafe"));
    assert!(!r.text().unwrap().contains("<script"));

    // every console action is an AuditEvent, naming the console as the client
    for (subtype, at_least) in [
        ("console-overview", 1),
        ("console-audit-log", 9),
        ("console-access-report", 1),
        ("console-break-glass", 2),
        ("break-glass-review", 2),
        ("console-denied", 5),
        ("client-disable", 1),
        ("user-disable", 1),
        ("user-reset-mfa", 1),
        ("compliance-report", 3),
    ] {
        let found = events(&s, subtype);
        assert!(found.len() >= at_least, "{subtype}: {}", found.len());
        assert!(
            found
                .iter()
                .all(|e| e["agent"][1]["who"]["identifier"]["value"] == "fhirvault-console"),
            "{subtype}"
        );
    }
    let denied = events(&s, "console-denied");
    assert!(denied
        .iter()
        .any(|e| e["agent"][0]["who"]["reference"] == "Practitioner/nurse"));

    // the reason is sealed at rest
    let at_rest = s.db.bytes_at_rest();
    assert!(
        !at_rest.windows(REASON.len()).any(|w| w == REASON.as_bytes()),
        "the break-glass reason is never stored in plaintext"
    );
}

on_both_backends!(console);
