-- Market data feed: the last published state and sequence number of each market's feed channels,
-- and a log of preemptions (spot leases ended early) for the feed, the page and the risk index.

-- One row per market and channel, written only by the matching leader's publisher, in the same
-- transaction that decides what to publish: `seq` survives a leader change (the next leader goes on
-- from it), and `state` is exactly what subscribers hold at `seq` (the book's levels, the ticker,
-- the trade cursor), so a REST snapshot and the websocket agree on both.
CREATE TABLE feed_state (
    market     text NOT NULL REFERENCES markets (id),
    channel    text NOT NULL CHECK (channel IN ('ticker', 'book', 'trades', 'candles')),
    seq        bigint NOT NULL CHECK (seq >= 0),
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (market, channel)
);

-- A preemption is a spot lease told to end early: outbid, or reclaimed by its owner. Recorded by a
-- trigger so that every path that preempts (the auction tick, owner reclaims) shows up in the feed.
CREATE TABLE market_preemptions (
    id       bigserial PRIMARY KEY,
    market   text NOT NULL REFERENCES markets (id),
    lease_id bigint NOT NULL REFERENCES leases (id),
    gpus     int NOT NULL,
    reason   text NOT NULL,
    at       timestamptz NOT NULL,
    ends_at  timestamptz
);
CREATE INDEX market_preemptions_market_at ON market_preemptions (market, at);

CREATE FUNCTION record_preemption() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO market_preemptions (market, lease_id, gpus, reason, at, ends_at)
    VALUES (NEW.market, NEW.id, NEW.gpus, NEW.end_reason, now(), NEW.end_at);
    RETURN NULL;
END $$;
CREATE TRIGGER leases_preempted AFTER UPDATE OF end_reason ON leases FOR EACH ROW
    WHEN (NEW.tier = 'spot' AND OLD.end_reason IS DISTINCT FROM NEW.end_reason
          AND NEW.end_reason IN ('outbid', 'reclaimed', 'reclaim', 'preempted'))
    EXECUTE FUNCTION record_preemption();

-- The risk index reads the spot leases of the last 24 hours per market.
CREATE INDEX leases_market_start ON leases (market, start_at);
