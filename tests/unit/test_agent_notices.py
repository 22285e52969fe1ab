"""agents/notices.py: the notice file's life (written once per notice, rewritten when the exchange
moves the end, kept across a restart, removed when the lease stops running) and the local endpoint
over real loopback HTTP."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

import httpx
import msgspec

from agents.notices import NoticeBoard, serve_metadata
from exchange.leases.schemas import OwnerLease
from tests.unit.exchange_answers import owner_lease

UUIDS = ["GPU-a", "GPU-b"]


def lease(status: str, end_at: str | None = None, reason: str | None = None, lease_id: int = 7) -> OwnerLease:
    return owner_lease(lease_id, status, UUIDS, end_at=datetime.fromisoformat(end_at) if end_at else None,
                       end_reason=reason)


def test_notice_file_lifecycle(tmp_path: Path) -> None:
    board = NoticeBoard(tmp_path / "notices", clock=lambda: 1_800_000_000.0)
    path = board.path_for("7")

    quiet = board.update([lease("active")])
    first = board.update([lease("ending", "2027-01-15T08:00:00Z", "outbid")])
    written = json.loads(path.read_text())
    again = board.update([lease("ending", "2027-01-15T08:00:00Z", "outbid")])
    moved = board.update([lease("ending", "2027-01-15T08:05:00Z", "outbid")])
    reloaded = NoticeBoard(tmp_path / "notices").get("7")  # an agent restart
    board.update([])  # the lease is no longer running

    assert quiet == [] and len(first) == 1 and again == []
    assert written == {"lease_id": "7", "action": "terminate", "time": "2027-01-15T08:00:00Z", "reason": "outbid",
                       "gpu_uuids": UUIDS, "noticed_at": "2027-01-15T08:00:00.000000Z"}
    assert [n.time for n in moved] == ["2027-01-15T08:05:00Z"] and moved[0].noticed_at == written["noticed_at"]
    assert reloaded == moved[0]
    assert not path.exists() and board.get("7") is None and list((tmp_path / "notices").iterdir()) == []


async def test_metadata_endpoint(tmp_path: Path) -> None:
    board = NoticeBoard(tmp_path / "notices")
    server = await serve_metadata(board, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            before = await client.get("/v1/leases/7/notice")
            aws_before = await client.get("/latest/meta-data/spot/instance-action")
            board.update([lease("ending", "2027-01-15T08:00:00Z", "reclaimed"),
                          lease("ending", "2027-01-15T07:00:00Z", "outbid", lease_id=8), lease("active", lease_id=9)])
            one = await client.get("/v1/leases/7/notice")
            other = await client.get("/v1/leases/9/notice")
            aws = await client.get("/latest/meta-data/spot/instance-action")
            listed = await client.get("/v1/notices")
            post = await client.post("/v1/notices")
            unknown = await client.get("/v1/leases/7/notice/extra")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"garbage\r\n\r\n")
            raw = await reader.read()
            writer.close()
    finally:
        server.close()
        await server.wait_closed()

    assert before.status_code == 404 and before.json()["error"]["code"] == "not_found"
    assert aws_before.status_code == 404
    assert one.status_code == 200 and one.json()["reason"] == "reclaimed" and one.json()["lease_id"] == "7"
    assert other.status_code == 404
    assert aws.json() == {"action": "terminate", "time": "2027-01-15T07:00:00Z"}  # the first to end
    assert [n["lease_id"] for n in listed.json()["items"]] == ["8", "7"]
    assert post.status_code == 405 and unknown.status_code == 404
    assert raw.startswith(b"HTTP/1.1 400 ")


def test_a_lease_id_that_is_not_a_plain_name_gets_no_file(tmp_path: Path) -> None:
    board = NoticeBoard(tmp_path / "notices")

    # The exchange's ids are integers; the check guards the file name whatever an id becomes.
    escape = msgspec.structs.replace(lease("ending", "2027-01-15T08:00:00Z", "outbid"), id="../escape")
    written = board.update([escape])

    assert written == [] and not (tmp_path / "escape.json").exists()
    assert list((tmp_path / "notices").iterdir()) == []
