//! Backup and restore of everything fhirvault stores, on either backend (and across them: a
//! SQLite backup restores into PostgreSQL).
//!
//! A backup is one consistent snapshot (a single read transaction; repeatable read on
//! PostgreSQL) of every table, written as a stream of lines — a `{"table": …}` line, then one
//! JSON object per row — and a closing manifest with each table's row count and the SHA-256 of
//! its lines. The stream is cut into chunks of about 1 MiB, each sealed with AES-256-GCM under
//! the current content key, bound (AAD: the `backup` domain, the backup's id and the chunk's
//! position) to its place, so chunks cannot be reordered, dropped or moved between backups unnoticed. Content
//! that was ciphertext in the database stays ciphertext inside the backup: restoring needs the
//! same key file.

use super::encrypted::EncryptedColumn;
use super::schema::{
    audit_archives, audit_chain, audit_chains, audit_checkpoints, audit_entities, audit_events, audit_index_progress,
    audit_search, resource_compartments, resource_versions, resources,
};
use super::{Access, DbConnection, Store, StoreError};
use crate::crypto::{Aad, Cipher, Sealed};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// Format 3: the audit search rows' site and address. Format 2 (the audit ledger's several
/// chains) still restores: its derived search rows are left out and derived again from the
/// events. Format 1 backups were made before the chains.
const MAGIC: &[u8] = b"FHIRVAULT-BACKUP 3\n";
const MAGIC_2: &[u8] = b"FHIRVAULT-BACKUP 2\n";
/// The tables derived from the audit events (rebuilt rather than restored from format 2).
const DERIVED_AUDIT_TABLES: &[&str] = &["audit_search", "audit_entities"];
const CHUNK: usize = 1 << 20;
const PAGE: i64 = 5000;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backup is damaged or was made with other keys: {0}")]
    Damaged(&'static str),
    #[error("the target database is not empty: restore only into an empty database")]
    NotEmpty,
}

mod b64 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&B64.encode(b)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => B64.decode(s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

mod sealed {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &EncryptedColumn, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v.0.as_bytes()))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<EncryptedColumn, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = B64.decode(s).map_err(serde::de::Error::custom)?;
        Ok(EncryptedColumn(Sealed::from_stored(bytes)))
    }
}

mod sealed_opt {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &Option<EncryptedColumn>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(c) => s.serialize_some(&B64.encode(c.0.as_bytes())),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<EncryptedColumn>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => {
                let bytes = B64.decode(s).map_err(serde::de::Error::custom)?;
                Ok(Some(EncryptedColumn(Sealed::from_stored(bytes))))
            }
            None => Ok(None),
        }
    }
}

