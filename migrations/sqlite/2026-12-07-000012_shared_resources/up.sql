-- A Device whose `patient` names a patient is now in that patient's compartment (R4 lists
-- Device without a parameter): the current versions already stored get their compartment rows
-- from the search index, so none of them turns shared by this upgrade.
INSERT OR IGNORE INTO resource_compartments (resource_type, logical_id, version_id, patient_id)
SELECT r.resource_type, r.logical_id, r.version_id, s.target_id
FROM resources r
JOIN search_reference s ON s.resource_type = r.resource_type AND s.logical_id = r.logical_id
WHERE r.resource_type = 'Device' AND r.deleted = 0 AND s.param = 'patient'
  AND (s.target_type = 'Patient' OR s.target_type IS NULL);

-- Earlier versions of Devices: which patient they named is not in the index (it holds current
-- versions only). They get a compartment row for nobody (''), so that row-level security never
-- takes them for shared; the API still decides each on its content.
INSERT OR IGNORE INTO resource_compartments (resource_type, logical_id, version_id, patient_id)
SELECT v.resource_type, v.logical_id, v.version_id, ''
FROM resource_versions v
JOIN resources r ON r.resource_type = v.resource_type AND r.logical_id = v.logical_id
WHERE v.resource_type = 'Device' AND v.version_id < r.version_id
  AND NOT EXISTS (SELECT 1 FROM resource_compartments c WHERE c.resource_type = v.resource_type
                  AND c.logical_id = v.logical_id AND c.version_id = v.version_id);
