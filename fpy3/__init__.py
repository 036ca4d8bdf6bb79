"""fpy3: an HTTP/3 and HTTP/1.1 ASGI server."""

__version__ = "0.1.0"
