-- Row-level security on resource content: a session sees the versions its access context
-- allows, even if a query forgets to filter. The server sets the context on every checkout
-- (`fhirvault.access`: 'all', or 'patient:<id>'); without it, nothing is visible (fail closed).
-- RLS binds the server's role only if it is not a superuser, has no BYPASSRLS and does not own
-- the tables: run migrations as the owner (migration_database_url) and serve as another role.
CREATE FUNCTION fhirvault_access_allows(rt TEXT, lid TEXT, vid BIGINT) RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN current_setting('fhirvault.access', true) = 'all' THEN TRUE
        WHEN current_setting('fhirvault.access', true) LIKE 'patient:%' THEN EXISTS (
            SELECT 1 FROM resource_compartments c
            WHERE c.resource_type = rt AND c.logical_id = lid AND c.version_id = vid
              AND c.patient_id = substr(current_setting('fhirvault.access', true), 9))
        ELSE FALSE
    END
$$;

ALTER TABLE resource_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE resource_versions FORCE ROW LEVEL SECURITY;
-- Writes insert the version's compartments first, so the check below sees them.
CREATE POLICY fhirvault_access ON resource_versions
    USING (fhirvault_access_allows(resource_type, logical_id, version_id))
    WITH CHECK (fhirvault_access_allows(resource_type, logical_id, version_id));
