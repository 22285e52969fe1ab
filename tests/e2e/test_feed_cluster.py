"""Feed fan-out across server processes: two `gpux serve` processes on one database; the trade is
made through one (which runs the auction), and a subscriber of the other sees it (PostgreSQL
LISTEN/NOTIFY through Litestar's channels plugin)."""
from __future__ import annotations

from tests.conftest import create_database
from tests.e2e.client import Api
from tests.e2e.test_feed import cross, new_market, read_until
from exchange.feed.client import FeedClient
from tests.support import ADMIN_KEY, start_server


async def test_a_trade_made_through_one_process_reaches_a_subscriber_of_another(
        pg_server_url: str, template_db: str, tmp_path) -> None:
    db = await create_database(pg_server_url, template_db)
    leader = start_server(tmp_path / "a", database_url=db)
    # The second process never runs the auction: whatever it sends came from the first one.
    follower = start_server(tmp_path / "b", database_url=db, extra_env={"GPUX_SCHEDULER": "0"})
    try:
        async with Api(leader.base_url, ADMIN_KEY) as admin:
            model, owner, host = await new_market(admin)
            market = f"{model}/spot"
            async with FeedClient(follower.base_url, [market], ["trades", "ticker"]) as client:
                await read_until(client, lambda s: sum(m.type == "snapshot" for m in s) == 2)
                await cross(admin, owner, host, model)
                messages = await read_until(
                    client, lambda s: any(m.channel == "trades" and m.type == "update" for m in s))
        trades = [t for m in messages if m.channel == "trades" and m.type == "update" for t in m.data["trades"]]
        assert sum(t["gpus"] for t in trades) == 8 and {t["price"] for t in trades} == {"2.00"}
        assert client.gaps == 0 and client.views[market].ticker["last"] == "2.00"
    finally:
        follower.stop()
        leader.stop()
