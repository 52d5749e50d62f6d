//! `fhirvault audit verify`: walks every chain in order and checks, for every record, that its
//! content decrypts (it is authentic and belongs to that row), that its hash is
//! SHA-256(prev_hash || content) and that prev_hash is the hash of the record before, and,
//! where its search rows have been derived, that they match the content; then that every
//! signed checkpoint (in the database and in the files outside it) is validly signed and that
//! every chain it names still reaches the head it names (so a truncated or dropped chain is
//! caught), and that no stored event is missing from the chains. It names the first record of
//! each chain that fails, and what happened to it.

use super::checkpoint::{parse_heads, signature_valid, CheckpointFile};
use super::event::columns_of;
use super::link_hash;
use crate::crypto::Cipher;
use crate::store::audit::{event_aad, ChainLink, Checkpoint, SearchRow, StoredAuditEvent, GENESIS_HASH};
use crate::store::Store;
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::AuditError;

/// What was found wrong, at which record of which chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The record's content, search rows or hash do not match what was chained.
    Edited { chain: i64, seq: i64, detail: &'static str },
    /// Records are missing from the chain starting at `seq`.
    Deleted { chain: i64, seq: i64, detail: &'static str },
    /// A record was put into the chain that does not belong there.
    Inserted { chain: i64, seq: i64 },
    /// A record sits at another position than the one it was chained at.
    Reordered { chain: i64, seq: i64 },
    /// The chain ends before a signed checkpoint: records after `last_seq` were removed.
    Truncated {
        chain: i64,
        last_seq: i64,
        checkpoint_seq: i64,
    },
    /// A signed checkpoint names a chain that is gone altogether (its node's whole ledger).
    Dropped { chain: i64, checkpoint_seq: i64 },
    /// The chain does not reach the checkpoint's hash at its seq: it was rewritten up to there.
    Rewritten { chain: i64, checkpoint_seq: i64 },
    /// Links of a chain that was never registered.
    UnknownChain { chain: i64 },
    /// A checkpoint's signature is invalid, or a checkpoint in a file is missing from the database.
    BadCheckpoint { id: String, detail: &'static str },
    /// A stored event is not in any chain (it was added outside the ledger).
    Unchained { event_id: String },
}

impl Finding {
    /// The position the finding concerns, for picking the first: by chain, then seq.
    fn position(&self) -> (i64, i64) {
        match self {
            Finding::Edited { chain, seq, .. }
            | Finding::Deleted { chain, seq, .. }
            | Finding::Inserted { chain, seq }
            | Finding::Reordered { chain, seq } => (*chain, *seq),
            Finding::Truncated { chain, last_seq, .. } => (*chain, last_seq + 1),
            Finding::Dropped { chain, .. } | Finding::UnknownChain { chain } => (*chain, 0),
            Finding::Rewritten { chain, checkpoint_seq } => (*chain, *checkpoint_seq),
            Finding::BadCheckpoint { .. } => (i64::MAX - 1, 0),
            Finding::Unchained { .. } => (i64::MAX, 0),
        }
    }

    /// Among findings at one position, the one naming the furthest checkpoint comes first.
    fn order_key(&self) -> ((i64, i64), std::cmp::Reverse<i64>) {
        let named = match self {
            Finding::Truncated { checkpoint_seq, .. } | Finding::Dropped { checkpoint_seq, .. } => *checkpoint_seq,
            _ => 0,
        };
        (self.position(), std::cmp::Reverse(named))
    }

    /// The chain concerned, if one.
    pub fn chain(&self) -> Option<i64> {
        let (c, _) = self.position();
        (c < i64::MAX - 1).then_some(c)
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Edited { chain, seq, detail } => write!(f, "chain {chain} record {seq} was edited: {detail}"),
            Finding::Deleted { chain, seq, detail } => write!(f, "chain {chain} record {seq} was deleted: {detail}"),
            Finding::Inserted { chain, seq } => write!(
                f,
                "chain {chain} record {seq} was inserted: it does not link to the record before"
            ),
            Finding::Reordered { chain, seq } => write!(
                f,
                "chain {chain} record {seq} was reordered: it links to a record that follows it"
            ),
            Finding::Truncated {
                chain,
                last_seq,
                checkpoint_seq,
            } => write!(
                f,
                "chain {chain} was truncated after record {last_seq}: a signed checkpoint names record {checkpoint_seq}"
            ),
            Finding::Dropped { chain, checkpoint_seq } => write!(
                f,
                "chain {chain} was dropped: a signed checkpoint names its record {checkpoint_seq}, and the chain is gone"
            ),
            Finding::Rewritten { chain, checkpoint_seq } => write!(
                f,
                "chain {chain} record {checkpoint_seq} does not have the hash its signed checkpoint records: \
                 the chain was rewritten up to it"
            ),
            Finding::UnknownChain { chain } => write!(f, "chain {chain} has links but was never registered"),
            Finding::BadCheckpoint { id, detail } => write!(f, "checkpoint {id}: {detail}"),
            Finding::Unchained { event_id } => {
                write!(f, "audit event {event_id} was inserted outside the chains")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records checked, over all chains.
    pub checked: u64,
    /// Chains walked.
    pub chains: usize,
    pub checkpoints: usize,
    /// The first problem, if any (the lowest chain's first).
    pub finding: Option<Finding>,
    /// The first problem of each chain, then those of checkpoints and unchained events.
    pub findings: Vec<Finding>,
}

const PAGE: i64 = 2000;

/// Events stored by a write transaction are linked by the writer right after (or, if its node
/// is gone, by another node within seconds); only older unlinked events are a finding.
const UNLINKED_GRACE_SECS: i64 = 300;

/// Verifies every chain (only records with `seq` in `[from, to]` of each, when given), every
/// checkpoint in the database and in `files`, and that no event sits outside the chains.
pub fn verify(
    store: &Store,
    cipher: &Cipher,
    key: &VerifyingKey,
    files: &[CheckpointFile],
    from: Option<i64>,
    to: Option<i64>,
    mut progress: impl FnMut(u64),
) -> Result<Report, AuditError> {
    let registered: BTreeSet<i64> = store.audit_chains()?.into_iter().map(|c| c.id).collect();
    let linked: BTreeSet<i64> = store.audit_linked_chain_ids()?.into_iter().collect();
    let archived: BTreeMap<i64, (i64, Vec<u8>)> = store
        .audit_archive_runs()?
        .into_iter()
        .map(|a| (a.chain_id, (a.up_to_seq, a.last_hash)))
        .collect();
    let mut findings = Vec::new();
    let mut checked = 0u64;
    for chain in linked.difference(&registered) {
        findings.push(Finding::UnknownChain { chain: *chain });
    }
    for &chain in registered.iter().chain(linked.difference(&registered)) {
        let walk = Walk {
            store,
            cipher,
            chain,
            indexed: store.audit_indexed_seq(chain)?,
            to,
        };
        let (n, finding) = walk.run(archived.get(&chain), from, &mut |n| progress(checked + n))?;
        checked += n;
        findings.extend(finding);
    }
    progress(checked);
    // checkpoints: from the database and from the files outside it
    let db_cps = store.audit_checkpoints()?;
    let db_ids: BTreeSet<&str> = db_cps.iter().map(|c| c.id.as_str()).collect();
    let mut file_cps = Vec::new();
    for file in files {
        file_cps.extend(file.read().map_err(AuditError::Io)?);
    }
    let mut all: Vec<&Checkpoint> = db_cps.iter().chain(file_cps.iter()).collect();
    all.sort_by(|a, b| (a.signed_at, &a.id).cmp(&(b.signed_at, &b.id)));
    all.dedup_by(|a, b| a.id == b.id && a.signature == b.signature);
    // an archive run removes the checkpoints signed before its cut-off from the database
    // (their files keep them)
    let archived_before = store.audit_archive_runs()?.iter().map(|a| a.cutoff).max();
    all.retain(|cp| db_ids.contains(cp.id.as_str()) || archived_before.is_none_or(|c| cp.signed_at >= c));
    let mut heads: HashMap<i64, i64> = HashMap::new();
    for cp in &all {
        findings.extend(check_checkpoint(
            store,
            key,
            cp,
            &db_ids,
            &registered,
            &archived,
            to,
            &mut heads,
        )?);
    }
    // events outside the chains (older than the writers' grace period)
    if from.is_none() && to.is_none() {
        let cutoff = crate::store::now() - chrono::Duration::seconds(UNLINKED_GRACE_SECS);
        if let Some(ev) = store
            .unchained_audit_events(None, None, 1000)?
            .into_iter()
            .find(|e| e.recorded < cutoff || !decrypts(cipher, e) || !registered.contains(&e.chain_id))
        {
            findings.push(Finding::Unchained { event_id: ev.id });
        }
    }
    // the first finding of each chain, then the rest in order
    findings.sort_by_key(Finding::order_key);
    let mut seen = BTreeSet::new();
    findings.retain(|f| match f.chain() {
        Some(c) => seen.insert(c),
        None => true,
    });
    Ok(Report {
        checked,
        chains: registered.len(),
        checkpoints: all.len(),
        finding: findings.first().cloned(),
        findings,
    })
}

/// Checks one checkpoint against the chains (`max_seq` caches each chain's last seq).
#[allow(clippy::too_many_arguments)]
fn check_checkpoint(
    store: &Store,
    key: &VerifyingKey,
    cp: &Checkpoint,
    db_ids: &BTreeSet<&str>,
    registered: &BTreeSet<i64>,
    archived: &BTreeMap<i64, (i64, Vec<u8>)>,
    to: Option<i64>,
    max_seq: &mut HashMap<i64, i64>,
) -> Result<Vec<Finding>, AuditError> {
    let bad = |detail| Finding::BadCheckpoint {
        id: cp.id.clone(),
        detail,
    };
    if !signature_valid(key, cp) {
        return Ok(vec![bad("its signature is invalid")]);
    }
    let mut out = Vec::new();
    if !db_ids.contains(cp.id.as_str()) {
        out.push(bad("it is in a checkpoint file but was removed from the database"));
    }
    let Some(heads) = parse_heads(&cp.heads) else {
        return Ok(vec![bad("its heads are not well formed")]);
    };
    for h in heads {
        let archived_seq = archived.get(&h.chain).map_or(0, |a| a.0);
        if h.seq == 0 || h.seq <= archived_seq || to.is_some_and(|t| h.seq > t) {
            continue;
        }
        let last = match max_seq.get(&h.chain) {
            Some(s) => *s,
            None => {
                let s = store.audit_chain_head(h.chain)?.seq;
                max_seq.insert(h.chain, s);
                s
            }
        };
        if last < h.seq {
            out.push(if last == 0 && !registered.contains(&h.chain) {
                Finding::Dropped {
                    chain: h.chain,
                    checkpoint_seq: h.seq,
                }
            } else {
                Finding::Truncated {
                    chain: h.chain,
                    last_seq: last,
                    checkpoint_seq: h.seq,
                }
            });
            continue;
        }
        match store.audit_link_at(h.chain, h.seq)? {
            Some(l) if l.hash == h.hash => {}
            Some(_) => out.push(Finding::Rewritten {
                chain: h.chain,
                checkpoint_seq: h.seq,
            }),
            None => out.push(Finding::Deleted {
                chain: h.chain,
                seq: h.seq,
                detail: "a signed checkpoint names it",
            }),
        }
    }
    Ok(out)
}

/// One chain's walk.
struct Walk<'a> {
    store: &'a Store,
    cipher: &'a Cipher,
    chain: i64,
    /// Records up to here have derived search rows to compare.
    indexed: i64,
    to: Option<i64>,
}

impl Walk<'_> {
    fn page(&self, after: i64, limit: i64) -> Result<Vec<ChainLink>, AuditError> {
        Ok(self.store.audit_chain_page(self.chain, after, self.to, limit)?)
    }

    fn run(
        &self,
        archived: Option<&(i64, Vec<u8>)>,
        from: Option<i64>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(u64, Option<Finding>), AuditError> {
        let chain = self.chain;
        let (archived_seq, archived_hash) = archived.cloned().unwrap_or((0, GENESIS_HASH.to_vec()));
        let start = from.unwrap_or(1).max(archived_seq + 1);
        // the hash the first checked record must link to
        let mut prev: Vec<u8> = if start == archived_seq + 1 {
            archived_hash
        } else {
            match self.store.audit_link_at(chain, start - 1)? {
                Some(l) => l.hash,
                None => {
                    return Ok((
                        0,
                        Some(Finding::Deleted {
                            chain,
                            seq: start - 1,
                            detail: "the record before the range is missing",
                        }),
                    ))
                }
            }
        };
        let mut expected = start;
        // the prev_hash of the record before: an inserted record links to it too
        let mut prev_prev: Option<Vec<u8>> = None;
        let mut checked = 0u64;
        // hash of every record seen, for telling a reordering from an insertion
        let mut seen_hashes: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut links = self.page(start - 1, PAGE)?;
        while !links.is_empty() {
            let ids: Vec<String> = links.iter().map(|l| l.event_id.clone()).collect();
            let (events, entity_rows) = self.store.audit_events_by_id(&ids)?;
            let search_rows = self.store.audit_search_rows_by_id(&ids)?;
            let events: HashMap<String, StoredAuditEvent> = events.into_iter().map(|e| (e.id.clone(), e)).collect();
            let search: HashMap<String, SearchRow> = search_rows.into_iter().map(|r| (r.event_id.clone(), r)).collect();
            let mut entities: HashMap<String, BTreeSet<(String, String)>> = HashMap::new();
            for (id, role, reference) in entity_rows {
                entities.entry(id).or_default().insert((role, reference));
            }
            let mut last_seq = expected - 1;
            for link in &links {
                if link.seq != expected {
                    return Ok((
                        checked,
                        Some(Finding::Deleted {
                            chain,
                            seq: expected,
                            detail: "its sequence number is missing from the chain",
                        }),
                    ));
                }
                let Some(ev) = events.get(&link.event_id) else {
                    return Ok((
                        checked,
                        Some(Finding::Deleted {
                            chain,
                            seq: link.seq,
                            detail: "its event row is gone while its chain link remains",
                        }),
                    ));
                };
                let derived = (link.seq <= self.indexed).then(|| (search.get(&ev.id), entities.get(&ev.id)));
                if let Some(detail) = check_event(self.cipher, ev, derived, link) {
                    // a record the chain continues around was put there, not edited
                    let next_links_to_prev = self.page(link.seq, 1)?.first().is_some_and(|n| n.prev_hash == prev);
                    let finding = if link.prev_hash != prev && next_links_to_prev {
                        Finding::Inserted { chain, seq: link.seq }
                    } else {
                        Finding::Edited {
                            chain,
                            seq: link.seq,
                            detail,
                        }
                    };
                    return Ok((checked, Some(finding)));
                }
                if link.prev_hash != prev {
                    return Ok((
                        checked,
                        Some(self.misplaced(link, &prev, prev_prev.as_ref(), &seen_hashes)?),
                    ));
                }
                seen_hashes.insert(link.hash.clone(), link.seq);
                prev_prev = Some(std::mem::replace(&mut prev, link.hash.clone()));
                last_seq = link.seq;
                expected += 1;
                checked += 1;
                if checked.is_multiple_of(10_000) {
                    progress(checked);
                }
            }
            links = self.page(last_seq, PAGE)?;
        }
        Ok((checked, None))
    }

    /// What happened to a record that does not link to the one before it.
    fn misplaced(
        &self,
        link: &ChainLink,
        prev: &[u8],
        prev_prev: Option<&Vec<u8>>,
        seen_hashes: &HashMap<Vec<u8>, i64>,
    ) -> Result<Finding, AuditError> {
        let chain = self.chain;
        let rest = self.page(link.seq, i64::MAX)?;
        let links_elsewhere =
            rest.iter().any(|l| l.hash == link.prev_hash) || seen_hashes.contains_key(&link.prev_hash);
        Ok(if prev_prev == Some(&link.prev_hash) {
            // it links past the record before it, which was therefore put in between
            Finding::Inserted {
                chain,
                seq: link.seq - 1,
            }
        } else if links_elsewhere {
            Finding::Reordered { chain, seq: link.seq }
        } else if rest.first().is_some_and(|n| n.prev_hash == prev) {
            Finding::Inserted { chain, seq: link.seq }
        } else {
            Finding::Edited {
                chain,
                seq: link.seq - 1,
                detail: "its content and hash were replaced (the next record still links to the original), \
                         or a record after it was removed and the rest renumbered",
            }
        })
    }
}

fn decrypts(cipher: &Cipher, ev: &StoredAuditEvent) -> bool {
    cipher.open(&event_aad(&ev.id), &ev.content.0).is_ok()
}

/// A record's derived rows, as found: its search row and its entity rows.
type DerivedRows<'a> = (Option<&'a SearchRow>, Option<&'a BTreeSet<(String, String)>>);

/// Why a record's stored rows do not match its chain link, if they do not. `derived` holds its
/// search and entity rows where they must exist (the chain was derived past it).
fn check_event(
    cipher: &Cipher,
    ev: &StoredAuditEvent,
    derived: Option<DerivedRows<'_>>,
    link: &ChainLink,
) -> Option<&'static str> {
    let Ok(plain) = cipher.open(&event_aad(&ev.id), &ev.content.0) else {
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
    let Some(c) = columns_of(&value, cipher) else {
        return Some("its content is not an AuditEvent");
    };
    let recorded = value.get("recorded").and_then(|v| v.as_str()).unwrap_or("");
    let stored_recorded = ev.recorded.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    if recorded != stored_recorded {
        return Some("its recorded time differs from its content");
    }
    let (search, entities) = derived?;
    let Some(s) = search else {
        return Some("its search row is missing");
    };
    if c.type_code != s.type_code
        || c.subtype != s.subtype
        || c.action != s.action
        || c.outcome != s.outcome
        || c.agent != s.agent
        || c.site != s.site
        || c.address != s.address
        || s.recorded != ev.recorded
    {
        return Some("its search columns differ from its content");
    }
    let empty = BTreeSet::new();
    if &c.references != entities.unwrap_or(&empty) {
        return Some("its entity rows differ from its content");
    }
    None
}
