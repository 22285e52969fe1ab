-- Rate-limit counts shared by every server process on this database (exchange/core/limits.py): one
-- row per key (`acct:<id>`, `host:<id>`, `addr:<ip>`, `auth:<ip>`), the current one-second window
-- and the requests reserved in it, updated in place by one atomic upsert. UNLOGGED: no WAL for a
-- count that is worthless a second later; a PostgreSQL crash empties it, which only starts every
-- client's window afresh. Rows of windows a minute old are deleted by the processes themselves.
CREATE UNLOGGED TABLE rate_limit_counters (
    key text PRIMARY KEY,
    window_s bigint NOT NULL,
    hits integer NOT NULL
);
CREATE INDEX rate_limit_counters_window ON rate_limit_counters (window_s);

-- Open websockets per key (`addr:<ip>`, `acct:<id>`), per server process, so that connection limits
-- hold across processes. A process is named by a database session it holds open for that purpose
-- (its pid and start time); rows of sessions no longer in pg_stat_activity (a process that died) are
-- not counted and are deleted.
CREATE UNLOGGED TABLE ws_connections (
    key text NOT NULL,
    owner_pid integer NOT NULL,
    owner_start timestamptz NOT NULL,
    sockets integer NOT NULL,
    PRIMARY KEY (key, owner_pid, owner_start)
);
