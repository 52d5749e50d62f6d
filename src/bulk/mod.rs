//! Bulk Data export (HL7 Bulk Data Access 2.0): jobs that run beside the request path.
//!
//! A kick-off stores a job (its request sealed: `_typeFilter` may carry PHI, and the token's
//! scopes and roles decide what the job exports) and returns. Runner threads claim jobs with a
//! lease, write each resource type's current versions as NDJSON files sealed chunk by chunk
//! (`crypto::stream`), one file row per complete file, renewing the lease as they go. A job
//! whose runner stopped (a restart, a crash, another node gone) is claimed again once its lease
//! runs out and continues after its last complete file. Files are deleted with the job, when
//! the client cancels it or when it expires.
//!
//! Reading goes through the search engine (`Store::search`, keyset pages in id order): the
//! same filters, compartments and re-checks as a search, so `_typeFilter` means what it means
//! in a search, and memory holds one page and one chunk whatever the size of the export.

use crate::auth::attributes::AttributePolicy;
use crate::auth::scope::ScopeSet;
use crate::auth::{Principal, PrincipalKind};
use crate::config::Config;
use crate::crypto::stream::{SealedReader, SealedWriter, StreamError};
use crate::crypto::{Aad, Cipher, Sealed};
use crate::search::query::Recheck;
use crate::store::export::{ExportFile, ExportJob};
use crate::store::search_query::{Cond, SearchQuery};
use crate::store::{Access, Store, StoreError};
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// Resources read per page (one query for the ids, one for the rows).
const PAGE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    File(#[from] StreamError),
    #[error("export file: {0}")]
    Io(#[from] std::io::Error),
    #[error("the job's request could not be read")]
    Request,
    #[error("a _typeFilter no longer parses")]
    Filter,
    /// The job was cancelled (or expired) while it ran.
    #[error("the job is gone")]
    Gone,
}

/// The token a job runs under, as much of it as decides what the job may export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPrincipal {
    pub subject: String,
    /// `system` or `user`.
    pub kind: String,
    pub scopes: String,
    pub client_id: Option<String>,
    pub roles: Vec<String>,
    pub purpose_of_use: Option<String>,
}

impl JobPrincipal {
    pub fn of(p: &Principal) -> JobPrincipal {
        JobPrincipal {
            subject: p.subject.clone(),
            kind: match p.kind {
                PrincipalKind::System => "system",
                PrincipalKind::User => "user",
                PrincipalKind::Patient => "patient",
            }
            .into(),
            scopes: p.scopes.raw.join(" "),
            client_id: p.client_id.clone(),
            roles: p.roles.clone(),
            purpose_of_use: p.purpose_of_use.clone(),
        }
    }

    fn principal(&self, is_type: impl Fn(&str) -> bool) -> Principal {
        Principal {
            subject: self.subject.clone(),
            kind: match self.kind.as_str() {
                "system" => PrincipalKind::System,
                "user" => PrincipalKind::User,
                _ => PrincipalKind::Patient,
            },
            scopes: ScopeSet::parse(&self.scopes, is_type),
            patient: None,
            fhir_user: None,
            client_id: self.client_id.clone(),
            amr: Vec::new(),
            roles: self.roles.clone(),
            break_glass: false,
            purpose_of_use: self.purpose_of_use.clone(),
            token_id: String::new(),
            expires_at: 0,
        }
    }
}

/// `includeAssociatedData`: which Provenance of the exported resources the export adds.
/// Ordered by breadth: the relevant ones include the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Associated {
    /// For each exported resource, the Provenance recorded last that targets it.
    Latest,
    /// Every Provenance that targets an exported resource.
    Relevant,
}

impl Associated {
    /// The value's Bulk Data name; `None` for a (custom) value this server does not define.
    pub fn parse(value: &str) -> Option<Associated> {
        match value {
            "LatestProvenanceResources" => Some(Associated::Latest),
            "RelevantProvenanceResources" => Some(Associated::Relevant),
            _ => None,
        }
    }
}

