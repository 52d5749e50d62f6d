-- Row-level security on resource content: a session sees the versions its access context
-- allows, even if a query forgets to filter. The server sets the context on every checkout
-- (`fhirvault.access`: 'all', or 'patient:<id>'); without it, nothing is visible (fail closed).
-- RLS binds the server's role only if it is not a superuser, has no BYPASSRLS and does not own
-- the tables: run migrations as the owner (migration_database_url) and serve as another role.
-- The policy is written inline (not as a function) so that the planner evaluates the cheap
-- 'all' test once and the compartment lookup only for patient contexts.
ALTER TABLE resource_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE resource_versions FORCE ROW LEVEL SECURITY;
-- Without a WITH CHECK clause the USING expression also checks inserted rows; writes insert the
-- version's compartments first, so that check sees them.
CREATE POLICY fhirvault_access ON resource_versions
    USING (
        current_setting('fhirvault.access', true) = 'all'
        OR EXISTS (
            SELECT 1 FROM resource_compartments c
            WHERE c.resource_type = resource_versions.resource_type
              AND c.logical_id = resource_versions.logical_id
              AND c.version_id = resource_versions.version_id
              AND current_setting('fhirvault.access', true) LIKE 'patient:%'
              AND c.patient_id = substr(current_setting('fhirvault.access', true), 9)));
