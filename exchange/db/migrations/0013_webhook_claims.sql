-- Webhook delivery without a transaction open during an attempt: a process claims a webhook (a
-- token and an expiry, in a short transaction), sends with no connection held, then records the
-- outcome and frees the claim only if it still holds it. A claim whose process died expires and
-- the message is sent again (at least once). A webhook failing without a success since
-- `failing_since` for GPUX_WEBHOOK_DISABLE_AFTER_S is disabled (not worked, its events kept) until
-- its account re-enables it.

ALTER TABLE webhooks
    ADD COLUMN claim_token   bigint,
    ADD COLUMN claim_until   timestamptz,
    ADD COLUMN failing_since timestamptz,
    ADD COLUMN disabled_at   timestamptz,
    ADD CONSTRAINT webhooks_claim_whole CHECK ((claim_token IS NULL) = (claim_until IS NULL)),
    ADD CONSTRAINT webhooks_disabled_after_failing
        CHECK (disabled_at IS NULL OR (failing_since IS NOT NULL AND disabled_at >= failing_since));
