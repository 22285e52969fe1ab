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
