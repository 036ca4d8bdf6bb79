"""HTTP/3 protocol adapter over the native QUIC engine and nghttp3."""
