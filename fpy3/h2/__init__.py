"""HTTP/2 protocol adapter over nghttp2 (``native/h2.c``), on the TCP ports beside HTTP/1.1."""
