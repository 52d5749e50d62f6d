//! `fhirvault import`: NDJSON files (a Bulk Data export, Synthea's NDJSON) and Bundles (batch,
//! transaction, collection) into the server, through the same write path as the API.
//!
//! The importer is a client of the API that runs in-process: it drives the server's own
//! actix application (`api::app`) with transaction Bundles under a token of its own
//! (`system/*.cu`, client `fhirvault-import`), so every resource is validated, indexed,
//! encrypted, placed in its compartments and audited exactly as a `PUT` or `POST` sent over
//! HTTP would be — one AuditEvent per resource, searchable by entity like any write, and one
//! per chunk for the transaction itself. Nothing bypasses the write path.
//!
//! * NDJSON: every line is a resource; with an `id` it is written under it (`PUT`), so references
//!   between files resolve; without one the server assigns it (`POST`). Lines go in transactions
//!   of [`CHUNK`] resources, read as they are sent (memory holds one chunk, whatever the size).
//! * Bundles: a transaction or collection becomes one transaction (a batch stays a batch). An
//!   entry that creates a resource carrying an id, or a `urn:uuid:` fullUrl, is written under
//!   that id (`PUT`): references by fullUrl are rewritten as a transaction would, and ids stay
//!   stable, so that a resumed import finds what it wrote. Conditional creates stay as they are.
//! * Every file is checked whole before any of it is written (JSON, resource type, id, the checks
//!   of a create: [`crate::api::crud::precheck`]): with `--on-error stop` a file with a refused
//!   line is not applied at all; with `skip` the rest of it is. A refusal names the file, the line
//!   (or entry) and the reason, never the content.
//! * `--resume`: after each committed chunk the position is recorded (`DATA_DIR/imports/`); a
//!   resumed import starts after it, and drops from the first chunk what a kill between its commit
//!   and the record left already stored (same content), so nothing is imported twice.

use crate::api::AppState;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resources per transaction: large enough that a commit carries many, small enough that a
/// chunk stays a few megabytes.
const CHUNK: usize = 500;
/// Bytes of resources per transaction at most (a chunk of large resources ends earlier).
const CHUNK_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Ndjson,
    Bundle,
    /// By content: a file whose first value is a Bundle is one, anything else NDJSON.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// A file with a refused line is not applied; the import stops there.
    Stop,
    /// Refused lines are reported and left out; the rest goes in.
    Skip,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub paths: Vec<PathBuf>,
    pub format: Format,
    pub on_error: OnError,
    pub resume: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Io(String),
    #[error("{file}: refused input, nothing of it was applied (--on-error skip imports the rest)")]
    Refused { file: String },
    #[error("the server refused a chunk of {file} (line {line}): {reason}")]
    Server { file: String, line: u64, reason: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ImportError + '_ {
    move |e| ImportError::Io(format!("{}: {e}", path.display()))
}

/// Per resource type: what the import did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Tally {
    pub created: u64,
    pub updated: u64,
    pub refused: u64,
    /// Found stored already by a resumed import (not written again).
    pub already: u64,
}

/// A line (or Bundle entry, counted from 1) that was not imported, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refusal {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub by_type: BTreeMap<String, Tally>,
    pub refusals: Vec<Refusal>,
    pub files: u64,
    pub bytes: u64,
}

impl Summary {
    fn tally(&mut self, t: &str) -> &mut Tally {
        self.by_type.entry(t.to_string()).or_default()
    }

    /// The table printed at the end (and filed with a migration's paperwork).
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<32}{:>10}{:>10}{:>10}{:>10}\n",
            "type", "created", "updated", "refused", "already"
        );
        let mut total = Tally::default();
        for (t, n) in &self.by_type {
            out.push_str(&format!(
                "{t:<32}{:>10}{:>10}{:>10}{:>10}\n",
                n.created, n.updated, n.refused, n.already
            ));
            total.created += n.created;
            total.updated += n.updated;
            total.refused += n.refused;
            total.already += n.already;
        }
        out.push_str(&format!(
            "{:<32}{:>10}{:>10}{:>10}{:>10}\n",
            "total", total.created, total.updated, total.refused, total.already
        ));
        out
    }
}

/// Where an import of these files stands: the file being imported and the last line of it
/// whose chunk committed (`u64::MAX`: the whole file).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Position {
    file: usize,
    line: u64,
}

