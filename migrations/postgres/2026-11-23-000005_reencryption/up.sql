-- Key rotation re-encrypts stored ciphertext: an UPDATE may change the ciphertext and its key
-- version, and nothing else (the plaintext digest stays, so a read still proves the content is
-- the one written). Only the tables' owner has UPDATE; everything else remains append-only.
CREATE FUNCTION fhirvault_versions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
      IF (NEW.id, NEW.resource_type, NEW.logical_id, NEW.version_id, NEW.last_updated, NEW.deleted,
            NEW.method, NEW.content_sha256, NEW.content IS NULL)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.resource_type, OLD.logical_id, OLD.version_id, OLD.last_updated, OLD.deleted,
            OLD.method, OLD.content_sha256, OLD.content IS NULL) THEN
        RETURN NEW;
      END IF;
    END IF;
    RAISE EXCEPTION '% is append-only (only re-encryption may update a row)', TG_TABLE_NAME;
END;
$$;
DROP TRIGGER resource_versions_append_only ON resource_versions;
CREATE TRIGGER resource_versions_append_only BEFORE UPDATE OR DELETE ON resource_versions
    FOR EACH ROW EXECUTE FUNCTION fhirvault_versions_guard();

CREATE OR REPLACE FUNCTION fhirvault_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    seq BIGINT;
BEGIN
    -- (nested: the row fields exist only for audit_events, and an outer AND is not short-circuited)
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_events' THEN
        IF (NEW.id, NEW.recorded, NEW.type_code, NEW.subtype, NEW.action, NEW.outcome, NEW.agent)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.recorded, OLD.type_code, OLD.subtype, OLD.action, OLD.outcome, OLD.agent) THEN
            RETURN NEW;
        END IF;
    END IF;
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
