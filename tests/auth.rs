//! Authentication and authorization at the HTTP edge, on SQLite and PostgreSQL.

mod common;

use common::{Db, Reply, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn call(s: &TestServer, method: &str, path: &str, auth: Option<&str>, body: Option<&Value>) -> Reply {
    // A client without the harness's default token.
    let c = reqwest::blocking::Client::new();
    let mut r = c.request(method.parse().unwrap(), s.url(path));
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    if let Some(b) = body {
        r = r.header("content-type", "application/fhir+json").body(b.to_string());
    }
    Reply::from(r.send().unwrap())
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A bearer header for a token from the server's own issuer.
fn issue(s: &TestServer, req: fhirvault::auth::TokenRequest) -> String {
    bearer(&s.issuer.issue(&req).unwrap())
}

/// The server's own signing key, to forge tokens that differ in one claim only.
fn signing_key(s: &TestServer) -> EncodingKey {
    let pem = std::fs::read(s.db.dir.path().join("data/issuer-es256.pem")).unwrap();
    EncodingKey::from_ec_pem(&pem).unwrap()
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn claims(now: i64) -> Value {
    json!({
        "iss": "urn:fhirvault:local", "aud": "urn:fhirvault:local:fhir", "sub": "x",
        "exp": now + 300, "nbf": now - 10, "iat": now - 10, "jti": "j", "scope": "system/*.cruds"
    })
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn assert_invalid_token(r: &Reply, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    let www = r.header("www-authenticate").unwrap_or("");
    assert!(
        www.starts_with("Bearer") && www.contains("error=\"invalid_token\""),
        "{what}: {www}"
    );
    r.outcome();
}

fn every_token_fault_is_a_401(db: Db) {
    let s = TestServer::start(db);
    let id = s.post("/Patient", &json!({"resourceType": "Patient"})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/Patient/{id}");
    // no credentials: 401 with a bare challenge
    let r = call(&s, "GET", &path, None, None);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"fhirvault\""));
    r.outcome();
    // metadata needs none
    assert_eq!(call(&s, "GET", "/metadata", None, None).status, 200);

    let good = s.token("system/*.cruds", None);
    assert_eq!(call(&s, "GET", &path, Some(&bearer(&good)), None).status, 200);
    let key = signing_key(&s);
    let kid = kid_of(&good);
    let now = chrono::Utc::now().timestamp();
    let forge = |claims: &Value| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    };
    // sanity: a forged token with the right claims is accepted, so each case below fails for its one fault
    assert_eq!(
        call(&s, "GET", &path, Some(&bearer(&forge(&claims(now)))), None).status,
        200
    );

    let mut cases: Vec<(&str, String)> = vec![
        ("malformed", "Bearer not.a.token".into()),
        ("not a JWT", "Bearer abc".into()),
        ("empty bearer", "Bearer ".into()),
        ("wrong scheme", format!("Basic {good}")),
    ];
    let mut c = claims(now);
    c["exp"] = json!(now - 60);
    cases.push(("expired", bearer(&forge(&c))));
    let mut c = claims(now);
    c["nbf"] = json!(now + 600);
    cases.push(("not yet valid", bearer(&forge(&c))));
    let mut c = claims(now);
    c["iss"] = json!("https://evil.example");
    cases.push(("wrong issuer", bearer(&forge(&c))));
    let mut c = claims(now);
    c["aud"] = json!("https://other.example/fhir");
    cases.push(("wrong audience", bearer(&forge(&c))));
    let mut c = claims(now);
    c.as_object_mut().unwrap().remove("sub");
    cases.push(("missing sub", bearer(&forge(&c))));
    // alg none
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string().as_bytes()),
        b64(claims(now).to_string().as_bytes())
    );
    cases.push(("alg none", bearer(&none)));
    // HS256 keyed with the public key (algorithm confusion)
    let secret = p256::pkcs8::DecodePrivateKey::from_pkcs8_pem(
        &std::fs::read_to_string(s.db.dir.path().join("data/issuer-es256.pem")).unwrap(),
    )
    .map(|k: p256::SecretKey| {
        use p256::pkcs8::EncodePublicKey;
        k.public_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap()
    })
    .unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.clone());
    let hs = jsonwebtoken::encode(&h, &claims(now), &EncodingKey::from_secret(secret.as_bytes())).unwrap();
    cases.push(("HS/ES confusion", bearer(&hs)));
    // a signature that does not match
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    let mut payload: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &parts[1]).unwrap(),
    )
    .unwrap();
    payload["scope"] = json!("system/*.cruds user/*.cruds");
    parts[1] = b64(payload.to_string().as_bytes());
    cases.push(("bad signature", bearer(&parts.join("."))));
    // another key, same kid
    let other = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let other_pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&other, p256::pkcs8::LineEnding::LF).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.clone());
    let foreign = jsonwebtoken::encode(
        &h,
        &claims(now),
        &EncodingKey::from_ec_pem(other_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    cases.push(("foreign key", bearer(&foreign)));
    for (what, auth) in &cases {
        let r = call(&s, "GET", &path, Some(auth), None);
        if *what == "wrong scheme" || *what == "empty bearer" {
            assert_eq!(r.status, 401, "{what}");
            r.outcome();
        } else {
            assert_invalid_token(&r, what);
        }
        assert!(!r.text().contains(&good), "the token is never echoed");
    }
    // every interaction is guarded, not only read
    for (m, p) in [
        ("GET", format!("{path}/_history")),
        ("GET", format!("{path}/_history/1")),
        ("GET", "/Patient/_history".to_string()),
        ("GET", "/_history".to_string()),
        ("DELETE", path.clone()),
    ] {
        assert_eq!(call(&s, m, &p, None, None).status, 401, "{m} {p}");
    }
    let body = json!({"resourceType": "Patient", "id": id});
    assert_eq!(call(&s, "PUT", &path, None, Some(&body)).status, 401);
    assert_eq!(call(&s, "POST", "/Patient", None, Some(&body)).status, 401);
    // nothing was changed by the refused requests
    assert_eq!(s.get(&format!("{path}/_history")).json()["total"], 1);
}

fn scopes_decide_by_type_and_interaction(db: Db) {
    let s = TestServer::start(db);
    let pid = s.post("/Patient", &json!({"resourceType": "Patient"})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    let oid = s.post("/Observation", &obs).json()["id"].as_str().unwrap().to_string();
    let read_patients = bearer(&s.token("system/Patient.r", None));
    assert_eq!(
        call(&s, "GET", &format!("/Patient/{pid}"), Some(&read_patients), None).status,
        200
    );
    assert_eq!(
        call(
            &s,
            "GET",
            &format!("/Patient/{pid}/_history/1"),
            Some(&read_patients),
            None
        )
        .status,
        200
    );
    let r = call(&s, "GET", &format!("/Observation/{oid}"), Some(&read_patients), None);
    assert_eq!(r.status, 403);
    assert!(r.header("www-authenticate").unwrap().contains("insufficient_scope"));
    r.outcome();
    assert_eq!(
        call(
            &s,
            "POST",
            "/Patient",
            Some(&read_patients),
            Some(&json!({"resourceType": "Patient"}))
        )
        .status,
        403
    );
    assert_eq!(
        call(&s, "DELETE", &format!("/Patient/{pid}"), Some(&read_patients), None).status,
        403
    );
    assert_eq!(
        call(&s, "GET", "/Patient/_history", Some(&read_patients), None).status,
        403,
        "type history needs s"
    );
    // v1 scopes
    let v1 = bearer(&s.token("user/Observation.read", None));
    assert_eq!(
        call(&s, "GET", &format!("/Observation/{oid}"), Some(&v1), None).status,
        200
    );
    assert_eq!(call(&s, "GET", "/Observation/_history", Some(&v1), None).status, 200);
    assert_eq!(
        call(&s, "GET", "/_history", Some(&v1), None).status,
        403,
        "system history needs every type"
    );
    // unknown scopes, and granular ones whose condition the server cannot evaluate, grant
    // nothing (granular scopes that it can: `granular_scopes`)
    for scope in [
        "system/Observation.rs?date=2020",
        "system/Observatio.rs",
        "sys/*.cruds",
        "system/*.rx",
    ] {
        let t = bearer(&s.token(scope, None));
        assert_eq!(
            call(&s, "GET", &format!("/Observation/{oid}"), Some(&t), None).status,
            403,
            "{scope}"
        );
    }
    // update-as-create needs c as well as u, and leaves nothing behind when refused
    let u_only = bearer(&s.token("system/Patient.ru", None));
    let body = json!({"resourceType": "Patient", "id": "new-one"});
    assert_eq!(
        call(&s, "PUT", "/Patient/new-one", Some(&u_only), Some(&body)).status,
        403
    );
    assert_eq!(s.get("/Patient/new-one").status, 404);
    let mut existing = s.get(&format!("/Patient/{pid}")).json();
    existing["active"] = json!(true);
    assert_eq!(
        call(&s, "PUT", &format!("/Patient/{pid}"), Some(&u_only), Some(&existing)).status,
        200
    );
    // conditional create is also a search and a read
    let c_only = bearer(&s.token("system/Patient.c", None));
    let c = reqwest::blocking::Client::new()
        .post(s.url("/Patient"))
        .header("authorization", &c_only)
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", format!("_id={pid}"))
        .body(json!({"resourceType": "Patient"}).to_string())
        .send()
        .unwrap();
    assert_eq!(c.status().as_u16(), 403);
    assert_eq!(
        call(
            &s,
            "POST",
            "/Patient",
            Some(&c_only),
            Some(&json!({"resourceType": "Patient"}))
        )
        .status,
        201
    );
}

/// A patient-context token reaches its patient's compartment and nothing else: other patients'
/// data answers exactly like absent data (404); writes must stay inside the compartment, before
/// and after; listings (type and system history) hold only the compartment.
fn patient_context_sees_only_its_compartment(db: Db) {
    let s = TestServer::start(db);
    let mut p1 = json!({"resourceType": "Patient", "id": "p1"});
    assert_eq!(s.put("/Patient/p1", &p1).status, 201);
    assert_eq!(
        s.put("/Patient/p2", &json!({"resourceType": "Patient", "id": "p2"}))
            .status,
        201
    );
    let obs = |patient: &str| {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": format!("Patient/{patient}")}})
    };
    let mine = s.post("/Observation", &obs("p1")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let theirs = s.post("/Observation", &obs("p2")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let org = s
        .post("/Organization", &json!({"resourceType": "Organization", "name": "x"}))
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Binary lies outside every compartment and is never shared (it may hold anyone's document)
    let binary = s
        .post(
            "/Binary",
            &json!({"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="}),
        )
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = bearer(&s.token("patient/*.rs launch/patient", Some("p1")));
    // an Organization is shared: readable in any patient's context (issue 21)
    assert_eq!(
        call(&s, "GET", &format!("/Organization/{org}"), Some(&t), None).status,
        200
    );
    for path in ["/Patient/p1", "/Patient/p1/_history", "/Patient/p1/_history/1"] {
        assert_eq!(call(&s, "GET", path, Some(&t), None).status, 200, "{path}");
    }
    assert_eq!(
        call(&s, "GET", &format!("/Observation/{mine}"), Some(&t), None).status,
        200
    );
    assert_eq!(
        call(&s, "GET", &format!("/Observation/{mine}/_history/1"), Some(&t), None).status,
        200
    );
    // restricted history carries no total (it could count versions the token cannot see)
    let h = call(&s, "GET", &format!("/Observation/{mine}/_history"), Some(&t), None).json();
    assert!(h.get("total").is_none());
    assert_eq!(h["entry"].as_array().unwrap().len(), 1);
    // other patients' data, and data outside any compartment that is not shared, looks exactly
    // like absent data
    let absent = call(&s, "GET", "/Observation/nobody", Some(&t), None);
    for path in [
        "/Patient/p2".to_string(),
        format!("/Observation/{theirs}"),
        format!("/Observation/{theirs}/_history/1"),
        format!("/Binary/{binary}"),
    ] {
        let r = call(&s, "GET", &path, Some(&t), None);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.text(), absent.text(), "{path}");
    }
    assert_eq!(
        call(&s, "GET", &format!("/Observation/{theirs}/_history"), Some(&t), None).status,
        404
    );
    // a resource moved out of the compartment disappears from the patient's view, history included
    let mut moved = s.get(&format!("/Observation/{mine}")).json();
    moved["subject"] = json!({"reference": "Patient/p2"});
    assert_eq!(s.put(&format!("/Observation/{mine}"), &moved).status, 200);
    assert_eq!(
        call(&s, "GET", &format!("/Observation/{mine}"), Some(&t), None).status,
        404
    );
    let h = call(&s, "GET", &format!("/Observation/{mine}/_history"), Some(&t), None).json();
    assert_eq!(
        h["entry"].as_array().unwrap().len(),
        1,
        "only the version that was in the compartment"
    );
    // listings hold only the compartment, filtered in the query, totals included
    let h = call(&s, "GET", "/Patient/_history", Some(&t), None).json();
    assert_eq!(h["total"], 1, "{h}");
    assert_eq!(h["entry"][0]["resource"]["id"], "p1");
    let h = call(&s, "GET", "/Observation/_history", Some(&t), None).json();
    assert_eq!(
        h["total"], 1,
        "only the version of {mine} that was in the compartment: {h}"
    );
    // the system history: p1, the version of {mine} in the compartment, the shared Organization
    let h = call(&s, "GET", "/_history?_count=1", Some(&t), None).json();
    assert_eq!(h["total"], 3, "{h}");
    let next = h["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let r = reqwest::blocking::Client::new()
        .get(&next)
        .header("authorization", &t)
        .send()
        .unwrap();
    let page2: Value = r.json().unwrap();
    assert_eq!(page2["entry"].as_array().unwrap().len(), 1);
    let seen: Vec<&str> = [&h, &page2]
        .iter()
        .map(|b| b["entry"][0]["resource"]["resourceType"].as_str().unwrap())
        .collect();
    let listed = ["Patient", "Observation", "Organization"];
    assert!(
        seen[0] != seen[1] && seen.iter().all(|t| listed.contains(t)),
        "{seen:?}"
    );
    // a scope for some types only does not open the system history
    let t_obs = bearer(&s.token("patient/Observation.rs", Some("p1")));
    assert_eq!(call(&s, "GET", "/_history", Some(&t_obs), None).status, 403);
    // writes: scope letters first
    assert_eq!(
        call(&s, "POST", "/Observation", Some(&t), Some(&obs("p1"))).status,
        403,
        "no c"
    );
    p1["active"] = json!(true);
    assert_eq!(call(&s, "PUT", "/Patient/p1", Some(&t), Some(&p1)).status, 403, "no u");
    let tw = bearer(&s.token("patient/*.cruds", Some("p1")));
    // create inside the compartment only
    assert_eq!(
        call(&s, "POST", "/Observation", Some(&tw), Some(&obs("p1"))).status,
        201
    );
    assert_eq!(
        call(&s, "POST", "/Observation", Some(&tw), Some(&obs("p2"))).status,
        403
    );
    assert_eq!(
        call(
            &s,
            "POST",
            "/Organization",
            Some(&tw),
            Some(&json!({"resourceType": "Organization"}))
        )
        .status,
        403
    );
    // update: old and new content inside
    assert_eq!(call(&s, "PUT", "/Patient/p1", Some(&tw), Some(&p1)).status, 200);
    let mut own = call(&s, "POST", "/Observation", Some(&tw), Some(&obs("p1"))).json();
    let own_id = own["id"].as_str().unwrap().to_string();
    own["status"] = json!("amended");
    assert_eq!(
        call(&s, "PUT", &format!("/Observation/{own_id}"), Some(&tw), Some(&own)).status,
        200
    );
    own["subject"] = json!({"reference": "Patient/p2"});
    assert_eq!(
        call(&s, "PUT", &format!("/Observation/{own_id}"), Some(&tw), Some(&own)).status,
        403,
        "cannot move a resource out of its compartment"
    );
    let mut other = s.get(&format!("/Observation/{theirs}")).json();
    other["subject"] = json!({"reference": "Patient/p1"});
    assert_eq!(
        call(&s, "PUT", &format!("/Observation/{theirs}"), Some(&tw), Some(&other)).status,
        404,
        "cannot pull another patient's resource into its compartment"
    );
    let p3 = json!({"resourceType": "Patient", "id": "p3"});
    // content outside the compartment is refused before existence is looked at (nothing leaks)
    assert_eq!(call(&s, "PUT", "/Patient/p3", Some(&tw), Some(&p3)).status, 403);
    let linked = json!({"resourceType": "Observation", "id": "new-obs", "status": "final", "code": {"text": "x"},
                        "subject": {"reference": "Patient/p1"}});
    assert_eq!(
        call(&s, "PUT", "/Observation/new-obs", Some(&tw), Some(&linked)).status,
        404,
        "no update-as-create in patient context"
    );
    // delete: only inside
    assert_eq!(
        call(&s, "DELETE", &format!("/Observation/{theirs}"), Some(&tw), None).status,
        404
    );
    assert_eq!(s.get(&format!("/Observation/{theirs}")).status, 200, "untouched");
    assert_eq!(
        call(&s, "DELETE", &format!("/Observation/{own_id}"), Some(&tw), None).status,
        200
    );
    // none of the refused writes changed anything
    assert_eq!(s.get(&format!("/Observation/{theirs}/_history")).json()["total"], 1);
    assert_eq!(s.get("/Patient/p3").status, 404);
    // a patient scope without a launch patient grants nothing
    let unbound = bearer(&s.token("patient/*.rs", None));
    assert_eq!(call(&s, "GET", "/Patient/p1", Some(&unbound), None).status, 403);
}

/// With `require_mfa`, a user token must say it was obtained with more than one factor.
fn user_tokens_need_mfa_when_required(db: Db) {
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            require_mfa: Some(true),
            ..Default::default()
        },
    );
    let user_token = |amr: &[&str]| {
        issue(
            &s,
            fhirvault::auth::TokenRequest {
                scope: "user/*.cruds".into(),
                fhir_user: Some("Practitioner/dr1".into()),
                expires_in: 300,
                amr: amr.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        )
    };
    let r = call(&s, "GET", "/Patient/_history", Some(&user_token(&["pwd"])), None);
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("insufficient_user_authentication"));
    r.outcome();
    assert_eq!(
        call(&s, "GET", "/Patient/_history", Some(&user_token(&["pwd", "otp"])), None).status,
        200
    );
    assert_eq!(
        call(&s, "GET", "/Patient/_history", Some(&user_token(&["mfa"])), None).status,
        200
    );
    // backend services (no user) are not subject to it
    assert_eq!(
        call(
            &s,
            "GET",
            "/Patient/_history",
            Some(&bearer(&s.token("system/*.rs", None))),
            None
        )
        .status,
        200
    );
}

/// Repeated failed authentications from one address are throttled (429), valid token or not,
/// and the token is never logged.
fn repeated_failures_are_throttled(db: Db) {
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            auth_failure_limit: Some(5),
            ..Default::default()
        },
    );
    for _ in 0..5 {
        assert_eq!(call(&s, "GET", "/Patient/x", Some("Bearer guess"), None).status, 401);
    }
    let r = call(&s, "GET", "/Patient/x", Some("Bearer guess"), None);
    assert_eq!(r.status, 401, "the sixth failure is still answered");
    let r2 = call(
        &s,
        "GET",
        "/Patient/x",
        Some(&bearer(&s.token("system/*.cruds", None))),
        None,
    );
    assert_eq!(r2.status, 429, "{}", r2.text());
    assert!(r2.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    r2.outcome();
    // capabilities stay reachable
    assert_eq!(call(&s, "GET", "/metadata", None, None).status, 200);
    drop(r);
}

/// Repeated refused authorizations (403) by one client are throttled too: probing what a token
/// may do costs like guessing tokens.
fn repeated_denials_are_throttled(db: Db) {
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            auth_failure_limit: Some(5),
            ..Default::default()
        },
    );
    let t = bearer(&s.token("system/Patient.r", None));
    for _ in 0..6 {
        let r = call(
            &s,
            "POST",
            "/Patient",
            Some(&t),
            Some(&json!({"resourceType": "Patient"})),
        );
        assert_eq!(r.status, 403);
    }
    let r = call(&s, "GET", "/Patient/x", Some(&t), None);
    assert_eq!(r.status, 429, "{}", r.text());
}

