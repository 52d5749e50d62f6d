//! Subscriptions' rows beside the Subscription resources: whose grant filters each one's
//! notifications and how far delivery got (`subscription_state`), and the outbox of matched
//! writes (`subscription_outbox`), filled in the writes' own transactions and emptied by the
//! delivery workers of any node, one subscription at a time under a lease.

use super::schema::{subscription_outbox as so, subscription_state as ss};
use super::{Access, DbConnection, Store, StoreError};
use chrono::NaiveDateTime;
use diesel::prelude::*;

/// The resource type whose writes set a subscription's owner.
pub const SUBSCRIPTION: &str = "Subscription";

/// What happened to the resource a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeEvent {
    Create,
    Update,
    Delete,
}

impl ChangeEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeEvent::Create => "create",
            ChangeEvent::Update => "update",
            ChangeEvent::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> ChangeEvent {
        match s {
            "create" => ChangeEvent::Create,
            "delete" => ChangeEvent::Delete,
            _ => ChangeEvent::Update,
        }
    }
}

/// A write as subscriptions see it, inside its transaction.
#[derive(Debug)]
pub struct Change<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version_id: i64,
    pub event: ChangeEvent,
    /// The index rows of the version written (none for a deletion: its filters are checked on
    /// the deleted version at delivery).
    pub search: &'a [super::search_index::SearchRow],
}

