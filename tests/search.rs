//! Search over the index tables, black-box over HTTP on both backends: string, token, date,
//! reference, quantity, composite and `_id` parameters with their modifiers, OR within a
//! parameter and AND across them, sorting, paging (next and previous, no query values in any
//! link), system search, `_summary`, refusals of what is not supported, patient-context
//! limits, and the audit record.

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
    assert_eq!(
        modes("/Patient?_id=a&_revinclude=*", None),
        m(&[("Patient/a", "match"), ("Observation/oa", "include")])
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
    assert_eq!(s.get("/Patient?_summary=everything").status, 400);
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
    // a known parameter with a value that cannot be read is refused, lenient or not: leaving
    // it out would widen the result to everything the token may see. The outcome names the
    // parameter, never the value.
    for (q, param) in [
        ("/Observation?date=garbage-date-text", "date"),
        ("/Observation?date=xx2020-01-01", "date"),
        ("/Observation?value-quantity=heavy", "value-quantity"),
        ("/Patient?birthdate=notadate", "birthdate"),
        ("/Observation?_sort=nonexistent", "_sort"),
    ] {
        for prefer in ["handling=lenient", "handling=strict"] {
            let r = s.get_with(q, &[("prefer", prefer)]);
            assert_eq!(r.status, 400, "{q} ({prefer}): {}", r.text());
            let text = r.outcome()["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(text.contains(param), "{q}: {text}");
            for echoed in ["garbage", "heavy", "notadate", "xx2020", "nonexistent"] {
                assert!(!text.contains(echoed), "{q}: the value is echoed: {text}");
            }
        }
    }
    // an empty value asks for nothing: left out and reported under lenient handling
    assert_eq!(s.get("/Patient?gender=").status, 200);
    for q in [
        "/Patient?_count=many",
        "/Patient?_include=Nothing:here",
        "/Patient?_total=maybe",
    ] {
        assert_eq!(s.get(q).status, 400, "{q}");
    }
    // what is known but not supported is refused, never ignored
    for q in [
        "/Patient?family:contains=mi",
        "/Observation?code:in=http://example.org/fhir/ValueSet/vs",
        "/Patient?identifier:text=mrn",
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
    let patient = common::capability_of(&cs, "Patient");
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

on_both_backends!(modifiers_sorting_and_paging);

/// Page link URLs of a searchset Bundle, by relation.
fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

fn in_order(s: &TestServer, query: &str) -> Vec<String> {
    let r = s.get(query);
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    r.json()["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

fn modifiers_sorting_and_paging(db: Db) {
    let s = TestServer::start(db);
    let mr = "http://terminology.hl7.org/CodeSystem/v2-0203";
    put(
        &s,
        "/Patient/p1",
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Smith", "given": ["Robert"]}],
               "birthDate": "1970-03-04"}),
    );
    put(
        &s,
        "/Patient/p2",
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Smyth", "given": ["Rupert"]}],
               "birthDate": "1971"}),
    );
    put(
        &s,
        "/Patient/p3",
        json!({"resourceType": "Patient", "id": "p3", "name": [{"family": "Ölund", "given": ["Zoë"]}],
               "birthDate": "1985-12-24",
               "identifier": [{"type": {"coding": [{"system": mr, "code": "MR"}]}, "system": "urn:h", "value": "12345"}]}),
    );
    put(
        &s,
        "/Organization/org",
        json!({"resourceType": "Organization", "id": "org", "name": "Acme Health"}),
    );
    put(
        &s,
        "/Observation/bp",
        json!({"resourceType": "Observation", "id": "bp", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
               "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-05-06",
               "component": [
                 {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                  "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                 {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                  "valueQuantity": {"value": 80, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]}),
    );
    put(
        &s,
        "/Observation/temp",
        json!({"resourceType": "Observation", "id": "temp", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}], "text": "Body temperature"},
               "subject": {"identifier": {"system": "urn:h", "value": "12345"}}, "effectiveDateTime": "2023-01-02",
               "valueQuantity": {"value": 100.4, "system": "http://unitsofmeasure.org", "code": "[degF]"}}),
    );
    put(
        &s,
        "/Observation/late",
        json!({"resourceType": "Observation", "id": "late", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
               "subject": {"reference": "Patient/p2"}, "effectiveDateTime": "2025-07-08",
               "valueQuantity": {"value": 100, "system": "http://unitsofmeasure.org", "code": "[degF]"}}),
    );
    let v = |ids: &[&str]| -> Vec<String> { ids.iter().map(|s| s.to_string()).collect() };
    // number precision: 100 is [99.5, 100.5), 100.0 is [99.95, 100.05); ap is ±10%
    assert_eq!(ids(&s, "/Observation?value-quantity=100"), v(&["late", "temp"]));
    assert_eq!(ids(&s, "/Observation?value-quantity=100.0"), v(&["late"]));
    assert_eq!(ids(&s, "/Observation?value-quantity=ne100.0"), v(&["temp"]));
    assert_eq!(ids(&s, "/Observation?value-quantity=ap95"), v(&["late", "temp"]));
    assert_eq!(ids(&s, "/Observation?value-quantity=ap80"), Vec::<String>::new());
    // date ap: within a tenth of the distance from now
    assert_eq!(ids(&s, "/Observation?date=ap2024-05-07"), v(&["bp"]));
    // dateTimes without seconds or zone
    assert_eq!(ids(&s, "/Observation?date=gt2025-07-07T23:59"), v(&["late"]));
    // token :text on displays and texts, prefix and case-insensitive
    assert_eq!(ids(&s, "/Observation?code:text=blood pres"), v(&["bp"]));
    assert_eq!(ids(&s, "/Observation?code:text=BODY"), v(&["temp"]));
    // :of-type on (blind) identifiers, :identifier on references
    assert_eq!(
        ids(&s, &format!("/Patient?identifier:of-type={mr}|MR|12345")),
        v(&["p3"])
    );
    assert_eq!(
        ids(&s, &format!("/Patient?identifier:of-type={mr}|XX|12345")),
        Vec::<String>::new()
    );
    assert_eq!(ids(&s, "/Observation?subject:identifier=urn:h|12345"), v(&["temp"]));
    assert_eq!(ids(&s, "/Observation?subject:identifier=12345"), v(&["temp"]));
    // strings: :exact (as written) and :contains, on plaintext and on blind parameters
    assert_eq!(ids(&s, "/Organization?name:exact=Acme Health"), v(&["org"]));
    assert_eq!(ids(&s, "/Organization?name:exact=acme health"), Vec::<String>::new());
    assert_eq!(ids(&s, "/Organization?name:contains=HEAL"), v(&["org"]));
    // :contains on blind names: three-character pieces, re-checked
    assert_eq!(ids(&s, "/Patient?family:contains=mit"), v(&["p1"]));
    assert_eq!(ids(&s, "/Patient?name:contains=UPER"), v(&["p2"]));
    assert_eq!(ids(&s, "/Patient?family:contains=lun"), v(&["p3"]), "accents folded");
    assert_eq!(ids(&s, "/Patient?family:contains=thsm"), Vec::<String>::new());
    assert_eq!(ids(&s, "/Patient?family:contains=smi,myt"), v(&["p1", "p2"]));
    assert_eq!(ids(&s, "/Patient?family:exact=Smith"), v(&["p1"]));
    assert_eq!(ids(&s, "/Patient?family:exact=smith"), Vec::<String>::new());
    assert_eq!(ids(&s, "/Patient?family=olu"), v(&["p3"]), "accents folded");
    assert_eq!(ids(&s, "/Patient?given=zoe"), v(&["p3"]));
    // phonetic: sound-alikes (Soundex), blind like the names
    assert_eq!(ids(&s, "/Patient?phonetic=Rupert"), v(&["p1", "p2"]));
    assert_eq!(ids(&s, "/Patient?phonetic=Smithe"), v(&["p1", "p2"]));
    // birth dates: blind buckets of each precision
    assert_eq!(ids(&s, "/Patient?birthdate=1970-03"), v(&["p1"]));
    assert_eq!(ids(&s, "/Patient?birthdate=1971"), v(&["p2"]));
    assert_eq!(
        ids(&s, "/Patient?birthdate=1971-01"),
        Vec::<String>::new(),
        "a year is not within a month"
    );
    assert_eq!(ids(&s, "/Patient?birthdate=1985-12-24"), v(&["p3"]));
    assert_eq!(ids(&s, "/Patient?birthdate=gt1971-06"), v(&["p2", "p3"]));
    // composites: a code and its value on the same component
    assert_eq!(
        ids(
            &s,
            "/Observation?component-code-value-quantity=http://loinc.org|8480-6$gt100"
        ),
        v(&["bp"])
    );
    assert_eq!(
        ids(&s, "/Observation?component-code-value-quantity=8462-4$gt100"),
        Vec::<String>::new(),
        "80 is the diastolic value: the pair must be on one component"
    );
    assert_eq!(
        ids(
            &s,
            "/Observation?code-value-quantity=8310-5$100.4|http://unitsofmeasure.org|[degF]"
        ),
        v(&["temp"])
    );
    assert_eq!(
        s.get("/Observation?code-value-quantity=8310-5").status,
        400,
        "lenient handling does not ignore a malformed value of a known parameter"
    );
    assert_eq!(
        s.get_with(
            "/Observation?code-value-quantity=8310-5",
            &[("prefer", "handling=strict")]
        )
        .status,
        400
    );
    // _sort on plaintext parameters (SQL), descending, and on blind ones (after decryption)
    assert_eq!(in_order(&s, "/Observation?_sort=date"), v(&["temp", "bp", "late"]));
    assert_eq!(in_order(&s, "/Observation?_sort=-date"), v(&["late", "bp", "temp"]));
    assert_eq!(in_order(&s, "/Patient?_sort=family"), v(&["p3", "p1", "p2"]));
    assert_eq!(in_order(&s, "/Patient?_sort=-birthdate"), v(&["p3", "p2", "p1"]));
    assert_eq!(
        in_order(&s, "/Observation?_sort=code,-date"),
        v(&["late", "temp", "bp"]),
        "several keys (codes compare as text: 8310-5 before 85354-9)"
    );
    // sorted pages: next and previous over a snapshot; no query value in any link
    let first = s.get("/Patient?family=sm&_sort=-family&_count=1").json();
    assert_eq!(first["total"], 2);
    assert_eq!(first["entry"][0]["resource"]["id"], "p2");
    for l in first["link"].as_array().unwrap() {
        let url = l["url"].as_str().unwrap();
        assert!(
            !url.contains("family") && !url.contains("sm&") && !url.contains("=sm"),
            "{url}"
        );
    }
    let next = link(&first, "next").unwrap();
    let second: Value = s.client.get(&next).send().unwrap().json().unwrap();
    assert_eq!(second["entry"][0]["resource"]["id"], "p1");
    assert!(link(&second, "next").is_none());
    let back: Value = s
        .client
        .get(link(&second, "previous").unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(back["entry"][0]["resource"]["id"], "p2");
    // keyset pages: previous from the second page is the first
    let first = s.get("/Observation?_count=2").json();
    let second: Value = s
        .client
        .get(link(&first, "next").unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(second["entry"].as_array().unwrap().len(), 1);
    let back: Value = s
        .client
        .get(link(&second, "previous").unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(back["entry"], first["entry"]);
    // pages are stable while data changes: a resource created meanwhile does not shift them
    put(
        &s,
        "/Observation/aaa",
        json!({"resourceType": "Observation", "id": "aaa", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "1-1"}]}}),
    );
    let again: Value = s
        .client
        .get(link(&first, "next").unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(again["entry"], second["entry"]);
    // a page token is its holder's
    let other = s
        .issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: "system/*.rs".into(),
            subject: Some("someone-else".into()),
            client_id: Some("other-client".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap();
    let other = format!("Bearer {other}");
    let stolen = s
        .client
        .get(link(&first, "next").unwrap())
        .header("authorization", other)
        .send()
        .unwrap();
    assert_eq!(stolen.status().as_u16(), 400);
    // system search across types
    assert_eq!(ids(&s, "?_type=Patient,Organization&_id=p1,org"), v(&["org", "p1"]));
    assert_eq!(s.get("?_id=p1").status, 400, "a system search names its types");
    let r = s
        .client
        .post(s.url("/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("_type=Observation&code=8310-5")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().unwrap()["total"], 2);
    // _summary: true, text, data
    let one = |q: &str| s.get(q).json()["entry"][0]["resource"].clone();
    let t = one("/Observation?_id=bp&_summary=true");
    assert!(t["component"].is_array() && t["meta"]["tag"].to_string().contains("SUBSETTED"));
    let t = one("/Observation?_id=temp&_summary=text");
    assert!(t["valueQuantity"].is_null() && t["code"].is_object() && t["status"] == "final");
    let t = one("/Observation?_id=temp&_summary=data");
    assert!(t["valueQuantity"].is_object());
    // totals of one-condition searches are counted from the index alone: deleted resources
    // have no index rows, so they are not counted
    assert_eq!(s.get("/Observation?code=8310-5").json()["total"], 2);
    assert_eq!(s.delete("/Observation/late").status, 200);
    assert_eq!(s.get("/Observation?code=8310-5").json()["total"], 1);
    assert_eq!(s.get("/Observation?code=8310-5&status=final").json()["total"], 1);
}

on_both_backends!(every_parameter_finds_the_official_example);

/// A search value that the indexed value `v` must satisfy, or `None` where the value cannot be
/// written as a search value without escaping (`,` `$` `|` `\` in it).
fn query_value(v: &fhirvault::search::IndexValue) -> Option<String> {
    use fhirvault::search::IndexValue as V;
    let plain = |s: &str| (!s.contains([',', '$', '|', '\\']) && !s.is_empty()).then(|| s.to_string());
    match v {
        V::String(s) => plain(s),
        V::Token {
            system: Some(sys),
            code,
        } => Some(format!("{}|{}", plain(sys)?, plain(code)?)),
        V::Token { system: None, code } => plain(code),
        V::Date { start, .. } => Some(format!("ge{}", start.format("%Y-%m-%dT%H:%M:%SZ"))),
        V::Reference {
            resource_type: Some(t),
            id,
        } => Some(format!("{t}/{}", plain(id)?)),
        V::Reference {
            resource_type: None,
            id,
        } => plain(id),
        V::Number(n) => Some(format!("{n}")),
        V::Quantity { value, .. } => Some(format!("{value}")),
        V::Uri(u) => plain(u),
        V::Composite {
            c1_system,
            c1_code,
            second,
            third,
        } => {
            let first = match c1_system {
                Some(s) => format!("{}|{}", plain(s)?, plain(c1_code)?),
                None => plain(c1_code)?,
            };
            let second = match second.as_ref() {
                V::Token { system: Some(s), code } => format!("{}|{}", plain(s)?, plain(code)?),
                other => query_value(other)?,
            };
            Some(match third {
                Some(n) => format!("{first}${second}${n}"),
                None => format!("{first}${second}"),
            })
        }
        V::TokenText(_) | V::IdentifierOfType { .. } | V::ReferenceIdentifier { .. } => None,
    }
}

/// Every parameter the CapabilityStatement lists, on every type with an official example that
/// has the element: searching by the example's own value finds the example, on both backends.
fn every_parameter_finds_the_official_example(db: Db) {
    let s = TestServer::start_with(db, common::examples_layer());
    let registry = fhirvault::search::Registry::r4().unwrap();
    let mut searched = 0;
    let mut failures = Vec::new();
    for (_, example) in common::r4_examples() {
        let t = example["resourceType"].as_str().unwrap().to_string();
        if t == "AuditEvent" {
            continue;
        }
        let r = s.post(&format!("/{t}"), &example);
        assert_eq!(r.status, 201, "{t}: {}", r.text());
        let stored = r.json();
        let id = stored["id"].as_str().unwrap().to_string();
        for param in registry.params(&t) {
            if !fhirvault::search::query::supported(param) {
                continue;
            }
            let values = fhirvault::search::extract(param, &stored).unwrap();
            let Some(value) = values.iter().find_map(query_value) else {
                continue;
            };
            searched += 1;
            let r = s
                .client
                .get(s.url(&format!("/{t}")))
                .query(&[
                    (param.code.as_str(), value.as_str()),
                    ("_count", "1000"),
                    ("_elements", "id"),
                ])
                .header("prefer", "handling=strict")
                .send()
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().unwrap_or(Value::Null);
            let found = body["entry"]
                .as_array()
                .is_some_and(|es| es.iter().any(|e| e["resource"]["id"] == id.as_str()));
            if status != 200 || !found {
                failures.push(format!("{t}?{}={value}: {status} found={found}", param.code));
            }
        }
    }
    println!("searched {searched} parameter values, {} failures", failures.len());
    assert!(searched > 900, "{searched}");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// PostgreSQL: the common searches (the HealthSamurai set and chains) can be answered from the
/// index tables: with sequential scans disabled, no plan scans the resource table, and each
/// reads its index table through an index.
#[test]
fn common_searches_use_indexes_postgres() {
    let s = TestServer::start(Db::Postgres);
    for i in 0..30 {
        let p = s.post(
            "/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": format!("Fam{i}"), "given": ["Gi"]}],
                    "birthDate": format!("{}-01-02", 1950 + i), "identifier": [{"system": "urn:x", "value": format!("v{i}")}]}),
        );
        let pid = p.json()["id"].as_str().unwrap().to_string();
        s.post(
            "/Observation",
            &json!({"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": format!("{i}-1")}]},
                    "subject": {"reference": format!("Patient/{pid}")}, "effectiveDateTime": "2024-01-01"}),
        );
    }
    s.db.exec("ANALYZE").unwrap();
    let registry = fhirvault::search::Registry::r4().unwrap();
    let cipher = s.store.shared_cipher();
    // each with the index that must serve it
    for (t, q, index) in [
        ("Patient", "name=fam1", "search_string_blind"),
        ("Patient", "name:contains=am1", "search_string_blind"),
        ("Patient", "family:exact=Fam1", "search_string_blind"),
        ("Patient", "birthdate=ge1970", "search_date_blind"),
        ("Patient", "birthdate=1960-01-02", "search_date_blind"),
        ("Patient", "identifier=urn:x|v3", "search_token_blind"),
        ("Observation", "code=http://loinc.org|3-1", "search_token_code"),
        ("Observation", "code=3-1", "search_token_code"),
        ("Observation", "subject=Patient/abc", "search_reference_target"),
        ("Observation", "date=ge2024-01-01", "search_date_range"),
        ("Observation", "subject:Patient.name=fam2", "search_string_blind"),
        ("Patient", "_has:Observation:subject:code=3-1", "search_token_code"),
        ("Patient", "_id=abc", "resources_pkey"),
    ] {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
        let parsed = fhirvault::search::query::parse(&registry, &cipher, t, &pairs, 20, true).unwrap();
        let plan = s
            .store
            .explain_search(&fhirvault::store::Access::All, &parsed.query, false, true)
            .unwrap();
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan"), "{t}?{q} scans a table:\n{text}");
        assert!(
            text.contains(&format!("using {index} on")) || text.contains(&format!("Index Scan on {index}")),
            "{t}?{q} is not served by {index}:\n{text}"
        );
        assert!(
            text.contains("using resources_pkey on resources r")
                || text.contains("Bitmap Index Scan on resources_pkey"),
            "{t}?{q}:\n{text}"
        );
    }
}

