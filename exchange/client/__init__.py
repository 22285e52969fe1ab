"""A typed Python client for the exchange's HTTP API, async (`AsyncClient`) and blocking (`Client`).

It lives inside the `exchange` package, not as a separate top-level one, because its types are the
server's own wire structs (exchange/*/schemas.py): one definition of each shape, so client and
server cannot drift. Installing the client installs the server's code too; that is the price of that
single definition, and the package is one wheel anyway."""
from exchange.client.aio import AsyncClient, new_key
from exchange.client.errors import (ApiError, BadRequest, ClientError, Conflict, ConnectionFailed, Forbidden,
                                    InvalidInput, NotFound, RateLimited, ServerError, Unauthorized)
from exchange.client.sync import Client

__all__ = ["AsyncClient", "Client", "new_key", "ApiError", "BadRequest", "ClientError", "Conflict",
           "ConnectionFailed", "Forbidden", "InvalidInput", "NotFound", "RateLimited", "ServerError",
           "Unauthorized"]
