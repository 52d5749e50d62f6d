//! The SQLite ledger's journal: what makes a batch of events durable before the answer.
//!
//! On SQLite the writer does not commit each batch to the database. It appends the batch's
//! sealed events and chain links to a journal file beside the database and `fdatasync`s it —
//! the durability floor of benches/audit.rs, and nothing more — then acknowledges. The deriver
//! moves journaled batches into the database (`audit_events`, `audit_chain`) every interval, in
//! one durable transaction for many batches, before it derives their search rows; at start-up
//! whatever the journal holds beyond the chain's head in the database is moved first (a crash
//! loses nothing that was acknowledged). Why: SQLite has one writer, and a commit per batch
//! (b-tree pages, WAL frames, the WAL's fsync, the write lock shared with resource writes and
//! the deriver) cost the reads three times the floor's sync on the request path.
//!
//! PostgreSQL does not use it: several nodes append there, each commit is one prepared
//! statement, and the ledger already reaches the floor (docs/audit.md).
//!
//! Two segments take turns: the writer switches to the other one once the current has grown
//! past [`SEGMENT_BYTES`] and everything in the other has reached the database, and empties it
//! then. Records carry a CRC: a torn record at the end (a batch whose sync never finished, so
//! never acknowledged) ends the segment, as does what is left of older records after the
//! segment was emptied; records at or below the database's head are skipped.
//!
//! The journal holds sealed events (AES-GCM, as in the database) and hashes: no plaintext.

use crate::crypto::Sealed;
use crate::store::audit::{AuditRow, ChainLink};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A segment this long is replaced by the other one when that one has been moved.
const SEGMENT_BYTES: u64 = 8 << 20;
/// The start of every record.
const MAGIC: [u8; 4] = *b"FVJ1";
/// The longest record read back (a batch is at most the writer's 1,024 events).
const MAX_RECORD: usize = 64 << 20;

/// One batch: the events it stores (reads, failures) and the links it appends (those events
/// and writes' events already stored in their own transactions), in seq order.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub rows: Vec<AuditRow>,
    pub links: Vec<ChainLink>,
}

impl Batch {
    /// The last seq the batch links.
    pub fn last_seq(&self) -> i64 {
        self.links.last().map_or(0, |l| l.seq)
    }
}

/// The two segment files of one chain's journal, beside the SQLite database.
pub fn segment_paths(db_path: &str, chain: i64) -> [PathBuf; 2] {
    [0, 1].map(|n| PathBuf::from(format!("{db_path}.audit-journal-{chain}-{n}")))
}

/// The writer's side: appends and syncs batches.
pub struct Journal {
    files: [std::fs::File; 2],
    current: usize,
    /// Bytes of valid records in the current segment.
    len: u64,
    /// The last seq written to each segment (0: nothing that is not in the database).
    last_seq: [i64; 2],
    buf: Vec<u8>,
}

impl Journal {
    /// Opens (creating) both segments, empty: the caller has moved what they held into the
    /// database first ([`read_all`], then [`Journal::open_empty`]).
    pub fn open_empty(paths: &[PathBuf; 2]) -> std::io::Result<Journal> {
        let open = |p: &Path| -> std::io::Result<std::fs::File> {
            let mut options = std::fs::OpenOptions::new();
            options.read(true).write(true).create(true).truncate(false);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let f = options.open(p)?;
            f.set_len(0)?;
            f.sync_all()?;
            Ok(f)
        };
        let files = [open(&paths[0])?, open(&paths[1])?];
        // the directory entry of a new segment must survive a crash too
        if let Some(dir) = paths[0].parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Journal {
            files,
            current: 0,
            len: 0,
            last_seq: [0, 0],
            buf: Vec::new(),
        })
    }

    /// Appends one batch and makes it durable. `moved` is the last seq the database holds:
    /// a full segment is replaced by the other once that one's records are all there. On an
    /// error the segment is cut back to where it was, and the batch is not in the journal.
    pub fn append(&mut self, batch: &Batch, moved: i64) -> std::io::Result<()> {
        if self.len >= SEGMENT_BYTES {
            let other = 1 - self.current;
            if self.last_seq[other] <= moved {
                self.files[other].set_len(0)?;
                self.files[other].seek(SeekFrom::Start(0))?;
                self.current = other;
                self.len = 0;
                self.last_seq[other] = 0;
            }
        }
        self.buf.clear();
        encode(batch, &mut self.buf);
        let file = &mut self.files[self.current];
        let written = file.write_all(&self.buf).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // never leave half a record before the next one
            let _ = file.set_len(self.len);
            let _ = file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        self.last_seq[self.current] = batch.last_seq();
        Ok(())
    }
}

