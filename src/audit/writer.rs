//! The group-commit writer: one thread owns the chain. Request handlers hand it events (reads,
//! failures) or links (events a write transaction already stored); it takes whatever is queued,
//! appends it in one transaction (one fsync for the batch), then acknowledges every waiting
//! request. Under load many events share a commit; alone, an event waits for one commit only.

use super::chain::link_hash;
use super::checkpoint::{CheckpointFile, CheckpointKey};
use super::AuditError;
use crate::store::audit::{AuditRow, ChainLink, Checkpoint};
use crate::store::Store;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The most events appended in one transaction.
const MAX_BATCH: usize = 1024;

/// The longest a batch waits for events of requests still in flight. Measured at c32
/// (benches/audit.rs): 1.5 ms held PostgreSQL at 0.43 of unaudited reads, 0.3 ms gives
/// 0.50-0.52 with 10-16 events per WAL fsync; with none, fewer than 8 events share a fsync.
const MAX_LINGER: Duration = Duration::from_micros(300);
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
    Link { event_id: String, canonical: Vec<u8> },
    /// Acknowledge once everything queued before has been committed.
    Flush(oneshot::Sender<Result<(), AuditError>>),
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

pub(super) struct Writer {
    pub store: Arc<Store>,
    pub key: CheckpointKey,
    pub file: CheckpointFile,
    pub policy: CheckpointPolicy,
    pub stats: Arc<WriterStats>,
    /// Chain seq of the last checkpoint, and when it was signed.
    pub last_checkpoint: (i64, Instant),
    /// Events appended since the last checkpoint.
    pub since_checkpoint: u64,
    /// Links whose batch failed, tried again with the next one.
    pub retry_links: Vec<(String, Vec<u8>)>,
    /// Audited requests under way (see [`super::InFlight`]).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The chain's last seq as this writer last saw it.
    pub head_seq: i64,
    pub session: crate::store::audit::AuditSession,
    /// The chain head after this writer's last commit (`None`: read it from the database).
    pub head: Option<crate::store::audit::ChainHead>,
}

impl Writer {
    pub(super) fn run(mut self, rx: Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(self.policy.every) {
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
        // shutting down: leave a checkpoint on the last event
        self.process_with(Vec::new(), true);
    }

    /// Adaptive group commit: while audited requests are under way that have not handed in
    /// their event yet, they are about to (their database read is under way), so wait briefly
    /// for them rather than commit, and fsync, once per handful. Never longer than
    /// [`MAX_LINGER`], and not at all when no other request is under way (a lone request is not
    /// delayed).
    fn linger(&self, rx: &Receiver<Job>, jobs: &mut Vec<Job>) {
        let waiting = |jobs: &Vec<Job>| jobs.iter().filter(|j| matches!(j, Job::Append { .. })).count();
        let deadline = Instant::now() + MAX_LINGER;
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

    /// Commits the retried links now (start-up recovery).
    pub(super) fn process_pending(&mut self) {
        self.process_with(Vec::new(), false)
    }

    fn process(&mut self, jobs: Vec<Job>) {
        self.process_with(jobs, false)
    }

    fn process_with(&mut self, jobs: Vec<Job>, final_checkpoint: bool) {
        self.stats.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        let mut rows = Vec::new();
        let mut order: Vec<(String, Vec<u8>)> = std::mem::take(&mut self.retry_links);
        let mut acks = Vec::new();
        let mut flushes = Vec::new();
        let mut linked_only = order.len();
        for job in jobs {
            match job {
                Job::Append { row, canonical, ack } => {
                    order.push((row.id.clone(), canonical));
                    rows.push(*row);
                    acks.push(ack);
                }
                Job::Link { event_id, canonical } => {
                    order.push((event_id, canonical));
                    linked_only += 1;
                }
                Job::Flush(ack) => flushes.push(ack),
            }
        }
        let time_due = self.last_checkpoint.1.elapsed() >= self.policy.every;
        let checkpoint_pending = self.head_seq > self.last_checkpoint.0 || self.since_checkpoint > 0;
        let want_checkpoint = (final_checkpoint || time_due) && checkpoint_pending;
        if order.is_empty() && !want_checkpoint {
            for f in flushes {
                let _ = f.send(Ok(()));
            }
            return;
        }
        let mut attempts = 0;
        let appending = Instant::now();
        let result = loop {
            attempts += 1;
            let mut signed: Option<Checkpoint> = None;
            let since = self.since_checkpoint;
            let (policy, last_seq, key) = (self.policy, self.last_checkpoint.0, &self.key);
            let known_head = if attempts == 1 { self.head.as_ref() } else { None };
            let result = self
                .store
                .append_audit_batch(&mut self.session, &rows, known_head, |head| {
                    let mut prev = head.hash.clone();
                    let mut seq = head.seq;
                    let links: Vec<ChainLink> = order
                        .iter()
                        .map(|(id, canonical)| {
                            seq += 1;
                            let hash = link_hash(&prev, canonical).to_vec();
                            ChainLink {
                                seq,
                                event_id: id.clone(),
                                prev_hash: std::mem::replace(&mut prev, hash.clone()),
                                hash,
                            }
                        })
                        .collect();
                    let due = since + links.len() as u64 >= policy.every_events || want_checkpoint || time_due;
                    if due && seq > last_seq && seq > 0 {
                        signed = Some(key.sign(seq, &prev, crate::store::now()));
                    }
                    (links, signed.clone())
                });
            match result {
                // Another process appended at the same seq, SQLite's write lock was held, or
                // the connection died (the session reconnects): read the head again and retry.
                Err(_) if attempts < 4 => {
                    std::thread::sleep(Duration::from_millis(5 * attempts));
                    continue;
                }
                other => break other.map(|head| (head, signed)),
            }
        };
        self.stats
            .commit_micros
            .fetch_add(appending.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok((head, signed)) => {
                let n = order.len() as u64;
                self.head_seq = head.seq;
                self.head = Some(head);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.events.fetch_add(n, Ordering::Relaxed);
                self.since_checkpoint += n;
                if let Some(cp) = signed {
                    if let Err(e) = self.file.append(&cp) {
                        tracing::error!(error = %e, "audit checkpoint could not be written to the checkpoint file");
                    }
                    self.last_checkpoint = (cp.seq, Instant::now());
                    self.since_checkpoint = 0;
                }
                for a in acks {
                    let _ = a.send(Ok(()));
                }
                for f in flushes {
                    let _ = f.send(Ok(()));
                }
            }
            Err(e) => {
                // read the head again next time: the failure may have been someone else's append
                self.head = None;
                self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, events = rows.len(), "audit batch could not be committed");
                // links name events already stored: keep them for the next batch
                let stored_only: Vec<(String, Vec<u8>)> = order
                    .into_iter()
                    .filter(|(id, _)| !rows.iter().any(|r| &r.id == id))
                    .collect();
                debug_assert_eq!(stored_only.len(), linked_only);
                self.retry_links = stored_only;
                for a in acks {
                    let _ = a.send(Err(AuditError::Unavailable));
                }
                for f in flushes {
                    let _ = f.send(Err(AuditError::Unavailable));
                }
            }
        }
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
                Job::Link { .. } => {}
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
