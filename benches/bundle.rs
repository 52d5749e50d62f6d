//! Transaction bundles shaped like Synthea patients, through the full HTTP stack, against a raw
//! multi-row INSERT of the same rows measured in the same run, on SQLite and PostgreSQL.
//!
//! Bundles: the 60 real Synthea patients of ../shared/testdata/synthea-r4-60-patients.tgz (every
//! entry a POST with a `urn:uuid` fullUrl, references between them) and generated ones (a
//! Synthea-shaped patient from `support::synthetic_patient`, deterministic from its seed; 100 to 500 entries).
//!
//! Baselines, per bundle, one transaction each: the rows fhirvault writes for its resources
//! (current-version rows, version rows with ciphertext of the same plaintext and its digest,
//! compartment rows, search index rows) inserted with one multi-row INSERT per table —
//! `raw_insert` times the INSERTs alone (rows built beforehand), `raw_build_and_insert` also
//! builds them (encryption, index extraction), as the server must. Memory: the process's resident
//! set after the first tenth of the bundles and at the end (bounded by the bundle, not the
//! database, if it stays flat). Run: `cargo bench --bench bundle` (`BENCH_GENERATED=40`,
//! `BENCH_CONC=2`). Writes benches/results/bundle-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use fhirvault::config::ConfigLayer;
use fhirvault::store::DbManager;
use serde_json::{json, Value};
use std::time::Instant;
use support::raw::{build_rows, insert_rows, Rows};
use support::{env_num, LeanClient};

fn synthea() -> Vec<Value> {
    let dir = common::synthea_dir();
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

fn entries(b: &Value) -> usize {
    b["entry"].as_array().map_or(0, Vec::len)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn bench_backend(db: Db, bundles: &[Value], conc: usize) -> Value {
    let tdb = common::TestDb::new(db);
    let mut layer = ConfigLayer {
        pool_size: Some(4),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let url = s.db.database_url.clone();
    let cipher = s.store.cipher();
    let registry = fhirvault::server::shared_registry(&s.config).unwrap();
    let compartment = fhirvault::fhir::compartment::PatientCompartment::r4().unwrap();
    let bodies: Vec<Vec<u8>> = bundles.iter().map(|b| serde_json::to_vec(b).unwrap()).collect();
    let total: usize = bundles.iter().map(entries).sum();

    // fhirvault over HTTP: `conc` clients, each posting its share of the bundles
    let token = s.token("system/*.cruds", None);
    let addr = s.addr;
    let rss_start = rss_kb();
    let rss_early = std::sync::atomic::AtomicU64::new(0);
    let rss_peak = std::sync::atomic::AtomicU64::new(0);
    let posted = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..conc {
            let (bodies, posted, rss_early, rss_peak, token) = (&bodies, &posted, &rss_early, &rss_peak, &token);
            scope.spawn(move || {
                let mut c = LeanClient::connect(addr, token);
                for b in bodies.iter().skip(t).step_by(conc) {
                    assert_eq!(c.request("POST", "/fhir", Some(b)), 200);
                    let n = posted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    let rss = rss_kb();
                    rss_peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                    if n == bodies.len() / 10 {
                        rss_early.store(rss, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let http_secs = started.elapsed().as_secs_f64();
    let http_rate = total as f64 / http_secs;

    // baselines on the owner's connection: the same rows, raw
    let mut c = DbManager::new(&url).unwrap().connect().unwrap();
    let built: Vec<Vec<Rows>> = bundles
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
        let rows = build_rows(b, &registry, &compartment, cipher);
        insert_rows(&mut c, &rows);
    }
    let raw_build_rate = total as f64 / started.elapsed().as_secs_f64();

    let early = rss_early.load(std::sync::atomic::Ordering::Relaxed);
    let peak = rss_peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "  {db:?}: {} bundles, {total} resources, c{conc}: fhirvault {http_rate:>7.0}/s  raw insert {raw_rate:>7.0}/s  raw build+insert {raw_build_rate:>7.0}/s  ratio {:.2} / {:.2}",
        bundles.len(),
        http_rate / raw_rate,
        http_rate / raw_build_rate
    );
    eprintln!(
        "  resident memory: {} MB before, {} MB after a tenth of the bundles, {} MB peak",
        rss_start / 1024,
        early / 1024,
        peak / 1024
    );
    json!({
        "backend": format!("{db:?}"),
        "bundles": bundles.len(),
        "resources": total,
        "concurrency": conc,
        "resources_per_sec": {"fhirvault_http": http_rate, "raw_multirow_insert": raw_rate, "raw_build_and_insert": raw_build_rate},
        "ratio_vs_raw_multirow_insert": http_rate / raw_rate,
        "ratio_vs_raw_build_and_insert": http_rate / raw_build_rate,
        "rss_mb": {"before": rss_start / 1024, "after_first_tenth": early / 1024, "peak": peak / 1024},
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let conc = env_num("BENCH_CONC", 2) as usize;
    let mut bundles = synthea();
    bundles.truncate(env_num("BENCH_SYNTHEA", 60) as usize);
    let real = bundles.len();
    let generated_n = env_num("BENCH_GENERATED", 40);
    // deterministic: patient i of seed i, 100 to 500 entries
    bundles.extend((0..generated_n).map(|i| support::synthetic_patient(i, 100 + (i as usize * 37) % 401)));
    let sizes: Vec<usize> = bundles.iter().map(entries).collect();
    eprintln!(
        "bundle bench: {real} Synthea + {generated_n} generated bundles, {} to {} entries ({} in all)",
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap(),
        sizes.iter().sum::<usize>()
    );
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        results.push(bench_backend(db, &bundles, conc));
    }
    let mut out = support::provenance("bundle");
    out["backends"] = Value::Array(results);
    support::write_results("bundle", &out);
}
