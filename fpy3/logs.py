"""Error log (the ``fpy3.error`` logger) and the access log.

The access log skips the logging machinery: one formatted line per response,
written to a buffered stream that is flushed once per clock tick, so that it costs
little on the hot path.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from .config import LoggingSettings

LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}

ERROR_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_error_log(settings: LoggingSettings, debug: bool = False) -> None:
    """Point the ``fpy3`` loggers at stderr or the configured file."""
    root = logging.getLogger("fpy3")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    if settings.error_log_file:
        handler: logging.Handler = logging.FileHandler(settings.error_log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(ERROR_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else LEVELS[settings.level])
    root.propagate = False


class AccessLog:
    """Writes one line per response in Common (combined) or JSON format."""

    def __init__(self, settings: LoggingSettings):
        self.json = settings.access_format == "json"
        self.path = settings.access_log_file
        self.stream = self._open()

    def _open(self):
        if self.path:
            return open(self.path, "a", buffering=1 << 16, encoding="utf-8")
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1 << 16, encoding="utf-8")

    def reopen(self) -> None:
        """After log rotation (SIGUSR1)."""
        self.stream.flush()
        self.stream.close()
        self.stream = self._open()

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):  # ValueError: already closed
            pass

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass

    def log_request(self, scope: dict, status: int, size: int, duration: float) -> None:
        """One line for a finished ASGI http exchange."""
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        self.log(
            scope["client"],
            scope["method"],
            target,
            "HTTP/" + scope["http_version"],
            status,
            size,
            duration,
            scope["headers"],
        )

    def log(
        self,
        client: tuple | None,
        method: str,
        target: str,
        protocol: str,
        status: int,
        size: int,
        duration: float,
        headers: list,
    ) -> None:
        user_agent = referer = "-"
        for name, value in headers:
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
            elif name == b"referer":
                referer = value.decode("latin-1")
        host = client[0] if client else "-"
        now = time.time()
        if self.json:
            path, _, query = target.partition("?")
            line = json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                    + f".{int(now % 1 * 1000):03d}Z",
                    "remote_addr": host,
                    "method": method,
                    "path": path,
                    "query": query,
                    "protocol": protocol,
                    "status": status,
                    "bytes": size,
                    "duration_ms": round(duration * 1000, 3),
                    "user_agent": user_agent,
                    "referer": referer,
                }
            )
        else:
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
            request = f"{method} {target} {protocol}".replace('"', '\\"')
            ua = user_agent.replace('"', '\\"')
            ref = referer.replace('"', '\\"')
            line = f'{host} - - [{stamp}] "{request}" {status} {size} "{ref}" "{ua}"'
        self.stream.write(line + "\n")


def reopen_error_log() -> None:
    """Reopen the error log file after rotation (USR1); stderr needs nothing."""
    for handler in logging.getLogger("fpy3").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
