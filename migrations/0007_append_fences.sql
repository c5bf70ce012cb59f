-- Append fences: every append statement of the command executor also inserts one row here,
-- under a key of its own (a UUIDv7, so keys sort by time), in the same transaction as its
-- events. When the connection breaks after the statement was sent, the executor learns
-- whether it committed by inserting the same key itself (`ON CONFLICT DO NOTHING`): a
-- conflict means the append committed; a row inserted means it did not and now never will
-- (its own insert of the key would conflict). An append still running when the check comes
-- is waited for. This is what lets the service answer "done" or "not done" after a broken
-- connection instead of "unknown" (docs/OPERATIONS.md, "Faults survived").
--
-- Fences are cache, not history: the executor deletes those older than ten minutes.
CREATE TABLE append_fences (
    id uuid PRIMARY KEY
);

DO
$$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'credit_ledger_app') THEN
        GRANT SELECT, INSERT, DELETE ON append_fences TO credit_ledger_app;
    END IF;
END
$$;
