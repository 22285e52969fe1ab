-- The matching leader loads bid changes incrementally. A change sequence number alone cannot say
-- what is still to come: a transaction may take a number, then commit after a later-numbered
-- change was already loaded. Each change therefore also records the id of the transaction that
-- wrote it; every transaction that commits after a snapshot has an id at or above that snapshot's
-- xmin, so the leader reads `change_xid >= xmin of its previous load's snapshot` and misses none
-- (exchange/auction/book_sync.py). xid8 (64 bits, with the epoch) never wraps around.
ALTER TABLE bids ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE FUNCTION touch_bid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval('book_changes');
    -- The top-level transaction's id, also from inside a savepoint.
    NEW.change_xid := pg_current_xact_id();
    RETURN NEW;
END $$;
DROP TRIGGER bids_change_seq ON bids;
CREATE TRIGGER bids_change_seq BEFORE UPDATE ON bids FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION touch_bid_change();

-- What each load reads; the change_seq index has no reader left.
CREATE INDEX bids_change_xid ON bids (change_xid);
DROP INDEX bids_change_seq;

-- The leases under an active reclaim's notice, which the book's blocks count once (not again as
-- reclaimed GPUs): few leases ever carry a reclaim.
CREATE INDEX leases_reclaim ON leases (reclaim_id) WHERE reclaim_id IS NOT NULL;
