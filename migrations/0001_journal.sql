-- The write side: the event journal of postgres-es, extended for auditors.
-- postgres-es inserts (aggregate_type, aggregate_id, sequence, event_type, event_version,
-- payload, metadata); every other column is filled here, so its inserts keep working.

CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 1) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        jsonb                        NOT NULL,
    metadata       jsonb                        NOT NULL,
    -- Global order of appends, for replay and audit.
    position       bigint GENERATED ALWAYS AS IDENTITY,
    recorded_at    timestamptz                  NOT NULL DEFAULT clock_timestamp(),
    -- SHA-256 over the previous event's hash (of the same account) and this event's
    -- canonical content: editing, deleting or reordering any past event breaks the chain.
    hash           bytea                        NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    UNIQUE (position)
);

CREATE INDEX events_recorded_at ON events (aggregate_id, recorded_at);

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          jsonb                                NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Work queue for the projector: one row per appended event, written by the trigger below in
-- the same transaction as the append, deleted by the projector in the same transaction as
-- the read-table update it caused. A crash in between leaves the row, never loses it.
CREATE TABLE projection_outbox
(
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate_id text        NOT NULL,
    sequence     bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The canonical content that the hash covers. The audit recomputes the same string from
-- the stored columns (jsonb's text form is canonical: key order and spacing are fixed).
CREATE FUNCTION event_canonical(e events) RETURNS text
    LANGUAGE sql IMMUTABLE AS
$$
SELECT e.aggregate_type || '|' || e.aggregate_id || '|' || e.sequence::text || '|' ||
       e.event_type || '|' || e.event_version || '|' || e.payload::text || '|' || e.metadata::text
$$;

CREATE FUNCTION events_before_insert() RETURNS trigger
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
    INSERT INTO projection_outbox (aggregate_id, sequence) VALUES (NEW.aggregate_id, NEW.sequence);
    RETURN NEW;
END
$$;

CREATE TRIGGER events_before_insert
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_before_insert();
