DROP POLICY fhirvault_access ON resource_versions;
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
-- Device compartment rows stay: resource_compartments is append-only, and an older server
-- that never reads them is no less strict for their presence.
