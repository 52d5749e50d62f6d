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
//! * Work runs on several workers, each with the application on its own runtime, as the
//!   server's own workers do: checks, parsing, validation, encryption and indexing of several
//!   chunks side by side while others commit (each chunk its own transaction).
//! * `--resume`: the position recorded (`DATA_DIR/imports/`) is the last line before which every
//!   chunk committed; a resumed import starts after it, and drops from the chunks that were in
//!   flight what a kill left stored already (same content), so nothing is imported twice.

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

/// What one chunk's commit did: (type, created) per written resource, and (line, type,
/// reason) per entry the server refused (`--on-error skip`).
#[derive(Default)]
struct Written {
    written: Vec<(String, bool)>,
    refused: Vec<(u64, String, String)>,
}

enum CommitError {
    Io(String),
    /// The server refused an entry, and the import stops there (`--on-error stop`).
    Refused {
        line: u64,
        reason: String,
    },
}

/// Writes `items` in one transaction (or batch) through the application: with `skip`, an
/// entry the server refuses is set aside and the rest sent again.
async fn commit(
    call: &Call,
    base: &str,
    bearer: &str,
    kind: &str,
    mut items: Vec<Item>,
    on_error: OnError,
) -> Result<Written, CommitError> {
    let mut out = Written::default();
    while !items.is_empty() {
        let entries: Vec<&Value> = items.iter().map(|i| &i.entry).collect();
        let body = serde_json::to_vec(&json!({"resourceType": "Bundle", "type": kind, "entry": entries}))
            .map_err(|e| CommitError::Io(e.to_string()))?;
        let req = actix_web::test::TestRequest::post()
            .uri(base)
            .insert_header(("authorization", bearer))
            .insert_header(("content-type", "application/fhir+json"))
            .insert_header(("accept", "application/fhir+json"))
            .set_payload(body);
        let (status, bytes) = call(req).await.map_err(CommitError::Io)?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == 200 {
            let results = body["entry"].as_array().cloned().unwrap_or_default();
            for (item, result) in items.into_iter().zip(results) {
                let code = result["response"]["status"].as_str().unwrap_or("");
                if code.starts_with("201") || code.starts_with("200") {
                    out.written.push((item.resource_type, code.starts_with("201")));
                } else {
                    // a batch entry's own failure
                    let reason = outcome_text(&result["response"]["outcome"]);
                    out.refused.push((item.line, item.resource_type, reason));
                }
            }
            return Ok(out);
        }
        let reason = outcome_text(&body);
        match failed_entry(&body).filter(|i| *i < items.len()) {
            Some(at) if status < 500 && on_error == OnError::Skip => {
                let item = items.remove(at);
                out.refused.push((item.line, item.resource_type, reason));
            }
            Some(at) => {
                return Err(CommitError::Refused {
                    line: items[at].line,
                    reason,
                })
            }
            None => {
                return Err(CommitError::Refused {
                    line: items[0].line,
                    reason: format!("{status}: {reason}"),
                })
            }
        }
    }
    Ok(out)
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

/// Work for the workers: lines to check, or to write (NDJSON lines, parsed by the worker, or a
/// Bundle's entries built already).
enum Job {
    Check(Vec<(u64, String)>),
    Write {
        seq: u64,
        kind: &'static str,
        items: Vec<Item>,
        lines: Vec<(u64, String)>,
        /// After a resumed position: leave out what is stored already (see `drop_stored`).
        recheck: bool,
    },
}

enum Done {
    Checked(Vec<(u64, String, String)>),
    Wrote {
        seq: u64,
        result: Result<Written, CommitError>,
        already: Vec<String>,
    },
}

/// Workers, each with the server's application in-process on its own runtime (as the
/// server's own workers are): parsing, validation, encryption and indexing of several chunks
/// run side by side on every core while others commit.
struct Workers {
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    done: std::sync::mpsc::Receiver<Done>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(state: actix_web::web::Data<AppState>, n: usize, on_error: OnError) -> Result<Workers, ImportError> {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Job>(n);
        let jobs_rx = Arc::new(std::sync::Mutex::new(jobs_rx));
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for k in 0..n {
            let (state, jobs_rx, done_tx) = (state.clone(), jobs_rx.clone(), done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("import-{k}"))
                .spawn(move || worker(state, jobs_rx, done_tx, on_error))
                .map_err(|e| ImportError::Io(format!("import worker: {e}")))?;
            threads.push(spawned);
        }
        Ok(Workers {
            jobs: Some(jobs_tx),
            done,
            threads,
        })
    }

    fn send(&self, job: Job) -> Result<(), ImportError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| ImportError::Io("the import workers stopped".into()))
    }

    fn next(&self) -> Result<Done, ImportError> {
        self.done
            .recv()
            .map_err(|_| ImportError::Io("the import workers stopped".into()))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(
    state: actix_web::web::Data<AppState>,
    jobs: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<Job>>>,
    done: std::sync::mpsc::Sender<Done>,
    on_error: OnError,
) {
    actix_web::rt::System::new().block_on(async move {
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
        let base = state.config.base_path.clone();
        let mut token: (String, Instant) = (String::new(), Instant::now() - Duration::from_secs(3600));
        loop {
            let job = {
                let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
                rx.recv()
            };
            let Ok(job) = job else { return };
            let reply = match job {
                Job::Check(lines) => Done::Checked(
                    lines
                        .into_iter()
                        .filter_map(|(n, line)| check_line(&state, &line).map(|(t, why)| (n, t, why)))
                        .collect(),
                ),
                Job::Write {
                    seq,
                    kind,
                    mut items,
                    lines,
                    recheck,
                } => {
                    items.extend(
                        lines
                            .into_iter()
                            .filter_map(|(n, line)| match serde_json::from_str(&line) {
                                Ok(Value::Object(r)) => {
                                    let t = r.get("resourceType").and_then(Value::as_str).unwrap_or("").to_string();
                                    Some(Item {
                                        line: n,
                                        entry: entry_for(r, &t, None),
                                        resource_type: t,
                                    })
                                }
                                _ => None,
                            }),
                    );
                    let already = if recheck {
                        drop_stored(&state, &mut items)
                    } else {
                        Vec::new()
                    };
                    let bearer = match bearer(&state, &mut token) {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = done.send(Done::Wrote {
                                seq,
                                result: Err(CommitError::Io(e.to_string())),
                                already,
                            });
                            continue;
                        }
                    };
                    let result = if items.is_empty() {
                        Ok(Written::default())
                    } else {
                        commit(&call, &base, &bearer, kind, items, on_error).await
                    };
                    Done::Wrote { seq, result, already }
                }
            };
            if done.send(reply).is_err() {
                return;
            }
        }
    });
}

