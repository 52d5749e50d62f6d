//! The deriver: one thread per process that turns chained events into the rows AuditEvent
//! search filters on (`audit_search`, `audit_entities`), off the request path.
//!
//! * This node's chain: the writer hands over each committed batch's search rows (no
//!   decryption needed); they are stored in `seq` order within [`INTERVAL`], together with the
//!   chain's derived position. Whatever it did not receive (a restart, a crash) is derived from
//!   the durable rows, decrypting them.
//! * Other chains: every [`SWEEP`], chains whose node is gone (nobody holds their claim) and
//!   that left events unlinked or underived are taken for a moment: their leftover events are
//!   linked into them and their search rows derived, so a node that never comes back leaves a
//!   chain that verifies and a log that search sees whole.

use super::event::columns_of;
use super::journal::Batch;
use super::writer::{append_linked, Pending};
use super::AuditError;
use crate::crypto::Cipher;
use crate::store::audit::{event_aad, AuditSession, SearchRow, StoredAuditEvent};
use crate::store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long derived rows wait to be stored with others: search sees an event within a second
/// of its commit (and at once on the node that recorded it). Measured at c32 on SQLite
/// (benches/audit.rs): 200 ms in 256-row transactions held the ledger at 0.51 of the floor,
/// 500 ms in 2000-row transactions at 0.68 (each index page is written once for many rows).
const INTERVAL: Duration = Duration::from_millis(500);
/// SQLite (journal): batches are moved and derived this often. A single node, whose every
/// AuditEvent search and read waits for its own events first: the interval only sets how
/// many rows share a transaction (and its index pages), not what search sees.
const JOURNAL_INTERVAL: Duration = Duration::from_millis(1000);
/// How often other nodes' chains are looked after.
const SWEEP: Duration = Duration::from_secs(10);
/// Events of another node's chain younger than this are left to that node.
const ADOPT_AFTER: chrono::Duration = chrono::Duration::seconds(5);
/// Rows stored per transaction (SQLite's one writer, the ledger's too, waits while it commits).
const BATCH: usize = 2000;

pub(super) enum Derived {
    /// A batch the writer committed to `chain`: `(seq, search row)` in order; on SQLite the
    /// batch itself too, journaled, to move into the database first.
    Appended {
        chain: i64,
        rows: Vec<(i64, SearchRow)>,
        to_move: Option<Batch>,
    },
    /// Answer once everything handed over before is stored.
    Sync(oneshot::Sender<Result<(), AuditError>>),
}

pub(super) struct Deriver {
    pub store: Arc<Store>,
    pub cipher: Arc<Cipher>,
    pub chain: Arc<AtomicI64>,
    /// A session of its own, to take other nodes' chains for a moment.
    pub session: AuditSession,
    /// Where derived rows are stored (commits that do not wait for the disk).
    pub rows_session: AuditSession,
    /// Rows received and not stored yet, by chain and seq.
    pub pending: HashMap<i64, BTreeMap<i64, SearchRow>>,
    /// Each chain's derived position as last stored or read.
    pub positions: HashMap<i64, i64>,
    pub last_sweep: Option<Instant>,
    /// Chains of nodes that are gone whose leftovers were all taken care of: skipped until
    /// their claim is seen held again (their node came back, and may die again).
    pub settled: std::collections::HashSet<i64>,
    /// SQLite: journaled batches not moved into the database yet, in seq order.
    pub to_move: Vec<Batch>,
    /// SQLite: where the last seq moved is published (the writer empties journal segments
    /// up to it); `None` on PostgreSQL.
    pub moved: Option<Arc<AtomicI64>>,
    /// Set while moving fails (the database refuses the events): the writer fails closed.
    pub move_failing: Arc<std::sync::atomic::AtomicBool>,
    /// SQLite: the session batches are moved with (commits that wait for the disk: the
    /// journal may be emptied once they are done).
    pub move_session: AuditSession,
    /// SQLite: checkpoints are signed here, after the batches they cover were moved.
    pub checkpointer: Option<super::writer::Checkpointer>,
}

