//! Audit: an AuditEvent for every access, in a tamper-evident ledger.
//!
//! * [`event`] builds the AuditEvent (IHE BALP shape) and its canonical bytes.
//! * Writes put their event in the write's own transaction ([`TxAudit`], through the store's
//!   `WriteAudit` hook) and then hand the chain link to the writer; reads and failures hand
//!   the whole event to the writer and wait until it is committed ([`Auditor::record`]).
//! * [`writer`]: one thread owns this node's chain and commits queued events in batches (group
//!   commit). Every node has a chain of its own, so N nodes append side by side without
//!   contending for a head (see `crate::store::audit::ledger` for how a chain is claimed).
//! * [`deriver`]: one thread derives the AuditEvent search rows from committed events, off the
//!   request path, and looks after the chains of nodes that are gone.
//! * [`checkpoint`]: Ed25519-signed checkpoints of every chain's head, in the database and a file.
//! * [`verify`]: `fhirvault audit verify`, which checks every chain and names the first tampered
//!   record of each.
//!
//! Fail closed: if an event cannot be committed, the request gets an error and no PHI.

mod chain;
pub mod checkpoint;
mod deriver;
pub mod event;
pub mod export;
pub mod journal;
pub mod verify;
mod writer;

pub use chain::link_hash;
pub use event::{Action, Agent, AuditRecord, Kind, Outcome, Source};
pub use writer::{CheckpointPolicy, WriterStats};

use crate::crypto::Cipher;
use crate::store::audit::AuditRow;
use crate::store::{Store, StoreError, WriteAudit, WriteEffect, WriteFacts};
use checkpoint::{CheckpointFile, CheckpointKey};
use deriver::{Derived, Deriver};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::oneshot;
use writer::{Job, Pending, Writer};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The event could not be made durable: the request must fail without data.
    #[error("the audit ledger is unavailable")]
    Unavailable,
    #[error("an audit event could not be sealed")]
    Seal,
    #[error("audit checkpoint key: {0}")]
    Key(String),
    #[error("audit storage: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
}

/// The handle request handlers and commands record through. Cheap to share.
pub struct Auditor {
    /// Senders are shared by all request threads; the lock is only taken for writing at shutdown.
    sender: RwLock<Option<Sender<Job>>>,
    /// To the deriver (waits for search rows), taken at shutdown after the writer stopped.
    derived: Mutex<Option<Sender<Derived>>>,
    /// The chain this node appends to (0: none, for the benches' auditors).
    chain: Arc<AtomicI64>,
    cipher: Arc<Cipher>,
    source: Source,
    stats: Arc<WriterStats>,
    /// The writer thread (the floor's stream threads), joined at shutdown.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// False only for [`Auditor::without_ledger`] (benchmark baselines).
    enabled: bool,
    /// Requests that will hand in an event soon (the writer waits briefly for them).
    in_flight: Arc<AtomicUsize>,
    /// SQLite: events are durable in the journal first, in the database once moved.
    journaled: bool,
}