/// Every whole record of both segments, in seq order (a torn or stale tail ends a segment).
pub fn read_all(paths: &[PathBuf; 2]) -> std::io::Result<Vec<Batch>> {
    let mut out = Vec::new();
    for p in paths {
        let mut bytes = Vec::new();
        match std::fs::File::open(p) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        let mut at = 0;
        while let Some((batch, next)) = decode(&bytes, at) {
            out.push(batch);
            at = next;
        }
    }
    out.sort_by_key(|b| b.links.first().map_or(0, |l| l.seq));
    Ok(out)
}

/// Empties both segments (after their records reached the database).
pub fn clear(paths: &[PathBuf; 2]) -> std::io::Result<()> {
    for p in paths {
        match std::fs::OpenOptions::new().write(true).open(p) {
            Ok(f) => {
                f.set_len(0)?;
                f.sync_all()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode(batch: &Batch, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(batch.rows.len() * 1200 + batch.links.len() * 120);
    payload.extend_from_slice(&(batch.rows.len() as u32).to_le_bytes());
    for r in &batch.rows {
        put_bytes(&mut payload, r.id.as_bytes());
        payload.extend_from_slice(&r.recorded.and_utc().timestamp_micros().to_le_bytes());
        payload.extend_from_slice(&r.key_version.to_le_bytes());
        payload.extend_from_slice(&r.chain_id.to_le_bytes());
        put_bytes(&mut payload, r.content.as_bytes());
    }
    payload.extend_from_slice(&(batch.links.len() as u32).to_le_bytes());
    for l in &batch.links {
        payload.extend_from_slice(&l.chain_id.to_le_bytes());
        payload.extend_from_slice(&l.seq.to_le_bytes());
        put_bytes(&mut payload, l.event_id.as_bytes());
        put_bytes(&mut payload, &l.prev_hash);
        put_bytes(&mut payload, &l.hash);
    }
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Reads little-endian fields off a payload; `None` past its end.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// The record at `at`, and where the next one starts; `None` at the end, or where what
/// follows is not a whole record.
fn decode(bytes: &[u8], at: usize) -> Option<(Batch, usize)> {
    let mut head = Fields { b: bytes, at };
    if head.take(4)? != MAGIC {
        return None;
    }
    let len = head.u32()? as usize;
    let crc = head.u32()?;
    if len > MAX_RECORD {
        return None;
    }
    let payload = head.take(len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let mut f = Fields { b: payload, at: 0 };
    let mut batch = Batch::default();
    for _ in 0..f.u32()? {
        let id = f.string()?;
        let recorded = chrono::DateTime::from_timestamp_micros(f.i64()?)?.naive_utc();
        let key_version = f.i32()?;
        let chain_id = f.i64()?;
        let content = Sealed::from_stored(f.bytes()?.to_vec());
        batch.rows.push(AuditRow {
            id,
            recorded,
            chain_id,
            type_code: String::new(),
            subtype: String::new(),
            action: String::new(),
            outcome: String::new(),
            agent: String::new(),
            key_version,
            content,
            entities: Vec::new(),
            patients: Vec::new(),
            site: String::new(),
            address: None,
            facets: Vec::new(),
        });
    }
    for _ in 0..f.u32()? {
        batch.links.push(ChainLink {
            chain_id: f.i64()?,
            seq: f.i64()?,
            event_id: f.string()?,
            prev_hash: f.bytes()?.to_vec(),
            hash: f.bytes()?.to_vec(),
        });
    }
    Some((batch, head.at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first_seq: i64, n: usize) -> Batch {
        let mut b = Batch::default();
        for i in 0..n {
            let id = format!("ev-{first_seq}-{i}");
            b.rows.push(AuditRow {
                id: id.clone(),
                recorded: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456)
                    .unwrap()
                    .naive_utc(),
                chain_id: 3,
                type_code: "rest".into(),
                subtype: "read".into(),
                action: "R".into(),
                outcome: "0".into(),
                agent: "x".into(),
                key_version: 2,
                content: Sealed::from_stored(vec![i as u8; 300]),
                entities: vec![],
                patients: vec![],
                site: String::new(),
                address: None,
                facets: vec![],
            });
            b.links.push(ChainLink {
                chain_id: 3,
                seq: first_seq + i as i64,
                event_id: id,
                prev_hash: vec![1; 32],
                hash: vec![2; 32],
            });
        }
        b
    }

    /// What is appended reads back whole and in seq order across both segments; a torn
    /// record ends its segment; a cleared journal reads back empty.
    #[test]
    fn batches_read_back_in_order_and_a_torn_tail_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let paths = segment_paths(db.to_str().unwrap(), 3);
        let mut j = Journal::open_empty(&paths).unwrap();
        j.append(&batch(1, 3), 0).unwrap();
        j.append(&batch(4, 2), 0).unwrap();
        // force the switch: the first segment counts as full, and all of it was moved
        j.len = SEGMENT_BYTES;
        j.append(&batch(6, 1), 5).unwrap();
        assert_eq!(j.current, 1);
        let read = read_all(&paths).unwrap();
        let seqs: Vec<i64> = read.iter().flat_map(|b| b.links.iter().map(|l| l.seq)).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(read[0].rows[2].content.as_bytes(), &[2u8; 300][..]);
        assert_eq!(read[0].rows[0].recorded, batch(1, 1).rows[0].recorded);
        assert_eq!(read[0].rows[0].key_version, 2);
        // half a record at the end of a segment (a sync that never finished)
        let mut torn = Vec::new();
        encode(&batch(7, 2), &mut torn);
        let mut f = std::fs::OpenOptions::new().append(true).open(&paths[1]).unwrap();
        f.write_all(&torn[..torn.len() / 2]).unwrap();
        let read = read_all(&paths).unwrap();
        assert_eq!(read.last().unwrap().last_seq(), 6);
        // a flipped byte fails the CRC
        let mut bytes = std::fs::read(&paths[0]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&paths[0], &bytes).unwrap();
        let read = read_all(&paths).unwrap();
        let seqs: Vec<i64> = read.iter().flat_map(|b| b.links.iter().map(|l| l.seq)).collect();
        assert_eq!(seqs, vec![1, 2, 3, 6]);
        clear(&paths).unwrap();
        assert!(read_all(&paths).unwrap().is_empty());
    }

    /// Sealed content only: the journal holds the event as the database would.
    #[test]
    fn a_journaled_batch_holds_the_sealed_bytes_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let paths = segment_paths(dir.path().join("db").to_str().unwrap(), 1);
        let mut j = Journal::open_empty(&paths).unwrap();
        let mut b = batch(1, 1);
        b.rows[0].content = Sealed::from_stored(b"sealed-bytes-only".to_vec());
        j.append(&b, 0).unwrap();
        let raw = std::fs::read(&paths[0]).unwrap();
        assert!(raw.windows(17).any(|w| w == b"sealed-bytes-only"));
    }
}
