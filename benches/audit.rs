//! Audit bench: what auditing every read costs, and how well the group-commit writer batches.
//!
//! On each backend, one database, two servers side by side: the normal one (every read waits
//! until its AuditEvent is committed) and one whose auditor records nothing (a baseline that no
//! configuration can produce). Reads by id over HTTP at concurrency 32 (and 1, 8 for context):
//! the ratio audit-on / audit-off, and the audit events made durable per commit of the writer
//! (and, on PostgreSQL, per WAL fsync counted by `pg_stat_wal` in the same window).
//!
//! A third server over the same store measures the durability floor: its auditor seals each
//! event as the real one does and makes every batch durable with one `fdatasync` of a plain
//! file, and does nothing else (no database, no chain, no index). No design that answers only
//! once the read's event is durable can do better on the machine the bench runs on.
//!
//! The ledger is one chain per node: on PostgreSQL a second ledger server (a second node with
//! its own chain, on the same database) takes half of the c32 clients, against all of them on
//! one node, to show that adding a node does not make the ledger slower.
//!
//! Run: `cargo bench --bench audit` (optionally `BENCH_SECS=5 BENCH_ROWS=5000`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{Db, TestServer};
use fhirvault::config::ConfigLayer;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use support::{env_num, throughput, LeanClient};

/// Serves `state` on a loopback port (in its own actix system); returns the address.
fn serve(state: fhirvault::api::AppState, workers: usize) -> std::net::SocketAddr {
    let state = actix_web::web::Data::new(state);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let srv = actix_web::HttpServer::new(move || fhirvault::api::app(state.clone()))
                .workers(workers)
                .disable_signals()
                .bind("127.0.0.1:0")
                .unwrap();
            tx.send(srv.addrs()[0]).unwrap();
            let _ = srv.run().await;
        })
    });
    rx.recv().unwrap()
}