/// Counts a request as under way until dropped: the writer batches its event with others'.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Claims this node's chain (see [`crate::store::audit::AuditSession::claim`]), links any
    /// of its events a crash left unlinked, then starts the writer and the deriver.
    pub fn start(
        store: Arc<Store>,
        source: Source,
        key: CheckpointKey,
        file: CheckpointFile,
        policy: CheckpointPolicy,
        node: &str,
    ) -> Result<Auditor, AuditError> {
        let cipher = store.shared_cipher();
        let stats = Arc::new(WriterStats::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut session = crate::store::audit::AuditSession::default();
        let chain = Arc::new(AtomicI64::new(session.claim(&store, node)?));
        let (derived_tx, derived_rx) = std::sync::mpsc::channel();
        let mut w = Writer {
            store: store.clone(),
            checkpointer: Some(writer::Checkpointer {
                key,
                file,
                policy,
                last: Instant::now(),
                since: 0,
            }),
            idle: policy.every,
            stats: stats.clone(),
            node: node.to_string(),
            chain: chain.clone(),
            retry_links: Vec::new(),
            in_flight: in_flight.clone(),
            session,
            head: None,
            derived: derived_tx.clone(),
            confirm_links_until: None,
            journaled: None,
        };
        // SQLite: what the journal made durable and the database does not hold yet goes in
        // first; then the writer journals (see `journal`)
        let moved = Arc::new(AtomicI64::new(0));
        let move_failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let journal_paths = store
            .sqlite_path()
            .map(|db| journal::segment_paths(db, chain.load(Ordering::Relaxed)));
        if let Some(paths) = &journal_paths {
            let own = chain.load(Ordering::Relaxed);
            let mut replayed = replay_journal(&store, &mut w.session, own, paths)?;
            // a process that stopped under another node name (the default name has the
            // port in it) left its chain's journal: moved in by whoever takes that chain next
            let db = store.sqlite_path().unwrap_or_default().to_string();
            let mut others = crate::store::audit::AuditSession::default();
            for other in store.audit_chains()?.into_iter().map(|c| c.id).filter(|c| *c != own) {
                let other_paths = journal::segment_paths(&db, other);
                let waiting = other_paths
                    .iter()
                    .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
                if waiting && others.try_hold(&store, other)? {
                    let moved = replay_journal(&store, &mut others, other, &other_paths);
                    others.release(&store, other);
                    replayed += moved?;
                }
            }
            if replayed > 0 {
                tracing::warn!(
                    events = replayed,
                    "moved journaled audit events into the database after an interruption"
                );
            }
        }
        let recovered = w.recover(&cipher)?;
        if recovered > 0 {
            tracing::warn!(events = recovered, "linked audit events stored before an interruption");
        }
        let mut deriver_checkpoints = None;
        if let Some(paths) = &journal_paths {
            // the recovery's own links are committed: sign over them now, then hand signing
            // to the deriver (checkpoints cover what the database holds)
            if let Some(mut cp) = w.checkpointer.take() {
                cp.sign_if_due(&store, &mut w.session, true);
                deriver_checkpoints = Some(cp);
            }
            let head = w.session.head(&store, chain.load(Ordering::Relaxed))?;
            moved.store(head.seq, Ordering::Release);
            w.head = Some(head);
            w.journaled = Some(writer::Journaled {
                journal: journal::Journal::open_empty(paths)
                    .map_err(|e| AuditError::Io(format!("audit journal: {e}")))?,
                moved: moved.clone(),
                failing: move_failing.clone(),
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| AuditError::Io(e.to_string()))
        };
        let writer = spawn("audit-writer", Box::new(move || w.run(rx)))?;
        let d = Deriver {
            store: store.clone(),
            cipher: cipher.clone(),
            chain: chain.clone(),
            session: Default::default(),
            rows_session: crate::store::audit::AuditSession::derived_rows(),
            pending: Default::default(),
            positions: Default::default(),
            last_sweep: None,
            settled: Default::default(),
            to_move: Vec::new(),
            moved: journal_paths.is_some().then_some(moved),
            move_session: Default::default(),
            checkpointer: deriver_checkpoints,
            move_failing,
        };
        let journaled = journal_paths.is_some();
        let deriver = spawn("audit-deriver", Box::new(move || d.run(derived_rx)))?;
        Ok(Auditor {
            sender: RwLock::new(Some(tx)),
            derived: Mutex::new(Some(derived_tx)),
            chain,
            cipher,
            source,
            stats,
            threads: Mutex::new(vec![writer, deriver]),
            enabled: true,
            in_flight,
            journaled,
        })
    }

    /// An auditor that records nothing. Not reachable from configuration or the command line:
    /// it exists so that benches can measure what auditing costs against the same server.
    pub fn without_ledger(cipher: Arc<Cipher>, source: Source) -> Auditor {
        Auditor {
            sender: RwLock::new(None),
            derived: Mutex::new(None),
            chain: Arc::new(AtomicI64::new(0)),
            cipher,
            source,
            stats: Arc::new(WriterStats::default()),
            threads: Mutex::new(Vec::new()),
            enabled: false,
            in_flight: Arc::new(AtomicUsize::new(0)),
            journaled: false,
        }
    }

    /// An auditor whose events are made durable in a plain file and nowhere else: no
    /// database, no chain, no index. Not reachable from configuration or the command line:
    /// benches measure against it the floor of any design that makes an event durable before
    /// the answer (see `benches/audit.rs`). Each of `paths` is synced by a thread of its own,
    /// side by side, as a design with several commit streams could; a flush waits only for the
    /// stream that takes it.
    pub fn durability_floor(
        cipher: Arc<Cipher>,
        source: Source,
        paths: &[std::path::PathBuf],
    ) -> Result<Auditor, AuditError> {
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for path in paths {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| AuditError::Io(e.to_string()))?;
            let (rx, stats) = (rx.clone(), stats.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("audit-floor".into())
                    .spawn(move || writer::run_floor(rx, file, stats))
                    .map_err(|e| AuditError::Io(e.to_string()))?,
            );
        }
        Ok(Auditor {
            sender: RwLock::new(Some(tx)),
            derived: Mutex::new(None),
            chain: Arc::new(AtomicI64::new(0)),
            cipher,
            source,
            stats,
            threads: Mutex::new(threads),
            enabled: true,
            in_flight: Arc::new(AtomicUsize::new(0)),
            journaled: false,
        })
    }

    /// Marks a request whose event is coming (held until its event is queued or the request
    /// records it in its own transaction).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The chain this node appends to.
    pub fn chain_id(&self) -> i64 {
        self.chain.load(Ordering::Relaxed)
    }

    fn send(&self, job: Job) -> Result<(), AuditError> {
        let guard = self.sender.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(s) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                s.send(job).map_err(|_| {
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    AuditError::Unavailable
                })
            }
            None => Err(AuditError::Unavailable),
        }
    }

    /// Seals and queues an event; `in_flight` is released just before the event is queued (after,
    /// the writer could see it still marked and wait for an event it already has).
    fn submit(
        &self,
        record: &AuditRecord,
        in_flight: Option<InFlight>,
    ) -> Result<Option<oneshot::Receiver<Result<(), AuditError>>>, AuditError> {
        if !self.enabled {
            return Ok(None);
        }
        let (row, canonical) = record.seal(&self.source, &self.cipher)?;
        drop(in_flight);
        let (ack, rx) = oneshot::channel();
        self.send(Job::Append {
            row: Box::new(row),
            canonical,
            ack,
        })?;
        Ok(Some(rx))
    }

    /// Records an event and returns once it is committed.
    pub async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        self.record_releasing(record, None).await
    }

    /// [`Auditor::record`] for a request marked [`InFlight`]: the mark is released as soon as the
    /// event is queued, so that the writer, which lingers for requests whose event is still to
    /// come, does not wait for this one while it waits for the commit.
    pub async fn record_releasing(&self, record: &AuditRecord, in_flight: Option<InFlight>) -> Result<(), AuditError> {
        match self.submit(record, in_flight)? {
            Some(rx) => rx.await.map_err(|_| AuditError::Unavailable)?,
            None => Ok(()),
        }
    }

    /// [`Auditor::record`] for threads outside the async runtime.
    pub fn record_blocking(&self, record: &AuditRecord) -> Result<(), AuditError> {
        match self.submit(record, None)? {
            Some(rx) => rx.blocking_recv().map_err(|_| AuditError::Unavailable)?,
            None => Ok(()),
        }
    }

    /// The hook a write transaction builds its event with (see [`TxAudit`]).
    pub fn for_write(&self, template: AuditRecord) -> TxAudit {
        TxAudit {
            template,
            source: self.source.clone(),
            cipher: self.cipher.clone(),
            chain: self.chain.clone(),
            sealed: None,
            enabled: self.enabled,
            owner: None,
        }
    }

    /// After the write committed: its event goes into the chain (nobody waits for this; the
    /// event is already durable, and a link lost to a crash is made at the next start, or by
    /// another node if this one does not come back).
    pub fn link_committed(&self, tx: TxAudit) {
        if let Some(pending) = tx.sealed {
            if self.send(Job::Link(Box::new(pending))).is_err() {
                tracing::error!("audit writer unavailable: an event stays unlinked until the next start");
            }
        }
    }

    /// Waits until everything queued so far is committed and its search rows are stored, so
    /// that an AuditEvent search on this node sees every event this node recorded before it
    /// (events of other nodes are searchable within a second of their commit).
    pub async fn sync_search(&self) -> Result<(), AuditError> {
        self.flush().await?;
        if self.journaled {
            // the flush waited for the deriver already
            return Ok(());
        }
        let Some(rx) = self.ask_deriver()? else { return Ok(()) };
        rx.await.map_err(|_| AuditError::Unavailable)?
    }

    /// [`Auditor::sync_search`] for threads outside the async runtime.
    pub fn sync_search_blocking(&self) -> Result<(), AuditError> {
        self.flush_blocking()?;
        if self.journaled {
            return Ok(());
        }
        let Some(rx) = self.ask_deriver()? else { return Ok(()) };
        rx.blocking_recv().map_err(|_| AuditError::Unavailable)?
    }

    fn ask_deriver(&self) -> Result<Option<oneshot::Receiver<Result<(), AuditError>>>, AuditError> {
        if !self.enabled {
            return Ok(None);
        }
        let guard = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = guard.as_ref() else {
            // the floor derives nothing
            return Ok(None);
        };
        let (ack, rx) = oneshot::channel();
        s.send(Derived::Sync(ack)).map_err(|_| AuditError::Unavailable)?;
        Ok(Some(rx))
    }

    /// Waits until everything queued so far is committed (and, journaled, in the database).
    pub async fn flush(&self) -> Result<(), AuditError> {
        if !self.enabled {
            return Ok(());
        }
        let (ack, rx) = oneshot::channel();
        self.send(Job::Flush(ack))?;
        rx.await.map_err(|_| AuditError::Unavailable)??;
        if self.journaled {
            if let Some(rx) = self.ask_deriver()? {
                rx.await.map_err(|_| AuditError::Unavailable)??;
            }
        }
        Ok(())
    }

    /// [`Auditor::flush`] for threads outside the async runtime.
    pub fn flush_blocking(&self) -> Result<(), AuditError> {
        if !self.enabled {
            return Ok(());
        }
        let (ack, rx) = oneshot::channel();
        self.send(Job::Flush(ack))?;
        rx.blocking_recv().map_err(|_| AuditError::Unavailable)??;
        if self.journaled {
            if let Some(rx) = self.ask_deriver()? {
                rx.blocking_recv().map_err(|_| AuditError::Unavailable)??;
            }
        }
        Ok(())
    }

    /// Stops the writer after it has committed what is queued (and signed a last checkpoint),
    /// then the deriver after it has stored the search rows of all of it.
    pub fn shutdown(&self) {
        self.sender.write().unwrap_or_else(|p| p.into_inner()).take();
        // the deriver ends once the writer (which holds the other sender) has ended too
        self.derived.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Auditor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Moves the journal's batches beyond the chain's head in the database into it, in one
/// transaction, then empties the journal. The batches must continue the chain exactly (seq
/// and hash): anything else is refused, and the node does not start, rather than guess.
fn replay_journal(
    store: &Store,
    session: &mut crate::store::audit::AuditSession,
    chain: i64,
    paths: &[std::path::PathBuf; 2],
) -> Result<usize, AuditError> {
    let io = |e: std::io::Error| AuditError::Io(format!("audit journal: {e}"));
    let batches = journal::read_all(paths).map_err(io)?;
    let head = session.head(store, chain)?;
    let (mut rows, mut links) = (Vec::new(), Vec::new());
    let (mut next, mut prev) = (head.seq + 1, head.hash.clone());
    for b in batches.into_iter().filter(|b| b.last_seq() > head.seq) {
        for l in &b.links {
            if l.chain_id != chain || l.seq != next || l.prev_hash != prev {
                return Err(AuditError::Io(format!(
                    "the audit journal does not continue chain {chain} at seq {next}: \
                     run `fhirvault audit verify`; the journal files are left as they are"
                )));
            }
            next += 1;
            prev = l.hash.clone();
        }
        rows.extend(b.rows);
        links.extend(b.links);
    }
    if !links.is_empty() {
        session.append(store, &rows, &links)?;
    }
    journal::clear(paths).map_err(io)?;
    Ok(links.len())
}

/// Builds a write's event inside its transaction (the store calls [`WriteAudit::record`]).
pub struct TxAudit {
    template: AuditRecord,
    source: Source,
    cipher: Arc<Cipher>,
    /// The chain that will link the event (its owner, should this node not come back).
    chain: Arc<AtomicI64>,
    /// The last record built (a retried transaction builds again): its id, canonical bytes and
    /// search row.
    sealed: Option<Pending>,
    enabled: bool,
    /// The writing client's grant (see `WriteAudit::owner`).
    owner: Option<String>,
}

impl TxAudit {
    /// The grant of the client writing, for a Subscription it writes.
    pub fn with_owner(mut self, owner: Option<String>) -> TxAudit {
        self.owner = owner;
        self
    }

    /// The resource type the write touched, if one.
    pub fn resource_type(&self) -> Option<&str> {
        self.template.resource_type.as_deref()
    }

    /// The event as recorded, once the write ran (for the request's own bookkeeping).
    pub fn record_built(&self) -> bool {
        self.sealed.is_some() || !self.enabled
    }
}

impl WriteAudit for TxAudit {
    fn owner(&self) -> Option<String> {
        self.owner.clone()
    }

    fn record(&mut self, facts: &WriteFacts<'_>) -> Result<AuditRow, StoreError> {
        let mut r = self.template.clone();
        r.id = uuid::Uuid::now_v7().to_string();
        r.recorded = crate::store::now();
        r.entities = vec![match facts.version_id {
            Some(v) => format!("{}/{}/_history/{v}", facts.resource_type, facts.id),
            None => format!("{}/{}", facts.resource_type, facts.id),
        }];
        r.patients = facts.patients.iter().cloned().collect();
        r.outcome = Outcome::Success;
        r.outcome_desc = match facts.effect {
            WriteEffect::Matched => Some("conditional create matched an existing resource".into()),
            WriteEffect::Nothing => Some("nothing to delete".into()),
            _ => None,
        };
        if facts.effect == WriteEffect::Created && r.action == Action::Update {
            r.action = Action::Create;
        }
        let (mut row, canonical) = r.seal(&self.source, &self.cipher).map_err(|_| StoreError::AuditSeal)?;
        row.chain_id = self.chain.load(Ordering::Relaxed);
        self.sealed = self.enabled.then(|| Pending {
            event_id: row.id.clone(),
            canonical,
            search: row.search_row(),
        });
        Ok(row)
    }

    fn enabled(&self) -> bool {
        self.enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor answers only once the batch is in its file: sealed, so the file holds no
    /// plaintext of the event (the bench's floor pays for the same sealing the ledger does).
    #[test]
    fn the_durability_floor_acknowledges_events_written_sealed() {
        let dir = std::env::temp_dir().join(format!("fhirvault-floor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = vec![dir.join("a.bin"), dir.join("b.bin")];
        let source = Source {
            site: "test".into(),
            observer: "fhirvault".into(),
        };
        let floor = Auditor::durability_floor(Arc::new(crate::crypto::test_cipher()), source, &paths).unwrap();
        let mut ids = Vec::new();
        for _ in 0..5 {
            let mut r = AuditRecord::new(
                Kind::Rest("read"),
                Action::Read,
                Agent {
                    user: Some("Practitioner/Sentinel7".into()),
                    ..Default::default()
                },
            );
            r.entities.push("Patient/Sentinel8".into());
            floor.record_blocking(&r).unwrap();
            ids.push(r.id.clone());
        }
        floor.flush_blocking().unwrap();
        assert_eq!(floor.stats().events.load(Ordering::Relaxed), 5);
        floor.shutdown();
        let written: Vec<u8> = paths.iter().flat_map(|p| std::fs::read(p).unwrap()).collect();
        let text = String::from_utf8_lossy(&written);
        for id in &ids {
            assert!(text.contains(id.as_str()), "every event reached a file");
        }
        assert!(!text.contains("Sentinel"), "only sealed content is written");
        assert!(
            written.len() > 5 * 500,
            "the sealed events themselves, not only their ids"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
