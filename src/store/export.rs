//! Bulk Data export jobs and their files: the rows that let a job outlive its request and a
//! restart, and let several nodes share the work without running a job twice (a claim is a
//! lease that progress renews).

use super::schema::{export_files as ef, export_jobs as ej};
use super::{Access, Store, StoreError};
use chrono::NaiveDateTime;
use diesel::prelude::*;

/// A job's state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting for a node to run it.
    Accepted,
    Running,
    Completed,
    Failed,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "accepted",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> JobStatus {
        match s {
            "accepted" => JobStatus::Accepted,
            "running" => JobStatus::Running,
            "completed" => JobStatus::Completed,
            _ => JobStatus::Failed,
        }
    }
}

/// One export job.
#[derive(Debug, Clone)]
pub struct ExportJob {
    pub id: String,
    /// Who started it (the token's subject and client): only they poll and download.
    pub owner: String,
    pub status: JobStatus,
    /// The sealed request (see `bulk::JobRequest`).
    pub request: Vec<u8>,
    pub transaction_time: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub expires_at: Option<NaiveDateTime>,
    pub resources_done: i64,
    pub error: Option<String>,
}

/// One complete NDJSON file of a job.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct ExportFile {
    pub seq: i32,
    pub resource_type: String,
    pub resource_count: i64,
    /// The last resource id written: the next file of the type starts after it.
    pub last_id: String,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = ej)]
struct JobRow {
    id: String,
    owner: String,
    status: String,
    request: Vec<u8>,
    transaction_time: NaiveDateTime,
    created_at: NaiveDateTime,
    expires_at: Option<NaiveDateTime>,
    resources_done: i64,
    error: Option<String>,
}

impl From<JobRow> for ExportJob {
    fn from(r: JobRow) -> Self {
        ExportJob {
            id: r.id,
            owner: r.owner,
            status: JobStatus::parse(&r.status),
            request: r.request,
            transaction_time: r.transaction_time,
            created_at: r.created_at,
            expires_at: r.expires_at,
            resources_done: r.resources_done,
            error: r.error,
        }
    }
}

