"""Locust scenario for `gpux bench api`: tenants placing durable bids through the HTTP API.

Keys come from the file named by GPUX_BENCH_KEYS (one tenant API key a line); each simulated user
takes its own tenant, so rate limits and holds are per user as they would be in production."""
from __future__ import annotations

import itertools
import os
import random

from locust import HttpUser, constant, task

_KEYS = open(os.environ["GPUX_BENCH_KEYS"]).read().split()
_next_key = itertools.count()
MARKET = os.environ.get("GPUX_BENCH_MARKET", "H100-80GB/spot")


class Tenant(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        n = next(_next_key)
        self.client.headers["Authorization"] = f"Bearer {_KEYS[n % len(_KEYS)]}"
        self.prefix = f"u{n}-{random.getrandbits(32):x}"
        self.orders = itertools.count()

    @task
    def place_bid(self) -> None:
        body = {"market": MARKET, "gpus": random.choice([1, 2, 4, 8]), "duration_s": 3600,
                "limit_price": f"{random.uniform(0.5, 1.5):.2f}", "client_order_id": f"{self.prefix}-{next(self.orders)}"}
        with self.client.post("/v1/bids", json=body, name="POST /v1/bids", catch_response=True) as response:
            if response.status_code != 201:
                response.failure(f"{response.status_code}: {response.text[:200]}")
