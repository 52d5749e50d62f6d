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

pub struct DbManager {
    url: String,
    backend: Backend,
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
        Ok(DbManager {
            url: url.to_string(),
            backend,
        })
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
            Backend::Postgres => Ok(DbConnection::Pg(PgConnection::establish(&self.url)?)),
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
        s.broken || diesel::r2d2::R2D2Connection::is_broken(&mut s.conn)
    }
}
