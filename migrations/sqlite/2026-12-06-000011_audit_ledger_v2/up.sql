-- Audit ledger v2 (see src/audit): one hash chain per node, checkpoints that sign every
-- chain's head at once, and the AuditEvent search rows (audit_search, audit_entities) derived
-- from the sealed events shortly after, off the request path. The chain of earlier versions
-- becomes chain 1. (SQLite serves one node; the layout is the same as PostgreSQL's.)

DROP TRIGGER audit_events_no_update;
DROP TRIGGER audit_entities_no_update;
DROP TRIGGER audit_chain_no_update;
DROP TRIGGER audit_checkpoints_no_update;
DROP TRIGGER audit_archives_no_update;
DROP TRIGGER audit_archives_no_delete;
DROP TRIGGER audit_chain_no_delete;
DROP TRIGGER audit_checkpoints_no_delete;
DROP TRIGGER audit_events_no_delete;
DROP TRIGGER audit_entities_no_delete;

CREATE TABLE audit_chains (
    id         INTEGER   PRIMARY KEY,
    node       TEXT      NOT NULL UNIQUE,
    created_at TIMESTAMP NOT NULL
);
INSERT INTO audit_chains (id, node, created_at)
SELECT 1, 'ledger-v1', COALESCE((SELECT MIN(recorded) FROM audit_events), strftime('%Y-%m-%d %H:%M:%f', 'now'))
WHERE EXISTS (SELECT 1 FROM audit_events) OR EXISTS (SELECT 1 FROM audit_archives);

CREATE TABLE audit_search (
    event_id  TEXT      PRIMARY KEY,
    recorded  TIMESTAMP NOT NULL,
    type_code TEXT      NOT NULL,
    subtype   TEXT      NOT NULL,
    action    TEXT      NOT NULL,
    outcome   TEXT      NOT NULL,
    agent     TEXT      NOT NULL
) WITHOUT ROWID;
INSERT INTO audit_search (event_id, recorded, type_code, subtype, action, outcome, agent)
SELECT id, recorded, type_code, subtype, action, outcome, agent FROM audit_events;
CREATE INDEX audit_search_by_time ON audit_search (recorded);
CREATE INDEX audit_search_by_agent ON audit_search (agent, recorded);

DROP INDEX audit_events_by_time;
DROP INDEX audit_events_by_agent;
ALTER TABLE audit_events DROP COLUMN type_code;
ALTER TABLE audit_events DROP COLUMN subtype;
ALTER TABLE audit_events DROP COLUMN action;
ALTER TABLE audit_events DROP COLUMN outcome;
ALTER TABLE audit_events DROP COLUMN agent;
ALTER TABLE audit_events ADD COLUMN chain_id BIGINT NOT NULL DEFAULT 1;

-- WITHOUT ROWID: the (chain, seq) key is the table, one b-tree less per link.
CREATE TABLE audit_chain_v2 (
    chain_id  BIGINT NOT NULL,
    seq       BIGINT NOT NULL,
    event_id  TEXT   NOT NULL UNIQUE,
    prev_hash BLOB   NOT NULL,
    hash      BLOB   NOT NULL,
    PRIMARY KEY (chain_id, seq)
) WITHOUT ROWID;
INSERT INTO audit_chain_v2 (chain_id, seq, event_id, prev_hash, hash)
SELECT 1, seq, event_id, prev_hash, hash FROM audit_chain;
DROP TABLE audit_chain;
ALTER TABLE audit_chain_v2 RENAME TO audit_chain;

CREATE TABLE audit_checkpoints_v2 (
    id        TEXT      PRIMARY KEY,
    format    INTEGER   NOT NULL,
    signed_at TIMESTAMP NOT NULL,
    key_id    TEXT      NOT NULL,
    heads     TEXT      NOT NULL,
    signature BLOB      NOT NULL
);
INSERT INTO audit_checkpoints_v2 (id, format, signed_at, key_id, heads, signature)
SELECT 'v1-' || substr('0000000000000000000' || seq, -19, 19), 1, signed_at, key_id,
       '1:' || seq || ':' || lower(hex(hash)), signature
FROM audit_checkpoints;
DROP TABLE audit_checkpoints;
ALTER TABLE audit_checkpoints_v2 RENAME TO audit_checkpoints;

CREATE TABLE audit_archives_v2 (
    chain_id    BIGINT    NOT NULL,
    up_to_seq   BIGINT    NOT NULL,
    last_hash   BLOB      NOT NULL,
    archived_at TIMESTAMP NOT NULL,
    cutoff      TIMESTAMP NOT NULL,
    events      BIGINT    NOT NULL,
    file_sha256 BLOB      NOT NULL,
    PRIMARY KEY (chain_id, up_to_seq)
);
INSERT INTO audit_archives_v2 (chain_id, up_to_seq, last_hash, archived_at, cutoff, events, file_sha256)
SELECT 1, up_to_seq, last_hash, archived_at, cutoff, events, file_sha256 FROM audit_archives;
DROP TABLE audit_archives;
ALTER TABLE audit_archives_v2 RENAME TO audit_archives;

CREATE TABLE audit_index_progress (
    chain_id    BIGINT PRIMARY KEY,
    indexed_seq BIGINT NOT NULL
);
INSERT INTO audit_index_progress (chain_id, indexed_seq)
SELECT 1, MAX(COALESCE((SELECT MAX(seq) FROM audit_chain), 0),
              COALESCE((SELECT MAX(up_to_seq) FROM audit_archives), 0))
WHERE EXISTS (SELECT 1 FROM audit_chains WHERE id = 1);

-- Append-only: DELETE passes only for rows an archive run has exported first.
-- key rotation re-encrypts an event's content (and its key version), nothing else
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
WHEN OLD.id IS NOT NEW.id OR OLD.recorded IS NOT NEW.recorded OR OLD.chain_id IS NOT NEW.chain_id
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only (only re-encryption may update a row)'); END;
CREATE TRIGGER audit_search_no_update BEFORE UPDATE ON audit_search
BEGIN SELECT RAISE(ABORT, 'audit_search is append-only'); END;
CREATE TRIGGER audit_entities_no_update BEFORE UPDATE ON audit_entities
BEGIN SELECT RAISE(ABORT, 'audit_entities is append-only'); END;
CREATE TRIGGER audit_chain_no_update BEFORE UPDATE ON audit_chain
BEGIN SELECT RAISE(ABORT, 'audit_chain is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_chains_no_update BEFORE UPDATE ON audit_chains
BEGIN SELECT RAISE(ABORT, 'audit_chains is append-only'); END;
CREATE TRIGGER audit_chains_no_delete BEFORE DELETE ON audit_chains
BEGIN SELECT RAISE(ABORT, 'audit_chains is append-only'); END;
CREATE TRIGGER audit_archives_no_update BEFORE UPDATE ON audit_archives
BEGIN SELECT RAISE(ABORT, 'audit_archives is append-only'); END;
CREATE TRIGGER audit_archives_no_delete BEFORE DELETE ON audit_archives
BEGIN SELECT RAISE(ABORT, 'audit_archives is append-only'); END;

CREATE TRIGGER audit_chain_no_delete BEFORE DELETE ON audit_chain
WHEN NOT EXISTS (SELECT 1 FROM audit_archives a WHERE a.chain_id = OLD.chain_id AND a.up_to_seq >= OLD.seq)
BEGIN SELECT RAISE(ABORT, 'audit_chain is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
WHEN NOT (OLD.signed_at < (SELECT MAX(cutoff) FROM audit_archives))
  OR (SELECT MAX(cutoff) FROM audit_archives) IS NULL
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN NOT EXISTS (
    SELECT 1 FROM audit_chain c JOIN audit_archives a ON a.chain_id = c.chain_id AND a.up_to_seq >= c.seq
    WHERE c.event_id = OLD.id)
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_search_no_delete BEFORE DELETE ON audit_search
WHEN NOT EXISTS (
    SELECT 1 FROM audit_chain c JOIN audit_archives a ON a.chain_id = c.chain_id AND a.up_to_seq >= c.seq
    WHERE c.event_id = OLD.event_id)
BEGIN SELECT RAISE(ABORT, 'audit_search is append-only (only archived rows may be removed)'); END;
CREATE TRIGGER audit_entities_no_delete BEFORE DELETE ON audit_entities
WHEN NOT EXISTS (
    SELECT 1 FROM audit_chain c JOIN audit_archives a ON a.chain_id = c.chain_id AND a.up_to_seq >= c.seq
    WHERE c.event_id = OLD.event_id)
BEGIN SELECT RAISE(ABORT, 'audit_entities is append-only (only archived rows may be removed)'); END;
