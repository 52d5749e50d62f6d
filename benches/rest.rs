//! REST core bench: reads by id and creates through the full HTTP stack, against raw database
//! baselines measured in the same run on the same rows, on SQLite and PostgreSQL; and the idle
//! resident memory of the server with the R4 schema compiled.
//!
//! Figures are ratios (fhirvault / baseline) because these machines are noisy. Run:
//! `cargo bench --bench rest` (optionally `BENCH_SECS=5 BENCH_ROWS=5000`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use diesel::prelude::*;
use fhirvault::config::ConfigLayer;
use fhirvault::crypto::Aad;
use fhirvault::store::encrypted::EncryptedColumn;
use fhirvault::store::schema::{resource_compartments as rc, resource_versions as rv, resources as cur};
use fhirvault::store::{DbConnection, DbManager};
use serde_json::json;
use std::time::{Duration, Instant};
use support::{env_num, patient, throughput, LeanClient};

fn raw_conn(url: &str) -> DbConnection {
    DbManager::new(url).unwrap().connect().unwrap()
}

fn bench_backend(db: Db, rows: u64, secs: u64, conc: usize) -> serde_json::Value {
    // As in production: on PostgreSQL the server runs as a role that row-level security binds
    // (migrations as the owner); the raw baselines below run as the owner, without RLS.
    let tdb = common::TestDb::new(db);
    let mut layer = ConfigLayer {
        pool_size: Some(conc as u32),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let ids = support::preload_patients(&s, rows);
    // the owner's URL (TestDb keeps it), for the raw baselines
    let url = s.db.database_url.clone();
    let cipher = s.store.cipher();

    // reads: fhirvault over HTTP, with a bearer token (verified once, then cached)
    let addr = s.addr;
    let token = s.token("system/*.cruds", None);
    let http_reads = throughput(
        conc,
        secs,
        |_| LeanClient::connect(addr, &token),
        |c, i| {
            let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
            assert_eq!(c.request("GET", &format!("/fhir/Patient/{id}"), None), 200);
        },
    );
    // baseline: raw primary-key SELECT of the same encrypted rows (preloaded rows are version 1,
    // so this is an exact lookup on the unique key, on the concrete connection)
    let select = |c: &mut DbConnection, id: &str| -> (i64, EncryptedColumn) {
        let query = rv::table
            .filter(
                rv::resource_type
                    .eq("Patient")
                    .and(rv::logical_id.eq(id))
                    .and(rv::version_id.eq(1i64)),
            )
            .select((rv::version_id, rv::content));
        let (v, content): (i64, Option<EncryptedColumn>) = match c {
            DbConnection::Pg(c) => query.get_result(c),
            DbConnection::Sqlite(c) => query.get_result(c),
        }
        .unwrap();
        (v, content.unwrap())
    };
    let raw_reads = throughput(
        conc,
        secs,
        |_| raw_conn(&url),
        |c, i| {
            let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
            std::hint::black_box(select(c, id));
        },
    );
    let raw_reads_decrypt = throughput(
        conc,
        secs,
        |_| raw_conn(&url),
        |c, i| {
            let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
            let (v, sealed) = select(c, id);
            let aad = Aad {
                table: "resource_versions",
                resource_type: "Patient",
                logical_id: id,
                version_id: v,
            };
            std::hint::black_box(cipher.open(&aad, &sealed.0).unwrap());
        },
    );

    // the data path alone (no HTTP): Store::read, one round trip + decrypt + integrity check
    let store = s.store.clone();
    let store_reads = throughput(
        conc,
        secs,
        |_| (),
        |_, i| {
            let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
            std::hint::black_box(store.read(&fhirvault::store::Access::All, "Patient", id).unwrap());
        },
    );

    // creates: fhirvault over HTTP
    let http_creates = throughput(
        conc,
        secs,
        |_| LeanClient::connect(addr, &token),
        |c, i| {
            assert_eq!(
                c.request("POST", "/fhir/Patient", Some(patient(i).to_string().as_bytes())),
                201
            );
        },
    );
    // baseline: the same rows (current-version row, the version's compartment row, version row
    // with ciphertext of the same size + digest, the patient's search index rows) inserted raw,
    // one transaction each
    let sample = patient(1).to_string().into_bytes();
    let sample_json = patient(1);
    let registry = fhirvault::server::shared_registry(&s.config).unwrap();
    let raw_creates = throughput(
        conc,
        secs,
        |t| (raw_conn(&url), t),
        |(c, t), i| {
            let id = format!("raw-{t}-{i}");
            let now = fhirvault::store::now();
            let aad = Aad {
                table: "resource_versions",
                resource_type: "Patient",
                logical_id: &id,
                version_id: 1,
            };
            let sealed = cipher.seal(&aad, &sample).unwrap();
            let digest = fhirvault::crypto::sha256(&sample).to_vec();
            c.transaction::<_, diesel::result::Error, _>(|c| {
                diesel::insert_into(cur::table)
                    .values((
                        cur::resource_type.eq("Patient"),
                        cur::logical_id.eq(&id),
                        cur::version_id.eq(1i64),
                        cur::last_updated.eq(now),
                        cur::deleted.eq(false),
                    ))
                    .execute(c)?;
                diesel::insert_into(rv::table)
                    .values((
                        rv::resource_type.eq("Patient"),
                        rv::logical_id.eq(&id),
                        rv::version_id.eq(1i64),
                        rv::last_updated.eq(now),
                        rv::deleted.eq(false),
                        rv::method.eq("POST"),
                        rv::key_version.eq(Some(1)),
                        rv::content.eq(Some(EncryptedColumn(sealed))),
                        rv::content_sha256.eq(Some(digest)),
                    ))
                    .execute(c)?;
                diesel::insert_into(rc::table)
                    .values((
                        rc::resource_type.eq("Patient"),
                        rc::logical_id.eq(&id),
                        rc::version_id.eq(1i64),
                        rc::patient_id.eq(&id),
                    ))
                    .execute(c)?;
                // the same search index rows fhirvault writes for this patient (blind indexes
                // computed here, as the server computes them before its transaction)
                let rows = fhirvault::search::index_rows(&registry, cipher, "Patient", &sample_json);
                fhirvault::store::search_index::replace(c, "Patient", &id, &rows, true)
                    .map_err(|_| diesel::result::Error::RollbackTransaction)?;
                Ok(())
            })
            .unwrap();
        },
    );
    let r = json!({
        "backend": format!("{db:?}"),
        "rows": ids.len(),
        "concurrency": conc,
        "reads_per_sec": {"fhirvault_http": http_reads, "store_read": store_reads, "raw_pk_select": raw_reads, "raw_pk_select_plus_decrypt": raw_reads_decrypt},
        "store_read_ratio_vs_raw_select": store_reads / raw_reads,
        "read_ratio_vs_raw_select": http_reads / raw_reads,
        "read_ratio_vs_raw_select_plus_decrypt": http_reads / raw_reads_decrypt,
        "creates_per_sec": {"fhirvault_http": http_creates, "raw_insert": raw_creates},
        "create_ratio_vs_raw_insert": http_creates / raw_creates,
    });
    eprintln!(
        "  reads/s  c{conc}: fhirvault {http_reads:>8.0}  raw select {raw_reads:>8.0}  raw select+decrypt {raw_reads_decrypt:>8.0}  ratio {:.2} / {:.2}",
        http_reads / raw_reads,
        http_reads / raw_reads_decrypt
    );
    eprintln!(
        "  reads/s  c{conc}: Store::read (no HTTP) {store_reads:>8.0}  ratio vs raw select {:.2}",
        store_reads / raw_reads
    );
    eprintln!(
        "  creates/s c{conc}: fhirvault {http_creates:>8.0}  raw insert {raw_creates:>8.0}  ratio {:.2}",
        http_creates / raw_creates
    );
    r
}

/// The in-memory HTTP ceiling: an actix route returning the same bytes, with the same client.
fn http_ceiling(secs: u64, conc: usize) -> f64 {
    let body = patient(1).to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let srv = actix_web::HttpServer::new(move || {
                let body = body.clone();
                actix_web::App::new().route(
                    "/fhir/Patient/{id}",
                    actix_web::web::get().to(move || {
                        let body = body.clone();
                        async move {
                            actix_web::HttpResponse::Ok()
                                .content_type("application/fhir+json")
                                .body(body)
                        }
                    }),
                )
            })
            .workers(2)
            .disable_signals()
            .bind("127.0.0.1:0")
            .unwrap();
            tx.send(srv.addrs()[0]).unwrap();
            let _ = srv.run().await;
        })
    });
    let addr = rx.recv().unwrap();
    throughput(
        conc,
        secs,
        |_| LeanClient::connect(addr, "unused"),
        |c, i| {
            assert_eq!(c.request("GET", &format!("/fhir/Patient/{i}"), None), 200);
        },
    )
}