/// For each target (type, id): its last recorded Provenance's `recorded` and id.
type LatestByTarget = std::collections::HashMap<(String, String), (i64, String)>;

/// The type associated data is made of.
const PROVENANCE: &str = "Provenance";

/// The resources a Provenance targets, as (type, id): relative, absolute and versioned
/// references alike (the version does not matter: the export writes current versions).
fn targets_of(provenance: &serde_json::Value) -> Vec<(String, String)> {
    provenance["target"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["reference"].as_str())
        .filter_map(|r| {
            let r = r.split_once("/_history/").map_or(r, |(head, _)| head);
            let (head, id) = r.rsplit_once('/')?;
            let t = head.rsplit('/').next()?;
            Some((t.to_string(), id.to_string()))
        })
        .collect()
}

/// A Provenance's `recorded` instant, comparable across time zones (unreadable: earliest).
fn recorded_of(provenance: &serde_json::Value) -> i64 {
    provenance["recorded"]
        .as_str()
        .and_then(|r| chrono::DateTime::parse_from_rfc3339(r).ok())
        .map_or(i64::MIN, |at| at.timestamp_micros())
}

/// What a job exports, fixed at kick-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRequest {
    /// The kick-off URL, for the manifest's `request`.
    pub request_url: String,
    /// `None`: every resource (system level); `Some([])`: resources in any patient's
    /// compartment (Patient level); `Some(ids)`: in these patients' (a Group's members).
    pub patients: Option<Vec<String>>,
    /// The types to export, in order.
    pub types: Vec<String>,
    /// `_since`, as an instant.
    pub since: Option<String>,
    /// `_typeFilter`: (type, query string); several for one type are alternatives.
    pub type_filters: Vec<(String, String)>,
    pub principal: JobPrincipal,
    /// `_elements`: `[type.]element`; a type none of them names is exported whole.
    #[serde(default)]
    pub elements: Vec<String>,
    /// What lenient handling left out at kick-off (parameter names and reasons, never values):
    /// reported in the manifest's `error` file.
    #[serde(default)]
    pub ignored: Vec<String>,
    /// Patient and Group level: the shared types `_type` named (resources in no patient's
    /// compartment, exported as a patient-context token reads them: all of them).
    #[serde(default)]
    pub shared: Vec<String>,
    /// `includeAssociatedData`: Provenance of the exported resources, written after every
    /// type in a pass of its own.
    #[serde(default)]
    pub associated: Option<Associated>,
    /// With `associated`: Provenance was an exported type too (taken out of `types`; the
    /// associated pass writes what its queries select as well, so nothing is written twice).
    #[serde(default)]
    pub provenance_type: bool,
}

impl JobRequest {
    /// The elements `_elements` keeps of type `t` (empty: the whole resource).
    pub fn elements_of(&self, t: &str) -> Vec<String> {
        self.elements
            .iter()
            .filter_map(|e| match e.split_once('.') {
                Some((rt, name)) if rt == t => Some(name.to_string()),
                Some(_) => None,
                None => Some(e.clone()),
            })
            .collect()
    }
}

/// Who may poll a job and download its files: the subject and client that started it.
pub fn owner_of(p: &Principal) -> String {
    format!("{}|{}", p.subject, p.client_id.as_deref().unwrap_or(""))
}

fn request_aad(job_id: &str) -> Aad<'_> {
    Aad {
        table: "export_jobs",
        resource_type: "request",
        logical_id: job_id,
        version_id: 0,
    }
}

/// The sealed file of one NDJSON output.
fn file_id(job_id: &str, seq: i32) -> String {
    format!("{job_id}/{seq}")
}

