//! A comparison workload anyone can point at any FHIR R4 server (issue 27): it loads the same
//! generated patients through the target's own API, then runs, each for `COMPARE_SECS` with
//! `COMPARE_CONC` keep-alive connections (closed loop), the workloads of the issue's table —
//! a read by id (a random one of the loaded patients), `Patient?family=` (a random loaded family
//! name), `Observation?subject=Patient/…` (a random loaded patient), a create of a Patient — and
//! HealthSamurai's CRUD iteration (`support/crud.rs`). It prints requests per second, latency
//! percentiles and failed requests per workload, and writes benches/results/compare-<date>.json.
//!
//! ```sh
//! # fhirvault itself, in-process, on SQLite and on a throwaway PostgreSQL (as shipped: a
//! # bearer token checked, every request audited durably, every row encrypted)
//! cargo bench --bench compare
//! # any running server: its FHIR base URL (plain http), a bearer token if it needs one
//! COMPARE_URL=http://127.0.0.1:8080/fhir COMPARE_TOKEN=… COMPARE_NAME="Helios 0.2.7 SQLite" \
//!   cargo bench --bench compare
//! ```
//!
//! Settings: `COMPARE_PATIENTS` (1,000; each with 2 Observations), `COMPARE_SECS` (10),
//! `COMPARE_CONC` (16), `COMPARE_BACKENDS` (in-process: `sqlite`, `postgres`; both by default).
//! A request that does not succeed counts as failed (and is not a request
//! per second); a workload with failures says so.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::crud::{crud_iteration, seeds};
use support::{env_num, LeanClient, Rng};

/// Where the load goes.
struct Target {
    name: String,
    url: String,
    token: String,
}

impl Target {
    fn client(&self) -> (LeanClient, String) {
        LeanClient::connect_url(&self.url, &self.token)
    }
}

/// What one run of a workload measured.
struct Figures {
    per_sec: f64,
    failed: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

/// Runs `op` on `conc` connections for `secs` seconds: requests per second (of successful ones),
/// failures, and latency percentiles over all of them. `op` answers whether the request
/// succeeded.
fn workload(
    target: &Target,
    conc: usize,
    secs: u64,
    op: impl Fn(&mut LeanClient, &str, &mut Rng) -> bool + Sync,
) -> Figures {
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let latencies = Mutex::new(Vec::<u32>::new());
    let deadline = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|scope| {
        for t in 0..conc {
            let (ok, failed, latencies, op) = (&ok, &failed, &latencies, &op);
            scope.spawn(move || {
                let (mut c, base) = target.client();
                let mut rng = Rng::new(0x5eed + t as u64);
                let mut mine = Vec::with_capacity(64 * 1024);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let good = op(&mut c, &base, &mut rng);
                    mine.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies.lock().unwrap().extend(mine);
            });
        }
    });
    let mut all = latencies.into_inner().unwrap();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0
        }
    };
    Figures {
        per_sec: ok.load(Ordering::Relaxed) as f64 / secs as f64,
        failed: failed.load(Ordering::Relaxed),
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
    }
}

/// The family name of generated patient `i`: four syllables picked by a bijective mix of `i`,
/// so names differ from their first letters on, as real ones do (a shared long prefix, such as
/// `Name00001` … `Name01000`, is a different workload: every search's candidates are all of them).
fn family(i: u64) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zu", "be", "di", "fa", "go", "hi", "ju", "pe",
    ];
    let x = (i.wrapping_mul(40_503) ^ (i >> 16)) & 0xffff;
    let mut name: String = (0..4).map(|k| SYLLABLES[((x >> (4 * k)) & 15) as usize]).collect();
    if i >= 0x10000 {
        name.push_str(&(i >> 16).to_string());
    }
    let mut chars = name.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// A generated patient with a family name of its own (what `Patient?family=` looks for).
