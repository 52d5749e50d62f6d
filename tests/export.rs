//! Bulk Data `$export` (issue 8): kick-off, polling, manifest, encrypted NDJSON files served
//! only to the client that started the job, levels (system, Patient, Group), `_type`,
//! `_since`, `_typeFilter`, cancel, expiry, and a job that resumes where a stopped node left
//! it. Each on SQLite and on PostgreSQL.

mod common;

use common::{Db, Reply, TestServer};
use fhirvault::config::ConfigLayer;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

const ASYNC: (&str, &str) = ("prefer", "respond-async");
const FHIR_JSON: (&str, &str) = ("accept", "application/fhir+json");

fn layer(file_resources: u64) -> ConfigLayer {
    ConfigLayer {
        export_file_resources: Some(file_resources),
        export_lease_secs: Some(1),
        ..Default::default()
    }
}

fn created_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Patients (family names `Exportfam{i}`), two observations each (one with code 1234-5),
/// a practitioner (in no patient's compartment), and a Group of the first three patients.
struct Population {
    patients: Vec<String>,
    observations: Vec<String>,
    practitioner: String,
    group: String,
}

fn populate(s: &TestServer, n: usize) -> Population {
    let mut patients = Vec::new();
    let mut observations = Vec::new();
    for i in 0..n {
        let pid = created_id(&s.post(
            "/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": format!("Exportfam{i}")}], "gender": "female"}),
        ));
        for code in ["1234-5", "9999-9"] {
            observations.push(created_id(&s.post(
                "/Observation",
                &json!({"resourceType": "Observation", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                        "subject": {"reference": format!("Patient/{pid}")}}),
            )));
        }
        patients.push(pid);
    }
    let practitioner = created_id(&s.post(
        "/Practitioner",
        &json!({"resourceType": "Practitioner", "name": [{"family": "Exportdoc"}]}),
    ));
    let members: Vec<Value> = patients[..3]
        .iter()
        .map(|p| json!({"entity": {"reference": format!("Patient/{p}")}}))
        .collect();
    let group = created_id(&s.post(
        "/Group",
        &json!({"resourceType": "Group", "type": "person", "actual": true, "member": members}),
    ));
    Population {
        patients,
        observations,
        practitioner,
        group,
    }
}

/// Polls until the manifest (or an error) comes back.
fn wait(s: &TestServer, status: &str) -> Reply {
    for _ in 0..300 {
        let r = s.get(status);
        if r.status != 202 {
            return r;
        }
        assert!(r.header("x-progress").is_some());
        assert!(r.header("retry-after").is_some());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("export did not finish");
}

/// Downloads every output of a manifest: resources by type, and (type, id) → resource.
fn download(s: &TestServer, manifest: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for o in manifest["output"].as_array().unwrap() {
        let url = o["url"].as_str().unwrap();
        let r = Reply::from(s.client.get(url).send().unwrap());
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
        let text = r.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, o["count"].as_u64().unwrap());
        for line in lines {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["resourceType"], o["type"]);
            let key = (
                v["resourceType"].as_str().unwrap().to_string(),
                v["id"].as_str().unwrap().to_string(),
            );
            assert!(out.insert(key, v).is_none(), "a resource exported twice");
        }
    }
    out
}

