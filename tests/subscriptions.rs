//! Subscriptions (issue 24): R4 rest-hook and Backport topic subscriptions delivered to a real
//! endpoint the test runs on loopback, in order, with retries; endpoints refused before any
//! connection; notifications filtered by the owner's grant. Each on SQLite and on PostgreSQL.

mod common;

use common::{Db, TestServer};
use fhirvault::config::ConfigLayer;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request the endpoint received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A plain HTTP endpoint on loopback that records what it receives and answers with the
/// status set (200 unless told otherwise).
struct Endpoint {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    connections: Arc<AtomicUsize>,
    /// How long each answer waits.
    delay_ms: Arc<AtomicU64>,
    /// A `Location` to send with the answer (a redirect, with a 3xx status).
    location: Arc<Mutex<Option<String>>>,
    tls: bool,
}

/// Reads one request from `stream`, records it (when answering 200) and answers.
fn serve_one(
    stream: &mut (impl Read + Write),
    received: &Mutex<Vec<Received>>,
    status: &AtomicU16,
    delay_ms: &AtomicU64,
    location: &Mutex<Option<String>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    std::thread::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst)));
    let code = status.load(Ordering::SeqCst);
    if code == 200 {
        received.lock().unwrap().push(Received {
            method,
            path,
            headers,
            body,
        });
    }
    let stream = reader.into_inner();
    let location = match &*location.lock().unwrap() {
        Some(l) => format!("Location: {l}\r\n"),
        None => String::new(),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\n{location}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.flush();
}

impl Endpoint {
    fn start() -> Endpoint {
        Endpoint::start_with(None)
    }

    /// With `tls`, https with that server configuration.
    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Endpoint {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let connections = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let location = Arc::new(Mutex::new(None));
        let is_tls = tls.is_some();
        let (r, s, c, d, l) = (
            received.clone(),
            status.clone(),
            connections.clone(),
            delay_ms.clone(),
            location.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, s, d, l, tls) = (r.clone(), s.clone(), d.clone(), l.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        let mut tls = rustls::StreamOwned::new(conn, stream);
                        serve_one(&mut tls, &r, &s, &d, &l);
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    }
                    None => {
                        let mut stream = stream;
                        serve_one(&mut stream, &r, &s, &d, &l);
                    }
                });
            }
        });
        Endpoint {
            port,
            received,
            status,
            connections,
            delay_ms,
            location,
            tls: is_tls,
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/hook", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `ready` holds for what was received.
    fn wait_for(&self, what: &str, ready: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.received();
            if ready(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {got:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn json_of(r: &Received) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// The SubscriptionStatus of a notification Bundle.
fn status_of(bundle: &Value) -> &Value {
    &bundle["entry"][0]["resource"]
}

fn param<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["parameter"].as_array()?.iter().find(|p| p["name"] == name)
}

fn notification_type(bundle: &Value) -> String {
    param(status_of(bundle), "type").unwrap()["valueCode"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (event number, focus reference) of every event of the notifications received.
fn events(received: &[Received]) -> Vec<(i64, Option<String>)> {
    let mut out = Vec::new();
    for r in received {
        let b = json_of(r);
        for p in status_of(&b)["parameter"].as_array().unwrap() {
            if p["name"] != "notification-event" {
                continue;
            }
            let parts = p["part"].as_array().unwrap();
            let number = parts.iter().find(|x| x["name"] == "event-number").unwrap()["valueString"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let focus = parts
                .iter()
                .find(|x| x["name"] == "focus")
                .map(|x| x["valueReference"]["reference"].as_str().unwrap().to_string());
            out.push((number, focus));
        }
    }
    out
}

fn layer() -> ConfigLayer {
    ConfigLayer {
        subscription_allowed_networks: Some(vec!["127.0.0.1/32".into()]),
        subscription_retry_base_ms: Some(50),
        subscription_max_failures: Some(30),
        ..Default::default()
    }
}

const TOPIC: &str = "https://fhirvault.dev/SubscriptionTopic/Observation";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

fn backport_subscription(endpoint: &str, filter: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}backport-subscription")]},
        "status": "requested",
        "reason": "test",
        "criteria": TOPIC,
        "_criteria": {"extension": [{"url": format!("{BACKPORT}backport-filter-criteria"), "valueString": filter}]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}backport-payload-content"), "valueCode": "id-only"}]},
            "header": ["X-Test: yes"]
        }
    })
}

fn observation(patient: &str, code: &str, category: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{patient}")}
    })
}

