//! Black-box HTTP tests of the REST core, each run on SQLite and on PostgreSQL.

mod common;

use common::{Db, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Ada"]}], "birthDate": "1970-01-01"})
}

fn created_id(r: &common::Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn crud_lifecycle(db: Db) {
    let s = TestServer::start(db);
    // create: server-assigned id (any id sent is ignored), meta owned by the server
    let mut body = patient("Lovelace");
    body["id"] = json!("client-chosen");
    body["meta"] = json!({"versionId": "77", "lastUpdated": "2001-01-01T00:00:00Z", "tag": [{"code": "keep"}]});
    let r = s.post("/Patient", &body);
    let id = created_id(&r);
    assert_ne!(id, "client-chosen");
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert!(r.header("last-modified").is_some());
    let loc = r.header("location").unwrap();
    assert_eq!(loc, s.url(&format!("/Patient/{id}/_history/1")));
    let created = r.json();
    assert_eq!(created["meta"]["versionId"], "1");
    assert_ne!(created["meta"]["lastUpdated"], "2001-01-01T00:00:00Z");
    assert_eq!(created["meta"]["tag"][0]["code"], "keep");

    // read
    let r = s.get(&format!("/Patient/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), created);
    assert_eq!(r.header("etag"), Some("W/\"1\""));

    // update
    let mut upd = r.json();
    upd["active"] = json!(true);
    let r = s.put(&format!("/Patient/{id}"), &upd);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    assert_eq!(
        r.header("content-location").unwrap(),
        s.url(&format!("/Patient/{id}/_history/2"))
    );
    assert_eq!(r.json()["meta"]["versionId"], "2");

    // vread of both versions
    let v1 = s.get(&format!("/Patient/{id}/_history/1"));
    assert_eq!(v1.status, 200);
    assert!(v1.json().get("active").is_none());
    let v2 = s.get(&format!("/Patient/{id}/_history/2"));
    assert_eq!(v2.json()["active"], true);
    assert_eq!(s.get(&format!("/Patient/{id}/_history/9")).status, 404);
    assert_eq!(s.get(&format!("/Patient/{id}/_history/x")).status, 404);

    // delete: versioned tombstone, 410 afterwards, history kept
    let r = s.delete(&format!("/Patient/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some("W/\"3\""));
    let r = s.get(&format!("/Patient/{id}"));
    assert_eq!(r.status, 410);
    r.outcome();
    assert_eq!(s.get(&format!("/Patient/{id}/_history/3")).status, 410);
    assert_eq!(s.get(&format!("/Patient/{id}/_history/2")).status, 200);
    // deleting again is not an error, and writes no version
    assert_eq!(s.delete(&format!("/Patient/{id}")).status, 200);
    let h = s.get(&format!("/Patient/{id}/_history")).json();
    assert_eq!(h["total"], 3);
    // a deleted resource can be brought back by update; numbering continues
    let mut again = patient("Lovelace");
    again["id"] = json!(id);
    let r = s.put(&format!("/Patient/{id}"), &again);
    assert_eq!(r.header("etag"), Some("W/\"4\""), "{}", r.text());
    // unknown
    assert_eq!(s.get("/Patient/does-not-exist").status, 404);
    s.get("/Patient/does-not-exist").outcome();
}

fn update_rules(db: Db) {
    let s = TestServer::start(db);
    // update-as-create with a client id
    let mut p = patient("Client");
    p["id"] = json!("client-1");
    let r = s.put("/Patient/client-1", &p);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("location").unwrap(), s.url("/Patient/client-1/_history/1"));
    assert_eq!(s.get("/Patient/client-1").status, 200);
    // id in body must match the URL, and be present
    p["id"] = json!("other");
    let r = s.put("/Patient/client-1", &p);
    assert_eq!(r.status, 400);
    assert_eq!(r.outcome()["issue"][0]["expression"][0], "Patient.id");
    p.as_object_mut().unwrap().remove("id");
    assert_eq!(s.put("/Patient/client-1", &p).status, 400);
    // resourceType must match the URL
    let mut o = json!({"resourceType": "Observation", "id": "client-1", "status": "final", "code": {"text": "x"}});
    assert_eq!(s.put("/Patient/client-1", &o).status, 400);
    o["id"] = json!("bad id!");
    assert_eq!(s.put("/Observation/bad%20id!", &o).status, 400);
    // If-Match
    let mut cur = s.get("/Patient/client-1").json();
    cur["active"] = json!(false);
    let r = s.send("PUT", "/Patient/client-1", Some(&cur), &[("If-Match", "W/\"1\"")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.send("PUT", "/Patient/client-1", Some(&cur), &[("If-Match", "W/\"1\"")]);
    assert_eq!(r.status, 412);
    r.outcome();
    let r = s.send("PUT", "/Patient/client-1", Some(&cur), &[("If-Match", "garbage")]);
    assert_eq!(r.status, 400);
    // If-Match on a resource that does not exist
    let mut n = patient("New");
    n["id"] = json!("nope");
    assert_eq!(
        s.send("PUT", "/Patient/nope", Some(&n), &[("If-Match", "W/\"1\"")])
            .status,
        412
    );
    // conditional delete with If-Match
    assert_eq!(
        s.send("DELETE", "/Patient/client-1", None, &[("If-Match", "W/\"1\"")])
            .status,
        412
    );
    assert_eq!(
        s.send("DELETE", "/Patient/client-1", None, &[("If-Match", "W/\"2\"")])
            .status,
        200
    );
}

/// Many clients update the same resource with If-Match at once: every successful update gets
/// its own version, none is lost, and history holds exactly one version per success.
fn concurrent_updates_never_lose_a_write(db: Db) {
    let s = TestServer::start(db);
    let mut p = patient("Race");
    p["id"] = json!("race");
    assert_eq!(s.put("/Patient/race", &p).status, 201);
    let threads = 8;
    let per_thread = 5;
    let versions: Vec<Vec<i64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let s = &s;
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    while mine.len() < per_thread {
                        let cur = s.get("/Patient/race");
                        let etag = cur.header("etag").unwrap().to_string();
                        let mut body = cur.json();
                        let ext = body["extension"].as_array().cloned().unwrap_or_default();
                        let mut ext = ext;
                        ext.push(json!({"url": "urn:writer", "valueString": format!("{t}-{}", mine.len())}));
                        body["extension"] = Value::Array(ext);
                        let r = s.send("PUT", "/Patient/race", Some(&body), &[("If-Match", &etag)]);
                        match r.status {
                            200 => mine.push(r.json()["meta"]["versionId"].as_str().unwrap().parse::<i64>().unwrap()),
                            412 => continue,
                            other => panic!("unexpected {other}: {}", r.text()),
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: BTreeSet<i64> = versions.iter().flatten().copied().collect();
    assert_eq!(all.len(), threads * per_thread, "two updates got the same version");
    let last = s.get("/Patient/race").json();
    assert_eq!(last["meta"]["versionId"], (1 + threads * per_thread).to_string());
    // every accepted write is in the final state: none was overwritten by a stale copy
    assert_eq!(last["extension"].as_array().unwrap().len(), threads * per_thread);
    let h = s.get("/Patient/race/_history?_count=1").json();
    assert_eq!(h["total"], 1 + threads * per_thread);
}

/// Clients update one resource at once without If-Match, so that the version each prepared
/// before its turn (SQLite builds it outside the write lock) is often taken by another: every
/// update gets its own version, its content says that version, and versions and their times
/// rise together.
fn concurrent_blind_updates_number_and_time_versions_in_order(db: Db) {
    let s = TestServer::start(db);
    let mut p = patient("Blind");
    p["id"] = json!("blind");
    assert_eq!(s.put("/Patient/blind", &p).status, 201);
    let threads = 8;
    let per_thread = 4;
    let versions: Vec<i64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (s, p) = (&s, &p);
                scope.spawn(move || {
                    (0..per_thread)
                        .map(|i| {
                            let mut body = p.clone();
                            body["gender"] = json!(if (t + i) % 2 == 0 { "male" } else { "female" });
                            let r = s.put("/Patient/blind", &body);
                            assert_eq!(r.status, 200, "{}", r.text());
                            let v = r.json()["meta"]["versionId"].as_str().unwrap().parse::<i64>().unwrap();
                            assert_eq!(r.header("etag"), Some(format!("W/\"{v}\"").as_str()));
                            v
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let all: BTreeSet<i64> = versions.iter().copied().collect();
    assert_eq!(
        all,
        (2..=1 + (threads * per_thread) as i64).collect(),
        "versions lost or shared"
    );
    let h = s
        .get(&format!("/Patient/blind/_history?_count={}", threads * per_thread + 1))
        .json();
    let entries = h["entry"].as_array().unwrap();
    assert_eq!(entries.len(), threads * per_thread + 1);
    let mut later: Option<(i64, String)> = None;
    for e in entries {
        // newest first
        let meta = &e["resource"]["meta"];
        let v = meta["versionId"].as_str().unwrap().parse::<i64>().unwrap();
        let at = meta["lastUpdated"].as_str().unwrap().to_string();
        assert_eq!(
            s.get(&format!("/Patient/blind/_history/{v}")).json()["meta"]["versionId"],
            v.to_string()
        );
        if let Some((lv, lat)) = &later {
            assert_eq!(*lv, v + 1, "history out of order");
            assert!(*lat >= at, "version {lv} ({lat}) is older than version {v} ({at})");
        }
        later = Some((v, at));
    }
}

fn conditional_create(db: Db) {
    let s = TestServer::start(db);
    let mut p = patient("Cond");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "12345"}]);
    let first = s.send(
        "POST",
        "/Patient",
        Some(&p),
        &[("If-None-Exist", "identifier=urn:mrn|12345")],
    );
    let id = created_id(&first);
    // one match: 200 with the existing resource, nothing written
    for cond in [
        "identifier=urn:mrn|12345",
        "identifier=12345",
        "identifier=urn%3Amrn%7C12345",
        &format!("_id={id}"),
    ] {
        let r = s.send("POST", "/Patient", Some(&p), &[("If-None-Exist", cond)]);
        assert_eq!(r.status, 200, "{cond}: {}", r.text());
        assert_eq!(r.json()["id"], id.as_str());
    }
    assert_eq!(s.get("/Patient/_history").json()["total"], 1);
    // a different system does not match
    let r = s.send(
        "POST",
        "/Patient",
        Some(&p),
        &[("If-None-Exist", "identifier=urn:other|12345")],
    );
    assert_eq!(r.status, 201);
    // now two resources carry value 12345: ambiguous
    let r = s.send("POST", "/Patient", Some(&p), &[("If-None-Exist", "identifier=12345")]);
    assert_eq!(r.status, 412);
    r.outcome();
    // any search parameter works (the search engine, blind indexes included) ...
    let r = s.send(
        "POST",
        "/Patient",
        Some(&p),
        &[("If-None-Exist", "name=Cond&birthdate=1970-01-01")],
    );
    assert_eq!(r.status, 412, "two patients named Cond: {}", r.text());
    let r = s.send(
        "POST",
        "/Patient",
        Some(&p),
        &[("If-None-Exist", &format!("family:exact=Cond&_id={id}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // ... and unknown ones are refused, never ignored (that would widen the condition)
    let r = s.send("POST", "/Patient", Some(&p), &[("If-None-Exist", "nonsense=1")]);
    assert_eq!(r.status, 400);
    let r = s.send("POST", "/Patient", Some(&p), &[("If-None-Exist", "_count=1")]);
    assert_eq!(r.status, 400);
    // a deleted match no longer counts
    assert_eq!(s.delete(&format!("/Patient/{id}")).status, 200);
    let r = s.send("POST", "/Patient", Some(&p), &[("If-None-Exist", &format!("_id={id}"))]);
    assert_eq!(r.status, 201);
}

/// The same conditional create from many clients at once creates exactly one resource.
fn conditional_create_is_race_free(db: Db) {
    let s = TestServer::start(db);
    let mut p = patient("Once");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "race-1"}]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                let (s, p) = (&s, &p);
                scope.spawn(move || {
                    s.send(
                        "POST",
                        "/Patient",
                        Some(p),
                        &[("If-None-Exist", "identifier=urn:mrn|race-1")],
                    )
                    .status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 11, "{statuses:?}");
    assert_eq!(s.get("/Patient/_history").json()["total"], 1);
}

/// `PUT [type]?…` and `DELETE [type]?…`: 0, 1 and several matches as R4 says.
fn conditional_update_and_delete(db: Db) {
    let s = TestServer::start(db);
    let mut p = patient("Upd");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "u-1"}]);
    // no match, no id: created
    let r = s.send("PUT", "/Patient?identifier=urn:mrn|u-1", Some(&p), &[]);
    let id = created_id(&r);
    // one match: updated in place
    p["gender"] = json!("female");
    let r = s.send("PUT", "/Patient?identifier=urn:mrn|u-1", Some(&p), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(r.json()["meta"]["versionId"], "2");
    // with If-Match on the match's version
    let r = s.send(
        "PUT",
        "/Patient?identifier=urn:mrn|u-1",
        Some(&p),
        &[("If-Match", "W/\"1\"")],
    );
    assert_eq!(r.status, 412);
    // a body id other than the match's: refused
    let mut other = p.clone();
    other["id"] = json!("someone-else");
    assert_eq!(
        s.send("PUT", "/Patient?identifier=urn:mrn|u-1", Some(&other), &[])
            .status,
        400
    );
    // no match with an id in the body: created under that id
    let mut q = patient("Upd");
    q["id"] = json!("chosen");
    q["identifier"] = json!([{"system": "urn:mrn", "value": "u-2"}]);
    let r = s.send("PUT", "/Patient?identifier=urn:mrn|u-2", Some(&q), &[]);
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["id"], "chosen");
    // several matches: 412, nothing written
    let r = s.send("PUT", "/Patient?family=upd", Some(&p), &[]);
    assert_eq!(r.status, 412);
    r.outcome();
    assert_eq!(s.send("DELETE", "/Patient?family=upd", None, &[]).status, 412);
    // conditions need parameters
    assert_eq!(s.send("PUT", "/Patient", Some(&p), &[]).status, 400);
    // delete: one match goes, then there is nothing to delete
    let r = s.send("DELETE", "/Patient?identifier=u-2", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get("/Patient/chosen").status, 410);
    let r = s.send("DELETE", "/Patient?identifier=u-2", None, &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("nothing to delete"));
    // the same conditional update from many clients at once creates one resource
    let mut r1 = patient("Racer");
    r1["identifier"] = json!([{"system": "urn:mrn", "value": "race-u"}]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                let (s, r1) = (&s, &r1);
                scope.spawn(move || {
                    s.send("PUT", "/Patient?identifier=urn:mrn|race-u", Some(r1), &[])
                        .status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 9, "{statuses:?}");
    let found = s.get("/Patient?identifier=urn:mrn|race-u").json();
    assert_eq!(found["total"], 1);
    assert_eq!(found["entry"][0]["resource"]["meta"]["versionId"], "10");
    // a patient-context token may not write conditionally
    let t = format!("Bearer {}", s.token("patient/*.cruds", Some(&id)));
    let r = s.send(
        "DELETE",
        "/Patient?identifier=urn:mrn|u-1",
        None,
        &[("authorization", &t)],
    );
    assert_eq!(r.status, 403);
}

fn history_and_paging(db: Db) {
    let s = TestServer::start(db);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(created_id(&s.post("/Patient", &patient(&format!("P{i}")))));
    }
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "bp"}});
    let oid = created_id(&s.post("/Observation", &obs));
    let mut p0 = s.get(&format!("/Patient/{}", ids[0])).json();
    p0["active"] = json!(true);
    assert_eq!(s.put(&format!("/Patient/{}", ids[0]), &p0).status, 200);
    assert_eq!(s.delete(&format!("/Patient/{}", ids[1])).status, 200);

    // instance history, newest first, with request/response per entry
    let h = s.get(&format!("/Patient/{}/_history", ids[0])).json();
    assert_eq!(h["resourceType"], "Bundle");
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 2);
    assert_eq!(h["entry"][0]["resource"]["meta"]["versionId"], "2");
    assert_eq!(h["entry"][0]["request"]["method"], "PUT");
    assert_eq!(h["entry"][1]["request"]["method"], "POST");
    assert_eq!(h["entry"][1]["response"]["status"], "201 Created");
    assert_eq!(h["entry"][0]["response"]["etag"], "W/\"2\"");
    assert_eq!(
        h["entry"][0]["fullUrl"],
        s.url(&format!("/Patient/{}", ids[0])).as_str()
    );
    // deleted version appears without a resource
    let h = s.get(&format!("/Patient/{}/_history", ids[1])).json();
    assert_eq!(h["entry"][0]["request"]["method"], "DELETE");
    assert!(h["entry"][0].get("resource").is_none());

    // type and system history
    assert_eq!(s.get("/Patient/_history").json()["total"], 7);
    assert_eq!(
        s.get("/Observation/_history").json()["entry"][0]["resource"]["id"],
        oid.as_str()
    );
    assert_eq!(s.get("/_history").json()["total"], 8);
    let only_total = s.get("/_history?_count=0").json();
    assert_eq!(only_total["total"], 8);
    assert!(only_total.get("entry").is_none(), "FHIR JSON has no empty arrays");
    // every history Bundle is a valid R4 Bundle
    let v = fhirvault::server::shared_validator().unwrap();
    for b in [&only_total, &h, &s.get("/_history").json()] {
        assert!(v.validate("Bundle", b).is_empty(), "{:?}", v.validate("Bundle", b));
    }

    // paging with _count through next links visits every version once
    let mut url = s.url("/_history?_count=3");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page: Value = s.client.get(&url).send().unwrap().json().unwrap();
        pages += 1;
        for e in page["entry"].as_array().into_iter().flatten() {
            seen.push(format!("{}|{}", e["fullUrl"], e["response"]["etag"]));
        }
        let next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next");
        match next {
            Some(l) => {
                let u = l["url"].as_str().unwrap().to_string();
                assert!(
                    !u.contains("P0") && !u.contains("Ada"),
                    "page links carry no resource content"
                );
                url = u;
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 8);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 8);

    // _since: only versions at or after the instant
    let since = h["entry"][0]["response"]["lastModified"].as_str().unwrap().to_string();
    let q = format!("/_history?_since={}", since.replace(':', "%3A").replace('+', "%2B"));
    let r = s.get(&q).json();
    assert_eq!(r["total"], 1, "{r}");
    assert_eq!(s.get("/_history?_since=yesterday").status, 400);
    assert_eq!(s.get("/_history?_count=abc").status, 400);
    assert_eq!(s.get("/_history?_page=not-a-token").status, 400);
}

fn http_semantics(db: Db) {
    let s = TestServer::start(db);
    let r = s.post("/Patient", &patient("Http"));
    let id = created_id(&r);
    let path = format!("/Patient/{id}");
    let lm = r.header("last-modified").unwrap().to_string();
    // conditional reads
    assert_eq!(s.get_with(&path, &[("If-None-Match", "W/\"1\"")]).status, 304);
    assert_eq!(s.get_with(&path, &[("If-None-Match", "W/\"2\"")]).status, 200);
    assert_eq!(s.get_with(&path, &[("If-Modified-Since", &lm)]).status, 304);
    assert_eq!(
        s.get_with(&path, &[("If-Modified-Since", "Sat, 01 Jan 2000 00:00:00 GMT")])
            .status,
        200
    );
    // Prefer
    let r = s.send("POST", "/Patient", Some(&patient("M")), &[("Prefer", "return=minimal")]);
    assert_eq!(r.status, 201);
    assert!(r.body.is_empty());
    assert!(r.header("location").is_some());
    let r = s.send(
        "POST",
        "/Patient",
        Some(&patient("O")),
        &[("Prefer", "return=OperationOutcome")],
    );
    assert_eq!(r.status, 201);
    r.outcome();
    let r = s.send(
        "POST",
        "/Patient",
        Some(&patient("R")),
        &[("Prefer", "return=representation")],
    );
    assert_eq!(r.json()["resourceType"], "Patient");
    // formats
    assert!(s
        .get(&path)
        .header("content-type")
        .unwrap()
        .starts_with("application/fhir+json"));
    let r = s.get_with(&path, &[("Accept", "application/json")]);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    assert_eq!(s.get_with(&path, &[("Accept", "application/fhir+json")]).status, 200);
    assert_eq!(s.get_with(&path, &[("Accept", "text/html, */*;q=0.1")]).status, 200);
    let r = s.get_with(&path, &[("Accept", "application/fhir+xml")]);
    assert_eq!(r.status, 406);
    r.outcome();
    assert_eq!(s.get(&format!("{path}?_format=xml")).status, 406);
    assert_eq!(s.get(&format!("{path}?_format=json")).status, 200);
    assert_eq!(
        s.get_with(
            &format!("{path}?_format=application/fhir%2Bjson"),
            &[("Accept", "application/xml")]
        )
        .status,
        200,
        "_format overrides Accept"
    );
    let compact = s.get(&path).text();
    let pretty = s.get(&format!("{path}?_pretty=true")).text();
    assert!(!compact.contains('\n'));
    assert!(pretty.contains("\n  "));
    // request bodies
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", "application/fhir+xml")
        .body("<Patient/>")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&patient("J")).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // security headers on every response
    let r = s.get(&path);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.header("x-request-id").is_some());
    // HEAD
    let r = s.client.head(s.url(&path)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers().get("etag").unwrap(), "W/\"1\"");
}

fn body_size_limit(db: Db) {
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            max_body_bytes: Some(4096),
            ..Default::default()
        },
    );
    let mut big = patient("Big");
    big["text"] = json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", "x".repeat(5000))});
    let r = s.post("/Patient", &big);
    assert_eq!(r.status, 413);
    r.outcome();
    // chunked body without Content-Length is bounded too
    let body = serde_json::to_vec(&big).unwrap();
    let stream = std::io::Cursor::new(body);
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", "application/fhir+json")
        .body(reqwest::blocking::Body::new(stream))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(s.get("/_history").json()["total"], 0);
}

