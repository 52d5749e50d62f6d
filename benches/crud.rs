//! The CRUD iteration of HealthSamurai's public FHIR server benchmark
//!   (github.com/HealthSamurai/fhir-server-performance-benchmark, `k6/crud.js`): per iteration,
//!   POST nine linked resources (Patient, Location, Organization, Practitioner, Encounter,
//!   Observation, MedicationRequest, Claim, ExplanationOfBenefit, references set to the ones
//!   just created, as the script does), GET each, PUT each with a change, DELETE each in reverse
//!   order: 36 requests. Reported as requests per second, like the published Aidbox, HAPI and
//!   Medplum figures (theirs on 8 vCPU with 300 virtual users; ours on this machine), and against
//!   the HTTP ceiling of an in-memory actix route with the same client in the same run. Seeds are
//!   the official R4 examples of those types (tests/data/r4-examples). The crypto figures are
//!   `benches/crypto.rs`'s.
//!
//! Run: `cargo bench --bench crud` (`BENCH_SECS`, `BENCH_CONC`). Writes
//! benches/results/crud-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use serde_json::{json, Value};
use std::time::Instant;
use support::crud::{crud_iteration, seeds};
use support::{env_num, throughput, LeanClient};

fn bench_backend(db: Db, secs: u64, conc: usize, seeds: &[Value]) -> Value {
    let tdb = common::TestDb::new(db);
    let mut layer = fhirvault::config::ConfigLayer {
        pool_size: Some(conc.clamp(4, 64) as u32),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let token = s.token("system/*.cruds", None);
    let addr = s.addr;
    let iterations = throughput(
        conc,
        secs,
        |_| LeanClient::connect(addr, &token),
        |c, _| crud_iteration(c, "/fhir", seeds).unwrap(),
    );
    let rps = iterations * 36.0;
    eprintln!("  {db:?}: CRUD c{conc}: {iterations:.1} iterations/s = {rps:.0} requests/s");
    json!({"backend": format!("{db:?}"), "concurrency": conc, "iterations_per_sec": iterations, "requests_per_sec": rps})
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 5);
    let conc = env_num("BENCH_CONC", 16) as usize;
    let seeds = seeds();
    eprintln!(
        "CRUD bench (HealthSamurai's crud.js iteration), {secs}s, c{conc}; CPU {}",
        support::cpu_model()
    );
    let started = Instant::now();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        results.push(bench_backend(db, secs, conc, &seeds));
    }
    let mut out = support::provenance("crud");
    out["crud"] = Value::Array(results);
    support::write_results("crud", &out);
    eprintln!("({:.0}s)", started.elapsed().as_secs_f64());
}
