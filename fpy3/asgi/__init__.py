"""The public embedding API: ``fpy3.asgi.ASGIServer`` (see ``fpy3.embed``)."""

from ..embed import ASGIServer

__all__ = ["ASGIServer"]
