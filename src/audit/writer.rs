//! The group-commit writer: one thread per process owns this node's chain. Request handlers
//! hand it events (reads, failures) or links (events a write transaction already stored); it
//! takes whatever is queued, appends it to the chain in one transaction (one fsync for the
//! batch), then acknowledges every waiting request and hands the batch's search rows to the
//! deriver. Under load many events share a commit; alone, an event waits for one commit only.
//!
//! The chain is this process's alone (see `crate::store::audit::ledger`): no other node appends
//! to it, so a batch never collides with another node's and is never retried for that reason.

use super::chain::link_hash;
use super::checkpoint::{CheckpointFile, CheckpointKey};
use super::deriver::Derived;
use super::AuditError;
use crate::store::audit::{AuditRow, AuditSession, ChainHead, ChainLink, SearchRow};
use crate::store::{Store, StoreError};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The most events appended in one transaction.
const MAX_BATCH: usize = 1024;

/// The longest a batch waits for events of requests still in flight (it stops as soon as a
/// nap brings nothing new). Measured at c32 (benches/audit.rs): with one chain per node and a
/// fixed-text statement, PostgreSQL at 0.3 ms reached the floor with 4.5-9.7 events per WAL
/// fsync, at 0.8 ms the floor (0.99) with 12.5; SQLite batches 16 events per commit at 0.3 ms.
const MAX_LINGER_PG: Duration = Duration::from_micros(800);
const MAX_LINGER_SQLITE: Duration = Duration::from_micros(300);
const LINGER_STEP: Duration = Duration::from_micros(100);

/// Adds whatever is queued to `jobs`, up to [`MAX_BATCH`], without waiting. False once every
/// sender is gone.
fn take_queued(rx: &Receiver<Job>, jobs: &mut Vec<Job>) -> bool {
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(std::sync::mpsc::TryRecvError::Empty) => return true,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

pub(super) enum Job {
    /// Store and link this event, then acknowledge.
    Append {
        row: Box<AuditRow>,
        canonical: Vec<u8>,
        ack: oneshot::Sender<Result<(), AuditError>>,
    },
    /// Link an event a write transaction has stored (nobody waits).
    Link(Box<Pending>),
    /// Acknowledge once everything queued before has been committed.
    Flush(oneshot::Sender<Result<(), AuditError>>),
}

/// An event to link: its id, the bytes its hash covers, and what it derives to.
pub(super) struct Pending {
    pub event_id: String,
    pub canonical: Vec<u8>,
    pub search: SearchRow,
}

/// When to sign a checkpoint: after this many events, or this long after the last one if
/// events arrived since.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_events: u64,
    pub every: Duration,
}

/// Counters for benches and operators: commits made and events made durable by them.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Jobs handed to the writer and not yet taken by it.
    pub queued: AtomicU64,
    pub commits: AtomicU64,
    pub events: AtomicU64,
    pub failed_batches: AtomicU64,
    /// Time spent appending batches (the transaction, its commit included), and lingering.
    pub commit_micros: AtomicU64,
    pub linger_micros: AtomicU64,
}

