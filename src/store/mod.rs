//! Storage: Diesel over SQLite and PostgreSQL through one code path ([`DbConnection`]), an r2d2
//! pool, embedded migrations, and the transactional resource repository.
//!
//! Every version of every resource is appended to `resource_versions` (encrypted content,
//! SHA-256 of the stored plaintext, key version); `resources` holds the current version of each
//! logical resource and is what optimistic locking and uniqueness work on.
//!
//! SQLite allows one writer at a time: writes on SQLite take turns in-process (so that they
//! never spin on `SQLITE_BUSY`) inside a shared transaction that commits once for the writes
//! waiting together ([`group_commit`]); reads go through the pool in parallel (WAL).

pub mod audit;
pub mod auth;
pub mod backup;
pub mod break_glass;
pub mod connection;
pub mod encrypted;
pub mod export;
pub mod group_commit;
pub mod keys;
pub mod migrate;
pub mod replica;
pub mod schema;
pub mod search_index;
pub mod search_pages;
use migrate::{grant_server_role, warn_if_rls_bypassed};
pub use migrate::{run_migrations, RlsBinding};
pub mod search_query;
pub mod subscription;

pub use connection::{Backend, DbConnection, DbManager};

use crate::crypto::{sha256, Aad, Cipher, CryptoError};
use chrono::{NaiveDateTime, Timelike, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use encrypted::EncryptedColumn;
use schema::{resource_compartments as rc, resource_versions as rv, resources as cur};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Runs one Diesel query expression on the concrete connection behind a [`DbConnection`].
/// The query is written once; this only skips the MultiConnection layer, which renders the SQL
/// text anew on every call. Used on the hot read path.
macro_rules! per_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            DbConnection::Pg($c) => $body,
            DbConnection::Sqlite($c) => $body,
        }
    };
}

/// The table name bound into the AAD of resource content.
pub const VERSIONS_TABLE: &str = "resource_versions";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("resource not found")]
    NotFound,
    #[error("resource deleted")]
    Gone {
        version_id: i64,
        last_updated: NaiveDateTime,
    },
    #[error("version conflict")]
    VersionConflict { current: Option<i64> },
    #[error("the condition matched more than one resource")]
    MultipleMatches,
    #[error("the id in the body is not that of the resource the condition matched")]
    ConditionIdMismatch,
    #[error("the update would create the resource, which the caller may not do")]
    CreateNotAllowed,
    #[error("database: {0}")]
    Database(#[from] DieselError),
    #[error("connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("connect: {0}")]
    Connect(#[from] connection::ConnectError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    #[error("integrity check failed for a stored resource version")]
    Integrity,
    #[error("migration: {0}")]
    Migration(String),
    #[error("an audit event could not be sealed")]
    AuditSeal,
    /// The caller of [`Store::transaction`] gave up: everything was rolled back.
    #[error("transaction abandoned by its caller")]
    Abandoned,
    /// A claim (an audit chain, SQLite's single node) could not be taken or checked.
    #[error("{0}")]
    Lock(String),
}

/// Whose data a store operation may touch. Every store function takes it first; on PostgreSQL
/// it becomes the session's `fhirvault.access` setting, which the row-level-security policy on
/// `resource_versions` enforces (see migrations/postgres/*_row_level_security), so a wrong
/// query still cannot return another patient's rows. SQLite has no RLS: there the API layer's
/// checks are the only guard, and production PHI belongs on PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Any resource (user/ and system/ scopes, the server's own work).
    All,
    /// Only resources in this patient's compartment.
    Patient(String),
}

impl Access {
    fn setting(&self) -> String {
        match self {
            Access::All => "all".into(),
            Access::Patient(p) => format!("patient:{p}"),
        }
    }
}

/// The plaintext of one version, ready to be sealed, plus its token index entries
/// (parameter, normalized value) that will be stored as blind indexes.
pub struct Content {
    pub json: Vec<u8>,
    /// The version's search index rows (built by `crate::search`).
    pub search: Vec<search_index::SearchRow>,
    /// The patients whose compartment holds this version.
    pub compartments: Vec<String>,
}

/// One stored version, decrypted.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub row_id: i64,
    pub resource_type: String,
    pub logical_id: String,
    pub version_id: i64,
    pub last_updated: NaiveDateTime,
    pub deleted: bool,
    pub method: String,
    /// The JSON of the version (with `meta` as stamped at write time); `None` for a deletion.
    pub content: Option<Vec<u8>>,
    /// The patients whose compartment holds this version (for its audit record).
    pub patients: Vec<String>,
}

/// What a write did, as its AuditEvent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    Created,
    Updated,
    Deleted,
    /// A conditional create found this existing resource and wrote nothing.
    Matched,
    /// A delete found nothing to delete.
    Nothing,
}

/// The facts of a write inside its transaction, for its audit record.
#[derive(Debug)]
pub struct WriteFacts<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version_id: Option<i64>,
    pub effect: WriteEffect,
    /// The patients whose compartment holds the version written (or matched, or deleted).
    pub patients: &'a [String],
}

/// Builds the audit record of a write inside the write's own transaction, so the change and
/// its AuditEvent commit together or not at all (implemented by `crate::audit`).
pub trait WriteAudit: Send {
    fn record(&mut self, facts: &WriteFacts<'_>) -> Result<audit::AuditRow, StoreError>;
    /// The grant of the client writing (serialized by `crate::auth::Grant`): a Subscription
    /// it writes is filtered by it. `None` for the server's own writes.
    fn owner(&self) -> Option<String> {
        None
    }
    /// False only where auditing is switched off (benchmark baselines).
    fn enabled(&self) -> bool {
        true
    }
}

/// Inserts the write's audit record in the current transaction.
fn record_write(
    conn: &mut DbConnection,
    audit: &mut dyn WriteAudit,
    resource_type: &str,
    id: &str,
    version_id: Option<i64>,
    effect: WriteEffect,
    patients: &[String],
) -> Result<(), StoreError> {
    let facts = WriteFacts {
        resource_type,
        id,
        version_id,
        effect,
        patients,
    };
    let row = audit.record(&facts)?;
    if !audit.enabled() {
        return Ok(());
    }
    audit::insert_events(conn, std::slice::from_ref(&row))
}

/// Inserts an AuditEvent built before the write's transaction (see [`record_write`]).
fn insert_recorded(conn: &mut DbConnection, audit: &dyn WriteAudit, row: &audit::AuditRow) -> Result<(), StoreError> {
    if !audit.enabled() {
        return Ok(());
    }
    audit::insert_events(conn, std::slice::from_ref(row))
}

/// A version built, sealed and audited before its transaction (see [`Store::prepare_update`]).
struct PreparedVersion {
    version: i64,
    created: bool,
    ts: NaiveDateTime,
    content: Content,
    sealed: SealedVersion,
    event: audit::AuditRow,
}

/// The outcome of a successful write.
#[derive(Debug, Clone)]
pub struct Written {
    pub version_id: i64,
    pub last_updated: NaiveDateTime,
    pub created: bool,
    pub json: Vec<u8>,
}

/// A resource to create with [`StoreTx::create_many`].
pub struct NewResource {
    pub resource_type: String,
    pub id: String,
    pub content: Content,
    /// `Put`: a `PUT` that creates (the client chose the id).
    pub method: CreateMethod,
}

/// How a new resource came to be, as history reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMethod {
    /// `POST [type]`: the server chose the id.
    Post,
    /// `PUT [type]/[id]` that created: the client chose the id.
    Put,
}

pub enum CreateOutcome {
    Created(Written),
    /// A conditional create matched this existing resource; nothing was written.
    Existing(StoredVersion),
}

pub enum DeleteOutcome {
    Deleted {
        version_id: i64,
    },
    /// Nothing to delete: the resource never existed or is already deleted.
    NothingToDelete,
}

/// The condition of a conditional create, update or delete: a search (every clause must hold;
/// within one, any condition), run in the write's transaction under a lock on the condition.
/// A test on a resource's decrypted content.
pub type ContentTest = std::sync::Arc<dyn Fn(&serde_json::Value) -> bool + Send + Sync>;

