//! PostgreSQL over TLS with `sslmode=verify-full`: the test cluster (this test binary's own) is
//! given a certificate for 127.0.0.1; fhirvault connects through libpq with the certificate's
//! root and works, and refuses to connect when the root or the host name does not match.

mod common;

use common::{pg, Db, TestDb, TestServer};
use diesel::prelude::*;
use fhirvault::config::ConfigLayer;
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// A self-signed certificate and key for `san` in `dir` (`name`.crt, `name`.key).
fn self_signed(dir: &Path, name: &str, san: &str) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=fhirvault test database", "-addext"])
        .arg(format!("subjectAltName={san}"))
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[derive(QueryableByName)]
struct Ssl {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ssl: bool,
}

#[test]
fn postgres_connections_can_require_verify_full() {
    let cluster = pg();
    // the server's certificate, in the cluster's directory, readable by the postgres user only
    self_signed(&cluster.dir, "server", "IP:127.0.0.1");
    let other = tempfile::tempdir().unwrap();
    self_signed(other.path(), "other", "IP:127.0.0.1");
    let (cert, key) = (cluster.dir.join("server.crt"), cluster.dir.join("server.key"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
    {
        for f in [&cert, &key] {
            assert!(Command::new("chown")
                .arg("postgres:postgres")
                .arg(f)
                .status()
                .unwrap()
                .success());
        }
    }
    cluster.admin(&format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()));
    cluster.admin(&format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()));
    cluster.admin("ALTER SYSTEM SET ssl = on");
    cluster.admin("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));

    let tdb = TestDb::new(Db::Postgres);
    let name = tdb.pg_name.clone().unwrap();
    let verified = |host: &str, root: &Path| {
        format!(
            "postgres://postgres@{host}:{}/{name}?sslmode=verify-full&sslrootcert={}",
            cluster.port,
            root.display()
        )
    };
    let url = verified("127.0.0.1", &cert);
    // the server works over it, for migrations and serving alike
    let s = TestServer::start_on(
        tdb,
        ConfigLayer {
            database_url: Some(url.clone()),
            migration_database_url: Some(url.clone()),
            ..Default::default()
        },
    );
    let r = s.post("/Patient", &json!({"resourceType": "Patient", "active": true}));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(s.get(&format!("/Patient/{id}")).status, 200);
    // and the connection is encrypted
    let mut c = PgConnection::establish(&url).unwrap();
    let ssl: Ssl = diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result(&mut c)
        .unwrap();
    assert!(ssl.ssl);
    // a server certificate from another root, or for another name, is refused
    let cipher = fhirvault::server::open_cipher(&s.config).unwrap();
    for bad in [
        verified("127.0.0.1", &other.path().join("other.crt")),
        verified("localhost", &cert),
    ] {
        let opened = fhirvault::store::Store::open(&bad, None, 1, cipher.clone());
        assert!(opened.is_err(), "{bad} must be refused");
    }
}
