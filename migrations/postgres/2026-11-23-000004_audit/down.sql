DROP TABLE audit_archives;
DROP TABLE audit_checkpoints;
DROP TABLE audit_chain;
DROP TABLE audit_entities;
DROP TABLE audit_events;
DROP FUNCTION fhirvault_audit_guard();
DROP FUNCTION fhirvault_archived_up_to();
