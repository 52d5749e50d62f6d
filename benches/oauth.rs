//! Authorization-server bench: what each grant costs over HTTP against the work it cannot avoid.
//!
//! On each backend, at concurrency 8 (the same HTTP client for every figure):
//! * backend-services grants (`client_credentials`, an ES384 `private_key_jwt` assertion signed
//!   by the client for each grant) per second, against a floor measured in-process in the same
//!   run: the client signs, the server's work without HTTP (verify the assertion, record its
//!   `jti`, sign the access token, make the audit event durable);
//! * refresh grants (rotation: the old token spent, the next stored) per second, against the
//!   floor `auth_refresh_use` + token signing + a durable audit event;
//! * sign-ins (password checked with argon2id, session stored, the next page rendered) per
//!   second at concurrency 2, against argon2id verifications per second;
//! * for context, FHIR reads by id per second through the same client.
//!
//! Run: `cargo bench --bench oauth` (optionally `BENCH_SECS=5 BENCH_CONC=8`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use fhirvault::audit::{Action, Agent, AuditRecord, Kind};
use fhirvault::auth::server::{self as authz, secret_hash};
use fhirvault::store::auth::{ClientRow, RefreshRow, RefreshUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{env_num, throughput};

const CLIENT: &str = "bench-backend";
const APP: &str = "bench-app";
const PASSWORD: &str = "bench password of some length";

fn data(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/data/oauth/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn assertion(key: &EncodingKey, token_url: &str) -> String {
    let mut h = Header::new(Algorithm::ES384);
    h.kid = Some("client-es384".into());
    let now = chrono::Utc::now().timestamp();
    jsonwebtoken::encode(
        &h,
        &json!({"iss": CLIENT, "sub": CLIENT, "aud": token_url, "exp": now + 240,
                "jti": uuid::Uuid::new_v4().to_string()}),
        key,
    )
    .unwrap()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn audit_floor(s: &TestServer, client: &str) {
    let agent = Agent {
        client_id: Some(client.into()),
        ..Agent::default()
    };
    s.auditor
        .record_blocking(&AuditRecord::new(Kind::Security("token-issue"), Action::Execute, agent))
        .unwrap();
}

fn new_refresh(s: &TestServer, user_id: &str) -> String {
    let token = authz::new_secret();
    let now = fhirvault::store::now();
    s.store
        .auth_refresh_add(&RefreshRow {
            token_hash: secret_hash(&token),
            family_id: uuid::Uuid::new_v4().to_string(),
            client_id: APP.into(),
            user_id: Some(user_id.into()),
            scope: "openid offline_access user/Patient.rs".into(),
            patient: None,
            encounter: None,
            amr: "pwd otp mfa".into(),
            status: "active".into(),
            issued_at: now,
            idle_expires_at: now + chrono::Duration::days(1),
            family_expires_at: now + chrono::Duration::days(1),
        })
        .unwrap();
    token
}

fn bench_backend(db: Db, secs: u64, conc: usize) -> Value {
    let s = TestServer::start(db);
    let root = format!("http://{}", s.addr);
    let token_url = format!("{root}/auth/token");
    let key = EncodingKey::from_ec_pem(data("client-es384.pem").as_bytes()).unwrap();
    let client = |id: &str, kind: &str, scopes: &str, jwks: Option<String>| ClientRow {
        client_id: id.into(),
        name: id.into(),
        client_type: kind.into(),
        secret_hash: None,
        jwks,
        jwks_uri: None,
        redirect_uris: "http://127.0.0.1:9/cb".into(),
        scopes: scopes.into(),
        disabled: false,
        created_at: fhirvault::store::now(),
    };
    s.store
        .auth_client_add(&client(
            CLIENT,
            "confidential",
            "system/Patient.rs",
            Some(data("client-es384.jwks.json")),
        ))
        .unwrap();
    s.store
        .auth_client_add(&client(APP, "public", "openid offline_access user/Patient.rs", None))
        .unwrap();
    let user = authz::new_user("bench-user", PASSWORD, Some("Practitioner/bench".into()), &[]).unwrap();
    s.store.auth_user_add(&user).unwrap();
    let ids = support::preload_patients(&s, 200);
    let server = fhirvault::server::open_auth_server(&s.config, &s.store, &s.issuer).unwrap();
    let form = |a: String| {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("scope", "system/Patient.rs".into()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ),
            ("client_assertion", a),
        ]
    };

    // backend services
    let grants_http = throughput(
        conc,
        secs,
        |_| http(),
        |c, _| {
            let r = c
                .post(&token_url)
                .form(&form(assertion(&key, &token_url)))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
        },
    );
    let grants_floor = throughput(
        conc,
        secs,
        |_| (),
        |_, _| {
            let f: std::collections::HashMap<String, String> = form(assertion(&key, &token_url))
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            server.token(&f, None, &token_url, &|_| true).unwrap();
            audit_floor(&s, CLIENT);
        },
    );

    // refresh rotation
    let refresh_http = throughput(
        conc,
        secs,
        |_| (http(), new_refresh(&s, &user.id)),
        |(c, rt), _| {
            let r = c
                .post(&token_url)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", rt.as_str()),
                    ("client_id", APP),
                ])
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            *rt = r.json::<Value>().unwrap()["refresh_token"]
                .as_str()
                .unwrap()
                .to_string();
        },
    );
    let refresh_floor = throughput(
        conc,
        secs,
        |_| new_refresh(&s, &user.id),
        |rt, _| {
            let next = authz::new_secret();
            let RefreshUse::Rotated(row) = s
                .store
                .auth_refresh_use(&secret_hash(rt), &secret_hash(&next), 86_400)
                .unwrap()
            else {
                panic!("rotation refused")
            };
            s.issuer
                .issue(&fhirvault::auth::TokenRequest {
                    scope: row.scope.clone(),
                    subject: row.user_id.clone(),
                    client_id: Some(APP.into()),
                    expires_in: 900,
                    ..Default::default()
                })
                .unwrap();
            audit_floor(&s, APP);
            *rt = next;
        },
    );

    // sign-ins: the sealed request of one authorization request, posted with the password
    let (_, challenge) = {
        use base64::Engine;
        use sha2::Digest;
        let v = "v".repeat(64);
        let c = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(v.as_bytes()));
        (v, c)
    };
    let page = http()
        .get(format!("{root}/auth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", APP),
            ("redirect_uri", "http://127.0.0.1:9/cb"),
            ("scope", "openid user/Patient.rs"),
            ("aud", s.base.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .unwrap()
        .text()
        .unwrap();
    let request = page
        .split("name=\"request\" value=\"")
        .nth(1)
        .and_then(|x| x.split('"').next())
        .unwrap()
        .to_string();
    let sign_in_conc = 2;
    let logins_http = throughput(
        sign_in_conc,
        secs,
        |_| http(),
        |c, _| {
            let r = c
                .post(format!("{root}/auth/login"))
                .form(&[
                    ("request", request.as_str()),
                    ("username", "bench-user"),
                    ("password", PASSWORD),
                ])
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
        },
    );
    let argon2_floor = throughput(
        sign_in_conc,
        secs,
        |_| (),
        |_, _| {
            assert!(server.login("bench-user", PASSWORD).unwrap().is_some());
        },
    );

    // context: FHIR reads through the same client
    let token = s.token("system/*.cruds", None);
    let reads_http = throughput(
        conc,
        secs,
        |_| http(),
        |c, i| {
            let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
            let r = c
                .get(s.url(&format!("/Patient/{id}")))
                .bearer_auth(&token)
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
        },
    );
    eprintln!(
        "  c{conc} client_credentials/s {grants_http:>7.0}  floor {grants_floor:>7.0}  ratio {:.2}",
        grants_http / grants_floor
    );
    eprintln!(
        "  c{conc} refresh/s            {refresh_http:>7.0}  floor {refresh_floor:>7.0}  ratio {:.2}",
        refresh_http / refresh_floor
    );
    eprintln!(
        "  c{sign_in_conc} sign-ins/s           {logins_http:>7.0}  argon2 {argon2_floor:>7.0}  ratio {:.2}",
        logins_http / argon2_floor
    );
    eprintln!("  c{conc} FHIR reads/s (same client, for context) {reads_http:>7.0}");
    json!({
        "backend": format!("{db:?}"),
        "concurrency": conc,
        "client_credentials_per_sec": grants_http,
        "client_credentials_floor_per_sec": grants_floor,
        "client_credentials_ratio": grants_http / grants_floor,
        "refresh_per_sec": refresh_http,
        "refresh_floor_per_sec": refresh_floor,
        "refresh_ratio": refresh_http / refresh_floor,
        "sign_in_concurrency": sign_in_conc,
        "sign_ins_per_sec": logins_http,
        "argon2_verifications_per_sec": argon2_floor,
        "sign_in_ratio": logins_http / argon2_floor,
        "fhir_reads_per_sec_same_client": reads_http,
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 3);
    let conc = env_num("BENCH_CONC", 8) as usize;
    eprintln!(
        "fhirvault oauth bench: {secs}s per figure, CPU {}",
        support::cpu_model()
    );
    let only = std::env::var("BENCH_BACKENDS").unwrap_or_default().to_lowercase();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        if !only.is_empty() && !only.contains(&format!("{db:?}").to_lowercase()) {
            continue;
        }
        eprintln!("{db:?}:");
        results.push(bench_backend(db, secs, conc));
    }
    let mut out = support::provenance("oauth");
    out["backends"] = json!(results);
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    support::write_results("oauth", &out);
}