fn created(r: common::Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn wait_status(s: &TestServer, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = s.get(&format!("/Subscription/{id}")).json()["status"].clone();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "subscription status {got}, wanted {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Backport subscription: handshake, then creates, updates and deletes of the filtered
/// patient's Observations in order with numbers that never skip, nothing of another patient;
/// an R4 subscription without payload gets a ping per matching write.
fn backport_and_r4_notifications(db: Db) {
    let s = TestServer::start_with(db, layer());
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let b = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    let sub = created(s.post(
        "/Subscription",
        &backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}")),
    ));
    let got = hook.wait_for("the handshake", |r| !r.is_empty());
    assert_eq!(notification_type(&json_of(&got[0])), "handshake");
    assert!(got[0].headers.iter().any(|(k, v)| k == "x-test" && v == "yes"));
    wait_status(&s, &sub, "active");

    let mine = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    let theirs = created(s.post("/Observation", &observation(&b, "1234-5", "laboratory")));
    let mut changed = observation(&a, "1234-5", "laboratory");
    changed["id"] = json!(mine);
    changed["status"] = json!("amended");
    assert_eq!(s.put(&format!("/Observation/{mine}"), &changed).status, 200);
    assert!(s.delete(&format!("/Observation/{mine}")).status < 300);
    assert!(s.delete(&format!("/Observation/{theirs}")).status < 300);

    let got = hook.wait_for("three events", |r| events(r).len() >= 3);
    std::thread::sleep(Duration::from_millis(500));
    let got_all = hook.received();
    let evs = events(&got_all);
    assert_eq!(evs.len(), 3, "{evs:?}");
    let numbers: Vec<i64> = evs.iter().map(|e| e.0).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    for (_, focus) in &evs {
        assert!(focus.as_deref().unwrap().ends_with(&format!("/Observation/{mine}")));
    }
    let text: String = got_all
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    assert!(!text.contains(&theirs), "another patient's resource was notified");
    let methods: Vec<String> = got
        .iter()
        .skip(1)
        .flat_map(|r| {
            json_of(r)["entry"]
                .as_array()
                .unwrap()
                .iter()
                .skip(1)
                .map(|e| e["request"]["method"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(methods, vec!["POST", "PUT", "DELETE"]);
    for r in got_all.iter().skip(1) {
        let b = json_of(r);
        assert_eq!(b["type"], "history");
        assert_eq!(notification_type(&b), "event-notification");
        // id-only: no resource in any entry but the status
        assert!(b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .all(|e| e.get("resource").is_none()));
    }

    // R4: criteria a search; no payload: a POST without a body per notification
    let ping = Endpoint::start();
    let r4 = created(s.post(
        "/Subscription",
        &json!({
            "resourceType": "Subscription", "status": "requested", "reason": "r4",
            "criteria": "Observation?code=http://loinc.org|9999-9",
            "channel": {"type": "rest-hook", "endpoint": ping.url()}
        }),
    ));
    ping.wait_for("the R4 handshake", |r| r.len() == 1);
    wait_status(&s, &r4, "active");
    created(s.post("/Observation", &observation(&a, "1111-1", "laboratory")));
    let pinged = created(s.post("/Observation", &observation(&a, "9999-9", "laboratory")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ping.received().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no ping; the subscription's status: {}",
            s.get(&format!("/Subscription/{r4}/$status")).text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = ping.received();
    assert_eq!(got[1].method, "POST");
    assert_eq!(got[1].path, "/hook");
    assert!(got[1].body.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ping.received().len(),
        2,
        "a write the criteria does not match was notified"
    );
    // a transaction's writes are matched like any; a deletion is notified too
    let tx = s.post(
        "",
        &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": observation(&a, "9999-9", "laboratory"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": observation(&a, "1111-1", "laboratory"), "request": {"method": "POST", "url": "Observation"}}
        ]}),
    );
    assert_eq!(tx.status, 200, "{}", tx.text());
    ping.wait_for("the transaction's ping", |r| r.len() >= 3);
    assert!(s.delete(&format!("/Observation/{pinged}")).status < 300);
    ping.wait_for("the deletion's ping", |r| r.len() >= 4);

    // every attempt is on the ledger
    let audit = s.get("/AuditEvent?subtype=https://fhirvault.dev/CodeSystem/audit-subtype|notify&_summary=count");
    assert_eq!(audit.status, 200, "{}", audit.text());
    assert!(audit.json()["total"].as_i64().unwrap() >= 6, "{}", audit.text());
}

/// Endpoints are refused when they are written, before any connection: plain http to anything
/// but loopback, internal addresses not allowed, credentials in the URL, unknown topics,
/// criteria the matcher cannot answer, and full resources unless the server allows them.
fn endpoints_and_criteria_refused(db: Db) {
    // (the topics and operations are advertised)
    {
        let s = TestServer::start_with(
            db,
            ConfigLayer {
                subscription_workers: Some(0),
                ..Default::default()
            },
        );
        let cs = s.get("/metadata").json();
        let sub = common::capability_of(&cs, "Subscription");
        let topics: Vec<&str> = sub["extension"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["url"]
                    .as_str()
                    .unwrap()
                    .ends_with("capabilitystatement-subscriptiontopic-canonical")
            })
            .map(|e| e["valueCanonical"].as_str().unwrap())
            .collect();
        assert!(topics.contains(&TOPIC), "{topics:?}");
        let ops: Vec<&str> = sub["operation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert!(ops.contains(&"status") && ops.contains(&"events"), "{ops:?}");
    }
    // no workers: the public endpoint accepted below is never resolved or contacted
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            subscription_workers: Some(0),
            ..Default::default()
        },
    );
    let hook = Endpoint::start();
    let refused = |endpoint: &str, criteria: &str, payload: Option<&str>| {
        let mut sub = json!({
            "resourceType": "Subscription", "status": "requested", "reason": "x",
            "criteria": criteria,
            "channel": {"type": "rest-hook", "endpoint": endpoint}
        });
        if let Some(p) = payload {
            sub["channel"]["payload"] = json!(p);
        }
        let r = s.post("/Subscription", &sub);
        assert_eq!(r.status, 400, "{endpoint} {criteria}: {}", r.text());
        r.outcome()
    };
    // loopback is internal: refused without subscription_allowed_networks, and never contacted
    refused(&hook.url(), "Observation", None);
    refused("https://10.1.2.3/hook", "Observation", None);
    refused("https://169.254.169.254/latest", "Observation", None);
    refused("https://[::1]/hook", "Observation", None);
    refused("https://[fd00::1]/hook", "Observation", None);
    refused("http://example.org/hook", "Observation", None);
    refused("https://user:secret@example.org/hook", "Observation", None);
    refused("ftp://example.org/hook", "Observation", None);
    refused("https://example.org/hook", "Observation?subject.name=x", None);
    refused(
        "https://example.org/hook",
        "Observation?_has:Provenance:target:agent=x",
        None,
    );
    refused("https://example.org/hook", "NoSuchType?x=1", None);
    refused("https://example.org/hook", "https://example.org/topic/none", None);
    let o = refused("https://example.org/hook", "Observation", Some("application/fhir+json"));
    assert!(o.to_string().contains("subscription_full_resource"), "{o}");
    assert_eq!(hook.connections.load(Ordering::SeqCst), 0);
    // a public https endpoint is accepted as written (the name is checked again at delivery)
    let ok = s.post(
        "/Subscription",
        &json!({"resourceType": "Subscription", "status": "active", "reason": "x", "criteria": "Observation",
                "channel": {"type": "rest-hook", "endpoint": "https://example.org/hook"}}),
    );
    assert_eq!(ok.status, 201, "{}", ok.text());
    assert_eq!(ok.json()["status"], "requested", "the server sets the status");
}

/// The endpoint down: deliveries are retried with backoff and arrive in order once it is back,
/// numbers never skipping; the failed attempts are on the ledger.
fn retried_across_downtime(db: Db) {
    let s = TestServer::start_with(db, layer());
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    let sub = created(s.post(
        "/Subscription",
        &backport_subscription(&hook.url(), &format!("Observation?subject=Patient/{a}")),
    ));
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    hook.status.store(503, Ordering::SeqCst);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(created(
            s.post("/Observation", &observation(&a, "1234-5", "laboratory")),
        ));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(hook.received().len(), 1, "delivered while the endpoint was down");
    hook.status.store(200, Ordering::SeqCst);
    let got = hook.wait_for("five events", |r| events(r).len() >= 5);
    let evs = events(&got);
    let numbers: Vec<i64> = evs.iter().map(|e| e.0).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4, 5]);
    let foci: Vec<String> = evs
        .iter()
        .map(|e| e.1.clone().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(foci, ids, "in the order written");
    let failed =
        s.get("/AuditEvent?subtype=https://fhirvault.dev/CodeSystem/audit-subtype|notify&outcome=8&_summary=count");
    assert!(failed.json()["total"].as_i64().unwrap() >= 1, "{}", failed.text());
}

