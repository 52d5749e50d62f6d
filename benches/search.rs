//! Search bench: the HealthSamurai set of common searches over a generated data set of
//! `BENCH_PATIENTS` patients (default 10,000) with `BENCH_OBS` observations each (default 4),
//! on both backends, each as a ratio to the SQL the search runs, executed on its own in the
//! same run: the count, the page's ids, the page's rows and the include lookups and rows,
//! nothing decrypted, parsed, rendered or audited. On PostgreSQL each search's plan is checked
//! for a scan of the resource table. Then `reindex` of the whole data set, in resources per
//! second.
//!
//! The data is loaded through the store (index rows built as the server builds them, writes
//! not audited: as an import would), so that loading does not dominate the run.
//!
//! Run: `cargo bench --bench search` (optionally `BENCH_SECS=3 BENCH_PATIENTS=10000
//! BENCH_BACKENDS=sqlite,postgres BENCH_CONC=16 BENCH_PLANS=1`; `BENCH_ONLY_REINDEX=1` skips the
//! searches). Writes benches/results/search-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use fhirvault::config::ConfigLayer;
use fhirvault::store::{Access, Content, CreateMethod};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use support::{env_num, throughput, LeanClient};

const FAMILIES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
];
const GIVEN: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
];
const CODES: &[(&str, &str)] = &[
    ("8867-4", "Heart rate"),
    ("8480-6", "Systolic blood pressure"),
    ("8462-4", "Diastolic blood pressure"),
    ("29463-7", "Body weight"),
    ("8302-2", "Body height"),
    ("39156-5", "Body mass index"),
    ("8310-5", "Body temperature"),
    ("9279-1", "Respiratory rate"),
];

/// A spread of values from an index (a cheap deterministic hash).
fn spread(i: u64, salt: u64) -> u64 {
    (i ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20
}

fn patient(i: u64) -> Value {
    let year = 1930 + spread(i, 1) % 90;
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:bench:mrn", "value": format!("MRN{i:07}")}],
        "name": [{"family": FAMILIES[(spread(i, 2) % FAMILIES.len() as u64) as usize],
                  "given": [GIVEN[(spread(i, 3) % GIVEN.len() as u64) as usize]]}],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("{year}-{:02}-{:02}", 1 + spread(i, 4) % 12, 1 + spread(i, 5) % 28),
        "address": [{"line": [format!("{} Main Street", i % 500)], "city": "Springfield", "postalCode": "12345"}],
        "telecom": [{"system": "phone", "value": format!("555-{:04}", i % 10000)}]
    })
}

fn observation(i: u64, k: u64, pid: &str) -> Value {
    let (code, display) = CODES[((i + k) % CODES.len() as u64) as usize];
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": format!("Patient/{pid}")},
        "effectiveDateTime": format!("20{:02}-{:02}-{:02}T10:00:00Z", 15 + spread(i, k) % 10, 1 + k % 12, 1 + i % 28),
        "valueQuantity": {"value": 50 + spread(i, k + 7) % 100, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}
    })
}

/// Loads the data set through the store, from four threads; returns the patients' ids.
fn load(s: &TestServer, patients: u64, per_patient: u64) -> Vec<String> {
    let registry = fhirvault::server::shared_registry(&s.config).unwrap();
    let compartment = fhirvault::fhir::compartment::PatientCompartment::r4().unwrap();
    let unaudited =
        fhirvault::audit::Auditor::without_ledger(s.store.shared_cipher(), fhirvault::server::audit_source(&s.config));
    let cipher = s.store.shared_cipher();
    let started = Instant::now();
    let create = |t: &str, body: Value| -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = unaudited.for_write(fhirvault::audit::AuditRecord::new(
            fhirvault::audit::Kind::Rest("create"),
            fhirvault::audit::Action::Create,
            Default::default(),
        ));
        s.store
            .create(
                &Access::All,
                t,
                &id,
                CreateMethod::Post,
                None,
                |v, ts| {
                    let mut map = body.as_object().unwrap().clone();
                    let json = fhirvault::fhir::resource::stamp(&mut map, &id, v, &ts);
                    let value = Value::Object(map);
                    Content {
                        json,
                        compartments: compartment.patients_of(t, &value).into_iter().collect(),
                        search: fhirvault::search::index_rows(&registry, &cipher, t, &value),
                    }
                },
                &mut tx,
            )
            .unwrap();
        id
    };
    let ids: Vec<String> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let create = &create;
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    let mut i = t;
                    while i < patients {
                        let pid = create("Patient", patient(i));
                        for k in 0..per_patient {
                            create("Observation", observation(i, k, &pid));
                        }
                        mine.push(pid);
                        i += 4;
                        if t == 0 && mine.len() % 500 == 0 {
                            eprintln!("  loaded {} of {patients} patients", mine.len() * 4);
                        }
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let n = patients * (1 + per_patient);
    let secs = started.elapsed().as_secs_f64();
    eprintln!("  loaded {n} resources in {secs:.1}s ({:.0}/s)", n as f64 / secs);
    ids
}