impl Deriver {
    pub(super) fn run(mut self, rx: Receiver<Derived>) {
        loop {
            let mut syncs = Vec::new();
            let mut open = true;
            let deadline = Instant::now()
                + if self.moved.is_some() {
                    JOURNAL_INTERVAL
                } else {
                    INTERVAL
                };
            // gather for one interval, or until someone waits for it
            while syncs.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(msg) => self.take(msg, &mut syncs),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            while let Ok(msg) = rx.try_recv() {
                self.take(msg, &mut syncs);
            }
            let result = self.store_pending();
            if let Err(e) = &result {
                tracing::error!(error = %e, "audit search rows could not be derived; trying again");
            }
            for s in syncs {
                let _ = s.send(result.as_ref().map(|_| ()).map_err(|_| AuditError::Unavailable));
            }
            if !open {
                if let Some(cp) = &mut self.checkpointer {
                    cp.sign_if_due(&self.store, &mut self.move_session, true);
                }
                return;
            }
            if self.last_sweep.is_none_or(|t| t.elapsed() >= SWEEP) {
                self.last_sweep = Some(Instant::now());
                if let Err(e) = self.sweep() {
                    tracing::warn!(error = %e, "looking after other nodes' audit chains failed");
                }
            }
        }
    }

    fn take(&mut self, msg: Derived, syncs: &mut Vec<oneshot::Sender<Result<(), AuditError>>>) {
        match msg {
            Derived::Appended { chain, rows, to_move } => {
                self.to_move.extend(to_move);
                self.pending.entry(chain).or_default().extend(rows)
            }
            Derived::Sync(s) => syncs.push(s),
        }
    }

    /// SQLite: moves journaled batches into the database, in one durable transaction per
    /// [`BATCH`] events or so, and publishes how far the database now holds this chain.
    fn move_journaled(&mut self) -> Result<(), AuditError> {
        while !self.to_move.is_empty() {
            let mut rows = Vec::new();
            let mut links = Vec::new();
            let mut taken = 0;
            for b in &self.to_move {
                if !links.is_empty() && links.len() + b.links.len() > BATCH {
                    break;
                }
                rows.extend(b.rows.iter().cloned());
                links.extend(b.links.iter().cloned());
                taken += 1;
            }
            if let Err(e) = self.move_session.append(&self.store, &rows, &links) {
                // the writer refuses new events until the database takes these (fail closed)
                self.move_failing.store(true, Ordering::Release);
                return Err(e.into());
            }
            self.move_failing.store(false, Ordering::Release);
            let last: Option<i64> = links.last().map(|l: &crate::store::audit::ChainLink| l.seq);
            self.to_move.drain(..taken);
            if let (Some(moved), Some(seq)) = (&self.moved, last) {
                moved.store(seq, Ordering::Release);
            }
            if let Some(cp) = &mut self.checkpointer {
                cp.since += links.len() as u64;
            }
        }
        if let Some(cp) = &mut self.checkpointer {
            cp.sign_if_due(&self.store, &mut self.move_session, false);
        }
        Ok(())
    }

    /// Stores what was handed over, chain by chain; gaps are derived from the database.
    fn store_pending(&mut self) -> Result<(), AuditError> {
        // journaled events reach the database before their search rows
        self.move_journaled()?;
        let mut chains: Vec<i64> = self.pending.keys().copied().collect();
        let own = self.chain.load(Ordering::Relaxed);
        if !chains.contains(&own) {
            chains.push(own);
        }
        for chain in chains {
            if chain == own && !self.positions.contains_key(&chain) {
                // first pass of a (re)started node: its own gap, up to the chain's head, at
                // once rather than when its next events arrive
                let head = self.session.head(&self.store, chain)?.seq;
                self.derive(chain, Some(head))?;
            } else if self.pending.get(&chain).is_some_and(|p| !p.is_empty()) || !self.positions.contains_key(&chain) {
                self.derive(chain, None)?;
            }
        }
        Ok(())
    }

    /// Derives `chain` up to what was handed over (and, with `up_to`, up to there from the
    /// database).
    fn derive(&mut self, chain: i64, up_to: Option<i64>) -> Result<(), AuditError> {
        loop {
            let from = match self.positions.get(&chain) {
                Some(p) => *p,
                None => self.store.audit_indexed_seq(chain)?,
            };
            self.positions.insert(chain, from);
            let pending = self.pending.entry(chain).or_default();
            // what is stored already was derived by someone
            while pending.first_key_value().is_some_and(|(s, _)| *s <= from) {
                pending.pop_first();
            }
            let target = up_to.unwrap_or(0).max(pending.last_key_value().map_or(0, |(s, _)| *s));
            if target <= from {
                return Ok(());
            }
            let mut rows = Vec::new();
            let mut to = from;
            while rows.len() < BATCH {
                match pending.remove(&(to + 1)) {
                    Some(r) => {
                        rows.push(r);
                        to += 1;
                    }
                    None => break,
                }
            }
            if rows.is_empty() {
                // not handed over: derive from the durable rows
                for (link, event) in self.store.audit_links_with_events(chain, from, BATCH as i64)? {
                    match event.as_ref().and_then(|e| search_row_of(&self.cipher, e)) {
                        Some(r) => rows.push(r),
                        // a link without a readable event: `audit verify` reports it; nothing to derive
                        None => tracing::error!(chain, seq = link.seq, "an audit link has no readable event"),
                    }
                    to = link.seq;
                }
                if to == from {
                    return Ok(());
                }
            }
            if !self.rows_session.index_batch(&self.store, chain, from, to, &rows)? {
                // another process derived this chain meanwhile: read its position again
                self.positions.remove(&chain);
                continue;
            }
            self.positions.insert(chain, to);
        }
    }