on_both_backends!(blind_matches_are_always_rechecked);

/// A blind index never decides alone: an index row that no longer agrees with the resource (here
/// planted by hand, as a stale or colliding row would be) is caught by the re-check on the
/// decrypted content, for names, identifiers and birth dates.
fn blind_matches_are_always_rechecked(db: Db) {
    let s = TestServer::start(db);
    put(
        &s,
        "/Patient/real",
        json!({"resourceType": "Patient", "id": "real", "name": [{"family": "Quagmire"}],
               "identifier": [{"system": "urn:x", "value": "Q1"}], "birthDate": "1961-04-05"}),
    );
    put(
        &s,
        "/Patient/other",
        json!({"resourceType": "Patient", "id": "other", "name": [{"family": "Brown"}], "birthDate": "1990"}),
    );
    // copy real's blind rows onto other
    for (table, cols) in [
        ("search_string", "param, value, exact, blind"),
        ("search_token", "param, system, code, text, blind"),
        ("search_date", "param, start_at, end_at, blind"),
    ] {
        s.db.exec(&format!(
            "INSERT INTO {table} (resource_type, logical_id, {cols}) SELECT resource_type, 'other', {cols} \
             FROM {table} WHERE logical_id = 'real' AND param IN ('family', 'identifier', 'birthdate')"
        ))
        .unwrap();
    }
    let only_real = vec!["real".to_string()];
    assert_eq!(ids(&s, "/Patient?family=quag"), only_real);
    assert_eq!(ids(&s, "/Patient?family=quagmire"), only_real);
    assert_eq!(ids(&s, "/Patient?identifier=urn:x|Q1"), only_real);
    assert_eq!(ids(&s, "/Patient?birthdate=1961-04-05"), only_real);
    assert_eq!(ids(&s, "/Patient?identifier:not=Q1"), Vec::<String>::new());
}