impl Store {
    /// Records a new job, waiting for a node to run it.
    pub fn create_export_job(
        &self,
        id: &str,
        owner: &str,
        request: &[u8],
        transaction_time: NaiveDateTime,
    ) -> Result<(), StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::insert_into(ej::table)
            .values((
                ej::id.eq(id),
                ej::owner.eq(owner),
                ej::status.eq(JobStatus::Accepted.as_str()),
                ej::request.eq(request),
                ej::transaction_time.eq(transaction_time),
                ej::created_at.eq(super::now()),
                ej::resources_done.eq(0i64),
            ))
            .execute(&mut conn.conn)
            .map(|_| ())
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    pub fn export_job(&self, id: &str) -> Result<Option<ExportJob>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = ej::table
            .filter(ej::id.eq(id))
            .select(JobRow::as_select())
            .first::<JobRow>(&mut conn.conn)
            .optional()
            .map_err(StoreError::from);
        Ok(super::note(&mut conn, result)?.map(ExportJob::from))
    }

    /// The complete files of a job, in order.
    pub fn export_files(&self, job_id: &str) -> Result<Vec<ExportFile>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = ef::table
            .filter(ef::job_id.eq(job_id))
            .order(ef::seq.asc())
            .select((ef::seq, ef::resource_type, ef::resource_count, ef::last_id))
            .load::<ExportFile>(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Claims a job to run until `lease_until`: one waiting, or one whose runner's lease ran
    /// out (a node that stopped or crashed). Returns it, or `None` when there is none.
    pub fn claim_export_job(&self, lease_until: NaiveDateTime) -> Result<Option<ExportJob>, StoreError> {
        let now = super::now();
        let mut conn = self.checkout(&Access::All)?;
        let result = (|| -> Result<Option<ExportJob>, StoreError> {
            let candidates: Vec<String> = ej::table
                .filter(
                    ej::status
                        .eq(JobStatus::Accepted.as_str())
                        .or(ej::status.eq(JobStatus::Running.as_str()).and(ej::lease_until.lt(now))),
                )
                .order(ej::created_at.asc())
                .select(ej::id)
                .limit(8)
                .load(&mut conn.conn)?;
            for id in candidates {
                // the claim holds only if nobody claimed it since it was listed
                let claimed = diesel::update(
                    ej::table.filter(ej::id.eq(&id)).filter(
                        ej::status
                            .eq(JobStatus::Accepted.as_str())
                            .or(ej::status.eq(JobStatus::Running.as_str()).and(ej::lease_until.lt(now))),
                    ),
                )
                .set((
                    ej::status.eq(JobStatus::Running.as_str()),
                    ej::lease_until.eq(lease_until),
                ))
                .execute(&mut conn.conn)?;
                if claimed == 1 {
                    let row = ej::table
                        .filter(ej::id.eq(&id))
                        .select(JobRow::as_select())
                        .first::<JobRow>(&mut conn.conn)?;
                    return Ok(Some(row.into()));
                }
            }
            Ok(None)
        })();
        super::note(&mut conn, result)
    }

    /// Records a complete file and renews the claim, in one transaction. Fails with
    /// `StoreError::NotFound` when the job is gone (cancelled) or no longer running.
    pub fn add_export_file(
        &self,
        job_id: &str,
        file: &ExportFile,
        lease_until: NaiveDateTime,
    ) -> Result<(), StoreError> {
        self.write_tx(&Access::All, |c| {
            let n = diesel::update(
                ej::table
                    .filter(ej::id.eq(job_id))
                    .filter(ej::status.eq(JobStatus::Running.as_str())),
            )
            .set((
                ej::lease_until.eq(lease_until),
                ej::resources_done.eq(ej::resources_done + file.resource_count),
            ))
            .execute(c)?;
            if n != 1 {
                return Err(StoreError::NotFound);
            }
            diesel::insert_into(ef::table)
                .values((
                    ef::job_id.eq(job_id),
                    ef::seq.eq(file.seq),
                    ef::resource_type.eq(&file.resource_type),
                    ef::resource_count.eq(file.resource_count),
                    ef::last_id.eq(&file.last_id),
                ))
                .execute(c)?;
            Ok(())
        })
    }

    /// Renews a running job's claim (a long file in progress). `false`: the job is gone.
    pub fn renew_export_lease(&self, job_id: &str, lease_until: NaiveDateTime) -> Result<bool, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(
            ej::table
                .filter(ej::id.eq(job_id))
                .filter(ej::status.eq(JobStatus::Running.as_str())),
        )
        .set(ej::lease_until.eq(lease_until))
        .execute(&mut conn.conn)
        .map_err(StoreError::from);
        Ok(super::note(&mut conn, result)? == 1)
    }

    /// Ends a running job: completed (kept until `expires_at`) or failed with a reason (a
    /// fixed text, never PHI).
    pub fn finish_export_job(
        &self,
        job_id: &str,
        outcome: Result<(), &str>,
        expires_at: NaiveDateTime,
    ) -> Result<(), StoreError> {
        let (status, error) = match outcome {
            Ok(()) => (JobStatus::Completed, None),
            Err(reason) => (JobStatus::Failed, Some(reason.to_string())),
        };
        let mut conn = self.checkout(&Access::All)?;
        let result = diesel::update(
            ej::table
                .filter(ej::id.eq(job_id))
                .filter(ej::status.eq(JobStatus::Running.as_str())),
        )
        .set((
            ej::status.eq(status.as_str()),
            ej::error.eq(error),
            ej::expires_at.eq(Some(expires_at)),
            ej::lease_until.eq(None::<NaiveDateTime>),
        ))
        .execute(&mut conn.conn)
        .map(|_| ())
        .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Deletes a job and its file rows (cancelled, or expired). `false`: there was none.
    pub fn delete_export_job(&self, job_id: &str) -> Result<bool, StoreError> {
        self.write_tx(&Access::All, |c| {
            diesel::delete(ef::table.filter(ef::job_id.eq(job_id))).execute(c)?;
            Ok(diesel::delete(ej::table.filter(ej::id.eq(job_id))).execute(c)? == 1)
        })
    }

    /// `ids` of current resources of a type, in the database's order of ids (its collation):
    /// how an export merges the pages of several `_typeFilter` alternatives.
    pub fn order_ids(&self, resource_type: &str, ids: &[String]) -> Result<Vec<String>, StoreError> {
        use super::schema::resources as cur;
        let mut conn = self.checkout(&Access::All)?;
        let result = cur::table
            .filter(cur::resource_type.eq(resource_type))
            .filter(cur::logical_id.eq_any(ids))
            .order(cur::logical_id.asc())
            .select(cur::logical_id)
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }

    /// Jobs whose files have expired.
    pub fn expired_export_jobs(&self, now: NaiveDateTime) -> Result<Vec<String>, StoreError> {
        let mut conn = self.checkout(&Access::All)?;
        let result = ej::table
            .filter(ej::expires_at.lt(now))
            .select(ej::id)
            .load(&mut conn.conn)
            .map_err(StoreError::from);
        super::note(&mut conn, result)
    }
}
