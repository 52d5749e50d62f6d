DROP TRIGGER resource_versions_append_only ON resource_versions;
CREATE TRIGGER resource_versions_append_only BEFORE UPDATE OR DELETE ON resource_versions
    FOR EACH ROW EXECUTE FUNCTION fhirvault_refuse_change();
DROP FUNCTION fhirvault_versions_guard();
