//! Import bench (issue 26): `fhirvault import` (the release binary, as an operator runs it)
//! against the transaction-bundle path over HTTP and a raw multi-row INSERT of the same rows,
//! measured in the same run on SQLite and PostgreSQL; and the importer's peak resident memory
//! for a small and a large file, which stays flat if the import streams.
//!
//! Rates: generated Synthea-shaped patients (`support::synthetic_patient`, 100 to 500 entries
//! each). The bundle path posts them as transactions (`BENCH_CONC` clients); the import reads
//! the same resources as NDJSON (ids from their `urn:uuid` fullUrls, references rewritten as the
//! transaction does) into an empty database beside a running server; the raw baseline is the
//! bundle bench's (`support::raw`): rows built beforehand, then only the INSERTs, and built
//! and inserted. Memory: `BENCH_IMPORT_SMALL` and `BENCH_IMPORT_LARGE` resources (100,000 and
//! 1,000,000; a patient and four observations each fifth), the importer's VmHWM.
//!
//! Run: `cargo bench --bench import` (`BENCH_GENERATED=40`, `BENCH_CONC=2`, `BENCH_BACKENDS`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use fhirvault::config::ConfigLayer;
use fhirvault::store::DbManager;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use support::raw::{build_rows, insert_rows};
use support::{env_num, LeanClient};

/// The bundles' resources as NDJSON lines, as the transactions store them.
fn as_ndjson(bundles: &[Value], out: &Path) -> usize {
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    let mut n = 0;
    for b in bundles {
        let entries = b["entry"].as_array().unwrap();
        let ids: HashMap<String, String> = entries
            .iter()
            .map(|e| {
                let t = e["resource"]["resourceType"].as_str().unwrap();
                let url = e["fullUrl"].as_str().unwrap();
                (url.to_string(), format!("{t}/{}", url.trim_start_matches("urn:uuid:")))
            })
            .collect();
        for e in entries {
            let mut r = e["resource"].clone();
            r["id"] = json!(e["fullUrl"].as_str().unwrap().trim_start_matches("urn:uuid:"));
            rewrite(&mut r, &ids);
            serde_json::to_writer(&mut f, &r).unwrap();
            f.write_all(b"\n").unwrap();
            n += 1;
        }
    }
    f.flush().unwrap();
    n
}

fn rewrite(v: &mut Value, ids: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x.as_str().and_then(|r| ids.get(r)) {
                    Some(to) if k == "reference" => *x = json!(to),
                    _ => rewrite(x, ids),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, ids)),
        _ => {}
    }
}

/// `fhirvault import FILE` into `s`'s database (beside it): seconds, and the importer's peak
/// resident set in kB.
fn run_import(s: &TestServer, file: &Path) -> (f64, u64) {
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .arg("--data-dir")
        .arg(&s.config.data_dir)
        .arg("--database-url")
        .arg(&s.db.database_url)
        .arg("import")
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the import failed");
            break;
        }
        if let Some(hwm) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        }) {
            peak = peak.max(hwm);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (started.elapsed().as_secs_f64(), peak)
}

