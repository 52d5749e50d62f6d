//! The operations surface: health and readiness, Prometheus metrics without PHI, per-client
//! rate limits, request timeouts, and a graceful stop that lets requests in flight finish.

mod common;

use common::{pg, Db, Reply, TestServer};
use fhirvault::config::ConfigLayer;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn plain_get(s: &TestServer, path: &str) -> Reply {
    Reply::from(
        reqwest::blocking::Client::new()
            .get(format!("http://{}{path}", s.addr))
            .send()
            .unwrap(),
    )
}

#[test]
fn health_readiness_and_metrics() {
    let s = TestServer::start(Db::Postgres);
    assert_eq!(plain_get(&s, "/healthz").status, 200);
    let ready = plain_get(&s, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["database"], "ok");
    let id = s
        .post(
            "/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": "Metricsname"}]}),
        )
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s.get(&format!("/Patient/{id}?_format=json")).status, 200);
    assert_eq!(s.get("/Patient/nobody").status, 404);
    let m = plain_get(&s, "/metrics");
    assert_eq!(m.status, 200);
    let text = m.text();
    for needle in [
        "fhirvault_http_requests_total{route=\"read\",status=\"200\"} 1",
        "fhirvault_http_requests_total{route=\"read\",status=\"404\"} 1",
        "fhirvault_http_requests_total{route=\"create\",status=\"201\"} 1",
        "fhirvault_http_request_duration_seconds_bucket{route=\"read\",le=\"+Inf\"} 2",
        "fhirvault_db_pool_connections",
        "fhirvault_audit_queue_depth",
        "fhirvault_audit_events_committed",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    // labels are route templates: no ids, names or query strings
    assert!(!text.contains(&id) && !text.contains("Metricsname") && !text.contains("_format"));
    // the database goes away: not ready (503), and ready again when it is back
    let name = s.db.pg_name.clone().unwrap();
    pg().admin(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"));
    pg().admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ));
    let down = plain_get(&s, "/readyz");
    assert_eq!(down.status, 503, "{}", down.text());
    assert_eq!(down.json()["database"], "unreachable");
    assert_eq!(plain_get(&s, "/healthz").status, 200, "the process itself is up");
    pg().admin(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"));
    let mut back = 0;
    for _ in 0..20 {
        back = plain_get(&s, "/readyz").status;
        if back == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(back, 200);
}

#[test]
fn per_client_rate_limit() {
    let s = TestServer::start_with(
        Db::Sqlite,
        ConfigLayer {
            rate_limit_per_minute: Some(5),
            ..Default::default()
        },
    );
    for _ in 0..5 {
        assert_eq!(s.get("/Patient/x").status, 404);
    }
    let limited = s.get("/Patient/x");
    assert_eq!(limited.status, 429);
    assert!(limited.header("retry-after").is_some());
    assert_eq!(limited.outcome()["issue"][0]["code"], "throttled");
    // another client is not held back by the first
    let other = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/*.rs".into(),
            client_id: Some("another-client".into()),
            expires_in: 300,
            ..Default::default()
        })
        .unwrap();
    let r = s.get_with("/Patient/x", &[("authorization", &format!("Bearer {other}"))]);
    assert_eq!(r.status, 404);
}

#[test]
fn a_request_that_takes_too_long_is_abandoned_and_audited() {
    let s = TestServer::start_with(
        Db::Sqlite,
        ConfigLayer {
            request_timeout_secs: Some(1),
            ..Default::default()
        },
    );
    let token = s.token("system/*.cruds", None);
    // a body that never finishes arriving
    let mut tcp = TcpStream::connect(s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{{\"resourceType\""
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = tcp.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("timeout"), "{text}");
    // the abandoned request has its AuditEvent
    let events = s.get("/AuditEvent?subtype=create&outcome=8").json();
    let desc = events["entry"][0]["resource"]["outcomeDesc"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(desc.contains("503"), "{desc}");
}

#[test]
fn a_stopping_server_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = env!("CARGO_BIN_EXE_fhirvault");
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/healthz")).is_ok()
    });
    assert!(up);
    let token = String::from_utf8(
        std::process::Command::new(bin)
            .args(["token", "--scope", "system/*.cruds", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let body = json!({"resourceType": "Patient", "gender": "other"}).to_string();
    let (head, tail) = body.split_at(10);
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        tcp,
        "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{head}",
        token.trim(),
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // stop the server while the request is half received
    std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tcp.write_all(tail.as_bytes()).unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let status = child.wait().unwrap();
    assert!(status.success() || status.code().is_some(), "{status:?}");
    // and new connections are no longer accepted
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}
