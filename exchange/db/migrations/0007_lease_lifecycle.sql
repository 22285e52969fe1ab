-- The lease lifecycle (exchange/leases/lifecycle.py owns the table of transitions): its statuses,
-- end reasons and preemption reasons are checked here, and tests/integration/test_lease_lifecycle.py
-- checks that these lists equal the module's.

-- The injected clock in the database: a transaction that sets `gpux.now` (lifecycle.set_clock) has
-- its triggers stamp rows with that time, so a replay or a simulation on a manual clock writes the
-- same events; without it, the server's time.
CREATE FUNCTION gpux_now() RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('gpux.now', true), '')::timestamptz, now())
$$;

UPDATE leases SET end_reason = 'reclaimed' WHERE end_reason IN ('reclaim', 'preempted');
ALTER TABLE leases ADD CONSTRAINT leases_end_reason
    CHECK (end_reason IS NULL OR end_reason IN ('completed', 'outbid', 'reclaimed', 'host_failed', 'gang_failed'));
-- A live lease has no end reason unless under notice; an ended one always has one and an end time;
-- a notice never runs past the planned end.
ALTER TABLE leases ADD CONSTRAINT leases_status_shape CHECK (
    (status = 'active' AND end_reason IS NULL)
    OR (status = 'ending' AND end_reason IN ('outbid', 'reclaimed') AND end_at IS NOT NULL AND end_at <= planned_end_at)
    OR (status IN ('ended', 'failed') AND end_reason IS NOT NULL AND end_at IS NOT NULL));

CREATE OR REPLACE FUNCTION record_preemption() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO market_preemptions (market, lease_id, gpus, reason, at, ends_at)
    VALUES (NEW.market, NEW.id, NEW.gpus, NEW.end_reason, gpux_now(), NEW.end_at);
    RETURN NULL;
END $$;
DROP TRIGGER leases_preempted ON leases;
CREATE TRIGGER leases_preempted AFTER UPDATE OF end_reason ON leases FOR EACH ROW
    WHEN (NEW.tier = 'spot' AND OLD.end_reason IS DISTINCT FROM NEW.end_reason
          AND NEW.end_reason IN ('outbid', 'reclaimed', 'host_failed', 'gang_failed'))
    EXECUTE FUNCTION record_preemption();

CREATE OR REPLACE FUNCTION emit_account_event(account bigint, event text, lease leases) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE next_seq bigint;
BEGIN
    -- The account's row lock numbers its events without gaps, also under concurrent transactions.
    UPDATE accounts SET event_seq = event_seq + 1 WHERE id = account RETURNING event_seq INTO next_seq;
    INSERT INTO account_events (account_id, seq, kind, market, lease_id, at)
        VALUES (account, next_seq, event, lease.market, lease.id, gpux_now());
    PERFORM pg_notify('gpux_stream', account::text);
END $$;

-- The spot price running leases pay when nothing trades: the highest competing (losing, eligible)
-- limit of the tick, NULL when none; an ask that is not accepted never sets it (SPEC §4).
ALTER TABLE market_ticks ADD COLUMN competing_limit bigint;
