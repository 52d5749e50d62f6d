//! Several fhirvault nodes on one PostgreSQL database, as an operator runs them: separate
//! processes of the real binary, each on its own port, sharing one database, one data
//! directory (keys, checkpoint file) and nothing else. Mixed reads, searches, creates, updates
//! and transaction bundles from several clients on every node; one node killed with SIGKILL in
//! the middle and started again. Then: no 5xx, every acknowledged write readable, exactly one
//! AuditEvent per request on each node, `audit verify` passing, and each kind of tampering
//! (edit, delete, insert, reorder, one node's chain truncated, one node's chain dropped) caught
//! by `audit verify` on copies of the database. And SQLite refuses a second serving process.

mod common;

use common::node::{bin, count, token, verify, Node};
use common::{free_port, pg};
use diesel::connection::SimpleConnection;
use diesel::Connection;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one node was asked and answered.
#[derive(Default)]
struct Tally {
    /// Requests answered (any status), and the AuditEvents they imply.
    answered: AtomicU64,
    events: AtomicU64,
    server_errors: AtomicU64,
    /// Requests that got no answer (the node was down).
    unanswered: AtomicU64,
}

/// Writes a client saw acknowledged: (id, version).
type Acked = Arc<Mutex<Vec<(String, i64)>>>;

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
}

