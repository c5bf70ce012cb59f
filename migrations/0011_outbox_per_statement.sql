-- The outbox row of each appended event, written once per statement (issue 9).
--
-- The row trigger of migration 0001 inserted each event's outbox row by a statement of its
-- own, one executor call per event (14 µs an event of the append's 115 in server time under
-- ledger-bench's spread load). A statement-level trigger after the insert now writes the
-- rows of all the statement's events in one insert, from the statement's transition table,
-- in the order of their `position` (the order of the append, which the projector takes them
-- in). It runs inside the inserting statement, so its rows commit or roll back with the
-- events exactly as before: every insert into `events`, by whoever, leaves one outbox row
-- per event. The row trigger keeps the hash chain and `recorded_at`.

CREATE OR REPLACE FUNCTION events_before_insert() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    prev bytea;
BEGIN
    NEW.recorded_at := clock_timestamp();
    IF NEW.sequence > 1 THEN
        SELECT hash INTO prev FROM events
         WHERE aggregate_type = NEW.aggregate_type
           AND aggregate_id = NEW.aggregate_id
           AND sequence = NEW.sequence - 1;
    END IF;
    NEW.hash := sha256(coalesce(prev, '\x'::bytea) || convert_to(event_canonical(NEW), 'UTF8'));
    RETURN NEW;
END
$$;

CREATE FUNCTION events_after_insert() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO projection_outbox (aggregate_id, sequence)
    SELECT aggregate_id, sequence FROM appended ORDER BY position;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_after_insert
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT EXECUTE FUNCTION events_after_insert();
