"""What ``fpy3 run`` and ``fpy3-master`` both do before serving: settings, the
certificate, the sockets; and the exit codes they share with the workers."""

from __future__ import annotations

import argparse
import os
import sys

from . import config, keys
from .logs import configure_error_log
from .sockets import BindError, Listeners, bind_listeners
from .tls import server_context, with_certificate

EXIT_CONFIG = 2  # bad config, or a socket that cannot be bound
EXIT_STARTUP = 3  # the app could not be imported or its lifespan startup failed


def load_env_file(path: str) -> None:
    """uvicorn's --env-file: variables from a .env file into the environment (before the
    config is read, so FPY3_* ones count); variables already set win."""
    from dotenv import dotenv_values

    try:
        with open(path, encoding="utf-8") as f:
            values = dotenv_values(stream=f)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        print(f"command line: --env-file: cannot read {path}: {reason}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    for name, value in values.items():
        if value is not None:
            os.environ.setdefault(name, value)


def load_settings(args: argparse.Namespace) -> config.Settings:
    """Settings from --env-file, --config, env and flags; prints the error and exits 2 on
    failure."""
    if getattr(args, "env_file", None):
        load_env_file(args.env_file)
    try:
        settings = config.load(args.config, overrides=config.overrides_from_args(args))
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.check_config:
        sys.stdout.write(config.dump(settings))
        sys.exit(0)
    return settings


def configure_logging(settings: config.Settings) -> None:
    """The error log and ``logging.config_file``; exits 2 when that file is bad."""
    try:
        configure_error_log(settings.logging, settings.server.debug)
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def prepare(settings: config.Settings) -> tuple[config.Settings, Listeners]:
    """Certificate and sockets, bound once before any worker starts. Exits 2 on failure."""
    try:
        settings = with_certificate(settings)
        server_context(settings)  # fail here, once, rather than in every worker
    except (OSError, ValueError) as exc:
        print(f"{settings.config_file or 'command line'}: tls.cert: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        listeners = bind_listeners(settings)
    except BindError as exc:
        print(f"{settings.config_file or 'command line'}: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    return settings, listeners


def load_session_keys(settings: config.Settings) -> keys.SessionKeys:
    """The keys that outlive a restart (tls.keys_file, made on first start). Exits 2
    when the file cannot be read or made."""
    path = settings.tls.keys_file or keys.default_path(settings.state_path)
    try:
        return keys.load_or_create(path)
    except keys.KeyFileError as exc:
        print(f"{settings.config_file or 'command line'}: tls.keys_file: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