/// The progress record of one set of input files (by their absolute paths).
struct Progress {
    path: PathBuf,
}

impl Progress {
    fn of(data_dir: &Path, files: &[PathBuf]) -> Progress {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for f in files {
            h.update(f.to_string_lossy().as_bytes());
            h.update([0]);
        }
        let digest: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        Progress {
            path: data_dir.join("imports").join(format!("{digest}.position")),
        }
    }

    fn load(&self) -> Option<Position> {
        serde_json::from_slice(&std::fs::read(&self.path).ok()?).ok()
    }

    /// Replaces the record durably (a crash leaves the old one or the new one).
    fn save(&self, at: Position) -> Result<(), ImportError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec(&at).map_err(|e| ImportError::Io(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        Ok(())
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Counts the bytes read from the file itself (compressed or not), for progress.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The file's content, gunzipped if it is gzip (by its magic bytes).
fn open(path: &Path, read: Arc<AtomicU64>) -> Result<Box<dyn BufRead>, ImportError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 2];
    let gz = f.read(&mut magic).map_err(io(path))? == 2 && magic == [0x1f, 0x8b];
    drop(f);
    let raw = Counting {
        inner: std::fs::File::open(path).map_err(io(path))?,
        read,
    };
    Ok(if gz {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(raw)))
    } else {
        Box::new(std::io::BufReader::with_capacity(1 << 20, raw))
    })
}

/// The files named: files as given, directories by their `.ndjson`, `.json` (and `.gz`)
/// files in name order.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ImportError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(io(p))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(io(p))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let name = f.to_string_lossy().to_ascii_lowercase();
                    let name = name.strip_suffix(".gz").unwrap_or(&name);
                    f.is_file() && (name.ends_with(".ndjson") || name.ends_with(".json"))
                })
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out
        .into_iter()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .collect())
}

/// A resource's content as compared by a resumed import: without what the server sets.
fn comparable(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            if let Some(o) = v.as_object_mut() {
                o.remove("meta");
            }
        }
    }
    v
}

/// One resource to write, where it came from.
struct Item {
    line: u64,
    resource_type: String,
    entry: Value,
}

/// What a line or entry's resource asks for: a `PUT` under its id, or a `POST`.
fn entry_for(resource: Map<String, Value>, t: &str, full_url: Option<String>) -> Value {
    let id = resource.get("id").and_then(Value::as_str).map(str::to_string);
    let mut e = Map::new();
    if let Some(u) = full_url {
        e.insert("fullUrl".into(), json!(u));
    }
    let request = match id {
        Some(id) => json!({"method": "PUT", "url": format!("{t}/{id}")}),
        None => json!({"method": "POST", "url": t}),
    };
    e.insert("resource".into(), Value::Object(resource));
    e.insert("request".into(), request);
    Value::Object(e)
}

/// Why the write path would refuse this resource, if it would (never quoting it).
fn refused(state: &AppState, resource: &Map<String, Value>) -> Option<String> {
    let Some(t) = resource.get("resourceType").and_then(Value::as_str) else {
        return Some("no resourceType".into());
    };
    if !state.resource_types.contains(t) {
        return Some("resourceType is not an R4 resource type".into());
    }
    if let Some(id) = resource.get("id") {
        if !id.as_str().is_some_and(crate::fhir::resource::is_valid_id) {
            return Some("id is not a valid FHIR id".into());
        }
    }
    crate::api::crud::precheck(state, t, resource)
        .err()
        .map(|e| outcome_text(&serde_json::to_value(e.outcome()).unwrap_or_default()))
}

/// The diagnostics of an OperationOutcome, joined (the server's texts carry no content).
fn outcome_text(outcome: &Value) -> String {
    let texts: Vec<String> = outcome["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let text = i["diagnostics"]
                .as_str()
                .or_else(|| i["details"]["text"].as_str())
                .unwrap_or("refused");
            match i["expression"].get(0).and_then(Value::as_str) {
                Some(at) if !text.contains(at) => format!("{at}: {text}"),
                _ => text.to_string(),
            }
        })
        .collect();
    if texts.is_empty() {
        "refused".into()
    } else {
        texts.join("; ")
    }
}