fn bench_backend(db: Db, rows: u64, secs: u64) -> serde_json::Value {
    let tdb = common::TestDb::new(db);
    // the server's default pool size unless BENCH_POOL says otherwise
    let mut layer = ConfigLayer {
        pool_size: std::env::var("BENCH_POOL").ok().and_then(|v| v.parse().ok()),
        ..Default::default()
    };
    support::serve_as_rls_role(&tdb, &mut layer);
    let s = TestServer::start_on(tdb, layer);
    let ids = support::preload_patients(&s, rows);
    // the same server wiring over the same store, with another auditor
    let config = Arc::new(s.config.clone());
    let serve_with = |auditor: Arc<fhirvault::audit::Auditor>| {
        let state = fhirvault::api::AppState::new(
            config.clone(),
            s.store.clone(),
            fhirvault::server::shared_validator().unwrap(),
            s.issuer.clone(),
            Arc::new(fhirvault::fhir::compartment::PatientCompartment::r4().unwrap()),
            Arc::new(Default::default()),
            Default::default(),
            auditor,
            Arc::new(
                fhirvault::server::live_registry(&config, fhirvault::server::shared_registry(&config).unwrap())
                    .unwrap(),
            ),
            fhirvault::server::shared_structures(&config).unwrap(),
        );
        serve(state, config.workers)
    };
    // one that records nothing
    let off_addr = serve_with(Arc::new(fhirvault::audit::Auditor::without_ledger(
        s.store.shared_cipher(),
        fhirvault::server::audit_source(&config),
    )));
    // one that only makes each batch of sealed events durable in a plain file: the floor of
    // any design that answers only once the event is durable
    let streams: usize = env_num("BENCH_FLOOR_STREAMS", 1) as usize;
    let floor_files: Vec<_> = (0..streams.max(1))
        .map(|i| std::env::temp_dir().join(format!("fhirvault-audit-floor-{}-{i}.bin", std::process::id())))
        .collect();
    let floor_auditor = Arc::new(
        fhirvault::audit::Auditor::durability_floor(
            s.store.shared_cipher(),
            fhirvault::server::audit_source(&config),
            &floor_files,
        )
        .unwrap(),
    );
    let floor_addr = serve_with(floor_auditor.clone());
    // a second node on the same database: its own ledger and chain; and, for the baseline of
    // two server instances sharing these two cores, a second one that records nothing
    let second = (db == Db::Postgres).then(|| {
        let auditor = Arc::new(fhirvault::server::open_auditor(&config, &s.store, "bench-node-2").unwrap());
        let off2 = serve_with(Arc::new(fhirvault::audit::Auditor::without_ledger(
            s.store.shared_cipher(),
            fhirvault::server::audit_source(&config),
        )));
        (serve_with(auditor.clone()), auditor, off2)
    });
    let token = s.token("system/*.cruds", None);
    let reads = |addr: std::net::SocketAddr, conc: usize| {
        throughput(
            conc,
            secs,
            |_| LeanClient::connect(addr, &token),
            |c, i| {
                let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
                assert_eq!(c.request("GET", &format!("/fhir/Patient/{id}"), None), 200);
            },
        )
    };
    let owner_url = s.db.database_url.clone();
    let mut by_concurrency = Vec::new();
    let mut at_32 = json!({});
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    for conc in levels {
        let off = reads(off_addr, conc);
        let stats = s.auditor.stats();
        let (c0, e0) = (
            stats.commits.load(Ordering::Relaxed),
            stats.events.load(Ordering::Relaxed),
        );
        let (cm0, lm0) = (
            stats.commit_micros.load(Ordering::Relaxed),
            stats.linger_micros.load(Ordering::Relaxed),
        );
        let syncs0 = (db == Db::Postgres).then(|| support::wal_syncs(&owner_url)).flatten();
        let on = reads(s.addr, conc);
        let syncs1 = (db == Db::Postgres).then(|| support::wal_syncs(&owner_url)).flatten();
        let (commits, events) = (
            stats.commits.load(Ordering::Relaxed) - c0,
            stats.events.load(Ordering::Relaxed) - e0,
        );
        let per_commit = events as f64 / commits.max(1) as f64;
        let commit_ms = (stats.commit_micros.load(Ordering::Relaxed) - cm0) as f64 / 1000.0 / commits.max(1) as f64;
        let linger_ms = (stats.linger_micros.load(Ordering::Relaxed) - lm0) as f64 / 1000.0 / commits.max(1) as f64;
        let (fc0, fe0) = (
            floor_auditor.stats().commits.load(Ordering::Relaxed),
            floor_auditor.stats().events.load(Ordering::Relaxed),
        );
        let floor = reads(floor_addr, conc);
        let floor_per_sync = (floor_auditor.stats().events.load(Ordering::Relaxed) - fe0) as f64
            / (floor_auditor.stats().commits.load(Ordering::Relaxed) - fc0).max(1) as f64;
        // two nodes against one, PostgreSQL at c32: the same clients, half on each node, with
        // the ledger and without (two server instances share these two cores either way)
        let split = |a: std::net::SocketAddr, b: std::net::SocketAddr| {
            throughput(
                conc,
                secs,
                |k| LeanClient::connect(if k % 2 == 0 { a } else { b }, &token),
                |c, i| {
                    let id = &ids[(i.wrapping_mul(2654435761) % ids.len() as u64) as usize];
                    assert_eq!(c.request("GET", &format!("/fhir/Patient/{id}"), None), 200);
                },
            )
        };
        let two_nodes = second
            .as_ref()
            .filter(|_| conc == 32)
            .map(|(addr2, _, off2)| (split(s.addr, *addr2), split(off_addr, *off2)));
        if let Some((two, two_off)) = two_nodes {
            eprintln!(
                "      two nodes on one database, same c{conc} clients split: ledger {two:>7.0} ({:.2} of one node), \
                 audit off {two_off:>7.0} ({:.2} of one node)",
                two / on,
                two_off / off
            );
        }
        let two_nodes_on = two_nodes.map(|(t, _)| t);
        let two_nodes_off = two_nodes.map(|(_, t)| t);
        let per_fsync = match (syncs0, syncs1) {
            (Some(a), Some(b)) if b > a => Some(events as f64 / (b - a) as f64),
            _ => None,
        };
        eprintln!(
            "  c{conc:<2} reads/s audit off {off:>7.0}  audit on {on:>7.0}  ratio {:.2}  events/commit {per_commit:>5.1}  ms/commit {commit_ms:.2}  linger ms {linger_ms:.2}{}",
            on / off,
            per_fsync.map(|f| format!("  events/WAL fsync {f:.1}")).unwrap_or_default()
        );
        eprintln!(
            "      durability floor (sealed events fdatasync'd to a file, nothing else) {floor:>7.0}  ratio {:.2}  events/fdatasync {floor_per_sync:.1}",
            floor / off
        );
        eprintln!("      ledger against the floor: {:.2}", on / floor);
        let r = json!({
            "concurrency": conc,
            "reads_per_sec_audit_off": off,
            "reads_per_sec_audit_on": on,
            "ratio_on_vs_off": on / off,
            "audit_events": events,
            "writer_ms_per_commit": commit_ms,
            "linger_ms_per_commit": linger_ms,
            "writer_commits": commits,
            "events_per_commit": per_commit,
            "events_per_wal_fsync": per_fsync,
            "reads_per_sec_durability_floor": floor,
            "ratio_floor_vs_off": floor / off,
            "floor_events_per_fdatasync": floor_per_sync,
            "ratio_ledger_vs_floor": on / floor,
            "reads_per_sec_two_nodes": two_nodes_on,
            "ratio_two_nodes_vs_one": two_nodes_on.map(|t| t / on),
            "reads_per_sec_two_nodes_audit_off": two_nodes_off,
            "ratio_two_nodes_vs_one_audit_off": two_nodes_off.map(|t| t / off),
        });
        if conc == 32 {
            at_32 = r.clone();
        }
        by_concurrency.push(r);
    }
    floor_auditor.shutdown();
    if let Some((_, a, _)) = &second {
        a.shutdown();
    }
    for f in &floor_files {
        let _ = std::fs::remove_file(f);
    }
    json!({
        "backend": format!("{db:?}"),
        "rows": ids.len(),
        "at_concurrency_32": at_32,
        "by_concurrency": by_concurrency,
    })
}

fn main() {
    if !support::start() {
        return;
    }
    let secs = env_num("BENCH_SECS", 3);
    let rows = env_num("BENCH_ROWS", 2000);
    let cpu = support::cpu_model();
    eprintln!("fhirvault audit bench: {rows} patients, {secs}s per figure, CPU {cpu}");
    let mut results = Vec::new();
    let only = std::env::var("BENCH_BACKENDS").unwrap_or_default().to_lowercase();
    for db in [Db::Sqlite, Db::Postgres] {
        if !only.is_empty() && !only.contains(&format!("{db:?}").to_lowercase()) {
            continue;
        }
        eprintln!("{db:?}:");
        results.push(bench_backend(db, rows, secs));
    }
    let mut out = support::provenance("audit");
    let more = json!({
        "backends": results,
    });
    if let (Some(o), Some(m)) = (out.as_object_mut(), more.as_object()) {
        o.extend(m.clone());
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    support::write_results("audit", &out);
}
