//! Batch and transaction Bundles and PATCH, black-box over HTTP, each on SQLite and PostgreSQL.

mod common;

use common::{Db, Reply, TestServer};
use fhirvault::config::ConfigLayer;
use serde_json::{json, Value};

fn patient(family: &str, mrn: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "identifier": [{"system": "urn:mrn", "value": mrn}]})
}

fn observation(subject: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "weight"}, "subject": {"reference": subject}})
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn post(full_url: &str, resource: Value) -> Value {
    let t = resource["resourceType"].as_str().unwrap().to_string();
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": t}})
}

fn send_bundle(s: &TestServer, b: &Value) -> Reply {
    s.send("POST", "", Some(b), &[])
}

fn statuses(r: &Reply) -> Vec<String> {
    r.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect()
}

/// `Patient/abc/_history/1` → `abc`
fn id_of_location(loc: &str) -> String {
    loc.split('/').nth(1).unwrap().to_string()
}

/// Rows of everything a write leaves behind (resources, versions, compartments, index).
fn footprint(s: &TestServer) -> Vec<i64> {
    [
        "resources",
        "resource_versions",
        "resource_compartments",
        "search_string",
        "search_token",
        "search_reference",
        "search_date",
    ]
    .iter()
    .map(|t| s.db.count(&format!("SELECT COUNT(*) AS n FROM {t}")))
    .collect()
}

fn transaction_resolves_references(db: Db) {
    let s = TestServer::start(db);
    let doomed = s.post("/Patient", &patient("Doomed", "d-1")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut obs = observation("urn:uuid:p1");
    obs["encounter"] = json!({"reference": "urn:uuid:e1"});
    obs["extension"] = json!([{"url": "http://example.org/about", "valueReference": {"reference": "urn:uuid:p1"}}]);
    obs["performer"] = json!([{"reference": "#prov"}]);
    obs["contained"] = json!([{"resourceType": "Practitioner", "id": "prov", "extension": [
        {"url": "http://example.org/colleague", "valueReference": {"reference": "urn:uuid:p2"}}]}]);
    let b = bundle(
        "transaction",
        vec![
            // listed out of order: the server runs DELETE, POST, PUT, GET
            json!({"request": {"method": "GET", "url": "Patient?family=Txn"}}),
            post("urn:uuid:o1", obs),
            post("urn:uuid:p1", patient("Txn", "t-1")),
            post(
                "urn:uuid:e1",
                json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": "urn:uuid:p1"},
                       "serviceProvider": {"reference": "urn:oid:1.2.840.99.1"}}),
            ),
            post(
                "urn:oid:1.2.840.99.1",
                json!({"resourceType": "Organization", "name": "Clinic"}),
            ),
            json!({"fullUrl": "urn:uuid:p2", "resource": {"resourceType": "Patient", "id": "chosen-id", "name": [{"family": "Put"}]},
                   "request": {"method": "PUT", "url": "Patient/chosen-id"}}),
            json!({"request": {"method": "DELETE", "url": format!("Patient/{doomed}")}}),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["type"], "transaction-response");
    assert_eq!(
        statuses(&r),
        [
            "200 OK",
            "201 Created",
            "201 Created",
            "201 Created",
            "201 Created",
            "201 Created",
            "200 OK"
        ]
    );
    let entries = out["entry"].as_array().unwrap();
    // the GET ran after the writes: it finds the patient created in the same Bundle
    assert_eq!(entries[0]["resource"]["total"], 1, "{}", entries[0]);
    for e in &entries[1..6] {
        assert_eq!(e["response"]["etag"], "W/\"1\"");
        assert!(e["response"]["lastModified"].as_str().unwrap().ends_with('Z'));
        assert!(e["response"]["location"].as_str().unwrap().ends_with("/_history/1"));
        // entries carry no resource unless asked for
        assert!(e.get("resource").is_none());
    }
    let obs_id = id_of_location(entries[1]["response"]["location"].as_str().unwrap());
    let pat_id = id_of_location(entries[2]["response"]["location"].as_str().unwrap());
    let enc_id = id_of_location(entries[3]["response"]["location"].as_str().unwrap());
    let stored = s.get(&format!("/Observation/{obs_id}")).json();
    assert_eq!(stored["subject"]["reference"], format!("Patient/{pat_id}"));
    assert_eq!(stored["encounter"]["reference"], format!("Encounter/{enc_id}"));
    assert_eq!(
        stored["extension"][0]["valueReference"]["reference"],
        format!("Patient/{pat_id}")
    );
    assert_eq!(
        stored["contained"][0]["extension"][0]["valueReference"]["reference"],
        "Patient/chosen-id"
    );
    assert_eq!(stored["performer"][0]["reference"], "#prov");
    let org_id = id_of_location(entries[4]["response"]["location"].as_str().unwrap());
    let enc = s.get(&format!("/Encounter/{enc_id}")).json();
    assert_eq!(enc["subject"]["reference"], format!("Patient/{pat_id}"));
    assert_eq!(enc["serviceProvider"]["reference"], format!("Organization/{org_id}"));
    // a read entry carries its version and time
    let r = send_bundle(
        &s,
        &bundle(
            "batch",
            vec![json!({"request": {"method": "GET", "url": format!("Patient/{pat_id}")}})],
        ),
    );
    let read = &r.json()["entry"][0]["response"];
    assert_eq!(read["etag"], "W/\"1\"");
    assert!(read["lastModified"].is_string(), "{read}");
    // indexed under the rewritten references: the compartment and reference searches find them
    let r = s.get(&format!("/Patient/{pat_id}/Observation"));
    assert_eq!(r.json()["total"], 1, "{}", r.text());
    assert_eq!(
        s.get(&format!("/Observation?encounter=Encounter/{enc_id}")).json()["total"],
        1
    );
    assert_eq!(s.get(&format!("/Patient/{doomed}")).status, 410);
    // with Prefer: return=representation the entries carry what was written
    let b = bundle("transaction", vec![post("urn:uuid:x", patient("Rep", "r-1"))]);
    let r = s.send("POST", "", Some(&b), &[("Prefer", "return=representation")]);
    assert_eq!(r.json()["entry"][0]["resource"]["name"][0]["family"], "Rep");
}