/// One client: a mixed workload against one node until `stop`.
fn client(base: String, token: String, n: usize, tally: Arc<Tally>, acked: Acked, stop: Arc<AtomicBool>) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut mine: Vec<String> = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let family = format!("Clusterfam{n}x{}", i % 7);
        let (req, events) = match i % 6 {
            0 | 1 => (
                http.post(format!("{base}/Patient"))
                    .header("content-type", "application/fhir+json")
                    .body(patient(&family).to_string()),
                1,
            ),
            2 => match mine.last() {
                Some(id) => (http.get(format!("{base}/Patient/{id}")), 1),
                None => (http.get(format!("{base}/Patient/none{n}")), 1),
            },
            3 => (http.get(format!("{base}/Patient?family={family}&_count=5")), 1),
            4 => match mine.first() {
                Some(id) => (
                    http.put(format!("{base}/Patient/{id}"))
                        .header("content-type", "application/fhir+json")
                        .body(json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]}).to_string()),
                    1,
                ),
                None => (http.get(format!("{base}/Patient?_count=1")), 1),
            },
            _ => {
                let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"fullUrl": "urn:uuid:0a4f1f2e-0000-4000-8000-000000000001", "resource": patient(&family),
                     "request": {"method": "POST", "url": "Patient"}},
                    {"fullUrl": "urn:uuid:0a4f1f2e-0000-4000-8000-000000000002", "resource": patient(&family),
                     "request": {"method": "POST", "url": "Patient"}}
                ]});
                (
                    http.post(base.clone())
                        .header("content-type", "application/fhir+json")
                        .body(bundle.to_string()),
                    3, // the Bundle's own, and one per entry
                )
            }
        };
        let resp = match req.bearer_auth(&token).send() {
            Ok(r) => r,
            Err(_) => {
                tally.unanswered.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let body: Value = match resp.bytes() {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            // the node died while sending its answer: not acknowledged
            Err(_) => {
                tally.unanswered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        tally.answered.fetch_add(1, Ordering::Relaxed);
        tally.events.fetch_add(events, Ordering::Relaxed);
        if status >= 500 {
            tally.server_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("{base}: {status} {body}");
            continue;
        }
        let mut record = |r: &Value| {
            if let (Some(id), Some(v)) = (r["id"].as_str(), r["meta"]["versionId"].as_str()) {
                acked.lock().unwrap().push((id.to_string(), v.parse().unwrap()));
                if !mine.iter().any(|m| m == id) {
                    mine.push(id.to_string());
                }
            }
        };
        match (i % 6, status) {
            (0 | 1 | 4, 200 | 201) => record(&body),
            (5, 200) => {
                for e in body["entry"].as_array().into_iter().flatten() {
                    let loc = e["response"]["location"].as_str().unwrap_or("");
                    // Patient/{id}/_history/{v}
                    let parts: Vec<&str> = loc.split('/').collect();
                    if let [.., "Patient", id, "_history", v] = parts.as_slice() {
                        acked.lock().unwrap().push((id.to_string(), v.parse().unwrap()));
                    }
                }
            }
            _ => {}
        }
    }
}

/// REST events stored for `node`'s chain (its requests' events, whoever linked them).
fn rest_events_of(url: &str, node: &str) -> i64 {
    count(
        url,
        &format!(
            "SELECT COUNT(*) AS n FROM audit_events e JOIN audit_chains c ON c.id = e.chain_id \
             JOIN audit_search s ON s.event_id = e.id WHERE c.node = '{node}' AND s.type_code = 'rest'"
        ),
    )
}

fn chain_id_of(url: &str, node: &str) -> i64 {
    count(url, &format!("SELECT id AS n FROM audit_chains WHERE node = '{node}'"))
}

#[test]
fn three_nodes_on_one_database_under_load_with_a_node_killed() {
    let cluster = pg();
    let db = cluster.create_db();
    let url = cluster.url(&db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // the first node creates the keys; the others start at once beside it
    let ports = [free_port(), free_port(), free_port()];
    let names: Vec<String> = ports
        .iter()
        .map(|p| format!("{}:{p}", fhirvault::config::host_name()))
        .collect();
    let mut nodes: Vec<Node> = vec![Node::start(&data, &url, ports[0], "a")];
    let starting: Vec<_> = [(ports[1], "b"), (ports[2], "c")]
        .into_iter()
        .map(|(port, name)| {
            let (data, url) = (data.clone(), url.clone());
            std::thread::spawn(move || Node::start(&data, &url, port, name))
        })
        .collect();
    nodes.extend(starting.into_iter().map(|h| h.join().unwrap()));
    let token = token(&data, &url);
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
    let acked: Acked = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load_secs = if std::env::var("CI").is_ok() { 24 } else { 20 };
    let mut clients = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        for c in 0..3 {
            let (base, token, tally, acked, stop) = (
                node.base(),
                token.clone(),
                tallies[k].clone(),
                acked.clone(),
                stop.clone(),
            );
            clients.push(std::thread::spawn(move || {
                client(base, token, k * 10 + c, tally, acked, stop)
            }));
        }
    }
    // node b is killed in the middle and started again; what it answered until then counts
    std::thread::sleep(Duration::from_secs(load_secs / 2 - 2));
    let before_kill = tallies[1].events.load(Ordering::Relaxed);
    nodes[1].kill();
    let answered_at_kill = tallies[1].events.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    nodes[1].spawn(&data, &url);
    std::thread::sleep(Duration::from_secs(load_secs / 2));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    for (k, t) in tallies.iter().enumerate() {
        eprintln!(
            "node {k}: {} answered, {} unanswered, {} events implied",
            t.answered.load(Ordering::Relaxed),
            t.unanswered.load(Ordering::Relaxed),
            t.events.load(Ordering::Relaxed)
        );
        assert_eq!(
            t.server_errors.load(Ordering::Relaxed),
            0,
            "no 5xx on node {k}: {}",
            nodes[k].logs()
        );
        assert!(t.answered.load(Ordering::Relaxed) > 50, "node {k} served load");
        if k != 1 {
            assert_eq!(
                t.unanswered.load(Ordering::Relaxed),
                0,
                "node {k} answered every request"
            );
        }
    }
    assert!(before_kill > 0 && answered_at_kill >= before_kill);
    // every acknowledged write is readable, at least at the version acknowledged
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "{} writes", acked.len());
    let http = reqwest::blocking::Client::new();
    let mut latest: std::collections::HashMap<String, i64> = Default::default();
    for (id, v) in &acked {
        let e = latest.entry(id.clone()).or_default();
        *e = (*e).max(*v);
    }
    for (k, (id, v)) in latest.iter().enumerate() {
        let node = &nodes[k % 3];
        // the read's own event
        tallies[k % 3].events.fetch_add(1, Ordering::Relaxed);
        let r = http
            .get(format!("{}/Patient/{id}", node.base()))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "Patient/{id}");
        let got: Value = r.json().unwrap();
        let version: i64 = got["meta"]["versionId"].as_str().unwrap().parse().unwrap();
        assert!(version >= *v, "Patient/{id}: acknowledged version {v}, found {version}");
    }
    // search rows are derived within a second; the killed node's leftovers within a sweep (a
    // restarted node derives its own from the durable rows: given longer on a loaded machine)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    std::thread::sleep(Duration::from_secs(12));
    while std::time::Instant::now() < deadline
        && names
            .iter()
            .enumerate()
            .any(|(k, name)| (rest_events_of(&url, name) as u64) < tallies[k].events.load(Ordering::Relaxed))
    {
        std::thread::sleep(Duration::from_secs(1));
    }
    for (k, name) in names.iter().enumerate() {
        let stored = rest_events_of(&url, name) as u64;
        let implied = tallies[k].events.load(Ordering::Relaxed);
        if k == 1 {
            // the requests in flight when it was killed may or may not have left an event
            assert!(
                stored >= implied && stored <= implied + 3 * 3,
                "node b: {stored} events for {implied} answered requests; its log ends:\n{}",
                nodes[1].logs().lines().rev().take(40).collect::<Vec<_>>().join("\n")
            );
        } else {
            assert_eq!(stored, implied, "exactly one AuditEvent per request on node {k}");
        }
    }
    assert_eq!(
        count(
            &url,
            "SELECT COUNT(*) AS n FROM audit_events e WHERE NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.event_id = e.id)"
        ),
        0,
        "every event linked"
    );
    // nodes stop cleanly; the ledger verifies
    for n in nodes.iter_mut() {
        n.stop();
    }
    let out = verify(&data, &url);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("audit chains intact"), "{text}");
    // no PHI in any node's log
    for n in &nodes {
        assert!(!n.logs().contains("Clusterfam"), "a family name reached a log");
    }
    tampering_on_copies(&data, &db, &chain_id_of(&url, &names[1]));
}

