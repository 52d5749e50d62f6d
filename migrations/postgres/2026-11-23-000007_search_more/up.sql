-- Search, continued (issue 3): the written form of non-PHI strings (:exact), the display text of
-- non-PHI codes (:text), composite parameters, server-side paging state, and partial indexes
-- (a row is either plaintext or blind, so each index only holds the rows it can serve: half the
-- index maintenance on every write).
ALTER TABLE search_string ADD COLUMN exact TEXT;
ALTER TABLE search_token ADD COLUMN text TEXT;
-- birth dates are blind buckets now (year, month, day), no plaintext year
ALTER TABLE search_date DROP COLUMN year;

DROP INDEX search_string_value;
DROP INDEX search_string_blind;
CREATE INDEX search_string_value ON search_string (resource_type, param, value) WHERE value IS NOT NULL;
CREATE INDEX search_string_blind ON search_string (resource_type, param, blind) WHERE blind IS NOT NULL;
DROP INDEX search_token_code;
DROP INDEX search_token_blind;
CREATE INDEX search_token_code ON search_token (resource_type, param, code, system) WHERE code IS NOT NULL;
CREATE INDEX search_token_blind ON search_token (resource_type, param, blind) WHERE blind IS NOT NULL;
CREATE INDEX search_token_text ON search_token (resource_type, param, text) WHERE text IS NOT NULL;
DROP INDEX search_date_range;
DROP INDEX search_date_blind;
CREATE INDEX search_date_range ON search_date (resource_type, param, start_at, end_at) WHERE start_at IS NOT NULL;
CREATE INDEX search_date_blind ON search_date (resource_type, param, blind) WHERE blind IS NOT NULL;

-- One row per combination of a composite parameter's components on one element (a code and
-- its value): the first component a token (or reference), the others typed.
CREATE TABLE search_composite (
    resource_type TEXT NOT NULL,
    logical_id    TEXT NOT NULL,
    param         TEXT NOT NULL,
    c1_system     TEXT,
    c1_code       TEXT NOT NULL,
    c2_system     TEXT,
    c2_code       TEXT,
    c2_number     DOUBLE PRECISION,
    c2_start      TIMESTAMP,
    c2_end        TIMESTAMP,
    c2_text       TEXT,
    c3_number     DOUBLE PRECISION
);
CREATE INDEX search_composite_code ON search_composite (resource_type, param, c1_code, c1_system);
CREATE INDEX search_composite_resource ON search_composite (resource_type, logical_id);

-- Paging: the query of a search with more than one page, sealed, under a random token; page
-- links carry only the token (no search value, hence no PHI, in any URL the server makes).
CREATE TABLE search_pages (
    token      TEXT PRIMARY KEY,
    expires_at TIMESTAMP NOT NULL,
    state      BYTEA NOT NULL
);
CREATE INDEX search_pages_expiry ON search_pages (expires_at);
