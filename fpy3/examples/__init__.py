"""Example ASGI apps bundled with fpy3."""