/// Each kind of tampering, on a fresh copy of the cluster's database, caught by `audit verify`.
fn tampering_on_copies(data: &Path, db: &str, node_b: &i64) {
    let cluster = pg();
    let b = *node_b;
    let at = |seq: i64| format!("(SELECT event_id FROM audit_chain WHERE chain_id = {b} AND seq = {seq})");
    let unprotect = "ALTER TABLE audit_events DISABLE TRIGGER USER; ALTER TABLE audit_chain DISABLE TRIGGER USER; \
                     ALTER TABLE audit_entities DISABLE TRIGGER USER; ALTER TABLE audit_search DISABLE TRIGGER USER; \
                     ALTER TABLE audit_checkpoints DISABLE TRIGGER USER; ALTER TABLE audit_chains DISABLE TRIGGER USER;";
    let remove = |filter: String| {
        format!(
            "DELETE FROM audit_entities WHERE event_id IN (SELECT event_id FROM audit_chain WHERE {filter}); \
             DELETE FROM audit_search WHERE event_id IN (SELECT event_id FROM audit_chain WHERE {filter}); \
             DELETE FROM audit_events WHERE id IN (SELECT event_id FROM audit_chain WHERE {filter}); \
             DELETE FROM audit_chain WHERE {filter};"
        )
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "edit",
            format!(
                "UPDATE audit_events SET content = (SELECT content FROM audit_events WHERE id = {}) WHERE id = {};",
                at(2),
                at(3)
            ),
            format!("chain {b} record 3 was edited"),
        ),
        (
            "delete",
            remove(format!("chain_id = {b} AND seq = 4")),
            format!("chain {b} record 4 was deleted"),
        ),
        (
            "reorder",
            format!(
                "UPDATE audit_chain SET seq = -1 WHERE chain_id = {b} AND seq = 5; \
                 UPDATE audit_chain SET seq = 5 WHERE chain_id = {b} AND seq = 6; \
                 UPDATE audit_chain SET seq = 6 WHERE chain_id = {b} AND seq = -1;"
            ),
            format!("chain {b} record 5 was reordered"),
        ),
        (
            "insert",
            // a copy of record 7's row under a new id, linked in as record 7: its content does
            // not open under its new id, and the chain continues around it
            format!(
                "UPDATE audit_chain SET seq = -seq WHERE chain_id = {b} AND seq >= 7; \
                 UPDATE audit_chain SET seq = 1 - seq WHERE chain_id = {b} AND seq < 0; \
                 INSERT INTO audit_events (id, recorded, key_version, content, chain_id) \
                   SELECT 'inserted', recorded, key_version, content, chain_id FROM audit_events WHERE id = {e8}; \
                 INSERT INTO audit_chain (chain_id, seq, event_id, prev_hash, hash) \
                   SELECT {b}, 7, 'inserted', hash, hash FROM audit_chain WHERE chain_id = {b} AND seq = 8;",
                e8 = at(8)
            ),
            format!("chain {b} record 7 was inserted"),
        ),
        (
            "truncate one node's chain",
            format!(
                "{} DELETE FROM audit_checkpoints;",
                remove(format!(
                    "chain_id = {b} AND seq > (SELECT MAX(seq) - 20 FROM audit_chain WHERE chain_id = {b})"
                ))
            ),
            format!("chain {b} was truncated"),
        ),
        (
            "drop one node's chain",
            format!(
                "{} DELETE FROM audit_checkpoints; DELETE FROM audit_chains WHERE id = {b}; \
                 DELETE FROM audit_index_progress WHERE chain_id = {b};",
                remove(format!("chain_id = {b}"))
            ),
            format!("chain {b} was dropped"),
        ),
    ];
    for (name, tamper, expect) in cases {
        let copy = cluster.create_db();
        let mut admin = diesel::PgConnection::establish(&cluster.admin_url()).unwrap();
        // (each in a statement of its own: neither may run in a transaction block)
        admin.batch_execute(&format!("DROP DATABASE {copy}")).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {copy} TEMPLATE {db}"))
            .unwrap();
        let url = cluster.url(&copy);
        let mut c = diesel::PgConnection::establish(&url).unwrap();
        c.batch_execute(&format!("{unprotect} {tamper}"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        drop(c);
        let out = verify(data, &url);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: not detected");
        assert!(err.contains(&expect), "{name}: expected «{expect}» in: {err}");
    }
}

/// SQLite serves one node: a second process on the same database is refused at start-up, and
/// says why; the first keeps serving.
#[test]
fn sqlite_refuses_a_second_serving_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = format!("sqlite://{}", dir.path().join("one.db").display());
    let first = Node::start(&data, &url, free_port(), "first");
    let out = bin()
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--database-url")
        .arg(&url)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second server on one SQLite database must be refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SQLite serves one node"), "{err}");
    let r = reqwest::blocking::get(format!("http://127.0.0.1:{}/healthz", first.port)).unwrap();
    assert!(r.status().is_success());
}

