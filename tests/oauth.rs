//! The built-in SMART authorization server, black box over HTTP on both backends: the
//! authorization-code flow through its pages (PKCE, password, TOTP enrolment and codes, consent,
//! patient picker, EHR launch), the token endpoint's grants and refusals, refresh rotation and
//! family revocation, `private_key_jwt` backend services, introspection, revocation, lockout,
//! idle sessions, the well-known documents, the admin commands, and the audit trail of it all.

mod common;

use base64::Engine;
use common::browser::{now, totp_at, Browser, Page};
use common::{Db, TestServer};
use fhirvault::config::ConfigLayer;
use fhirvault::store::auth::ClientRow;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use sha2::Digest;

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const APP: &str = "test-app";
const PASSWORD: &str = "a long test password";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn root(s: &TestServer) -> String {
    format!("http://{}", s.addr)
}

fn add_client(s: &TestServer, id: &str, kind: &str, scopes: &str, secret: Option<&str>, jwks: Option<&str>) {
    s.store
        .auth_client_add(&ClientRow {
            client_id: id.into(),
            name: format!("{id} name"),
            client_type: kind.into(),
            secret_hash: secret.map(|x| fhirvault::auth::server::hash_password(x).unwrap()),
            jwks: jwks.map(str::to_string),
            jwks_uri: None,
            redirect_uris: REDIRECT.into(),
            scopes: scopes.into(),
            disabled: false,
            created_at: fhirvault::store::now(),
        })
        .unwrap();
}

fn add_user(s: &TestServer, name: &str, fhir_user: Option<&str>) {
    let u = fhirvault::auth::server::new_user(name, PASSWORD, fhir_user.map(str::to_string), &[]).unwrap();
    s.store.auth_user_add(&u).unwrap();
}

fn start(db: Db, layer: ConfigLayer) -> TestServer {
    let s = TestServer::start_with(db, layer);
    add_client(
        &s,
        APP,
        "public",
        "launch launch/patient openid fhirUser offline_access patient/*.rs user/Patient.rs",
        None,
        None,
    );
    add_user(&s, "doctor", Some("Practitioner/doc-1"));
    s
}

fn patient(s: &TestServer, family: &str) -> String {
    let r = s.post(
        "/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Test"]}]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn pkce() -> (String, String) {
    let verifier = B64.encode(rand_bytes(48));
    let challenge = B64.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn rand_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

fn authorize_path(s: &TestServer, scope: &str, challenge: &str, extra: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code")
        .append_pair("client_id", APP)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", scope)
        .append_pair("state", "st-123")
        .append_pair("aud", &s.base)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    format!("/auth/authorize?{}", q.finish())
}

/// Signs in (enrolling TOTP on first use), returns the consent page and the TOTP secret.
fn sign_in(b: &mut Browser, s: &TestServer, user: &str, secret: Option<&[u8]>, auth: &str) -> (Page, Vec<u8>) {
    let login = b.get(auth);
    assert_eq!(login.status, 200, "{}", login.body);
    assert!(login.body.contains("<label for=\"username\">"));
    let next = b.post_with("/auth/login", &login, &[("username", user), ("password", PASSWORD)]);
    assert_eq!(next.status, 200, "{}", next.body);
    match secret {
        None => {
            assert!(next.body.contains("/auth/mfa/enrol"), "enrolment first: {}", next.body);
            let secret = next.secret();
            let consent = b.post_with("/auth/mfa/enrol", &next, &[("code", &totp_at(&secret, now()))]);
            assert_eq!(consent.status, 200, "{}", consent.body);
            (consent, secret)
        }
        Some(secret) => {
            assert!(next.body.contains("action=\"/auth/mfa\""));
            // the code of the step after the last one accepted (never the same code twice)
            let consent = b.post_with("/auth/mfa", &next, &[("code", &totp_at(secret, now() + 30))]);
            assert_eq!(consent.status, 200, "{}", consent.body);
            let _ = s;
            (consent, secret.to_vec())
        }
    }
}

fn token_request(s: &TestServer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = Client::new()
        .post(format!("{}/auth/token", root(s)))
        .form(form)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers().get("cache-control").unwrap(), "no-store");
    (status, r.json().unwrap())
}

fn exchange(s: &TestServer, code: &str, verifier: &str) -> (u16, Value) {
    token_request(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", APP),
            ("code_verifier", verifier),
        ],
    )
}

fn events(s: &TestServer, subtype: &str) -> i64 {
    // search rows are derived off the request path: wait for this node's
    s.auditor.sync_search_blocking().unwrap();
    s.db.count(&format!(
        "SELECT COUNT(*) AS n FROM audit_search WHERE subtype = '{subtype}'"
    ))
}

