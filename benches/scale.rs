//! Read latency as the database grows: `GET /fhir/Patient/{id}` (audited, decrypted) from one
//! client, median and 99th percentile, with 10,000 resources stored and again with 1,000,000,
//! on SQLite and PostgreSQL. The data are Synthea-shaped patients (`support::synthetic_patient`,
//! about 300 resources each) posted as transaction bundles. The target: the median at 1,000,000
//! within 1.2× of the median at 10,000 (an indexed lookup should not notice the table's size).
//!
//! Run: `cargo bench --bench scale` (`BENCH_SCALE_SMALL`, `BENCH_SCALE_LARGE`, `BENCH_BACKENDS`).
//! Writes benches/results/scale-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::{env_num, LeanClient};

/// One client reading random patients: (median, 99th percentile) in microseconds.
fn latency(s: &TestServer, token: &str, ids: &[String], n: usize) -> (f64, f64) {
    let mut c = LeanClient::connect(s.addr, token);
    let mut rng = support::Rng::new(42);
    // warm the connection and the caches a little
    for _ in 0..n / 10 {
        let id = &ids[rng.below(ids.len() as u64) as usize];
        assert_eq!(c.request("GET", &format!("/fhir/Patient/{id}"), None), 200);
    }
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let id = &ids[rng.below(ids.len() as u64) as usize];
            let t = Instant::now();
            assert_eq!(c.request("GET", &format!("/fhir/Patient/{id}"), None), 200);
            t.elapsed()
        })
        .collect();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(times[n / 2]), us(times[n * 99 / 100]))
}

fn bench_backend(db: Db, small: usize, large: usize, samples: usize) -> Value {
    let tdb = common::TestDb::new(db);
    let mut layer = fhirvault::config::ConfigLayer::default();
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let token = s.token("system/*.cruds", None);
    let (mut seed, mut stored, mut ids) = (1u64, 0usize, Vec::new());
    support::load_until(&s, &token, &mut seed, &mut stored, small, &mut ids);
    let (small_p50, small_p99) = latency(&s, &token, &ids, samples);
    let small_stored = stored;
    eprintln!("  {db:?}: {stored} resources: read p50 {small_p50:.0} µs, p99 {small_p99:.0} µs");
    support::load_until(&s, &token, &mut seed, &mut stored, large, &mut ids);
    let (large_p50, large_p99) = latency(&s, &token, &ids, samples);
    eprintln!(
        "  {db:?}: {stored} resources: read p50 {large_p50:.0} µs, p99 {large_p99:.0} µs; p50 ratio {:.2}",
        large_p50 / small_p50
    );
    json!({
        "backend": format!("{db:?}"),
        "small": {"resources": small_stored, "read_p50_us": small_p50, "read_p99_us": small_p99},
        "large": {"resources": stored, "read_p50_us": large_p50, "read_p99_us": large_p99},
        "p50_ratio_large_vs_small": large_p50 / small_p50,
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let small = env_num("BENCH_SCALE_SMALL", 10_000) as usize;
    let large = env_num("BENCH_SCALE_LARGE", 1_000_000) as usize;
    let samples = if support::smoke() { 200 } else { 5000 };
    eprintln!(
        "scale bench: read latency at {small} and {large} resources; CPU {}",
        support::cpu_model()
    );
    let only = std::env::var("BENCH_BACKENDS").unwrap_or_default().to_lowercase();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        if !only.is_empty() && !only.contains(&format!("{db:?}").to_lowercase()) {
            continue;
        }
        results.push(bench_backend(db, small, large, samples));
    }
    let mut out = support::provenance("scale");
    out["backends"] = Value::Array(results);
    support::write_results("scale", &out);
}
