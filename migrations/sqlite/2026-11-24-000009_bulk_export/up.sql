-- Bulk Data $export jobs (issue 8). A job outlives the request that started it and a restart of
-- the server: its state is here, its NDJSON files (encrypted) under the data directory.
-- `request` is sealed: the kick-off URL's `_typeFilter` may carry PHI, and the principal's
-- scopes and roles decide what the job may export.
CREATE TABLE export_jobs (
    id               TEXT PRIMARY KEY,
    owner            TEXT NOT NULL,
    status           TEXT NOT NULL,
    request          BLOB NOT NULL,
    transaction_time TIMESTAMP NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    -- a node's claim on a running job; past it, another node (or this one, restarted) resumes
    lease_until      TIMESTAMP,
    expires_at       TIMESTAMP,
    resources_done   BIGINT NOT NULL DEFAULT 0,
    error            TEXT
);
CREATE INDEX export_jobs_by_status ON export_jobs (status);

-- One row per complete NDJSON file, in order; a resumed job continues after the last one.
CREATE TABLE export_files (
    job_id         TEXT NOT NULL REFERENCES export_jobs (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL,
    resource_type  TEXT NOT NULL,
    resource_count BIGINT NOT NULL,
    last_id        TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