on_both_backends!(rechecked_pages_are_filled);

/// Names longer than their blind prefixes are matched on the prefix and re-checked after
/// decryption: when most candidates fail the re-check, a page still holds the matches (read on
/// past the first page of candidates), never an empty page with the match further on, and paging
/// through gives every match once.
fn rechecked_pages_are_filled(db: Db) {
    let s = TestServer::start(db);
    for i in 0..60 {
        put(
            &s,
            &format!("/Patient/fill-{i:02}"),
            json!({"resourceType": "Patient", "id": format!("fill-{i:02}"), "name": [{"family": format!("Fillprefix{i:02}")}]}),
        );
    }
    // one match among 60 candidates sharing the six-character prefix
    assert_eq!(
        in_order(&s, "/Patient?family=Fillprefix42&_count=5"),
        vec!["fill-42".to_string()],
        "the first page holds the match"
    );
    // ten matches, three a page: every page full but the last, each match once
    let mut seen = Vec::new();
    let mut r = s.get("/Patient?family=Fillprefix4&_count=3");
    loop {
        assert_eq!(r.status, 200, "{}", r.text());
        let bundle = r.json();
        let page: Vec<String> = bundle["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect();
        let next = link(&bundle, "next");
        if next.is_some() {
            assert_eq!(page.len(), 3, "a page before the last is full: {page:?}");
        }
        seen.extend(page);
        match next {
            Some(url) => r = s.get(url.strip_prefix(&s.base).unwrap()),
            None => break,
        }
    }
    let expected: Vec<String> = (40..50).map(|i| format!("fill-{i}")).collect();
    assert_eq!(seen, expected);
}

on_both_backends!(patient_everything);

/// `Patient/[id]/$everything`: the compartment as a paged searchset, with start/end on care
/// dates, `_since`, `_type` and `_count`, within what the token may search.
fn patient_everything(db: Db) {
    let s = TestServer::start(db);
    put(
        &s,
        "/Patient/a",
        json!({"resourceType": "Patient", "id": "a", "gender": "male"}),
    );
    put(&s, "/Patient/b", json!({"resourceType": "Patient", "id": "b"}));
    for (id, pid, date) in [
        ("o1", "a", "2023-01-01"),
        ("o2", "a", "2025-06-01"),
        ("o3", "b", "2025-06-01"),
    ] {
        put(
            &s,
            &format!("/Observation/{id}"),
            json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
                   "subject": {"reference": format!("Patient/{pid}")}, "effectiveDateTime": date}),
        );
    }
    put(
        &s,
        "/Condition/c1",
        json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/a"}}),
    );
    let v = |ids: &[&str]| -> Vec<String> { ids.iter().map(|s| s.to_string()).collect() };
    assert_eq!(ids(&s, "/Patient/a/$everything"), v(&["a", "c1", "o1", "o2"]));
    assert_eq!(ids(&s, "/Patient/a/$everything?_type=Observation"), v(&["o1", "o2"]));
    // start bounds the care dates of the types that have them; the others stay
    assert_eq!(
        ids(&s, "/Patient/a/$everything?start=2024-01-01"),
        v(&["a", "c1", "o2"])
    );
    assert_eq!(
        ids(&s, "/Patient/a/$everything?end=2024-01-01&_type=Observation"),
        v(&["o1"])
    );
    assert_eq!(
        ids(&s, "/Patient/a/$everything?_since=2999-01-01T00:00:00Z"),
        Vec::<String>::new()
    );
    assert_eq!(s.get("/Patient/a/$everything?nonsense=1").status, 400);
    assert_eq!(s.get("/Patient/a/$everything?_type=Organization").status, 400);
    // paged: the filters hold on the next pages, whose links carry none of them
    let first = s.get("/Patient/a/$everything?_count=1&start=2024-01-01").json();
    assert_eq!(first["total"], 3);
    let mut seen = vec![first["entry"][0]["resource"]["id"].as_str().unwrap().to_string()];
    let mut next = link(&first, "next");
    while let Some(url) = next {
        assert!(!url.contains("start") && !url.contains("2024"), "{url}");
        let page: Value = s.client.get(&url).send().unwrap().json().unwrap();
        seen.push(page["entry"][0]["resource"]["id"].as_str().unwrap().to_string());
        next = link(&page, "next");
    }
    seen.sort();
    assert_eq!(seen, v(&["a", "c1", "o2"]));
    // a patient's token: its own compartment only, and only the types its scopes name
    let tb = format!("Bearer {}", s.token("patient/*.rs", Some("b")));
    let r = s.get_with("/Patient/a/$everything", &[("authorization", &tb)]);
    assert_eq!(r.status, 200);
    assert!(r.json()["entry"].is_null(), "b sees nothing of a");
    let r = s.get_with("/Patient/b/$everything", &[("authorization", &tb)]);
    let mut got: Vec<String> = r.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, v(&["b", "o3"]));
    let obs_only = format!("Bearer {}", s.token("patient/Observation.rs", Some("b")));
    assert_eq!(
        s.get_with("/Patient/b/$everything", &[("authorization", &obs_only)])
            .json()["total"],
        1
    );
    // audited like a search, with the patient whose data it returned
    let events = s.get("/AuditEvent?subtype=operation&patient=Patient/a").json();
    assert!(events["entry"].as_array().is_some_and(|e| !e.is_empty()));
}