/// Runs export jobs and serves their files.
pub struct Exporter {
    store: Arc<Store>,
    registry: Arc<crate::search::live::LiveRegistry>,
    attributes: Arc<AttributePolicy>,
    config: Arc<Config>,
    /// The R4 resource types (for the job's scopes).
    validator: Arc<crate::fhir::Validator>,
    stop: AtomicBool,
    /// Wakes idle runners when a job arrives.
    wake: (Mutex<u64>, Condvar),
}

impl Exporter {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<crate::search::live::LiveRegistry>,
        attributes: Arc<AttributePolicy>,
        config: Arc<Config>,
        validator: Arc<crate::fhir::Validator>,
    ) -> Arc<Exporter> {
        Arc::new(Exporter {
            store,
            registry,
            attributes,
            config,
            validator,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(0), Condvar::new()),
        })
    }

    /// Starts `export_workers` runner threads. They hold the exporter weakly and end once it
    /// is dropped (the server stopped) or [`Exporter::stop`] is called.
    pub fn start_runners(self: &Arc<Self>) {
        for n in 0..self.config.export_workers {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name(format!("export-runner-{n}"))
                .spawn(move || runner_loop(weak, n == 0));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "an export runner thread could not start");
            }
        }
    }

    /// Stops the runners after the file each is writing (its job resumes elsewhere or later).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Tells an idle runner a job is waiting.
    pub fn notify(&self) {
        let (lock, cv) = &self.wake;
        let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        cv.notify_all();
    }

    fn cipher(&self) -> &Cipher {
        self.store.cipher()
    }

    pub fn seal_request(&self, job_id: &str, req: &JobRequest) -> Result<Vec<u8>, ExportError> {
        let json = serde_json::to_vec(req).map_err(|_| ExportError::Request)?;
        let sealed = self
            .cipher()
            .seal(&request_aad(job_id), &json)
            .map_err(|_| ExportError::Request)?;
        Ok(sealed.as_bytes().to_vec())
    }

    pub fn open_request(&self, job: &ExportJob) -> Result<JobRequest, ExportError> {
        let plain = self
            .cipher()
            .open(&request_aad(&job.id), &Sealed::from_stored(job.request.clone()))
            .map_err(|_| ExportError::Request)?;
        serde_json::from_slice(&plain).map_err(|_| ExportError::Request)
    }

    /// The directory of a job's files.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.config.data_dir.join("exports").join(job_id)
    }

    fn file_path(&self, job_id: &str, seq: i32) -> PathBuf {
        self.job_dir(job_id).join(format!("{seq}.ndjson.sealed"))
    }

    /// Deletes a job and its files; `false` when there was none.
    pub fn delete_job(&self, job_id: &str) -> Result<bool, ExportError> {
        let existed = self.store.delete_export_job(job_id)?;
        self.remove_files(job_id);
        Ok(existed)
    }

    fn remove_files(&self, job_id: &str) {
        let dir = self.job_dir(job_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(error = %e, "an export's files could not be deleted");
            }
        }
    }

    /// Deletes expired jobs and their files.
    pub fn sweep_expired(&self) -> Result<usize, ExportError> {
        let expired = self.store.expired_export_jobs(crate::store::now())?;
        for id in &expired {
            self.delete_job(id)?;
        }
        Ok(expired.len())
    }

    fn lease_until(&self) -> NaiveDateTime {
        crate::store::now() + chrono::Duration::seconds(self.config.export_lease_secs)
    }

    /// Claims and runs one waiting (or abandoned) job to its end; `false` when none waited.
    pub fn run_next_job(&self) -> Result<bool, ExportError> {
        let Some(job) = self.store.claim_export_job(self.lease_until())? else {
            return Ok(false);
        };
        self.run_job(&job);
        Ok(true)
    }

    /// Runs a claimed job until it completes, fails, is cancelled or the runner stops.
    fn run_job(&self, job: &ExportJob) {
        let outcome = (|| -> Result<bool, ExportError> {
            let req = self.open_request(job)?;
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                if self.write_next_file(job, &req)?.is_none() {
                    return Ok(true);
                }
            }
        })();
        let expires = crate::store::now() + chrono::Duration::seconds(self.config.export_retention_secs);
        let finished = match outcome {
            Ok(false) => return, // stopping: the lease runs out and the job resumes
            Ok(true) => self.store.finish_export_job(&job.id, Ok(()), expires),
            Err(ExportError::Gone) => {
                self.remove_files(&job.id);
                return;
            }
            // the database went away: the job stays claimed until its lease runs out, then
            // resumes (here or on another node) after its last complete file
            Err(ExportError::Store(e)) if e.is_lost_connection() => {
                tracing::warn!(error = %e, "export job interrupted; it resumes after its lease");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "export job failed");
                let reason = match e {
                    ExportError::Request | ExportError::Filter => "the export request could not be carried out",
                    _ => "the export failed on the server; start it again",
                };
                self.store.finish_export_job(&job.id, Err(reason), expires)
            }
        };
        if let Err(e) = finished {
            tracing::error!(error = %e, "export job state could not be recorded");
        }
    }

    /// The queries that select a type's resources (one per `_typeFilter` of the type, else
    /// one), each with the re-checks its blind-indexed conditions need.
    fn queries(
        &self,
        req: &JobRequest,
        job: &ExportJob,
        t: &str,
    ) -> Result<Vec<(SearchQuery, Vec<Recheck>)>, ExportError> {
        let since = match &req.since {
            Some(s) => Some(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|_| ExportError::Request)?
                    .naive_utc(),
            ),
            None => None,
        };
        // one search per `_typeFilter` of the type (alternatives), or one selecting every resource
        let mut variants: Vec<Vec<(String, String)>> = req
            .type_filters
            .iter()
            .filter(|(ft, _)| ft == t)
            .map(|(_, q)| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .collect();
        if variants.is_empty() {
            variants.push(Vec::new());
        }
        let mut out = Vec::new();
        for pairs in variants {
            let parsed = crate::search::query::parse(&self.registry.current(), self.cipher(), t, &pairs, PAGE, true)
                .map_err(|_| ExportError::Filter)?;
            let mut q = parsed.query;
            q.total = false;
            if req.shared.iter().any(|s| s == t) {
                q.outside_compartments = true;
            } else {
                q.any_compartment = req.patients.clone();
            }
            // what changed after `_since`, as it stood at kick-off
            q.updated_after = since;
            q.updated_until = Some(job.transaction_time);
            out.push((q, parsed.rechecks));
        }
        Ok(out)
    }

    /// Writes the job's next file (where the last complete one left off) and records it;
    /// `None` when nothing is left to export.
    pub fn write_next_file(&self, job: &ExportJob, req: &JobRequest) -> Result<Option<ExportFile>, ExportError> {
        let files = self.store.export_files(&job.id)?;
        let seq = files.last().map_or(1, |f| f.seq + 1);
        // a pass per type, then associated Provenance in one of its own
        let passes = req.types.len() + usize::from(req.associated.is_some());
        let (mut type_index, mut after) = match files.last() {
            Some(f) => (
                req.types
                    .iter()
                    .position(|t| *t == f.resource_type)
                    .or_else(|| (req.associated.is_some() && f.resource_type == PROVENANCE).then_some(req.types.len()))
                    .unwrap_or(passes),
                Some(f.last_id.clone()),
            ),
            None => (0, None),
        };
        let mut principal = req.principal.principal(|t| self.validator.is_resource_type(t));
        principal.scopes.compile_filters(&self.registry.current());
        std::fs::create_dir_all(self.job_dir(&job.id))?;
        let path = self.file_path(&job.id, seq);
        let partial = path.with_extension("part");
        while type_index < passes {
            let associated_pass = type_index >= req.types.len();
            let t = req.types.get(type_index).map_or(PROVENANCE, String::as_str);
            // the token may have lost nothing since kick-off (it is the same scopes), but a
            // type it may not read is never written
            // (granular scopes: only what their filters admit, as a condition of every query)
            let decision = crate::auth::policy::authorize(&principal, t, crate::auth::scope::Permission::Read)
                .ok()
                .filter(|d| d.reaches_every_patient());
            let mut count: u64 = 0;
            let mut last_id = after.clone();
            if let Some(decision) = decision {
                let mut queries = if associated_pass {
                    vec![(self.every_provenance(job), Vec::new())]
                } else {
                    self.queries(req, job, t)?
                };
                let keep = req.elements_of(t);
                if let Some(clause) = decision.filter_clause(t) {
                    for (q, _) in &mut queries {
                        q.clauses.push(clause.clone());
                    }
                }
                // the file is created with the first resource (most types of a system export have none)
                let mut writer: Option<SealedWriter<'_, std::io::BufWriter<std::fs::File>>> = None;
                let limit = self.config.export_file_resources;
                loop {
                    let want = (limit - count).min(u64::from(PAGE)) as u32;
                    let page = if associated_pass {
                        self.associated_page(&principal, req, job, &queries[0].0, last_id.as_deref(), want, &keep)?
                    } else {
                        self.page(&principal, &queries, t, last_id.as_deref(), want, &keep)?
                    };
                    if page.is_empty() {
                        break;
                    }
                    for (id, line) in &page.lines {
                        let writer = match &mut writer {
                            Some(w) => w,
                            None => {
                                let out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
                                writer.insert(SealedWriter::new(self.cipher(), &file_id(&job.id, seq), out))
                            }
                        };
                        writer.write_all(line)?;
                        writer.write_all(b"\n")?;
                        count += 1;
                        last_id = Some(id.clone());
                    }
                    // a page of only hidden resources still moves the cursor
                    if let Some(id) = page.last {
                        last_id = Some(id);
                    }
                    if count >= limit {
                        break;
                    }
                    if !self.store.renew_export_lease(&job.id, self.lease_until())? {
                        return Err(ExportError::Gone);
                    }
                }
                if let Some(writer) = writer {
                    let mut out = writer.finish()?.into_inner().map_err(|e| e.into_error())?;
                    out.flush()?;
                    out.sync_all()?;
                    std::fs::rename(&partial, &path)?;
                    let file = ExportFile {
                        seq,
                        resource_type: t.to_string(),
                        resource_count: count as i64,
                        last_id: last_id.unwrap_or_default(),
                    };
                    match self.store.add_export_file(&job.id, &file, self.lease_until()) {
                        Ok(()) => return Ok(Some(file)),
                        Err(StoreError::NotFound) => return Err(ExportError::Gone),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            // this type is done: the next one from its start
            type_index += 1;
            after = None;
        }
        Ok(None)
    }

    /// The next resources of type `t` after `after` that any of `queries` selects, in id
    /// order, as NDJSON lines (shaped by the attribute policy), at most `want`.
    fn page(
        &self,
        principal: &Principal,
        queries: &[(SearchQuery, Vec<Recheck>)],
        t: &str,
        after: Option<&str>,
        want: u32,
        keep: &[String],
    ) -> Result<Page, ExportError> {
        // each search's page, in the database's order; `None`: a candidate the re-checks refused
        let mut pages: Vec<Vec<(String, Option<Vec<u8>>)>> = Vec::with_capacity(queries.len());
        for (q, rechecks) in queries {
            let mut q = q.clone();
            q.count = want;
            q.after = after.map(|id| (t.to_string(), id.to_string()));
            let mut rows = Vec::new();
            for (id, json) in self.store.search_contents(&Access::All, &q)? {
                let shown = if rechecks.is_empty() {
                    true
                } else {
                    let value: serde_json::Value = serde_json::from_slice(&json).map_err(|_| ExportError::Filter)?;
                    rechecks.iter().all(|r| r.holds(&value, self.cipher()))
                };
                rows.push((id, shown.then_some(json)));
            }
            pages.push(rows);
        }
        let taken: Vec<(String, Option<Vec<u8>>)> = if pages.len() == 1 {
            pages.pop().unwrap_or_default()
        } else {
            // Several alternatives: their union, in the database's order (its collation, not
            // Rust's), up to the earliest last id of a full page: beyond it a search may have
            // more to give on its next page.
            let mut found: std::collections::HashMap<String, Option<Vec<u8>>> = Default::default();
            let mut bounds: Vec<String> = Vec::new();
            for rows in pages {
                if rows.len() as u32 >= want {
                    if let Some((id, _)) = rows.last() {
                        bounds.push(id.clone());
                    }
                }
                for (id, json) in rows {
                    let slot = found.entry(id).or_insert(None);
                    if slot.is_none() {
                        *slot = json;
                    }
                }
            }
            let ids: Vec<String> = found.keys().cloned().collect();
            let ordered = self.store.order_ids(t, &ids)?;
            let mut out = Vec::new();
            for id in ordered {
                let at_bound = bounds.contains(&id);
                let json = found.remove(&id).flatten();
                out.push((id, json));
                if at_bound {
                    break;
                }
            }
            out
        };
        let last = taken.last().map(|(id, _)| id.clone());
        let lines = self.lines(principal, t, taken, keep)?;
        Ok(Page { lines, last })
    }

    /// The NDJSON lines of the resources shown (`None`: refused by a re-check), shaped as a
    /// read by the token would be and cut to `_elements`.
    fn lines(
        &self,
        principal: &Principal,
        t: &str,
        taken: Vec<(String, Option<Vec<u8>>)>,
        keep: &[String],
    ) -> Result<Vec<(String, Vec<u8>)>, ExportError> {
        let mut lines = Vec::new();
        for (id, json) in taken {
            // hidden elements masked, labelled resources left out, as for any read by the token
            if let Some(json) = json.and_then(|j| self.attributes.shape_stored(principal, t, j)) {
                if keep.is_empty() {
                    lines.push((id, one_line(json)));
                } else {
                    // `_elements`: the listed and mandatory elements, marked SUBSETTED
                    let mut value: serde_json::Value =
                        serde_json::from_slice(&json).map_err(|_| ExportError::Filter)?;
                    crate::fhir::summary::elements(&mut value, keep);
                    lines.push((id, serde_json::to_vec(&value).map_err(|_| ExportError::Filter)?));
                }
            }
        }
        Ok(lines)
    }

    /// Every Provenance as it stood at the job's transaction time, in any compartment or none
    /// (a Provenance is associated by its targets, not by its own compartment).
    fn every_provenance(&self, job: &ExportJob) -> SearchQuery {
        let mut q = SearchQuery::of_type(PROVENANCE);
        q.total = false;
        q.updated_until = Some(job.transaction_time);
        q
    }

    /// The associated pass's next page: of the Provenance after `after` (in id order, at most
    /// `want` looked at), those that target a resource the export writes (for `Latest`, that
    /// are the last recorded of such a resource's Provenance), and those the export selects as
    /// a type of its own.
    #[allow(clippy::too_many_arguments)]
    fn associated_page(
        &self,
        principal: &Principal,
        req: &JobRequest,
        job: &ExportJob,
        provenance: &SearchQuery,
        after: Option<&str>,
        want: u32,
        keep: &[String],
    ) -> Result<Page, ExportError> {
        let mut q = provenance.clone();
        q.count = want;
        q.after = after.map(|id| (PROVENANCE.to_string(), id.to_string()));
        let rows = self.store.search_contents(&Access::All, &q)?;
        let Some(last) = rows.last().map(|(id, _)| id.clone()) else {
            return Ok(Page {
                lines: Vec::new(),
                last: None,
            });
        };
        let mut candidates = Vec::with_capacity(rows.len());
        let mut asked: std::collections::BTreeMap<&str, std::collections::BTreeSet<String>> = Default::default();
        for (id, json) in rows {
            let value: serde_json::Value = serde_json::from_slice(&json).map_err(|_| ExportError::Filter)?;
            let targets: Vec<(String, String)> = targets_of(&value)
                .into_iter()
                .filter(|(t, _)| req.types.contains(t))
                .collect();
            for (t, target) in &targets {
                if let Some(t) = req.types.iter().find(|x| *x == t) {
                    asked.entry(t.as_str()).or_default().insert(target.clone());
                }
            }
            candidates.push((id, json, targets));
        }
        // which targets the export writes: its own queries, restricted to them
        let mut exported: std::collections::HashSet<(String, String)> = Default::default();
        for (t, ids) in asked {
            let ids: Vec<String> = ids.into_iter().collect();
            for id in self.selected(principal, req, job, t, &ids)? {
                exported.insert((t.to_string(), id));
            }
        }
        let typed = if req.provenance_type {
            let ids: Vec<String> = candidates.iter().map(|(id, _, _)| id.clone()).collect();
            self.selected(principal, req, job, PROVENANCE, &ids)?
        } else {
            Default::default()
        };
        let latest = match req.associated {
            Some(Associated::Latest) => {
                let mut targets: Vec<(String, String)> = exported.iter().cloned().collect();
                targets.sort();
                Some(self.latest_provenance(provenance, &targets)?)
            }
            _ => None,
        };
        let taken = candidates
            .into_iter()
            .filter(|(id, _, targets)| {
                typed.contains(id)
                    || targets.iter().any(|r| {
                        exported.contains(r)
                            && latest
                                .as_ref()
                                .is_none_or(|l| l.get(r).is_some_and(|(_, last_id)| last_id == id))
                    })
            })
            .map(|(id, json, _)| (id, Some(json)))
            .collect();
        let lines = self.lines(principal, PROVENANCE, taken, keep)?;
        Ok(Page {
            lines,
            last: Some(last),
        })
    }

    /// Of `ids` of type `t`, those the job writes: its queries for the type (compartments,
    /// `_since`, `_typeFilter`, the token's granular filters and labels) restricted to them.
    fn selected(
        &self,
        principal: &Principal,
        req: &JobRequest,
        job: &ExportJob,
        t: &str,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, ExportError> {
        let mut out = std::collections::HashSet::new();
        let Some(decision) = crate::auth::policy::authorize(principal, t, crate::auth::scope::Permission::Read)
            .ok()
            .filter(|d| d.reaches_every_patient())
        else {
            return Ok(out);
        };
        let queries = self.queries(req, job, t)?;
        for chunk in ids.chunks(PAGE as usize) {
            for (q, rechecks) in &queries {
                let mut q = q.clone();
                q.count = chunk.len() as u32;
                q.clauses.push(chunk.iter().map(|id| Cond::Id(id.clone())).collect());
                if let Some(clause) = decision.filter_clause(t) {
                    q.clauses.push(clause);
                }
                for (id, json) in self.store.search_contents(&Access::All, &q)? {
                    if out.contains(&id) {
                        continue;
                    }
                    if !rechecks.is_empty() {
                        let value: serde_json::Value =
                            serde_json::from_slice(&json).map_err(|_| ExportError::Filter)?;
                        if !rechecks.iter().all(|r| r.holds(&value, self.cipher())) {
                            continue;
                        }
                    }
                    // a resource the token's labels hide is not written, nor is its Provenance
                    if self.attributes.shape_stored(principal, t, json).is_some() {
                        out.insert(id);
                    }
                }
            }
        }
        Ok(out)
    }

    /// For each of `targets`, the id of the Provenance (of those `provenance` selects) recorded
    /// last that targets it, with its `recorded` instant (ties: the greater id).
    fn latest_provenance(
        &self,
        provenance: &SearchQuery,
        targets: &[(String, String)],
    ) -> Result<LatestByTarget, ExportError> {
        // references per query: one EXISTS each, kept to a size either database plans well
        const TARGETS_PER_QUERY: usize = 100;
        let mut latest = LatestByTarget::default();
        for chunk in targets.chunks(TARGETS_PER_QUERY) {
            let mut q = provenance.clone();
            q.count = PAGE;
            q.clauses.push(
                chunk
                    .iter()
                    .map(|(t, id)| Cond::Reference {
                        param: "target".into(),
                        target_type: Some(t.clone()),
                        id: id.clone(),
                    })
                    .collect(),
            );
            loop {
                let rows = self.store.search_contents(&Access::All, &q)?;
                for (id, json) in &rows {
                    let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| ExportError::Filter)?;
                    let at = recorded_of(&value);
                    for r in targets_of(&value).into_iter().filter(|r| chunk.contains(r)) {
                        let slot = latest.entry(r).or_insert((i64::MIN, String::new()));
                        if (at, id) > (slot.0, &slot.1) {
                            *slot = (at, id.clone());
                        }
                    }
                }
                match rows.last() {
                    Some((id, _)) if rows.len() as u32 >= PAGE => {
                        q.after = Some((PROVENANCE.to_string(), id.clone()));
                    }
                    _ => break,
                }
            }
        }
        Ok(latest)
    }

    /// Opens one file of a job for reading, chunk by chunk.
    pub fn open_file(&self, job_id: &str, seq: i32) -> Result<SealedFile, ExportError> {
        let file = std::fs::File::open(self.file_path(job_id, seq))?;
        Ok(SealedFile {
            store: self.store.clone(),
            id: file_id(job_id, seq),
            file: std::io::BufReader::new(file),
        })
    }
}

/// One page of an export.
struct Page {
    lines: Vec<(String, Vec<u8>)>,
    /// The last id the page covered (shown or not): where the next page starts.
    last: Option<String>,
}

impl Page {
    fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.last.is_none()
    }
}

/// Stored JSON on one line (NDJSON): stored resources are compact, but never trust it.
fn one_line(json: Vec<u8>) -> Vec<u8> {
    if !json.contains(&b'\n') {
        return json;
    }
    serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok())
        .unwrap_or_default()
}

