-- Private events for /v1/stream: what happened to an account's leases (a tenant's, and those on an
-- owner's hosts), written by a trigger in the same transaction as the change, numbered per account
-- (seq rises by one), and announced with NOTIFY gpux_stream (payload: the account id; PostgreSQL
-- delivers it at commit and collapses repeats within one transaction).

ALTER TABLE accounts ADD COLUMN event_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE account_events (
    account_id bigint NOT NULL REFERENCES accounts (id),
    seq        bigint NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('fill', 'lease_started', 'notice', 'lease_ended')),
    market     text NOT NULL,
    lease_id   bigint NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (account_id, seq)
);

CREATE FUNCTION emit_account_event(account bigint, event text, lease leases) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE next_seq bigint;
BEGIN
    -- The account's row lock numbers its events without gaps, also under concurrent transactions.
    UPDATE accounts SET event_seq = event_seq + 1 WHERE id = account RETURNING event_seq INTO next_seq;
    INSERT INTO account_events (account_id, seq, kind, market, lease_id, at)
        VALUES (account, next_seq, event, lease.market, lease.id, now());
    PERFORM pg_notify('gpux_stream', account::text);
END $$;

CREATE FUNCTION leases_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owner bigint;
    event text;
BEGIN
    SELECT owner_id INTO owner FROM hosts WHERE id = NEW.host_id;
    IF TG_OP = 'INSERT' THEN
        PERFORM emit_account_event(NEW.account_id, 'fill', NEW);
        event := 'lease_started';
    ELSIF NEW.status IS DISTINCT FROM OLD.status AND NEW.status = 'ending' THEN
        event := 'notice';
    ELSIF NEW.status IS DISTINCT FROM OLD.status AND NEW.status IN ('ended', 'failed') THEN
        event := 'lease_ended';
    ELSE
        RETURN NULL;
    END IF;
    PERFORM emit_account_event(NEW.account_id, event, NEW);
    PERFORM emit_account_event(owner, event, NEW);
    RETURN NULL;
END $$;

CREATE TRIGGER leases_events AFTER INSERT OR UPDATE OF status ON leases
    FOR EACH ROW EXECUTE FUNCTION leases_events();