/// The import's own token (`system/*.cu`, client `fhirvault-import`), minted again each minute.
fn bearer(state: &AppState, token: &mut (String, Instant)) -> Result<String, ImportError> {
    if token.1.elapsed() > Duration::from_secs(60) {
        let t = state
            .issuer
            .issue(&crate::auth::TokenRequest {
                scope: "system/*.cu".into(),
                client_id: Some("fhirvault-import".into()),
                subject: Some("fhirvault-import".into()),
                expires_in: 300,
                ..Default::default()
            })
            .map_err(|e| ImportError::Io(format!("import token: {e}")))?;
        *token = (t, Instant::now());
    }
    Ok(format!("Bearer {}", token.0))
}

/// Why a line would be refused: (its type, the reason), or `None`.
fn check_line(state: &AppState, line: &str) -> Option<(String, String)> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(r)) => refused(state, &r).map(|why| {
            let t = r.get("resourceType").and_then(Value::as_str).unwrap_or("(none)");
            (t.to_string(), why)
        }),
        Ok(_) => Some(("(none)".into(), "not a JSON object".into())),
        Err(e) => Some(("(none)".into(), format!("not JSON (column {})", e.column()))),
    }
}

/// A resumed import's first chunks: what is stored already with the same content is left out
/// (its commit happened, its record did not). Returns the types of what was left out.
fn drop_stored(state: &AppState, items: &mut Vec<Item>) -> Vec<String> {
    let mut already = Vec::new();
    items.retain(|item| {
        let stored = item.entry["resource"]["id"].as_str().and_then(|id| {
            match state.store.read(&crate::store::Access::All, &item.resource_type, id) {
                Ok(v) if !v.deleted => v.content.and_then(|c| serde_json::from_slice::<Value>(&c).ok()),
                _ => None,
            }
        });
        let same = stored.is_some_and(|s| comparable(s) == comparable(item.entry["resource"].clone()));
        if same {
            already.push(item.resource_type.clone());
        }
        !same
    });
    already
}

