-- The audit ledger (see src/audit). Append-only: triggers refuse UPDATE always, and DELETE
-- except of rows that an archive run has exported first (`fhirvault audit archive`).

-- One row per AuditEvent. The event itself is sealed (it may hold PHI: a search's query);
-- the columns beside it are what AuditEvent search filters on.
CREATE TABLE audit_events (
    id          TEXT      PRIMARY KEY,
    recorded    TIMESTAMP NOT NULL,
    type_code   TEXT      NOT NULL,
    subtype     TEXT      NOT NULL,
    action      TEXT      NOT NULL,
    outcome     TEXT      NOT NULL,
    agent       TEXT      NOT NULL,
    key_version INTEGER   NOT NULL,
    content     BLOB      NOT NULL
);
CREATE INDEX audit_events_by_time ON audit_events (recorded);
CREATE INDEX audit_events_by_agent ON audit_events (agent, recorded);

-- What each event touched (`entity`) and whose data it was (`patient`), versionless references.
-- WITHOUT ROWID: the primary key is the table, one b-tree less to write per row.
CREATE TABLE audit_entities (
    event_id  TEXT NOT NULL,
    role      TEXT NOT NULL,
    reference TEXT NOT NULL,
    PRIMARY KEY (event_id, role, reference)
) WITHOUT ROWID;
CREATE INDEX audit_entities_by_reference ON audit_entities (reference, role);

-- The hash chain: the order of events, each linked to the one before. (`INTEGER PRIMARY KEY`
-- makes seq the rowid: one b-tree less to write per event than BIGINT would.)
-- hash = SHA-256(prev_hash || canonical event bytes).
CREATE TABLE audit_chain (
    seq       INTEGER PRIMARY KEY,
    event_id  TEXT   NOT NULL UNIQUE,
    prev_hash BLOB   NOT NULL,
    hash      BLOB   NOT NULL
);

-- Signed checkpoints of the chain head (Ed25519), also written to a file outside the database.
CREATE TABLE audit_checkpoints (
    seq       BIGINT    PRIMARY KEY,
    hash      BLOB      NOT NULL,
    signed_at TIMESTAMP NOT NULL,
    key_id    TEXT      NOT NULL,
    signature BLOB      NOT NULL
);

-- Archive runs: events up to `up_to_seq` were exported (file digest recorded) before removal;
-- the chain continues from `last_hash`.
CREATE TABLE audit_archives (
    up_to_seq   BIGINT    PRIMARY KEY,
    last_hash   BLOB      NOT NULL,
    archived_at TIMESTAMP NOT NULL,
    cutoff      TIMESTAMP NOT NULL,
    events      BIGINT    NOT NULL,
    file_sha256 BLOB      NOT NULL
);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_entities_no_update BEFORE UPDATE ON audit_entities
BEGIN SELECT RAISE(ABORT, 'audit_entities is append-only'); END;
CREATE TRIGGER audit_chain_no_update BEFORE UPDATE ON audit_chain
BEGIN SELECT RAISE(ABORT, 'audit_chain is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_archives_no_update BEFORE UPDATE ON audit_archives
BEGIN SELECT RAISE(ABORT, 'audit_archives is append-only'); END;
CREATE TRIGGER audit_archives_no_delete BEFORE DELETE ON audit_archives
BEGIN SELECT RAISE(ABORT, 'audit_archives is append-only'); END;

CREATE TRIGGER audit_chain_no_delete BEFORE DELETE ON audit_chain
WHEN OLD.seq > (SELECT COALESCE(MAX(up_to_seq), 0) FROM audit_archives)
BEGIN SELECT RAISE(ABORT, 'audit_chain is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
WHEN OLD.seq > (SELECT COALESCE(MAX(up_to_seq), 0) FROM audit_archives)
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN NOT EXISTS (
    SELECT 1 FROM audit_chain c WHERE c.event_id = OLD.id
      AND c.seq <= (SELECT COALESCE(MAX(up_to_seq), 0) FROM audit_archives))
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_entities_no_delete BEFORE DELETE ON audit_entities
WHEN NOT EXISTS (
    SELECT 1 FROM audit_chain c WHERE c.event_id = OLD.event_id
      AND c.seq <= (SELECT COALESCE(MAX(up_to_seq), 0) FROM audit_archives))
BEGIN SELECT RAISE(ABORT, 'audit_entities is append-only (only archived rows may be removed)'); END;
