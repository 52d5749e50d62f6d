-- AuditEvent search answers site and address from the derived row (the address as a blind
-- index: a patient app's network address may identify the patient), and agent roles and a
-- search's query entity from derived entity rows. Derived rows are rebuilt from the sealed
-- events: every chain's derived position goes back to its start (or its last archived record),
-- and the deriver fills them again in the background.
DROP TRIGGER audit_search_no_delete;
DROP TRIGGER audit_entities_no_delete;
DELETE FROM audit_search;
DELETE FROM audit_entities;
ALTER TABLE audit_search ADD COLUMN site TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_search ADD COLUMN address BLOB;
CREATE INDEX audit_search_by_site ON audit_search (site, recorded);
CREATE INDEX audit_search_by_address ON audit_search (address) WHERE address IS NOT NULL;
UPDATE audit_index_progress
   SET indexed_seq = COALESCE((SELECT MAX(a.up_to_seq) FROM audit_archives a WHERE a.chain_id = audit_index_progress.chain_id), 0);
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
