//! `fhirvault audit export` and `fhirvault audit archive`: the ledger in chain order as NDJSON,
//! one AuditEvent per line exactly as hashed, plus an extension carrying its chain position
//! (seq, prev_hash, hash) so that external storage can re-verify the chain: remove the
//! extension, serialize with sorted keys and no whitespace, and
//! `hash = SHA-256(prev_hash || bytes)`. Queries stay sealed inside the events, so an export
//! holds no search text in plaintext.

use super::event::canonical_json;
use super::AuditError;
use crate::crypto::{Aad, Cipher};
use crate::store::audit::{ArchiveRun, AUDIT_TABLE};
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
    pub last_seq: i64,
    pub last_hash: Vec<u8>,
}

/// Writes chained events with `seq <= up_to` (all, without it) recorded at or after `since`.
pub fn export_ndjson(
    store: &Store,
    cipher: &Cipher,
    since: Option<NaiveDateTime>,
    up_to: Option<i64>,
    out: &mut dyn Write,
    mut progress: impl FnMut(u64),
) -> Result<ExportSummary, AuditError> {
    let archived = store.audit_archive_runs()?.last().map(|a| a.up_to_seq).unwrap_or(0);
    let mut after = archived;
    let mut summary = ExportSummary::default();
    let io = |e: std::io::Error| AuditError::Io(e.to_string());
    loop {
        let links = store.audit_chain_page(after, up_to, 2000)?;
        if links.is_empty() {
            break;
        }
        let ids: Vec<String> = links.iter().map(|l| l.event_id.clone()).collect();
        let (events, _) = store.audit_events_by_id(&ids)?;
        let events: HashMap<String, _> = events.into_iter().map(|e| (e.id.clone(), e)).collect();
        for link in &links {
            after = link.seq;
            let ev = events.get(&link.event_id).ok_or(AuditError::Io(format!(
                "record {} has no event row: run `fhirvault audit verify`",
                link.seq
            )))?;
            if since.is_some_and(|s| ev.recorded < s) {
                continue;
            }
            let aad = Aad {
                table: AUDIT_TABLE,
                resource_type: "AuditEvent",
                logical_id: &ev.id,
                version_id: 1,
            };
            let plain = cipher.open(&aad, &ev.content.0).map_err(|_| {
                AuditError::Io(format!(
                    "record {} does not decrypt: run `fhirvault audit verify`",
                    link.seq
                ))
            })?;
            let mut value: Value = serde_json::from_slice(&plain).map_err(|e| AuditError::Io(e.to_string()))?;
            value["extension"] = json!([{
                "url": CHAIN_EXTENSION,
                "extension": [
                    {"url": "seq", "valueString": link.seq.to_string()},
                    {"url": "prevHash", "valueBase64Binary": STANDARD.encode(&link.prev_hash)},
                    {"url": "hash", "valueBase64Binary": STANDARD.encode(&link.hash)}
                ]
            }]);
            let mut line = canonical_json(&value);
            line.push(b'\n');
            out.write_all(&line).map_err(io)?;
            summary.events += 1;
            summary.last_seq = link.seq;
            summary.last_hash = link.hash.clone();
            if summary.events % 10_000 == 0 {
                progress(summary.events);
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

/// Exports every event recorded before `cutoff` (the unbroken run from the start of the
/// chain) to `path`, makes the file durable, records the run and only then removes those
/// events. Nothing recorded at or after the cut-off is ever removed. The command line passes
/// [`retention_cutoff`] of the configured retention.
pub fn archive(
    store: &Store,
    cipher: &Cipher,
    cutoff: NaiveDateTime,
    path: &Path,
    progress: impl FnMut(u64),
) -> Result<Option<(ArchiveRun, u64)>, AuditError> {
    let now = crate::store::now();
    let archived = store.audit_archive_runs()?.last().map(|a| a.up_to_seq).unwrap_or(0);
    let Some(up_to) = store.audit_archivable_up_to(cutoff)?.filter(|s| *s > archived) else {
        return Ok(None);
    };
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
    let summary = export_ndjson(store, cipher, None, Some(up_to), &mut writer, progress)?;
    let file = writer.inner.into_inner().map_err(|e| AuditError::Io(e.to_string()))?;
    file.sync_all().map_err(|e| AuditError::Io(e.to_string()))?;
    let run = ArchiveRun {
        up_to_seq: summary.last_seq,
        last_hash: summary.last_hash,
        archived_at: now,
        cutoff,
        events: summary.events as i64,
        file_sha256: sha2::Digest::finalize(writer.hasher).to_vec(),
    };
    let removed = store.audit_remove_archived(&run)?;
    Ok(Some((run, removed)))
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
