//! `fhirvault audit verify`: walks the chain in order and checks, for every record, that its
//! content decrypts (it is authentic and belongs to that row), that its search columns match
//! the content, that its hash is SHA-256(prev_hash || content) and that prev_hash is the hash
//! of the record before; then that every signed checkpoint (in the database and in the file
//! outside it) is validly signed and matches the chain, and that no stored event is missing
//! from the chain. It names the first record that fails, and what happened to it.

use super::checkpoint::{signature_valid, CheckpointFile};
use super::event::columns_of;
use super::link_hash;
use crate::crypto::{Aad, Cipher};
use crate::store::audit::{ChainLink, Checkpoint, StoredAuditEvent, AUDIT_TABLE, GENESIS_HASH};
use crate::store::Store;
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeSet, HashMap};

use super::AuditError;

/// What was found wrong, at which record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The record's content, columns or hash do not match what was chained.
    Edited { seq: i64, detail: &'static str },
    /// Records are missing from the chain starting at `seq`.
    Deleted { seq: i64, detail: &'static str },
    /// A record was put into the chain that does not belong there.
    Inserted { seq: i64 },
    /// A record sits at another position than the one it was chained at.
    Reordered { seq: i64 },
    /// The chain ends before a signed checkpoint: records after `last_seq` were removed.
    Truncated { last_seq: i64, checkpoint_seq: i64 },
    /// The chain does not reach the checkpoint's hash at its seq: it was rewritten up to there.
    Rewritten { checkpoint_seq: i64 },
    /// A checkpoint's signature is invalid, or a checkpoint in the file is missing from the database.
    BadCheckpoint { seq: i64, detail: &'static str },
    /// A stored event is not in the chain (it was added outside the ledger).
    Unchained { event_id: String },
}

impl Finding {
    /// The position the finding concerns, for picking the first.
    fn seq(&self) -> i64 {
        match self {
            Finding::Edited { seq, .. }
            | Finding::Deleted { seq, .. }
            | Finding::Inserted { seq }
            | Finding::Reordered { seq }
            | Finding::BadCheckpoint { seq, .. } => *seq,
            Finding::Truncated { last_seq, .. } => last_seq + 1,
            Finding::Rewritten { checkpoint_seq } => *checkpoint_seq,
            Finding::Unchained { .. } => i64::MAX,
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Edited { seq, detail } => write!(f, "record {seq} was edited: {detail}"),
            Finding::Deleted { seq, detail } => write!(f, "record {seq} was deleted: {detail}"),
            Finding::Inserted { seq } => write!(f, "record {seq} was inserted: it does not link to the record before"),
            Finding::Reordered { seq } => write!(f, "record {seq} was reordered: it links to a record that follows it"),
            Finding::Truncated { last_seq, checkpoint_seq } => write!(
                f,
                "the chain was truncated after record {last_seq}: a signed checkpoint names record {checkpoint_seq}"
            ),
            Finding::Rewritten { checkpoint_seq } => write!(
                f,
                "record {checkpoint_seq} does not have the hash its signed checkpoint records: the chain was rewritten up to it"
            ),
            Finding::BadCheckpoint { seq, detail } => write!(f, "checkpoint at record {seq}: {detail}"),
            Finding::Unchained { event_id } => {
                write!(f, "audit event {event_id} was inserted outside the chain")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records checked.
    pub checked: u64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub checkpoints: usize,
    /// The first problem, if any.
    pub finding: Option<Finding>,
}

const PAGE: i64 = 2000;

/// Events stored by a write transaction are linked by the writer right after; only older
/// unlinked events are a finding.
const UNLINKED_GRACE_SECS: i64 = 300;

pub fn verify(
    store: &Store,
    cipher: &Cipher,
    key: &VerifyingKey,
    file: &CheckpointFile,
    from: Option<i64>,
    to: Option<i64>,
    mut progress: impl FnMut(u64),
) -> Result<Report, AuditError> {
    let archived = store.audit_archive_runs()?;
    let (archived_seq, archived_hash) = archived
        .last()
        .map(|a| (a.up_to_seq, a.last_hash.clone()))
        .unwrap_or((0, GENESIS_HASH.to_vec()));
    let start = from.unwrap_or(1).max(archived_seq + 1);
    // the hash the first checked record must link to
    let mut prev: Vec<u8> = if start == archived_seq + 1 {
        archived_hash
    } else {
        match store.audit_chain_page(start - 2, Some(start - 1), 1)?.pop() {
            Some(l) if l.seq == start - 1 => l.hash,
            _ => {
                return Ok(Report {
                    checked: 0,
                    first_seq: start,
                    last_seq: start - 1,
                    checkpoints: 0,
                    finding: Some(Finding::Deleted {
                        seq: start - 1,
                        detail: "the record before the range is missing",
                    }),
                })
            }
        }
    };
    let mut expected = start;
    // the prev_hash of the record before: an inserted record links to it too
    let mut prev_prev: Option<Vec<u8>> = None;
    let mut checked = 0u64;
    let mut finding: Option<Finding> = None;
    // hash of every record seen, for telling a reordering from an insertion
    let mut seen_hashes: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut links: Vec<ChainLink> = store.audit_chain_page(start - 1, to, PAGE)?;
    let mut idx = 0;
    let mut last_seq = start - 1;
    'walk: while idx < links.len() {
        // load this page's events
        let ids: Vec<String> = links[idx..].iter().map(|l| l.event_id.clone()).collect();
        let (events, entity_rows) = store.audit_events_by_id(&ids)?;
        let events: HashMap<String, StoredAuditEvent> = events.into_iter().map(|e| (e.id.clone(), e)).collect();
        let mut entities: HashMap<String, BTreeSet<(String, String)>> = HashMap::new();
        for (id, role, reference) in entity_rows {
            entities.entry(id).or_default().insert((role, reference));
        }
        while idx < links.len() {
            let link = links[idx].clone();
            if link.seq != expected {
                finding = Some(Finding::Deleted {
                    seq: expected,
                    detail: "its sequence number is missing from the chain",
                });
                break 'walk;
            }
            let Some(ev) = events.get(&link.event_id) else {
                finding = Some(Finding::Deleted {
                    seq: link.seq,
                    detail: "its event row is gone while its chain link remains",
                });
                break 'walk;
            };
            let next_links_to_prev = || -> Result<bool, AuditError> {
                Ok(store
                    .audit_chain_page(link.seq, to, 1)?
                    .first()
                    .is_some_and(|n| n.prev_hash == prev))
            };
            if let Some(detail) = check_event(cipher, ev, entities.get(&ev.id), &link) {
                // a record the chain continues around was put there, not edited
                finding = Some(if link.prev_hash != prev && next_links_to_prev()? {
                    Finding::Inserted { seq: link.seq }
                } else {
                    Finding::Edited { seq: link.seq, detail }
                });
                break 'walk;
            }
            if link.prev_hash != prev {
                // Look ahead to tell what happened.
                let rest = store.audit_chain_page(link.seq, to, i64::MAX)?;
                let links_elsewhere =
                    rest.iter().any(|l| l.hash == link.prev_hash) || seen_hashes.contains_key(&link.prev_hash);
                finding = Some(if prev_prev.as_ref() == Some(&link.prev_hash) {
                    // it links past the record before it, which was therefore put in between
                    Finding::Inserted { seq: link.seq - 1 }
                } else if links_elsewhere {
                    Finding::Reordered { seq: link.seq }
                } else if rest.first().is_some_and(|n| n.prev_hash == prev) {
                    Finding::Inserted { seq: link.seq }
                } else {
                    Finding::Edited {
                        seq: link.seq - 1,
                        detail: "its content and hash were replaced (the next record still links to the original), \
                                 or a record after it was removed and the rest renumbered",
                    }
                });
                break 'walk;
            }
            seen_hashes.insert(link.hash.clone(), link.seq);
            prev_prev = Some(link.prev_hash.clone());
            prev = link.hash.clone();
            last_seq = link.seq;
            expected += 1;
            checked += 1;
            idx += 1;
            if checked % 10_000 == 0 {
                progress(checked);
            }
        }
        links = store.audit_chain_page(last_seq, to, PAGE)?;
        idx = 0;
    }
    progress(checked);
    let mut findings: Vec<Finding> = finding.into_iter().collect();
    // checkpoints: from the database and from the file outside it
    let db_cps = store.audit_checkpoints()?;
    let file_cps = file.read().map_err(AuditError::Io)?;
    let db_by_seq: HashMap<i64, &Checkpoint> = db_cps.iter().map(|c| (c.seq, c)).collect();
    let head_seq = store.audit_chain_head()?.seq;
    let mut all: Vec<&Checkpoint> = db_cps.iter().chain(file_cps.iter()).collect();
    all.sort_by_key(|c| c.seq);
    for cp in &all {
        if cp.seq <= archived_seq {
            continue;
        }
        if !signature_valid(key, cp) {
            findings.push(Finding::BadCheckpoint {
                seq: cp.seq,
                detail: "its signature is invalid",
            });
            continue;
        }
        if cp.seq > head_seq {
            findings.push(Finding::Truncated {
                last_seq: head_seq,
                checkpoint_seq: cp.seq,
            });
            continue;
        }
        if !db_by_seq.contains_key(&cp.seq) {
            findings.push(Finding::BadCheckpoint {
                seq: cp.seq,
                detail: "it is in the checkpoint file but was removed from the database",
            });
        }
        if to.is_some_and(|t| cp.seq > t) || cp.seq < start {
            continue;
        }
        match store.audit_chain_page(cp.seq - 1, Some(cp.seq), 1)?.pop() {
            Some(l) if l.hash == cp.hash => {}
            Some(_) => findings.push(Finding::Rewritten { checkpoint_seq: cp.seq }),
            None => findings.push(Finding::Deleted {
                seq: cp.seq,
                detail: "a signed checkpoint names it",
            }),
        }
    }
    // events outside the chain (older than the writer's grace period)
    if from.is_none() && to.is_none() {
        let cutoff = crate::store::now() - chrono::Duration::seconds(UNLINKED_GRACE_SECS);
        if let Some(ev) = store
            .unchained_audit_events(1000)?
            .into_iter()
            .find(|e| e.recorded < cutoff || !decrypts(cipher, e))
        {
            findings.push(Finding::Unchained { event_id: ev.id });
        }
    }
    let finding = findings.into_iter().min_by_key(Finding::seq);
    Ok(Report {
        checked,
        first_seq: start,
        last_seq,
        checkpoints: all.len(),
        finding,
    })
}

fn decrypts(cipher: &Cipher, ev: &StoredAuditEvent) -> bool {
    cipher.open(&aad(&ev.id), &ev.content.0).is_ok()
}

fn aad(id: &str) -> Aad<'_> {
    Aad {
        table: AUDIT_TABLE,
        resource_type: "AuditEvent",
        logical_id: id,
        version_id: 1,
    }
}

/// Why a record's stored row does not match its chain link, if it does not.
fn check_event(
    cipher: &Cipher,
    ev: &StoredAuditEvent,
    entities: Option<&BTreeSet<(String, String)>>,
    link: &ChainLink,
) -> Option<&'static str> {
    let Ok(plain) = cipher.open(&aad(&ev.id), &ev.content.0) else {
        return Some("its content does not decrypt for its row (replaced or altered)");
    };
    if link_hash(&link.prev_hash, &plain).as_slice() != link.hash.as_slice() {
        return Some("its content does not match its hash");
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&plain) else {
        return Some("its content is not an AuditEvent");
    };
    if value.get("id").and_then(|v| v.as_str()) != Some(ev.id.as_str()) {
        return Some("its content belongs to another event");
    }
    let Some(c) = columns_of(&value) else {
        return Some("its content is not an AuditEvent");
    };
    let recorded = value.get("recorded").and_then(|v| v.as_str()).unwrap_or("");
    let stored_recorded = ev.recorded.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    if c.type_code != ev.type_code
        || c.subtype != ev.subtype
        || c.action != ev.action
        || c.outcome != ev.outcome
        || c.agent != ev.agent
        || recorded != stored_recorded
    {
        return Some("its search columns differ from its content");
    }
    let empty = BTreeSet::new();
    if &c.references != entities.unwrap_or(&empty) {
        return Some("its entity rows differ from its content");
    }
    None
}
