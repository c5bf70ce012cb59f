-- The journal's index on (aggregate_id, recorded_at), from migration 0001, goes (issue 9).
--
-- No query takes it: an account's events, up to a time or not (`credit_store::queries::
-- account_events`, which the balance at a time replays), are read in sequence order through
-- the primary key, and every other read of the journal goes by account and sequence or by
-- position. Yet every append paid for it: about 9 µs of server time per event, a twentieth
-- of the append's (docs/BENCHMARKS.md, third sitting's `pgbench` figures). It also misled
-- the planner: on a journal without statistics, the row trigger's lookup of the previous
-- hash took it and read the account's whole history per event.
DROP INDEX IF EXISTS events_recorded_at;
