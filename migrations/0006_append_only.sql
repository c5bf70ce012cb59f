-- History is append-only. `events` (the journal) and `stripe_events` (the deliveries Stripe
-- made to us) are history: nothing ever updates or deletes a row of them, so the database
-- refuses it, for every role, superusers included. Everything else is cache rebuilt from the
-- journal (`snapshots`, `projection_outbox`, the read tables) and stays writable.
--
-- A superuser can still switch the triggers off (`SET session_replication_role = replica`, or
-- `ALTER TABLE ... DISABLE TRIGGER` as the table owner): that is why the service must not run
-- as one. It runs as a member of `credit_ledger_app` (below), which can neither. What a
-- superuser could still do unseen, checkpoints kept outside the database catch (docs/AUDITING.md).

CREATE FUNCTION refuse_history_change() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'history is never rewritten; record a correcting event instead';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_history_change();
CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_history_change();

CREATE TRIGGER stripe_events_append_only
    BEFORE UPDATE OR DELETE ON stripe_events
    FOR EACH ROW EXECUTE FUNCTION refuse_history_change();
CREATE TRIGGER stripe_events_no_truncate
    BEFORE TRUNCATE ON stripe_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_history_change();

-- The service's least-privilege role: INSERT and SELECT on history, full use of the cache
-- tables, read-only on `schema_migrations` (migrations run as the owner, `credit-ledger
-- migrate`; the service then finds nothing to apply). NOLOGIN: operators log in with their own
-- role made a member of it (docs/OPERATIONS.md). Roles belong to the whole cluster, so it is
-- created once (only when the migrating role may create roles) and granted in each database.
DO
$$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'credit_ledger_app') THEN
        IF EXISTS (SELECT 1 FROM pg_roles
                    WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            BEGIN
                CREATE ROLE credit_ledger_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                    NOBYPASSRLS;
            EXCEPTION
                -- Another database of the same cluster created it at the same moment.
                WHEN duplicate_object OR unique_violation THEN NULL;
            END;
        ELSE
            RAISE NOTICE 'role credit_ledger_app not created (% may not create roles): see docs/OPERATIONS.md', current_user;
            RETURN;
        END IF;
    END IF;

    EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO credit_ledger_app';
    EXECUTE 'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO credit_ledger_app';
    EXECUTE 'REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON events, stripe_events FROM credit_ledger_app';
    EXECUTE 'REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON schema_migrations FROM credit_ledger_app';
END
$$;