fn idle_rss_kb() -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && reqwest::blocking::get(format!("http://127.0.0.1:{port}/fhir/metadata")).is_err()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // one authenticated write, so the schema, the issuer and the pool have been used, then idle
    let token = std::process::Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .args(["token", "--scope", "system/*.cruds", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let c = reqwest::blocking::Client::new();
    let r = c
        .post(format!("http://127.0.0.1:{port}/fhir/Patient"))
        .header("content-type", "application/fhir+json")
        .header("authorization", format!("Bearer {token}"))
        .body(patient(1).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 3);
    let rows = env_num("BENCH_ROWS", 2000);
    let conc = env_num("BENCH_CONCURRENCY", 16) as usize;
    let cpu = support::cpu_model();
    eprintln!("fhirvault REST bench: {rows} patients, {secs}s per figure, concurrency {conc}, CPU {cpu}");
    let ceiling = http_ceiling(secs, conc);
    eprintln!("  HTTP ceiling (in-memory actix route, same client): {ceiling:.0} req/s");
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        eprintln!("{db:?}:");
        let mut r = bench_backend(db, rows, secs, conc);
        r["read_ratio_vs_http_ceiling"] = json!(r["reads_per_sec"]["fhirvault_http"].as_f64().unwrap() / ceiling);
        results.push(r);
    }
    let rss = idle_rss_kb();
    eprintln!(
        "idle server RSS with the R4 schema compiled: {:.1} MB",
        rss as f64 / 1024.0
    );
    let mut out = support::provenance("rest");
    let more = json!({
        "http_ceiling_per_sec": ceiling,
        "backends": results,
        "idle_rss_mb": rss as f64 / 1024.0,
    });
    if let (Some(o), Some(m)) = (out.as_object_mut(), more.as_object()) {
        o.extend(m.clone());
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
