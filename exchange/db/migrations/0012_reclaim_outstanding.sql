-- What a reclaim took, per host and per source: idle GPUs (lease_id NULL) or GPUs a victim lease
-- gives back when it ends (lease_id: that lease). Before this, one row per host summed both, and
-- the book subtracted the victims' whole leases from it: GPUs a reclaim took idle were sold again
-- while a larger victim ran out its notice (the owner told "2 taken free" found a tenant on them).
-- Rows written before this migration keep lease_id NULL: counted as taken now, the safe side.
ALTER TABLE reclaim_gpus DROP CONSTRAINT reclaim_gpus_pkey;
ALTER TABLE reclaim_gpus ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
ALTER TABLE reclaim_gpus ADD COLUMN lease_id bigint REFERENCES leases (id);
CREATE UNIQUE INDEX reclaim_gpus_source ON reclaim_gpus (reclaim_id, host_id, coalesce(lease_id, 0));

-- The one definition of the GPUs active reclaims hold on a host that no live lease holds: what the
-- book must not sell, the tick must not assign, and a later reclaim cannot take as idle. A victim's
-- share counts once its lease is no longer live (until then the lease holds those GPUs).
CREATE VIEW reclaim_outstanding AS
SELECT rg.host_id, r.model, sum(rg.gpus)::bigint AS gpus
FROM reclaim_gpus rg
JOIN reclaims r ON r.id = rg.reclaim_id
LEFT JOIN leases l ON l.id = rg.lease_id
WHERE r.status = 'active' AND (rg.lease_id IS NULL OR l.status NOT IN ('active', 'ending'))
GROUP BY rg.host_id, r.model;
