"""The agent's Prometheus endpoint: GPU readings under dcgm-exporter's names, labels and units, plus
the agent's own counters, so that an owner's existing DCGM Grafana dashboards work unchanged.

dcgm-exporter's defaults (``default-counters.csv``) that we serve, in its units:

- ``DCGM_FI_DEV_GPU_UTIL`` gauge, %;  ``DCGM_FI_DEV_POWER_USAGE`` gauge, W;
- ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` counter, mJ since boot (no ``_total`` suffix: dcgm-exporter
  writes none, and dashboards query the bare name);
- ``DCGM_FI_DEV_GPU_TEMP`` gauge, °C;  ``DCGM_FI_DEV_FB_USED`` / ``DCGM_FI_DEV_FB_FREE`` gauges, MiB;
- ``DCGM_FI_DEV_XID_ERRORS`` gauge, the value of the last XID seen (0: none).

Labels as dcgm-exporter writes them: ``gpu`` (index), ``UUID``, ``device`` (``nvidia<index>``),
``modelName`` (the driver's product name), ``Hostname``. The text is rendered here rather than with
``prometheus_client``: its registry would add ``_total`` to the energy counter's name, and its
global registry is the exchange server's.

The server is a few lines of asyncio: it answers ``GET /metrics`` (and ``/``) on 127.0.0.1 only, one
request per connection, and never touches the agent's state beyond reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import msgspec

from agents.probe import GpuInfo, GpuSample

__all__ = ["AgentCounters", "MetricsServer", "render_metrics"]

log = logging.getLogger("gpux.agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST_BYTES = 8192  # a scrape's request line and headers; anything larger is not a scraper
_READ_TIMEOUT_S = 5.0


class AgentCounters(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent's own figures at one moment."""

    spool_reports: int  # meter reports spooled, not yet acknowledged by the exchange
    spool_bytes: int
    spool_dropped_reports: int  # dropped by the spool's bounds while the exchange was away
    reports_sent: int  # delivered (accepted, or already held by the exchange)
    reports_refused: int  # refused for good by the exchange (4xx) and dropped
    leases: int  # live leases on this host in the latest listing
    samples_taken: int


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# (name, type, help, reading): dcgm-exporter's help strings, so that the text reads as its own.
_GPU_FIELDS: tuple[tuple[str, str, str, Callable[[GpuSample, GpuInfo], float]], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda s, _: s.util),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda s, _: s.power_mw / 1000),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ).",
     lambda s, _: s.energy_mj),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda s, _: s.temp_c),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", lambda s, _: s.mem_used_mb),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).",
     lambda s, gpu: max(0, gpu.memory_mb - s.mem_used_mb)),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", lambda s, _: s.last_xid),
)


def render_metrics(hostname: str, inventory: Sequence[GpuInfo], samples: Sequence[GpuSample],
                   counters: AgentCounters) -> str:
    """Prometheus text (format 0.0.4). A GPU with no reading yet is left out of the DCGM series (as
    dcgm-exporter leaves out a field it cannot read) rather than reported as zero."""
    by_uuid = {gpu.uuid: gpu for gpu in inventory}
    readings = [(sample, by_uuid[sample.uuid]) for sample in samples if sample.uuid in by_uuid]
    readings.sort(key=lambda pair: pair[1].index)
    lines: list[str] = []
    for name, kind, help_text, read in _GPU_FIELDS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for sample, gpu in readings:
            labels = (f'gpu="{gpu.index}",UUID="{_escape(gpu.uuid)}",device="nvidia{gpu.index}",'
                      f'modelName="{_escape(gpu.name)}",Hostname="{_escape(hostname)}"')
            lines.append(f"{name}{{{labels}}} {_number(read(sample, gpu))}")
    host = f'Hostname="{_escape(hostname)}"'
    for name, kind, help_text, value in (
        ("gpux_agent_spool_reports", "gauge", "Meter reports spooled and not yet acknowledged by the exchange.",
         counters.spool_reports),
        ("gpux_agent_spool_bytes", "gauge", "Bytes of spooled meter reports.", counters.spool_bytes),
        ("gpux_agent_spool_dropped_reports_total", "counter",
         "Meter reports dropped by the spool's bounds (exchange away too long).", counters.spool_dropped_reports),
        ("gpux_agent_meter_reports_sent_total", "counter", "Meter reports delivered to the exchange.",
         counters.reports_sent),
        ("gpux_agent_meter_reports_refused_total", "counter",
         "Meter reports refused for good by the exchange and dropped.", counters.reports_refused),
        ("gpux_agent_leases", "gauge", "Live leases on this host in the latest listing.", counters.leases),
        ("gpux_agent_gpus", "gauge", "GPUs this agent found.", len(inventory)),
        ("gpux_agent_samples_total", "counter", "Sampling rounds of all GPUs since the agent started.",
         counters.samples_taken),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{host}}} {_number(value)}"]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``render()`` at ``http://host:port/metrics``; port 0 binds a free port (see :attr:`port`)."""

    def __init__(self, render: Callable[[], str], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._render = render
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("agent metrics on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, *_ = request_line.split(" ") + ["", ""]
            path = target.split("?", 1)[0]
            if len(head) > _MAX_REQUEST_BYTES:
                status, body, ctype = "431 Request Header Fields Too Large", b"", "text/plain"
            elif method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif path not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                try:
                    status, body, ctype = "200 OK", self._render().encode(), CONTENT_TYPE
                except Exception:  # a scrape must never take the agent down
                    log.exception("rendering the agent metrics failed")
                    status, body, ctype = "500 Internal Server Error", b"", "text/plain"
            header = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                      f"Connection: close\r\n\r\n").encode()
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