/// Declares a table's row type and how to page through it and insert it.
macro_rules! backup_table {
    ($row:ident, $table:ident, order: ($($order:expr),+), { $($(#[$attr:meta])* $col:ident : $ty:ty),+ $(,)? }) => {
        #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize)]
        #[diesel(table_name = $table)]
        struct $row {
            $($(#[$attr])* $col: $ty),+
        }

        impl $row {
            fn page(conn: &mut DbConnection, offset: i64) -> Result<Vec<$row>, diesel::result::Error> {
                $table::table
                    .order(($($order),+))
                    .limit(PAGE)
                    .offset(offset)
                    .select($row::as_select())
                    .load(conn)
            }

            fn insert(conn: &mut DbConnection, rows: &[$row]) -> Result<(), diesel::result::Error> {
                for chunk in rows.chunks(500) {
                    match conn {
                        DbConnection::Pg(c) => diesel::insert_into($table::table).values(chunk).execute(c)?,
                        DbConnection::Sqlite(c) => {
                            for r in chunk {
                                diesel::insert_into($table::table).values(r).execute(c)?;
                            }
                            chunk.len()
                        }
                    };
                }
                Ok(())
            }
        }
    };
}

backup_table!(ResourceRow, resources, order: (resources::resource_type, resources::logical_id), {
    resource_type: String, logical_id: String, version_id: i64, last_updated: NaiveDateTime, deleted: bool,
});
backup_table!(VersionRow, resource_versions, order: (resource_versions::id), {
    id: i64, resource_type: String, logical_id: String, version_id: i64, last_updated: NaiveDateTime,
    deleted: bool, method: String, key_version: Option<i32>,
    #[serde(with = "sealed_opt")] content: Option<EncryptedColumn>,
    #[serde(with = "b64_opt")] content_sha256: Option<Vec<u8>>,
});
backup_table!(CompartmentRow, resource_compartments, order: (resource_compartments::resource_type, resource_compartments::logical_id, resource_compartments::version_id, resource_compartments::patient_id), {
    resource_type: String, logical_id: String, version_id: i64, patient_id: String,
});
backup_table!(AuditEventRow, audit_events, order: (audit_events::id), {
    id: String, recorded: NaiveDateTime, key_version: i32, #[serde(with = "sealed")] content: EncryptedColumn,
    chain_id: i64,
});
backup_table!(AuditSearchRow, audit_search, order: (audit_search::event_id), {
    event_id: String, recorded: NaiveDateTime, type_code: String, subtype: String, action: String, outcome: String,
    agent: String, site: String, #[serde(with = "b64_opt")] address: Option<Vec<u8>>,
});
backup_table!(AuditEntityRow, audit_entities, order: (audit_entities::event_id, audit_entities::role, audit_entities::reference), {
    event_id: String, role: String, reference: String,
});
backup_table!(AuditChainsRow, audit_chains, order: (audit_chains::id), {
    id: i64, node: String, created_at: NaiveDateTime,
});
backup_table!(ChainRow, audit_chain, order: (audit_chain::chain_id, audit_chain::seq), {
    chain_id: i64, seq: i64, event_id: String, #[serde(with = "b64")] prev_hash: Vec<u8>,
    #[serde(with = "b64")] hash: Vec<u8>,
});
backup_table!(CheckpointRow, audit_checkpoints, order: (audit_checkpoints::id), {
    id: String, format: i32, signed_at: NaiveDateTime, key_id: String, heads: String,
    #[serde(with = "b64")] signature: Vec<u8>,
});
backup_table!(ArchiveRow, audit_archives, order: (audit_archives::chain_id, audit_archives::up_to_seq), {
    chain_id: i64, up_to_seq: i64, #[serde(with = "b64")] last_hash: Vec<u8>, archived_at: NaiveDateTime,
    cutoff: NaiveDateTime, events: i64, #[serde(with = "b64")] file_sha256: Vec<u8>,
});
backup_table!(IndexProgressRow, audit_index_progress, order: (audit_index_progress::chain_id), {
    chain_id: i64, indexed_seq: i64,
});

/// The tables in restore order (parents before what refers to them).
const TABLES: &[&str] = &[
    "resources",
    "resource_compartments",
    "resource_versions",
    "audit_chains",
    "audit_archives",
    "audit_events",
    "audit_search",
    "audit_entities",
    "audit_chain",
    "audit_checkpoints",
    "audit_index_progress",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableSummary {
    pub rows: u64,
    /// SHA-256 (hex) of the table's lines as written.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub backup_id: String,
    pub created: String,
    pub fhirvault_version: String,
    pub source_backend: String,
    pub tables: BTreeMap<String, TableSummary>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    backup_id: String,
    key_version: u32,
}

fn aad(backup_id: &str, index: i64) -> Aad<'_> {
    Aad {
        table: "backup",
        resource_type: "",
        logical_id: backup_id,
        version_id: index,
    }
}

/// Seals the line stream into length-prefixed chunks.
struct ChunkWriter<'a, W: Write> {
    out: W,
    cipher: &'a Cipher,
    backup_id: String,
    buf: Vec<u8>,
    index: i64,
}

impl<W: Write> ChunkWriter<'_, W> {
    fn line(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.buf.extend_from_slice(bytes);
        self.buf.push(b'\n');
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<(), BackupError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let sealed = self
            .cipher
            .seal(&aad(&self.backup_id, self.index), &self.buf)
            .map_err(|_| BackupError::Damaged("sealing failed"))?;
        self.out.write_all(&(sealed.as_bytes().len() as u32).to_be_bytes())?;
        self.out.write_all(sealed.as_bytes())?;
        self.index += 1;
        self.buf.clear();
        Ok(())
    }
}

impl Store {
    /// Writes a consistent, encrypted snapshot of every table to `out`; `progress(table, rows)`.
    pub fn backup(&self, out: &mut dyn Write, mut progress: impl FnMut(&str, u64)) -> Result<Manifest, BackupError> {
        let backup_id = uuid::Uuid::new_v4().to_string();
        out.write_all(MAGIC)?;
        let header = Header {
            backup_id: backup_id.clone(),
            key_version: self.cipher.current_version(),
        };
        out.write_all(&serde_json::to_vec(&header).map_err(|_| BackupError::Damaged("header"))?)?;
        out.write_all(b"\n")?;
        let mut w = ChunkWriter {
            out,
            cipher: &self.cipher,
            backup_id: backup_id.clone(),
            buf: Vec::with_capacity(CHUNK + 64 * 1024),
            index: 0,
        };
        let mut tables = BTreeMap::new();
        let mut conn = self.checkout(&Access::All)?;
        let mut dump = |conn: &mut DbConnection| -> Result<(), BackupError> {
            for table in TABLES {
                w.line(&serde_json::to_vec(&serde_json::json!({ "table": table })).unwrap_or_default())?;
                let mut hasher = Sha256::new();
                let mut rows = 0u64;
                let mut offset = 0;
                loop {
                    macro_rules! page {
                        ($row:ident) => {{
                            let page = $row::page(conn, offset)?;
                            let n = page.len();
                            for r in &page {
                                let line = serde_json::to_vec(r).map_err(|_| BackupError::Damaged("row"))?;
                                hasher.update(&line);
                                hasher.update(b"\n");
                                w.line(&line)?;
                            }
                            n
                        }};
                    }
                    let n = match *table {
                        "resources" => page!(ResourceRow),
                        "resource_compartments" => page!(CompartmentRow),
                        "resource_versions" => page!(VersionRow),
                        "audit_chains" => page!(AuditChainsRow),
                        "audit_archives" => page!(ArchiveRow),
                        "audit_events" => page!(AuditEventRow),
                        "audit_search" => page!(AuditSearchRow),
                        "audit_entities" => page!(AuditEntityRow),
                        "audit_chain" => page!(ChainRow),
                        "audit_index_progress" => page!(IndexProgressRow),
                        _ => page!(CheckpointRow),
                    };
                    rows += n as u64;
                    offset += PAGE;
                    progress(table, rows);
                    if (n as i64) < PAGE {
                        break;
                    }
                }
                let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
                tables.insert(table.to_string(), TableSummary { rows, sha256: sha });
            }
            Ok(())
        };
        // one snapshot for all tables (SQLite: a read transaction sees one WAL snapshot)
        conn.conn.transaction(|c| {
            if let DbConnection::Pg(pg) = c {
                diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(pg)?;
            }
            dump(c)
        })?;
        let manifest = Manifest {
            backup_id,
            created: crate::fhir::resource::instant(&super::now()),
            fhirvault_version: env!("CARGO_PKG_VERSION").into(),
            source_backend: format!("{:?}", self.backend),
            tables,
        };
        w.line(&serde_json::to_vec(&serde_json::json!({ "manifest": manifest })).unwrap_or_default())?;
        w.flush_chunk()?;
        // an empty chunk after the manifest marks the end
        let end = self
            .cipher
            .seal(&aad(&w.backup_id, w.index), b"")
            .map_err(|_| BackupError::Damaged("sealing failed"))?;
        w.out.write_all(&(end.as_bytes().len() as u32).to_be_bytes())?;
        w.out.write_all(end.as_bytes())?;
        w.out.flush()?;
        Ok(manifest)
    }

    /// Restores a backup into this (empty) database, in one transaction: on any damage nothing
    /// is left behind. `progress(table, rows)`.
    pub fn restore(&self, input: &mut dyn Read, mut progress: impl FnMut(&str, u64)) -> Result<Manifest, BackupError> {
        let mut magic = vec![0u8; MAGIC.len()];
        input.read_exact(&mut magic)?;
        let format_2 = magic == MAGIC_2;
        if magic != MAGIC && !format_2 {
            return Err(BackupError::Damaged("not a fhirvault backup"));
        }
        let mut header_line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            input.read_exact(&mut byte)?;
            if byte[0] == b'\n' {
                break;
            }
            header_line.push(byte[0]);
            if header_line.len() > 4096 {
                return Err(BackupError::Damaged("header"));
            }
        }
        let header: Header = serde_json::from_slice(&header_line).map_err(|_| BackupError::Damaged("header"))?;
        self.write_tx(&Access::All, |conn| {
            let occupied: i64 = resources::table.count().get_result(conn)?;
            let events: i64 = audit_events::table.count().get_result(conn)?;
            if occupied > 0 || events > 0 {
                return Err(StoreError::Migration("not empty".into()));
            }
            Ok(())
        })
        .map_err(|e| match e {
            StoreError::Migration(_) => BackupError::NotEmpty,
            other => BackupError::Store(other),
        })?;
        let mut conn = self.checkout(&Access::All)?;
        let cipher = &self.cipher;
        let run = |conn: &mut DbConnection| -> Result<Manifest, BackupError> {
            let mut index = 0i64;
            let mut pending = Vec::new();
            let mut current: Option<String> = None;
            let mut hasher = Sha256::new();
            let mut rows = 0u64;
            let mut seen: BTreeMap<String, TableSummary> = BTreeMap::new();
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut manifest: Option<Manifest> = None;
            let mut finish_table = |conn: &mut DbConnection,
                                    table: &Option<String>,
                                    batch: &mut Vec<Vec<u8>>,
                                    hasher: &mut Sha256,
                                    rows: &mut u64,
                                    seen: &mut BTreeMap<String, TableSummary>,
                                    done: bool|
             -> Result<(), BackupError> {
                let Some(t) = table else { return Ok(()) };
                if !(format_2 && DERIVED_AUDIT_TABLES.contains(&t.as_str())) {
                    insert_lines(conn, t, batch)?;
                }
                batch.clear();
                progress(t, *rows);
                if done {
                    let sha: String = std::mem::take(hasher)
                        .finalize()
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    seen.insert(
                        t.clone(),
                        TableSummary {
                            rows: *rows,
                            sha256: sha,
                        },
                    );
                    *rows = 0;
                }
                Ok(())
            };
            loop {
                let mut len = [0u8; 4];
                input
                    .read_exact(&mut len)
                    .map_err(|_| BackupError::Damaged("truncated: the end marker is missing"))?;
                let len = u32::from_be_bytes(len) as usize;
                if len > 2 * CHUNK + 1024 {
                    return Err(BackupError::Damaged("chunk too large"));
                }
                let mut sealed = vec![0u8; len];
                input
                    .read_exact(&mut sealed)
                    .map_err(|_| BackupError::Damaged("truncated chunk"))?;
                let plain = cipher
                    .open(&aad(&header.backup_id, index), &Sealed::from_stored(sealed))
                    .map_err(|_| {
                        BackupError::Damaged("a chunk fails authentication (altered, reordered, or other keys)")
                    })?;
                index += 1;
                if plain.is_empty() {
                    break;
                }
                pending.extend_from_slice(&plain);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).take(pos).collect();
                    // rows are JSON objects too: the two markers are told apart by their key
                    if line.starts_with(b"{\"table\":") || line.starts_with(b"{\"manifest\":") {
                        let v: serde_json::Value =
                            serde_json::from_slice(&line).map_err(|_| BackupError::Damaged("line"))?;
                        if let Some(t) = v.get("table").and_then(|t| t.as_str()) {
                            finish_table(conn, &current, &mut batch, &mut hasher, &mut rows, &mut seen, true)?;
                            if !TABLES.contains(&t) {
                                return Err(BackupError::Damaged("unknown table"));
                            }
                            current = Some(t.to_string());
                            continue;
                        }
                        if let Some(m) = v.get("manifest") {
                            finish_table(conn, &current, &mut batch, &mut hasher, &mut rows, &mut seen, true)?;
                            current = None;
                            manifest =
                                Some(serde_json::from_value(m.clone()).map_err(|_| BackupError::Damaged("manifest"))?);
                            continue;
                        }
                        return Err(BackupError::Damaged("marker"));
                    }
                    if current.is_none() {
                        return Err(BackupError::Damaged("row outside a table"));
                    }
                    hasher.update(&line);
                    hasher.update(b"\n");
                    rows += 1;
                    batch.push(line);
                    if batch.len() >= 1000 {
                        finish_table(conn, &current, &mut batch, &mut hasher, &mut rows, &mut seen, false)?;
                    }
                }
            }
            let manifest = manifest.ok_or(BackupError::Damaged("the manifest is missing"))?;
            if manifest.backup_id != header.backup_id || manifest.tables != seen {
                return Err(BackupError::Damaged("the rows do not match the manifest"));
            }
            if format_2 {
                // its search rows were left out: every chain is derived again from its start
                diesel::sql_query(
                    "UPDATE audit_index_progress SET indexed_seq = COALESCE((SELECT MAX(a.up_to_seq) \
                     FROM audit_archives a WHERE a.chain_id = audit_index_progress.chain_id), 0)",
                )
                .execute(conn)?;
            }
            // PostgreSQL: the version-row sequence continues after the restored ids
            if let DbConnection::Pg(pg) = conn {
                diesel::sql_query(
                    "SELECT setval('resource_versions_id_seq', COALESCE((SELECT max(id) FROM resource_versions), 0) + 1, false)",
                )
                .execute(pg)?;
            }
            Ok(manifest)
        };
        conn.conn.write_transaction(run)
    }
}

/// Inserts a batch of row lines into `table`.
fn insert_lines(conn: &mut DbConnection, table: &str, lines: &[Vec<u8>]) -> Result<(), BackupError> {
    macro_rules! ins {
        ($row:ident) => {{
            let rows: Vec<$row> = lines
                .iter()
                .map(|l| serde_json::from_slice(l))
                .collect::<Result<_, _>>()
                .map_err(|_| BackupError::Damaged("row"))?;
            $row::insert(conn, &rows)?;
        }};
    }
    match table {
        "resources" => ins!(ResourceRow),
        "resource_compartments" => ins!(CompartmentRow),
        "resource_versions" => ins!(VersionRow),
        "audit_chains" => ins!(AuditChainsRow),
        "audit_archives" => ins!(ArchiveRow),
        "audit_events" => ins!(AuditEventRow),
        "audit_search" => ins!(AuditSearchRow),
        "audit_entities" => ins!(AuditEntityRow),
        "audit_chain" => ins!(ChainRow),
        "audit_checkpoints" => ins!(CheckpointRow),
        "audit_index_progress" => ins!(IndexProgressRow),
        _ => return Err(BackupError::Damaged("unknown table")),
    }
    Ok(())
}