#[derive(Clone)]
pub struct Condition {
    pub clauses: Vec<Vec<search_query::Cond>>,
    /// Blind-index conditions narrow only: candidates must also pass this on their content.
    pub recheck: Option<ContentTest>,
    /// The normalized condition, which the lock is taken on (hashed: it may hold PHI).
    pub key: String,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the values: they may be PHI
        write!(f, "Condition({} clauses)", self.clauses.len())
    }
}

/// What to list in a history query.
#[derive(Debug, Clone)]
pub enum HistoryScope {
    System,
    Type(String),
    Instance(String, String),
}

#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    pub since: Option<NaiveDateTime>,
    /// Only rows older than this row id (the paging cursor).
    pub before_row: Option<i64>,
    pub count: u32,
    /// Only versions in this patient's compartment (filtered in the query, counts included).
    pub patient: Option<String>,
    /// With `patient`: versions of these shared types that lie in no patient's compartment too.
    pub shared_types: Vec<String>,
}

pub struct HistoryPage {
    pub entries: Vec<StoredVersion>,
    pub total: i64,
    /// The cursor for the next page, if any.
    pub next_before_row: Option<i64>,
}

type Pool = r2d2::Pool<DbManager>;

pub struct Store {
    pool: Pool,
    backend: Backend,
    cipher: Arc<Cipher>,
    /// SQLite's one writer, whose transactions concurrent writes share.
    sqlite_writer: group_commit::SqliteWriter,
    /// Opens connections outside the pool (the audit writer keeps one of its own).
    manager: DbManager,
    /// A read replica for searches, history and export (PostgreSQL, `replica_database_url`).
    replica: Option<replica::Replica>,
    /// The types patients share, as the `fhirvault.shared` session setting the row-level
    /// security policy reads (`,Practitioner,Organization,`; empty: none).
    shared_setting: String,
    /// What subscriptions a write concerns (set once by the server; `None`: nobody watches).
    watch: std::sync::OnceLock<Arc<dyn subscription::WriteWatch>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Current time in UTC at microsecond precision (what both backends store exactly).
pub fn now() -> NaiveDateTime {
    let t = Utc::now().naive_utc();
    t.with_nanosecond(t.nanosecond() / 1000 * 1000).unwrap_or(t)
}

impl StoreError {
    /// A primary-key or unique constraint refused the write (a concurrent writer won).
    pub fn is_unique_violation(&self) -> bool {
        is_unique_violation(self)
    }

    /// The database connection died under the query (server restart, terminated backend,
    /// failover), or reached a server that takes no writes (a standby, a primary demoted after a
    /// failover): either way it is no use any more, is dropped, and the request is answered 503.
    pub fn is_lost_connection(&self) -> bool {
        matches!(
            self,
            StoreError::Database(DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection
                    | DatabaseErrorKind::UnableToSendCommand
                    | DatabaseErrorKind::ReadOnlyTransaction,
                _
            ))
        )
    }
}

/// Marks a session whose connection died so that the pool drops it.
fn note<T>(session: &mut connection::Session, result: Result<T, StoreError>) -> Result<T, StoreError> {
    if let Err(e) = &result {
        if e.is_lost_connection() {
            session.broken = true;
        }
    }
    result
}

fn is_unique_violation(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Database(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _))
    )
}