/// Notifications are filtered by the owner's grant at delivery: a granular scope leaves out
/// what it does not reach (without a number), and a disabled client's subscription stops.
fn filtered_by_the_owners_grant(db: Db) {
    let s = TestServer::start_with(db, layer());
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    let token = s.token(
        "user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory user/Subscription.cruds",
        None,
    );
    let bearer = format!("Bearer {token}");
    let body = backport_subscription(&hook.url(), "Observation?code=http://loinc.org|1234-5");
    let r = s
        .client
        .post(s.url("/Subscription"))
        .header("authorization", bearer.as_str())
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let sub = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    let vital = created(s.post("/Observation", &observation(&a, "1234-5", "vital-signs")));
    let lab = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    let got = hook.wait_for("the lab event", |r| !events(r).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let evs = events(&hook.received());
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].0, 1, "the left-out event took no number");
    assert!(evs[0].1.as_deref().unwrap().ends_with(&lab));
    let text: String = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    assert!(!text.contains(&vital));

    // the token revoked (as RFC 7009 revocation stores it): the subscription goes off and
    // nothing more is sent
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let jti = claims["jti"].as_str().unwrap();
    s.store
        .auth_revoke_access_token(jti, fhirvault::store::now() + chrono::Duration::minutes(15))
        .unwrap();
    wait_status(&s, &sub, "off");
    let before = hook.received().len();
    created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(hook.received().len(), before, "delivered after the grant was withdrawn");
}