fn transaction_is_all_or_nothing(db: Db) {
    let s = TestServer::start(db);
    let existing = s.post("/Patient", &patient("Existing", "e-1")).json();
    let existing_id = existing["id"].as_str().unwrap().to_string();
    s.auditor.flush_blocking().unwrap();
    let before = footprint(&s);
    let events_before = s.db.count("SELECT COUNT(*) AS n FROM audit_events");
    let mut invalid = observation("urn:uuid:p1");
    invalid["status"] = json!(5);
    let mut updated = existing.clone();
    updated["active"] = json!(true);
    let b = bundle(
        "transaction",
        vec![
            post("urn:uuid:p1", patient("Atomic", "a-1")),
            json!({"resource": updated, "request": {"method": "PUT", "url": format!("Patient/{existing_id}")}}),
            json!({"request": {"method": "DELETE", "url": format!("Patient/{existing_id}")}}),
            post("urn:uuid:o1", invalid),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 400, "{}", r.text());
    let oo = r.outcome();
    let text = oo.to_string();
    assert!(text.contains("Bundle.entry[3]"), "{text}");
    // no resource, no version, no index row, no compartment row: nothing of it is left
    assert_eq!(footprint(&s), before);
    assert_eq!(
        s.get(&format!("/Patient/{existing_id}")).json()["meta"]["versionId"],
        "1"
    );
    assert!(s.get("/Patient?family=Atomic").json()["entry"].is_null());
    // the entries' events went with the transaction; the transaction's own failure is recorded
    s.auditor.flush_blocking().unwrap();
    let events_after = s.db.count("SELECT COUNT(*) AS n FROM audit_events");
    assert_eq!(
        events_after,
        events_before + 3,
        "the Bundle's event, and the two reads above"
    );

    // a version conflict in the middle: 412, naming the entry
    let b = bundle(
        "transaction",
        vec![
            post("urn:uuid:p1", patient("Atomic", "a-1")),
            json!({"resource": existing, "request": {"method": "PUT", "url": format!("Patient/{existing_id}"), "ifMatch": "W/\"9\""}}),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 412, "{}", r.text());
    assert!(r.outcome().to_string().contains("Bundle.entry[1]"));
    // a reference to an entry that is not there
    let r = send_bundle(
        &s,
        &bundle("transaction", vec![post("urn:uuid:o", observation("urn:uuid:nowhere"))]),
    );
    assert_eq!(r.status, 400);
    // an entry without a request, a url outside the base, a method the server does not take
    for bad in [
        json!({"resource": patient("X", "x")}),
        json!({"request": {"method": "POST", "url": "http://elsewhere.example/fhir/Patient"}, "resource": patient("X", "x")}),
        json!({"request": {"method": "GET", "url": "Patient/_history"}}),
    ] {
        let r = send_bundle(
            &s,
            &bundle("transaction", vec![post("urn:uuid:ok", patient("Ok", "ok")), bad]),
        );
        assert!(r.status == 400 || r.status == 405, "{}", r.text());
        assert!(r.outcome().to_string().contains("Bundle.entry[1]"));
    }
    assert_eq!(footprint(&s), before);
}

fn transaction_conditionals(db: Db) {
    let s = TestServer::start(db);
    let known = s.post("/Patient", &patient("Known", "c-1")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.post("/Patient", &patient("Twin", "twin"));
    s.post("/Patient", &patient("Twin", "twin"));
    let b = bundle(
        "transaction",
        vec![
            json!({"fullUrl": "urn:uuid:a", "resource": patient("Known", "c-1"),
                   "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|c-1"}}),
            post("urn:uuid:o1", observation("urn:uuid:a")),
            post("urn:uuid:o2", observation("Patient?identifier=urn:mrn|c-1")),
            json!({"fullUrl": "urn:uuid:z", "resource": patient("Cond", "c-9"),
                   "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|c-9"}}),
            post("urn:uuid:o3", observation("urn:uuid:z")),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        statuses(&r),
        ["200 OK", "201 Created", "201 Created", "201 Created", "201 Created"]
    );
    let e = r.json()["entry"].clone();
    assert_eq!(id_of_location(e[0]["response"]["location"].as_str().unwrap()), known);
    let cond_id = id_of_location(e[3]["response"]["location"].as_str().unwrap());
    for (i, subject) in [(1, known.clone()), (2, known.clone()), (4, cond_id)] {
        let id = id_of_location(e[i]["response"]["location"].as_str().unwrap());
        let o = s.get(&format!("/Observation/{id}")).json();
        assert_eq!(o["subject"]["reference"], format!("Patient/{subject}"), "entry {i}");
    }
    // the same conditional create twice in one transaction: one patient, both fullUrls point at it
    let twice = bundle(
        "transaction",
        vec![
            json!({"fullUrl": "urn:uuid:t1", "resource": patient("Twice", "tw-1"),
                   "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|tw-1"}}),
            json!({"fullUrl": "urn:uuid:t2", "resource": patient("Twice", "tw-1"),
                   "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|tw-1"}}),
            post("urn:uuid:to", observation("urn:uuid:t2")),
        ],
    );
    let r = send_bundle(&s, &twice);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(statuses(&r)[..2], ["201 Created", "200 OK"]);
    let e = r.json()["entry"].clone();
    let first = id_of_location(e[0]["response"]["location"].as_str().unwrap());
    assert_eq!(id_of_location(e[1]["response"]["location"].as_str().unwrap()), first);
    let o = id_of_location(e[2]["response"]["location"].as_str().unwrap());
    assert_eq!(
        s.get(&format!("/Observation/{o}")).json()["subject"]["reference"],
        format!("Patient/{first}")
    );
    // a conditional reference must match exactly one resource
    let r = send_bundle(
        &s,
        &bundle(
            "transaction",
            vec![post("urn:uuid:o", observation("Patient?family=twin"))],
        ),
    );
    assert_eq!(r.status, 412, "{}", r.text());
    let r = send_bundle(
        &s,
        &bundle(
            "transaction",
            vec![post("urn:uuid:o", observation("Patient?identifier=urn:mrn|none"))],
        ),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // so must a conditional create
    let r = send_bundle(
        &s,
        &bundle(
            "transaction",
            vec![
                json!({"resource": patient("Twin", "twin"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": "family=twin"}}),
            ],
        ),
    );
    assert_eq!(r.status, 412, "{}", r.text());
    // the same conditional transaction from many clients at once creates one patient
    let racing = bundle(
        "transaction",
        vec![
            json!({"fullUrl": "urn:uuid:r", "resource": patient("Race", "race-t"),
                   "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|race-t"}}),
            post("urn:uuid:ro", observation("urn:uuid:r")),
        ],
    );
    let codes: Vec<u16> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                let (s, b) = (&s, &racing);
                scope.spawn(move || send_bundle(s, b).status)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    assert_eq!(s.get("/Patient?identifier=urn:mrn|race-t").json()["total"], 1);
    let race_id = s.get("/Patient?identifier=urn:mrn|race-t").json()["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.get(&format!("/Observation?subject=Patient/{race_id}")).json()["total"],
        10
    );
}

fn batch_entries_stand_alone(db: Db) {
    let s = TestServer::start(db);
    let existing = s.post("/Patient", &patient("Batch", "b-0")).json();
    let id = existing["id"].as_str().unwrap().to_string();
    let mut invalid = patient("Bad", "b-2");
    invalid["gender"] = json!(12);
    let b = bundle(
        "batch",
        vec![
            post("urn:uuid:1", patient("Batch", "b-1")),
            post("urn:uuid:2", invalid),
            json!({"request": {"method": "GET", "url": "Patient/does-not-exist"}}),
            json!({"request": {"method": "GET", "url": format!("/fhir/Patient/{id}")}}),
            json!({"resource": existing, "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"7\""}}),
            json!({"request": {"method": "POST"}}),
            json!({"request": {"method": "DELETE", "url": format!("Patient/{id}")}}),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "batch-response");
    let st: Vec<String> = statuses(&r).iter().map(|s| s[..3].to_string()).collect();
    assert_eq!(st, ["201", "400", "404", "200", "412", "400", "200"]);
    let e = r.json()["entry"].clone();
    assert_eq!(e[1]["response"]["outcome"]["resourceType"], "OperationOutcome");
    assert_eq!(e[3]["resource"]["id"], id.as_str());
    let found = s.get("/Patient?family=Batch").json();
    assert_eq!(
        found["entry"].as_array().map_or(0, Vec::len),
        1,
        "one created, one deleted"
    );
    assert_eq!(s.get(&format!("/Patient/{id}")).status, 410);
}

fn bundle_limits(db: Db) {
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            max_bundle_entries: Some(2),
            ..Default::default()
        },
    );
    let three = bundle(
        "transaction",
        (0..3)
            .map(|i| post(&format!("urn:uuid:{i}"), patient("Many", "m")))
            .collect(),
    );
    let r = send_bundle(&s, &three);
    assert_eq!(r.status, 413);
    r.outcome();
    assert!(s.get("/Patient?family=Many").json()["entry"].is_null());
    let r = send_bundle(
        &s,
        &json!({"resourceType": "Bundle", "type": "collection", "entry": []}),
    );
    assert_eq!(r.status, 400);
    let r = send_bundle(&s, &patient("Not", "a bundle"));
    assert_eq!(r.status, 400);
    r.outcome();
    // an empty transaction is a transaction that does nothing
    let r = send_bundle(&s, &bundle("transaction", vec![]));
    assert_eq!(r.status, 200);
}

fn bundle_entries_are_authorized_and_audited(db: Db) {
    let s = TestServer::start(db);
    s.send(
        "PUT",
        "/Patient/pa",
        Some(&json!({"resourceType": "Patient", "id": "pa"})),
        &[],
    );
    s.send(
        "PUT",
        "/Patient/pb",
        Some(&json!({"resourceType": "Patient", "id": "pb"})),
        &[],
    );
    let as_patient = |token: &str, b: &Value| {
        Reply::from(
            reqwest::blocking::Client::new()
                .post(s.url(""))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(b).unwrap())
                .send()
                .unwrap(),
        )
    };
    let pa = s.token("patient/*.cruds", Some("pa"));
    // inside the token's compartment: allowed
    let r = as_patient(
        &pa,
        &bundle("transaction", vec![post("urn:uuid:1", observation("Patient/pa"))]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // one entry outside it: the whole transaction is refused, nothing written
    let before = footprint(&s);
    let r = as_patient(
        &pa,
        &bundle(
            "transaction",
            vec![
                post("urn:uuid:1", observation("Patient/pa")),
                post("urn:uuid:2", observation("Patient/pb")),
            ],
        ),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.outcome().to_string().contains("Bundle.entry[1]"));
    assert_eq!(footprint(&s), before);
    // in a batch the refused entry fails alone; reads of another patient look absent
    let r = as_patient(
        &pa,
        &bundle(
            "batch",
            vec![
                post("urn:uuid:1", observation("Patient/pb")),
                json!({"request": {"method": "GET", "url": "Patient/pb"}}),
                json!({"request": {"method": "GET", "url": "Patient/pa"}}),
            ],
        ),
    );
    let st: Vec<String> = statuses(&r).iter().map(|s| s[..3].to_string()).collect();
    assert_eq!(st, ["403", "404", "200"]);
    // a token without the right to create Observations
    let reader = s.token("system/*.rs", None);
    let r = as_patient(
        &reader,
        &bundle("transaction", vec![post("urn:uuid:1", observation("Patient/pa"))]),
    );
    assert_eq!(r.status, 403);
    // one AuditEvent per entry (a write's in its transaction), plus the Bundle's own
    s.auditor.flush_blocking().unwrap();
    let count = |q: &str| {
        let r = s.get(&format!("/AuditEvent?{q}&_count=1000")).json();
        r["entry"].as_array().map_or(0, Vec::len)
    };
    let (creates, reads, txs) = (
        count("subtype=create"),
        count("subtype=read"),
        count("subtype=transaction"),
    );
    let r = send_bundle(
        &s,
        &bundle(
            "transaction",
            vec![
                post("urn:uuid:1", observation("Patient/pa")),
                post("urn:uuid:2", observation("Patient/pb")),
                post("urn:uuid:3", observation("Patient/pb")),
                json!({"request": {"method": "GET", "url": "Patient/pa"}}),
            ],
        ),
    );
    assert_eq!(r.status, 200);
    s.auditor.flush_blocking().unwrap();
    assert_eq!(count("subtype=create"), creates + 3);
    assert_eq!(count("subtype=read"), reads + 1);
    assert_eq!(count("subtype=transaction"), txs + 1);
    assert!(count("subtype=create&patient=Patient/pb") >= 2);
}

fn patch_request(s: &TestServer, path: &str, content_type: &str, body: &Value, if_match: Option<&str>) -> Reply {
    let mut r = s
        .client
        .patch(s.url(path))
        .header("content-type", content_type)
        .body(serde_json::to_vec(body).unwrap());
    if let Some(m) = if_match {
        r = r.header("if-match", m);
    }
    Reply::from(r.send().unwrap())
}

fn patch_json_and_fhirpath(db: Db) {
    let s = TestServer::start(db);
    let id = s.post("/Patient", &patient("Patchy", "p-1")).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/Patient/{id}");
    const JP: &str = "application/json-patch+json";
    let r = patch_request(
        &s,
        &path,
        JP,
        &json!([{"op": "add", "path": "/gender", "value": "female"}]),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["gender"], "female");
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    // If-Match on a stale version
    let r = patch_request(
        &s,
        &path,
        JP,
        &json!([{"op": "remove", "path": "/gender"}]),
        Some("W/\"1\""),
    );
    assert_eq!(r.status, 412);
    // FHIRPath Patch
    let fp = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.name[0].family"},
        {"name": "value", "valueString": "Patched"}]}]});
    let r = patch_request(&s, &path, "application/fhir+json", &fp, Some("W/\"2\""));
    assert_eq!(r.status, 200, "{}", r.text());
    let found = s.get("/Patient?family=Patched").json();
    assert_eq!(found["entry"].as_array().map_or(0, Vec::len), 1, "reindexed: {found}");
    // a result that is not a valid Patient: 422, nothing changes
    for bad in [
        json!([{"op": "replace", "path": "/gender", "value": 7}]),
        json!([{"op": "add", "path": "/notAnElement", "value": "x"}]),
        json!([{"op": "replace", "path": "/id", "value": "other-id"}]),
        json!([{"op": "test", "path": "/gender", "value": "male"}]),
        json!([{"op": "remove", "path": "/birthDate"}]),
    ] {
        let r = patch_request(&s, &path, JP, &bad, None);
        assert!(r.status == 422 || r.status == 400, "{bad}: {} {}", r.status, r.text());
        r.outcome();
    }
    assert_eq!(s.get(&path).json()["meta"]["versionId"], "3");
    // not a patch at all
    assert_eq!(patch_request(&s, &path, JP, &json!({"op": "add"}), None).status, 400);
    assert_eq!(patch_request(&s, &path, "text/plain", &json!([]), None).status, 415);
    assert_eq!(patch_request(&s, "/Patient/nobody", JP, &json!([]), None).status, 404);
    // patches inside a transaction: a Binary JSON Patch and a FHIRPath Patch
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&json!([{"op": "replace", "path": "/gender", "value": "other"}])).unwrap());
    let b = bundle(
        "transaction",
        vec![
            json!({"resource": {"resourceType": "Binary", "contentType": JP, "data": data},
                   "request": {"method": "PATCH", "url": format!("Patient/{id}")}}),
            json!({"resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
                {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
                {"name": "name", "valueString": "birthDate"}, {"name": "value", "valueDate": "1990-02-03"}]}]},
                   "request": {"method": "PATCH", "url": format!("Patient/{id}")}}),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 200, "{}", r.text());
    let now = s.get(&path).json();
    assert_eq!(now["gender"], "other");
    assert_eq!(now["birthDate"], "1990-02-03");
    assert_eq!(now["meta"]["versionId"], "5");
    // a patch entry that makes the resource invalid undoes the whole transaction
    let b = bundle(
        "transaction",
        vec![
            post("urn:uuid:n", patient("NotKept", "nk")),
            json!({"resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.gender"},
                {"name": "value", "valueCode": "not-a-gender-code-but-still-a-string"}]},
                {"name": "operation", "part": [
                {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
                {"name": "name", "valueString": "bogus"}, {"name": "value", "valueString": "x"}]}]},
                   "request": {"method": "PATCH", "url": format!("Patient/{id}")}}),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(s.get("/Patient?family=NotKept").json()["entry"].is_null());
    assert_eq!(s.get(&path).json()["meta"]["versionId"], "5");
}

