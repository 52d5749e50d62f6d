//! Shared state that several nodes race on, at the store level: each node is a `Store` of its
//! own (its own connection pool, as a separate process has) on one database, and the race runs
//! from many threads on every node at once. On both backends. (`tests/cluster.rs` runs whole
//! server processes; these are the races that need a precise count.)

mod common;

use common::{Db, TestDb};
use fhirvault::store::auth::{ClientRow, NewUser, RefreshRow, RefreshUse};
use fhirvault::store::Store;
use std::sync::Arc;

on_both_backends!(refresh_rotation_raced_on_three_nodes, lockout_counted_across_nodes);

/// Three nodes' stores on one database (the first applies the migrations). SQLite serves one
/// node: there the three are one store, raced from as many threads.
fn nodes(tdb: &TestDb) -> Vec<Arc<Store>> {
    let cipher = fhirvault::server::open_cipher(&tdb.config(Default::default())).unwrap();
    let open = || Arc::new(Store::open(&tdb.database_url, None, 4, cipher.clone()).unwrap());
    match tdb.db {
        Db::Postgres => (0..3).map(|_| open()).collect(),
        Db::Sqlite => vec![open(); 3],
    }
}

fn user_and_client(store: &Store) {
    store
        .auth_user_add(&NewUser {
            id: "u1".into(),
            username: "racer".into(),
            password_hash: "x".into(),
            fhir_user: None,
            roles: String::new(),
            totp_secret: None,
        })
        .unwrap();
    store
        .auth_client_add(&ClientRow {
            client_id: "app".into(),
            name: "app".into(),
            client_type: "public".into(),
            secret_hash: None,
            jwks: None,
            jwks_uri: None,
            redirect_uris: "http://127.0.0.1/cb".into(),
            scopes: "offline_access".into(),
            disabled: false,
            created_at: fhirvault::store::now(),
        })
        .unwrap();
}

/// An active refresh token of user `u1` for client `app`, valid for an hour.
fn refresh_token(family: &str, hash: [u8; 32]) -> RefreshRow {
    let now = fhirvault::store::now();
    RefreshRow {
        token_hash: hash.to_vec(),
        family_id: family.into(),
        client_id: "app".into(),
        user_id: Some("u1".into()),
        scope: "offline_access".into(),
        patient: None,
        encounter: None,
        amr: "pwd".into(),
        status: "active".into(),
        issued_at: now,
        idle_expires_at: now + chrono::Duration::hours(1),
        family_expires_at: now + chrono::Duration::hours(2),
    }
}

/// One refresh token presented at once from four threads on each of three nodes: exactly one
/// rotation wins, and the family never has two live tokens (a racer that finds the token
/// already spent treats it as a replay and revokes the family, as RFC 9700 advises); presenting
/// the spent token again afterwards leaves nothing of the family usable.
fn refresh_rotation_raced_on_three_nodes(db: Db) {
    let tdb = TestDb::new(db);
    let nodes = nodes(&tdb);
    user_and_client(&nodes[0]);
    nodes[0].auth_refresh_add(&refresh_token("f1", [1; 32])).unwrap();
    let outcomes: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12u8)
            .map(|k| {
                let store = nodes[k as usize % 3].clone();
                scope.spawn(move || match store.auth_refresh_use(&[1; 32], &[100 + k; 32], 3600) {
                    Ok(RefreshUse::Rotated(_)) => "rotated".to_string(),
                    Ok(RefreshUse::Invalid) => "invalid".to_string(),
                    Ok(RefreshUse::Replayed { .. }) => "replayed".to_string(),
                    Err(e) => format!("error {e}"),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outcomes.iter().filter(|o| *o == "rotated").count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| !o.starts_with("error")), "{outcomes:?}");
    let live = |store: &Store| {
        (100..112u8)
            .filter(|k| {
                store
                    .auth_refresh(&[*k; 32])
                    .unwrap()
                    .is_some_and(|r| r.status == "active")
            })
            .count()
    };
    let replayed = outcomes.iter().any(|o| o == "replayed");
    assert_eq!(live(&nodes[1]), usize::from(!replayed), "{outcomes:?}");
    // (a replay already seen in the race revoked the family: then the token is simply invalid)
    assert!(matches!(
        nodes[2].auth_refresh_use(&[1; 32], &[200; 32], 3600).unwrap(),
        RefreshUse::Replayed { .. } | RefreshUse::Invalid
    ));
    assert_eq!(live(&nodes[0]), 0, "the family is revoked");
}

/// Wrong passwords counted on three nodes at once lose no count: the account locks when the
/// total reaches the limit, whichever nodes saw them.
fn lockout_counted_across_nodes(db: Db) {
    let tdb = TestDb::new(db);
    let nodes = nodes(&tdb);
    user_and_client(&nodes[0]);
    let until = fhirvault::store::now() + chrono::Duration::minutes(15);
    std::thread::scope(|scope| {
        for k in 0..9 {
            let store = nodes[k % 3].clone();
            scope.spawn(move || store.auth_user_login_failed("u1", 10, until).unwrap());
        }
    });
    let user = nodes[1].auth_user("u1").unwrap().unwrap();
    assert_eq!(
        (user.failed_logins, user.locked_until),
        (9, None),
        "nine failures counted"
    );
    nodes[2].auth_user_login_failed("u1", 10, until).unwrap();
    let user = nodes[0].auth_user("u1").unwrap().unwrap();
    assert!(user.locked_until.is_some(), "the tenth failure, on another node, locks");
}

/// A command-line process writing beside the server on one SQLite file (two stores, as two
/// processes have): a transaction that reads before it writes (a refresh rotation) is never
/// refused with "database is locked" because the other process committed in between. Write
/// transactions begin IMMEDIATE on SQLite, so they wait for the other writer instead.
#[test]
fn sqlite_write_transactions_beside_another_process() {
    let tdb = TestDb::new(Db::Sqlite);
    let cipher = fhirvault::server::open_cipher(&tdb.config(Default::default())).unwrap();
    let server = Store::open(&tdb.database_url, None, 4, cipher.clone()).unwrap();
    let cli = Store::open(&tdb.database_url, None, 2, cipher).unwrap();
    user_and_client(&server);
    let hash = |tag: u8, i: u16| {
        let mut h = [tag; 32];
        h[..2].copy_from_slice(&i.to_be_bytes());
        h
    };
    server.auth_refresh_add(&refresh_token("rotating", hash(1, 0))).unwrap();
    std::thread::scope(|scope| {
        let rotations = scope.spawn(|| {
            for i in 0..300u16 {
                match server.auth_refresh_use(&hash(1, i), &hash(1, i + 1), 3600) {
                    Ok(RefreshUse::Rotated(_)) => {}
                    Ok(_) => panic!("rotation {i} refused"),
                    Err(e) => panic!("rotation {i} failed: {e}"),
                }
            }
        });
        let other_process = scope.spawn(|| {
            for i in 0..300u16 {
                cli.auth_refresh_add(&refresh_token(&format!("cli{i}"), hash(2, i)))
                    .unwrap();
            }
        });
        rotations.join().unwrap();
        other_process.join().unwrap();
    });
}
