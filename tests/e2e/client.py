"""A small HTTP client for tests: real requests against a running server."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import httpx

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}-{id(_names) % 10_000}"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def in_seconds(seconds: float) -> str:
    return rfc3339(datetime.now(timezone.utc) + timedelta(seconds=seconds))


def in_hours(hours: float) -> str:
    return rfc3339(datetime.now(timezone.utc) + timedelta(hours=hours))


class Api:
    def __init__(self, base_url: str, key: str | None) -> None:
        self.base_url = base_url
        self.key = key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30)
        self._children: list[Api] = []

    async def __aenter__(self) -> "Api":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes this client and every client made from it by `as_key`."""
        for child in self._children:
            await child.aclose()
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return await self.http.request(method, path, **kwargs)

    async def ok(self, method: str, path: str, expect: int = 200, **kwargs) -> dict:
        response = await self.http.request(method, path, **kwargs)
        assert response.status_code == expect, f"{method} {path} -> {response.status_code} {response.text}"
        return response.json()

    def as_key(self, key: str | None) -> "Api":
        child = Api(self.base_url, key)
        self._children.append(child)
        return child

    # --- scenario helpers (each one real call through the API) ---------------------------------
    async def new_account(self, role: str, deposit: str | None = None) -> "Api":
        created = await self.ok("POST", "/v1/accounts", 201, json={"name": unique(role), "role": role})
        if deposit:
            await self.ok("POST", f"/v1/accounts/{created['id']}/deposits", 201,
                          json={"amount": deposit, "idempotency_key": unique("dep")})
        api = self.as_key(created["api_key"])
        api.account_id = created["id"]  # type: ignore[attr-defined]
        return api

    async def new_host(self, gpus: int = 8, model: str = "H100-80GB", fabric: str = "pod-a") -> tuple[dict, "Api"]:
        host = await self.ok("POST", "/v1/hosts", 201, json={"name": unique("host"), "fabric": fabric})
        agent = self.as_key(host["agent_token"])
        inventory = {"gpus": [{"uuid": f"GPU-{host['id']:04d}-{i:04d}-{unique('u')}", "model": model,
                               "memory_mb": 81559} for i in range(gpus)]}
        await agent.ok("PUT", "/v1/agent/inventory", json=inventory)
        return host, agent