fn validation_and_errors(db: Db) {
    let s = TestServer::start(db);
    // schema violations: 400, one issue per problem, paths, and never the submitted values
    let bad = json!({"resourceType": "Patient", "gender": "SENTINEL-GENDER-VALUE", "birthDate": "SENTINEL-DATE", "name": [{"given": "SENTINEL-NOT-ARRAY"}], "unknownThing": "SENTINEL-X"});
    let r = s.post("/Patient", &bad);
    assert_eq!(r.status, 400);
    let oo = r.outcome();
    assert!(!r.text().contains("SENTINEL"), "{}", r.text());
    let exprs: Vec<String> = oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    for e in [
        "Patient.gender",
        "Patient.birthDate",
        "Patient.name[0].given",
        "Patient.unknownThing",
    ] {
        assert!(exprs.contains(&e.to_string()), "{e} missing from {exprs:?}");
    }
    // resourceType mismatch and absence
    let r = s.post("/Patient", &json!({"resourceType": "Observation"}));
    assert_eq!(r.status, 400);
    assert_eq!(r.outcome()["issue"][0]["expression"][0], "resourceType");
    assert_eq!(s.post("/Patient", &json!({"name": []})).status, 400);
    // malformed JSON, wrong JSON shape, empty body
    for raw in ["{\"resourceType\": \"Patient\", SENTINEL", "[1,2]", "", "\"SENTINEL\""] {
        let r = s
            .client
            .post(s.url("/Patient"))
            .header("content-type", "application/fhir+json")
            .body(raw.to_string())
            .send()
            .unwrap();
        let reply = common::Reply::from(r);
        assert_eq!(reply.status, 400, "{raw}");
        reply.outcome();
        assert!(!reply.text().contains("SENTINEL"));
    }
    // nothing was stored by any of it
    assert_eq!(s.get("/_history").json()["total"], 0);
    // unknown routes, unknown types and wrong methods are OperationOutcomes too
    for (m, p, status) in [
        ("GET", "/NotAType/1", 404),
        ("GET", "/NotAType", 404),
        ("POST", "/NotAType", 404),
        ("GET", "/Patient/1/extra/stuff/here", 404),
        ("PATCH", "/Patient/1", 415),
        ("POST", "/Patient/1", 405),
        ("DELETE", "/Patient", 400),
        ("PATCH", "/Patient", 405),
        ("PUT", "/metadata", 405),
    ] {
        let r = s.send(m, p, None, &[]);
        assert_eq!(r.status, status, "{m} {p}");
        r.outcome();
    }
    let r = common::Reply::from(s.client.get(format!("http://{}/elsewhere", s.addr)).send().unwrap());
    assert_eq!(r.status, 404);
    r.outcome();
}

