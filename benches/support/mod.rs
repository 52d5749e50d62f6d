//! What the benches share: a lean HTTP client, a throughput loop and the test data.
#![allow(dead_code)]

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
            auth: format!("Authorization: Bearer {token}\r\n"),
        }
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
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n{}", self.host, self.auth);
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
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut sink = vec![0u8; len];
        self.stream.read_exact(&mut sink).unwrap();
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
