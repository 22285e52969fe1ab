"""The blocking client: the async one run on a private event loop in a daemon thread. Chosen over a
second implementation on httpx.Client because then the method list, the retry rule and the decoding
exist once; every coroutine method becomes a blocking call and every async iterator (ledger, bids,
leases) a plain iterator. It works the same from inside a running event loop (e.g. a notebook),
since the calls never touch the caller's loop."""
from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, AsyncIterator, Iterator

from exchange.client.aio import AsyncClient


class Client:
    """`with Client(url, key) as api: api.place_bid(...)`, the same methods as AsyncClient."""

    def __init__(self, base_url: str, key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpux-client", daemon=True)
        self._thread.start()
        self._async = self._run(self._make(base_url, key, options))

    @staticmethod
    async def _make(base_url: str, key: str | None, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(base_url, key, **options)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _iterate(self, iterator: AsyncIterator[Any]) -> Iterator[Any]:
        while True:
            try:
                yield self._run(iterator.__anext__())
            except StopAsyncIteration:
                return

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._async, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            # Decided by what the call returns, so no list of method kinds is kept here.
            result = attr(*args, **kwargs)
            if inspect.iscoroutine(result):
                return self._run(result)
            if hasattr(result, "__anext__"):
                return self._iterate(result)
            return result

        call.__name__ = name
        call.__doc__ = attr.__doc__
        return call

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