fn ids_of(exported: &BTreeMap<(String, String), Value>, t: &str) -> BTreeSet<String> {
    exported
        .keys()
        .filter(|(rt, _)| rt == t)
        .map(|(_, id)| id.clone())
        .collect()
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

fn levels_types_and_filters(db: Db) {
    let s = TestServer::start_with(db, layer(5));
    let pop = populate(&s, 6);
    let audit_before = s.db.count("SELECT COUNT(*) AS n FROM audit_events");

    // system level, three types, files of at most 5 resources
    let status = common::export_kick_off(
        &s,
        "/$export?_type=Patient,Observation,Practitioner&_outputFormat=application/fhir+ndjson",
    );
    let r = wait(&s, &status);
    assert_eq!(r.status, 200, "{}", r.text());
    let manifest = r.json();
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].as_str().is_some());
    assert!(manifest["request"]
        .as_str()
        .unwrap()
        .ends_with("_outputFormat=application/fhir+ndjson"));
    assert!(
        manifest["output"].as_array().unwrap().len() >= 4,
        "split into files of 5"
    );
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients));
    assert_eq!(ids_of(&exported, "Observation"), set(&pop.observations));
    assert_eq!(
        ids_of(&exported, "Practitioner"),
        set(std::slice::from_ref(&pop.practitioner))
    );
    // each line is the resource as stored: the same as a read of it
    for ((t, id), v) in &exported {
        assert_eq!(&s.get(&format!("/{t}/{id}")).json(), v);
    }
    // the kick-off, each poll and each download were audited (at least one event each)
    s.auditor.flush_blocking().unwrap();
    let audit_after = s.db.count("SELECT COUNT(*) AS n FROM audit_events");
    assert!(audit_after - audit_before >= 1 + 1 + manifest["output"].as_array().unwrap().len() as i64);

    // Patient level: the compartment types, so no Practitioner
    let manifest = wait(&s, &common::export_kick_off(&s, "/Patient/$export")).json();
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients));
    assert_eq!(ids_of(&exported, "Observation"), set(&pop.observations));
    assert!(ids_of(&exported, "Practitioner").is_empty());
    // a Group with members lies in each member's compartment
    assert_eq!(ids_of(&exported, "Group"), set(std::slice::from_ref(&pop.group)));

    // Group level: its three members and their observations only
    let manifest = wait(
        &s,
        &common::export_kick_off(&s, &format!("/Group/{}/$export?_type=Patient,Observation", pop.group)),
    )
    .json();
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients[..3]));
    assert_eq!(ids_of(&exported, "Observation").len(), 6);
    for o in exported.values().filter(|v| v["resourceType"] == "Observation") {
        let subject = o["subject"]["reference"].as_str().unwrap();
        assert!(pop.patients[..3].iter().any(|p| subject == format!("Patient/{p}")));
    }
    assert_eq!(s.get_with("/Group/nope/$export", &[ASYNC, FHIR_JSON]).status, 404);

    // _typeFilter: only the observations with code 1234-5 (and every patient)
    let manifest = wait(
        &s,
        &common::export_kick_off(
            &s,
            "/$export?_type=Patient,Observation&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C1234-5",
        ),
    )
    .json();
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient").len(), 6);
    assert_eq!(ids_of(&exported, "Observation").len(), 6);
    assert!(exported
        .values()
        .filter(|v| v["resourceType"] == "Observation")
        .all(|o| o["code"]["coding"][0]["code"] == "1234-5"));
    // two alternatives for one type: their union, each resource once (pages of 5 merged)
    let manifest = wait(
        &s,
        &common::export_kick_off(
            &s,
            "/$export?_type=Observation&_typeFilter=Observation%3Fcode%3D1234-5,Observation%3Fcode%3D9999-9",
        ),
    )
    .json();
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Observation"), set(&pop.observations));
    let manifest = wait(
        &s,
        &common::export_kick_off(
            &s,
            "/$export?_type=Observation&_typeFilter=Observation%3Fcode%3D1234-5&_typeFilter=Observation%3Fcode%3D1234-5,Observation%3Fstatus%3Dfinal",
        ),
    )
    .json();
    assert_eq!(ids_of(&download(&s, &manifest), "Observation"), set(&pop.observations));
    // a filter on an identifying parameter (blind index, then re-checked on the decrypted resource)
    let manifest = wait(
        &s,
        &common::export_kick_off(
            &s,
            "/$export?_type=Patient&_typeFilter=Patient%3Ffamily%3Aexact%3DExportfam2",
        ),
    )
    .json();
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients[2..3]));

    // _since: only what changed after it
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut p0 = s.get(&format!("/Patient/{}", pop.patients[0])).json();
    p0["gender"] = json!("other");
    assert_eq!(s.put(&format!("/Patient/{}", pop.patients[0]), &p0).status, 200);
    let manifest = wait(
        &s,
        &common::export_kick_off(
            &s,
            &format!(
                "/$export?_type=Patient,Observation&_since={}",
                since.replace('+', "%2B")
            ),
        ),
    )
    .json();
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients[..1]));
    assert!(ids_of(&exported, "Observation").is_empty());
    assert_eq!(exported.values().next().unwrap()["gender"], "other");
}

