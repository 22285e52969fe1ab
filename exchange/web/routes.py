from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"


@get("/", include_in_schema=False, cache=False)
async def index() -> Response[bytes]:
    return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8")


def web_routes() -> list:
    return [index, create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)]
