"""Error log (the ``fpy3.error`` logger) and the access log.

The access log skips the logging machinery: one formatted line per response,
written to a buffered stream that is flushed once per clock tick, so that it costs
little on the hot path. A ``logging.config_file`` (uvicorn's ``--log-config``) that
gives the ``fpy3.access`` logger handlers sends the lines through them instead, each
record carrying the named fields as attributes.

``logging.access_format``: ``common`` (Apache combined), ``json``, or a template with
named fields (``config.ACCESS_FIELDS``), for example
``{client} "{request_line}" {status} {duration_ms:.1f}ms``.
"""

from __future__ import annotations

import configparser
import json
import logging
import logging.config
import os
import sys
import time

from .config import ACCESS_PRESETS, ConfigError, LoggingSettings, access_template_fields

LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}

ERROR_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_error_log(settings: LoggingSettings, debug: bool = False) -> None:
    """Point the ``fpy3`` loggers at stderr or the configured file, then apply
    ``logging.config_file``. Raises ConfigError when that file cannot be applied."""
    root = logging.getLogger("fpy3")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    access = logging.getLogger("fpy3.access")
    for old in list(access.handlers):
        access.removeHandler(old)
        old.close()
    if settings.error_log_file:
        handler: logging.Handler = logging.FileHandler(settings.error_log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(ERROR_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else LEVELS[settings.level])
    root.propagate = False
    if settings.config_file:
        apply_log_config(settings.config_file)


def apply_log_config(path: str) -> None:
    """dictConfig from a .json or .yaml/.yml file, fileConfig from an .ini one (uvicorn's
    --log-config). Loggers not named there stay enabled unless the file says otherwise."""
    where = f"{path}: logging.config_file"
    try:
        if path.lower().endswith((".json", ".yaml", ".yml")):
            with open(path, encoding="utf-8") as f:
                if path.lower().endswith(".json"):
                    conf = json.load(f)
                else:
                    import yaml

                    conf = yaml.safe_load(f)
            if not isinstance(conf, dict):
                raise ValueError("expected a mapping (logging.config.dictConfig's schema)")
            conf.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(conf)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ImportError as exc:
        raise ConfigError(f"{where}: YAML needs PyYAML ({exc})") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None
    except (configparser.Error, Exception) as exc:  # yaml's errors, fileConfig's
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None


class AccessLog:
    """Writes one line per response in Common (combined) or JSON format."""

    def __init__(self, settings: LoggingSettings):
        fmt = settings.access_format
        self.json = fmt == "json"
        self.template = "" if fmt in ACCESS_PRESETS else fmt
        self.fields = set(access_template_fields(self.template)) if self.template else set()
        self.path = settings.access_log_file
        # A log config that gave "fpy3.access" handlers: lines go through logging.
        logger = logging.getLogger("fpy3.access")
        self.logger = logger if logger.handlers else None
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
        if self.template or self.logger is not None:
            self.log_fields(scope, target, status, size, duration)
            return
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

    def log_fields(self, scope: dict, target: str, status: int, size: int, duration: float):
        """A template line, or a record for the fpy3.access logger (with every field)."""
        fields = access_fields(scope, target, status, size, duration)
        if self.template:
            line = self.template.format_map(fields)
        else:
            line = (
                f'{fields["client"]} - - [{fields["time"]}] "{fields["request_line"]}" '
                f'{status} {size} "{fields["referer"]}" "{fields["user_agent"]}"'
            )
        if self.logger is not None:
            self.logger.info("%s", line, extra=fields)
        else:
            self.stream.write(line + "\n")

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


class _Headers(dict):
    """Request headers as header_<name> fields: "-" for a missing one."""

    def __missing__(self, key: str) -> str:
        return "-"


def access_fields(scope: dict, target: str, status: int, size: int, duration: float) -> dict:
    """Every named field of an access log line (config.ACCESS_FIELDS)."""
    client = scope.get("client")
    headers = _Headers()
    for name, value in scope["headers"]:
        key = "header_" + name.decode("latin-1").replace("-", "_")
        if key not in headers:
            headers[key] = value.decode("latin-1")
    now = time.time()
    path, _, query = target.partition("?")
    protocol = "HTTP/" + scope["http_version"]
    method = scope.get("method", "GET")
    headers.update(
        client=client[0] if client else "-",
        client_addr=f"{client[0]}:{client[1]}" if client else "-",
        method=method,
        path=path,
        query=query,
        target=target,
        request_line=f"{method} {target} {protocol}".replace('"', '\\"'),
        protocol=protocol,
        http_version=scope["http_version"],
        scheme=scope["scheme"],
        status=status,
        bytes=size,
        duration=duration,
        duration_ms=duration * 1000,
        time=time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
        time_iso=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now % 1 * 1000):03d}Z",
        user_agent=headers.get("header_user_agent", "-"),
        referer=headers.get("header_referer", "-"),
        host=headers.get("header_host", "-"),
        pid=os.getpid(),
    )
    return headers


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
