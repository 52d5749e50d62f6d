-- Conditional writes now run on the search engine (issue 3, point 8): the identifier blind
-- index of the foundation is replaced by search_token's blind rows.
DROP TABLE token_index;

-- What the search index was built under (the registry's fingerprint: definitions, identifying
-- parameters, row format). The server refuses to start on an index built under another one,
-- which `fhirvault reindex` rebuilds; an index that silently disagreed with its queries would
-- miss matches, or hold in plaintext what is now configured as identifying.
CREATE TABLE search_settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
