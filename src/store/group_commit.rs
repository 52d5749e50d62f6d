//! SQLite's one writer, shared: concurrent writes of this process share commits.
//!
//! SQLite takes one writing transaction at a time, and with `synchronous = FULL` each commit
//! waits for the disk. Serialized one by one, every write would pay its own flush. Here the
//! writes take turns on one connection inside one open transaction instead: each runs in a
//! savepoint of its own (a write that fails rolls back alone and answers its own error), and
//! the transaction commits once for all of them — when no other write is waiting for its turn,
//! or when the batch is full. A write is acknowledged only after that commit, after the flush,
//! so durability is what it was: nothing is answered before it is on disk.
//!
//! While a commit waits for the disk, the writes that arrive queue for their turn; the next
//! batch holds all of them. Batches form by themselves under load and cost nothing without it
//! (a lone write commits at once).
//!
//! Writers that use their own connections (the audit ledger, the authorization server's
//! tables, subscriptions) take [`SqliteWriter::exclusive`], which first commits any batch left
//! open, so that SQLite's write lock is free for them.

use super::connection::DbManager;
use super::{DbConnection, StoreError};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::Connection;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The most writes one commit holds: the first of a batch waits for the last, so this bounds
/// the latency a batch adds.
const MAX_BATCH: usize = 64;

/// The writer connection's settings (beside `DbManager::connect`'s): a 64 MiB page cache; the
/// savepoints' journal (a copy of each page a write changes first) in memory rather than in a
/// temporary file; and no automatic checkpoint (see [`SqliteWriter::start_checkpointer`]).
const WRITER_PRAGMAS: &str = "PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0;";
const CACHE_PRAGMA: &str = "PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;";

/// How often the checkpointer copies the write-ahead log into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

type Manager = <DbConnection as Connection>::TransactionManager;

/// The writer of a SQLite store: its connection, the batch its open transaction holds, and
/// how many writes wait for their turn.
#[derive(Default)]
pub struct SqliteWriter {
    state: Mutex<WriterState>,
    /// Writes that asked for their turn and have not finished it. While any do, the write
    /// whose turn ends leaves the transaction open for them; the last one commits.
    waiting: AtomicUsize,
    /// Commits of batches, and the writes they held (`/metrics`, the benches).
    commits: AtomicU64,
    writes: AtomicU64,
    /// Keeps the checkpointer running (it ends when this is dropped with the writer).
    checkpointer: std::sync::OnceLock<std::sync::mpsc::Sender<()>>,
}

/// Held while a write takes its turn (or while an exclusive writer works).
#[derive(Default)]
pub struct WriterState {
    /// The connection the batches are written on (outside the pool: its page cache stays warm
    /// with the pages writes touch).
    conn: Option<DbConnection>,
    batch: Option<Batch>,
}

/// The open transaction and the writes it holds.
struct Batch {
    writes: usize,
    done: Arc<Done>,
}

/// How a batch ended, for the writes that wait for it.
#[derive(Default)]
struct Done {
    outcome: Mutex<Option<Result<(), SharedError>>>,
    ended: Condvar,
}

/// Why a batch did not commit, given to each of its writes.
#[derive(Debug, Clone)]
struct SharedError {
    kind: Option<DatabaseErrorKind>,
    message: String,
}

impl SharedError {
    fn of(e: &StoreError) -> SharedError {
        match e {
            StoreError::Database(DieselError::DatabaseError(kind, info)) => SharedError {
                kind: Some(*kind),
                message: info.message().to_string(),
            },
            other => SharedError {
                kind: None,
                message: other.to_string(),
            },
        }
    }

    fn error(&self) -> StoreError {
        StoreError::Database(DieselError::DatabaseError(
            self.kind.unwrap_or(DatabaseErrorKind::Unknown),
            Box::new(format!("the shared commit failed: {}", self.message)),
        ))
    }
}

/// Figures of the batches so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    pub commits: u64,
    pub writes: u64,
}