    /// Takes other nodes' chains that nobody holds and that have leftovers: links their
    /// unlinked events (older than [`ADOPT_AFTER`]) and derives their search rows.
    fn sweep(&mut self) -> Result<(), AuditError> {
        let own = self.chain.load(Ordering::Relaxed);
        let cutoff = crate::store::now() - ADOPT_AFTER;
        for chain in self.store.audit_chains()? {
            if chain.id == own {
                continue;
            }
            // a live node holds its chain: one cheap lock attempt, nothing else, per sweep
            if !self.session.try_hold(&self.store, chain.id)? {
                self.settled.remove(&chain.id);
                continue;
            }
            let result = if self.settled.contains(&chain.id) {
                Ok(())
            } else {
                self.adopt(chain.id, cutoff)
            };
            self.session.release(&self.store, chain.id);
            result?;
            // leftovers younger than the cut-off are taken at the next sweep
            if self.store.unchained_audit_events(Some(chain.id), None, 1)?.is_empty() {
                self.settled.insert(chain.id);
            }
        }
        Ok(())
    }

    /// Links `chain`'s leftover events recorded before `cutoff` and derives its search rows
    /// (the caller holds the chain).
    fn adopt(&mut self, chain: i64, cutoff: chrono::NaiveDateTime) -> Result<(), AuditError> {
        loop {
            let mut order = unlinked(&self.store, &self.cipher, chain, Some(cutoff))?;
            if order.is_empty() {
                break;
            }
            tracing::warn!(chain, events = order.len(), "linking events another node left unlinked");
            let head = self.session.head(&self.store, chain)?;
            append_linked(&self.store, &mut self.session, chain, &head, &mut [], &mut order)?;
        }
        let head = self.session.head(&self.store, chain)?;
        self.positions.remove(&chain);
        self.derive(chain, Some(head.seq))
    }
}

/// `chain`'s stored events that no link names (recorded before `before`, if given), oldest
/// first, ready to link: their bytes as hashed and their search rows. Rows that do not decrypt
/// are not ours to chain: `audit verify` reports them as inserted.
pub(super) fn unlinked(
    store: &Store,
    cipher: &Cipher,
    chain: i64,
    before: Option<chrono::NaiveDateTime>,
) -> Result<Vec<Pending>, AuditError> {
    let mut out = Vec::new();
    for ev in store.unchained_audit_events(Some(chain), before, 10_000)? {
        match open(cipher, &ev) {
            Some((canonical, search)) => out.push(Pending {
                event_id: ev.id,
                canonical,
                search,
            }),
            None => tracing::error!("an unlinked audit row does not decrypt; left for audit verify"),
        }
    }
    Ok(out)
}

/// An event's canonical bytes and search row, if its content opens and is an AuditEvent.
fn open(cipher: &Cipher, ev: &StoredAuditEvent) -> Option<(Vec<u8>, SearchRow)> {
    let plain = cipher.open(&event_aad(&ev.id), &ev.content.0).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&plain).ok()?;
    let search = search_row_from(&value, ev, cipher)?;
    Some((plain, search))
}

fn search_row_of(cipher: &Cipher, ev: &StoredAuditEvent) -> Option<SearchRow> {
    open(cipher, ev).map(|(_, s)| s)
}

/// The search row an event's content implies.
pub(super) fn search_row_from(value: &serde_json::Value, ev: &StoredAuditEvent, cipher: &Cipher) -> Option<SearchRow> {
    let c = columns_of(value, cipher)?;
    Some(SearchRow {
        event_id: ev.id.clone(),
        recorded: ev.recorded,
        type_code: c.type_code,
        subtype: c.subtype,
        action: c.action,
        outcome: c.outcome,
        agent: c.agent,
        site: c.site,
        address: c.address,
        references: c.references,
    })
}
