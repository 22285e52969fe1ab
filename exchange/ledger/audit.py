"""`gpux audit`: the exchange's invariants, checked against the database itself.

One module for every check (the ledger's, the leases', the hosts', the bids'), because they only
mean something together: all of them read one repeatable-read snapshot, so the money in the books,
the leases' billing columns and the GPUs they hold are compared at one instant, and one report says
which invariant broke. It sits by the ledger because most of them are about money following the
leases, and every caller already imports it from here.

Each check is a query that returns the rows breaching it (none when it holds), with the named
parameters it needs: `now` (default: the database's now(); a simulation passes its injected clock),
`close_window_s` (how long after its end a lease may stay unclosed: the settlement's close delay
plus a slack, by default two settlement intervals, for the run that closes it to come round),
`host_grace_s` (silence after which a host is silent) and `preemption_reasons`.

What the health checks can see: the database keeps no history of a host's health, only its state
now and its last sample. Any report sets a host 'ok' and raises `last_sample_at`, so a host that is
not 'ok' has not reported since it was marked, and its `last_sample_at` is still its last sign of
life: a lease that started more than `host_grace_s` after it started on a host that was silent (the
definition of silent). And the failure job fails every live lease of a host it marks failed in the
same transaction (when the host ever reported), so a live lease on such a host started after it.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from exchange.core.settings import Settings
from exchange.leases.lifecycle import PREEMPTION_REASONS
from exchange.metering import bounds
from exchange.metering.service import MAX_CLOCK_SKEW

MAX_ROWS = 20

# A lease's effective end: its end (or planned end), never after its planned end (what is billed).
_STOP = "least(coalesce({l}.end_at, {l}.planned_end_at), {l}.planned_end_at)"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    sql: str
    # Names of run_audit's values bound to $1, $2, … in this order.
    params: tuple[str, ...] = ()


# The ledger on its own.
LEDGER_CHECKS = [
    Check("every transfer sums to zero",
          "SELECT transfer_id, sum(amount) AS total FROM postings GROUP BY transfer_id HAVING sum(amount) <> 0"),
    Check("no negative balance outside the world book",
          "SELECT id, account_id, kind, balance FROM ledger_accounts WHERE NOT may_go_negative AND balance < 0"),
    Check("each balance equals the sum of its postings",
          "SELECT la.id, la.kind, la.balance, coalesce(p.total, 0) AS postings_total FROM ledger_accounts la"
          " LEFT JOIN (SELECT ledger_account_id, sum(amount) AS total FROM postings GROUP BY ledger_account_id) p"
          " ON p.ledger_account_id = la.id WHERE la.balance <> coalesce(p.total, 0)"),
    Check("all books together sum to zero",
          "SELECT sum(balance) AS total FROM ledger_accounts HAVING sum(balance) <> 0"),
    Check("held funds equal what open orders and leases reserve",
          "SELECT la.account_id, la.balance AS held, coalesce(r.reserved, 0) AS reserved FROM ledger_accounts la"
          " LEFT JOIN reservations r ON r.account_id = la.account_id"
          " WHERE la.kind = 'held' AND la.balance <> coalesce(r.reserved, 0)"),
    Check("no reservation without a held book covering it",
          "SELECT r.account_id, r.reserved FROM reservations r LEFT JOIN ledger_accounts la"
          " ON la.account_id = r.account_id AND la.kind = 'held' WHERE la.id IS NULL AND r.reserved <> 0"),
]

# Settlement postings of each lease: transfers 'settle' and 'refund' referencing it, leg by leg.
_LEASE_LEGS = """
    SELECT t.ref_id AS lease_id, t.id AS transfer_id, t.kind, p.ledger_account_id, p.amount
    FROM transfers t JOIN postings p ON p.transfer_id = t.id
    WHERE t.ref_type = 'lease' AND t.kind IN ('settle', 'refund')
