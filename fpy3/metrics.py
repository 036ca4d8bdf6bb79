"""Metrics: a block of 64-bit counters per worker, and the Prometheus text the master
makes of all of them.

The master maps one small shared block (anonymous ``MAP_SHARED``) per worker before
the fork. The worker counts into it (``Block``): at the end of every response a few
integer additions (``HTTPService.response_done``), and once a second its gauges and
the QUIC engine's counters. The master reads the blocks when scraped; when a worker
exits it adds the worker's counters into its own totals, so counters never go back
across reloads and recycles, and gauges cover the live workers only.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left

# Protocol label per ASGI http_version; HTTP/1.0 is counted with HTTP/1.1.
PROTOCOLS = ("http/1.1", "h2", "h3")
PROTOCOL_INDEX = {"1.1": 0, "1.0": 0, "2": 1, "3": 2}

# Request latency buckets (seconds), Prometheus' defaults: upper bounds, then +Inf.
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# QUIC smoothed RTT buckets (microseconds): native/h3.c fpy3_h3_rtt_bounds_us.
RTT_BOUNDS_US = (1000, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000)

# One block per protocol: responses by status (index = status code), the latency
# buckets, the latency sum in microseconds, websocket sessions.
STATUSES = 600
HIST = STATUSES
HIST_SUM = HIST + len(LATENCY_BOUNDS) + 1
WS_SESSIONS = HIST_SUM + 1
PROTO_SIZE = WS_SESSIONS + 1
PROTO_BASE = {version: PROTOCOL_INDEX[version] * PROTO_SIZE for version in PROTOCOL_INDEX}

# Then the worker's QUIC counters, written once a second (totals of its engines).
QUIC = len(PROTOCOLS) * PROTO_SIZE
QUIC_HANDSHAKES = QUIC
QUIC_LOST = QUIC + 1
QUIC_RTT_COUNT = QUIC + 2
QUIC_RTT_SUM_US = QUIC + 3
QUIC_RTT = QUIC + 4  # len(RTT_BOUNDS_US) + 1 buckets
COUNTERS = QUIC_RTT + len(RTT_BOUNDS_US) + 1  # everything before is a counter

# Gauges, written once a second: open connections and streams per protocol, websockets.
CONNECTIONS = COUNTERS
STREAMS = CONNECTIONS + len(PROTOCOLS)
WEBSOCKETS = STREAMS + len(PROTOCOLS)
SIZE = WEBSOCKETS + 1

BLOCK_BYTES = SIZE * 8


def latency_bucket(seconds: float) -> int:
    return bisect_left(LATENCY_BOUNDS, seconds)


class Block:
    """One worker's counters in a shared mapping (the master's view and the worker's)."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, BLOCK_BYTES)  # anonymous, MAP_SHARED: seen across fork
        self.counts = memoryview(self.map).cast("q")

    def snapshot(self) -> list[int]:
        return self.counts.tolist()

    def close(self) -> None:
        self.counts.release()
        self.map.close()


class Totals:
    """The master's view: the counters of exited workers plus the live blocks."""

    def __init__(self) -> None:
        self.retired = [0] * COUNTERS
        self.worker_starts = 0
        self.worker_exits: dict[str, int] = {}  # "ok" | "error" | "signal" -> count
        self.reloads: dict[str, int] = {}  # "ok" | "refused" | "failed" -> count

    def retire(self, block: Block) -> None:
        """A worker exited: keep its counters."""
        values = block.snapshot()
        retired = self.retired
        for i in range(COUNTERS):
            retired[i] += values[i]

    def collect(self, blocks: list[Block]) -> list[int]:
        values = [*self.retired, *([0] * (SIZE - COUNTERS))]
        for block in blocks:
            for i, v in enumerate(block.snapshot()):
                values[i] += v
        return values


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def _le(bound: float) -> str:
    return repr(float(bound))


