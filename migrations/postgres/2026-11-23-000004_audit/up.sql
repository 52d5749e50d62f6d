-- The audit ledger (see src/audit). Append-only: triggers refuse UPDATE and TRUNCATE always, and
-- DELETE except of rows that an archive run has exported first (`fhirvault audit archive`, run
-- as the tables' owner: the server's role has only INSERT and SELECT here).

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
    content     BYTEA     NOT NULL
);
CREATE INDEX audit_events_by_time ON audit_events (recorded);
CREATE INDEX audit_events_by_agent ON audit_events (agent, recorded);

-- What each event touched (`entity`) and whose data it was (`patient`), versionless references.
CREATE TABLE audit_entities (
    event_id  TEXT NOT NULL,
    role      TEXT NOT NULL,
    reference TEXT NOT NULL,
    PRIMARY KEY (event_id, role, reference)
);
CREATE INDEX audit_entities_by_reference ON audit_entities (reference, role);

-- The hash chain: the order of events, each linked to the one before.
-- hash = SHA-256(prev_hash || canonical event bytes).
CREATE TABLE audit_chain (
    seq       BIGINT PRIMARY KEY,
    event_id  TEXT   NOT NULL UNIQUE,
    prev_hash BYTEA  NOT NULL,
    hash      BYTEA  NOT NULL
);

-- Signed checkpoints of the chain head (Ed25519), also written to a file outside the database.
CREATE TABLE audit_checkpoints (
    seq       BIGINT    PRIMARY KEY,
    hash      BYTEA     NOT NULL,
    signed_at TIMESTAMP NOT NULL,
    key_id    TEXT      NOT NULL,
    signature BYTEA     NOT NULL
);

-- Archive runs: events up to `up_to_seq` were exported (file digest recorded) before removal;
-- the chain continues from `last_hash`.
CREATE TABLE audit_archives (
    up_to_seq   BIGINT    PRIMARY KEY,
    last_hash   BYTEA     NOT NULL,
    archived_at TIMESTAMP NOT NULL,
    cutoff      TIMESTAMP NOT NULL,
    events      BIGINT    NOT NULL,
    file_sha256 BYTEA     NOT NULL
);

CREATE FUNCTION fhirvault_archived_up_to() RETURNS BIGINT LANGUAGE sql STABLE AS $$
    SELECT COALESCE(MAX(up_to_seq), 0) FROM audit_archives
$$;

-- DELETE passes only for rows an archive run has covered; everything else is refused.
CREATE FUNCTION fhirvault_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    seq BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF TG_TABLE_NAME IN ('audit_chain', 'audit_checkpoints') THEN
            seq := OLD.seq;
        ELSIF TG_TABLE_NAME = 'audit_events' THEN
            SELECT c.seq INTO seq FROM audit_chain c WHERE c.event_id = OLD.id;
        ELSIF TG_TABLE_NAME = 'audit_entities' THEN
            SELECT c.seq INTO seq FROM audit_chain c WHERE c.event_id = OLD.event_id;
        END IF;
        IF seq IS NOT NULL AND seq <= fhirvault_archived_up_to() THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_entities_append_only BEFORE UPDATE OR DELETE ON audit_entities
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_chain_append_only BEFORE UPDATE OR DELETE ON audit_chain
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_archives_append_only BEFORE UPDATE OR DELETE ON audit_archives
    FOR EACH ROW EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_entities_no_truncate BEFORE TRUNCATE ON audit_entities
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_chain_no_truncate BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_archives_no_truncate BEFORE TRUNCATE ON audit_archives
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