fn patient(i: u64) -> Value {
    json!({
        "resourceType": "Patient",
        "name": [{"family": family(i), "given": ["Alex", "Jordan"]}],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("19{:02}-0{}-1{}", 40 + i % 60, 1 + i % 9, i % 10),
        "address": [{"line": [format!("{i} Main Street")], "city": "Springfield", "postalCode": "01101"}],
    })
}

fn observation(patient_id: &str, n: u64) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": if n == 0 { "8867-4" } else { "8310-5" }}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": "2026-01-02T03:04:05Z",
        "valueQuantity": {"value": 60 + n, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
    })
}

/// Loads `n` patients with two Observations each through the target's API (POST each, a few
/// connections at once); returns the patients' ids in order.
fn load(target: &Target, n: u64) -> Vec<String> {
    let ids = Mutex::new(vec![String::new(); n as usize]);
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let (mut c, base) = target.client();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let body = patient(i).to_string();
                    let (status, created) = c.request_body("POST", &format!("{base}/Patient"), Some(body.as_bytes()));
                    let id = created
                        .as_ref()
                        .and_then(|v| v["id"].as_str())
                        .unwrap_or_else(|| panic!("loading Patient {i}: {status} without an id"))
                        .to_string();
                    for k in 0..2 {
                        let o = observation(&id, k).to_string();
                        let (status, _) = c.request_body("POST", &format!("{base}/Observation"), Some(o.as_bytes()));
                        assert_eq!(status, 201, "loading an Observation of Patient {i}");
                    }
                    ids.lock().unwrap()[i as usize] = id;
                }
            });
        }
    });
    eprintln!(
        "  loaded {n} patients and {} observations in {:.1}s",
        2 * n,
        started.elapsed().as_secs_f64()
    );
    ids.into_inner().unwrap()
}

/// Every workload against one target.
fn run(target: &Target, patients: u64, secs: u64, conc: usize) -> Value {
    eprintln!("{} ({}), c{conc}, {secs}s a workload", target.name, target.url);
    let ids = load(target, patients);
    let ok = |status: u16| (200..300).contains(&status);
    let seeds = seeds();
    let mut rows = Vec::new();
    let mut report = |name: &str, f: Figures, requests_per_op: f64| {
        let per_sec = f.per_sec * requests_per_op;
        eprintln!(
            "  {name:<28} {per_sec:>8.0} req/s   p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms{}",
            f.p50_ms,
            f.p90_ms,
            f.p99_ms,
            if f.failed > 0 {
                format!("   FAILED {}", f.failed)
            } else {
                String::new()
            }
        );
        rows.push(json!({
            "workload": name, "requests_per_sec": per_sec, "failed": f.failed,
            "latency_ms": {"p50": f.p50_ms, "p90": f.p90_ms, "p99": f.p99_ms,
                           "per": if requests_per_op > 1.0 { "iteration" } else { "request" }},
        }));
    };
    let f = workload(target, conc, secs, |c, base, rng| {
        let id = &ids[rng.below(ids.len() as u64) as usize];
        ok(c.request("GET", &format!("{base}/Patient/{id}"), None))
    });
    report("read by id", f, 1.0);
    let f = workload(target, conc, secs, |c, base, rng| {
        let i = rng.below(patients);
        // a match is expected: a search that finds nothing fails
        let (status, bundle) = c.request_body("GET", &format!("{base}/Patient?family={}", family(i)), None);
        ok(status) && bundle.is_some_and(|b| b["entry"].as_array().is_some_and(|e| !e.is_empty()))
    });
    report("Patient?family=", f, 1.0);
    let f = workload(target, conc, secs, |c, base, rng| {
        let id = &ids[rng.below(ids.len() as u64) as usize];
        let (status, bundle) = c.request_body("GET", &format!("{base}/Observation?subject=Patient/{id}"), None);
        ok(status) && bundle.is_some_and(|b| b["entry"].as_array().is_some_and(|e| e.len() == 2))
    });
    report("Observation?subject=", f, 1.0);
    let commits_before = sqlite_commits(target);
    let mut writes_per_commit = None;
    let f = workload(target, conc, secs, |c, base, rng| {
        let body = patient(patients + rng.below(1_000_000)).to_string();
        c.request("POST", &format!("{base}/Patient"), Some(body.as_bytes())) == 201
    });
    report("create Patient", f, 1.0);
    // fhirvault on SQLite: how many creates each commit (each flush to disk) held
    if let (Some(before), Some(after)) = (commits_before, sqlite_commits(target)) {
        let per_commit = (after.1 - before.1) / (after.0 - before.0).max(1.0);
        eprintln!("  {:<28} {per_commit:>8.1} writes per commit", "");
        writes_per_commit = Some(per_commit);
    }
    let f = workload(target, conc, secs, |c, base, _| crud_iteration(c, base, &seeds).is_ok());
    report("CRUD iteration (36 requests)", f, 36.0);
    if let Some(per_commit) = writes_per_commit {
        if let Some(row) = rows.iter_mut().find(|r| r["workload"] == "create Patient") {
            row["writes_per_commit"] = json!(per_commit);
        }
    }
    json!({"target": target.name, "url": target.url, "patients": patients, "concurrency": conc,
           "seconds": secs, "workloads": rows})
}