/// Decides which subscriptions a write concerns (implemented by `crate::subscription`): called
/// in the write's transaction, so it must be cheap (memory only).
pub trait WriteWatch: Send + Sync {
    /// The ids of the subscriptions to notify of `change`.
    fn matches(&self, change: &Change<'_>) -> Vec<String>;
    /// A transaction that recorded matches committed: delivery may start.
    fn committed(&self);
}

thread_local! {
    /// Whether the transaction running on this thread recorded a match (reset per transaction).
    static MATCHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Called before a write transaction starts.
pub(super) fn begin() {
    MATCHED.with(|m| m.set(false));
}

/// Whether the transaction that just ended on this thread recorded a match.
pub(super) fn matched() -> bool {
    MATCHED.with(|m| m.replace(false))
}

/// Records the matches of `change` in the outbox (in the write's transaction).
pub(super) fn record_matches(
    conn: &mut DbConnection,
    watch: &dyn WriteWatch,
    change: &Change<'_>,
    ts: NaiveDateTime,
) -> Result<(), StoreError> {
    let subscriptions = watch.matches(change);
    if subscriptions.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = subscriptions
        .iter()
        .map(|s| {
            (
                so::subscription_id.eq(s.as_str()),
                so::resource_type.eq(change.resource_type),
                so::logical_id.eq(change.id),
                so::version_id.eq(change.version_id),
                so::event.eq(change.event.as_str()),
                so::recorded.eq(ts),
            )
        })
        .collect();
    match conn {
        DbConnection::Pg(c) => diesel::insert_into(so::table).values(&rows).execute(c)?,
        DbConnection::Sqlite(c) => diesel::insert_into(so::table).values(&rows).execute(c)?,
    };
    MATCHED.with(|m| m.set(true));
    Ok(())
}

/// A client wrote a Subscription: it becomes the owner, and the state starts over from the
/// status written (`requested`, or `off`); the event counter carries on.
pub(super) fn record_owner(
    conn: &mut DbConnection,
    id: &str,
    owner: &str,
    status: &str,
    ts: NaiveDateTime,
) -> Result<(), StoreError> {
    let changed = diesel::update(ss::table.filter(ss::subscription_id.eq(id)))
        .set((
            ss::owner.eq(owner),
            ss::status.eq(status),
            ss::failures.eq(0),
            ss::next_attempt_at.eq(None::<NaiveDateTime>),
            ss::last_error.eq(None::<String>),
            ss::updated_at.eq(ts),
        ))
        .execute(conn)?;
    if changed == 0 {
        diesel::insert_into(ss::table)
            .values((
                ss::subscription_id.eq(id),
                ss::owner.eq(owner),
                ss::status.eq(status),
                ss::updated_at.eq(ts),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// A Subscription was deleted: nothing more is delivered for it.
pub(super) fn record_deleted(conn: &mut DbConnection, id: &str, ts: NaiveDateTime) -> Result<(), StoreError> {
    diesel::update(ss::table.filter(ss::subscription_id.eq(id)))
        .set((ss::status.eq("off"), ss::updated_at.eq(ts)))
        .execute(conn)?;
    Ok(())
}

/// A subscription's delivery state.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = ss)]
pub struct SubscriptionState {
    pub subscription_id: String,
    /// The owner's grant, as `crate::auth::Grant` serialized it.
    pub owner: String,
    pub status: String,
    pub events_since_start: i64,
    pub failures: i32,
    pub next_attempt_at: Option<NaiveDateTime>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<NaiveDateTime>,
    pub last_sent_at: Option<NaiveDateTime>,
    pub last_error: Option<String>,
    pub updated_at: NaiveDateTime,
}

/// A subscription that may have work: not off or in error, not leased, not waiting to retry.
#[derive(Debug, Clone)]
pub struct DueSubscription {
    pub id: String,
    pub status: String,
    /// Whether matched writes wait in the outbox.
    pub pending: bool,
    pub last_sent_at: Option<NaiveDateTime>,
}

/// One matched write in the outbox.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = so)]
pub struct OutboxEvent {
    pub id: i64,
    pub subscription_id: String,
    pub resource_type: String,
    pub logical_id: String,
    pub version_id: i64,
    pub event: String,
    pub recorded: NaiveDateTime,
    pub event_number: Option<i64>,
    pub sent_at: Option<NaiveDateTime>,
    pub dropped: bool,
}

impl Store {
    /// The delivery state of one subscription.
    pub fn subscription_state(&self, id: &str) -> Result<Option<SubscriptionState>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = ss::table
            .filter(ss::subscription_id.eq(id))
            .select(SubscriptionState::as_select())
            .first(&mut conn.conn)
            .optional()
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Every subscription's state (the periodic check of their owners' grants).
    pub fn subscription_states(&self) -> Result<Vec<SubscriptionState>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = ss::table
            .select(SubscriptionState::as_select())
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// What changes whenever a resource of `resource_type` is created, updated or deleted:
    /// their number and the last write's time (one indexed query), so that a node rebuilds
    /// what it derives from them only when they changed.
    pub fn type_fingerprint(&self, resource_type: &str) -> Result<(i64, Option<NaiveDateTime>), StoreError> {
        use super::schema::resources as cur;
        use diesel::dsl::{count_star, max};
        let mut conn = self.checkout(&Access::All)?;
        let result = cur::table
            .filter(cur::resource_type.eq(resource_type))
            .select((count_star(), max(cur::last_updated)))
            .first(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Subscriptions a worker could take now (not leased, not waiting to retry): those
    /// waiting for their handshake or with undelivered events (at most `limit`), and those of
    /// `heartbeats` that are active (whether a heartbeat is due is the caller's to say).
    pub fn due_subscriptions(
        &self,
        node: &str,
        limit: i64,
        heartbeats: &[String],
    ) -> Result<Vec<DueSubscription>, StoreError> {
        let now = super::now();
        let mut conn = self.checkout(&Access::All)?;
        let result = (|| -> Result<Vec<DueSubscription>, StoreError> {
            // a lease of this node's is its own to take again (one it failed to give back)
            let free = ss::lease_until
                .is_null()
                .or(ss::lease_until.lt(now))
                .or(ss::lease_owner.eq(node));
            let due = ss::next_attempt_at.is_null().or(ss::next_attempt_at.le(now));
            let pending = diesel::dsl::exists(
                so::table
                    .filter(so::subscription_id.eq(ss::subscription_id))
                    .filter(so::sent_at.is_null().and(diesel::dsl::not(so::dropped))),
            );
            let rows: Vec<(String, String, Option<NaiveDateTime>, bool)> = ss::table
                .filter(ss::status.eq_any(["requested", "active"]))
                .filter(free)
                .filter(due)
                .filter(ss::status.eq("requested").or(pending))
                .select((ss::subscription_id, ss::status, ss::last_sent_at, pending))
                .limit(limit)
                .load(&mut conn.conn)?;
            let mut out: Vec<DueSubscription> = rows
                .into_iter()
                .map(|(id, status, last_sent_at, pending)| DueSubscription {
                    id,
                    status,
                    pending,
                    last_sent_at,
                })
                .collect();
            if !heartbeats.is_empty() {
                let beating: Vec<(String, Option<NaiveDateTime>)> = ss::table
                    .filter(ss::subscription_id.eq_any(heartbeats))
                    .filter(ss::status.eq("active"))
                    .filter(
                        ss::lease_until
                            .is_null()
                            .or(ss::lease_until.lt(now))
                            .or(ss::lease_owner.eq(node)),
                    )
                    .filter(ss::next_attempt_at.is_null().or(ss::next_attempt_at.le(now)))
                    .select((ss::subscription_id, ss::last_sent_at))
                    .load(&mut conn.conn)?;
                for (id, last_sent_at) in beating {
                    if !out.iter().any(|d| d.id == id) {
                        out.push(DueSubscription {
                            id,
                            status: "active".into(),
                            pending: false,
                            last_sent_at,
                        });
                    }
                }
            }
            Ok(out)
        })();
        super::note(&mut conn, result)
    }

    /// Takes the lease of a subscription until `until`, if nobody else holds it (and it is not
    /// off). A node takes its own lease again: its workers never serve one subscription at once
    /// (`subscription::deliver`), so a lease of its own is one it failed to give back.
    pub fn claim_subscription(&self, id: &str, node: &str, until: NaiveDateTime) -> Result<bool, StoreError> {
        let now = super::now();
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(
            ss::table
                .filter(ss::subscription_id.eq(id))
                .filter(ss::status.eq_any(["requested", "active"]))
                .filter(
                    ss::lease_until
                        .is_null()
                        .or(ss::lease_until.lt(now))
                        .or(ss::lease_owner.eq(node)),
                ),
        )
        .set((ss::lease_owner.eq(node), ss::lease_until.eq(until)))
        .execute(&mut conn.conn)
        .map(|n| n == 1)
        .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Gives the lease back.
    pub fn release_subscription(&self, id: &str, node: &str) -> Result<(), StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(
            ss::table
                .filter(ss::subscription_id.eq(id))
                .filter(ss::lease_owner.eq(node)),
        )
        .set((
            ss::lease_owner.eq(None::<String>),
            ss::lease_until.eq(None::<NaiveDateTime>),
        ))
        .execute(&mut conn.conn)
        .map(|_| ())
        .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Frees every lease `node` holds (a restarted node's, before its workers start).
    pub fn release_subscription_leases(&self, node: &str) -> Result<(), StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(ss::table.filter(ss::lease_owner.eq(node)))
            .set((
                ss::lease_owner.eq(None::<String>),
                ss::lease_until.eq(None::<NaiveDateTime>),
            ))
            .execute(&mut conn.conn)
            .map(|_| ())
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// The first `limit` undelivered events of a subscription, in outbox order.
    pub fn pending_events(&self, id: &str, limit: i64) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = so::table
            .filter(so::subscription_id.eq(id))
            .filter(so::sent_at.is_null().and(diesel::dsl::not(so::dropped)))
            .order(so::id.asc())
            .limit(limit)
            .select(OutboxEvent::as_select())
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Leaves events out of delivery (outside the owner's grant, or no longer matching).
    pub fn drop_events(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(so::table.filter(so::id.eq_any(ids)))
            .set(so::dropped.eq(true))
            .execute(&mut conn.conn)
            .map(|_| ())
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Gives event numbers to those of `events` that have none, in order, continuing the
    /// subscription's counter (in one transaction, by the lease holder): numbers are given
    /// once, so a notification sent again carries the same ones. Returns the events numbered.
    pub fn number_events(&self, id: &str, events: &mut [OutboxEvent]) -> Result<i64, StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = conn.conn.write_transaction(|c| {
            let mut counter: i64 = ss::table
                .filter(ss::subscription_id.eq(id))
                .select(ss::events_since_start)
                .first(c)?;
            for e in events.iter_mut().filter(|e| e.event_number.is_none()) {
                counter += 1;
                diesel::update(so::table.filter(so::id.eq(e.id)))
                    .set(so::event_number.eq(counter))
                    .execute(c)?;
                e.event_number = Some(counter);
            }
            diesel::update(ss::table.filter(ss::subscription_id.eq(id)))
                .set(ss::events_since_start.eq(counter))
                .execute(c)?;
            Ok(counter)
        });
        super::note(&mut conn, result)
    }

    /// The endpoint took a notification: its events are delivered, the subscription active.
    pub fn delivered(&self, id: &str, event_ids: &[i64]) -> Result<(), StoreError> {
        let now = super::now();
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = conn.conn.write_transaction(|c| {
            if !event_ids.is_empty() {
                diesel::update(so::table.filter(so::id.eq_any(event_ids)))
                    .set(so::sent_at.eq(now))
                    .execute(c)?;
            }
            diesel::update(
                ss::table
                    .filter(ss::subscription_id.eq(id))
                    .filter(ss::status.ne("off")),
            )
            .set((
                ss::status.eq("active"),
                ss::failures.eq(0),
                ss::next_attempt_at.eq(None::<NaiveDateTime>),
                ss::last_sent_at.eq(now),
                ss::last_error.eq(None::<String>),
            ))
            .execute(c)?;
            Ok(())
        });
        super::note(&mut conn, result)
    }

    /// A delivery failed: the next attempt waits until `retry_at`, or, with `None`, the
    /// subscription is in error (after repeated failures) and waits for its owner.
    pub fn delivery_failed(
        &self,
        id: &str,
        failures: i32,
        retry_at: Option<NaiveDateTime>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let status = if retry_at.is_some() { None } else { Some("error") };
        let result = diesel::update(
            ss::table
                .filter(ss::subscription_id.eq(id))
                .filter(ss::status.ne("off")),
        )
        .set((
            ss::failures.eq(failures),
            ss::next_attempt_at.eq(retry_at),
            ss::last_error.eq(reason),
        ))
        .execute(&mut conn.conn)
        .and_then(|_| match status {
            Some(s) => diesel::update(ss::table.filter(ss::subscription_id.eq(id)))
                .set(ss::status.eq(s))
                .execute(&mut conn.conn),
            None => Ok(0),
        })
        .map(|_| ())
        .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Sets a subscription's delivery status (`off` when its owner's grant is withdrawn).
    pub fn set_subscription_status(&self, id: &str, status: &str, reason: Option<&str>) -> Result<(), StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(ss::table.filter(ss::subscription_id.eq(id)))
            .set((ss::status.eq(status), ss::last_error.eq(reason)))
            .execute(&mut conn.conn)
            .map(|_| ())
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Numbered events of a subscription from `first` to `last` (`$events`), in order.
    pub fn numbered_events(&self, id: &str, first: i64, last: i64) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = so::table
            .filter(so::subscription_id.eq(id))
            .filter(so::event_number.ge(first).and(so::event_number.le(last)))
            .order(so::event_number.asc())
            .select(OutboxEvent::as_select())
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Removes delivered and dropped events recorded before `before` (kept for `$events`
    /// until then).
    pub fn purge_delivered_events(&self, before: NaiveDateTime) -> Result<usize, StoreError> {
        let _guard = self.sqlite_write_guard();
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::delete(
            so::table
                .filter(so::recorded.lt(before))
                .filter(so::sent_at.is_not_null().or(so::dropped.eq(true))),
        )
        .execute(&mut conn.conn)
        .map_err(StoreError::from);
        super::note(&mut conn, result)
    }
}
