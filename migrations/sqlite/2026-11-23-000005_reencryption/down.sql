DROP TRIGGER resource_versions_append_only_update;
CREATE TRIGGER resource_versions_append_only_update BEFORE UPDATE ON resource_versions
BEGIN SELECT RAISE(ABORT, 'resource_versions is append-only'); END;
DROP TRIGGER audit_events_no_update;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
