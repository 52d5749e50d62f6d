-- Break-glass uses (issue 25): one row per emergency-access token, written when it is issued,
-- so that the compliance report and the console list every use in a period with its reason and
-- whether it was reviewed. The reason is sealed (AES-256-GCM, bound to the token id): it is
-- shown to the security officer, never stored in plaintext. A review is recorded once.
CREATE TABLE break_glass_uses (
    token_id       TEXT PRIMARY KEY NOT NULL,
    issued_at      TIMESTAMP NOT NULL,
    expires_at     TIMESTAMP NOT NULL,
    subject        TEXT NOT NULL,
    fhir_user      TEXT NOT NULL,
    client_id      TEXT,
    reason         BLOB NOT NULL,
    reviewed_at    TIMESTAMP,
    reviewed_by    TEXT
);
CREATE INDEX break_glass_uses_by_time ON break_glass_uses (issued_at);
