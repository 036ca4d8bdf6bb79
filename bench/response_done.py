"""What the end of a response costs the worker (HTTPService.response_done), without and
with the metrics block (metrics.port set): ns per response, best of a few rounds.

    .venv/bin/python bench/response_done.py
"""

from __future__ import annotations

import asyncio
import time

from fpy3.config import Settings
from fpy3.metrics import Block
from fpy3.service import HTTPService

N = 1_000_000
SCOPE = {"type": "http", "http_version": "1.1", "method": "GET"}


def per_response(service: HTTPService) -> float:
    done = service.response_done
    start = service.loop.time()
    t0 = time.perf_counter()
    for _ in range(N):
        done(SCOPE, 200, 13, start)
    return (time.perf_counter() - t0) / N * 1e9


def main() -> None:
    loop = asyncio.new_event_loop()
    block = Block()
    plain = HTTPService(None, loop, Settings())
    metered = HTTPService(None, loop, Settings(), metrics=block)
    off = min(per_response(plain) for _ in range(5))
    on = min(per_response(metered) for _ in range(5))
    print(f"response_done: {off:.0f} ns without metrics, {on:.0f} ns with (+{on - off:.0f} ns)")
    block.close()
    loop.close()


if __name__ == "__main__":
    main()
