//! Bulk Data export: resources exported per second and the export's peak resident memory, with
//! 10,000 and with 100,000 resources stored (Synthea-shaped patients), on SQLite and
//! PostgreSQL. The baseline, in the same run: a raw keyset-paged SELECT of the same current
//! rows plus their decryption (what any export must at least do). Targets (issue 8): at least
//! 0.5 of the baseline, and peak memory growing by less than 50 MB from 10,000 to 100,000.
//!
//! The export runs a whole job (search pages, NDJSON lines, sealed chunks, fsync of each file)
//! on the bench's thread; memory is the process's high-water mark (`VmHWM`, reset through
//! `/proc/self/clear_refs` before each measured step).
//!
//! Run: `cargo bench --bench export` (`BENCH_EXPORT_SMALL`, `BENCH_EXPORT_LARGE`, `BENCH_BACKENDS`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use diesel::prelude::*;
use serde_json::{json, Value};
use std::time::Instant;
use support::env_num;

/// A memory figure of this process from /proc/self/status, in kB (`VmHWM`: the peak since
/// the last reset; `VmRSS`: now).
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = diesel::sql_types::Text)]
    resource_type: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    logical_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    version_id: i64,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    content: Vec<u8>,
}

/// The baseline: every current version read by a keyset-paged SELECT and decrypted. Returns
/// (rows, seconds).
fn raw_select_and_decrypt(s: &TestServer) -> (u64, f64) {
    let cipher = s.store.cipher();
    let started = Instant::now();
    let mut n = 0u64;
    let mut after = (String::new(), String::new());
    let sql = |p: &str| {
        format!(
            "SELECT v.resource_type, v.logical_id, v.version_id, v.content FROM resources r \
             JOIN resource_versions v ON v.resource_type = r.resource_type AND v.logical_id = r.logical_id \
             AND v.version_id = r.version_id WHERE r.deleted = false AND r.resource_type <> 'AuditEvent' \
             AND (r.resource_type, r.logical_id) > ({p}) ORDER BY r.resource_type, r.logical_id LIMIT 1000"
        )
    };
    let mut sqlite;
    let mut pg;
    enum C<'a> {
        S(&'a mut diesel::SqliteConnection),
        P(&'a mut diesel::PgConnection),
    }
    let mut conn = match s.db.db {
        Db::Sqlite => {
            sqlite = diesel::SqliteConnection::establish(s.db.database_url.trim_start_matches("sqlite://")).unwrap();
            C::S(&mut sqlite)
        }
        Db::Postgres => {
            pg = diesel::PgConnection::establish(&s.db.database_url).unwrap();
            C::P(&mut pg)
        }
    };
    loop {
        use diesel::sql_types::Text;
        let rows: Vec<Row> = match &mut conn {
            C::S(c) => diesel::sql_query(sql("?, ?"))
                .bind::<Text, _>(&after.0)
                .bind::<Text, _>(&after.1)
                .load(*c)
                .unwrap(),
            C::P(c) => diesel::sql_query(sql("$1, $2"))
                .bind::<Text, _>(&after.0)
                .bind::<Text, _>(&after.1)
                .load(*c)
                .unwrap(),
        };
        let Some(last) = rows.last() else { break };
        after = (last.resource_type.clone(), last.logical_id.clone());
        for r in &rows {
            let aad = fhirvault::crypto::Aad {
                table: fhirvault::store::VERSIONS_TABLE,
                resource_type: &r.resource_type,
                logical_id: &r.logical_id,
                version_id: r.version_id,
            };
            let plain = cipher
                .open(&aad, &fhirvault::crypto::Sealed::from_stored(r.content.clone()))
                .unwrap();
            std::hint::black_box(plain);
            n += 1;
        }
    }
    (n, started.elapsed().as_secs_f64())
}

/// One system-level export of every type, run to completion on this thread: (resources,
/// seconds, resident memory before it and at its peak, in kB).
fn export_once(s: &TestServer, exporter: &fhirvault::bulk::Exporter) -> (u64, f64, u64, u64) {
    let status = common::export_kick_off(s, "/$export");
    reset_peak_rss();
    let before = status_kb("VmRSS:");
    let started = Instant::now();
    assert!(exporter.run_next_job().unwrap());
    let secs = started.elapsed().as_secs_f64();
    let peak = status_kb("VmHWM:");
    let manifest = s.get(&status).json();
    let n: u64 = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(s.delete(&status).status, 202);
    (n, secs, before, peak)
}

fn measure(s: &TestServer, exporter: &fhirvault::bulk::Exporter, stored: usize) -> Value {
    let (raw_n, raw_secs) = raw_select_and_decrypt(s);
    let (n, secs, before, peak) = export_once(s, exporter);
    assert_eq!(n, raw_n, "the export holds every current resource");
    let ratio = (n as f64 / secs) / (raw_n as f64 / raw_secs);
    eprintln!(
        "    {stored} stored: export {:.0}/s, raw SELECT + decrypt {:.0}/s, ratio {ratio:.2}; \
         RSS {} MB before, peak {} MB",
        n as f64 / secs,
        raw_n as f64 / raw_secs,
        before / 1024,
        peak / 1024
    );
    json!({
        "resources": n,
        "export_per_sec": n as f64 / secs,
        "raw_select_decrypt_per_sec": raw_n as f64 / raw_secs,
        "ratio": ratio,
        "rss_before_mb": before as f64 / 1024.0,
        "peak_rss_mb": peak as f64 / 1024.0,
        "export_rss_mb": peak.saturating_sub(before) as f64 / 1024.0,
    })
}

fn bench_backend(db: Db, small: usize, large: usize) -> Value {
    let s = TestServer::start_with(
        db,
        fhirvault::config::ConfigLayer {
            export_workers: Some(0),
            ..Default::default()
        },
    );
    let exporter = common::exporter(&s);
    let token = s.token("system/*.cruds", None);
    let (mut seed, mut stored, mut ids) = (1u64, 0usize, Vec::new());
    eprintln!("  {db:?}:");
    support::load_until(&s, &token, &mut seed, &mut stored, small, &mut ids);
    let at_small = measure(&s, &exporter, stored);
    support::load_until(&s, &token, &mut seed, &mut stored, large, &mut ids);
    let at_large = measure(&s, &exporter, stored);
    // what the export itself took above the process's memory before it, small vs large
    let growth = at_large["export_rss_mb"].as_f64().unwrap() - at_small["export_rss_mb"].as_f64().unwrap();
    let peak_growth = at_large["peak_rss_mb"].as_f64().unwrap() - at_small["peak_rss_mb"].as_f64().unwrap();
    eprintln!("    export memory growth {growth:.1} MB (process peak {peak_growth:.1} MB, data loading included)");
    json!({
        "backend": format!("{db:?}"),
        "small": at_small,
        "large": at_large,
        "export_rss_growth_mb": growth,
        "process_peak_rss_growth_mb": peak_growth,
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let (small, large) = if support::smoke() {
        (300, 900)
    } else {
        (
            env_num("BENCH_EXPORT_SMALL", 10_000) as usize,
            env_num("BENCH_EXPORT_LARGE", 100_000) as usize,
        )
    };
    eprintln!(
        "export bench: system-level $export at {small} and {large} resources; CPU {}",
        support::cpu_model()
    );
    let only = std::env::var("BENCH_BACKENDS").unwrap_or_default().to_lowercase();
    let mut results = Vec::new();
    for db in [Db::Sqlite, Db::Postgres] {
        if !only.is_empty() && !only.contains(&format!("{db:?}").to_lowercase()) {
            continue;
        }
        results.push(bench_backend(db, small, large));
    }
    let mut out = support::provenance("export");
    out["backends"] = Value::Array(results);
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    support::write_results("export", &out);
}
