-- Matching: leases from fills, the GPUs they hold, trades, and one row per market and tick.

-- Every change to a bid or an offer takes the next number of one sequence, so that the matching
-- leader loads only what changed since its last tick (a tick costs what changed).
CREATE SEQUENCE book_changes;
ALTER TABLE bids ADD COLUMN change_seq bigint NOT NULL DEFAULT nextval('book_changes');
ALTER TABLE offers ADD COLUMN change_seq bigint NOT NULL DEFAULT nextval('book_changes');
CREATE FUNCTION touch_change_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval('book_changes');
    RETURN NEW;
END $$;
-- A bid matters to the book only through its status (its terms never change), so writing its
-- unfilled reason does not make the book reload it.
CREATE TRIGGER bids_change_seq BEFORE UPDATE ON bids FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION touch_change_seq();
CREATE TRIGGER offers_change_seq BEFORE UPDATE ON offers FOR EACH ROW EXECUTE FUNCTION touch_change_seq();
CREATE INDEX bids_change_seq ON bids (change_seq);
CREATE INDEX offers_change_seq ON offers (change_seq);

-- A bid's unfilled reason is a code from matching.Reason, spelled out.
ALTER TABLE bids ADD COLUMN filled_at timestamptz;

CREATE TABLE market_ticks (
    id            bigserial PRIMARY KEY,
    market        text NOT NULL REFERENCES markets (id),
    at            timestamptz NOT NULL,
    price         bigint,
    indicative    bigint NOT NULL,
    volume_gpus   int NOT NULL,
    open_bids     int NOT NULL,
    state_hash    bigint NOT NULL
);
CREATE INDEX market_ticks_market_at ON market_ticks (market, at);

CREATE TABLE leases (
    id              bigserial PRIMARY KEY,
    bid_id          bigint NOT NULL REFERENCES bids (id),
    account_id      bigint NOT NULL REFERENCES accounts (id),
    host_id         bigint NOT NULL REFERENCES hosts (id),
    offer_id        bigint NOT NULL REFERENCES offers (id),
    market          text NOT NULL REFERENCES markets (id),
    tier            text NOT NULL CHECK (tier IN ('spot', 'firm')),
    gpus            int NOT NULL CHECK (gpus > 0),
    gpu_uuids       text[] NOT NULL,
    price           bigint NOT NULL CHECK (price >= 0),
    limit_price     bigint NOT NULL CHECK (limit_price >= price),
    floor_price     bigint NOT NULL CHECK (floor_price <= price),
    start_at        timestamptz NOT NULL,
    planned_end_at  timestamptz NOT NULL,
    -- When an ending lease stops (notice run out); its GPUs stay its own until then.
    end_at          timestamptz,
    status          text NOT NULL CHECK (status IN ('active', 'ending', 'ended', 'failed')),
    end_reason      text,
    -- What this lease still reserves of its tenant's held book (what it can still cost).
    hold_amount     bigint NOT NULL CHECK (hold_amount >= 0),
    tick_id         bigint REFERENCES market_ticks (id),
    created_at      timestamptz NOT NULL,
    CHECK (cardinality(gpu_uuids) = gpus),
    CHECK (planned_end_at > start_at)
);
CREATE INDEX leases_account ON leases (account_id, id);
CREATE INDEX leases_host ON leases (host_id, id);
CREATE INDEX leases_live ON leases (market) WHERE status IN ('active', 'ending');
CREATE INDEX leases_bid ON leases (bid_id);

-- No GPU is sold twice at one instant: one row per GPU of each live lease, unique by GPU.
CREATE TABLE lease_gpus (
    lease_id bigint NOT NULL REFERENCES leases (id),
    uuid     text NOT NULL REFERENCES gpus (uuid),
    live     boolean NOT NULL DEFAULT true,
    PRIMARY KEY (lease_id, uuid)
);
CREATE UNIQUE INDEX lease_gpus_one_live_lease ON lease_gpus (uuid) WHERE live;

CREATE TABLE trades (
    id         bigserial PRIMARY KEY,
    market     text NOT NULL REFERENCES markets (id),
    tick_id    bigint NOT NULL REFERENCES market_ticks (id),
    lease_id   bigint NOT NULL REFERENCES leases (id),
    price      bigint NOT NULL,
    gpus       int NOT NULL,
    duration_s int NOT NULL,
    at         timestamptz NOT NULL
);
CREATE INDEX trades_market_at ON trades (market, at);

CREATE OR REPLACE VIEW reservations AS
    SELECT account_id, sum(hold_amount)::bigint AS reserved FROM (
        SELECT account_id, hold_amount FROM bids WHERE status = 'open'
        UNION ALL
        SELECT account_id, hold_amount FROM leases
    ) holders GROUP BY account_id;
