//! What a request costs, and what a read replica takes off the primary: the figures
//! docs/scaling.md is written from.
//!
//! The real binary serves as separate processes (so that its CPU is its own, not the load
//! generator's) on a PostgreSQL primary with a streaming standby (fsync on), as a role
//! row-level security binds. For each request type (read by id, search, create, transaction
//! entry, exported resource) the CPU time of the fhirvault process and of every PostgreSQL
//! process is read from /proc before and after a closed-loop run, and divided by the requests
//! served: CPU-microseconds per request, for fhirvault and for PostgreSQL. Then a search-heavy
//! mix (nine searches to one read) runs against a node without the replica and against a node
//! with `replica_database_url`: the primary's and the standby's CPU per request, side by side.
//!
//! Run: `cargo bench --bench scaling` (`BENCH_SECS`=8, `BENCH_PATIENTS`=2,000 with 4
//! Observations each, `BENCH_CONC`=8). Writes benches/results/scaling-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::free_port;
use common::node::{token, Node};
use common::replication::PgPair;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{env_num, LeanClient};

/// Clock ticks per second of /proc/*/stat.
fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU ticks of one process (all its threads).
fn cpu_of(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // the command name may hold spaces: fields start after its closing parenthesis
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

/// CPU ticks of a PostgreSQL server: its postmaster and every process it started.
fn cpu_of_server(postmaster: u32) -> u64 {
    let children = std::process::Command::new("pgrep")
        .args(["-P", &postmaster.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    cpu_of(postmaster)
        + children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(cpu_of)
            .sum::<u64>()
}

/// CPU seconds used by (the fhirvault nodes, primary, standby) while `run` ran, and what `run`
/// returned (requests served). Both nodes count: either may run an export job, and the idle one
/// costs next to nothing.
fn measured(nodes: [u32; 2], pair: &PgPair, run: impl FnOnce() -> u64) -> (u64, f64, [f64; 3]) {
    let (primary, standby) = pair.pids();
    let sample = || {
        [
            cpu_of(nodes[0]) + cpu_of(nodes[1]),
            cpu_of_server(primary),
            cpu_of_server(standby),
        ]
    };
    let before = sample();
    let started = Instant::now();
    let n = run();
    let secs = started.elapsed().as_secs_f64();
    let after = sample();
    let tps = ticks_per_sec();
    let used = [0, 1, 2].map(|i| after[i].saturating_sub(before[i]) as f64 / tps);
    (n, secs, used)
}

/// A closed loop of `conc` clients for `secs` seconds; each call of `op` is one request.
fn closed_loop(addr: SocketAddr, token: &str, conc: usize, secs: u64, op: impl Fn(&mut LeanClient, u64) + Sync) -> u64 {
    let rate = support::throughput(conc, secs, |_| LeanClient::connect(addr, token), op);
    (rate * secs as f64).round() as u64
}

/// A transaction of `n` patients with 4 Observations each, linked by `urn:uuid` references.
fn patients_bundle(first: u64, n: u64) -> Value {
    let mut entries = Vec::new();
    for i in first..first + n {
        let full = format!("urn:uuid:00000000-0000-4000-8000-{i:012}");
        let mut p = support::patient(i);
        p["name"][0]["family"] = json!(format!("Scale{}", i % 500));
        entries.push(json!({"fullUrl": full, "resource": p, "request": {"method": "POST", "url": "Patient"}}));
        for k in 0..4 {
            entries.push(json!({"resource": {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": format!("8{k}02-4")}]},
                "subject": {"reference": full}, "effectiveDateTime": format!("2024-0{}-1{k}", 1 + i % 9),
                "valueQuantity": {"value": 60 + (i % 40) as i64, "unit": "kg"}},
                "request": {"method": "POST", "url": "Observation"}}));
        }
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// One figure: requests, seconds, and CPU-µs per request for fhirvault, the primary, the standby.
fn figure(name: &str, per: &str, units: u64, secs: f64, used: [f64; 3]) -> Value {
    let per_unit = |cpu: f64| if units == 0 { 0.0 } else { cpu * 1e6 / units as f64 };
    eprintln!(
        "  {name:<34} {:>9.0}/s   fhirvault {:>7.0} µs   primary {:>7.0} µs   standby {:>6.0} µs  (CPU per {per})",
        units as f64 / secs,
        per_unit(used[0]),
        per_unit(used[1]),
        per_unit(used[2]),
    );
    json!({"name": name, "per": per, "count": units, "seconds": secs, "per_second": units as f64 / secs,
        "fhirvault_cpu_us": per_unit(used[0]), "primary_cpu_us": per_unit(used[1]),
        "standby_cpu_us": per_unit(used[2])})
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 8);
    let patients = env_num("BENCH_PATIENTS", 2_000);
    let conc = env_num("BENCH_CONC", 8) as usize;
    eprintln!(
        "scaling bench: {patients} patients (4 Observations each), {conc} clients, {secs} s per figure; CPU {}",
        support::cpu_model()
    );
    let pair = PgPair::start(false);
    let db = pair.create_db("fhir");
    pair.primary_sql("CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS");
    let owner = pair.url(&db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let migrate = ("FHIRVAULT_MIGRATION_DATABASE_URL", owner.as_str());
    let app = pair.url_as("app", &db);
    let limits = ("FHIRVAULT_RATE_LIMIT_PER_MINUTE", "0");
    let primary_only = Node::start_with(&data, &app, free_port(), "primary-only", &[migrate, limits]);
    let replica_url = pair.standby_url_as("app", &db);
    let with_replica = Node::start_with(
        &data,
        &app,
        free_port(),
        "with-replica",
        &[
            migrate,
            limits,
            ("FHIRVAULT_REPLICA_DATABASE_URL", replica_url.as_str()),
        ],
    );
    let token = token(&data, &owner);
    let addr: SocketAddr = format!("127.0.0.1:{}", primary_only.port).parse().unwrap();
    let pids = [
        primary_only.child.as_ref().unwrap().id(),
        with_replica.child.as_ref().unwrap().id(),
    ];

    // the data: patients with observations, in transactions of 10 patients
    let started = Instant::now();
    let mut ids: Vec<String> = Vec::new();
    let mut c = LeanClient::connect(addr, &token);
    for first in (0..patients).step_by(10) {
        let bundle = patients_bundle(first, 10.min(patients - first)).to_string();
        let (status, body) = c.request_body("POST", "/fhir", Some(bundle.as_bytes()));
        assert_eq!(status, 200);
        for e in body.unwrap()["entry"].as_array().unwrap() {
            let loc = e["response"]["location"].as_str().unwrap();
            if let Some(rest) = loc.strip_prefix("Patient/") {
                ids.push(rest.split('/').next().unwrap().to_string());
            }
        }
    }
    eprintln!(
        "  loaded {} resources in {:.1}s",
        patients * 5,
        started.elapsed().as_secs_f64()
    );
    // as autovacuum would have by now in a running deployment: plans from real statistics
    pair.primary_sql_on(&db, "VACUUM ANALYZE");

    let mut figures = Vec::new();
    let pick = |i: u64| ids[(i.wrapping_mul(2_654_435_761) % ids.len() as u64) as usize].clone();
    let (n, s, used) = measured(pids, &pair, || {
        closed_loop(addr, &token, conc, secs, |c, i| {
            assert_eq!(c.request("GET", &format!("/fhir/Patient/{}", pick(i)), None), 200);
        })
    });
    figures.push(figure("read by id", "request", n, s, used));
    let (n, s, used) = measured(pids, &pair, || {
        closed_loop(addr, &token, conc, secs, |c, i| {
            let path = format!("/fhir/Observation?subject=Patient/{}&_count=20", pick(i));
            assert_eq!(c.request("GET", &path, None), 200);
        })
    });
    figures.push(figure("search Observation?subject=", "request", n, s, used));
    let (n, s, used) = measured(pids, &pair, || {
        closed_loop(addr, &token, conc, secs, |c, i| {
            let path = format!("/fhir/Patient?family=Scale{}", i % 500);
            assert_eq!(c.request("GET", &path, None), 200);
        })
    });
    figures.push(figure("search Patient?family= (blind index)", "request", n, s, used));
    let (n, s, used) = measured(pids, &pair, || {
        closed_loop(addr, &token, conc, secs, |c, i| {
            let body = support::patient(1_000_000 + i).to_string();
            assert_eq!(c.request("POST", "/fhir/Patient", Some(body.as_bytes())), 201);
        })
    });
    figures.push(figure("create Patient", "request", n, s, used));
    let (n, s, used) = measured(pids, &pair, || {
        let bundles = closed_loop(addr, &token, conc.min(4), secs, |c, i| {
            let body = patients_bundle(5_000_000 + i * 4, 4).to_string();
            assert_eq!(c.request("POST", "/fhir", Some(body.as_bytes())), 200);
        });
        bundles * 20
    });
    figures.push(figure("transaction entry (20 per bundle)", "entry", n, s, used));
    // a system-level export of everything stored, start to manifest
    let stored = {
        let mut c = LeanClient::connect(addr, &token);
        let count = |c: &mut LeanClient, t: &str| -> u64 {
            c.request_body("GET", &format!("/fhir/{t}?_summary=count"), None)
                .1
                .unwrap()["total"]
                .as_u64()
                .unwrap()
        };
        count(&mut c, "Patient") + count(&mut c, "Observation")
    };
    let http = reqwest::blocking::Client::new();
    let (n, s, used) = measured(pids, &pair, || {
        let kick = http
            .get(format!("http://{addr}/fhir/$export?_type=Patient,Observation"))
            .bearer_auth(&token)
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .unwrap();
        assert_eq!(kick.status().as_u16(), 202, "{:?}", kick.text());
        let status = kick.headers()["content-location"].to_str().unwrap().to_string();
        loop {
            let r = http.get(&status).bearer_auth(&token).send().unwrap();
            if r.status().as_u16() == 200 {
                break;
            }
            assert_eq!(r.status().as_u16(), 202);
            std::thread::sleep(Duration::from_millis(100));
        }
        stored
    });
    figures.push(figure("exported resource", "resource", n, s, used));

    // a search-heavy mix, without and with the replica
    let mix = |addr: SocketAddr| {
        let token = &token;
        let pick = &pick;
        move || {
            closed_loop(addr, token, conc, secs, |c, i| {
                let path = match i % 10 {
                    0 => format!("/fhir/Patient/{}", pick(i)),
                    k if k % 2 == 0 => format!("/fhir/Observation?subject=Patient/{}&_count=20", pick(i)),
                    _ => format!("/fhir/Patient?family=Scale{}&_count=20", i % 500),
                };
                assert_eq!(c.request("GET", &path, None), 200);
            })
        }
    };
    let (n, s, used) = measured(pids, &pair, mix(addr));
    let without = figure("search mix, primary only", "request", n, s, used);
    let replica_addr: SocketAddr = format!("127.0.0.1:{}", with_replica.port).parse().unwrap();
    let (n, s, used) = measured(pids, &pair, mix(replica_addr));
    let with = figure("search mix, with the replica", "request", n, s, used);
    let ratio = with["primary_cpu_us"].as_f64().unwrap() / without["primary_cpu_us"].as_f64().unwrap().max(1e-9);
    eprintln!("  primary CPU per request with the replica / without: {ratio:.2}");
    let out = json!({
        "provenance": support::provenance("scaling"),
        "patients": patients, "concurrency": conc, "seconds_per_figure": secs,
        "request_costs": figures,
        "replica": {"without": without, "with": with, "primary_cpu_ratio_with_vs_without": ratio},
    });
    drop(with_replica);
    drop(primary_only);
    support::write_results("scaling", &out);
}