def render(values: list[int], totals: Totals, workers: int, generation: int) -> str:
    """The Prometheus text exposition (version 0.0.4) of ``values`` (Totals.collect)."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("fpy3_requests_total", "counter", "Responses finished, by protocol and status code.")
    for p, proto in enumerate(PROTOCOLS):
        base = p * PROTO_SIZE
        for status in range(100, STATUSES):
            if n := values[base + status]:
                out.append(f"fpy3_requests_total{_labels(protocol=proto, code=status)} {n}")

    family(
        "fpy3_request_duration_seconds",
        "histogram",
        "Time from the request to the end of its response.",
    )
    for p, proto in enumerate(PROTOCOLS):
        base = p * PROTO_SIZE
        total = 0
        for i, bound in enumerate(LATENCY_BOUNDS):
            total += values[base + HIST + i]
            le = _labels(protocol=proto, le=_le(bound))
            out.append(f"fpy3_request_duration_seconds_bucket{le} {total}")
        total += values[base + HIST + len(LATENCY_BOUNDS)]
        out.append(
            f"fpy3_request_duration_seconds_bucket{_labels(protocol=proto, le='+Inf')} {total}"
        )
        seconds = values[base + HIST_SUM] / 1e6
        out.append(f"fpy3_request_duration_seconds_sum{_labels(protocol=proto)} {seconds!r}")
        out.append(f"fpy3_request_duration_seconds_count{_labels(protocol=proto)} {total}")

    family("fpy3_websocket_sessions_total", "counter", "Websocket handshakes accepted.")
    for p, proto in enumerate(PROTOCOLS):
        n = values[p * PROTO_SIZE + WS_SESSIONS]
        out.append(f"fpy3_websocket_sessions_total{_labels(protocol=proto)} {n}")

    family("fpy3_open_connections", "gauge", "Open client connections, by protocol.")
    for p, proto in enumerate(PROTOCOLS):
        out.append(f"fpy3_open_connections{_labels(protocol=proto)} {values[CONNECTIONS + p]}")
    family("fpy3_open_streams", "gauge", "Requests in progress, by protocol.")
    for p, proto in enumerate(PROTOCOLS):
        out.append(f"fpy3_open_streams{_labels(protocol=proto)} {values[STREAMS + p]}")
    family("fpy3_open_websockets", "gauge", "Open websockets.")
    out.append(f"fpy3_open_websockets {values[WEBSOCKETS]}")

    family("fpy3_quic_handshakes_total", "counter", "QUIC handshakes completed.")
    out.append(f"fpy3_quic_handshakes_total {values[QUIC_HANDSHAKES]}")
    family(
        "fpy3_quic_lost_packets_total",
        "counter",
        "QUIC packets carrying stream data that were declared lost (their data is sent "
        "again), counted when their stream ends.",
    )
    out.append(f"fpy3_quic_lost_packets_total {values[QUIC_LOST]}")
    family(
        "fpy3_quic_rtt_seconds",
        "histogram",
        "Smoothed round-trip time of each QUIC connection, observed at its end.",
    )
    total = 0
    for i, bound in enumerate(RTT_BOUNDS_US):
        total += values[QUIC_RTT + i]
        out.append(f"fpy3_quic_rtt_seconds_bucket{_labels(le=_le(bound / 1e6))} {total}")
    total += values[QUIC_RTT + len(RTT_BOUNDS_US)]
    out.append(f"fpy3_quic_rtt_seconds_bucket{_labels(le='+Inf')} {total}")
    out.append(f"fpy3_quic_rtt_seconds_sum {values[QUIC_RTT_SUM_US] / 1e6!r}")
    out.append(f"fpy3_quic_rtt_seconds_count {total}")

    family("fpy3_workers", "gauge", "Worker processes running.")
    out.append(f"fpy3_workers {workers}")
    family("fpy3_generation", "gauge", "The current generation of workers (reloads + 1).")
    out.append(f"fpy3_generation {generation}")
    family("fpy3_worker_starts_total", "counter", "Worker processes started.")
    out.append(f"fpy3_worker_starts_total {totals.worker_starts}")
    family(
        "fpy3_worker_exits_total",
        "counter",
        "Worker processes ended: ok (exit 0), error (another code) or signal.",
    )
    for how in ("ok", "error", "signal"):
        out.append(f"fpy3_worker_exits_total{_labels(how=how)} {totals.worker_exits.get(how, 0)}")
    family(
        "fpy3_reloads_total",
        "counter",
        "Reloads (HUP, file changes): ok, refused (bad config) or failed (app did not start).",
    )
    for result in ("ok", "refused", "failed"):
        out.append(f"fpy3_reloads_total{_labels(result=result)} {totals.reloads.get(result, 0)}")
    return "\n".join(out) + "\n"
