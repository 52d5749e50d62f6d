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

/// An Observation for a preloaded patient (the shape the create figures use).
fn observation(i: u64, subject: &str) -> serde_json::Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": format!("Patient/{subject}")},
        "effectiveDateTime": "2024-05-06T07:08:09Z",
        "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
    })
}

fn bench_backend(db: Db, rows: u64, secs: u64, read_levels: &[usize], create_levels: &[usize]) -> serde_json::Value {
    // As in production: on PostgreSQL the server runs as a role that row-level security binds
    // (migrations as the owner); the raw baselines below run as the owner, without RLS.
    let tdb = common::TestDb::new(db);
    let max_conc = read_levels.iter().chain(create_levels).copied().max().unwrap_or(1);
    let mut layer = ConfigLayer {
        pool_size: Some(max_conc.min(64) as u32),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let ids = support::preload_patients(&s, rows);
    // the owner's URL (TestDb keeps it), for the raw baselines
    let url = s.db.database_url.clone();
    let cipher = s.store.cipher();
    let addr = s.addr;
    let token = s.token("system/*.cruds", None);
    let pick = |i: u64| &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];

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
    // the audit INSERT every read also costs: one durable row of an event's size per read
    // (autocommit, no batching), into a table of the benchmark's own
    {
        let mut c = raw_conn(&url);
        let blob = if db == Db::Postgres { "BYTEA" } else { "BLOB" };
        use diesel::connection::SimpleConnection;
        match &mut c {
            DbConnection::Pg(c) => c.batch_execute(&format!(
                "CREATE TABLE bench_audit (id TEXT PRIMARY KEY, content {blob})"
            )),
            DbConnection::Sqlite(c) => c.batch_execute(&format!(
                "CREATE TABLE bench_audit (id TEXT PRIMARY KEY, content {blob})"
            )),
        }
        .unwrap();
    }
    let audit_row = vec![7u8; 1200];
    let next_audit_id = std::sync::atomic::AtomicU64::new(0);
    let audit_insert = |c: &mut DbConnection, _t: usize, _i: u64| {
        let q = diesel::sql_query("INSERT INTO bench_audit (id, content) VALUES ($1, $2)");
        let id = next_audit_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        match c {
            DbConnection::Pg(c) => q
                .bind::<diesel::sql_types::Text, _>(&id)
                .bind::<diesel::sql_types::Binary, _>(&audit_row)
                .execute(c),
            DbConnection::Sqlite(c) => diesel::sql_query("INSERT INTO bench_audit (id, content) VALUES (?, ?)")
                .bind::<diesel::sql_types::Text, _>(&id)
                .bind::<diesel::sql_types::Binary, _>(&audit_row)
                .execute(c),
        }
        .unwrap();
    };
    let mut reads = Vec::new();
    for &conc in read_levels {
        let http = throughput(
            conc,
            secs,
            |_| LeanClient::connect(addr, &token),
            |c, i| assert_eq!(c.request("GET", &format!("/fhir/Patient/{}", pick(i)), None), 200),
        );
        let raw = throughput(
            conc,
            secs,
            |_| raw_conn(&url),
            |c, i| {
                std::hint::black_box(select(c, pick(i)));
            },
        );
        let raw_audit = throughput(
            conc,
            secs,
            |t| (raw_conn(&url), t),
            |(c, t), i| {
                std::hint::black_box(select(c, pick(i)));
                audit_insert(c, *t, i);
            },
        );
        let raw_decrypt = throughput(
            conc,
            secs,
            |_| raw_conn(&url),
            |c, i| {
                let id = pick(i);
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
        let store = s.store.clone();
        let store_reads = throughput(
            conc,
            secs,
            |_| (),
            |_, i| {
                std::hint::black_box(store.read(&fhirvault::store::Access::All, "Patient", pick(i)).unwrap());
            },
        );
        eprintln!(
            "  reads/s c{conc:<2}: fhirvault {http:>7.0}  raw select {raw:>7.0} ({:.2})  raw select+audit insert {raw_audit:>7.0} ({:.2})  select+decrypt {raw_decrypt:>7.0}  Store::read {store_reads:>7.0}",
            http / raw,
            http / raw_audit
        );
        reads.push(json!({
            "concurrency": conc,
            "per_sec": {"fhirvault_http": http, "store_read": store_reads, "raw_pk_select": raw,
                        "raw_pk_select_plus_audit_insert": raw_audit, "raw_pk_select_plus_decrypt": raw_decrypt},
            "ratio_vs_raw_select": http / raw,
            "ratio_vs_raw_select_plus_audit_insert": http / raw_audit,
            "ratio_vs_raw_select_plus_decrypt": http / raw_decrypt,
        }));
    }

    // creates: fhirvault over HTTP against the same rows inserted raw (current-version row, the
    // version's compartment row, the version row with ciphertext of the same plaintext and its
    // digest, the search index rows), one transaction each
    let registry = fhirvault::server::shared_registry(&s.config).unwrap();
    let compartment = fhirvault::fhir::compartment::PatientCompartment::r4().unwrap();
    let raw_create = |c: &mut DbConnection, t: &str, id: &str, value: &serde_json::Value| {
        let plain = value.to_string().into_bytes();
        let now = fhirvault::store::now();
        let aad = Aad {
            table: "resource_versions",
            resource_type: t,
            logical_id: id,
            version_id: 1,
        };
        let sealed = cipher.seal(&aad, &plain).unwrap();
        let digest = fhirvault::crypto::sha256(&plain).to_vec();
        let rows = fhirvault::search::index_rows(&registry, cipher, t, value);
        let patients: Vec<String> = if t == "Patient" {
            vec![id.to_string()]
        } else {
            compartment.patients_of(t, value).into_iter().collect()
        };
        c.transaction::<_, diesel::result::Error, _>(|c| {
            diesel::insert_into(cur::table)
                .values((
                    cur::resource_type.eq(t),
                    cur::logical_id.eq(id),
                    cur::version_id.eq(1i64),
                    cur::last_updated.eq(now),
                    cur::deleted.eq(false),
                ))
                .execute(c)?;
            for p in &patients {
                diesel::insert_into(rc::table)
                    .values((
                        rc::resource_type.eq(t),
                        rc::logical_id.eq(id),
                        rc::version_id.eq(1i64),
                        rc::patient_id.eq(p),
                    ))
                    .execute(c)?;
            }
            diesel::insert_into(rv::table)
                .values((
                    rv::resource_type.eq(t),
                    rv::logical_id.eq(id),
                    rv::version_id.eq(1i64),
                    rv::last_updated.eq(now),
                    rv::deleted.eq(false),
                    rv::method.eq("POST"),
                    rv::key_version.eq(Some(1)),
                    rv::content.eq(Some(EncryptedColumn(sealed))),
                    rv::content_sha256.eq(Some(digest)),
                ))
                .execute(c)?;
            fhirvault::store::search_index::replace(c, t, id, &rows, true)
                .map_err(|_| diesel::result::Error::RollbackTransaction)?;
            Ok(())
        })
        .unwrap();
    };
    let mut creates = Vec::new();
    for &conc in create_levels {
        let mut one = serde_json::Map::new();
        for t in ["Patient", "Observation"] {
            let body = |i: u64| {
                if t == "Patient" {
                    patient(i)
                } else {
                    observation(i, pick(i))
                }
            };
            let syncs_before = support::wal_syncs(&url);
            let http = throughput(
                conc,
                secs,
                |_| LeanClient::connect(addr, &token),
                |c, i| {
                    assert_eq!(
                        c.request("POST", &format!("/fhir/{t}"), Some(body(i).to_string().as_bytes())),
                        201
                    );
                },
            );
            // transactions per WAL fsync (PostgreSQL's group commit), counted in the same window
            let per_wal_sync = match (syncs_before, support::wal_syncs(&url)) {
                (Some(b), Some(a)) if a > b => Some(http * secs as f64 / (a - b) as f64),
                _ => None,
            };
            let raw = throughput(
                conc,
                secs,
                |th| (raw_conn(&url), th),
                |(c, th), i| {
                    raw_create(c, t, &format!("raw-{conc}-{th}-{i}"), &body(i));
                },
            );
            eprintln!(
                "  creates/s c{conc:<2} {t:<12}: fhirvault {http:>7.0}  raw insert {raw:>7.0}  ratio {:.2}",
                http / raw
            );
            if let Some(p) = per_wal_sync {
                eprintln!("    {t} creates per WAL fsync (pg_stat_wal): {p:.1}");
            }
            one.insert(
                t.to_string(),
                json!({"fhirvault_http": http, "raw_insert": raw, "ratio_vs_raw_insert": http / raw,
                       "creates_per_wal_fsync": per_wal_sync}),
            );
        }
        creates.push(json!({"concurrency": conc, "per_sec": one}));
    }
    json!({
        "backend": format!("{db:?}"),
        "rows": ids.len(),
        "reads": reads,
        "creates": creates,
    })
}

/// fdatasync operations per second on this machine's temp directory (PostgreSQL's
/// `pg_test_fsync`, one 8 kB write per sync): the unit the create figures are reported in.
fn fsyncs_per_sec() -> Option<f64> {
    let dir = tempfile::tempdir().ok()?;
    let out = std::process::Command::new(common::pg().bin.join("pg_test_fsync"))
        .args(["-s", "1", "-f"])
        .arg(dir.path().join("fsync.test"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find(|l| l.trim_start().starts_with("fdatasync") && l.contains("ops/sec"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
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
    let rows = env_num("BENCH_ROWS", 10_000);
    let (read_levels, create_levels) = if support::smoke() {
        (vec![1, 8], vec![1, 4])
    } else {
        (vec![1, 8, 32], vec![1, 16, 64])
    };
    let cpu = support::cpu_model();
    eprintln!("fhirvault REST bench: {rows} patients, {secs}s per figure, CPU {cpu}");
    let fsyncs = fsyncs_per_sec();
    eprintln!("  pg_test_fsync: {fsyncs:?} fdatasync/s");
    let mut ceilings = serde_json::Map::new();
    for &c in &read_levels {
        let ceiling = http_ceiling(secs, c);
        eprintln!("  HTTP ceiling c{c} (in-memory actix route, same client): {ceiling:.0} req/s");
        ceilings.insert(c.to_string(), json!(ceiling));
    }
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        eprintln!("{db:?}:");
        let mut r = bench_backend(db, rows, secs, &read_levels, &create_levels);
        for read in r["reads"].as_array_mut().unwrap() {
            let c = read["concurrency"].to_string();
            let ceiling = ceilings[&c].as_f64().unwrap();
            read["ratio_vs_http_ceiling"] = json!(read["per_sec"]["fhirvault_http"].as_f64().unwrap() / ceiling);
        }
        if let Some(f) = fsyncs {
            for create in r["creates"].as_array_mut().unwrap() {
                for t in ["Patient", "Observation"] {
                    let per_sec = create["per_sec"][t]["fhirvault_http"].as_f64().unwrap();
                    create["per_sec"][t]["creates_per_fsync_time"] = json!(per_sec / f);
                }
            }
        }
        results.push(r);
    }
    let rss = idle_rss_kb();
    eprintln!(
        "idle server RSS with the R4 schema compiled: {:.1} MB",
        rss as f64 / 1024.0
    );
    let mut out = support::provenance("rest");
    let more = json!({
        "http_ceiling_per_sec": ceilings,
        "fdatasync_per_sec": fsyncs,
        "backends": results,
        "idle_rss_mb": rss as f64 / 1024.0,
    });
    if let (Some(o), Some(m)) = (out.as_object_mut(), more.as_object()) {
        o.extend(m.clone());
    }
    support::write_results("rest", &out);
}
