//! Subscriptions (issue 24): what matching costs the writes it watches, and how soon a
//! notification reaches its endpoint, on SQLite and PostgreSQL.
//!
//! * Creates of Observations per second at `BENCH_CONC` (16) with no subscription, and with
//!   100 and 1,000 active ones on another type (Encounter) and on the same type with filters
//!   the writes do not meet (`Observation?patient=Patient/<another>`): the ratios to none are
//!   what matching costs the write path (the target is 0.8 at 1,000).
//! * The latency from a create's answer (its commit) to the endpoint's receipt of the
//!   notification, p50 and p99, for one subscription every create matches, at moderate load
//!   (four clients, each pausing 5 ms between creates).
//!
//! Each configuration runs on a fresh server; the endpoint is an HTTP server on loopback in
//! this process. Run: `cargo bench --bench subscriptions` (`BENCH_SECS`, `BENCH_CONC`).
//! Writes benches/results/subscriptions-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{env_num, throughput, LeanClient};

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

/// The receiving end: counts handshakes, and records when each focus arrived.
#[derive(Default)]
struct Received {
    handshakes: usize,
    arrivals: HashMap<String, Instant>,
}

fn endpoint() -> (u16, Arc<Mutex<Received>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Received::default()));
    let r = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let r = r.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let mut length = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.trim_end().split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let at = Instant::now();
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
                    return;
                };
                let mut got = r.lock().unwrap();
                for p in bundle["entry"][0]["resource"]["parameter"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if p["name"] == "type" && p["valueCode"] == "handshake" {
                        got.handshakes += 1;
                    }
                    if p["name"] == "notification-event" {
                        for part in p["part"].as_array().into_iter().flatten() {
                            if let Some(focus) = part["valueReference"]["reference"].as_str() {
                                let id = focus.rsplit('/').next().unwrap_or("").to_string();
                                got.arrivals.entry(id).or_insert(at);
                            }
                        }
                    }
                }
            });
        }
    });
    (port, received)
}

fn subscription(port: u16, topic_type: &str, filter: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "bench",
        "criteria": format!("https://fhirvault.dev/SubscriptionTopic/{topic_type}"),
        "_criteria": {"extension": [{"url": format!("{BACKPORT}backport-filter-criteria"), "valueString": filter}]},
        "channel": {"type": "rest-hook", "endpoint": format!("http://127.0.0.1:{port}/hook"), "payload": "application/fhir+json"}
    })
}

fn observation(patient: &str) -> Vec<u8> {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": 7.2, "unit": "mmol/L"}
    })
    .to_string()
    .into_bytes()
}

fn server(db: Db, conc: usize) -> TestServer {
    let tdb = common::TestDb::new(db);
    let mut layer = fhirvault::config::ConfigLayer {
        pool_size: Some(conc.clamp(4, 64) as u32),
        subscription_allowed_networks: Some(vec!["127.0.0.1/32".into()]),
        subscription_workers: Some(2),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    TestServer::start_on(tdb, layer)
}

/// Creates `n` subscriptions (transaction Bundles of 100) and waits for their handshakes.
fn subscribe(s: &TestServer, port: u16, received: &Mutex<Received>, n: usize, make: impl Fn(usize) -> Value) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let entries: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"resource": make(*i), "request": {"method": "POST", "url": "Subscription"}}))
            .collect();
        let r = s.post(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let _ = port;
    let deadline = Instant::now() + Duration::from_secs(600);
    while received.lock().unwrap().handshakes < n {
        assert!(Instant::now() < deadline, "handshakes did not arrive");
        std::thread::sleep(Duration::from_millis(100));
    }
    // their status updates settle
    std::thread::sleep(Duration::from_secs(2));
}

