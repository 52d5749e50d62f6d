DROP TRIGGER audit_search_no_delete;
DROP TRIGGER audit_entities_no_delete;
DELETE FROM audit_search;
DELETE FROM audit_entities;
DROP INDEX audit_search_by_site;
DROP INDEX audit_search_by_address;
ALTER TABLE audit_search DROP COLUMN site;
ALTER TABLE audit_search DROP COLUMN address;
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