fn server(db: Db) -> TestServer {
    let tdb = common::TestDb::new(db);
    let mut layer = ConfigLayer {
        pool_size: Some(4),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    TestServer::start_on(tdb, layer)
}

/// Streams `n` small resources (a patient, then four observations of it) to an NDJSON file.
fn generated(n: u64, out: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    for i in 0..n {
        let p = i / 5;
        let r = if i % 5 == 0 {
            let mut v = support::patient(p);
            v["id"] = json!(format!("imp-p{p}"));
            v
        } else {
            json!({"resourceType": "Observation", "id": format!("imp-o{i}"), "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                   "subject": {"reference": format!("Patient/imp-p{p}")},
                   "effectiveDateTime": "2024-05-01T10:00:00Z",
                   "valueQuantity": {"value": 60 + (i % 40), "unit": "/min"}})
        };
        serde_json::to_writer(&mut f, &r).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
}

fn bench_backend(db: Db, bundles: &[Value], conc: usize, sizes: (u64, u64)) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let total: usize = bundles.iter().map(|b| b["entry"].as_array().map_or(0, Vec::len)).sum();
    // the transaction-bundle path over HTTP
    let a = server(db);
    let token = a.token("system/*.cruds", None);
    let bodies: Vec<Vec<u8>> = bundles.iter().map(|b| serde_json::to_vec(b).unwrap()).collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..conc {
            let (bodies, token, addr) = (&bodies, &token, a.addr);
            scope.spawn(move || {
                let mut c = LeanClient::connect(addr, token);
                for b in bodies.iter().skip(t).step_by(conc) {
                    assert_eq!(c.request("POST", "/fhir", Some(b)), 200);
                }
            });
        }
    });
    let bundle_rate = total as f64 / started.elapsed().as_secs_f64();
    // the same resources imported into an empty database
    let file = dir.path().join("generated.ndjson");
    assert_eq!(as_ndjson(bundles, &file), total);
    let b = server(db);
    let (secs, _) = run_import(&b, &file);
    let import_rate = total as f64 / secs;
    // the raw baselines (on the first database: new ids, the same rows)
    let registry = fhirvault::server::shared_registry(&a.config).unwrap();
    let compartment = fhirvault::fhir::compartment::PatientCompartment::r4().unwrap();
    let cipher = a.store.cipher();
    let mut c = DbManager::new(&a.db.database_url).unwrap().connect().unwrap();
    let built: Vec<_> = bundles
        .iter()
        .map(|b| build_rows(b, &registry, &compartment, cipher))
        .collect();
    let started = Instant::now();
    for rows in &built {
        insert_rows(&mut c, rows);
    }
    let raw_rate = total as f64 / started.elapsed().as_secs_f64();
    drop(built);
    let started = Instant::now();
    for b in bundles {
        insert_rows(&mut c, &build_rows(b, &registry, &compartment, cipher));
    }
    let raw_build_rate = total as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "  {db:?}: {total} resources: import {import_rate:>6.0}/s  transaction bundles (c{conc}) {bundle_rate:>6.0}/s  \
         raw insert {raw_rate:>6.0}/s  raw build+insert {raw_build_rate:>6.0}/s"
    );
    eprintln!(
        "      import against bundles {:.2}, against raw insert {:.2}, against raw build+insert {:.2}",
        import_rate / bundle_rate,
        import_rate / raw_rate,
        import_rate / raw_build_rate
    );
    // memory: a small and a large import, each into an empty database
    let mut memory = Vec::new();
    for n in [sizes.0, sizes.1] {
        let file = dir.path().join(format!("flat-{n}.ndjson"));
        generated(n, &file);
        let s = server(db);
        let (secs, peak_kb) = run_import(&s, &file);
        eprintln!(
            "      {n} resources: {:.0}/s, importer peak resident {} MB",
            n as f64 / secs,
            peak_kb / 1024
        );
        memory.push(json!({"resources": n, "per_sec": n as f64 / secs, "peak_rss_mb": peak_kb / 1024}));
        let _ = std::fs::remove_file(&file);
    }
    json!({
        "backend": format!("{db:?}"),
        "resources": total,
        "concurrency_bundles": conc,
        "resources_per_sec": {"import": import_rate, "transaction_bundles_http": bundle_rate,
                              "raw_multirow_insert": raw_rate, "raw_build_and_insert": raw_build_rate},
        "ratio_import_vs_bundles": import_rate / bundle_rate,
        "ratio_import_vs_raw_insert": import_rate / raw_rate,
        "ratio_import_vs_raw_build_and_insert": import_rate / raw_build_rate,
        "memory": memory,
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let conc = env_num("BENCH_CONC", 2) as usize;
    let generated_n = env_num("BENCH_GENERATED", 40);
    let bundles: Vec<Value> = (0..generated_n)
        .map(|i| support::synthetic_patient(i, 100 + (i as usize * 37) % 401))
        .collect();
    let sizes = (
        env_num("BENCH_IMPORT_SMALL", 100_000),
        env_num("BENCH_IMPORT_LARGE", 1_000_000),
    );
    eprintln!(
        "import bench: {generated_n} generated patients; memory at {} and {} resources",
        sizes.0, sizes.1
    );
    let only = std::env::var("BENCH_BACKENDS").unwrap_or_default().to_lowercase();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        if !only.is_empty() && !only.contains(&format!("{db:?}").to_lowercase()) {
            continue;
        }
        results.push(bench_backend(db, &bundles, conc, sizes));
    }
    let mut out = support::provenance("import");
    out["backends"] = Value::Array(results);
    support::write_results("import", &out);
}
