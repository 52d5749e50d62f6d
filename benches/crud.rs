//! Two figures that line fhirvault up with the outside world, on SQLite and PostgreSQL:
//!
//! * The CRUD iteration of HealthSamurai's public FHIR server benchmark
//!   (github.com/HealthSamurai/fhir-server-performance-benchmark, `k6/crud.js`): per iteration,
//!   POST nine linked resources (Patient, Location, Organization, Practitioner, Encounter,
//!   Observation, MedicationRequest, Claim, ExplanationOfBenefit, references set to the ones
//!   just created, as the script does), GET each, PUT each with a change, DELETE each in reverse
//!   order: 36 requests. Reported as requests per second, like the published Aidbox, HAPI and
//!   Medplum figures (theirs on 8 vCPU with 300 virtual users; ours on this machine), and against
//!   the HTTP ceiling of an in-memory actix route with the same client in the same run. Seeds are
//!   the official R4 examples of those types (tests/data/r4-examples).
//! * Crypto: sealing and opening a resource (AES-256-GCM with its row-bound AAD) at resource
//!   sizes, against `openssl speed -evp aes-256-gcm` at the same sizes in the same run, and whether
//!   the CPU offers AES-NI and CLMUL (the `aes-gcm` crate uses them when it does).
//!
//! Run: `cargo bench --bench crud` (`BENCH_SECS`, `BENCH_CONC`). Writes
//! benches/results/crud-<date>.json.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use fhirvault::crypto::Aad;
use serde_json::{json, Value};
use std::time::Instant;
use support::{env_num, throughput, LeanClient};

const TYPES: [(&str, &str); 9] = [
    ("Patient", "Patient-ihe-pcd.json"),
    ("Location", "Location-ukp.json"),
    ("Organization", "Organization-hl7pay.json"),
    ("Practitioner", "Practitioner-xcda-author.json"),
    ("Encounter", "Encounter-example.json"),
    ("Observation", "Observation-eye-color.json"),
    ("MedicationRequest", "MedicationRequest-medrx002.json"),
    ("Claim", "Claim-860150.json"),
    ("ExplanationOfBenefit", "ExplanationOfBenefit-EB3501.json"),
];

fn seed(file: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/r4-examples")
        .join(file);
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let m = v.as_object_mut().unwrap();
    m.remove("id");
    m.remove("meta");
    v
}

/// Sets `path` (dotted, with list indexes) to a reference, creating nothing that is absent
/// beyond the last step (as the benchmark's `jsonPatch` does for its own seeds).
fn set_reference(v: &mut Value, path: &str, target: &str) {
    let mut node = v;
    for step in path.split('.') {
        node = match step.parse::<usize>() {
            Ok(i) => {
                let Some(a) = node.as_array_mut() else { return };
                if a.len() <= i {
                    return;
                }
                &mut a[i]
            }
            Err(_) => {
                let Some(m) = node.as_object_mut() else { return };
                m.entry(step.to_string()).or_insert_with(|| json!({}))
            }
        };
    }
    *node = json!(target);
}

/// The references crud.js sets on each seed: (type, path, referenced type).
const LINKS: &[(&str, &str, &str)] = &[
    ("Encounter", "subject.reference", "Patient"),
    ("Encounter", "serviceProvider.reference", "Organization"),
    ("Observation", "subject.reference", "Patient"),
    ("Observation", "encounter.reference", "Encounter"),
    ("MedicationRequest", "subject.reference", "Patient"),
    ("MedicationRequest", "encounter.reference", "Encounter"),
    ("MedicationRequest", "requester.reference", "Practitioner"),
    ("Claim", "patient.reference", "Patient"),
    ("Claim", "provider.reference", "Organization"),
    ("Claim", "prescription.reference", "MedicationRequest"),
    ("ExplanationOfBenefit", "patient.reference", "Patient"),
    ("ExplanationOfBenefit", "provider.reference", "Practitioner"),
    ("ExplanationOfBenefit", "claim.reference", "Claim"),
];

/// A minimal JSON HTTP client on the lean client's connection: the body of the last answer.
fn request(c: &mut LeanClient, method: &str, path: &str, body: Option<&Value>) -> (u16, Option<Value>) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    c.request_body(method, path, bytes.as_deref())
}

