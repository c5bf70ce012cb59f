-- Second wave, money under real-world delivery (see docs/EVENTS.md):
-- * a video submission whose outcome is unknown shows as `uncertain` until its callback or
--   the settlement deadline decides it;
-- * a video delivered after its task was refunded is shown (the refund stands);
-- * pending recharges are found by age for reconciliation with Stripe.
ALTER TABLE video_tasks DROP CONSTRAINT video_tasks_status_check;
ALTER TABLE video_tasks ADD CONSTRAINT video_tasks_status_check
    CHECK (status IN ('pending', 'uncertain', 'processing', 'succeeded', 'failed'));
ALTER TABLE video_tasks ADD COLUMN delivered_after_refund boolean NOT NULL DEFAULT false;

DROP INDEX video_tasks_open;
CREATE INDEX video_tasks_open ON video_tasks (created_at)
    WHERE status IN ('pending', 'uncertain', 'processing');

CREATE INDEX recharge_records_pending ON recharge_records (created_at)
    WHERE status = 'pending';
