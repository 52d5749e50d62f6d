//! The server survives its PostgreSQL connections dying (server restart, terminated backends):
//! reads retry once on a fresh connection, other requests get a 503 at most once per dead
//! connection (never a 500), and dead connections leave the pool. SQLite has no connections to
//! lose, so this is PostgreSQL only.

mod common;

use common::{pg, Db, TestServer};
use serde_json::json;

#[test]
fn dead_connections_are_replaced_not_reused() {
    let s = TestServer::start(Db::Postgres);
    let name = s.db.pg_name.clone().unwrap();
    s.put("/Patient/r1", &json!({"resourceType": "Patient", "id": "r1"}));
    // warm several pooled connections
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| assert_eq!(s.get("/Patient/r1").status, 200));
        }
    });
    pg().admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ));
    // a read retries on a fresh connection
    assert_eq!(s.get("/Patient/r1").status, 200);
    // everything else recovers: at most a 503 per dead connection, never a 500
    for (what, f) in [
        (
            "vread",
            Box::new(|| s.get("/Patient/r1/_history/1").status) as Box<dyn Fn() -> u16>,
        ),
        ("history", Box::new(|| s.get("/Patient/_history").status)),
        (
            "create",
            Box::new(|| s.post("/Patient", &json!({"resourceType": "Patient"})).status),
        ),
    ] {
        let mut statuses = Vec::new();
        loop {
            let st = f();
            statuses.push(st);
            if st < 300 || statuses.len() > 6 {
                break;
            }
        }
        assert!(statuses.iter().all(|s| *s < 300 || *s == 503), "{what}: {statuses:?}");
        assert!(*statuses.last().unwrap() < 300, "{what} did not recover: {statuses:?}");
    }
}
