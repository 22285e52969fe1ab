-- Webhooks: an account's URLs that receive its private events (the rows of account_events, the same
-- as /v1/stream sends), signed, retried with backoff, each delivery logged. `cursor_seq` is the
-- account seq up to which events were queued (or skipped as not subscribed): stored, so a restart
-- resumes where it was and loses nothing.

CREATE TABLE webhooks (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    url         text NOT NULL,
    events      text[] NOT NULL CHECK (events <@ ARRAY['fill', 'lease_started', 'notice', 'lease_ended']
                                       AND cardinality(events) > 0),
    secret      text NOT NULL,
    cursor_seq  bigint NOT NULL CHECK (cursor_seq >= 0),
    created_at  timestamptz NOT NULL
);
CREATE INDEX webhooks_account ON webhooks (account_id);

-- One row per message to send (an event or a test ping); the body is fixed when queued, so every
-- retry sends the same bytes (only the signature's timestamp changes).
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    webhook_id       bigint NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    seq              bigint,          -- the account event's seq; NULL for a ping
    kind             text NOT NULL CHECK (kind IN ('fill', 'lease_started', 'notice', 'lease_ended', 'ping')),
    body             bytea NOT NULL,
    attempts         int NOT NULL DEFAULT 0,
    last_status_code int,
    last_error       text,
    created_at       timestamptz NOT NULL,
    next_attempt_at  timestamptz,     -- NULL once delivered
    delivered_at     timestamptz,
    CHECK ((delivered_at IS NULL) <> (next_attempt_at IS NULL))
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, id) WHERE delivered_at IS NULL;
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, id DESC);
