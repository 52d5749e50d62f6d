//! One Diesel connection type over SQLite and PostgreSQL, and an r2d2 manager that picks the
//! backend from the URL scheme and keeps the real connection error (the derived `establish`
//! tries each backend in turn and loses it).

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::Connection;

#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite://") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("unsupported database URL scheme (expected postgres:// or sqlite://)")]
    Scheme,
    #[error("{0}")]
    Connection(#[from] diesel::ConnectionError),
    #[error("{0}")]
    Query(#[from] diesel::result::Error),
    #[error("cannot create the database file: {0}")]
    File(String),
}

#[derive(Clone)]
pub struct DbManager {
    url: String,
    backend: Backend,
    /// What this node's connections have seen of the database servers (shared by the pool and
    /// the connections opened outside it).
    servers: std::sync::Arc<ServerTracker>,
}

/// The database server a node's connections reach, and how often that changed (a failover to
/// a promoted standby, or a restart) or a connection was lost: the operator's view of a
/// failover from one node (`/metrics`).
#[derive(Debug, Default)]
pub struct ServerTracker {
    /// Address, port and start time of the server the last new connection reached.
    current: std::sync::Mutex<Option<String>>,
    /// New connections that reached another server than the one before.
    pub changes: std::sync::atomic::AtomicU64,
    /// Connections found dead (or on a read-only server) and dropped.
    pub lost: std::sync::atomic::AtomicU64,
}

impl ServerTracker {
    fn reached(&self, server: String) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| *c != server) {
            self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("the database server changed (failover or restart): new connections reach another server");
        }
        *current = Some(server);
    }
}

/// Which PostgreSQL server a connection reached: address, port and the server's start time (a
/// promoted standby, or the same host restarted, differ). Never the URL, which may hold a password.
fn server_identity(conn: &mut PgConnection) -> Result<String, diesel::result::Error> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Identity {
        #[diesel(sql_type = diesel::sql_types::Text)]
        server: String,
    }
    let id: Identity = diesel::sql_query(
        "SELECT COALESCE(host(inet_server_addr()), 'local') || ':' || COALESCE(inet_server_port(), 0)::text \
         || '@' || pg_postmaster_start_time()::text AS server",
    )
    .get_result(conn)?;
    Ok(id.server)
}

impl std::fmt::Debug for DbManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("DbManager")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl DbManager {
    pub fn new(url: &str) -> Result<Self, ConnectError> {
        let backend = Backend::of_url(url).ok_or(ConnectError::Scheme)?;
        let url = match backend {
            Backend::Postgres if std::env::var_os("PGGSSENCMODE").is_none() => without_gss_probe(url),
            _ => url.to_string(),
        };
        Ok(DbManager {
            url,
            backend,
            servers: Default::default(),
        })
    }
    /// What the connections of this manager (and its clones) have seen of the servers.
    pub fn servers(&self) -> &ServerTracker {
        &self.servers
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// The SQLite database's file, if that is the backend.
    pub fn sqlite_path(&self) -> Option<&str> {
        match self.backend {
            Backend::Sqlite => Some(self.url.trim_start_matches("sqlite://")),
            Backend::Postgres => None,
        }
    }
    pub fn connect(&self) -> Result<DbConnection, ConnectError> {
        match self.backend {
            Backend::Postgres => {
                let mut conn = PgConnection::establish(&self.url)?;
                self.servers.reached(server_identity(&mut conn)?);
                Ok(DbConnection::Pg(conn))
            }
            Backend::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://");
                create_private_file(path)?;
                let mut c = SqliteConnection::establish(path)?;
                // WAL lets readers proceed beside the one writer; FULL makes each commit durable
                // before we answer (an acknowledged write or audit event must survive power loss).
                c.batch_execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; \
                     PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;",
                )?;
                Ok(DbConnection::Sqlite(c))
            }
        }
    }
}