/// The attribute policy: hidden elements (SUBSETTED), read-only elements, label-protected
/// resources; exempt roles see and change everything.
/// A server under the attribute policy `toml` (the directory holding it lives as long as the
/// returned guard).
fn with_policy(db: Db, toml: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, toml).unwrap();
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            policy_file: Some(policy),
            ..Default::default()
        },
    );
    (s, dir)
}

fn attribute_policy_masks_and_protects(db: Db) {
    let (s, _policy_dir) = with_policy(
        db,
        r#"
[[element_rule]]
resource = "Patient"
hide = ["telecom", "identifier[system=http://hl7.org/fhir/sid/us-ssn]"]
read_only = ["birthDate"]
exempt_roles = ["registrar"]

[[label_rule]]
system = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
code = "HIV"
require_roles = ["hiv-care"]
"#,
    );
    let user = |roles: &[&str]| {
        issue(
            &s,
            fhirvault::auth::TokenRequest {
                scope: "user/*.cruds".into(),
                fhir_user: Some("Practitioner/u".into()),
                expires_in: 300,
                roles: roles.iter().map(|r| r.to_string()).collect(),
                ..Default::default()
            },
        )
    };
    let (registrar, clinician, hiv) = (user(&["registrar"]), user(&[]), user(&["hiv-care"]));
    let patient = json!({"resourceType": "Patient", "id": "pp", "birthDate": "1970-01-01",
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"},
                       {"system": "urn:mrn", "value": "M1"}]});
    assert_eq!(
        call(&s, "PUT", "/Patient/pp", Some(&registrar), Some(&patient)).status,
        201
    );
    let labelled = json!({"resourceType": "Observation", "id": "hivobs", "status": "final", "code": {"text": "x"},
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]}});
    assert_eq!(
        call(&s, "PUT", "/Observation/hivobs", Some(&hiv), Some(&labelled)).status,
        201
    );
    let plain = json!({"resourceType": "Observation", "id": "plain", "status": "final", "code": {"text": "x"}});
    assert_eq!(
        call(&s, "PUT", "/Observation/plain", Some(&hiv), Some(&plain)).status,
        201
    );

    // hidden elements are gone for the clinician, and the response says it is a subset
    for path in ["/Patient/pp", "/Patient/pp/_history/1"] {
        let r = call(&s, "GET", path, Some(&clinician), None);
        assert_eq!(r.status, 200);
        let text = r.text();
        assert!(
            !text.contains("555-0100") && !text.contains("123-45-6789"),
            "{path}: {text}"
        );
        let v = r.json();
        assert_eq!(v["identifier"], json!([{"system": "urn:mrn", "value": "M1"}]));
        assert!(v["meta"]["tag"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["code"] == "SUBSETTED"));
    }
    let h = call(&s, "GET", "/Patient/_history", Some(&clinician), None).text();
    assert!(!h.contains("555-0100") && !h.contains("123-45-6789"));
    // a PUT that created (through the create-only path) is reported as a PUT in history
    let h = call(&s, "GET", "/Patient/pp/_history", Some(&registrar), None).json();
    assert_eq!(h["entry"][0]["request"]["method"], "PUT");
    assert_eq!(h["entry"][0]["response"]["status"], "201 Created");
    let full = call(&s, "GET", "/Patient/pp", Some(&registrar), None).json();
    assert_eq!(full["telecom"][0]["value"], "555-0100");
    assert!(full["meta"].get("tag").is_none());
    // label-protected resources are absent to those without the role, listings included
    assert_eq!(
        call(&s, "GET", "/Observation/hivobs", Some(&clinician), None).status,
        404
    );
    assert_eq!(call(&s, "GET", "/Observation/hivobs", Some(&hiv), None).status, 200);
    let h = call(&s, "GET", "/Observation/_history", Some(&clinician), None).json();
    let ids: Vec<&str> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["plain"]);
    assert!(h.get("total").is_none(), "a total would count the hidden resource");
    assert_eq!(
        call(&s, "DELETE", "/Observation/hivobs", Some(&clinician), None).status,
        404
    );
    assert_eq!(
        call(
            &s,
            "PUT",
            "/Observation/plain",
            Some(&clinician),
            Some(&labelled.clone())
        )
        .status,
        400,
        "id mismatch"
    );
    let mut relabel = plain.clone();
    relabel["meta"] = labelled["meta"].clone();
    assert_eq!(
        call(&s, "PUT", "/Observation/plain", Some(&clinician), Some(&relabel)).status,
        403
    );
    // read-only elements cannot be changed or set; hidden ones cannot be erased or overwritten
    let mut seen = call(&s, "GET", "/Patient/pp", Some(&clinician), None).json();
    seen["birthDate"] = json!("1999-09-09");
    assert_eq!(
        call(&s, "PUT", "/Patient/pp", Some(&clinician), Some(&seen)).status,
        403
    );
    seen["birthDate"] = json!("1970-01-01");
    seen["telecom"] = json!([{"system": "phone", "value": "attacker"}]);
    seen["active"] = json!(true);
    assert_eq!(
        call(&s, "PUT", "/Patient/pp", Some(&clinician), Some(&seen)).status,
        200
    );
    let after = call(&s, "GET", "/Patient/pp", Some(&registrar), None).json();
    assert_eq!(after["active"], true);
    assert_eq!(after["telecom"], json!([{"system": "phone", "value": "555-0100"}]));
    assert_eq!(after["identifier"].as_array().unwrap().len(), 2);
    let newp = json!({"resourceType": "Patient", "birthDate": "2000-01-01"});
    assert_eq!(call(&s, "POST", "/Patient", Some(&clinician), Some(&newp)).status, 403);
    assert_eq!(call(&s, "POST", "/Patient", Some(&registrar), Some(&newp)).status, 201);
    assert_eq!(
        call(&s, "POST", "/Observation", Some(&clinician), Some(&labelled)).status,
        403
    );
}