fn bearer_get(s: &TestServer, token: &str, path: &str) -> u16 {
    Client::new()
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn standalone_launch_with_pkce_totp_and_picker(db: Db) {
    let s = start(db, ConfigLayer::default());
    let mine = patient(&s, "Picked");
    let other = patient(&s, "Otherone");
    let (verifier, challenge) = pkce();
    let scope = "launch/patient openid fhirUser offline_access patient/*.rs user/Patient.rs";
    let mut b = Browser::new(&s);
    let auth = authorize_path(&s, scope, &challenge, &[("nonce", "n-0S6")]);

    // wrong password and unknown user: the same answer
    let login = b.get(&auth);
    let wrong = b.post_with("/auth/login", &login, &[("username", "doctor"), ("password", "nope")]);
    let unknown = b.post_with("/auth/login", &login, &[("username", "nobody"), ("password", PASSWORD)]);
    assert_eq!((wrong.status, unknown.status), (401, 401));
    let alert = |p: &Page| {
        p.body
            .split("role=\"alert\">")
            .nth(1)
            .map(|x| x.split('<').next().unwrap().to_string())
    };
    assert_eq!(alert(&wrong), alert(&unknown));
    assert_eq!(events(&s, "login-failure"), 2);

    // password, then TOTP enrolment (a wrong code first), then consent with the picker
    let next = b.post_with("/auth/login", &login, &[("username", "doctor"), ("password", PASSWORD)]);
    assert!(next.body.contains("/auth/mfa/enrol"));
    let secret = next.secret();
    let bad = b.post_with("/auth/mfa/enrol", &next, &[("code", "000000")]);
    assert_eq!(bad.status, 401);
    assert_eq!(bad.secret(), secret, "the same secret is offered again");
    let accepted = totp_at(&secret, now());
    let consent = b.post_with("/auth/mfa/enrol", &bad, &[("code", &accepted)]);
    assert_eq!(consent.status, 200, "{}", consent.body);
    assert!(consent.body.contains("Choose the patient"));
    let request = consent.hidden()["request"].clone();
    let searched = b.get(&format!(
        "/auth/consent?request={}&q=Picked",
        form_urlencoded::byte_serialize(request.as_bytes()).collect::<String>()
    ));
    assert!(searched.body.contains(&format!("value=\"{mine}\"")));
    assert!(
        !searched.body.contains(&format!("value=\"{other}\"")),
        "only the patients the search matched"
    );
    // a patient that is not there cannot be chosen
    let forged = b.post_with(
        "/auth/consent",
        &searched,
        &[("decision", "allow"), ("patient", "no-such")],
    );
    assert_eq!(forged.status, 400);
    let done = b.post_with("/auth/consent", &searched, &[("decision", "allow"), ("patient", &mine)]);
    assert_eq!(done.status, 303, "{}", done.body);
    let q = done.query();
    assert_eq!(q["state"], "st-123");
    assert!(done.location.as_deref().unwrap().starts_with(REDIRECT));

    // a wrong verifier burns nothing but its own attempt … the code works once
    let (status, body) = exchange(&s, &q["code"], "x".repeat(43).as_str());
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    let done = b.post_with("/auth/consent", &searched, &[("decision", "allow"), ("patient", &mine)]);
    let code = done.query()["code"].clone();
    let (status, tokens) = exchange(&s, &code, &verifier);
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["patient"], mine.as_str());
    assert_eq!(tokens["token_type"], "Bearer");
    assert!(tokens["expires_in"].as_i64().unwrap() <= 900);
    assert!(tokens["refresh_token"].is_string());
    let (status, again) = exchange(&s, &code, &verifier);
    assert_eq!((status, again["error"].as_str()), (400, Some("invalid_grant")));

    // the token reads the chosen patient's compartment, not the other patient
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(bearer_get(&s, access, &format!("/Patient/{mine}")), 200);
    assert_eq!(bearer_get(&s, access, "/Observation"), 200);

    // the ID token: signed by the key the JWKS publishes, for this client, with fhirUser and nonce
    let jwks: Value = Client::new()
        .get(format!("{}/auth/jwks", root(&s)))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone()).unwrap();
    let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
    v.set_audience(&[APP]);
    v.set_issuer(&[s.issuer.issuer()]);
    let id = jsonwebtoken::decode::<Value>(
        tokens["id_token"].as_str().unwrap(),
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(id["fhirUser"], "Practitioner/doc-1");
    assert_eq!(id["nonce"], "n-0S6");
    assert!(id["amr"].as_array().unwrap().iter().any(|m| m == "mfa"));

    // the access token says the user authenticated with a second factor
    let claims: Value = serde_json::from_slice(&B64.decode(access.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert!(claims["amr"].as_array().unwrap().iter().any(|m| m == "mfa"));
    assert_eq!(claims["fhirUser"], "Practitioner/doc-1");

    // the TOTP secret is at rest only sealed: neither its bytes nor its base32 text are stored
    let at_rest = s.db.bytes_at_rest();
    let text = match totp_rs::Secret::Raw(secret.clone()).to_encoded() {
        totp_rs::Secret::Encoded(t) => t,
        totp_rs::Secret::Raw(_) => unreachable!(),
    };
    assert!(!at_rest.windows(secret.len()).any(|w| w == secret.as_slice()));
    assert!(!at_rest.windows(text.len()).any(|w| w == text.as_bytes()));

    // every step is in the audit log
    assert_eq!(events(&s, "login"), 1);
    assert_eq!(events(&s, "mfa-enrol"), 1);
    assert_eq!(events(&s, "consent"), 2);
    assert_eq!(events(&s, "token-issue"), 1);
    assert_eq!(events(&s, "token-failure"), 2);

    // signing in again asks for a code (the one just used is refused: each code works once).
    // The replay is the very code accepted above, not "the code of now", which is a fresh one
    // once a 30-second step has passed since (CI once crossed that boundary mid-test).
    let mut b2 = Browser::new(&s);
    let login = b2.get(&auth);
    let mfa = b2.post_with("/auth/login", &login, &[("username", "doctor"), ("password", PASSWORD)]);
    assert!(mfa.body.contains("action=\"/auth/mfa\""));
    let replayed = b2.post_with("/auth/mfa", &mfa, &[("code", &accepted)]);
    assert_eq!(replayed.status, 401, "a code already accepted is refused");
    let consent = b2.post_with("/auth/mfa", &mfa, &[("code", &totp_at(&secret, now() + 30))]);
    assert_eq!(consent.status, 200);
    let denied = b2.post_with("/auth/consent", &consent, &[("decision", "deny")]);
    assert_eq!(denied.query()["error"], "access_denied");
    // a signed-in browser goes straight to consent; after signing out, back to the login form
    assert!(b2.get(&auth).body.contains("Allow access?"));
    assert_eq!(b2.post("/auth/logout", &[]).status, 200);
    assert!(b2.get(&auth).body.contains("name=\"username\""));
}

fn authorize_request_rules(db: Db) {
    let s = start(db, ConfigLayer::default());
    let mut b = Browser::new(&s);
    let (_, challenge) = pkce();
    let ok = authorize_path(&s, "openid user/Patient.rs", &challenge, &[]);
    assert_eq!(b.get(&ok).status, 200);
    // plain PKCE, no PKCE: back to the app with invalid_request
    let plain = ok.replace("code_challenge_method=S256", "code_challenge_method=plain");
    let p = b.get(&plain);
    assert_eq!((p.status, p.query()["error"].as_str()), (303, "invalid_request"));
    assert_eq!(p.query()["state"], "st-123");
    let none = ok.replace(&format!("&code_challenge={challenge}"), "");
    assert_eq!(b.get(&none).query()["error"], "invalid_request");
    // the wrong audience
    let aud = ok.replace(
        &form_urlencoded::byte_serialize(s.base.as_bytes()).collect::<String>(),
        "https%3A%2F%2Fevil.example%2Ffhir",
    );
    assert_eq!(b.get(&aud).query()["error"], "invalid_request");
    // scopes the client may not have: none left → invalid_scope; system scopes never by sign-in
    let sys = authorize_path(&s, "system/*.rs user/Observation.cruds", &challenge, &[]);
    assert_eq!(b.get(&sys).query()["error"], "invalid_scope");
    // an unregistered redirect URI or client is never redirected to
    let evil = ok.replace(
        &form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>(),
        "https%3A%2F%2Fevil.example%2Fcb",
    );
    let p = b.get(&evil);
    assert_eq!((p.status, p.location.is_none()), (400, true));
    let p = b.get(&ok.replace(&format!("client_id={APP}"), "client_id=nobody"));
    assert_eq!((p.status, p.location.is_none()), (400, true));
    assert!(p.body.contains("role=\"alert\""));
    // an expired or forged request field
    let p = b.post(
        "/auth/login",
        &[("request", "AAAA"), ("username", "doctor"), ("password", PASSWORD)],
    );
    assert_eq!(p.status, 400);
    // the pages: no scripts, never framed
    let r = Client::new().get(format!("{}{ok}", root(&s))).send().unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'") && !csp.contains("script-src")
    );
}

fn launch_code(s: &TestServer, scope: &str, extra: &[(&str, &str)], user: &str) -> (String, String, Page) {
    let (verifier, challenge) = pkce();
    let mut b = Browser::new(s);
    let (consent, _) = sign_in(&mut b, s, user, None, &authorize_path(s, scope, &challenge, extra));
    let done = b.post_with("/auth/consent", &consent, &[("decision", "allow")]);
    assert_eq!(done.status, 303, "{}", done.body);
    (done.query()["code"].clone(), verifier, consent)
}

fn refresh_rotation_and_lifetimes(db: Db) {
    let s = start(db, ConfigLayer::default());
    let (code, verifier, _) = launch_code(&s, "openid offline_access user/Patient.rs", &[], "doctor");
    let (_, tokens) = exchange(&s, &code, &verifier);
    let first = tokens["refresh_token"].as_str().unwrap().to_string();
    let refresh = |t: &str| {
        token_request(
            &s,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", t),
                ("client_id", APP),
            ],
        )
    };
    let (status, second) = refresh(&first);
    assert_eq!(status, 200, "{second}");
    let second_rt = second["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(first, second_rt);
    assert_eq!(
        bearer_get(&s, second["access_token"].as_str().unwrap(), "/Patient"),
        200
    );
    assert_eq!(events(&s, "token-refresh"), 1);
    // a narrower scope may be asked for, never a wider one
    let (status, wider) = token_request(
        &s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &second_rt),
            ("client_id", APP),
            ("scope", "user/*.cruds"),
        ],
    );
    assert_eq!((status, wider["error"].as_str()), (400, Some("invalid_scope")));
    // another client cannot use it
    add_client(
        &s,
        "other-app",
        "public",
        "openid offline_access user/Patient.rs",
        None,
        None,
    );
    let (status, _) = token_request(
        &s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &second_rt),
            ("client_id", "other-app"),
        ],
    );
    assert_eq!(status, 400);
    // the spent first token again: the whole family is revoked, the live one included
    let (status, replay) = refresh(&first);
    assert_eq!((status, replay["error"].as_str()), (400, Some("invalid_grant")));
    let (status, _) = refresh(&second_rt);
    assert_eq!(status, 400, "the family is revoked");

    // lifetimes: an idle token and a family past its absolute lifetime expire
    add_user(&s, "doctor-b", Some("Practitioner/doc-2"));
    let (code, verifier, _) = launch_code(&s, "openid offline_access user/Patient.rs", &[], "doctor-b");
    let (_, t) = exchange(&s, &code, &verifier);
    let rt = t["refresh_token"].as_str().unwrap().to_string();
    s.db.exec("UPDATE auth_refresh_tokens SET family_expires_at = '2000-01-01 00:00:00' WHERE status = 'active'")
        .unwrap();
    assert_eq!(refresh(&rt).0, 400, "past the absolute lifetime");
    let s2 = start(
        db,
        ConfigLayer {
            refresh_idle_secs: Some(1),
            ..Default::default()
        },
    );
    let (code, verifier, _) = launch_code(&s2, "openid offline_access user/Patient.rs", &[], "doctor");
    let (_, t) = exchange(&s2, &code, &verifier);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (status, _) = token_request(
        &s2,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t["refresh_token"].as_str().unwrap()),
            ("client_id", APP),
        ],
    );
    assert_eq!(status, 400, "idle past refresh_idle_secs");
}