"""

# Per account: its books, what came in from outside (postings to its books in transfers with a
# world leg: deposits less withdrawals), what the leases on its hosts earned (billed less fees) and
# what its own leases were billed. Every other movement of its money stays between its own books.
_ACCOUNT_MONEY = """
    WITH world AS (SELECT id FROM ledger_accounts WHERE account_id IS NULL AND kind = 'world'),
    deposits AS (
        SELECT la.account_id, sum(p.amount) AS net FROM postings p
        JOIN ledger_accounts la ON la.id = p.ledger_account_id AND la.account_id IS NOT NULL
        WHERE p.transfer_id IN (SELECT transfer_id FROM postings WHERE ledger_account_id = (SELECT id FROM world))
        GROUP BY la.account_id),
    books AS (
        SELECT account_id, sum(balance) FILTER (WHERE kind = 'available') AS available,
               sum(balance) FILTER (WHERE kind = 'held') AS held
        FROM ledger_accounts WHERE account_id IS NOT NULL GROUP BY account_id),
    earned AS (
        SELECT h.owner_id AS account_id, sum(l.billed_amount - l.fees_amount) AS earned
        FROM leases l JOIN hosts h ON h.id = l.host_id GROUP BY h.owner_id),
    spent AS (SELECT account_id, sum(billed_amount) AS spent FROM leases GROUP BY account_id)
    SELECT a.id AS account_id, a.role, coalesce(b.available, 0) AS available, coalesce(b.held, 0) AS held,
           coalesce(d.net, 0) AS deposits, coalesce(e.earned, 0) AS earned, coalesce(s.spent, 0) AS spent,
           EXISTS (SELECT 1 FROM hosts h WHERE h.owner_id = a.id) AS owns_hosts
    FROM accounts a LEFT JOIN books b ON b.account_id = a.id LEFT JOIN deposits d ON d.account_id = a.id
    LEFT JOIN earned e ON e.account_id = a.id LEFT JOIN spent s ON s.account_id = a.id
