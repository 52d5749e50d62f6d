//! Search over the index tables, black-box over HTTP on both backends: string, token, date,
//! reference, quantity and `_id` parameters, OR within a parameter and AND across them,
//! paging, refusals of what is not supported, patient-context limits, and the audit record.

mod common;

use common::{Db, TestServer};
use serde_json::{json, Value};

fn ids(s: &TestServer, query: &str) -> Vec<String> {
    let r = s.get(query);
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    let mut out: Vec<String> = r.json()["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

fn put(s: &TestServer, path: &str, body: Value) {
    let r = s.put(path, &body);
    assert!(r.status == 201 || r.status == 200, "{path}: {}", r.text());
}

on_both_backends!(search_by_parameter_type);

fn search_by_parameter_type(db: Db) {
    let s = TestServer::start(db);
    put(
        &s,
        "/Patient/a",
        json!({"resourceType": "Patient", "id": "a", "name": [{"family": "Smith", "given": ["John"]}],
               "birthDate": "1980-05-01", "gender": "male",
               "identifier": [{"system": "urn:mrn", "value": "A1"}]}),
    );
    put(
        &s,
        "/Patient/b",
        json!({"resourceType": "Patient", "id": "b", "name": [{"family": "Smyth", "given": ["Jane"]}],
               "birthDate": "1990-01-01", "gender": "female"}),
    );
    put(
        &s,
        "/Observation/oa",
        json!({"resourceType": "Observation", "id": "oa", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
               "subject": {"reference": "Patient/a"}, "effectiveDateTime": "2024-05-06T07:08:09Z",
               "valueQuantity": {"value": 70, "system": "http://unitsofmeasure.org", "code": "kg"}}),
    );
    put(
        &s,
        "/Observation/ob",
        json!({"resourceType": "Observation", "id": "ob", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
               "subject": {"reference": "Patient/b"}, "effectiveDateTime": "2023-01-02"}),
    );
    let a = vec!["a".to_string()];
    let b = vec!["b".to_string()];
    let both = vec!["a".to_string(), "b".to_string()];
    // strings: case- and accent-insensitive prefixes; names are identifying (blind indexes)
    assert_eq!(ids(&s, "/Patient?family=smi"), a);
    assert_eq!(ids(&s, "/Patient?family=SM"), both);
    assert_eq!(ids(&s, "/Patient?name=john"), a);
    assert_eq!(
        ids(&s, "/Patient?family=smithsonianlong"),
        Vec::<String>::new(),
        "re-checked past the prefix bound"
    );
    assert_eq!(ids(&s, "/Patient?family=smi,smy"), both, "OR within a parameter");
    assert_eq!(ids(&s, "/Patient?family=sm&gender=male"), a, "AND across parameters");
    // tokens
    assert_eq!(ids(&s, "/Patient?gender=female"), b);
    assert_eq!(ids(&s, "/Patient?identifier=urn:mrn|A1"), a);
    assert_eq!(ids(&s, "/Patient?identifier=A1"), a);
    assert_eq!(
        ids(&s, "/Observation?code=http://loinc.org|29463-7"),
        vec!["oa".to_string()]
    );
    assert_eq!(ids(&s, "/Observation?code=8867-4"), vec!["ob".to_string()]);
    assert_eq!(ids(&s, "/Observation?code=http://other|8867-4"), Vec::<String>::new());
    assert_eq!(ids(&s, "/Patient?_id=b"), b);
    assert_eq!(ids(&s, "/Patient?gender:not=male"), b);
    assert_eq!(ids(&s, "/Observation?code:not=8867-4,29463-7"), Vec::<String>::new());
    assert_eq!(ids(&s, "/Patient?identifier:not=A1"), b, "also on blind-indexed tokens");
    // dates (birth dates are identifying: year in the index, re-checked after decryption)
    assert_eq!(ids(&s, "/Patient?birthdate=1980"), a);
    assert_eq!(ids(&s, "/Patient?birthdate=ge1985"), b);
    assert_eq!(ids(&s, "/Patient?birthdate=lt1985-01-01"), a);
    assert_eq!(ids(&s, "/Patient?birthdate=1980-05-02"), Vec::<String>::new());
    assert_eq!(ids(&s, "/Observation?date=2024-05"), vec!["oa".to_string()]);
    assert_eq!(ids(&s, "/Observation?date=lt2024"), vec!["ob".to_string()]);
    // references and quantities
    assert_eq!(ids(&s, "/Observation?subject=Patient/a"), vec!["oa".to_string()]);
    assert_eq!(ids(&s, "/Observation?patient=b"), vec!["ob".to_string()]);
    assert_eq!(ids(&s, "/Observation?value-quantity=gt60||kg"), vec!["oa".to_string()]);
    assert_eq!(ids(&s, "/Observation?value-quantity=lt60"), Vec::<String>::new());
    assert_eq!(
        ids(&s, "/Observation?value-quantity:missing=true"),
        vec!["ob".to_string()]
    );
    // paging with opaque, subject-bound links
    let first = s.get("/Patient?_count=1").json();
    assert_eq!(first["total"], 2);
    assert_eq!(first["entry"].as_array().unwrap().len(), 1);
    let next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let second: Value = s.client.get(&next).send().unwrap().json().unwrap();
    assert_eq!(second["entry"].as_array().unwrap().len(), 1);
    assert_ne!(
        second["entry"][0]["resource"]["id"],
        first["entry"][0]["resource"]["id"]
    );
    // chains and reverse chains
    assert_eq!(
        ids(&s, "/Observation?subject:Patient.gender=male"),
        vec!["oa".to_string()]
    );
    assert_eq!(ids(&s, "/Observation?patient.family=smy"), vec!["ob".to_string()]);
    assert_eq!(ids(&s, "/Patient?_has:Observation:patient:code=8867-4"), b);
    assert_eq!(
        ids(&s, "/Patient?_has:Observation:subject:value-quantity=gt60"),
        a,
        "reverse chain on a quantity"
    );
    // a token that may search Patient but not Observation cannot search through Observations
    let only_patients = s.token("system/Patient.rs", None);
    let r = s.get_with(
        "/Patient?_has:Observation:patient:code=8867-4",
        &[("authorization", &format!("Bearer {only_patients}"))],
    );
    assert_eq!(r.status, 403);
    // a patient-context token's chains reach only its own compartment
    let pa = format!("Bearer {}", s.token("patient/*.rs", Some("a")));
    let r = s.get_with(
        "/Patient?_has:Observation:patient:code=8867-4",
        &[("authorization", &pa)],
    );
    assert_eq!(r.status, 200);
    assert!(
        r.json()["entry"].is_null(),
        "b's observation is outside a's compartment"
    );
    // _include and _revinclude, authorized per resource
    put(
        &s,
        "/Practitioner/dr",
        json!({"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Who"}]}),
    );
    let mut pa_body = s.get("/Patient/a").json();
    pa_body["generalPractitioner"] = json!([{"reference": "Practitioner/dr"}]);
    put(&s, "/Patient/a", pa_body);
    let modes = |q: &str, auth: Option<&str>| -> Vec<(String, String)> {
        let r = match auth {
            Some(a) => s.get_with(q, &[("authorization", a)]),
            None => s.get(q),
        };
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        let mut out: Vec<(String, String)> = r.json()["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                (
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap(),
                        e["resource"]["id"].as_str().unwrap()
                    ),
                    e["search"]["mode"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let m = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        out.sort();
        out
    };
    assert_eq!(
        modes("/Observation?_id=oa&_include=Observation:subject", None),
        m(&[("Observation/oa", "match"), ("Patient/a", "include")])
    );
    assert_eq!(
        modes("/Observation?_id=oa&_include=*", None),
        m(&[("Observation/oa", "match"), ("Patient/a", "include")])
    );
    assert_eq!(
        modes("/Patient?_id=a&_revinclude=Observation:subject", None),
        m(&[("Patient/a", "match"), ("Observation/oa", "include")])
    );
    assert_eq!(
        modes(
            "/Observation?_id=oa&_include=Observation:subject&_include:iterate=Patient:general-practitioner",
            None
        ),
        m(&[
            ("Observation/oa", "match"),
            ("Patient/a", "include"),
            ("Practitioner/dr", "include")
        ])
    );
    // a token that may not read Patients gets no Patients through _include
    let obs_only = format!("Bearer {}", s.token("system/Observation.rs", None));
    assert_eq!(
        modes("/Observation?_id=oa&_include=Observation:subject", Some(&obs_only)),
        m(&[("Observation/oa", "match")])
    );
    // nor does a patient token get another patient's resources
    let pb = format!("Bearer {}", s.token("patient/*.rs", Some("b")));
    assert_eq!(
        modes("/Patient?_revinclude=Observation:subject", Some(&pb)),
        m(&[("Patient/b", "match"), ("Observation/ob", "include")])
    );
    assert_eq!(s.get("/Patient?_include=Patient:nonsense").status, 400);
    // uri :below / :above (on Observation's instantiates… has no uri; ValueSet.url has)
    put(
        &s,
        "/ValueSet/vs",
        json!({"resourceType": "ValueSet", "id": "vs", "status": "active", "url": "http://example.org/fhir/ValueSet/vs"}),
    );
    assert_eq!(
        ids(&s, "/ValueSet?url:below=http://example.org/fhir"),
        vec!["vs".to_string()]
    );
    assert_eq!(
        ids(&s, "/ValueSet?url:above=http://example.org/fhir/ValueSet/vs/extra"),
        vec!["vs".to_string()]
    );
    assert_eq!(ids(&s, "/ValueSet?url:below=http://other.org"), Vec::<String>::new());
    assert_eq!(
        ids(&s, "/ValueSet?url=http://example.org/fhir/ValueSet/vs"),
        vec!["vs".to_string()]
    );
    // compartment search
    assert_eq!(ids(&s, "/Patient/a/Observation"), vec!["oa".to_string()]);
    assert_eq!(ids(&s, "/Patient/b/Observation?code=29463-7"), Vec::<String>::new());
    let r = s.get_with("/Patient/b/Observation", &[("authorization", &pa)]);
    assert_eq!(r.status, 200);
    assert!(r.json()["entry"].is_null(), "a's token sees nothing in b's compartment");
    // result control: _summary=count, _total=none, _elements
    let counted = s.get("/Patient?_summary=count").json();
    assert_eq!(counted["total"], 2);
    assert!(counted["entry"].is_null());
    assert!(s.get("/Patient?_total=none").json()["total"].is_null());
    let slim = s.get("/Patient?_id=a&_elements=gender").json();
    let r0 = &slim["entry"][0]["resource"];
    assert_eq!(r0["gender"], "male");
    assert!(r0["name"].is_null() && r0["birthDate"].is_null());
    assert!(r0["meta"]["tag"].to_string().contains("SUBSETTED"));
    assert_eq!(s.get("/Patient?_summary=text").status, 400);
    // POST _search with a form body: the same results, the values out of the URL
    let r = s
        .client
        .post(s.url("/Patient/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=smi&gender=male")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["total"], 1);
    assert_eq!(body["entry"][0]["resource"]["id"], "a");
    // unknown parameters: ignored and reported (lenient, the default), or 400 when strict
    let lenient = s.get("/Patient?nonsense=1");
    assert_eq!(lenient.status, 200);
    let lenient = lenient.json();
    assert_eq!(lenient["total"], 2, "the unknown filter was left out");
    let outcome = lenient["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    assert!(outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("nonsense"));
    assert_eq!(
        s.get_with("/Patient?nonsense=1", &[("prefer", "handling=strict")])
            .status,
        400
    );
    assert_eq!(
        s.get_with("/Observation?subject.nonsense=1", &[("prefer", "handling=strict")])
            .status,
        400
    );
    // what is known but not supported yet is refused, never ignored
    for q in [
        "/Observation?subject:Patient.name=smithsonianlong",
        "/Patient?birthdate=ap1980",
        "/Patient?family:contains=mit",
    ] {
        let r = s.get(q);
        assert_eq!(r.status, 400, "{q}: {}", r.text());
    }
    // a patient-context token finds only its own compartment, totals included
    let t = s.token("patient/*.rs", Some("a"));
    let r = s.get_with("/Observation", &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(r.status, 200);
    let bundle = r.json();
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], "oa");
    // the search is audited with the patients whose data it returned
    let events = s.get("/AuditEvent?subtype=search-type&patient=Patient/b").json();
    assert!(events["entry"].as_array().is_some_and(|e| !e.is_empty()));
    // the CapabilityStatement lists search and the parameters it answers
    let cs = s.get("/metadata").json();
    let patient = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap()
        .clone();
    assert!(patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["code"] == "search-type"));
    assert!(patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "birthdate"));
}
