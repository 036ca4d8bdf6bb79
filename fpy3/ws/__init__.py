"""WebSocket: the sans-I/O protocol and one adapter per transport."""