impl DbConnection {
    /// A transaction that writes. On SQLite it begins `IMMEDIATE`: the write lock is taken at
    /// the start, waiting in the busy handler, so a transaction that reads before it writes is
    /// never refused at its first write because another connection (the audit writer, the
    /// deriver, a command-line process) committed in between: SQLite refuses such an upgrade
    /// at once ("database is locked"), whatever the busy timeout. On PostgreSQL, a transaction.
    pub fn write_transaction<T, E>(&mut self, f: impl FnOnce(&mut DbConnection) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>,
    {
        use diesel::connection::{AnsiTransactionManager, TransactionManager};
        type Manager = <DbConnection as Connection>::TransactionManager;
        let DbConnection::Sqlite(c) = self else {
            return self.transaction(f);
        };
        AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(value) => match Manager::commit_transaction(self) {
                Ok(()) => Ok(value),
                Err(e) => {
                    let _ = Manager::rollback_transaction(self);
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = Manager::rollback_transaction(self);
                Err(e)
            }
        }
    }
}

/// The PostgreSQL URL with `gssencmode=disable` unless it (or `PGGSSENCMODE`) says otherwise.
/// libpq's default (`prefer`) looks for a Kerberos credential cache before every connection;
/// that costs a file lookup per connection and, when a background thread connects while the
/// process exits, aborts it inside the Kerberos library (its mutexes are already destroyed).
/// GSSAPI encryption is opportunistic under `prefer` and protects nothing that TLS
/// (`sslmode=verify-full`, docs/deployment.md) does not; a deployment that wants it sets
/// `gssencmode` in its URL. GSSAPI authentication is not affected.
fn without_gss_probe(url: &str) -> String {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|kv| kv.starts_with("gssencmode=")) {
        return url.to_string();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}gssencmode=disable")
}

/// Creates the SQLite file readable by its owner only (SQLite gives its -wal and -shm files the
/// same mode) when it does not exist yet; an existing file is left as the operator set it.
fn create_private_file(path: &str) -> Result<(), ConnectError> {
    match crate::secret_file::create_private(std::path::Path::new(path), b"") {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(ConnectError::File(e.to_string())),
        _ => Ok(()),
    }
}

/// A pooled connection and the row-level-security access context its session carries
/// (PostgreSQL), so that the context is set only when it changes.
pub struct Session {
    pub(super) conn: DbConnection,
    pub(super) access: Option<String>,
    /// Set when a query found the connection dead (server restart, terminated backend): r2d2
    /// then drops it instead of handing it out again.
    pub(super) broken: bool,
}

impl r2d2::ManageConnection for DbManager {
    type Connection = Session;
    type Error = ConnectError;

    fn connect(&self) -> Result<Session, ConnectError> {
        Ok(Session {
            conn: DbManager::connect(self)?,
            access: None,
            broken: false,
        })
    }
    fn is_valid(&self, s: &mut Session) -> Result<(), ConnectError> {
        s.conn.batch_execute("SELECT 1").map_err(ConnectError::Query)
    }
    fn has_broken(&self, s: &mut Session) -> bool {
        let broken = s.broken || diesel::r2d2::R2D2Connection::is_broken(&mut s.conn);
        if broken {
            self.servers.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        broken
    }
}

#[cfg(test)]
mod tests {
    use super::{without_gss_probe, ServerTracker};
    use std::sync::atomic::Ordering;

    #[test]
    fn postgres_urls_skip_the_kerberos_probe_unless_they_ask_for_it() {
        assert_eq!(
            without_gss_probe("postgres://u@h/db"),
            "postgres://u@h/db?gssencmode=disable"
        );
        assert_eq!(
            without_gss_probe("postgres://u@h1:1,h2:2/db?target_session_attrs=read-write"),
            "postgres://u@h1:1,h2:2/db?target_session_attrs=read-write&gssencmode=disable"
        );
        let asked = "postgres://u@h/db?sslmode=verify-full&gssencmode=require";
        assert_eq!(without_gss_probe(asked), asked);
    }

    #[test]
    fn a_failover_is_a_new_connection_reaching_another_server() {
        let t = ServerTracker::default();
        t.reached("127.0.0.1:5432@t1".into());
        t.reached("127.0.0.1:5432@t1".into());
        assert_eq!(
            t.changes.load(Ordering::Relaxed),
            0,
            "the first server and reconnections to it"
        );
        t.reached("127.0.0.1:5433@t0".into());
        assert_eq!(t.changes.load(Ordering::Relaxed), 1, "the promoted standby");
        t.reached("127.0.0.1:5433@t0".into());
        assert_eq!(t.changes.load(Ordering::Relaxed), 1);
    }
}