"""

MARKET_CHECKS = [
    Check("closed bids and closed leases hold nothing",
          "SELECT 'bid' AS holder, id, status, hold_amount FROM bids WHERE status <> 'open' AND hold_amount <> 0"
          " UNION ALL"
          " SELECT 'lease', id, status, hold_amount FROM leases WHERE closed AND hold_amount <> 0"),
    # A lease's window opens when it stops or, if later, when its end was decided (a failed host is
    # found out `GPUX_HOST_FAIL_S` after its last sample, where its leases stop): the time of its
    # `lease_ended` event, which the lifecycle's trigger stamps with the (injected) clock.
    Check("no ended lease left unclosed past its close window",
          f"SELECT l.id, l.status, l.end_reason, {_STOP.format(l='l')} AS stop, e.at AS ended_at, l.settled_at"
          " FROM leases l LEFT JOIN LATERAL (SELECT max(at) AS at FROM account_events ae"
          "   WHERE ae.lease_id = l.id AND ae.kind = 'lease_ended') e ON true"
          " WHERE l.status IN ('ended', 'failed') AND NOT l.closed"
          f" AND greatest({_STOP.format(l='l')}, e.at) + make_interval(secs => $2) < coalesce($1::timestamptz, now())"
          " ORDER BY l.id",
          ("now", "close_window_s")),
    # Settlement bills up to its `now`: a given clock bounds the time billed too. The database's own
    # clock does not (an injected clock may run ahead of it).
    Check("billed GPU-seconds within the lease's GPUs times its duration",
          f"SELECT l.id, l.gpus, l.start_at, {_STOP.format(l='l')} AS stop, l.billed_gpu_s FROM leases l"
          f" WHERE l.billed_gpu_s > l.gpus * greatest(0, extract(epoch FROM"
          f"   least({_STOP.format(l='l')}, coalesce($1::timestamptz, 'infinity')) - l.start_at)) ORDER BY l.id",
          ("now",)),
    # Spot leases pay the spot price clamped to their limit; firm leases their cleared price.
    Check("billed amount within the rate allowed times the time billed",
          "SELECT id, tier, price, limit_price, billed_gpu_s, billed_value, billed_amount FROM leases"
          " WHERE billed_amount::numeric * 3600"
          "   > (CASE tier WHEN 'spot' THEN limit_price ELSE price END)::numeric * billed_gpu_s"
          " OR billed_value > (CASE tier WHEN 'spot' THEN limit_price ELSE price END)::numeric * billed_gpu_s"
          " ORDER BY id"),
    # A lease reclaimed inside the free window is refunded (and its value reset) by the first
    # settlement after the reclaim: until that runs it keeps what it was billed.
    Check("billed amount is floor(billed value / 3600), nothing when free of charge",
          "SELECT l.id, l.free_of_charge, l.billed_value, l.billed_amount, l.settled_at, r.executed_at AS freed_at"
          " FROM leases l LEFT JOIN reclaims r ON r.id = l.reclaim_id"
          " WHERE l.billed_amount <> floor(l.billed_value / 3600)"
          " OR (l.free_of_charge AND l.billed_amount <> 0"
          "     AND l.settled_at > coalesce(r.executed_at, '-infinity'::timestamptz))"
          " ORDER BY l.id"),
    Check("each lease's settlement postings match its billed and fee columns",
          f"""WITH legs AS ({_LEASE_LEGS}),
          fees AS (SELECT id FROM ledger_accounts WHERE account_id IS NULL AND kind = 'fees')
          SELECT l.id, l.billed_amount, l.fees_amount,
                 coalesce(sum(g.amount) FILTER (WHERE g.ledger_account_id = oa.id), 0) AS owner_leg,
                 coalesce(sum(g.amount) FILTER (WHERE g.ledger_account_id = (SELECT id FROM fees)), 0) AS fees_leg,
                 coalesce(sum(g.amount) FILTER (WHERE g.ledger_account_id = th.id), 0) AS tenant_leg
          FROM leases l JOIN hosts h ON h.id = l.host_id
          JOIN ledger_accounts oa ON oa.account_id = h.owner_id AND oa.kind = 'available'
          JOIN ledger_accounts th ON th.account_id = l.account_id AND th.kind = 'held'
          LEFT JOIN legs g ON g.lease_id = l.id
          GROUP BY l.id, l.billed_amount, l.fees_amount
          HAVING coalesce(sum(g.amount) FILTER (WHERE g.ledger_account_id = oa.id), 0)
                     <> l.billed_amount - l.fees_amount
              OR coalesce(sum(g.amount) FILTER (WHERE g.ledger_account_id = (SELECT id FROM fees)), 0)
                     <> l.fees_amount
              OR coalesce(sum(g.amount) FILTER (WHERE g.ledger_account_id = th.id), 0) <> -l.billed_amount
          ORDER BY l.id"""),
    Check("a lease's settlement postings land only in its tenant's, its host owner's and the fees books",
          f"""WITH legs AS ({_LEASE_LEGS})
          SELECT g.lease_id, g.transfer_id, g.kind, g.ledger_account_id, la.account_id AS book_of, la.kind AS book,
                 g.amount, h.owner_id AS host_owner, l.account_id AS tenant
          FROM legs g JOIN ledger_accounts la ON la.id = g.ledger_account_id
          LEFT JOIN leases l ON l.id = g.lease_id LEFT JOIN hosts h ON h.id = l.host_id
          WHERE l.id IS NULL
             OR NOT ((la.kind = 'available' AND la.account_id = h.owner_id)
                     OR (la.kind = 'held' AND la.account_id = l.account_id)
                     OR (la.kind = 'fees' AND la.account_id IS NULL))
          ORDER BY g.transfer_id"""),
    # An owner that also rents GPUs holds and spends like a tenant: hence available + held, less spent.
    Check("each owner's balance equals its deposits plus what its hosts earned",
          f"SELECT * FROM ({_ACCOUNT_MONEY}) m WHERE owns_hosts"
          " AND available + held <> deposits + earned - spent ORDER BY account_id"),
    Check("the fees book equals the fees of all leases",
          "SELECT la.balance AS fees_book, (SELECT coalesce(sum(fees_amount), 0) FROM leases) AS lease_fees"
          " FROM ledger_accounts la WHERE la.account_id IS NULL AND la.kind = 'fees'"
          " AND la.balance <> (SELECT coalesce(sum(fees_amount), 0) FROM leases)"),
    Check("each tenant's available plus held equals its deposits less what its leases were billed",
          f"SELECT * FROM ({_ACCOUNT_MONEY}) m WHERE NOT owns_hosts"
          " AND available + held <> deposits - spent ORDER BY account_id"),
    Check("an ending or ended lease has its end, never before its start nor after its planned end",
          "SELECT id, status, end_reason, start_at, end_at, planned_end_at FROM leases"
          " WHERE (status <> 'active' AND end_at IS NULL) OR end_at > planned_end_at OR end_at < start_at"
          " ORDER BY id"),
    # A reclaim counts the GPUs of the spot leases it takes from (victims) while they run out: those
    # are not counted twice. Victims are the live leases tied to an active reclaim (reclaim_id), told
    # (ending) or not (they complete within their notice).
    # A host's inventory may shrink under its leases and reclaims (a GPU falls off the bus): that is
    # the hardware, not an oversale. A leased GPU that is gone takes nothing from the present ones
    # (not counted); a reclaim counts GPUs, not which ones, so a host is checked when its latest live
    # lease or active reclaim came after its last inventory report (max reported_at of its GPUs):
    # every commitment alive now was alive then, against the GPUs present now. A reclaim that took no
    # idle GPU only moved its victims' GPUs from leased to reclaimed (they are tied to it): it adds
    # nothing, so it does not make a host that lost GPUs earlier count as oversold now.
    Check("leased and reclaimed GPUs within each host's present GPUs",
          """WITH inventory AS (
              SELECT host_id, count(*) FILTER (WHERE present) AS present, max(reported_at) AS reported_at
              FROM gpus GROUP BY host_id),
          leased AS (
              SELECT l.host_id, count(*) AS leased, max(l.start_at) AS latest FROM lease_gpus lg
              JOIN leases l ON l.id = lg.lease_id
              JOIN gpus g ON g.uuid = lg.uuid AND g.host_id = l.host_id AND g.present
              WHERE lg.live
              GROUP BY l.host_id),
          -- Every live lease's GPUs above, victims under notice included; here what active
          -- reclaims hold besides (their idle GPUs, and victims' shares once those leases ended).
          reclaimed AS (
              SELECT ro.host_id, sum(ro.gpus) AS reclaimed,
                     -- a new commitment of the host's GPUs: idle ones taken (a victim's share moves
                     -- GPUs from a lease to the owner, it commits none anew)
                     (SELECT max(r.executed_at) FROM reclaims r JOIN reclaim_gpus rg ON rg.reclaim_id = r.id
                      WHERE r.status = 'active' AND rg.host_id = ro.host_id AND rg.lease_id IS NULL) AS latest
              FROM reclaim_outstanding ro GROUP BY ro.host_id)
          SELECT h.id AS host_id, i.present, coalesce(le.leased, 0) AS leased,
                 coalesce(rc.reclaimed, 0) AS reclaimed, i.reported_at AS inventory_at,
                 greatest(le.latest, rc.latest) AS latest_commitment
          FROM hosts h JOIN inventory i ON i.host_id = h.id AND i.present > 0
          LEFT JOIN leased le ON le.host_id = h.id LEFT JOIN reclaimed rc ON rc.host_id = h.id
          WHERE coalesce(le.leased, 0) + coalesce(rc.reclaimed, 0) > i.present
            AND greatest(le.latest, rc.latest) > i.reported_at
          ORDER BY h.id"""),
    # Each GPU's leases in start order: one starting before an earlier one's end overlaps it.
    Check("no two leases hold one GPU at the same time",
          f"""WITH spans AS (
              SELECT u.uuid, l.id AS lease_id, l.start_at, {_STOP.format(l='l')} AS stop
              FROM leases l, unnest(l.gpu_uuids) AS u(uuid)),
          ordered AS (
              SELECT *, max(stop) OVER w AS earlier_stop, last_value(lease_id) OVER w AS earlier_lease
              FROM spans WINDOW w AS (PARTITION BY uuid ORDER BY start_at, lease_id
                                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))
          SELECT uuid, lease_id, start_at, stop, earlier_lease, earlier_stop FROM ordered
          WHERE earlier_stop > start_at ORDER BY uuid, start_at"""),
    Check("no live lease on a failed host",
          "SELECT l.id, l.status, l.start_at, h.id AS host_id, h.health, h.last_sample_at"
          " FROM leases l JOIN hosts h ON h.id = l.host_id"
          " WHERE l.status IN ('active', 'ending') AND h.health = 'failed' AND h.last_sample_at IS NOT NULL"
          " ORDER BY l.id"),
    Check("no lease starts on a silent or failed host",
          "SELECT l.id, l.status, l.start_at, h.id AS host_id, h.health, h.last_sample_at"
          " FROM leases l JOIN hosts h ON h.id = l.host_id"
          " WHERE h.health <> 'ok' AND l.start_at > h.last_sample_at + make_interval(secs => $1)"
          " ORDER BY l.id",
          ("host_grace_s",)),
    # The settlement puts such a bid back in the book in the transaction that closes its last lease.
    Check("a preempted requeue bid whose leases are all closed is back in the book or says why not",
          """SELECT b.id AS bid_id, b.status, b.unfilled_reason, array_agg(l.id ORDER BY l.id) AS latest_leases,
                 array_agg(l.end_reason ORDER BY l.id) AS end_reasons
          FROM bids b JOIN leases l ON l.bid_id = b.id
           AND l.start_at = (SELECT max(start_at) FROM leases WHERE bid_id = b.id)
          WHERE b.requeue_on_preempt AND b.status = 'filled' AND b.unfilled_reason IS NULL
            AND NOT EXISTS (SELECT 1 FROM leases WHERE bid_id = b.id AND NOT closed)
          GROUP BY b.id, b.status, b.unfilled_reason
          HAVING bool_or(l.end_reason = ANY($1::text[]))
          ORDER BY b.id""",
          ("preemption_reasons",)),
]

# Isolation between owners (migration 0009): a fabric is its owner's, so no gang spans owners, and
# a reclaim ends only its owner's leases; gangs placed before 0009 (listed there) are exempt.
_GANGS_BEFORE_0009 = "(SELECT bid_id, tick_id FROM gangs_spanning_owners_before_0009)"
OWNER_CHECKS = [
    Check("no gang's leases span owners",
          "SELECT l.bid_id, l.tick_id, array_agg(DISTINCT h.owner_id ORDER BY h.owner_id) AS owners,"
          " array_agg(l.id ORDER BY l.id) AS leases FROM leases l JOIN hosts h ON h.id = l.host_id"
          f" WHERE l.tick_id IS NOT NULL AND (l.bid_id, l.tick_id) NOT IN {_GANGS_BEFORE_0009}"
          " GROUP BY l.bid_id, l.tick_id HAVING count(DISTINCT h.owner_id) > 1 ORDER BY l.bid_id"),
    Check("a reclaim ends only its owner's leases",
          "SELECT l.id AS lease_id, l.reclaim_id, r.owner_id AS reclaiming_owner, h.owner_id AS host_owner"
          " FROM leases l JOIN reclaims r ON r.id = l.reclaim_id JOIN hosts h ON h.id = l.host_id"
          f" WHERE h.owner_id <> r.owner_id AND (l.bid_id, l.tick_id) NOT IN {_GANGS_BEFORE_0009}"
          " ORDER BY l.id"),
    # A GPU moves to another host only once its host dropped it and no live lease holds it (one row
    # per GPU uuid in `gpus` makes "in two hosts' inventories at once" impossible by the schema).
    Check("no live lease holds a GPU registered to another host",
          "SELECT l.id AS lease_id, l.host_id AS lease_host, lg.uuid, g.host_id AS gpu_host"
          " FROM lease_gpus lg JOIN leases l ON l.id = lg.lease_id JOIN gpus g ON g.uuid = lg.uuid"
          " WHERE lg.live AND g.host_id <> l.host_id ORDER BY l.id"),
]

# What a meter sample may say (exchange.metering.bounds): ingest refuses samples that break it, so
# none stored does, unless stored before the bounds existed or written past the service. Each
# sample against its GPU's inventory, its report's arrival, and the sample of its GPU on its host
# before it (a fall of the counter is a reset, allowed).
METER_BOUNDS_CHECK = "no stored meter sample breaks the meter bounds"
METER_CHECKS = [
    # In the primary key's order (uuid, ts), so no sort: a sample is compared with the one before it
    # when both came from the same host (ingest compares within a host).
    Check(METER_BOUNDS_CHECK,
          f"""WITH s AS (
              SELECT ms.uuid, ms.ts, ms.host_id, ms.seq, ms.util, ms.mem_used_mb, ms.power_mw, ms.energy_mj,
                     ms.temp_c, lag(ms.host_id) OVER w AS prev_host_id, lag(ms.ts) OVER w AS prev_ts,
                     lag(ms.energy_mj) OVER w AS prev_energy_mj
              FROM meter_samples ms WINDOW w AS (PARTITION BY ms.uuid ORDER BY ms.ts)),
          gb AS (
              SELECT g.uuid, g.model, g.memory_mb, coalesce(pb.bound_mw, {bounds.GENERIC_POWER_BOUND_MW}) AS bound_mw
              FROM gpus g LEFT JOIN {bounds.POWER_BOUNDS_SQL} ON pb.family = {bounds.family_sql('g.model')})
          SELECT s.*, gb.model, gb.memory_mb, gb.bound_mw, r.received_at FROM s
          LEFT JOIN gb ON gb.uuid = s.uuid
          LEFT JOIN meter_reports r ON r.host_id = s.host_id AND r.seq = s.seq
          WHERE s.util NOT BETWEEN {bounds.UTIL_RANGE[0]} AND {bounds.UTIL_RANGE[1]}
             OR s.temp_c NOT BETWEEN {bounds.TEMP_RANGE_C[0]} AND {bounds.TEMP_RANGE_C[1]}
             OR s.power_mw > coalesce(gb.bound_mw, {bounds.GENERIC_POWER_BOUND_MW}) OR s.mem_used_mb > gb.memory_mb
             OR s.energy_mj > {bounds.ENERGY_CEILING_MJ}
             OR s.ts > r.received_at + make_interval(secs => {MAX_CLOCK_SKEW.total_seconds()})
             OR (s.prev_host_id = s.host_id AND s.energy_mj >= s.prev_energy_mj AND NOT {bounds.rise_allowed_sql(
                 's.energy_mj::numeric - s.prev_energy_mj',
                 's.prev_ts', 's.ts', f'coalesce(gb.bound_mw, {bounds.GENERIC_POWER_BOUND_MW})')})
          ORDER BY s.host_id, s.uuid, s.ts"""),
]

# Webhooks (migration 0011): a cursor moves only over events that exist, and every delivery of an
# event is one of its account's events the cursor has passed, of its kind (what the receiver got is
# what happened).
WEBHOOK_CHECKS = [
    Check("a webhook's cursor is within its account's events",
          "SELECT w.id AS webhook_id, w.cursor_seq, a.event_seq FROM webhooks w JOIN accounts a ON a.id = w.account_id"
          " WHERE w.cursor_seq > a.event_seq ORDER BY w.id"),
    Check("each webhook delivery of an event is its account's event, at or before the cursor",
          "SELECT d.id AS delivery_id, d.webhook_id, d.seq, d.kind, e.kind AS event_kind, w.cursor_seq"
          " FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
          " LEFT JOIN account_events e ON e.account_id = w.account_id AND e.seq = d.seq"
          " WHERE d.seq IS NOT NULL AND (e.kind IS DISTINCT FROM d.kind OR d.seq > w.cursor_seq) ORDER BY d.id"),
    # Migration 0013: only the first undelivered message of a webhook is ever sent.
    Check("a webhook's messages are delivered in order",
          "SELECT d.id AS delivery_id, d.webhook_id, e.id AS undelivered_before FROM webhook_deliveries d"
          " JOIN LATERAL (SELECT min(id) AS id FROM webhook_deliveries e WHERE e.webhook_id = d.webhook_id"
          "   AND e.id < d.id AND e.delivered_at IS NULL) e ON e.id IS NOT NULL"
          " WHERE d.delivered_at IS NOT NULL ORDER BY d.id"),
]

CHECKS: list[Check] = LEDGER_CHECKS + MARKET_CHECKS + OWNER_CHECKS + METER_CHECKS + WEBHOOK_CHECKS

_DEFAULTS = Settings()


async def run_audit(conn: asyncpg.Connection, *, now: datetime | None = None,
                    close_after_s: float = _DEFAULTS.settle_close_after_s, settle_s: float = _DEFAULTS.settle_s,
                    host_grace_s: float = _DEFAULTS.host_grace_s,
                    close_slack_s: float | None = None,
                    skip: Collection[str] = ()) -> list[tuple[str, list[dict]]]:
    """Returns the breached checks with (up to MAX_ROWS + 1 of) their offending rows; empty when
    every invariant holds. Runs in one repeatable-read snapshot so that concurrent traffic cannot
    fake a breach. `now` defaults to the database's clock; a lease may stay unclosed for
    `close_after_s` plus `close_slack_s` (default: two settlement intervals) after its end. `skip`
    names checks not to run (the simulation runs the meter check, a scan of every sample, less often)."""
    values = {
        "now": now,
        "close_window_s": float(close_after_s + (2 * settle_s if close_slack_s is None else close_slack_s)),
        "host_grace_s": float(host_grace_s),
        "preemption_reasons": [str(reason) for reason in PREEMPTION_REASONS],
    }
    breaches: list[tuple[str, list[dict]]] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for check in CHECKS:
            if check.name in skip:
                continue
            rows = await conn.fetch(f"SELECT * FROM ({check.sql}) breach LIMIT {MAX_ROWS + 1}",
                                    *(values[p] for p in check.params))
            if rows:
                breaches.append((check.name, [dict(r) for r in rows]))
    return breaches


def format_report(breaches: list[tuple[str, list[dict]]]) -> str:
    if not breaches:
        return f"ledger audit passed: {len(CHECKS)} checks"
    lines = [f"ledger audit FAILED: {len(breaches)} of {len(CHECKS)} checks breached"]
    for name, rows in breaches:
        more = len(rows) > MAX_ROWS
        lines.append(f"- {name}: {'more than ' if more else ''}{min(len(rows), MAX_ROWS)} offending rows")
        lines.extend(f"    {row}" for row in rows[:MAX_ROWS])
    return "\n".join(lines)
