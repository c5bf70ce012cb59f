-- Stripe refunds and disputes name the payment intent. The webhook finds the recharge in
-- `recharge_records`, and falls back to the journal itself when the projection has not
-- caught up, through this index (no lag, no full scan).
CREATE INDEX events_recharge_payment_id
    ON events ((payload -> 'RechargeCompleted' ->> 'payment_id'))
    WHERE event_type = 'RechargeCompleted';