/// Break-glass: a user's declared emergency (BTG + reason) widens the compartment check for
/// its window, and nothing else.
/// A loopback receiver for webhook posts.
fn webhook_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let h = hits.clone();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(format!("http://{}/alerts", listener.local_addr().unwrap()))
                .unwrap();
            let srv = actix_web::HttpServer::new(move || {
                let h = h.clone();
                actix_web::App::new().route(
                    "/alerts",
                    actix_web::web::post().to(move |body: actix_web::web::Bytes| {
                        let h = h.clone();
                        async move {
                            h.lock()
                                .unwrap()
                                .push(serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null));
                            actix_web::HttpResponse::Ok().finish()
                        }
                    }),
                )
            })
            .workers(1)
            .disable_signals()
            .listen(listener)
            .unwrap();
            let _ = srv.run().await;
        })
    });
    (rx.recv().unwrap(), hits)
}

fn break_glass_widens_the_compartment_only(db: Db) {
    let (webhook, hits) = webhook_receiver();
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            break_glass_webhook: Some(webhook),
            ..Default::default()
        },
    );
    for p in ["p1", "p2"] {
        s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}));
        let o = json!({"resourceType": "Observation", "id": format!("o-{p}"), "status": "final",
                       "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}});
        s.put(&format!("/Observation/o-{p}"), &o);
    }
    let token = |purpose: Option<&str>, reason: Option<&str>, user: bool| {
        s.issuer.issue(&fhirvault::auth::TokenRequest {
            scope: "patient/*.rs".into(),
            patient: Some("p1".into()),
            fhir_user: user.then(|| "Practitioner/er-doc".into()),
            expires_in: 300,
            purpose_of_use: purpose.map(str::to_string),
            btg_reason: reason.map(str::to_string),
            ..Default::default()
        })
    };
    let normal = bearer(&token(None, None, true).unwrap());
    let btg = bearer(&token(Some("BTG"), Some("unconscious patient in ED"), true).unwrap());
    assert_eq!(call(&s, "GET", "/Observation/o-p2", Some(&normal), None).status, 404);
    assert_eq!(call(&s, "GET", "/Observation/o-p2", Some(&btg), None).status, 200);
    assert_eq!(
        call(&s, "GET", "/Observation/_history", Some(&btg), None).json()["total"],
        2
    );
    // every break-glass request raises an alert on the webhook, without the reason
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hits.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let alerts = hits.lock().unwrap().clone();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0]["event"], "break-glass");
    assert_eq!(alerts[0]["subject"], "Practitioner/er-doc");
    assert!(
        !serde_json::to_string(&alerts).unwrap().contains("unconscious"),
        "the reason is never sent"
    );
    // normal requests raise none
    assert_eq!(call(&s, "GET", "/Observation/o-p1", Some(&normal), None).status, 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(hits.lock().unwrap().len(), 2);
    // scope letters still hold
    let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    assert_eq!(call(&s, "POST", "/Observation", Some(&btg), Some(&o)).status, 403);
    // no reason: not a valid token; not a user: no widening
    let no_reason = bearer(&token(Some("BTG"), Some("  "), true).unwrap());
    assert_eq!(call(&s, "GET", "/Observation/o-p1", Some(&no_reason), None).status, 401);
    let service = bearer(&token(Some("BTG"), Some("why"), false).unwrap());
    assert_eq!(call(&s, "GET", "/Observation/o-p2", Some(&service), None).status, 404);
    // outside its window (issued two hours ago) it widens nothing
    let key = signing_key(&s);
    let kid = kid_of(btg.trim_start_matches("Bearer "));
    let now = chrono::Utc::now().timestamp();
    let old = json!({"iss": "urn:fhirvault:local", "aud": "urn:fhirvault:local:fhir", "sub": "er-doc",
        "exp": now + 300, "nbf": now - 7200, "iat": now - 7200, "jti": "old", "scope": "patient/*.rs",
        "patient": "p1", "fhirUser": "Practitioner/er-doc", "purpose_of_use": "BTG", "btg_reason": "x"});
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid);
    let stale = bearer(&jsonwebtoken::encode(&h, &old, &key).unwrap());
    assert_eq!(call(&s, "GET", "/Observation/o-p2", Some(&stale), None).status, 404);
    assert_eq!(call(&s, "GET", "/Observation/o-p1", Some(&stale), None).status, 200);
    // every AuditEvent of the break-glass requests, and only those, is marked BTG
    let events = s.get("/AuditEvent?agent=Practitioner/er-doc&_count=100").json()["entry"]
        .as_array()
        .cloned()
        .unwrap();
    let marked = |e: &Value| e["resource"]["purposeOfEvent"][0]["coding"][0]["code"] == "BTG";
    let btg_events: Vec<&Value> = events.iter().filter(|e| marked(e)).collect();
    assert_eq!(btg_events.len(), 3, "the read, the history and the refused create");
    assert!(btg_events
        .iter()
        .all(|e| e["resource"]["agent"][0]["purposeOfUse"][0]["coding"][0]["code"] == "BTG"));
    assert_eq!(
        events.len(),
        3 + 2 + 2,
        "plus the normal token's two reads and the stale token's two"
    );
}

