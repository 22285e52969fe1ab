-- Foundation: accounts, API keys, the double-entry ledger, hosts and their GPUs, markets, offers, bids.
-- Money columns are bigint micro-dollars (prices: micro-dollars per GPU-hour). Never floats for money.

CREATE TABLE accounts (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    role         text NOT NULL CHECK (role IN ('admin', 'owner', 'tenant', 'trader')),
    api_key_hash bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL
);

-- The ledger. Every account has an `available` and a `held` book; the system has `world` (money
-- entering or leaving the exchange: deposits, withdrawals) and `fees`. Balances are maintained by a
-- trigger from the postings, and the CHECK forbids a negative balance on every book but `world`:
-- this is what makes "a tenant can never commit more than it has" hold under concurrency.
CREATE TABLE ledger_accounts (
    id              bigserial PRIMARY KEY,
    account_id      bigint REFERENCES accounts (id),
    kind            text NOT NULL CHECK (kind IN ('available', 'held', 'world', 'fees')),
    balance         bigint NOT NULL DEFAULT 0,
    may_go_negative boolean NOT NULL DEFAULT false,
    CONSTRAINT balance_not_negative CHECK (may_go_negative OR balance >= 0),
    CHECK ((account_id IS NULL) = (kind IN ('world', 'fees')))
);
CREATE UNIQUE INDEX ledger_accounts_owner_kind ON ledger_accounts (account_id, kind) WHERE account_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_accounts_system_kind ON ledger_accounts (kind) WHERE account_id IS NULL;
INSERT INTO ledger_accounts (account_id, kind, may_go_negative) VALUES (NULL, 'world', true), (NULL, 'fees', false);

CREATE TABLE transfers (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL,
    account_id      bigint REFERENCES accounts (id),
    ref_type        text,
    ref_id          bigint,
    idempotency_key text,
    request_hash    bytea,
    memo            text,
    created_at      timestamptz NOT NULL
);
CREATE UNIQUE INDEX transfers_idempotency ON transfers (account_id, kind, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX transfers_ref ON transfers (ref_type, ref_id);

CREATE TABLE postings (
    id                bigserial PRIMARY KEY,
    transfer_id       bigint NOT NULL REFERENCES transfers (id),
    ledger_account_id bigint NOT NULL REFERENCES ledger_accounts (id),
    amount            bigint NOT NULL CHECK (amount <> 0)
);
CREATE INDEX postings_ledger_account ON postings (ledger_account_id, id);
CREATE INDEX postings_transfer ON postings (transfer_id);

CREATE FUNCTION postings_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ledger_accounts SET balance = balance + NEW.amount WHERE id = NEW.ledger_account_id;
    RETURN NEW;
END $$;
CREATE TRIGGER postings_apply AFTER INSERT ON postings FOR EACH ROW EXECUTE FUNCTION postings_apply();

-- Postings are history: never rewritten.
CREATE FUNCTION postings_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'postings are append-only' USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER postings_immutable BEFORE UPDATE OR DELETE ON postings FOR EACH ROW EXECUTE FUNCTION postings_immutable();

-- Double entry, enforced by the schema: at commit, every transfer touched sums to zero.
CREATE FUNCTION transfers_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE total bigint;
BEGIN
    SELECT coalesce(sum(amount), 0) INTO total FROM postings WHERE transfer_id = NEW.transfer_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'transfer % does not sum to zero (sum %)', NEW.transfer_id, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER transfers_balanced AFTER INSERT ON postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION transfers_balanced();

CREATE TABLE hosts (
    id               bigserial PRIMARY KEY,
    owner_id         bigint NOT NULL REFERENCES accounts (id),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    fabric           text NOT NULL CHECK (length(fabric) BETWEEN 1 AND 128),
    agent_token_hash bytea NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL,
    last_seen_at     timestamptz,
    UNIQUE (owner_id, name)
);

CREATE TABLE gpus (
    uuid        text PRIMARY KEY,
    host_id     bigint NOT NULL REFERENCES hosts (id),
    idx         int NOT NULL,
    model       text NOT NULL,
    memory_mb   int NOT NULL CHECK (memory_mb > 0),
    present     boolean NOT NULL DEFAULT true,
    reported_at timestamptz NOT NULL
);
CREATE INDEX gpus_host ON gpus (host_id);

CREATE TABLE markets (
    id               text PRIMARY KEY,
    model            text NOT NULL,
    tier             text NOT NULL CHECK (tier IN ('spot', 'firm')),
    last_price       bigint,
    indicative_price bigint,
    last_trade_at    timestamptz,
    created_at       timestamptz NOT NULL,
    UNIQUE (model, tier)
);

CREATE TABLE offers (
    id                 bigserial PRIMARY KEY,
    host_id            bigint NOT NULL REFERENCES hosts (id),
    model              text NOT NULL,
    gpus               int NOT NULL CHECK (gpus > 0),
    floor_price        bigint NOT NULL CHECK (floor_price >= 0),
    available_from     timestamptz NOT NULL,
    available_until    timestamptz NOT NULL,
    firm_until         timestamptz,
    reclaim_notice_s   int NOT NULL CHECK (reclaim_notice_s >= 0),
    reclaim_rate_per_h double precision NOT NULL CHECK (reclaim_rate_per_h >= 0),
    status             text NOT NULL DEFAULT 'live' CHECK (status IN ('live', 'withdrawn')),
    created_at         timestamptz NOT NULL,
    withdrawn_at       timestamptz,
    CHECK (available_until > available_from),
    CHECK (firm_until IS NULL OR firm_until <= available_until)
);
CREATE INDEX offers_live ON offers (model) WHERE status = 'live';
CREATE INDEX offers_host ON offers (host_id);

CREATE TABLE bids (
    id                 bigserial PRIMARY KEY,
    account_id         bigint NOT NULL REFERENCES accounts (id),
    market             text NOT NULL REFERENCES markets (id),
    gpus               int NOT NULL CHECK (gpus > 0),
    duration_s         int NOT NULL CHECK (duration_s > 0),
    limit_price        bigint NOT NULL CHECK (limit_price > 0),
    min_survival       double precision NOT NULL DEFAULT 0 CHECK (min_survival >= 0 AND min_survival <= 1),
    min_notice_s       int NOT NULL DEFAULT 0 CHECK (min_notice_s >= 0),
    time_in_force      text NOT NULL CHECK (time_in_force IN ('gtc', 'ioc', 'gtd')),
    expire_at          timestamptz,
    client_order_id    text NOT NULL,
    request_hash       bytea NOT NULL,
    requeue_on_preempt boolean NOT NULL DEFAULT false,
    status             text NOT NULL CHECK (status IN ('open', 'filled', 'cancelled', 'expired')),
    -- What this bid still reserves of its account's `held` book.
    hold_amount        bigint NOT NULL CHECK (hold_amount >= 0),
    unfilled_reason    text,
    unfilled_shortfall bigint,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    UNIQUE (account_id, client_order_id),
    CHECK ((time_in_force = 'gtd') = (expire_at IS NOT NULL))
);
CREATE INDEX bids_open ON bids (market, id) WHERE status = 'open';
CREATE INDEX bids_account ON bids (account_id, id);

-- Everything that reserves held funds, per account; `gpux audit` checks it equals the held books.
-- Later migrations that add holders (leases) replace this view.
CREATE VIEW reservations AS
    SELECT account_id, sum(hold_amount)::bigint AS reserved FROM bids WHERE status = 'open' GROUP BY account_id;
