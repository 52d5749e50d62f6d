-- When each account was last used (issue 25: the compliance report's access review): a user's
-- last sign-in, a client's last token (written at most once an hour per node).
ALTER TABLE auth_users ADD COLUMN last_sign_in_at TIMESTAMP;
ALTER TABLE auth_clients ADD COLUMN last_token_at TIMESTAMP;