/// A stand-in OpenID Connect provider on loopback: discovery document and JWKS, nothing else.
fn fake_provider(jwk: Value) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let issuer = format!("http://{}", listener.local_addr().unwrap());
            tx.send(issuer.clone()).unwrap();
            let srv = actix_web::HttpServer::new(move || {
                let (issuer, jwk) = (issuer.clone(), jwk.clone());
                actix_web::App::new()
                    .route(
                        "/.well-known/openid-configuration",
                        actix_web::web::get().to(move || {
                            let issuer = issuer.clone();
                            async move {
                                actix_web::HttpResponse::Ok().json(json!({
                                    "issuer": issuer,
                                    "authorization_endpoint": format!("{issuer}/authorize"),
                                    "jwks_uri": format!("{issuer}/jwks"),
                                    "response_types_supported": ["code"],
                                    "subject_types_supported": ["public"],
                                    "id_token_signing_alg_values_supported": ["ES256"]
                                }))
                            }
                        }),
                    )
                    .route(
                        "/jwks",
                        actix_web::web::get().to(move || {
                            let jwk = jwk.clone();
                            async move { actix_web::HttpResponse::Ok().json(json!({"keys": [jwk]})) }
                        }),
                    )
            })
            .workers(1)
            .disable_signals()
            .listen(listener)
            .unwrap();
            let _ = srv.run().await;
        })
    });
    rx.recv().unwrap()
}

