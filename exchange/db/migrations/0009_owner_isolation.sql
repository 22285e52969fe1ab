-- Isolation between owners (issue 11).

-- Reclaims take an idempotency key (optional, per owner): a retry with the same key and body is the
-- same reclaim; another body under the key is refused.
ALTER TABLE reclaims ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 128);
ALTER TABLE reclaims ADD COLUMN request_hash bytea;
ALTER TABLE reclaims ADD CONSTRAINT reclaims_key_has_hash CHECK ((idempotency_key IS NULL) = (request_hash IS NULL));
CREATE UNIQUE INDEX reclaims_idempotency ON reclaims (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- A fabric is its owner's from now on (the matching engine keys fabrics by owner and name), so no
-- gang placed from here on spans two owners. Gangs placed before, while fabrics were global by name,
-- may: they run on to their planned end untouched (ending them here would need settlement), a
-- reclaim only ever ends the reclaiming owner's leases of them, and `gpux audit` knows them from
-- this list (one row per such gang: its bid and tick).
CREATE TABLE gangs_spanning_owners_before_0009 (
    bid_id  bigint NOT NULL,
    tick_id bigint NOT NULL,
    PRIMARY KEY (bid_id, tick_id)
);
INSERT INTO gangs_spanning_owners_before_0009 (bid_id, tick_id)
    SELECT l.bid_id, l.tick_id FROM leases l JOIN hosts h ON h.id = l.host_id
    WHERE l.tick_id IS NOT NULL GROUP BY l.bid_id, l.tick_id HAVING count(DISTINCT h.owner_id) > 1;
