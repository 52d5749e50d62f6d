-- Key rotation re-encrypts stored ciphertext: an UPDATE may change the ciphertext and its key
-- version, and nothing else (the plaintext digest stays, so a read still proves the content is
-- the one written). Everything else about these rows remains append-only.
DROP TRIGGER resource_versions_append_only_update;
CREATE TRIGGER resource_versions_append_only_update BEFORE UPDATE ON resource_versions
WHEN OLD.id IS NOT NEW.id OR OLD.resource_type IS NOT NEW.resource_type OR OLD.logical_id IS NOT NEW.logical_id
  OR OLD.version_id IS NOT NEW.version_id OR OLD.last_updated IS NOT NEW.last_updated
  OR OLD.deleted IS NOT NEW.deleted OR OLD.method IS NOT NEW.method
  OR OLD.content_sha256 IS NOT NEW.content_sha256 OR (OLD.content IS NULL) <> (NEW.content IS NULL)
BEGIN SELECT RAISE(ABORT, 'resource_versions is append-only (only re-encryption may update a row)'); END;

DROP TRIGGER audit_events_no_update;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
WHEN OLD.id IS NOT NEW.id OR OLD.recorded IS NOT NEW.recorded OR OLD.type_code IS NOT NEW.type_code
  OR OLD.subtype IS NOT NEW.subtype OR OLD.action IS NOT NEW.action OR OLD.outcome IS NOT NEW.outcome
  OR OLD.agent IS NOT NEW.agent
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only (only re-encryption may update a row)'); END;
