"""The client's `feed`: the public market feed through the same AsyncClient (the feed's own client)."""
from __future__ import annotations

import asyncio

from exchange.client import AsyncClient
from exchange.feed.client import FeedClient
from tests.e2e.client import Api, in_seconds, unique


async def test_the_client_opens_the_public_feed_with_snapshots_and_updates(admin: Api, server) -> None:
    owner = await admin.new_account("owner")
    model = f"F{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
    market = f"{model}/spot"
    async with AsyncClient(server.base_url) as api, api.feed([market], ["book"]) as feed:
        assert isinstance(feed, FeedClient)
        first = await asyncio.wait_for(feed.recv(), 10)
        assert (first.type, first.channel, first.market) == ("snapshot", "book", market)
        await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 2, "floor_price": "1.25",
                                                        "available_until": in_seconds(3600)})
        async def ask_shown() -> None:
            while feed.views[market].book_levels()["asks"] != [(1_250_000, 2)]:
                await feed.recv()
        await asyncio.wait_for(ask_shown(), 15)
