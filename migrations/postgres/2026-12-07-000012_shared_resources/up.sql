-- Shared resources (issue 21): a patient-context session also sees the versions of the types
-- the server shares (`fhirvault.shared`, a comma-wrapped list the server sets on each session:
-- ',Practitioner,Organization,'), as long as the version lies in no patient's compartment.
-- Without the setting nothing more is visible (fail closed). Inserts keep the old rule (WITH
-- CHECK): a patient-context session never writes a shared resource.
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
              AND c.patient_id = substr(current_setting('fhirvault.access', true), 9))
        OR (
            current_setting('fhirvault.access', true) LIKE 'patient:%'
            AND strpos(current_setting('fhirvault.shared', true), ',' || resource_versions.resource_type || ',') > 0
            AND NOT EXISTS (
                SELECT 1 FROM resource_compartments c
                WHERE c.resource_type = resource_versions.resource_type
                  AND c.logical_id = resource_versions.logical_id
                  AND c.version_id = resource_versions.version_id)))
    WITH CHECK (
        current_setting('fhirvault.access', true) = 'all'
        OR EXISTS (
            SELECT 1 FROM resource_compartments c
            WHERE c.resource_type = resource_versions.resource_type
              AND c.logical_id = resource_versions.logical_id
              AND c.version_id = resource_versions.version_id
              AND current_setting('fhirvault.access', true) LIKE 'patient:%'
              AND c.patient_id = substr(current_setting('fhirvault.access', true), 9)));

-- A Device whose `patient` names a patient is now in that patient's compartment (R4 lists
-- Device without a parameter): the current versions already stored get their compartment rows
-- from the search index, so none of them turns shared by this upgrade.
INSERT INTO resource_compartments (resource_type, logical_id, version_id, patient_id)
SELECT r.resource_type, r.logical_id, r.version_id, s.target_id
FROM resources r
JOIN search_reference s ON s.resource_type = r.resource_type AND s.logical_id = r.logical_id
WHERE r.resource_type = 'Device' AND r.deleted = false AND s.param = 'patient'
  AND (s.target_type = 'Patient' OR s.target_type IS NULL)
ON CONFLICT DO NOTHING;

-- (row-level security binds the tables' owner too: this migration reads every version)
SELECT set_config('fhirvault.access', 'all', true);

-- Earlier versions of Devices: which patient they named is not in the index (it holds current
-- versions only). They get a compartment row for nobody (''), so that row-level security never
-- takes them for shared; the API still decides each on its content.
INSERT INTO resource_compartments (resource_type, logical_id, version_id, patient_id)
SELECT v.resource_type, v.logical_id, v.version_id, ''
FROM resource_versions v
JOIN resources r ON r.resource_type = v.resource_type AND r.logical_id = v.logical_id
WHERE v.resource_type = 'Device' AND v.version_id < r.version_id
  AND NOT EXISTS (SELECT 1 FROM resource_compartments c WHERE c.resource_type = v.resource_type
                  AND c.logical_id = v.logical_id AND c.version_id = v.version_id) ON CONFLICT DO NOTHING;
