DROP TABLE auth_revoked_tokens;
DROP TABLE auth_assertions;
DROP TABLE auth_launches;
DROP TABLE auth_refresh_tokens;
DROP TABLE auth_codes;
DROP TABLE auth_sessions;
DROP TABLE auth_clients;
DROP TABLE auth_users;
