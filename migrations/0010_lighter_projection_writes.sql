-- Fewer index and page writes per projected event (issue 9).
--
-- A video task has no provider id when it is charged (the projector inserts it then) and gets
-- one when the provider accepts it. The provider-id index held an entry for every charged
-- task's NULL, written by every insert and never read: lookups by provider id are for tasks
-- that have one, and this partial index serves them (`provider_task_id = $1` implies
-- `provider_task_id IS NOT NULL`).
DROP INDEX video_tasks_provider;
CREATE INDEX video_tasks_provider ON video_tasks (provider_task_id)
    WHERE provider_task_id IS NOT NULL;

-- Every projector batch updates the checkpoint row (`users`) of each of its accounts. Room
-- left on each page lets those updates stay on the page (HOT), with no new entry in the
-- primary key's index; at the default fill, a fifth of them were not (pg_stat_user_tables
-- under ledger-bench's spread load). Pages written from now on keep that room.
ALTER TABLE users SET (fillfactor = 80);
