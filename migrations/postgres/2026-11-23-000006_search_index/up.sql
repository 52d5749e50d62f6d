-- Search indexes of the current version of each resource, one table per parameter type
-- (src/search). Values of parameters that identify a person are kept only as blind indexes
-- (`blind`: HMAC of the normalized value, and of its prefixes for strings); a birth date keeps
-- its year in plaintext for range pruning, candidates being re-checked after decryption.
CREATE TABLE search_string (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         TEXT,
    blind         BYTEA
);
CREATE INDEX search_string_value ON search_string (resource_type, param, value);
CREATE INDEX search_string_blind ON search_string (resource_type, param, blind);
CREATE INDEX search_string_resource ON search_string (resource_type, logical_id);

CREATE TABLE search_token (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    system        TEXT,
    code          TEXT,
    blind         BYTEA
);
CREATE INDEX search_token_code ON search_token (resource_type, param, code, system);
CREATE INDEX search_token_blind ON search_token (resource_type, param, blind);
CREATE INDEX search_token_resource ON search_token (resource_type, logical_id);

CREATE TABLE search_date (
    resource_type TEXT      NOT NULL,
    logical_id    TEXT      NOT NULL,
    param         TEXT      NOT NULL,
    start_at      TIMESTAMP,
    end_at        TIMESTAMP,
    year          INTEGER,
    blind         BYTEA
);
CREATE INDEX search_date_range ON search_date (resource_type, param, start_at, end_at);
CREATE INDEX search_date_blind ON search_date (resource_type, param, blind);
CREATE INDEX search_date_resource ON search_date (resource_type, logical_id);

CREATE TABLE search_reference (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    target_type   TEXT,
    target_id     TEXT NOT NULL
);
CREATE INDEX search_reference_target ON search_reference (resource_type, param, target_id, target_type);
CREATE INDEX search_reference_reverse ON search_reference (target_type, target_id);
CREATE INDEX search_reference_resource ON search_reference (resource_type, logical_id);

CREATE TABLE search_number (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         DOUBLE PRECISION NOT NULL
);
CREATE INDEX search_number_value ON search_number (resource_type, param, value);
CREATE INDEX search_number_resource ON search_number (resource_type, logical_id);

CREATE TABLE search_quantity (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         DOUBLE PRECISION NOT NULL,
    system        TEXT,
    code          TEXT
);
CREATE INDEX search_quantity_value ON search_quantity (resource_type, param, code, value);
CREATE INDEX search_quantity_resource ON search_quantity (resource_type, logical_id);

CREATE TABLE search_uri (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         TEXT NOT NULL
);
CREATE INDEX search_uri_value ON search_uri (resource_type, param, value);
CREATE INDEX search_uri_resource ON search_uri (resource_type, logical_id);
