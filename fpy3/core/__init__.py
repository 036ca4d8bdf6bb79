"""The ASGI core: what every protocol shares.

Protocol adapters (``fpy3.h1``, ``fpy3.h3``) move bytes; the core owns the ASGI
message rules, the response rules, the scope and the end of a request. Nothing here
imports a protocol, the service or the native module.
"""