/// State that must hold across processes, each tried from three nodes at once: a conditional
/// create raced from every node creates one resource; conditional updates raced from every node
/// lose no update; a paging token made on one node is followed on the others.
#[test]
fn shared_state_holds_across_nodes() {
    let cluster = pg();
    let url = cluster.url(&cluster.create_db());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut nodes = vec![Node::start(&data, &url, free_port(), "a")];
    nodes.push(Node::start(&data, &url, free_port(), "b"));
    nodes.push(Node::start(&data, &url, free_port(), "c"));
    let token = token(&data, &url);
    let bases: Vec<String> = nodes.iter().map(Node::base).collect();
    let send = |base: &str, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]| {
        let http = reqwest::blocking::Client::new();
        let mut r = http
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            r = r.header("content-type", "application/fhir+json").body(b.to_string());
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().unwrap_or(Value::Null))
    };
    let with_identifier = |value: &str| {
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:race", "value": value}],
               "name": [{"family": "Racefamily"}]})
    };
    // a conditional create raced from nine clients on three nodes
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..9)
            .map(|k| {
                let (base, body) = (bases[k % 3].clone(), with_identifier("c1"));
                let send = &send;
                scope.spawn(move || {
                    send(
                        &base,
                        "POST",
                        "/Patient",
                        Some(body),
                        &[("if-none-exist", "identifier=urn:race|c1")],
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 8, "{statuses:?}");
    let (_, found) = send(&bases[1], "GET", "/Patient?identifier=urn:race|c1", None, &[]);
    assert_eq!(found["total"], 1);
    // conditional updates raced from every node: one creates, the others update; none is lost
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..9)
            .map(|k| {
                let (base, body) = (bases[k % 3].clone(), with_identifier("u1"));
                let send = &send;
                scope.spawn(move || send(&base, "PUT", "/Patient?identifier=urn:race|u1", Some(body), &[]).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 8, "{statuses:?}");
    let (_, found) = send(&bases[2], "GET", "/Patient?identifier=urn:race|u1", None, &[]);
    assert_eq!(found["total"], 1);
    assert_eq!(
        found["entry"][0]["resource"]["meta"]["versionId"], "9",
        "every update kept"
    );
    // a search paged on one node, its next page followed on the others
    for i in 0..7 {
        let (status, _) = send(
            &bases[i % 3],
            "POST",
            "/Patient",
            Some(with_identifier(&format!("p{i}"))),
            &[],
        );
        assert_eq!(status, 201);
    }
    let (_, first) = send(&bases[0], "GET", "/Patient?family=Racefamily&_count=3", None, &[]);
    let next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("a next page")["url"]
        .as_str()
        .unwrap()
        .to_string();
    let path = next.split("/fhir").nth(1).unwrap().to_string();
    assert!(!path.contains("Racefamily"), "no search value in the page link");
    let mut ids = std::collections::BTreeSet::new();
    for b in &bases[1..] {
        let (status, page) = send(b, "GET", &path, None, &[]);
        assert_eq!(status, 200, "{page}");
        let got: Vec<String> = page["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got.len(), 3);
        ids.insert(got);
    }
    assert_eq!(ids.len(), 1, "the same page on every node");
    // an access token revoked on one node stops working there at once, and on the others
    // within seconds (each reloads the revocations from the database)
    let cli = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .arg("--database-url")
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    cli(&[
        "admin",
        "client",
        "add",
        "rev-app",
        "--redirect-uri",
        "http://127.0.0.1/cb",
        "--scope",
        "system/*.rs",
    ]);
    let app_token = cli(&["token", "--scope", "system/*.rs", "--client", "rev-app"]);
    let status_with = |base: &str, t: &str| {
        reqwest::blocking::Client::new()
            .get(format!("{base}/Patient?_count=1"))
            .bearer_auth(t)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    for b in &bases {
        assert_eq!(status_with(b, &app_token), 200);
    }
    let revoked = reqwest::blocking::Client::new()
        .post(format!("http://127.0.0.1:{}/auth/revoke", nodes[0].port))
        .form(&[("token", app_token.as_str()), ("client_id", "rev-app")])
        .send()
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200);
    let revoked_at = Instant::now();
    assert_eq!(
        status_with(&bases[0], &app_token),
        401,
        "at once on the node that revoked it"
    );
    for b in &bases[1..] {
        while status_with(b, &app_token) != 401 {
            assert!(
                revoked_at.elapsed() < Duration::from_secs(12),
                "{b} still accepts a revoked token"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!("revocation seen by every node within {:?}", revoked_at.elapsed());
    // fail closed on every node: while the ledger cannot be written, reads answer 503 without
    // data and writes store nothing; once it can, every node serves again
    let (status, created) = send(
        &bases[0],
        "POST",
        "/Patient",
        Some(with_identifier("Failclosedsentinel")),
        &[],
    );
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap().to_string();
    let mut admin = diesel::PgConnection::establish(&url).unwrap();
    admin
        .batch_execute(
            "CREATE FUNCTION audit_block() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'audit storage down'; END; $$; \
             CREATE TRIGGER audit_block BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_block();",
        )
        .unwrap();
    for b in &bases {
        let http = reqwest::blocking::Client::new();
        let r = http
            .get(format!("{b}/Patient/{id}"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 503);
        assert!(!r.text().unwrap().contains("Failclosedsentinel"));
        let (status, _) = send(b, "POST", "/Patient", Some(with_identifier("Neverstored")), &[]);
        assert!(status >= 500, "{status}");
    }
    admin.batch_execute("DROP TRIGGER audit_block ON audit_events").unwrap();
    for b in &bases {
        let (status, _) = send(b, "GET", &format!("/Patient/{id}"), None, &[]);
        assert_eq!(status, 200);
        let (_, none) = send(b, "GET", "/Patient?identifier=urn:race|Neverstored", None, &[]);
        assert_eq!(none["total"], 0, "the refused creates stored nothing");
    }
    // updates of one resource without If-Match raced from every node: each gets its own
    // version, and a version is never older than the one before it (the bump's GREATEST, in
    // the database, holds across processes)
    let mut blind = with_identifier("blind");
    blind["id"] = json!("blind-race");
    assert_eq!(
        send(&bases[0], "PUT", "/Patient/blind-race", Some(blind.clone()), &[]).0,
        201
    );
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|k| {
                let (base, body) = (bases[k % 3].clone(), blind.clone());
                let send = &send;
                scope.spawn(move || send(&base, "PUT", "/Patient/blind-race", Some(body), &[]).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (_, history) = send(&bases[1], "GET", "/Patient/blind-race/_history?_count=20", None, &[]);
    let times: Vec<(i64, String)> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let meta = &e["resource"]["meta"];
            (
                meta["versionId"].as_str().unwrap().parse().unwrap(),
                meta["lastUpdated"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(times.len(), 13, "{times:?}");
    for pair in times.windows(2) {
        assert_eq!(pair[0].0, pair[1].0 + 1, "{times:?}");
        assert!(pair[0].1 > pair[1].1, "a version older than the one before: {times:?}");
    }
    for n in nodes.iter_mut() {
        n.stop();
    }
    let out = verify(&data, &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A Bulk export kicked off on a node that runs no exports is run by another node (which
/// claims it in the database), and its status and files are served by any node.
#[test]
fn an_export_accepted_on_one_node_runs_on_another() {
    let cluster = pg();
    let url = cluster.url(&cluster.create_db());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let accepting = Node::start_with(
        &data,
        &url,
        free_port(),
        "accepting",
        &[("FHIRVAULT_EXPORT_WORKERS", "0")],
    );
    let running = Node::start(&data, &url, free_port(), "running");
    let token = token(&data, &url);
    let http = reqwest::blocking::Client::new();
    for i in 0..20 {
        let r = http
            .post(format!("{}/Patient", accepting.base()))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(patient(&format!("Exportfam{i}")).to_string())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let kicked = http
        .get(format!("{}/Patient/$export", accepting.base()))
        .bearer_auth(&token)
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .unwrap();
    assert_eq!(kicked.status().as_u16(), 202);
    let status_url = kicked.headers()["content-location"].to_str().unwrap().to_string();
    let status_path = status_url.split("/fhir").nth(1).unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls = 0u32;
    let manifest: Value = loop {
        // asked alternately of both nodes
        polls += 1;
        let base = if polls.is_multiple_of(2) {
            accepting.base()
        } else {
            running.base()
        };
        let r = http
            .get(format!("{base}{status_path}"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        match r.status().as_u16() {
            202 => {
                assert!(Instant::now() < deadline, "the export did not finish");
                std::thread::sleep(Duration::from_millis(200));
            }
            200 => break r.json().unwrap(),
            other => panic!("status {other}: {}", r.text().unwrap()),
        }
    };
    let mut exported = 0;
    for o in manifest["output"].as_array().unwrap() {
        // the file, from the node that accepted the job (it ran none of it)
        let path = o["url"].as_str().unwrap().split("/fhir").nth(1).unwrap().to_string();
        let r = http
            .get(format!("{}{path}", accepting.base()))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        exported += r.text().unwrap().lines().count();
    }
    assert_eq!(exported, 20);
}

/// A SearchParameter an administrator stores on one node is a search parameter on the others
/// within seconds (each node's registry follows the database), and a node killed with SIGKILL
/// knows it again as soon as it restarts.
#[test]
fn stored_search_parameters_reach_every_node() {
    let cluster = pg();
    let url = cluster.url(&cluster.create_db());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let a = Node::start(&data, &url, free_port(), "a");
    let mut b = Node::start(&data, &url, free_port(), "b");
    let out = bin()
        .args(["token", "--scope", "system/*.cruds", "--role", "admin", "--data-dir"])
        .arg(&data)
        .arg("--database-url")
        .arg(&url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let send = |base: &str, method: &str, path: &str, body: Option<Value>| {
        let mut r = reqwest::blocking::Client::new()
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&admin)
            .header("prefer", "handling=strict");
        if let Some(b) = body {
            r = r.header("content-type", "application/fhir+json").body(b.to_string());
        }
        let resp = r.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().unwrap_or(Value::Null))
    };
    let definition = json!({"resourceType": "SearchParameter", "url": "http://example.org/sp/observation-method",
        "name": "ObservationMethod", "status": "active", "description": "How the observation was made",
        "code": "obs-method", "base": ["Observation"], "type": "token", "expression": "Observation.method"});
    assert_eq!(send(&b.base(), "GET", "/Observation?obs-method=m1", None).0, 400);
    assert_eq!(send(&a.base(), "POST", "/SearchParameter", Some(definition)).0, 201);
    // node b learns it from the database within its reload interval
    let deadline = Instant::now() + Duration::from_secs(15);
    while send(&b.base(), "GET", "/Observation?obs-method=m1", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "node b never learned the parameter:\n{}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "method": {"coding": [{"system": "http://snomed.info/sct", "code": "m1"}]}});
    assert_eq!(send(&b.base(), "POST", "/Observation", Some(obs)).0, 201);
    assert_eq!(send(&a.base(), "GET", "/Observation?obs-method=m1", None).1["total"], 1);
    // killed and restarted, node b reads it at start
    b.kill();
    b.spawn(&data, &url);
    let (status, found) = send(&b.base(), "GET", "/Observation?obs-method=m1", None);
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 1);
}
