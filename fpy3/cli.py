"""``fpy3`` command line: ``fpy3 run MODULE:ATTR`` serves one worker in the foreground."""

from __future__ import annotations

import argparse
import sys

from . import __version__, config
from .logs import configure_error_log

EXIT_CONFIG = 2  # bad config, or a socket that cannot be bound


def load_settings(args: argparse.Namespace) -> config.Settings:
    """Settings from --config, env and flags; prints the error and exits 2 on failure."""
    try:
        settings = config.load(args.config, overrides=config.overrides_from_args(args))
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.check_config:
        sys.stdout.write(config.dump(settings))
        sys.exit(0)
    return settings


def prepare(settings: config.Settings):
    """Certificate and sockets, shared by ``fpy3 run`` and the master. Exits 2 on failure."""
    from .sockets import BindError, bind_listeners
    from .tls import server_context, with_certificate

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fpy3", description="fpy3 ASGI server")
    parser.add_argument("--version", action="version", version=f"fpy3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve an ASGI app with one worker in the foreground")
    run.add_argument("app_spec", nargs="?", metavar="MODULE:ATTR", help="the ASGI app")
    config.add_arguments(run)
    args = parser.parse_args(argv)
    if args.app_spec:
        if args.app:
            parser.error("give the app either as MODULE:ATTR or with --app, not both")
        args.app = args.app_spec
    settings = load_settings(args)
    configure_error_log(settings.logging, settings.server.debug)
    settings, listeners = prepare(settings)
    if settings.workers.count > 1 or settings.reload.enabled:
        # Several workers or hot reload need a master: become one.
        from .supervisor.master import Arbiter

        sys.exit(Arbiter(args, settings, listeners).run())
    from . import worker

    code = worker.run(settings, listeners)
    listeners.close()
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