/// Tokens from an external OpenID Connect provider (discovery + JWKS via openidconnect) are
/// accepted with configurable claim names, and held to the same checks as our own.
fn external_oidc_provider_tokens(db: Db) {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let point = key.public_key().to_encoded_point(false);
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
                     "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())});
    let issuer = fake_provider(jwk);
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            oidc_provider: Some(vec![fhirvault::auth::oidc::ProviderConfig {
                issuer: issuer.clone(),
                audience: "https://fhir.example/r4".into(),
                scope_claim: "scp".into(),
                patient_claim: "patient_id".into(),
                fhir_user_claim: "fhirUser".into(),
                roles_claim: "roles".into(),
            }]),
            ..Default::default()
        },
    );
    for p in ["p1", "p2"] {
        s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}));
    }
    let pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&key, p256::pkcs8::LineEnding::LF).unwrap();
    let enc = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = json!({"iss": issuer, "aud": "https://fhir.example/r4", "sub": "ext-user", "exp": now + 300,
                           "iat": now, "scp": ["patient/*.rs"], "patient_id": "p1"});
        f(&mut c);
        c
    };
    let sign = |c: &Value, kid: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        bearer(&jsonwebtoken::encode(&h, c, &enc).unwrap())
    };
    let good = sign(&claims(&|_| {}), "k1");
    assert_eq!(call(&s, "GET", "/Patient/p1", Some(&good), None).status, 200);
    assert_eq!(
        call(&s, "GET", "/Patient/p2", Some(&good), None).status,
        404,
        "patient claim mapped"
    );
    for (what, token) in [
        (
            "wrong audience",
            sign(&claims(&|c| c["aud"] = json!("https://other")), "k1"),
        ),
        ("expired", sign(&claims(&|c| c["exp"] = json!(now - 60)), "k1")),
        ("unknown kid", sign(&claims(&|_| {}), "k9")),
        (
            "unknown issuer",
            sign(&claims(&|c| c["iss"] = json!("http://127.0.0.1:1")), "k1"),
        ),
    ] {
        let r = call(&s, "GET", "/Patient/p1", Some(&token), None);
        assert_invalid_token(&r, what);
    }
    // an HMAC token keyed with anything is refused whatever its issuer claims
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(&h, &claims(&|_| {}), &EncodingKey::from_secret(b"k1")).unwrap();
    assert_invalid_token(&call(&s, "GET", "/Patient/p1", Some(&bearer(&hs)), None), "HS256");
    // the built-in issuer keeps working beside it
    assert_eq!(s.get("/Patient/p2").status, 200);
}

