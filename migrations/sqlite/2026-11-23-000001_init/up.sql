-- Every version of every resource. Append-only: content is ciphertext (see src/crypto).
CREATE TABLE resource_versions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    resource_type  TEXT    NOT NULL,
    logical_id     TEXT    NOT NULL,
    version_id     BIGINT  NOT NULL,
    last_updated   TIMESTAMP NOT NULL,
    deleted        BOOLEAN NOT NULL,
    method         TEXT    NOT NULL,
    key_version    INTEGER,
    content        BLOB,
    content_sha256 BLOB,
    UNIQUE (resource_type, logical_id, version_id)
);
CREATE INDEX resource_versions_by_type ON resource_versions (resource_type, id);
CREATE INDEX resource_versions_by_time ON resource_versions (last_updated);

CREATE TRIGGER resource_versions_append_only_update BEFORE UPDATE ON resource_versions
BEGIN SELECT RAISE(ABORT, 'resource_versions is append-only'); END;
CREATE TRIGGER resource_versions_append_only_delete BEFORE DELETE ON resource_versions
BEGIN SELECT RAISE(ABORT, 'resource_versions is append-only'); END;

-- The current version of each logical resource: uniqueness, optimistic locking, current state.
CREATE TABLE resources (
    resource_type TEXT    NOT NULL,
    logical_id    TEXT    NOT NULL,
    version_id    BIGINT  NOT NULL,
    last_updated  TIMESTAMP NOT NULL,
    deleted       BOOLEAN NOT NULL,
    PRIMARY KEY (resource_type, logical_id)
);

-- Token search index of the current versions. Values are blind indexes (HMAC), never plaintext.
CREATE TABLE token_index (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         BLOB NOT NULL,
    PRIMARY KEY (resource_type, logical_id, param, value)
);
CREATE INDEX token_index_lookup ON token_index (resource_type, param, value);