/// The entry a failed transaction names (`Bundle.entry[i]…`).
fn failed_entry(outcome: &Value) -> Option<usize> {
    outcome["issue"].as_array()?.iter().find_map(|i| {
        let e = i["expression"].get(0)?.as_str()?;
        let rest = e.strip_prefix("Bundle.entry[")?;
        rest[..rest.find(']')?].parse().ok()
    })
}

/// Terminal progress: resources and bytes of the total, rate, time left; one plain line per
/// file when the output is not a terminal.
struct Meter {
    terminal: bool,
    total_bytes: u64,
    done_bytes: u64,
    resources: u64,
    started: Instant,
    drawn: Instant,
}

impl Meter {
    fn draw(&mut self, current: u64, force: bool) {
        if !self.terminal || (!force && self.drawn.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.drawn = Instant::now();
        let bytes = self.done_bytes + current;
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.resources as f64 / secs;
        let left = if bytes > 0 {
            secs * (self.total_bytes.saturating_sub(bytes)) as f64 / bytes as f64
        } else {
            0.0
        };
        eprint!(
            "\r{} resources, {:.1} of {:.1} MB ({:.0}%), {:.0}/s, {:.0}s left   ",
            self.resources,
            bytes as f64 / 1e6,
            self.total_bytes as f64 / 1e6,
            100.0 * bytes as f64 / self.total_bytes.max(1) as f64,
            rate,
            left
        );
        let _ = std::io::stderr().flush();
    }

    fn file_done(&mut self, file: &Path, size: u64, resources: u64, started: Instant) {
        self.done_bytes += size;
        if self.terminal {
            self.draw(0, true);
        } else {
            eprintln!(
                "{}: {resources} resources in {:.1}s",
                file.display(),
                started.elapsed().as_secs_f64()
            );
        }
    }
}

/// A request through the server's application in-process: its status and body.
type Call = Box<
    dyn Fn(
        actix_web::test::TestRequest,
    ) -> futures_util::future::LocalBoxFuture<'static, Result<(u16, actix_web::web::Bytes), String>>,
>;

/// The importer: the server's application in-process, and its token.
struct Importer {
    state: actix_web::web::Data<AppState>,
    call: Call,
    token: (String, Instant),
    on_error: OnError,
    summary: Summary,
    progress: Progress,
    meter: Meter,
}

/// Runs an import to its end (or the first error with `--on-error stop`).
pub async fn run(state: AppState, opts: Options) -> Result<Summary, ImportError> {
    let files = expand(&opts.paths)?;
    let state = actix_web::web::Data::new(state);
    let service = std::rc::Rc::new(actix_web::test::init_service(crate::api::app(state.clone())).await);
    let call: Call = Box::new(move |req: actix_web::test::TestRequest| {
        use actix_web::dev::Service;
        let service = service.clone();
        Box::pin(async move {
            let resp = service.call(req.to_request()).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = actix_web::body::to_bytes(resp.into_body())
                .await
                .map_err(|_| "the response could not be read".to_string())?;
            Ok((status, body))
        })
    });
    let total_bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let progress = Progress::of(&state.config.data_dir, &files);
    let start = match (opts.resume, progress.load()) {
        (true, Some(at)) => at,
        (true, None) => {
            eprintln!("nothing to resume for these files: importing from the start");
            Position::default()
        }
        (false, Some(_)) => {
            eprintln!("an earlier import of these files did not finish: starting again from the start (--resume continues it)");
            Position::default()
        }
        (false, None) => Position::default(),
    };
    let mut im = Importer {
        token: (String::new(), Instant::now() - Duration::from_secs(3600)),
        state,
        call,
        on_error: opts.on_error,
        summary: Summary::default(),
        progress,
        meter: Meter {
            terminal: std::io::stderr().is_terminal(),
            total_bytes,
            done_bytes: 0,
            resources: 0,
            started: Instant::now(),
            drawn: Instant::now(),
        },
    };
    for (i, file) in files.iter().enumerate() {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        im.summary.files += 1;
        im.summary.bytes += size;
        if i < start.file || (i == start.file && start.line == u64::MAX) {
            im.meter.done_bytes += size;
            continue;
        }
        let after = if i == start.file { start.line } else { 0 };
        let began = Instant::now();
        let before = im.meter.resources;
        let bundle = match opts.format {
            Format::Bundle => true,
            Format::Ndjson => false,
            Format::Auto => is_bundle(file)?,
        };
        if bundle {
            im.bundle_file(i, file, after > 0).await?;
        } else {
            im.ndjson_file(i, file, after).await?;
        }
        im.progress.save(Position {
            file: i,
            line: u64::MAX,
        })?;
        im.meter.file_done(file, size, im.meter.resources - before, began);
    }
    if im.meter.terminal {
        eprintln!();
    }
    im.progress.clear();
    Ok(im.summary)
}

/// Whether the file's first JSON value is a Bundle (read only as far as its `resourceType`
/// would be on its first line).
fn is_bundle(file: &Path) -> Result<bool, ImportError> {
    let mut r = open(file, Arc::new(AtomicU64::new(0)))?;
    let mut first = String::new();
    r.read_line(&mut first).map_err(io(file))?;
    if let Ok(v) = serde_json::from_str::<Value>(&first) {
        return Ok(v["resourceType"] == "Bundle" && v.get("entry").is_some());
    }
    // a pretty-printed file: one JSON document, not NDJSON
    Ok(true)
}

impl Importer {
    fn bearer(&mut self) -> Result<String, ImportError> {
        if self.token.1.elapsed() > Duration::from_secs(60) {
            let t = self
                .state
                .issuer
                .issue(&crate::auth::TokenRequest {
                    scope: "system/*.cu".into(),
                    client_id: Some("fhirvault-import".into()),
                    subject: Some("fhirvault-import".into()),
                    expires_in: 300,
                    ..Default::default()
                })
                .map_err(|e| ImportError::Io(format!("import token: {e}")))?;
            self.token = (t, Instant::now());
        }
        Ok(format!("Bearer {}", self.token.0))
    }

