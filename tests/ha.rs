//! High availability on PostgreSQL, tried as an operator runs it: a primary and a hot standby
//! (streaming replication, synchronous or not), two fhirvault nodes on the multi-host URL
//! (`…@primary,standby/db?target_session_attrs=read-write`), four writers per node; the primary
//! killed with SIGKILL in the middle, while the standby is a second behind, and the standby
//! promoted five seconds later. Afterwards:
//! every acknowledged create is present, none is stored twice, the switch answered 503 with
//! `Retry-After` (never 500, never past `request_timeout_secs`), `/readyz` failed while no
//! primary took writes, `/metrics` counted the failover, both nodes write again, and (with
//! synchronous replication) `audit verify` passes. And a node asked to stop (SIGTERM) drains:
//! readiness fails first, requests in flight are answered, nothing is applied unanswered.

mod common;

use common::node::{token, verify, Node};
use common::replication::PgPair;
use common::{free_port, pg};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The failover runs take turns: each starts two PostgreSQL servers and two nodes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const REQUEST_TIMEOUT_SECS: u64 = 10;

/// What one writer saw.
#[derive(Default)]
struct Seen {
    /// Creates answered 201: (id, identifier value).
    acked: Vec<(String, String)>,
    /// Creates that got no answer or a 503: maybe stored, never acknowledged.
    unacked: usize,
    unavailable: usize,
    /// 503s without a Retry-After header.
    unavailable_without_retry_after: usize,
    /// Answers with any other 5xx (a failure of this test), as "status body".
    server_errors: Vec<String>,
    /// Reads of an acknowledged create answered 404 (a lost write, seen at once).
    lost_on_read: usize,
    /// The slowest answer.
    slowest: Duration,
    /// When creates were acknowledged.
    acked_at: Vec<Instant>,
}

fn writer(base: String, token: String, name: String, stop: Arc<AtomicBool>) -> Seen {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS + 20))
        .build()
        .unwrap();
    let mut seen = Seen::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let value = format!("{name}-{i}");
        let read = i.is_multiple_of(4) && !seen.acked.is_empty();
        let req = if read {
            let (id, _) = &seen.acked[seen.acked.len() - 1];
            http.get(format!("{base}/Patient/{id}"))
        } else {
            let body = json!({"resourceType": "Patient", "gender": "unknown",
                "identifier": [{"system": "urn:fhirvault:ha-test", "value": value}]});
            http.post(format!("{base}/Patient"))
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
        };
        let sent = Instant::now();
        let resp = req.bearer_auth(&token).send();
        let elapsed = sent.elapsed();
        seen.slowest = seen.slowest.max(elapsed);
        let Ok(resp) = resp else {
            if !read {
                seen.unacked += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().contains_key("retry-after");
        let body: Value = resp.json().unwrap_or(Value::Null);
        match status {
            201 if !read => {
                seen.acked.push((body["id"].as_str().unwrap().to_string(), value));
                seen.acked_at.push(Instant::now());
            }
            200 if read => {}
            404 if read => seen.lost_on_read += 1,
            503 => {
                seen.unavailable += 1;
                if !retry_after {
                    seen.unavailable_without_retry_after += 1;
                }
                if !read {
                    seen.unacked += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            s if s >= 500 => seen.server_errors.push(format!("{s} {body}")),
            s => panic!("unexpected {s} {body}"),
        }
    }
    seen
}

/// `/readyz` of a node, polled: (when, status), status 0 for no answer.
fn watch_readiness(port: u16, stop: Arc<AtomicBool>) -> Vec<(Instant, u16)> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let status = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        seen.push((Instant::now(), status));
        std::thread::sleep(Duration::from_millis(250));
    }
    seen
}

fn metric(port: u16, name: &str) -> f64 {
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .parse()
        .unwrap()
}