fn get_as(s: &TestServer, token: &str, path: &str) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn post_as(s: &TestServer, token: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .post(s.url(path))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// `$status` and `$events`, heartbeats, `error` after failures in a row, and `off`.
fn status_events_heartbeat_error_and_off(db: Db) {
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            subscription_max_failures: Some(3),
            ..layer()
        },
    );
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    let mut body = backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}"));
    body["channel"]["extension"] =
        json!([{"url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": 1}]);
    let sub = created(s.post("/Subscription", &body));
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    let first = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    let second = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    hook.wait_for("two events", |r| events(r).len() >= 2);
    hook.wait_for("a heartbeat", |r| {
        r.iter().any(|x| notification_type(&json_of(x)) == "heartbeat")
    });

    let st = s.get(&format!("/Subscription/{sub}/$status"));
    assert_eq!(st.status, 200, "{}", st.text());
    let st = st.json();
    assert_eq!(st["type"], "searchset");
    let params = &st["entry"][0]["resource"];
    assert_eq!(param(params, "type").unwrap()["valueCode"], "query-status");
    assert_eq!(param(params, "status").unwrap()["valueCode"], "active");
    assert_eq!(
        param(params, "events-since-subscription-start").unwrap()["valueString"],
        "2"
    );
    assert_eq!(s.get(&format!("/Subscription/$status?id={sub}")).json()["total"], 1);
    // without ids: every subscription the caller may read
    assert_eq!(s.get("/Subscription/$status").json()["total"], 1);
    let hers = s.token("patient/Subscription.rs", Some(&a));
    assert_eq!(
        get_as(&s, &hers, "/Subscription/$status").1["total"],
        1,
        "hers: it names her"
    );
    let other_patient = s.token("patient/Subscription.rs", Some("someone-else"));
    assert_eq!(get_as(&s, &other_patient, "/Subscription/$status").1["total"], 0);

    let ev = s.get(&format!(
        "/Subscription/{sub}/$events?eventsSinceNumber=1&eventsUntilNumber=2"
    ));
    assert_eq!(ev.status, 200, "{}", ev.text());
    let ev = ev.json();
    assert_eq!(ev["type"], "history");
    assert_eq!(notification_type(&ev), "query-event");
    let listed: Vec<String> = ev["entry"].as_array().unwrap()[1..]
        .iter()
        .map(|e| e["fullUrl"].as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(listed, vec![first.clone(), second.clone()]);
    let bad = s.get(&format!("/Subscription/{sub}/$events?eventsSinceNumber=x"));
    assert_eq!(bad.status, 400);
    // another patient's app sees neither the subscription nor its events
    let other = s.token("patient/*.rs", Some("someone-else"));
    assert_eq!(get_as(&s, &other, &format!("/Subscription/{sub}/$status")).0, 404);
    assert_eq!(get_as(&s, &other, &format!("/Subscription/{sub}/$events")).0, 404);

    // the endpoint fails for good: `error` after three failures in a row
    hook.status.store(500, Ordering::SeqCst);
    created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    wait_status(&s, &sub, "error");
    let st = s.get(&format!("/Subscription/{sub}/$status")).json();
    assert_eq!(
        param(&st["entry"][0]["resource"], "status").unwrap()["valueCode"],
        "error"
    );

    // the owner asks again: handshake, active; then turns it off and nothing more is sent
    hook.status.store(200, Ordering::SeqCst);
    let mut again = s.get(&format!("/Subscription/{sub}")).json();
    again["status"] = json!("requested");
    assert_eq!(s.put(&format!("/Subscription/{sub}"), &again).status, 200);
    wait_status(&s, &sub, "active");
    let mut off = s.get(&format!("/Subscription/{sub}")).json();
    off["status"] = json!("off");
    let r = s.put(&format!("/Subscription/{sub}"), &off);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "off");
    std::thread::sleep(Duration::from_millis(300));
    let before = hook.received().len();
    created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        hook.received().len(),
        before,
        "sent after the subscription was turned off"
    );
}