fn assertion(
    s: &TestServer,
    client: &str,
    alg: Algorithm,
    key: &str,
    exp_in: i64,
    jti: &str,
    aud: Option<&str>,
) -> String {
    assertion_naming(s, client, alg, key, exp_in, jti, aud, None)
}

/// An assertion whose header names a `jku` (where its key would be published).
#[allow(clippy::too_many_arguments)]
fn assertion_naming(
    s: &TestServer,
    client: &str,
    alg: Algorithm,
    key: &str,
    exp_in: i64,
    jti: &str,
    aud: Option<&str>,
    jku: Option<&str>,
) -> String {
    let pem = std::fs::read(format!("{}/tests/data/oauth/{key}.pem", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let enc = match alg {
        Algorithm::RS384 | Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut h = Header::new(alg);
    h.kid = Some(key.into());
    h.jku = jku.map(str::to_string);
    let now = now() as i64;
    let token_url = format!("{}/auth/token", root(s));
    jsonwebtoken::encode(
        &h,
        &json!({"iss": client, "sub": client, "aud": aud.unwrap_or(&token_url), "exp": now + exp_in, "jti": jti}),
        &enc,
    )
    .unwrap()
}

fn client_credentials(s: &TestServer, assertion: &str, scope: &str) -> (u16, Value) {
    token_request(
        s,
        &[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
    )
}

fn backend_services_private_key_jwt(db: Db) {
    let s = start(db, ConfigLayer::default());
    patient(&s, "Backend");
    for (key, alg) in [("client-rs384", Algorithm::RS384), ("client-es384", Algorithm::ES384)] {
        let jwks = std::fs::read_to_string(format!(
            "{}/tests/data/oauth/{key}.jwks.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        add_client(&s, key, "confidential", "system/Patient.rs", None, Some(&jwks));
        let a = assertion(&s, key, alg, key, 240, &format!("jti-{key}"), None);
        let (status, body) = client_credentials(&s, &a, "system/Patient.rs system/Observation.rs");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["scope"], "system/Patient.rs", "only what the client may have");
        assert!(body.get("refresh_token").is_none());
        let t = body["access_token"].as_str().unwrap();
        assert_eq!(bearer_get(&s, t, "/Patient"), 200);
        assert_eq!(bearer_get(&s, t, "/Observation"), 403);
        // the access review's record of the client's last token
        let (_, clients) = s.store.auth_last_use().unwrap();
        assert!(
            clients.iter().any(|(id, last)| id == key && last.is_some()),
            "{clients:?}"
        );
        // the same assertion again: a replay
        let (status, body) = client_credentials(&s, &a, "system/Patient.rs");
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
        // scopes naming an unknown type, or writes the client was not registered for:
        // invalid_scope, and the assertion is not spent (its jti is checked after the scope)
        let fresh = assertion(&s, key, alg, key, 240, &format!("scope-{key}"), None);
        for scope in [
            "system/Patient.rs system/Nosuchtype.rs",
            "system/Patient.cud",
            "system/Patient.write",
        ] {
            let (status, body) = client_credentials(&s, &fresh, scope);
            assert_eq!(
                (status, body["error"].as_str()),
                (400, Some("invalid_scope")),
                "{scope}"
            );
        }
        assert_eq!(client_credentials(&s, &fresh, "system/Patient.rs").0, 200);
        let (status, body) = client_credentials(&s, &fresh, "system/Patient.rs");
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
        // a jku that is not the client's registered JWKS URL: refused, and never fetched
        let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        trap.set_nonblocking(true).unwrap();
        let elsewhere = format!("http://{}/keys.json", trap.local_addr().unwrap());
        let named = assertion_naming(&s, key, alg, key, 240, &format!("jku-{key}"), None, Some(&elsewhere));
        let (status, body) = client_credentials(&s, &named, "system/Patient.rs");
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{body}"
        );
        assert!(
            matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the jku was fetched"
        );
        // exp more than five minutes ahead, another audience, an expired one
        let far = assertion(&s, key, alg, key, 600, &format!("far-{key}"), None);
        assert_eq!(client_credentials(&s, &far, "system/Patient.rs").0, 401);
        let aud = assertion(
            &s,
            key,
            alg,
            key,
            240,
            &format!("aud-{key}"),
            Some("https://other.example/token"),
        );
        assert_eq!(client_credentials(&s, &aud, "system/Patient.rs").0, 401);
        let old = assertion(&s, key, alg, key, -60, &format!("old-{key}"), None);
        assert_eq!(client_credentials(&s, &old, "system/Patient.rs").0, 401);
    }
    // keys published by the client at a URL (fetched by the server, then cached)
    let jwks = std::fs::read_to_string(format!(
        "{}/tests/data/oauth/client-rs384.jwks.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let jwks_uri = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = fetches.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                jwks.len()
            );
        }
    });
    s.store
        .auth_client_add(&ClientRow {
            client_id: "by-url".into(),
            name: "by-url".into(),
            client_type: "confidential".into(),
            secret_hash: None,
            jwks: None,
            jwks_uri: Some(jwks_uri.clone()),
            redirect_uris: String::new(),
            scopes: "system/Patient.rs".into(),
            disabled: false,
            created_at: fhirvault::store::now(),
        })
        .unwrap();
    for n in 0..2 {
        let a = assertion(
            &s,
            "by-url",
            Algorithm::RS384,
            "client-rs384",
            240,
            &format!("url-{n}"),
            None,
        );
        assert_eq!(client_credentials(&s, &a, "system/Patient.rs").0, 200);
    }
    // a jku naming the registered JWKS URL is accepted
    let named = assertion_naming(
        &s,
        "by-url",
        Algorithm::RS384,
        "client-rs384",
        240,
        "url-jku",
        None,
        Some(&jwks_uri),
    );
    assert_eq!(client_credentials(&s, &named, "system/Patient.rs").0, 200);
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the key set is cached"
    );

    // RS256 (not RS384) is refused; a key the client did not register is refused
    let rs256 = assertion(&s, "client-rs384", Algorithm::RS256, "client-rs384", 240, "rs256", None);
    assert_eq!(client_credentials(&s, &rs256, "system/Patient.rs").0, 401);
    let swapped = assertion(
        &s,
        "client-rs384",
        Algorithm::ES384,
        "client-es384",
        240,
        "swapped",
        None,
    );
    assert_eq!(client_credentials(&s, &swapped, "system/Patient.rs").0, 401);
    // a client secret (HTTP Basic); a wrong one; a public client cannot use client credentials
    add_client(
        &s,
        "secret-svc",
        "confidential",
        "system/Patient.rs",
        Some("s3cret-value"),
        None,
    );
    let basic = |secret: &str| {
        Client::new()
            .post(format!("{}/auth/token", root(&s)))
            .basic_auth("secret-svc", Some(secret))
            .form(&[("grant_type", "client_credentials"), ("scope", "system/Patient.rs")])
            .send()
            .unwrap()
    };
    assert_eq!(basic("s3cret-value").status(), 200);
    let wrong = basic("guess");
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let (status, body) = token_request(
        &s,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.rs"),
            ("client_id", APP),
        ],
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("unauthorized_client")));
    let (status, body) = token_request(&s, &[("grant_type", "password"), ("client_id", APP)]);
    assert_eq!((status, body["error"].as_str()), (400, Some("unsupported_grant_type")));
    assert!(events(&s, "token-issue") >= 3 && events(&s, "token-failure") >= 8);
}