    /// Sends one Bundle through the application; its status and parsed body.
    async fn send(&mut self, kind: &str, entries: &[Value]) -> Result<(u16, Value), ImportError> {
        let body = serde_json::to_vec(&json!({"resourceType": "Bundle", "type": kind, "entry": entries}))
            .map_err(|e| ImportError::Io(e.to_string()))?;
        let req = actix_web::test::TestRequest::post()
            .uri(&self.state.config.base_path)
            .insert_header(("authorization", self.bearer()?))
            .insert_header(("content-type", "application/fhir+json"))
            .insert_header(("accept", "application/fhir+json"))
            .set_payload(body);
        let (status, bytes) = (self.call)(req).await.map_err(ImportError::Io)?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    fn refuse(&mut self, file: &Path, line: u64, t: &str, reason: String) {
        let name = file.display().to_string();
        if self.meter.terminal {
            eprintln!();
        }
        eprintln!("refused: {name}:{line}: {reason}");
        self.summary.tally(t).refused += 1;
        self.summary.refusals.push(Refusal {
            file: name,
            line,
            reason,
        });
    }

    /// Writes `items` in one transaction (or batch): with `skip`, an entry the server refuses
    /// is reported and the rest sent again. Returns the items' results counted.
    async fn write(&mut self, file: &Path, kind: &str, mut items: Vec<Item>) -> Result<(), ImportError> {
        while !items.is_empty() {
            let entries: Vec<Value> = items.iter().map(|i| i.entry.clone()).collect();
            let (status, body) = self.send(kind, &entries).await?;
            if status == 200 {
                let results = body["entry"].as_array().cloned().unwrap_or_default();
                for (item, result) in items.iter().zip(results) {
                    let code = result["response"]["status"].as_str().unwrap_or("");
                    if code.starts_with("201") {
                        self.summary.tally(&item.resource_type).created += 1;
                    } else if code.starts_with("200") {
                        self.summary.tally(&item.resource_type).updated += 1;
                    } else {
                        // a batch entry's own failure
                        let reason = outcome_text(&result["response"]["outcome"]);
                        self.refuse(file, item.line, &item.resource_type.clone(), reason);
                        continue;
                    }
                    self.meter.resources += 1;
                }
                return Ok(());
            }
            let reason = outcome_text(&body);
            match failed_entry(&body).filter(|i| *i < items.len()) {
                Some(at) if status < 500 && self.on_error == OnError::Skip => {
                    let item = items.remove(at);
                    self.refuse(file, item.line, &item.resource_type, reason);
                }
                Some(at) => {
                    return Err(ImportError::Server {
                        file: file.display().to_string(),
                        line: items[at].line,
                        reason,
                    })
                }
                None => {
                    return Err(ImportError::Server {
                        file: file.display().to_string(),
                        line: items[0].line,
                        reason: format!("{status}: {reason}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// A resumed import's first chunk: what is stored already with the same content is left
    /// out (its commit happened, its record did not).
    fn drop_stored(&mut self, items: &mut Vec<Item>) -> Result<(), ImportError> {
        let store = self.state.store.clone();
        let mut kept = Vec::with_capacity(items.len());
        for item in items.drain(..) {
            let id = item.entry["resource"]["id"].as_str().map(str::to_string);
            let stored = match &id {
                Some(id) => match store.read(&crate::store::Access::All, &item.resource_type, id) {
                    Ok(v) if !v.deleted => v.content.and_then(|c| serde_json::from_slice::<Value>(&c).ok()),
                    _ => None,
                },
                None => None,
            };
            if stored.is_some_and(|s| comparable(s) == comparable(item.entry["resource"].clone())) {
                self.summary.tally(&item.resource_type).already += 1;
            } else {
                kept.push(item);
            }
        }
        *items = kept;
        Ok(())
    }

    async fn ndjson_file(&mut self, index: usize, file: &Path, after: u64) -> Result<(), ImportError> {
        // 1. the whole file checked before any of it is written
        let mut refused_lines: HashSet<u64> = HashSet::new();
        let mut reader = open(file, Arc::new(AtomicU64::new(0)))?;
        let mut line = String::new();
        let mut n = 0u64;
        let mut refusals = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io(file))? == 0 {
                break;
            }
            n += 1;
            if n <= after || line.trim().is_empty() {
                continue;
            }
            let reason = match serde_json::from_str::<Value>(&line) {
                Ok(Value::Object(r)) => refused(&self.state, &r).map(|why| {
                    let t = r.get("resourceType").and_then(Value::as_str).unwrap_or("(none)");
                    (t.to_string(), why)
                }),
                Ok(_) => Some(("(none)".into(), "not a JSON object".into())),
                Err(e) => Some(("(none)".into(), format!("not JSON (column {})", e.column()))),
            };
            if let Some((t, why)) = reason {
                refused_lines.insert(n);
                refusals.push((n, t, why));
            }
        }
        for (n, t, why) in refusals {
            self.refuse(file, n, &t, why);
        }
        if !refused_lines.is_empty() && self.on_error == OnError::Stop {
            return Err(ImportError::Refused {
                file: file.display().to_string(),
            });
        }
        // 2. written in chunks, each recorded once committed
        let read = Arc::new(AtomicU64::new(0));
        let mut reader = open(file, read.clone())?;
        let mut n = 0u64;
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        let mut first_chunk = after > 0;
        loop {
            line.clear();
            let eof = reader.read_line(&mut line).map_err(io(file))? == 0;
            if !eof {
                n += 1;
                if n > after && !line.trim().is_empty() && !refused_lines.contains(&n) {
                    if let Ok(Value::Object(r)) = serde_json::from_str::<Value>(&line) {
                        let t = r.get("resourceType").and_then(Value::as_str).unwrap_or("").to_string();
                        bytes += line.len();
                        items.push(Item {
                            line: n,
                            entry: entry_for(r, &t, None),
                            resource_type: t,
                        });
                    }
                }
            }
            if items.len() >= CHUNK || bytes >= CHUNK_BYTES || (eof && !items.is_empty()) {
                let last = n;
                let mut chunk = std::mem::take(&mut items);
                bytes = 0;
                if first_chunk {
                    self.drop_stored(&mut chunk)?;
                    first_chunk = false;
                }
                if !chunk.is_empty() {
                    self.write(file, "transaction", chunk).await?;
                }
                self.progress.save(Position {
                    file: index,
                    line: last,
                })?;
                self.meter.draw(read.load(Ordering::Relaxed), false);
            }
            if eof {
                return Ok(());
            }
        }
    }

    async fn bundle_file(&mut self, index: usize, file: &Path, resumed: bool) -> Result<(), ImportError> {
        let mut text = Vec::new();
        open(file, Arc::new(AtomicU64::new(0)))?
            .read_to_end(&mut text)
            .map_err(io(file))?;
        let name = file.display().to_string();
        let mut bundle: Map<String, Value> = match serde_json::from_slice(&text) {
            Ok(Value::Object(b)) if b.get("resourceType").and_then(Value::as_str) == Some("Bundle") => b,
            Ok(_) => {
                self.refuse(file, 0, "Bundle", "not a Bundle".into());
                return self.refused_file(&name);
            }
            Err(e) => {
                self.refuse(
                    file,
                    0,
                    "Bundle",
                    format!("not JSON (line {}, column {})", e.line(), e.column()),
                );
                return self.refused_file(&name);
            }
        };
        drop(text);
        let kind = match bundle.get("type").and_then(Value::as_str) {
            Some("batch") => "batch",
            Some("transaction") | Some("collection") => "transaction",
            _ => {
                self.refuse(
                    file,
                    0,
                    "Bundle",
                    "Bundle.type must be batch, transaction or collection".into(),
                );
                return self.refused_file(&name);
            }
        };
        let entries = match bundle.remove("entry") {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        let mut items = Vec::with_capacity(entries.len());
        let mut refusals = Vec::new();
        for (i, mut e) in entries.into_iter().enumerate() {
            let line = i as u64 + 1;
            let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_string);
            let Some(Value::Object(mut r)) = e.get_mut("resource").map(Value::take) else {
                refusals.push((line, "(none)".to_string(), "an entry without a resource".to_string()));
                continue;
            };
            let t = r
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("(none)")
                .to_string();
            let method = e["request"]["method"].as_str().unwrap_or("POST").to_string();
            let conditional = e["request"].get("ifNoneExist").is_some()
                || e["request"]["url"].as_str().is_some_and(|u| u.contains('?'));
            // a create carrying its id (or a urn:uuid) keeps it: written with PUT
            if r.get("id").is_none() {
                if let Some(uuid) = full_url.as_deref().and_then(|u| u.strip_prefix("urn:uuid:")) {
                    if method == "POST" && !conditional && crate::fhir::resource::is_valid_id(uuid) {
                        r.insert("id".into(), json!(uuid));
                    }
                }
            }
            if let Some(why) = refused(&self.state, &r) {
                refusals.push((line, t, why));
                continue;
            }
            let entry = if method == "POST" && !conditional || kind == "transaction" && e.get("request").is_none() {
                entry_for(r, &t, full_url)
            } else {
                // as the Bundle asks (a conditional create, an update, a delete …)
                e.as_object_mut().map(|o| o.insert("resource".into(), Value::Object(r)));
                e
            };
            items.push(Item {
                line,
                resource_type: t,
                entry,
            });
        }
        let refused_any = !refusals.is_empty();
        for (n, t, why) in refusals {
            self.refuse(file, n, &t, why);
        }
        if refused_any && self.on_error == OnError::Stop {
            return self.refused_file(&name);
        }
        if resumed {
            self.drop_stored(&mut items)?;
        }
        if !items.is_empty() {
            self.write(file, kind, items).await?;
        }
        self.progress.save(Position {
            file: index,
            line: u64::MAX,
        })?;
        Ok(())
    }

    fn refused_file(&self, name: &str) -> Result<(), ImportError> {
        match self.on_error {
            OnError::Stop => Err(ImportError::Refused { file: name.to_string() }),
            OnError::Skip => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_a_failed_transaction_names_is_found() {
        let outcome = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
            "diagnostics": "Bundle.entry[12]: gender: not a code (the transaction was not applied)",
            "expression": ["Bundle.entry[12].resource.gender"]}]});
        assert_eq!(failed_entry(&outcome), Some(12));
        assert!(outcome_text(&outcome).contains("not a code"));
        assert_eq!(failed_entry(&json!({"issue": []})), None);
    }

    #[test]
    fn server_set_meta_does_not_count_as_a_difference() {
        let a = json!({"resourceType": "Patient", "id": "1", "meta": {"versionId": "3", "lastUpdated": "2020"}});
        let b = json!({"resourceType": "Patient", "id": "1"});
        assert_eq!(comparable(a), comparable(b.clone()));
        let c = json!({"resourceType": "Patient", "id": "1", "meta": {"profile": ["x"], "versionId": "1"}});
        assert_ne!(comparable(c), comparable(b));
    }
}
