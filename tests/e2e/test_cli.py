"""Issue 12, must-show 1: with only the `gpux` CLI (real processes) against a live `gpux serve`, a
tenant's day (login, quote, bid, see it fill, lease, cost, balance, cancel) and an owner's (host,
offer, reclaim with a retried key acting once, earnings). Every command run with --json must print
one JSON document, on success and on failure alike. The owner's host runs a real simulated agent."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.client import unique
from tests.support import ADMIN_KEY, start_agent, start_server

SERVER_ENV = {"GPUX_TICK_S": "0.2", "GPUX_SETTLE_S": "1", "GPUX_SETTLE_CLOSE_AFTER_S": "2",
              "GPUX_MIN_DURATION_S": "5"}


@dataclass
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def doc(self) -> Any:
        return json.loads(self.out)


class Cli:
    """`gpux` as a user runs it: a process per command, its profiles in its own config file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.runs: list[Run] = []

    def __call__(self, *args: str, expect: int = 0, env: dict[str, str] | None = None) -> Run:
        base = {k: v for k, v in os.environ.items() if k not in ("GPUX_URL", "GPUX_API_KEY", "GPUX_PROFILE")}
        proc = subprocess.run([sys.executable, "-m", "exchange.cli", *args], capture_output=True, text=True,
                              timeout=60, env={**base, "GPUX_CONFIG": str(self.config), **(env or {})})
        run = Run(args, proc.returncode, proc.stdout, proc.stderr)
        self.runs.append(run)
        assert run.code == expect, f"gpux {' '.join(args)} -> {run.code}\nstdout: {run.out}\nstderr: {run.err}"
        if "--json" in args and "--follow" not in args:  # a followed stream is JSON Lines
            run.doc  # noqa: B018 (every --json answer parses, errors included)
        return run

    def json(self, *args: str, expect: int = 0, **kw: Any) -> Any:
        return self(*args, "--json", expect=expect, **kw).doc

    def until(self, predicate, *args: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            doc = self.json(*args)
            if predicate(doc):
                return doc
            assert time.monotonic() < deadline, f"gpux {' '.join(args)} never satisfied the test: {doc}"
            time.sleep(0.3)



@pytest.fixture
def server(tmp_path: Path, fresh_db: str):
    proc = start_server(tmp_path / "server", database_url=fresh_db, extra_env=SERVER_ENV)
    yield proc
    proc.stop()


def test_a_tenants_day_and_an_owners_day_with_only_the_cli(tmp_path: Path, server) -> None:
    cli = Cli(tmp_path / "cfg" / "gpux.toml")
    url = server.base_url
    model = "A100-80GB"  # one the simulated agent knows; the database is this test's own
    market = f"{model}/spot"

    # The admin: accounts and money.
    cli("login", "--profile", "admin", "--url", url, "--key", ADMIN_KEY, "--no-default", "--json")
    owner = cli.json("account", "create", unique("owner"), "--role", "owner", "--profile", "admin")
    tenant = cli.json("account", "create", unique("tenant"), "--role", "tenant", "--profile", "admin")
    deposit = cli.json("deposit", str(tenant["id"]), "100.00", "--key", "first-deposit", "--profile", "admin")
    again = cli.json("deposit", str(tenant["id"]), "100.00", "--key", "first-deposit", "--profile", "admin")
    assert again["id"] == deposit["id"]  # a retried deposit is one deposit

    # Profiles: the file is private, the default is the tenant, the owner is named.
    logged = cli.json("login", "--url", url, "--key", tenant["api_key"], "--profile", "tenant")
    assert logged["role"] == "tenant" and logged["account_id"] == tenant["id"] and "key" not in logged
    cli.json("login", "--url", url, "--key", owner["api_key"], "--profile", "owner", "--no-default")
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert cli.json("whoami")["id"] == tenant["id"]
    assert cli.json("whoami", "--profile", "owner")["id"] == owner["id"]
    assert cli.json("whoami", env={"GPUX_API_KEY": owner["api_key"]})["id"] == owner["id"]  # env over the file
    saved = cli.config.read_text()
    wrong = cli("login", "--url", url, "--key", "gpx_not_a_key", "--profile", "tenant", "--json", expect=1)
    assert wrong.doc["error"]["status"] == 401 and cli.config.read_text() == saved  # nothing saved

    # The owner's day, part 1: a host, its agent (the owner runs it with the token), an offer.
    host = cli.json("host", "create", unique("host"), "--fabric", unique("pod"), "--profile", "owner")
    agent = start_agent(tmp_path, url, host["agent_token"], host="cli-host", simulate=f"4x{model}")
    try:
        cli.until(lambda hosts: [len(h["gpus"]) for h in hosts] == [4], "hosts", "--profile", "owner")
        offer = cli.json("offer", "create", "--host", str(host["id"]), "--gpus", "4", "--floor-price", "1.00",
                         "--until", "+2h", "--notice", "5s", "--profile", "owner")
        assert offer["status"] == "live" and offer["reclaim_notice_s"] == 5 and offer["model"] == model
        assert [o["id"] for o in cli.json("offers", "--status", "live", "--profile", "owner")] == [offer["id"]]

        # The tenant's day: markets, book, quote, bid, fill, lease, cost, balance, cancel.
        cli.until(lambda markets: market in {m["id"] for m in markets}, "markets")
        book = cli.until(lambda b: b["asks"] == [{"price": "1.00", "gpus": 4}], "book", market)
        assert book["market"] == market
        terms = ("--market", market, "--gpus", "2", "--duration", "1h", "--limit-price", "2.00")
        quote = cli.json("quote", *terms)
        assert quote["would_fill"] is True and quote["price"] == "1.00" and quote["eligible_gpus"] == 4
        assert cli.json("bids") == []  # a quote places nothing
        balance_before = cli.json("balance")
        assert balance_before == {"available": "100.00", "held": "0.00"}

        bid = cli.json("bid", *terms, "--client-order-id", "day-1")
        assert (bid["market"], bid["gpus"], bid["duration_s"], bid["limit_price"]) == (market, 2, 3600, "2.00")
        assert bid["client_order_id"] == "day-1" and bid["hold"] == "4.00"
        retried = cli("bid", *terms, "--client-order-id", "day-1", "--json")
        assert retried.doc["id"] == bid["id"] and "warning" not in retried.err  # same terms: the same bid
        other_terms = cli("bid", "--market", market, "--gpus", "1", "--duration", "1h", "--limit-price", "2.00",
                          "--client-order-id", "day-1", "--json", expect=1)
        assert other_terms.doc["error"]["code"] and other_terms.doc["error"]["status"] == 409

        filled = cli.until(lambda b: b["status"] == "filled", "bid", "show", str(bid["id"]))
        assert filled["unfilled_reason"] is None
        leases = cli.until(lambda items: len(items) == 1 and items[0]["status"] == "active", "leases")
        lease = cli.json("lease", "show", str(leases[0]["id"]))
        assert (lease["bid_id"], lease["gpus"], lease["price"], lease["host_id"]) == (bid["id"], 2, "1.00", host["id"])
        # Settled every second while it runs: the tenant is charged, the owner earns the same less fees.
        earnings = cli.until(lambda e: e["total"]["earned"] != "0.00", "earnings", "--profile", "owner")
        assert [h["host_id"] for h in earnings["hosts"]] == [host["id"]] and earnings["total"]["leases"] == 1
        assert earnings["total"]["earned"] == earnings["hosts"][0]["earned"]
        cost = cli.until(lambda c: c["charged"] != "0.00", "cost", str(bid["id"]))
        assert cost["bid_id"] == bid["id"] and cost["leases"] == 1
        held = cli.json("balance")
        assert held["held"] != "0.00"

        resting = cli.json("bid", "--market", market, "--gpus", "1", "--duration", "1h", "--price", "0.50")
        shown = cli.until(lambda b: b["unfilled_reason"] is not None, "bid", "show", str(resting["id"]))
        assert shown["status"] == "open" and shown["unfilled_shortfall"]
        assert [b["id"] for b in cli.json("bids", "--status", "open")] == [resting["id"]]
        cancelled = cli.json("cancel", str(resting["id"]))
        assert cancelled["status"] == "cancelled"
        assert cli.json("cancel", str(resting["id"]))["status"] == "cancelled"  # a retried cancel is harmless
        assert sorted(b["id"] for b in cli.json("bids", "--all")) == sorted([bid["id"], resting["id"]])
        assert cli.json("ledger")  # deposits, holds

        # The owner's day, part 2: a reclaim with a key, retried: one reclaim, one effect.
        reclaim_args = ("reclaim", "--model", model, "--gpus", "4", "--host", str(host["id"]), "--key", "rk-1",
                        "--profile", "owner")
        reclaim = cli.json(*reclaim_args)
        assert reclaim["taken_free"] == 2 and [le["id"] for le in reclaim["leases"]] == [lease["id"]]
        retried_reclaim = cli.json(*reclaim_args)
        assert retried_reclaim["id"] == reclaim["id"] and retried_reclaim["leases"] == reclaim["leases"]
        assert [r["id"] for r in cli.json("reclaims", "--profile", "owner")] == [reclaim["id"]]
        conflict = cli("reclaim", "--model", model, "--gpus", "1", "--key", "rk-1", "--profile", "owner", "--json",
                       expect=1)
        assert conflict.doc["error"]["status"] == 409
        ending = cli.json("lease", "show", str(lease["id"]))
        assert ending["status"] in ("ending", "ended")

        # Reclaimed within the offer's free window, the lease ends after its 5 s notice free of charge:
        # what it was billed goes back to the tenant, and the owner's earnings back to zero.
        assert reclaim["leases"][0]["free_of_charge"] is True
        cli.until(lambda le: le["status"] == "ended" and le["settled_at"], "lease", "show", str(lease["id"]),
                  timeout_s=60)
        assert cli.until(lambda b: b["held"] == "0.00", "balance") == {"available": "100.00", "held": "0.00"}
        assert cli.json("cost", str(bid["id"]))["charged"] == "0.00"
        assert cli.json("earnings", "--profile", "owner")["total"]["earned"] == "0.00"

        # The private events of that day, as history (one JSON array) and followed (JSON Lines).
        history = cli.json("events")
        assert [e["type"] for e in history if e["data"]["id"] == lease["id"]] == [
            "fill", "lease_started", "notice", "lease_ended"]
        assert [e["seq"] for e in history] == sorted(e["seq"] for e in history)
        followed = cli("events", "--follow", "--since", "0", "--count", "2", "--json")
        assert [json.loads(line)["seq"] for line in followed.out.splitlines()] == [e["seq"] for e in history[:2]]
        assert cli.json("events", "--since", str(history[-1]["seq"])) == []
    finally:
        agent.stop()

    # Refusals: the API's code and message, exit status 1, and JSON on stdout with --json.
    missing = cli("bid", "show", "999999999", "--json", expect=1)
    assert missing.doc["error"]["code"] == "not_found" and "not_found" in missing.err
    foreign = cli("offer", "withdraw", str(offer["id"]), "--json", expect=1)  # the tenant is not its owner
    assert foreign.doc["error"]["status"] in (403, 404)
    bad = cli("bid", "--market", "nope", "--gpus", "1", "--duration", "1h", "--price", "1", "--json", expect=1)
    assert bad.doc["error"]["field"] == "market"
    usage = cli("bid", "--gpus", "1", "--json", expect=2)
    assert usage.doc["error"]["code"] == "usage"

    # Every --json run printed one JSON document; every command in the day ran at least once.
    ran = {run.args[0] for run in cli.runs}
    assert {"login", "quote", "bid", "bids", "lease", "leases", "cost", "balance", "cancel", "host", "hosts",
            "offer", "offers", "reclaim", "reclaims", "earnings", "account", "deposit", "ledger", "events"} <= ran
    assert all(run.doc is not None for run in cli.runs if "--json" in run.args and "--follow" not in run.args)
