-- Every version of every resource. Append-only: content is ciphertext (see src/crypto).
CREATE TABLE resource_versions (
    id             BIGSERIAL PRIMARY KEY,
    resource_type  TEXT      NOT NULL,
    logical_id     TEXT      NOT NULL,
    version_id     BIGINT    NOT NULL,
    last_updated   TIMESTAMP NOT NULL,
    deleted        BOOLEAN   NOT NULL,
    method         TEXT      NOT NULL,
    key_version    INTEGER,
    content        BYTEA,
    content_sha256 BYTEA,
    UNIQUE (resource_type, logical_id, version_id)
);
CREATE INDEX resource_versions_by_type ON resource_versions (resource_type, id);
CREATE INDEX resource_versions_by_time ON resource_versions (last_updated);

CREATE FUNCTION fhirvault_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER resource_versions_append_only BEFORE UPDATE OR DELETE ON resource_versions
    FOR EACH ROW EXECUTE FUNCTION fhirvault_refuse_change();
CREATE TRIGGER resource_versions_no_truncate BEFORE TRUNCATE ON resource_versions
    FOR EACH STATEMENT EXECUTE FUNCTION fhirvault_refuse_change();

-- The current version of each logical resource: uniqueness, optimistic locking, current state.
CREATE TABLE resources (
    resource_type TEXT      NOT NULL,
    logical_id    TEXT      NOT NULL,
    version_id    BIGINT    NOT NULL,
    last_updated  TIMESTAMP NOT NULL,
    deleted       BOOLEAN   NOT NULL,
    PRIMARY KEY (resource_type, logical_id)
);

-- Token search index of the current versions. Values are blind indexes (HMAC), never plaintext.
CREATE TABLE token_index (
    resource_type TEXT  NOT NULL,
    logical_id    TEXT  NOT NULL,
    param         TEXT  NOT NULL,
    value         BYTEA NOT NULL,
    PRIMARY KEY (resource_type, logical_id, param, value)
);
CREATE INDEX token_index_lookup ON token_index (resource_type, param, value);