fn introspection_and_revocation(db: Db) {
    let s = start(db, ConfigLayer::default());
    add_client(
        &s,
        "rs",
        "confidential",
        "system/Patient.rs",
        Some("rs-secret-value"),
        None,
    );
    let (code, verifier, _) = launch_code(&s, "openid offline_access user/Patient.rs", &[], "doctor");
    let (_, tokens) = exchange(&s, &code, &verifier);
    let access = tokens["access_token"].as_str().unwrap().to_string();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_string();
    let introspect = |t: &str| -> (u16, Value) {
        let r = Client::new()
            .post(format!("{}/auth/introspect", root(&s)))
            .basic_auth("rs", Some("rs-secret-value"))
            .form(&[("token", t)])
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    let (status, info) = introspect(&access);
    assert_eq!(status, 200);
    assert_eq!(info["active"], true);
    assert_eq!(info["client_id"], APP);
    assert_eq!(info["scope"], "openid offline_access user/Patient.rs");
    assert_eq!(info["fhirUser"], "Practitioner/doc-1");
    assert_eq!(introspect(&refresh).1["active"], true);
    assert_eq!(introspect("not-a-token").1, json!({"active": false}));
    // callers must authenticate: nobody, or a public client, is refused
    let anon = Client::new()
        .post(format!("{}/auth/introspect", root(&s)))
        .form(&[("token", access.as_str())])
        .send()
        .unwrap();
    assert_eq!(anon.status(), 401);
    let public = Client::new()
        .post(format!("{}/auth/introspect", root(&s)))
        .form(&[("token", access.as_str()), ("client_id", APP)])
        .send()
        .unwrap();
    assert_eq!(public.status(), 401);
    let revoke = |t: &str, client: &str| {
        Client::new()
            .post(format!("{}/auth/revoke", root(&s)))
            .form(&[("token", t), ("client_id", client)])
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // another client's revocation does nothing (and says nothing)
    add_client(&s, "other-app", "public", "openid", None, None);
    assert_eq!(revoke(&access, "other-app"), 200);
    assert_eq!(bearer_get(&s, &access, "/Patient"), 200);
    // the owner revokes: the access token stops working at once, the refresh token's grant too
    assert_eq!(revoke(&access, APP), 200);
    assert_eq!(bearer_get(&s, &access, "/Patient"), 401);
    assert_eq!(introspect(&access).1["active"], false);
    assert_eq!(revoke(&refresh, APP), 200);
    assert_eq!(introspect(&refresh).1["active"], false);
    let (status, _) = token_request(
        &s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", APP),
        ],
    );
    assert_eq!(status, 400);
    // another node learns of the revocation from the database
    let other_node = fhirvault::auth::server::RevokedTokens::default();
    other_node.reload(&s.store).unwrap();
    let jti = introspect_jti(&access);
    assert!(other_node.is_revoked(&jti));
    assert!(events(&s, "token-revoke") >= 3 && events(&s, "token-introspect") >= 5);
}

fn introspect_jti(token: &str) -> String {
    let claims: Value = serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    claims["jti"].as_str().unwrap().to_string()
}

fn lockout_disabled_users_and_idle_sessions(db: Db) {
    let s = start(
        db,
        ConfigLayer {
            login_max_failures: Some(3),
            login_lockout_secs: Some(600),
            session_idle_secs: Some(1),
            ..Default::default()
        },
    );
    let (_, challenge) = pkce();
    let auth = authorize_path(&s, "openid user/Patient.rs", &challenge, &[]);
    let mut b = Browser::new(&s);
    let login = b.get(&auth);
    for _ in 0..3 {
        let p = b.post_with("/auth/login", &login, &[("username", "doctor"), ("password", "wrong")]);
        assert_eq!(p.status, 401);
    }
    // locked: the right password is refused, with the same answer as a wrong one
    let locked = b.post_with("/auth/login", &login, &[("username", "doctor"), ("password", PASSWORD)]);
    assert_eq!(locked.status, 401);
    assert!(locked.body.contains("incorrect, or the account is locked"));
    // a disabled account cannot sign in
    add_user(&s, "gone", None);
    assert!(s.store.auth_user_set_disabled("gone", true).unwrap());
    let p = b.post_with("/auth/login", &login, &[("username", "gone"), ("password", PASSWORD)]);
    assert_eq!(p.status, 401);
    // a session idle past session_idle_secs is over
    add_user(&s, "idle", None);
    let next = b.post_with("/auth/login", &login, &[("username", "idle"), ("password", PASSWORD)]);
    assert!(next.body.contains("/auth/mfa/enrol"));
    let secret = next.secret();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let late = b.post_with("/auth/mfa/enrol", &next, &[("code", &totp_at(&secret, now()))]);
    assert_eq!(late.status, 400, "{}", late.body);
    assert!(late.body.contains("start again"));
}

fn ehr_launch_and_patient_users(db: Db) {
    let s = start(db, ConfigLayer::default());
    let pid = patient(&s, "Launched");
    let (value, row) =
        fhirvault::auth::server::new_launch(Some(pid.clone()), Some("enc-1".into()), Some(APP.into()), 300);
    s.store.auth_launch_add(&row).unwrap();
    let (code, verifier, consent) = launch_code(&s, "launch openid patient/*.rs", &[("launch", &value)], "doctor");
    assert!(
        !consent.body.contains("Choose the patient"),
        "the launch names the patient"
    );
    assert!(consent.body.contains(&format!("Patient/{pid}")));
    let (_, t) = exchange(&s, &code, &verifier);
    assert_eq!(
        (t["patient"].as_str(), t["encounter"].as_str()),
        (Some(pid.as_str()), Some("enc-1"))
    );
    assert_eq!(t["need_patient_banner"], true);
    // a launch value works once
    let (_, challenge) = pkce();
    let p = Browser::new(&s).get(&authorize_path(
        &s,
        "launch patient/*.rs",
        &challenge,
        &[("launch", &value)],
    ));
    assert_eq!(p.query()["error"], "invalid_request");

    // a grant without user-level Patient read lets the practitioner choose no patient
    add_user(&s, "narrow", Some("Practitioner/doc-3"));
    let (_, challenge) = pkce();
    let mut b = Browser::new(&s);
    let (consent, _) = sign_in(
        &mut b,
        &s,
        "narrow",
        None,
        &authorize_path(&s, "launch/patient patient/*.rs", &challenge, &[]),
    );
    assert!(consent.body.contains("Choose the patient"));
    assert!(consent.body.contains("No patient you may access matches"));
    assert!(!consent.body.contains("name=\"patient\" value="));
    let refused = b.post_with("/auth/consent", &consent, &[("decision", "allow"), ("patient", &pid)]);
    assert_eq!(refused.status, 400, "a patient the picker did not offer");

    // a patient signs in: their own compartment, no picker, no user-level scopes
    add_user(&s, "ada", Some(&format!("Patient/{pid}")));
    let (code, verifier, consent) = launch_code(
        &s,
        "launch/patient openid fhirUser patient/*.rs user/Patient.rs",
        &[],
        "ada",
    );
    assert!(!consent.body.contains("Choose the patient"));
    let (_, t) = exchange(&s, &code, &verifier);
    assert_eq!(t["patient"], pid.as_str());
    assert_eq!(t["need_patient_banner"], false);
    assert!(!t["scope"].as_str().unwrap().contains("user/"), "{}", t["scope"]);
    let other = patient(&s, "Notmine");
    let access = t["access_token"].as_str().unwrap();
    assert_eq!(bearer_get(&s, access, &format!("/Patient/{pid}")), 200);
    assert_eq!(bearer_get(&s, access, &format!("/Patient/{other}")), 404);
    // userinfo
    let info: Value = Client::new()
        .get(format!("{}/auth/userinfo", root(&s)))
        .bearer_auth(access)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["fhirUser"], format!("Patient/{pid}"));
    assert_eq!(info["preferred_username"], "ada");
}