fn capability_statement(db: Db) {
    let s = TestServer::start(db);
    let r = s.get("/metadata");
    assert_eq!(r.status, 200);
    let cs = r.json();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["kind"], "instance");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    assert_eq!(resources.len(), 146);
    // the CapabilityStatement is itself a valid R4 resource
    let v = fhirvault::server::shared_validator().unwrap();
    assert!(v.validate("CapabilityStatement", &cs).is_empty());
    // nothing listed that is not implemented: every type but AuditEvent (checked in
    // tests/audit.rs) has the REST interactions and search; the parameters listed are those the
    // search answers (no special ones)
    for res in resources.iter().filter(|r| r["type"] != "AuditEvent") {
        let codes: BTreeSet<&str> = res["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["code"].as_str().unwrap())
            .collect();
        assert_eq!(
            codes,
            [
                "create",
                "delete",
                "history-instance",
                "history-type",
                "patch",
                "read",
                "search-type",
                "update",
                "vread"
            ]
            .into_iter()
            .collect()
        );
        for p in res["searchParam"].as_array().into_iter().flatten() {
            assert_ne!(p["type"], "special", "{p}");
        }
    }
    let system: BTreeSet<&str> = cs["rest"][0]["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        system,
        ["batch", "history-system", "search-system", "transaction"]
            .into_iter()
            .collect()
    );
    // and every listed interaction answers on a sample of types
    for t in ["Patient", "Observation", "Bundle", "Binary"] {
        assert_ne!(s.get(&format!("/{t}/_history")).status, 404, "{t}");
    }
}