fn create_rate(s: &TestServer, conc: usize, secs: u64, patient: &str) -> f64 {
    let token = s.token("system/*.cruds", None);
    let addr = s.addr;
    let body = observation(patient);
    throughput(
        conc,
        secs,
        |_| LeanClient::connect(addr, &token),
        |c, _| {
            let status = c.request("POST", "/fhir/Observation", Some(&body));
            assert_eq!(status, 201);
        },
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench_backend(db: Db, secs: u64, conc: usize) -> Value {
    let mut rates = serde_json::Map::new();
    // the smoke run (debug build, CI) only checks that it runs
    let (few, many) = if support::smoke() { (5, 20) } else { (100, 1000) };
    let configs: [(&str, usize, bool); 5] = [
        ("none", 0, false),
        ("other_type_100", few, false),
        ("other_type_1000", many, false),
        ("same_type_100", few, true),
        ("same_type_1000", many, true),
    ];
    let mut base = 0.0;
    for (label, n, same) in configs {
        let s = server(db, conc);
        let (port, received) = endpoint();
        let patient = s.post("/Patient", &json!({"resourceType": "Patient"})).json()["id"]
            .as_str()
            .unwrap()
            .to_string();
        subscribe(&s, port, &received, n, |i| {
            if same {
                subscription(port, "Observation", &format!("Observation?patient=Patient/other-{i}"))
            } else {
                subscription(port, "Encounter", &format!("Encounter?patient=Patient/other-{i}"))
            }
        });
        let rate = create_rate(&s, conc, secs, &patient);
        if n == 0 {
            base = rate;
        }
        let ratio = rate / base;
        eprintln!("  {db:?}: creates c{conc} with {label:>16}: {rate:>7.0}/s  ratio to none {ratio:.2}");
        rates.insert(
            label.into(),
            json!({"subscriptions": n, "creates_per_sec": rate, "ratio_to_none": ratio}),
        );
    }

    // latency: one subscription every create matches, four clients pausing 5 ms
    let s = server(db, conc);
    let (port, received) = endpoint();
    let patient = s.post("/Patient", &json!({"resourceType": "Patient"})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    subscribe(&s, port, &received, 1, |_| {
        subscription(port, "Observation", &format!("Observation?patient=Patient/{patient}"))
    });
    let token = s.token("system/*.cruds", None);
    let answered: Mutex<Vec<(String, Instant)>> = Mutex::new(Vec::new());
    let body = observation(&patient);
    let rate = throughput(
        4,
        secs,
        |_| LeanClient::connect(s.addr, &token),
        |c, _| {
            let (status, created) = c.request_body("POST", "/fhir/Observation", Some(&body));
            let at = Instant::now();
            assert_eq!(status, 201);
            let id = created.unwrap()["id"].as_str().unwrap().to_string();
            answered.lock().unwrap().push((id, at));
            std::thread::sleep(Duration::from_millis(5));
        },
    );
    let answered = answered.into_inner().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().arrivals.len() < answered.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = received.lock().unwrap();
    let mut latencies: Vec<f64> = answered
        .iter()
        .filter_map(|(id, at)| {
            got.arrivals
                .get(id)
                .map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    eprintln!(
        "  {db:?}: notification latency at {rate:.0} creates/s: p50 {p50:.1} ms, p99 {p99:.1} ms ({} of {} delivered)",
        latencies.len(),
        answered.len()
    );
    json!({
        "backend": format!("{db:?}"),
        "concurrency": conc,
        "creates": rates,
        "latency": {"creates_per_sec": rate, "p50_ms": p50, "p99_ms": p99,
                    "delivered": latencies.len(), "created": answered.len()},
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 5);
    let conc = env_num("BENCH_CONC", 16) as usize;
    eprintln!("Subscriptions bench, {secs}s, c{conc}; CPU {}", support::cpu_model());
    let started = Instant::now();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        results.push(bench_backend(db, secs, conc));
    }
    let mut out = support::provenance("subscriptions");
    out["subscriptions"] = Value::Array(results);
    support::write_results("subscriptions", &out);
    eprintln!("({:.0}s)", started.elapsed().as_secs_f64());
}
