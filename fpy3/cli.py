"""``fpy3`` command line: ``fpy3 run MODULE:ATTR`` serves one worker in the foreground."""

from __future__ import annotations

import argparse
import sys

from . import __version__, config
from .bootstrap import configure_logging, load_settings, prepare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fpy3", description="fpy3 ASGI server")
    parser.add_argument("--version", action="version", version=f"fpy3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="serve an ASGI app with one worker in the foreground",
        description="Serve an ASGI app. Every config key without a flag of its own is "
        "--set section.key=value (see config/production.toml).",
    )
    run.add_argument("app_spec", nargs="?", metavar="MODULE:ATTR", help="the ASGI app")
    config.add_arguments(run)
    args = parser.parse_args(argv)
    if args.app_spec:
        if args.app:
            parser.error("give the app either as MODULE:ATTR or with --app, not both")
        args.app = args.app_spec
    settings = load_settings(args)
    configure_logging(settings)
    settings, listeners = prepare(settings)
    if (
        settings.workers.count > 1
        or settings.reload.enabled
        or settings.metrics.port
        or settings.acme.enabled
    ):
        # Several workers, hot reload, the metrics endpoint or ACME need a master.
        from .supervisor.arbiter import Arbiter

        # workers.count = 0 means one worker for fpy3 run, as without a master.
        sys.exit(Arbiter(args, settings, listeners, default_workers=1).run())
    from . import worker
    from .bootstrap import load_session_keys

    code = worker.run(settings, listeners, session_keys=load_session_keys(settings))
    listeners.close()
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
