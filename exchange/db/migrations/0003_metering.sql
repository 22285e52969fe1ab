-- Metering and settlement: samples from the hosts' GPUs, and what each lease has been billed.

-- One row per accepted report: the (host, seq) key is what makes a replayed report a no-op.
CREATE TABLE meter_reports (
    host_id      bigint NOT NULL REFERENCES hosts (id),
    seq          bigint NOT NULL CHECK (seq >= 0),
    content_hash bytea NOT NULL,
    samples      int NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (host_id, seq)
);

-- One row per GPU per sampling instant, stored once whatever the number of deliveries.
-- No foreign keys here on purpose: this is the high-volume table, and ingestion already checks once
-- per report that every GPU is the reporting host's (refusing the report otherwise); per-row
-- foreign keys would repeat that check for every sample and make COPY 2-4x slower (measured).
CREATE TABLE meter_samples (
    uuid        text NOT NULL,
    ts          timestamptz NOT NULL,
    host_id     bigint NOT NULL,
    seq         bigint NOT NULL,
    util        smallint NOT NULL CHECK (util BETWEEN 0 AND 100),
    mem_used_mb int NOT NULL CHECK (mem_used_mb >= 0),
    power_mw    bigint NOT NULL CHECK (power_mw >= 0),
    energy_mj   bigint NOT NULL CHECK (energy_mj >= 0),
    temp_c      smallint NOT NULL,
    healthy     boolean NOT NULL,
    PRIMARY KEY (uuid, ts)
);
CREATE INDEX meter_samples_host_ts ON meter_samples (host_id, ts);

ALTER TABLE hosts ADD COLUMN last_sample_at timestamptz;
ALTER TABLE hosts ADD COLUMN health text NOT NULL DEFAULT 'ok' CHECK (health IN ('ok', 'silent', 'failed'));

-- Settlement state per lease. Money billed is derived exactly from `billed_value`, the running sum
-- of price × GPU-seconds (micro-dollars per GPU-hour × seconds), so rounding never accumulates:
-- billed_amount = floor(billed_value / 3600) at every step.
ALTER TABLE leases ADD COLUMN metered_gpu_s bigint NOT NULL DEFAULT 0 CHECK (metered_gpu_s >= 0);
ALTER TABLE leases ADD COLUMN billed_gpu_s bigint NOT NULL DEFAULT 0 CHECK (billed_gpu_s >= 0);
ALTER TABLE leases ADD COLUMN billed_value numeric(38, 0) NOT NULL DEFAULT 0 CHECK (billed_value >= 0);
ALTER TABLE leases ADD COLUMN billed_amount bigint NOT NULL DEFAULT 0 CHECK (billed_amount >= 0);
ALTER TABLE leases ADD COLUMN fees_amount bigint NOT NULL DEFAULT 0 CHECK (fees_amount >= 0);
ALTER TABLE leases ADD COLUMN energy_mj bigint NOT NULL DEFAULT 0 CHECK (energy_mj >= 0);
ALTER TABLE leases ADD COLUMN settled_at timestamptz;
-- True once the lease has ended and its last bill is made: what is left of its hold went back.
ALTER TABLE leases ADD COLUMN closed boolean NOT NULL DEFAULT false;
ALTER TABLE leases ADD CONSTRAINT leases_billed_within_wall_clock
    CHECK (billed_gpu_s <= metered_gpu_s AND metered_gpu_s <= gpus * extract(epoch FROM planned_end_at - start_at));
CREATE INDEX leases_unsettled ON leases (id) WHERE NOT closed;