on_both_backends!(
    transaction_resolves_references,
    transaction_is_all_or_nothing,
    transaction_conditionals,
    batch_entries_stand_alone,
    bundle_limits,
    bundle_entries_are_authorized_and_audited,
    patch_json_and_fhirpath,
    transaction_puts_of_new_ids,
);

/// PUTs of ids nobody holds are written with the transaction's creates (one multi-row INSERT):
/// 201, history says PUT, the reference to one of them by its fullUrl resolves, and a second
/// PUT of the same id in the same transaction updates what the first created.
fn transaction_puts_of_new_ids(db: Db) {
    let s = TestServer::start(db);
    let existing = s.put("/Patient/put-old", &json!({"resourceType": "Patient", "id": "put-old"}));
    assert_eq!(existing.status, 201);
    let put = |id: &str, resource: Value| {
        let t = resource["resourceType"].as_str().unwrap().to_string();
        json!({"fullUrl": format!("urn:uuid:{id}"), "resource": resource, "request": {"method": "PUT", "url": format!("{t}/{id}")}})
    };
    let b = bundle(
        "transaction",
        vec![
            put(
                "5b2a6c1e-0000-4000-8000-000000000001",
                json!({"resourceType": "Patient", "id": "5b2a6c1e-0000-4000-8000-000000000001", "gender": "male"}),
            ),
            put(
                "5b2a6c1e-0000-4000-8000-000000000002",
                json!({"resourceType": "Observation", "id": "5b2a6c1e-0000-4000-8000-000000000002", "status": "final", "code": {"text": "x"},
                "subject": {"reference": "urn:uuid:5b2a6c1e-0000-4000-8000-000000000001"}}),
            ),
            put(
                "put-old",
                json!({"resourceType": "Patient", "id": "put-old", "active": true}),
            ),
            json!({"resource": {"resourceType": "Patient", "id": "5b2a6c1e-0000-4000-8000-000000000001", "gender": "female"},
                   "request": {"method": "PUT", "url": "Patient/5b2a6c1e-0000-4000-8000-000000000001"}}),
        ],
    );
    let r = send_bundle(&s, &b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(statuses(&r), vec!["201 Created", "201 Created", "200 OK", "200 OK"]);
    let p = s.get("/Patient/5b2a6c1e-0000-4000-8000-000000000001").json();
    assert_eq!(
        (p["gender"].as_str(), p["meta"]["versionId"].as_str()),
        (Some("female"), Some("2"))
    );
    let o = s.get("/Observation/5b2a6c1e-0000-4000-8000-000000000002").json();
    assert_eq!(
        o["subject"]["reference"],
        "Patient/5b2a6c1e-0000-4000-8000-000000000001"
    );
    let h = s
        .get("/Observation/5b2a6c1e-0000-4000-8000-000000000002/_history")
        .json();
    assert_eq!(h["entry"][0]["request"]["method"], "PUT", "{h}");
    // found by search like any create (its index rows were written)
    let found = s
        .get("/Observation?subject=Patient/5b2a6c1e-0000-4000-8000-000000000001")
        .json();
    assert_eq!(found["total"], 1, "{found}");
}
