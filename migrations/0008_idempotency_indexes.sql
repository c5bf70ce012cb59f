-- An account remembers only its open tasks, its recent settled tasks and its recent
-- adjustments (crates/domain/src/account.rs), so that its state does not grow with its
-- history. Duplicate ids stay refused exactly, for every id ever used, by these indexes: the
-- append of a second `CreditsDeducted` for a task, `RechargeRequested` for a recharge or
-- `CreditsAdjusted` for an adjustment of the same account fails in the same transaction
-- (unique violation), and the executor answers that command with the domain's refusal
-- (`task_already_charged`, `recharge_exists`, `adjustment_exists`) while the rest of its
-- batch commits. They also serve the typed reads that find an old task or adjustment in the
-- journal (`credit_store::queries::charged_task`, `::adjustment_fingerprint`).
--
-- The domain has always refused these duplicates, so an existing journal satisfies them.
CREATE UNIQUE INDEX events_task_id_unique
    ON events (aggregate_id, (payload -> 'CreditsDeducted' ->> 'task_id'))
    WHERE event_type = 'CreditsDeducted';

CREATE UNIQUE INDEX events_recharge_id_unique
    ON events (aggregate_id, (payload -> 'RechargeRequested' ->> 'recharge_id'))
    WHERE event_type = 'RechargeRequested';

CREATE UNIQUE INDEX events_adjustment_id_unique
    ON events (aggregate_id, (payload -> 'CreditsAdjusted' ->> 'adjustment_id'))
    WHERE event_type = 'CreditsAdjusted';
