//! `fhirvault audit export` and `fhirvault audit archive`: the ledger as NDJSON, chain by chain
//! in chain order, one AuditEvent per line exactly as hashed, plus an extension carrying its
//! chain position (chain, seq, prev_hash, hash) so that external storage can re-verify each
//! chain: remove the extension, serialize with sorted keys and no whitespace, and
//! `hash = SHA-256(prev_hash || bytes)`. Queries stay sealed inside the events, so an export
//! holds no search text in plaintext.

use super::event::canonical_json;
use super::AuditError;
use crate::crypto::Cipher;
use crate::store::audit::{event_aad, ArchiveRun};
use crate::store::Store;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::NaiveDateTime;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The URL of the extension that carries an exported event's chain position.
pub const CHAIN_EXTENSION: &str = "https://fhirvault.dev/StructureDefinition/audit-chain";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub events: u64,
    /// Per chain: the last record written, its hash, and how many were written.
    pub chains: std::collections::BTreeMap<i64, (i64, Vec<u8>, u64)>,
}

/// Writes chained events recorded at or after `since`, every chain's (past its archived
/// prefix), or with `up_to` only each chain's records up to the seq given for it.
pub fn export_ndjson(
    store: &Store,
    cipher: &Cipher,
    since: Option<NaiveDateTime>,
    up_to: Option<&std::collections::BTreeMap<i64, i64>>,
    out: &mut dyn Write,
    mut progress: impl FnMut(u64),
) -> Result<ExportSummary, AuditError> {
    let archived: HashMap<i64, i64> = store
        .audit_archive_runs()?
        .into_iter()
        .map(|a| (a.chain_id, a.up_to_seq))
        .fold(HashMap::new(), |mut m, (c, s)| {
            let e = m.entry(c).or_insert(s);
            *e = (*e).max(s);
            m
        });
    let mut summary = ExportSummary::default();
    let io = |e: std::io::Error| AuditError::Io(e.to_string());
    for chain in store.audit_chains()? {
        let limit = match up_to {
            Some(m) => match m.get(&chain.id) {
                Some(s) => Some(*s),
                None => continue,
            },
            None => None,
        };
        let mut after = archived.get(&chain.id).copied().unwrap_or(0);
        loop {
            let links = store.audit_chain_page(chain.id, after, limit, 2000)?;
            if links.is_empty() {
                break;
            }
            let ids: Vec<String> = links.iter().map(|l| l.event_id.clone()).collect();
            let (events, _) = store.audit_events_by_id(&ids)?;
            let events: HashMap<String, _> = events.into_iter().map(|e| (e.id.clone(), e)).collect();
            for link in &links {
                after = link.seq;
                let ev = events.get(&link.event_id).ok_or(AuditError::Io(format!(
                    "chain {} record {} has no event row: run `fhirvault audit verify`",
                    chain.id, link.seq
                )))?;
                let entry = summary.chains.entry(chain.id).or_default();
                entry.0 = link.seq;
                entry.1 = link.hash.clone();
                if since.is_some_and(|s| ev.recorded < s) {
                    continue;
                }
                let plain = cipher.open(&event_aad(&ev.id), &ev.content.0).map_err(|_| {
                    AuditError::Io(format!(
                        "chain {} record {} does not decrypt: run `fhirvault audit verify`",
                        chain.id, link.seq
                    ))
                })?;
                let mut value: Value = serde_json::from_slice(&plain).map_err(|e| AuditError::Io(e.to_string()))?;
                value["extension"] = json!([{
                    "url": CHAIN_EXTENSION,
                    "extension": [
                        {"url": "chain", "valueString": chain.id.to_string()},
                        {"url": "seq", "valueString": link.seq.to_string()},
                        {"url": "prevHash", "valueBase64Binary": STANDARD.encode(&link.prev_hash)},
                        {"url": "hash", "valueBase64Binary": STANDARD.encode(&link.hash)}
                    ]
                }]);
                let mut line = canonical_json(&value);
                line.push(b'\n');
                out.write_all(&line).map_err(io)?;
                entry.2 += 1;
                summary.events += 1;
                if summary.events % 10_000 == 0 {
                    progress(summary.events);
                }
            }
        }
    }
    out.flush().map_err(io)?;
    progress(summary.events);
    Ok(summary)
}

/// The cut-off of a retention period: events recorded before it may be archived.
pub fn retention_cutoff(retention_days: u64) -> NaiveDateTime {
    crate::store::now() - chrono::Duration::days(retention_days.min(1_000_000) as i64)
}

/// Exports every event recorded before `cutoff` (of each chain, the unbroken run from its
/// start) to `path`, makes the file durable, records one run per chain and only then removes
/// those events. Nothing recorded at or after the cut-off is ever removed. The command line
/// passes [`retention_cutoff`] of the configured retention.
pub fn archive(
    store: &Store,
    cipher: &Cipher,
    cutoff: NaiveDateTime,
    path: &Path,
    progress: impl FnMut(u64),
) -> Result<Option<(Vec<ArchiveRun>, u64)>, AuditError> {
    let now = crate::store::now();
    let mut archived: HashMap<i64, i64> = HashMap::new();
    for run in store.audit_archive_runs()? {
        let e = archived.entry(run.chain_id).or_insert(run.up_to_seq);
        *e = (*e).max(run.up_to_seq);
    }
    let mut up_to = std::collections::BTreeMap::new();
    for chain in store.audit_chains()? {
        let done = archived.get(&chain.id).copied().unwrap_or(0);
        if let Some(s) = store.audit_archivable_up_to(chain.id, cutoff)?.filter(|s| *s > done) {
            up_to.insert(chain.id, s);
        }
    }
    if up_to.is_empty() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_private()
        .open(path)
        .map_err(|e| AuditError::Io(format!("creating {}: {e}", path.display())))?;
    let mut writer = HashingWriter {
        inner: std::io::BufWriter::new(file),
        hasher: <sha2::Sha256 as sha2::Digest>::new(),
    };
    let summary = export_ndjson(store, cipher, None, Some(&up_to), &mut writer, progress)?;
    let file = writer.inner.into_inner().map_err(|e| AuditError::Io(e.to_string()))?;
    file.sync_all().map_err(|e| AuditError::Io(e.to_string()))?;
    let digest = sha2::Digest::finalize(writer.hasher).to_vec();
    let runs: Vec<ArchiveRun> = summary
        .chains
        .iter()
        .map(|(chain, (last_seq, last_hash, events))| ArchiveRun {
            chain_id: *chain,
            up_to_seq: *last_seq,
            last_hash: last_hash.clone(),
            archived_at: now,
            cutoff,
            events: *events as i64,
            file_sha256: digest.clone(),
        })
        .collect();
    let removed = store.audit_remove_archived(&runs)?;
    Ok(Some((runs, removed)))
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
