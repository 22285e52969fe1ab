"""The public market-data feed: a publisher on the matching leader, a hub in every server process
(fan-out over Litestar's channels plugin), the `/v1/feed` websocket and a client (gpux watch)."""
