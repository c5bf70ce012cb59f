-- Lets the projector clear, in the same transaction, every outbox row of an account whose
-- events it has just applied (not only the rows of its batch), so a large backlog for one
-- account drains in one pass.
CREATE INDEX projection_outbox_account ON projection_outbox (aggregate_id, sequence);