fn well_known_documents(db: Db) {
    let s = start(db, ConfigLayer::default());
    for path in [
        "/fhir/.well-known/smart-configuration",
        "/.well-known/smart-configuration",
    ] {
        let doc: Value = Client::new()
            .get(format!("{}{path}", root(&s)))
            .send()
            .unwrap()
            .json()
            .unwrap();
        for field in [
            "issuer",
            "jwks_uri",
            "authorization_endpoint",
            "token_endpoint",
            "grant_types_supported",
            "scopes_supported",
            "capabilities",
            "code_challenge_methods_supported",
            "introspection_endpoint",
            "revocation_endpoint",
        ] {
            assert!(doc.get(field).is_some(), "{path} has {field}");
        }
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(doc["token_endpoint"], format!("{}/auth/token", root(&s)));
        // SMART v2, granular scopes among the examples
        assert!(doc["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "permission-v2"));
        assert!(doc["scopes_supported"].as_array().unwrap().iter().any(|c| {
            c == "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
        }));
        // the metadata and well-known documents need no token
    }
    let oidc: Value = Client::new()
        .get(format!("{}/.well-known/openid-configuration", root(&s)))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(oidc["id_token_signing_alg_values_supported"], json!(["ES256"]));
    // the CapabilityStatement names SMART and the OAuth endpoints, absolute
    let cs = Client::new()
        .get(s.url("/metadata"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    let security = &cs["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &security["extension"][0];
    assert_eq!(
        uris["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    let token = uris["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "token")
        .unwrap();
    assert_eq!(token["valueUri"], format!("{}/auth/token", root(&s)));

    // with the built-in server turned off (no external provider): no endpoints, no documents
    let off = TestServer::start_with(
        db,
        ConfigLayer {
            auth_server: Some(false),
            ..Default::default()
        },
    );
    for path in ["/auth/authorize", "/fhir/.well-known/smart-configuration", "/auth/jwks"] {
        let r = Client::new().get(format!("{}{path}", root(&off))).send().unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let cs = off.get("/metadata").json();
    assert!(cs["rest"][0]["security"].get("service").is_none());
    assert_eq!(off.store.auth_user_count().unwrap(), 0);
}

fn admin_commands(db: Db) {
    let s = TestServer::start(db);
    let run = |args: &[&str], stdin: Option<&str>| -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"));
        cmd.arg("--data-dir")
            .arg(&s.config.data_dir)
            .arg("--database-url")
            .arg(&s.config.database_url)
            .arg("admin")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(url) = &s.config.migration_database_url {
            cmd.env("FHIRVAULT_MIGRATION_DATABASE_URL", url);
        }
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(
        &[
            "user",
            "add",
            "carol",
            "--fhir-user",
            "Practitioner/c-1",
            "--role",
            "nurse",
        ],
        None,
    );
    assert!(ok, "{err}");
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .expect("a generated password")
        .to_string();
    assert_eq!(password.len(), 20);
    // a password given on stdin is never printed
    let (ok, out, err) = run(
        &["user", "add", "dave", "--password-stdin"],
        Some("dave's long password\n"),
    );
    assert!(ok, "{err}");
    assert!(!out.contains("dave's long password") && !out.contains("password (shown once)"));
    let (ok, _, err) = run(&["user", "add", "dave"], None);
    assert!(!ok && err.contains("exists already"));
    let (ok, _, err) = run(&["user", "add", "erin", "--password-stdin"], Some("short\n"));
    assert!(!ok && err.contains("at least 12"));
    let (ok, out, _) = run(&["user", "add", "frank", "--with-totp"], None);
    assert!(ok && out.contains("otpauth://totp/fhirvault:frank?secret="));
    let (_, list, _) = run(&["user", "list"], None);
    assert!(list.contains("carol") && list.contains("Practitioner/c-1") && list.contains("nurse"));
    assert!(!list.contains(&password));
    assert!(run(&["user", "disable", "carol"], None).0);
    assert!(s.store.auth_user_by_name("carol").unwrap().unwrap().disabled);
    assert!(run(&["user", "reset-mfa", "frank"], None).0);
    assert!(s
        .store
        .auth_user_by_name("frank")
        .unwrap()
        .unwrap()
        .totp_secret
        .is_none());
    assert!(!run(&["user", "disable", "nobody"], None).0);

    let (ok, out, err) = run(
        &[
            "client",
            "add",
            "cli-app",
            "--redirect-uri",
            "https://app.example/cb",
            "--scope",
            "openid patient/*.rs",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("none (PKCE)"));
    let (ok, out, _) = run(
        &[
            "client",
            "add",
            "cli-svc",
            "--type",
            "confidential",
            "--secret",
            "--scope",
            "system/*.rs",
        ],
        None,
    );
    assert!(ok && out.contains("client_secret"));
    let (ok, _, err) = run(
        &[
            "client",
            "add",
            "bad",
            "--redirect-uri",
            "http://evil.example/cb",
            "--scope",
            "openid",
        ],
        None,
    );
    assert!(!ok && err.contains("redirect URI"));
    let (ok, _, err) = run(
        &["client", "add", "bad2", "--type", "confidential", "--scope", "openid"],
        None,
    );
    assert!(!ok && err.contains("needs --secret"));
    let (_, list, _) = run(&["client", "list"], None);
    assert!(list.contains("cli-app") && list.contains("cli-svc") && list.contains("client_secret"));
    assert!(run(&["client", "disable", "cli-app"], None).0);
    assert!(s.store.auth_client("cli-app").unwrap().unwrap().disabled);
    let (ok, out, _) = run(&["launch", "--patient", "p-1", "--client", "cli-app"], None);
    assert!(ok && out.trim().len() >= 40);
    // each command is in the audit log
    for e in [
        "user-add",
        "user-disable",
        "user-reset-mfa",
        "client-add",
        "client-disable",
        "launch",
        "user-list",
    ] {
        assert!(events(&s, e) >= 1, "{e}");
    }
}

/// `serve` on an empty data directory creates `admin` with a generated password, printed once on
/// standard output and never in the log; the password signs in; the next start prints none.
fn first_run_bootstrap(db: Db) {
    let t = common::TestDb::new(db);
    let data = t.dir.path().join("data");
    let fhirvault = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"));
        c.arg("--data-dir")
            .arg(&data)
            .arg("--database-url")
            .arg(&t.database_url);
        c
    };
    // starts `serve`, waits until it answers; returns it with its root URL and its output files
    let serve = |tag: &str| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = t.dir.path().join(format!("{tag}.out"));
        let err = t.dir.path().join(format!("{tag}.err"));
        let child = fhirvault()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while reqwest::blocking::get(format!("{root}/healthz")).is_err() {
            assert!(std::time::Instant::now() < deadline, "the server did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (child, root, out, err)
    };
    let (mut child, root, out, err) = serve("first");
    let printed = std::fs::read_to_string(&out).unwrap();
    let password = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("password  "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no generated password printed: {printed}"))
        .to_string();
    assert_eq!(password.len(), 20);
    assert!(printed.contains("username  admin"));
    // the password signs in (an app registered by the CLI meanwhile)
    let added = fhirvault()
        .args([
            "admin",
            "client",
            "add",
            APP,
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "openid user/Patient.rs",
        ])
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let http = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (_, challenge) = pkce();
    let page = http
        .get(format!("{root}/auth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", APP),
            ("redirect_uri", REDIRECT),
            ("scope", "openid user/Patient.rs"),
            ("aud", &format!("{root}/fhir")),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .unwrap()
        .text()
        .unwrap();
    let request = page
        .split("name=\"request\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let login = |pw: &str| {
        http.post(format!("{root}/auth/login"))
            .form(&[("request", request), ("username", "admin"), ("password", pw)])
            .send()
            .unwrap()
    };
    let r = login(&password);
    assert_eq!(r.status(), 200);
    assert!(
        r.text().unwrap().contains("/auth/mfa/enrol"),
        "the admin enrols a second factor"
    );
    assert_eq!(login("not the password").status(), 401);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !std::fs::read_to_string(&err).unwrap().contains(&password),
        "the password is never logged"
    );
    // the next start creates nobody and prints no password
    let (mut again, _, out, _) = serve("second");
    let printed = std::fs::read_to_string(&out).unwrap();
    again.kill().unwrap();
    again.wait().unwrap();
    assert!(!printed.contains("password"), "{printed}");
}

on_both_backends!(
    first_run_bootstrap,
    standalone_launch_with_pkce_totp_and_picker,
    authorize_request_rules,
    refresh_rotation_and_lifetimes,
    backend_services_private_key_jwt,
    introspection_and_revocation,
    lockout_disabled_users_and_idle_sessions,
    ehr_launch_and_patient_users,
    well_known_documents,
    admin_commands,
);
