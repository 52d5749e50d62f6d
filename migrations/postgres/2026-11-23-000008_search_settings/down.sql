DROP TABLE search_settings;
CREATE TABLE token_index (
    resource_type TEXT  NOT NULL,
    logical_id    TEXT  NOT NULL,
    param         TEXT  NOT NULL,
    value         BYTEA NOT NULL,
    PRIMARY KEY (resource_type, logical_id, param, value)
);
CREATE INDEX token_index_lookup ON token_index (resource_type, param, value);
