-- The read side: tables the projector builds from the journal, with the columns of the
-- original system. They can always be emptied and rebuilt from `events`.

CREATE TABLE users
(
    id            text PRIMARY KEY,
    credits       bigint      NOT NULL DEFAULT 0,
    -- The projector's checkpoint: the last sequence of this account applied here.
    last_sequence bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recharge_records
(
    id                  text PRIMARY KEY,
    user_id             text          NOT NULL,
    amount              numeric(14, 2) NOT NULL,
    amount_fen          bigint        NOT NULL,
    currency            text          NOT NULL,
    credits             bigint        NOT NULL,
    credits_per_yuan    bigint        NOT NULL,
    payment_method      text          NOT NULL,
    payment_id          text,
    checkout_session_id text,
    checkout_url        text,
    status              text          NOT NULL CHECK (status IN ('pending', 'completed', 'failed', 'cancelled', 'reversed')),
    failure_reason      text,
    reversed_credits    bigint        NOT NULL DEFAULT 0,
    created_at          timestamptz   NOT NULL,
    completed_at        timestamptz
);
CREATE INDEX recharge_records_user ON recharge_records (user_id, created_at DESC, id DESC);
CREATE INDEX recharge_records_payment ON recharge_records (payment_id);
CREATE INDEX recharge_records_session ON recharge_records (checkout_session_id);

CREATE TABLE consumption_records
(
    id            text PRIMARY KEY,
    user_id       text        NOT NULL,
    video_task_id text        NOT NULL,
    credits       bigint      NOT NULL,
    description   text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('completed', 'refunded')),
    created_at    timestamptz NOT NULL,
    refunded_at   timestamptz
);
CREATE INDEX consumption_records_user ON consumption_records (user_id, created_at DESC, id DESC);

CREATE TABLE video_tasks
(
    id               text PRIMARY KEY,
    user_id          text        NOT NULL,
    provider_task_id text,
    model            text        NOT NULL,
    prompt           text        NOT NULL,
    reference_url    text,
    aspect_ratio     text        NOT NULL,
    duration         integer     NOT NULL,
    size             text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'processing', 'succeeded', 'failed')),
    progress         integer     NOT NULL DEFAULT 0,
    video_url        text,
    remove_watermark boolean,
    pid              text,
    failure_reason   text,
    error_message    text,
    credits_charged  bigint      NOT NULL,
    refunded         boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL,
    completed_at     timestamptz
);
CREATE INDEX video_tasks_user ON video_tasks (user_id, created_at DESC, id DESC);
CREATE INDEX video_tasks_open ON video_tasks (created_at) WHERE status IN ('pending', 'processing');
CREATE INDEX video_tasks_provider ON video_tasks (provider_task_id);

-- Stripe deliveries already handled, so a repeated event id is answered without effect.
CREATE TABLE stripe_events
(
    id          text PRIMARY KEY,
    event_type  text        NOT NULL,
    outcome     text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
