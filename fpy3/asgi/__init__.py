"""The public embedding API: ``fpy3.asgi.ASGIServer`` and ``fpy3.asgi.serve`` (see
``fpy3.embed``)."""

from ..embed import ASGIServer, serve

__all__ = ["ASGIServer", "serve"]
