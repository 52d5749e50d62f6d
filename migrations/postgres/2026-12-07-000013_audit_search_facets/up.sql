-- AuditEvent search answers site and address from the derived row (the address as a blind
-- index: a patient app's network address may identify the patient), and agent roles and a
-- search's query entity from derived entity rows. Derived rows are rebuilt from the sealed
-- events: every chain's derived position goes back to its start (or its last archived record),
-- and the derivers of the nodes fill them again in the background.
DROP TRIGGER audit_search_no_truncate ON audit_search;
DROP TRIGGER audit_entities_no_truncate ON audit_entities;
TRUNCATE audit_search, audit_entities;
ALTER TABLE audit_search ADD COLUMN site TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_search ADD COLUMN address BYTEA;
CREATE INDEX audit_search_by_site ON audit_search (site, recorded);
CREATE INDEX audit_search_by_address ON audit_search (address) WHERE address IS NOT NULL;
UPDATE audit_index_progress p
   SET indexed_seq = COALESCE((SELECT MAX(a.up_to_seq) FROM audit_archives a WHERE a.chain_id = p.chain_id), 0);
CREATE TRIGGER audit_search_no_truncate BEFORE TRUNCATE ON audit_search
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER audit_entities_no_truncate BEFORE TRUNCATE ON audit_entities
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();
