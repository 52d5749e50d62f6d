//! The chains' storage: claiming a chain, reading its head, and appending a batch to it.
//!
//! A chain is appended to by exactly one process at a time: the one that holds its claim. On
//! PostgreSQL the claim is a session advisory lock held by the writer's own connection; on
//! SQLite, an exclusive lock on a file beside the database. Both end with the process, however
//! it ends (SIGKILL included), so a restarted node takes its chain back and a node that never
//! comes back leaves its chain free for others to finish (link its last events, derive its
//! search rows). Nothing here is a global lock: nodes append to their own chains side by side.

use super::super::connection::Backend;
use super::super::schema::{
    audit_archives as ar, audit_chain as ac, audit_chains as chains, audit_checkpoints as ak, audit_events as ae,
};
use super::{AuditRow, ChainLink, Checkpoint, GENESIS_HASH};
use crate::store::{DbConnection, Store, StoreError};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Binary, Integer, Text, Timestamp};

/// How long a starting node waits for its own chain while another process holds it.
const OWN_CHAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The class of fhirvault's advisory locks on chains (PostgreSQL's two-key form: class, chain).
const CHAIN_LOCK_CLASS: i32 = 0x6676_6175;

/// The last link of a chain: where the next one attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: i64,
    pub hash: Vec<u8>,
}

/// A connection of its own (outside the pool) and the chain it holds. The writer keeps one:
/// its page cache stays warm with the ledger's hot pages (SQLite), readers never wait for it,
/// and on PostgreSQL the chain's advisory lock lives as long as this connection.
#[derive(Default)]
pub struct AuditSession {
    conn: Option<DbConnection>,
    /// Commits without waiting for the disk (for rows that can be derived again: see
    /// [`AuditSession::derived_rows`]).
    relaxed: bool,
    /// The chain this session holds, if any.
    chain: Option<i64>,
    /// SQLite: the lock files of the chains held.
    files: Vec<(i64, std::fs::File)>,
}

impl AuditSession {
    /// The chain held, if any (`None` after the connection was lost, until claimed again).
    pub fn chain(&self) -> Option<i64> {
        self.chain
    }

    /// A session for the derived search rows, which a crash may lose and which are derived
    /// again from the durable events (their position commits with them): its commits do not
    /// wait for the disk (PostgreSQL `synchronous_commit = off`, SQLite `synchronous = NORMAL`,
    /// both crash-consistent), so deriving adds no flush of its own beside the ledger's.
    pub fn derived_rows() -> AuditSession {
        AuditSession {
            relaxed: true,
            ..Default::default()
        }
    }

