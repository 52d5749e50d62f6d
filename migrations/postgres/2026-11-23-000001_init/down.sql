DROP TABLE token_index;
DROP TABLE resources;
DROP TABLE resource_versions;
DROP FUNCTION fhirvault_refuse_change();