/// A sealed export file being read.
pub struct SealedFile {
    store: Arc<Store>,
    id: String,
    file: std::io::BufReader<std::fs::File>,
}

impl SealedFile {
    /// Reads and opens every chunk in turn, calling `each` with its plaintext.
    pub fn for_each_chunk(mut self, mut each: impl FnMut(Vec<u8>) -> bool) -> Result<(), ExportError> {
        let cipher = self.store.cipher();
        let mut reader = SealedReader::new(cipher, &self.id, &mut self.file);
        while let Some(chunk) = reader.next_chunk()? {
            if !each(chunk) {
                break;
            }
        }
        Ok(())
    }
}

fn runner_loop(exporter: Weak<Exporter>, sweeper: bool) {
    let mut last_sweep = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let Some(ex) = exporter.upgrade() else { return };
        if ex.stop.load(Ordering::SeqCst) {
            return;
        }
        let seen = *ex.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        if sweeper && last_sweep.elapsed() >= Duration::from_secs(60) {
            last_sweep = std::time::Instant::now();
            if let Err(e) = ex.sweep_expired() {
                tracing::error!(error = %e, "expired exports could not be deleted");
            }
        }
        let ran = match ex.run_next_job() {
            Ok(ran) => ran,
            Err(e) => {
                tracing::error!(error = %e, "export runner could not claim a job");
                false
            }
        };
        if !ran {
            // idle: wait for a kick-off, or look again in a second (jobs of other nodes, leases)
            let (lock, cv) = &ex.wake;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let _ = cv.wait_timeout_while(guard, Duration::from_secs(1), |n| *n == seen);
        }
    }
}
