-- The built-in SMART authorization server (issue 6): users, clients and the short-lived state of
-- the OAuth flows. Every secret a client or browser holds (session cookie, authorization code,
-- refresh token, launch value) is stored only as its SHA-256: a copy of this database lets no one
-- act as a user. Passwords and client secrets are argon2 hashes; TOTP secrets are sealed with the
-- content key (they must be read back to verify a code) and re-encrypted by key rotation.
CREATE TABLE auth_users (
    id             TEXT PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    password_hash  TEXT NOT NULL,
    fhir_user      TEXT,
    roles          TEXT NOT NULL DEFAULT '',
    totp_secret    BLOB,
    -- the last time step a code was accepted for: a code is never accepted twice
    totp_last_step BIGINT NOT NULL DEFAULT 0,
    disabled       BOOLEAN NOT NULL DEFAULT FALSE,
    failed_logins  INTEGER NOT NULL DEFAULT 0,
    locked_until   TIMESTAMP,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE auth_clients (
    client_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    -- public (a browser or native app: PKCE, no secret) or confidential (a secret or a key)
    client_type   TEXT NOT NULL,
    secret_hash   TEXT,
    jwks          TEXT,
    jwks_uri      TEXT,
    -- one per line, compared exactly
    redirect_uris TEXT NOT NULL DEFAULT '',
    scopes        TEXT NOT NULL,
    disabled      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMP NOT NULL
);

-- A browser's sign-in: after the password (mfa_done false) and after the second factor.
CREATE TABLE auth_sessions (
    id_hash    BLOB PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES auth_users (id) ON DELETE CASCADE,
    mfa_done   BOOLEAN NOT NULL,
    amr        TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    last_seen  TIMESTAMP NOT NULL
);

CREATE TABLE auth_codes (
    code_hash      BLOB PRIMARY KEY,
    client_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    scope          TEXT NOT NULL,
    patient        TEXT,
    encounter      TEXT,
    code_challenge TEXT NOT NULL,
    nonce          TEXT,
    amr            TEXT NOT NULL,
    auth_time      TIMESTAMP NOT NULL,
    expires_at     TIMESTAMP NOT NULL
);

-- Refresh tokens rotate: each use spends the token and issues the next of its family; a spent
-- token presented again revokes the whole family (it was stolen, or the client was).
CREATE TABLE auth_refresh_tokens (
    token_hash        BLOB PRIMARY KEY,
    family_id         TEXT NOT NULL,
    client_id         TEXT NOT NULL,
    user_id           TEXT,
    scope             TEXT NOT NULL,
    patient           TEXT,
    encounter         TEXT,
    amr               TEXT NOT NULL,
    status            TEXT NOT NULL,
    issued_at         TIMESTAMP NOT NULL,
    idle_expires_at   TIMESTAMP NOT NULL,
    family_expires_at TIMESTAMP NOT NULL
);
CREATE INDEX auth_refresh_tokens_by_family ON auth_refresh_tokens (family_id);

-- EHR launch values minted by `fhirvault admin launch`.
CREATE TABLE auth_launches (
    launch_hash BLOB PRIMARY KEY,
    patient     TEXT,
    encounter   TEXT,
    client_id   TEXT,
    expires_at  TIMESTAMP NOT NULL
);

-- private_key_jwt assertions seen, until they expire: a jti is accepted once per client.
CREATE TABLE auth_assertions (
    client_id  TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    PRIMARY KEY (client_id, jti)
);

-- Access tokens revoked before they expire (RFC 7009), by jti, until they expire.
CREATE TABLE auth_revoked_tokens (
    jti        TEXT PRIMARY KEY,
    revoked_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL
);