/// A page link works for the subject it was made for, not for another token's subject.
fn page_links_are_bound_to_the_subject(db: Db) {
    let s = TestServer::start(db);
    for i in 0..3 {
        s.put(
            &format!("/Patient/pl{i}"),
            &json!({"resourceType": "Patient", "id": format!("pl{i}")}),
        );
    }
    let as_subject = |sub: &str| {
        issue(
            &s,
            fhirvault::auth::TokenRequest {
                scope: "system/*.rs".into(),
                subject: Some(sub.into()),
                expires_in: 300,
                ..Default::default()
            },
        )
    };
    let (alice, bob) = (as_subject("alice"), as_subject("bob"));
    let first = call(&s, "GET", "/Patient/_history?_count=1", Some(&alice), None).json();
    let next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let get = |auth: &str| {
        reqwest::blocking::Client::new()
            .get(&next)
            .header("authorization", auth)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get(&alice), 200);
    assert_eq!(get(&bob), 400, "another subject cannot use the link");
    // nor can the cursor be moved to another listing
    let page = next.split("_page=").nth(1).unwrap().to_string();
    let moved = call(
        &s,
        "GET",
        &format!("/_history?_count=1&_page={page}"),
        Some(&alice),
        None,
    );
    assert_eq!(moved.status, 400);
}