fn refusals_and_ownership(db: Db) {
    let s = TestServer::start_with(db, layer(1000));
    let pop = populate(&s, 3);
    // no Prefer: respond-async
    let r = s.get("/$export");
    assert_eq!(r.status, 400);
    r.outcome();
    // no Accept (sent by hand: the HTTP client adds `*/*`), or one without FHIR JSON: refused,
    // naming the header
    let raw = {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(s.addr).unwrap();
        let path = s.url("/$export");
        let path = path.split_once(&s.addr.to_string()).unwrap().1;
        let token = s.token("system/*.rs", None);
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nPrefer: respond-async\r\n\
             Connection: close\r\n\r\n",
            s.addr
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("Accept"), "{raw}");
    assert_eq!(s.get_with("/$export", &[ASYNC, ("accept", "text/html")]).status, 400);
    assert_eq!(
        s.get_with("/$export", &[ASYNC, ("accept", "text/html, */*;q=0.1")])
            .status,
        202
    );
    // unsupported format and parameters
    assert_eq!(
        s.get_with("/$export?_outputFormat=text/csv", &[ASYNC, FHIR_JSON])
            .status,
        400
    );
    assert_eq!(
        s.get_with("/$export?_elements=no.such.thing", &[ASYNC, FHIR_JSON])
            .status,
        400
    );
    assert_eq!(
        s.get_with(
            "/$export?includeAssociatedData=http://example.org/custom-associated",
            &[ASYNC, FHIR_JSON]
        )
        .status,
        400
    );
    assert_eq!(s.get_with("/$export?_since=yesterday", &[ASYNC, FHIR_JSON]).status, 400);
    // in the future: refused, naming the parameter
    let r = s.get_with("/$export?_since=2999-01-01T00:00:00Z", &[ASYNC, FHIR_JSON]);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("_since"));
    assert_eq!(
        s.get_with("/$export?_typeFilter=Observation%3Fnope%3D1", &[ASYNC, FHIR_JSON])
            .status,
        400
    );
    assert_eq!(
        s.get_with("/Patient/$export?_type=Bundle", &[ASYNC, FHIR_JSON]).status,
        400
    );
    // a token limited to one patient, or without a scope for a listed type: 403
    let patient_token = s.token("patient/*.rs", Some(&pop.patients[0]));
    let obs_only = s.token("system/Observation.rs", None);
    let as_other = |token: &str, path: &str| {
        Reply::from(
            reqwest::blocking::Client::new()
                .get(s.url(path))
                .bearer_auth(token)
                .header("prefer", "respond-async")
                .header("accept", "application/fhir+json")
                .send()
                .unwrap(),
        )
    };
    assert_eq!(as_other(&patient_token, "/Patient/$export").status, 403);
    assert_eq!(as_other(&obs_only, "/$export?_type=Patient").status, 403);
    // without _type, a token exports the types it may read: here only Observation
    let r = as_other(&obs_only, "/$export");
    assert_eq!(r.status, 202);
    let status = common::status_path(&s, &r);
    let done = || {
        for _ in 0..300 {
            let r = as_other(&obs_only, &status);
            if r.status != 202 {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("export did not finish");
    };
    let manifest = done().json();
    let types: BTreeSet<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, BTreeSet::from(["Observation"]));
    // another client cannot poll it or download its files, whatever its scopes
    let other_client = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/*.rs".into(),
            client_id: Some("another-client".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let file = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .strip_prefix(&s.base)
        .unwrap()
        .to_string();
    assert_eq!(as_other(&other_client, &status).status, 404);
    assert_eq!(as_other(&other_client, &file).status, 404);
    // the same client with a token that no longer grants the file's type: refused
    let patients_only = s.token("system/Patient.rs", None);
    assert_eq!(as_other(&patients_only, &file).status, 403);
    assert_eq!(as_other(&obs_only, &file).status, 200);
    assert_eq!(s.get("/$export-status/00000000000000000000000000000000").status, 404);
    assert_eq!(s.get("/$export-status/not-a-job").status, 404);

    // the files at rest hold no plaintext: no family name, no resource JSON
    let status = common::export_kick_off(&s, "/$export?_type=Patient");
    let manifest = wait(&s, &status).json();
    assert_eq!(download(&s, &manifest).len(), 3);
    let job = status.rsplit('/').next().unwrap();
    let dir = s.config.data_dir.join("exports").join(job);
    let mut bytes = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        bytes.extend(std::fs::read(e.unwrap().path()).unwrap());
    }
    assert!(!bytes.is_empty());
    for needle in [&b"Exportfam"[..], b"resourceType"] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }

    // cancel: the job and its files are gone
    let r = s.delete(&status);
    assert_eq!(r.status, 202, "{}", r.text());
    // later polls: 404 with an OperationOutcome
    let gone = s.get(&status);
    assert_eq!(gone.status, 404);
    assert_eq!(gone.outcome()["resourceType"], "OperationOutcome");
    assert!(!dir.exists());
    assert_eq!(s.delete(&status).status, 404);
}

/// A node stops after writing the first file; another claims the job once the lease has run
/// out and finishes it: every resource exactly once.
fn resumes_after_a_stop(db: Db) {
    let s = TestServer::start_with(
        db,
        ConfigLayer {
            export_workers: Some(0),
            ..layer(4)
        },
    );
    let pop = populate(&s, 5);
    let status = common::export_kick_off(&s, "/$export?_type=Patient,Observation");
    // no runner on this node: the job waits
    let r = s.get(&status);
    assert_eq!(r.status, 202);
    assert_eq!(r.header("x-progress"), Some("queued"));
    let node = || common::exporter(&s);
    // the first node claims the job, writes one file, and stops (no more progress)
    let first = node();
    let lease = chrono::Utc::now().naive_utc() + chrono::Duration::seconds(1);
    let job = s.store.claim_export_job(lease).unwrap().expect("a waiting job");
    let req = first.open_request(&job).unwrap();
    let file = first.write_next_file(&job, &req).unwrap().unwrap();
    assert_eq!(
        (file.seq, file.resource_type.as_str(), file.resource_count),
        (1, "Observation", 4)
    );
    drop(first);
    let r = s.get(&status);
    assert_eq!(r.header("x-progress"), Some("4 resources exported"));
    // while the lease holds, nobody else takes the job
    let second = node();
    let lease = chrono::Utc::now().naive_utc() + chrono::Duration::seconds(30);
    assert!(s.store.claim_export_job(lease).unwrap().is_none());
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert!(second.run_next_job().unwrap(), "the abandoned job is claimed again");
    let manifest = wait(&s, &status).json();
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(outputs[0]["count"], 4);
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients));
    assert_eq!(ids_of(&exported, "Observation"), set(&pop.observations));

    // expiry: a job past its time is deleted with its files by the sweep
    let job_id = status.rsplit('/').next().unwrap();
    s.db.exec("UPDATE export_jobs SET expires_at = '2000-01-01 00:00:00'")
        .unwrap();
    assert_eq!(second.sweep_expired().unwrap(), 1);
    assert_eq!(s.get(&status).status, 404);
    assert!(!s.config.data_dir.join("exports").join(job_id).exists());
}

on_both_backends!(
    levels_types_and_filters,
    refusals_and_ownership,
    resumes_after_a_stop,
    post_kick_offs_and_patient_lists,
    elements_and_lenient_handling,
    associated_provenance
);

/// `includeAssociatedData`: the Provenance of the exported resources (all of it, or the last
/// recorded per resource), whatever compartment it lies in, never that of a resource the
/// export leaves out, and none twice when Provenance is an exported type as well.
fn associated_provenance(db: Db) {
    let s = TestServer::start_with(db, layer(2));
    let pop = populate(&s, 4);
    // the group's first patient: one observation made preliminary (a _typeFilter leaves it out)
    let left_out = &pop.observations[1];
    let mut obs = s.get(&format!("/Observation/{left_out}")).json();
    obs["status"] = json!("preliminary");
    assert_eq!(s.put(&format!("/Observation/{left_out}"), &obs).status, 200);
    let provenance = |targets: &[String], recorded: &str| {
        created_id(&s.post(
            "/Provenance",
            &json!({"resourceType": "Provenance", "recorded": recorded,
                    "target": targets.iter().map(|t| json!({"reference": t})).collect::<Vec<_>>(),
                    "agent": [{"who": {"reference": format!("Practitioner/{}", pop.practitioner)}}]}),
        ))
    };
    let o = |i: usize| format!("Observation/{}", pop.observations[i]);
    let older = provenance(&[o(0)], "2020-01-01T00:00:00Z");
    // later, in another time zone, versioned and absolute references
    let newer = provenance(
        &[format!("{}/_history/1", o(0)), format!("{}/{}", s.base, o(2))],
        "2021-01-01T02:00:00+02:00",
    );
    let of_left_out = provenance(&[o(1)], "2022-01-01T00:00:00Z");
    let of_patient = provenance(&[format!("Patient/{}", pop.patients[0])], "2022-01-01T00:00:00Z");
    // the fourth patient is not in the group
    let outside_group = provenance(&[o(6)], "2022-01-01T00:00:00Z");
    let filter = "_typeFilter=Observation%3Fstatus%3Dfinal";
    let exported = |path: &str| download(&s, &wait(&s, &common::export_kick_off(&s, path)).json());

    let all = exported(&format!(
        "/$export?_type=Observation&{filter}&includeAssociatedData=RelevantProvenanceResources"
    ));
    assert_eq!(ids_of(&all, "Observation").len(), 7);
    assert_eq!(
        ids_of(&all, "Provenance"),
        set(&[older.clone(), newer.clone(), outside_group.clone()])
    );
    // the last recorded of each observation's: the newer for the first, the one of the third
    // (the same), the only one of the seventh
    let latest = exported(&format!(
        "/$export?_type=Observation&{filter}&includeAssociatedData=LatestProvenanceResources"
    ));
    assert_eq!(
        ids_of(&latest, "Provenance"),
        set(&[newer.clone(), outside_group.clone()])
    );
    // Group level: only the members' resources, and so only their Provenance
    let group = exported(&format!(
        "/Group/{}/$export?_type=Observation,Patient&includeAssociatedData=RelevantProvenanceResources",
        pop.group
    ));
    assert_eq!(
        ids_of(&group, "Provenance"),
        set(&[older.clone(), newer.clone(), of_left_out.clone(), of_patient.clone()])
    );
    // Provenance as a type too: each written once (`download` asserts it), what the type
    // selects and what is associated
    let both = exported("/$export?_type=Observation,Provenance&includeAssociatedData=LatestProvenanceResources");
    assert_eq!(
        ids_of(&both, "Provenance"),
        set(&[older, newer, of_left_out, of_patient, outside_group])
    );
    // POST, with both values: the broader wins
    let r = s.send(
        "POST",
        "/$export",
        Some(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Patient"},
            {"name": "includeAssociatedData", "valueCode": "LatestProvenanceResources"},
            {"name": "includeAssociatedData", "valueCode": "RelevantProvenanceResources"}]})),
        &[ASYNC, FHIR_JSON],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let posted = download(&s, &wait(&s, &common::status_path(&s, &r)).json());
    assert_eq!(ids_of(&posted, "Provenance").len(), 1);
    // a token that does not read Provenance: refused, or (lenient) exported without it
    let token = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/Observation.rs".into(),
            client_id: Some("observations-only".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let kick_off = |prefer: &str| {
        Reply::from(
            reqwest::blocking::Client::new()
                .get(format!(
                    "{}/$export?_type=Observation&includeAssociatedData=RelevantProvenanceResources",
                    s.base
                ))
                .bearer_auth(&token)
                .header("prefer", prefer)
                .header("accept", "application/fhir+json")
                .send()
                .unwrap(),
        )
    };
    assert_eq!(kick_off("respond-async").status, 403);
    assert_eq!(kick_off("respond-async, handling=lenient").status, 202);
}

/// `_elements` keeps the listed and mandatory elements (SUBSETTED); under
/// `Prefer: handling=lenient` what is not supported is left out and reported in the manifest's
/// error file, by name.
fn elements_and_lenient_handling(db: Db) {
    let s = TestServer::start_with(db, layer(1000));
    let pop = populate(&s, 3);
    let status = common::export_kick_off(&s, "/$export?_type=Patient,Observation&_elements=Patient.gender,status");
    let manifest = wait(&s, &status).json();
    assert_eq!(manifest["error"], json!([]));
    let exported = download(&s, &manifest);
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients));
    for v in exported.values() {
        assert!(v.get("name").is_none() && v.get("subject").is_none(), "{v}");
        assert!(v["meta"]["tag"].to_string().contains("SUBSETTED"), "{v}");
        if v["resourceType"] == "Patient" {
            assert_eq!(v["gender"], "female");
        } else {
            // status as listed, code because Observation requires it
            assert_eq!(v["status"], "final");
            assert!(v.get("code").is_some());
        }
    }
    // lenient: an unsupported parameter, associated data and a filter it cannot apply are
    // left out and reported; the export runs without them
    let lenient = ("prefer", "respond-async, handling=lenient");
    let r = s.get_with(
        "/$export?_type=Observation&includeAssociatedData=CustomAssociated&_nonsense=Secretvalue\
         &_typeFilter=Observation%3Fnope%3D1",
        &[lenient, FHIR_JSON],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let manifest = wait(&s, &common::status_path(&s, &r)).json();
    assert_eq!(ids_of(&download(&s, &manifest), "Observation"), set(&pop.observations));
    let errors = manifest["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{manifest}");
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let r = Reply::from(s.client.get(errors[0]["url"].as_str().unwrap()).send().unwrap());
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
    let text = r.text();
    let outcomes: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(outcomes.len(), 3, "{text}");
    assert!(outcomes.iter().all(|o| o["resourceType"] == "OperationOutcome"));
    for name in ["includeAssociatedData", "_nonsense", "_typeFilter"] {
        assert!(text.contains(name), "{name}: {text}");
    }
    assert!(!text.contains("Secretvalue"), "a value in the error file");
    // another client cannot read it
    let other = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/*.rs".into(),
            client_id: Some("another-client".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let r = Reply::from(
        reqwest::blocking::Client::new()
            .get(errors[0]["url"].as_str().unwrap())
            .bearer_auth(other)
            .send()
            .unwrap(),
    );
    assert_eq!(r.status, 404);
}

/// Bulk Data 2.0 kick-offs by POST with a Parameters body, the `patient` list at Patient and
/// Group level, several `_type` parameters combined, and a Group without patients.
fn post_kick_offs_and_patient_lists(db: Db) {
    let s = TestServer::start_with(db, layer(1000));
    let pop = populate(&s, 5);
    let post = |path: &str, params: Value| {
        s.send(
            "POST",
            path,
            Some(&json!({"resourceType": "Parameters", "parameter": params})),
            &[ASYNC, FHIR_JSON],
        )
    };
    let exported_by = |r: Reply| {
        assert_eq!(r.status, 202, "{}", r.text());
        download(&s, &wait(&s, &common::status_path(&s, &r)).json())
    };
    let reference = |p: &str| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{p}")}});
    let (p0, p1, p4) = (&pop.patients[0], &pop.patients[1], &pop.patients[4]);
    // Patient level: two patients, their observations, nobody else's
    let exported = exported_by(post(
        "/Patient/$export",
        json!([{"name": "_type", "valueString": "Patient,Observation"}, reference(p0), reference(p4)]),
    ));
    assert_eq!(ids_of(&exported, "Patient"), set(&[p0.clone(), p4.clone()]));
    assert_eq!(ids_of(&exported, "Observation").len(), 4);
    // with a _typeFilter in the body too
    let exported = exported_by(post(
        "/Patient/$export",
        json!([{"name": "_type", "valueString": "Observation"},
               {"name": "_typeFilter", "valueString": "Observation?code=http://loinc.org|1234-5"},
               reference(p0)]),
    ));
    assert_eq!(ids_of(&exported, "Observation").len(), 1);
    // Group level: a member; one who is not is refused
    let group = format!("/Group/{}/$export", pop.group);
    let exported = exported_by(post(
        &group,
        json!([{"name": "_type", "valueString": "Patient"}, reference(p1)]),
    ));
    assert_eq!(ids_of(&exported, "Patient"), set(std::slice::from_ref(p1)));
    let r = post(&group, json!([reference(p4)]));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("patient"));
    // refused: a patient at system level, a patient the server does not hold, a body that is
    // not Parameters
    assert_eq!(post("/$export", json!([reference(p0)])).status, 400);
    assert_eq!(post("/Patient/$export", json!([reference("nobody")])).status, 400);
    let r = s.send(
        "POST",
        "/$export",
        Some(&json!({"resourceType": "Patient"})),
        &[ASYNC, FHIR_JSON],
    );
    assert_eq!(r.status, 400);
    // the same list by GET
    let exported = exported_by(s.get_with(
        &format!("/Patient/$export?_type=Patient&patient=Patient/{p0},Patient/{p1}"),
        &[ASYNC, FHIR_JSON],
    ));
    assert_eq!(ids_of(&exported, "Patient"), set(&[p0.clone(), p1.clone()]));
    // several _type parameters and comma lists combine
    let exported = exported_by(s.get_with(
        "/$export?_type=Patient&_type=Observation,Practitioner",
        &[ASYNC, FHIR_JSON],
    ));
    assert_eq!(ids_of(&exported, "Patient").len(), 5);
    assert_eq!(ids_of(&exported, "Observation").len(), 10);
    assert_eq!(
        ids_of(&exported, "Practitioner"),
        set(std::slice::from_ref(&pop.practitioner))
    );
    // Patient and Group level: _type may name a shared type (in no patient's compartment),
    // exported as a patient-context token reads it
    let exported = exported_by(s.get_with(
        &format!("/Group/{}/$export?_type=Patient,Practitioner", pop.group),
        &[ASYNC, FHIR_JSON],
    ));
    assert_eq!(ids_of(&exported, "Patient"), set(&pop.patients[..3]));
    assert_eq!(
        ids_of(&exported, "Practitioner"),
        set(std::slice::from_ref(&pop.practitioner))
    );
    // a Group without patient members exports no patient's data
    let empty = created_id(&s.post(
        "/Group",
        &json!({"resourceType": "Group", "type": "person", "actual": true}),
    ));
    let exported = exported_by(s.get_with(
        &format!("/Group/{empty}/$export?_type=Patient,Observation"),
        &[ASYNC, FHIR_JSON],
    ));
    assert!(exported.is_empty(), "{exported:?}");
}
