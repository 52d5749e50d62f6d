ALTER TABLE auth_clients DROP COLUMN last_token_at;
ALTER TABLE auth_users DROP COLUMN last_sign_in_at;
