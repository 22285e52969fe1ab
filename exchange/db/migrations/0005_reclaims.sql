-- Reclaims: an owner takes GPUs back for its own work, now (ending spot leases after their notice)
-- or at a known time ahead (an internal reservation the matching engine plans around).

CREATE TABLE reclaims (
    id          bigserial PRIMARY KEY,
    owner_id    bigint NOT NULL REFERENCES accounts (id),
    model       text NOT NULL,
    gpus        int NOT NULL CHECK (gpus > 0),
    host_id     bigint REFERENCES hosts (id),
    at          timestamptz NOT NULL,
    until       timestamptz,
    status      text NOT NULL CHECK (status IN ('scheduled', 'active', 'released')),
    strategy    text NOT NULL,
    -- GPUs the reclaim could not find (firm leases are never reclaimed).
    shortfall   int NOT NULL DEFAULT 0 CHECK (shortfall >= 0),
    -- GPUs it took that no lease was using.
    idle_gpus   int NOT NULL DEFAULT 0 CHECK (idle_gpus >= 0),
    created_at  timestamptz NOT NULL,
    executed_at timestamptz,
    CHECK (until IS NULL OR until > at)
);
CREATE INDEX reclaims_live ON reclaims (status) WHERE status <> 'released';

-- Where an executed reclaim took its GPUs: per host, so the book offers only what is left.
CREATE TABLE reclaim_gpus (
    reclaim_id bigint NOT NULL REFERENCES reclaims (id),
    host_id    bigint NOT NULL REFERENCES hosts (id),
    gpus       int NOT NULL CHECK (gpus > 0),
    PRIMARY KEY (reclaim_id, host_id)
);

ALTER TABLE leases ADD COLUMN reclaim_id bigint REFERENCES reclaims (id);
-- A spot lease reclaimed within the owner's free-reclaim window is free to its tenant.
ALTER TABLE leases ADD COLUMN free_of_charge boolean NOT NULL DEFAULT false;
-- When a preempted lease's bid was put back in the book (requeue_on_preempt).
ALTER TABLE leases ADD COLUMN requeued_at timestamptz;
ALTER TABLE offers ADD COLUMN free_reclaim_window_s int NOT NULL DEFAULT 3600 CHECK (free_reclaim_window_s >= 0);
