-- The appender links the hash chain; the journal checks every link, once per statement
-- (issue 9).
--
-- Until now a row trigger computed each event's hash: per event, a PL/pgSQL call, a query for
-- the previous event's hash and the hash itself, about a third of the server's work per
-- appended event under ledger-bench's spread load (docs/BENCHMARKS.md). The command executor
-- knows each account's last hash (it loads it with the account's state) and now sends every
-- event's hash with the event (crates/store/src/chain.rs), and its payload and metadata as the
-- exact text the hash covers.
--
-- The journal still guarantees the chain, for every writer:
-- - an insert that gives no hash gets it computed here, row by row, exactly as before (the row
--   trigger of migration 0011, now fired only for such rows);
-- - an insert that gives a hash has it checked after the statement, for all the statement's
--   events at once, against the stored text and the previous event's stored hash; a wrong
--   link fails the statement, so no event with a broken link is ever stored;
-- - `recorded_at` is checked the same way: it must be the time of the insert (to within a
--   second of the statement's run), so that no event can be stored back-dated or post-dated.
--   Before, the row trigger overwrote whatever was given.
-- The outbox rows are written by the same statement-level trigger as before.

DROP TRIGGER events_before_insert ON events;
CREATE TRIGGER events_before_insert
    BEFORE INSERT ON events
    FOR EACH ROW
    WHEN (NEW.hash IS NULL)
    EXECUTE FUNCTION events_before_insert();

CREATE OR REPLACE FUNCTION events_after_insert() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    broken record;
BEGIN
    SELECT a.aggregate_id, a.sequence INTO broken
      FROM appended a
     WHERE a.hash IS DISTINCT FROM sha256(
               coalesce((SELECT p.hash FROM events p
                          WHERE p.aggregate_type = a.aggregate_type
                            AND p.aggregate_id = a.aggregate_id
                            AND p.sequence = a.sequence - 1), '\x'::bytea)
               || convert_to(a.aggregate_type || '|' || a.aggregate_id || '|' || a.sequence::text
                             || '|' || a.event_type || '|' || a.event_version || '|'
                             || a.payload::text || '|' || a.metadata::text, 'UTF8'))
        OR a.recorded_at < statement_timestamp() - interval '1 second'
        OR a.recorded_at > clock_timestamp() + interval '1 second'
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'event % of account % does not continue the journal''s hash chain (or is not dated now)',
            broken.sequence, broken.aggregate_id
            USING ERRCODE = 'check_violation',
                  HINT = 'leave hash and recorded_at out of the insert to have them computed';
    END IF;
    INSERT INTO projection_outbox (aggregate_id, sequence)
    SELECT aggregate_id, sequence FROM appended ORDER BY position;
    RETURN NULL;
END
$$;