/// A patient-context app subscribes to its own patient's data only: a subscription about
/// another patient alone is refused; one that names her and another is hers, and delivers
/// only what her grant reaches.
fn patient_context_subscription(db: Db) {
    let s = TestServer::start_with(db, layer());
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let b = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    let token = s.token("patient/Observation.rs patient/Subscription.cruds", Some(&a));
    let (status, _) = post_as(
        &s,
        &token,
        "/Subscription",
        &backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{b}")),
    );
    assert!(status == 403 || status == 404, "{status}");
    let (status, body) = post_as(
        &s,
        &token,
        "/Subscription",
        &backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a},Patient/{b}")),
    );
    assert_eq!(status, 201, "{body}");
    let sub = body["id"].as_str().unwrap().to_string();
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    let (status, _) = get_as(&s, &token, &format!("/Subscription/{sub}"));
    assert_eq!(status, 200, "she reads her subscription back");
    let theirs = created(s.post("/Observation", &observation(&b, "1234-5", "laboratory")));
    let mine = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    hook.wait_for("her event", |r| !events(r).is_empty());
    std::thread::sleep(Duration::from_millis(800));
    let all = hook.received();
    let evs = events(&all);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].0, 1);
    assert!(evs[0].1.as_deref().unwrap().ends_with(&mine));
    let text: String = all
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    assert!(
        !text.contains(&theirs),
        "another patient's data reached a patient's subscription"
    );
    let (_, events_listed) = get_as(&s, &token, &format!("/Subscription/{sub}/$events"));
    assert!(!events_listed.to_string().contains(&theirs));
}

/// Makes a CA and a certificate for 127.0.0.1 signed by it (openssl).
fn test_ca(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-days",
        "1",
        "-subj",
        "/CN=fhirvault test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "req.csr"]);
    run(&csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// An https endpoint whose certificate a test CA signed: delivered when the CA is trusted
/// (`subscription_ca_file`), never when it is not.
fn https_endpoint_with_a_test_ca(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    test_ca(dir.path());
    let tls = fhirvault::tls::ReloadableCert::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
        .unwrap()
        .server_config()
        .unwrap();
    let tls = Arc::new(tls);
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            subscription_ca_file: Some(dir.path().join("ca.pem")),
            ..layer()
        },
    );
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start_with(Some(tls.clone()));
    assert!(hook.url().starts_with("https://"));
    let sub = created(s.post(
        "/Subscription",
        &backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}")),
    ));
    hook.wait_for("the handshake over TLS", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    let obs = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    let got = hook.wait_for("the event over TLS", |r| !events(r).is_empty());
    assert!(events(&got)[0].1.as_deref().unwrap().ends_with(&obs));

    // a server that does not trust the CA sends nothing there
    let untrusting = TestServer::start_with(db, layer());
    let hook2 = Endpoint::start_with(Some(tls));
    let sub2 = created(untrusting.post(
        "/Subscription",
        &backport_subscription(&hook2.url(), "Observation?code=http://loinc.org|1234-5"),
    ));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(hook2.received().is_empty());
    assert!(hook2.connections.load(Ordering::SeqCst) >= 1, "it tried");
    let st = untrusting.get(&format!("/Subscription/{sub2}/$status")).json();
    assert_eq!(
        param(&st["entry"][0]["resource"], "status").unwrap()["valueCode"],
        "requested"
    );
}