/// Every official example (one per resource type) is created, read back and equal to what was
/// sent apart from `id` and `meta.versionId`/`meta.lastUpdated`.
fn official_examples_round_trip(db: Db) {
    let s = TestServer::start_with(db, common::examples_layer());
    let mut examples = common::r4_examples();
    // R4 ships no example for these types; minimal valid instances stand in.
    for extra in [
        json!({"resourceType": "Parameters", "parameter": [{"name": "a", "valueString": "b"}]}),
        json!({"resourceType": "SubstanceNucleicAcid", "numberOfSubunits": 1}),
        json!({"resourceType": "SubstancePolymer", "modification": ["m"]}),
        json!({"resourceType": "SubstanceProtein", "numberOfSubunits": 2}),
        json!({"resourceType": "SubstanceReferenceInformation", "comment": "c"}),
        json!({"resourceType": "SubstanceSourceMaterial", "organismName": "o"}),
    ] {
        examples.push((format!("{}.json", extra["resourceType"].as_str().unwrap()), extra));
    }
    let types: BTreeSet<String> = examples
        .iter()
        .map(|(_, v)| v["resourceType"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types.len(), 146, "one example for every R4 resource type");
    let mut failures = Vec::new();
    for (file, example) in &examples {
        let t = example["resourceType"].as_str().unwrap();
        if t == "SearchParameter" {
            // SearchParameters change what the server indexes: an administrator's to write (the
            // harness's token is one; a token without the role is refused)
            let plain = format!("Bearer {}", s.token("system/*.cruds", None));
            let r = s.send("POST", &format!("/{t}"), Some(example), &[("authorization", &plain)]);
            assert_eq!(r.status, 403);
        }
        let r = s.post(&format!("/{t}"), example);
        if t == "AuditEvent" {
            // only the server writes the audit log
            assert_eq!(r.status, 405, "{}", r.text());
            continue;
        }
        if r.status != 201 {
            failures.push(format!("{file}: create {} {}", r.status, r.text()));
            continue;
        }
        let id = r.json()["id"].as_str().unwrap().to_string();
        let back = s.get(&format!("/{t}/{id}")).json();
        let strip = |v: &Value| {
            let mut v = v.clone();
            let o = v.as_object_mut().unwrap();
            o.remove("id");
            if let Some(Value::Object(m)) = o.get_mut("meta") {
                m.remove("versionId");
                m.remove("lastUpdated");
                if m.is_empty() {
                    o.remove("meta");
                }
            }
            v
        };
        if strip(&back) != strip(example) {
            failures.push(format!("{file}: read back differs"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        examples.len(),
        failures.join("\n")
    );
}

/// Invariant 1: a name written through the API never appears in the database at rest.
fn no_plaintext_phi_at_rest(db: Db) {
    let s = TestServer::start(db);
    let sentinel = "Zqxjvwkplf";
    let mut p = patient(sentinel);
    p["identifier"] = json!([{"system": "urn:mrn", "value": format!("{sentinel}-MRN")}]);
    let id = created_id(&s.post("/Patient", &p));
    let mut p2 = s.get(&format!("/Patient/{id}")).json();
    p2["name"][0]["given"] = json!([format!("{sentinel}Given")]);
    assert_eq!(s.put(&format!("/Patient/{id}"), &p2).status, 200);
    assert_eq!(s.get(&format!("/Patient/{id}")).json()["name"][0]["family"], sentinel);
    let bytes = s.db.bytes_at_rest();
    assert!(bytes.len() > 1000);
    assert!(
        !bytes.windows(sentinel.len()).any(|w| w == sentinel.as_bytes()),
        "plaintext PHI found at rest"
    );
    // the resource id and type are stored (they are not PHI); proves we looked at the right data
    assert!(bytes.windows(id.len()).any(|w| w == id.as_bytes()));
}

/// A ciphertext moved to another row does not decrypt (AAD binds it to its row), the
/// version table refuses UPDATE and DELETE, and a tampered row fails closed without leaking.
fn ciphertext_bound_to_row_and_history_append_only(db: Db) {
    let s = TestServer::start(db);
    let a = created_id(&s.post("/Patient", &patient("Alpha")));
    let b = created_id(&s.post("/Patient", &patient("Bravo")));
    let err =
        s.db.exec(&format!(
            "UPDATE resource_versions SET deleted = TRUE WHERE logical_id = '{a}'"
        ))
        .unwrap_err();
    assert!(err.contains("append-only"), "{err}");
    assert!(s
        .db
        .exec("DELETE FROM resource_versions")
        .unwrap_err()
        .contains("append-only"));
    // Move b's ciphertext into a's row, by re-creating the table content without the trigger.
    let swap = match db {
        Db::Sqlite => format!(
            "DROP TRIGGER resource_versions_append_only_update; \
             UPDATE resource_versions SET content = (SELECT content FROM resource_versions WHERE logical_id = '{b}'), \
             content_sha256 = (SELECT content_sha256 FROM resource_versions WHERE logical_id = '{b}') WHERE logical_id = '{a}';"
        ),
        Db::Postgres => format!(
            "ALTER TABLE resource_versions DISABLE TRIGGER resource_versions_append_only; \
             UPDATE resource_versions SET content = (SELECT content FROM resource_versions WHERE logical_id = '{b}'), \
             content_sha256 = (SELECT content_sha256 FROM resource_versions WHERE logical_id = '{b}') WHERE logical_id = '{a}';"
        ),
    };
    s.db.exec(&swap).unwrap();
    let r = s.get(&format!("/Patient/{a}"));
    assert_eq!(r.status, 500);
    r.outcome();
    assert!(!r.text().contains("Bravo") && !r.text().contains("Alpha"));
    assert_eq!(s.get(&format!("/Patient/{b}")).status, 200);
}

/// Hostile or odd requests get 4xx OperationOutcomes, never a 5xx, a panic or a dropped connection.
fn hostile_inputs_never_fail_the_server(db: Db) {
    let s = TestServer::start(db);
    let deep = format!(
        "{{\"resourceType\":\"Patient\",\"extension\":{}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let mut nested = json!({"resourceType": "Patient"});
    for _ in 0..40 {
        nested = json!({"resourceType": "Patient", "contained": [nested]});
    }
    let bodies: Vec<Vec<u8>> = vec![
        deep.into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x7b],
        b"{\"resourceType\":\"Observation\",\"status\":\"final\",\"code\":{\"text\":\"x\"},\"valueQuantity\":{\"value\":1e400}}".to_vec(),
        b"{\"resourceType\":\"Patient\",\"resourceType\":\"Patient\"}".to_vec(),
        b"{\"resourceType\":null}".to_vec(),
        b"{\"resourceType\":\"Patient\",\"meta\":\"x\"}".to_vec(),
        serde_json::to_vec(&nested).unwrap(),
    ];
    for body in bodies {
        for (m, p) in [("POST", "/Patient"), ("PUT", "/Patient/x1")] {
            let r = s
                .client
                .request(m.parse().unwrap(), s.url(p))
                .header("content-type", "application/fhir+json")
                .body(body.clone())
                .send()
                .unwrap();
            let status = r.status().as_u16();
            assert!(
                (400..500).contains(&status),
                "{m} {p} gave {status} for {}",
                String::from_utf8_lossy(&body).chars().take(60).collect::<String>()
            );
        }
    }
    let long_id = "a".repeat(65);
    for path in [
        format!("/Patient/{long_id}"),
        "/Patient/%00".to_string(),
        "/Patient/..%2F..%2Fetc".to_string(),
        format!("/Patient/x?{}", "a=b&".repeat(2000)),
        "/Patient/x/_history/99999999999999999999999".to_string(),
        "/_history?_count=-1".to_string(),
        "/_history?_count=99999999999".to_string(),
    ] {
        let r = s.get(&path);
        assert!(r.status < 500, "{path} gave {}", r.status);
    }
    let r = s
        .client
        .get(s.url("/Patient/x"))
        .header("If-None-Match", b"\xff\xfe".as_slice())
        .send()
        .unwrap();
    assert!(r.status().as_u16() < 500);
    let r = s.send(
        "PUT",
        "/Patient/x2",
        Some(&json!({"resourceType": "Patient", "id": "x2"})),
        &[("If-Match", "W/\"99999999999999999999\"")],
    );
    assert_eq!(r.status, 400);
    // and the server still works
    assert_eq!(s.post("/Patient", &patient("Still")).status, 201);
}

on_both_backends!(
    hostile_inputs_never_fail_the_server,
    crud_lifecycle,
    update_rules,
    concurrent_updates_never_lose_a_write,
    concurrent_blind_updates_number_and_time_versions_in_order,
    conditional_create,
    conditional_create_is_race_free,
    conditional_update_and_delete,
    history_and_paging,
    http_semantics,
    body_size_limit,
    validation_and_errors,
    capability_statement,
    official_examples_round_trip,
    no_plaintext_phi_at_rest,
    ciphertext_bound_to_row_and_history_append_only,
);