impl SqliteWriter {
    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            commits: self.commits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }

    /// SQLite's write lock for a writer on a connection of its own: any open batch is
    /// committed first (its writes are answered), and no batch opens while this is held.
    pub fn exclusive(&self) -> MutexGuard<'_, WriterState> {
        let mut state = self.lock();
        self.end_batch(&mut state);
        state
    }

    /// Runs `write` in a savepoint of the shared transaction and returns its result once the
    /// transaction has committed. A write that fails is rolled back alone (the others commit);
    /// when the commit itself fails, every write of the batch gets that error.
    pub fn write<T>(
        &self,
        manager: &DbManager,
        write: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut state = self.lock();
        let turn = self.take_turn(&mut state, manager, write);
        // The last write waiting (or the one that fills the batch) commits; the others leave
        // the transaction open for the writes queued behind them.
        let last = self.waiting.fetch_sub(1, Ordering::SeqCst) == 1;
        let full = state.batch.as_ref().is_some_and(|b| b.writes >= MAX_BATCH);
        if last || full {
            self.end_batch(&mut state);
        }
        drop(state);
        match turn {
            Turn::Written(value, done) => match done.wait() {
                Ok(()) => Ok(value),
                Err(e) => Err(e.error()),
            },
            Turn::Failed(e) => Err(e),
            Turn::Panicked(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// One write's turn: into the open transaction (opening one if none is), in a savepoint.
    fn take_turn<T>(
        &self,
        state: &mut WriterState,
        manager: &DbManager,
        write: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> Turn<T> {
        if let Err(e) = self.open_batch(state, manager) {
            return Turn::Failed(e);
        }
        let Some(conn) = state.conn.as_mut() else {
            return Turn::Failed(StoreError::Lock("the SQLite writer has no connection".into()));
        };
        if let Err(e) = conn.batch_execute("SAVEPOINT fhirvault_write") {
            let e = StoreError::from(e);
            self.abort_batch(state, &e);
            return Turn::Failed(e);
        }
        // A panic inside the write must not leave the batch open with its writers waiting: it
        // fails the batch, and is raised again once the lock is released.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(conn)));
        let end = match &result {
            Ok(Ok(_)) => conn.batch_execute("RELEASE fhirvault_write"),
            // SQLite rolls a whole transaction back by itself on some errors (disk full, I/O):
            // then the savepoint is gone, the rollback to it fails, and the batch is aborted.
            Ok(Err(_)) => conn.batch_execute("ROLLBACK TO fhirvault_write; RELEASE fhirvault_write"),
            Err(_) => Err(DieselError::RollbackTransaction),
        };
        match (result, end) {
            (Ok(Ok(value)), Ok(())) => match state.batch.as_mut() {
                Some(batch) => {
                    batch.writes += 1;
                    Turn::Written(value, batch.done.clone())
                }
                None => Turn::Failed(StoreError::Lock("the SQLite writer lost its transaction".into())),
            },
            (Ok(Err(e)), Ok(())) => Turn::Failed(e),
            (Ok(Ok(_)), Err(end)) => {
                let e = StoreError::from(end);
                self.abort_batch(state, &e);
                Turn::Failed(e)
            }
            (Ok(Err(e)), Err(_)) => {
                self.abort_batch(state, &e);
                Turn::Failed(e)
            }
            (Err(payload), _) => {
                self.abort_batch(
                    state,
                    &StoreError::Lock("a write in the shared transaction panicked".into()),
                );
                Turn::Panicked(payload)
            }
        }
    }

    /// Opens the shared transaction if none is open (and the connection if there is none).
    fn open_batch(&self, state: &mut WriterState, manager: &DbManager) -> Result<(), StoreError> {
        if state.batch.is_some() {
            return Ok(());
        }
        if state.conn.is_none() {
            let mut conn = manager.connect()?;
            // A page cache that holds the index pages writes touch (a write of a Patient adds a
            // hundred blind-index rows at random places); and no checkpoint inside a commit:
            // the checkpointer copies the log into the database beside the writes.
            conn.batch_execute(if self.start_checkpointer(manager) {
                WRITER_PRAGMAS
            } else {
                CACHE_PRAGMA
            })?;
            state.conn = Some(conn);
        }
        let Some(DbConnection::Sqlite(c)) = state.conn.as_mut() else {
            return Err(StoreError::Lock("the SQLite writer is not on SQLite".into()));
        };
        // IMMEDIATE: the write lock is taken now, waiting in the busy handler for another
        // process (a command-line tool), never refused at a first write (see
        // `DbConnection::write_transaction`).
        if let Err(e) = AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE") {
            // a connection that cannot begin is not trusted again
            state.conn = None;
            return Err(e.into());
        }
        state.batch = Some(Batch {
            writes: 0,
            done: Arc::default(),
        });
        Ok(())
    }

    /// Starts the thread that checkpoints the write-ahead log (once per writer): a `PASSIVE`
    /// checkpoint every [`CHECKPOINT_EVERY`], which neither waits for nor blocks the writer or
    /// the readers, so the copying of the log into the database (and its flush) is off the
    /// writes' path. Connections of other writers keep SQLite's automatic checkpoints.
    /// False if it could not be started (commits then checkpoint themselves).
    fn start_checkpointer(&self, manager: &DbManager) -> bool {
        if self.checkpointer.get().is_some() {
            return true;
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let manager = manager.clone();
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let mut conn = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(CHECKPOINT_EVERY) {
                    if conn.is_none() {
                        conn = manager.connect().ok();
                    }
                    if let Some(c) = conn.as_mut() {
                        if let Err(e) = c.batch_execute("PRAGMA wal_checkpoint(PASSIVE)") {
                            tracing::warn!(error = %e, "SQLite checkpoint failed; retried");
                            conn = None;
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => {
                let _ = self.checkpointer.set(tx);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SQLite checkpointer: commits checkpoint themselves");
                false
            }
        }
    }

    /// Commits the open batch, if any, and tells its writes how it ended.
    fn end_batch(&self, state: &mut WriterState) {
        let Some(batch) = state.batch.take() else {
            return;
        };
        let outcome = match state.conn.as_mut() {
            Some(conn) => Manager::commit_transaction(conn).map_err(|e| SharedError::of(&e.into())),
            None => Err(SharedError::of(&StoreError::Lock(
                "the SQLite writer lost its connection".into(),
            ))),
        };
        if outcome.is_err() {
            // diesel rolled back what it could; the connection is opened afresh next time
            state.conn = None;
        } else {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.writes.fetch_add(batch.writes as u64, Ordering::Relaxed);
        }
        batch.done.end(outcome);
    }

    /// Rolls the open batch back: every write it held gets `cause`.
    fn abort_batch(&self, state: &mut WriterState, cause: &StoreError) {
        let Some(batch) = state.batch.take() else {
            return;
        };
        if let Some(conn) = state.conn.as_mut() {
            if Manager::rollback_transaction(conn).is_err() {
                state.conn = None;
            }
        }
        batch.done.end(Err(SharedError::of(cause)));
    }
}

enum Turn<T> {
    /// Written in the batch; answered when the batch ends.
    Written(T, Arc<Done>),
    /// Rolled back (alone, or with its batch).
    Failed(StoreError),
    Panicked(Box<dyn std::any::Any + Send>),
}

impl Done {
    fn end(&self, outcome: Result<(), SharedError>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        self.ended.notify_all();
    }

    fn wait(&self) -> Result<(), SharedError> {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(o) = outcome.as_ref() {
                return o.clone();
            }
            outcome = self.ended.wait(outcome).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::RunQueryDsl;
    use std::time::{Duration, Instant};

    struct Db {
        _dir: tempfile::TempDir,
        manager: DbManager,
    }

    /// A SQLite file with a table of values, and one whose foreign key is checked at commit.
    fn db() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let manager = DbManager::new(&url).unwrap();
        manager
            .connect()
            .unwrap()
            .batch_execute(
                "CREATE TABLE v (n INTEGER PRIMARY KEY); \
                 CREATE TABLE late (n INTEGER REFERENCES v (n) DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
        Db { _dir: dir, manager }
    }

    fn insert(conn: &mut DbConnection, n: i64) -> Result<(), StoreError> {
        diesel::sql_query(format!("INSERT INTO v (n) VALUES ({n})")).execute(conn)?;
        Ok(())
    }

    /// The values stored, read on a connection of its own (what another reader sees).
    fn stored(manager: &DbManager) -> Vec<i64> {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let rows: Vec<N> = diesel::sql_query("SELECT n FROM v ORDER BY n")
            .load(&mut manager.connect().unwrap())
            .unwrap();
        rows.into_iter().map(|r| r.n).collect()
    }

    /// A write a test queues.
    type Write<T> = Box<dyn FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send>;

    impl SqliteWriter {
        fn waiting(&self) -> usize {
            self.waiting.load(Ordering::SeqCst)
        }
    }

    /// Starts `writes` on threads while the writer is held, so that all of them are queued
    /// when it is let go; returns each one's result in order.
    fn queued<T: Send + 'static>(
        writer: &Arc<SqliteWriter>,
        manager: &DbManager,
        writes: Vec<Write<T>>,
    ) -> Vec<std::thread::Result<Result<T, StoreError>>> {
        let held = writer.exclusive();
        let count = writes.len();
        let threads: Vec<_> = writes
            .into_iter()
            .map(|w| {
                let (writer, manager) = (writer.clone(), manager.clone());
                std::thread::spawn(move || writer.write(&manager, w))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while writer.waiting() < count {
            assert!(Instant::now() < deadline, "the writes never queued");
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(held);
        threads.into_iter().map(|t| t.join()).collect()
    }

    #[test]
    fn writes_waiting_together_share_one_commit_and_are_answered_after_it() {
        let db = db();
        let writer = Arc::new(SqliteWriter::default());
        let writes = (0..16)
            .map(|n| {
                let manager = db.manager.clone();
                Box::new(move |c: &mut DbConnection| {
                    insert(c, n)?;
                    Ok(manager)
                }) as Write<DbManager>
            })
            .collect();
        for (n, result) in queued(&writer, &db.manager, writes).into_iter().enumerate() {
            // once answered, the write is committed: another connection sees it
            let manager = result.unwrap().unwrap();
            assert!(
                stored(&manager).contains(&(n as i64)),
                "write {n} answered before its commit"
            );
        }
        assert_eq!(writer.stats(), GroupCommitStats { commits: 1, writes: 16 });
        assert_eq!(stored(&db.manager), (0..16).collect::<Vec<_>>());
        // a lone write commits at once
        writer.write(&db.manager, |c| insert(c, 100)).unwrap();
        assert_eq!(writer.stats(), GroupCommitStats { commits: 2, writes: 17 });
        assert!(stored(&db.manager).contains(&100));
    }

    #[test]
    fn a_failing_write_rolls_back_alone() {
        let db = db();
        writer_write(&db, |c| insert(c, 5));
        let writer = Arc::new(SqliteWriter::default());
        let writes: Vec<Write<()>> = vec![
            Box::new(|c| insert(c, 1)),
            // writes one row, then fails: the row goes with it
            Box::new(|c| {
                insert(c, 2)?;
                Err(StoreError::Abandoned)
            }),
            // a constraint refuses it (5 exists)
            Box::new(|c| insert(c, 5)),
            Box::new(|c| insert(c, 3)),
        ];
        let results = queued(&writer, &db.manager, writes);
        assert!(results[0].as_ref().unwrap().is_ok());
        assert!(matches!(results[1].as_ref().unwrap(), Err(StoreError::Abandoned)));
        assert!(results[2]
            .as_ref()
            .unwrap()
            .as_ref()
            .is_err_and(super::super::StoreError::is_unique_violation));
        assert!(results[3].as_ref().unwrap().is_ok());
        assert_eq!(stored(&db.manager), vec![1, 3, 5]);
        assert_eq!(writer.stats(), GroupCommitStats { commits: 1, writes: 2 });
    }

    fn writer_write(db: &Db, f: impl FnOnce(&mut DbConnection) -> Result<(), StoreError>) {
        SqliteWriter::default().write(&db.manager, f).unwrap();
    }

    #[test]
    fn when_the_commit_fails_every_write_of_the_batch_is_told_and_nothing_is_stored() {
        let db = db();
        let writer = Arc::new(SqliteWriter::default());
        let writes: Vec<Write<()>> = vec![
            Box::new(|c| insert(c, 1)),
            // a foreign key checked only at COMMIT: the whole batch fails there
            Box::new(|c| {
                diesel::sql_query("INSERT INTO late (n) VALUES (999)").execute(c)?;
                Ok(())
            }),
            Box::new(|c| insert(c, 2)),
        ];
        for result in queued(&writer, &db.manager, writes) {
            let e = result.unwrap().unwrap_err();
            assert!(e.to_string().contains("the shared commit failed"), "{e}");
        }
        assert!(stored(&db.manager).is_empty());
        assert_eq!(writer.stats(), GroupCommitStats::default());
        // the writer goes on
        writer.write(&db.manager, |c| insert(c, 7)).unwrap();
        assert_eq!(stored(&db.manager), vec![7]);
    }

    #[test]
    fn a_write_that_panics_fails_its_batch_without_leaving_it_open() {
        let db = db();
        let writer = Arc::new(SqliteWriter::default());
        let writes: Vec<Write<()>> = vec![
            Box::new(|c| insert(c, 1)),
            Box::new(|_| panic!("a bug in a write")),
            Box::new(|c| insert(c, 2)),
        ];
        // the writes take their turns in any order: those before the panic, in its batch, are
        // rolled back with it and told so; one after it starts a new batch and commits
        let results = queued(&writer, &db.manager, writes);
        assert!(results[1].is_err(), "the panic reaches its own thread");
        let mut committed = Vec::new();
        for (n, result) in [(0, 1), (2, 2)] {
            if results[n].as_ref().unwrap().is_ok() {
                committed.push(result);
            }
        }
        assert_eq!(stored(&db.manager), committed, "exactly the writes told they succeeded");
        // the writer goes on
        writer.write(&db.manager, |c| insert(c, 9)).unwrap();
        assert!(stored(&db.manager).contains(&9));
    }

    #[test]
    fn the_log_is_copied_into_the_database_beside_the_writes() {
        let db = db();
        let writer = SqliteWriter::default();
        let path = db.manager.sqlite_path().unwrap().to_string();
        let size = || std::fs::metadata(&path).unwrap().len();
        let before = size();
        // about 4 MiB: four times what SQLite's own automatic checkpoint would wait for, which
        // the writer's connection does not do
        writer
            .write(&db.manager, |c| {
                c.batch_execute(
                    "CREATE TABLE blobs (b BLOB); \
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000) \
                     INSERT INTO blobs SELECT randomblob(1000) FROM n;",
                )?;
                Ok(())
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while size() < before + 3_000_000 {
            assert!(Instant::now() < deadline, "the log was never checkpointed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_exclusive_writer_commits_the_open_batch_first() {
        let db = db();
        let writer = Arc::new(SqliteWriter::default());
        // as if another write were queued: the first leaves its batch open and waits
        writer.waiting.fetch_add(1, Ordering::SeqCst);
        let first = {
            let (writer, manager) = (writer.clone(), db.manager.clone());
            std::thread::spawn(move || writer.write(&manager, |c| insert(c, 1)))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while writer.lock().batch.as_ref().map_or(0, |b| b.writes) < 1 {
            assert!(Instant::now() < deadline, "the write never ran");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(!first.is_finished(), "not answered before its commit");
        assert!(stored(&db.manager).is_empty());
        // the exclusive writer commits that batch (its write is answered), and then its own
        // connection can write
        let guard = writer.exclusive();
        first.join().unwrap().unwrap();
        assert_eq!(stored(&db.manager), vec![1]);
        let mut own = db.manager.connect().unwrap();
        own.write_transaction(|c| insert(c, 2)).unwrap();
        drop(guard);
        assert_eq!(stored(&db.manager), vec![1, 2]);
        writer.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}