on_both_backends!(escaped_values);

/// R4 escapes `,` `$` `|` and `\` in search values with a backslash: a name with a comma is one
/// value, not two, on every parameter type (plain and identifying strings, tokens, composites,
/// URIs); an unescaped comma still means "or".
fn escaped_values(db: Db) {
    let s = TestServer::start(db);
    let put = |path: &str, body: Value| {
        let r = s.put(path, &body);
        assert!(r.status == 201 || r.status == 200, "{path}: {}", r.text());
    };
    put(
        "/Organization/cooley",
        json!({"resourceType": "Organization", "id": "cooley", "name": "COOLEY DICKINSON HOSPITAL INC,THE"}),
    );
    put(
        "/Organization/back",
        json!({"resourceType": "Organization", "id": "back", "name": r"Back\slash"}),
    );
    put(
        "/Patient/jr",
        json!({"resourceType": "Patient", "id": "jr", "name": [{"family": "Smith,Jr"}],
               "identifier": [{"system": "urn:mrn", "value": "A,B|C"}]}),
    );
    put(
        "/Observation/odd",
        json!({"resourceType": "Observation", "id": "odd", "status": "final",
               "code": {"coding": [{"system": "urn:codes", "code": "x$y|z"}]},
               "component": [{"code": {"coding": [{"system": "urn:codes", "code": "p,q"}]},
                              "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]}),
    );
    put(
        "/ValueSet/vs",
        json!({"resourceType": "ValueSet", "id": "vs", "status": "active", "url": "http://example.org/vs,1"}),
    );
    let q = |query: &str| ids(&s, &query.replace('\\', "%5C"));
    assert_eq!(
        q(r"/Organization?name:exact=COOLEY DICKINSON HOSPITAL INC\,THE"),
        vec!["cooley"]
    );
    assert_eq!(
        q(r"/Organization?name=cooley dickinson hospital inc\,t"),
        vec!["cooley"]
    );
    // unescaped, the comma separates two values: neither is a name
    assert!(q("/Organization?name:exact=COOLEY DICKINSON HOSPITAL INC,THE").is_empty());
    assert_eq!(q(r"/Organization?name:exact=Back\\slash"), vec!["back"]);
    assert_eq!(
        q(r"/Organization?name:exact=Back\\slash,COOLEY DICKINSON HOSPITAL INC\,THE"),
        vec!["back", "cooley"]
    );
    // identifying parameters (blind indexes) read the same value
    assert_eq!(q(r"/Patient?family:exact=Smith\,Jr"), vec!["jr"]);
    assert_eq!(q(r"/Patient?identifier=urn:mrn|A\,B\|C"), vec!["jr"]);
    assert!(q("/Patient?identifier=urn:mrn|A,B|C").is_empty());
    // tokens and composites
    assert_eq!(q(r"/Observation?code=urn:codes|x\$y\|z"), vec!["odd"]);
    assert_eq!(
        q(r"/Observation?component-code-value-quantity=urn:codes|p\,q$120"),
        vec!["odd"]
    );
    assert_eq!(q(r"/Observation?component-code-value-quantity=p\,q$gt100"), vec!["odd"]);
    // URIs
    assert_eq!(q(r"/ValueSet?url=http://example.org/vs\,1"), vec!["vs"]);
}

on_both_backends!(chains_through_identifying_parameters);

/// `Observation?subject:Patient.name=…` and its spellings: the patients' names are stored only
/// as blind indexes, whose prefixes stop at a few characters, so the chained candidates are
/// confirmed after decryption before they are joined: a longer name that shares the indexed
/// prefix is not a match. A patient-context token reaches only its own compartment.
fn chains_through_identifying_parameters(db: Db) {
    let s = TestServer::start(db);
    for (id, family) in [("aber", "Abernathy"), ("abie", "Abernathie"), ("other", "Zed")] {
        let p = json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Ann"]}]});
        assert_eq!(s.put(&format!("/Patient/{id}"), &p).status, 201);
        let o = json!({"resourceType": "Observation", "id": format!("o-{id}"), "status": "final",
                       "code": {"text": "weight"}, "subject": {"reference": format!("Patient/{id}")}});
        assert_eq!(s.put(&format!("/Observation/o-{id}"), &o).status, 201);
    }
    for q in [
        "/Observation?subject:Patient.name=Abernathy",
        "/Observation?patient.name=Abernathy",
        "/Observation?subject:Patient.family=Abernathy",
        "/Observation?subject:Patient.family=abernathy",
        "/Observation?subject:Patient.family:exact=Abernathy",
        "/Observation?subject:Patient.name:contains=rnathy",
    ] {
        assert_eq!(ids(&s, q), vec!["o-aber"], "{q}");
    }
    assert_eq!(
        ids(&s, "/Observation?patient.family=Abernath"),
        vec!["o-aber", "o-abie"]
    );
    assert_eq!(
        ids(&s, "/Observation?patient.family=Abernathy,Zed"),
        vec!["o-aber", "o-other"]
    );
    assert!(ids(&s, "/Observation?patient.family=Abernathyz").is_empty());
    // with the other conditions, and counted exactly
    let r = s.get("/Observation?patient.name=Abernathy&code:text=weight");
    assert_eq!(r.json()["total"], 1, "{}", r.text());
    // a patient-context token: only its own compartment, whatever the chain names
    let t = s.token("patient/*.rs", Some("abie"));
    let r = s.get_with(
        "/Observation?patient.family=Abernath",
        &[("authorization", &format!("Bearer {t}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let bundle = r.json();
    let found: Vec<&str> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(found, vec!["o-abie"]);
}