/// SMART v2 granular scopes (issue 21): a scope with a condition grants only the resources the
/// condition admits, on every path (search with counts, read, vread, history, includes,
/// `$everything`, bundles, writes, Bulk export); several are alternatives; conditions the
/// server cannot evaluate grant nothing.
fn granular_scopes(db: Db) {
    const CAT: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
    let s = TestServer::start(db);
    for p in ["p1", "p2"] {
        assert_eq!(
            s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}))
                .status,
            201
        );
    }
    let obs = |id: &str, patient: &str, category: Option<&str>| {
        let mut o = json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
                           "subject": {"reference": format!("Patient/{patient}")}});
        if let Some(c) = category {
            o["category"] = json!([{"coding": [{"system": CAT, "code": c}]}]);
        }
        o
    };
    for (id, patient, category) in [
        ("lab-1", "p1", Some("laboratory")),
        ("vitals-1", "p1", Some("vital-signs")),
        ("bare-1", "p1", None),
        ("lab-2", "p2", Some("laboratory")),
    ] {
        assert_eq!(
            s.put(&format!("/Observation/{id}"), &obs(id, patient, category)).status,
            201
        );
    }
    let lab_scope = format!("patient/Observation.rs?category={CAT}%7Claboratory");
    let t = bearer(&s.token(&format!("{lab_scope} patient/Patient.rs"), Some("p1")));
    let ids = |r: &Reply, mode: &str| -> BTreeSet<String> {
        r.json()["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["search"]["mode"] == mode || mode.is_empty())
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|x| x.to_string()).collect() };
    // search: only what the condition admits, counted so
    let r = call(&s, "GET", "/Observation?_count=100", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ids(&r, "match"), set(&["lab-1"]));
    assert_eq!(r.json()["total"], 1);
    assert!(ids(
        &call(&s, "GET", "/Observation?category=vital-signs", Some(&t), None),
        "match"
    )
    .is_empty());
    // read and vread: outside the condition looks like absent
    assert_eq!(call(&s, "GET", "/Observation/lab-1", Some(&t), None).status, 200);
    assert_eq!(
        call(&s, "GET", "/Observation/lab-1/_history/1", Some(&t), None).status,
        200
    );
    for id in ["vitals-1", "bare-1", "lab-2"] {
        assert_eq!(
            call(&s, "GET", &format!("/Observation/{id}"), Some(&t), None).status,
            404,
            "{id}"
        );
        assert_eq!(
            call(&s, "GET", &format!("/Observation/{id}/_history/1"), Some(&t), None).status,
            404
        );
    }
    // history of the type: checked on content, without a total
    let h = call(&s, "GET", "/Observation/_history", Some(&t), None);
    assert_eq!(h.status, 200, "{}", h.text());
    assert_eq!(ids(&h, ""), set(&["lab-1"]));
    assert!(h.json().get("total").is_none());
    // an unconditioned scope of the same context grants more, and wins
    let all_types = bearer(&s.token(&format!("{lab_scope} patient/*.rs"), Some("p1")));
    assert_eq!(
        call(&s, "GET", "/Observation?_count=100", Some(&all_types), None).json()["total"],
        3,
        "an unconditioned scope of the same context wins"
    );
    // includes and $everything
    let r = call(
        &s,
        "GET",
        "/Patient?_id=p1&_revinclude=Observation:subject",
        Some(&t),
        None,
    );
    assert_eq!(ids(&r, "include"), set(&["lab-1"]));
    let r = call(&s, "GET", "/Patient/p1/$everything", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ids(&r, ""), set(&["p1", "lab-1"]));
    // a batch's reads
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/lab-1"}},
        {"request": {"method": "GET", "url": "Observation/vitals-1"}}]});
    let r = call(&s, "POST", "/", Some(&t), Some(&batch));
    let statuses = r.entry_statuses();
    assert_eq!(statuses, ["200", "404"]);
    // several granular scopes of a type are alternatives
    let two = bearer(&s.token(
        &format!("{lab_scope} patient/Observation.rs?category=vital-signs"),
        Some("p1"),
    ));
    assert_eq!(
        ids(&call(&s, "GET", "/Observation", Some(&two), None), "match"),
        set(&["lab-1", "vitals-1"])
    );
    // in a user's or a service's context: every patient's, still only what the condition admits
    let sys = bearer(&s.token(&lab_scope.replace("patient/", "system/"), None));
    assert_eq!(
        ids(&call(&s, "GET", "/Observation", Some(&sys), None), "match"),
        set(&["lab-1", "lab-2"])
    );
    // writes: a new or changed resource must stay inside the condition
    let w = bearer(&s.token(
        &format!("patient/Observation.cruds?category={CAT}%7Claboratory"),
        Some("p1"),
    ));
    let mut new_lab = obs("x", "p1", Some("laboratory"));
    new_lab.as_object_mut().unwrap().remove("id");
    assert_eq!(call(&s, "POST", "/Observation", Some(&w), Some(&new_lab)).status, 201);
    let mut new_vitals = obs("x", "p1", Some("vital-signs"));
    new_vitals.as_object_mut().unwrap().remove("id");
    assert_eq!(
        call(&s, "POST", "/Observation", Some(&w), Some(&new_vitals)).status,
        403
    );
    let moved = obs("lab-1", "p1", Some("vital-signs"));
    assert_eq!(
        call(&s, "PUT", "/Observation/lab-1", Some(&w), Some(&moved)).status,
        403
    );
    assert_eq!(
        s.get("/Observation/lab-1").json()["category"][0]["coding"][0]["code"],
        "laboratory"
    );
    // a condition the server cannot evaluate grants nothing
    let odd = bearer(&s.token("patient/Observation.rs?date=2020", Some("p1")));
    assert_eq!(call(&s, "GET", "/Observation", Some(&odd), None).status, 403);
    assert_eq!(call(&s, "GET", "/Observation/lab-1", Some(&odd), None).status, 403);
    // Bulk export with a granular system scope: the files hold only what the condition admits
    let kick = Reply::from(
        reqwest::blocking::Client::new()
            .get(s.url("/$export?_type=Observation"))
            .header("authorization", &sys)
            .header("prefer", "respond-async")
            .header("accept", "application/fhir+json")
            .send()
            .unwrap(),
    );
    assert_eq!(kick.status, 202, "{}", kick.text());
    let status = common::status_path(&s, &kick);
    let manifest = (0..300)
        .find_map(|_| {
            let r = call(&s, "GET", &status, Some(&sys), None);
            if r.status == 202 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                None
            } else {
                Some(r)
            }
        })
        .expect("export finished");
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    let mut exported = BTreeSet::new();
    for o in manifest.json()["output"].as_array().unwrap() {
        let r = Reply::from(
            reqwest::blocking::Client::new()
                .get(o["url"].as_str().unwrap())
                .header("authorization", &sys)
                .send()
                .unwrap(),
        );
        assert_eq!(r.status, 200);
        for line in r.text().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            exported.insert(v["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(exported.len(), 3, "{exported:?}");
    assert!(exported.contains("lab-1") && exported.contains("lab-2") && !exported.contains("vitals-1"));
}

/// Issue 21 point 5: on the new paths (shared resources, granular scopes) the attribute policy
/// still masks and its labels still hide, and break-glass widens the compartment only: a
/// granular scope's condition holds through it.
fn policy_labels_and_break_glass_hold_on_shared_and_granular_paths(db: Db) {
    const CAT: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
    let (s, _policy_dir) = with_policy(
        db,
        r#"
[[element_rule]]
resource = "Practitioner"
hide = ["telecom"]

[[label_rule]]
system = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
code = "HIV"
require_roles = ["hiv-care"]
"#,
    );
    let hiv_label = json!([{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]);
    // labelled resources are written by a token that may see them
    let writer = issue(
        &s,
        fhirvault::auth::TokenRequest {
            scope: "system/*.cruds".into(),
            roles: vec!["hiv-care".into()],
            expires_in: 300,
            ..Default::default()
        },
    );
    let put = |path: &str, body: &Value| call(&s, "PUT", path, Some(&writer), Some(body)).status;
    for p in ["p1", "p2"] {
        assert_eq!(
            s.put(&format!("/Patient/{p}"), &json!({"resourceType": "Patient", "id": p}))
                .status,
            201
        );
    }
    let practitioner = json!({"resourceType": "Practitioner", "id": "doc",
        "telecom": [{"system": "phone", "value": "555-0177"}]});
    assert_eq!(s.put("/Practitioner/doc", &practitioner).status, 201);
    let clinic =
        json!({"resourceType": "Organization", "id": "hiv-clinic", "name": "x", "meta": {"security": hiv_label}});
    assert_eq!(put("/Organization/hiv-clinic", &clinic), 201);
    assert_eq!(
        s.put(
            "/Organization/plain",
            &json!({"resourceType": "Organization", "id": "plain", "name": "y"})
        )
        .status,
        201
    );
    let obs = |id: &str, patient: &str, cat: &str, labelled: bool| {
        let mut o = json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
            "subject": {"reference": format!("Patient/{patient}")},
            "category": [{"coding": [{"system": CAT, "code": cat}]}]});
        if labelled {
            o["meta"] = json!({"security": hiv_label});
        }
        o
    };
    for (id, patient, cat, labelled) in [
        ("lab-1", "p1", "laboratory", false),
        ("lab-hiv-1", "p1", "laboratory", true),
        ("vitals-1", "p1", "vital-signs", false),
        ("lab-2", "p2", "laboratory", false),
    ] {
        assert_eq!(
            put(&format!("/Observation/{id}"), &obs(id, patient, cat, labelled)),
            201
        );
    }
    let ids = |r: &Reply| -> BTreeSet<String> {
        r.json()["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|x| x.to_string()).collect() };
    // shared resources in a patient's context: masked, and hidden by their labels
    let patient = bearer(&s.token("patient/*.rs", Some("p1")));
    let r = call(&s, "GET", "/Practitioner/doc", Some(&patient), None);
    assert_eq!(r.status, 200);
    assert!(
        !r.text().contains("555-0177"),
        "the element rule masks a shared resource too"
    );
    assert_eq!(
        call(&s, "GET", "/Organization/hiv-clinic", Some(&patient), None).status,
        404
    );
    assert_eq!(
        ids(&call(&s, "GET", "/Organization", Some(&patient), None)),
        set(&["plain"])
    );
    // granular scopes: labels still hide
    let granular = bearer(&s.token(
        &format!("patient/Observation.rs?category={CAT}%7Claboratory"),
        Some("p1"),
    ));
    assert_eq!(
        ids(&call(&s, "GET", "/Observation", Some(&granular), None)),
        set(&["lab-1"])
    );
    assert_eq!(
        call(&s, "GET", "/Observation/lab-hiv-1", Some(&granular), None).status,
        404
    );
    // break-glass widens the compartment, never the granular condition
    let btg = bearer(
        &s.issuer
            .issue(&fhirvault::auth::TokenRequest {
                scope: format!("patient/Observation.rs?category={CAT}%7Claboratory"),
                patient: Some("p1".into()),
                fhir_user: Some("Practitioner/er-doc".into()),
                roles: vec!["hiv-care".into()],
                expires_in: 300,
                purpose_of_use: Some("BTG".into()),
                btg_reason: Some("unconscious patient in ED".into()),
                ..Default::default()
            })
            .unwrap(),
    );
    assert_eq!(
        ids(&call(&s, "GET", "/Observation", Some(&btg), None)),
        set(&["lab-1", "lab-hiv-1", "lab-2"])
    );
    assert_eq!(call(&s, "GET", "/Observation/lab-2", Some(&btg), None).status, 200);
    assert_eq!(call(&s, "GET", "/Observation/vitals-1", Some(&btg), None).status, 404);
}

on_both_backends!(
    granular_scopes,
    policy_labels_and_break_glass_hold_on_shared_and_granular_paths,
    page_links_are_bound_to_the_subject,
    repeated_denials_are_throttled,
    external_oidc_provider_tokens,
    break_glass_widens_the_compartment_only,
    attribute_policy_masks_and_protects,
    user_tokens_need_mfa_when_required,
    repeated_failures_are_throttled,
    every_token_fault_is_a_401,
    scopes_decide_by_type_and_interaction,
    patient_context_sees_only_its_compartment,
);
