DROP TRIGGER audit_search_no_truncate ON audit_search;
DROP TRIGGER audit_entities_no_truncate ON audit_entities;
TRUNCATE audit_search, audit_entities;
DROP INDEX audit_search_by_site;
DROP INDEX audit_search_by_address;
ALTER TABLE audit_search DROP COLUMN site;
ALTER TABLE audit_search DROP COLUMN address;
UPDATE audit_index_progress p
   SET indexed_seq = COALESCE((SELECT MAX(a.up_to_seq) FROM audit_archives a WHERE a.chain_id = p.chain_id), 0);
CREATE TRIGGER audit_search_no_truncate BEFORE TRUNCATE ON audit_search
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_entities_no_truncate BEFORE TRUNCATE ON audit_entities
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