fn crud_iteration(c: &mut LeanClient, seeds: &[Value]) {
    let mut made: Vec<(String, Value)> = Vec::with_capacity(9);
    for (i, (t, _)) in TYPES.iter().enumerate() {
        let mut body = seeds[i].clone();
        for (src, path, target) in LINKS.iter().filter(|(src, _, _)| src == t) {
            let _ = src;
            if let Some((_, r)) = made.iter().find(|(mt, _)| mt == target) {
                set_reference(&mut body, path, &format!("{target}/{}", r["id"].as_str().unwrap()));
            }
        }
        let (status, created) = request(c, "POST", &format!("/fhir/{t}"), Some(&body));
        assert_eq!(status, 201, "create {t}: {created:?}");
        made.push((t.to_string(), created.unwrap()));
    }
    for (t, r) in &made {
        let (status, _) = request(c, "GET", &format!("/fhir/{t}/{}", r["id"].as_str().unwrap()), None);
        assert_eq!(status, 200, "read {t}");
    }
    for (t, r) in &mut made {
        // the change crud.js makes per type
        match t.as_str() {
            "Encounter" => {
                r["status"] = json!(if r["status"] == "planned" {
                    "in-progress"
                } else {
                    "planned"
                })
            }
            "Location" | "Organization" => r["name"] = json!(format!("{}-changed", r["name"].as_str().unwrap_or(""))),
            "MedicationRequest" => r["status"] = json!(if r["status"] == "on-hold" { "draft" } else { "on-hold" }),
            "Observation" => r["issued"] = json!("2024-01-02T03:04:05Z"),
            "Patient" | "Practitioner" => {
                r["gender"] = json!(if r["gender"] == "unknown" { "other" } else { "unknown" })
            }
            _ => r["created"] = json!("2024-01-02T03:04:05Z"),
        }
        let (status, answer) = request(c, "PUT", &format!("/fhir/{t}/{}", r["id"].as_str().unwrap()), Some(r));
        assert_eq!(status, 200, "update {t}: {answer:?}");
    }
    for (t, r) in made.iter().rev() {
        let (status, _) = request(c, "DELETE", &format!("/fhir/{t}/{}", r["id"].as_str().unwrap()), None);
        assert_eq!(status, 200, "delete {t}");
    }
}

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
        |c, _| crud_iteration(c, seeds),
    );
    let rps = iterations * 36.0;
    eprintln!("  {db:?}: CRUD c{conc}: {iterations:.1} iterations/s = {rps:.0} requests/s");
    json!({"backend": format!("{db:?}"), "concurrency": conc, "iterations_per_sec": iterations, "requests_per_sec": rps})
}

/// `openssl speed -evp aes-256-gcm` at `bytes`: bytes per second.
fn openssl_speed(bytes: usize) -> Option<f64> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-evp", "aes-256-gcm", "-seconds", "1", "-bytes"])
        .arg(bytes.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("AES-256-GCM") || l.starts_with("aes-256-gcm"))?;
    let k = line.split_whitespace().last()?.trim_end_matches('k');
    k.parse::<f64>().ok().map(|v| v * 1000.0)
}

fn crypto(secs: u64) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let keys = fhirvault::crypto::KeyFile::open_or_create(&dir.path().join("k")).unwrap();
    let cipher = fhirvault::crypto::Cipher::from_provider(&keys).unwrap();
    let aes_ni = std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq");
    let mut rows = Vec::new();
    for size in [256usize, 1024, 4096, 16384] {
        let plain = vec![b'x'; size];
        let aad = Aad {
            table: "resource_versions",
            resource_type: "Observation",
            logical_id: "0f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2910",
            version_id: 1,
        };
        let sealed = cipher.seal(&aad, &plain).unwrap();
        let seal = throughput(
            1,
            secs,
            |_| (),
            |_, _| {
                std::hint::black_box(cipher.seal(&aad, &plain).unwrap());
            },
        );
        let open = throughput(
            1,
            secs,
            |_| (),
            |_, _| {
                std::hint::black_box(cipher.open(&aad, &sealed).unwrap());
            },
        );
        let ours = seal * size as f64;
        let openssl = openssl_speed(size);
        eprintln!(
            "  crypto {size:>5} B: seal {seal:>9.0}/s ({:.0} MB/s)  open {open:>9.0}/s  openssl {:.0} MB/s  ratio {:.2}",
            ours / 1e6,
            openssl.unwrap_or(0.0) / 1e6,
            openssl.map(|o| ours / o).unwrap_or(0.0)
        );
        rows.push(json!({
            "bytes": size, "seal_per_sec": seal, "open_per_sec": open,
            "seal_bytes_per_sec": ours, "openssl_bytes_per_sec": openssl,
            "seal_ratio_vs_openssl": openssl.map(|o| ours / o),
        }));
    }
    json!({"cpu_has_aes_ni_and_clmul": aes_ni, "sizes": rows})
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 5);
    let conc = env_num("BENCH_CONC", 16) as usize;
    let seeds: Vec<Value> = TYPES.iter().map(|(_, f)| seed(f)).collect();
    eprintln!(
        "CRUD bench (HealthSamurai's crud.js iteration), {secs}s, c{conc}; CPU {}",
        support::cpu_model()
    );
    let started = Instant::now();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        results.push(bench_backend(db, secs, conc, &seeds));
    }
    let crypto = crypto(1);
    let mut out = support::provenance("crud");
    out["crud"] = Value::Array(results);
    out["crypto"] = crypto;
    support::write_results("crud", &out);
    eprintln!("({:.0}s)", started.elapsed().as_secs_f64());
}