/// Lines per check job, and chunks in flight per worker.
const CHECK_LINES: usize = 1000;
const IN_FLIGHT_PER_WORKER: usize = 2;

/// The importer: its workers, and what it has done.
struct Importer {
    state: actix_web::web::Data<AppState>,
    workers: Workers,
    in_flight_max: usize,
    on_error: OnError,
    summary: Summary,
    progress: Progress,
    meter: Meter,
}

/// Runs an import to its end (or the first error with `--on-error stop`).
pub fn run(state: AppState, opts: Options) -> Result<Summary, ImportError> {
    let files = expand(&opts.paths)?;
    let state = actix_web::web::Data::new(state);
    let n = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
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
        workers: Workers::start(state.clone(), n, opts.on_error)?,
        state,
        in_flight_max: n * IN_FLIGHT_PER_WORKER,
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
            im.bundle_file(i, file, after > 0)?;
        } else {
            im.ndjson_file(i, file, after)?;
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

/// Chunks of one file sent and not yet all committed: which are done, and the last line of
/// each, so that the recorded position never passes a chunk still in flight.
#[derive(Default)]
struct Window {
    sent: u64,
    in_flight: usize,
    /// seq → last line, for chunks done beyond the contiguous prefix
    done: BTreeMap<u64, u64>,
    /// the next seq the contiguous prefix waits for, and its last line so far
    next: u64,
    recorded_line: u64,
    last_lines: BTreeMap<u64, u64>,
}

impl Importer {
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

    /// Counts one committed chunk; an entry the server refused ends the import with `stop`.
    fn count(
        &mut self,
        file: &Path,
        result: Result<Written, CommitError>,
        already: Vec<String>,
    ) -> Result<(), ImportError> {
        for t in already {
            self.summary.tally(&t).already += 1;
        }
        let written = result.map_err(|e| match e {
            CommitError::Io(e) => ImportError::Io(e),
            CommitError::Refused { line, reason } => ImportError::Server {
                file: file.display().to_string(),
                line,
                reason,
            },
        })?;
        for (t, created) in written.written {
            let tally = self.summary.tally(&t);
            if created {
                tally.created += 1;
            } else {
                tally.updated += 1;
            }
            self.meter.resources += 1;
        }
        for (line, t, reason) in written.refused {
            self.refuse(file, line, &t, reason);
        }
        Ok(())
    }

    /// Waits for one job's answer: a write is counted and the window's position moves on.
    fn receive(&mut self, index: usize, file: &Path, w: &mut Window) -> Result<(), ImportError> {
        match self.workers.next()? {
            Done::Wrote { seq, result, already } => {
                w.in_flight -= 1;
                let counted = self.count(file, result, already);
                if let Some(last) = w.last_lines.remove(&seq) {
                    w.done.insert(seq, last);
                }
                let mut moved = false;
                while let Some(last) = w.done.remove(&w.next) {
                    w.recorded_line = last;
                    w.next += 1;
                    moved = true;
                }
                if moved && counted.is_ok() {
                    self.progress.save(Position {
                        file: index,
                        line: w.recorded_line,
                    })?;
                }
                counted
            }
            Done::Checked(_) => Err(ImportError::Io("an unexpected check result".into())),
        }
    }

    /// Sends a chunk to write, waiting while the window is full.
    fn write(
        &mut self,
        index: usize,
        file: &Path,
        w: &mut Window,
        job: Job,
        last_line: u64,
    ) -> Result<(), ImportError> {
        while w.in_flight >= self.in_flight_max {
            self.receive(index, file, w)?;
        }
        let Job::Write { seq, .. } = &job else {
            return Err(ImportError::Io("not a write".into()));
        };
        w.last_lines.insert(*seq, last_line);
        w.sent += 1;
        w.in_flight += 1;
        self.workers.send(job)
    }

    /// Waits for every chunk in flight; the first error (after all answered) is returned.
    fn drain(&mut self, index: usize, file: &Path, w: &mut Window) -> Result<(), ImportError> {
        let mut first = Ok(());
        while w.in_flight > 0 {
            let r = self.receive(index, file, w);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn ndjson_file(&mut self, index: usize, file: &Path, after: u64) -> Result<(), ImportError> {
        // 1. the whole file checked before any of it is written (by the workers, side by side)
        let mut refusals: Vec<(u64, String, String)> = Vec::new();
        let mut reader = open(file, Arc::new(AtomicU64::new(0)))?;
        let mut n = 0u64;
        let mut batch = Vec::new();
        let mut pending = 0usize;
        loop {
            let mut line = String::new();
            let eof = reader.read_line(&mut line).map_err(io(file))? == 0;
            if !eof {
                n += 1;
                if n > after && !line.trim().is_empty() {
                    batch.push((n, line));
                }
            }
            if batch.len() >= CHECK_LINES || (eof && !batch.is_empty()) {
                while pending >= self.in_flight_max {
                    if let Done::Checked(r) = self.workers.next()? {
                        refusals.extend(r);
                    }
                    pending -= 1;
                }
                self.workers.send(Job::Check(std::mem::take(&mut batch)))?;
                pending += 1;
            }
            if eof {
                break;
            }
        }
        while pending > 0 {
            if let Done::Checked(r) = self.workers.next()? {
                refusals.extend(r);
            }
            pending -= 1;
        }
        refusals.sort_by_key(|(n, _, _)| *n);
        let refused_lines: HashSet<u64> = refusals.iter().map(|(n, _, _)| *n).collect();
        for (n, t, why) in refusals {
            self.refuse(file, n, &t, why);
        }
        if !refused_lines.is_empty() && self.on_error == OnError::Stop {
            return Err(ImportError::Refused {
                file: file.display().to_string(),
            });
        }
        // 2. written in chunks side by side; the position recorded as chunks commit in order
        let read = Arc::new(AtomicU64::new(0));
        let mut reader = open(file, read.clone())?;
        let mut n = 0u64;
        let mut lines: Vec<(u64, String)> = Vec::new();
        let mut bytes = 0usize;
        // after a resumed position, the chunks that were in flight may have committed unrecorded
        let mut recheck = if after > 0 { self.in_flight_max } else { 0 };
        let mut w = Window {
            recorded_line: after,
            ..Default::default()
        };
        let result = (|| -> Result<(), ImportError> {
            loop {
                let mut line = String::new();
                let eof = reader.read_line(&mut line).map_err(io(file))? == 0;
                if !eof {
                    n += 1;
                    if n > after && !line.trim().is_empty() && !refused_lines.contains(&n) {
                        bytes += line.len();
                        lines.push((n, line));
                    }
                }
                if lines.len() >= CHUNK || bytes >= CHUNK_BYTES || (eof && !lines.is_empty()) {
                    let job = Job::Write {
                        seq: w.sent,
                        kind: "transaction",
                        items: Vec::new(),
                        lines: std::mem::take(&mut lines),
                        recheck: recheck > 0,
                    };
                    recheck = recheck.saturating_sub(1);
                    bytes = 0;
                    self.write(index, file, &mut w, job, n)?;
                    self.meter.draw(read.load(Ordering::Relaxed), false);
                }
                if eof {
                    return Ok(());
                }
            }
        })();
        let drained = self.drain(index, file, &mut w);
        result.and(drained)
    }

    fn bundle_file(&mut self, index: usize, file: &Path, resumed: bool) -> Result<(), ImportError> {
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
            // a create carrying a urn:uuid keeps it as its id: written with PUT
            if r.get("id").is_none() {
                if let Some(uuid) = full_url.as_deref().and_then(|u| u.strip_prefix("urn:uuid:")) {
                    if method == "POST" && !conditional && crate::fhir::resource::is_valid_id(uuid) {
                        r.insert("id".into(), json!(uuid));
                    }
                }
            }
            if let Some(why) = refused(&self.workers_state(), &r) {
                refusals.push((line, t, why));
                continue;
            }
            let entry = if method == "POST" && !conditional {
                entry_for(r, &t, full_url)
            } else {
                // as the Bundle asks (a conditional create, an update, a delete …)
                if let Some(o) = e.as_object_mut() {
                    o.insert("resource".into(), Value::Object(r));
                }
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
        let mut w = Window::default();
        let job = Job::Write {
            seq: 0,
            kind,
            items,
            lines: Vec::new(),
            recheck: resumed,
        };
        let sent = self.write(index, file, &mut w, job, u64::MAX);
        let drained = self.drain(index, file, &mut w);
        sent.and(drained)
    }

    fn workers_state(&self) -> actix_web::web::Data<AppState> {
        self.state.clone()
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
