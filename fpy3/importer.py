"""Loading the app named "module:attr"."""

from __future__ import annotations

import importlib
import sys


class AppImportError(Exception):
    pass


def import_app(spec: str, app_dir: str = "", factory: bool = False):
    module_name, _, attrs = spec.partition(":")
    path = app_dir or "."
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
            raise AppImportError(
                f"cannot import app {spec!r}: no module named {exc.name!r}"
            ) from None
        raise AppImportError(f"cannot import app {spec!r}: {type(exc).__name__}: {exc}") from exc
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AppImportError(
                f"cannot import app {spec!r}: module {module_name!r} has no attribute {attrs!r}"
            ) from None
    if not callable(obj):
        raise AppImportError(f"app {spec!r} is not callable")
    if factory:
        # server.factory: the attribute makes the app (uvicorn's --factory).
        try:
            obj = obj()
        except Exception as exc:
            raise AppImportError(
                f"app factory {spec!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(obj):
            raise AppImportError(f"app factory {spec!r} returned {type(obj).__name__}, not an app")
    return obj
