-- The ledger's v2 layout cannot be folded back into one chain without breaking its hashes:
-- restore a backup taken before the upgrade instead.
DO $$ BEGIN RAISE EXCEPTION 'the audit ledger v2 migration cannot be reverted; restore a backup'; END $$;