/// One search of the set: its name, and the query for request number `i`.
type Search = (&'static str, &'static str, Box<dyn Fn(u64) -> String + Sync>);

fn searches(ids: &[String]) -> Vec<Search> {
    let ids: Arc<Vec<String>> = Arc::new(ids.to_vec());
    let pick = move |i: u64| ids[(spread(i, 11) % ids.len() as u64) as usize].clone();
    let pick2 = pick.clone();
    let pick3 = pick.clone();
    vec![
        (
            "name (prefix)",
            "Patient",
            Box::new(|i| {
                let f = FAMILIES[(spread(i, 12) % FAMILIES.len() as u64) as usize];
                format!("name={}", &f[..4.min(f.len())])
            }),
        ),
        (
            "name:contains",
            "Patient",
            Box::new(|i| {
                let f = FAMILIES[(spread(i, 13) % FAMILIES.len() as u64) as usize];
                let piece = if f.len() >= 4 { &f[1..4] } else { f };
                format!("name:contains={piece}")
            }),
        ),
        (
            "birthdate=ge (range)",
            "Patient",
            Box::new(|_| "birthdate=ge2010-01-01".into()),
        ),
        (
            "birthdate=lt (range)",
            "Patient",
            Box::new(|_| "birthdate=lt1935".into()),
        ),
        (
            "birthdate=eq (day)",
            "Patient",
            Box::new(|i| {
                format!(
                    "birthdate={}-{:02}-{:02}",
                    1930 + spread(i, 14) % 90,
                    1 + spread(i, 15) % 12,
                    1 + spread(i, 16) % 28
                )
            }),
        ),
        (
            // names longer than the blind prefixes: the candidates are confirmed after decryption
            "chained name",
            "Observation",
            Box::new(|i| {
                let long: Vec<&str> = FAMILIES.iter().copied().filter(|f| f.len() > 6).collect();
                format!("patient.name={}", long[(spread(i, 18) % long.len() as u64) as usize])
            }),
        ),
        (
            "code with system",
            "Observation",
            Box::new(|i| format!("code=http://loinc.org|{}", CODES[(i % CODES.len() as u64) as usize].0)),
        ),
        (
            "code without system",
            "Observation",
            Box::new(|i| format!("code={}", CODES[(i % CODES.len() as u64) as usize].0)),
        ),
        (
            "subject reference",
            "Observation",
            Box::new(move |i| format!("subject=Patient/{}", pick(i))),
        ),
        (
            "identifier (blind)",
            "Patient",
            Box::new(move |i| format!("identifier=urn:bench:mrn|MRN{:07}", spread(i, 17) % 1000)),
        ),
        (
            "_revinclude",
            "Patient",
            Box::new(move |i| format!("_id={}&_revinclude=Observation:subject", pick2(i))),
        ),
        (
            "_include",
            "Observation",
            Box::new(move |i| format!("subject=Patient/{}&_include=Observation:subject", pick3(i))),
        ),
    ]
}

fn pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).into_owned().collect()
}

