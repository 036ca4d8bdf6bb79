"""HTTP/1.1 protocol adapter: the C parser, the connection and the websocket upgrade."""
