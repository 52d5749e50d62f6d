//! Test harness: a throwaway PostgreSQL cluster (started once per test binary, removed when the
//! binary exits), a fresh database or SQLite file per test, and a real fhirvault HTTP server on
//! a loopback port driven with a blocking HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod node;
pub mod replication;

use diesel::connection::SimpleConnection;
use diesel::Connection;
use fhirvault::config::{Config, ConfigLayer};
use reqwest::blocking::{Client, Response};
use reqwest::header::HeaderMap;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Declares a test that runs once on SQLite and once on PostgreSQL:
/// `on_both_backends!(name);` with `fn name(db: Db)` in scope.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$name($crate::common::Db::Sqlite)
                }
                #[test]
                fn postgres() {
                    super::$name($crate::common::Db::Postgres)
                }
            }
        )*
    };
}

pub struct PgCluster {
    pub bin: PathBuf,
    pub port: u16,
    pub dir: PathBuf,
}

fn find_pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    if let Some(dir) = candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    {
        return dir;
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v initdb"]).output() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            return Path::new(&p).parent().unwrap().to_path_buf();
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_dump) were not found in /usr/lib/postgresql/*/bin \
         or on PATH. Install them (Debian: apt-get install postgresql) or set PG_BIN to their directory. \
         The storage tests run on SQLite and PostgreSQL and are never skipped."
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (the server refuses root).
fn pg_cmd(bin: &Path, prog: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    }
}

/// A new PostgreSQL data directory (trust authentication on loopback, replication included).
fn initdb(bin: &Path, data: &Path) {
    let out = pg_cmd(bin, "initdb")
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "-D"])
        .arg(data)
        .output()
        .expect("running initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the PostgreSQL server of `data` on 127.0.0.1:`port`, its sockets in `socket_dir` and
/// its log in `log`. Tests run without fsync (speed; nothing to survive, and a SIGKILL of
/// PostgreSQL loses nothing the kernel holds); benches set `PG_FSYNC=on` so that commits cost
/// what they cost in production. `PG_OPTS` adds server options when investigating (e.g.
/// `-c log_min_duration_statement=1`). A server that replication starts from keeps full-page
/// writes (a base backup and a standby's replay rely on them).
fn pg_ctl_start(bin: &Path, data: &Path, port: u16, socket_dir: &Path, log: &Path, replicated: bool) {
    let fsync = std::env::var("PG_FSYNC").unwrap_or_else(|_| "off".into());
    let (max_connections, full_page_writes) = if replicated { (200, "on") } else { (400, fsync.as_str()) };
    let opts = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections={max_connections} \
         -c fsync={fsync} -c full_page_writes={full_page_writes} {}",
        socket_dir.display(),
        std::env::var("PG_OPTS").unwrap_or_default()
    );
    let out = pg_cmd(bin, "pg_ctl")
        .arg("-D")
        .arg(data)
        .args(["-o", &opts, "-l"])
        .arg(log)
        .args(["-w", "start"])
        .output()
        .expect("running pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl start failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

pub fn pg() -> &'static PgCluster {
    static PG: OnceLock<PgCluster> = OnceLock::new();
    PG.get_or_init(|| {
        let bin = find_pg_bin();
        let dir = std::env::temp_dir().join(format!("fhirvault-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap().success();
            assert!(ok, "cannot hand the cluster directory to the postgres user");
        }
        let data = dir.join("data");
        initdb(&bin, &data);
        let port = free_port();
        pg_ctl_start(&bin, &data, port, &dir, &dir.join("log"), false);
        // A watchdog stops and removes the cluster when this test process exits, however it exits.
        let stop = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {runas}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            runas = if is_root() { "runuser -u postgres -- " } else { "" },
            pg_ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display()
        );
        Command::new("sh")
            .args(["-c", &format!("({stop}) </dev/null >/dev/null 2>&1 &")])
            .status()
            .unwrap();
        PgCluster { bin, port, dir }
    })
}

impl PgCluster {
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
    /// The URL of a database as another role.
    pub fn url_as(&self, role: &str, db: &str) -> String {
        format!("postgres://{role}@127.0.0.1:{}/{db}", self.port)
    }
    /// Runs SQL as the superuser on the `postgres` database.
    pub fn admin(&self, sql: &str) {
        let mut c = diesel::PgConnection::establish(&self.admin_url()).expect("connect to test cluster");
        c.batch_execute(sql).unwrap();
    }
    /// A new empty database.
    pub fn create_db(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let mut c = diesel::PgConnection::establish(&self.admin_url()).expect("connect to test cluster");
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        name
    }
    /// `pg_dump` of a database, as text.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", db])
            .output()
            .expect("running pg_dump");
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

/// The logical ids of the resource versions a PostgreSQL session may see (row-level security
/// decides), sorted, each once.
pub fn visible_ids(c: &mut diesel::PgConnection) -> Vec<String> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        logical_id: String,
    }
    let mut ids: Vec<String> = diesel::sql_query("SELECT DISTINCT logical_id FROM resource_versions")
        .load::<Row>(c)
        .unwrap()
        .into_iter()
        .map(|r| r.logical_id)
        .collect();
    ids.sort();
    ids
}

/// A fresh place to store data: a temp dir, plus a database on the chosen backend.
pub struct TestDb {
    pub db: Db,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub pg_name: Option<String>,
}

impl TestDb {
    pub fn new(db: Db) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let (database_url, pg_name) = match db {
            Db::Sqlite => (format!("sqlite://{}", dir.path().join("fhirvault.db").display()), None),
            Db::Postgres => {
                let name = pg().create_db();
                (pg().url(&name), Some(name))
            }
        };
        TestDb {
            db,
            dir,
            database_url,
            pg_name,
        }
    }

    pub fn config(&self, layer: ConfigLayer) -> Config {
        let base = ConfigLayer {
            data_dir: Some(self.dir.path().join("data")),
            database_url: Some(self.database_url.clone()),
            pool_size: Some(4),
            // Tests drive many refused requests from one address on purpose; the throttle has
            // its own test with a low limit.
            auth_failure_limit: Some(1_000_000),
            ..Default::default()
        };
        Config::resolve(base.overlay(layer)).unwrap()
    }

    /// Every byte the database holds at rest: the SQLite files, or a pg_dump. On SQLite, call it
    /// after any other process (a CLI command) has used the database: opening and closing the
    /// files from the server's own process releases its POSIX locks on them (fcntl semantics),
    /// and another process could then reset the WAL under the server's feet.
    pub fn bytes_at_rest(&self) -> Vec<u8> {
        match self.db {
            Db::Sqlite => {
                let mut all = Vec::new();
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let p = self.dir.path().join(format!("fhirvault.db{suffix}"));
                    if let Ok(b) = std::fs::read(&p) {
                        all.extend(b);
                    }
                }
                all
            }
            Db::Postgres => pg().dump(self.pg_name.as_ref().unwrap()),
        }
    }

    /// Runs `SELECT COUNT(*) AS n …` directly against the test database.
    pub fn count(&self, sql: &str) -> i64 {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let rows: Vec<N> = match self.db {
            Db::Sqlite => {
                let path = self.database_url.trim_start_matches("sqlite://");
                let mut c = diesel::SqliteConnection::establish(path).unwrap();
                c.batch_execute("PRAGMA busy_timeout = 10000;").unwrap();
                diesel::sql_query(sql).load(&mut c).unwrap()
            }
            Db::Postgres => {
                let mut c = diesel::PgConnection::establish(&self.database_url).unwrap();
                diesel::sql_query(sql).load(&mut c).unwrap()
            }
        };
        rows[0].n
    }

    /// Runs SQL directly against the test database, returning whether it succeeded.
    pub fn exec(&self, sql: &str) -> Result<(), String> {
        match self.db {
            Db::Sqlite => {
                let path = self.database_url.trim_start_matches("sqlite://");
                let mut c = diesel::SqliteConnection::establish(path).map_err(|e| e.to_string())?;
                // the server's audit writer may hold the write lock for a moment
                c.batch_execute("PRAGMA busy_timeout = 10000;")
                    .map_err(|e| e.to_string())?;
                c.batch_execute(sql).map_err(|e| e.to_string())
            }
            Db::Postgres => {
                let mut c = diesel::PgConnection::establish(&self.database_url).map_err(|e| e.to_string())?;
                c.batch_execute(sql).map_err(|e| e.to_string())
            }
        }
    }
}

/// A running fhirvault on a loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    /// Sends `Authorization: Bearer <token for system/*.cruds>` with every request.
    pub client: Client,
    pub store: std::sync::Arc<fhirvault::store::Store>,
    pub issuer: std::sync::Arc<fhirvault::auth::Issuer>,
    pub auditor: std::sync::Arc<fhirvault::audit::Auditor>,
    pub config: Config,
    handle: actix_web::dev::ServerHandle,
    pub db: TestDb,
}

impl TestServer {
    pub fn start(db: Db) -> TestServer {
        Self::start_with(db, ConfigLayer::default())
    }

    pub fn start_with(db: Db, layer: ConfigLayer) -> TestServer {
        Self::start_on(TestDb::new(db), layer)
    }

    /// Starts on a prepared database (`layer` may override its URL, for example with a role).
    pub fn start_on(tdb: TestDb, layer: ConfigLayer) -> TestServer {
        let config = tdb.config(layer);
        let base_path = config.base_path.clone();
        let workers = config.workers;
        let state = actix_web::web::Data::new(fhirvault::server::build_state(config.clone()).expect("server state"));
        let store = state.store.clone();
        let auditor = state.auditor.clone();
        let issuer = state.issuer.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let srv = actix_web::HttpServer::new(move || fhirvault::api::app(state.clone()))
                    .workers(workers)
                    .disable_signals()
                    .bind("127.0.0.1:0")
                    .unwrap();
                let addr = srv.addrs()[0];
                let srv = srv.run();
                tx.send((addr, srv.handle())).unwrap();
                let _ = srv.await;
            })
        });
        let (addr, handle) = rx.recv().unwrap();
        // the harness acts as an administrator (SearchParameters are theirs to write);
        // `TestServer::token` mints tokens without roles
        let token = issuer
            .issue(&fhirvault::auth::TokenRequest {
                scope: "system/*.cruds".into(),
                client_id: Some("test-client".into()),
                roles: vec!["admin".into()],
                expires_in: 900,
                ..Default::default()
            })
            .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        TestServer {
            addr,
            base: format!("http://{addr}{base_path}"),
            client: Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .default_headers(headers)
                .build()
                .unwrap(),
            store,
            issuer,
            auditor,
            config,
            handle,
            db: tdb,
        }
    }

    /// The stored AuditEvents a search of the log finds (`?` and what follows), with the
    /// harness's system token.
    pub fn audit_events(&self, query: &str) -> Vec<Value> {
        let r = self.get(&format!("/AuditEvent{query}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e["resource"].clone())
            .collect()
    }

    /// A token from the server's issuer.
    pub fn token(&self, scope: &str, patient: Option<&str>) -> String {
        mint(&self.issuer, scope, patient)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> Reply {
        Reply::from(self.client.get(self.url(path)).send().unwrap())
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut r = self.client.get(self.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Reply::from(r.send().unwrap())
    }

    pub fn send(&self, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Reply {
        let mut r = self.client.request(method.parse().unwrap(), self.url(path));
        if let Some(b) = body {
            r = r
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(b).unwrap());
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Reply::from(r.send().unwrap())
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.send("POST", path, Some(body), &[])
    }

    pub fn put(&self, path: &str, body: &Value) -> Reply {
        self.send("PUT", path, Some(body), &[])
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.send("DELETE", path, None, &[])
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        let _ = std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(false))).join();
    }
}

/// Another node's Bulk export runner over the same store (its own exporter, no threads): what a
/// test or bench drives job by job.
pub fn exporter(s: &TestServer) -> std::sync::Arc<fhirvault::bulk::Exporter> {
    let config = std::sync::Arc::new(s.config.clone());
    fhirvault::bulk::Exporter::new(
        s.store.clone(),
        std::sync::Arc::new(
            fhirvault::server::live_registry(&config, fhirvault::server::shared_registry(&config).unwrap()).unwrap(),
        ),
        std::sync::Arc::new(Default::default()),
        config,
        fhirvault::server::shared_validator().unwrap(),
    )
}

/// The path below the base of the status URL a Bulk export kick-off answered with.
pub fn status_path(s: &TestServer, kicked_off: &Reply) -> String {
    let loc = kicked_off.header("content-location").expect("Content-Location");
    let rel = loc.strip_prefix(&s.base).unwrap_or(loc).to_string();
    assert!(rel.starts_with("/$export-status/"), "{loc}");
    rel
}

/// Kicks off a Bulk export (`Prefer: respond-async`); returns its status URL's path.
pub fn export_kick_off(s: &TestServer, path: &str) -> String {
    let r = s.get_with(
        path,
        &[("prefer", "respond-async"), ("accept", "application/fhir+json")],
    );
    assert_eq!(r.status, 202, "{path}: {}", r.text());
    status_path(s, &r)
}

/// The CapabilityStatement's entry for a resource type.
pub fn capability_of(cs: &Value, resource_type: &str) -> Value {
    cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == resource_type)
        .unwrap_or_else(|| panic!("{resource_type} not in the CapabilityStatement"))
        .clone()
}

/// Mints an access token (15 minutes) from an issuer.
pub fn mint(issuer: &fhirvault::auth::Issuer, scope: &str, patient: Option<&str>) -> String {
    issuer
        .issue(&fhirvault::auth::TokenRequest {
            scope: scope.to_string(),
            patient: patient.map(str::to_string),
            client_id: Some("test-client".into()),
            expires_in: 900,
            ..Default::default()
        })
        .unwrap()
}

/// Settings for a server that stores the official examples as they are: their Subscriptions
/// ask for whole resources, and nothing is delivered (their endpoint is on the internet).
pub fn examples_layer() -> ConfigLayer {
    ConfigLayer {
        subscription_full_resource: Some(true),
        subscription_workers: Some(0),
        ..Default::default()
    }
}

/// A response, read whole.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().unwrap().to_vec();
        Reply { status, headers, body }
    }
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON (status {}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// The status codes of a batch or transaction response's entries (`"201"` …), in order.
    pub fn entry_statuses(&self) -> Vec<String> {
        self.json()["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["response"]["status"].as_str().unwrap_or("")[..3].to_string())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts the body is an OperationOutcome with the FHIR content type, and returns it.
    pub fn outcome(&self) -> Value {
        assert!(
            self.header("content-type")
                .unwrap_or("")
                .starts_with("application/fhir+json"),
            "content type {:?}",
            self.header("content-type")
        );
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
        assert!(v["issue"].as_array().is_some_and(|a| !a.is_empty()));
        v
    }
}

/// The official R4 examples committed under tests/data/r4-examples (one per resource type).
pub fn r4_examples() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/r4-examples");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The 60 Synthea patients of ../shared/testdata (transaction Bundles), unpacked into a
/// directory of their own.
pub fn synthea_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tgz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/synthea-r4-60-patients.tgz");
    let ok = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "could not unpack {}", tgz.display());
    dir
}
