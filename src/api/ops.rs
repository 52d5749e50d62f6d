//! The operations surface: `/healthz` (the process answers), `/readyz` (the database and the
//! key provider work), and `/metrics` in the Prometheus text format. Labels are route templates
//! (the FHIR interaction) and status codes only: never a path, an id or a query.

use super::AppState;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpResponse};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The route a request was served as, set by the router (the FHIR interaction) or by the
/// operations endpoints; anything else is `other`.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Request counters and latency histograms, in memory, per node.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl Metrics {
    pub fn observe(&self, route: &'static str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route, status))
            .or_default() += 1;
        let mut latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = latency.entry(route).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// The Prometheus text exposition of the counters, plus the gauges given.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP fhirvault_http_requests_total Requests by route template and status.\n");
        out.push_str("# TYPE fhirvault_http_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "fhirvault_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP fhirvault_http_request_duration_seconds Request latency by route template.\n");
        out.push_str("# TYPE fhirvault_http_request_duration_seconds histogram\n");
        for (route, h) in self.latency.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "fhirvault_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "fhirvault_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "fhirvault_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "fhirvault_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        for (name, help, value) in gauges {
            // by Prometheus' naming rule, a `_total` only grows
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

/// Counts every response by route and status, with its latency.
pub async fn record(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await;
    if let Some(state) = state {
        let (status, route) = match &res {
            Ok(r) => (
                r.status().as_u16(),
                r.request().extensions().get::<RouteLabel>().map(|l| l.0),
            ),
            Err(e) => (e.as_response_error().status_code().as_u16(), None),
        };
        state
            .metrics
            .observe(route.unwrap_or("other"), status, started.elapsed().as_secs_f64());
    }
    res
}

pub async fn healthz(req: actix_web::HttpRequest) -> HttpResponse {
    req.extensions_mut().insert(RouteLabel("healthz"));
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready when the node is not draining, the database is reachable and takes writes (a
/// standby before its promotion does not), and a seal/open with the current key works.
pub async fn readyz(req: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    req.extensions_mut().insert(RouteLabel("readyz"));
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let st = state.clone();
    let checks = web::block(move || (st.store.writable(), st.store.cipher().self_test().is_ok())).await;
    let (database, keys) = match checks {
        Ok((database, keys)) => (
            match database {
                Ok(true) => "ok",
                Ok(false) => "read-only",
                Err(_) => "unreachable",
            },
            keys,
        ),
        Err(_) => ("unreachable", false),
    };
    let ready = !draining && database == "ok" && keys;
    let body = serde_json::json!({
        "status": if ready { "ready" } else if draining { "draining" } else { "not ready" },
        "database": database,
        "keys": if keys { "ok" } else { "unavailable" },
    });
    let mut resp = if ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    resp.content_type("application/json").body(body.to_string())
}

pub async fn metrics(req: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    req.extensions_mut().insert(RouteLabel("metrics"));
    let pool = state.store.pool_status();
    let audit = state.auditor.stats();
    let servers = state.store.servers();
    use std::sync::atomic::Ordering::Relaxed;
    let gauges = [
        (
            "fhirvault_db_failovers_total",
            "New database connections that reached another server than the one before (a failover \
             to a promoted standby, or a restart of the primary), since start.",
            servers.changes.load(Relaxed) as f64,
        ),
        (
            "fhirvault_db_connections_lost_total",
            "Pooled connections found dead or on a read-only server and dropped, since start.",
            servers.lost.load(Relaxed) as f64,
        ),
        (
            "fhirvault_draining",
            "1 while the node drains after SIGTERM (readiness fails, requests are still served).",
            if state.draining.load(Relaxed) { 1.0 } else { 0.0 },
        ),
        (
            "fhirvault_db_pool_connections",
            "Open pooled database connections.",
            pool.connections as f64,
        ),
        (
            "fhirvault_db_pool_idle_connections",
            "Idle pooled database connections.",
            pool.idle_connections as f64,
        ),
        (
            "fhirvault_audit_queue_depth",
            "Audit events and links waiting for the audit writer.",
            audit.queued.load(Relaxed) as f64,
        ),
        (
            "fhirvault_audit_events_committed",
            "Audit events the writer has committed since start.",
            audit.events.load(Relaxed) as f64,
        ),
        (
            "fhirvault_audit_commits",
            "Transactions the audit writer has committed since start.",
            audit.commits.load(Relaxed) as f64,
        ),
        (
            "fhirvault_audit_failed_batches",
            "Audit batches that could not be committed since start.",
            audit.failed_batches.load(Relaxed) as f64,
        ),
    ];
    let mut gauges = gauges.to_vec();
    if let Some(replica) = state.store.replica_stats() {
        gauges.extend([
            (
                "fhirvault_db_replica_reads_total",
                "Searches, history and export pages the read replica served, since start.",
                replica.served.load(Relaxed) as f64,
            ),
            (
                "fhirvault_db_replica_behind_total",
                "Reads run on the primary because the replica had not replayed the writes \
                 acknowledged before them within replica_max_wait_ms, since start.",
                replica.behind.load(Relaxed) as f64,
            ),
            (
                "fhirvault_db_replica_unavailable_total",
                "Reads run on the primary because the replica could not be used, since start.",
                replica.unavailable.load(Relaxed) as f64,
            ),
            (
                "fhirvault_db_replica_wait_seconds_total",
                "Time reads spent waiting for the replica to catch up, since start.",
                replica.wait_micros.load(Relaxed) as f64 / 1e6,
            ),
            (
                "fhirvault_db_replica_lag_bytes",
                "WAL the replica still had to replay at the last read (bytes), as this node saw it.",
                replica.lag_bytes.load(Relaxed) as f64,
            ),
        ]);
    }
    if state.store.backend() == crate::store::Backend::Sqlite {
        let writes = state.store.group_commit_stats();
        gauges.extend([
            (
                "fhirvault_sqlite_write_commits_total",
                "Commits of SQLite's shared write transaction (each waits for the disk), since start.",
                writes.commits as f64,
            ),
            (
                "fhirvault_sqlite_writes_total",
                "Writes those commits held (writes per commit: this over the commits), since start.",
                writes.writes as f64,
            ),
        ]);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&gauges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.observe("read", 200, 0.003);
        m.observe("read", 200, 0.2);
        m.observe("read", 404, 0.001);
        let text = m.render(&[("g", "a gauge", 2.0)]);
        assert!(text.contains("fhirvault_http_requests_total{route=\"read\",status=\"200\"} 2"));
        assert!(text.contains("fhirvault_http_requests_total{route=\"read\",status=\"404\"} 1"));
        assert!(text.contains("fhirvault_http_request_duration_seconds_bucket{route=\"read\",le=\"0.005\"} 2"));
        assert!(text.contains("fhirvault_http_request_duration_seconds_bucket{route=\"read\",le=\"+Inf\"} 3"));
        assert!(text.contains("# TYPE g gauge\ng 2"));
    }
}
