//! What the benches share: a lean HTTP client, a throughput loop and the test data.
#![allow(dead_code)]

pub mod crud;
pub mod raw;

use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A minimal HTTP/1.1 keep-alive client, so that the load generator (which shares the CPU with
/// the server here) costs as little as possible: one connection, one write per request, a read
/// of the headers and of `Content-Length` bytes. Used for fhirvault and the HTTP ceiling alike.
pub struct LeanClient {
    stream: std::io::BufReader<std::net::TcpStream>,
    host: String,
    auth: String,
}

impl LeanClient {
    pub fn connect(addr: std::net::SocketAddr, token: &str) -> LeanClient {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        LeanClient {
            stream: std::io::BufReader::with_capacity(64 * 1024, s),
            host: addr.to_string(),
            auth: if token.is_empty() {
                String::new()
            } else {
                format!("Authorization: Bearer {token}\r\n")
            },
        }
    }

    /// A client of the FHIR server at `base` (`http://host:port/path`; plain HTTP), with a bearer
    /// token or none (`""`); also returns the base's path (`/path`, or `""`).
    pub fn connect_url(base: &str, token: &str) -> (LeanClient, String) {
        let rest = base
            .strip_prefix("http://")
            .expect("the target must be an http:// URL (put a TLS gateway's plain side in front)");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
            None => (rest, String::new()),
        };
        use std::net::ToSocketAddrs;
        let addr = authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve {authority}"));
        let mut c = LeanClient::connect(addr, token);
        c.host = authority.to_string();
        (c, path)
    }

    /// Sends a request and returns the status, discarding the body.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> u16 {
        self.exchange(method, path, body, false).0
    }

    /// Sends a request and returns the status and the JSON body, if any.
    pub fn request_body(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Option<serde_json::Value>) {
        self.exchange(method, path, body, true)
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        keep: bool,
    ) -> (u16, Option<serde_json::Value>) {
        use std::io::{BufRead, Read, Write};
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/fhir+json\r\n{}",
            self.host, self.auth
        );
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/fhir+json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        self.stream.get_mut().write_all(&bytes).unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let mut len = 0usize;
        let mut chunked = false;
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                } else if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        let mut sink = vec![0u8; len];
        if chunked {
            // other servers answer in chunks: size line, data, CRLF; a zero size ends it
            sink.clear();
            loop {
                line.clear();
                self.stream.read_line(&mut line).unwrap();
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16).unwrap();
                if size == 0 {
                    line.clear();
                    self.stream.read_line(&mut line).unwrap();
                    break;
                }
                let start = sink.len();
                sink.resize(start + size, 0);
                self.stream.read_exact(&mut sink[start..]).unwrap();
                line.clear();
                self.stream.read_line(&mut line).unwrap();
            }
        } else {
            self.stream.read_exact(&mut sink).unwrap();
        }
        (status, if keep { serde_json::from_slice(&sink).ok() } else { None })
    }
}

pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `op` on `threads` threads for `secs` seconds; returns operations per second.
pub fn throughput<S: Send>(
    threads: usize,
    secs: u64,
    setup: impl Fn(usize) -> S + Sync,
    op: impl Fn(&mut S, u64) + Sync,
) -> f64 {
    let count = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (count, setup, op) = (&count, &setup, &op);
            scope.spawn(move || {
                let mut state = setup(t);
                let mut i = t as u64 * 1_000_003;
                while Instant::now() < deadline {
                    op(&mut state, i);
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

pub fn patient(i: u64) -> serde_json::Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:bench", "value": format!("mrn-{i}")}],
        "name": [{"family": format!("Family{i}"), "given": ["Given", "Middle"]}],
        "gender": "female",
        "birthDate": "1980-02-03",
        "address": [{"line": ["1 Main Street"], "city": "Springfield", "postalCode": "12345"}],
        "telecom": [{"system": "phone", "value": "555-0100"}]
    })
}

/// As in production: on PostgreSQL the server runs as a role that row-level security binds,
/// and migrations run as the owner (whose URL the TestDb keeps, for raw baselines).
pub fn serve_as_rls_role(tdb: &crate::common::TestDb, layer: &mut fhirvault::config::ConfigLayer) {
    if tdb.db == crate::common::Db::Postgres {
        let name = tdb.pg_name.clone().unwrap();
        let role = format!("app_{name}");
        crate::common::pg().admin(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"));
        layer.database_url = Some(crate::common::pg().url_as(&role, &name));
        layer.migration_database_url = Some(crate::common::pg().url(&name));
    }
}

/// Creates `rows` patients over HTTP from four threads; returns their ids.
pub fn preload_patients(s: &crate::common::TestServer, rows: u64) -> Vec<String> {
    let started = Instant::now();
    let ids: Vec<String> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                scope.spawn(move || {
                    (0..rows / 4)
                        .map(|i| {
                            s.post("/Patient", &patient(t * rows + i)).json()["id"]
                                .as_str()
                                .unwrap()
                                .to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "  preloaded {} patients in {:.1}s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    ids
}

/// What every bench does first: nothing when `cargo test --benches` only lists benches
/// (returns false), and durable PostgreSQL commits as in production (the test harness turns
/// fsync off).
pub fn start() -> bool {
    if std::env::args().any(|a| a == "--list") {
        return false;
    }
    if smoke() {
        smoke_sizes();
    }
    if std::env::var("PG_FSYNC").is_err() {
        std::env::set_var("PG_FSYNC", "on");
    }
    true
}

/// The CPU model, for the results and the log line.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}

/// Where a result comes from: the bench, the git revision, the CPU and the load average.
pub fn provenance(bench: &str) -> serde_json::Value {
    json!({
        "bench": bench,
        "git_revision": std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        "cpu": cpu_model(),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

/// `BENCH_SMOKE=1`: every bench runs tiny (sizes below, unless set), writes no results file, and
/// fails only on errors. What .ci/run runs (`cargo test --benches`, debug build).
pub fn smoke() -> bool {
    std::env::var("BENCH_SMOKE").is_ok_and(|v| v != "0")
}

/// The smoke sizes, set where the caller did not set them.
fn smoke_sizes() {
    for (k, v) in [
        ("BENCH_SECS", "1"),
        ("BENCH_ROWS", "200"),
        ("BENCH_PATIENTS", "200"),
        ("BENCH_OBS", "1"),
        ("BENCH_GENERATED", "2"),
        ("BENCH_SYNTHEA", "2"),
        ("BENCH_CONC", "4"),
        ("BENCH_SCALE_SMALL", "500"),
        ("BENCH_SCALE_LARGE", "2000"),
        ("BENCH_IMPORT_SMALL", "100"),
        ("BENCH_IMPORT_LARGE", "300"),
    ] {
        if std::env::var(k).is_err() {
            std::env::set_var(k, v);
        }
    }
}

/// Writes a bench's results to benches/results/<name>-<date>.json (not in smoke runs).
pub fn write_results(name: &str, out: &serde_json::Value) {
    if smoke() {
        eprintln!("smoke run: results not written");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.json", chrono::Utc::now().format("%Y-%m-%d")));
    std::fs::write(&path, serde_json::to_string_pretty(out).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}

/// A small deterministic generator (xorshift64*): the same data for the same seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A version-4-shaped UUID from the generator.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
}

/// A Synthea-shaped patient as one transaction Bundle of about `size` entries (every entry a POST
/// with a `urn:uuid` fullUrl, as Synthea writes them): the patient, the organization and the
/// practitioner who care for them, and encounters, each with observations, a condition, a
/// medication request and a claim referencing them. Deterministic from `seed`.
pub fn synthetic_patient(seed: u64, size: usize) -> serde_json::Value {
    let mut rng = Rng::new(seed);
    let mut entries = Vec::with_capacity(size);
    let add = |rng: &mut Rng, entries: &mut Vec<serde_json::Value>, r: serde_json::Value| -> String {
        let full = format!("urn:uuid:{}", rng.uuid());
        let t = r["resourceType"].as_str().unwrap().to_string();
        entries.push(json!({"fullUrl": full, "resource": r, "request": {"method": "POST", "url": t}}));
        full
    };
    const FAMILIES: [&str; 8] = [
        "Koepp",
        "Hartmann",
        "Tremblay",
        "Marquardt",
        "Smith",
        "Okuneva",
        "Bode",
        "Lind",
    ];
    const GIVEN: [&str; 6] = ["Abdul", "Addie", "Adolfo", "Bettye", "Cyril", "Dorthy"];
    let birth = format!(
        "19{:02}-{:02}-{:02}",
        30 + rng.below(70),
        1 + rng.below(12),
        1 + rng.below(28)
    );
    let patient = add(
        &mut rng,
        &mut entries,
        json!({"resourceType": "Patient",
               "identifier": [{"system": "https://github.com/synthetichealth/synthea", "value": format!("gen-{seed}")}],
               "name": [{"use": "official", "family": FAMILIES[(seed % 8) as usize], "given": [GIVEN[(seed % 6) as usize]]}],
               "gender": if seed.is_multiple_of(2) { "female" } else { "male" }, "birthDate": birth,
               "address": [{"city": "Springfield", "state": "MA", "postalCode": format!("0{:04}", seed % 10_000)}]}),
    );
    let org = add(
        &mut rng,
        &mut entries,
        json!({"resourceType": "Organization", "name": format!("Clinic {}", seed % 97)}),
    );
    let practitioner = add(
        &mut rng,
        &mut entries,
        json!({"resourceType": "Practitioner", "name": [{"family": FAMILIES[((seed + 3) % 8) as usize], "prefix": ["Dr."]}]}),
    );
    const LABS: [(&str, &str, &str); 4] = [
        ("8867-4", "Heart rate", "/min"),
        ("8310-5", "Body temperature", "Cel"),
        ("29463-7", "Body weight", "kg"),
        ("8302-2", "Body height", "cm"),
    ];
    let mut visit = 0u64;
    while entries.len() < size {
        visit += 1;
        let day = format!(
            "20{:02}-{:02}-{:02}",
            10 + visit % 14,
            1 + rng.below(12),
            1 + rng.below(28)
        );
        let encounter = add(
            &mut rng,
            &mut entries,
            json!({"resourceType": "Encounter", "status": "finished",
                   "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                   "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]}],
                   "subject": {"reference": patient}, "serviceProvider": {"reference": org},
                   "participant": [{"individual": {"reference": practitioner}}],
                   "period": {"start": format!("{day}T09:00:00Z"), "end": format!("{day}T09:30:00Z")}}),
        );
        for (code, display, unit) in LABS.iter().take(1 + rng.below(4) as usize) {
            let value = 20 + rng.below(80);
            add(
                &mut rng,
                &mut entries,
                json!({"resourceType": "Observation", "status": "final",
                       "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                       "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
                       "subject": {"reference": patient}, "encounter": {"reference": encounter},
                       "effectiveDateTime": format!("{day}T09:10:00Z"),
                       "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}),
            );
        }
        add(
            &mut rng,
            &mut entries,
            json!({"resourceType": "Condition", "subject": {"reference": patient}, "encounter": {"reference": encounter},
                   "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}, "onsetDateTime": day.clone()}),
        );
        let prescription = add(
            &mut rng,
            &mut entries,
            json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                   "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]},
                   "subject": {"reference": patient}, "encounter": {"reference": encounter},
                   "requester": {"reference": practitioner}, "authoredOn": day.clone()}),
        );
        add(
            &mut rng,
            &mut entries,
            json!({"resourceType": "Claim", "status": "active", "use": "claim",
                   "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
                   "patient": {"reference": patient}, "created": format!("{day}T10:00:00Z"),
                   "provider": {"reference": org}, "priority": {"coding": [{"code": "normal"}]},
                   "prescription": {"reference": prescription},
                   "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": "Self-pay"}}],
                   "item": [{"sequence": 1, "productOrService": {"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]},
                             "encounter": [{"reference": encounter}]}]}),
        );
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// WAL fsyncs so far on a PostgreSQL database (PostgreSQL 14+ `pg_stat_wal`); `None` elsewhere.
pub fn wal_syncs(url: &str) -> Option<i64> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Syncs {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        wal_sync: i64,
    }
    if !url.starts_with("postgres") {
        return None;
    }
    let mut c = diesel::PgConnection::establish(url).ok()?;
    diesel::sql_query("SELECT wal_sync FROM pg_stat_wal")
        .get_result::<Syncs>(&mut c)
        .ok()
        .map(|s| s.wal_sync)
}

/// Posts patient bundles from two clients until `total` resources are stored; returns the
/// patients' ids.
pub fn load_until(
    s: &crate::common::TestServer,
    token: &str,
    next_seed: &mut u64,
    stored: &mut usize,
    total: usize,
    ids: &mut Vec<String>,
) {
    let started = Instant::now();
    let from = *stored;
    while *stored < total {
        let seeds: Vec<u64> = (0..2).map(|k| *next_seed + k).collect();
        *next_seed += 2;
        let results: Vec<(usize, String)> = std::thread::scope(|scope| {
            let hs: Vec<_> = seeds
                .iter()
                .map(|&seed| {
                    let (addr, token) = (s.addr, token);
                    scope.spawn(move || {
                        let bundle = synthetic_patient(seed, 300);
                        let mut c = LeanClient::connect(addr, token);
                        let (status, body) = c.request_body("POST", "/fhir", Some(bundle.to_string().as_bytes()));
                        assert_eq!(status, 200);
                        let body = body.unwrap();
                        let entries = body["entry"].as_array().unwrap();
                        let id = entries[0]["response"]["location"]
                            .as_str()
                            .unwrap()
                            .split('/')
                            .nth(1)
                            .unwrap()
                            .to_string();
                        (entries.len(), id)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (n, id) in results {
            *stored += n;
            ids.push(id);
        }
        if (*stored / 50_000) != ((*stored).saturating_sub(600) / 50_000) {
            eprintln!(
                "    {} resources stored ({:.0}/s)",
                stored,
                (*stored - from) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
}
