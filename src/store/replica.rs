//! Read replicas (PostgreSQL, `replica_database_url`): searches, history, `$everything` and
//! Bulk export run on a streaming-replication standby; reads by id and every write stay on the
//! primary.
//!
//! A client must see its own writes, whichever node it wrote through. Before a read runs on the
//! replica, the primary's current WAL position is read (one small round trip, no work for the
//! primary's planner or disk) and the replica must have replayed up to it: every write
//! acknowledged before this read began, by any node, is then visible there. A replica that is
//! behind is waited for, polling, for at most `replica_max_wait_ms`; past that (or when the
//! replica cannot be reached, or is no standby any more, e.g. promoted after a failover) the read
//! runs on the primary. Row-level security is the same on the replica (the policies, roles and
//! grants are replicated; the session's access context is set the same way).

use super::connection::{DbConnection, DbManager};
use super::{apply_access, note, Access, Store, StoreError};
use diesel::prelude::*;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Reads the replica served.
    pub served: AtomicU64,
    /// Reads run on the primary because the replica was behind for longer than the wait.
    pub behind: AtomicU64,
    /// Reads run on the primary because the replica could not be used (unreachable, no standby).
    pub unavailable: AtomicU64,
    /// Time spent waiting for the replica to catch up (microseconds, over all reads).
    pub wait_micros: AtomicU64,
    /// How far behind the primary the replica was at the last check (bytes of WAL).
    pub lag_bytes: AtomicI64,
}

pub struct Replica {
    pool: r2d2::Pool<DbManager>,
    max_wait: Duration,
    /// Set when a read waited `max_wait` in vain: until then, reads that find the replica
    /// behind go to the primary at once rather than wait too, so that a lagging replica costs
    /// one wait, not one per read (a search makes two or three reads) and not a pile of
    /// waiting workers.
    no_wait_until: std::sync::Mutex<Option<Instant>>,
    pub stats: ReplicaStats,
}

/// How long reads stop waiting for a replica that was found behind for `max_wait`.
const NO_WAIT_AFTER_TIMEOUT: Duration = Duration::from_secs(1);

impl Replica {
    /// The replica's pool. It is opened lazily and never stops the node from starting: a
    /// replica that is down only sends reads to the primary (and says so in the log).
    pub fn open(url: &str, pool_size: u32, max_wait: Duration) -> Result<Replica, StoreError> {
        let manager = DbManager::new(url)?;
        let pool = r2d2::Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(1))
            .test_on_check_out(false)
            .build_unchecked(manager);
        let replica = Replica {
            pool,
            max_wait,
            no_wait_until: Default::default(),
            stats: Default::default(),
        };
        match replica
            .pool
            .get()
            .map_err(StoreError::from)
            .and_then(|mut c| standby_state(&mut c.conn, "0/0"))
        {
            Ok((true, _)) => tracing::info!("read replica connected"),
            Ok((false, _)) => tracing::warn!(
                "replica_database_url is not a standby (not in recovery): reads stay on the primary until it is"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "read replica unreachable: reads stay on the primary until it answers")
            }
        }
        Ok(replica)
    }
}

/// Whether `conn` is a standby (in recovery), and how many bytes of WAL it still has to replay
/// to reach `lsn`. Also what readiness asks of the primary (a standby takes no writes).
pub(super) fn standby_state(conn: &mut DbConnection, lsn: &str) -> Result<(bool, i64), StoreError> {
    let DbConnection::Pg(pg) = conn else {
        return Ok((false, 0));
    };
    #[derive(QueryableByName)]
    struct State {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        standby: bool,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        behind: i64,
    }
    let s: State = diesel::sql_query(
        "SELECT pg_is_in_recovery() AS standby, \
         COALESCE(pg_wal_lsn_diff($1::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint AS behind",
    )
    .bind::<diesel::sql_types::Text, _>(lsn)
    .get_result(pg)?;
    Ok((s.standby, s.behind))
}

impl Replica {
    fn waiting_allowed(&self) -> bool {
        let until = self.no_wait_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_none_or(|t| Instant::now() >= t)
    }

    fn waited_in_vain(&self) {
        *self.no_wait_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + NO_WAIT_AFTER_TIMEOUT);
    }
}

impl Store {
    /// Adds a read replica (see the module documentation).
    pub fn with_replica(mut self, url: &str, pool_size: u32, max_wait: Duration) -> Result<Store, StoreError> {
        self.replica = Some(Replica::open(url, pool_size, max_wait)?);
        Ok(self)
    }

    /// The replica's counters, if there is one.
    pub fn replica_stats(&self) -> Option<&ReplicaStats> {
        self.replica.as_ref().map(|r| &r.stats)
    }

    /// A connection carrying `access` for a read that may run on the replica: the replica's
    /// once it has replayed every write acknowledged so far, else the primary's.
    pub(super) fn checkout_read(&self, access: &Access) -> Result<r2d2::PooledConnection<DbManager>, StoreError> {
        let Some(replica) = &self.replica else {
            return self.checkout(access);
        };
        let lsn = self.primary_lsn()?;
        let started = Instant::now();
        let result = (|| -> Result<Option<r2d2::PooledConnection<DbManager>>, StoreError> {
            let mut conn = replica.pool.get()?;
            loop {
                let state = standby_state(&mut conn.conn, &lsn);
                let (standby, behind) = note(&mut conn, state)?;
                replica.stats.lag_bytes.store(behind.max(0), Ordering::Relaxed);
                if !standby {
                    replica.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                if behind <= 0 {
                    apply_access(&mut conn, access, &self.shared_setting)?;
                    return Ok(Some(conn));
                }
                if !replica.waiting_allowed() {
                    replica.stats.behind.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                if started.elapsed() >= replica.max_wait {
                    replica.waited_in_vain();
                    replica.stats.behind.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })();
        replica
            .stats
            .wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(Some(conn)) => {
                replica.stats.served.fetch_add(1, Ordering::Relaxed);
                Ok(conn)
            }
            Ok(None) => self.checkout(access),
            Err(e) => {
                replica.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "read replica unusable; the read runs on the primary");
                self.checkout(access)
            }
        }
    }

    /// The primary's current WAL write position: every acknowledged commit lies before it.
    fn primary_lsn(&self) -> Result<String, StoreError> {
        #[derive(QueryableByName)]
        struct Lsn {
            #[diesel(sql_type = diesel::sql_types::Text)]
            lsn: String,
        }
        let mut conn = self.pool.get()?;
        let result = match &mut conn.conn {
            DbConnection::Pg(pg) => diesel::sql_query("SELECT pg_current_wal_lsn()::text AS lsn")
                .get_result::<Lsn>(pg)
                .map(|l| l.lsn)
                .map_err(StoreError::from),
            DbConnection::Sqlite(_) => Ok("0/0".into()),
        };
        note(&mut conn, result)
    }
}
