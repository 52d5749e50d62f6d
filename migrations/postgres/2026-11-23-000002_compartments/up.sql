-- The patient compartment(s) of every resource version (official CompartmentDefinition),
-- computed on write. Append-only, like the versions it describes.
CREATE TABLE resource_compartments (
    resource_type TEXT   NOT NULL,
    logical_id    TEXT   NOT NULL,
    version_id    BIGINT NOT NULL,
    patient_id    TEXT   NOT NULL,
    PRIMARY KEY (resource_type, logical_id, version_id, patient_id)
);
CREATE INDEX resource_compartments_by_patient ON resource_compartments (patient_id, resource_type);

CREATE TRIGGER resource_compartments_append_only BEFORE UPDATE OR DELETE ON resource_compartments
    FOR EACH ROW EXECUTE FUNCTION fhirvault_refuse_change();