/// The real binary killed with SIGKILL while it delivers: restarted, it delivers every event at
/// least once, each number always with the same resource, first receipts in order.
fn killed_mid_delivery(db: Db) {
    use common::node::{token, Node};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = match db {
        Db::Sqlite => format!("sqlite://{}", dir.path().join("fhirvault.db").display()),
        Db::Postgres => {
            let pg = common::pg();
            pg.url(&pg.create_db())
        }
    };
    let hook = Endpoint::start();
    hook.delay_ms.store(200, Ordering::SeqCst);
    let env = [
        ("FHIRVAULT_SUBSCRIPTION_ALLOWED_NETWORKS", "127.0.0.1/32"),
        ("FHIRVAULT_SUBSCRIPTION_RETRY_BASE_MS", "50"),
    ];
    let mut node = Node::start_with(&data, &url, common::free_port(), "a", &env);
    let token = token(&data, &url);
    let http = reqwest::blocking::Client::new();
    let post = |path: &str, body: &Value| -> String {
        let r = http
            .post(format!("{}{path}", node_base(&node)))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string()
    };
    let a = post("/Patient", &json!({"resourceType": "Patient"}));
    let mut body = backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}"));
    body["channel"]["extension"] = json!([{"url": format!("{BACKPORT}backport-max-count"), "valuePositiveInt": 1}]);
    post("/Subscription", &body);
    hook.wait_for("the handshake", |r| !r.is_empty());
    let written: Vec<String> = (0..20)
        .map(|_| post("/Observation", &observation(&a, "1234-5", "laboratory")))
        .collect();
    hook.wait_for("a few events", |r| events(r).len() >= 3);
    node.kill();
    let delivered_before = events(&hook.received()).len();
    assert!(delivered_before < 20, "the kill came too late to test anything");
    node.spawn(&data, &url);
    let got = hook.wait_for("every event after the restart", |r| {
        let numbers: std::collections::BTreeSet<i64> = events(r).iter().map(|e| e.0).collect();
        numbers.len() >= 20
    });
    let evs = events(&got);
    let mut by_number = std::collections::BTreeMap::new();
    let mut first_seen = Vec::new();
    for (n, focus) in &evs {
        let id = focus.clone().unwrap().rsplit('/').next().unwrap().to_string();
        if let Some(prev) = by_number.insert(*n, id.clone()) {
            assert_eq!(prev, id, "event {n} sent again with another resource");
        } else {
            first_seen.push(*n);
        }
    }
    assert_eq!(
        first_seen,
        (1..=20).collect::<Vec<i64>>(),
        "first receipts out of order"
    );
    let foci: Vec<String> = by_number.values().cloned().collect();
    assert_eq!(foci, written);
}

fn node_base(node: &common::node::Node) -> String {
    node.base()
}