/// The commits of fhirvault's shared SQLite write transaction and the writes they held, from
/// the target's `/metrics` (beside its FHIR base); `None` for any other server or backend.
fn sqlite_commits(target: &Target) -> Option<(f64, f64)> {
    let root = target.url.trim_end_matches('/').trim_end_matches("/fhir");
    let text = reqwest::blocking::get(format!("{root}/metrics")).ok()?.text().ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
    };
    Some((
        value("fhirvault_sqlite_write_commits_total")?,
        value("fhirvault_sqlite_writes_total")?,
    ))
}

/// fhirvault in-process on `db`, as shipped (default settings, the default pool of 16 where the
/// test harness uses 4; a `system/*.cruds` token).
fn fhirvault_target(db: common::Db) -> (common::TestServer, Target) {
    let layer = fhirvault::config::ConfigLayer {
        pool_size: Some(16),
        ..Default::default()
    };
    let s = common::TestServer::start_with(db, layer);
    let token = s.token("system/*.cruds", None);
    let target = Target {
        name: format!("fhirvault {} {db:?}", env!("CARGO_PKG_VERSION")),
        url: s.base.clone(),
        token,
    };
    (s, target)
}

fn main() {
    if !support::start() {
        return;
    }
    let smoke = support::smoke();
    let patients = env_num("COMPARE_PATIENTS", if smoke { 20 } else { 1_000 });
    let secs = env_num("COMPARE_SECS", if smoke { 1 } else { 10 });
    let conc = env_num("COMPARE_CONC", if smoke { 2 } else { 16 }) as usize;
    eprintln!("compare: CPU {}", support::cpu_model());
    let mut runs = Vec::new();
    match std::env::var("COMPARE_URL") {
        Ok(url) => {
            let target = Target {
                name: std::env::var("COMPARE_NAME").unwrap_or_else(|_| url.clone()),
                url,
                token: std::env::var("COMPARE_TOKEN").unwrap_or_default(),
            };
            runs.push(run(&target, patients, secs, conc));
        }
        Err(_) => {
            // COMPARE_BACKENDS=sqlite (or postgres) runs one of them
            let only = std::env::var("COMPARE_BACKENDS").unwrap_or_default().to_lowercase();
            for db in [common::Db::Sqlite, common::Db::Postgres] {
                if !only.is_empty() && !only.contains(&format!("{db:?}").to_lowercase()) {
                    continue;
                }
                let (_server, target) = fhirvault_target(db);
                runs.push(run(&target, patients, secs, conc));
            }
        }
    }
    let mut out = support::provenance("compare");
    out["runs"] = Value::Array(runs);
    support::write_results("compare", &out);
}