    fn conn<'a>(&'a mut self, store: &Store) -> Result<&'a mut DbConnection, StoreError> {
        if self.conn.is_none() {
            let mut conn = store.manager.connect()?;
            if self.relaxed {
                use diesel::connection::SimpleConnection;
                conn.batch_execute(match store.backend() {
                    Backend::Postgres => "SET synchronous_commit = off",
                    Backend::Sqlite => "PRAGMA synchronous = NORMAL",
                })?;
            }
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Lock("no audit connection".into()))
    }

    /// Forgets the connection after an error that lost it; on PostgreSQL the chain's lock went
    /// with it and must be claimed again.
    fn note<T>(&mut self, store: &Store, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.as_ref().is_err_and(StoreError::is_lost_connection) {
            self.conn = None;
            if store.backend() == Backend::Postgres {
                self.chain = None;
            }
        }
        result
    }

    /// Takes `chain` if no other process holds it (and holds it until released or until this
    /// session ends). False if it is held elsewhere.
    pub fn try_hold(&mut self, store: &Store, chain: i64) -> Result<bool, StoreError> {
        if self.files.iter().any(|(c, _)| *c == chain) {
            return Ok(true);
        }
        let result = match store.backend() {
            Backend::Postgres => {
                #[derive(QueryableByName)]
                struct Held {
                    #[diesel(sql_type = diesel::sql_types::Bool)]
                    held: bool,
                }
                let conn = self.conn(store)?;
                let DbConnection::Pg(pg) = conn else {
                    return unreachable_backend();
                };
                diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS held")
                    .bind::<Integer, _>(CHAIN_LOCK_CLASS)
                    .bind::<Integer, _>(chain_key(chain)?)
                    .get_result::<Held>(pg)
                    .map(|h| h.held)
                    .map_err(StoreError::from)
            }
            Backend::Sqlite => {
                let path = chain_lock_path(store, chain)?;
                let file = crate::secret_file::open_lock_file(&path).map_err(|e| StoreError::Lock(e.to_string()))?;
                match file.try_lock() {
                    Ok(()) => {
                        self.files.push((chain, file));
                        Ok(true)
                    }
                    Err(std::fs::TryLockError::WouldBlock) => Ok(false),
                    Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Lock(e.to_string())),
                }
            }
        };
        self.note(store, result)
    }

    /// Lets another process take `chain` (one this session holds besides its own).
    pub fn release(&mut self, store: &Store, chain: i64) {
        match store.backend() {
            Backend::Postgres => {
                if let Some(DbConnection::Pg(pg)) = &mut self.conn {
                    let _ = diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
                        .bind::<Integer, _>(CHAIN_LOCK_CLASS)
                        .bind::<Integer, _>(chain_key(chain).unwrap_or(0))
                        .execute(pg);
                }
            }
            Backend::Sqlite => self.files.retain(|(c, _)| *c != chain),
        }
    }

    /// Claims a chain for `node`: its own (registered on first use) when no other process
    /// holds it, else the first free one of `node#2`, `node#3` … (a second process configured
    /// with the same name, or a restart while the old process still holds the lock). The
    /// chain's lock is held until this session ends.
    pub fn claim(&mut self, store: &Store, node: &str) -> Result<i64, StoreError> {
        for n in 1..=64 {
            let name = if n == 1 {
                node.to_string()
            } else {
                format!("{node}#{n}")
            };
            let registered = self.conn(store).and_then(|c| register_chain(c, &name));
            let chain = self.note(store, registered)?;
            // another node's deriver may be linking the leftovers of this node's chain (it takes
            // free chains for that, and lets go within moments): the node's own chain is worth a
            // short wait, or a restarted node would append to `node#2` from then on
            let mut held = self.try_hold(store, chain)?;
            let deadline = std::time::Instant::now() + OWN_CHAIN_WAIT;
            while !held && n == 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
                held = self.try_hold(store, chain)?;
            }
            if held {
                if n > 1 {
                    tracing::warn!(
                        chain = chain,
                        "another process holds this node's audit chain: appending to a chain of its own"
                    );
                }
                self.chain = Some(chain);
                return Ok(chain);
            }
        }
        Err(StoreError::Lock("no free audit chain for this node name".into()))
    }

    /// Takes back `chain` after a lost connection, or claims another for `node` when a
    /// different process took it meanwhile.
    pub fn reclaim(&mut self, store: &Store, chain: i64, node: &str) -> Result<i64, StoreError> {
        if self.chain == Some(chain) {
            return Ok(chain);
        }
        if self.try_hold(store, chain)? {
            self.chain = Some(chain);
            return Ok(chain);
        }
        self.claim(store, node)
    }

    /// The head of `chain`.
    pub fn head(&mut self, store: &Store, chain: i64) -> Result<ChainHead, StoreError> {
        let result = head(self.conn(store)?, chain);
        self.note(store, result)
    }

    /// The heads of every registered chain, by chain id (what a checkpoint signs).
    pub fn all_heads(&mut self, store: &Store) -> Result<Vec<(i64, ChainHead)>, StoreError> {
        let result = (|| {
            let conn = self.conn(store)?;
            let ids: Vec<i64> = chains::table.select(chains::id).order(chains::id.asc()).load(conn)?;
            ids.into_iter()
                .map(|id| Ok((id, head(conn, id)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })();
        self.note(store, result)
    }

    /// Stores a checkpoint row.
    pub fn insert_checkpoint(&mut self, store: &Store, cp: &Checkpoint) -> Result<(), StoreError> {
        let result = (|| {
            diesel::insert_into(ak::table).values(cp).execute(self.conn(store)?)?;
            Ok(())
        })();
        self.note(store, result)
    }

    /// Event ids among `ids` whose event rows are stored.
    pub fn stored_events(&mut self, store: &Store, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let result = (|| {
            Ok(ae::table
                .filter(ae::id.eq_any(ids))
                .select(ae::id)
                .load(self.conn(store)?)?)
        })();
        self.note(store, result)
    }

    /// Event ids among `ids` that some chain already links.
    pub fn linked(&mut self, store: &Store, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let result = (|| {
            Ok(ac::table
                .filter(ac::event_id.eq_any(ids))
                .select(ac::event_id)
                .load(self.conn(store)?)?)
        })();
        self.note(store, result)
    }

    /// Stores derived search rows of `chain`'s links `(from, to]` with its new position, in
    /// one transaction; false if another process derived them first (see
    /// `super::index::index_batch`).
    pub fn index_batch(
        &mut self,
        store: &Store,
        chain: i64,
        from: i64,
        to: i64,
        rows: &[super::SearchRow],
    ) -> Result<bool, StoreError> {
        let result = match store.backend() {
            // in a savepoint of SQLite's shared write transaction (see `store::group_commit`)
            Backend::Sqlite => store.sqlite_shared_write(|conn| super::index::index_batch(conn, chain, from, to, rows)),
            Backend::Postgres => (|| {
                self.conn(store)?
                    .write_transaction(|conn| super::index::index_batch(conn, chain, from, to, rows))
            })(),
        };
        self.note(store, result)
            .or_else(|e| if e.is_unique_violation() { Ok(false) } else { Err(e) })
    }

    /// Appends `rows` (new events) and `links` (for them and for events already stored, in
    /// chain order) to a chain this session holds, in one transaction. On PostgreSQL that is
    /// one statement whose text never changes (arrays through `unnest`), so it stays prepared.
    pub fn append(&mut self, store: &Store, rows: &[AuditRow], links: &[ChainLink]) -> Result<(), StoreError> {
        if rows.is_empty() && links.is_empty() {
            return Ok(());
        }
        let result = match store.backend() {
            // one statement is atomic by itself: no BEGIN and COMMIT round trips around it
            Backend::Postgres => match self.conn(store)? {
                DbConnection::Pg(pg) => AppendPg::new(rows, links)
                    .execute(pg)
                    .map(|_| ())
                    .map_err(StoreError::from),
                DbConnection::Sqlite(_) => unreachable_backend(),
            },
            // in a savepoint of SQLite's shared write transaction: on the writer's connection,
            // whose page cache another connection's commit would empty, and sharing its commits
            Backend::Sqlite => store.sqlite_shared_write(|conn| append_sqlite(conn, rows, links)),
        };
        self.note(store, result)
    }
}

fn unreachable_backend<T>() -> Result<T, StoreError> {
    Err(StoreError::Lock(
        "the audit session is on another backend than the store".into(),
    ))
}

/// Chain ids are small (one per node); the advisory lock key is an int4.
fn chain_key(chain: i64) -> Result<i32, StoreError> {
    i32::try_from(chain).map_err(|_| StoreError::Lock("audit chain id out of range".into()))
}

/// The lock file of a chain beside the SQLite database.
fn chain_lock_path(store: &Store, chain: i64) -> Result<std::path::PathBuf, StoreError> {
    let db = store
        .sqlite_path()
        .ok_or_else(|| StoreError::Lock("not a SQLite database".into()))?;
    Ok(std::path::PathBuf::from(format!("{db}.audit-chain-{chain}.lock")))
}

/// The id of the chain named `node`, registering it if it is new (a concurrent registration
/// of another name taking the same id is retried with the next).
fn register_chain(conn: &mut DbConnection, node: &str) -> Result<i64, StoreError> {
    for _ in 0..16 {
        let found: Option<i64> = chains::table
            .filter(chains::node.eq(node))
            .select(chains::id)
            .first(conn)
            .optional()?;
        if let Some(id) = found {
            return Ok(id);
        }
        let max: Option<i64> = chains::table.select(diesel::dsl::max(chains::id)).first(conn)?;
        let id = max.unwrap_or(0) + 1;
        let inserted = diesel::insert_into(chains::table)
            .values((
                chains::id.eq(id),
                chains::node.eq(node),
                chains::created_at.eq(crate::store::now()),
            ))
            .execute(conn);
        match inserted.map_err(StoreError::from) {
            Ok(_) => return Ok(id),
            Err(e) if e.is_unique_violation() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Lock("could not register an audit chain".into()))
}

/// A chain's last link, or where an archive run left it, or genesis.
pub(in crate::store) fn head(conn: &mut DbConnection, chain: i64) -> Result<ChainHead, StoreError> {
    let last: Option<(i64, Vec<u8>)> = ac::table
        .filter(ac::chain_id.eq(chain))
        .order(ac::seq.desc())
        .select((ac::seq, ac::hash))
        .first(conn)
        .optional()?;
    if let Some((seq, hash)) = last {
        return Ok(ChainHead { seq, hash });
    }
    let archived: Option<(i64, Vec<u8>)> = ar::table
        .filter(ar::chain_id.eq(chain))
        .order(ar::up_to_seq.desc())
        .select((ar::up_to_seq, ar::last_hash))
        .first(conn)
        .optional()?;
    Ok(match archived {
        Some((seq, hash)) => ChainHead { seq, hash },
        None => ChainHead {
            seq: 0,
            hash: GENESIS_HASH.to_vec(),
        },
    })
}

/// SQLite has no round trips to save: one cached single-row statement per row beats a
/// multi-row statement whose SQL (and so its preparation) changes with the batch size.
fn append_sqlite(conn: &mut DbConnection, rows: &[AuditRow], links: &[ChainLink]) -> Result<(), StoreError> {
    use super::super::schema::audit_events as ev;
    let DbConnection::Sqlite(c) = conn else {
        return unreachable_backend();
    };
    for r in rows {
        diesel::insert_into(ev::table)
            .values((
                ev::id.eq(&r.id),
                ev::recorded.eq(r.recorded),
                ev::key_version.eq(r.key_version),
                ev::content.eq(super::EncryptedColumn(r.content.clone())),
                ev::chain_id.eq(r.chain_id),
            ))
            .execute(c)?;
    }
    for l in links {
        diesel::insert_into(ac::table)
            .values((
                ac::chain_id.eq(l.chain_id),
                ac::seq.eq(l.seq),
                ac::event_id.eq(&l.event_id),
                ac::prev_hash.eq(&l.prev_hash),
                ac::hash.eq(&l.hash),
            ))
            .execute(c)?;
    }
    Ok(())
}

/// The PostgreSQL append: new events and all links in one statement of fixed text (arrays
/// through `unnest`), which Diesel prepares once per connection and caches (its query id is
/// static), instead of parsing and planning a statement whose text grows with the batch.
#[derive(QueryId)]
struct AppendPg {
    ids: Vec<String>,
    recorded: Vec<chrono::NaiveDateTime>,
    key_versions: Vec<i32>,
    contents: Vec<Vec<u8>>,
    owners: Vec<i64>,
    link_chains: Vec<i64>,
    seqs: Vec<i64>,
    link_ids: Vec<String>,
    prevs: Vec<Vec<u8>>,
    hashes: Vec<Vec<u8>>,
}

impl AppendPg {
    fn new(rows: &[AuditRow], links: &[ChainLink]) -> AppendPg {
        AppendPg {
            ids: rows.iter().map(|r| r.id.clone()).collect(),
            recorded: rows.iter().map(|r| r.recorded).collect(),
            key_versions: rows.iter().map(|r| r.key_version).collect(),
            contents: rows.iter().map(|r| r.content.as_bytes().to_vec()).collect(),
            owners: rows.iter().map(|r| r.chain_id).collect(),
            link_chains: links.iter().map(|l| l.chain_id).collect(),
            seqs: links.iter().map(|l| l.seq).collect(),
            link_ids: links.iter().map(|l| l.event_id.clone()).collect(),
            prevs: links.iter().map(|l| l.prev_hash.clone()).collect(),
            hashes: links.iter().map(|l| l.hash.clone()).collect(),
        }
    }
}

impl QueryFragment<Pg> for AppendPg {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "WITH e AS (INSERT INTO audit_events (id, recorded, key_version, content, chain_id) \
             SELECT * FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&self.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamp>, _>(&self.recorded)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Integer>, _>(&self.key_versions)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Binary>, _>(&self.contents)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.owners)?;
        out.push_sql(")) INSERT INTO audit_chain (chain_id, seq, event_id, prev_hash, hash) SELECT * FROM unnest(");
        out.push_bind_param::<Array<BigInt>, _>(&self.link_chains)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.seqs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.link_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Binary>, _>(&self.prevs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Binary>, _>(&self.hashes)?;
        out.push_sql(")");
        Ok(())
    }
}

impl RunQueryDsl<diesel::PgConnection> for AppendPg {}

impl Store {
    /// The SQLite database's file, if that is the backend.
    pub fn sqlite_path(&self) -> Option<&str> {
        self.manager.sqlite_path()
    }
}