fn bench_backend(db: Db, patients: u64, per_patient: u64, secs: u64, conc: usize) -> Value {
    let tdb = common::TestDb::new(db);
    let mut layer = ConfigLayer::default();
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let ids = load(&s, patients, per_patient);
    if db == Db::Postgres {
        // statistics, as autovacuum would have gathered them by now in production
        s.db.exec("ANALYZE").unwrap();
    }
    let registry = fhirvault::server::shared_registry(&s.config).unwrap();
    let cipher = s.store.shared_cipher();
    let token = s.token("system/*.rs", None);
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    let only_reindex = std::env::var("BENCH_ONLY_REINDEX").is_ok();
    for (name, t, make) in searches(&ids).into_iter().filter(|_| !only_reindex) {
        let http = throughput(
            conc,
            secs,
            |_| LeanClient::connect(s.addr, &token),
            |c, i| {
                let q = make(i);
                let status = c.request("GET", &format!("/fhir/{t}?{q}"), None);
                assert_eq!(status, 200, "{t}?{q}");
            },
        );
        // the SQL alone: the same parsed query's count and page, plus the include's lookup
        let sql = throughput(
            conc,
            secs,
            |_| (),
            |_, i| {
                let q = make(i);
                let parsed =
                    fhirvault::search::query::parse_confirming_chains(&registry, &cipher, t, &pairs(&q), 20, false)
                        .unwrap();
                let (_, keys) = s.store.search_page_keys(&Access::All, &parsed.query).unwrap();
                let page: Vec<String> = keys.into_iter().take(20).map(|(_, id)| id).collect();
                s.store.fetch_current_rows(&Access::All, t, &page).unwrap();
                if q.contains("_revinclude") {
                    let refs = s.store.referrers_of("Observation", Some("subject"), t, &page).unwrap();
                    let ids: Vec<String> = refs.into_iter().map(|r| r.0).collect();
                    s.store.fetch_current_rows(&Access::All, "Observation", &ids).unwrap();
                } else if q.contains("_include") {
                    let refs = s.store.references_of(t, &page, Some("subject")).unwrap();
                    let ids: Vec<String> = refs.into_iter().map(|r| r.2).collect();
                    s.store.fetch_current_rows(&Access::All, "Patient", &ids).unwrap();
                }
            },
        );
        let plan = if db == Db::Postgres {
            let parsed =
                fhirvault::search::query::parse_confirming_chains(&registry, &cipher, t, &pairs(&make(1)), 20, false)
                    .unwrap();
            s.store
                .explain_search(&Access::All, &parsed.query, false, false)
                .unwrap()
        } else {
            Vec::new()
        };
        let scans_resources = plan.iter().any(|l| l.contains("Seq Scan on resources"));
        let ratio = sql / http;
        ratios.push(ratio);
        eprintln!(
            "  {name:<22} {t:<12} fhirvault {http:>7.0}/s  SQL alone {sql:>7.0}/s  cost {ratio:>4.2}x{}",
            if scans_resources { "  SCANS resources" } else { "" }
        );
        if std::env::var("BENCH_PLANS").is_ok() {
            for l in &plan {
                eprintln!("      {l}");
            }
        }
        rows.push(json!({
            "search": name, "type": t, "example": make(1).replace(&ids[0], "<id>"),
            "fhirvault_per_sec": http, "sql_alone_per_sec": sql, "cost_vs_sql": ratio,
            "plan_scans_resource_table": scans_resources,
        }));
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    eprintln!("  median cost {median:.2}x the SQL alone");
    // reindex of everything, with progress
    let started = Instant::now();
    let n = s
        .store
        .reindex(
            |t, json| fhirvault::search::index_rows(&registry, &cipher, t, json),
            |done| {
                if done % 10_000 == 0 {
                    eprintln!("  reindexed {done}");
                }
            },
        )
        .unwrap();
    let reindex_rate = n as f64 / started.elapsed().as_secs_f64();
    eprintln!("  reindex: {n} resources at {reindex_rate:.0}/s");
    json!({
        "backend": format!("{db:?}"),
        "patients": patients,
        "resources": patients * (1 + per_patient),
        "concurrency": conc,
        "searches": rows,
        "median_cost_vs_sql": median,
        "reindex_resources_per_sec": reindex_rate,
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 3);
    let patients = env_num("BENCH_PATIENTS", 10_000);
    let per_patient = env_num("BENCH_OBS", 4);
    let conc = env_num("BENCH_CONC", 16) as usize;
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    eprintln!("search bench on {}", support::cpu_model());
    if std::env::var("BENCH_PROFILE_INDEX").is_ok() {
        // the CPU cost of building index rows alone, one thread
        let registry = fhirvault::search::Registry::r4().unwrap();
        let cipher =
            fhirvault::server::open_cipher(&common::TestDb::new(Db::Sqlite).config(Default::default())).unwrap();
        for (t, make) in [("Patient", 0), ("Observation", 1)] {
            let docs: Vec<Value> = (0..2000)
                .map(|i| if make == 0 { patient(i) } else { observation(i, 1, "p") })
                .collect();
            let started = Instant::now();
            let mut n = 0;
            for d in &docs {
                n += fhirvault::search::index_rows(&registry, &cipher, t, d).len();
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  index_rows {t}: {:.0} µs each, {} rows each",
                secs * 1e6 / 2000.0,
                n / 2000
            );
            let started = Instant::now();
            for d in &docs {
                for p in registry.params(t) {
                    let _ = fhirvault::search::extract(p, d);
                }
            }
            eprintln!(
                "    of which extraction {:.0} µs",
                started.elapsed().as_secs_f64() * 1e6 / 2000.0
            );
        }
        return;
    }
    let mut results = Vec::new();
    for b in backends.split(',') {
        let db = match b.trim() {
            "sqlite" => Db::Sqlite,
            "postgres" => Db::Postgres,
            _ => continue,
        };
        eprintln!("{db:?}: {patients} patients, {per_patient} observations each");
        results.push(bench_backend(db, patients, per_patient, secs, conc));
    }
    let mut out = support::provenance("search");
    out["backends"] = Value::Array(results);
    support::write_results("search", &out);
}