/// Every Patient's (id, identifier value), paged through the API.
fn all_patients(base: &str, token: &str) -> Vec<(String, String)> {
    let http = reqwest::blocking::Client::new();
    let mut out = Vec::new();
    let mut next = Some(format!("{base}/Patient?_count=500&_elements=identifier"));
    while let Some(url) = next.take() {
        let page: Value = http.get(&url).bearer_auth(token).send().unwrap().json().unwrap();
        for e in page["entry"].as_array().into_iter().flatten() {
            let r = &e["resource"];
            let value = r["identifier"][0]["value"].as_str().unwrap_or_default().to_string();
            out.push((r["id"].as_str().unwrap().to_string(), value));
        }
        next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
    }
    out
}

/// What a failover run found.
struct Failover {
    acked: usize,
    lost: usize,
    duplicated: usize,
    unavailable: usize,
    verify: std::process::Output,
}

fn failover(synchronous: bool) -> Failover {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pair = PgPair::start(synchronous);
    let db = pair.create_db("fhir");
    let url = pair.url(&db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let timeout = REQUEST_TIMEOUT_SECS.to_string();
    let env = [("FHIRVAULT_REQUEST_TIMEOUT_SECS", timeout.as_str())];
    let mut nodes = vec![Node::start_with(&data, &url, free_port(), "a", &env)];
    nodes.push(Node::start_with(&data, &url, free_port(), "b", &env));
    let token = token(&data, &url);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        for w in 0..4 {
            let (base, token, stop) = (node.base(), token.clone(), stop.clone());
            writers.push(std::thread::spawn(move || {
                writer(base, token, format!("n{k}w{w}"), stop)
            }));
        }
    }
    let watchers: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (port, stop) = (n.port, stop.clone());
            std::thread::spawn(move || watch_readiness(port, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    // the standby is a second behind when the primary's machine dies: what replication has not
    // carried yet is what an asynchronous standby loses (synchronous commits wait for it instead)
    pair.stall_replication();
    std::thread::sleep(Duration::from_secs(1));
    pair.kill_primary();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    pair.promote();
    let promoted = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let readiness: Vec<Vec<(Instant, u16)>> = watchers.into_iter().map(|w| w.join().unwrap()).collect();

    let logs = || nodes.iter().map(|n| n.logs()).collect::<Vec<_>>().join("\n----\n");
    // never a 500 for the switch, and a 503 always says when to come back
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.server_errors).collect();
    assert!(
        errors.is_empty(),
        "answers other than 503 during the switch: {errors:?}\n{}",
        logs()
    );
    assert_eq!(seen.iter().map(|s| s.unavailable_without_retry_after).sum::<usize>(), 0);
    let slowest = seen.iter().map(|s| s.slowest).max().unwrap();
    assert!(
        slowest < Duration::from_secs(REQUEST_TIMEOUT_SECS + 3),
        "an answer took {slowest:?}, past request_timeout_secs"
    );
    // both nodes took writes before the kill and again after the promotion, within seconds
    for (k, node_writers) in seen.chunks(4).enumerate() {
        let before = node_writers
            .iter()
            .flat_map(|s| &s.acked_at)
            .filter(|t| **t < killed)
            .count();
        let again = node_writers
            .iter()
            .flat_map(|s| &s.acked_at)
            .filter(|t| **t > promoted)
            .min()
            .map(|t| t.duration_since(promoted));
        assert!(before > 0, "node {k} wrote nothing before the kill");
        let again = again.unwrap_or_else(|| panic!("node {k} did not write after the promotion\n{}", logs()));
        eprintln!("node {k}: first acknowledged create {again:?} after the promotion");
        assert!(again < Duration::from_secs(6), "node {k} took {again:?} to write again");
    }
    // readiness failed while nothing took writes, and came back
    for (k, r) in readiness.iter().enumerate() {
        assert!(
            r.iter().any(|(t, s)| *t > killed && *t < promoted && *s == 503),
            "node {k}: /readyz never failed between the kill and the promotion: {:?}",
            r.iter().map(|(_, s)| s).collect::<Vec<_>>()
        );
        assert_eq!(
            r.last().map(|(_, s)| *s),
            Some(200),
            "node {k} is not ready after the promotion"
        );
    }
    for node in &nodes {
        assert!(metric(node.port, "fhirvault_db_failovers_total") >= 1.0);
        assert!(metric(node.port, "fhirvault_db_connections_lost_total") >= 1.0);
    }
    // what is stored against what was acknowledged
    let stored = all_patients(&nodes[0].base(), &token);
    let stored_ids: HashSet<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
    let acked: Vec<&(String, String)> = seen.iter().flat_map(|s| &s.acked).collect();
    let lost = acked.iter().filter(|(id, _)| !stored_ids.contains(id.as_str())).count()
        + seen.iter().map(|s| s.lost_on_read).sum::<usize>();
    let mut per_value: HashMap<&str, usize> = HashMap::new();
    for (_, v) in &stored {
        *per_value.entry(v.as_str()).or_default() += 1;
    }
    let duplicated = per_value.values().filter(|n| **n > 1).count();
    let unacked: usize = seen.iter().map(|s| s.unacked).sum();
    // nothing stored that nobody asked for: at most every unacknowledged create landed
    assert!(stored.len() <= acked.len() + unacked);
    let unavailable = seen.iter().map(|s| s.unavailable).sum();
    eprintln!(
        "failover, {} replication: {} creates acknowledged, {lost} lost, {duplicated} duplicated, \
         {unavailable} answers of 503, {unacked} creates unacknowledged of which {} stored; slowest answer {slowest:?}",
        if synchronous { "synchronous" } else { "asynchronous" },
        acked.len(),
        stored.len() + lost - acked.len(),
    );
    let verify = verify(&data, &url);
    // the nodes stop cleanly on the new primary
    for node in &mut nodes {
        node.stop();
    }
    Failover {
        acked: acked.len(),
        lost,
        duplicated,
        unavailable,
        verify,
    }
}

#[test]
fn failover_with_synchronous_replication_loses_no_acknowledged_write() {
    let run = failover(true);
    assert!(run.acked > 100, "too little load to judge: {} creates", run.acked);
    assert_eq!(run.lost, 0, "acknowledged creates lost with synchronous replication");
    assert_eq!(run.duplicated, 0);
    assert!(run.unavailable > 0, "the switch was not seen by any client");
    assert!(
        run.verify.status.success(),
        "audit verify after the failover: {}{}",
        String::from_utf8_lossy(&run.verify.stdout),
        String::from_utf8_lossy(&run.verify.stderr)
    );
}

/// The trade-off the documentation states: asynchronous replication loses what the primary
/// acknowledged but had not streamed yet (here the second the standby was behind). The nodes
/// still serve again, store nothing twice and answer 503, never 500; `audit verify` reports the
/// lost tail of the chains the checkpoint file had signed as truncated.
#[test]
fn failover_with_asynchronous_replication_reports_what_it_lost() {
    let run = failover(false);
    assert!(run.acked > 100, "too little load to judge: {} creates", run.acked);
    assert_eq!(run.duplicated, 0);
    assert!(
        run.lost > 0,
        "a standby a second behind lost nothing: the test did not reach its point"
    );
    assert!(
        !run.verify.status.success(),
        "audit verify did not notice the lost tail of the audit chains"
    );
    // the lost writes took their events with them; the writer links no event that is gone
    let found = format!(
        "{}{}",
        String::from_utf8_lossy(&run.verify.stdout),
        String::from_utf8_lossy(&run.verify.stderr)
    );
    assert!(found.contains("checkpoint"), "{found}");
    assert!(!found.contains("its event row is gone"), "{found}");
    let report = |o: &[u8]| {
        String::from_utf8_lossy(o)
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    eprintln!(
        "asynchronous replication: {} of {} acknowledged creates lost; audit verify {}: {} {}",
        run.lost,
        run.acked,
        run.verify.status,
        report(&run.verify.stdout),
        report(&run.verify.stderr)
    );
}

/// SIGTERM: `/readyz` answers 503 "draining" at once while requests are still served for
/// `drain_delay_secs`; then the listener closes, requests in flight finish, the process exits
/// cleanly. Every transaction the node applied was answered, every one answered 200 is stored.
#[test]
fn sigterm_drains_the_node() {
    let cluster = pg();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start_with(
        &data,
        &url,
        free_port(),
        "drain",
        &[
            ("FHIRVAULT_DRAIN_DELAY_SECS", "2"),
            ("FHIRVAULT_SHUTDOWN_TIMEOUT_SECS", "20"),
        ],
    );
    let token = token(&data, &url);
    let stop = Arc::new(AtomicBool::new(false));
    type Sent = Vec<(Instant, Option<u16>, Vec<String>)>;
    let clients: Vec<std::thread::JoinHandle<Sent>> = (0..6)
        .map(|c| {
            let (base, token, stop) = (node.base(), token.clone(), stop.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                let mut sent = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let values: Vec<String> = (0..20).map(|k| format!("drain-{c}-{i}-{k}")).collect();
                    let entries: Vec<Value> = values
                        .iter()
                        .map(|v| {
                            json!({"resource": {"resourceType": "Patient",
                                "identifier": [{"system": "urn:fhirvault:drain", "value": v}]},
                              "request": {"method": "POST", "url": "Patient"}})
                        })
                        .collect();
                    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
                    let at = Instant::now();
                    let status = http
                        .post(&base)
                        .bearer_auth(&token)
                        .header("content-type", "application/fhir+json")
                        .body(bundle.to_string())
                        .send()
                        .and_then(|r| {
                            let s = r.status().as_u16();
                            r.bytes().map(|_| s)
                        })
                        .ok();
                    let refused = status.is_none();
                    sent.push((at, status, values));
                    if refused {
                        // the listener closed: this client is done
                        return sent;
                    }
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let pid = node.child.as_ref().unwrap().id();
    let term = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // readiness fails at once, and the node still answers during the delay
    std::thread::sleep(Duration::from_millis(400));
    let ready = reqwest::blocking::get(format!("http://127.0.0.1:{}/readyz", node.port)).unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert_eq!(ready.json::<Value>().unwrap()["status"], "draining");
    let status = node.child.as_mut().unwrap().wait().unwrap();
    let exited = term.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<(Instant, Option<u16>, Vec<String>)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(status.success(), "the node exited with {status}: {}", node.logs());
    assert!(exited < Duration::from_secs(2 + 20), "draining took {exited:?}");
    assert!(
        sent.iter()
            .any(|(at, s, _)| *at > term + Duration::from_millis(500) && *s == Some(200)),
        "no request was served during the drain delay"
    );
    assert!(
        sent.iter().all(|(_, s, _)| s.is_none() || *s == Some(200)),
        "a request failed while draining"
    );
    node.child = None;
    // every applied transaction was answered, every answered one applied
    let mut after = Node::start(&data, &url, free_port(), "drain-after");
    let stored: HashSet<String> = all_patients(&after.base(), &token)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    for (_, s, values) in &sent {
        let applied = values.iter().filter(|v| stored.contains(*v)).count();
        match s {
            Some(200) => assert_eq!(applied, values.len(), "an answered transaction is not stored"),
            _ => assert_eq!(applied, 0, "a transaction was applied but its answer never came"),
        }
    }
    assert!(
        !node.logs().contains("error"),
        "errors logged while draining: {}",
        node.logs()
    );
    after.stop();
}

/// `replica_database_url`: searches, history and `$everything` run on the standby; a client
/// finds its own write at once even when the standby is behind (the read waits at most
/// `replica_max_wait_ms`, then runs on the primary); row-level security binds the serving role
/// on the standby exactly as on the primary.
#[test]
fn a_read_replica_serves_searches_and_clients_see_their_own_writes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pair = PgPair::start(false);
    let db = pair.create_db("fhir");
    pair.primary_sql("CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS");
    let owner_url = pair.url(&db);
    let app_url = pair.url_as("app", &db);
    let replica_url = pair.standby_url_as("app", &db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start_with(
        &data,
        &app_url,
        free_port(),
        "replica",
        &[
            ("FHIRVAULT_MIGRATION_DATABASE_URL", owner_url.as_str()),
            ("FHIRVAULT_REPLICA_DATABASE_URL", replica_url.as_str()),
            ("FHIRVAULT_REPLICA_MAX_WAIT_MS", "300"),
        ],
    );
    let token = token(&data, &owner_url);
    let http = reqwest::blocking::Client::new();
    let base = node.base();
    let create = |id: &str, value: &str| {
        let body = json!({"resourceType": "Patient", "id": id,
            "identifier": [{"system": "urn:fhirvault:replica", "value": value}]});
        let r = http
            .put(format!("{base}/Patient/{id}"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    };
    let search = |value: &str| -> (usize, Duration) {
        let started = Instant::now();
        let page: Value = http
            .get(format!("{base}/Patient?identifier=urn:fhirvault:replica|{value}"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        (page["entry"].as_array().map_or(0, Vec::len), started.elapsed())
    };
    let served = || metric(node.port, "fhirvault_db_replica_reads_total");

    // caught up: each search right after its write finds it, on the replica
    for i in 0..10 {
        create(&format!("p{i}"), &format!("v{i}"));
        assert_eq!(
            search(&format!("v{i}")).0,
            1,
            "a search right after the write missed it"
        );
    }
    let on_replica = served();
    assert!(on_replica >= 10.0, "the replica served {on_replica} reads");
    for path in ["Patient/p1/_history", "Patient/p1/$everything", "_history"] {
        let before = served();
        let r = http.get(format!("{base}/{path}")).bearer_auth(&token).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(served() > before, "{path} did not run on the replica");
    }

    // a Bulk export's pages are read on the replica too
    let before = served();
    let kick = http
        .get(format!("{base}/$export?_type=Patient"))
        .bearer_auth(&token)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .unwrap();
    assert_eq!(kick.status().as_u16(), 202);
    let status_url = kick.headers()["content-location"].to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(&status_url)
        .bearer_auth(&token)
        .send()
        .unwrap()
        .status()
        .as_u16()
        != 200
    {
        assert!(Instant::now() < deadline, "the export did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served() > before, "the export did not read from the replica");

    // behind: the write is still found, from the primary, after a bounded wait
    pair.stall_replication();
    create("behind", "vbehind");
    let (found, took) = search("vbehind");
    assert_eq!(
        found, 1,
        "a client did not see its own write while the replica was behind"
    );
    assert!(
        took >= Duration::from_millis(300),
        "the read did not wait for the replica ({took:?})"
    );
    assert!(metric(node.port, "fhirvault_db_replica_behind_total") >= 1.0);
    assert!(metric(node.port, "fhirvault_db_replica_lag_bytes") > 0.0);
    eprintln!("a search while the replica was behind took {took:?} (wait bounded at 300 ms)");
    pair.resume_replication();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = served();
        let (found, took) = search("vbehind");
        assert_eq!(found, 1);
        if served() > before {
            eprintln!("caught up again: a search on the replica took {took:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the replica never served again");
        std::thread::sleep(Duration::from_millis(200));
    }

    // row-level security on the standby, through the serving role, with raw SQL
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let mut c = diesel::PgConnection::establish(&replica_url).unwrap();
    let visible = common::visible_ids;
    assert!(
        visible(&mut c).is_empty(),
        "no access context on the replica: nothing (fail closed)"
    );
    c.batch_execute("SELECT set_config('fhirvault.access', 'patient:p1', false)")
        .unwrap();
    assert_eq!(visible(&mut c), vec!["p1"]);
    c.batch_execute("SELECT set_config('fhirvault.access', 'all', false)")
        .unwrap();
    assert_eq!(visible(&mut c).len(), 11);
    // and the serving role cannot switch the protection off there either
    assert!(c
        .batch_execute("ALTER TABLE resource_versions DISABLE ROW LEVEL SECURITY")
        .is_err());
    node.stop();
}
