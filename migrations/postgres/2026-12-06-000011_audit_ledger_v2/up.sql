-- Audit ledger v2 (see src/audit): one hash chain per node, so that several server processes
-- append at once without colliding on a shared head; checkpoints that sign every chain's head
-- at once; and the AuditEvent search rows (audit_search, audit_entities) derived from the sealed
-- events shortly after, off the request path. The chain of earlier versions becomes chain 1.

DROP TRIGGER audit_events_append_only ON audit_events;
DROP TRIGGER audit_entities_append_only ON audit_entities;
DROP TRIGGER audit_chain_append_only ON audit_chain;
DROP TRIGGER audit_checkpoints_append_only ON audit_checkpoints;
DROP TRIGGER audit_archives_append_only ON audit_archives;
DROP TRIGGER audit_events_no_truncate ON audit_events;
DROP TRIGGER audit_entities_no_truncate ON audit_entities;
DROP TRIGGER audit_chain_no_truncate ON audit_chain;
DROP TRIGGER audit_checkpoints_no_truncate ON audit_checkpoints;
DROP TRIGGER audit_archives_no_truncate ON audit_archives;
DROP FUNCTION fhirvault_audit_guard();
DROP FUNCTION fhirvault_archived_up_to();

-- The chains: one per node (its stable name), registered on the node's first start.
CREATE TABLE audit_chains (
    id         BIGINT    PRIMARY KEY,
    node       TEXT      NOT NULL UNIQUE,
    created_at TIMESTAMP NOT NULL
);
INSERT INTO audit_chains (id, node, created_at)
SELECT 1, 'ledger-v1', COALESCE((SELECT MIN(recorded) FROM audit_events), now() AT TIME ZONE 'UTC')
WHERE EXISTS (SELECT 1 FROM audit_events) OR EXISTS (SELECT 1 FROM audit_archives);

-- What AuditEvent search filters on, derived from each event's sealed content.
CREATE TABLE audit_search (
    event_id  TEXT      PRIMARY KEY,
    recorded  TIMESTAMP NOT NULL,
    type_code TEXT      NOT NULL,
    subtype   TEXT      NOT NULL,
    action    TEXT      NOT NULL,
    outcome   TEXT      NOT NULL,
    agent     TEXT      NOT NULL
);
INSERT INTO audit_search (event_id, recorded, type_code, subtype, action, outcome, agent)
SELECT id, recorded, type_code, subtype, action, outcome, agent FROM audit_events;
CREATE INDEX audit_search_by_time ON audit_search (recorded);
CREATE INDEX audit_search_by_agent ON audit_search (agent, recorded);

-- The durable event: sealed content, when, and the chain whose node links it.
DROP INDEX audit_events_by_time;
DROP INDEX audit_events_by_agent;
ALTER TABLE audit_events
    DROP COLUMN type_code, DROP COLUMN subtype, DROP COLUMN action, DROP COLUMN outcome, DROP COLUMN agent,
    ADD COLUMN chain_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_events ALTER COLUMN chain_id DROP DEFAULT;

ALTER TABLE audit_chain ADD COLUMN chain_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_chain ALTER COLUMN chain_id DROP DEFAULT;
ALTER TABLE audit_chain DROP CONSTRAINT audit_chain_pkey;
ALTER TABLE audit_chain ADD PRIMARY KEY (chain_id, seq);

-- A checkpoint signs the heads of every chain at once (`heads`: one `chain:seq:hash` per
-- line, by chain). Format 1 rows are the single-chain checkpoints of earlier versions.
CREATE TABLE audit_checkpoints_v2 (
    id        TEXT      PRIMARY KEY,
    format    INTEGER   NOT NULL,
    signed_at TIMESTAMP NOT NULL,
    key_id    TEXT      NOT NULL,
    heads     TEXT      NOT NULL,
    signature BYTEA     NOT NULL
);
INSERT INTO audit_checkpoints_v2 (id, format, signed_at, key_id, heads, signature)
SELECT 'v1-' || lpad(seq::text, 19, '0'), 1, signed_at, key_id, '1:' || seq || ':' || encode(hash, 'hex'), signature
FROM audit_checkpoints;
DROP TABLE audit_checkpoints;
ALTER TABLE audit_checkpoints_v2 RENAME TO audit_checkpoints;

ALTER TABLE audit_archives ADD COLUMN chain_id BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_archives ALTER COLUMN chain_id DROP DEFAULT;
ALTER TABLE audit_archives DROP CONSTRAINT audit_archives_pkey;
ALTER TABLE audit_archives ADD PRIMARY KEY (chain_id, up_to_seq);

-- How far each chain's events have been derived into audit_search and audit_entities.
CREATE TABLE audit_index_progress (
    chain_id    BIGINT PRIMARY KEY,
    indexed_seq BIGINT NOT NULL
);
INSERT INTO audit_index_progress (chain_id, indexed_seq)
SELECT 1, GREATEST(COALESCE((SELECT MAX(seq) FROM audit_chain), 0),
                   COALESCE((SELECT MAX(up_to_seq) FROM audit_archives), 0))
WHERE EXISTS (SELECT 1 FROM audit_chains WHERE id = 1);

-- Append-only: DELETE passes only for rows an archive run has exported first.
CREATE FUNCTION fhirvault_audit_archived(chain BIGINT, record BIGINT) RETURNS BOOLEAN LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM audit_archives a WHERE a.chain_id = chain AND a.up_to_seq >= record)
$$;

CREATE FUNCTION fhirvault_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ok BOOLEAN := false;
BEGIN
    -- key rotation re-encrypts an event's content (and its key version), nothing else
    -- (nested: the row fields exist only for audit_events, and an outer AND is not short-circuited)
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_events' THEN
        IF (NEW.id, NEW.recorded, NEW.chain_id) IS NOT DISTINCT FROM (OLD.id, OLD.recorded, OLD.chain_id) THEN
            RETURN NEW;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF TG_TABLE_NAME = 'audit_chain' THEN
            ok := fhirvault_audit_archived(OLD.chain_id, OLD.seq);
        ELSIF TG_TABLE_NAME = 'audit_events' THEN
            SELECT fhirvault_audit_archived(c.chain_id, c.seq) INTO ok FROM audit_chain c WHERE c.event_id = OLD.id;
        ELSIF TG_TABLE_NAME IN ('audit_entities', 'audit_search') THEN
            SELECT fhirvault_audit_archived(c.chain_id, c.seq) INTO ok FROM audit_chain c WHERE c.event_id = OLD.event_id;
        ELSIF TG_TABLE_NAME = 'audit_checkpoints' THEN
            ok := OLD.signed_at < (SELECT MAX(cutoff) FROM audit_archives);
        END IF;
        IF ok THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_search_append_only BEFORE UPDATE OR DELETE ON audit_search
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_entities_append_only BEFORE UPDATE OR DELETE ON audit_entities
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_chain_append_only BEFORE UPDATE OR DELETE ON audit_chain
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION fhirvault_audit_guard();
CREATE TRIGGER audit_chains_append_only BEFORE UPDATE OR DELETE ON audit_chains
    FOR EACH ROW EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_archives_append_only BEFORE UPDATE OR DELETE ON audit_archives
    FOR EACH ROW EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_search_no_truncate BEFORE TRUNCATE ON audit_search
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_entities_no_truncate BEFORE TRUNCATE ON audit_entities
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_chain_no_truncate BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_chains_no_truncate BEFORE TRUNCATE ON audit_chains
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_archives_no_truncate BEFORE TRUNCATE ON audit_archives
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