/// The matcher answers a criteria exactly as a search does: for every pair of stored
/// resource and query, the in-memory test on the resource's index rows agrees with whether the
/// search (the same parser, SQL on the index tables) finds it.
fn matcher_agrees_with_search(db: Db) {
    let s = TestServer::start(db);
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Agreement", "given": ["Ann"]}], "birthDate": "1970-05-06", "gender": "female"})));
    let b = created(s.post(
        "/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Other"}], "birthDate": "1991-01-01", "gender": "male"}),
    ));
    let mut obs = Vec::new();
    for (i, (p, code, cat, value, date)) in [
        (&a, "1234-5", "laboratory", 7.2, "2024-01-05T10:00:00Z"),
        (&a, "9999-9", "vital-signs", 120.0, "2023-12-31"),
        (&b, "1234-5", "laboratory", 6.9, "2024-02-01"),
        (&b, "4444-4", "survey", 1.0, "2022-06"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut o = observation(p, code, cat);
        o["valueQuantity"] =
            json!({"value": value, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"});
        o["effectiveDateTime"] = json!(date);
        if i == 3 {
            o["status"] = json!("preliminary");
        }
        obs.push(created(s.post("/Observation", &o)));
    }
    let queries = [
        "".to_string(),
        format!("patient={a}"),
        format!("subject=Patient/{b}"),
        "code=http://loinc.org|1234-5".into(),
        "code=1234-5,4444-4".into(),
        "code:not=1234-5".into(),
        "category=laboratory&status=final".into(),
        "status=preliminary".into(),
        "value-quantity=gt7".into(),
        "value-quantity=le7||mmol/L".into(),
        "date=ge2024-01-01".into(),
        "date=lt2023".into(),
        "date=2024-01".into(),
        "code:missing=false".into(),
        "value-concept:missing=true".into(),
        format!("_id={}", obs[2]),
        format!("patient={a}&code=9999-9"),
        "code:text=x".into(),
    ];
    let registry = fhirvault::server::shared_registry(&s.config).unwrap();
    let patient_queries = [
        "family=agreement".to_string(),
        "family=agree".into(),
        "family:exact=Agreement".into(),
        "family:contains=reem".into(),
        "name=ann".into(),
        "birthdate=1970-05-06".into(),
        "birthdate=gt1980".into(),
        "gender=female".into(),
        "gender:not=female".into(),
    ];
    let mut cases: Vec<(&str, &String, &Vec<String>)> = Vec::new();
    let patients = vec![a.clone(), b.clone()];
    for q in &queries {
        cases.push(("Observation", q, &obs));
    }
    for q in &patient_queries {
        cases.push(("Patient", q, &patients));
    }
    let cipher = s.store.cipher();
    for (t, q, ids) in cases {
        let found: std::collections::BTreeSet<String> = s.get(&format!("/{t}?{q}&_count=100")).json()["entry"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
        let parsed = fhirvault::search::query::parse(&registry, cipher, t, &pairs, 10, true).unwrap();
        for id in ids {
            let stored = s.get(&format!("/{t}/{id}")).json();
            let rows = fhirvault::search::index_rows(&registry, cipher, t, &stored);
            let matched = fhirvault::subscription::matcher::holds(&parsed.query.clauses, t, id, &rows)
                && parsed.rechecks.iter().all(|r| r.holds(&stored, cipher));
            assert_eq!(matched, found.contains(id), "{t}?{q} on {id}");
        }
    }
}

/// A client disabled in the built-in authorization server: its subscriptions go off. And an
/// endpoint that redirects is not followed (the target never hears of it).
fn disabled_client_and_redirects(db: Db) {
    let s = TestServer::start_with(db, layer());
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    s.store
        .auth_client_add(&fhirvault::store::auth::ClientRow {
            client_id: "subscriber".into(),
            name: "Subscriber".into(),
            client_type: "confidential".into(),
            secret_hash: None,
            jwks: None,
            jwks_uri: None,
            redirect_uris: String::new(),
            scopes: "system/*.cruds".into(),
            disabled: false,
            created_at: fhirvault::store::now(),
        })
        .unwrap();
    let token = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/Observation.rs system/Subscription.cruds".into(),
            client_id: Some("subscriber".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let hook = Endpoint::start();
    let (status, body) = post_as(
        &s,
        &token,
        "/Subscription",
        &backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}")),
    );
    assert_eq!(status, 201, "{body}");
    let sub = body["id"].as_str().unwrap().to_string();
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    assert!(s.store.auth_client_disable("subscriber").unwrap());
    wait_status(&s, &sub, "off");
    let before = hook.received().len();
    created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(hook.received().len(), before, "delivered after the client was disabled");

    // a redirect is a failure, never followed
    let target = Endpoint::start();
    let redirecting = Endpoint::start();
    redirecting.status.store(307, Ordering::SeqCst);
    *redirecting.location.lock().unwrap() = Some(target.url());
    let sub = created(s.post(
        "/Subscription",
        &backport_subscription(&redirecting.url(), &format!("Observation?patient=Patient/{a}")),
    ));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(redirecting.connections.load(Ordering::SeqCst) >= 1, "it tried");
    assert_eq!(
        target.connections.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    let st = s.get(&format!("/Subscription/{sub}/$status")).json();
    assert_eq!(
        param(&st["entry"][0]["resource"], "status").unwrap()["valueCode"],
        "requested"
    );
}

/// `full-resource`, where the server allows it: the resource as its owner may read it.
fn full_resource_payloads(db: Db) {
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            subscription_full_resource: Some(true),
            ..layer()
        },
    );
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    let mut body = backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}"));
    body["channel"]["_payload"]["extension"][0]["valueCode"] = json!("full-resource");
    let sub = created(s.post("/Subscription", &body));
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    let obs = created(s.post("/Observation", &observation(&a, "1234-5", "laboratory")));
    let got = hook.wait_for("the event", |r| !events(r).is_empty());
    let bundle = json_of(&got[1]);
    let entry = &bundle["entry"][1];
    assert_eq!(entry["resource"]["id"], obs.as_str());
    assert_eq!(entry["resource"]["code"]["coding"][0]["code"], "1234-5");
    assert_eq!(entry["request"]["method"], "POST");
}

/// Full resources carry what the owner may read: elements a policy hides from it are masked
/// (and the resource marked SUBSETTED), and a resource whose security label it lacks is left out.
fn full_resource_payloads_are_masked_and_labels_hold(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[[element_rule]]
resource = "Observation"
hide = ["note"]
exempt_roles = ["registrar"]

[[label_rule]]
system = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
code = "HIV"
require_roles = ["hiv-care"]
"#,
    )
    .unwrap();
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            subscription_full_resource: Some(true),
            policy_file: Some(policy),
            ..layer()
        },
    );
    let a = created(s.post("/Patient", &json!({"resourceType": "Patient"})));
    let hook = Endpoint::start();
    // the owner: a clinician without the exempting or the label's role
    let token = s.token("user/Observation.rs user/Subscription.cruds", None);
    let mut body = backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{a}"));
    body["channel"]["_payload"]["extension"][0]["valueCode"] = json!("full-resource");
    let (status, created_sub) = post_as(&s, &token, "/Subscription", &body);
    assert_eq!(status, 201, "{created_sub}");
    let sub = created_sub["id"].as_str().unwrap().to_string();
    hook.wait_for("the handshake", |r| !r.is_empty());
    wait_status(&s, &sub, "active");
    let mut labelled = observation(&a, "1234-5", "laboratory");
    labelled["meta"] =
        json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]});
    // written by someone the label and the rule exempt
    let exempt = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/*.cruds".into(),
            client_id: Some("test-client".into()),
            roles: vec!["hiv-care".into(), "registrar".into()],
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let write = |body: &Value| {
        let (status, v) = post_as(&s, &exempt, "/Observation", body);
        assert_eq!(status, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    };
    let hidden = write(&labelled);
    let mut noted = observation(&a, "1234-5", "laboratory");
    noted["note"] = json!([{"text": "NOTE-SENTINEL"}]);
    let masked = write(&noted);
    let got = hook.wait_for("the event", |r| !events(r).is_empty());
    std::thread::sleep(Duration::from_millis(800));
    let all = hook.received();
    let evs = events(&all);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert!(evs[0].1.as_deref().unwrap().ends_with(&masked));
    let text: String = all
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    assert!(
        !text.contains(&hidden),
        "a labelled resource reached an owner without the label's role"
    );
    assert!(!text.contains("NOTE-SENTINEL"), "a hidden element reached the owner");
    let entry = &json_of(&got[got.len() - 1])["entry"][1];
    assert_eq!(entry["resource"]["id"], masked.as_str());
    assert!(
        entry["resource"]["meta"]["tag"].to_string().contains("SUBSETTED"),
        "{entry}"
    );
}

/// Two processes on one PostgreSQL database: writes on either node are matched (a Subscription
/// written on one reaches the other within its refresh), one node's workers or the other's
/// deliver, in order; the node holding the lease is killed mid-delivery and the other takes
/// over when the lease expires.
#[test]
fn two_nodes_share_delivery() {
    use common::node::{token, Node};
    let pg = common::pg();
    let url = pg.url(&pg.create_db());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let hook = Endpoint::start();
    hook.delay_ms.store(150, Ordering::SeqCst);
    let env = [
        ("FHIRVAULT_SUBSCRIPTION_ALLOWED_NETWORKS", "127.0.0.1/32"),
        ("FHIRVAULT_SUBSCRIPTION_RETRY_BASE_MS", "50"),
    ];
    let mut a = Node::start_with(&data, &url, common::free_port(), "a", &env);
    let b = Node::start_with(&data, &url, common::free_port(), "b", &env);
    let token = token(&data, &url);
    let http = reqwest::blocking::Client::new();
    let post = |base: &str, path: &str, body: &Value| -> String {
        let r = http
            .post(format!("{base}{path}"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string()
    };
    let patient = post(&a.base(), "/Patient", &json!({"resourceType": "Patient"}));
    let mut body = backport_subscription(&hook.url(), &format!("Observation?patient=Patient/{patient}"));
    body["channel"]["extension"] = json!([
        {"url": format!("{BACKPORT}backport-max-count"), "valuePositiveInt": 1},
        {"url": format!("{BACKPORT}backport-timeout"), "valueUnsignedInt": 2}
    ]);
    post(&a.base(), "/Subscription", &body);
    hook.wait_for("the handshake", |r| !r.is_empty());
    // node b learns of it within its refresh
    std::thread::sleep(Duration::from_secs(3));
    let written: Vec<String> = (0..16)
        .map(|i| {
            let base = if i % 2 == 0 { b.base() } else { a.base() };
            post(&base, "/Observation", &observation(&patient, "1234-5", "laboratory"))
        })
        .collect();
    hook.wait_for("a few events", |r| events(r).len() >= 2);
    a.kill();
    let got = hook.wait_for("every event, node b delivering", |r| {
        let numbers: std::collections::BTreeSet<i64> = events(r).iter().map(|e| e.0).collect();
        numbers.len() >= 16
    });
    let mut by_number = std::collections::BTreeMap::new();
    let mut first_seen = Vec::new();
    for (n, focus) in events(&got) {
        let id = focus.unwrap().rsplit('/').next().unwrap().to_string();
        if let Some(prev) = by_number.insert(n, id.clone()) {
            assert_eq!(prev, id, "event {n} sent again with another resource");
        } else {
            first_seen.push(n);
        }
    }
    assert_eq!(
        first_seen,
        (1..=16).collect::<Vec<i64>>(),
        "first receipts out of order"
    );
    assert_eq!(by_number.values().cloned().collect::<Vec<_>>(), written);
    drop(b);
}

on_both_backends!(
    backport_and_r4_notifications,
    endpoints_and_criteria_refused,
    retried_across_downtime,
    filtered_by_the_owners_grant,
    status_events_heartbeat_error_and_off,
    patient_context_subscription,
    https_endpoint_with_a_test_ca,
    killed_mid_delivery,
    matcher_agrees_with_search,
    disabled_client_and_redirects,
    full_resource_payloads,
    full_resource_payloads_are_masked_and_labels_hold,
);
