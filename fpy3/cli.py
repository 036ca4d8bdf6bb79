"""``fpy3`` command line: ``fpy3 run MODULE:ATTR`` serves one worker in the foreground."""

from __future__ import annotations

import argparse
import sys

from . import __version__, config
from .bootstrap import load_settings, prepare
from .logs import configure_error_log


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
    if settings.workers.count > 1 or settings.reload.enabled or settings.acme.enabled:
        # Several workers, hot reload or ACME need a master: become one.
        from .supervisor.arbiter import Arbiter

        sys.exit(Arbiter(args, settings, listeners).run())
    from . import worker
    from .bootstrap import load_session_keys

    code = worker.run(settings, listeners, session_keys=load_session_keys(settings))
    listeners.close()
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