impl Store {
    /// Opens the pool (failing at once if the database cannot be reached) and applies pending migrations.
    ///
    /// With `migration_url` (PostgreSQL), migrations run as that role (the tables' owner), which
    /// then grants the server's role what it needs; row-level security binds the server's role
    /// only when it neither owns the tables nor bypasses RLS, and start-up says so when it does.
    pub fn open(
        database_url: &str,
        migration_url: Option<&str>,
        pool_size: u32,
        cipher: Arc<Cipher>,
    ) -> Result<Store, StoreError> {
        let manager = DbManager::new(database_url)?;
        let backend = manager.backend();
        // Open one connection by hand first: r2d2 would retry until its timeout and then report
        // only "timed out", hiding the reason (bad password, no such host …).
        let mut first = manager.connect()?;
        match migration_url {
            Some(url) => {
                let mut owner = DbManager::new(url)?.connect()?;
                run_migrations(&mut owner)?;
                grant_server_role(&mut owner, &mut first)?;
            }
            None => {
                run_migrations(&mut first)?;
            }
        }
        warn_if_rls_bypassed(&mut first)?;
        drop(first);
        let manager_outside_pool = manager.clone();
        let pool = r2d2::Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(pool_size.min(2)))
            .connection_timeout(Duration::from_secs(10))
            // r2d2 would run `SELECT 1` on every checkout: a second round trip per request.
            // A broken connection instead fails its query and is replaced by r2d2.
            .test_on_check_out(false)
            .build(manager)?;
        Ok(Store {
            pool,
            backend,
            cipher,
            sqlite_writer: Default::default(),
            manager: manager_outside_pool,
            replica: None,
            shared_setting: String::new(),
            watch: std::sync::OnceLock::new(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// SQLite serves one node: takes an exclusive lock beside the database for as long as the
    /// returned file is open, and refuses when another process holds it.
    pub fn claim_single_node(&self) -> Result<Option<std::fs::File>, StoreError> {
        let Some(db) = self.sqlite_path() else {
            return Ok(None);
        };
        let path = format!("{db}.serve.lock");
        let file = crate::secret_file::open_lock_file(std::path::Path::new(&path))
            .map_err(|e| StoreError::Lock(e.to_string()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Lock(
                "another fhirvault process is serving this SQLite database; SQLite serves one node \
                 (use PostgreSQL for several)"
                    .into(),
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Lock(e.to_string())),
        }
    }

    /// One round trip to the database (readiness): whether it takes writes. A PostgreSQL
    /// standby (before its promotion, or a demoted primary) answers but does not; neither does
    /// a server that cannot be reached within two seconds (a load balancer's probe gives up
    /// sooner than a request would).
    pub fn writable(&self) -> Result<bool, StoreError> {
        let mut conn = self.pool.get_timeout(Duration::from_secs(2))?;
        let result = match &mut conn.conn {
            DbConnection::Pg(_) => replica::standby_state(&mut conn.conn, "0/0").map(|(standby, _)| !standby),
            DbConnection::Sqlite(c) => c.batch_execute("SELECT 1").map(|()| true).map_err(StoreError::from),
        };
        let result = note(&mut conn, result);
        if result.as_ref().is_ok_and(|w| !w) {
            // a connection to a standby is no use for writes: let the pool open another
            conn.broken = true;
        }
        result
    }

    /// What this node's connections have seen of the database servers (failovers, lost
    /// connections), for `/metrics`.
    pub fn servers(&self) -> &connection::ServerTracker {
        self.manager.servers()
    }

    /// Open and idle connections of the pool (metrics).
    pub fn pool_status(&self) -> r2d2::State {
        self.pool.state()
    }

    pub fn cipher(&self) -> &Cipher {
        &self.cipher
    }

    pub fn shared_cipher(&self) -> Arc<Cipher> {
        self.cipher.clone()
    }

    /// The types patients share (see `fhir::compartment::PatientCompartment::is_shared`): on
    /// PostgreSQL, row-level security lets a patient-context session see their versions that lie
    /// in no patient's compartment.
    pub fn with_shared_types(mut self, types: &[String]) -> Store {
        self.shared_setting = if types.is_empty() {
            String::new()
        } else {
            format!(",{},", types.join(","))
        };
        self
    }

    /// A pooled connection whose session carries `access` (set only when it changes).
    fn checkout(&self, access: &Access) -> Result<r2d2::PooledConnection<DbManager>, StoreError> {
        let mut conn = self.pool.get()?;
        apply_access(&mut conn, access, &self.shared_setting)?;
        Ok(conn)
    }

    /// Held while writing on SQLite, which takes one writer at a time: this process's writers
    /// queue here rather than in SQLite's busy handler. `None` on PostgreSQL.
    /// Any batch of writes still open is committed first.
    fn sqlite_write_guard(&self) -> Option<std::sync::MutexGuard<'_, group_commit::WriterState>> {
        match self.backend {
            Backend::Sqlite => Some(self.sqlite_writer.exclusive()),
            Backend::Postgres => None,
        }
    }

    /// Runs `f` as one write of SQLite's shared write transaction (see [`group_commit`]).
    pub(crate) fn sqlite_shared_write<T>(
        &self,
        f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.sqlite_writer.write(&self.manager, f)
    }

    /// Writes on SQLite so far and the commits they shared (see [`group_commit`]).
    pub fn group_commit_stats(&self) -> group_commit::GroupCommitStats {
        self.sqlite_writer.stats()
    }

    /// Runs `f` in one write transaction: on PostgreSQL its own; on SQLite a savepoint of a
    /// transaction shared with the writes waiting beside it, answered after that commits.
    fn write_tx<T>(
        &self,
        access: &Access,
        f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        subscription::begin();
        let result = match self.backend {
            Backend::Sqlite => self.sqlite_writer.write(&self.manager, f),
            Backend::Postgres => {
                let mut conn = self.checkout(access)?;
                let result = conn.conn.write_transaction(f);
                note(&mut conn, result)
            }
        };
        if subscription::matched() && result.is_ok() {
            if let Some(watch) = self.watch.get() {
                watch.committed();
            }
        }
        result
    }

    /// Sets what decides which subscriptions each write concerns (once, at start-up).
    pub fn set_watch(&self, watch: Arc<dyn subscription::WriteWatch>) {
        let _ = self.watch.set(watch);
    }

    /// After a write in its transaction: a Subscription written by a client takes that client
    /// as its owner, and every subscription the write concerns gets it in its outbox.
    #[allow(clippy::too_many_arguments)]
    fn watched(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        version_id: i64,
        event: subscription::ChangeEvent,
        content: Option<&Content>,
        audit: &dyn WriteAudit,
        ts: NaiveDateTime,
    ) -> Result<(), StoreError> {
        if resource_type == subscription::SUBSCRIPTION {
            match content {
                None => subscription::record_deleted(conn, id, ts)?,
                Some(c) => {
                    if let Some(owner) = audit.owner() {
                        // what the client may set: `off`, `error` (neither delivers) or
                        // `requested` (`crate::api::crud` writes `active` as `requested`)
                        let value = serde_json::from_slice::<serde_json::Value>(&c.json).unwrap_or_default();
                        let status = match value["status"].as_str() {
                            Some("off") => "off",
                            Some("error") => "error",
                            _ => "requested",
                        };
                        subscription::record_owner(conn, id, &owner, status, ts)?;
                    }
                }
            }
        }
        if let Some(watch) = self.watch.get() {
            let change = subscription::Change {
                resource_type,
                id,
                version_id,
                event,
                search: content.map(|c| c.search.as_slice()).unwrap_or(&[]),
            };
            subscription::record_matches(conn, watch.as_ref(), &change, ts)?;
        }
        Ok(())
    }

    /// Decrypts a version's content and checks it against its stored SHA-256.
    fn open_version(
        &self,
        resource_type: &str,
        logical_id: &str,
        version_id: i64,
        sealed: &crate::crypto::Sealed,
        digest: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let aad = Aad {
            table: VERSIONS_TABLE,
            resource_type,
            logical_id,
            version_id,
        };
        let plain = self.cipher.open(&aad, sealed)?;
        if sha256(&plain).as_slice() != digest {
            return Err(StoreError::Integrity);
        }
        Ok(plain)
    }

    fn decrypt_row(&self, row: VersionRow) -> Result<StoredVersion, StoreError> {
        let content = match (&row.content, &row.content_sha256) {
            (Some(sealed), Some(digest)) => {
                Some(self.open_version(&row.resource_type, &row.logical_id, row.version_id, &sealed.0, digest)?)
            }
            (None, None) if row.deleted => None,
            _ => return Err(StoreError::Integrity),
        };
        Ok(StoredVersion {
            row_id: row.id,
            resource_type: row.resource_type,
            logical_id: row.logical_id,
            version_id: row.version_id,
            last_updated: row.last_updated,
            deleted: row.deleted,
            method: row.method,
            content,
            patients: row
                .patients
                .map(|p| p.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
                .unwrap_or_default(),
        })
    }

    /// The current version: one indexed query and one decrypt.
    pub fn read(&self, access: &Access, resource_type: &str, id: &str) -> Result<StoredVersion, StoreError> {
        // A read is idempotent: while pooled connections turn out dead (after a database restart
        // all of them are), each is dropped and the read retried on another, then a new one.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .checkout(access)
                .and_then(|conn| self.read_on(conn, resource_type, id))
            {
                Err(e) if e.is_lost_connection() && attempts <= self.pool.max_size() => continue,
                other => return other,
            }
        }
    }

    /// Like [`Store::read`], but only if a pooled connection is idle right now (never waits);
    /// `None` means "use `read` from a blocking thread".
    pub fn read_if_idle(
        &self,
        access: &Access,
        resource_type: &str,
        id: &str,
    ) -> Option<Result<StoredVersion, StoreError>> {
        let mut conn = self.pool.try_get()?;
        if let Err(e) = apply_access(&mut conn, access, &self.shared_setting) {
            return if e.is_lost_connection() { None } else { Some(Err(e)) };
        }
        match self.read_on(conn, resource_type, id) {
            // a dead connection: let the caller retry from a blocking thread (`read` retries)
            Err(e) if e.is_lost_connection() => None,
            other => Some(other),
        }
    }

    fn read_on(
        &self,
        mut conn: r2d2::PooledConnection<DbManager>,
        resource_type: &str,
        id: &str,
    ) -> Result<StoredVersion, StoreError> {
        // The current version is named by `resources` (a subselect on its primary key), not found
        // by `ORDER BY version_id DESC LIMIT ?`: SQLite re-prepares a statement whose LIMIT is a
        // bound parameter on every execution, which made reads five times slower.
        let current = cur::table
            .filter(cur::resource_type.eq(resource_type).and(cur::logical_id.eq(id)))
            .select(cur::version_id)
            .single_value();
        let row: Result<Option<VersionRow>, StoreError> = per_backend!(&mut conn.conn, |c| rv::table
            .filter(rv::resource_type.eq(resource_type).and(rv::logical_id.eq(id)))
            .filter(rv::version_id.nullable().eq(current))
            .select(VersionRow::as_select())
            .get_result(c)
            .optional())
        .map_err(StoreError::from);
        let row = note(&mut conn, row)?;
        drop(conn);
        let row = row.ok_or(StoreError::NotFound)?;
        if row.deleted {
            return Err(StoreError::Gone {
                version_id: row.version_id,
                last_updated: row.last_updated,
            });
        }
        self.decrypt_row(row)
    }

    /// The current, not deleted, versions of several resources of one type in one query, in
    /// the order of `ids` (absent or deleted ones are left out).
    pub fn read_many(
        &self,
        access: &Access,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<StoredVersion>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.checkout_read(access)?;
        let rows = current_rows(&mut conn.conn, resource_type, ids);
        let rows = note(&mut conn, rows)?;
        drop(conn);
        let mut by_id: std::collections::HashMap<String, StoredVersion> = std::collections::HashMap::new();
        for row in rows {
            let v = self.decrypt_row(row)?;
            by_id.insert(v.logical_id.clone(), v);
        }
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    /// The SQL of `read_many` alone: the rows fetched, nothing decrypted (the benches'
    /// baseline of "the SQL a search runs").
    pub fn fetch_current_rows(
        &self,
        access: &Access,
        resource_type: &str,
        ids: &[String],
    ) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.checkout(access)?;
        let rows = current_rows(&mut conn.conn, resource_type, ids);
        Ok(note(&mut conn, rows)?.len())
    }

    /// One specific version.
    pub fn vread(
        &self,
        access: &Access,
        resource_type: &str,
        id: &str,
        version_id: i64,
    ) -> Result<StoredVersion, StoreError> {
        let mut conn = self.checkout(access)?;
        let row: Result<Option<VersionRow>, StoreError> = rv::table
            .filter(
                rv::resource_type
                    .eq(resource_type)
                    .and(rv::logical_id.eq(id))
                    .and(rv::version_id.eq(version_id)),
            )
            .select(VersionRow::as_select())
            .get_result(&mut conn.conn)
            .optional()
            .map_err(StoreError::from);
        let row = note(&mut conn, row)?;
        drop(conn);
        let row = row.ok_or(StoreError::NotFound)?;
        if row.deleted {
            return Err(StoreError::Gone {
                version_id: row.version_id,
                last_updated: row.last_updated,
            });
        }
        self.decrypt_row(row)
    }

    /// Creates a resource with the given id, or (with a condition) returns the one existing match.
    /// `make` builds the content once the version and timestamp are known.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        access: &Access,
        resource_type: &str,
        id: &str,
        method: CreateMethod,
        condition: Option<&Condition>,
        make: impl FnOnce(i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<CreateOutcome, StoreError> {
        // A new resource is version 1: its content is built and encrypted before the
        // transaction, so the write lock (SQLite's single writer) is held for the SQL only.
        let (ts, content, sealed) = self.first_version(resource_type, id, make)?;
        // So is its AuditEvent, unless a condition may turn the create into a match.
        let event = match condition {
            None => Some(audit.record(&WriteFacts {
                resource_type,
                id,
                version_id: Some(1),
                effect: WriteEffect::Created,
                patients: &content.compartments,
            })?),
            Some(_) => None,
        };
        self.write_tx(access, |conn| {
            self.create_in_tx(
                conn,
                resource_type,
                id,
                method,
                condition,
                ts,
                content,
                sealed,
                event,
                audit,
            )
        })
    }

    /// Version 1 of a new resource: its time, content and sealed row.
    fn first_version(
        &self,
        resource_type: &str,
        id: &str,
        make: impl FnOnce(i64, NaiveDateTime) -> Content,
    ) -> Result<(NaiveDateTime, Content, SealedVersion), StoreError> {
        let ts = now();
        let content = make(1, ts);
        let sealed = self.seal(resource_type, id, 1, Some(&content))?;
        Ok((ts, content, sealed))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_in_tx(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        method: CreateMethod,
        condition: Option<&Condition>,
        ts: NaiveDateTime,
        content: Content,
        sealed: SealedVersion,
        event: Option<audit::AuditRow>,
        audit: &mut dyn WriteAudit,
    ) -> Result<CreateOutcome, StoreError> {
        if let Some(cond) = condition {
            self.lock_condition(conn, resource_type, cond)?;
            let matches = self.matching_ids(conn, resource_type, cond, 2)?;
            match matches.as_slice() {
                [] => {}
                [id] => {
                    let row: VersionRow = rv::table
                        .filter(rv::resource_type.eq(resource_type).and(rv::logical_id.eq(&id)))
                        .order(rv::version_id.desc())
                        .select(VersionRow::as_select())
                        .first(conn)?;
                    let existing = self.decrypt_row(row)?;
                    record_write(
                        conn,
                        audit,
                        resource_type,
                        &existing.logical_id,
                        Some(existing.version_id),
                        WriteEffect::Matched,
                        &existing.patients,
                    )?;
                    return Ok(CreateOutcome::Existing(existing));
                }
                _ => return Err(StoreError::MultipleMatches),
            }
        }
        insert_current(conn, resource_type, id, ts)?;
        let method = match method {
            CreateMethod::Post => "POST",
            CreateMethod::Put => "PUT",
        };
        self.append_version(conn, resource_type, id, 1, ts, method, Some(&content), sealed)?;
        self.replace_index(conn, resource_type, id, Some(&content), true)?;
        self.watched(
            conn,
            resource_type,
            id,
            1,
            subscription::ChangeEvent::Create,
            Some(&content),
            audit,
            ts,
        )?;
        match event {
            Some(row) => insert_recorded(conn, audit, &row)?,
            None => record_write(
                conn,
                audit,
                resource_type,
                id,
                Some(1),
                WriteEffect::Created,
                &content.compartments,
            )?,
        }
        Ok(CreateOutcome::Created(Written {
            version_id: 1,
            last_updated: ts,
            created: true,
            json: content.json,
        }))
    }

    /// Runs `f` in one write transaction with the operations of [`StoreTx`]: all of it commits
    /// or none (a transaction bundle). `f`'s error (of the caller's type) rolls everything back
    /// and is returned as it was; a failure of the store itself (the commit) is converted.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        access: &Access,
        f: impl FnOnce(&mut StoreTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut failure = None;
        let result = self.write_tx(access, |conn| {
            let mut tx = StoreTx {
                store: self,
                conn,
                access: access.clone(),
            };
            f(&mut tx).map_err(|e| {
                failure = Some(e);
                StoreError::Abandoned
            })
        });
        match (result, failure) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(E::from(e)),
        }
    }

    /// Updates (or, when it does not exist yet and `may_create`, creates) the resource with
    /// this id. With `if_match`, the write happens only if the current version is that one.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        access: &Access,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        may_create: bool,
        make: impl Fn(i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<Written, StoreError> {
        // On SQLite, whose one writer every write waits for, the new version is built, sealed
        // and audited before the turn, for the version that is likely next.
        let mut prepared = match self.backend {
            Backend::Sqlite => self.prepare_update(access, resource_type, id, if_match, may_create, &make, audit)?,
            Backend::Postgres => None,
        };
        // A concurrent update-as-create of the same new id makes one of two INSERTs fail on
        // the primary key; the loser retries, and then finds the row and updates it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let prepared = prepared.take();
            let result = self.write_tx(access, |conn| {
                self.update_in_tx(conn, resource_type, id, if_match, may_create, &make, prepared, audit)
            });
            match result {
                Err(e) if attempts < 3 && is_unique_violation(&e) => continue,
                other => return other,
            }
        }
    }

    /// The version an update will most likely write (the current one's successor, or the
    /// first), built, sealed and with its AuditEvent, read and made outside any transaction.
    /// `None` where the update cannot succeed as things stand (the transaction says why).
    #[allow(clippy::too_many_arguments)]
    fn prepare_update(
        &self,
        access: &Access,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        may_create: bool,
        make: &dyn Fn(i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<Option<PreparedVersion>, StoreError> {
        let current = {
            let mut conn = self.checkout(access)?;
            let current = current_version(&mut conn.conn, resource_type, id);
            note(&mut conn, current)?
        };
        let (version, created) = match (current, if_match) {
            (Some((v, _)), None) => (v + 1, false),
            (Some((v, _)), Some(m)) if m == v => (v + 1, false),
            (None, None) if may_create => (1, true),
            _ => return Ok(None),
        };
        let ts = now();
        let content = make(version, ts);
        let sealed = self.seal(resource_type, id, version, Some(&content))?;
        let event = audit.record(&WriteFacts {
            resource_type,
            id,
            version_id: Some(version),
            effect: if created {
                WriteEffect::Created
            } else {
                WriteEffect::Updated
            },
            patients: &content.compartments,
        })?;
        Ok(Some(PreparedVersion {
            version,
            created,
            ts,
            content,
            sealed,
            event,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn update_in_tx(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        may_create: bool,
        make: &dyn Fn(i64, NaiveDateTime) -> Content,
        prepared: Option<PreparedVersion>,
        audit: &mut dyn WriteAudit,
    ) -> Result<Written, StoreError> {
        // What was prepared holds when the current version is still the one it was made for
        // (its time is then later than that version's); otherwise it is built again, now.
        let foreseen = match &prepared {
            Some(p) if p.created => {
                // another create of this id in between fails this one on the primary key,
                // and `update` tries again without what was prepared
                insert_current(conn, resource_type, id, p.ts)?;
                Some((p.ts, 1, true))
            }
            Some(p) => {
                bump_current(conn, resource_type, id, Some(p.version - 1), false, p.ts)?.map(|(v, at)| (at, v, false))
            }
            None => None,
        };
        let (ts, version, created) = match foreseen {
            Some(f) => f,
            None => self.next_version(conn, resource_type, id, if_match, may_create)?,
        };
        let (content, sealed, event) = match prepared {
            Some(p) if (p.version, p.created, p.ts) == (version, created, ts) => (p.content, p.sealed, Some(p.event)),
            _ => {
                let content = make(version, ts);
                let sealed = self.seal(resource_type, id, version, Some(&content))?;
                (content, sealed, None)
            }
        };
        self.append_version(conn, resource_type, id, version, ts, "PUT", Some(&content), sealed)?;
        self.replace_index(conn, resource_type, id, Some(&content), created)?;
        let change = if created {
            subscription::ChangeEvent::Create
        } else {
            subscription::ChangeEvent::Update
        };
        self.watched(conn, resource_type, id, version, change, Some(&content), audit, ts)?;
        match event {
            Some(row) => insert_recorded(conn, audit, &row)?,
            None => record_write(
                conn,
                audit,
                resource_type,
                id,
                Some(version),
                if created {
                    WriteEffect::Created
                } else {
                    WriteEffect::Updated
                },
                &content.compartments,
            )?,
        }
        Ok(Written {
            version_id: version,
            last_updated: ts,
            created,
            json: content.json,
        })
    }

    /// Makes the next version of a resource current (a deleted one's numbering continues, so
    /// a version id is never reused), or its first when it does not exist and may be created:
    /// the time, version and whether it was created.
    fn next_version(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        may_create: bool,
    ) -> Result<(NaiveDateTime, i64, bool), StoreError> {
        let ts = now();
        if let Some((v, at)) = bump_current(conn, resource_type, id, if_match, false, ts)? {
            return Ok((at, v, false));
        }
        if if_match.is_some() {
            let current = current_version(conn, resource_type, id)?.map(|(v, _)| v);
            return Err(StoreError::VersionConflict { current });
        }
        if !may_create {
            return Err(StoreError::CreateNotAllowed);
        }
        insert_current(conn, resource_type, id, ts)?;
        Ok((ts, 1, true))
    }

    /// A conditional update (`PUT [type]?…`): the one match is updated; with none, the
    /// resource is created (under `body_id`, else `new_id`); several are refused. Resolved and
    /// written in one transaction under the condition's lock, so two of them cannot both
    /// create. `make(id, version, ts)` builds the content. Returns the id written.
    #[allow(clippy::too_many_arguments)]
    pub fn conditional_update(
        &self,
        access: &Access,
        resource_type: &str,
        cond: &Condition,
        body_id: Option<&str>,
        new_id: &str,
        if_match: Option<i64>,
        make: impl Fn(&str, i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<(String, Written), StoreError> {
        self.write_tx(access, |conn| {
            self.conditional_update_in_tx(conn, resource_type, cond, body_id, new_id, if_match, &make, audit)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn conditional_update_in_tx(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        cond: &Condition,
        body_id: Option<&str>,
        new_id: &str,
        if_match: Option<i64>,
        make: &dyn Fn(&str, i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<(String, Written), StoreError> {
        self.lock_condition(conn, resource_type, cond)?;
        let matches = self.matching_ids(conn, resource_type, cond, 2)?;
        let id = match (matches.as_slice(), body_id) {
            ([], Some(b)) => b.to_string(),
            ([], None) => new_id.to_string(),
            ([one], Some(b)) if one != b => return Err(StoreError::ConditionIdMismatch),
            ([one], _) => one.clone(),
            _ => return Err(StoreError::MultipleMatches),
        };
        let written = self.update_in_tx(
            conn,
            resource_type,
            &id,
            if_match,
            true,
            &|v, ts| make(&id, v, ts),
            None,
            audit,
        )?;
        Ok((id, written))
    }

    /// A conditional delete (`DELETE [type]?…`): the one match is deleted, none is nothing to
    /// delete, several are refused; in one transaction under the condition's lock.
    pub fn conditional_delete(
        &self,
        access: &Access,
        resource_type: &str,
        cond: &Condition,
        audit: &mut dyn WriteAudit,
    ) -> Result<DeleteOutcome, StoreError> {
        self.write_tx(access, |conn| {
            self.conditional_delete_in_tx(conn, resource_type, cond, audit)
        })
    }

    fn conditional_delete_in_tx(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        cond: &Condition,
        audit: &mut dyn WriteAudit,
    ) -> Result<DeleteOutcome, StoreError> {
        self.lock_condition(conn, resource_type, cond)?;
        let matches = self.matching_ids(conn, resource_type, cond, 2)?;
        match matches.as_slice() {
            [] => {
                record_write(conn, audit, resource_type, "", None, WriteEffect::Nothing, &[])?;
                Ok(DeleteOutcome::NothingToDelete)
            }
            [id] => self.delete_in_tx(conn, resource_type, id, None, audit),
            _ => Err(StoreError::MultipleMatches),
        }
    }

    /// Deletes the resource: appends a tombstone version and drops its index entries.
    pub fn delete(
        &self,
        access: &Access,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        audit: &mut dyn WriteAudit,
    ) -> Result<DeleteOutcome, StoreError> {
        self.write_tx(access, |conn| {
            self.delete_in_tx(conn, resource_type, id, if_match, audit)
        })
    }

    fn delete_in_tx(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        audit: &mut dyn WriteAudit,
    ) -> Result<DeleteOutcome, StoreError> {
        let bumped = bump_current(conn, resource_type, id, if_match, true, now())?;
        let Some((version, ts)) = bumped else {
            if if_match.is_some() {
                if let Some((v, false)) = current_version(conn, resource_type, id)? {
                    return Err(StoreError::VersionConflict { current: Some(v) });
                }
            }
            record_write(conn, audit, resource_type, id, None, WriteEffect::Nothing, &[])?;
            return Ok(DeleteOutcome::NothingToDelete);
        };
        let patients = self.append_version(conn, resource_type, id, version, ts, "DELETE", None, (None, None, None))?;
        self.replace_index(conn, resource_type, id, None, false)?;
        self.watched(
            conn,
            resource_type,
            id,
            version,
            subscription::ChangeEvent::Delete,
            None,
            audit,
            ts,
        )?;
        record_write(
            conn,
            audit,
            resource_type,
            id,
            Some(version),
            WriteEffect::Deleted,
            &patients,
        )?;
        Ok(DeleteOutcome::Deleted { version_id: version })
    }

    /// History, newest first, paged by row id.
    pub fn history(&self, access: &Access, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let mut conn = self.checkout_read(access)?;
        let base = || {
            let mut b = rv::table.into_boxed();
            match &q.scope {
                HistoryScope::System => {}
                HistoryScope::Type(t) => b = b.filter(rv::resource_type.eq(t.clone())),
                HistoryScope::Instance(t, id) => {
                    b = b.filter(rv::resource_type.eq(t.clone()).and(rv::logical_id.eq(id.clone())))
                }
            }
            if let Some(since) = q.since {
                b = b.filter(rv::last_updated.ge(since));
            }
            if let Some(patient) = &q.patient {
                let same_version = || {
                    rc::resource_type
                        .eq(rv::resource_type)
                        .and(rc::logical_id.eq(rv::logical_id))
                        .and(rc::version_id.eq(rv::version_id))
                };
                let own = diesel::dsl::exists(rc::table.filter(same_version().and(rc::patient_id.eq(patient.clone()))));
                let shared = rv::resource_type
                    .eq_any(q.shared_types.clone())
                    .and(diesel::dsl::not(diesel::dsl::exists(rc::table.filter(same_version()))));
                b = b.filter(own.or(shared));
            }
            b
        };
        let total = base()
            .count()
            .get_result::<i64>(&mut conn.conn)
            .map_err(StoreError::from);
        let total = note(&mut conn, total)?;
        let mut page = base();
        if let Some(before) = q.before_row {
            page = page.filter(rv::id.lt(before));
        }
        let rows = page
            .order(rv::id.desc())
            .limit(i64::from(q.count) + 1)
            .select(VersionRow::as_select())
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        let rows: Vec<VersionRow> = note(&mut conn, rows)?;
        drop(conn);
        let has_more = rows.len() > q.count as usize;
        let mut entries = Vec::with_capacity(rows.len().min(q.count as usize));
        for row in rows.into_iter().take(q.count as usize) {
            entries.push(self.decrypt_row(row)?);
        }
        let next_before_row = if has_more {
            entries.last().map(|e| e.row_id)
        } else {
            None
        };
        Ok(HistoryPage {
            entries,
            total,
            next_before_row,
        })
    }

    /// Ids of current (not deleted) resources of a type matching `cond`, at most `limit`
    /// (after the re-check, which reads the candidates' content in this transaction).
    fn matching_ids(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        cond: &Condition,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let Some(recheck) = &cond.recheck else {
            return search_query::matching_ids(conn, resource_type, &cond.clauses, Some(limit));
        };
        let mut found = Vec::new();
        let candidates = search_query::matching_ids(conn, resource_type, &cond.clauses, None)?;
        for chunk in candidates.chunks(200) {
            for row in current_rows(conn, resource_type, chunk)? {
                let v = self.decrypt_row(row)?;
                let Some(json) = &v.content else { continue };
                let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| StoreError::Integrity)?;
                if recheck(&value) {
                    found.push(v.logical_id);
                    if found.len() >= limit {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Serializes concurrent conditional writes on the same condition (PostgreSQL: a
    /// transaction-scoped advisory lock; SQLite: already serialized by the writer mutex).
    fn lock_condition(&self, conn: &mut DbConnection, resource_type: &str, cond: &Condition) -> Result<(), StoreError> {
        if let DbConnection::Pg(pg) = conn {
            let key = format!("{resource_type}?{}", cond.key);
            // A keyed hash, so the lock id reveals nothing of the (possibly PHI) condition.
            let h = self.cipher.blind_index("condition-lock", &key);
            let lock_id = i64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
            diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<diesel::sql_types::BigInt, _>(lock_id)
                .execute(pg)?;
        }
        Ok(())
    }

    /// Encrypts a version's content for its row: ciphertext, SHA-256 of the plaintext, key version.
    fn seal(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
        content: Option<&Content>,
    ) -> Result<SealedVersion, StoreError> {
        Ok(match content {
            Some(c) => {
                let aad = Aad {
                    table: VERSIONS_TABLE,
                    resource_type,
                    logical_id: id,
                    version_id: version,
                };
                let sealed = self.cipher.seal(&aad, &c.json)?;
                (
                    Some(EncryptedColumn(sealed)),
                    Some(sha256(&c.json).to_vec()),
                    Some(self.cipher.current_version() as i32),
                )
            }
            None => (None, None, None),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn append_version(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        version: i64,
        ts: NaiveDateTime,
        method: &str,
        content: Option<&Content>,
        (sealed, digest, key_version): SealedVersion,
    ) -> Result<Vec<String>, StoreError> {
        // The version's compartments first (row-level security checks the version row against
        // them): computed from the content, or for a deletion carried over
        // from the version it deletes (so a patient still sees the tombstone of its own data).
        let patients: Vec<String> = match content {
            Some(c) => c.compartments.clone(),
            None => rc::table
                .filter(
                    rc::resource_type
                        .eq(resource_type)
                        .and(rc::logical_id.eq(id))
                        .and(rc::version_id.eq(version - 1)),
                )
                .select(rc::patient_id)
                .load(conn)?,
        };
        let rows: Vec<_> = patients
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|p| {
                (
                    rc::resource_type.eq(resource_type),
                    rc::logical_id.eq(id),
                    rc::version_id.eq(version),
                    rc::patient_id.eq(p.as_str()),
                )
            })
            .collect();
        if !rows.is_empty() {
            match conn {
                DbConnection::Pg(c) => diesel::insert_into(rc::table).values(&rows).execute(c)?,
                DbConnection::Sqlite(c) => diesel::insert_into(rc::table).values(&rows).execute(c)?,
            };
        }
        diesel::insert_into(rv::table)
            .values((
                rv::resource_type.eq(resource_type),
                rv::logical_id.eq(id),
                rv::version_id.eq(version),
                rv::last_updated.eq(ts),
                rv::deleted.eq(content.is_none()),
                rv::method.eq(method),
                rv::key_version.eq(key_version),
                rv::content.eq(sealed),
                rv::content_sha256.eq(digest),
            ))
            .execute(conn)?;
        Ok(patients)
    }

    /// Replaces the search index rows of a resource; `fresh` when it cannot have any yet.
    fn replace_index(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        id: &str,
        content: Option<&Content>,
        fresh: bool,
    ) -> Result<(), StoreError> {
        search_index::replace(
            conn,
            resource_type,
            id,
            content.map(|c| c.search.as_slice()).unwrap_or(&[]),
            fresh,
        )
    }
}

/// The current, not deleted, version rows of `ids` (one query).
fn current_rows(conn: &mut DbConnection, resource_type: &str, ids: &[String]) -> Result<Vec<VersionRow>, StoreError> {
    macro_rules! current_of {
        ($c:expr, $ids:expr) => {
            rv::table
                .filter(rv::resource_type.eq(resource_type).and($ids))
                .filter(rv::deleted.eq(false))
                .filter(diesel::dsl::exists(
                    cur::table.filter(
                        cur::resource_type
                            .eq(rv::resource_type)
                            .and(cur::logical_id.eq(rv::logical_id))
                            .and(cur::version_id.eq(rv::version_id)),
                    ),
                ))
                .select(VersionRow::as_select())
                .load($c)?
        };
    }
    Ok(match conn {
        // `= ANY($n)`: one array bind, the same text for any number of ids
        DbConnection::Pg(c) => current_of!(c, rv::logical_id.eq_any(ids)),
        // Diesel's `IN (?, ?, …)` has a text per number of ids, which SQLite would parse again for
        // every search page (a sixth of a search's time); one JSON array bind keeps it prepared
        DbConnection::Sqlite(c) => current_of!(c, LogicalIdIn::new(ids)),
    })
}

/// `resource_versions.logical_id IN (SELECT value FROM json_each(?))` (SQLite): a list of ids in
/// one bind, so that the statement's text is the same for any number of them and stays prepared.
#[derive(Debug, Clone, diesel::query_builder::QueryId, diesel::expression::ValidGrouping)]
struct LogicalIdIn {
    json: String,
}

impl LogicalIdIn {
    fn new(ids: &[String]) -> LogicalIdIn {
        LogicalIdIn {
            json: serde_json::Value::from(ids).to_string(),
        }
    }
}

impl Expression for LogicalIdIn {
    type SqlType = diesel::sql_types::Bool;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for LogicalIdIn {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        out.push_sql("`resource_versions`.`logical_id` IN (SELECT value FROM json_each(");
        out.push_bind_param::<diesel::sql_types::Text, _>(&self.json)?;
        out.push_sql("))");
        Ok(())
    }
}

impl<QS> diesel::expression::SelectableExpression<QS> for LogicalIdIn where Self: AppearsOnTable<QS> {}
impl diesel::expression::AppearsOnTable<rv::table> for LogicalIdIn {}

/// Gives the session the access context (PostgreSQL; a no-op on SQLite). Session-level rather
/// than per transaction so that a read stays one round trip; every checkout goes through here,
/// so a connection never carries a previous request's context into a query.
/// The shared types (`shared`, see [`Store::with_shared_types`]) are set with it, in the same
/// statement.
fn apply_access(session: &mut connection::Session, access: &Access, shared: &str) -> Result<(), StoreError> {
    let DbConnection::Pg(pg) = &mut session.conn else {
        return Ok(());
    };
    let setting = access.setting();
    if session.access.as_deref() != Some(setting.as_str()) {
        // Forget the cached context first: if setting it fails, the next checkout sets it again.
        session.access = None;
        let set = diesel::sql_query(
            "SELECT set_config('fhirvault.access', $1, false), set_config('fhirvault.shared', $2, false)",
        )
        .bind::<diesel::sql_types::Text, _>(&setting)
        .bind::<diesel::sql_types::Text, _>(shared)
        .execute(pg)
        .map(|_| ())
        .map_err(StoreError::from);
        note(session, set)?;
        session.access = Some(setting);
    }
    Ok(())
}

/// Inserts the current-version row of a new resource (version 1).
fn insert_current(conn: &mut DbConnection, resource_type: &str, id: &str, ts: NaiveDateTime) -> Result<(), StoreError> {
    diesel::insert_into(cur::table)
        .values((
            cur::resource_type.eq(resource_type),
            cur::logical_id.eq(id),
            cur::version_id.eq(1i64),
            cur::last_updated.eq(ts),
            cur::deleted.eq(false),
        ))
        .execute(conn)?;
    Ok(())
}

/// Moves the current-version row on by one version, atomically (the row lock serializes
/// concurrent writers): only from version `if_match` when given; `delete` marks it deleted and
/// applies only to a live resource. Returns the new version, or `None` when no row qualified.
fn bump_current(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
    if_match: Option<i64>,
    delete: bool,
    ts: NaiveDateTime,
) -> Result<Option<(i64, NaiveDateTime)>, StoreError> {
    macro_rules! bump {
        ($c:expr, $last_updated:expr) => {{
            let mut q = diesel::update(cur::table)
                .filter(cur::resource_type.eq(resource_type).and(cur::logical_id.eq(id)))
                .into_boxed();
            if let Some(v) = if_match {
                q = q.filter(cur::version_id.eq(v));
            }
            if delete {
                q = q.filter(cur::deleted.eq(false));
            }
            q.set((
                cur::version_id.eq(cur::version_id + 1),
                cur::last_updated.eq($last_updated),
                cur::deleted.eq(delete),
            ))
            .returning((cur::version_id, cur::last_updated))
            .get_result($c)
            .optional()?
        }};
    }
    Ok(match conn {
        // Concurrent writers of one resource take its time before they queue for its row: the
        // one that waited may hold the earlier time. A version is never older than the one it
        // follows (history and `_since` rely on that): at least a microsecond after it.
        DbConnection::Pg(c) => bump!(
            c,
            greatest(
                ts,
                cur::last_updated + diesel::pg::data_types::PgInterval::from_microseconds(1)
            )
        ),
        // SQLite's writes take turns, each with its time taken in its turn (or prepared for the
        // version it found current, which is then older)
        DbConnection::Sqlite(c) => bump!(c, ts),
    })
}

diesel::define_sql_function! {
    /// PostgreSQL's `GREATEST` of two timestamps.
    fn greatest(a: diesel::sql_types::Timestamp, b: diesel::sql_types::Timestamp) -> diesel::sql_types::Timestamp;
}

/// The current version and deleted flag of a resource, if it was ever written.
fn current_version(conn: &mut DbConnection, resource_type: &str, id: &str) -> Result<Option<(i64, bool)>, StoreError> {
    Ok(cur::table
        .filter(cur::resource_type.eq(resource_type).and(cur::logical_id.eq(id)))
        .select((cur::version_id, cur::deleted))
        .first(conn)
        .optional()?)
}

/// Ciphertext, SHA-256 of the plaintext and key version of one version (all `None` for a deletion).
type SealedVersion = (Option<EncryptedColumn>, Option<Vec<u8>>, Option<i32>);

#[derive(Queryable, Selectable)]
#[diesel(table_name = rv)]
struct VersionRow {
    id: i64,
    resource_type: String,
    logical_id: String,
    version_id: i64,
    last_updated: NaiveDateTime,
    deleted: bool,
    method: String,
    content: Option<EncryptedColumn>,
    content_sha256: Option<Vec<u8>>,
    /// The version's compartment patients, comma-separated (ids cannot hold a comma), fetched in
    /// the same statement so that auditing a read costs no extra round trip. `string_agg` exists
    /// in PostgreSQL and in SQLite from 3.44.
    #[diesel(select_expression = CompartmentPatients)]
    #[diesel(select_expression_type = CompartmentPatients)]
    patients: Option<String>,
}

/// The patients of a version's compartments, comma-separated: a correlated subselect on
/// `resource_versions`. Its own expression type rather than `diesel::dsl::sql`, because Diesel
/// never caches a statement holding an SQL literal: every read was parsed (SQLite) or parsed
/// and planned (PostgreSQL) again.
#[derive(Debug, Clone, Copy, diesel::query_builder::QueryId, diesel::expression::ValidGrouping)]
struct CompartmentPatients;

impl Expression for CompartmentPatients {
    type SqlType = diesel::sql_types::Nullable<diesel::sql_types::Text>;
}

impl<DB: diesel::backend::Backend> diesel::query_builder::QueryFragment<DB> for CompartmentPatients {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql(
            "(SELECT string_agg(c.patient_id, ',') FROM resource_compartments c \
             WHERE c.resource_type = resource_versions.resource_type AND c.logical_id = resource_versions.logical_id \
             AND c.version_id = resource_versions.version_id)",
        );
        Ok(())
    }
}

impl<QS> diesel::expression::SelectableExpression<QS> for CompartmentPatients where Self: AppearsOnTable<QS> {}
impl diesel::expression::AppearsOnTable<rv::table> for CompartmentPatients {}

/// The operations of one write transaction ([`Store::transaction`]): the same writes as the
/// [`Store`] methods of those names, on the transaction's connection, each with its own audit
/// record inserted in the transaction.
pub struct StoreTx<'s> {
    store: &'s Store,
    conn: &'s mut DbConnection,
    access: Access,
}

impl StoreTx<'_> {
    /// Narrows or widens whose data the following statements may touch (PostgreSQL: a
    /// transaction-local setting the row-level-security policy reads; it ends with the
    /// transaction).
    pub fn set_access(&mut self, access: &Access) -> Result<(), StoreError> {
        if *access == self.access {
            return Ok(());
        }
        if let DbConnection::Pg(pg) = &mut *self.conn {
            diesel::sql_query("SELECT set_config('fhirvault.access', $1, true)")
                .bind::<diesel::sql_types::Text, _>(access.setting())
                .execute(pg)?;
        }
        self.access = access.clone();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        method: CreateMethod,
        condition: Option<&Condition>,
        make: impl FnOnce(i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<CreateOutcome, StoreError> {
        let (ts, content, sealed) = self.store.first_version(resource_type, id, make)?;
        self.store.create_in_tx(
            self.conn,
            resource_type,
            id,
            method,
            condition,
            ts,
            content,
            sealed,
            None,
            audit,
        )
    }

    pub fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        may_create: bool,
        make: &dyn Fn(i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<Written, StoreError> {
        self.store
            .update_in_tx(self.conn, resource_type, id, if_match, may_create, make, None, audit)
    }

    pub fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        audit: &mut dyn WriteAudit,
    ) -> Result<DeleteOutcome, StoreError> {
        self.store.delete_in_tx(self.conn, resource_type, id, if_match, audit)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conditional_update(
        &mut self,
        resource_type: &str,
        cond: &Condition,
        body_id: Option<&str>,
        new_id: &str,
        if_match: Option<i64>,
        make: &dyn Fn(&str, i64, NaiveDateTime) -> Content,
        audit: &mut dyn WriteAudit,
    ) -> Result<(String, Written), StoreError> {
        self.store
            .conditional_update_in_tx(self.conn, resource_type, cond, body_id, new_id, if_match, make, audit)
    }

    pub fn conditional_delete(
        &mut self,
        resource_type: &str,
        cond: &Condition,
        audit: &mut dyn WriteAudit,
    ) -> Result<DeleteOutcome, StoreError> {
        self.store
            .conditional_delete_in_tx(self.conn, resource_type, cond, audit)
    }

    /// Creates new resources (version 1, at `ts`, ids not yet used) with one multi-row INSERT
    /// per table instead of statements per resource: a transaction bundle's plain creates.
    /// `audits[i]` records `items[i]`'s event, inserted with the others.
    pub fn create_many(
        &mut self,
        ts: NaiveDateTime,
        items: Vec<NewResource>,
        audits: Vec<&mut dyn WriteAudit>,
    ) -> Result<Vec<Written>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut sealed = Vec::with_capacity(items.len());
        for it in &items {
            sealed.push(self.store.seal(&it.resource_type, &it.id, 1, Some(&it.content))?);
        }
        // bounded by the backends' bind-parameter limits (SQLite 32,766, PostgreSQL 65,535)
        const ROWS: usize = 1000;
        macro_rules! insert_chunks {
            ($table:expr, $rows:expr) => {
                for chunk in $rows.chunks(ROWS) {
                    match &mut *self.conn {
                        DbConnection::Pg(c) => diesel::insert_into($table).values(chunk).execute(c)?,
                        DbConnection::Sqlite(c) => diesel::insert_into($table).values(chunk).execute(c)?,
                    };
                }
            };
        }
        let current: Vec<_> = items
            .iter()
            .map(|it| {
                (
                    cur::resource_type.eq(it.resource_type.as_str()),
                    cur::logical_id.eq(it.id.as_str()),
                    cur::version_id.eq(1i64),
                    cur::last_updated.eq(ts),
                    cur::deleted.eq(false),
                )
            })
            .collect();
        insert_chunks!(cur::table, current);
        // compartments before versions: row-level security checks each version against them
        let compartments: Vec<_> = items
            .iter()
            .flat_map(|it| {
                it.content
                    .compartments
                    .iter()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(move |p| {
                        (
                            rc::resource_type.eq(it.resource_type.as_str()),
                            rc::logical_id.eq(it.id.as_str()),
                            rc::version_id.eq(1i64),
                            rc::patient_id.eq(p.as_str()),
                        )
                    })
            })
            .collect();
        insert_chunks!(rc::table, compartments);
        let versions: Vec<_> = items
            .iter()
            .zip(sealed)
            .map(|(it, (content, digest, key_version))| {
                (
                    rv::resource_type.eq(it.resource_type.as_str()),
                    rv::logical_id.eq(it.id.as_str()),
                    rv::version_id.eq(1i64),
                    rv::last_updated.eq(ts),
                    rv::deleted.eq(false),
                    rv::method.eq(match it.method {
                        CreateMethod::Post => "POST",
                        CreateMethod::Put => "PUT",
                    }),
                    rv::key_version.eq(key_version),
                    rv::content.eq(content),
                    rv::content_sha256.eq(digest),
                )
            })
            .collect();
        insert_chunks!(rv::table, versions);
        let index: Vec<(&str, &str, &[search_index::SearchRow])> = items
            .iter()
            .map(|it| (it.resource_type.as_str(), it.id.as_str(), it.content.search.as_slice()))
            .collect();
        search_index::insert_many(self.conn, &index)?;
        let mut events = Vec::with_capacity(items.len());
        for (it, audit) in items.iter().zip(audits) {
            self.store.watched(
                self.conn,
                &it.resource_type,
                &it.id,
                1,
                subscription::ChangeEvent::Create,
                Some(&it.content),
                &*audit,
                ts,
            )?;
            let facts = WriteFacts {
                resource_type: &it.resource_type,
                id: &it.id,
                version_id: Some(1),
                effect: WriteEffect::Created,
                patients: &it.content.compartments,
            };
            let row = audit.record(&facts)?;
            if audit.enabled() {
                events.push(row);
            }
        }
        for chunk in events.chunks(ROWS) {
            audit::insert_events(self.conn, chunk)?;
        }
        Ok(items
            .into_iter()
            .map(|it| Written {
                version_id: 1,
                last_updated: ts,
                created: true,
                json: it.content.json,
            })
            .collect())
    }

    /// The ids of current resources matching `cond` (at most `limit`), under the condition's
    /// lock: what a conditional write or a conditional reference resolves to.
    pub fn resolve(&mut self, resource_type: &str, cond: &Condition, limit: usize) -> Result<Vec<String>, StoreError> {
        self.store.lock_condition(self.conn, resource_type, cond)?;
        self.store.matching_ids(self.conn, resource_type, cond, limit)
    }

    /// Of `ids` of `resource_type`, those stored (current or deleted) as this transaction
    /// sees them: one query per thousand.
    pub fn existing_ids(
        &mut self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = std::collections::HashSet::new();
        for chunk in ids.chunks(1000) {
            let found: Vec<String> = cur::table
                .filter(cur::resource_type.eq(resource_type))
                .filter(cur::logical_id.eq_any(chunk))
                .select(cur::logical_id)
                .load(self.conn)?;
            out.extend(found);
        }
        Ok(out)
    }

    /// The current version as this transaction sees it (its own writes included).
    pub fn read(&mut self, resource_type: &str, id: &str) -> Result<StoredVersion, StoreError> {
        let current = cur::table
            .filter(cur::resource_type.eq(resource_type).and(cur::logical_id.eq(id)))
            .select(cur::version_id)
            .single_value();
        let row: Option<VersionRow> = rv::table
            .filter(rv::resource_type.eq(resource_type).and(rv::logical_id.eq(id)))
            .filter(rv::version_id.nullable().eq(current))
            .select(VersionRow::as_select())
            .get_result(self.conn)
            .optional()?;
        let row = row.ok_or(StoreError::NotFound)?;
        if row.deleted {
            return Err(StoreError::Gone {
                version_id: row.version_id,
                last_updated: row.last_updated,
            });
        }
        self.store.decrypt_row(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::pg::Pg;
    use diesel::query_builder::QueryFragment;
    use diesel::sqlite::Sqlite;

    /// A version's row is selected by every read, vread, history page and search page: its
    /// statements must stay cacheable (an SQL literal anywhere in it makes Diesel parse, and
    /// PostgreSQL plan, each execution anew).
    #[test]
    fn version_rows_are_selected_by_cacheable_statements() {
        let on_pg = <VersionRow as SelectableHelper<Pg>>::as_select();
        assert!(QueryFragment::<Pg>::is_safe_to_cache_prepared(&on_pg, &Pg).unwrap());
        let current = cur::table
            .filter(cur::resource_type.eq("Patient").and(cur::logical_id.eq("x")))
            .select(cur::version_id)
            .single_value();
        let read = rv::table
            .filter(rv::resource_type.eq("Patient").and(rv::logical_id.eq("x")))
            .filter(rv::version_id.nullable().eq(current))
            .select(<VersionRow as SelectableHelper<Sqlite>>::as_select());
        assert!(QueryFragment::<Sqlite>::is_safe_to_cache_prepared(&read, &Sqlite).unwrap());
        // the literal this replaced was not
        let literal = diesel::dsl::sql::<diesel::sql_types::Text>("1");
        assert!(!QueryFragment::<Sqlite>::is_safe_to_cache_prepared(&literal, &Sqlite).unwrap());
    }

    /// A search page's versions are read by a list of ids: on SQLite one JSON bind, so the
    /// statement is cached whatever the number of ids (a list of binds is not), and it finds
    /// exactly the ids given.
    #[test]
    fn current_rows_of_a_page_are_read_by_a_cacheable_statement() {
        let ids = vec!["a".to_string(), "b\"'),(".to_string()];
        let page = rv::table
            .filter(rv::resource_type.eq("Patient").and(LogicalIdIn::new(&ids)))
            .select(<VersionRow as SelectableHelper<Sqlite>>::as_select());
        assert!(QueryFragment::<Sqlite>::is_safe_to_cache_prepared(&page, &Sqlite).unwrap());
        let listed = rv::table
            .filter(rv::resource_type.eq("Patient").and(rv::logical_id.eq_any(&ids)))
            .select(<VersionRow as SelectableHelper<Sqlite>>::as_select());
        assert!(!QueryFragment::<Sqlite>::is_safe_to_cache_prepared(&listed, &Sqlite).unwrap());

        let dir = tempfile::tempdir().unwrap();
        let mut conn = connection::DbManager::new(&format!("sqlite://{}", dir.path().join("ids.db").display()))
            .unwrap()
            .connect()
            .unwrap();
        run_migrations(&mut conn).unwrap();
        let DbConnection::Sqlite(c) = &mut conn else {
            unreachable!()
        };
        for id in ["a", "b\"'),(", "c"] {
            diesel::insert_into(rv::table)
                .values((
                    rv::resource_type.eq("Patient"),
                    rv::logical_id.eq(id),
                    rv::version_id.eq(1),
                    rv::last_updated.eq(now()),
                    rv::deleted.eq(false),
                    rv::method.eq("POST"),
                ))
                .execute(c)
                .unwrap();
        }
        let mut found: Vec<String> = rv::table
            .filter(LogicalIdIn::new(&ids))
            .select(rv::logical_id)
            .load(c)
            .unwrap();
        found.sort();
        assert_eq!(found, ids);
    }
}
