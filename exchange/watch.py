"""`gpux watch MARKET`: a live terminal view of one market from the public feed (`/v1/feed`):
price, 24 h figures and reclaim risk, book depth, recent trades and preemptions. Redraws on every
message; resyncs on a gap like any feed client (exchange.feed.client)."""
from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime

import msgspec

from exchange.core.money import format_money
from exchange.feed.client import FeedClient, MarketView

CLEAR = "\x1b[H\x1b[2J"
GREEN, RED, DIM, BOLD, RESET = "\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


def _hhmmss(iso: str) -> str:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%H:%M:%S")


def render(market: str, view: MarketView, client: FeedClient, depth: int = 8, color: bool = True) -> str:
    c = (lambda code, text: f"{code}{text}{RESET}") if color else (lambda code, text: text)
    k = view.ticker or {}
    lines = [c(BOLD, f"{market}") + f"   last {k.get('last') or '–'}   indicative {k.get('indicative') or '–'}"
             f"   bid {k.get('best_bid') or '–'} / ask {k.get('best_ask') or '–'}"]
    change = k.get("change_24h")
    pct = k.get("change_24h_pct")
    risk = k.get("risk") or {}
    lines.append(f"24h: change {change or '–'}" + (f" ({pct:+.2f}%)" if pct is not None else "")
                 + f"   volume {k.get('volume_24h_gpu_h', 0):.1f} GPU-h   trades {k.get('trades_24h', 0)}"
                 + f"   reclaim risk {100 * risk.get('preempted_share', 0):.1f}% preempted,"
                   f" hazard {risk.get('hazard_per_h', 0):.3f}/h")
    lines.append("")
    levels = view.book_levels()
    asks = levels["asks"][:depth]
    bids = levels["bids"][:depth]
    widest = max([g for _, g in asks + bids] or [1])
    bar = lambda g: "#" * max(1, round(20 * g / widest))  # noqa: E731
    lines.append(c(DIM, f"{'price':>10} {'GPUs':>6}  depth"))
    for price, gpus in reversed(asks):
        lines.append(c(RED, f"{format_money(price):>10} {gpus:>6}  {bar(gpus)}"))
    lines.append(c(DIM, "-" * 40))
    for price, gpus in bids:
        lines.append(c(GREEN, f"{format_money(price):>10} {gpus:>6}  {bar(gpus)}"))
    lines.append("")
    lines.append(c(DIM, "recent trades"))
    for t in list(view.trades)[-8:][::-1]:
        lines.append(f"  {_hhmmss(t['at'])}  {t['price']:>8}  {t['gpus']:>4} GPUs  {t['gpu_hours']:>8} GPU-h")
    if view.preemptions:
        lines.append(c(DIM, "preemptions"))
        for p in list(view.preemptions)[-4:][::-1]:
            lines.append(f"  {_hhmmss(p['at'])}  {p['reason']:<10} {p['gpus']:>4} GPUs  lease {p['lease_id']}")
    seqs = " ".join(f"{ch}={client.seq.get((market, ch), '–')}" for ch in client.channels)
    lines.append(c(DIM, f"seq {seqs}   gaps {client.gaps}   heartbeats {client.heartbeats}"))
    return "\n".join(lines)


async def watch(base_url: str, market: str, *, once: bool = False, seconds: float | None = None,
                color: bool = True, as_json: bool = False, out=sys.stdout) -> int:
    """Redraw the view on every message; with `as_json`, write each feed message (heartbeats aside)
    as one JSON line instead, for programs. `once`: stop when every channel's snapshot is in."""
    async with FeedClient(base_url, [market]) as client:
        deadline = time.monotonic() + seconds if seconds else None
        snapshots = 0
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                env = await asyncio.wait_for(client.recv(), timeout)
            except asyncio.TimeoutError:
                return 0
            if as_json and env.type != "heartbeat":
                out.write(msgspec.json.encode(env).decode() + "\n")
                out.flush()
            if env.type == "error":
                print(f"gpux: error: {env.data.get('code')}: {env.data.get('message')}", file=sys.stderr)
                return 1
            snapshots += env.type == "snapshot"
            if as_json:
                if once and snapshots >= len(client.channels):
                    return 0
                continue
            if snapshots < len(client.channels):
                continue  # draw once everything is in
            frame = render(market, client.views[market], client, color=color)
            out.write(frame + "\n" if once else CLEAR + frame + "\n")
            out.flush()
            if once:
                return 0
