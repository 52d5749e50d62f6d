DROP TABLE token_index;
DROP TABLE resources;
DROP TRIGGER resource_versions_append_only_delete;
DROP TRIGGER resource_versions_append_only_update;
DROP TABLE resource_versions;