/// Appends `order` to `chain` after `head` through `session` (which holds the chain), as links
/// computed here. `rows` are the events of `order` not stored yet. When the append fails on a
/// unique key, some event of `order` that was already stored has meanwhile been linked by a
/// node adopting this chain's leftovers: those are dropped and the rest appended again.
pub(super) fn append_linked(
    store: &Store,
    session: &mut AuditSession,
    chain: i64,
    head: &ChainHead,
    rows: &mut [AuditRow],
    order: &mut Vec<Pending>,
) -> Result<(ChainHead, Vec<(i64, SearchRow)>), StoreError> {
    for r in rows.iter_mut() {
        r.chain_id = chain;
    }
    let links = links_after(chain, head, order);
    match session.append(store, rows, &links) {
        Ok(()) => Ok(linked(head, &links, order)),
        Err(e) if e.is_unique_violation() => {
            let stored: Vec<String> = order
                .iter()
                .filter(|p| !rows.iter().any(|r| r.id == p.event_id))
                .map(|p| p.event_id.clone())
                .collect();
            let linked = session.linked(store, &stored)?;
            order.retain(|p| !linked.contains(&p.event_id));
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// The links that append `order` to `chain` after `head`.
fn links_after(chain: i64, head: &ChainHead, order: &[Pending]) -> Vec<ChainLink> {
    let mut prev = head.hash.clone();
    let mut seq = head.seq;
    order
        .iter()
        .map(|p| {
            seq += 1;
            let hash = link_hash(&prev, &p.canonical).to_vec();
            ChainLink {
                chain_id: chain,
                seq,
                event_id: p.event_id.clone(),
                prev_hash: std::mem::replace(&mut prev, hash.clone()),
                hash,
            }
        })
        .collect()
}

/// After `links` were appended: the new head, and the search rows of `order` by seq.
fn linked(head: &ChainHead, links: &[ChainLink], order: &mut Vec<Pending>) -> (ChainHead, Vec<(i64, SearchRow)>) {
    let new_head = links.last().map_or_else(
        || head.clone(),
        |l| ChainHead {
            seq: l.seq,
            hash: l.hash.clone(),
        },
    );
    let derived = links
        .iter()
        .zip(order.drain(..))
        .map(|(l, p)| (l.seq, p.search))
        .collect();
    (new_head, derived)
}

/// SQLite: batches are made durable in the journal (see [`super::journal`]) and moved into
/// the database by the deriver.
pub(super) struct Journaled {
    pub journal: super::journal::Journal,
    /// The last seq of this chain the database holds (the deriver moves, then sets it).
    pub moved: Arc<AtomicI64>,
    /// Set by the deriver while the database refuses the events it moves.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

/// Journaled events not in the database yet beyond which the writer refuses more: the
/// deriver is not keeping up (or not running), and the journal must not grow without end.
const MAX_UNMOVED: i64 = 500_000;

pub(super) struct Writer {
    pub store: Arc<Store>,
    /// `None` in journal mode: the deriver signs them, once it has moved what they cover.
    pub checkpointer: Option<Checkpointer>,
    /// How long the writer waits for a first event (then checks for a due checkpoint).
    pub idle: Duration,
    pub stats: Arc<WriterStats>,
    /// This node's name (its chain's, see [`AuditSession::claim`]).
    pub node: String,
    /// The chain this node appends to, shared with the handlers (write events name it).
    pub chain: Arc<AtomicI64>,
    /// Links whose batch failed, tried again with the next one.
    pub retry_links: Vec<Pending>,
    /// Audited requests under way (see [`super::InFlight`]).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    pub session: AuditSession,
    /// The chain head after this writer's last commit (`None`: read it from the database).
    pub head: Option<ChainHead>,
    /// Where committed batches' search rows go.
    pub derived: Sender<Derived>,
    /// Until then, links of writes' events are appended only if their events are stored: see
    /// [`Writer::drop_lost_links`].
    pub confirm_links_until: Option<Instant>,
    /// SQLite: the journal batches go to instead of a commit each.
    pub journaled: Option<Journaled>,
}

/// How long after re-claiming its chain on a new connection the writer confirms that the
/// events it links are stored. Links are queued the moment their write commits, so those of
/// writes committed before the connection was lost arrive within this window.
const CONFIRM_LINKS_WINDOW: Duration = Duration::from_secs(30);

impl Writer {
    pub(super) fn run(mut self, rx: Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(self.idle) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut jobs: Vec<Job> = first.into_iter().collect();
            take_queued(&rx, &mut jobs);
            let lingering = Instant::now();
            self.linger(&rx, &mut jobs);
            self.stats
                .linger_micros
                .fetch_add(lingering.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.process(jobs);
        }
        // shutting down: leave a checkpoint on the last event (journaled ones: the deriver
        // signs it once it has moved them)
        self.process_with(Vec::new(), true);
    }

    /// Adaptive group commit: while audited requests are under way that have not handed in
    /// their event yet, they are about to (their database read is under way), so wait briefly
    /// for them rather than commit, and fsync, once per handful. Never longer than
    /// [`MAX_LINGER_PG`] or [`MAX_LINGER_SQLITE`], and not at all when no other request is under way (a lone request is not
    /// delayed).
    fn linger(&self, rx: &Receiver<Job>, jobs: &mut Vec<Job>) {
        let waiting = |jobs: &Vec<Job>| jobs.iter().filter(|j| matches!(j, Job::Append { .. })).count();
        let max = match self.store.backend() {
            crate::store::Backend::Postgres => MAX_LINGER_PG,
            crate::store::Backend::Sqlite => MAX_LINGER_SQLITE,
        };
        let deadline = Instant::now() + max;
        let mut last_queued = usize::MAX;
        loop {
            // requests release their mark when they queue their event: what is left is to come
            let coming = self.in_flight.load(Ordering::Relaxed);
            let queued = waiting(jobs);
            // nothing arrived during the last nap: the rest are not about to come
            if queued == 0 || coming == 0 || queued == last_queued || jobs.len() >= MAX_BATCH {
                return;
            }
            last_queued = queued;
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            // Nap, then take all that arrived: one wake-up for many events, not one each.
            std::thread::sleep(LINGER_STEP.min(deadline - now));
            if !take_queued(rx, jobs) {
                return;
            }
        }
    }

    /// The chain to append to: this node's, claimed again after a lost connection (or another
    /// one, if a different process took it meanwhile).
    fn chain(&mut self) -> Result<i64, StoreError> {
        let current = self.chain.load(Ordering::Relaxed);
        if self.session.chain() == Some(current) {
            return Ok(current);
        }
        let chain = self.session.reclaim(&self.store, current, &self.node)?;
        if chain != current {
            self.chain.store(chain, Ordering::Relaxed);
        }
        self.head = None;
        self.confirm_links_until = Some(Instant::now() + CONFIRM_LINKS_WINDOW);
        Ok(chain)
    }

    /// After a lost connection the server may be another one (a promoted standby). With
    /// asynchronous replication, writes the old primary acknowledged but had not streamed are
    /// gone, their AuditEvents with them (same transaction): their links, queued or kept for a
    /// retry, would name events that do not exist. Those are dropped, and said so (`audit
    /// verify` reports the tail the checkpoints had signed as truncated). With synchronous
    /// replication nothing is dropped here.
    fn drop_lost_links(&mut self, rows: &[AuditRow], order: &mut Vec<Pending>) -> Result<(), StoreError> {
        match self.confirm_links_until {
            Some(until) if Instant::now() < until => {}
            Some(_) => {
                self.confirm_links_until = None;
                return Ok(());
            }
            None => return Ok(()),
        }
        let written: Vec<String> = order
            .iter()
            .filter(|p| !rows.iter().any(|r| r.id == p.event_id))
            .map(|p| p.event_id.clone())
            .collect();
        if written.is_empty() {
            return Ok(());
        }
        let stored = self.session.stored_events(&self.store, &written)?;
        let before = order.len();
        order.retain(|p| rows.iter().any(|r| r.id == p.event_id) || stored.contains(&p.event_id));
        if order.len() < before {
            tracing::error!(
                events = before - order.len(),
                "audit events of acknowledged writes are not in the database after reconnecting: \
                 the server lost committed transactions (asynchronous replication failover?)"
            );
        }
        Ok(())
    }

    /// Links this chain's events that a crash left stored but unlinked (start-up).
    pub(super) fn recover(&mut self, cipher: &crate::crypto::Cipher) -> Result<usize, AuditError> {
        let chain = self.chain()?;
        let mut linked = 0;
        loop {
            let orphans = super::deriver::unlinked(&self.store, cipher, chain, None)?;
            if orphans.is_empty() {
                return Ok(linked);
            }
            let n = orphans.len();
            self.retry_links.extend(orphans);
            self.process_with(Vec::new(), false);
            if !self.retry_links.is_empty() {
                return Err(AuditError::Unavailable);
            }
            linked += n;
        }
    }

    fn process(&mut self, jobs: Vec<Job>) {
        self.process_with(jobs, false)
    }

    fn process_with(&mut self, jobs: Vec<Job>, final_checkpoint: bool) {
        self.stats.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        let mut rows = Vec::new();
        let mut order: Vec<Pending> = std::mem::take(&mut self.retry_links);
        let mut acks = Vec::new();
        let mut flushes = Vec::new();
        for job in jobs {
            match job {
                Job::Append { row, canonical, ack } => {
                    order.push(Pending {
                        event_id: row.id.clone(),
                        canonical,
                        search: row.search_row(),
                    });
                    rows.push(*row);
                    acks.push(ack);
                }
                Job::Link(p) => order.push(*p),
                Job::Flush(ack) => flushes.push(ack),
            }
        }
        if !order.is_empty() {
            let n = order.len() as u64;
            let appending = Instant::now();
            let result = if self.journaled.is_some() {
                self.journal(&mut rows, &mut order)
            } else {
                self.append(&mut rows, &mut order)
                    .map(|(chain, derived)| (chain, derived, None))
            };
            self.stats
                .commit_micros
                .fetch_add(appending.elapsed().as_micros() as u64, Ordering::Relaxed);
            match result {
                Ok((chain, derived, to_move)) => {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    self.stats.events.fetch_add(n, Ordering::Relaxed);
                    if let Some(cp) = &mut self.checkpointer {
                        cp.since += n;
                    }
                    let _ = self.derived.send(Derived::Appended {
                        chain,
                        rows: derived,
                        to_move,
                    });
                }
                Err(e) => {
                    // (the journal's head is this writer's: the database's lags behind it)
                    if self.journaled.is_none() {
                        self.head = None;
                    }
                    self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, events = rows.len(), "audit batch could not be committed");
                    // links name events already stored: keep them for the next batch
                    self.retry_links = order
                        .into_iter()
                        .filter(|p| !rows.iter().any(|r| r.id == p.event_id))
                        .collect();
                    for a in acks {
                        let _ = a.send(Err(AuditError::Unavailable));
                    }
                    for f in flushes {
                        let _ = f.send(Err(AuditError::Unavailable));
                    }
                    return;
                }
            }
        }
        for a in acks {
            let _ = a.send(Ok(()));
        }
        if let Some(cp) = &mut self.checkpointer {
            cp.sign_if_due(&self.store, &mut self.session, final_checkpoint);
        }
        for f in flushes {
            let _ = f.send(Ok(()));
        }
    }

    /// Journal mode: links `order` after the head this writer holds (the database's may lag
    /// behind it: it is read only when nothing journaled is waiting to be moved) and makes
    /// the batch durable in the journal. On an error nothing is journaled and the head stays.
    #[allow(clippy::type_complexity)]
    fn journal(
        &mut self,
        rows: &mut Vec<AuditRow>,
        order: &mut Vec<Pending>,
    ) -> Result<(i64, Vec<(i64, SearchRow)>, Option<super::journal::Batch>), StoreError> {
        let chain = self.chain.load(Ordering::Relaxed);
        let head = match &self.head {
            Some(h) => h.clone(),
            None => self.session.head(&self.store, chain)?,
        };
        for r in rows.iter_mut() {
            r.chain_id = chain;
        }
        let batch = super::journal::Batch {
            rows: std::mem::take(rows),
            links: links_after(chain, &head, order),
        };
        let Some(j) = self.journaled.as_mut() else {
            return Err(StoreError::Lock("no audit journal".into()));
        };
        // fail closed when journaled events do not reach the database
        let moved = j.moved.load(Ordering::Acquire);
        if j.failing.load(Ordering::Acquire) || head.seq - moved > MAX_UNMOVED {
            *rows = batch.rows;
            return Err(StoreError::Lock(
                "journaled audit events are not reaching the database".into(),
            ));
        }
        if let Err(e) = j.journal.append(&batch, moved) {
            *rows = batch.rows;
            return Err(StoreError::Lock(format!("audit journal: {e}")));
        }
        let (new_head, derived) = linked(&head, &batch.links, order);
        self.head = Some(new_head);
        Ok((chain, derived, Some(batch)))
    }

    /// Appends with a few retries: a lost connection (claimed again) or a link some adopting
    /// node made first (dropped). Returns the chain and the search rows of what was linked.
    fn append(
        &mut self,
        rows: &mut [AuditRow],
        order: &mut Vec<Pending>,
    ) -> Result<(i64, Vec<(i64, SearchRow)>), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = (|| {
                let chain = self.chain()?;
                self.drop_lost_links(rows, order)?;
                let head = match &self.head {
                    Some(h) => h.clone(),
                    None => self.session.head(&self.store, chain)?,
                };
                append_linked(&self.store, &mut self.session, chain, &head, rows, order).map(|(h, d)| (chain, h, d))
            })();
            match result {
                Ok((chain, head, derived)) => {
                    self.head = Some(head);
                    return Ok((chain, derived));
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(error = %e, attempt, "audit batch failed; trying again");
                    self.head = None;
                    std::thread::sleep(Duration::from_millis(5 * attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Signs checkpoints of every chain's head as the database holds them, by the policy: the
/// writer after its commits, or (SQLite, journal) the deriver after it has moved batches in.
pub(super) struct Checkpointer {
    pub key: CheckpointKey,
    pub file: CheckpointFile,
    pub policy: CheckpointPolicy,
    /// When the last checkpoint was signed, and events made durable since.
    pub last: Instant,
    pub since: u64,
}

impl Checkpointer {
    /// Signs one if events arrived since the last and the policy (or `last_one`) says so.
    pub fn sign_if_due(&mut self, store: &Store, session: &mut AuditSession, last_one: bool) {
        let due = last_one || self.last.elapsed() >= self.policy.every || self.since >= self.policy.every_events;
        if self.since > 0 && due {
            self.sign(store, session);
        }
    }

    /// Signs the heads of every chain and stores the checkpoint in the database and the
    /// checkpoint file. A failure is logged and tried again later: the events themselves are
    /// durable and chained.
    fn sign(&mut self, store: &Store, session: &mut AuditSession) {
        let heads = match session.all_heads(store) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint: the chain heads could not be read");
                return;
            }
        };
        let cp = self.key.sign(&heads, crate::store::now());
        if let Err(e) = session.insert_checkpoint(store, &cp) {
            tracing::error!(error = %e, "audit checkpoint could not be stored");
            return;
        }
        if let Err(e) = self.file.append(&cp) {
            tracing::error!(error = %e, "audit checkpoint could not be written to the checkpoint file");
        }
        self.last = Instant::now();
        self.since = 0;
    }
}

/// The durability floor (benchmarks only, see [`super::Auditor::durability_floor`]): each batch
/// of sealed events is appended to a plain file and made durable with one `fdatasync`, then
/// acknowledged. No database, no chain, no index: what any design that makes a read's event
/// durable before answering pays at least, on this machine.
pub(super) fn run_floor(rx: Arc<Mutex<Receiver<Job>>>, mut file: std::fs::File, stats: Arc<WriterStats>) {
    use std::io::Write;
    let mut buf = Vec::new();
    loop {
        // several streams may share the queue: each takes what is there, then syncs its file
        let jobs = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            let Ok(first) = rx.recv() else { break };
            let mut jobs = vec![first];
            take_queued(&rx, &mut jobs);
            jobs
        };
        stats.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        buf.clear();
        let mut acks = Vec::new();
        let mut events = 0;
        for job in jobs {
            match job {
                Job::Append { row, canonical, ack } => {
                    buf.extend_from_slice(row.id.as_bytes());
                    buf.extend_from_slice(row.content.as_bytes());
                    drop(canonical);
                    acks.push(ack);
                    events += 1;
                }
                Job::Link(_) => {}
                Job::Flush(ack) => acks.push(ack),
            }
        }
        let appending = Instant::now();
        let result = file.write_all(&buf).and_then(|()| file.sync_data());
        stats
            .commit_micros
            .fetch_add(appending.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.events.fetch_add(events, Ordering::Relaxed);
        for a in acks {
            let _ = a.send(result.as_ref().map(|_| ()).map_err(|_| AuditError::Unavailable));
        }
    }
}
