DROP TABLE audit_archives;
DROP TABLE audit_checkpoints;
DROP TABLE audit_chain;
DROP TABLE audit_entities;
DROP TABLE audit_events;
